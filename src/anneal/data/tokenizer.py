"""Tokenizers for preprocessing: bytes (no files needed) and a local Hugging Face ``tokenizer.json``.

Both expose ``encode(text) -> list[int]``, ``vocab_size`` and ``eod`` (the end-of-document id appended
after every document). The ``tokenizers`` package is imported only when a file is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from anneal.config.dataset import BYTE_EOD, BYTE_VOCAB_SIZE
from anneal.errors import ConfigError

# Tried in order when no end-of-document token is named: GPT-2/Qwen, Llama 3, Llama 2/Mistral, Gemma.
EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")


class Tokenizer(Protocol):
    vocab_size: int
    eod: int

    def encode(self, text: str) -> list[int]: ...


class ByteTokenizer:
    """UTF-8 bytes as token ids 0-255; 256 is the end-of-document token."""

    vocab_size = BYTE_VOCAB_SIZE
    eod = BYTE_EOD

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


class HFTokenizer:
    """A Hugging Face fast tokenizer read from a local ``tokenizer.json`` (no network, no transformers)."""

    def __init__(self, path: str | Path, *, eod_token: str | None = None) -> None:
        import tokenizers  # lazily: only preprocessing with a tokenizer file needs it

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--tokenizer-file ({str(path)!r}) is not a file")
        self.path = path
        self._tokenizer = tokenizers.Tokenizer.from_file(str(path))
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.eod = self._find_eod(eod_token)

    def _find_eod(self, eod_token: str | None) -> int:
        candidates = (eod_token,) if eod_token is not None else EOD_CANDIDATES
        for token in candidates:
            token_id = self._tokenizer.token_to_id(token)
            if token_id is not None:
                return token_id
        raise ConfigError(f"--eod-token ({eod_token!r}): {self.path} has none of {', '.join(candidates)}; "
                          "name its end-of-document token")

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids


def load_tokenizer(tokenizer_file: str | Path | None = None, *, eod_token: str | None = None) -> Tokenizer:
    """The byte tokenizer when no file is given, else the Hugging Face tokenizer in ``tokenizer_file``."""
    if tokenizer_file is None:
        return ByteTokenizer()
    return HFTokenizer(tokenizer_file, eod_token=eod_token)
