"""anneal.data.preprocess in this process: the same bytes for any worker count, Parquet, the progress line."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from anneal.data.indexed import IndexedDataset
from anneal.data.preprocess import Progress, preprocess, progress_line
from anneal.data.tokenizer import ByteTokenizer, HFTokenizer
from anneal.errors import ConfigError, RunError

TEXTS = ["def f(x):\n    return x * 2\n", "Zoë paid 5 € — naïve crème brûlée ✓", "", "the lazy dog\n" * 7]


def _parquet(path: Path, columns: dict, row_group_size: int = 16) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def _inputs(tmp_path: Path) -> tuple[list[Path], list[str]]:
    """A JSONL, a text and a Parquet file (two row groups), all keyed ``text``, and their documents in order
    (empty ones too)."""
    jsonl_texts = [f"{i}: {TEXTS[i % 4]}" if i % 9 else "" for i in range(40)]
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("".join(json.dumps({"n": i, "text": t}) + "\n" for i, t in enumerate(jsonl_texts)))
    text = tmp_path / "b.txt"
    text.write_text(TEXTS[1], encoding="utf-8")
    parquet_texts = [TEXTS[i % 4] * (i % 3 + 1) for i in range(30)]
    parquet = _parquet(tmp_path / "c.parquet", {"id": list(range(30)), "text": parquet_texts})
    return [jsonl, text, parquet], [*jsonl_texts, TEXTS[1], *parquet_texts]


def _files(prefix: Path) -> dict[str, bytes]:
    return {suffix: Path(f"{prefix}{suffix}").read_bytes() for suffix in (".bin", ".idx", ".json")}


@pytest.mark.parametrize("hf", [False, True], ids=["byte", "hf"])
def test_one_and_four_workers_write_identical_bytes(tmp_path: Path, tokenizer_file: Path, hf: bool) -> None:
    tokenizer = HFTokenizer(tokenizer_file) if hf else ByteTokenizer()
    inputs, texts = _inputs(tmp_path)
    outputs, stats = {}, {}
    for workers in (1, 4):  # tasks of 200 bytes: JSONL and Parquet are cut into several, spread over workers
        stats[workers] = preprocess(inputs, tmp_path / f"w{workers}", tokenizer=tokenizer, workers=workers,
                                    task_bytes=200)
        outputs[workers] = _files(tmp_path / f"w{workers}")
    assert outputs[1] == outputs[4]
    dataset = IndexedDataset(tmp_path / "w4")
    expected = [tokenizer.document(text) for text in texts if text]
    assert [dataset.get(i).tolist() for i in range(len(dataset))] == expected
    assert (stats[4].documents, stats[4].skipped_empty, stats[4].tokens) == (
        len(expected), texts.count(""), sum(map(len, expected)))
    assert stats[4].input_bytes == sum(path.stat().st_size for path in inputs)
    assert not list(tmp_path.glob("*.partial*"))


def test_parquet_column_read_in_record_batches(tmp_path: Path) -> None:
    texts = [f"row {i} " * (i % 5) for i in range(1000)]  # four of every five non-empty
    parquet = _parquet(tmp_path / "rows.parquet", {"content": texts}, row_group_size=300)
    stats = preprocess([parquet], tmp_path / "p", tokenizer=ByteTokenizer(), json_key="content",
                       task_bytes=1000)
    dataset = IndexedDataset(tmp_path / "p")
    assert len(dataset) == stats.documents == 800 and stats.skipped_empty == 200
    assert bytes(dataset.get(-1).tolist()[:-1]).decode() == texts[-1]


@pytest.mark.parametrize(("columns", "key", "message"), [
    ({"text": ["a"]}, "content", "--text-key ('content'): {path} has no such column (its columns: text)"),
    ({"text": [1, 2]}, "text", "--text-key ('text'): column 'text' of {path} holds int64, not strings"),
    ({"text": ["a", None]}, "text", "--text-key ('text'): {path} row 1 is null, not a string"),
])
def test_a_parquet_column_that_is_not_text_is_refused(tmp_path: Path, columns: dict, key: str,
                                                      message: str) -> None:
    path = _parquet(tmp_path / "t.parquet", columns)
    with pytest.raises(ConfigError) as err:
        preprocess([path], tmp_path / "out", tokenizer=ByteTokenizer(), json_key=key)
    assert str(err.value) == message.format(path=path)
    assert not list(tmp_path.glob("out*"))


def test_an_unreadable_parquet_file_is_refused_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 not really")
    with pytest.raises(ConfigError) as err:
        preprocess([path], tmp_path / "out", tokenizer=ByteTokenizer())
    assert str(err.value).startswith(f"--input ({str(path)!r}) is not a readable Parquet file (")
    assert "\n" not in str(err.value)


def test_a_failed_run_keeps_the_previous_output_and_leaves_no_partial_files(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "abc"}\n')
    preprocess([good], tmp_path / "out", tokenizer=ByteTokenizer())
    before = _files(tmp_path / "out")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "abc"}\n' * 50 + "{oops\n")
    with pytest.raises(ConfigError, match=r"bad.jsonl:51: not a JSON line"):
        preprocess([good, bad], tmp_path / "out", tokenizer=ByteTokenizer(), task_bytes=100)
    assert _files(tmp_path / "out") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "good.jsonl", "out.bin", "out.idx",
                                                          "out.json"]


def test_a_full_disk_is_one_line_and_keeps_the_previous_output(tmp_path: Path, monkeypatch) -> None:
    import errno

    from anneal.data.indexed import IndexedDatasetWriter

    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "abc"}\n')
    preprocess([good], tmp_path / "out", tokenizer=ByteTokenizer())
    before = _files(tmp_path / "out")

    def full(self, tokens) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(IndexedDatasetWriter, "add_document", full)
    with pytest.raises(RunError, match=r"--output-prefix \('.*/out'\): writing failed \(No space left on "
                                       r"device\); nothing was written"):
        preprocess([good], tmp_path / "out", tokenizer=ByteTokenizer())
    assert _files(tmp_path / "out") == before
    assert not list(tmp_path.glob("*.partial*"))


def test_an_output_prefix_under_a_file_is_refused_naming_the_flag(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    (tmp_path / "in.txt").write_text("abc")
    with pytest.raises(ConfigError, match=r"--output-prefix \('.*/file/out'\): cannot create its directory"):
        preprocess([tmp_path / "in.txt"], tmp_path / "file" / "out", tokenizer=ByteTokenizer())


def test_a_jsonl_line_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ConfigError) as err:
        preprocess([path], tmp_path / "out", tokenizer=ByteTokenizer())
    assert str(err.value) == f"{path}:2: not UTF-8 (invalid continuation byte at byte 13)"


class _DiesInAWorker(ByteTokenizer):
    """Unpickled only in a worker process, which it ends at once (as an import error or a kill would)."""

    def __init__(self) -> None:
        self.ballast = "x" * 1_000_000  # a real tokenizer's size: more than a pipe holds

    def __setstate__(self, state: dict) -> None:
        import os

        os._exit(1)


def test_a_worker_that_dies_fails_the_run_without_hanging_or_output(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "abc"}\n' * 100)
    with pytest.raises(RunError) as err:
        preprocess([path], tmp_path / "out", tokenizer=_DiesInAWorker(), workers=2)
    assert str(err.value) == (f"--workers (2): a worker process died while tokenizing {path} from line 1 "
                              "(out of memory?); nothing was written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl"]


def test_the_sidecar_records_nothing_about_the_run(tmp_path: Path) -> None:
    inputs, _ = _inputs(tmp_path)
    preprocess(inputs, tmp_path / "out", tokenizer=ByteTokenizer())
    record = json.loads((tmp_path / "out.json").read_text())
    assert set(record) == {"format", "version", "tokenizer", "documents", "tokens", "inputs", "json_key",
                           "dtype"}


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_redraws_a_terminal_line_at_most_four_times_a_second() -> None:
    stream, clock = _Terminal(), _Clock()
    progress = Progress(stream, 2_000_000, clock=clock)
    for step in range(1, 11):  # 10 updates over 1 s
        clock.now = step / 10
        progress.update(step, 1000 * step, 200_000 * step)
    progress.close()
    lines = stream.getvalue().split("\r")[1:]
    assert len(lines) == 3 and stream.getvalue().endswith("\n")  # at 0.3, 0.6 and 0.9 s
    assert lines[-1].rstrip("\n") == progress_line(9, 9000, 1_800_000, 2_000_000, 0.9) + "\x1b[K"
    assert progress_line(9, 9000, 1_800_000, 2_000_000, 0.9) == (
        "preprocess: 9 documents, 9,000 tokens, 10,000 tokens/s, 1.8 of 2.0 MB read (90%)")


def test_progress_writes_a_line_every_30_s_to_a_log() -> None:
    stream, clock = io.StringIO(), _Clock()
    progress = Progress(stream, 0, clock=clock)
    for second in range(0, 95, 5):
        clock.now = second
        progress.update(second, second, 0)
    progress.close()
    assert stream.getvalue().count("\n") == 3 and "\r" not in stream.getvalue()
