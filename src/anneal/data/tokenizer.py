"""Tokenizers for preprocessing: bytes (no files needed) and a local Hugging Face tokenizer.

Both expose ``document(text) -> list[int]`` (the tokens of one document, ending in the end-of-document id),
``vocab_size``, ``eod``, ``bos`` and ``describe()`` (what the metadata sidecar records). A Hugging Face
tokenizer is a ``tokenizer.json`` file, a directory holding one, or a hub id (``Qwen/Qwen3-0.6B``: that
repository's snapshot in ``huggingface_hub``'s cache, see ``anneal.hf.hub``); a directory's
``tokenizer_config.json``
(or ``special_tokens_map.json``) names its EOS and BOS tokens, as ``transformers`` reads them. Documents are
encoded with the tokenizer's own special tokens (its post-processor: Llama 3 puts its BOS first), BOS is
prepended when the config says ``add_bos_token`` and the post-processor did not, and EOS is appended unless
the tokenizer already ended the document with it (Megatron's ``--append-eod``). The ``tokenizers`` package
is imported only when a tokenizer is loaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol

from anneal.data.metadata import file_sha256
from anneal.data.spec import BYTE_EOD, BYTE_VOCAB_SIZE
from anneal.errors import ConfigError

# Tried in order when no end-of-document token is named: GPT-2/Qwen, Llama 3, Llama 2/Mistral, Gemma.
EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")
_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
_FIELD = "--tokenizer-file"


class Tokenizer(Protocol):
    vocab_size: int
    eod: int
    bos: int | None

    def encode(self, text: str) -> list[int]: ...

    def document(self, text: str) -> list[int]: ...

    def describe(self) -> dict: ...


class ByteTokenizer:
    """UTF-8 bytes as token ids 0-255; 256 is the end-of-document token."""

    vocab_size = BYTE_VOCAB_SIZE
    eod = BYTE_EOD
    bos = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def document(self, text: str) -> list[int]:
        return [*self.encode(text), self.eod]

    def describe(self) -> dict:
        return {"type": "byte", "path": None, "sha256": f"byte-{BYTE_VOCAB_SIZE}",
                "vocab_size": self.vocab_size, "eod_id": self.eod, "bos_id": None, "eod_token": None,
                "bos_token": None, "add_bos": False}


class HFTokenizer:
    """A Hugging Face fast tokenizer from a ``tokenizer.json``, a directory or a hub id's cached snapshot."""

    def __init__(self, path: str | Path, *, eod_token: str | None = None) -> None:
        import tokenizers  # lazily: only preprocessing with a tokenizer needs it

        from anneal.hf.hub import resolve_model_dir  # imports huggingface_hub only for a hub id

        directory = resolve_model_dir(path, _FIELD, files=("tokenizer.json", *_CONFIG_FILES))
        self.file, config = _tokenizer_files(directory)
        self._tokenizer = tokenizers.Tokenizer.from_file(str(self.file))
        vocab = self._tokenizer.get_vocab(with_added_tokens=True)
        self.vocab_size = max(self._tokenizer.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)
        self.eod_token = self._find_eod(eod_token or _token_name(config.get("eos_token")))
        self.eod = self._tokenizer.token_to_id(self.eod_token)
        self.bos_token = _token_name(config.get("bos_token"))
        self.bos = self._tokenizer.token_to_id(self.bos_token) if self.bos_token else None
        self.add_bos = bool(config.get("add_bos_token")) and self.bos is not None

    def _find_eod(self, eod_token: str | None) -> str:
        candidates = (eod_token,) if eod_token is not None else EOD_CANDIDATES
        for token in candidates:
            if self._tokenizer.token_to_id(token) is not None:
                return token
        raise ConfigError(f"--eod-token ({eod_token!r}): {self.file} has none of {', '.join(candidates)}; "
                          "name its end-of-document token")

    def encode(self, text: str) -> list[int]:
        """The tokenizer's ids for ``text``, with the special tokens its post-processor adds."""
        return self._tokenizer.encode(text).ids

    def document(self, text: str) -> list[int]:
        ids = self.encode(text)
        if self.add_bos and (not ids or ids[0] != self.bos):
            ids = [self.bos, *ids]
        return ids if ids and ids[-1] == self.eod else [*ids, self.eod]

    def describe(self) -> dict:
        # absolute, symlinks kept: a hub cache's snapshot links its tokenizer.json to blobs/<sha256>
        return {"type": "huggingface", "path": os.path.abspath(self.file), "sha256": file_sha256(self.file),
                "vocab_size": self.vocab_size, "eod_id": self.eod, "bos_id": self.bos,
                "eod_token": self.eod_token, "bos_token": self.bos_token, "add_bos": self.add_bos}


def load_tokenizer(tokenizer: str | Path | None = None, *, eod_token: str | None = None) -> Tokenizer:
    """The byte tokenizer when no path is given, else the Hugging Face tokenizer at ``tokenizer``."""
    if tokenizer is None:
        return ByteTokenizer()
    return HFTokenizer(tokenizer, eod_token=eod_token)


def _tokenizer_files(path: Path) -> tuple[Path, dict]:
    """``tokenizer.json`` and the special-token settings of a file or a Hugging Face directory."""
    if path.is_file():
        return path, {}
    if not path.is_dir():
        raise ConfigError(f"--tokenizer-file ({str(path)!r}) is neither a tokenizer.json file, a directory "
                          "nor a Hugging Face hub id (org/name)")
    file = path / "tokenizer.json"
    if not file.is_file():
        raise ConfigError(f"--tokenizer-file ({str(path)!r}): the directory has no tokenizer.json (a fast "
                          "tokenizer); save one with transformers' tokenizer.save_pretrained()")
    config: dict = {}
    for name in reversed(_CONFIG_FILES):  # tokenizer_config.json wins
        if (path / name).is_file():
            config.update(_read_json(path / name))
    return file, config


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"--tokenizer-file: {path} is not readable JSON ({err})") from None
    return data if isinstance(data, dict) else {}


def _token_name(entry: object) -> str | None:
    """A special token as tokenizer configs write it: a string or ``{"content": ...}``."""
    if isinstance(entry, dict):
        entry = entry.get("content")
    return entry if isinstance(entry, str) and entry else None
