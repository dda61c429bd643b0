"""``checkpoint.pretrained_checkpoint``: a Hugging Face Qwen3 directory's weights into a built model.

The directory holds ``config.json`` and either ``model.safetensors`` or shards named by
``model.safetensors.index.json``; a hub id (``Qwen/Qwen3-0.6B``) names the snapshot of that repository in
``huggingface_hub``'s cache (``anneal.hf.hub``: downloaded first unless ``HF_HUB_OFFLINE`` is set).
The run's ``model.`` section is checked against ``config.json`` first (``check_pretrained``, before
anything is built). ``load_pretrained`` then reads the
files lazily, one tensor at a time (``safetensors.safe_open``), copies each into the parameter of
that name in the model's dtype, and has the optimizer take its fp32 masters from the result
(``reload_model_params``): the one way weights enter a built model. Today every data-parallel
rank holds whole parameters, so every rank reads every tensor; a sharded layout would read its
slice with ``get_slice`` here and nowhere else.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from anneal.config.model import ModelConfig
from anneal.parallelize import copy_full_
from anneal.errors import ConfigError
from anneal.hf.hub import resolve_model_dir
from anneal.hf.mapping import check_model_config, to_hf_name

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_FIELD = "checkpoint.pretrained_checkpoint"
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some older exports carry
_MODEL_FILES = ("config.json", "*.safetensors", INDEX_FILE)  # all a hub id's snapshot needs to hold


def model_dir(value: str | Path) -> Path:
    """The directory ``checkpoint.pretrained_checkpoint`` names: itself, or a hub id's cached snapshot."""
    return resolve_model_dir(value, _FIELD, files=_MODEL_FILES)


def read_hf_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{_FIELD} ({directory}) has no config.json: not a Hugging Face model directory")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{_FIELD} ({directory}): config.json is not valid JSON ({error})") from error
    if not isinstance(config, dict):
        raise ConfigError(f"{_FIELD} ({directory}): config.json is not a JSON object")
    return config  # read as data: auto_map and any code beside it are never imported


def check_pretrained(cfg: ModelConfig, directory: str | None) -> None:
    """Refuse a ``model.`` section that disagrees with the directory's ``config.json`` (no-op without one)."""
    if directory:
        check_model_config(cfg, read_hf_config(model_dir(directory)), str(directory))


def weight_files(directory: str | Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it (from the index, or the one file's header)."""
    root = Path(directory)
    if (root / INDEX_FILE).is_file():
        return _indexed_files(root)
    if not (root / SINGLE_FILE).is_file():
        raise ConfigError(f"{_FIELD} ({directory}) has neither {SINGLE_FILE} nor {INDEX_FILE}")
    from safetensors import safe_open

    with safe_open(root / SINGLE_FILE, framework="pt") as handle:
        return dict.fromkeys(handle.keys(), root / SINGLE_FILE)


def _indexed_files(root: Path) -> dict[str, Path]:
    """The index's tensor -> file map, every file a plain name inside ``root``."""
    try:
        weight_map = json.loads((root / INDEX_FILE).read_text())["weight_map"]
        files = {str(name): root / file for name, file in weight_map.items() if Path(file).name == file}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ConfigError(f"{_FIELD} ({root}): {INDEX_FILE} has no readable weight_map ({error!r})") from None
    if len(files) != len(weight_map):
        outside = next(f for f in weight_map.values() if Path(f).name != f)
        raise ConfigError(f"{_FIELD} ({root}): {INDEX_FILE} names {outside!r}, not a file of the directory")
    return files


@contextlib.contextmanager
def open_tensors(files: dict[str, Path]) -> Iterator[Any]:
    """``read(name) -> Tensor``, each file opened once and memory-mapped, each tensor read on demand."""
    from safetensors import safe_open

    with contextlib.ExitStack() as stack:
        handles: dict[Path, Any] = {}

        def read(name: str) -> torch.Tensor:
            path = files[name]
            if path not in handles:
                handles[path] = stack.enter_context(safe_open(path, framework="pt"))
            return handles[path].get_tensor(name)

        yield read


@torch.no_grad()
def load_pretrained(directory: str | Path, model: torch.nn.Module, optimizer: Any, cfg: ModelConfig) -> None:
    """Copy the directory's weights into ``model`` (after ``setup_optimizer``), then refresh the masters."""
    check_pretrained(cfg, str(directory))
    directory = model_dir(directory)
    files = weight_files(directory)
    params = dict(model.named_parameters())
    _check_names(set(files), {to_hf_name(name) for name in params}, directory)
    with open_tensors(files) as read:
        for name, param in params.items():
            tensor = read(to_hf_name(name))
            if tensor.shape != param.shape:
                raise ConfigError(
                    f"{_FIELD} ({directory}): {to_hf_name(name)} has shape {tuple(tensor.shape)}, "
                    f"the model's {name} {tuple(param.shape)}"
                )
            copy_full_(param, tensor)  # a plain parameter, or its FSDP2 / tensor-parallel shard
    optimizer.reload_model_params()


def _check_names(stored: set[str], wanted: set[str], directory: str | Path) -> None:
    missing = sorted(wanted - stored)
    if missing:
        raise ConfigError(f"{_FIELD} ({directory}) has no tensor {missing[0]!r} ({len(missing)} missing)")
    ignorable = {"lm_head.weight"}  # a tied model's files may store the shared output layer too
    extra = sorted(n for n in stored - wanted - ignorable if not n.endswith(_IGNORED_SUFFIXES))
    if extra:
        raise ConfigError(
            f"{_FIELD} ({directory}) holds tensors anneal's Qwen3 has no place for: "
            f"{', '.join(extra[:3])}{' …' if len(extra) > 3 else ''}"
        )
