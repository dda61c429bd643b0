"""The dry run's data table: the tokens each source contributes in each phase of the schedule.

Computed from the weights and the seed alone (``BlendIndex.counts_before``), so it reads no data and
is exact: these are the samples the run will read, source by source.
"""

from __future__ import annotations

import math

from anneal.data.blend import anneal_start_sample
from anneal.data.sources import Part, blend_index, parts


def phase_spans(derived) -> list[tuple[str, int, int]]:
    """``(phase, first sample, end sample)`` of the run's training samples, empty phases left out."""
    end = derived.train_samples
    s = derived.schedule
    if hasattr(s, "lr_decay_style"):  # Megatron's schedule
        from anneal.scheduler.schedule import phases

        p = phases(s)
        cuts = [("warmup", p.warmup_end), ("stable", p.anneal_start),
                ("anneal" if s.lr_decay_style == "WSD" else "decay", p.decay_end), ("after decay", end)]
    else:  # a torch schedule: only its warmup is a phase
        cuts = [("warmup", derived.ramp.samples_after(s.warmup_iters)), ("after warmup", end)]
    spans, start = [], 0
    for name, stop in cuts:
        stop = min(end, math.ceil(stop))
        if stop > start:
            spans.append((name, start, stop))
            start = stop
    return spans


def source_rows(cfg, spans: list[tuple[str, int, int]],
                anneal_start: int | None) -> list[tuple[str, list[int]]]:
    """``(source, samples per span)`` for the training split."""
    if cfg.kind != "indexed":
        return [(f"dataset.kind {cfg.kind!r}", [stop - start for _, start, stop in spans])]
    built = parts(cfg)
    switch = anneal_start if "anneal" in built and anneal_start is not None else None
    rows = _rows(cfg.seed, built["train"], spans, lambda n: n if switch is None else min(n, switch))
    if switch is not None:
        rows += _rows(cfg.seed, built["anneal"], spans, lambda n: max(n, switch) - switch)
    return rows


def _rows(seed: int, part: Part, spans, local) -> list[tuple[str, list[int]]]:
    """Samples of each source of ``part`` per span; ``local`` maps a run sample to the blend's index."""
    blend, index = part.blend, blend_index(seed, part)
    counts = [index.counts_before(local(stop)) - index.counts_before(local(start))
              for _, start, stop in spans]
    if blend.weights is None:
        return [(f"{blend.field} {list(blend.prefixes)}", [int(c[0]) for c in counts])]
    return [(f"{blend.prefix_field(k)} {prefix} (weight {blend.weights[k]:.3g})", [int(c[k]) for c in counts])
            for k, prefix in enumerate(blend.prefixes)]


def mix_table(cfg, derived, seq_length: int) -> str:
    """The table the dry run prints under ``# data``."""
    spans = phase_spans(derived)
    rows = source_rows(cfg, spans, anneal_start_sample(derived.schedule))
    width = max(len(label) for label, _ in rows) + 2
    header = "".join(f"{f'{name} [{start}, {stop})':>26}" for name, start, stop in spans)
    lines = [f"training tokens per source and schedule phase (samples x {seq_length} tokens; "
             "[first, end) training sample)", f"{'source':<{width}}{header}{'total':>18}"]
    for label, samples in rows:
        cells = "".join(f"{n * seq_length:>26,}" for n in samples)
        lines.append(f"{label:<{width}}{cells}{sum(samples) * seq_length:>18,}")
    return "\n".join(lines)
