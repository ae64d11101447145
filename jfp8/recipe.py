"""Recipes: which formats and granularities a model's weights, activations and gradients use.

Pick one by the job:

    Recipe.block128()      inference default. Weights per 128×128 block, activations per 1×128 token
                           group (DeepSeek-V3 / DeepGEMM). Best accuracy: an outlier only costs its
                           own block. W8A8: FP8 tensor cores for prefill.
    Recipe.rowwise()       weights per output channel, activations per token. Cheap scales, good
                           accuracy; the compressed-tensors "FP8 dynamic" layout.
    Recipe.per_tensor()    one scale per tensor (weights and activations). The simplest and the
                           fastest on cuBLASLt, the most fragile with outliers.
    Recipe.weights_only()  FP8 weights, BF16 activations (W8A16): halves weight bytes for decode,
                           activations exact. Granularity per channel by default.
    Recipe.delayed()       training: per-tensor E4M3 forward, E5M2 gradients, scales from an amax
                           history (TransformerEngine's delayed scaling).

`keep_high_precision` (regexes on '/'-joined parameter paths) names what stays BF16: norms,
embeddings, routers and the lm_head by default. `overrides` maps path regexes to a different
weight granularity, or to None to keep that layer in high precision (per-layer fallback).
"""
from __future__ import annotations

import dataclasses
import re

from jfp8.formats import E4M3, E5M2, Format, as_format
from jfp8.scaling import Granularity, PerBlock, PerChannel, PerTensor, as_granularity

DEFAULT_KEEP_HIGH_PRECISION = (r"norm", r"embed", r"router", r"gate_logits", r"lm_head", r"wte", r"wpe")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How to quantize a model.

    Attributes:
      name: short name ("block128", "rowwise", ...), used by the CLI and saved checkpoints.
      weight_format, weight_granularity: weights, granularity over the (N, K) = (out, in) layout.
      act_format, act_granularity: activations (M, K); None for weights-only (W8A16).
      grad_format: format of output gradients in training (E5M2: range over precision).
      scaling: "current" (each call's own amax) or "delayed" (amax history, training).
      amax_history: length of the delayed-scaling history.
      margin: headroom in powers of two for delayed scaling.
      keep_high_precision: path regexes kept in BF16.
      overrides: ((path regex, Granularity or None), ...); first match wins; None keeps BF16.
    """

    name: str = "block128"
    weight_format: Format = E4M3
    weight_granularity: Granularity = PerBlock((128, 128))
    act_format: Format | None = E4M3
    act_granularity: Granularity | None = PerBlock((1, 128))
    grad_format: Format = E5M2
    scaling: str = "current"
    amax_history: int = 1024
    margin: int = 0
    keep_high_precision: tuple[str, ...] = DEFAULT_KEEP_HIGH_PRECISION
    overrides: tuple[tuple[str, Granularity | None], ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "weight_format", as_format(self.weight_format))
        object.__setattr__(self, "grad_format", as_format(self.grad_format))
        as_granularity(self.weight_granularity)
        if (self.act_format is None) != (self.act_granularity is None):
            raise ValueError("act_format and act_granularity: give both (W8A8) or neither (W8A16)")
        if self.act_format is not None:
            object.__setattr__(self, "act_format", as_format(self.act_format))
            as_granularity(self.act_granularity)
        if self.scaling not in ("current", "delayed"):
            raise ValueError(f"scaling: expected 'current' or 'delayed', got {self.scaling!r}")
        if int(self.amax_history) < 1:
            raise ValueError(f"amax_history: expected >= 1, got {self.amax_history}")
        object.__setattr__(self, "keep_high_precision", tuple(self.keep_high_precision))
        object.__setattr__(self, "overrides", tuple((str(p), g) for p, g in self.overrides))
        for _, g in self.overrides:
            if g is not None:
                as_granularity(g)

    # -- presets -------------------------------------------------------------------------------
    @classmethod
    def block128(cls, **kw) -> "Recipe":
        return cls(**{"name": "block128", **kw})

    @classmethod
    def rowwise(cls, **kw) -> "Recipe":
        return cls(**{"name": "rowwise", "weight_granularity": PerChannel(0),
                      "act_granularity": PerChannel(0), **kw})

    @classmethod
    def per_tensor(cls, **kw) -> "Recipe":
        return cls(**{"name": "per_tensor", "weight_granularity": PerTensor(),
                      "act_granularity": PerTensor(), **kw})

    @classmethod
    def weights_only(cls, granularity: Granularity = PerChannel(0), **kw) -> "Recipe":
        name = {PerChannel: "weights_only", PerBlock: "weights_only_block128",
                PerTensor: "weights_only_tensor"}[type(granularity)]
        return cls(**{"name": name, "weight_granularity": granularity, "act_format": None,
                      "act_granularity": None, **kw})

    @classmethod
    def delayed(cls, history: int = 1024, margin: int = 0, **kw) -> "Recipe":
        return cls(**{"name": "delayed", "weight_granularity": PerTensor(),
                      "act_granularity": PerTensor(), "scaling": "delayed",
                      "amax_history": history, "margin": margin, **kw})

    @classmethod
    def from_name(cls, name: str) -> "Recipe":
        """A preset by name; `NAME+head` is that preset with the lm_head quantized too (removed
        from `keep_high_precision`; a tied model gets an FP8 copy of its embedding as the head)."""
        presets = {"block128": cls.block128, "rowwise": cls.rowwise, "per_tensor": cls.per_tensor,
                   "weights_only": cls.weights_only, "delayed": cls.delayed,
                   "weights_only_block128": lambda: cls.weights_only(PerBlock((128, 128)))}
        base, head = (name[:-len("+head")], True) if name.endswith("+head") else (name, False)
        if base not in presets:
            raise ValueError(f"recipe: expected one of {sorted(presets)}, optionally with '+head' "
                             f"(lm_head in FP8 too), got {name!r}")
        recipe = presets[base]()
        if head:
            recipe = dataclasses.replace(recipe, name=name, keep_high_precision=tuple(
                p for p in recipe.keep_high_precision if p != "lm_head"))
        return recipe

    # -- path rules ----------------------------------------------------------------------------
    def weight_granularity_for(self, path: str) -> Granularity | None:
        """The weight granularity for a parameter path, or None to keep it in high precision."""
        for pattern, granularity in self.overrides:
            if re.search(pattern, path):
                return granularity
        if any(re.search(p, path) for p in self.keep_high_precision):
            return None
        return self.weight_granularity

    @property
    def weights_only_mode(self) -> bool:
        return self.act_format is None
