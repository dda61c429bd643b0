"""conf/recipe/*.yaml is what scripts/export_recipes.py makes of the Python recipes, and nothing else."""

from __future__ import annotations

import importlib.util

import pytest

from anneal_testing import CONF, ROOT


@pytest.fixture(scope="module")
def export():
    spec = importlib.util.spec_from_file_location("export_recipes", ROOT / "scripts" / "export_recipes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_overlays_are_a_fresh_export(export, capsys) -> None:
    assert export.main(["--check"]) == 0, capsys.readouterr().err


def test_check_names_a_stale_or_orphaned_overlay(export, tmp_path, monkeypatch, capsys) -> None:
    import anneal.recipes

    monkeypatch.setattr(anneal.recipes, "RECIPES", {"qwen3_4b": anneal.recipes.RECIPES["qwen3_4b"]})
    monkeypatch.setattr(export, "RECIPE_DIR", tmp_path)
    committed = (CONF / "recipe" / "qwen3_4b.yaml").read_text()
    (tmp_path / "qwen3_4b.yaml").write_text(committed.replace("300000", "30000"))
    (tmp_path / "gone.yaml").write_text("# @package _global_\n")
    assert export.main(["--check"]) == 1
    assert capsys.readouterr().err.startswith("out of date: qwen3_4b.yaml, gone.yaml;")
    assert export.main([]) == 0  # rewrites the stale one; the orphan stays for a person to delete
    assert (tmp_path / "qwen3_4b.yaml").read_text() == committed
    assert "no recipe behind gone.yaml" in capsys.readouterr().err


def test_overlay_selects_the_closest_groups_and_holds_only_differences(export) -> None:
    from anneal.recipes import RECIPES

    text = export.render("qwen3_4b", RECIPES["qwen3_4b"]())
    assert text.startswith("# @package _global_\n")
    for line in ("- override /optimizer: distributed_fused_adam", "- override /scheduler: wsd",
                 "- override /model: qwen3_4b", "- override /dataset: mock", "  train_iters: 300000"):
        assert line in text.splitlines()
    assert "num_layers" not in text and "adam_beta2" not in text  # equal to the selected options
    tiny = export.render("tiny", RECIPES["tiny"]())
    assert tiny.splitlines()[-2:] == ["defaults:", "- override /scheduler: wsd"]
