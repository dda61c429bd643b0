"""Indexed data: the path fields of ``dataset.`` opened, split, blended and switched at the anneal.

Each blend entry is a *source*: one prefix of a weighted blend, or all prefixes of an unweighted list read
as one stream. With ``dataset.data_path`` every source is cut into train/valid/test by ``dataset.split``
(token ranges, as for the other kinds); with per-split paths each source is read whole by its split. The
anneal blend is cut like ``data_path`` (so it never reads another split's tokens) and read from the
WSD anneal's first sample on. Which source a sample reads is ``anneal.data.blend.BlendIndex``'s: a pure
function of ``dataset.seed``, the split, the phase and the sample index.
"""

from __future__ import annotations

from dataclasses import dataclass

from anneal.config.dataset import Blend, DatasetConfig, split_weights
from anneal.data.blend import Blended, BlendIndex, Phased
from anneal.data.datasets import (SPLIT_NAMES, TokenStream, TokenWindows, open_prefix, prefix_header, split_bounds,
                                  windows_in)
from anneal.data.metadata import check_tokenizers
from anneal.errors import ConfigError

MAIN, ANNEAL = 0, 1  # blend phases: the run's data, then the anneal's


@dataclass(frozen=True)
class Source:
    label: str  # what errors and the dry run call it: "dataset.data_path[1] ('/data/web')"
    stream: TokenStream


def anneal_start_sample(schedule) -> int | None:
    """The first sample of the WSD anneal of Megatron's ``Schedule``; None for any other schedule."""
    if getattr(schedule, "lr_decay_style", None) != "WSD":
        return None
    return int(schedule.lr_decay_steps - schedule.wsd_decay_steps)


def blend_index(cfg: DatasetConfig, blend: Blend, *, split: int, phase: int) -> BlendIndex:
    """The sample-to-source map of ``blend`` (a single source for an unweighted list)."""
    return BlendIndex(blend.weights or (1.0,), seed=(cfg.seed, split, phase))


def build_indexed(cfg: DatasetConfig, *, seq_length: int, vocab_size: int, anneal_start: int | None):
    """The (train, valid) datasets of an indexed ``cfg``; ConfigError naming the field of any bad prefix."""
    check_indexed(cfg, seq_length=seq_length, vocab_size=vocab_size)  # what the dry run checks, first
    opened: dict[str, TokenStream] = {}

    def build(name: str, split: int, phase: int = MAIN):
        blend = cfg.blend(name)
        sources = _open_sources(blend, vocab_size, opened)
        windows = [_windows(cfg, source, split=split, salt=_salt(blend, phase, k), seq_length=seq_length,
                            vocab_size=vocab_size) for k, source in enumerate(sources)]
        if len(windows) == 1 and phase == MAIN:
            return windows[0]
        return Blended(windows, blend_index(cfg, blend, split=split, phase=phase))

    if cfg.uses_split:
        train, valid = build("data_path", 0), build("data_path", 1)
    else:
        train = build("train_data_path", 0)
        valid = build("valid_data_path", 1) if cfg.valid_data_path else _empty(cfg, seq_length, vocab_size)
    if cfg.anneal_data_path:
        if anneal_start is None:
            raise ConfigError(f"dataset.anneal_data_path ({list(cfg.anneal_data_path)!r}) needs a WSD "
                              "schedule: the anneal blend starts where the WSD anneal does")
        train = Phased(train, build("anneal_data_path", 0, ANNEAL), anneal_start)
    return train, valid


def check_indexed(cfg: DatasetConfig, *, seq_length: int, vocab_size: int) -> None:
    """What a run checks before it builds indexed data, from the files' headers alone (no token read), so the
    dry run (which calls it too) refuses what the run would: every prefix's ``.idx`` and ``.bin``, the
    recorded tokenizers against ``model.vocab_size`` and each other, and a window for each source and split.
    Token ids above the vocabulary are found only by reading the tokens, when the run builds."""
    if cfg.kind != "indexed":
        return
    check_tokenizers(cfg.prefixes(), vocab_size)
    tokens: dict[str, int] = {}
    for field, prefix in cfg.prefixes():
        tokens.setdefault(prefix, prefix_header(field, prefix).num_tokens)
    for name, split in _built(cfg):
        blend = cfg.blend(name)
        for label, prefixes in _source_prefixes(blend):
            _check_windows(cfg, label, sum(tokens[p] for p in prefixes), split=split, seq_length=seq_length)


def _built(cfg: DatasetConfig) -> list[tuple[str, int]]:
    """``(path field, split)`` of each blend the run builds."""
    if cfg.uses_split:
        built = [("data_path", 0), ("data_path", 1)]
    else:
        built = [("train_data_path", 0)] + ([("valid_data_path", 1)] if cfg.valid_data_path else [])
    return built + ([("anneal_data_path", 0)] if cfg.anneal_data_path else [])


def _source_prefixes(blend: Blend) -> list[tuple[str, tuple[str, ...]]]:
    """``(label, prefixes)`` of each source: each prefix of a weighted blend, all of an unweighted list."""
    if blend.weights is None:
        return [(f"{blend.field} ({list(blend.prefixes)!r})", blend.prefixes)]
    return [(f"{blend.prefix_field(i)} ({prefix!r})", (prefix,)) for i, prefix in enumerate(blend.prefixes)]


def _open_sources(blend: Blend, vocab_size: int, opened: dict[str, TokenStream]) -> list[Source]:
    """One source per prefix of a weighted blend; one concatenated source for an unweighted list."""
    for i, prefix in enumerate(blend.prefixes):
        if prefix not in opened:
            opened[prefix] = TokenStream([open_prefix(blend.prefix_field(i), prefix, vocab_size).tokens])
    return [Source(label, TokenStream([part for p in prefixes for part in opened[p].parts]))
            for label, prefixes in _source_prefixes(blend)]


def _salt(blend: Blend, phase: int, k: int) -> tuple[int, ...]:
    """Unweighted run data keeps the seeds it had before blends existed; blend sources differ by index."""
    return () if blend.weights is None and phase == MAIN else (phase, k)


def _windows(cfg: DatasetConfig, source: Source, *, split: int, salt: tuple[int, ...], seq_length: int,
             vocab_size: int) -> TokenWindows:
    """``source``'s windows in ``split``: its ``dataset.split`` share, or all of it with per-split paths."""
    bounds = _check_windows(cfg, source.label, len(source.stream), split=split, seq_length=seq_length)
    return TokenWindows(source.stream, start=bounds[split], stop=bounds[split + 1], seq_length=seq_length,
                        seed=cfg.seed, split=split, vocab_size=vocab_size, eod=None, salt=salt)


def _check_windows(cfg: DatasetConfig, label: str, num_tokens: int, *, split: int, seq_length: int) -> list[int]:
    """The token bounds of a source of ``num_tokens`` cut for ``split``: its ``dataset.split`` share, or all of
    it with per-split paths; ConfigError if a split with weight gets less than one window."""
    weights = split_weights(cfg.split) if cfg.uses_split else _whole(split)
    bounds = split_bounds(num_tokens, weights)
    share = bounds[split + 1] - bounds[split]
    if windows_in(share, seq_length) == 0 and weights[split] > 0:
        how = f" (dataset.split {cfg.split!r})" if cfg.uses_split else ""
        fix = "; raise its dataset.split weight or set it to 0" if cfg.uses_split and split else ""
        raise ConfigError(f"{label} gives the {SPLIT_NAMES[split]} split {share} tokens"
                          f"{how}, fewer than one window of seq_length + 1 = {seq_length + 1}{fix}")
    return bounds


def _whole(split: int) -> tuple[float, float, float]:
    return tuple(1.0 if i == split else 0.0 for i in range(3))  # type: ignore[return-value]


def _empty(cfg: DatasetConfig, seq_length: int, vocab_size: int) -> TokenWindows:
    """No validation data (per-split paths without ``dataset.valid_data_path``)."""
    return TokenWindows(TokenStream([]), start=0, stop=0, seq_length=seq_length, seed=cfg.seed, split=1,
                        vocab_size=vocab_size, eod=None)
