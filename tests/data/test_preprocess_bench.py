"""scripts/bench_preprocess.py's figures (anneal.bench.preprocess) on a tiny corpus, so the benchmark cannot rot."""

from __future__ import annotations

from pathlib import Path

from anneal.bench.preprocess import format_table, run, stdlib_texts


def test_every_case_reports_tokens_per_second(tokenizer_file: Path) -> None:
    result = run(tokenizer_path=str(tokenizer_file), corpus_mb=0.02, repeats=1)
    assert list(result["tokens_per_s"]) == ["preprocess --workers 1", "preprocess --workers 2",
                                            "tokenizers encode_batch, its threads",
                                            "tokenizers encode_batch, 1 thread"]
    assert all(stat["median"] > 0 for stat in result["tokens_per_s"].values())
    assert result["two_workers_startup_s"]["median"] > 0
    assert "tokens/s" in format_table(result) and str(tokenizer_file) in result["tokenizer"]


def test_the_corpus_is_the_stdlib_without_empty_files() -> None:
    texts = stdlib_texts(0.05)
    assert texts and all(text.strip() for text in texts) and sum(len(t.encode()) for t in texts) >= 50_000
