"""pallas_kernels.prologue_stage: RMSNorm / SwiGLU + f16 staging in one launch (interpret mode)
vs the references.

Bound: the kernel's sum of squares adds in another order than XLA's (and its exp may differ from
XLA's in the last bit), so 1 / rms (silu) may differ in its last f32 bit and a prologue output
element by one bf16 ulp where the f32 value sits next to a rounding boundary; the staging is
exact. One bf16 ulp of v is 2^-7 * 2^floor(log2|v|), between 2^-8 and 2^-7 of |v| (2^-8 was
the bound until a hypothesis example hit 0.0046 = one ulp of 0.848). So: rows * scales within
2^-7 relative of the reference's elementwise, the very same bits for all but a few elements,
and the same row scales (a one-ulp change of the row's largest element could move its scale only
if that element sat exactly at a power of two; the random inputs here never do).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels import prologue_stage as PS
from pallas_kernels.fp8_gemv import rms_norm_reference, swiglu_reference


def _inputs(m, k, seed, dtype=jnp.bfloat16, scale=1.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(m, k)) * np.exp(rng.normal(size=(m, 1)) * 3) * scale   # rows of any size
    w = rng.uniform(0.2, 2.0, size=(k,))
    return jnp.asarray(x, dtype), jnp.asarray(w, jnp.float32)


def _check_close(got, want, x, w, eps):
    _check_staged(got, want, rms_norm_reference(x, w, eps))


def _check_staged(got, want, prologue_out):
    """got / want: (rows, scales) of the kernel / reference; prologue_out: the unstaged bf16."""
    (rows, s), (rows_r, s_r) = got, want
    assert rows.dtype == jnp.float16 and rows.shape == prologue_out.shape
    assert s.shape == (prologue_out.shape[0], 1)
    np.testing.assert_array_equal(np.asarray(s), np.asarray(s_r))
    a = np.asarray(rows, np.float64) * np.asarray(s, np.float64)
    b = np.asarray(rows_r, np.float64) * np.asarray(s_r, np.float64)
    ref = np.asarray(prologue_out, np.float64)
    # The reference's staging is exact for values >= the row's finite amax * 2^-31; smaller
    # ones (silu of a very negative gate) land on f16's subnormal grid: off by <= amax * 2^-38.
    fin = np.where(np.isfinite(ref), np.abs(ref), 0)
    amax = fin.max(axis=1, keepdims=True)
    big = fin >= amax * 2.0 ** -31
    np.testing.assert_array_equal(np.where(big, b, 0), np.where(big, ref, 0))
    assert (np.abs(np.where(big, 0, b - ref)) <= amax * 2.0 ** -38).all()
    np.testing.assert_allclose(a, b, rtol=2 ** -7, atol=0)    # one bf16 ulp (docstring)
    assert np.mean(a != b) <= 0.01


@pytest.mark.parametrize("m,k", [(16, 4096), (3, 300), (1, 64), (7, 2048)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_matches_reference(m, k, dtype):
    x, w = _inputs(m, k, seed=m * k, dtype=dtype, scale=1.0 if dtype == jnp.bfloat16 else 1e-2)
    got = PS.rms_norm_stage_f16(x, w, 1e-5, interpret=True)
    _check_close(got, PS.rms_norm_stage_f16_reference(x, w, 1e-5), x, w, 1e-5)
    rows, s = got
    amax = np.max(np.abs(np.asarray(rows, np.float32)), axis=1)
    assert ((amax >= 2 ** 14) & (amax < 2 ** 15)).all()      # each row's amax staged to [2^14, 2^15)


def test_zero_and_nonfinite_rows():
    x, w = _inputs(4, 256, seed=1)
    x = x.at[0].set(0.0)                                  # all-zero row: scale 1, zeros
    x = x.at[1, 5].set(jnp.inf)                           # inf: the norm is NaN / 0 there
    x = x.at[2, 7].set(jnp.nan)
    rows, s = PS.rms_norm_stage_f16(x, w, 1e-6, interpret=True)
    rows_r, s_r = PS.rms_norm_stage_f16_reference(x, w, 1e-6)
    assert float(s[0, 0]) == 1.0 and not np.asarray(rows[0], np.float32).any()
    np.testing.assert_array_equal(np.isnan(np.asarray(rows, np.float32)),
                                  np.isnan(np.asarray(rows_r, np.float32)))
    np.testing.assert_array_equal(np.asarray(s), np.asarray(s_r))
    _check_close((rows[3:], s[3:]), (rows_r[3:], s_r[3:]), x[3:], w, 1e-6)


@settings(max_examples=12, deadline=None)
@given(m=st.integers(1, 16), k=st.sampled_from([16, 100, 512, 1000]),
       log_scale=st.floats(-20, 20))
def test_any_row_magnitude(m, k, log_scale):
    """Rows from 2^-20 to 2^20 in size: the staging exponent follows each row exactly."""
    x, w = _inputs(m, k, seed=m + k, scale=2.0 ** log_scale)
    got = _jit_kernel(x, w)
    _check_close(got, PS.rms_norm_stage_f16_reference(x, w, 1e-6), x, w, 1e-6)


@jax.jit
def _jit_kernel(x, w):
    return PS.rms_norm_stage_f16(x, w, 1e-6, interpret=True)


def test_bad_inputs():
    x, w = _inputs(4, 64, seed=0)
    with pytest.raises(ValueError, match="x: expected 1 <= M <= 16"):
        PS.rms_norm_stage_f16(jnp.zeros((17, 64), jnp.bfloat16), w, 1e-6)
    with pytest.raises(ValueError, match="x: expected a 2-D"):
        PS.rms_norm_stage_f16(x[0], w, 1e-6)
    with pytest.raises(TypeError, match="x: expected bfloat16 or float16"):
        PS.rms_norm_stage_f16(x.astype(jnp.float32), w, 1e-6)
    with pytest.raises(ValueError, match=r"weight: expected shape \(64,\)"):
        PS.rms_norm_stage_f16(x, w[:10], 1e-6)


def test_kernel_lowers_for_cuda():
    x = jax.ShapeDtypeStruct((16, 4096), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((4096,), jnp.bfloat16)
    fn = functools.partial(PS.rms_norm_stage_f16, eps=1e-5)
    jax.jit(fn).trace(x, w).lower(lowering_platforms=("cuda",))


@pytest.mark.gpu
@pytest.mark.parametrize("m,k", [(16, 4096), (5, 2048), (16, 3000)])
def test_gpu_kernel_matches_reference(m, k):
    x, w = _inputs(m, k, seed=k)
    got = jax.jit(functools.partial(PS.rms_norm_stage_f16, eps=1e-5))(x, w.astype(jnp.bfloat16))
    _check_close(got, PS.rms_norm_stage_f16_reference(x, w.astype(jnp.bfloat16), 1e-5), x,
                 w.astype(jnp.bfloat16), 1e-5)


# Split-K partials summed (with the residual) in the same launch as the norm.
@pytest.mark.parametrize("splits,m,k,with_residual,with_row_scale", [
    (2, 16, 4096, True, False), (8, 5, 300, True, True), (3, 1, 64, False, False),
    (4, 16, 2048, True, True)])
def test_sum_norm_stage_matches_reference(splits, m, k, with_residual, with_row_scale):
    """x = sum_split_k(parts, m, bf16, residual) bit for bit (the same summation order as XLA's
    `fp8_gemv.sum_split_k`), and rows / scales exactly what `rms_norm_stage_f16` makes of that x
    (the same kernel code), within the norm's bound of the reference."""
    rng = np.random.default_rng(splits * m + k)
    parts = jnp.asarray(rng.normal(size=(splits, 16, k)) * np.exp(rng.normal(size=(1, 16, 1)) * 2),
                        jnp.float32)
    residual = jnp.asarray(rng.normal(size=(m, k)) * 3, jnp.bfloat16) if with_residual else None
    w = jnp.asarray(rng.uniform(0.2, 2.0, size=(k,)), jnp.float32)
    rs = jnp.asarray(2.0 ** rng.integers(-20, 5, size=(m, 1)), jnp.float32) if with_row_scale \
        else None
    rows, s, x = PS.sum_rms_norm_stage_f16(parts, m, residual, w, 1e-5, row_scale=rs,
                                           interpret=True)
    rows_r, s_r, x_r = PS.sum_rms_norm_stage_f16_reference(parts, m, residual, w, 1e-5,
                                                           row_scale=rs)
    assert x.shape == (m, k) and x.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(x_r, np.float32))
    again = PS.rms_norm_stage_f16(x, w, 1e-5, interpret=True)
    np.testing.assert_array_equal(np.asarray(rows), np.asarray(again[0]))
    np.testing.assert_array_equal(np.asarray(s), np.asarray(again[1]))
    _check_close((rows, s), (rows_r, s_r), x, w, 1e-5)


def test_sum_norm_stage_bad_inputs():
    w = jnp.ones((64,), jnp.float32)
    parts = jnp.zeros((2, 16, 64), jnp.float32)
    with pytest.raises(ValueError, match="parts: expected .* float32"):
        PS.sum_rms_norm_stage_f16(parts.astype(jnp.bfloat16), 4, None, w, 1e-6)
    with pytest.raises(ValueError, match="parts: expected"):
        PS.sum_rms_norm_stage_f16(parts[0], 4, None, w, 1e-6)
    with pytest.raises(ValueError, match="m: expected 1 <= m <= min"):
        PS.sum_rms_norm_stage_f16(parts, 17, None, w, 1e-6)
    with pytest.raises(ValueError, match=r"residual: expected shape \(4, 64\)"):
        PS.sum_rms_norm_stage_f16(parts, 4, jnp.zeros((4, 63), jnp.bfloat16), w, 1e-6)
    with pytest.raises(ValueError, match=r"weight: expected shape \(64,\)"):
        PS.sum_rms_norm_stage_f16(parts, 4, None, w[:3], 1e-6)
    with pytest.raises(TypeError, match="dtype: expected bfloat16 or float16"):
        PS.sum_rms_norm_stage_f16(parts, 4, None, w, 1e-6, dtype=jnp.float32)
    with pytest.raises(ValueError, match=r"row_scale: expected \(4, 1\) float32"):
        PS.sum_rms_norm_stage_f16(parts, 4, None, w, 1e-6, row_scale=jnp.ones((4,), jnp.float32))


def test_sum_norm_kernel_lowers_for_cuda():
    parts = jax.ShapeDtypeStruct((8, 16, 4096), jnp.float32)
    r = jax.ShapeDtypeStruct((16, 4096), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((4096,), jnp.bfloat16)
    fn = functools.partial(PS.sum_rms_norm_stage_f16, m=16, eps=1e-5)
    jax.jit(lambda p, r, w: fn(p, residual=r, weight=w)).trace(parts, r, w).lower(
        lowering_platforms=("cuda",))


@pytest.mark.gpu
def test_gpu_sum_norm_stage_matches_reference():
    rng = np.random.default_rng(0)
    parts = jnp.asarray(rng.normal(size=(8, 16, 4096)), jnp.float32)
    r = jnp.asarray(rng.normal(size=(16, 4096)), jnp.bfloat16)
    w = jnp.asarray(rng.uniform(0.2, 2.0, size=(4096,)), jnp.bfloat16)
    rows, s, x = jax.jit(functools.partial(PS.sum_rms_norm_stage_f16, m=16, eps=1e-5))(
        parts, residual=r, weight=w)
    rows_r, s_r, x_r = PS.sum_rms_norm_stage_f16_reference(parts, 16, r, w, 1e-5)
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(x_r, np.float32))
    _check_close((rows, s), (rows_r, s_r), x, w, 1e-5)


# SwiGLU + staging: x (M, 2F) = [gate | up] -> (M, F).
def _swiglu_inputs(m, f, seed, dtype=jnp.bfloat16, scale=1.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(m, 2 * f)) * 2 * np.exp(rng.normal(size=(m, 1)) * 2) * scale
    return jnp.asarray(x, dtype)


@pytest.mark.parametrize("m,f", [(16, 1024), (3, 300), (1, 64), (5, 1000)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_swiglu_matches_reference(m, f, dtype):
    x = _swiglu_inputs(m, f, seed=m + f, dtype=dtype, scale=1.0 if dtype == jnp.bfloat16 else 0.1)
    got = PS.swiglu_stage_f16(x, interpret=True)
    _check_staged(got, PS.swiglu_stage_f16_reference(x), swiglu_reference(x))
    rows, _ = got
    amax = np.max(np.abs(np.asarray(rows, np.float32)), axis=1)
    assert ((amax >= 2 ** 14) & (amax < 2 ** 15)).all()


def test_swiglu_zero_and_nonfinite_rows():
    x = _swiglu_inputs(4, 128, seed=2)
    x = x.at[0].set(0.0)                                  # all-zero row: scale 1, zeros
    x = x.at[1, 5].set(jnp.nan)                           # NaN gate -> NaN there only
    x = x.at[2, 128 + 9].set(jnp.inf)                     # inf up: +-inf (or NaN at gate 0)
    rows, s = PS.swiglu_stage_f16(x, interpret=True)
    rows_r, s_r = PS.swiglu_stage_f16_reference(x)
    assert float(s[0, 0]) == 1.0 and not np.asarray(rows[0], np.float32).any()
    r, r_ref = np.asarray(rows, np.float32), np.asarray(rows_r, np.float32)
    np.testing.assert_array_equal(np.isnan(r), np.isnan(r_ref))
    np.testing.assert_array_equal(np.isinf(r), np.isinf(r_ref))
    assert np.isnan(r[1, 5]) and np.isnan(r[1]).sum() == 1 and not np.isfinite(r[2, 9])
    np.testing.assert_array_equal(np.asarray(s), np.asarray(s_r))   # amax over finite values
    _check_staged((rows[3:], s[3:]), (rows_r[3:], s_r[3:]), swiglu_reference(x[3:]))


@settings(max_examples=12, deadline=None)
@given(m=st.integers(1, 16), f=st.sampled_from([16, 100, 512, 1000]),
       log_scale=st.floats(-12, 12))
def test_swiglu_any_row_magnitude(m, f, log_scale):
    """Gate and up from 2^-12 to 2^12 in size (silu's both regimes, products to 2^24)."""
    x = _swiglu_inputs(m, f, seed=m * f, scale=2.0 ** log_scale)
    got = jax.jit(functools.partial(PS.swiglu_stage_f16, interpret=True))(x)
    _check_staged(got, PS.swiglu_stage_f16_reference(x), swiglu_reference(x))


def test_swiglu_bad_inputs():
    with pytest.raises(ValueError, match="x: expected 1 <= M <= 16"):
        PS.swiglu_stage_f16(jnp.zeros((17, 64), jnp.bfloat16))
    with pytest.raises(ValueError, match="x: expected a 2-D"):
        PS.swiglu_stage_f16(jnp.zeros((64,), jnp.bfloat16))
    with pytest.raises(TypeError, match="x: expected bfloat16 or float16"):
        PS.swiglu_stage_f16(jnp.zeros((2, 64), jnp.float32))
    with pytest.raises(ValueError, match=r"x: SwiGLU takes \(M, 2F\)"):
        PS.swiglu_stage_f16(jnp.zeros((2, 65), jnp.bfloat16))


def test_swiglu_kernel_lowers_for_cuda():
    x = jax.ShapeDtypeStruct((16, 2 * 14336), jnp.bfloat16)
    jax.jit(PS.swiglu_stage_f16).trace(x).lower(lowering_platforms=("cuda",))


@pytest.mark.gpu
@pytest.mark.parametrize("m,f", [(16, 14336), (5, 8192), (16, 3000)])
def test_gpu_swiglu_kernel_matches_reference(m, f):
    x = _swiglu_inputs(m, f, seed=f)
    got = jax.jit(PS.swiglu_stage_f16)(x)
    _check_staged(got, PS.swiglu_stage_f16_reference(x), swiglu_reference(x))
