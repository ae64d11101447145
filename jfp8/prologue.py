"""Activation transforms that `jfp8.matmul` can fuse into the matmul's input load.

    y = jfp8.matmul(h, wq_qkv, prologue=jfp8.RMSNorm(norm_weight, eps))  # matmul(rms_norm(h), wq)
    y = jfp8.matmul(gate_up, wq_down, prologue=jfp8.SwiGLU())             # matmul(silu(g) * u, wq)

A decode step runs each of these between two matmuls; as their own XLA launches they cost ~1.3 µs
each, about 10% of an 8B FP8 decode step on an H200. On the Pallas backend the decode kernel
(`pallas_kernels.fp8_gemv`, W8A16) applies them while it loads the activation tile at M = 1; at
2 <= M <= 16 each runs as one launch that also stages the rows to f16 for the kernel
(`pallas_kernels.prologue_stage`); everywhere else they run in XLA first. Either way the numbers
are the formulas below, up to the last f32 bit of an intermediate (the kernel's exp can differ
from XLA's; its sum of squares for 1 / rms adds in another order), which can move an element of
the prologue's bf16 result by one ulp.

Public: `RMSNorm`, `SwiGLU`, `Prologue`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Union

from jfp8.pending import materialize
from pallas_kernels.fp8_gemv import rms_norm_reference, swiglu_reference


@dataclasses.dataclass(frozen=True)
class RMSNorm:
    """HF Llama's RMSNorm of x (..., K): `x * rsqrt(mean(x**2) + eps)` in f32, cast to x.dtype,
    times `weight` (K,) in x.dtype.

    Attributes:
      weight: (K,) array (any float dtype; used in x.dtype).
      eps: added to the mean square.
    """
    weight: Any
    eps: float

    def __call__(self, x):
        x = materialize(x)
        if tuple(self.weight.shape) != (x.shape[-1],):
            raise ValueError(f"RMSNorm.weight: expected shape ({x.shape[-1]},) for x of shape "
                             f"{x.shape}, got {self.weight.shape}")
        return rms_norm_reference(x, self.weight, self.eps)

    def in_features(self, k: int) -> int:
        return k


@dataclasses.dataclass(frozen=True)
class SwiGLU:
    """SwiGLU of x (..., 2F) = [gate | up]: `silu(gate) * up` in f32, rounded once to x.dtype."""

    def __call__(self, x):
        x = materialize(x)
        if x.shape[-1] % 2:
            raise ValueError(f"x: SwiGLU takes (..., 2F) = [gate | up], got last dim {x.shape[-1]}")
        return swiglu_reference(x)

    def in_features(self, k: int) -> int:
        return 2 * k


Prologue = Union[RMSNorm, SwiGLU]
