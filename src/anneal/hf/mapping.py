"""The one correspondence between anneal's Qwen3 and Hugging Face's ``Qwen3ForCausalLM``: names and config.

Pure Python (no torch): the import, the export and the tests all read it from here.

Parameter names: layer internals are the same (``layers.0.self_attn.q_proj.weight``); only the
prefixes differ (``embedding`` / ``model.embed_tokens``, ``final_norm`` / ``model.norm``,
``output_layer`` / ``lm_head``). Config fields: ``MODEL_TO_HF`` pairs each ``model.`` field with its
``config.json`` key; a Hugging Face ``vocab_size`` is the number of embedding rows, padding
included, which is what ``model.vocab_size`` is too.
"""

from __future__ import annotations

from typing import Any

from anneal.config.model import ModelConfig
from anneal.errors import ConfigError

_TOP_LEVEL = {
    "embedding.weight": "model.embed_tokens.weight",
    "final_norm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}
_FROM_HF = {hf: ours for ours, hf in _TOP_LEVEL.items()}

# model.<field> -> config.json key, for every field that fixes the shape or the numbers of the model.
MODEL_TO_HF = {
    "num_layers": "num_hidden_layers",
    "hidden_size": "hidden_size",
    "ffn_hidden_size": "intermediate_size",
    "num_attention_heads": "num_attention_heads",
    "num_query_groups": "num_key_value_heads",
    "kv_channels": "head_dim",
    "vocab_size": "vocab_size",
    "rotary_base": "rope_theta",
    "share_embeddings_and_output_weights": "tie_word_embeddings",
    "layernorm_epsilon": "rms_norm_eps",
}
# config.json settings anneal's Qwen3 does not implement, with the only value it accepts.
_REQUIRED_HF = {"model_type": "qwen3", "hidden_act": "silu", "attention_bias": False}

DTYPE_NAMES = {"torch.float32": "float32", "torch.bfloat16": "bfloat16", "torch.float16": "float16"}


def to_hf_name(name: str) -> str:
    """anneal parameter name -> ``Qwen3ForCausalLM`` parameter name."""
    return _TOP_LEVEL.get(name, f"model.{name}")


def from_hf_name(name: str) -> str | None:
    """``Qwen3ForCausalLM`` parameter name -> anneal's, or None for a name outside the decoder."""
    if name in _FROM_HF:
        return _FROM_HF[name]
    return name.removeprefix("model.") if name.startswith("model.layers.") else None


def model_values(cfg: ModelConfig) -> dict[str, Any]:
    """The resolved value of each ``MODEL_TO_HF`` field (defaults of null fields filled in)."""
    values = {name: getattr(cfg, name) for name in MODEL_TO_HF}
    values["num_query_groups"], values["kv_channels"] = cfg.num_kv_heads, cfg.head_dim
    return values


def hf_values(hf: dict[str, Any]) -> dict[str, Any]:
    """``MODEL_TO_HF``'s keys read from a ``config.json`` (either generation of its RoPE keys)."""
    values = {name: hf.get(key) for name, key in MODEL_TO_HF.items()}
    rope = hf.get("rope_parameters") or {}
    values["rotary_base"] = rope.get("rope_theta", hf.get("rope_theta"))
    if values["num_query_groups"] is None:
        values["num_query_groups"] = hf.get("num_attention_heads")
    if values["kv_channels"] is None and hf.get("hidden_size") and hf.get("num_attention_heads"):
        values["kv_channels"] = hf["hidden_size"] // hf["num_attention_heads"]
    if values["share_embeddings_and_output_weights"] is None:
        values["share_embeddings_and_output_weights"] = True  # PretrainedConfig's default
    return values


def check_model_config(cfg: ModelConfig, hf: dict[str, Any], source: str) -> None:
    """Raise ConfigError naming every ``model.`` field that disagrees with ``source``'s config.json."""
    _check_supported(hf, source)
    if not cfg.qk_layernorm:
        raise ConfigError("model.qk_layernorm (False) must be true to load a Hugging Face Qwen3 checkpoint")
    ours, theirs = model_values(cfg), hf_values(hf)
    diffs = [
        f"model.{name} ({ours[name]!r}) differs from config.json {key} ({theirs[name]!r})"
        for name, key in MODEL_TO_HF.items()
        if not _same(ours[name], theirs[name])
    ]
    if diffs:
        raise ConfigError(f"{'; '.join(diffs)} in {source}")
    limit = hf.get("max_position_embeddings")
    if limit is not None and cfg.seq_length > limit:
        raise ConfigError(
            f"model.seq_length ({cfg.seq_length}) must be <= config.json "
            f"max_position_embeddings ({limit}) in {source}"
        )


def _check_supported(hf: dict[str, Any], source: str) -> None:
    """The architecture settings anneal's Qwen3 implements (and nothing else)."""
    for key, expected in _REQUIRED_HF.items():
        if hf.get(key, expected) != expected:
            raise ConfigError(
                f"checkpoint.pretrained_checkpoint ({source}): config.json {key} "
                f"({hf.get(key)!r}) must be {expected!r} for anneal's Qwen3"
            )
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(
            f"checkpoint.pretrained_checkpoint ({source}): config.json RoPE type "
            f"({rope_type!r}) must be 'default'"
        )


def hf_config(cfg: ModelConfig, dtype: str) -> dict[str, Any]:
    """``config.json`` for ``Qwen3ForCausalLM`` (read by transformers 4.51+ and 5)."""
    values = model_values(cfg)
    out: dict[str, Any] = {"architectures": ["Qwen3ForCausalLM"], **_REQUIRED_HF}
    out.update({key: values[name] for name, key in MODEL_TO_HF.items()})
    out.update({
        "rope_scaling": None, "max_position_embeddings": cfg.seq_length,
        "initializer_range": cfg.init_method_std,
        "attention_dropout": 0.0, "use_sliding_window": False, "sliding_window": None, "use_cache": True,
        "torch_dtype": dtype,
    })  # fmt: skip
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return b is not None and abs(float(a) - float(b)) <= 1e-9 * max(abs(float(a)), 1.0)
    return a == b
