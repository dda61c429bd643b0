"""The chunked loss equals the plain one (values and gradients) and holds far less memory at its peak."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from anneal.config.model import ModelConfig
from anneal.model.loss import linear_cross_entropy
from anneal.model.qwen3 import build_model

TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}


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


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("chunk_size", [1, 64, 300, 1000])
def test_chunked_loss_and_gradients_equal_plain_cross_entropy(dtype: torch.dtype, chunk_size: int) -> None:
    h, w, labels = _inputs(dtype)
    reference = F.cross_entropy(F.linear(h.detach(), w.detach()).float(), labels)
    plain, chunked = _loss_and_grads(h, w, labels, 0), _loss_and_grads(h, w, labels, chunk_size)
    assert plain[0] == reference  # chunk_size 0 is exactly the old path
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(chunked[0], plain[0], rtol=tol, atol=tol)
    for ours, theirs in zip(chunked[1:], plain[1:]):
        assert ours.dtype == theirs.dtype
        torch.testing.assert_close(ours.float(), theirs.float(), rtol=tol, atol=tol * theirs.abs().max().item())


def test_fp16_loss_scale_is_applied_before_the_cast_as_in_the_plain_path() -> None:
    # Tiny per-token gradients underflow fp16 unless scaled before the cast (what a loss scale is for).
    h, w, labels = _inputs(torch.float16, tokens=4096, vocab=512)
    _, h_plain, _ = _loss_and_grads(h, w, labels, 0, grad_scale=2.0**14)
    _, h_chunked, _ = _loss_and_grads(h, w, labels, 256, grad_scale=2.0**14)
    assert (h_plain != 0).float().mean() > 0.99
    torch.testing.assert_close(h_chunked.float(), h_plain.float(), rtol=2e-3, atol=2e-3 * h_plain.abs().max().item())


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
