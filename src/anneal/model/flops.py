"""Analytic parameter and FLOP counts for a Qwen3 ``ModelConfig``; pure Python, no torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from anneal.config.model import ModelConfig


def attention_matmul_parameters(cfg: ModelConfig) -> int:
    """Weights of one layer's q, k, v and o projections."""
    q_width = cfg.num_attention_heads * cfg.head_dim
    kv_width = cfg.num_kv_heads * cfg.head_dim
    return 2 * cfg.hidden_size * q_width + 2 * cfg.hidden_size * kv_width


def mlp_matmul_parameters(cfg: ModelConfig) -> int:
    """Weights of one layer's SwiGLU gate, up and down projections."""
    return 3 * cfg.hidden_size * cfg.ffn_hidden_size


def layer_norm_parameters(cfg: ModelConfig) -> int:
    """RMSNorm weights in one layer: two hidden-size norms plus q/k norms over the head dim."""
    qk_norms = 2 * cfg.head_dim if cfg.qk_layernorm else 0
    return 2 * cfg.hidden_size + qk_norms


def num_parameters(cfg: ModelConfig) -> int:
    """Exact parameter count of ``build_model(cfg)``; tied embeddings are counted once."""
    per_layer = attention_matmul_parameters(cfg) + mlp_matmul_parameters(cfg) + layer_norm_parameters(cfg)
    embedding = cfg.vocab_size * cfg.hidden_size
    output_layer = 0 if cfg.share_embeddings_and_output_weights else embedding
    final_norm = cfg.hidden_size
    return embedding + cfg.num_layers * per_layer + final_norm + output_layer


def flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs (forward + backward) per token, the Megatron/PaLM way.

    ``6 * N_matmul + 6 * V * h + 12 * L * S * H * d`` where

    - ``N_matmul = L * (attention q/k/v/o + MLP gate/up/down)`` weights: the decoder's matmul
      parameters, without embedding lookup, output layer and norms; a multiply-add is 2 FLOPs and
      the backward pass costs twice the forward, hence 6;
    - ``V * h`` the output layer, which is a matmul whether or not it is tied to the embedding
      (the embedding lookup itself is not counted);
    - ``12 * L * S * H * d`` the attention scores ``Q K^T`` and context ``softmax · V``: per token
      and layer ``2 * 2 * S * H * d`` forward, times 3 for forward + backward. The causal mask is
      not credited (as in PaLM's MFU), so this counts the full ``S x S`` score matrix.

    Norms, RoPE, softmax and the SwiGLU activation are left out.
    """
    matmul_params = cfg.num_layers * (attention_matmul_parameters(cfg) + mlp_matmul_parameters(cfg))
    output_params = cfg.vocab_size * cfg.hidden_size
    attention = 12 * cfg.num_layers * cfg.seq_length * cfg.num_attention_heads * cfg.head_dim
    return float(6 * matmul_params + 6 * output_params + attention)
