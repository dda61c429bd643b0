"""Preprocessing benchmark: tokens/s of scripts/preprocess_data.py with 1 and 2 workers beside a plain
``tokenizers`` encode_batch loop, on the Python standard library's sources as JSONL (about a minute).

Usage: OMP_NUM_THREADS=1 python scripts/bench_preprocess.py [--tokenizer PATH] [--corpus-mb 4] [--repeats 3]
Without --tokenizer a byte-level BPE (32,000 ids) is trained on the corpus first.
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default=None, help="a tokenizer.json, a directory or a cached hub id")
    parser.add_argument("--corpus-mb", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()

    from anneal.bench.preprocess import format_table, run

    result = run(tokenizer_path=args.tokenizer, corpus_mb=args.corpus_mb, repeats=args.repeats)
    print(format_table(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as stream:
            json.dump(result, stream, indent=2)


if __name__ == "__main__":
    main()
