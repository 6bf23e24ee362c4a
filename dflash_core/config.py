"""Model configurations read from Hugging Face `config.json` dictionaries."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_TARGET_TYPES = ("llama", "qwen3", "qwen2", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")
REQUIRED_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
)


class ConfigError(ValueError):
    """A model configuration that this project cannot run correctly."""


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding parameters."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    # Llama 3 frequency-dependent scaling; unused for other rope types.
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> RopeConfig:
        # transformers 5 nests the parameters in `rope_parameters`; older files use
        # `rope_theta` plus an optional `rope_scaling` dictionary.
        params = dict(cfg.get("rope_parameters") or {})
        scaling = cfg.get("rope_scaling") or {}
        params = {**scaling, **params}
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
        rope_type = params.get("rope_type", params.get("type", "default")) or "default"
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"rope type {rope_type!r} is not supported; supported types are "
                f"{', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        return cls(
            theta=float(theta),
            rope_type=rope_type,
            factor=float(params.get("factor", 1.0)),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(
                params.get("original_max_position_embeddings", 8192)
            ),
        )

    def to_hf(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rope_theta": self.theta}
        if self.rope_type != "default":
            out["rope_scaling"] = {
                "rope_type": self.rope_type,
                "factor": self.factor,
                "low_freq_factor": self.low_freq_factor,
                "high_freq_factor": self.high_freq_factor,
                "original_max_position_embeddings": self.original_max_position_embeddings,
            }
        return out


@dataclass(frozen=True)
class DecoderConfig:
    """Shape of a Llama/Qwen3-style decoder stack (target or draft)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before RoPE
    attention_bias: bool = False  # biases on q/k/v projections
    output_bias: bool = False  # bias on o_proj (Llama with attention_bias; never Qwen2)
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    model_type: str = "llama"

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> DecoderConfig:
        model_type = cfg.get("model_type", "llama")
        if model_type not in SUPPORTED_TARGET_TYPES:
            raise ConfigError(
                f"model_type {model_type!r} is not supported; supported types are "
                f"{', '.join(SUPPORTED_TARGET_TYPES)}"
            )
        layer_types = cfg.get("layer_types")
        # Mistral applies `sliding_window` whenever it is set; Qwen configs carry one but only
        # use it with `use_sliding_window`.
        mistral_window = model_type == "mistral" and cfg.get("sliding_window") is not None
        if (
            cfg.get("use_sliding_window")
            or mistral_window
            or (layer_types and any(t != "full_attention" for t in layer_types))
        ):
            raise ConfigError(
                f"sliding-window attention layers ({layer_types or 'use_sliding_window'}) are "
                "not supported; only full-attention models can be loaded"
            )
        missing = [key for key in REQUIRED_KEYS if cfg.get(key) is None]
        if missing:
            raise ConfigError(f"config.json is missing {', '.join(missing)}")
        num_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        return cls(
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(cfg.get("head_dim") or hidden // num_heads),
            vocab_size=int(cfg["vocab_size"]),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope=RopeConfig.from_hf(cfg),
            qk_norm=model_type == "qwen3",
            attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
            output_bias=model_type in ("llama", "mistral") and bool(cfg.get("attention_bias")),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            model_type=model_type,
        )

    def to_hf(self) -> dict[str, Any]:
        return {
            "model_type": self.model_type,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "attention_bias": self.attention_bias,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
            **self.rope.to_hf(),
        }


def read_config_json(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a model folder needs a config.json")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} must contain a JSON object")
    return config
