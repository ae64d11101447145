"""pallas_kernels.norm_stage: RMSNorm + f16 staging in one launch (interpret mode) vs its reference.

Bound: the kernel's sum of squares adds in another order than XLA's, so 1 / rms may differ in its
last f32 bit and a norm output element by one bf16 ulp (2^-8 relative) where the f32 product sits
next to a rounding boundary; the staging is exact. So: rows * scales within 2^-8 relative of the
reference's elementwise, the very same bits for all but a few elements, the same row scales.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels import norm_stage as NS
from pallas_kernels.fp8_gemv import rms_norm_reference


def _inputs(m, k, seed, dtype=jnp.bfloat16, scale=1.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(m, k)) * np.exp(rng.normal(size=(m, 1)) * 3) * scale   # rows of any size
    w = rng.uniform(0.2, 2.0, size=(k,))
    return jnp.asarray(x, dtype), jnp.asarray(w, jnp.float32)


def _check_close(got, want, x, w, eps):
    (rows, s), (rows_r, s_r) = got, want
    assert rows.dtype == jnp.float16 and rows.shape == x.shape and s.shape == (x.shape[0], 1)
    np.testing.assert_array_equal(np.asarray(s), np.asarray(s_r))
    a = np.asarray(rows, np.float64) * np.asarray(s, np.float64)
    b = np.asarray(rows_r, np.float64) * np.asarray(s_r, np.float64)
    ref = np.asarray(rms_norm_reference(x, w, eps), np.float64)
    np.testing.assert_array_equal(b, ref)            # the reference's staging is exact here
    np.testing.assert_allclose(a, b, rtol=2 ** -8, atol=0)
    assert np.mean(a != b) <= 0.01


@pytest.mark.parametrize("m,k", [(16, 4096), (3, 300), (1, 64), (7, 2048)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_matches_reference(m, k, dtype):
    x, w = _inputs(m, k, seed=m * k, dtype=dtype, scale=1.0 if dtype == jnp.bfloat16 else 1e-2)
    got = NS.rms_norm_stage_f16(x, w, 1e-5, interpret=True)
    _check_close(got, NS.rms_norm_stage_f16_reference(x, w, 1e-5), x, w, 1e-5)
    rows, s = got
    amax = np.max(np.abs(np.asarray(rows, np.float32)), axis=1)
    assert ((amax >= 2 ** 14) & (amax < 2 ** 15)).all()      # each row's amax staged to [2^14, 2^15)


def test_zero_and_nonfinite_rows():
    x, w = _inputs(4, 256, seed=1)
    x = x.at[0].set(0.0)                                  # all-zero row: scale 1, zeros
    x = x.at[1, 5].set(jnp.inf)                           # inf: the norm is NaN / 0 there
    x = x.at[2, 7].set(jnp.nan)
    rows, s = NS.rms_norm_stage_f16(x, w, 1e-6, interpret=True)
    rows_r, s_r = NS.rms_norm_stage_f16_reference(x, w, 1e-6)
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
    _check_close(got, NS.rms_norm_stage_f16_reference(x, w, 1e-6), x, w, 1e-6)


@jax.jit
def _jit_kernel(x, w):
    return NS.rms_norm_stage_f16(x, w, 1e-6, interpret=True)


def test_bad_inputs():
    x, w = _inputs(4, 64, seed=0)
    with pytest.raises(ValueError, match="x: expected 1 <= M <= 16"):
        NS.rms_norm_stage_f16(jnp.zeros((17, 64), jnp.bfloat16), w, 1e-6)
    with pytest.raises(ValueError, match="x: expected a 2-D"):
        NS.rms_norm_stage_f16(x[0], w, 1e-6)
    with pytest.raises(TypeError, match="x: expected bfloat16 or float16"):
        NS.rms_norm_stage_f16(x.astype(jnp.float32), w, 1e-6)
    with pytest.raises(ValueError, match=r"weight: expected shape \(64,\)"):
        NS.rms_norm_stage_f16(x, w[:10], 1e-6)


def test_kernel_lowers_for_cuda():
    x = jax.ShapeDtypeStruct((16, 4096), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((4096,), jnp.bfloat16)
    fn = functools.partial(NS.rms_norm_stage_f16, eps=1e-5)
    jax.jit(fn).trace(x, w).lower(lowering_platforms=("cuda",))


@pytest.mark.gpu
@pytest.mark.parametrize("m,k", [(16, 4096), (5, 2048), (16, 3000)])
def test_gpu_kernel_matches_reference(m, k):
    x, w = _inputs(m, k, seed=k)
    got = jax.jit(functools.partial(NS.rms_norm_stage_f16, eps=1e-5))(x, w.astype(jnp.bfloat16))
    _check_close(got, NS.rms_norm_stage_f16_reference(x, w.astype(jnp.bfloat16), 1e-5), x,
                 w.astype(jnp.bfloat16), 1e-5)
