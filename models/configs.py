"""Llama-family model configs: one frozen dataclass, presets, and the HF config.json reader.

`CONFIGS[name]` holds the shapes of published models (random-weight benchmarks and tests use them
without a checkpoint); `LlamaConfig.from_hf(config_dict)` reads a Hugging Face `config.json` of the
Llama, Mistral or Qwen2 architecture. Everything else about a model (weights, recipe, KV-cache dtype)
lives outside the config.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

# HF `model_type` values whose decoder is exactly ours (RMSNorm, RoPE, GQA, SwiGLU).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shapes and numerics constants of a Llama-family decoder.

    Attributes:
      vocab_size: V, rows of the token embedding.
      hidden_size: model width d.
      intermediate_size: SwiGLU MLP width F.
      num_layers: decoder layers L.
      num_heads: query heads Hq.
      num_kv_heads: key/value heads Hkv (GQA group G = Hq // Hkv).
      head_dim: D per head (HF default hidden_size // num_heads).
      rms_norm_eps: epsilon inside RMSNorm.
      rope_theta: RoPE base frequency.
      rope_scaling: None, or a tuple of (key, value) pairs of HF's `rope_scaling` with
        rope_type "llama3" (factor, low_freq_factor, high_freq_factor,
        original_max_position_embeddings). Stored as a tuple so the config stays hashable.
      max_position_embeddings: longest context the model was trained for.
      tie_word_embeddings: lm_head reuses the token embedding (Llama-3.2-1B, Qwen2.5-0.5B).
      qkv_bias: q/k/v projections carry a bias (Qwen2).
      o_bias: output projection carries a bias (Llama `attention_bias=True`).
      mlp_bias: gate/up/down projections carry biases (Llama `mlp_bias=True`).
      sliding_window: Mistral-v0.1 style window, or None. Not implemented as a mask: sequences
        longer than the window are refused by `models.generate`.
      model_type: HF model_type ("llama", "mistral", "qwen2").
      bos_token_id, eos_token_ids: special tokens from config.json (eos may be several).
    """
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads: expected a divisor of num_heads={self.num_heads}, "
                             f"got {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim: expected an even number (RoPE rotates pairs), got {self.head_dim}")
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type: expected one of {SUPPORTED_MODEL_TYPES}, got {self.model_type!r}")
        if self.rope_scaling is not None:
            kind = dict(self.rope_scaling).get("rope_type")
            if kind != "llama3":
                raise ValueError(f"rope_scaling: expected rope_type 'llama3' or no scaling, got {kind!r}")

    @property
    def group_size(self) -> int:
        """G = Hq // Hkv query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    def num_params(self) -> int:
        """Parameter count (embedding counted once when tied)."""
        d, f, D = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * D * (self.num_heads * 2 + self.num_kv_heads * 2)
        attn += (self.num_heads + 2 * self.num_kv_heads) * D if self.qkv_bias else 0
        attn += d if self.o_bias else 0
        mlp = 3 * d * f + ((2 * f + d) if self.mlp_bias else 0)
        per_layer = attn + mlp + 2 * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.num_layers * per_layer + self.vocab_size * d + head + d

    def kv_bytes_per_token(self, bytes_per_elem: float = 2.0) -> float:
        """K and V bytes one cached token takes over all layers (scales not counted)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * bytes_per_elem

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> "LlamaConfig":
        """Build a config from a Hugging Face config.json dict (llama, mistral or qwen2).

        Raises ValueError naming the field for unsupported architectures or options.
        """
        if not isinstance(config, Mapping):
            raise TypeError(f"config: expected a dict read from config.json, got {type(config).__name__}")
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = config.get("architectures")
            raise ValueError(f"config.json model_type: expected one of {SUPPORTED_MODEL_TYPES}, got "
                             f"{model_type!r} (architectures={archs})")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"):
            if key not in config:
                raise ValueError(f"config.json: missing required field {key!r}")
        if config.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json hidden_act: expected 'silu' (SwiGLU), got {config['hidden_act']!r}")
        heads = int(config["num_attention_heads"])
        kv_heads = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        rs = config.get("rope_scaling")
        rope_theta = config.get("rope_theta", 10000.0)
        rp = config.get("rope_parameters")  # transformers v5 keeps theta and scaling here
        if isinstance(rp, Mapping):
            rope_theta = rp.get("rope_theta", rope_theta)
            if rp.get("rope_type", "default") != "default":
                rs = rp
        rope_scaling = None
        if rs:
            kind = rs.get("rope_type", rs.get("type"))
            if kind in ("default", None):
                rope_scaling = None
            elif kind == "llama3":
                rope_scaling = tuple(sorted(
                    (k, float(rs[k]) if k != "original_max_position_embeddings" else int(rs[k]))
                    for k in ("factor", "low_freq_factor", "high_freq_factor",
                              "original_max_position_embeddings")))
                rope_scaling = (("rope_type", "llama3"),) + rope_scaling
            else:
                raise ValueError(f"config.json rope_scaling: expected rope_type 'llama3' or 'default', "
                                 f"got {kind!r}")
        window = config.get("sliding_window")
        if model_type == "qwen2" and not config.get("use_sliding_window", False):
            window = None
        eos = config.get("eos_token_id")
        eos_ids = () if eos is None else tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
        attention_bias = bool(config.get("attention_bias", False))
        return cls(
            vocab_size=int(config["vocab_size"]),
            hidden_size=int(config["hidden_size"]),
            intermediate_size=int(config["intermediate_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(kv_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6 if model_type == "qwen2" else 1e-5)),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(config.get("max_position_embeddings", 8192)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=(model_type == "qwen2") or attention_bias,
            o_bias=attention_bias and model_type != "qwen2",
            mlp_bias=bool(config.get("mlp_bias", False)),
            sliding_window=int(window) if window else None,
            model_type=model_type,
            bos_token_id=config.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    def to_hf(self) -> dict[str, Any]:
        """The config.json dict transformers would write for this config (tests and saves use it)."""
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM"}[self.model_type]
        out = {
            "architectures": [arch], "model_type": self.model_type,
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta, "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings, "hidden_act": "silu",
            "rope_scaling": self.rope_scaling_dict,
        }
        if self.model_type == "llama":
            out["attention_bias"] = self.o_bias
            out["mlp_bias"] = self.mlp_bias
        if self.sliding_window is not None:
            out["sliding_window"] = self.sliding_window
            if self.model_type == "qwen2":
                out["use_sliding_window"] = True
        if self.bos_token_id is not None:
            out["bos_token_id"] = self.bos_token_id
        if self.eos_token_ids:
            out["eos_token_id"] = (list(self.eos_token_ids) if len(self.eos_token_ids) > 1
                                   else self.eos_token_ids[0])
        return out


def _llama3_scaling(factor: float) -> tuple[tuple[str, Any], ...]:
    return (("rope_type", "llama3"), ("factor", factor), ("high_freq_factor", 4.0),
            ("low_freq_factor", 1.0), ("original_max_position_embeddings", 8192))


CONFIGS: dict[str, LlamaConfig] = {
    # CPU tests and `jfp8 demo`: every width a multiple of 128 so 128x128 weight blocks are whole.
    "tiny": LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=768, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=64, rope_theta=10000.0,
                        max_position_embeddings=2048, bos_token_id=1, eos_token_ids=(2,)),
    "llama3.2-1b": LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                               num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
                               rope_theta=500000.0, rope_scaling=_llama3_scaling(32.0),
                               max_position_embeddings=131072, tie_word_embeddings=True,
                               bos_token_id=128000, eos_token_ids=(128001, 128008, 128009)),
    "llama3.1-8b": LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                               num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                               rope_theta=500000.0, rope_scaling=_llama3_scaling(8.0),
                               max_position_embeddings=131072,
                               bos_token_id=128000, eos_token_ids=(128001, 128008, 128009)),
    "qwen2.5-0.5b": LlamaConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64,
                                rms_norm_eps=1e-6, rope_theta=1000000.0,
                                max_position_embeddings=32768, tie_word_embeddings=True,
                                qkv_bias=True, model_type="qwen2",
                                bos_token_id=151643, eos_token_ids=(151643,)),
    "qwen2.5-7b": LlamaConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                              num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128,
                              rms_norm_eps=1e-6, rope_theta=1000000.0,
                              max_position_embeddings=32768, qkv_bias=True, model_type="qwen2",
                              bos_token_id=151643, eos_token_ids=(151643,)),
    # Mistral-7B-v0.3 (no sliding window, 32768 vocab).
    "mistral-7b": LlamaConfig(vocab_size=32768, hidden_size=4096, intermediate_size=14336,
                              num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                              rope_theta=1000000.0, max_position_embeddings=32768,
                              model_type="mistral", bos_token_id=1, eos_token_ids=(2,)),
    "smollm2-135m": LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                                rope_theta=100000.0, max_position_embeddings=8192,
                                tie_word_embeddings=True, bos_token_id=0, eos_token_ids=(0,)),
}
CONFIGS["llama3-8b"] = CONFIGS["llama3.1-8b"]  # the name DESIGN.md uses


def get_config(name: str) -> LlamaConfig:
    """Preset by name; ValueError listing the presets otherwise."""
    if name not in CONFIGS:
        raise ValueError(f"config name: expected one of {sorted(CONFIGS)}, got {name!r}")
    return CONFIGS[name]


def rope_inv_freq(cfg: LlamaConfig):
    """RoPE inverse frequencies (D/2,) as float64 numpy, with Llama-3 scaling when configured."""
    import numpy as np
    D = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, D, 2, dtype=np.float64) / D))
    rs = cfg.rope_scaling_dict
    if rs is None:
        return inv
    factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old = rs["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / lo, old / hi
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled)
