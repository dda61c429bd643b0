"""The language-model loss from the last hidden states, optionally without ever holding full fp32 logits.

``linear_cross_entropy(hidden, weight, labels, chunk_size, reduction)`` equals
``F.cross_entropy(F.linear(hidden, weight).float(), labels, reduction=reduction)`` with
``ignore_index=IGNORE_INDEX``. With ``chunk_size > 0`` it runs the output projection, the fp32
log-sum-exp and the loss over ``chunk_size`` tokens at a time; it keeps only the hidden states and one
fp32 log-sum-exp per token for the backward pass, which recomputes each chunk's logits (one extra
output-layer matmul) and writes that chunk's gradients. Peak memory for the loss is then
``chunk_size × vocab`` fp32 values instead of several ``tokens × vocab`` ones.

Labels equal to ``IGNORE_INDEX`` (``anneal.model.documents``: the token after an end-of-document under
``eod_mask_loss``) count nowhere: their loss and their gradient are zero. ``reduction`` is PyTorch's:

- ``mean``: over the counted tokens (every token when none is ignored: the loss as it always was;
  NaN when all are ignored, as ``F.cross_entropy``);
- ``sum``: over the counted tokens, for Megatron's per-token loss (``calculate_per_token_loss``): the
  caller divides by the global batch's count;
- ``none``: one fp32 loss per token, shaped like ``labels``, 0 where ignored (validation splits the loss
  by blend component); it has gradients too.

The gradient of each chunk is formed as autograd forms the plain one: ``(softmax - onehot) ×
grad / tokens`` in fp32 (``grad`` per token under ``none``, ``/ tokens`` under ``mean`` only, 0 on
ignored rows), cast to the weights' dtype, then the two matmuls; so a loss scale (fp16) is applied
before the cast, as in the plain path. The weight gradient is summed over chunks in one fp32
``[vocab, hidden]`` accumulator (transient, in the backward pass), by one fp32 GEMM per chunk written
into it; its operands are the chunk's gradient (its 16-bit values, in the fp32 buffer that held the
chunk's softmax) and the chunk's hidden states upcast, so no other ``[vocab, hidden]`` tensor is made.
Products of 16-bit values are exact in fp32: this is the sum the plain path's 16-bit GEMM accumulates
in fp32, rounded once at the end. (A 16-bit GEMM adding into an fp32 tensor does not exist on CPU, and
``out_dtype`` is CUDA-only, so the GEMM is fp32 everywhere: on CUDA it runs at the fp32 matmul
precision.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # PyTorch's and Megatron's: a label that counts in no loss (F.cross_entropy's default)
REDUCTIONS = ("mean", "sum", "none")


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk_size: int = 0, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of ``hidden [..., h] @ weight[V, h].T`` against ``labels [...]``; chunk_size 0: plain.

    ``reduction`` (``REDUCTIONS``): a scalar ``mean`` or ``sum`` over the labels that are not
    ``IGNORE_INDEX``, or ``none``: fp32 losses shaped like ``labels``, 0 at ignored ones.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction ({reduction!r}) must be one of {REDUCTIONS}")
    shape = labels.shape
    hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    if chunk_size <= 0:
        loss = F.cross_entropy(F.linear(hidden, weight).float(), labels, ignore_index=IGNORE_INDEX,
                               reduction=reduction)
    else:
        loss = _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, chunk_size, reduction)
    return loss.view(shape) if reduction == "none" else loss


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int,
                reduction: str) -> torch.Tensor:
        counted = labels != IGNORE_INDEX
        targets = labels.clamp_min(0)  # any valid index on ignored rows: their loss is zeroed below
        lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        losses = torch.empty_like(lse) if reduction == "none" else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for rows in _chunks(hidden.shape[0], chunk_size):
            logits = F.linear(hidden[rows], weight).float()
            lse[rows] = torch.logsumexp(logits, dim=-1)
            per_token = lse[rows] - logits.gather(1, targets[rows, None]).squeeze(1)
            per_token = per_token.where(counted[rows], 0.0)
            if losses is not None:
                losses[rows] = per_token
            else:
                total += per_token.sum()
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.chunk_size, ctx.reduction = chunk_size, reduction
        if losses is not None:
            return losses
        return total / counted.sum() if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        hidden, weight, labels, lse = ctx.saved_tensors
        counted = labels != IGNORE_INDEX
        targets = labels.clamp_min(0)
        # d loss / d loss_i per token, fp32: 0 on ignored rows, 1/count under mean, grad_i under none
        row_scale = counted * (grad.float() / counted.sum() if ctx.reduction == "mean" else grad.float())
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        for rows in _chunks(hidden.shape[0], ctx.chunk_size):
            g = F.linear(hidden[rows], weight).float().sub_(lse[rows, None]).exp_()  # softmax, fp32
            g[torch.arange(g.shape[0], device=g.device), targets[rows]] -= 1.0
            g_low = g.mul_(row_scale[rows, None]).to(hidden.dtype)  # what the plain path's matmuls get
            if grad_hidden is not None:
                torch.mm(g_low, weight, out=grad_hidden[rows])
            if grad_weight is not None:
                g.copy_(g_low)  # g rounded to the 16-bit values (a no-op when hidden is fp32)
                grad_weight.addmm_(g.t(), hidden[rows].float())  # one fp32 GEMM into the accumulator
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]
