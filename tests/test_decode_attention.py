"""pallas_kernels.decode_attention: the flash-decoding kernel (interpret mode) vs the f32 reference.

Tolerance: the kernel rounds P (and q) to f16 (2^-11) and the output to bf16 (2^-9 relative, half
an ulp); accumulation is f32. The relative Frobenius error against the f32 reference rounded to
bf16 is therefore well under 2^-8; we assert 4e-3.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import decode_attention as da

TOL = 4e-3  # bf16 output rounding (2^-9) + f16 P rounding (2^-11), see the module docstring
TOL_BF16_CACHE = 1e-2  # a bf16 cache runs both MMAs in bf16: P rounded to 2^-9, not 2^-11

# Small tiling so interpret mode stays fast but the kernel still splits S and masks tails.
SMALL = da.DecodeAttentionConfig(block_k=32, target_programs=32, min_blocks_per_split=1)


def rel_err(out, ref):
    """‖out − ref‖ / ‖ref‖ over all elements, in f64 on the host (no per-shape compiles)."""
    out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def _quantize(x, dtype, per_token):
    """x (…, D) f32 -> (data, scale) with x ~ data * scale."""
    fmax = float(jnp.finfo(dtype).max) if dtype != jnp.bfloat16 else None
    if fmax is None:
        return x.astype(dtype), None
    if per_token:
        s = jnp.max(jnp.abs(x), axis=-1) / fmax
        s = jnp.where(s > 0, s, 1.0)
        return jnp.clip(x / s[..., None], -fmax, fmax).astype(dtype), s
    s = jnp.max(jnp.abs(x)) / fmax
    return jnp.clip(x / s, -fmax, fmax).astype(dtype), s


@functools.partial(jax.jit, static_argnums=tuple(range(1, 10)))
def _inputs(key, B, T, Hq, Hkv, D, S, dtype, per_token, L=None):
    kq, kk, kv, kc = jax.random.split(key, 4)
    lead = (B,) if L is None else (L, B)
    q = jax.random.normal(kq, (B, T, Hq, D), jnp.float32).astype(jnp.bfloat16)
    # Keys with a few outlier channels, as real models have them.
    k = jax.random.normal(kk, lead + (S, Hkv, D), jnp.float32)
    k = k * jnp.where(jnp.arange(D) % 17 == 3, 8.0, 1.0)
    v = jax.random.normal(kv, lead + (S, Hkv, D), jnp.float32) * 2.0
    kd, ks = _quantize(k, dtype, per_token)
    vd, vs = _quantize(v, dtype, per_token)
    return q, kd, vd, ks, vs


@pytest.mark.parametrize("dtype,per_token,Hq,Hkv,D", [
    (jnp.float8_e4m3fn, True, 8, 2, 64),      # G = 4, per-(token, head)
    (jnp.float8_e5m2, False, 8, 1, 128),      # G = 8, per-tensor, E5M2
    (jnp.bfloat16, False, 2, 2, 128),         # G = 1, bf16 cache, no scales
    ("e4m3_bf16_scales", True, 8, 2, 64),     # per-(token, head) scales stored in bf16
])
def test_ragged_lengths_match_reference(dtype, per_token, Hq, Hkv, D):
    # Lengths 1, 17, 128, 1000 in one batch; S_max = 1000 is no multiple of block_k.
    bf16_scales = dtype == "e4m3_bf16_scales"
    dtype = jnp.float8_e4m3fn if bf16_scales else dtype
    tol = TOL_BF16_CACHE if dtype == jnp.bfloat16 else TOL
    B, T, S = 4, 1, 1000
    q, k, v, ks, vs = _inputs(jax.random.key(np.random.randint(1 << 30)), B, T, Hq, Hkv, D, S,
                              dtype, per_token)
    if bf16_scales:   # the kernel reads them as stored; the reference dequantizes with the same
        ks, vs = ks.astype(jnp.bfloat16), vs.astype(jnp.bfloat16)
    lengths = jnp.array([1, 17, 128, 1000], jnp.int32)
    out = da.decode_attention(q, k, v, lengths, ks, vs, config=SMALL, interpret=True)
    ref = da.decode_attention_reference(q, k, v, lengths, ks, vs)
    assert out.shape == (B, T, Hq, D) and out.dtype == jnp.bfloat16
    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
    assert rel_err(out, ref) < tol
    # Per sequence too, so one short sequence cannot hide behind the long one.
    for b in range(B):
        assert rel_err(out[b], ref[b]) < tol, b


def test_chunked_decode_stacked_layers_causal():
    # T = 3 new tokens (causal among themselves), stacked (L, B, S, Hkv, D) cache with one
    # per-tensor scale per layer (L,), traced layer index. (Stacked per-(token, head) scales run
    # through the kernel in tests/test_attention.py.)
    L, B, T, Hq, Hkv, D, S = 3, 2, 3, 8, 2, 64, 96
    q, k, v, _, _ = _inputs(jax.random.key(np.random.randint(1 << 30)), B, T, Hq, Hkv, D, S,
                            jnp.float8_e4m3fn, False, L=L)
    ks = jnp.array([0.01, 0.03, 0.02], jnp.float32)
    vs = jnp.array([0.02, 0.005, 0.01], jnp.float32)
    lengths = jnp.array([3, 70], jnp.int32)
    f = jax.jit(lambda q, k, v, lengths, ks, vs, layer: da.decode_attention(
        q, k, v, lengths, ks, vs, layer=layer, config=SMALL, interpret=True))
    out = f(q, k, v, lengths, ks, vs, jnp.int32(1))
    ref = da.decode_attention_reference(q, k, v, lengths, ks, vs, layer=1)
    assert rel_err(out, ref) < TOL
    # Layer 1 really was read: layer 2's answer differs.
    other = da.decode_attention_reference(q, k, v, lengths, ks, vs, layer=2)
    assert rel_err(out, other) > 0.1
    # Causality: the first new token ignores the two after it.
    ref_first = da.decode_attention_reference(q[:, :1], k, v, lengths - 2, ks, vs, layer=1)
    assert rel_err(out[:, :1], ref_first) < TOL


def test_reference_matches_dense_attention():
    # The reference itself against jax.nn.dot_product_attention on the dequantized cache.
    B, T, Hq, Hkv, D, S = 2, 1, 8, 2, 64, 40
    q, k, v, ks, vs = _inputs(jax.random.key(np.random.randint(1 << 30)), B, T, Hq, Hkv, D, S,
                              jnp.float8_e4m3fn, True)
    lengths = jnp.array([40, 40], jnp.int32)
    ref = da.decode_attention_reference(q, k, v, lengths, ks, vs)
    kf = k.astype(jnp.float32) * ks[..., None]
    vf = v.astype(jnp.float32) * vs[..., None]
    dense = jax.nn.dot_product_attention(q.astype(jnp.float32), kf, vf)
    assert rel_err(ref, dense) < 2 ** -8   # bf16 rounding of the reference output


def test_config_for_and_splits():
    for B in (1, 8, 32):
        for S in (1024, 32768, 131072):
            cfg = da.config_for(B, S)
            splits = cfg.num_splits(B, 8, S)
            assert 1 <= splits <= pl_cdiv(S, cfg.block_k)
            # Enough programs to fill the GPU whenever S allows.
            assert B * 8 * splits >= min(cfg.target_programs // 2,
                                         B * 8 * pl_cdiv(S, cfg.block_k * cfg.min_blocks_per_split))


def test_config_for_head_dim_64_uses_its_own_entry_where_the_table_has_one():
    # D <= 64 reads half the bytes per token: its sweep picked longer blocks at B > 8, S > 8K.
    assert da.config_for(16, 32768, 64) is da.CONFIGS[("large", "long", "d64")]
    assert da.config_for(16, 32768, 128) is da.CONFIGS[("large", "long")]
    assert da.config_for(16, 32768) is da.CONFIGS[("large", "long")]
    # no d64 entry for short caches: the D = 128 one serves
    assert da.config_for(16, 4096, 64) is da.CONFIGS[("large", "short")]


def pl_cdiv(a, b):
    return -(-a // b)


@pytest.mark.parametrize("bad,match", [
    (dict(Hq=6, Hkv=4), "multiple of Hkv"),
    (dict(kD=32), "head dim D=64"),
    (dict(D=96, kD=96), "64 or 128"),
    (dict(lengths=[5, 65]), "lengths"),
    (dict(lengths=[0, 3]), "lengths"),
    (dict(T=17), "T <= 16"),
    (dict(ks_shape=(3,)), "k_scale"),
])
def test_bad_inputs(bad, match):
    B, T, Hq, Hkv, D, kD, S = 2, bad.get("T", 1), bad.get("Hq", 8), bad.get("Hkv", 2), \
        bad.get("D", 64), bad.get("kD", 64), 64
    q = jnp.zeros((B, T, Hq, D), jnp.bfloat16)
    k = jnp.zeros((B, S, Hkv, kD), jnp.float8_e4m3fn)
    lengths = jnp.array(bad.get("lengths", [T, T]), jnp.int32)
    ks = jnp.ones(bad.get("ks_shape", ()), jnp.float32)
    with pytest.raises(ValueError, match=match):
        da.decode_attention(q, k, k, lengths, ks, jnp.float32(1.0), interpret=True)


def test_stacked_cache_needs_layer():
    q = jnp.zeros((1, 1, 4, 64), jnp.bfloat16)
    k = jnp.zeros((2, 1, 32, 1, 64), jnp.float8_e4m3fn)
    with pytest.raises(ValueError, match="layer"):
        da.decode_attention(q, k, k, jnp.array([3]), jnp.float32(1), jnp.float32(1))


@pytest.mark.gpu
@pytest.mark.parametrize("layout", da.LAYOUTS)
@pytest.mark.parametrize("B,S,D,early_v", [(8, 4096, 128, False), (1, 32768, 128, False),
                                           (4, 4100, 64, False), (1, 4128, 128, True),
                                           (8, 4096, 128, True)])
def test_gpu_kernel_matches_reference(B, S, D, early_v, layout):
    q, k, v, ks, vs = _inputs(jax.random.key(0), B, 1, 32, 8, D, S, jnp.float8_e4m3fn, True)
    if layout == "hsd":
        k, v, ks, vs = _to_hsd(k, v, ks, vs, 16384 // D)
    lengths = jnp.asarray(np.random.randint(1, S + 1, size=B), jnp.int32)
    config = dataclasses.replace(da.config_for(B, S, D), early_v=early_v)
    out = da.decode_attention(q, k, v, lengths, ks, vs, layout=layout, config=config)
    ref = da.decode_attention_reference(q, k, v, lengths, ks, vs, layout=layout)
    assert rel_err(out, ref) < TOL


@pytest.mark.parametrize("B,T,Hq,Hkv,D,S,lengths", [
    (2, 2, 16, 2, 128, 1000, (1000, 37)),   # 63 splits: the combine walks 16 chunks of 4
    (1, 1, 9, 3, 64, 300, (300,)),          # G = 3: rows padded to 4 in the partials
])
def test_many_splits_combine(B, T, Hq, Hkv, D, S, lengths):
    """The split combine (its own kernel) over many splits, several load chunks, and a group
    size that is not a power of two; per-tensor scales. Tolerance as above (f16 operands)."""
    cfg = da.DecodeAttentionConfig(block_k=16, target_programs=64 * B * Hkv, min_blocks_per_split=1)
    k1, k2, k3 = jax.random.split(jax.random.key(S), 3)
    q = jax.random.normal(k1, (B, T, Hq, D), jnp.bfloat16)
    k = (jax.random.normal(k2, (B, S, Hkv, D)) * 2).astype(jnp.float8_e4m3fn)
    v = jax.random.normal(k3, (B, S, Hkv, D)).astype(jnp.float8_e4m3fn)
    lengths = jnp.array(lengths, jnp.int32)
    ks, vs = jnp.float32(0.5), jnp.float32(0.25)
    o = da.decode_attention(q, k, v, lengths, ks, vs, config=cfg, interpret=True)
    r = da.decode_attention_reference(q, k, v, lengths, ks, vs)
    o, r = o.astype(jnp.float32), r.astype(jnp.float32)
    assert float(jnp.linalg.norm(o - r) / jnp.linalg.norm(r)) < 4e-3


def test_combine_split_along_d_is_bit_exact(monkeypatch):
    """B * Hkv = 2 pairs: the combine splits D into 128 / 32 = 4 parts (COMBINE_MIN_PROGRAMS);
    every output column is combined on its own, so the parts give the very same bits as one
    program per pair."""
    B, T, Hq, Hkv, D, S = 1, 1, 8, 2, 128, 700
    cfg = da.DecodeAttentionConfig(block_k=32, target_programs=64, min_blocks_per_split=1)
    q, k, v, ks, vs = _inputs(jax.random.key(np.random.randint(1 << 30)), B, T, Hq, Hkv, D, S,
                              jnp.float8_e4m3fn, True)
    lengths = jnp.array([613], jnp.int32)
    split = da.decode_attention(q, k, v, lengths, ks, vs, config=cfg, interpret=True)
    monkeypatch.setattr(da, "COMBINE_MIN_PROGRAMS", 1)
    jax.clear_caches()   # the constant is read at trace time
    whole = da.decode_attention(q, k, v, lengths, ks, vs, config=cfg, interpret=True)
    np.testing.assert_array_equal(np.asarray(split, np.float32), np.asarray(whole, np.float32))
    assert rel_err(split, da.decode_attention_reference(q, k, v, lengths, ks, vs)) < TOL


def _to_hsd(k, v, k_scale, v_scale, vb):
    """"sd" arrays (..., S, Hkv, D) -> the "hsd" layout: K (..., Hkv, S, D), V in blocks
    (..., Hkv, ceil(S / vb), D, vb) whose padding past S is NaN (a kernel that reads a padded
    token returns NaN), per-(token, head) scales (..., Hkv, S)."""
    S = k.shape[-3]
    nb = -(-S // vb)
    vt = jnp.moveaxis(v, -3, -1)                                            # (..., Hkv, D, S)
    vt = jnp.concatenate([vt, jnp.full(vt.shape[:-1] + (nb * vb - S,), jnp.nan, v.dtype)], -1)
    vt = jnp.swapaxes(vt.reshape(vt.shape[:-1] + (nb, vb)), -3, -2)         # (..., Hkv, nb, D, vb)
    if k_scale is not None and jnp.ndim(k_scale) == k.ndim - 1:
        k_scale, v_scale = jnp.swapaxes(k_scale, -1, -2), jnp.swapaxes(v_scale, -1, -2)
    return jnp.swapaxes(k, -3, -2), vt, k_scale, v_scale


@pytest.mark.parametrize("dtype,per_token,D,stacked,vb", [
    (jnp.float8_e4m3fn, True, 64, False, 64),    # per-(token, head) scales
    (jnp.float8_e4m3fn, False, 128, True, 32),   # stacked layers, per-tensor scales per layer
    (jnp.bfloat16, False, 64, False, 16),        # bf16 cache
])
def test_layout_hsd_matches_sd(dtype, per_token, D, stacked, vb):
    # The same cache stored head-major with V in blocks of vb tokens: the reference gives the
    # very same bits as for "sd", the kernel (whose block is vb) matches it; S = 200 is no
    # multiple of vb, so the bounded (masked) loads run too, and the last V block's NaN padding
    # must never be read.
    tol = TOL_BF16_CACHE if dtype == jnp.bfloat16 else TOL
    B, T, Hq, Hkv, S = 2, 2, 8, 2, 200
    L = 3 if stacked else None
    q, k, v, ks, vs = _inputs(jax.random.key(np.random.randint(1 << 30)), B, T, Hq, Hkv, D, S,
                              dtype, per_token, L)
    if stacked:
        ks = jnp.array([0.01, 0.03, 0.02], jnp.float32)
        vs = jnp.array([0.02, 0.005, 0.01], jnp.float32)
    kw = dict(layer=1) if stacked else {}
    lengths = jnp.array([S, 37], jnp.int32)
    ref = da.decode_attention_reference(q, k, v, lengths, ks, vs, **kw)
    hsd = _to_hsd(k, v, ks, vs, vb)
    assert hsd[1].shape == da.v_shape_for(hsd[0].shape, "hsd", vb)
    ref_hsd = da.decode_attention_reference(q, *hsd[:2], lengths, *hsd[2:], layout="hsd", **kw)
    np.testing.assert_array_equal(np.asarray(ref, np.float32), np.asarray(ref_hsd, np.float32))
    out = da.decode_attention(q, *hsd[:2], lengths, *hsd[2:], config=SMALL, interpret=True,
                              layout="hsd", **kw)
    assert rel_err(out, ref) < tol


@pytest.mark.parametrize("layout,per_token", [("hsd", True), ("sd", False)])
def test_early_v_loads_give_the_same_bits(layout, per_token):
    # early_v only moves the V tile's (and V scales') loads ahead of the QK dot: the same
    # arithmetic, so the same bits; S = 200 with 64-token blocks runs the bounded loads too, and
    # one sequence spans several blocks (the looped path) while the other fits in one.
    B, T, Hq, Hkv, D, S = 2, 1, 8, 2, 64, 200
    q, k, v, ks, vs = _inputs(jax.random.key(np.random.randint(1 << 30)), B, T, Hq, Hkv, D, S,
                              jnp.float8_e4m3fn, per_token)
    if layout == "hsd":
        k, v, ks, vs = _to_hsd(k, v, ks, vs, 64)
    lengths = jnp.array([S, 37], jnp.int32)
    outs = [da.decode_attention(q, k, v, lengths, ks, vs, layout=layout, interpret=True,
                                config=da.DecodeAttentionConfig(block_k=64, target_programs=8,
                                                                early_v=early_v))
            for early_v in (False, True)]
    np.testing.assert_array_equal(np.asarray(outs[0], np.float32), np.asarray(outs[1], np.float32))
    ref = da.decode_attention_reference(q, k, v, lengths, ks, vs, layout=layout)
    assert rel_err(outs[1], ref) < TOL


def test_layout_bad_inputs():
    q = jnp.zeros((1, 1, 4, 64), jnp.bfloat16)
    k = jnp.zeros((1, 32, 1, 64), jnp.float8_e4m3fn)
    with pytest.raises(ValueError, match="layout"):
        da.decode_attention(q, k, k, jnp.array([3]), layout="ds")
    with pytest.raises(ValueError, match=r"v: expected shape \(1, 32, ceil\(S / VB\), 64, VB\)"):
        da.decode_attention(q, k, k, jnp.array([3]), layout="hsd")   # "sd"-shaped v
    k_hsd = jnp.zeros((1, 1, 32, 64), jnp.float8_e4m3fn)
    for bad_v in [(1, 1, 1, 64, 24),     # VB not a power of two
                  (1, 1, 1, 64, 16),     # blocks cover 16 < S = 32 tokens
                  (1, 1, 2, 64, 8)]:     # VB < 16
        with pytest.raises(ValueError, match="VB a power of two >= 16"):
            da.decode_attention(q, k_hsd, jnp.zeros(bad_v, k.dtype), jnp.array([3]),
                                layout="hsd")
    with pytest.raises(ValueError, match=r"per-\(token, head\) scale of shape \(1, 1, 32\)"):
        da.decode_attention(q, k_hsd, jnp.zeros((1, 1, 2, 64, 16), k.dtype), jnp.array([3]),
                            jnp.ones((1, 32, 1)), jnp.ones((1, 32, 1)), layout="hsd")


@pytest.mark.parametrize("layout", da.LAYOUTS)
def test_kernel_lowers_for_cuda(layout):
    # Lowers the Triton kernel for CUDA without a GPU: catches lowering errors of either layout
    # on CPU CI (the numerics are checked in interpret mode above and on the device).
    B, S, Hq, Hkv, D, L = 2, 500, 8, 2, 128, 2
    q = jax.ShapeDtypeStruct((B, 1, Hq, D), jnp.bfloat16)
    k_shape = (L, B, Hkv, S, D) if layout == "hsd" else (L, B, S, Hkv, D)
    k = jax.ShapeDtypeStruct(k_shape, jnp.float8_e4m3fn)
    v = jax.ShapeDtypeStruct(da.v_shape_for(k_shape, layout, 128), jnp.float8_e4m3fn)
    sc = jax.ShapeDtypeStruct(k_shape[:-1], jnp.float32)
    lens = jax.ShapeDtypeStruct((B,), jnp.int32)
    fn = functools.partial(da.decode_attention, layer=1, layout=layout)
    jax.jit(fn).trace(q, k, v, lens, sc, sc).lower(lowering_platforms=("cuda",))
