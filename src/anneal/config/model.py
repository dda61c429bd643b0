"""``model.``: the Qwen3 decoder's shape, with Megatron-Bridge's field names, and its rules.

Pure Python: importing this module does not import torch (the dry run composes configs in well
under a second). The defaults are the ``tiny`` CPU model; every shipped ``conf/model/*.yaml``
sets all fields explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass

from anneal.errors import ConfigError, check_choice

RECOMPUTE_GRANULARITIES = ("full", "selective")  # or None: no recompute
RECOMPUTE_METHODS = ("uniform", "block")

_POSITIVE_INT_FIELDS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "vocab_size",
    "seq_length",
)
_OPTIONAL_POSITIVE_INT_FIELDS = ("num_query_groups", "kv_channels")
_POSITIVE_FLOAT_FIELDS = ("rotary_base", "init_method_std", "layernorm_epsilon")
_BOOL_FIELDS = ("share_embeddings_and_output_weights", "qk_layernorm")


@dataclass
class ModelConfig:
    """A Qwen3 decoder: RMSNorm, GQA attention with RoPE and q/k RMSNorm, SwiGLU MLP, no biases."""

    num_layers: int = 4  # transformer blocks
    hidden_size: int = 256  # width of the residual stream
    ffn_hidden_size: int = 768  # width of the SwiGLU MLP
    num_attention_heads: int = 4  # query heads
    num_query_groups: int | None = 2  # key/value heads; None means num_attention_heads (MHA)
    kv_channels: int | None = 64  # head dim; None means hidden_size // num_attention_heads
    vocab_size: int = 320  # embedding rows; must exceed the data's largest token id
    seq_length: int = 256  # tokens per sample
    rotary_base: float = 1000000.0  # RoPE theta
    share_embeddings_and_output_weights: bool = True  # tied input/output embeddings
    qk_layernorm: bool = True  # per-head RMSNorm on queries and keys
    init_method_std: float = 0.02  # std of the normal weight initialisation
    layernorm_epsilon: float = 1e-6  # RMSNorm epsilon
    # Tokens per chunk of the loss: the output layer and fp32 cross-entropy run chunk by chunk, forward and
    # backward, so [tokens, vocab] fp32 logits never exist (README: Memory). 0: one full-logits pass.
    cross_entropy_chunk_size: int = 0
    # Activation recompute (Megatron's names): null (none), "full" (whole layers, per recompute_method)
    # or "selective" (only the attention core, SDPA, is recomputed in the backward pass).
    recompute_granularity: str | None = None
    recompute_method: str | None = None  # full only: "uniform" (units of recompute_num_layers) or "block"
    # full only: layers per recomputed unit (uniform), or how many first layers are recomputed (block)
    recompute_num_layers: int | None = None
    # Tensor parallel ranks (Megatron's name): q/k/v and gate/up split column-wise, o and down row-wise,
    # over DTensor; the embedding, output layer and norms are replicated. Needs dist.use_torch_fsdp2.
    tensor_model_parallel_size: int = 1

    @property
    def head_dim(self) -> int:
        """``kv_channels``, or ``hidden_size // num_attention_heads`` when it is None."""
        if self.kv_channels is not None:
            return self.kv_channels
        return self.hidden_size // self.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        """``num_query_groups``, or ``num_attention_heads`` when it is None."""
        if self.num_query_groups is not None:
            return self.num_query_groups
        return self.num_attention_heads

    def validate(self) -> None:
        """Raise ConfigError naming the first field that breaks a rule."""
        self._check_types()
        self._check_head_shapes()
        self._check_recompute()
        self._check_tensor_parallel()

    def _check_types(self) -> None:
        for name in _POSITIVE_INT_FIELDS:
            _positive_int(f"model.{name}", getattr(self, name))
        for name in _OPTIONAL_POSITIVE_INT_FIELDS:
            value = getattr(self, name)
            if value is not None:
                _positive_int(f"model.{name}", value)
        for name in _POSITIVE_FLOAT_FIELDS:
            _positive_number(f"model.{name}", getattr(self, name))
        for name in _BOOL_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ConfigError(f"model.{name} ({value!r}) must be true or false")

    def _check_head_shapes(self) -> None:
        if self.num_attention_heads % self.num_kv_heads != 0:
            raise ConfigError(
                f"model.num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"model.num_query_groups ({self.num_query_groups})"
            )
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads != 0:
            raise ConfigError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by "
                f"model.num_attention_heads ({self.num_attention_heads}) when model.kv_channels is null"
            )
        if self.head_dim % 2 != 0:
            raise ConfigError(
                f"model.kv_channels ({self.kv_channels}) must give an even head dim for RoPE, "
                f"got {self.head_dim}"
            )

    def _check_recompute(self) -> None:
        granularity, method, n = self.recompute_granularity, self.recompute_method, self.recompute_num_layers
        if granularity is not None:
            check_choice("model.recompute_granularity", granularity, RECOMPUTE_GRANULARITIES)
        if granularity != "full":
            for name, value in (("recompute_method", method), ("recompute_num_layers", n)):
                if value is not None:
                    raise ConfigError(f"model.{name} ({value!r}) needs model.recompute_granularity 'full', "
                                      f"not {granularity!r}; leave it null otherwise")
            return
        if method is None:
            choices = ", ".join(map(repr, RECOMPUTE_METHODS))
            raise ConfigError(f"model.recompute_method (None) must be one of {choices} "
                              "when model.recompute_granularity is 'full'")
        check_choice("model.recompute_method", method, RECOMPUTE_METHODS)
        if n is None or not 1 <= n <= self.num_layers:
            raise ConfigError(f"model.recompute_num_layers ({n!r}) must be in [1, model.num_layers "
                              f"({self.num_layers})] when model.recompute_granularity is 'full'")


    def _check_tensor_parallel(self) -> None:
        tp = self.tensor_model_parallel_size
        _positive_int("model.tensor_model_parallel_size", tp)
        for name, value in (("num_attention_heads", self.num_attention_heads),
                            ("num_query_groups", self.num_kv_heads), ("ffn_hidden_size", self.ffn_hidden_size)):
            if value % tp:
                raise ConfigError(f"model.{name} ({value}) must be divisible by model.tensor_model_parallel_size "
                                  f"({tp}): each tensor-parallel rank holds an equal share")


def _positive_int(path: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{path} ({value!r}) must be a positive integer")


def _positive_number(path: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{path} ({value!r}) must be > 0")
