"""An anneal checkpoint -> a Hugging Face ``Qwen3ForCausalLM`` directory (``anneal-export-hf``).

Writes ``config.json``, ``generation_config.json``, ``model.safetensors`` (or shards of at most
``max_shard_bytes`` with ``model.safetensors.index.json``) and the run's tokenizer
(``anneal.hf.tokenizer_files.run_tokenizer``): the files that the data's metadata (``PREFIX.json``)
records, each verified first (a file that is not what its name says is not copied, and is named in
``Export.refused``), or, for a run on anneal's byte tokenizer, a byte-level ``tokenizer.json`` written
anew; when the run has neither, ``Export.no_tokenizer`` says why. Every
file gets the mode the umask gives (safetensors alone creates 0600). The model tensors are read
with DCP in this one process through the restricted reader, one output shard at a time, so memory
holds one shard, whatever the layout the checkpoint was saved in (DCP reshards to whole tensors).
Tensors keep the dtype they were trained in; ``vocab_size`` is the embedding's rows, padding kept.
"""

from __future__ import annotations

import json
import os
import re
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
from anneal.hf.tokenizer_files import run_tokenizer

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
    stored = open_checkpoint(checkpoint)
    # before anything is written: a damaged PREFIX.json is refused, not found after the weights
    tokenizer = run_tokenizer(stored.config.get("dataset"), stored.model.vocab_size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("model*.safetensors"), out / INDEX_FILE]:  # a previous export's weights
        stale.unlink(missing_ok=True)
    written = _write_weights(stored, out, max_shard_bytes)
    dtype = DTYPE_NAMES[str(next(iter(stored.tensors.values()))[1])]
    ids = tokenizer.ids
    (out / "config.json").write_text(json.dumps({**hf_config(stored.model, dtype), **ids}, indent=2) + "\n")
    generation = {"_from_model_config": True, **ids}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return Export(written + tokenizer.write(out), tokenizer.copy.refused, tokenizer.missing,
                  [out / "config.json", out / "generation_config.json"])


@dataclass(frozen=True)
class StoredRun:
    """A verified checkpoint: its ``iter_*`` directory, its run's config.yaml, model and stored tensors."""

    path: Path
    config: dict[str, Any]
    model: ModelConfig
    tensors: dict[str, tuple[torch.Size, torch.dtype]]  # anneal name -> (shape, dtype), parameters' order


def open_checkpoint(checkpoint: str | Path) -> StoredRun:
    """``checkpoint`` (an ``iter_*`` or a save directory) verified against its manifest, with the model its
    config.yaml records and the shapes its tensors must have; ConfigError naming what is wrong."""
    path = _resolve(Path(checkpoint))
    files.verify(path)  # every file against the manifest: a damaged checkpoint is refused, naming the file
    run_config = _run_config(path)
    cfg = ModelConfig(**{k: v for k, v in run_config["model"].items() if k != "_target_"})
    return StoredRun(path, run_config, cfg, _model_tensors(path, cfg))


def read_tensors(stored: StoredRun, names: list[str]) -> dict[str, torch.Tensor]:
    """The model tensors ``names`` (anneal names), whole, in their stored dtype, read with DCP in this
    one process (whatever layout the checkpoint was saved in) through the restricted reader."""
    import torch.distributed.checkpoint as dcp

    target = {name: torch.empty(stored.tensors[name][0], dtype=stored.tensors[name][1]) for name in names}
    with warnings.catch_warnings():  # DCP warns that one process "assumes the intent": it is the intent
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"model": target}, storage_reader=SafeFileSystemReader(str(stored.path)))
    return target


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


def _write_weights(stored: StoredRun, out: Path, max_bytes: int) -> list[Path]:
    from safetensors.torch import save_file

    mode = 0o666 & ~_umask()  # safetensors creates its files 0600: give them the mode every other file gets
    shards = _plan_shards(stored.tensors, max_bytes)
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map, total = {}, 0
    for file, shard in zip(names, shards):
        tensors = {to_hf_name(name): tensor for name, tensor in read_tensors(stored, shard).items()}
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
