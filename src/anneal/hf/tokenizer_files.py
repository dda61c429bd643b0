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

A run on anneal's byte tokenizer (``dataset.kind=stdlib``, or prefixes whose ``PREFIX.json`` records the
byte tokenizer) has no file to copy: ``byte_tokenizer`` builds one, a byte-level ``tokenizer.json`` whose ids
are the UTF-8 byte values and whose end-of-document token (256) is ``<|endoftext|>``. ``run_tokenizer`` says
which of the two a run's ``dataset`` section gives (or why neither), for the exporter and ``anneal.evals``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from anneal.config.dataset import DatasetConfig
from anneal.data.metadata import file_sha256, read_tokenizer
from anneal.data.spec import BYTE_EOD, BYTE_VOCAB_SIZE
from anneal.errors import ConfigError

if TYPE_CHECKING:  # transformers is imported only when a tokenizer is built
    from transformers import PreTrainedTokenizerFast

    from anneal.config.model import ModelConfig

TOKENIZER_JSON = "tokenizer.json"
BYTE_EOD_TOKEN = "<|endoftext|>"  # the byte tokenizer's end-of-document token (id BYTE_EOD), as GPT-2's


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


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte (what a ``ByteLevel`` pre-tokenizer maps bytes to)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def byte_tokenizer(eod_token: str = BYTE_EOD_TOKEN) -> PreTrainedTokenizerFast:
    """anneal's byte tokenizer as a Hugging Face fast tokenizer: text -> its UTF-8 bytes as ids 0-255,
    ``eod_token`` = id 256 (its EOS). A BPE without merges over the 256 byte symbols, ``ByteLevel``
    pre-tokenizer (no prefix space, no regex split) and decoder. Like every Hugging Face tokenizer, it
    reads the text ``eod_token`` itself as the special token."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {symbol: byte for byte, symbol in bytes_to_unicode().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(eod_token, special=True)])
    if tokenizer.token_to_id(eod_token) != BYTE_EOD or tokenizer.get_vocab_size() != BYTE_VOCAB_SIZE:
        raise RuntimeError(f"byte tokenizer: {eod_token!r} got id {tokenizer.token_to_id(eod_token)}, "
                           f"not {BYTE_EOD}")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eod_token)


def write_byte_tokenizer(directory: str | Path) -> list[Path]:
    """``tokenizer.json`` and ``tokenizer_config.json`` of ``byte_tokenizer()`` in ``directory``."""
    directory = Path(directory)
    byte_tokenizer().save_pretrained(directory)
    return [directory / TOKENIZER_JSON, directory / "tokenizer_config.json"]


@dataclass(frozen=True)
class RunTokenizer:
    """The tokenizer an export of a run carries: anneal's byte tokenizer, the verified files a dataset's
    metadata records, or none (``missing`` says why); ``ids`` are the special-token ids for config.json."""

    byte: bool = False
    copy: TokenizerCopy = field(default_factory=TokenizerCopy)
    ids: dict[str, int] = field(default_factory=dict)  # bos_token_id / eos_token_id, where known and in range
    missing: str = ""  # why there is no tokenizer ("" when there is one)

    def write(self, out: Path) -> list[Path]:
        """Write the tokenizer's files into ``out``; the paths written."""
        if self.byte:
            return write_byte_tokenizer(out)
        for source, name in self.copy.files:
            shutil.copyfile(source, out / name)
        return [out / name for _, name in self.copy.files]

    def load(self, model: ModelConfig) -> PreTrainedTokenizerFast:
        """The tokenizer ``transformers.AutoTokenizer`` loads from an export of a ``model`` run: the same
        files, read beside the same ``config.json``. ConfigError when the run has none."""
        import tempfile

        from transformers import AutoTokenizer

        from anneal.hf.mapping import hf_config

        if self.byte:
            return byte_tokenizer()
        if not self.copy.files:
            why = self.missing or f"its recorded files were refused: {'; '.join(self.copy.refused)}"
            raise ConfigError(f"the run has no tokenizer to score text with: {why}")
        with tempfile.TemporaryDirectory(prefix="anneal-tokenizer-") as directory:
            self.write(Path(directory))
            config = {**hf_config(model, "float32"), **self.ids}
            (Path(directory) / "config.json").write_text(json.dumps(config))
            return AutoTokenizer.from_pretrained(directory)


def run_tokenizer(dataset: DatasetConfig | Mapping[str, Any] | None, vocab_size: int) -> RunTokenizer:
    """The tokenizer of a run whose ``dataset`` section (a DatasetConfig, or the dict of a checkpoint's
    config.yaml) is given, for a model of ``vocab_size`` rows: the first prefix's recorded tokenizer, else
    the byte tokenizer for ``dataset.kind=stdlib``."""
    section = dataclasses.asdict(dataset) if dataclasses.is_dataclass(dataset) else dict(dataset or {})
    names = {f.name for f in dataclasses.fields(DatasetConfig)}
    prefixes = DatasetConfig(**{k: v for k, v in section.items() if k in names}).prefixes() if section else []
    recorded = [t for t in (read_tokenizer(str(p), name) for name, p in prefixes) if t]
    if not recorded:
        if section.get("kind") == "stdlib":
            return RunTokenizer(byte=True, ids=_ids({"eod_id": BYTE_EOD}, vocab_size))
        kind = section.get("kind")
        return RunTokenizer(missing=f"the run's data records no tokenizer (no dataset path with a "
                                    f"PREFIX.json, dataset.kind {kind!r}): generated ids cannot be decoded "
                                    "from this directory alone")
    ids = _ids(recorded[0], vocab_size)
    if not recorded[0].get("path"):  # the byte tokenizer records no file
        return RunTokenizer(byte=True, ids=ids)
    return RunTokenizer(copy=verified_tokenizer(recorded[0]), ids=ids)


def _ids(recorded: dict, vocab_size: int) -> dict[str, int]:
    """The recorded special-token ids that are token ids of this model, by config.json's names."""
    names = {"bos_token_id": recorded.get("bos_id"), "eos_token_id": recorded.get("eod_id")}
    return {k: v for k, v in names.items() if type(v) is int and 0 <= v < vocab_size}
