"""What ``dry_run=true`` prints: the resolved config and the derived schedule, nothing started."""

from __future__ import annotations

from anneal.config.compose import to_yaml
from anneal.config.container import ConfigContainer
from anneal.config.derive import Derived


def human(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.4g}"


def schedule_table(cfg: ConfigContainer, derived: Derived) -> str:
    seq = cfg.model.seq_length
    s = derived.schedule
    lines = [
        f"schedule: lr {s.lr_decay_style}"
        + (f" (anneal {s.lr_wsd_decay_style})" if s.lr_decay_style == "WSD" else "")
        + f", max_lr {s.max_lr:g}, min_lr {s.min_lr:g}, init_lr {s.init_lr:g};"
        f" wd {s.wd_incr_style} {s.start_wd:g} -> {s.end_wd:g}",
        f"steps count samples: scheduler.step(global_batch_size) each iteration "
        f"(global batch {cfg.train.global_batch_size}, {seq} tokens per sample)",
        f"{'phase boundary':<28}{'iteration':>12}{'samples':>16}{'tokens':>12}",
    ]
    for name, samples, iteration, tokens in derived.phase_rows(seq):
        lines.append(f"{name:<28}{iteration:>12}{samples:>16g}{human(tokens):>12}")
    return "\n".join(lines)


def report(cfg: ConfigContainer, derived: Derived) -> str:
    return "\n".join(["# resolved config", to_yaml(cfg), "# derived", schedule_table(cfg, derived)])
