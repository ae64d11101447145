"""Granularities, scale rules and delayed scaling."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jfp8
from jfp8.scaling import (PerBlock, PerChannel, PerTensor, block_amax, compute_scale,
                          delayed_scaling_init, delayed_scaling_update, scale_shape)


@pytest.mark.parametrize("shape,granularity,expected", [
    ((200, 384), PerTensor(), (1, 1)),
    ((200, 384), PerChannel(0), (200, 1)),
    ((200, 384), PerChannel(1), (1, 384)),
    ((200, 384), PerChannel(-1), (1, 384)),
    ((200, 384), PerBlock((128, 128)), (2, 3)),
    ((7, 300), PerBlock((1, 128)), (7, 3)),
    ((7, 300), PerBlock((1, 32)), (7, 10)),
    ((2, 5, 300), PerBlock((1, 128)), (2, 5, 3)),  # leading axes get blocks of 1
    ((), PerTensor(), ()),
])
def test_scale_shape(shape, granularity, expected):
    assert scale_shape(shape, granularity) == expected


def test_scale_is_amax_over_fmax_per_block():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((130, 200)).astype(np.float32)
    scale = np.asarray(compute_scale(x, jfp8.E4M3, PerBlock((64, 128))))
    for i in range(3):
        for j in range(2):
            block = x[64 * i:64 * (i + 1), 128 * j:128 * (j + 1)]
            assert scale[i, j] == np.float32(np.abs(block).max()) * np.float32(1 / 448)


def test_zero_amax_gives_scale_one_and_nonfinite_poisons_nothing():
    x = np.ones((4, 256), np.float32)
    x[0] = 0.0
    x[1, 3] = np.inf
    x[2, 5] = np.nan
    x[3, 200] = 1000.0
    s = np.asarray(compute_scale(x, jfp8.E4M3, PerBlock((1, 128))))
    assert s[0, 0] == 1.0 and s[0, 1] == 1.0            # all-zero rows: scale 1
    assert s[1, 0] == np.float32(1 / 448)  # inf left out of the amax
    assert s[2, 0] == np.float32(1 / 448)  # NaN left out of the amax
    assert s[3, 0] == np.float32(1 / 448) and s[3, 1] == np.float32(1000) * np.float32(1 / 448)
    assert np.isfinite(s).all()
    q = jfp8.quantize(x, jfp8.E4M3, PerBlock((1, 128))).dequantize()
    assert float(q[1, 3]) == float(np.float32(448) * s[1, 0])  # inf saturates to the block max
    assert np.isnan(q[2, 5]) and np.isfinite(np.delete(np.asarray(q).ravel(), 2 * 256 + 5)).all()


def test_tiny_amax_never_divides_by_zero():
    x = jnp.full((4,), 1e-44, jnp.float32)  # subnormal: amax/448 would flush to 0
    s = compute_scale(x, jfp8.E4M3, PerTensor())
    assert float(s.ravel()[0]) > 0
    assert np.isfinite(np.asarray(jfp8.quantize(x, jfp8.E4M3, PerTensor()).dequantize())).all()


def test_bad_granularities():
    with pytest.raises(ValueError, match="block_shape"):
        PerBlock((0, 128))
    with pytest.raises(ValueError, match="block_shape"):
        PerBlock((-1,))
    with pytest.raises(TypeError, match="block_shape"):
        PerBlock(128)
    with pytest.raises(ValueError, match="granularity"):
        scale_shape((128,), PerBlock((1, 128)))
    with pytest.raises(ValueError, match="granularity"):
        scale_shape((3, 4), PerChannel(2))
    with pytest.raises(TypeError, match="granularity"):
        jfp8.quantize(jnp.ones(4), jfp8.E4M3, "tensor")


def test_delayed_scaling_history_and_margin():
    state = delayed_scaling_init(history=4)
    amaxes = [2.0, 8.0, 1.0, 0.5, 0.25, 0.125]
    seen = []
    for a in amaxes:
        state = delayed_scaling_update(state, jnp.float32(a), jfp8.E4M3, margin=1)
        seen.append(a)
        window = seen[-4:]
        np.testing.assert_array_equal(np.asarray(state.amax_history), (window[::-1] + [0] * 4)[:4])
        assert float(state.scale) == pytest.approx(max(window) * 2 / 448, rel=1e-7)
    # A non-finite amax is recorded as 0 and does not poison the scale.
    state = delayed_scaling_update(state, jnp.float32(np.inf), jfp8.E4M3)
    assert np.isfinite(np.asarray(state.amax_history)).all() and np.isfinite(float(state.scale))


def test_delayed_scaling_is_pure_and_jittable():
    state = delayed_scaling_init(history=8, scale_shape_=(3,))
    step = jax.jit(lambda s, a: delayed_scaling_update(s, a, jfp8.E5M2, algorithm="most_recent"))
    new = step(state, jnp.array([1.0, 2.0, 0.0]))
    assert float(state.amax_history.sum()) == 0  # input untouched
    np.testing.assert_allclose(np.asarray(new.scale), [1 / 57344, 2 / 57344, 1.0], rtol=1e-7)
    with pytest.raises(ValueError, match="history"):
        delayed_scaling_init(0)


def test_block_amax_shapes_for_empty():
    assert block_amax(jnp.zeros((0, 256)), PerBlock((1, 128))).shape == (0, 2)
