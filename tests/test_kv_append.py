"""pallas_kernels.kv_append (interpret mode) against its reference and jfp8.kv_cache.append."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jfp8
from jfp8 import attention
from jfp8 import kv_cache as kvc
from pallas_kernels import kv_append as K
from pallas_kernels.decode_attention import cache_dims, to_token_major, v_shape_for


def _caches(dtype, L=2, B=3, S=19, H=3, D=64, seed=0, layout="hsd", vb=16,
            scale_dtype=jnp.float32):
    """Random caches in `layout`; "hsd" V in blocks of vb tokens, the last block's padding
    random bytes that must stay; FP8 ones with per-(token, head) scales of `scale_dtype`."""
    rng = np.random.default_rng(seed)
    k_shape = (L, B, H, S, D) if layout == "hsd" else (L, B, S, H, D)
    k = jnp.asarray(rng.normal(size=k_shape), jnp.float32).astype(dtype)
    v = jnp.asarray(rng.normal(size=v_shape_for(k_shape, layout, vb)), jnp.float32).astype(dtype)
    if jnp.dtype(dtype) == jnp.bfloat16:
        return k, v, None, None
    ks = jnp.asarray(rng.uniform(0.5, 2, size=k_shape[:-1]), scale_dtype)
    vs = jnp.asarray(rng.uniform(0.5, 2, size=k_shape[:-1]), scale_dtype)
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


@pytest.mark.parametrize("dtype,scale_dtype", [
    (jnp.float8_e4m3fn, jnp.float32), (jnp.float8_e4m3fn, jnp.bfloat16),
    (jnp.float8_e5m2, jnp.float32), (jnp.float8_e5m2, jnp.bfloat16), (jnp.bfloat16, None)])
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("layout", K.LAYOUTS)
def test_kernel_matches_reference_bitwise(dtype, scale_dtype, T, layout):
    """Every byte of the cache (written rows, untouched rows, dropped overflow, V's block
    padding) equals the reference: the same f32 math, so exact equality is the right bound.
    bf16 scales (jfp8.KVCache's) are rounded before the row is quantized with them, in both."""
    caches = _caches(dtype, layout=layout, scale_dtype=scale_dtype)
    _, S, H, D = cache_dims(caches[0].shape, layout)
    k_new, v_new = _new(3, T, H, D, seed=T)
    lengths = jnp.array([0, 7, S - 2], jnp.int32)       # the last one overflows when T > 2
    got = K.kv_append(*caches, k_new, v_new, lengths, 1, layout=layout, interpret=True)
    want = K.kv_append_reference(*caches, k_new, v_new, lengths, 1, layout=layout)
    for g, w in zip(got, want):
        _bits_equal(g, w)
    # Layer 0, the rows outside [lengths, lengths + T) and V's block padding are untouched.
    _bits_equal(got[0][0], caches[0][0])
    _bits_equal(got[1][0], caches[1][0])
    if layout == "hsd":
        _bits_equal(got[1][..., -1, :, S % 16:], caches[1][..., -1, :, S % 16:])
    v_sd, v0_sd = (to_token_major(c[0], c[1], None, None, layout)[1] for c in (got, caches))
    _bits_equal(v_sd[1, 1, :7], v0_sd[1, 1, :7])


@pytest.mark.parametrize("dtype", [jfp8.E4M3, jnp.bfloat16])
def test_matches_kv_cache_append(dtype):
    """The kernel writes what jfp8.kv_cache.append (XLA) writes into a KVCache in its own layout
    (FP8 head-major with V in padded token blocks, bf16 token-major), data and scales, bit for
    bit."""
    L, B, S, H, D = 2, 3, 21, 2, 128
    cache = jfp8.KVCache.init(L, B, S, H, D, dtype=dtype)
    cache = kvc.advance(cache, jnp.array([0, 5, 20], jnp.int32))
    k_new, v_new = _new(B, 1, H, D, seed=3)
    want = kvc.append(cache, 1, k_new, v_new)
    fp8 = cache.scaling == "per_token_head"
    k, v, ks, vs = K.kv_append(cache.k, cache.v, cache.k_scale if fp8 else None,
                               cache.v_scale if fp8 else None, k_new, v_new, cache.lengths, 1,
                               layout=cache.layout, interpret=True)
    _bits_equal(k, want.k)
    _bits_equal(v, want.v)
    if fp8:
        _bits_equal(ks, want.k_scale)
        _bits_equal(vs, want.v_scale)


_append_pair = {}


@settings(max_examples=8, deadline=None)
@given(lengths=st.lists(st.integers(0, 37), min_size=2, max_size=2), T=st.sampled_from([1, 4]),
       layer=st.integers(0, 1))
def test_kernel_equals_kv_cache_append_any_lengths(lengths, T, layer):
    """For any lengths (overflow past S_max = 37 included) the kernel and jfp8.kv_cache.append
    (XLA) leave the same bytes in an FP8 KVCache ("hsd": V in one padded 128-token block)."""
    cache = kvc.advance(jfp8.KVCache.init(2, 2, 37, 2, 128), jnp.array(lengths))
    k_new, v_new = _new(2, T, 2, 128, seed=sum(lengths) + T)
    if T not in _append_pair:
        def xla(c, k, v, l):
            return kvc._append(c, l, k, v, jnp.full((2,), T, jnp.int32))

        def kernel(c, k, v, l):
            return K.kv_append(c.k, c.v, c.k_scale, c.v_scale, k, v, c.lengths, l,
                               layout=c.layout, interpret=True)
        _append_pair[T] = (jax.jit(xla), jax.jit(kernel))
    xla, kernel = _append_pair[T]
    want = xla(cache, k_new, v_new, jnp.int32(layer))
    got = kernel(cache, k_new, v_new, jnp.int32(layer))
    for g, w in zip(got, (want.k, want.v, want.k_scale, want.v_scale)):
        _bits_equal(g, w)


def test_no_retrace_across_positions_and_layers():
    caches = _caches(jnp.float8_e4m3fn)
    _, S, H, D = cache_dims(caches[0].shape, "hsd")
    k_new, v_new = _new(3, 1, H, D, seed=9)
    f = chex.assert_max_traces(n=1)(lambda c, kn, vn, ln, l: K.kv_append(
        *c, kn, vn, ln, l, layout="hsd", interpret=True))
    f = jax.jit(f)
    for step in range(3):
        caches = f(caches, k_new, v_new, jnp.array([step, step + 3, 4], jnp.int32),
                   jnp.int32(step % 2))


def test_bad_inputs():
    k, v, ks, vs = _caches(jnp.float8_e4m3fn)
    _, S, H, D = cache_dims(k.shape, "hsd")
    k_new, v_new = _new(3, 1, H, D, seed=1)
    lengths = jnp.zeros((3,), jnp.int32)
    append = functools.partial(K.kv_append, layout="hsd", interpret=True)
    with pytest.raises(ValueError, match="layout"):
        K.kv_append(k, v, ks, vs, k_new, v_new, lengths, 0, layout="ds", interpret=True)
    with pytest.raises(ValueError, match=r"v_cache: expected \(2, 3, 3, 19, 64\) like k_cache"):
        K.kv_append(k, v, ks, vs, k_new, v_new, lengths, 0, interpret=True)  # "sd" by default
    with pytest.raises(ValueError, match="k_scale"):
        append(k, v, None, vs, k_new, v_new, lengths, 0)
    with pytest.raises(ValueError, match="k_new"):
        append(k, v, ks, vs, k_new[:, :, :2], v_new, lengths, 0)
    with pytest.raises(ValueError, match="v_cache"):
        append(k, v[:, :2], ks, vs, k_new, v_new, lengths, 0)
    with pytest.raises(ValueError, match=r"v_cache: expected \(L, B, Hkv, ceil\(S / VB\), D, VB\)"):
        append(k, k, ks, vs, k_new, v_new, lengths, 0)                      # V shaped like K
    with pytest.raises(ValueError, match="VB a power of two"):
        append(k, jnp.zeros(v.shape[:-1] + (24,), v.dtype), ks, vs, k_new, v_new, lengths, 0)
    with pytest.raises(ValueError, match="lengths"):
        append(k, v, ks, vs, k_new, v_new, lengths[:2], 0)
    with pytest.raises(TypeError, match="k_cache"):
        append(k.astype(jnp.float32), v.astype(jnp.float32), ks, vs, k_new, v_new, lengths, 0)
    kb, vb, _, _ = _caches(jnp.bfloat16)
    with pytest.raises(ValueError, match="k_scale"):
        append(kb, vb, ks, vs, k_new, v_new, lengths, 0)
    with pytest.raises(ValueError, match=r"k_scale: expected \(2, 3, 3, 19\) bfloat16 or float32"):
        append(k, v, jnp.swapaxes(ks, 2, 3), vs, k_new, v_new, lengths, 0)   # token-major scales


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.float8_e5m2, jnp.bfloat16])
@pytest.mark.parametrize("layout", K.LAYOUTS)
def test_gpu_kernel_matches_reference_bitwise(dtype, layout):
    """Compiled through Triton: `div.rn.f32` and the saturating cast give the reference's bits."""
    caches = _caches(dtype, L=3, B=4, S=300, H=8, D=128, seed=5, layout=layout, vb=128)
    k_new, v_new = _new(4, 3, 8, 128, seed=6)
    lengths = jnp.array([0, 100, 298, 299], jnp.int32)
    fn = functools.partial(K.kv_append, layout=layout)
    got = jax.jit(fn)(*caches, k_new, v_new, lengths, 2)
    want = K.kv_append_reference(*caches, k_new, v_new, lengths, 2, layout=layout)
    for g, w in zip(got, want):
        _bits_equal(g, w)


# --- kv_append_qkv: split + RoPE + append from the fused projection --------------------------
def _qkv_inputs(B, T, Hq, H, D, seed):
    """qkv (B, T, (Hq + 2 H) D) bf16 with a wide range and special values in a k head, and RoPE
    tables of random positions."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, T, Hq + 2 * H, D)) * np.exp(rng.normal(size=(B, T, Hq + 2 * H, 1)) * 3)
    x[0, 0, Hq + 1, :4] = [np.nan, np.inf, 1e30, -3e-40]   # a k head: non-finite, huge, subnormal
    x[-1, -1, Hq + H] = 0.0                                 # an all-zero v row: scale 1
    angles = rng.integers(0, 4096, size=(B, T, 1)) * (10000.0 ** (-np.arange(D // 2) / (D // 2)))
    return (jnp.asarray(x.reshape(B, T, -1), jnp.bfloat16),
            jnp.asarray(np.cos(angles), jnp.float32), jnp.asarray(np.sin(angles), jnp.float32))


@pytest.mark.parametrize("dtype,layout", [(jnp.float8_e4m3fn, "hsd"), (jnp.bfloat16, "sd"),
                                          (jnp.float8_e4m3fn, "sd")])
@pytest.mark.parametrize("T,Hq,H,D", [(1, 6, 3, 16), (3, 12, 2, 32), (3, 6, 3, 32)])
def test_qkv_kernel_matches_reference_bitwise(dtype, layout, T, Hq, H, D):
    """Rotated q, cache data and scales equal the reference (slice, RoPE in f32 cast to bf16,
    kv_append_reference) byte for byte: the same f32 math in the same order."""
    B, S = 2, 11
    caches = _caches(dtype, L=2, B=B, S=S, H=H, D=D, seed=T + Hq, layout=layout)
    qkv, cos, sin = _qkv_inputs(B, T, Hq, H, D, seed=D + T)
    lengths = jnp.array([int(np.random.default_rng(T).integers(0, S - T)), S - 2], jnp.int32)
    kw = dict(num_q_heads=Hq, layout=layout)
    got = K.kv_append_qkv(*caches, qkv, cos, sin, lengths, 1, interpret=True, **kw)
    want = K.kv_append_qkv_reference(*caches, qkv, cos, sin, lengths, 1, **kw)
    assert got[0].shape == (B, T, Hq, D) and got[0].dtype == qkv.dtype
    for g, w in zip(got, want):
        _bits_equal(g, w)
    _bits_equal(got[1][0], caches[0][0])                   # layer 0 untouched


def test_qkv_equals_rope_then_kv_append():
    """The fused kernel writes what RoPE in XLA followed by the K/V-only kernel writes."""
    B, T, Hq, H, D = 2, 2, 6, 3, 16
    caches = _caches(jnp.float8_e4m3fn, L=2, B=B, S=9, H=H, D=D, seed=4)
    qkv, cos, sin = _qkv_inputs(B, T, Hq, H, D, seed=8)
    lengths = jnp.array([3, 8], jnp.int32)
    got = K.kv_append_qkv(*caches, qkv, cos, sin, lengths, 0, num_q_heads=Hq, layout="hsd",
                          interpret=True)
    heads = qkv.reshape(B, T, Hq + 2 * H, D)
    q = attention.apply_rope(heads[:, :, :Hq], cos, sin)
    k = attention.apply_rope(heads[:, :, Hq:Hq + H], cos, sin)
    want = K.kv_append(*caches, k, heads[:, :, Hq + H:], lengths, 0, layout="hsd",
                       interpret=True)
    for g, w in zip(got, (q,) + tuple(want)):
        _bits_equal(g, w)


def test_qkv_bad_inputs():
    k, v, ks, vs = _caches(jnp.float8_e4m3fn, B=2, H=2, D=16)
    qkv, cos, sin = _qkv_inputs(2, 1, 4, 2, 16, seed=0)
    lengths = jnp.zeros((2,), jnp.int32)
    call = lambda **kw: K.kv_append_qkv(*[kw.get(n, x) for n, x in (
        ("k", k), ("v", v), ("ks", ks), ("vs", vs), ("qkv", qkv), ("cos", cos), ("sin", sin),
        ("lengths", lengths))], 0, num_q_heads=kw.get("hq", 4), layout="hsd", interpret=True)
    with pytest.raises(ValueError, match="qkv"):
        call(hq=6)
    with pytest.raises(ValueError, match="qkv"):
        call(qkv=qkv[:1])
    with pytest.raises(ValueError, match="num_q_heads"):
        call(hq=0)
    with pytest.raises(ValueError, match="cos"):
        call(cos=cos[..., :4])
    with pytest.raises(ValueError, match="sin"):
        call(sin=sin.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match="k_scale"):
        call(ks=None)
    with pytest.raises(ValueError, match="lengths"):
        call(lengths=lengths[:1])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.bfloat16])
@pytest.mark.parametrize("Hq,H", [(32, 8), (12, 3)])
def test_gpu_qkv_kernel_matches_reference_bitwise(dtype, Hq, H):
    """Compiled through Triton against the eager reference (eager: XLA may otherwise keep the
    rotated k in f32 across a fusion, xla_allow_excess_precision). A mismatch in q or the cache
    that is one bf16 ulp of RoPE would point at FMA contraction of x1 c - x2 s differing between
    Triton and XLA."""
    layout = "sd" if dtype == jnp.bfloat16 else "hsd"     # jfp8.KVCache's
    B, T, D = 4, 3, 128
    caches = _caches(dtype, L=3, B=B, S=300, H=H, D=D, seed=5, layout=layout, vb=128)
    qkv, cos, sin = _qkv_inputs(B, T, Hq, H, D, seed=6)
    lengths = jnp.array([0, 100, 298, 299], jnp.int32)
    got = jax.jit(functools.partial(K.kv_append_qkv, num_q_heads=Hq, layout=layout))(
        *caches, qkv, cos, sin, lengths, 2)
    want = K.kv_append_qkv_reference(*caches, qkv, cos, sin, lengths, 2, num_q_heads=Hq,
                                     layout=layout)
    for g, w in zip(got, want):
        _bits_equal(g, w)


@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.bfloat16])
@pytest.mark.parametrize("fused", [False, True])
def test_kernels_lower_for_cuda(dtype, fused):
    # Lowers both kernels for CUDA without a GPU (CPU CI): catches lowering errors of the strided
    # V store into the tokens-last cache; the numerics are checked in interpret mode above and
    # on the device.
    L, B, S, Hq, H, D, T = 2, 3, 40, 8, 2, 128, 1
    sds = jax.ShapeDtypeStruct
    layout = "sd" if dtype == jnp.bfloat16 else "hsd"     # jfp8.KVCache's
    k_shape = (L, B, S, H, D) if layout == "sd" else (L, B, H, S, D)
    k = sds(k_shape, dtype)
    v = sds(v_shape_for(k_shape, layout, 128), dtype)
    sc = sds(k_shape[:-1], jnp.float32) if dtype != jnp.bfloat16 else None
    lens = sds((B,), jnp.int32)
    if fused:
        qkv = sds((B, T, (Hq + 2 * H) * D), jnp.bfloat16)
        cs = sds((B, T, D // 2), jnp.float32)
        fn = functools.partial(K.kv_append_qkv, layer=1, num_q_heads=Hq, layout=layout)
        jax.jit(fn).trace(k, v, sc, sc, qkv, cs, cs, lens).lower(lowering_platforms=("cuda",))
    else:
        new = sds((B, T, H, D), jnp.bfloat16)
        fn = functools.partial(K.kv_append, layer=1, layout=layout)
        jax.jit(fn).trace(k, v, sc, sc, new, new, lens).lower(lowering_platforms=("cuda",))


@pytest.mark.parametrize("fmt", [jfp8.E4M3, jfp8.E5M2])
def test_bf16_scales_lose_nothing_to_rounding(fmt):
    """A bf16-rounded scale (<= 2^-9 relative) can push a row's amax past fmax by at most a
    factor 1 + 2^-8; the saturation maps it to fmax, which is what the FP8 rounding of such a
    value gives anyway (fmax's upper rounding midpoint is a whole FP8 ulp above it). So every
    element's error against the exact value x stays within half an FP8 ulp of x / scale, the
    same bound as with an f32 scale; rows whose scale rounds down are checked on purpose."""
    rng = np.random.default_rng(3)
    fmax = float(fmt.max)
    x = rng.normal(size=(4096, 64)) * np.exp(rng.normal(size=(4096, 1)) * 4)
    x = jnp.asarray(x, jnp.float32)
    k = jnp.zeros((1, 1, 1, 4096, 64), fmt.dtype)
    v = jnp.zeros(v_shape_for(k.shape, "hsd", 16), fmt.dtype)
    scales = jnp.ones(k.shape[:-1], jnp.bfloat16)
    new = x.reshape(1, 4096, 1, 64)
    k2, _, ks, _ = K.kv_append_reference(k, v, scales, scales, new, new, jnp.zeros((1,), jnp.int32),
                                         0, layout="hsd")
    data = np.asarray(k2[0, 0, 0].astype(jnp.float32))
    s = np.asarray(ks[0, 0, 0].astype(jnp.float32))[:, None]
    exact = np.asarray(x) / s
    amax_f32 = np.max(np.abs(np.asarray(x)), axis=1) / np.float32(fmax)
    assert (s[:, 0] < amax_f32).any()          # some scales were rounded down
    assert np.abs(data).max() <= fmax
    mant = 3 if fmt is jfp8.E4M3 else 2
    ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(exact), 2.0 ** -6))) - mant)
    assert (np.abs(data - exact) <= ulp / 2 * (1 + 2 ** -7)).all()
