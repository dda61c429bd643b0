"""Shared by tests/evals: local lm-eval tasks (no downloads), a tiny byte-level checkpoint and its export."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hf"))  # hf_helpers: checkpoints of tiny models

# Questions whose answers a byte-level model scores; two are longer than the model's 32 tokens, so the
# context is cut from the left as lm-eval's hf backend cuts it.
QUESTIONS = [(f"What is {i} plus {i}?", [f" {2 * i}", f" {2 * i + 1}", " none"], i % 3) for i in range(10)]
QUESTIONS += [("A long question that does not fit in the window of the tiny model: which one?",
               [" the first", " another", " neither"], 1),
              ("Pick a colour, any colour at all, from the three below:", [" red", " blue", " green"], 2)]
TEXTS = ["The quick brown fox jumps over the lazy dog, then over the lazy cat, then home: a rolling text.",
         "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich. 🙂", "short"]


def _task(directory: Path, name: str, body: str, docs: list[dict]) -> None:
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    (directory / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"  cache_dir: {directory / 'cache'}\ntest_split: test\n{body}")


@pytest.fixture(scope="session")
def tasks_dir(tmp_path_factory) -> Path:
    """``my_mc`` (multiple choice: acc, acc_norm), ``my_ppl`` (rolling loglikelihood), ``my_gen`` (greedy)."""
    directory = tmp_path_factory.mktemp("tasks")
    _task(directory, "my_mc", 'output_type: multiple_choice\ndoc_to_text: "Q: {{question}}\\nA:"\n'
          'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
          "metric_list:\n  - metric: acc\n  - metric: acc_norm\n",
          [{"question": q, "choices": c, "answer": a} for q, c, a in QUESTIONS])
    _task(directory, "my_ppl", 'output_type: loglikelihood_rolling\ndoc_to_text: "{{text}}"\n'
          'doc_to_target: "{{text}}"\nmetric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n',
          [{"text": t} for t in TEXTS])
    _task(directory, "my_gen", 'output_type: generate_until\ndoc_to_text: "{{question}}"\n'
          'doc_to_target: "{{answer}}"\ngeneration_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 6\n'
          "metric_list:\n  - metric: exact_match\n",
          [{"question": q, "answer": c[a]} for q, c, a in QUESTIONS[:4]])
    return directory


@pytest.fixture(scope="session")
def offline(tmp_path_factory):
    """No network for datasets and the hub, for the whole session's lm-eval runs."""
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    mp.setenv("HF_HUB_OFFLINE", "1")
    yield
    mp.undo()


@pytest.fixture(scope="session")
def byte_run(tmp_path_factory, offline) -> tuple[Path, Path]:
    """(a checkpoint of a tiny model of a byte-level run that took two steps, its anneal-export-hf export)."""
    from hf_helpers import build, model_config, save_checkpoint, token_ids

    from anneal.hf.exporter import export_checkpoint

    root = tmp_path_factory.mktemp("byte_run")
    cfg = model_config(True, init_method_std=0.1)
    parts = build(cfg)
    model, optimizer, _ = parts
    for _ in range(2):
        optimizer.zero_grad()
        optimizer.scale_loss(model(token_ids(cfg, seed=3)).float().logsumexp(-1).mean()).backward()
        optimizer.step()
    save_checkpoint(root / "ck", parts, cfg, {"dataset": {"kind": "stdlib"}})
    export_checkpoint(root / "ck", root / "hf", max_shard_bytes=10**9)
    return root / "ck", root / "hf"
