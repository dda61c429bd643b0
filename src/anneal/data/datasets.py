"""The run's data from its ``dataset.`` section: ``build_data`` is the one entry point.

It returns the training samples, every validation set (the main split, then the held-out sets of
``dataset.extra_valid_data_path``) with the metric keys its loss is logged under, and the data's
end-of-document id, which the document-boundary fields (``dataset.reset_position_ids``,
``reset_attention_mask``, ``eod_mask_loss``) need. Each dataset has ``gather(samples)`` ->
``[n, seq_length + 1]`` int64 tokens, ``seq_length`` and ``len()`` (the windows of one pass); a sample is
a pure function of ``dataset.seed`` and its index (``anneal.data.windows``).

Below it: ``anneal.data.builtin`` builds the ``stdlib`` and ``mock`` kinds, ``anneal.data.sources`` the
``indexed`` one, both on ``anneal.data.windows``; ``anneal.data.spec`` says what the section's values mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from anneal.data import spec
from anneal.data.blend import anneal_start_sample
from anneal.data.builtin import build_builtin
from anneal.data.sources import build_indexed, check_indexed
from anneal.data.windows import no_windows
from anneal.errors import ConfigError


@dataclass(frozen=True)
class ValidSet:
    """One validation set: its metric key, its samples and, for a weighted blend, its components' keys."""

    key: str  # "valid_loss" for the main split, "valid_loss/<name>" for a held-out set
    data: Any  # gather(samples) / seq_length / len(), as the training data
    components: tuple[str, ...] = ()  # metric keys of a weighted blend's sources; () for one source

    def component_of(self, samples: np.ndarray) -> np.ndarray:
        """The index into ``components`` of the source each sample reads (int64)."""
        if not self.components:
            raise ValueError(f"{self.key} is one source: it has no components")
        return self.data.index.lookup(samples)[0]


@dataclass(frozen=True)
class RunData:
    """Everything a run reads: built once, before the model, by ``build_data``."""

    train: Any  # gather(samples) -> [n, seq_length + 1] int64 tokens; .seq_length
    valid: list[ValidSet]  # the main validation set first (when it has data), then the held-out sets
    eod: int | None  # the data's end-of-document id; None when unknown


def build_data(cfg, *, seq_length: int, vocab_size: int, schedule) -> RunData:
    """The data of the dataset section ``cfg`` for a model of ``seq_length`` and ``vocab_size``.

    ``schedule``: the derived scheduler schedule; a WSD one sets where ``dataset.anneal_data_path`` takes
    over. ConfigError if ``cfg`` is invalid, its tokens do not fit ``vocab_size`` or are too few for a window,
    or a document-boundary field is set without a known end-of-document id.
    """
    eod = _checked(cfg, seq_length=seq_length, vocab_size=vocab_size)
    train, valid, held_out = _build(cfg, seq_length, vocab_size, anneal_start_sample(schedule))
    keys = dict(spec.valid_keys(cfg))
    sets = [ValidSet(spec.VALID_KEY, valid, keys[spec.VALID_KEY])] if spec.VALID_KEY in keys else []
    for name, data in held_out.items():
        key = f"{spec.VALID_KEY}/{name}"
        sets.append(ValidSet(key, data, keys[key]))
    return RunData(train, sets, eod)


def build_datasets(cfg, *, seq_length: int, vocab_size: int, anneal_start: int | None = None):
    """The (train, main validation) datasets alone, for callers that need no more (the bench, tests); the
    validation one has no windows when the section has no validation split.

    ``anneal_start``: the sample where the WSD anneal starts, from which ``dataset.anneal_data_path`` is read.
    """
    _checked(cfg, seq_length=seq_length, vocab_size=vocab_size)
    train, valid, _ = _build(cfg, seq_length, vocab_size, anneal_start)
    return train, valid


def _checked(cfg, *, seq_length: int, vocab_size: int) -> int | None:
    """Refuse what cannot be built, before a token is read (indexed data: ``check_indexed``, what the dry
    run checks, each sidecar and header read once); the data's end-of-document id."""
    cfg.validate()
    if seq_length < 1:
        raise ConfigError(f"model.seq_length ({seq_length}) must be >= 1")
    recorded = check_indexed(cfg, seq_length=seq_length, vocab_size=vocab_size)
    return spec.check_document_fields(cfg, vocab_size, recorded)


def _build(cfg, seq_length: int, vocab_size: int, anneal_start: int | None):
    """``(train, main validation, {held-out name: data})``; the main one has no windows without a split."""
    if cfg.kind != "indexed":
        return (*build_builtin(cfg, seq_length=seq_length, vocab_size=vocab_size), {})
    built = build_indexed(cfg, seq_length=seq_length, vocab_size=vocab_size, anneal_start=anneal_start)
    valid = built.valid if built.valid is not None else no_windows(seq_length=seq_length, seed=cfg.seed,
                                                                   vocab_size=vocab_size)
    return built.train, valid, built.held_out
