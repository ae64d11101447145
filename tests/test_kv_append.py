"""pallas_kernels.kv_append (interpret mode) against its reference and jfp8.kv_cache.append."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jfp8
from jfp8 import kv_cache as kvc
from pallas_kernels import kv_append as K


def _caches(dtype, L=2, B=3, S=19, H=3, D=64, seed=0):
    rng = np.random.default_rng(seed)
    k = jnp.asarray(rng.normal(size=(L, B, S, H, D)), jnp.float32).astype(dtype)
    v = jnp.asarray(rng.normal(size=(L, B, S, H, D)), jnp.float32).astype(dtype)
    if jnp.dtype(dtype) == jnp.bfloat16:
        return k, v, None, None
    ks = jnp.asarray(rng.uniform(0.5, 2, size=(L, B, S, H)), jnp.float32)
    vs = jnp.asarray(rng.uniform(0.5, 2, size=(L, B, S, H)), jnp.float32)
    return k, v, ks, vs


def _new(B, T, H, D, seed):
    rng = np.random.default_rng(seed)
    k = rng.normal(size=(B, T, H, D)) * np.exp(rng.normal(size=(B, T, H, 1)) * 3)  # wide range
    v = rng.standard_t(3, size=(B, T, H, D))
    k[0, 0, 1, :5] = [np.nan, np.inf, -np.inf, 1e30, -3e-40]   # non-finite, huge, subnormal
    v[-1, -1, 0] = 0.0                                           # an all-zero row: scale 1
    return jnp.asarray(k, jnp.bfloat16), jnp.asarray(v, jnp.float32)


def _bits_equal(a, b):
    """Same bytes, except that any NaN equals any NaN (the f32 -> bf16 convert may canonicalise a
    NaN's payload differently in XLA and Triton; a NaN is a NaN)."""
    if a is None or b is None:
        assert a is None and b is None
        return
    assert a.shape == b.shape and a.dtype == b.dtype
    if jnp.issubdtype(a.dtype, jnp.floating):
        na, nb = np.isnan(np.asarray(a, np.float32)), np.isnan(np.asarray(b, np.float32))
        np.testing.assert_array_equal(na, nb)
        a, b = jnp.where(jnp.asarray(na), 0, a), jnp.where(jnp.asarray(nb), 0, b)
    ua = np.asarray(jax.lax.bitcast_convert_type(a, jnp.uint8 if a.dtype.itemsize == 1 else
                                                 {2: jnp.uint16, 4: jnp.uint32}[a.dtype.itemsize]))
    ub = np.asarray(jax.lax.bitcast_convert_type(b, ua.dtype))
    np.testing.assert_array_equal(ua, ub)


@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.float8_e5m2, jnp.bfloat16])
@pytest.mark.parametrize("T", [1, 5])
def test_kernel_matches_reference_bitwise(dtype, T):
    """Every byte of the cache (written rows, untouched rows, dropped overflow) equals the
    reference: the same f32 math, so exact equality is the right bound."""
    caches = _caches(dtype)
    S, H, D = caches[0].shape[2:]
    k_new, v_new = _new(3, T, H, D, seed=T)
    lengths = jnp.array([0, 7, S - 2], jnp.int32)       # the last one overflows when T > 2
    got = K.kv_append(*caches, k_new, v_new, lengths, 1, interpret=True)
    want = K.kv_append_reference(*caches, k_new, v_new, lengths, 1)
    for g, w in zip(got, want):
        _bits_equal(g, w)
    # Layer 0 and the rows outside [lengths, lengths + T) are untouched.
    _bits_equal(got[0][0], caches[0][0])
    _bits_equal(got[1][1, 1, :7], caches[1][1, 1, :7])


def test_matches_kv_cache_append_per_token_head():
    """The kernel writes what jfp8.kv_cache.append (XLA) writes, data and scales, bit for bit."""
    L, B, S, H, D = 2, 3, 21, 2, 128
    cache = jfp8.KVCache.init(L, B, S, H, D)
    cache = kvc.advance(cache, jnp.array([0, 5, 20], jnp.int32))
    k_new, v_new = _new(B, 1, H, D, seed=3)
    want = kvc.append(cache, 1, k_new, v_new)
    k, v, ks, vs = K.kv_append(cache.k, cache.v, cache.k_scale, cache.v_scale, k_new, v_new,
                               cache.lengths, 1, interpret=True)
    _bits_equal(k, want.k)
    _bits_equal(v, want.v)
    _bits_equal(ks, want.k_scale)
    _bits_equal(vs, want.v_scale)


def test_no_retrace_across_positions_and_layers():
    caches = _caches(jnp.float8_e4m3fn)
    S, H, D = caches[0].shape[2:]
    k_new, v_new = _new(3, 1, H, D, seed=9)
    f = chex.assert_max_traces(n=1)(lambda c, kn, vn, ln, l: K.kv_append(
        *c, kn, vn, ln, l, interpret=True))
    f = jax.jit(f)
    for step in range(3):
        caches = f(caches, k_new, v_new, jnp.array([step, step + 3, 4], jnp.int32),
                   jnp.int32(step % 2))


def test_bad_inputs():
    k, v, ks, vs = _caches(jnp.float8_e4m3fn)
    S, H, D = k.shape[2:]
    k_new, v_new = _new(3, 1, H, D, seed=1)
    lengths = jnp.zeros((3,), jnp.int32)
    with pytest.raises(ValueError, match="k_scale"):
        K.kv_append(k, v, None, vs, k_new, v_new, lengths, 0, interpret=True)
    with pytest.raises(ValueError, match="k_new"):
        K.kv_append(k, v, ks, vs, k_new[:, :, :2], v_new, lengths, 0, interpret=True)
    with pytest.raises(ValueError, match="v_cache"):
        K.kv_append(k, v[:, :2], ks, vs, k_new, v_new, lengths, 0, interpret=True)
    with pytest.raises(ValueError, match="lengths"):
        K.kv_append(k, v, ks, vs, k_new, v_new, lengths[:2], 0, interpret=True)
    with pytest.raises(TypeError, match="k_cache"):
        K.kv_append(k.astype(jnp.float32), v.astype(jnp.float32), ks, vs, k_new, v_new, lengths,
                    0, interpret=True)
    kb, vb, _, _ = _caches(jnp.bfloat16)
    with pytest.raises(ValueError, match="k_scale"):
        K.kv_append(kb, vb, ks, vs, k_new, v_new, lengths, 0, interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.float8_e5m2, jnp.bfloat16])
def test_gpu_kernel_matches_reference_bitwise(dtype):
    """Compiled through Triton: `div.rn.f32` and the saturating cast give the reference's bits."""
    caches = _caches(dtype, L=3, B=4, S=300, H=8, D=128, seed=5)
    k_new, v_new = _new(4, 3, 8, 128, seed=6)
    lengths = jnp.array([0, 100, 298, 299], jnp.int32)
    got = jax.jit(K.kv_append)(*caches, k_new, v_new, lengths, 2)
    want = K.kv_append_reference(*caches, k_new, v_new, lengths, 2)
    for g, w in zip(got, want):
        _bits_equal(g, w)
