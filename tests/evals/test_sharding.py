"""Requests shared over 2 gloo ranks (``AnnealLM(group=...)``) score as one process does: each rank's
metrics from the sharded, lockstepped and gathered requests equal those of the same model scoring every
request alone, for multiple-choice, rolling loglikelihood and greedy generation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

TASKS = ["my_mc", "my_ppl", "my_gen"]


def _rank(rank: int, world: int, tasks_dir: str, out: Path) -> None:
    import torch
    import torch.distributed as dist

    from anneal.config.model import ModelConfig
    from anneal.evals.harness import run_downstream
    from anneal.hf.tokenizer_files import byte_tokenizer
    from anneal.model.qwen3 import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=1, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4,
                      num_query_groups=2, kv_channels=8, vocab_size=320, seq_length=32, init_method_std=0.1)
    model = build_model(cfg)
    kwargs = {"tasks": TASKS, "include_path": tasks_dir, "limit": None, "max_length": cfg.seq_length,
              "batch_size": 3}
    sharded = run_downstream(model, byte_tokenizer(), group=dist.group.WORLD, **kwargs)
    alone = run_downstream(model, byte_tokenizer(), group=None, **kwargs)
    (out / f"rank{rank}.json").write_text(json.dumps({"sharded": sharded, "alone": alone}))


def test_two_ranks_sharing_the_requests_score_as_one_process(tasks_dir: Path, offline, tmp_path: Path) -> None:
    pytest.importorskip("lm_eval")
    from optim.optim_helpers import run_distributed

    run_distributed(_rank, 2, str(tasks_dir), tmp_path)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    alone = results[0]["alone"]
    assert {key.split("/")[1] for key in alone} == set(TASKS)
    for result in results:
        assert result["alone"] == alone  # the same model everywhere
        assert result["sharded"].keys() == alone.keys()
        for key, value in alone.items():
            assert result["sharded"][key] == pytest.approx(value, rel=1e-6), key
