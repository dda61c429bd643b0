"""Convert text files, JSONL or Parquet into a Megatron indexed dataset for ``dataset=indexed``.

    python scripts/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus_text_document
    python scripts/preprocess_data.py --input shards/*.parquet --text-key content --workers 8 \\
        --output-prefix data/web --tokenizer path/to/tokenizer_dir
    python scripts/preprocess_data.py --input a.txt b.txt --output-prefix data/ab \\
        --tokenizer-file path/to/tokenizer.json     # or a Hugging Face tokenizer directory, or a hub id
    HF_HUB_OFFLINE=1 python scripts/preprocess_data.py --input a.txt --output-prefix data/a \
        --tokenizer Qwen/Qwen3-0.6B                 # from the Hugging Face cache only

Writes <prefix>.bin, <prefix>.idx and <prefix>.json (the tokenizer, its vocabulary size, EOS/BOS ids and
sha256), which the launcher checks against model.vocab_size before training. The three files are
byte-identical for any --workers; a run that fails leaves none of them (they are renamed into place at the
end). Progress goes to stderr: redrawn on a terminal, a line every 30 s otherwise.
"""

from __future__ import annotations

import argparse
import sys

from anneal import exits
from anneal.data.metadata import metadata_path, padded_vocab_size
from anneal.data.preprocess import INPUT_FORMATS, preprocess
from anneal.data.tokenizer import load_tokenizer
from anneal.errors import AnnealError, ConfigError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True,
                        help="text files (one document each), JSONL (one per line) or Parquet (one per row)")
    parser.add_argument("--output-prefix", required=True, help="writes <prefix>.bin, .idx and .json")
    parser.add_argument("--json-key", "--text-key", dest="json_key", default="text",
                        help="the JSONL field or Parquet column holding each document's text (one option, "
                        "two names)")
    parser.add_argument("--format", default="auto", choices=INPUT_FORMATS,
                        help="auto: JSONL for .jsonl/.json files, Parquet for .parquet/.pq, text otherwise")
    parser.add_argument("--workers", type=int, default=1,
                        help="tokenizing processes (default 1: this one); the output is the same for any")
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
                           input_format=args.format, workers=args.workers, progress=sys.stderr)
    except AnnealError as err:
        exits.report(err)  # one line: anneal: error: ...
        return exits.CONFIG if isinstance(err, ConfigError) else exits.FAILED
    print(f"{args.output_prefix}: {stats.documents} documents, {stats.tokens} tokens "
          f"(vocab {tokenizer.vocab_size}, eod {tokenizer.eod}, bos {tokenizer.bos}), "
          f"{stats.skipped_empty} empty skipped; tokenizer recorded in {metadata_path(args.output_prefix)}")
    print(f"{stats.tokens:,} tokens from {stats.input_bytes / 1e6:,.1f} MB in {stats.seconds:.1f} s: "
          f"{stats.tokens_per_second:,.0f} tokens/s with {args.workers} worker{'s' * (args.workers > 1)}")
    print(f"train on it with: dataset=indexed 'dataset.data_path=[{args.output_prefix}]' "
          f"model.vocab_size={padded_vocab_size(tokenizer.vocab_size)} (or more)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
