"""Shared by tests/hf: a tiny random Qwen3 in both libraries, an anneal checkpoint of it, logits."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed.checkpoint as dcp
import transformers
from anneal_testing import SMALL_QWEN3
from omegaconf import OmegaConf

from anneal.checkpoint.checkpointer import Checkpointer
from anneal.checkpoint.safe_reader import SafeFileSystemReader
from anneal.config.model import ModelConfig
from anneal.config.optimizer import OptimizerConfig
from anneal.config.runtime import CheckpointConfig
from anneal.hf.mapping import hf_config
from anneal.model.qwen3 import build_model
from anneal.optim import setup_optimizer
from anneal.scheduler import Schedule
from anneal.context import DistContext, TrainState

# A head dim (24) unlike hidden // heads (16), GQA, a RoPE base no library defaults to, vocab >= 257.
SHAPE = {**SMALL_QWEN3, "vocab_size": 320, "seq_length": 32, "rotary_base": 123456.0}
SCHEDULE = Schedule(
    init_lr=0.0,
    max_lr=1e-3,
    min_lr=1e-4,
    lr_warmup_steps=0,
    lr_decay_steps=100,
    lr_decay_style="cosine",
    start_wd=0.1,
    end_wd=0.1,
    wd_incr_steps=100,
    wd_incr_style="constant",
)
FLAGS = SimpleNamespace(override_opt_param_scheduler=False, use_checkpoint_opt_param_scheduler=False)


def model_config(tied: bool, **overrides) -> ModelConfig:
    return ModelConfig(**{**SHAPE, "share_embeddings_and_output_weights": tied, **overrides})


def overrides(cfg: ModelConfig) -> list[str]:
    """Hydra overrides that make the launcher's model.* equal to ``cfg``."""
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    return [f"model.{name}={'null' if value is None else value}" for name, value in values.items()]


def save_hf(
    directory: Path, cfg: ModelConfig, *, seed: int = 0, **save_kwargs
) -> transformers.PreTrainedModel:
    """A random ``Qwen3ForCausalLM`` of ``cfg``'s shape (norms away from 1), saved by ``save_pretrained``."""
    torch.manual_seed(seed)
    hf_cfg = transformers.Qwen3Config(**{**hf_config(cfg, "float32"), "initializer_range": 0.1})
    model = transformers.Qwen3ForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    model.save_pretrained(directory, **save_kwargs)
    return model


def token_ids(cfg: ModelConfig, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (2, cfg.seq_length), generator=generator)


def hf_logits(directory: Path, ids: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def anneal_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits of ``model``'s weights computed in fp32 (a bf16 model is upcast, its values unchanged)."""
    fp32 = build_model(model.cfg, device="meta")
    fp32.load_state_dict({k: v.float() for k, v in model.state_dict().items()}, assign=True)
    with torch.no_grad():
        return fp32(ids)


def build(cfg: ModelConfig, dtype: str = "fp32", distributed: bool = False, lr: float = 1e-3):
    """(model, optimizer, scheduler) as the launcher builds them, 1 process."""
    model = build_model(cfg)
    opt_cfg = OptimizerConfig(
        lr=lr,
        min_lr=lr / 10,
        bf16=dtype == "bf16",
        fp16=dtype == "fp16",
        loss_scale=128.0 if dtype == "fp16" else None,
        use_distributed_optimizer=distributed,
    )
    return (model, *setup_optimizer(opt_cfg, FLAGS, model, schedule=SCHEDULE))


def save_checkpoint(save: Path, parts, cfg: ModelConfig, extra: dict | None = None) -> Path:
    """An anneal checkpoint of ``parts`` whose config.yaml holds ``cfg`` (and ``extra`` sections)."""
    model, optimizer, scheduler = parts
    run_config = {
        "model": {"_target_": "anneal.config.model.ModelConfig", **dataclasses.asdict(cfg)},
        **(extra or {}),
    }
    ctx = DistContext(0, 1, 0, torch.device("cpu"), None)
    checkpointer = Checkpointer(
        CheckpointConfig(save=str(save)),
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        ctx=ctx,
        config_yaml=OmegaConf.to_yaml(run_config),
        report=lambda _: None,
    )
    return checkpointer.save(TrainState(iteration=1))


def model_from_checkpoint(path: Path, cfg: ModelConfig) -> torch.nn.Module:
    """anneal's model with the checkpoint's weights, read with DCP directly (not through the exporter)."""
    model = build_model(cfg)
    stored = SafeFileSystemReader(str(path)).read_metadata().state_dict_metadata
    target = {
        name: torch.empty(tuple(stored[f"model.{name}"].size), dtype=stored[f"model.{name}"].properties.dtype)
        for name, _ in model.named_parameters()
    }
    with warnings.catch_warnings():  # DCP's note that one process "assumes the intent"
        warnings.simplefilter("ignore")
        dcp.load({"model": target}, storage_reader=SafeFileSystemReader(str(path)), no_dist=True)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(target[name])
    return model
