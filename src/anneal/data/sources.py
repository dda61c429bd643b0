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
from anneal.data.datasets import SPLIT_NAMES, TokenStream, TokenWindows, open_prefix, split_bounds
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
    check_tokenizers(cfg.prefixes(), vocab_size)
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


def _open_sources(blend: Blend, vocab_size: int, opened: dict[str, TokenStream]) -> list[Source]:
    """One source per prefix of a weighted blend; one concatenated source for an unweighted list."""
    streams = []
    for i, prefix in enumerate(blend.prefixes):
        if prefix not in opened:
            opened[prefix] = TokenStream([open_prefix(blend.prefix_field(i), prefix, vocab_size).tokens])
        streams.append(opened[prefix])
    if blend.weights is None:
        label = f"{blend.field} ({list(blend.prefixes)!r})"
        return [Source(label, TokenStream([part for stream in streams for part in stream.parts]))]
    pairs = zip(blend.prefixes, streams, strict=True)
    return [Source(f"{blend.prefix_field(i)} ({prefix!r})", stream)
            for i, (prefix, stream) in enumerate(pairs)]


def _salt(blend: Blend, phase: int, k: int) -> tuple[int, ...]:
    """Unweighted run data keeps the seeds it had before blends existed; blend sources differ by index."""
    return () if blend.weights is None and phase == MAIN else (phase, k)


def _windows(cfg: DatasetConfig, source: Source, *, split: int, salt: tuple[int, ...], seq_length: int,
             vocab_size: int) -> TokenWindows:
    """``source``'s windows in ``split``: its ``dataset.split`` share, or all of it with per-split paths."""
    weights = split_weights(cfg.split) if cfg.uses_split else _whole(split)
    bounds = split_bounds(len(source.stream), weights)
    windows = TokenWindows(source.stream, start=bounds[split], stop=bounds[split + 1], seq_length=seq_length,
                           seed=cfg.seed, split=split, vocab_size=vocab_size, eod=None, salt=salt)
    if len(windows) == 0 and weights[split] > 0:
        how = f" (dataset.split {cfg.split!r})" if cfg.uses_split else ""
        fix = "; raise its dataset.split weight or set it to 0" if cfg.uses_split and split else ""
        raise ConfigError(f"{source.label} gives the {SPLIT_NAMES[split]} split {windows.num_tokens} tokens"
                          f"{how}, fewer than one window of seq_length + 1 = {seq_length + 1}{fix}")
    return windows


def _whole(split: int) -> tuple[float, float, float]:
    return tuple(1.0 if i == split else 0.0 for i in range(3))  # type: ignore[return-value]


def _empty(cfg: DatasetConfig, seq_length: int, vocab_size: int) -> TokenWindows:
    """No validation data (per-split paths without ``dataset.valid_data_path``)."""
    return TokenWindows(TokenStream([]), start=0, stop=0, seq_length=seq_length, seed=cfg.seed, split=1,
                        vocab_size=vocab_size, eod=None)
