"""``dataset.``: where training tokens come from, how sources blend, and how they split.

Pure Python (no torch, no numpy) so a dry run can import and validate it in milliseconds.

Paths follow Megatron: ``data_path`` is either prefixes (read as one concatenated stream) or a blend
``[w1, prefix1, w2, prefix2, ...]``; it is cut into train/valid/test by ``split``. Alternatively
``train_data_path`` / ``valid_data_path`` / ``test_data_path`` give each split its own blend and
``split`` is not used. ``anneal_data_path`` is a blend for the training samples from the WSD anneal on
(data annealing). ``extra_valid_data_path`` names held-out sets, each a blend read whole, scored at every
evaluation besides the main validation split.

``reset_position_ids``, ``reset_attention_mask`` and ``eod_mask_loss`` are Megatron's document-boundary
flags: the model and the loss apply them from the tokens, so they need the data's end-of-document id.

What the values mean (blends, splits, metric keys, the end-of-document id) is ``anneal.data.spec``'s; this
module holds the values and checks them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from anneal.data import spec
from anneal.data.metadata import check_tokenizers
from anneal.errors import ConfigError, check_choice

DATASET_KINDS = ("stdlib", "mock", "indexed")


@dataclass
class DatasetConfig:
    """One dataset section.

    ``stdlib``: the running interpreter's standard-library ``.py`` sources, byte-tokenized (real text,
    present on every machine). ``mock``: seeded random tokens, like Megatron's MockGPTDataset.
    ``indexed``: Megatron indexed datasets (``.bin`` + ``.idx``) named by prefix in the path fields.
    """

    kind: str = "stdlib"  # one of DATASET_KINDS: stdlib, mock, indexed
    data_path: list[str | float] = field(default_factory=list)  # prefixes, or [w1, prefix1, w2, ...]
    split: str = "969,30,1"  # Megatron's train,valid,test weights (data_path only)
    train_data_path: list[str | float] = field(default_factory=list)  # per-split blends, no split
    valid_data_path: list[str | float] = field(default_factory=list)  # validation blend
    test_data_path: list[str | float] = field(default_factory=list)  # test blend
    anneal_data_path: list[str | float] = field(default_factory=list)  # train blend from the WSD anneal
    seed: int = 1234  # sample order and the mock tokens
    stdlib_max_bytes: int = 8 * 1024 * 1024  # how much stdlib source the stdlib kind reads
    mock_num_tokens: int = 4 * 1024 * 1024  # length of the mock kind's token stream
    # held-out sets scored at each evaluation besides the main one: name -> blend (Megatron's format), each
    # read whole (not cut by split), logged as valid_loss/<name>; indexed only
    # ('+dataset.extra_valid_data_path.wiki=[/data/wiki_text_document]')
    extra_valid_data_path: dict[str, list[str | float]] = field(default_factory=dict)
    reset_position_ids: bool = False  # position ids restart after each end-of-document token; needs its id
    reset_attention_mask: bool = False  # attention stays within a document; needs the end-of-document id
    eod_mask_loss: bool = False  # no loss where the input is the end-of-document token; needs its id

    def __post_init__(self) -> None:
        # one prefix without brackets (dataset.data_path=/data/web) is a list of one
        for name in spec.PATH_FIELDS:
            if isinstance(getattr(self, name), str):
                setattr(self, name, [getattr(self, name)])
        if isinstance(self.extra_valid_data_path, dict):
            self.extra_valid_data_path = {name: [items] if isinstance(items, str) else items
                                          for name, items in self.extra_valid_data_path.items()}

    def validate(self) -> None:
        check_choice("dataset.kind", self.kind, DATASET_KINDS)
        spec.split_weights(self.split)
        if not isinstance(self.extra_valid_data_path, dict):
            raise ConfigError(f"dataset.{spec.EXTRA_VALID} ({self.extra_valid_data_path!r}) must be a "
                              "mapping of set names to blends")
        _check_paths(self)
        spec.valid_keys(self)  # the held-out sets' names, and no metric key twice
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"dataset.seed ({self.seed!r}) must be a non-negative integer")
        for name in ("stdlib_max_bytes", "mock_num_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"dataset.{name} ({value!r}) must be a positive integer")

    def known_max_token(self) -> int | None:
        """The largest token id the data can hold, when known without reading it (stdlib only)."""
        return spec.BYTE_EOD if self.kind == "stdlib" else None

    def check_against(self, vocab_size: int, lr_decay_style: str | None, *,
                      eval_interval: int | None) -> None:
        """Rules across sections: the recorded tokenizers fit ``model.vocab_size``, an anneal blend has
        WSD, an evaluation (``train.eval_interval``, None when off) has validation data, and the
        document-boundary fields have an end-of-document id to find documents by."""
        check_anneal_blend(self, lr_decay_style)
        if eval_interval and not self.has_valid_data():
            where = (f"dataset.split ({self.split!r}) gives the valid split no weight" if self.uses_split
                     or self.kind != "indexed" else "dataset.valid_data_path is empty")
            raise ConfigError(f"train.eval_interval ({eval_interval}) needs validation data, but {where}; "
                              "give it some, or set train.eval_interval=null")
        recorded = check_tokenizers(self.prefixes(), vocab_size)  # reads each prefix's small .json sidecar
        spec.check_document_fields(self, vocab_size, recorded)

    def prefixes(self) -> list[tuple[str, str]]:
        """Every ``(dotted field, prefix)`` pair in the path fields, the extra validation sets' included."""
        return spec.prefixes(self)

    def has_valid_data(self) -> bool:
        """Whether an evaluation has a set to score: the main validation split or an extra named set."""
        return bool(spec.valid_keys(self))

    @property
    def uses_split(self) -> bool:
        """True when ``data_path`` is cut by ``split``; False with per-split paths."""
        return spec.uses_split(self)


def _check_paths(cfg: DatasetConfig) -> None:
    given = [name for name in (*spec.PATH_FIELDS, spec.EXTRA_VALID) if getattr(cfg, name)]
    if cfg.kind != "indexed":
        if given:
            name = given[0]
            raise ConfigError(f"dataset.{name} ({getattr(cfg, name)!r}) is only read when dataset.kind is "
                              f"'indexed' (got {cfg.kind!r}); pick dataset=indexed or drop the paths")
        return
    for name in given:
        if name != spec.EXTRA_VALID:
            spec.blend_of(cfg, name)
    per_split = [name for name in given if name in spec.PATH_FIELDS[1:4]]
    if cfg.data_path and per_split:
        raise ConfigError(f"dataset.{per_split[0]} cannot be combined with dataset.data_path: give one "
                          "blend cut by dataset.split, or a blend per split (as in Megatron)")
    if not cfg.data_path and not cfg.train_data_path:
        what = f"; dataset.{per_split[0]} needs dataset.train_data_path" if per_split else ""
        raise ConfigError(f"dataset.data_path ({list(cfg.data_path)!r}) must name at least one prefix when "
                          f"dataset.kind is 'indexed'{what}")


def check_anneal_blend(cfg: DatasetConfig, lr_decay_style: str | None) -> None:
    """``dataset.anneal_data_path`` starts at the WSD anneal, so it needs a WSD schedule."""
    if cfg.anneal_data_path and lr_decay_style != "WSD":
        raise ConfigError(f"dataset.anneal_data_path ({list(cfg.anneal_data_path)!r}) needs "
                          f"scheduler.lr_decay_style 'WSD' (got {lr_decay_style!r}): the anneal blend "
                          "takes over where the WSD anneal starts")
