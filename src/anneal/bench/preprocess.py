"""Preprocessing throughput: ``anneal.data.preprocess`` on 1 and 2 workers beside plain ``tokenizers`` loops.

The corpus is the Python standard library's ``.py`` sources as JSONL (one file a document, sorted by path, up
to ``corpus_mb``). The preprocessor's figure is what ``scripts/preprocess_data.py`` prints: tokens written
over the whole run (reading and parsing JSON, starting the workers, tokenizing, writing ``.bin``/``.idx``).
The plain loops only tokenize: ``Tokenizer.encode_batch`` over the same texts in batches, once with the
library's own thread pool (``TOKENIZERS_PARALLELISM`` on, every core) and once on one thread. The cases run
round-robin (``anneal.bench.stats.interleaved``) and each figure is a median.

Without a tokenizer given, a byte-level BPE (Qwen2's pre-tokenizer split, 32,000 ids) is trained on the
corpus first, so the run needs no network.
"""

from __future__ import annotations

import json
import os
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from anneal.bench.stats import Stat, interleaved
from anneal.data.preprocess import preprocess
from anneal.data.tokenizer import HFTokenizer, load_tokenizer

# Qwen2/Qwen3's pre-tokenizer split (their tokenizer.json), for the BPE trained here
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
ENCODE_BATCH_DOCUMENTS = 256


def stdlib_texts(corpus_mb: float) -> list[str]:
    """The standard library's ``.py`` files (sorted by path) until ``corpus_mb`` of UTF-8 is gathered."""
    texts, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if size >= corpus_mb * 1e6:
            break
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if not text.strip():  # empty __init__.py files: documents the preprocessor skips
            continue
        texts.append(text)
        size += len(text.encode("utf-8"))
    return texts


def train_bpe(texts: list[str], directory: Path, vocab_size: int = 32_000) -> Path:
    """A byte-level BPE with an ``<|endoftext|>`` token, trained on ``texts``; its directory."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory


def _plain_loop(tokenizer_file: Path, texts: list[str], *, threads: bool) -> Callable[[], float]:
    """``encode_batch`` over ``texts`` with a plain ``tokenizers.Tokenizer``, nothing kept; seconds."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))

    def run() -> float:
        previous = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads else "false"  # read at each call
        try:
            start = time.perf_counter()
            for i in range(0, len(texts), ENCODE_BATCH_DOCUMENTS):
                tokenizer.encode_batch(texts[i:i + ENCODE_BATCH_DOCUMENTS])
            return time.perf_counter() - start
        finally:
            if previous is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = previous

    return run


def _preprocessor(tokenizer: HFTokenizer, corpus: Path, output: Path, workers: int) -> Callable[[], float]:
    """The run's seconds as the script reports them (from reading the first line to renaming the files)."""
    return lambda: preprocess([corpus], output / f"w{workers}", tokenizer=tokenizer, workers=workers).seconds


def run(*, tokenizer_path: str | None = None, corpus_mb: float = 4.0, repeats: int = 3) -> dict:
    """Tokens/s (median, min, max) of each case, and what they ran on."""
    load_before = os.getloadavg()[0]  # another busy process on the machine shows here
    texts = stdlib_texts(corpus_mb)
    with tempfile.TemporaryDirectory(prefix="anneal-bench-preprocess-") as tmp:
        work = Path(tmp)
        corpus = work / "stdlib.jsonl"
        corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts), encoding="utf-8")
        tokenizer = load_tokenizer(tokenizer_path or train_bpe(texts, work / "bpe"))
        counted = preprocess([corpus], work / "count", tokenizer=tokenizer)  # the tokens every case makes
        cases = {"preprocess --workers 1": _preprocessor(tokenizer, corpus, work, 1),
                 "preprocess --workers 2": _preprocessor(tokenizer, corpus, work, 2),
                 "tokenizers encode_batch, its threads": _plain_loop(tokenizer.file, texts, threads=True),
                 "tokenizers encode_batch, 1 thread": _plain_loop(tokenizer.file, texts, threads=False)}
        seconds = interleaved(cases, repeats=repeats, warmup=1)
        one_line = work / "one.jsonl"
        one_line.write_text(json.dumps({"text": texts[0]}) + "\n", encoding="utf-8")
        startup = [_preprocessor(tokenizer, one_line, work, 2)() for _ in range(repeats)]
    described = "byte-level BPE trained here on the corpus" if tokenizer_path is None else str(tokenizer.file)
    return {"corpus": f"Python {sysconfig.get_python_version()} stdlib .py files as JSONL: {len(texts):,} "
                      f"documents, {counted.input_bytes / 1e6:.1f} MB, {counted.tokens:,} tokens",
            "tokenizer": f"{described} ({tokenizer.vocab_size:,} ids)", "cpus": os.cpu_count(),
            "load_average": [load_before, os.getloadavg()[0]],
            "repeats": repeats, "two_workers_startup_s": Stat.of(startup, "s").as_dict(),
            "tokens_per_s": {name: Stat.of([counted.tokens / s for s in runs], "tokens/s").as_dict()
                             for name, runs in seconds.items()}}


def format_table(result: dict) -> str:
    lines = [f"corpus: {result['corpus']}", f"tokenizer: {result['tokenizer']}",
             f"{result['cpus']} CPUs, median of {result['repeats']} round-robin runs (min-max)", ""]
    width = max(map(len, result["tokens_per_s"]))
    for name, stat in result["tokens_per_s"].items():
        lines.append(f"{name:<{width}}  {stat['median']:>12,.0f} tokens/s  "
                     f"({stat['min']:,.0f}-{stat['max']:,.0f})")
    startup = result["two_workers_startup_s"]
    lines.append(f"--workers 2 includes starting them: {startup['median']:.2f} s ({startup['min']:.2f}-"
                 f"{startup['max']:.2f}), timed on a one-document input")
    lines.append(f"load average (1 min) before and after: {result['load_average'][0]:.1f}, "
                 f"{result['load_average'][1]:.1f}")
    return "\n".join(lines)
