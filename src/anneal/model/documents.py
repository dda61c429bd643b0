"""Document boundaries inside a packed training window, with Megatron's semantics.

Pretraining windows are cut from a stream of documents joined by an end-of-document token (EOD), so
one window holds the end of one document, whole ones, and the start of another. Megatron's
``GPTDataset`` (``_get_ltor_masks_and_position_ids(tokens, eod, reset_position_ids,
reset_attention_mask, eod_mask_loss)``) offers three flags, each off by default; with a window
``tokens [b, s + 1]``, inputs ``tokens[:, :-1]`` and labels ``tokens[:, 1:]``:

- ``eod_mask_loss``: a position whose *input* is the EOD does not count in the loss (its label, the
  next document's first token, cannot be predicted from the previous document); the label becomes
  ``IGNORE_INDEX``.
- ``reset_position_ids``: positions restart at 0 on the token after each EOD; the EOD keeps the
  position of the document it ends.
- ``reset_attention_mask``: a token attends only to earlier tokens of its own document. The document
  of input position ``j`` is the number of EODs among ``inputs[0:j]`` (an exclusive cumulative sum),
  so the EOD too belongs to the document it ends.

With all three, a packed window computes exactly what its documents would one by one (each from
position 0, alone), which ``tests/model/test_documents.py`` checks. ``DocumentBoundaries.inputs``
turns a window already on the device into the model's keyword arguments with vectorised tensor ops
(cumulative sums and maxima): no host sync, no per-document loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from anneal.errors import ConfigError
from anneal.model.loss import IGNORE_INDEX


@dataclass(frozen=True)
class DocumentBoundaries:
    """What a window's end-of-document tokens change: positions, attention, the loss (Megatron's flags)."""

    eod: int | None = None  # the tokenizer's end-of-document id; needed when any flag is set
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False

    def __post_init__(self) -> None:
        if self.enabled and self.eod is None:
            raise ConfigError("dataset.reset_position_ids, dataset.reset_attention_mask and "
                             "dataset.eod_mask_loss need the tokenizer's end-of-document id (eod is None)")

    @property
    def enabled(self) -> bool:
        return self.reset_position_ids or self.reset_attention_mask or self.eod_mask_loss

    def inputs(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """``Qwen3Model``'s keyword arguments for a window ``tokens [b, s + 1]`` (int64, on its device).

        Always ``input_ids`` and ``labels`` (``IGNORE_INDEX`` after each EOD under ``eod_mask_loss``);
        ``position_ids`` and ``document_ids`` ``[b, s]`` under their flags. With every flag off, the
        slices the loss always took and nothing else.
        """
        input_ids, labels = tokens[:, :-1], tokens[:, 1:]
        if not self.enabled:
            return {"input_ids": input_ids, "labels": labels}
        is_eod = input_ids == self.eod
        inputs = {"input_ids": input_ids,
                  "labels": labels.masked_fill(is_eod, IGNORE_INDEX) if self.eod_mask_loss else labels}
        if self.reset_position_ids:
            inputs["position_ids"] = position_ids(is_eod)
        if self.reset_attention_mask:
            inputs["document_ids"] = document_ids(is_eod)
        return inputs

    def counted_tokens(self, tokens: torch.Tensor) -> int:
        """How many labels of a window ``tokens [b, s + 1]`` count in the loss: all but those after an EOD
        under ``eod_mask_loss``. Meant for host batches (``.item()`` on a device tensor would sync)."""
        inputs = tokens[:, :-1]
        if not self.eod_mask_loss:
            return inputs.numel()
        return inputs.numel() - int((inputs == self.eod).sum().item())


def document_ids(is_eod: torch.Tensor) -> torch.Tensor:
    """Per input position ``[b, s]``, how many EODs come before it in its row: 0, 0, 0 (EOD), 1, 1, ..."""
    return torch.cumsum(is_eod, dim=1) - is_eod.long()


def position_ids(is_eod: torch.Tensor) -> torch.Tensor:
    """Per input position ``[b, s]``, its distance from the start of its document (0 after each EOD).

    A document starts at column 0 and after every EOD; the running maximum of the start columns seen so
    far is the start of the current document.
    """
    columns = torch.arange(is_eod.shape[1], device=is_eod.device).expand_as(is_eod)
    starts_here = torch.zeros_like(is_eod)
    starts_here[:, 1:] = is_eod[:, :-1]  # the column after an EOD
    start = torch.where(starts_here, columns, 0).cummax(dim=1).values
    return columns - start


def document_boundaries(dataset: object, eod: int | None) -> DocumentBoundaries:
    """The flags of a ``DatasetConfig`` (``dataset.reset_position_ids``, ``reset_attention_mask``,
    ``eod_mask_loss``) with the data's ``eod`` (``anneal.data``'s ``RunData.eod``)."""
    return DocumentBoundaries(eod, reset_position_ids=dataset.reset_position_ids,
                              reset_attention_mask=dataset.reset_attention_mask,
                              eod_mask_loss=dataset.eod_mask_loss)
