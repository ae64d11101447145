"""Tests for pallas_kernels.fp8_gemv (decode-shaped FP8 matmul, W8A16 and W8A8).

Reference: `fp8_gemv_reference` (both operands dequantized to f32, f32 HIGHEST-precision dot, bias,
one output cast), itself checked against float64 numpy. Metric: rel_err = max|out - ref| / max|ref|.

Error bounds, and where they come from:
* The kernel upcasts FP8 (and bf16) operands to bf16 exactly; bf16 x bf16 products are exact in
  f32, scales are applied in f32 (per 128-wide K block for block/group scales, in the epilogue
  otherwise). So kernel and reference differ only by f32 rounding order over K terms and the
  scale multiplications: f32 output < 1e-5 (K=384: 2**-24 * K ≈ 2.3e-5 worst case, typically
  ~1e-6; measured ≈ 5e-7).
* bf16 output: both sides round (almost) the same f32 value once, so they differ by at most one
  bf16 ulp of the element, and one ulp of v is at most 2**-7 * |v|: < 2**-7 of max|ref|
  (2**-8 was too tight: the H100 run hit 4.5e-3 on one element next to a rounding boundary).
* GPU: the same, plus tensor-core accumulation order over larger K (4096): f32 output < 1e-4.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels import fp8_gemv as G

E4M3 = jnp.float8_e4m3fn
# Jitted: eager dispatch of every jnp op dominates CPU test time otherwise.
reference = jax.jit(G.fp8_gemv_reference, static_argnames=("layout", "out_dtype"))
TOL = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 2.0**-7}
GPU_TOL = {jnp.dtype(jnp.float32): 1e-4, jnp.dtype(jnp.bfloat16): 2.0**-7}


def rel_err(out, ref):
    out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    assert np.isfinite(out).all(), "non-finite output"
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def make(m, n, k, layout, a_kind, *, seed):
    """Random FP8 weights/activations spanning e4m3's range, and positive scales."""
    ks = jax.random.split(jax.random.key(seed), 6)
    kb, nb = -(-k // 128), -(-n // 128)
    w = jnp.clip(jax.random.normal(ks[0], (n, k)) * 100, -448, 448).astype(E4M3)
    w_scale = {"tensor": (1, 1), "row": (n, 1), "block": (nb, kb)}[layout]
    w_scale = jax.random.uniform(ks[1], w_scale, minval=1e-3, maxval=2e-2)
    bias = jax.random.normal(ks[4], (n,), jnp.float32)
    if a_kind is None:
        return jax.random.normal(ks[2], (m, k), jnp.bfloat16), w, None, w_scale, bias
    a = jnp.clip(jax.random.normal(ks[2], (m, k)) * 100, -448, 448).astype(E4M3)
    a_scale = {"tensor": (1, 1), "row": (m, 1), "group": (m, kb)}[a_kind]
    a_scale = jax.random.uniform(ks[3], a_scale, minval=1e-3, maxval=2e-2)
    return a, w, a_scale, w_scale, bias


C = G.GemvConfig
# (M, layout, activation scales (None = W8A16), config, bias, out dtype): covers M in {1, 7, 64},
# the three weight layouts, the three activation-scale kinds, FMA / dot / swapped dot, split-K,
# prefetch, several row blocks per program (the last program with fewer), bias and both output
# dtypes, on N=200, K=384 (neither a multiple of the tiles).
# (The GPU tests below add every layout x M in {1, 8, 64} on 4096x4096.)
CASES = [
    (1, "tensor", None, None, True, jnp.bfloat16),                              # FMA, split-K 2
    (1, "block", "group", C(32, 256, use_dot=False, prefetch=True), False, jnp.float32),
    (7, "row", "row", C(32, 128, split_k=2), True, jnp.float32),
    (7, "block", "tensor", C(64, 256, swap_ab=True), False, jnp.bfloat16),
    (64, "block", None, C(32, 128, split_k=2, prefetch=True), True, jnp.float32),
    (1, "block", None, C(16, 128, use_dot=False, row_blocks=3), True, jnp.float32),  # 13 blocks / 5
    (7, "row", None, C(32, 128, split_k=2, row_blocks=2), False, jnp.bfloat16),     # partials
]


@pytest.mark.parametrize("m,layout,a_kind,cfg,with_bias,out_dtype", CASES)
def test_matches_reference_interpret(m, layout, a_kind, cfg, with_bias, out_dtype):
    n, k = 200, 384
    a, w, a_scale, w_scale, bias = make(m, n, k, layout, a_kind, seed=m * 31 + len(layout))
    bias = bias if with_bias else None
    out = G.fp8_gemv(a, w, a_scale, w_scale, layout=layout, bias=bias, out_dtype=out_dtype,
                     config=cfg, interpret=True)
    ref = reference(a, w, a_scale, w_scale, layout=layout, bias=bias, out_dtype=out_dtype)
    assert out.shape == (m, n) and out.dtype == jnp.dtype(out_dtype)
    assert rel_err(out, ref) < TOL[jnp.dtype(out_dtype)]


@pytest.mark.parametrize("m,cfg", [(7, C(32, 128, split_k=2)), (16, C(32, 256, swap_ab=True)),
                                   (1, C(16, 128, use_dot=False))])
def test_float16_activations_keep_their_precision(m, cfg):
    """f16 activations are multiplied as f16 (11 significant bits), not rounded to bf16 (8): the
    f32-output error is the f32 summation order's (1e-5), where a bf16 rounding of the
    activations would give ~2**-9 relative error per term (1.6e-3 and 1.8e-3 on the dot cases
    before the fix)."""
    n, k = 200, 384
    _, w, _, w_scale, _ = make(m, n, k, "block", None, seed=m)
    a = (jax.random.normal(jax.random.key(m + 100), (m, k)) * 30).astype(jnp.float16)
    out = G.fp8_gemv(a, w, None, w_scale, layout="block", out_dtype=jnp.float32, config=cfg,
                     interpret=True)
    ref = reference(a, w, None, w_scale, layout="block", out_dtype=jnp.float32)
    assert rel_err(out, ref) < TOL[jnp.dtype(jnp.float32)]


def test_stage_f16_rows_is_exact_for_bf16_rows():
    """Rows far outside f16's range (amax 3e5 and 1e-20), a zero row, values 2^30 below their
    row's amax, and non-finite values: rows * scales gives back every bf16 value at least
    amax * 2^-28 exactly and the smaller ones within amax * 2^-39 (f16 subnormals), non-finite
    ones stay non-finite, scales are powers of two, and no f16 row overflows."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 384)) * np.array([[3e5], [1e-20], [0.0], [1.0], [7.0], [1.0]])
    a[3, :10] *= 2.0 ** -30                          # some fall below amax * 2^-28
    a[4, 3], a[4, 7], a[5, 0] = np.inf, np.nan, -np.inf
    a = jnp.asarray(a, jnp.bfloat16)
    rows, scales = G.stage_f16_rows(a)
    assert rows.dtype == jnp.float16 and scales.shape == (6, 1) and scales.dtype == jnp.float32
    s = np.asarray(scales)
    np.testing.assert_array_equal(s, 2.0 ** np.round(np.log2(s)))
    back = np.asarray(rows, np.float32) * s
    want = np.asarray(a, np.float32)
    np.testing.assert_array_equal(np.isfinite(back), np.isfinite(want))
    fin = np.isfinite(want)
    amax = np.max(np.where(fin, np.abs(want), 0), axis=1, keepdims=True)
    big = fin & (np.abs(want) >= amax * 2.0 ** -28)
    np.testing.assert_array_equal(back[big], want[big])
    err = np.abs(np.where(fin, back, 0) - np.where(fin, want, 0))
    assert (err <= amax * 2.0 ** -39).all() and (fin & ~big).sum() > 0
    assert np.abs(np.asarray(rows, np.float32)[fin]).max() < 2.0 ** 15
    assert s[2, 0] == 1.0                            # zero row


def test_stage_f16_rows_bad_inputs():
    with pytest.raises(TypeError, match="bfloat16 or float16"):
        G.stage_f16_rows(jnp.ones((2, 8), jnp.float32))      # f16 would round f32 significands
    with pytest.raises(ValueError, match="2-D"):
        G.stage_f16_rows(jnp.ones((8,), jnp.bfloat16))


@pytest.mark.parametrize("m,cfg", [(7, C(32, 128, split_k=2)), (16, C(32, 256)),
                                   (16, C(64, 256, swap_ab=True))])
def test_staged_f16_rows_match_the_bf16_reference(m, cfg):
    """bf16 activations staged to f16 rows + row scales give the W8A16 function of the bf16
    activations (f32 output, summation-order tolerance), including a row beyond f16's range."""
    n, k = 200, 384
    a, w, _, w_scale, bias = make(m, n, k, "block", None, seed=m + 7)
    a = a.at[1].multiply(1e6)                         # a row at ~4e6, past f16's 65504
    rows, scales = G.stage_f16_rows(a)
    out = G.fp8_gemv(rows, w, scales, w_scale, layout="block", bias=bias, out_dtype=jnp.float32,
                     config=cfg, interpret=True)
    ref = reference(a, w, None, w_scale, layout="block", bias=bias, out_dtype=jnp.float32)
    assert rel_err(out[1:2], ref[1:2]) < TOL[jnp.dtype(jnp.float32)]
    assert rel_err(out, ref) < TOL[jnp.dtype(jnp.float32)]


# Fused prologues (W8A16). The kernel rounds its prologue output to bf16 as the reference does,
# from f32 values that can differ in the last bit (exp in SwiGLU: Triton's and XLA's differ; the
# RMSNorm's 1 / rms, reduced in the kernel, sums in another order): such an element flips by one
# bf16 ulp (2**-8
# relative), moving the output by 2**-8 |a_k w_k| for that k. With N(0,1) activations and K=384 a
# handful of flips stay below 1e-3 of max|ref| (measured: 0 flips on the CPU); the bf16-output
# bound is the one above.
PROLOGUE_CASES = [
    (1, "rmsnorm", "block", None, jnp.float32),                     # tuned FMA config, split-K
    (1, "rmsnorm", "row", C(16, 128, use_dot=False), jnp.bfloat16),  # more programs than K steps
    (1, "rmsnorm", "row", C(32, 128, use_dot=False, rms_in_kernel=False), jnp.float32),  # XLA 1/rms
    (1, "rmsnorm", "block", C(16, 256, use_dot=False, row_blocks=4), jnp.bfloat16),  # 1/rms once
    (1, "swiglu", "block", C(16, 128, use_dot=False, row_blocks=2), jnp.float32),
    (7, "rmsnorm", "tensor", C(32, 128, split_k=2), jnp.float32),
    (1, "swiglu", "block", None, jnp.bfloat16),
    (5, "swiglu", "row", C(64, 256, split_k=2, swap_ab=True), jnp.float32),
]
PROLOGUE_TOL = {jnp.dtype(jnp.float32): 1e-3, jnp.dtype(jnp.bfloat16): 2.0**-7}


@pytest.mark.parametrize("m,prologue,layout,cfg,out_dtype", PROLOGUE_CASES)
def test_prologue_matches_reference_interpret(m, prologue, layout, cfg, out_dtype):
    n, k = 200, 384
    _, w, _, w_scale, bias = make(m, n, k, layout, None, seed=m * 7 + len(prologue))
    ks = jax.random.split(jax.random.key(m), 2)
    width = 2 * k if prologue == "swiglu" else k
    a = (jax.random.normal(ks[0], (m, width)) * 3).astype(jnp.bfloat16)
    kw = dict(layout=layout, bias=bias, out_dtype=out_dtype, prologue=prologue)
    if prologue == "rmsnorm":
        kw.update(norm_weight=jax.random.uniform(ks[1], (k,), jnp.float32, 0.5, 2.0).astype(jnp.bfloat16),
                  eps=1e-5)
    out = G.fp8_gemv(a, w, None, w_scale, config=cfg, interpret=True, **kw)
    ref = G.fp8_gemv_reference(a, w, None, w_scale, **kw)
    assert out.shape == (m, n) and out.dtype == jnp.dtype(out_dtype)
    assert rel_err(out, ref) < PROLOGUE_TOL[jnp.dtype(out_dtype)]


def test_prologue_references():
    """The prologue formulas against float64 numpy (f32 math, one rounding to bf16)."""
    x = (jax.random.normal(jax.random.key(0), (3, 256)) * 4).astype(jnp.bfloat16)
    w = jax.random.uniform(jax.random.key(1), (256,), jnp.float32, 0.5, 2.0).astype(jnp.bfloat16)
    x64 = np.asarray(x, np.float64)
    y = x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + 1e-5)
    want = np.asarray(jnp.asarray(y, jnp.bfloat16), np.float64) * np.asarray(w, np.float64)
    got = np.asarray(G.rms_norm_reference(x, w, 1e-5), np.float64)
    np.testing.assert_allclose(got, want, rtol=2.0**-7)     # one bf16 rounding of each side
    g, u = x64[:, :128], x64[:, 128:]
    want = g / (1 + np.exp(-g)) * u
    np.testing.assert_allclose(np.asarray(G.swiglu_reference(x), np.float64), want, rtol=2.0**-8,
                               atol=1e-30)


def test_prologue_bad_inputs():
    a, w, _, ws = _args(m=1, layout="row")
    with pytest.raises(ValueError, match="prologue"):
        G.fp8_gemv(a, w, None, ws, layout="row", prologue="gelu", interpret=True)
    with pytest.raises(ValueError, match="norm_weight"):
        G.fp8_gemv(a, w, None, ws, layout="row", prologue="rmsnorm", interpret=True)
    with pytest.raises(ValueError, match="norm_weight"):
        G.fp8_gemv(a, w, None, ws, layout="row", norm_weight=jnp.ones((384,)), interpret=True)
    with pytest.raises(ValueError, match="a: the swiglu prologue"):
        G.fp8_gemv(a, w, None, ws, layout="row", prologue="swiglu", interpret=True)
    a8 = a.astype(E4M3)
    with pytest.raises(TypeError, match="a: prologue"):
        G.fp8_gemv(a8, w, jnp.ones((1, 1)), ws, layout="row", prologue="rmsnorm",
                   norm_weight=jnp.ones((384,)), interpret=True)


def test_fp8_dot_variant_interpret():
    """W8A8 with the raw FP8 tiles fed to the dot (`fp8_dot`): same products, same sums."""
    a, w, a_scale, w_scale, bias = make(16, 200, 384, "block", "group", seed=11)
    cfg = C(64, 128, swap_ab=True, fp8_dot=True)
    out = G.fp8_gemv(a, w, a_scale, w_scale, layout="block", out_dtype=jnp.float32, config=cfg,
                     interpret=True)
    ref = reference(a, w, a_scale, w_scale, layout="block", out_dtype=jnp.float32)
    assert rel_err(out, ref) < TOL[jnp.dtype(jnp.float32)]


def test_reference_matches_float64():
    m, n, k = 3, 200, 384
    a, w, a_scale, w_scale, bias = make(m, n, k, "block", "group", seed=5)
    ref = G.fp8_gemv_reference(a, w, a_scale, w_scale, layout="block", bias=bias, out_dtype=jnp.float32)
    af = np.asarray(a.astype(jnp.float32), np.float64) * np.repeat(np.asarray(a_scale), 128, 1)[:, :k]
    ws = np.repeat(np.repeat(np.asarray(w_scale), 128, 0), 128, 1)[:n, :k]
    wf = np.asarray(w.astype(jnp.float32), np.float64) * ws
    expect = af @ wf.T + np.asarray(bias, np.float64)
    assert rel_err(ref, expect) < 1e-6  # f32 rounding of scales/products over K=384 terms


def test_config_for_is_valid_for_every_layout():
    for m in (1, 7, 16, 33, 64):
        for (n, k) in ((200, 384), (4096, 4096), (128256, 4096), (4096, 14336)):
            for layout in G.LAYOUTS:
                cfg = G.config_for(m, n, k, layout)
                assert cfg.use_dot or m == 1
                if layout == "block":
                    assert 128 % cfg.block_n == 0 and cfg.block_k % 128 == 0


def check_staged_rows(cfg, m, seed, n=200, k=384):
    """`cfg` on staged (f16) rows of M x K block-scaled activations against the f32 reference.
    Staging is exact (bf16 values and power-of-two group scales fit f16 rows), so the only error
    is the f32 order of summation over K: 1e-5 relative."""
    a, w, _, w_scale, bias = make(m, n, k, "block", None, seed=seed)
    rows, scales = G.stage_f16_rows(a)
    out = G.fp8_gemv(rows, w, scales, w_scale, layout="block", bias=bias, out_dtype=jnp.float32,
                     config=cfg, interpret=True)
    ref = G.fp8_gemv_reference(a, w, None, w_scale, layout="block", bias=bias,
                               out_dtype=jnp.float32)
    assert rel_err(out, ref) < 1e-5


def test_tiny_n_class_changes_only_m16_short_k():
    # N <= N_TINY is its own class so that only the measured case (M = 16, K <= 8192: more
    # split-K for few row blocks) departs from the n_small tiles.
    assert G._shape_class(16, G.N_TINY, 2048)[1] == "n_tiny"
    assert G._shape_class(16, G.N_TINY + 1, 2048)[1] == "n_small"
    for key, cfg in G.TUNING.items():
        if key[1] == "n_tiny" and key != ("m16", "n_tiny", "k_short"):
            assert cfg == G.TUNING[(key[0], "n_small", key[2])]
    assert G.TUNING[("m16", "n_tiny", "k_short")].split_k == 8
    # more split-K than K steps: the kernel drops the programs that would own no K
    check_staged_rows(G.TUNING[("m16", "n_tiny", "k_short")], m=16, seed=5)


def test_f16_activations_take_the_f16_table_at_m16():
    # Staged (f16) rows at M <= 16 on large weights use TUNING_F16's tile; bf16 ones keep TUNING.
    for m in (2, 16):
        for (n, k) in ((28672, 4096), (4096, 14336)):
            key = G._shape_class(m, n, k)
            assert G.config_for(m, n, k, "block", f16_act=True) == G.TUNING_F16[key]
            assert G.config_for(m, n, k, "block") == G.TUNING[key]
    assert G.config_for(16, 4096, 4096, "block", f16_act=True) == G.TUNING[("m16", "n_small",
                                                                              "k_short")]
    for cfg in G.TUNING_F16.values():
        assert cfg.use_dot and 128 % cfg.block_n == 0 and cfg.block_k % 128 == 0


@pytest.mark.parametrize("cfg", list(G.TUNING_F16.values()))
def test_f16_table_tiles_match_reference_on_staged_rows(cfg):
    """Each TUNING_F16 tile (bn128, 8 warps; split-K 1 and 8) on staged bf16 rows, N=200, K=384
    (masked N, K shorter than the split), M=9: f32 sums of exact products."""
    check_staged_rows(cfg, m=9, seed=3)


@pytest.mark.parametrize("m,cfg,out_dtype,res_dtype", [
    (1, C(16, 128, use_dot=False), jnp.bfloat16, jnp.bfloat16),   # written by the kernel
    (1, C(16, 128, split_k=3, use_dot=False), jnp.bfloat16, jnp.float32),   # with the split sum
    (7, C(32, 128), jnp.float32, jnp.bfloat16),                  # dot, masked rows and columns
    (7, C(32, 128, split_k=2, row_blocks=2), jnp.bfloat16, jnp.bfloat16),
])
def test_residual_is_added_like_xla(m, cfg, out_dtype, res_dtype):
    """fp8_gemv(..., residual=r) equals add_residual(fp8_gemv(...), r) bit for bit (the product
    rounded to out_dtype, then the f32 sum rounded), whether the kernel's epilogue adds it
    (split_k 1) or the split-K sum does; and its reference likewise."""
    n, k = 200, 384
    a, w, a_scale, w_scale, bias = make(m, n, k, "block", None, seed=m + 5)
    r = (jax.random.normal(jax.random.key(m), (m, n)) * 30).astype(res_dtype)
    kw = dict(layout="block", bias=bias, out_dtype=out_dtype)
    got = G.fp8_gemv(a, w, a_scale, w_scale, residual=r, config=cfg, interpret=True, **kw)
    want = G.add_residual(G.fp8_gemv(a, w, a_scale, w_scale, config=cfg, interpret=True, **kw), r)
    assert got.shape == (m, n) and got.dtype == jnp.dtype(out_dtype)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    ref = G.fp8_gemv_reference(a, w, a_scale, w_scale, residual=r, **kw)
    np.testing.assert_array_equal(
        np.asarray(ref, np.float32),
        np.asarray(G.add_residual(G.fp8_gemv_reference(a, w, a_scale, w_scale, **kw), r),
                   np.float32))
    assert rel_err(got, ref) < TOL[jnp.dtype(out_dtype)]


def test_residual_bad_inputs():
    a, w, sa, sw = _args()
    with pytest.raises(ValueError, match=r"residual: expected shape \(4, 200\)"):
        G.fp8_gemv(a, w, sa, sw, layout="row", residual=jnp.zeros((4, 199)), interpret=True)
    with pytest.raises(TypeError, match="residual: expected a float"):
        G.fp8_gemv(a, w, sa, sw, layout="row", residual=jnp.zeros((4, 200), jnp.int32),
                   interpret=True)


# (M, layout, activation scales, config, K block of the stored weight): FMA and dot, split-K with
# a partial last chunk (K = 1536 over 4 splits of 512 = 3 steps of 128... masked nowhere), masked
# rows (N = 200), several sub-tiles per K block and K steps spanning two K blocks.
K_BLOCKED_CASES = [
    (1, "block", None, C(16, 256, use_dot=False), 512),
    (1, "block", None, C(8, 1024, split_k=2, use_dot=False), 256),
    (7, "row", "row", C(32, 128, split_k=3), 384),
    (16, "block", "group", C(32, 256, swap_ab=True), 128),
    (1, "tensor", None, C(16, 512, use_dot=False, row_blocks=2), 512),
]


@pytest.mark.parametrize("m,layout,a_kind,cfg,w_block", K_BLOCKED_CASES)
def test_k_blocked_weight_gives_the_same_bits(m, layout, a_kind, cfg, w_block):
    """The K-blocked weight (`to_k_blocked`) is read at other addresses, in the same order: the
    same output bits as the (N, K) weight, and the reference (which takes either) agrees."""
    n, k = 200, 1536
    a, w, a_scale, w_scale, bias = make(m, n, k, layout, a_kind, seed=m + w_block)
    w3 = G.to_k_blocked(w, w_block)
    assert w3.shape == (k // w_block, n, w_block)
    np.testing.assert_array_equal(np.asarray(G.from_k_blocked(w3), np.float32),
                                  np.asarray(w, np.float32))
    kw = dict(layout=layout, bias=bias, out_dtype=jnp.float32)
    got = G.fp8_gemv(a, w3, a_scale, w_scale, config=cfg, interpret=True, **kw)
    want = G.fp8_gemv(a, w, a_scale, w_scale, config=cfg, interpret=True, **kw)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    ref = reference(a, w3, a_scale, w_scale, **kw)
    np.testing.assert_array_equal(np.asarray(ref), np.asarray(reference(a, w, a_scale, w_scale, **kw)))
    assert rel_err(got, ref) < TOL[jnp.dtype(jnp.float32)]


def test_k_blocked_bad_inputs():
    w = jnp.zeros((200, 1536), E4M3)
    with pytest.raises(ValueError, match="w_block"):
        G.to_k_blocked(w, 200)            # not a multiple of 128
    with pytest.raises(ValueError, match="w_block"):
        G.to_k_blocked(w, 1024)           # does not divide K
    a = jnp.zeros((1, 1500), jnp.bfloat16)
    ws = jnp.ones((2, 12), jnp.float32)
    with pytest.raises(ValueError, match="w: a K-blocked weight's block"):
        G.fp8_gemv(a, jnp.zeros((15, 200, 100), E4M3), None, ws, layout="block", interpret=True)
    with pytest.raises(ValueError, match="K=1536"):   # a's K against the weight's logical K
        G.fp8_gemv(a, G.to_k_blocked(w, 512), None, ws, layout="block", interpret=True)
    with pytest.raises(ValueError, match="block_k must be a multiple of 128"):
        G.fp8_gemv(jnp.zeros((1, 1536), jnp.bfloat16), G.to_k_blocked(w, 512), None,
                   jnp.ones((1, 1), jnp.float32), layout="tensor", config=C(16, 64, use_dot=False),
                   interpret=True)


@pytest.mark.parametrize("m,layout,a_kind,cfg,with_bias,deferred", [
    (4, "block", None, C(32, 128, split_k=3), False, True),
    (1, "block", "group", C(16, 128, split_k=2, use_dot=False), False, True),
    (4, "block", None, C(32, 128), False, False),             # split-K 1: the kernel writes C
    (4, "row", None, C(32, 128, split_k=2), False, False),    # row scales follow the sum
    (4, "block", None, C(32, 128, split_k=2), True, False),   # so does the bias
    (5, "block", "staged", C(32, 128, split_k=3), False, True),   # f16 rows: their scales too
])
def test_defer_sum_leaves_the_partials_where_the_sum_is_all(m, layout, a_kind, cfg, with_bias,
                                                            deferred):
    """defer_sum returns `SplitKParts` exactly where only the sum (then cast and residual)
    follows the kernel, and `sum_split_k` of them is the output fp8_gemv returns otherwise, bit
    for bit (one summation order for both)."""
    n, k = 200, 384
    a, w, a_scale, w_scale, bias = make(m, n, k, layout, None if a_kind == "staged" else a_kind,
                                        seed=m + 17)
    if a_kind == "staged":
        a, a_scale = G.stage_f16_rows(a)
    r = (jax.random.normal(jax.random.key(m), (m, n)) * 30).astype(jnp.bfloat16)
    kw = dict(layout=layout, bias=bias if with_bias else None, out_dtype=jnp.bfloat16,
              residual=r, config=cfg, interpret=True)
    got = G.fp8_gemv(a, w, a_scale, w_scale, defer_sum=True, **kw)
    want = G.fp8_gemv(a, w, a_scale, w_scale, **kw)
    assert isinstance(got, G.SplitKParts) == deferred
    if deferred:
        assert got.m == m and got.parts.shape == (cfg.split_k, 1 if not cfg.use_dot else 16, n)
        assert (got.row_scale is not None) == (a_kind == "staged")
        got = G.sum_split_k(got.parts, got.m, jnp.bfloat16, r, row_scale=got.row_scale)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def _args(m=4, n=200, k=384, layout="row"):
    a, w, a_scale, w_scale, _ = make(m, n, k, layout, None, seed=0)
    return a, w, a_scale, w_scale


@pytest.mark.parametrize("change,match,exc", [
    (lambda a, w, sa, sw: (a, w[:, :256], sa, sw), "w: expected .*K=384", ValueError),
    (lambda a, w, sa, sw: (a.astype(jnp.int8), w, sa, sw), "a: expected", TypeError),
    (lambda a, w, sa, sw: (a, w.astype(jnp.bfloat16), sa, sw), "w: expected float8", TypeError),
    (lambda a, w, sa, sw: (a, w, sa, sw[:10]), r"w_scale: expected \(200, 1\)", ValueError),
    (lambda a, w, sa, sw: (a[0], w, sa, sw), "a: expected a 2-D", ValueError),
    (lambda a, w, sa, sw: (a, w, jnp.ones((1, 1)), sw), "a_scale: expected None", ValueError),
    (lambda a, w, sa, sw: (a.astype(E4M3), w, None, sw), "a_scale: an FP8", ValueError),
    (lambda a, w, sa, sw: (a.astype(E4M3), w, jnp.ones((4, 2)), sw), "a_scale: expected", ValueError),
    (lambda a, w, sa, sw: (jnp.zeros((65, 384), jnp.bfloat16), w, sa, sw), "M <= 64", ValueError),
])
def test_bad_inputs_name_the_argument(change, match, exc):
    a, w, sa, sw = change(*_args())
    with pytest.raises(exc, match=match):
        G.fp8_gemv(a, w, sa, sw, layout="row", interpret=True)


def test_bad_layout_bias_and_config():
    a, w, sa, sw = _args()
    with pytest.raises(ValueError, match="layout: expected"):
        G.fp8_gemv(a, w, sa, sw, layout="col", interpret=True)
    with pytest.raises(ValueError, match=r"bias: expected shape \(200,\)"):
        G.fp8_gemv(a, w, sa, sw, layout="row", bias=jnp.ones(3), interpret=True)
    with pytest.raises(ValueError, match="use_dot=False needs M == 1"):
        G.fp8_gemv(a, w, sa, sw, layout="row", config=C(32, 256, use_dot=False), interpret=True)
    with pytest.raises(TypeError, match="out_dtype"):
        G.fp8_gemv(a, w, sa, sw, layout="row", out_dtype=jnp.int32, interpret=True)
    with pytest.raises(ValueError, match="GemvConfig.block_n"):
        C(24, 256)
    with pytest.raises(ValueError, match="GemvConfig.row_blocks"):
        C(32, 256, row_blocks=0)


@settings(max_examples=20, deadline=None)
@given(m=st.integers(1, 64), n=st.integers(1, 300), k=st.integers(1, 600),
       bad_k=st.integers(1, 600))
def test_k_mismatch_always_rejected(m, n, k, bad_k):
    if bad_k == k:
        bad_k = k + 1
    a = jnp.zeros((m, k), jnp.bfloat16)
    w = jnp.zeros((n, bad_k), E4M3)
    with pytest.raises(ValueError, match="w: expected"):
        G.fp8_gemv(a, w, None, jnp.ones((1, 1)), layout="tensor", interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 8, 64])
@pytest.mark.parametrize("layout,a_kind", [("tensor", None), ("row", None), ("block", None),
                                           ("block", "group"), ("tensor", "tensor")])
def test_gpu_matches_reference(m, layout, a_kind):
    for (n, k) in ((4096, 4096), (200, 384)):
        a, w, a_scale, w_scale, bias = make(m, n, k, layout, a_kind, seed=m + n)
        for out_dtype in (jnp.float32, jnp.bfloat16):
            out = G.fp8_gemv(a, w, a_scale, w_scale, layout=layout, bias=bias, out_dtype=out_dtype)
            ref = G.fp8_gemv_reference(a, w, a_scale, w_scale, layout=layout, bias=bias,
                                       out_dtype=out_dtype)
            assert rel_err(out, ref) < GPU_TOL[jnp.dtype(out_dtype)], (n, k, out_dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [C(16, 512, use_dot=False), C(32, 256, split_k=2, use_dot=False),
                                 C(64, 256, swap_ab=True), C(32, 512, split_k=4),
                                 C(16, 512, use_dot=False, row_blocks=3)])
def test_gpu_variants(cfg):
    m = 1 if not cfg.use_dot else 16
    a, w, a_scale, w_scale, bias = make(m, 6144, 4096, "block", None, seed=3)
    out = G.fp8_gemv(a, w, a_scale, w_scale, layout="block", bias=bias, out_dtype=jnp.float32, config=cfg)
    ref = G.fp8_gemv_reference(a, w, a_scale, w_scale, layout="block", bias=bias, out_dtype=jnp.float32)
    assert rel_err(out, ref) < GPU_TOL[jnp.dtype(jnp.float32)]


@pytest.mark.gpu
@pytest.mark.parametrize("m,prologue", [(1, "rmsnorm"), (16, "rmsnorm"), (1, "swiglu"), (16, "swiglu")])
def test_gpu_prologue(m, prologue):
    n, k = 4096, 4096
    _, w, _, w_scale, bias = make(m, n, k, "block", None, seed=5)
    a = (jax.random.normal(jax.random.key(m), (m, 2 * k if prologue == "swiglu" else k)) * 3
         ).astype(jnp.bfloat16)
    kw = dict(layout="block", bias=bias, out_dtype=jnp.float32, prologue=prologue)
    if prologue == "rmsnorm":
        kw.update(norm_weight=jax.random.uniform(jax.random.key(2), (k,), jnp.float32, 0.5, 2
                                                 ).astype(jnp.bfloat16), eps=1e-5)
    out = G.fp8_gemv(a, w, None, w_scale, **kw)
    ref = G.fp8_gemv_reference(a, w, None, w_scale, **kw)
    assert rel_err(out, ref) < 1e-3   # PROLOGUE_TOL's argument; K=4096 on tensor cores / FMA


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16])
def test_gpu_k_blocked(m):
    a, w, a_scale, w_scale, bias = make(m, 6144, 4096, "block", None, seed=11)
    kw = dict(layout="block", bias=bias, out_dtype=jnp.float32)
    out = G.fp8_gemv(a, G.to_k_blocked(w, 512), a_scale, w_scale, **kw)
    ref = G.fp8_gemv_reference(a, w, a_scale, w_scale, **kw)
    assert rel_err(out, ref) < GPU_TOL[jnp.dtype(jnp.float32)]


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16])
def test_gpu_fp8_dot(m):
    a, w, a_scale, w_scale, bias = make(m, 6144, 4096, "block", "group", seed=9)
    cfg = C(64, 256, split_k=4, swap_ab=True, fp8_dot=True, num_stages=4)
    out = G.fp8_gemv(a, w, a_scale, w_scale, layout="block", bias=bias, out_dtype=jnp.float32, config=cfg)
    ref = G.fp8_gemv_reference(a, w, a_scale, w_scale, layout="block", bias=bias, out_dtype=jnp.float32)
    assert rel_err(out, ref) < GPU_TOL[jnp.dtype(jnp.float32)]
