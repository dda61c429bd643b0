"""Which tokenizer files an export copies: only verified ones, from the directory the data's metadata records.

A dataset's ``PREFIX.json`` comes from whoever preprocessed it, so what it names is data, not a
command to copy: a file is copied into the export (a directory people upload) only when

- its name is one of ``TOKENIZER_FILES`` and it lies in the directory that holds the recorded
  ``tokenizer.json`` (a symlink is followed only while it stays inside that directory, or, for a
  snapshot of ``huggingface_hub``'s cache, ``snapshots/<commit>/``, inside that repository's ``blobs/``);
- the recorded ``tokenizer.json`` itself parses with ``tokenizers.Tokenizer.from_file`` and matches
  the recorded sha256; without it nothing of that directory is copied;
- it parses as what its name says: JSON objects for the configs and ``vocab.json``, a merges list
  for ``merges.txt``.

Every file refused is named with its reason, and the launcher prints one line for each.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from anneal.data.metadata import file_sha256

TOKENIZER_JSON = "tokenizer.json"


def _tokenizer_json(path: Path) -> None:
    import tokenizers

    tokenizers.Tokenizer.from_file(str(path))


def _json_object(path: Path) -> None:
    if not isinstance(json.loads(path.read_text(encoding="utf-8")), dict):
        raise ValueError("not a JSON object")


def _vocab(path: Path) -> None:
    vocab = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise ValueError("not a JSON object of token -> id")


def _merges(path: Path) -> None:
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip() and not line.startswith("#") and len(line.split()) != 2:
            raise ValueError(f"line {number} is not a merge of two tokens")


TOKENIZER_FILES: dict[str, Callable[[Path], None]] = {
    TOKENIZER_JSON: _tokenizer_json,
    "tokenizer_config.json": _json_object,
    "special_tokens_map.json": _json_object,
    "added_tokens.json": _json_object,
    "vocab.json": _vocab,
    "merges.txt": _merges,
}
_BESIDE = tuple(name for name in TOKENIZER_FILES if name != TOKENIZER_JSON)  # copied with tokenizer.json


@dataclass
class TokenizerCopy:
    """The files to copy (source, name in the export) and those refused, each with its reason."""

    files: list[tuple[Path, str]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


def verified_tokenizer(recorded: dict) -> TokenizerCopy:
    """The files of the tokenizer a dataset's metadata records, each verified (see the module's text)."""
    result = TokenizerCopy()
    path = recorded.get("path")
    if not path:  # the byte tokenizer: no file
        return result
    source = Path(str(path))
    if source.name != TOKENIZER_JSON:
        result.refused.append(f"{source}: the recorded tokenizer is not a {TOKENIZER_JSON}")
        return result
    directory = source.parent.resolve()
    problem = _problem(source, directory, recorded.get("sha256"))
    if problem:
        result.refused.append(f"{source}: {problem}")
        return result
    result.files.append((source, TOKENIZER_JSON))
    for name in _BESIDE:
        candidate = source.parent / name
        if candidate.exists() or candidate.is_symlink():
            problem = _problem(candidate, directory, None)
            if problem:
                result.refused.append(f"{candidate}: {problem}")
            else:
                result.files.append((candidate, name))
    return result


def _roots(directory: Path) -> list[Path]:
    """Where a file of ``directory`` may lie: in it, or (a hub cache snapshot) in its repository's blobs."""
    if directory.parent.name == "snapshots":  # huggingface_hub links snapshots/<commit>/NAME to ../../blobs/
        return [directory, directory.parent.parent / "blobs"]
    return [directory]


def _problem(path: Path, directory: Path, sha256: str | None) -> str | None:
    """Why ``path`` must not be copied, or None when it is inside ``directory`` and parses as its name says."""
    if path.is_symlink() and not any(root in path.resolve().parents for root in _roots(directory)):
        return f"a symlink to {path.resolve()}, outside {directory}"
    if not path.is_file():
        return "not a file"
    if sha256 and not str(sha256).startswith("byte-") and file_sha256(path) != sha256:
        return f"its sha256 is not the recorded {str(sha256)[:12]}…"
    try:
        TOKENIZER_FILES[path.name](path)
    except Exception as error:  # any parse failure: the file is not what its name says
        return f"does not parse as a {path.name} ({type(error).__name__}: {str(error)[:80]})"
    return None
