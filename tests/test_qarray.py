"""QArray: quantize/dequantize numerics, pytree behaviour, serialization, bad input."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import jfp8
from jfp8.qarray import QArray, from_parts
from jfp8.serialization import load_params, read_safetensors, save_params, write_safetensors

GRANULARITIES = [jfp8.PerTensor(), jfp8.PerChannel(0), jfp8.PerChannel(1),
                 jfp8.PerBlock((128, 128)), jfp8.PerBlock((1, 128)), jfp8.PerBlock((1, 32)),
                 jfp8.PerBlock((7, 5))]


def _reference_dequant(x, fmt, block):
    """float64 reference: per-block amax, scale, RNE cast through ml_dtypes, multiply back."""
    x = np.asarray(x, np.float64)
    out = np.empty_like(x)
    for i in range(0, x.shape[0], block[0]):
        for j in range(0, x.shape[1], block[1]):
            b = x[i:i + block[0], j:j + block[1]]
            amax = np.float32(np.abs(b).max())
            scale = np.float32(amax) * np.float32(1 / fmt.max) if amax > 0 else np.float32(1)
            q = np.clip((b.astype(np.float32) * (np.float32(1) / scale)), -fmt.max,
                        fmt.max).astype(fmt.dtype)
            out[i:i + block[0], j:j + block[1]] = q.astype(np.float64) * np.float64(scale)
    return out


@pytest.mark.parametrize("fmt", [jfp8.E4M3, jfp8.E5M2], ids=lambda f: f.name)
@pytest.mark.parametrize("granularity", GRANULARITIES, ids=repr)
def test_dequantize_matches_reference(fmt, granularity):
    x = np.random.default_rng(7).standard_normal((200, 300)).astype(np.float32) * 3
    q = jfp8.quantize(x, fmt, granularity)
    assert q.scale.shape == jfp8.scale_shape(x.shape, granularity)
    assert q.data.dtype == fmt.dtype and q.shape == x.shape
    block = granularity.block_shape(x.shape)
    # data*scale in f32 vs f64: one f32 rounding, 2**-24 relative.
    np.testing.assert_allclose(np.asarray(q.dequantize(jnp.float32)), _reference_dequant(x, fmt, block),
                               rtol=2 ** -23, atol=0)
    # and the quantization error is within half an ulp of the format (relative, for normals)
    err = jfp8.quantization_error(x, fmt, granularity)
    assert err.mean_rel_error < fmt.relative_precision


class TestPytree(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_quantize_under_jit(self):
        x = jax.random.normal(jax.random.key(0), (64, 256))
        q = self.variant(lambda a: jfp8.quantize(a, jfp8.E4M3, jfp8.PerBlock((1, 128))))(x)
        ref = jfp8.quantize(x, jfp8.E4M3, jfp8.PerBlock((1, 128)))
        chex.assert_trees_all_equal(q.scale, ref.scale)
        np.testing.assert_array_equal(np.asarray(q.data).view(np.uint8), np.asarray(ref.data).view(np.uint8))

    def test_vmap_and_tree_map(self):
        x = jax.random.normal(jax.random.key(1), (3, 40, 300))
        g = jfp8.PerBlock((1, 128))
        qv = jax.vmap(lambda a: jfp8.quantize(a, jfp8.E4M3, g))(x)
        assert qv.data.shape == (3, 40, 300) and qv.scale.shape == (3, 40, 3)
        chex.assert_trees_all_close(qv.dequantize(), jfp8.quantize(x, jfp8.E4M3, g).dequantize())
        per_tensor = jax.vmap(lambda a: jfp8.quantize(a, jfp8.E4M3, jfp8.PerTensor()))(x)
        for i in range(3):  # each slice gets its own scale under vmap
            chex.assert_trees_all_close(per_tensor.dequantize()[i],
                                        jfp8.quantize(x[i], jfp8.E4M3, jfp8.PerTensor()).dequantize())
        doubled = jax.tree_util.tree_map(lambda a: a, qv)
        assert isinstance(doubled, QArray) and doubled.granularity == g
        leaves = jax.tree_util.tree_leaves(qv)
        assert len(leaves) == 2  # data and scale; format and granularity are static

    def test_scan_over_stacked_qarrays(self):
        w = jax.random.normal(jax.random.key(2), (4, 32, 64))
        qs = jax.vmap(lambda a: jfp8.quantize(a, jfp8.E4M3, jfp8.PerChannel(0)))(w)
        def body(carry, q):
            return carry + q.dequantize().sum(), None
        total, _ = jax.lax.scan(body, 0.0, qs)
        np.testing.assert_allclose(float(total), float(qs.dequantize().sum()), rtol=1e-5)


def test_scalars_and_empty_arrays():
    q = jfp8.quantize(jnp.float32(-3.5), jfp8.E4M3, jfp8.PerTensor())
    assert q.shape == () and float(q.dequantize()) == -3.5
    e = jfp8.quantize(jnp.zeros((0, 128)), jfp8.E4M3, jfp8.PerBlock((1, 128)))
    assert e.dequantize().shape == (0, 128)


def test_static_scale():
    x = jnp.array([[1.0, -2.0, 900.0]])
    q = jfp8.quantize(x, jfp8.E4M3, jfp8.PerTensor(), scale=1.0)
    np.testing.assert_array_equal(np.asarray(q.dequantize()), [[1.0, -2.0, 448.0]])  # saturates
    with pytest.raises(ValueError, match="scale"):
        jfp8.quantize(jnp.ones((4, 256)), jfp8.E4M3, jfp8.PerBlock((1, 128)), scale=jnp.ones((3,)))


def test_bad_input_names_the_argument():
    with pytest.raises(TypeError, match="x:"):
        jfp8.quantize(jnp.arange(8), jfp8.E4M3, jfp8.PerTensor())
    with pytest.raises(TypeError, match="x:"):
        jfp8.quantize(jnp.ones(8).astype(jnp.float8_e4m3fn), jfp8.E4M3, jfp8.PerTensor())
    with pytest.raises(ValueError, match="granularity"):
        jfp8.quantize(jnp.ones(8), jfp8.E4M3, jfp8.PerBlock((1, 128)))
    with pytest.raises(ValueError, match="scale"):
        from_parts(jnp.ones((4, 8)).astype(jnp.float8_e4m3fn), jnp.ones((4, 2)), jfp8.E4M3, jfp8.PerTensor())
    with pytest.raises(TypeError, match="data"):
        from_parts(jnp.ones((4, 8)), jnp.ones((1, 1)), jfp8.E4M3, jfp8.PerTensor())


_shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=24)
_values = st.floats(width=32, allow_nan=True, allow_infinity=True)


@settings(max_examples=20, deadline=None)
@given(hnp.arrays(np.float32, _shapes, elements=_values),
       st.sampled_from([jfp8.E4M3, jfp8.E5M2]),
       st.sampled_from(["tensor", "channel", "block"]))
@example(np.array([4.8064537e-43, 1.1754944e-38], np.float32), jfp8.E5M2, "tensor")  # CI, 2026-12-03
def test_hypothesis_odd_shapes_and_values(x, fmt, kind):
    granularity = {"tensor": jfp8.PerTensor(), "channel": jfp8.PerChannel(0),
                   "block": jfp8.PerBlock((1,) * (x.ndim - 1) + (16,))}[kind]
    q = jfp8.quantize(x, fmt, granularity)
    back = np.asarray(q.dequantize(jnp.float32))
    assert np.isfinite(np.asarray(q.scale)).all() and (np.asarray(q.scale) > 0).all()
    np.testing.assert_array_equal(np.isnan(back), np.isnan(x))  # NaN stays NaN, and only NaN
    finite = np.isfinite(x)
    # Finite entries: saturate at most to the block max, error <= half ulp of the block's grid
    # (relative 2**-(m+1)) or below the smallest subnormal step when flushed; f32 subnormal
    # inputs read as zero (XLA flushes them: `jfp8.quantize`), an error of |x| < 2^-126.
    full = np.asarray(jfp8.scaling.expand_scale(q.scale, x.shape, granularity))
    xf = x[finite].astype(np.float64)
    err = np.abs(back[finite].astype(np.float64) - xf)
    flushed = np.where(np.abs(xf) < np.finfo(np.float32).tiny, np.abs(xf), 0.0)
    bound = (np.abs(xf) * fmt.relative_precision
             + full[finite].astype(np.float64) * fmt.smallest_subnormal + flushed)
    assert (err <= bound * (1 + 1e-6)).all()
    assert (np.abs(back[np.isinf(x)]) == (fmt.max * full[np.isinf(x)]).astype(np.float32)).all()


def test_safetensors_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    params = {"layer": {"kernel": jfp8.quantize(rng.standard_normal((200, 300)).astype(np.float32),
                                                 jfp8.E4M3, jfp8.PerBlock((128, 128))),
                        "bias": jnp.asarray(rng.standard_normal(200), jnp.bfloat16)},
              "head": jfp8.quantize(rng.standard_normal((8, 16)).astype(np.float32), jfp8.E5M2, jfp8.PerChannel(0))}
    path = tmp_path / "params.safetensors"
    save_params(path, params)
    back = load_params(path)
    for orig, got in [(params["layer"]["kernel"], back["layer"]["kernel"]), (params["head"], back["head"])]:
        assert isinstance(got, QArray) and got.format == orig.format and got.granularity == orig.granularity
        np.testing.assert_array_equal(np.asarray(got.data).view(np.uint8), np.asarray(orig.data).view(np.uint8))
        np.testing.assert_array_equal(np.asarray(got.scale), np.asarray(orig.scale))
    np.testing.assert_array_equal(np.asarray(back["layer"]["bias"]), np.asarray(params["layer"]["bias"]))
    # The file is standard safetensors: the header and bf16 tensors read with the reference package.
    import safetensors
    with safetensors.safe_open(str(path), "numpy") as f:
        assert set(f.keys()) == {"layer/kernel", "layer/kernel.scale", "layer/bias", "head", "head.scale"}
        np.testing.assert_array_equal(f.get_tensor("layer/kernel.scale"), np.asarray(params["layer"]["kernel"].scale))


def test_write_is_atomic_and_truncation_is_detected(tmp_path):
    path = tmp_path / "t.safetensors"
    write_safetensors(path, {"a": np.arange(10, dtype=np.float32)})
    class Boom(np.ndarray):
        pass
    with pytest.raises(TypeError):
        write_safetensors(path, {"a": np.arange(3, dtype=np.float32), "b": np.array(["x"])})
    assert list(read_safetensors(path)) == ["a"]  # the old file survived the failed save
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]  # no temp file left
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-8])
    with pytest.raises(ValueError, match="truncated"):
        read_safetensors(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x05")
    with pytest.raises(ValueError, match="not a safetensors"):
        read_safetensors(tmp_path / "junk.safetensors")


@pytest.mark.parametrize("granularity", [jfp8.PerTensor(), jfp8.PerBlock((1, 128)),
                                         jfp8.PerBlock((128, 128))], ids=repr)
def test_quantize_multiplies_by_the_rounded_reciprocal(granularity):
    """data = cast(x * RN(1 / scale)), bit for bit with numpy, also where x / scale and
    x * (1 / scale) round to different FP8 values: bf16 x = 17 n 2^e over a scale of 1.7 puts
    many quotients on FP8 rounding midpoints. XLA rewrites some divisions by a broadcast scale
    into this multiply and not others; the library writes the multiply, so every path agrees."""
    import ml_dtypes
    rng = np.random.default_rng(3)
    x = (17 * rng.integers(-64, 64, (256, 256)) * 2.0 ** rng.integers(-12, -4, (256, 256)))
    x = jnp.asarray(x, jnp.bfloat16)
    shape = jfp8.scale_shape(x.shape, granularity)
    q = jfp8.quantize(x, jfp8.E4M3, granularity, scale=jnp.full(shape, 1.7, jnp.float32))
    y = np.asarray(x, np.float32) * (np.float32(1) / np.float32(1.7))
    want = np.clip(y, -448, 448).astype(ml_dtypes.float8_e4m3fn)
    np.testing.assert_array_equal(np.asarray(q.data).view(np.uint8), want.view(np.uint8))
    # the division would have given different codes here (so this test can tell them apart)
    div = np.clip(np.asarray(x, np.float32) / np.float32(1.7), -448, 448).astype(ml_dtypes.float8_e4m3fn)
    assert (div.view(np.uint8) != want.view(np.uint8)).any()
