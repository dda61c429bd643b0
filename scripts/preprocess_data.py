"""Convert text files or JSONL into a Megatron indexed dataset for ``dataset=indexed``.

    python scripts/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus_text_document
    python scripts/preprocess_data.py --input a.txt b.txt --output-prefix data/ab \\
        --tokenizer-file path/to/tokenizer.json     # or a Hugging Face tokenizer directory, or a hub id
    HF_HUB_OFFLINE=1 python scripts/preprocess_data.py --input a.txt --output-prefix data/a \
        --tokenizer Qwen/Qwen3-0.6B                 # from the Hugging Face cache only

Writes <prefix>.bin, <prefix>.idx and <prefix>.json (the tokenizer, its vocabulary size, EOS/BOS ids and
sha256), which the launcher checks against model.vocab_size before training.
"""

from __future__ import annotations

import argparse
import sys

from anneal import exits
from anneal.data.metadata import metadata_path, padded_vocab_size
from anneal.data.preprocess import INPUT_FORMATS, preprocess
from anneal.data.tokenizer import load_tokenizer
from anneal.errors import ConfigError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="text files (one document each) or JSONL")
    parser.add_argument("--output-prefix", required=True, help="writes <prefix>.bin, .idx and .json")
    parser.add_argument("--json-key", default="text", help="the JSONL field holding each document's text")
    parser.add_argument("--format", default="auto", choices=INPUT_FORMATS,
                        help="auto: JSONL for .jsonl/.json files, text otherwise")
    parser.add_argument("--tokenizer-file", "--tokenizer", dest="tokenizer_file", default=None,
                        help="a Hugging Face tokenizer.json, a directory holding one, or a hub id such as "
                        "Qwen/Qwen3-0.6B (from the cache only when HF_HUB_OFFLINE=1) "
                        "(default: the byte tokenizer, 257 ids)")
    parser.add_argument("--eod-token", default=None, help="end-of-document token (default: the tokenizer's "
                        "EOS from tokenizer_config.json, else <|endoftext|>, <|end_of_text|>, </s>, <eos>)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        tokenizer = load_tokenizer(args.tokenizer_file, eod_token=args.eod_token)
        stats = preprocess(args.input, args.output_prefix, tokenizer=tokenizer, json_key=args.json_key,
                           input_format=args.format)
    except ConfigError as err:
        exits.report(err)  # one line: anneal: error: ...
        return exits.CONFIG
    print(f"{args.output_prefix}: {stats.documents} documents, {stats.tokens} tokens "
          f"(vocab {tokenizer.vocab_size}, eod {tokenizer.eod}, bos {tokenizer.bos}), "
          f"{stats.skipped_empty} empty skipped; tokenizer recorded in {metadata_path(args.output_prefix)}")
    print(f"train on it with: dataset=indexed 'dataset.data_path=[{args.output_prefix}]' "
          f"model.vocab_size={padded_vocab_size(tokenizer.vocab_size)} (or more)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
