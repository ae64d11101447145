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


# --- decode_qkv: the fused projection, split + RoPE + append in one kernel -------------------
def _qkv_step(Hq, Hkv, Dh, T, seed, B=2):
    rng = np.random.default_rng(seed)
    qkv = jnp.asarray(rng.normal(size=(B, T, (Hq + 2 * Hkv) * Dh)), jnp.bfloat16)
    angles = rng.integers(0, 4096, size=(B, T, 1)) * (10000.0 ** (-np.arange(Dh // 2) / (Dh // 2)))
    return qkv, jnp.asarray(np.cos(angles), jnp.float32), jnp.asarray(np.sin(angles), jnp.float32)


def _unfused(qkv, cache, cos, sin, Hq):
    """What models/llama.py did before decode_qkv: slice, RoPE, decode."""
    B, T = qkv.shape[:2]
    Hkv, Dh = cache.num_kv_heads, cache.head_dim
    heads = qkv.reshape(B, T, Hq + 2 * Hkv, Dh)
    q = attention.apply_rope(heads[:, :, :Hq], cos, sin)
    k = attention.apply_rope(heads[:, :, Hq:Hq + Hkv], cos, sin)
    return attention.decode(q, k, heads[:, :, Hq + Hkv:], cache, layer=1)


# interpret + per_token_head / bf16: the fused kernels (T = 1: append inside the attention
# kernel; T = 3: kv_append_qkv); interpret + per_tensor and xla: XLA RoPE.
@pytest.mark.parametrize("backend,dtype,scaling,T", [
    ("interpret", jfp8.E4M3, "per_token_head", 3),
    ("interpret", jfp8.E4M3, "per_token_head", 1),
    ("interpret", jnp.bfloat16, "per_tensor", 3),
    ("interpret", jnp.bfloat16, "per_tensor", 1),
    ("interpret", jfp8.E4M3, "per_tensor", 3),
    ("xla", jfp8.E4M3, "per_token_head", 3),
])
def test_decode_qkv_equals_slice_rope_decode(backend, dtype, scaling, T):
    """Same cache bits (data, scales, overflow) and output as slicing + apply_rope + decode, both
    jitted, with one sequence overflowing (its rows past S_max dropped). Interpret: exact. XLA:
    the output within 2^-8, since XLA may keep the rotated q in f32 inside a fusion in one graph
    and not the other (xla_allow_excess_precision); the caches still agree bit for bit."""
    Hq, Hkv, Dh, S_ = 6, 3, 64, 24
    cache = KVCache.init(2, 2, S_, Hkv, Dh, dtype=dtype, scaling=scaling)
    qkv0, c0, s0 = _qkv_step(Hq, Hkv, Dh, 8, seed=1)
    heads = qkv0.reshape(2, 8, Hq + 2 * Hkv, Dh)
    for layer in range(2):                                  # a prompt in the cache first
        _, cache = attention.prefill(heads[:, :, :Hq], heads[:, :, Hq:Hq + Hkv],
                                     heads[:, :, Hq + Hkv:], cache, layer=layer,
                                     lengths=jnp.array([5, 8]))
    cache = kvc.advance(cache, jnp.array([5, S_ - 2 if T > 1 else S_], jnp.int32))  # 1 overflows
    qkv, cos, sin = _qkv_step(Hq, Hkv, Dh, T, seed=2)
    fused = jax.jit(lambda a, c, cs, sn: attention.decode_qkv(a, c, layer=1, num_q_heads=Hq,
                                                              cos=cs, sin=sn))
    with jfp8.use_backend(backend):
        o, got = fused(qkv, cache, cos, sin)
        ref, want = jax.jit(functools.partial(_unfused, Hq=Hq))(qkv, cache, cos, sin)
    assert o.shape == (2, T, Hq, Dh) and o.dtype == jnp.bfloat16
    if backend == "interpret":
        np.testing.assert_array_equal(np.asarray(o, np.float32), np.asarray(ref, np.float32))
    else:
        assert rel_err(o, ref) < 2 ** -8
    np.testing.assert_array_equal(got.overflow, [False, True])
    for name in ("k", "v", "k_scale", "v_scale", "overflow", "lengths"):
        np.testing.assert_array_equal(np.asarray(getattr(got, name), np.float32),
                                      np.asarray(getattr(want, name), np.float32), name)


def test_apply_rope_rotates_pairs():
    """apply_rope = the complex rotation (x1 + i x2) e^{i theta} per pair (d, d + D/2), f32."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 4, 8)).astype(np.float32)
    theta = rng.uniform(0, 10, size=(2, 3, 4)).astype(np.float32)
    got = attention.apply_rope(jnp.asarray(x), jnp.cos(theta), jnp.sin(theta))
    z = (x[..., :4] + 1j * x[..., 4:]) * np.exp(1j * theta)[:, :, None, :]
    np.testing.assert_allclose(got, np.concatenate([z.real, z.imag], -1), atol=1e-5)
    from models import llama
    np.testing.assert_array_equal(llama.apply_rope(jnp.asarray(x), jnp.cos(theta),
                                                   jnp.sin(theta)), got)


@pytest.mark.parametrize("bad,match", [
    (dict(Hq=5), "num_q_heads"),
    (dict(N=(HQ + 2 * HKV) * D - 1), "qkv"),
    (dict(B=2), "qkv"),
    (dict(cos=(B, 1, D)), "cos"),
    (dict(sin=(B, 2, D // 2)), "sin"),
    (dict(lengths=S - 1, T=2), "qkv: writing 2 tokens"),
])
def test_decode_qkv_bad_inputs(bad, match):
    cache = kvc.advance(KVCache.init(1, B, S, HKV, D), jnp.full((B,), bad.get("lengths", 0)))
    T = bad.get("T", 1)
    qkv = jnp.zeros((bad.get("B", B), T, bad.get("N", (HQ + 2 * HKV) * D)), jnp.bfloat16)
    cos = jnp.zeros(bad.get("cos", (B, T, D // 2)), jnp.float32)
    sin = jnp.zeros(bad.get("sin", (B, T, D // 2)), jnp.float32)
    with pytest.raises(ValueError, match=match):
        attention.decode_qkv(qkv, cache, layer=0, num_q_heads=bad.get("Hq", HQ), cos=cos,
                             sin=sin)
