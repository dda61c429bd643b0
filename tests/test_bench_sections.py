"""Sections of scripts/bench.py that broke silently when what they drive changed: each runs here at a tiny
size (timings are not asserted)."""

from __future__ import annotations

import pytest

from anneal.config.model import ModelConfig
from anneal.model.qwen3 import build_model


def test_hugging_face_section_saves_exports_and_imports_a_model() -> None:
    from anneal.bench.hf import hf_figures

    tiny = ModelConfig(num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=2,
                       num_query_groups=1, kv_channels=16, vocab_size=64, seq_length=16)
    figures = hf_figures(1, tiny)
    assert figures["hf_params"].median == sum(p.numel() for p in build_model(tiny, device="meta").parameters())
    assert figures["hf_export_s"].median > 0 and figures["hf_import_vs_load_file"].median > 0


@pytest.mark.slow
def test_start_up_section_finds_the_first_iteration_line() -> None:
    from anneal.bench.launcher import _time_to_first_iteration

    assert 0 < _time_to_first_iteration() < 120
