"""An fp32 L2 norm that stays accurate over long buffers.

``torch.linalg.vector_norm`` of one fp32 tensor accumulates serially on CPU: measured here, 7.5e-6
relative off at 830k elements and 3e-4 at 10M (a clip coefficient off by as much). Norms of blocks
of 4096 elements, then the norm of those, are accurate to 1e-8 at the same speed (50M elements:
22 ms either way; an fp64 pass takes 290 ms).
"""

from __future__ import annotations

import torch

BLOCK = 4096


def l2_norm(x: torch.Tensor) -> torch.Tensor:
    """The L2 norm of ``x`` (any shape) as a 0-dim fp32 tensor."""
    flat = x.reshape(-1)
    full = flat.numel() // BLOCK * BLOCK
    if full == 0:
        return torch.linalg.vector_norm(flat, dtype=torch.float32)
    parts = [torch.linalg.vector_norm(flat[:full].view(-1, BLOCK), dim=1, dtype=torch.float32)]
    if full < flat.numel():
        parts.append(torch.linalg.vector_norm(flat[full:], dtype=torch.float32).reshape(1))
    return torch.linalg.vector_norm(torch.cat(parts))
