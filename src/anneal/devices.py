"""What a plan runs on: known accelerators, the attention kernel that will run, this machine's free memory.

``ACCELERATORS`` holds, per accelerator, the memory one rank can use and its dense bf16 peak. The
peaks are the vendors' datasheet figures without sparsity. The memory is the capacity PyTorch
reports for the device (``torch.cuda.get_device_properties(i).total_memory``, the "total capacity"
of its out-of-memory message) less ``CUDA_CONTEXT_GIB`` for the CUDA context, which is what
``torch.cuda.mem_get_info`` reports free on an idle device; the capacities are approximations to
within a few hundred MiB (the HBM the driver exposes, not the marketing figure).

Nothing here imports torch at import; ``machine_target`` imports it when it asks the machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

MEMINFO = "/proc/meminfo"
GIB = 1024**3
CUDA_CONTEXT_GIB = 0.5  # the CUDA context and cuBLAS workspace take about this much before any tensor


@dataclass(frozen=True)
class Accelerator:
    name: str
    capacity_gib: float  # total memory as PyTorch reports it (GiB), before the CUDA context
    bf16_flops: float  # dense bf16 tensor-core peak, FLOP/s (no 2:4 sparsity)
    source: str  # where the figures come from

    @property
    def free(self) -> int:
        """Bytes one rank can use: the capacity less the CUDA context."""
        return int((self.capacity_gib - CUDA_CONTEXT_GIB) * GIB)


ACCELERATORS: dict[str, Accelerator] = {a.name: a for a in (
    Accelerator("A100-40GB", 39.39, 312e12, "NVIDIA A100 Tensor Core GPU datasheet: 312 TFLOPS BF16 dense, "
                                            "40 GB HBM2"),
    Accelerator("A100-80GB", 79.15, 312e12, "NVIDIA A100 Tensor Core GPU datasheet: 312 TFLOPS BF16 dense, "
                                            "80 GB HBM2e"),
    Accelerator("H100-80GB", 79.11, 989e12, "NVIDIA H100 Tensor Core GPU datasheet, H100 SXM: 1,979 TFLOPS "
                                            "BF16 with sparsity, 989 dense, 80 GB HBM3"),
    Accelerator("H100-PCIe", 79.11, 756e12, "NVIDIA H100 datasheet, H100 PCIe: 1,513 TFLOPS BF16 with "
                                            "sparsity, 756 dense, 80 GB HBM2e"),
    Accelerator("H100-NVL", 93.1, 835e12, "NVIDIA H100 datasheet, H100 NVL: 1,671 TFLOPS BF16 with "
                                          "sparsity, 835 dense, 94 GB HBM3"),
    Accelerator("H200-141GB", 139.8, 989e12, "NVIDIA H200 datasheet, H200 SXM: 1,979 TFLOPS BF16 with "
                                             "sparsity, 989 dense, 141 GB HBM3e"),
    Accelerator("B200", 178.4, 2250e12, "NVIDIA HGX B200 datasheet: 36 PFLOPS BF16 per 8 GPUs with sparsity, "
                                        "2.25 dense per GPU, 180 GB HBM3e per GPU"),
    Accelerator("MI300X", 191.98, 1307.4e12, "AMD Instinct MI300X datasheet: 1,307.4 TFLOPS BF16 dense, "
                                             "192 GB HBM3"),
)}

# Model FLOPs utilisation the time estimate assumes unless plan.mfu says otherwise: the lowest of the
# three bf16 figures (38-43%) of Llama 3 405B's pretraining on 8,192-16,384 H100s (Dubey et al., "The
# Llama 3 Herd of Models", 2024, Table 4: 430, 400 and 380 TFLOPs per GPU of 989).
DEFAULT_MFU = 0.38
MFU_ANCHOR = "the low end of Llama 3 405B's 38-43% bf16 on H100s, Dubey et al. 2024, Table 4"

# Device-name fragments (torch.cuda.get_device_name) to table rows, most specific first; an A100 is told
# apart by its memory.
_NAMES = (("H100 NVL", "H100-NVL"), ("H100 PCIe", "H100-PCIe"), ("H100", "H100-80GB"), ("H200", "H200-141GB"),
          ("B200", "B200"), ("MI300X", "MI300X"))


def attention_kernel(precision: str, device_type: str) -> str:
    """The SDPA kernel the model's attention runs on these inputs: ``flash``, ``efficient`` or ``math``.

    Only ``math`` stores the ``[b, heads, s, s]`` score matrices for the backward pass (Korthikanti's
    ``5·a·s/h`` term). On CPU, PyTorch's flash-attention-for-CPU kernel takes every dtype and grouped
    queries (its backward keeps q, k, v, the output and the log-sum-exp; measured on 2.13). On CUDA (and
    ROCm) 16-bit inputs run FlashAttention-2; fp32 is outside flash's dtypes and runs the memory-efficient
    kernel, which rejects ``enable_gqa``: with grouped queries the model repeats K and V to every query
    head first (``anneal.model.qwen3.expands_kv``), and those copies are kept for the backward. Other
    dtypes (fp64) fall to ``math``.
    """
    if device_type == "cpu" or precision in ("bf16", "fp16"):
        return "flash"
    return "efficient" if precision == "fp32" else "math"


def document_attention_kernel(precision: str, device_type: str) -> str:
    """The kernel attention runs under a document mask (``dataset.reset_attention_mask``).

    - ``flex_attention`` on CUDA (and ROCm): ``torch.nn.attention.flex_attention``, compiled, over a
      ``BlockMask`` built once per forward; it skips the blocks no token may see, keeps only q, k, v,
      the output and the log-sum-exp for the backward (no score matrices), takes grouped queries
      natively (``enable_gqa``) and every float dtype, fp32 included. SDPA with an explicit mask would
      run the memory-efficient kernel at best (flash takes no mask), which rejects grouped queries, and
      the math kernel otherwise. ``varlen_attn`` (torch 2.13) needs the documents' lengths as host
      integers (a sync per step) and 16-bit inputs.
    - ``sdpa+mask`` on CPU: SDPA with an additive ``[b, 1, s, s]`` mask in the attention dtype, built once
      per forward. The op that runs is still the flash kernel for CPU in every dtype
      (``_scaled_dot_product_flash_attention_for_cpu``, measured on 2.13 with fp32, bf16 and fp16, grouped
      queries too): no score matrices; it keeps the mask for the backward, by reference when the mask
      is already additive in its dtype (a boolean one it would convert again in every layer, a copy per
      layer kept until the backward).

    ``precision`` is accepted for symmetry with ``attention_kernel``: the choice depends on the device.
    """
    del precision
    return "sdpa+mask" if device_type == "cpu" else "flex_attention"


def describe_attention(precision: str, device_type: str, *, reset_attention_mask: bool = False,
                       grouped_queries: bool = False) -> str:
    """One line for the start-up log and the dry run: which attention kernel runs, and why.

    ``attention: flex_attention with a document mask (dataset.reset_attention_mask)``.
    """
    if reset_attention_mask:
        kernel = document_attention_kernel(precision, device_type)
        how = ("flex_attention (compiled, block-sparse) with a document mask" if kernel == "flex_attention"
               else "SDPA flash for CPU with a document mask, additive [b, 1, s, s]")
        return f"attention: {how} (dataset.reset_attention_mask)"
    kernel = attention_kernel(precision, device_type)
    names = {"flash": "SDPA flash", "efficient": "SDPA memory-efficient", "math": "SDPA math"}
    repeated = ", K and V repeated to every query head" if grouped_queries and kernel == "efficient" else ""
    return f"attention: {names[kernel]}, causal{repeated}"


@dataclass(frozen=True)
class Target:
    """Where a plan's ranks run: a table accelerator or this machine's device."""

    name: str  # "H100-80GB", "cpu", "cuda:0"
    kind: str  # "cuda" or "cpu"
    free: int | None  # bytes one rank may use (all of them together on a shared CPU); None when unknown
    source: str  # where ``free`` comes from
    ranks_here: int = 1  # ranks sharing ``free``: LOCAL_WORLD_SIZE on CPU
    peak_flops: float | None = None  # dense 16-bit peak, None when unknown


def accelerator_target(name: str) -> Target:
    """A ``Target`` for table accelerator ``name`` (a key of ``ACCELERATORS``)."""
    a = ACCELERATORS[name]
    return Target(a.name, "cuda", a.free, f"plan.device: {a.capacity_gib:g} GiB less the CUDA context",
                  peak_flops=a.bf16_flops)


def planned_target(device: str, dist_device: str) -> Target:
    """``plan.device``'s accelerator, or this machine's device (``dist.device``) when it is ``auto``."""
    return machine_target(dist_device) if device == "auto" else accelerator_target(device)


def machine_target(device: str) -> Target:
    """This machine's device for ``dist.device``: the CUDA device's free memory, or the CPU's MemAvailable."""
    import torch

    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            return Target("cuda", "cuda", None, "no CUDA device on this machine")
        index = int(os.environ.get("LOCAL_RANK", "0"))
        free, total = torch.cuda.mem_get_info(index)
        known = table_accelerator(torch.cuda.get_device_name(index), total)
        return Target(f"cuda:{index}", "cuda", int(free), f"torch.cuda.mem_get_info on cuda:{index}",
                      peak_flops=known.bf16_flops if known else None)
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return Target("cpu", "cpu", cpu_available(), f"MemAvailable in {MEMINFO}", ranks_here=ranks)


def table_accelerator(device_name: str, total_bytes: int) -> Accelerator | None:
    """The table row of a CUDA device by its name (``NVIDIA H100 80GB HBM3``), or None."""
    if "A100" in device_name:
        return ACCELERATORS["A100-80GB" if total_bytes > 60 * GIB else "A100-40GB"]
    return next((ACCELERATORS[row] for fragment, row in _NAMES if fragment in device_name), None)


def cpu_available() -> int | None:
    """``MemAvailable`` in bytes, or None when it cannot be read."""
    try:
        with open(MEMINFO) as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
