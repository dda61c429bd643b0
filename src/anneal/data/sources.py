"""Indexed data: the path fields of ``dataset.`` opened, split, blended and switched at the anneal.

Each blend entry is a *source*: one prefix of a weighted blend, or all prefixes of an unweighted list read
as one stream. With ``dataset.data_path`` every source is cut into train/valid/test by ``dataset.split``
(token ranges, as for the other kinds); with per-split paths each source is read whole by its split. The
anneal blend is cut like ``data_path`` (so it never reads another split's tokens) and read from the
WSD anneal's first sample on. The held-out sets of ``dataset.extra_valid_data_path`` are read whole. Which
source a sample reads is ``anneal.data.blend.BlendIndex``'s: a pure function of ``dataset.seed``, the
split, the part (run, anneal, held-out set) and the sample index.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from anneal.data import spec
from anneal.data.blend import Blended, BlendIndex, Phased
from anneal.data.metadata import Recorded, check_tokenizers
from anneal.data.spec import Blend
from anneal.data.windows import (SPLIT_NAMES, TokenStream, TokenWindows, open_prefix, prefix_header,
                                 split_bounds, windows_in)
from anneal.errors import ConfigError

MAIN, ANNEAL, HELD_OUT = 0, 1, 2  # blend phases: the run's data, the anneal's, a held-out set's


@dataclass(frozen=True)
class Part:
    """One blend the run builds: its parsed path field, the split it reads and how its sources are cut."""

    blend: Blend
    split: int  # 0 train, 1 valid
    phase: int  # MAIN, ANNEAL or HELD_OUT
    whole: bool  # each source read whole (per-split paths, held-out sets), else cut by dataset.split
    name: str = ""  # a held-out set's name

    @property
    def tag(self) -> tuple[int, ...]:
        """What tells this part's seeds apart from the others' (a held-out set's: a hash of its name)."""
        return (self.phase, zlib.crc32(self.name.encode())) if self.phase == HELD_OUT else (self.phase,)

    @property
    def what(self) -> str:
        if self.phase == HELD_OUT:
            return f"the held-out set {self.name!r}"
        return f"the {SPLIT_NAMES[self.split]} split"


@dataclass(frozen=True)
class Source:
    label: str  # what errors and the dry run call it: "dataset.data_path[1] ('/data/web')"
    stream: TokenStream


@dataclass(frozen=True)
class IndexedData:
    """What ``build_indexed`` returns: the training samples, the main validation split (None without one)
    and the held-out sets by name."""

    train: object
    valid: object | None
    held_out: dict[str, object]


def parts(cfg) -> dict[str, Part]:
    """The blends an indexed ``cfg`` builds: ``train``, ``valid`` (when it has data), ``anneal`` (with an
    anneal blend), and each held-out set under ``held_out:<name>``."""
    whole = not spec.uses_split(cfg)
    main = "train_data_path" if whole else "data_path"
    built = {"train": Part(spec.blend_of(cfg, main), 0, MAIN, whole)}
    if (valid := spec.main_valid_blend(cfg)) is not None:
        built["valid"] = Part(valid, 1, MAIN, whole)
    if cfg.anneal_data_path:
        built["anneal"] = Part(spec.blend_of(cfg, "anneal_data_path"), 0, ANNEAL, whole)
    for name, blend in spec.extra_blends(cfg).items():
        built[f"held_out:{name}"] = Part(blend, 1, HELD_OUT, True, name)
    return built


def blend_index(seed: int, part: Part) -> BlendIndex:
    """The sample-to-source map of ``part`` (a single source for an unweighted list)."""
    return BlendIndex(part.blend.weights or (1.0,), seed=(seed, part.split, *part.tag))


def build_indexed(cfg, *, seq_length: int, vocab_size: int, anneal_start: int | None) -> IndexedData:
    """The datasets of an indexed ``cfg`` that ``check_indexed`` passed; ConfigError naming the field of a
    prefix whose tokens do not fit the vocabulary."""
    opened: dict[str, TokenStream] = {}

    def build(part: Part):
        sources = _open_sources(part.blend, vocab_size, opened)
        windows = [_windows(cfg, source, part, k, seq_length=seq_length, vocab_size=vocab_size)
                   for k, source in enumerate(sources)]
        if len(windows) == 1 and part.phase != ANNEAL:
            return windows[0]
        return Blended(windows, blend_index(cfg.seed, part))

    built = parts(cfg)
    train = build(built["train"])
    if "anneal" in built:
        if anneal_start is None:
            raise ConfigError(f"dataset.anneal_data_path ({list(cfg.anneal_data_path)!r}) needs a WSD "
                              "schedule: the anneal blend starts where the WSD anneal does")
        train = Phased(train, build(built["anneal"]), anneal_start)
    valid = build(built["valid"]) if "valid" in built else None
    held_out = {part.name: build(part) for part in built.values() if part.phase == HELD_OUT}
    return IndexedData(train, valid, held_out)


def check_indexed(cfg, *, seq_length: int, vocab_size: int) -> Recorded | None:
    """What a run checks before it builds indexed data, from the files' headers alone (no token read), so the
    dry run (which calls it too) refuses what the run would: every prefix's ``.idx`` and ``.bin``, the
    recorded tokenizers against ``model.vocab_size`` and each other, and a window for each source and split.
    Token ids above the vocabulary are found only by reading the tokens, when the run builds. Returns what
    the sidecars record in common (``check_tokenizers``); None for the other kinds."""
    if cfg.kind != "indexed":
        return None
    recorded = check_tokenizers(spec.prefixes(cfg), vocab_size)
    tokens: dict[str, int] = {}
    for field, prefix in spec.prefixes(cfg):
        if prefix not in tokens:  # a prefix may be in several blends: its header is read once
            tokens[prefix] = prefix_header(field, prefix).num_tokens
    built = parts(cfg)
    for part in built.values():  # train, valid, anneal, then the held-out sets: the order the build checks
        for label, prefixes in _source_prefixes(part.blend):
            _check_windows(cfg, label, sum(tokens[p] for p in prefixes), part, seq_length=seq_length)
    return recorded


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


def _salt(part: Part, k: int) -> tuple[int, ...]:
    """Unweighted run data keeps the seeds it had before blends existed; blend sources differ by index."""
    return () if part.blend.weights is None and part.phase == MAIN else (*part.tag, k)


def _windows(cfg, source: Source, part: Part, k: int, *, seq_length: int, vocab_size: int) -> TokenWindows:
    """``source``'s windows in ``part``'s split: its ``dataset.split`` share, or all of it."""
    bounds = _check_windows(cfg, source.label, len(source.stream), part, seq_length=seq_length)
    return TokenWindows(source.stream, start=bounds[part.split], stop=bounds[part.split + 1],
                        seq_length=seq_length, seed=cfg.seed, split=part.split, vocab_size=vocab_size,
                        eod=None, salt=_salt(part, k))


def _check_windows(cfg, label: str, num_tokens: int, part: Part, *, seq_length: int) -> list[int]:
    """The token bounds of a source of ``num_tokens`` cut for ``part``: its ``dataset.split`` share, or all of
    it; ConfigError if a split with weight (or a held-out set) gets less than one window."""
    weights = _whole(part.split) if part.whole else spec.split_weights(cfg.split)
    bounds = split_bounds(num_tokens, weights)
    share = bounds[part.split + 1] - bounds[part.split]
    if windows_in(share, seq_length) == 0 and weights[part.split] > 0:
        how = "" if part.whole else f" (dataset.split {cfg.split!r})"
        fix = "; raise its dataset.split weight or set it to 0" if not part.whole and part.split else ""
        raise ConfigError(f"{label} gives {part.what} {share} tokens"
                          f"{how}, fewer than one window of seq_length + 1 = {seq_length + 1}{fix}")
    return bounds


def _whole(split: int) -> tuple[float, float, float]:
    return tuple(1.0 if i == split else 0.0 for i in range(3))  # type: ignore[return-value]
