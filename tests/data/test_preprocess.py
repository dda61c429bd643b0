"""scripts/preprocess_data.py, run as a real subprocess, writes what the tokenizer says, readable back."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from anneal.data.indexed import IndexedDataset
from anneal.data.tokenizer import ByteTokenizer, HFTokenizer

SCRIPT = Path(__file__).parents[2] / "scripts" / "preprocess_data.py"
DOCUMENTS = ["def f(x):\n    return x * 2\n", "Zoë paid 5 € — naïve crème brûlée ✓", "",
             "the lazy dog\n" * 30]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def _jsonl(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"id": i, "content": text}, ensure_ascii=i % 2 == 0)  # both escapings
             for i, text in enumerate(DOCUMENTS)]
    path.write_text("\n".join(lines) + "\n\n", encoding="utf-8")  # a blank line is no document
    return path


def _expected(tokenizer, texts: list[str]) -> list[list[int]]:
    return [[*tokenizer.encode(text), tokenizer.eod] for text in texts if text]


def test_text_files_become_one_document_each(tmp_path: Path) -> None:
    files = []
    for i, text in enumerate(DOCUMENTS[:2]):
        files.append(tmp_path / f"doc{i}.txt")
        files[-1].write_text(text, encoding="utf-8")
    result = _run("--input", *map(str, files), "--output-prefix", str(tmp_path / "out" / "text"))
    assert result.returncode == 0, result.stderr
    dataset = IndexedDataset(tmp_path / "out" / "text")
    assert dataset.dtype == np.uint16
    assert [dataset.get(i).tolist() for i in range(len(dataset))] == _expected(ByteTokenizer(), DOCUMENTS[:2])


def test_jsonl_with_byte_tokenizer_skips_empty_documents(tmp_path: Path) -> None:
    result = _run("--input", str(_jsonl(tmp_path)), "--json-key", "content",
                  "--output-prefix", str(tmp_path / "j"))
    assert result.returncode == 0, result.stderr
    dataset = IndexedDataset(tmp_path / "j")
    expected = _expected(ByteTokenizer(), DOCUMENTS)
    assert len(dataset) == 3 and "1 empty skipped" in result.stdout
    assert [dataset.get(i).tolist() for i in range(len(dataset))] == expected


def test_jsonl_with_a_local_hf_tokenizer(tmp_path: Path, tokenizer_file: Path) -> None:
    result = _run("--input", str(_jsonl(tmp_path)), "--json-key", "content",
                  "--output-prefix", str(tmp_path / "h"), "--tokenizer-file", str(tokenizer_file))
    assert result.returncode == 0, result.stderr
    dataset = IndexedDataset(tmp_path / "h")
    expected = _expected(HFTokenizer(tokenizer_file), DOCUMENTS)
    assert [dataset.get(i).tolist() for i in range(len(dataset))] == expected
    assert expected != _expected(ByteTokenizer(), DOCUMENTS)  # the file's tokenizer was really used


def test_missing_json_key_fails_naming_key_and_line(tmp_path: Path) -> None:
    result = _run("--input", str(_jsonl(tmp_path)), "--output-prefix", str(tmp_path / "bad"))
    assert result.returncode == 2
    assert "--json-key ('text')" in result.stderr and "corpus.jsonl:1" in result.stderr


def test_sidecar_records_the_tokenizer(tmp_path: Path, tokenizer_file: Path) -> None:
    result = _run("--input", str(_jsonl(tmp_path)), "--json-key", "content",
                  "--output-prefix", str(tmp_path / "h"), "--tokenizer", str(tokenizer_file))
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "h.json").read_text())
    tokenizer = HFTokenizer(tokenizer_file)
    assert record["tokenizer"]["path"] == str(tokenizer_file.resolve())
    assert record["tokenizer"]["vocab_size"] == tokenizer.vocab_size == 320
    assert record["tokenizer"]["eod_id"] == tokenizer.eod and record["tokenizer"]["bos_id"] is None
    assert record["tokenizer"]["sha256"] == hashlib.sha256(tokenizer_file.read_bytes()).hexdigest()
    assert (record["documents"], record["tokens"]) == (3, IndexedDataset(tmp_path / "h").num_tokens)
    assert "model.vocab_size=384" in result.stdout  # Megatron's padding to a multiple of 128


def test_a_hub_id_reads_the_tokenizer_from_the_offline_cache(tmp_path: Path, tokenizer_file: Path,
                                                             monkeypatch) -> None:
    from hf_cache import add_repo, offline_hub

    hub = offline_hub(monkeypatch, tmp_path / "home")  # HF_HOME and HF_HUB_OFFLINE=1, inherited by the script
    snapshot = add_repo(hub, "Tiny-Org/Tok", tokenizer_file.parent)
    result = _run("--input", str(_jsonl(tmp_path)), "--json-key", "content",
                  "--output-prefix", str(tmp_path / "h"), "--tokenizer", "Tiny-Org/Tok")
    assert result.returncode == 0, result.stderr
    dataset = IndexedDataset(tmp_path / "h")
    expected = _expected(HFTokenizer(tokenizer_file), DOCUMENTS)
    assert [dataset.get(i).tolist() for i in range(len(dataset))] == expected
    recorded = json.loads((tmp_path / "h.json").read_text())["tokenizer"]
    assert recorded["path"] == str(snapshot / "tokenizer.json")  # the snapshot's name, not its blob's
    missing = _run("--input", str(_jsonl(tmp_path)), "--output-prefix", str(tmp_path / "m"),
                   "--tokenizer", "Qwen/Qwen3-0.6B")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1, missing.stderr
    assert missing.stderr.startswith("anneal: error: --tokenizer-file ('Qwen/Qwen3-0.6B') is neither a dir")
    assert str(hub) in missing.stderr and "HF_HUB_OFFLINE is set" in missing.stderr


def test_parquet_with_text_key_under_two_workers_prints_a_summary(tmp_path: Path,
                                                                  tokenizer_file: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": DOCUMENTS, "id": range(len(DOCUMENTS))}), tmp_path / "c.parquet")
    result = _run("--input", str(tmp_path / "c.parquet"), "--text-key", "content", "--workers", "2",
                  "--output-prefix", str(tmp_path / "p"), "--tokenizer", str(tokenizer_file))
    assert result.returncode == 0, result.stderr
    dataset = IndexedDataset(tmp_path / "p")
    assert [dataset.get(i).tolist() for i in range(len(dataset))] == _expected(HFTokenizer(tokenizer_file),
                                                                                DOCUMENTS)
    summary = result.stdout.splitlines()[1]
    assert summary.startswith(f"{dataset.num_tokens:,} tokens from ") and summary.endswith(" with 2 workers")
    assert " tokens/s " in summary and result.stderr == ""  # a short run on a pipe draws no progress


def test_a_missing_parquet_column_fails_in_one_line(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": DOCUMENTS}), tmp_path / "c.parquet")
    result = _run("--input", str(tmp_path / "c.parquet"), "--output-prefix", str(tmp_path / "p"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    path = tmp_path / "c.parquet"
    assert result.stderr == f"anneal: error: --text-key ('text'): {path} has no such column (its columns: content)\n"


def test_a_bad_json_line_under_two_workers_fails_naming_it_and_writes_nothing(tmp_path: Path) -> None:
    path = _jsonl(tmp_path)
    path.write_text(path.read_text() + '{"content": "fine"}\n' * 3000 + '{"content": broken\n')
    result = _run("--input", str(path), "--json-key", "content", "--workers", "2",
                  "--output-prefix", str(tmp_path / "out" / "bad"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"anneal: error: {path}:3006: not a JSON line")
    assert list((tmp_path / "out").iterdir()) == []
