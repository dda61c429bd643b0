"""The Qwen3 decoder in plain PyTorch, numerically matching Hugging Face's ``Qwen3ForCausalLM``.

Per layer: RMSNorm -> attention (q/k/v/o without bias, per-head RMSNorm on q and k, RoPE, causal
grouped-query SDPA: ``causal_attention``) -> residual; RMSNorm -> SwiGLU MLP -> residual. Then a final
RMSNorm and the output layer, which reuses the embedding weight when the two are tied (there is then no
``output_layer`` parameter, as in Megatron).

Parameter names (``embedding.weight``, ``layers.0.self_attn.q_norm.weight``,
``layers.0.input_layernorm.weight``, ``final_norm.weight``, ``output_layer.weight``) follow
Hugging Face's within a layer, so checkpoints convert by renaming a few prefixes, and are easy to
match with Megatron-style param-group rules: every norm ends in ``norm.weight``.

``model(tokens)`` returns logits; ``model(tokens, labels=labels)`` returns the mean loss, computed
inside the forward so that wrappers (FSDP, compile) see one call: chunked over tokens when
``model.cross_entropy_chunk_size`` is set (``anneal.model.loss``), with activation recompute per
``model.recompute_*`` (``anneal.model.recompute``); ``reduction`` sums it or keeps it per token, and
labels equal to ``IGNORE_INDEX`` count nowhere.

Packed documents (``anneal.model.documents``): ``position_ids [b, s]`` gathers each row's RoPE angles;
``document_ids [b, s]`` restricts attention to earlier tokens of the same document. The mask is built
once per forward, outside the (compiled, recomputed) blocks, and every layer gets it: a ``BlockMask``
for flex_attention on CUDA, an additive ``[b, 1, s, s]`` tensor for SDPA on CPU
(``anneal.devices.document_attention_kernel`` says why). Both broadcast over heads, so under tensor
parallel each rank's heads / TP heads use it as they are.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from anneal.config.model import ModelConfig
from anneal.devices import attention_kernel, document_attention_kernel
from anneal.model.loss import linear_cross_entropy
from anneal.model.recompute import maybe_recompute, recompute_units

# Output projections of each residual branch get std / sqrt(2 * num_layers), as in Megatron.
_SCALED_INIT_SUFFIXES = ("o_proj.weight", "down_proj.weight")
# Attention input dtypes by the names anneal.devices.attention_kernel takes.
_PRECISIONS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}

# What restricts attention besides causality: nothing, an additive mask for SDPA, or flex's BlockMask.
AttentionMask = torch.Tensor | BlockMask | None


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32, scaled by a learned weight (initialised to 1)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)  # cast back before the weight, as Hugging Face does


def rotary_cos_sin(
    seq_len: int, head_dim: int, base: float, *, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables ``[seq_len, head_dim]`` in Hugging Face's layout: frequencies repeated twice."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
    inv_freq = 1.0 / (base**exponents)
    positions = torch.arange(seq_len, dtype=torch.float32, device=device)
    angles = torch.outer(positions, inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotary_for_positions(cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor | None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The tables as attention takes them: ``[s, d]`` as they are, or gathered per row ``[b, 1, s, d]``.

    Row ``p`` of a table depends only on ``p``, so a document restarted at position 0 sees exactly the
    angles it would see alone; the ``1`` broadcasts over heads (all of them, or a TP rank's).
    """
    if position_ids is None:
        return cos, sin
    return cos[position_ids].unsqueeze(1), sin[position_ids].unsqueeze(1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dim (Hugging Face's rotate_half convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [batch, heads, seq, head_dim]`` by the position-wise angles in ``cos``/``sin``."""
    return x * cos + rotate_half(x) * sin


def expands_kv(dtype: torch.dtype, device_type: str, gqa: bool) -> bool:
    """Whether attention repeats each K/V head over its query group before SDPA, instead of ``enable_gqa``.

    Under grouped queries, when the kernel that runs is the memory-efficient one (fp32 on CUDA, as
    ``anneal.devices.attention_kernel`` says): it rejects ``enable_gqa``, and SDPA would fall back to the
    math kernel, which stores every ``[b, heads, s, s]`` score matrix.
    """
    return gqa and attention_kernel(_PRECISIONS[dtype], device_type) == "efficient"


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, device_type: str) -> torch.Tensor:
    """Causal SDPA of ``q [b, heads, s, d]`` over ``k``, ``v [b, kv_heads, s, d]`` as run on ``device_type``.

    The model passes its tensors' device type; a test passes ``"cuda"`` to run CUDA's fp32 path on CPU.
    """
    group = q.shape[1] // k.shape[1]  # query heads per K/V head
    expand = expands_kv(q.dtype, device_type, group > 1)
    if expand:  # K/V head j serves query heads j·group to j·group + group - 1, as enable_gqa pairs them
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=group > 1 and not expand)


def document_mask(document_ids: torch.Tensor, dtype: torch.dtype, kernel: str) -> torch.Tensor | BlockMask:
    """Causal ∧ same-document attention for ``document_ids [b, s]``, as ``kernel`` takes it (built once).

    ``flex_attention``: a ``BlockMask`` (a few int32 block tables, ``b × (s/128)²``), made by
    ``create_block_mask`` compiled on accelerators, so the dense mask is never materialised (eager, on CPU,
    it is, transiently). ``sdpa+mask``: an additive ``[b, 1, s, s]`` mask in the attention ``dtype``, 0 where
    a token may look and -inf elsewhere: SDPA keeps it by reference for the backward, one for all layers
    (a boolean mask would be converted again, and kept, in every layer).
    """
    if kernel == "flex_attention":
        def same_document_causal(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (document_ids[b, q_idx] == document_ids[b, kv_idx])

        batch, seq_len = document_ids.shape
        make = create_block_mask if document_ids.device.type == "cpu" else _compiled(create_block_mask)
        return make(same_document_causal, batch, None, seq_len, seq_len, device=document_ids.device)
    allowed = (document_ids[:, :, None] == document_ids[:, None, :]).tril_()  # [b, s, s]; a row sees itself
    zero = torch.zeros((), dtype=dtype, device=document_ids.device)
    return torch.where(allowed, zero, zero - math.inf).unsqueeze(1)


def document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | BlockMask,
                       device_type: str) -> torch.Tensor:
    """Attention of ``q [b, heads, s, d]`` over ``k``, ``v [b, kv_heads, s, d]`` under a ``document_mask``.

    Grouped queries go to the kernel as they are (``enable_gqa``): flex takes them natively, SDPA's
    flash kernel for CPU too. flex_attention is compiled on ``device_type``s other than CPU, as PyTorch
    requires for its fused kernel; on CPU it runs eagerly (unfused: tests on small sizes).
    """
    gqa = q.shape[1] != k.shape[1]
    if isinstance(mask, BlockMask):
        flex = flex_attention if device_type == "cpu" else _compiled(flex_attention)
        return flex(q, k, v, block_mask=mask, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask,
              device_type: str) -> torch.Tensor:
    """The attention core: causal SDPA without a mask (``causal_attention``), else ``document_attention``."""
    if mask is None:
        return causal_attention(q, k, v, device_type)
    return document_attention(q, k, v, mask, device_type)


@functools.cache
def _compiled(function):
    """``torch.compile(function)``, made once, on first use (compiling imports dynamo: not at import)."""
    return torch.compile(function)


class Attention(nn.Module):
    """Causal grouped-query attention with optional per-head q/k RMSNorm and RoPE."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        q_width = cfg.num_attention_heads * self.head_dim
        kv_width = cfg.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, q_width, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_width, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_width, bias=False)
        self.o_proj = nn.Linear(q_width, cfg.hidden_size, bias=False)
        has_qk_norm = cfg.qk_layernorm
        self.q_norm = RMSNorm(self.head_dim, cfg.layernorm_epsilon) if has_qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.layernorm_epsilon) if has_qk_norm else None
        self.recompute_core = cfg.recompute_granularity == "selective"  # recompute SDPA in the backward

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: AttentionMask = None) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        # -1 heads: under tensor parallel each rank holds heads / TP of them (anneal.parallelize).
        q = self.q_proj(x).view(batch, seq_len, -1, self.head_dim)
        k = self.k_proj(x).view(batch, seq_len, -1, self.head_dim)
        v = self.v_proj(x).view(batch, seq_len, -1, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [batch, heads, seq, dim]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        context = maybe_recompute(self.recompute_core, attention, q, k, v, mask, x.device.type)
        return self.o_proj(context.transpose(1, 2).reshape(batch, seq_len, -1))


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` without biases."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.down_proj = nn.Linear(ffn_hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm residual block: attention, then MLP."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.layernorm_epsilon)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.layernorm_epsilon)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.ffn_hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: AttentionMask = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3Model(nn.Module):
    """Token ids ``[batch, seq]`` -> logits ``[batch, seq, vocab_size]``, or the loss given labels."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # An explicit weight skips nn.Embedding's default normal_ init, which on the meta device
        # imports torch._dynamo (about 2 s); init_weights() initialises it on the real device.
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                      _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.layernorm_epsilon)
        tied = cfg.share_embeddings_and_output_weights
        self.output_layer = None if tied else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        full = cfg.recompute_granularity == "full"
        self.units = recompute_units(cfg.num_layers, cfg.recompute_method if full else None,
                                     cfg.recompute_num_layers)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, document_ids: torch.Tensor | None = None,
                reduction: str = "mean") -> torch.Tensor:
        """Logits ``[batch, seq, vocab]``; with ``labels [batch, seq]``, the cross-entropy instead.

        ``position_ids [batch, seq]``: each token's RoPE position (default ``0 .. seq - 1`` in every row);
        ``document_ids [batch, seq]``: attend only within the same document (``anneal.model.documents``);
        ``reduction``: ``mean``, ``sum`` or ``none`` over the labels not ``IGNORE_INDEX``
        (``anneal.model.loss``).
        """
        x = self.embedding(input_ids)
        cos, sin = rotary_cos_sin(
            input_ids.shape[1], self.cfg.head_dim, self.cfg.rotary_base, device=x.device, dtype=x.dtype
        )
        cos, sin = rotary_for_positions(cos, sin, position_ids)
        mask = None
        if document_ids is not None:  # once per forward, outside the blocks (compiled or recomputed)
            kernel = document_attention_kernel(_PRECISIONS[x.dtype], x.device.type)
            mask = document_mask(document_ids, x.dtype, kernel)
        for start, stop, recompute in self.units:
            x = maybe_recompute(recompute, self._run_layers, start, stop, x, cos, sin, mask)
        x = self.final_norm(x)
        output_weight = self.embedding.weight if self.output_layer is None else self.output_layer.weight
        if labels is None:
            return F.linear(x, output_weight)
        return linear_cross_entropy(x, output_weight, labels, self.cfg.cross_entropy_chunk_size, reduction)

    def _run_layers(self, start: int, stop: int, x: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor, mask: AttentionMask = None) -> torch.Tensor:
        for layer in self.layers[start:stop]:
            x = layer(x, cos, sin, mask)
        return x

    @torch.no_grad()
    def init_weights(self, prefix: str = "") -> None:
        """Megatron's init: N(0, std) weights, residual outputs N(0, std / sqrt(2 L)), norms 1.

        ``prefix`` initialises only the parameters whose names start with it, drawing from the RNG as
        the whole model would at that point: initialising the parts in ``named_parameters`` order gives
        the same weights as one call (``anneal.parallelize.build_parallel_model`` relies on it).
        """
        std = self.cfg.init_method_std
        scaled_std = std / math.sqrt(2.0 * self.cfg.num_layers)
        for name, param in self.named_parameters():
            if not name.startswith(prefix):
                continue
            if name.endswith("norm.weight"):
                nn.init.ones_(param)
            elif name.endswith(_SCALED_INIT_SUFFIXES):
                nn.init.normal_(param, mean=0.0, std=scaled_std)
            else:
                nn.init.normal_(param, mean=0.0, std=std)


def build_model(
    cfg: ModelConfig,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Qwen3Model:
    """Build and initialise a Qwen3 model; on ``device="meta"`` nothing is allocated or initialised.

    The modules are always created on the meta device first, then materialised once on
    ``device`` (the default device when None) and initialised in place, so no memory is spent on
    PyTorch's default init. ``dtype`` (default: torch's default dtype) applies to every parameter.
    """
    cfg.validate()
    with torch.device("meta"):
        model = Qwen3Model(cfg)
    if dtype is not None:
        model.to(dtype=dtype)
    target = torch.device(device) if device is not None else torch.get_default_device()
    if target.type != "meta":
        model.to_empty(device=target)
        model.init_weights()
    return model
