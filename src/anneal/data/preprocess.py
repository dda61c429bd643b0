"""Convert text files or JSONL into a Megatron indexed dataset (``<prefix>.bin`` + ``<prefix>.idx``).

A ``.jsonl``/``.json`` file holds one document per line (the string under ``json_key``); any other file
is one document. Each document is tokenized and followed by the tokenizer's end-of-document id (Megatron's
``--append-eod``); empty documents are skipped. The token dtype is Megatron's: uint16 below 65500 ids.
``<prefix>.json`` records the tokenizer and the counts (``anneal.data.metadata``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from anneal.data.indexed import IndexedDatasetWriter
from anneal.data.metadata import write_metadata
from anneal.data.tokenizer import Tokenizer
from anneal.errors import ConfigError

INPUT_FORMATS = ("auto", "text", "jsonl")
_JSONL_SUFFIXES = (".jsonl", ".json")


@dataclass(frozen=True)
class PreprocessStats:
    documents: int
    tokens: int  # end-of-document tokens included
    skipped_empty: int


def preprocess(inputs: Sequence[str | Path], output_prefix: str | Path, *, tokenizer: Tokenizer,
               json_key: str = "text", input_format: str = "auto") -> PreprocessStats:
    """Tokenize every document of ``inputs`` (in order) into ``output_prefix``.bin/.idx/.json."""
    if input_format not in INPUT_FORMATS:
        raise ConfigError(f"--format ({input_format!r}) must be one of {', '.join(INPUT_FORMATS)}")
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    documents = tokens = skipped = 0
    with IndexedDatasetWriter(output_prefix, vocab_size=tokenizer.vocab_size) as writer:
        for path in map(Path, inputs):
            for text in iter_documents(path, json_key=json_key, jsonl=_is_jsonl(path, input_format)):
                if not text:
                    skipped += 1
                    continue
                ids = tokenizer.document(text)
                writer.add_document(ids)
                documents, tokens = documents + 1, tokens + len(ids)
    stats = PreprocessStats(documents=documents, tokens=tokens, skipped_empty=skipped)
    inputs = [str(Path(path).resolve()) for path in inputs]
    write_metadata(output_prefix, tokenizer=tokenizer.describe(),
                   stats={"documents": documents, "tokens": tokens, "inputs": inputs, "json_key": json_key,
                          "dtype": str(writer.dtype)})
    return stats


def iter_documents(path: Path, *, json_key: str, jsonl: bool) -> Iterator[str]:
    """The documents of one input file: each JSONL line's ``json_key``, or the whole file."""
    if not path.is_file():
        raise ConfigError(f"--input ({str(path)!r}) is not a file")
    if not jsonl:
        yield path.read_text(encoding="utf-8")
        return
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                yield _json_text(line, json_key, f"{path}:{number}")


def _json_text(line: str, json_key: str, where: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{where}: not a JSON line ({err.msg})") from None
    text = record.get(json_key) if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise ConfigError(f"--json-key ({json_key!r}): {where} has no string under that key")
    return text


def _is_jsonl(path: Path, input_format: str) -> bool:
    if input_format == "auto":
        return path.suffix.lower() in _JSONL_SUFFIXES
    return input_format == "jsonl"
