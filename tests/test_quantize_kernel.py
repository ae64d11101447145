"""Tests for pallas_kernels.quantize (fused FP8 activation quantization).

The contract is bit-exactness with XLA's `jfp8.quantize` (PerBlock((1, 128)) / PerTensor()):
same FP8 bytes and same f32 scales, special values included (NaN stays NaN, ±inf saturates and is
left out of the amax, an all-zero group gets scale 1). NaN payload/sign bits may differ between
the two conversions, so NaN positions are compared as "both NaN".
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jfp8
from pallas_kernels import quantize as Q

GRAN = {"group": jfp8.PerBlock((1, 128)), "tensor": jfp8.PerTensor()}


# Jitted once per signature: eager dispatch of every jnp op dominates CPU test time otherwise.
@functools.partial(jax.jit, static_argnames=("fmt", "layout"))
def xla_quantize(x, fmt, layout):
    q = jfp8.quantize(x, fmt, GRAN[layout])
    return q.data, q.scale


reference = jax.jit(Q.quantize_fp8_reference, static_argnames=("layout", "dtype"))
FMT = {jnp.dtype(jnp.float8_e4m3fn): jfp8.E4M3, jnp.dtype(jnp.float8_e5m2): jfp8.E5M2}


def assert_same_bits(data, ref):
    d = np.asarray(jax.lax.bitcast_convert_type(data, jnp.uint8))
    r = np.asarray(jax.lax.bitcast_convert_type(ref, jnp.uint8))
    nan_d = np.isnan(np.asarray(data.astype(jnp.float32)))
    nan_r = np.isnan(np.asarray(ref.astype(jnp.float32)))
    np.testing.assert_array_equal(nan_d, nan_r)
    np.testing.assert_array_equal(d[~nan_d], r[~nan_r])


def inputs(m, k, dtype, seed):
    """Normal values over a wide range, plus NaN, +inf, -inf, an all-zero group, a huge value."""
    x = jax.random.normal(jax.random.key(seed), (m, k)) * jnp.exp(
        jax.random.uniform(jax.random.key(seed + 1), (m, 1), minval=-8, maxval=8))
    x = x.at[0, 5].set(jnp.nan).at[m - 1, 3].set(jnp.inf).at[m // 2, k - 1].set(-jnp.inf)
    x = x.at[0, 128:256].set(0.0).at[m - 1, 0].set(3e4)
    return x.astype(dtype)


# Odd sizes (partial row blocks, partial 128-groups, K not a multiple of the tile), every input
# dtype, both layouts and formats, the default and a small-tile config (a 3x3 grid).
@pytest.mark.parametrize("m,k,dtype,layout,fp8,cfg", [
    (1, 384, jnp.bfloat16, "group", jnp.float8_e4m3fn, None),
    (7, 200, jnp.float32, "group", jnp.float8_e4m3fn, Q.QuantizeConfig(block_m=4, groups=1)),
    (130, 520, jnp.bfloat16, "group", jnp.float8_e5m2, None),
    (7, 200, jnp.float16, "tensor", jnp.float8_e4m3fn, Q.QuantizeConfig(block_m=4, groups=1)),
])
def test_bit_exact_vs_xla_interpret(m, k, dtype, layout, fp8, cfg):
    x = inputs(m, k, dtype, seed=m + k)
    data, scale = Q.quantize_fp8(x, layout=layout, dtype=fp8, config=cfg, interpret=True)
    q_data, q_scale = xla_quantize(x, FMT[jnp.dtype(fp8)], layout)
    assert data.dtype == jnp.dtype(fp8) and data.shape == (m, k)
    assert scale.shape == q_scale.shape and scale.dtype == jnp.float32
    assert_same_bits(data, q_data)
    np.testing.assert_array_equal(np.asarray(scale), np.asarray(q_scale))


def test_reference_is_bit_exact_and_all_zero_gets_scale_one():
    x = inputs(9, 300, jnp.bfloat16, seed=3)
    for layout in Q.LAYOUTS:
        data, scale = reference(x, layout=layout)
        q_data, q_scale = xla_quantize(x, jfp8.E4M3, layout)
        assert_same_bits(data, q_data)
        np.testing.assert_array_equal(np.asarray(scale), np.asarray(q_scale))
    assert float(scale[0, 0]) > 0
    _, scale = reference(jnp.zeros((3, 256), jnp.bfloat16), layout="group")
    np.testing.assert_array_equal(np.asarray(scale), np.ones((3, 2), np.float32))


@pytest.mark.parametrize("x,kw,exc,match", [
    (jnp.zeros((8,), jnp.bfloat16), {}, ValueError, "x: expected a 2-D"),
    (jnp.zeros((2, 8), jnp.int32), {}, TypeError, "x: expected bfloat16"),
    (jnp.zeros((2, 8), jnp.bfloat16), dict(layout="row"), ValueError, "layout: expected"),
    (jnp.zeros((2, 8), jnp.bfloat16), dict(dtype=jnp.int8), TypeError, "dtype: expected"),
    (jnp.zeros((0, 8), jnp.bfloat16), {}, ValueError, "x: expected a non-empty"),
])
def test_bad_inputs_name_the_argument(x, kw, exc, match):
    with pytest.raises(exc, match=match):
        Q.quantize_fp8(x, interpret=True, **kw)
    with pytest.raises(ValueError, match="QuantizeConfig.groups"):
        Q.QuantizeConfig(block_m=4, groups=3)


@pytest.mark.gpu
@pytest.mark.parametrize("m,k", [(1, 4096), (16, 4096), (64, 14336), (2048, 4096), (7, 200)])
@pytest.mark.parametrize("layout", Q.LAYOUTS)
def test_gpu_bit_exact_vs_xla(m, k, layout):
    x = inputs(m, k, jnp.bfloat16, seed=m)
    data, scale = Q.quantize_fp8(x, layout=layout)
    q_data, q_scale = xla_quantize(x, jfp8.E4M3, layout)
    assert_same_bits(data, q_data)
    np.testing.assert_array_equal(np.asarray(scale), np.asarray(q_scale))


# cast_fp8 (per-tensor cast with a given scale + amax, one pass): bit-exact vs the reference and
# vs jfp8's own math for a static scale (cast(x * (1 / scale)), amax of the finite |x|).
@pytest.mark.parametrize("m,k,dtype,fp8,cfg", [
    (7, 200, jnp.bfloat16, jnp.float8_e4m3fn, Q.QuantizeConfig(block_m=4, groups=1)),
    (130, 520, jnp.float32, jnp.float8_e5m2, None),
])
def test_cast_fp8_interpret(m, k, dtype, fp8, cfg):
    x = inputs(m, k, dtype, seed=m * k)
    scale = jnp.full((1, 1), 0.37, jnp.float32)       # a stale (delayed) scale: some values saturate
    data, amax = Q.cast_fp8(x, scale, dtype=fp8, config=cfg, interpret=True)
    r_data, r_amax = Q.cast_fp8_reference(x, scale, dtype=fp8)
    assert_same_bits(data, r_data)
    assert float(amax) == float(r_amax) == float(jnp.max(jnp.where(
        jnp.isfinite(x.astype(jnp.float32)), jnp.abs(x.astype(jnp.float32)), 0)))
    assert_same_bits(data, jfp8.quantize(x, FMT[jnp.dtype(fp8)], jfp8.PerTensor(), scale=scale).data)
    assert_same_bits(data, _host_cast(x, scale, fp8))


def test_cast_fp8_bad_scale():
    x = inputs(4, 128, jnp.bfloat16, seed=0)
    with pytest.raises(ValueError, match="scale"):
        Q.cast_fp8(x, jnp.ones((1,), jnp.float32), interpret=True)
    with pytest.raises(ValueError, match="scale"):
        Q.cast_fp8(x, jnp.ones((1, 1), jnp.bfloat16), interpret=True)


def _host_cast(x, scale, fp8=jnp.float8_e4m3fn):
    """numpy/ml_dtypes: x * (1 / scale) in f32 (the reciprocal rounded once), clip (NaN kept),
    one RNE rounding to FP8."""
    import ml_dtypes
    xf = np.asarray(x.astype(jnp.float32))
    y = xf * (np.float32(1) / np.float32(np.asarray(scale).reshape(())))
    y = np.where(np.isnan(y), y, np.clip(y, -float(jnp.finfo(fp8).max), float(jnp.finfo(fp8).max)))
    return jnp.asarray(y.astype(np.dtype(getattr(ml_dtypes, jnp.dtype(fp8).name))))


@pytest.mark.gpu
@pytest.mark.parametrize("m,k", [(1, 4096), (2048, 4096), (7, 200)])
def test_gpu_cast_fp8_bit_exact(m, k):
    """Against the host (numpy + ml_dtypes rounding). Scale 1.7 on bf16 inputs puts many quotients
    exactly on FP8 rounding midpoints (x = 17 n 2^e), where x / s and x * (1 / s) differ: the
    case that made the library write the reciprocal multiply itself (`jfp8.scaling.reciprocal`)."""
    x = inputs(m, k, jnp.bfloat16, seed=m + 1)
    scale = jnp.full((1, 1), 1.7, jnp.float32)
    data, amax = Q.cast_fp8(x, scale)
    assert_same_bits(data, _host_cast(x, 1.7))
    xf = np.asarray(x.astype(jnp.float32))
    assert float(amax) == float(np.max(np.where(np.isfinite(xf), np.abs(xf), 0)))
