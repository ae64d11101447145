"""RMSNorm and f16 staging of decode rows in one launch (2 <= M <= 16, W8A16 decode matmuls).

    rows, scales = rms_norm_stage_f16(x, weight, eps)
    ==  fp8_gemv.stage_f16_rows(fp8_gemv.rms_norm_reference(x, weight, eps))

x (M, K) bf16 / f16 -> rows (M, K) float16 and scales (M, 1) float32 with
rms_norm(x) ~ rows * scales: the RMSNorm as HF Llama computes it (f32, rounded to x.dtype, times
the weight in x.dtype), then each row times the power of two 2^-e that puts its finite amax in
[2^14, 2^15) (e = 0 for an all-zero row), rounded to f16 (exact for the row's values down to
amax * 2^-31; `stage_f16_rows` says why). `fp8_gemv` then multiplies f16 operands.

Why a kernel: XLA runs the norm as two launches (the sum of squares, then the scaling) and the
staging as two more (the row amax, then the scaling and cast), ~1.5-2.5 µs each inside a decode
step; here one program per row does all of it (a row of an 8B model is 8 KB), one launch.

Numerics: the same formulas in f32. The sum of squares adds in another order than XLA's
reduction, so 1 / rms can differ in its last f32 bit and an element of the norm's bf16 result by
one ulp (as for the fused prologue of `fp8_gemv`, `jfp8.prologue`); given the same norm output
the staging is exact (a power-of-two scaling, then one rounding to f16).

Public: `rms_norm_stage_f16`, `rms_norm_stage_f16_reference`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import triton_compat
from pallas_kernels.fp8_gemv import ACT_DTYPES, rms_norm_reference, stage_f16_rows

__all__ = ["rms_norm_stage_f16", "rms_norm_stage_f16_reference", "MAX_M"]

#: Rows per call: the decode batch sizes whose matmuls take staged f16 rows.
MAX_M = 16
_F32_MIN_NORMAL = 2.0 ** -126


def _pow2(n):
    """2^n as f32 for an int32 n in [-126, 127] (built from its exponent bits: exact)."""
    return lax.bitcast_convert_type((n + 127) << 23, jnp.float32)


def _floor_log2(a):
    """floor(log2(a)) for f32 a > 0 (subnormals included), from the exponent bits."""
    sub = a < _F32_MIN_NORMAL
    a = jnp.where(sub, a * 2.0 ** 64, a)
    biased = (lax.bitcast_convert_type(a, jnp.int32) >> 23) & 0xFF
    return biased - 127 - jnp.where(sub, 64, 0)


def _ldexp(x, n):
    """x * 2^n in f32 for int32 n in [-252, 254], as two exact power-of-two multiplies (a single
    2^n would leave f32's range); rounds once, where the result is subnormal or overflows."""
    half = n >> 1
    return x * _pow2(half) * _pow2(n - half)


def _kernel(x_ref, w_ref, rows_ref, scale_ref, *, k: int, k_pad: int, eps: float):
    row = pl.program_id(0)
    cols = jnp.arange(k_pad)[None, :]
    mask = (cols < k) if k_pad != k else None
    x = triton_compat.load(x_ref.at[pl.ds(row, 1), pl.ds(0, k_pad)], mask, 0.0)
    w = triton_compat.load(w_ref.at[pl.ds(0, 1), pl.ds(0, k_pad)], mask, 0.0)
    xf = x.astype(jnp.float32)
    inv_rms = lax.rsqrt(jnp.sum(xf * xf, axis=1, keepdims=True) / k + eps)       # (1, 1)
    y = (xf * inv_rms).astype(x.dtype)
    y = (y.astype(jnp.float32) * w.astype(x.dtype).astype(jnp.float32)).astype(x.dtype)
    yf = y.astype(jnp.float32)
    a = jnp.abs(yf)
    amax = jnp.max(jnp.where(a < jnp.inf, a, 0.0), axis=1, keepdims=True)      # finite amax
    e = jnp.where(amax > 0, _floor_log2(jnp.where(amax > 0, amax, 1.0)) - 14, 0)
    triton_compat.store(rows_ref.at[pl.ds(row, 1), pl.ds(0, k_pad)],
                        _ldexp(yf, -e).astype(jnp.float16), mask)
    scale_ref[pl.ds(row, 1), pl.ds(0, 1)] = _ldexp(jnp.ones_like(amax), e)


def _check(x, weight):
    if not hasattr(x, "shape") or len(x.shape) != 2:
        raise ValueError(f"x: expected a 2-D (M, K) array, got shape {getattr(x, 'shape', None)}")
    m, k = x.shape
    if not 1 <= m <= MAX_M:
        raise ValueError(f"x: expected 1 <= M <= {MAX_M} rows (decode batches), got M={m}")
    if jnp.dtype(x.dtype) not in ACT_DTYPES:
        raise TypeError(f"x: expected bfloat16 or float16 activations, got {x.dtype}")
    if not hasattr(weight, "shape") or tuple(weight.shape) != (k,):
        raise ValueError(f"weight: expected shape ({k},), got {getattr(weight, 'shape', None)}")


def rms_norm_stage_f16(x, weight, eps: float, *, interpret: bool = False):
    """(rows (M, K) float16, scales (M, 1) float32) = staged RMSNorm of x (M, K) bf16 / f16 with
    weight (K,) (any float dtype, used in x.dtype) and eps; one Pallas launch, one program per
    row. See the module docstring for the numerics."""
    _check(x, weight)
    return _rms_norm_stage_jit(x, weight, eps=float(eps), interpret=interpret)


@functools.partial(jax.jit, static_argnames=("eps", "interpret"))
def _rms_norm_stage_jit(x, weight, *, eps, interpret):
    m, k = x.shape
    k_pad = pl.next_power_of_2(k)
    kw = dict(interpret=True) if interpret else triton_compat.compiler_params(num_warps=4,
                                                                              num_stages=1)
    return pl.pallas_call(
        functools.partial(_kernel, k=k, k_pad=k_pad, eps=eps), grid=(m,),
        out_shape=[jax.ShapeDtypeStruct((m, k), jnp.float16),
                   jax.ShapeDtypeStruct((m, 1), jnp.float32)],
        name="jfp8_rms_norm_stage_f16", **kw)(x, weight.reshape(1, k))


def rms_norm_stage_f16_reference(x, weight, eps: float, *, interpret: bool = False):
    """Plain-JAX version (same signature): `stage_f16_rows(rms_norm_reference(x, weight, eps))`."""
    del interpret
    _check(x, weight)
    return stage_f16_rows(rms_norm_reference(x, weight, eps))
