"""jfp8.kv_cache: init, quantized append at ragged lengths, advance, overflow, memory calculator."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jfp8
from jfp8 import kv_cache as kvc
from jfp8.kv_cache import KVCache

L, B, S, HKV, D = 2, 3, 16, 2, 8


def _dequant(cache, layer):
    """One layer's K and V as (B, S, Hkv, D) f32 values."""
    k, v, ks, vs = cache.layer_kv(layer)
    k, v = k.astype(jnp.float32), v.astype(jnp.float32)
    if cache.scaling == "per_token_head":
        return k * ks[..., None], v * vs[..., None]
    return k * cache.k_scale[layer], v * cache.v_scale[layer]


@functools.partial(jax.jit, static_argnums=(1, 2))
def _rand(key, T, scale=1.0):
    k1, k2 = jax.random.split(key)
    return (jax.random.normal(k1, (B, T, HKV, D)) * scale,
            jax.random.normal(k2, (B, T, HKV, D)) * scale)


@pytest.mark.parametrize("dtype,scaling", [(jfp8.E4M3, "per_token_head"), (jfp8.E5M2, "per_token_head"),
                                           (jfp8.E4M3, "per_tensor"), (jnp.bfloat16, "per_tensor")])
def test_init_shapes_and_nbytes(dtype, scaling):
    c = KVCache.init(L, B, S, HKV, D, dtype=dtype, scaling=scaling)
    fp8 = dtype != jnp.bfloat16     # FP8 head-major, V in blocks of v_block(D) tokens; bf16 "sd"
    vb = kvc.v_block(D)
    assert vb == 16384 // D and kvc.v_block(128) == 128 and kvc.v_block(64) == 256
    nb = -(-S // vb)
    assert c.k.shape == ((L, B, HKV, S, D) if fp8 else (L, B, S, HKV, D))
    assert c.v.shape == ((L, B, HKV, nb, D, vb) if fp8 else (L, B, S, HKV, D))
    assert c.layout == ("hsd" if fp8 else "sd")
    k1, v1, ks1, vs1 = c.layer_kv(1)
    assert k1.shape == v1.shape == (B, S, HKV, D)
    if c.scaling == "per_token_head":
        assert c.k_scale.shape == (L, B, HKV, S) and ks1.shape == vs1.shape == (B, S, HKV)
    assert c.lengths.shape == (B,) and c.lengths.dtype == jnp.int32
    assert c.max_len == S and c.num_layers == L and c.num_kv_heads == HKV and c.head_dim == D
    data = L * B * (S + (nb * vb if fp8 else S)) * HKV * D * jnp.dtype(c.dtype).itemsize
    # per-(token, head) scales in bf16 (2 bytes), per-tensor ones f32 per layer
    scales = 2 * (2 * L * B * S * HKV if c.scaling == "per_token_head" else 4 * L)
    assert c.nbytes == data + scales + B * 4 + B
    leaves = jax.tree_util.tree_leaves(c)
    assert len(leaves) == 6   # a pytree of arrays; scaling is static


@pytest.mark.parametrize("dtype,scaling,tol", [
    (jfp8.E4M3, "per_token_head", 2 ** -4),   # half an E4M3 ulp relative to the row max
    (jfp8.E5M2, "per_token_head", 2 ** -3),
    (jfp8.E4M3, "per_tensor", 2 ** -4 * 2),   # 2x headroom costs at most one binade near 0
    (jnp.bfloat16, "per_tensor", 2 ** -8)])
def test_append_writes_at_ragged_lengths(dtype, scaling, tol):
    c = KVCache.init(L, B, S, HKV, D, dtype=dtype, scaling=scaling)
    c = kvc.advance(c, jnp.array([0, 3, 9]))
    k_new, v_new = _rand(jax.random.key(np.random.randint(1 << 30)), 4)
    before = c
    c = kvc.append(c, 1, k_new, v_new)
    np.testing.assert_array_equal(c.lengths, before.lengths)      # append does not advance
    kd, vd = _dequant(c, 1)
    for b, start in enumerate([0, 3, 9]):
        got_k, got_v = kd[b, start:start + 4], vd[b, start:start + 4]
        for got, want in ((got_k, k_new[b]), (got_v, v_new[b])):
            row_max = jnp.max(jnp.abs(want), axis=-1, keepdims=True)
            assert float(jnp.max(jnp.abs(got - want) / row_max)) <= tol
        # Nothing else in this sequence or layer 0 changed.
        untouched = np.ones(S, bool)
        untouched[start:start + 4] = False
        np.testing.assert_array_equal(np.asarray(c.layer_kv(1)[0][b])[untouched],
                                      np.asarray(before.layer_kv(1)[0][b])[untouched])
    np.testing.assert_array_equal(np.asarray(c.k[0]), np.asarray(before.k[0]))


def test_per_tensor_static_and_first_write_scales():
    c = KVCache.init(L, B, S, HKV, D, scaling="per_tensor", k_scale=0.5, v_scale=[0.25, 0.125])
    np.testing.assert_allclose(c.k_scale, [0.5, 0.5])
    k_new, v_new = _rand(jax.random.key(1), 2)
    c2 = kvc.append(c, 0, k_new, v_new)
    np.testing.assert_allclose(c2.k_scale, [0.5, 0.5])              # static stays
    d = KVCache.init(L, B, S, HKV, D, scaling="per_tensor")
    assert float(d.k_scale[0]) == 0.0                               # unset
    d = kvc.append(d, 0, k_new, v_new)
    amax = float(jnp.max(jnp.abs(k_new)))
    np.testing.assert_allclose(float(d.k_scale[0]), 2 * amax / 448, rtol=1e-6)
    assert float(d.k_scale[1]) == 0.0
    # The scale is fixed once set: a larger second write saturates instead of rescaling.
    d2 = kvc.append(kvc.advance(d, 2), 0, 10 * k_new, v_new)
    assert float(d2.k_scale[0]) == float(d.k_scale[0])
    assert float(jnp.max(jnp.abs(d2.k[0].astype(jnp.float32)))) == 448.0


def test_overflow_outside_jit_raises():
    c = KVCache.init(L, B, S, HKV, D)
    c = kvc.advance(c, jnp.array([0, 14, 3]))
    k_new, v_new = _rand(jax.random.key(2), 3)
    with pytest.raises(ValueError, match="overflows the cache"):
        kvc.append(c, 0, k_new, v_new)
    with pytest.raises(ValueError, match="S_max=16"):
        kvc.advance(c, 3)


def test_overflow_inside_jit_drops_writes_and_flags():
    c = KVCache.init(L, B, S, HKV, D, dtype=jnp.bfloat16)
    c = kvc.advance(c, jnp.array([0, 14, 3]))
    k_new, v_new = _rand(jax.random.key(3), 3)

    @jax.jit
    def step(c, k, v):
        c = kvc.append(c, 0, k, v)
        return kvc.advance(c, 3)
    out = step(c, k_new, v_new)
    np.testing.assert_array_equal(out.overflow, [False, True, False])
    np.testing.assert_array_equal(out.lengths, [3, 16, 6])          # clamped at S_max
    # Sequence 1 got the 2 tokens that fit (positions 14, 15); the third was dropped.
    np.testing.assert_array_equal(np.asarray(out.k[0, 1, 14:16], np.float32),
                                  np.asarray(k_new[1, :2].astype(jnp.bfloat16), np.float32))
    # No other sequence was touched beyond its own new tokens.
    np.testing.assert_array_equal(np.asarray(out.k[0, 0, 3:], np.float32), 0.0)
    np.testing.assert_array_equal(np.asarray(out.k[0, 2, :3], np.float32), 0.0)
    np.testing.assert_array_equal(np.asarray(out.k[0, 2, 6:], np.float32), 0.0)


def test_append_jit_donated_no_retrace():
    c = KVCache.init(L, B, S, HKV, D)

    @chex.assert_max_traces(n=1)
    def step(c, layer, k, v):
        c = kvc.append(c, layer, k, v)
        return kvc.advance(c, 1)
    step_donated = jax.jit(step, donate_argnums=0)
    for i in range(4):
        k_new, v_new = _rand(jax.random.key(i), 1)
        c = step_donated(c, jnp.int32(i % L), k_new, v_new)
    np.testing.assert_array_equal(c.lengths, [4, 4, 4])


def test_bad_inputs():
    c = KVCache.init(L, B, S, HKV, D)
    with pytest.raises(ValueError, match="k_new"):
        kvc.append(c, 0, jnp.zeros((B, 1, HKV, D + 1)), jnp.zeros((B, 1, HKV, D + 1)))
    with pytest.raises(ValueError, match="k_new"):
        kvc.append(c, 0, jnp.zeros((B, 1, HKV + 1, D)), jnp.zeros((B, 1, HKV + 1, D)))
    with pytest.raises(ValueError, match="v_new"):
        kvc.append(c, 0, jnp.zeros((B, 1, HKV, D)), jnp.zeros((B, 2, HKV, D)))
    with pytest.raises(ValueError, match="layer"):
        kvc.append(c, 5, jnp.zeros((B, 1, HKV, D)), jnp.zeros((B, 1, HKV, D)))
    with pytest.raises(ValueError, match="scaling"):
        KVCache.init(L, B, S, HKV, D, scaling="per_block")
    with pytest.raises(ValueError, match="dtype"):
        KVCache.init(L, B, S, HKV, D, dtype=jnp.float32)
    with pytest.raises(ValueError, match="k_scale"):
        KVCache.init(L, B, S, HKV, D, scaling="per_tensor", k_scale=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="max_len"):
        KVCache.init(L, B, 0, HKV, D)
    with pytest.raises(ValueError, match="num_tokens"):
        kvc.advance(c, jnp.array([1, 2]))


def test_tokens_per_gb_8b_shape():
    bf16 = kvc.tokens_per_gb(32, 8, 128, jnp.bfloat16)
    fp8 = kvc.tokens_per_gb(32, 8, 128, jfp8.E4M3, "per_tensor")
    fp8_tok = kvc.tokens_per_gb(32, 8, 128, jfp8.E4M3, "per_token_head")
    assert bf16 == int(1e9 // (32 * 2 * 8 * 128 * 2)) == 7629
    assert fp8 == 2 * bf16 or fp8 == 2 * bf16 + 1           # exactly 2x the bytes
    assert fp8_tok == int(1e9 // (32 * 2 * 8 * (128 + 2)))   # + bf16 scale per (token, head)
    # The calculator agrees with a real cache's bytes (max_len a multiple of the V block: no V
    # padding, which is < one block per (sequence, head) otherwise).
    vb = kvc.v_block(16)
    c = KVCache.init(2, 1, 2 * vb, 2, 16, dtype=jfp8.E4M3, scaling="per_token_head")
    per_token = kvc.bytes_per_token(2, 2, 16, jfp8.E4M3, "per_token_head")
    assert c.nbytes - 1 * 4 - 1 == 2 * vb * per_token


_step_cache = {}


@settings(max_examples=10, deadline=None)
@given(lengths=st.lists(st.integers(0, S), min_size=B, max_size=B), T=st.sampled_from([1, 3]),
       layer=st.integers(0, L - 1))
def test_append_advance_match_numpy_model_under_jit(lengths, T, layer):
    # Any lengths (0 .. S_max, overflow included) and T: the cache equals a numpy model that
    # writes each sequence's tokens at lengths[b] + t while < S_max and drops the rest.
    c = kvc.advance(KVCache.init(L, B, S, HKV, D, dtype=jnp.bfloat16), jnp.array(lengths))
    k_new, v_new = _rand(jax.random.key(sum(lengths) + T), T)
    if T not in _step_cache:
        _step_cache[T] = jax.jit(lambda c, layer, k, v: kvc.advance(kvc.append(c, layer, k, v), T))
    out = _step_cache[T](c, jnp.int32(layer), k_new, v_new)
    want_k = np.zeros((L, B, S, HKV, D), np.float32)
    kb = np.asarray(k_new.astype(jnp.bfloat16), np.float32)
    for b, n in enumerate(lengths):
        fit = max(0, min(T, S - n))
        want_k[layer, b, n:n + fit] = kb[b, :fit]
    np.testing.assert_array_equal(np.asarray(out.k, np.float32), want_k)
    np.testing.assert_array_equal(out.lengths, np.minimum(np.array(lengths) + T, S))
    np.testing.assert_array_equal(out.overflow, np.array(lengths) + T > S)


def test_v_block_padding_is_never_written():
    """max_len 19: V's tokens are stored in one block of v_block(D) tokens; an append that
    overflows under jit writes positions < 19 only and the block's padding stays zero."""
    c = kvc.advance(KVCache.init(1, B, 19, HKV, D), jnp.array([15, 0, 17]))
    vb = kvc.v_block(D)
    assert c.v.shape == (1, B, HKV, 1, D, vb) and c.max_len == 19 and c.k.shape[3] == 19
    k_new, v_new = _rand(jax.random.key(5), 6)
    c = jax.jit(lambda c, k, v: kvc.append(c, 0, k, v))(c, k_new, v_new)
    np.testing.assert_array_equal(np.asarray(c.overflow), [True, False, True])
    v = np.asarray(c.v.astype(jnp.float32))
    assert (v[..., 19:] == 0).all()
    assert (np.abs(v[0, 0, :, 0, :, 15:19]).sum(axis=(0, 1)) > 0).all()   # the 4 that fit
    _, vd = _dequant(c, 0)
    np.testing.assert_allclose(vd[1, :6], v_new[1], rtol=2 ** -4, atol=2 ** -4 * 4)
