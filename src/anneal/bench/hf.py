"""Hugging Face export and import of a Qwen3-0.6B-shaped model (random bf16 weights) vs plain safetensors.

Export: ``export_checkpoint`` (DCP read through the safe reader, rename, ``save_file``) against
``safetensors.torch.save_file`` of the same tensors. Import: ``load_pretrained`` (config check, lazy
per-tensor read, copy into the model, ``reload_model_params``) against ``load_file`` and a copy of
each tensor into the model (``load_file`` alone maps the file and returns before reading it all). The
checkpoint holds the model only: a 0.6B model's Adam state would not fit beside it on these machines.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from anneal.bench.stats import Stat, interleaved, ratios


class _WeightsOnly:
    """The optimizer and scheduler parts a model-only checkpoint needs (no state, no masters)."""

    param_groups: list = []
    backend = "none"  # recorded in the checkpoint's metadata

    def state_dict(self) -> dict:
        return {}

    def reload_model_params(self) -> None:
        return None


def hf_figures(repeats: int, model_config=None) -> dict[str, Stat]:
    """Export and import against safetensors' own save and load (Qwen3-0.6B's shape unless given)."""
    import torch
    from safetensors.torch import load_file, save_file

    from anneal.checkpoint.checkpointer import Checkpointer
    from anneal.config.runtime import CheckpointConfig
    from anneal.hf.exporter import export_checkpoint
    from anneal.hf.importer import load_pretrained
    from anneal.hf.mapping import to_hf_name
    from anneal.model.qwen3 import build_model
    from anneal.context import DistContext, TrainState

    cfg = model_config or _qwen3_0p6b()
    model = build_model(cfg, dtype=torch.bfloat16)
    tensors = {to_hf_name(name): p.detach() for name, p in model.named_parameters()}
    stub = _WeightsOnly()
    yaml = "model:\n" + "".join(f"  {k}: {v if v is not None else 'null'}\n" for k, v in vars(cfg).items())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ctx = DistContext(0, 1, 0, torch.device("cpu"), None)
        Checkpointer(CheckpointConfig(save=str(root / "ck")), model=model, optimizer=stub, scheduler=stub,
                     ctx=ctx, config_yaml=yaml, report=lambda _: None).save(TrainState(iteration=1))
        cases = {"export": lambda: export_checkpoint(root / "ck", root / "hf", max_shard_bytes=5 * 10**9),
                 "save_file": lambda: save_file(tensors, str(root / "plain.safetensors")),
                 "import": lambda: load_pretrained(root / "hf", model, stub, cfg),
                 "load_file": lambda: _load_into(model, load_file(str(root / "plain.safetensors")))}
        runs = interleaved(cases, repeats=repeats)
    return {"hf_params": Stat.of([sum(t.numel() for t in tensors.values())], "parameters"),
            "hf_export_s": Stat.of(runs["export"], "s"),
            "hf_export_vs_save_file": ratios(runs["export"], runs["save_file"]),
            "hf_import_s": Stat.of(runs["import"], "s"),
            "hf_import_vs_load_file": ratios(runs["import"], runs["load_file"])}


def _load_into(model, tensors: dict) -> None:
    """The plain way: every tensor copied into the parameter of its name (no checks, no masters)."""
    from anneal.hf.mapping import to_hf_name

    for name, param in model.named_parameters():
        param.data.copy_(tensors[to_hf_name(name)])


def _qwen3_0p6b():
    from anneal.config.model import ModelConfig

    return ModelConfig(num_layers=28, hidden_size=1024, ffn_hidden_size=3072, num_attention_heads=16,
                       num_query_groups=8, kv_channels=128, vocab_size=151936, seq_length=4096)
