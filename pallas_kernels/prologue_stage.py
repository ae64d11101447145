"""Decode-row prologues with f16 staging, one Pallas launch each (2 <= M <= 16, W8A16 matmuls).

    rows, scales = rms_norm_stage_f16(x, weight, eps)
    ==  fp8_gemv.stage_f16_rows(fp8_gemv.rms_norm_reference(x, weight, eps))
    rows, scales = swiglu_stage_f16(x)
    ==  fp8_gemv.stage_f16_rows(fp8_gemv.swiglu_reference(x))

RMSNorm: x (M, K) bf16 / f16 -> rows (M, K) float16 and scales (M, 1) float32 with
rms_norm(x) ~ rows * scales, the RMSNorm as HF Llama computes it (f32, rounded to x.dtype, times
the weight in x.dtype). SwiGLU: x (M, 2F) = [gate | up] -> rows (M, F), scales (M, 1) with
silu(gate) * up ~ rows * scales (f32, rounded once to x.dtype). Then, for both, each row times
the power of two 2^-e that puts its finite amax in [2^14, 2^15) (e = 0 for an all-zero row),
rounded to f16 (exact for the row's values down to amax * 2^-31; `stage_f16_rows` says why).
`fp8_gemv` then multiplies f16 operands.

Why kernels: XLA runs the norm as two launches (the sum of squares, then the scaling), the SwiGLU
as one, and the staging as two more (the row amax, then the scaling and cast), ~1.5-2.5 µs each
inside a decode step; here one program per row does all of it (a norm row of an 8B model is
8 KB, a SwiGLU row 56 KB), one launch.

Numerics: the same formulas in f32. The sum of squares adds in another order than XLA's
reduction (1 / rms can differ in its last f32 bit) and the kernel's exp can differ from XLA's in
its last bit, so an element of the prologue's bf16 result can differ by one ulp (as for the fused
prologues of `fp8_gemv`, `jfp8.prologue`); given the same prologue output the staging is exact
(a power-of-two scaling, then one rounding to f16).

With split-K partials instead of x (`sum_rms_norm_stage_f16`), the same launch first sums them,
adds the residual and writes that x out: a decode matmul's split-K sum, the skip connection and
the next RMSNorm in one launch where XLA's sum fusion ran before it.

Public: `rms_norm_stage_f16`, `rms_norm_stage_f16_reference`, `sum_rms_norm_stage_f16`,
`sum_rms_norm_stage_f16_reference`, `swiglu_stage_f16`, `swiglu_stage_f16_reference`, `MAX_M`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import triton_compat
from pallas_kernels.fp8_gemv import (ACT_DTYPES, add_residual, rms_norm_reference, stage_f16_rows,
                                     sum_split_k, swiglu_reference)

__all__ = ["rms_norm_stage_f16", "rms_norm_stage_f16_reference", "sum_rms_norm_stage_f16",
           "sum_rms_norm_stage_f16_reference", "swiglu_stage_f16", "swiglu_stage_f16_reference",
           "MAX_M"]

#: Rows per call: the decode batch sizes whose matmuls take staged f16 rows.
MAX_M = 16
#: Row elements per warp: a program holds its whole row in registers (f32), so wide rows
#: (a SwiGLU row of an 8B model is 2 x 14336) take more warps, from 4 up to 16. On the H200
#: (results/stage_probe_h200.log, M = 16): the 8B SwiGLU 4.3 µs at 16 warps, 4.8 at 8, 6.3 at
#: 4; the 8B norm (K = 4096) 1.8-1.9 µs at 4 to 16 warps.
ELEMENTS_PER_WARP = 1024
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


def _norm_kernel(x_ref, w_ref, rows_ref, scale_ref, *, k: int, k_pad: int, eps: float):
    row = pl.program_id(0)
    mask = (jnp.arange(k_pad)[None, :] < k) if k_pad != k else None
    x = triton_compat.load(x_ref.at[pl.ds(row, 1), pl.ds(0, k_pad)], mask, 0.0)
    _norm_row(x, w_ref, rows_ref, scale_ref, row, k, k_pad, eps, mask)


def _sum_norm_kernel(parts_ref, *refs, splits: int, has_row_scale: bool, has_residual: bool,
                     k: int, k_pad: int, eps: float):
    """`_norm_kernel` of x = `fp8_gemv.sum_split_k(parts, m, dtype, residual, row_scale=...)`,
    row by row: the partials summed in split order, times the row's scale, rounded, plus the
    residual row, rounded (x also written out)."""
    refs = list(refs)
    rs_ref = refs.pop(0) if has_row_scale else None
    res_ref = refs.pop(0) if has_residual else None
    w_ref, rows_ref, scale_ref, x_ref = refs
    row = pl.program_id(0)
    mask = (jnp.arange(k_pad)[None, :] < k) if k_pad != k else None
    part = lambda i: triton_compat.load(parts_ref.at[pl.ds(i, 1), row, pl.ds(0, k_pad)], mask, 0.0)
    acc = part(0)
    for i in range(1, splits):
        acc = acc + part(i)
    if has_row_scale:
        acc = acc * rs_ref[pl.ds(row, 1), pl.ds(0, 1)]
    r = triton_compat.load(res_ref.at[pl.ds(row, 1), pl.ds(0, k_pad)], mask, 0.0) \
        if has_residual else None
    x = add_residual(acc.astype(x_ref.dtype), r)
    triton_compat.store(x_ref.at[pl.ds(row, 1), pl.ds(0, k_pad)], x, mask)
    _norm_row(x, w_ref, rows_ref, scale_ref, row, k, k_pad, eps, mask)


def _norm_row(x, w_ref, rows_ref, scale_ref, row, k, k_pad, eps, mask):
    """Row `row` of rows_ref / scale_ref = the staged RMSNorm of x (1, k_pad) (masked past k)."""
    w = triton_compat.load(w_ref.at[pl.ds(0, 1), pl.ds(0, k_pad)], mask, 0.0)
    xf = x.astype(jnp.float32)
    inv_rms = lax.rsqrt(jnp.sum(xf * xf, axis=1, keepdims=True) / k + eps)       # (1, 1)
    y = (xf * inv_rms).astype(x.dtype)
    y = (y.astype(jnp.float32) * w.astype(x.dtype).astype(jnp.float32)).astype(x.dtype)
    _store_staged(y, rows_ref, scale_ref, row, k_pad, mask)


def _swiglu_kernel(x_ref, rows_ref, scale_ref, *, f: int, k_pad: int):
    row = pl.program_id(0)
    cols = jnp.arange(k_pad)[None, :]
    mask = (cols < f) if k_pad != f else None
    g = triton_compat.load(x_ref.at[row, pl.ds(0, 1), pl.ds(0, k_pad)], mask, 0.0)
    u = triton_compat.load(x_ref.at[row, pl.ds(1, 1), pl.ds(0, k_pad)], mask, 0.0)
    gf = g.astype(jnp.float32)
    y = (gf / (1.0 + jnp.exp(-gf)) * u.astype(jnp.float32)).astype(g.dtype)
    _store_staged(y, rows_ref, scale_ref, row, k_pad, mask)


def _store_staged(y, rows_ref, scale_ref, row, k_pad, mask):
    """Row `row` of rows_ref / scale_ref = the f16 staging of y (1, k_pad) (see the docstring)."""
    yf = y.astype(jnp.float32)
    a = jnp.abs(yf)
    amax = jnp.max(jnp.where(a < jnp.inf, a, 0.0), axis=1, keepdims=True)      # finite amax
    e = jnp.where(amax > 0, _floor_log2(jnp.where(amax > 0, amax, 1.0)) - 14, 0)
    triton_compat.store(rows_ref.at[pl.ds(row, 1), pl.ds(0, k_pad)],
                        _ldexp(yf, -e).astype(jnp.float16), mask)
    scale_ref[pl.ds(row, 1), pl.ds(0, 1)] = _ldexp(jnp.ones_like(amax), e)


def _check_rows(x):
    if not hasattr(x, "shape") or len(x.shape) != 2:
        raise ValueError(f"x: expected a 2-D (M, K) array, got shape {getattr(x, 'shape', None)}")
    m, _ = x.shape
    if not 1 <= m <= MAX_M:
        raise ValueError(f"x: expected 1 <= M <= {MAX_M} rows (decode batches), got M={m}")
    if jnp.dtype(x.dtype) not in ACT_DTYPES:
        raise TypeError(f"x: expected bfloat16 or float16 activations, got {x.dtype}")


def _check(x, weight):
    _check_rows(x)
    k = x.shape[1]
    if not hasattr(weight, "shape") or tuple(weight.shape) != (k,):
        raise ValueError(f"weight: expected shape ({k},), got {getattr(weight, 'shape', None)}")


def _check_swiglu(x):
    _check_rows(x)
    if x.shape[1] % 2:
        raise ValueError(f"x: SwiGLU takes (M, 2F) = [gate | up], got last dim {x.shape[1]}")


def _params(k_pad: int, interpret: bool) -> dict:
    if interpret:
        return dict(interpret=True)
    warps = min(16, max(4, k_pad // ELEMENTS_PER_WARP))
    return triton_compat.compiler_params(num_warps=warps, num_stages=1)


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
    kw = _params(k_pad, interpret)
    return pl.pallas_call(
        functools.partial(_norm_kernel, k=k, k_pad=k_pad, eps=eps), grid=(m,),
        out_shape=[jax.ShapeDtypeStruct((m, k), jnp.float16),
                   jax.ShapeDtypeStruct((m, 1), jnp.float32)],
        name="jfp8_rms_norm_stage_f16", **kw)(x, weight.reshape(1, k))


def rms_norm_stage_f16_reference(x, weight, eps: float, *, interpret: bool = False):
    """Plain-JAX version (same signature): `stage_f16_rows(rms_norm_reference(x, weight, eps))`."""
    del interpret
    _check(x, weight)
    return stage_f16_rows(rms_norm_reference(x, weight, eps))


def sum_rms_norm_stage_f16(parts, m: int, residual, weight, eps: float, *, row_scale=None,
                           dtype=jnp.bfloat16, interpret: bool = False):
    """(rows, scales, x) for x = `fp8_gemv.sum_split_k(parts, m, dtype, residual, row_scale=...)`:
    split-K partials parts (S, m_pad, K) f32 summed (in split order), times row_scale (m, 1)
    f32 when given, rounded to dtype, plus residual (m, K) (or None), rounded; rows / scales its
    staged RMSNorm as `rms_norm_stage_f16` gives it; x (m, K) dtype written out too (the next
    residual). One launch, one program per row: a split-K matmul's sum, a transformer's skip
    connection and the next norm in one."""
    if not hasattr(parts, "shape") or len(parts.shape) != 3 or parts.dtype != jnp.float32:
        raise ValueError(f"parts: expected (S, m_pad, K) float32 split-K partials, got "
                         f"{getattr(parts, 'shape', None)} {getattr(parts, 'dtype', None)}")
    s, m_pad, k = parts.shape
    if not 1 <= m <= min(m_pad, MAX_M):
        raise ValueError(f"m: expected 1 <= m <= min(m_pad={m_pad}, {MAX_M}), got {m}")
    if jnp.dtype(dtype) not in ACT_DTYPES:
        raise TypeError(f"dtype: expected bfloat16 or float16, got {dtype}")
    if residual is not None and tuple(residual.shape) != (m, k):
        raise ValueError(f"residual: expected shape ({m}, {k}), got {residual.shape}")
    if row_scale is not None and (tuple(row_scale.shape) != (m, 1)
                                  or row_scale.dtype != jnp.float32):
        raise ValueError(f"row_scale: expected ({m}, 1) float32, got {row_scale.shape} "
                         f"{row_scale.dtype}")
    if not hasattr(weight, "shape") or tuple(weight.shape) != (k,):
        raise ValueError(f"weight: expected shape ({k},), got {getattr(weight, 'shape', None)}")
    return _sum_rms_norm_stage_jit(parts, row_scale, residual, weight, m=m, eps=float(eps),
                                   dtype=jnp.dtype(dtype), interpret=interpret)


@functools.partial(jax.jit, static_argnames=("m", "eps", "dtype", "interpret"))
def _sum_rms_norm_stage_jit(parts, row_scale, residual, weight, *, m, eps, dtype, interpret):
    s, _, k = parts.shape
    k_pad = pl.next_power_of_2(k)
    args = [parts] + [x for x in (row_scale, residual) if x is not None] + [weight.reshape(1, k)]
    return pl.pallas_call(
        functools.partial(_sum_norm_kernel, splits=s, has_row_scale=row_scale is not None,
                          has_residual=residual is not None, k=k, k_pad=k_pad, eps=eps),
        grid=(m,),
        out_shape=[jax.ShapeDtypeStruct((m, k), jnp.float16),
                   jax.ShapeDtypeStruct((m, 1), jnp.float32),
                   jax.ShapeDtypeStruct((m, k), dtype)],
        name="jfp8_sum_rms_norm_stage_f16", **_params(k_pad, interpret))(*args)


def sum_rms_norm_stage_f16_reference(parts, m: int, residual, weight, eps: float, *,
                                     row_scale=None, dtype=jnp.bfloat16, interpret: bool = False):
    """Plain-JAX version (same signature): x = `sum_split_k(...)`, then
    (*`rms_norm_stage_f16_reference(x, weight, eps)`, x)."""
    del interpret
    x = sum_split_k(parts, m, dtype, residual, row_scale=row_scale)
    return (*rms_norm_stage_f16_reference(x, weight, eps), x)


def swiglu_stage_f16(x, *, interpret: bool = False):
    """(rows (M, F) float16, scales (M, 1) float32) = staged SwiGLU of x (M, 2F) = [gate | up]
    bf16 / f16; one Pallas launch, one program per row. See the module docstring."""
    _check_swiglu(x)
    return _swiglu_stage_jit(x, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("interpret",))
def _swiglu_stage_jit(x, *, interpret):
    m, k = x.shape
    f = k // 2
    k_pad = pl.next_power_of_2(f)
    return pl.pallas_call(
        functools.partial(_swiglu_kernel, f=f, k_pad=k_pad), grid=(m,),
        out_shape=[jax.ShapeDtypeStruct((m, f), jnp.float16),
                   jax.ShapeDtypeStruct((m, 1), jnp.float32)],
        name="jfp8_swiglu_stage_f16", **_params(k_pad, interpret))(x.reshape(m, 2, f))


def swiglu_stage_f16_reference(x, *, interpret: bool = False):
    """Plain-JAX version (same signature): `stage_f16_rows(swiglu_reference(x))`."""
    del interpret
    _check_swiglu(x)
    return stage_f16_rows(swiglu_reference(x))
