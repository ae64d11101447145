"""pallas_kernels.decode_attention.decode_attention_qkv: the decode step's K/V append inside the
attention kernel (interpret mode), against the two kernels it replaces and the f32 reference.

Bounds: the cache bits and the output equal those of `kv_append_qkv` + `decode_attention` (the
same f32 math in the same order; exact equality is the right bound in interpret mode). Against
`kv_append_qkv_reference` V and its scales are equal bit for bit; K is rotated first, and XLA
may contract RoPE's x1 c - x2 s into a fused multiply-add in one program and not in the other,
so a rotated value on a bf16 rounding boundary can round one ulp apart (seen: 1 element in ~30
random caches, also between kv_append_qkv and its reference): at most two K rows may differ. The
output against the f32 reference: the kernel's f16 operands and bf16 output, TOL as in
test_decode_attention.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels import decode_attention as da
from pallas_kernels import kv_append as K

TOL = 4e-3             # f16 P and q, bf16 output (test_decode_attention's module docstring)
TOL_BF16_CACHE = 1e-2  # bf16 MMAs: P rounded to 2^-9


def rel_err(out, ref):
    out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def _bits(x):
    """Raw bytes of an array, every NaN made one pattern (a NaN is a NaN)."""
    x = np.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.floating):
        f = np.asarray(x, np.float32)
        x = np.where(np.isnan(f), np.zeros((), x.dtype), x).astype(x.dtype)
    return x.view(np.uint8)


def _rows_apart(a, b, per_row):
    """How many (token, head) rows of two caches differ (entries, for scales)."""
    diff = (_bits(a) != _bits(b)).reshape(np.shape(a) + (-1,))
    diff = diff.reshape(-1, np.shape(a)[-1] * diff.shape[-1]) if per_row else diff.reshape(-1, 1)
    return int(diff.any(axis=1).sum())


def _step(seed, *, L=2, B=5, S=45, Hq=6, Hkv=2, D=64, dtype=jnp.float8_e4m3fn, layout="hsd",
          vb=16, qkv_dtype=jnp.bfloat16, scale_dtype=jnp.float32):
    """A random stacked cache (scales of `scale_dtype`, None for bf16), the step's qkv and RoPE
    tables."""
    rng = np.random.default_rng(seed)
    k_shape = (L, B, Hkv, S, D) if layout == "hsd" else (L, B, S, Hkv, D)
    k = jnp.asarray(rng.normal(size=k_shape) * 2, jnp.float32).astype(dtype)
    v = jnp.asarray(rng.normal(size=da.v_shape_for(k_shape, layout, vb)), jnp.float32).astype(dtype)
    ks = vs = None
    if jnp.dtype(dtype) != jnp.bfloat16:
        ks = jnp.asarray(rng.uniform(0.05, 0.2, size=k_shape[:-1]), scale_dtype)
        vs = jnp.asarray(rng.uniform(0.05, 0.2, size=k_shape[:-1]), scale_dtype)
    qkv = rng.normal(size=(B, 1, (Hq + 2 * Hkv) * D)) * np.exp(rng.normal(size=(B, 1, 1)))
    angles = rng.uniform(0, 100, size=(B, 1, D // 2))
    return ((k, v, ks, vs), jnp.asarray(qkv, qkv_dtype), jnp.asarray(np.cos(angles), jnp.float32),
            jnp.asarray(np.sin(angles), jnp.float32))


def _two_kernels(caches, qkv, cos, sin, lengths, *, layer, Hq, layout, config):
    """What `jfp8.attention.decode_qkv` ran before: kv_append_qkv, then decode_attention."""
    q, k, v, ks, vs = K.kv_append_qkv(*caches, qkv, cos, sin, lengths, layer, num_q_heads=Hq,
                                      layout=layout, interpret=True)
    S = da.cache_dims(k.shape, layout)[1]
    o = da.decode_attention(q, k, v, jnp.minimum(lengths + 1, S), ks, vs, layer=layer,
                            config=config, interpret=True, layout=layout)
    return o, k, v, ks, vs


SMALL = da.DecodeAttentionConfig(block_k=16, target_programs=24, min_blocks_per_split=1)


@pytest.mark.parametrize("layout", da.LAYOUTS)
@pytest.mark.parametrize("dtype,scale_dtype", [
    (jnp.float8_e4m3fn, jnp.float32), (jnp.float8_e4m3fn, jnp.bfloat16),
    (jnp.float8_e5m2, jnp.bfloat16), (jnp.bfloat16, None)])
def test_matches_append_then_attend_bitwise(layout, dtype, scale_dtype):
    """Ragged positions: the first slot, the last of a 16-token block, the first of the next,
    the last slot of the cache, and a full cache (the write dropped, S tokens attended); S = 45
    is no multiple of the block, so the last block runs past S_max. bf16 scales (jfp8.KVCache's)
    are rounded before the new row is quantized, in the kernel and in both references."""
    S, Hq = 45, 6
    caches, qkv, cos, sin = _step(np.random.randint(1 << 30), S=S, Hq=Hq, dtype=dtype,
                                  layout=layout, scale_dtype=scale_dtype)
    lengths = jnp.array([0, 15, 16, S - 1, S], jnp.int32)
    got = da.decode_attention_qkv(qkv, cos, sin, *caches, lengths, layer=1, num_q_heads=Hq,
                                  config=SMALL, interpret=True, layout=layout)
    want = _two_kernels(caches, qkv, cos, sin, lengths, layer=1, Hq=Hq, layout=layout,
                        config=SMALL)
    ref = da.decode_attention_qkv_reference(qkv, cos, sin, *caches, lengths, layer=1,
                                            num_q_heads=Hq, layout=layout)
    assert got[0].shape == (5, 1, Hq, 64) and got[0].dtype == jnp.bfloat16
    for name, g, w, r in zip(("o", "k", "v", "k_scale", "v_scale"), got, want, ref):
        if w is None:
            assert g is None and r is None, name
            continue
        np.testing.assert_array_equal(_bits(g), _bits(w), err_msg=name)
        if name in ("v", "v_scale"):
            np.testing.assert_array_equal(_bits(g), _bits(r), err_msg=name)
        elif name != "o":   # RoPE's rounding (module docstring): at most two rows apart
            assert _rows_apart(g, r, per_row=name == "k") <= 2, name
    tol = TOL_BF16_CACHE if dtype == jnp.bfloat16 else TOL
    for b in range(5):
        assert rel_err(got[0][b], ref[0][b]) < tol, b
    # Layer 0 untouched; the full sequence (b = 4) kept its cache.
    for g, c in zip(got[1:], caches):
        if c is not None:
            np.testing.assert_array_equal(_bits(g[0]), _bits(c[0]))
            np.testing.assert_array_equal(_bits(g[1, 4]), _bits(c[1, 4]))


def test_f32_qkv_and_one_program_per_head():
    """f32 activations (no rounding before the quantization) and the default config (one split
    per (sequence, head) at this size): still the two kernels' bits."""
    caches, qkv, cos, sin = _step(3, B=2, S=40, Hq=4, Hkv=4, D=128, qkv_dtype=jnp.float32,
                                  layout="sd")
    lengths = jnp.array([7, 39], jnp.int32)
    got = da.decode_attention_qkv(qkv, cos, sin, *caches, lengths, layer=0, num_q_heads=4,
                                  interpret=True, layout="sd")
    want = _two_kernels(caches, qkv, cos, sin, lengths, layer=0, Hq=4, layout="sd",
                        config=da.config_for(2, 40, 128))
    for g, w in zip(got, want):
        np.testing.assert_array_equal(_bits(g), _bits(w))


@settings(max_examples=6, deadline=None)
@given(st.data())
def test_odd_shapes_match_append_then_attend(data):
    """Group sizes 1-3, head dims 64 / 128, short odd caches, random positions and splits."""
    Hkv = data.draw(st.integers(1, 3), "Hkv")
    G = data.draw(st.integers(1, 3), "G")
    D = data.draw(st.sampled_from([64, 128]), "D")
    S = data.draw(st.integers(16, 70), "S")
    B = data.draw(st.integers(1, 3), "B")
    layout = data.draw(st.sampled_from(da.LAYOUTS), "layout")
    lengths = jnp.asarray(data.draw(st.lists(st.integers(0, S), min_size=B, max_size=B),
                                    "lengths"), jnp.int32)
    cfg = da.DecodeAttentionConfig(block_k=16, target_programs=data.draw(st.integers(1, 64)),
                                   min_blocks_per_split=1)
    caches, qkv, cos, sin = _step(S, L=1, B=B, S=S, Hq=G * Hkv, Hkv=Hkv, D=D, layout=layout)
    got = da.decode_attention_qkv(qkv, cos, sin, *caches, lengths, layer=0, num_q_heads=G * Hkv,
                                  config=cfg, interpret=True, layout=layout)
    want = _two_kernels(caches, qkv, cos, sin, lengths, layer=0, Hq=G * Hkv, layout=layout,
                        config=cfg)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(_bits(g), _bits(w))


def _bad_args(**over):
    caches, qkv, cos, sin = _step(0, L=2, B=2, S=32, Hq=4, Hkv=2, D=64)
    k, v, ks, vs = caches
    args = dict(qkv=qkv, cos=cos, sin=sin, k=k, v=v, k_scale=ks, v_scale=vs,
                lengths=jnp.array([3, 5], jnp.int32), layer=1, num_q_heads=4)
    args.update(over)
    return args


@pytest.mark.parametrize("over,err,match", [
    (dict(num_q_heads=3), ValueError, "num_q_heads"),
    (dict(qkv=jnp.zeros((2, 2, 8 * 64), jnp.bfloat16)), ValueError, r"qkv: expected \(B, 1"),
    (dict(qkv=jnp.zeros((2, 1, 8 * 64 - 1), jnp.bfloat16)), ValueError, "qkv"),
    (dict(qkv=jnp.zeros((2, 1, 8 * 64), jnp.int8)), TypeError, "qkv"),
    (dict(cos=jnp.zeros((2, 1, 64), jnp.float32)), ValueError, "cos"),
    (dict(sin=jnp.zeros((2, 32), jnp.float32)), ValueError, "sin"),
    (dict(k_scale=None), ValueError, "k_scale"),
    (dict(v_scale=jnp.float32(1.0)), ValueError, "v_scale"),
    (dict(lengths=jnp.array([3, 33], jnp.int32)), ValueError, "lengths"),
    (dict(lengths=jnp.array([3], jnp.int32)), ValueError, "lengths"),
    (dict(k=jnp.zeros((2, 2, 32, 64), jnp.float8_e4m3fn)), ValueError, "k: expected a stacked"),
    (dict(k=jnp.zeros((2, 2, 2, 32, 64), jnp.float16)), TypeError, "k: expected"),
])
def test_bad_inputs(over, err, match):
    with pytest.raises(err, match=match):
        da.decode_attention_qkv(**_bad_args(**over), interpret=True, layout="hsd")


def test_bf16_cache_takes_no_scales():
    caches, qkv, cos, sin = _step(0, B=2, S=32, Hq=4, Hkv=2, dtype=jnp.bfloat16, layout="sd")
    with pytest.raises(ValueError, match="k_scale: expected None for a bf16 cache"):
        da.decode_attention_qkv(qkv, cos, sin, caches[0], caches[1], jnp.ones((2, 2, 32, 2)),
                                None, jnp.array([1, 2]), layer=0, num_q_heads=4, layout="sd")


@pytest.mark.parametrize("layout,dtype", [("hsd", jnp.float8_e4m3fn), ("sd", jnp.bfloat16)])
def test_kernel_lowers_for_cuda(layout, dtype):
    """The Triton lowering (gather loads for RoPE, the barrier, the aliased cache outputs),
    without a GPU."""
    B, S, Hq, Hkv, D, L = 2, 500, 8, 2, 128, 2
    k_shape = (L, B, Hkv, S, D) if layout == "hsd" else (L, B, S, Hkv, D)
    k = jax.ShapeDtypeStruct(k_shape, dtype)
    v = jax.ShapeDtypeStruct(da.v_shape_for(k_shape, layout, 128), dtype)
    sc = jax.ShapeDtypeStruct(k_shape[:-1], jnp.float32) if dtype != jnp.bfloat16 else None
    qkv = jax.ShapeDtypeStruct((B, 1, (Hq + 2 * Hkv) * D), jnp.bfloat16)
    cs = jax.ShapeDtypeStruct((B, 1, D // 2), jnp.float32)
    lens = jax.ShapeDtypeStruct((B,), jnp.int32)

    def fn(qkv, cs, k, v, lens, ks=None, vs=None):
        return da.decode_attention_qkv(qkv, cs, cs, k, v, ks, vs, lens, layer=1, num_q_heads=Hq,
                                       layout=layout)
    args = (qkv, cs, k, v, lens) + ((sc, sc) if sc is not None else ())
    jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


@pytest.mark.gpu
@pytest.mark.parametrize("B,S,layout,dtype", [
    (1, 4128, "hsd", jnp.float8_e4m3fn),    # the B = 1 table entry (one block per program)
    (16, 4096, "hsd", jnp.float8_e4m3fn),   # pipelined, several blocks per program
    (4, 4100, "sd", jnp.bfloat16),          # the bf16 cache, S_max no multiple of the block
])
def test_gpu_matches_reference(B, S, layout, dtype):
    """On the GPU: the cache bits of `kv_append_qkv_reference` (the kernel's quantization is the
    same f32 math; RoPE's multiply-adds may contract differently, so a rotated K value that
    lands on a rounding boundary could differ in its last bit: at most two rows apart), and
    the output within TOL of the f32 reference and within 2^-7 of the two kernels."""
    caches, qkv, cos, sin = _step(B, L=2, B=B, S=S, Hq=32, Hkv=8, D=128, dtype=dtype,
                                  layout=layout, vb=128)
    lengths = jnp.asarray(np.random.default_rng(S).integers(0, S, size=B), jnp.int32)
    lengths = lengths.at[0].set(S - 1)
    got = da.decode_attention_qkv(qkv, cos, sin, *caches, lengths, layer=1, num_q_heads=32,
                                  layout=layout)
    ref = da.decode_attention_qkv_reference(qkv, cos, sin, *caches, lengths, layer=1,
                                            num_q_heads=32, layout=layout)
    for name, g, r in zip(("k", "v", "k_scale", "v_scale"), got[1:], ref[1:]):
        if r is None:
            continue
        assert _rows_apart(g, r, per_row=name in ("k", "v")) <= 2, name
    tol = TOL_BF16_CACHE if dtype == jnp.bfloat16 else TOL
    assert rel_err(got[0], ref[0]) < tol
    q, *_ = K.kv_append_qkv(*caches, qkv, cos, sin, lengths, 1, num_q_heads=32, layout=layout)
    o2 = da.decode_attention(q, *got[1:3], jnp.minimum(lengths + 1, S), *got[3:], layer=1,
                             layout=layout)
    assert rel_err(got[0], o2) < 2 ** -7
