"""``anneal-export-hf CHECKPOINT OUT [--max-shard-size 5GB]``: a checkpoint as a Hugging Face model."""

from __future__ import annotations

import argparse
import sys

from anneal import exits
from anneal.errors import ConfigError


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="anneal-export-hf",
        description="Write an anneal checkpoint as a Hugging Face Qwen3 model directory.",
    )
    parser.add_argument("checkpoint", help="an iter_* checkpoint directory, or a save directory (its latest)")
    parser.add_argument("out", help="the Hugging Face model directory to write")
    parser.add_argument(
        "--max-shard-size",
        default="5GB",
        help="largest safetensors file before sharding with an index (default 5GB; GB=1e9, GiB=2**30)",
    )
    args = parser.parse_args(argv)
    from anneal.hf.exporter import export_checkpoint, parse_size

    try:
        export = export_checkpoint(
            args.checkpoint, args.out, max_shard_bytes=parse_size(args.max_shard_size)
        )
    except ConfigError as error:
        exits.report(error)
        sys.exit(exits.CONFIG)
    for reason in export.refused:
        print(f"anneal: note: tokenizer file not copied: {reason}", flush=True)
    if export.no_tokenizer:
        print(f"anneal: note: no tokenizer written: {export.no_tokenizer}", flush=True)
    names = [p.name for p in [*export.written, *export.configs]]
    print(f"exported {args.checkpoint} to {args.out}: {', '.join(names)}")
