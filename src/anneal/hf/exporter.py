"""An anneal checkpoint -> a Hugging Face ``Qwen3ForCausalLM`` directory (``anneal-export-hf``).

Writes ``config.json``, ``generation_config.json``, ``model.safetensors`` (or shards of at most
``max_shard_bytes`` with ``model.safetensors.index.json``) and the tokenizer files that the run's
data metadata (``PREFIX.json``) records, each verified first (``anneal.hf.tokenizer_files``): a
file that is not what its name says is not copied, and is named in ``Export.refused``; when no tokenizer
is recorded to copy (anneal's byte tokenizer, or no metadata), ``Export.no_tokenizer`` says why. Every
file gets the mode the umask gives (safetensors alone creates 0600). The model tensors are read
with DCP in this one process through the restricted reader, one output shard at a time, so memory
holds one shard, whatever the layout the checkpoint was saved in (DCP reshards to whole tensors).
Tensors keep the dtype they were trained in; ``vocab_size`` is the embedding's rows, padding kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from anneal.checkpoint import files
from anneal.checkpoint.safe_reader import SafeFileSystemReader
from anneal.config.model import ModelConfig
from anneal.errors import ConfigError
from anneal.hf.importer import INDEX_FILE, SINGLE_FILE
from anneal.hf.mapping import DTYPE_NAMES, hf_config, to_hf_name
from anneal.hf.tokenizer_files import TokenizerCopy, verified_tokenizer

DEFAULT_MAX_SHARD_SIZE = "5GB"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


@dataclass(frozen=True)
class Export:
    written: list[Path]  # the weights and tokenizer files written into OUT, weights first
    refused: list[str] = field(default_factory=list)  # tokenizer files not copied, each with its reason
    no_tokenizer: str = ""  # why no tokenizer file was written, when none was recorded to copy
    configs: list[Path] = field(default_factory=list)  # config.json and generation_config.json


def parse_size(text: str) -> int:
    """``"5GB"``, ``"500MiB"`` or a number of bytes -> bytes (GB = 10**9 and GiB = 2**30, as Hugging Face)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", str(text).upper())
    if match is None or float(match.group(1)) <= 0:
        raise ConfigError(f"--max-shard-size ({text!r}) must be a positive size such as 5GB, 500MB or 1GiB")
    return int(float(match.group(1)) * _UNITS[match.group(2) or ""])


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, max_shard_bytes: int) -> Export:
    """Write the Hugging Face directory ``out`` from ``checkpoint`` (an ``iter_*`` or a save directory)."""
    path = _resolve(Path(checkpoint))
    files.verify(path)  # every file against the manifest: a damaged checkpoint is refused, naming the file
    run_config = _run_config(path)
    cfg = ModelConfig(**{k: v for k, v in run_config["model"].items() if k != "_target_"})
    shapes = _model_tensors(path, cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("model*.safetensors"), out / INDEX_FILE]:  # a previous export's weights
        stale.unlink(missing_ok=True)
    written = _write_weights(path, out, shapes, max_shard_bytes)
    dtype = DTYPE_NAMES[str(next(iter(shapes.values()))[1])]
    recorded, tokenizer, ids = _recorded_tokenizer(run_config, cfg.vocab_size)
    (out / "config.json").write_text(json.dumps({**hf_config(cfg, dtype), **ids}, indent=2) + "\n")
    generation = {"_from_model_config": True, **ids}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return Export(written + _copy_tokenizer(tokenizer, out), tokenizer.refused, _why_no_tokenizer(recorded),
                  [out / "config.json", out / "generation_config.json"])


def _resolve(checkpoint: Path) -> Path:
    from anneal.hf.hub import looks_like_hub_id

    path = files.resolve_load(checkpoint) if checkpoint.is_dir() else None
    if path is None and looks_like_hub_id(checkpoint):
        raise ConfigError(
            f"CHECKPOINT ({checkpoint}) is not a directory; a Hugging Face hub id is a model already: "
            f"start a run from it with checkpoint.pretrained_checkpoint={checkpoint}"
        )
    if path is None or not path.is_dir():
        raise ConfigError(
            f"CHECKPOINT ({checkpoint}) is neither an iter_* checkpoint nor a save directory "
            f"with {files.TRACKER}"
        )
    return path


def _run_config(path: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    if not (path / "config.yaml").is_file():
        raise ConfigError(f"CHECKPOINT ({path}) has no config.yaml: it was not written by anneal's launcher")
    return OmegaConf.to_container(OmegaConf.load(path / "config.yaml"), resolve=True)


def _model_tensors(path: Path, cfg: ModelConfig) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """anneal name -> (shape, dtype) of each model tensor stored, in ``named_parameters`` order."""
    from anneal.model.qwen3 import build_model

    stored = SafeFileSystemReader(str(path)).read_metadata().state_dict_metadata
    shapes = {}
    for name, param in build_model(cfg, device="meta").named_parameters():
        entry = stored.get(f"model.{name}")
        if entry is None or tuple(entry.size) != tuple(param.shape):
            found = None if entry is None else tuple(entry.size)
            raise ConfigError(
                f"CHECKPOINT ({path}): model.{name} is {found}, its config.yaml's model "
                f"section makes it {tuple(param.shape)}"
            )
        shapes[name] = (entry.size, entry.properties.dtype)
    return shapes


def _plan_shards(shapes: dict[str, tuple[torch.Size, torch.dtype]], max_bytes: int) -> list[list[str]]:
    """Consecutive tensors, each shard at most ``max_bytes`` unless one tensor alone is larger."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, (shape, dtype) in shapes.items():
        nbytes = shape.numel() * dtype.itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _write_weights(path: Path, out: Path, shapes: dict, max_bytes: int) -> list[Path]:
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    mode = 0o666 & ~_umask()  # safetensors creates its files 0600: give them the mode every other file gets
    shards = _plan_shards(shapes, max_bytes)
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map, total = {}, 0
    for file, shard in zip(names, shards):
        target = {name: torch.empty(shapes[name][0], dtype=shapes[name][1]) for name in shard}
        with warnings.catch_warnings():  # DCP warns that one process "assumes the intent": it is the intent
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({"model": target}, storage_reader=SafeFileSystemReader(str(path)))
        tensors = {to_hf_name(name): tensor for name, tensor in target.items()}
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        os.chmod(out / file, mode)
        weight_map.update(dict.fromkeys(tensors, file))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return [out / file for file in names]


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask sets it: put it back at once
    os.umask(mask)
    return mask


def _recorded_tokenizer(run_config: dict[str, Any], vocab_size: int) -> tuple[dict | None, TokenizerCopy,
                                                                              dict[str, int]]:
    """The tokenizer the data's metadata records (the first prefix that has one), its verified files,
    and its special-token ids where they are token ids of this model."""
    from anneal.data.metadata import read_tokenizer

    dataset = run_config.get("dataset") or {}
    prefixes = dataset.get("data_path") or []
    recorded = [t for t in (read_tokenizer(str(p), "dataset.data_path") for p in prefixes) if t]
    if not recorded:
        return None, TokenizerCopy(), {}
    names = {"bos_token_id": recorded[0].get("bos_id"), "eos_token_id": recorded[0].get("eod_id")}
    ids = {k: v for k, v in names.items() if type(v) is int and 0 <= v < vocab_size}
    return recorded[0], verified_tokenizer(recorded[0]), ids


def _why_no_tokenizer(recorded: dict | None) -> str:
    """Why the export holds no tokenizer ("" when one was recorded with a file to copy)."""
    if recorded is None:
        return ("the run's data records no tokenizer (no dataset.data_path with a PREFIX.json): "
                "generated ids cannot be decoded from this directory alone")
    if not recorded.get("path"):
        eod = recorded.get("eod_id")
        return (f"the run's data uses anneal's byte tokenizer (ids 0-255 are UTF-8 bytes, {eod} ends a "
                "document), which has no tokenizer file: decode generated ids with "
                "bytes(i for i in ids if i < 256).decode('utf-8', 'replace')")
    return ""


def _copy_tokenizer(tokenizer: TokenizerCopy, out: Path) -> list[Path]:
    for source, name in tokenizer.files:
        shutil.copyfile(source, out / name)
    return [out / name for _, name in tokenizer.files]
