"""The chunked loss equals the plain one (values and gradients) and holds far less memory at its peak."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from anneal.config.model import ModelConfig
from anneal.model.loss import IGNORE_INDEX, linear_cross_entropy
from anneal.model.qwen3 import build_model


def _inputs(dtype: torch.dtype, tokens: int = 300, hidden: int = 48, vocab: int = 97, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * 0.2).to(dtype).requires_grad_()
    return h, w, torch.randint(0, vocab, (tokens,), generator=g)


def _loss_and_grads(h, w, labels, chunk_size: int, grad_scale: float = 1.0):
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = linear_cross_entropy(h, w, labels, chunk_size)
    (loss * grad_scale).backward()
    return loss.detach(), h.grad, w.grad


def _assert_within_one_ulp(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Each element of ``ours`` is ``theirs`` or a neighbour: the two are roundings of one fp32 sum."""
    magnitude = theirs.abs()
    ulp = torch.nextafter(magnitude, torch.full_like(magnitude, math.inf)) - magnitude  # in theirs' dtype
    excess = (ours.float() - theirs.float()).abs() / ulp.float()
    assert excess.max() <= 1.0, f"{excess.max().item():g} ulps apart"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("chunk_size", [1, 64, 300, 1000])
def test_chunked_loss_and_gradients_equal_plain_cross_entropy(dtype: torch.dtype, chunk_size: int) -> None:
    h, w, labels = _inputs(dtype)
    reference = F.cross_entropy(F.linear(h.detach(), w.detach()).float(), labels)
    plain, chunked = _loss_and_grads(h, w, labels, 0), _loss_and_grads(h, w, labels, chunk_size)
    assert plain[0] == reference  # chunk_size 0 is exactly the old path
    torch.testing.assert_close(chunked[0], plain[0], rtol=1e-6, atol=0)  # both from the same 16-bit logits
    for ours, theirs in zip(chunked[1:], plain[1:]):
        assert ours.dtype == theirs.dtype
        if dtype == torch.float32:  # fp32 sums in another order: 1e-6 of the largest gradient
            torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6 * theirs.abs().max().item())
        else:  # the plain path rounds its GEMM's fp32 sum once, the chunked one its fp32 accumulator
            _assert_within_one_ulp(ours, theirs)


def _ignored(tokens: int = 300) -> torch.Tensor:
    ignored = torch.zeros(tokens, dtype=torch.bool)
    ignored[::3] = True
    ignored[:70] = True  # a whole chunk of 64 too
    return ignored


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_size", [0, 64])
def test_ignored_labels_count_in_no_loss_and_get_no_gradient(chunk_size: int, reduction: str) -> None:
    h, w, labels = _inputs(torch.float32)
    ignored = _ignored()
    ours_h, ours_w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    masked = labels.masked_fill(ignored, IGNORE_INDEX)
    loss = linear_cross_entropy(ours_h, ours_w, masked, chunk_size, reduction)
    # the reference sees only the counted tokens
    ref_h, ref_w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    kept = F.cross_entropy(F.linear(ref_h[~ignored], ref_w).float(), labels[~ignored],
                           reduction="none" if reduction == "none" else reduction)
    if reduction == "none":
        assert loss.shape == labels.shape and loss.dtype == torch.float32
        assert torch.equal(loss[ignored], torch.zeros(int(ignored.sum())))
        loss = loss[~ignored]
        upstream = torch.randn(kept.shape, generator=torch.Generator().manual_seed(2))
        (loss * upstream).sum().backward()
        (kept * upstream).sum().backward()
    else:
        loss.backward()
        kept.backward()
    torch.testing.assert_close(loss, kept, rtol=1e-6, atol=1e-6)
    assert torch.equal(ours_h.grad[ignored], torch.zeros_like(ours_h.grad[ignored]))
    for ours, theirs in ((ours_h.grad, ref_h.grad), (ours_w.grad, ref_w.grad)):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6 * theirs.abs().max().item())


@pytest.mark.parametrize("chunk_size", [0, 64])
def test_mean_without_ignored_labels_is_the_sum_over_all_tokens(chunk_size: int) -> None:
    h, w, labels = _inputs(torch.float32)
    mean = linear_cross_entropy(h, w, labels, chunk_size, "mean")
    assert torch.equal(mean, linear_cross_entropy(h, w, labels, chunk_size, "sum") / labels.numel())
    assert torch.equal(mean, linear_cross_entropy(h, w, labels, chunk_size))  # the default


@pytest.mark.parametrize("chunk_size", [0, 64])
def test_all_labels_ignored_sum_to_zero_with_zero_gradients(chunk_size: int) -> None:
    h, w, labels = _inputs(torch.float32)
    loss = linear_cross_entropy(h, w, torch.full_like(labels, IGNORE_INDEX), chunk_size, "sum")
    loss.backward()
    assert loss.item() == 0 and not h.grad.any() and not w.grad.any()


def test_unknown_reduction_is_refused() -> None:
    h, w, labels = _inputs(torch.float32)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, labels, 0, "avg")


def test_fp16_loss_scale_is_applied_before_the_cast_as_in_the_plain_path() -> None:
    # Tiny per-token gradients underflow fp16 unless scaled before the cast (what a loss scale is for).
    h, w, labels = _inputs(torch.float16, tokens=4096, vocab=512)
    _, h_plain, _ = _loss_and_grads(h, w, labels, 0, grad_scale=2.0**14)
    _, h_chunked, _ = _loss_and_grads(h, w, labels, 256, grad_scale=2.0**14)
    assert (h_plain != 0).float().mean() > 0.99
    torch.testing.assert_close(h_chunked.float(), h_plain.float(), rtol=2e-3, atol=2e-3 * h_plain.abs().max().item())


def _tensors(tree) -> list[torch.Tensor]:
    return [leaf for leaf in tree_leaves(tree) if isinstance(leaf, torch.Tensor)]


class _NewTensors(TorchDispatchMode):
    """Records (shape, dtype) of every tensor an op returns in new memory (not an input written in place)."""

    def __init__(self) -> None:
        super().__init__()
        self.made: list[tuple[tuple[int, ...], torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))}
        new = [t for t in _tensors(out) if t.untyped_storage().data_ptr() not in given]
        self.made += [(tuple(t.shape), t.dtype) for t in new]
        return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_backward_makes_no_vocab_by_hidden_temporaries_per_chunk(dtype: torch.dtype) -> None:
    h, w, labels = _inputs(dtype, tokens=256)
    loss = linear_cross_entropy(h, w, labels, 64)  # four chunks
    with _NewTensors() as mode:
        loss.backward()
    weight_sized = [made for made in mode.made if made[0] == tuple(w.shape)]
    assert weight_sized == [(tuple(w.shape), torch.float32), (tuple(w.shape), dtype)]  # accumulator, gradient


def test_model_computes_the_same_loss_with_and_without_chunks() -> None:
    cfg = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, vocab_size=101, seq_length=32)
    torch.manual_seed(0)
    model = build_model(cfg)
    tokens = torch.randint(0, 101, (3, 33))
    logits = model(tokens[:, :-1])
    plain = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
    cfg.cross_entropy_chunk_size = 40
    torch.testing.assert_close(model(tokens[:, :-1], labels=tokens[:, 1:]), plain, rtol=1e-6, atol=1e-6)


# The loss's own peak: the process's resident high-water mark (VmHWM) is reset to the current size
# right before the loss (Linux: "5" > /proc/self/clear_refs), so earlier transients do not count.
_PEAK = """
import sys, torch
from anneal.model.loss import linear_cross_entropy
def kib(key):
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(key)).split()[1])
torch.manual_seed(0)
tokens, hidden, vocab, chunk = 4096, 64, 16384, int(sys.argv[1])
h = torch.randn(tokens, hidden, requires_grad=True)
w = (torch.randn(vocab, hidden) * 0.05).requires_grad_()
labels = torch.randint(0, vocab, (tokens,))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = kib("VmRSS:")
linear_cross_entropy(h, w, labels, chunk).backward()
print((kib("VmHWM:") - base) * 1024)
"""


def _peak_bytes(*chunk_sizes: int) -> list[int]:
    """The loss's peak per chunk size, each in its own process (they run at once: the peak is per process)."""
    procs = [subprocess.Popen([sys.executable, "-c", _PEAK, str(size)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for size in chunk_sizes]
    outs = [proc.communicate(timeout=120)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * len(procs)
    return [int(out.strip()) for out in outs]


def test_chunked_loss_peak_memory_is_a_fraction_of_the_plain_one() -> None:
    # 4096 tokens × 16384 vocab: one fp32 logits tensor is 256 MiB; the plain path holds several.
    plain, chunked = _peak_bytes(0, 512)
    assert plain > 512 * 2**20
    assert chunked < plain / 8, (plain, chunked)
