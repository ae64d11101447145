"""jfp8.attention: prefill + decode over a KVCache, every backend, vs attention over the
concatenated unquantized sequence.

Tolerances: against f32 attention over the *unquantized* K/V the error is the KV quantization
error (E4M3 per-(token, head): values within 2^-4 of their row max, the output error averages
down to a few 1e-2 on Gaussian data; bf16 cache: 2^-8). Between backends on the same cache only
f16/bf16 rounding differs (4e-3, see tests/test_decode_attention.py).
"""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jfp8
from jfp8 import attention
from jfp8 import kv_cache as kvc
from jfp8.kv_cache import KVCache

L, B, S, HQ, HKV, D = 2, 3, 48, 8, 2, 64


def rel_err(out, ref):
    """‖out − ref‖ / ‖ref‖ over all elements, in f64 on the host (no per-shape compiles)."""
    out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


@functools.partial(jax.jit, static_argnums=1)
def _qkv(key, T):
    kq, kk, kv = jax.random.split(key, 3)
    return (jax.random.normal(kq, (B, T, HQ, D), jnp.float32).astype(jnp.bfloat16),
            jax.random.normal(kk, (B, T, HKV, D), jnp.float32).astype(jnp.bfloat16),
            jax.random.normal(kv, (B, T, HKV, D), jnp.float32).astype(jnp.bfloat16))


@jax.jit
def _dense(q, k, v, mask):
    """f32 GQA attention of q (B, T, Hq, D) over k, v (B, N, Hkv, D) with mask (B, T, N)."""
    return jax.nn.dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                        v.astype(jnp.float32), mask=mask[:, None])


def _concat_reference(qp, kp, vp, lengths, q, k_new, v_new):
    """Decode reference over [prompt[:lengths[b]], new tokens] (causal among the new ones),
    by masking the padded concatenation: one compile for all sequences."""
    T0, T = kp.shape[1], q.shape[1]
    kk = jnp.concatenate([kp, k_new], axis=1)
    vv = jnp.concatenate([vp, v_new], axis=1)
    j = jnp.arange(T0 + T)
    prompt_ok = j[None, None, :] < lengths[:, None, None]
    new_ok = (j[None, None, :] >= T0) & (j[None, None, :] <= T0 + jnp.arange(T)[None, :, None])
    return _dense(q, kk, vv, prompt_ok | new_ok)


def _prefill_all_layers(cache, q, k, v, lengths):
    for layer in range(L):
        o, cache = attention.prefill(q, k, v, cache, layer=layer, lengths=lengths)
    return o, kvc.advance(cache, lengths)


def _causal_reference(q, k, v):
    T = q.shape[1]
    causal = jnp.tril(jnp.ones((T, T), bool))
    return _dense(q, k, v, jnp.broadcast_to(causal, (q.shape[0], T, T)))


# The XLA path here; the kernel (interpret mode, slow to compile) runs through the library in
# test_decode_loop_no_retrace_and_matches_xla and alone in tests/test_decode_attention.py.
@pytest.mark.parametrize("dtype,scaling,tol", [
    (jfp8.E4M3, "per_token_head", 0.05),
    (jfp8.E5M2, "per_tensor", 0.1),
    (jnp.bfloat16, "per_tensor", 2 ** -7),
])
def test_prefill_then_decode_equals_attention_over_concatenation(dtype, scaling, tol):
    key = jax.random.key(np.random.randint(1 << 30))
    k1, k2 = jax.random.split(key)
    T0, T = 20, 2
    lengths = jnp.array([5, 20, 13], jnp.int32)         # right-padded prompts
    qp, kp, vp = _qkv(k1, T0)
    cache = KVCache.init(L, B, S, HKV, D, dtype=dtype, scaling=scaling)
    o_pre, cache = _prefill_all_layers(cache, qp, kp, vp, lengths)
    np.testing.assert_array_equal(cache.lengths, lengths)
    q, k_new, v_new = _qkv(k2, T)
    with jfp8.use_backend("xla"):
        o, c2 = attention.decode(q, k_new, v_new, cache, layer=1)
    np.testing.assert_array_equal(c2.lengths, lengths)   # decode does not advance
    ref_pre = _causal_reference(qp, kp, vp)
    ref = _concat_reference(qp, kp, vp, lengths, q, k_new, v_new)
    for b in range(B):
        n = int(lengths[b])
        # Prefill output (valid rows) is plain causal attention over the prompt.
        assert rel_err(o_pre[b, :n], ref_pre[b, :n]) < 2 ** -7
        assert rel_err(o[b], ref[b]) < tol, b


def test_decode_loop_no_retrace_and_matches_xla():
    # A jitted decode step (kernel in interpret mode), cache donated: one trace for all steps,
    # and the kernel agrees with the XLA path step by step.
    cache = KVCache.init(L, B, S, HKV, D)
    lengths = jnp.array([3, 7, 1], jnp.int32)
    qp, kp, vp = _qkv(jax.random.key(0), 8)
    _, cache = _prefill_all_layers(cache, qp, kp, vp, lengths)

    def step(cache, q, k, v):
        # One layer per step keeps interpret-mode compile time down; the stacked cache's other
        # layer must stay untouched.
        o, cache = attention.decode(q, k, v, cache, layer=L - 1)
        return o[None], kvc.advance(cache, q.shape[1])

    with jfp8.use_backend("interpret"):
        step_kernel = jax.jit(chex.assert_max_traces(step, n=1), donate_argnums=0)
    with jfp8.use_backend("xla"):
        step_xla = jax.jit(step)
    ref_cache = jax.tree_util.tree_map(jnp.copy, cache)
    for i in range(3):
        q, k, v = _qkv(jax.random.key(10 + i), 1)
        with jfp8.use_backend("interpret"):
            o, cache = step_kernel(cache, q, k, v)
        with jfp8.use_backend("xla"):
            ref, ref_cache = step_xla(ref_cache, q, k, v)
        assert o.shape == (1, B, 1, HQ, D)
        assert rel_err(o, ref) < 4e-3
    np.testing.assert_array_equal(cache.lengths, lengths + 3)
    # The in-place append kernel writes the bits XLA's scatter writes, in every layer.
    for name in ("k", "v", "k_scale", "v_scale", "overflow"):
        np.testing.assert_array_equal(np.asarray(getattr(cache, name), np.float32),
                                      np.asarray(getattr(ref_cache, name), np.float32), name)


def test_decode_t_over_16_uses_xla_path():
    cache = KVCache.init(1, B, S, HKV, D)
    q, k, v = _qkv(jax.random.key(5), 17)
    with jfp8.use_backend("interpret"):
        o, cache = attention.decode(q, k, v, cache, layer=0)
    assert rel_err(o, _causal_reference(q, k, v)) < 0.05


@pytest.mark.parametrize("backend,dtype", [("xla", jnp.bfloat16), ("interpret", jnp.bfloat16),
                                           ("interpret", jfp8.E4M3)])
def test_decode_overflow_inside_jit_is_flagged_not_corrupting(backend, dtype):
    cache = KVCache.init(1, 2, 8, HKV, D, dtype=dtype)
    cache = kvc.advance(cache, jnp.array([7, 2]))
    q, k, v = _qkv(jax.random.key(6), 2)
    q, k, v = q[:2], k[:2], v[:2]

    @jax.jit
    def step(cache, q, k, v):
        o, cache = attention.decode(q, k, v, cache, layer=0)
        return o, kvc.advance(cache, 2)
    with jfp8.use_backend(backend):
        o, out = step(cache, q, k, v)
    np.testing.assert_array_equal(out.overflow, [True, False])
    np.testing.assert_array_equal(out.lengths, [8, 4])
    assert bool(jnp.all(jnp.isfinite(o.astype(jnp.float32))))
    np.testing.assert_array_equal(np.asarray(out.k[0, 1, 4:], np.float32), 0.0)


@pytest.mark.parametrize("bad,match", [
    (dict(Hq=5), "multiple of the cache's Hkv"),
    (dict(D=32), "head dim"),
    (dict(kT=2), "k: expected"),
    (dict(B=2), "batch"),
])
def test_bad_inputs(bad, match):
    cache = KVCache.init(1, B, S, HKV, D)
    q = jnp.zeros((bad.get("B", B), 1, bad.get("Hq", HQ), bad.get("D", D)), jnp.bfloat16)
    k = jnp.zeros((B, bad.get("kT", 1), HKV, D), jnp.bfloat16)
    with pytest.raises(ValueError, match=match):
        attention.decode(q, k, k, cache, layer=0)


def test_prefill_overflow_outside_jit_raises():
    cache = KVCache.init(1, B, 8, HKV, D)
    q, k, v = _qkv(jax.random.key(7), 10)
    with pytest.raises(ValueError, match="overflows"):
        attention.prefill(q, k, v, cache, layer=0, lengths=jnp.array([3, 9, 1]))
    # Padding past S_max is fine when the valid tokens fit.
    o, cache = attention.prefill(q, k, v, cache, layer=0, lengths=jnp.array([3, 8, 1]))
    assert not bool(cache.overflow.any())
