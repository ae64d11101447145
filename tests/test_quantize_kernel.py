"""Tests for pallas_kernels.quantize (fused FP8 activation quantization).

The contract is bit-exactness with XLA's `jfp8.quantize` (PerBlock((1, 128)) / PerTensor()):
same FP8 bytes and same f32 scales, special values included (NaN stays NaN, ±inf saturates and is
left out of the amax, an all-zero group gets scale 1). NaN payload/sign bits may differ between
the two conversions, so NaN positions are compared as "both NaN".
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jfp8
from pallas_kernels import quantize as Q

GRAN = {"group": jfp8.PerBlock((1, 128)), "tensor": jfp8.PerTensor()}
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


@pytest.mark.parametrize("m,k,dtype,layout,fp8", [
    (1, 384, jnp.bfloat16, "group", jnp.float8_e4m3fn),
    (7, 200, jnp.float32, "group", jnp.float8_e4m3fn),
    (130, 384, jnp.bfloat16, "group", jnp.float8_e5m2),
    (64, 384, jnp.bfloat16, "tensor", jnp.float8_e4m3fn),
    (7, 200, jnp.float16, "tensor", jnp.float8_e4m3fn),
])
def test_bit_exact_vs_xla_interpret(m, k, dtype, layout, fp8):
    x = inputs(m, k, dtype, seed=m + k)
    data, scale = Q.quantize_fp8(x, layout=layout, dtype=fp8, interpret=True)
    q = jfp8.quantize(x, FMT[jnp.dtype(fp8)], GRAN[layout])
    assert data.dtype == jnp.dtype(fp8) and data.shape == (m, k)
    assert scale.shape == q.scale.shape and scale.dtype == jnp.float32
    assert_same_bits(data, q.data)
    np.testing.assert_array_equal(np.asarray(scale), np.asarray(q.scale))


def test_reference_is_bit_exact_and_all_zero_gets_scale_one():
    x = inputs(9, 300, jnp.bfloat16, seed=3)
    for layout in Q.LAYOUTS:
        data, scale = Q.quantize_fp8_reference(x, layout=layout)
        q = jfp8.quantize(x, jfp8.E4M3, GRAN[layout])
        assert_same_bits(data, q.data)
        np.testing.assert_array_equal(np.asarray(scale), np.asarray(q.scale))
    _, scale = Q.quantize_fp8(jnp.zeros((3, 256), jnp.bfloat16), layout="group", interpret=True)
    np.testing.assert_array_equal(np.asarray(scale), np.ones((3, 2), np.float32))


def test_small_tiles_and_odd_grid():
    x = inputs(5, 520, jnp.bfloat16, seed=11)
    cfg = Q.QuantizeConfig(block_m=2, groups=2, num_warps=4)
    data, scale = Q.quantize_fp8(x, layout="group", config=cfg, interpret=True)
    q = jfp8.quantize(x, jfp8.E4M3, GRAN["group"])
    assert_same_bits(data, q.data)
    np.testing.assert_array_equal(np.asarray(scale), np.asarray(q.scale))


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
    q = jax.jit(lambda x: jfp8.quantize(x, jfp8.E4M3, GRAN[layout]))(x)
    assert_same_bits(data, q.data)
    np.testing.assert_array_equal(np.asarray(scale), np.asarray(q.scale))
