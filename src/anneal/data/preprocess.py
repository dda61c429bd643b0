"""Convert text, JSONL or Parquet files into a Megatron indexed dataset (``<prefix>.bin`` + ``<prefix>.idx``).

A ``.jsonl``/``.json`` file holds one document per line (the string under ``json_key``), a ``.parquet``
file one per row (the string in the column ``json_key``, read a record batch at a time with pyarrow,
imported only for Parquet inputs); any other file is one document. Each document is tokenized and followed
by the tokenizer's end-of-document id (Megatron's ``--append-eod``); empty documents are skipped. The token
dtype is Megatron's: uint16 below 65500 ids. ``<prefix>.json`` records the tokenizer and the counts
(``anneal.data.metadata``), nothing about the run.

The inputs are cut into tasks of about ``task_bytes`` of input. With ``workers > 1`` each task goes to one
of that many spawned processes (JSON lines are parsed there too, the tokenizer is sent once per process)
and the results are written in input order, so the three files are byte-identical for any worker count.
They are written as ``<prefix>.partial.*`` and renamed when complete: a failed run leaves no output that
looks finished, and an older output under the same prefix stays as it was.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, TextIO

import numpy as np

from anneal.data.indexed import IndexedDatasetWriter
from anneal.data.metadata import write_metadata
from anneal.data.tokenizer import Tokenizer
from anneal.errors import ConfigError, RunError

INPUT_FORMATS = ("auto", "text", "jsonl", "parquet")
_JSONL_SUFFIXES = (".jsonl", ".json")
_PARQUET_SUFFIXES = (".parquet", ".pq")
_OUTPUT_SUFFIXES = (".bin", ".idx", ".json")
TASK_BYTES = 1 << 18  # input per task: ~0.1 s of tokenizing, many tasks for the workers to share
_PARQUET_BATCH_ROWS = 256
_IN_FLIGHT_PER_WORKER = 2  # tasks queued ahead per worker: keeps them busy, bounds memory


@dataclass(frozen=True)
class PreprocessStats:
    documents: int
    tokens: int  # end-of-document tokens included
    skipped_empty: int
    input_bytes: int
    seconds: float  # the whole run: reading, worker start-up, tokenizing, writing

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class _Task(NamedTuple):
    """A piece of one input: JSONL lines (bytes) from line ``first``, Parquet texts from row ``first``,
    or no items for a text file (the worker reads it)."""

    format: str
    path: str
    first: int
    items: list
    size: int  # input bytes it stands for (Parquet: the file's size in proportion to its rows)


class _Encoded(NamedTuple):
    tokens: np.ndarray  # int64, the task's documents one after the other, end-of-document ids included
    lengths: list[int]
    skipped_empty: int
    size: int


def preprocess(inputs: Sequence[str | Path], output_prefix: str | Path, *, tokenizer: Tokenizer,
               json_key: str = "text", input_format: str = "auto", workers: int = 1,
               progress: TextIO | None = None, task_bytes: int = TASK_BYTES) -> PreprocessStats:
    """Tokenize every document of ``inputs`` (in order) into ``output_prefix``.bin/.idx/.json.

    ``progress``: a stream (stderr) for a progress line, see ``Progress``; None for none."""
    if input_format not in INPUT_FORMATS:
        raise ConfigError(f"--format ({input_format!r}) must be one of {', '.join(INPUT_FORMATS)}")
    if workers < 1:
        raise ConfigError(f"--workers ({workers}) must be >= 1")
    sources = [(path, _format(path, input_format)) for path in map(Path, inputs)]
    input_bytes = sum(_check_input(path, fmt, json_key) for path, fmt in sources)
    partial = f"{output_prefix}.partial"
    try:
        Path(partial).parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"--output-prefix ({str(output_prefix)!r}): cannot create its directory "
                          f"({error.strerror})") from None
    meter = Progress(progress, input_bytes) if progress is not None else None
    start = time.perf_counter()
    try:
        stats = _write(_tasks(sources, json_key, task_bytes), _Encoder(tokenizer, json_key), workers,
                       partial, tokenizer.vocab_size, meter)
        write_metadata(partial, tokenizer=tokenizer.describe(),
                       stats={"documents": stats.documents, "tokens": stats.tokens,
                              "inputs": [str(path.resolve()) for path, _ in sources], "json_key": json_key,
                              "dtype": stats.dtype})
        for suffix in _OUTPUT_SUFFIXES:  # .json last: it says the tokens are complete
            os.replace(partial + suffix, f"{output_prefix}{suffix}")
    except BaseException as error:
        for suffix in _OUTPUT_SUFFIXES:
            Path(partial + suffix).unlink(missing_ok=True)
        if isinstance(error, OSError):  # a full disk, a directory gone: one line, nothing left half-written
            why = error.strerror or error
            raise RunError(f"--output-prefix ({str(output_prefix)!r}): writing failed ({why}); nothing was "
                           "written") from error
        raise
    finally:
        if meter is not None:
            meter.close()
    return PreprocessStats(documents=stats.documents, tokens=stats.tokens, skipped_empty=stats.skipped,
                           input_bytes=input_bytes, seconds=time.perf_counter() - start)


class _Written(NamedTuple):
    documents: int
    tokens: int
    skipped: int
    dtype: str


def _write(tasks: Iterable[_Task], encoder: _Encoder, workers: int, prefix: str, vocab_size: int,
           meter: Progress | None) -> _Written:
    """Encode ``tasks`` and append their documents, in order, to ``prefix``.bin/.idx."""
    documents = tokens = skipped = done_bytes = 0
    with IndexedDatasetWriter(prefix, vocab_size=vocab_size) as writer, \
            closing(_encoded(tasks, encoder, workers)) as results:
        for result in results:
            offset = 0
            for length in result.lengths:
                writer.add_document(result.tokens[offset:offset + length])
                offset += length
            documents, tokens = documents + len(result.lengths), tokens + len(result.tokens)
            skipped, done_bytes = skipped + result.skipped_empty, done_bytes + result.size
            if meter is not None:
                meter.update(documents, tokens, done_bytes)
    return _Written(documents, tokens, skipped, str(writer.dtype))


def _encoded(tasks: Iterable[_Task], encoder: _Encoder, workers: int) -> Iterator[_Encoded]:
    """Each task's tokens, in the tasks' order: here, or from ``workers`` spawned processes."""
    if workers == 1:
        yield from map(encoder, tasks)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    pending: deque = deque()  # (task, future), oldest first
    # The encoder (and its tokenizer, megabytes) reaches the workers through a file, not the spawn arguments:
    # CPython writes those to a child while holding the pipe's read end, so a child that dies before reading
    # them all (an import error, a kill) would hang this process.
    encoder_file = tempfile.NamedTemporaryFile(prefix="anneal-preprocess-", suffix=".pickle")  # noqa: SIM115
    encoder_file.write(pickle.dumps(encoder))
    encoder_file.flush()
    executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_start_worker, initargs=(encoder_file.name,))
    try:
        for task in tasks:
            pending.append((task, executor.submit(_encode_in_worker, task)))
            if len(pending) > _IN_FLIGHT_PER_WORKER * workers:
                yield pending[0][1].result()
                pending.popleft()
        while pending:
            yield pending[0][1].result()
            pending.popleft()
    except BrokenProcessPool:
        task = pending[0][0]
        raise RunError(f"--workers ({workers}): a worker process died while tokenizing {task.path} from "
                       f"{'row' if task.format == 'parquet' else 'line'} {task.first} (out of memory?); "
                       "nothing was written") from None
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
        encoder_file.close()  # and deleted


@dataclass(frozen=True)
class _Encoder:
    """Turns a task into tokens; pickled once into each worker process (with its tokenizer)."""

    tokenizer: Tokenizer
    json_key: str

    def __call__(self, task: _Task) -> _Encoded:
        ids: list[int] = []
        lengths: list[int] = []
        skipped = 0
        for text in _texts(task, self.json_key):
            if not text:
                skipped += 1
                continue
            document = self.tokenizer.document(text)
            ids.extend(document)
            lengths.append(len(document))
        return _Encoded(np.array(ids, dtype=np.int64), lengths, skipped, task.size)


_worker_encoder: _Encoder | None = None  # in a worker process: the encoder its initializer received


def _start_worker(encoder_file: str) -> None:
    global _worker_encoder
    with open(encoder_file, "rb") as stream:
        _worker_encoder = pickle.load(stream)  # written by _encoded in the parent, moments ago


def _encode_in_worker(task: _Task) -> _Encoded:
    return _worker_encoder(task)


def _texts(task: _Task, json_key: str) -> Iterator[str]:
    """The documents of one task (blank JSONL lines are none; empty strings are, and are skipped)."""
    if task.format == "text":
        yield _read_text(Path(task.path))
        return
    for number, item in enumerate(task.items, start=task.first):
        if task.format == "jsonl":
            if item.strip():
                yield _json_text(item, json_key, f"{task.path}:{number}")
        elif item is None:
            raise ConfigError(f"--text-key ({json_key!r}): {task.path} row {number} is null, not a string")
        else:
            yield item


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"--input ({str(path)!r}) is not UTF-8 text ({err.reason} at byte {err.start})") \
            from None


def _json_text(line: bytes, json_key: str, where: str) -> str:
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{where}: not UTF-8 ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{where}: not a JSON line ({err.msg})") from None
    text = record.get(json_key) if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise ConfigError(f"--json-key ({json_key!r}): {where} has no string under that key")
    return text


# --- reading the inputs (in the main process) ---

def _format(path: Path, input_format: str) -> str:
    if input_format != "auto":
        return input_format
    suffix = path.suffix.lower()
    return "jsonl" if suffix in _JSONL_SUFFIXES else "parquet" if suffix in _PARQUET_SUFFIXES else "text"


def _check_input(path: Path, fmt: str, json_key: str) -> int:
    """Refuse a missing file or a Parquet file without a string column ``json_key``; its size in bytes."""
    if not path.is_file():
        raise ConfigError(f"--input ({str(path)!r}) is not a file")
    if fmt == "parquet":
        _open_parquet(path, json_key)
    return path.stat().st_size


def _tasks(sources: Sequence[tuple[Path, str]], json_key: str, task_bytes: int) -> Iterator[_Task]:
    for path, fmt in sources:
        if fmt == "text":
            yield _Task("text", str(path), 1, [], path.stat().st_size)
        elif fmt == "jsonl":
            yield from _jsonl_tasks(path, task_bytes)
        else:
            yield from _parquet_tasks(path, json_key, task_bytes)


def _jsonl_tasks(path: Path, task_bytes: int) -> Iterator[_Task]:
    lines: list[bytes] = []
    first = size = 0
    with path.open("rb") as stream:
        for number, line in enumerate(stream, start=1):
            first = first or number
            lines.append(line)
            size += len(line)
            if size >= task_bytes:
                yield _Task("jsonl", str(path), first, lines, size)
                lines, first, size = [], 0, 0
    if lines:
        yield _Task("jsonl", str(path), first, lines, size)


def _parquet_tasks(path: Path, column: str, task_bytes: int) -> Iterator[_Task]:
    """The column's texts a record batch at a time, gathered into tasks of about ``task_bytes``."""
    import pyarrow as pa

    parquet = _open_parquet(path, column)
    rows, file_bytes = parquet.metadata.num_rows, path.stat().st_size
    texts: list[str | None] = []
    first = chars = 0
    try:
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[column]):
            batch_texts = batch.column(0).to_pylist()
            texts.extend(batch_texts)
            chars += sum(len(text) for text in batch_texts if text)
            if chars >= task_bytes:
                yield _Task("parquet", str(path), first, texts, _share(file_bytes, rows, first, len(texts)))
                first, texts, chars = first + len(texts), [], 0
    except (pa.ArrowException, OSError) as err:
        raise _unreadable(path, err) from None
    if texts:
        yield _Task("parquet", str(path), first, texts, _share(file_bytes, rows, first, len(texts)))


def _share(total: int, rows: int, first: int, count: int) -> int:
    """The part of ``total`` bytes that rows ``first .. first + count`` stand for (they add up to it)."""
    return (total * (first + count)) // rows - (total * first) // rows


def _open_parquet(path: Path, column: str):
    """A ``pyarrow.parquet.ParquetFile`` whose schema has a string column ``column``."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"--input ({str(path)!r}): reading Parquet needs pyarrow "
                          "(pip install 'anneal[data]')") from None
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise _unreadable(path, err) from None
    schema = parquet.schema_arrow
    if column not in schema.names:
        raise ConfigError(f"--text-key ({column!r}): {path} has no such column (its columns: "
                          f"{', '.join(schema.names)})")
    kind = schema.field(column).type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or getattr(pa.types, "is_string_view", lambda _: False)(kind)):
        raise ConfigError(f"--text-key ({column!r}): column {column!r} of {path} holds {kind}, not strings")
    return parquet


def _unreadable(path: Path, err: Exception) -> ConfigError:
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return ConfigError(f"--input ({str(path)!r}) is not a readable Parquet file ({reason})")


# --- progress ---

class Progress:
    """Documents, tokens, tokens/s and input read, on one line of ``stream``.

    On a terminal the line is redrawn in place at most 4 times a second; on a pipe or a file (a job's
    log) a new line is written every 30 s, so a short run writes none."""

    def __init__(self, stream: TextIO, total_bytes: int, *, clock=time.perf_counter,
                 interval_s: float | None = None) -> None:
        self.stream, self.total_bytes, self.clock = stream, total_bytes, clock
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.interval_s = interval_s if interval_s is not None else 0.25 if self.tty else 30.0
        self.start = self._last = clock()
        self._drawn = False

    def update(self, documents: int, tokens: int, done_bytes: int) -> None:
        now = self.clock()
        if now - self._last < self.interval_s:
            return
        self._last = now
        line = progress_line(documents, tokens, done_bytes, self.total_bytes, now - self.start)
        self.stream.write(f"\r{line}\x1b[K" if self.tty else line + "\n")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        """End a redrawn line, so what follows (the summary, an error) starts on its own."""
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()


def progress_line(documents: int, tokens: int, done_bytes: int, total_bytes: int, seconds: float) -> str:
    rate = tokens / seconds if seconds > 0 else 0.0
    share = f" ({100 * done_bytes / total_bytes:.0f}%)" if total_bytes else ""
    return (f"preprocess: {documents:,} documents, {tokens:,} tokens, {rate:,.0f} tokens/s, "
            f"{done_bytes / 1e6:,.1f} of {total_bytes / 1e6:,.1f} MB read{share}")

