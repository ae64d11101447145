"""jfp8.matmul's Pallas branches ("interpret" on CPU, "pallas" on a Hopper GPU) against the XLA path.

Both sides quantize the activations identically (the quantize kernel is bit-exact with
jfp8.quantize, checked below), form exact products of FP8 (or bf16) values and sum in f32; they
differ only by f32 summation order and where the scales are multiplied in. Bound: f32 output
max|Δ| / max|ref| < 1e-5 (K=384: a few f32 ulps of the largest partial sums), bf16 output < 2**-7
(one bf16 ulp of almost the same f32 value). On the GPU the XLA path itself is not exact for
per-tensor scales (cuBLASLt's FP8 dot), so the GPU test compares the Pallas path with a float64
reference on the same quantized operands: W8A16 and the gemv < 1e-4 (f32 sums over K=4096), FP8
tensor cores (fp8_gemm) < 2**-10 (tests/test_fp8_gemm.py: 128-K blocks accumulate in reduced
precision before the f32 promotion).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jfp8
from jfp8 import _matmul_pallas

N, K = 200, 384


def rel_err(out, ref):
    out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    assert np.isfinite(out).all()
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def both(x, wq, backend="interpret", **kw):
    """(backend result, XLA result), each traced under jit (the backend is read at trace time)."""
    f = lambda x, wq: jfp8.matmul(x, wq, **kw)
    with jfp8.use_backend(backend):
        y = jax.jit(f)(x, wq)
    with jfp8.use_backend("xla"):
        y_xla = jax.jit(f)(x, wq)
    return y, y_xla


def weights(recipe, seed=0, n=N, k=K):
    w = jax.random.normal(jax.random.key(seed), (n, k)) * 0.05
    return jfp8.quantize(w, recipe.weight_format, recipe.weight_granularity)


@pytest.mark.parametrize("lead,recipe,out_dtype", [
    ((1,), jfp8.Recipe.weights_only(), jnp.float32),                             # gemv W8A16 (FMA)
    ((7,), jfp8.Recipe.weights_only(jfp8.PerBlock((128, 128))), jnp.bfloat16),   # gemv W8A16 (dot)
    ((1,), jfp8.Recipe.block128(), jnp.float32),                                 # quantize + gemv W8A8
    ((1, 3), jfp8.Recipe.per_tensor(), jnp.float32),                             # quantize + fp8_gemm
    ((130,), jfp8.Recipe.block128(), jnp.float32),                               # quantize + fp8_gemm
])
def test_interpret_matches_xla(lead, recipe, out_dtype):
    x = jax.random.normal(jax.random.key(len(lead)), (*lead, K), jnp.bfloat16)
    bias = jax.random.normal(jax.random.key(99), (N,))
    y, y_xla = both(x, weights(recipe), bias=bias, out_dtype=out_dtype, recipe=recipe)
    assert y.shape == (*lead, N) and y.dtype == jnp.dtype(out_dtype)
    tol = 1e-5 if out_dtype == jnp.float32 else 2.0**-7
    assert rel_err(y, y_xla) < tol


@pytest.mark.parametrize("backend", ["interpret", "xla"])
@pytest.mark.parametrize("lead,recipe", [
    ((1, 1), jfp8.Recipe.weights_only(jfp8.PerBlock((128, 128)))),   # gemv: residual in-kernel
    ((2, 5), jfp8.Recipe.block128()),                                # quantize + gemv W8A8
    ((130,), jfp8.Recipe.block128()),                                # fp8_gemm, residual by XLA
])
def test_residual_equals_adding_after(backend, lead, recipe):
    """matmul(x, wq, residual=r) is `matmul(x, wq) + r` as XLA adds two bf16 arrays, on every
    path (in the decode kernel's epilogue, with its split-K sum, or after the GEMM): same bits."""
    x = jax.random.normal(jax.random.key(3), (*lead, K), jnp.bfloat16)
    r = jax.random.normal(jax.random.key(4), (*lead, N), jnp.bfloat16)
    wq = weights(recipe)
    with jfp8.use_backend(backend):
        got = jax.jit(lambda x, r: jfp8.matmul(x, wq, recipe=recipe, residual=r))(x, r)
        want = jax.jit(lambda x, r: jfp8.matmul(x, wq, recipe=recipe) + r)(x, r)
    assert got.shape == (*lead, N) and got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    with pytest.raises(ValueError, match="residual: expected"):
        jfp8.matmul(x, wq, recipe=recipe, residual=r[..., :-1])


@pytest.mark.parametrize("min_weight,staged", [(0, True), (N * K + 1, False)])
def test_w8a16_f16_staging_dispatch(monkeypatch, min_weight, staged):
    """W8A16 at 2 <= M <= 16 with bf16 x on weights of >= F16_STAGING_MIN_WEIGHT elements stages x
    into f16 rows (fp8_gemv.stage_f16_rows) and stays the same function (f32 bound above), also
    for a row beyond f16's range; smaller weights keep the bf16 operands."""
    from pallas_kernels import fp8_gemv
    calls = []
    stage = fp8_gemv.stage_f16_rows
    monkeypatch.setattr(fp8_gemv, "stage_f16_rows", lambda x: calls.append(x.shape) or stage(x))
    monkeypatch.setattr(_matmul_pallas, "F16_STAGING_MIN_WEIGHT", min_weight)
    recipe = jfp8.Recipe.weights_only(jfp8.PerBlock((128, 128)))
    x = jax.random.normal(jax.random.key(11), (5, K), jnp.bfloat16).at[2].multiply(3e5)
    y, y_xla = both(x, weights(recipe, seed=4), out_dtype=jnp.float32, recipe=recipe)
    assert calls == ([(5, K)] if staged else [])
    assert rel_err(y, y_xla) < 1e-5 and rel_err(y[2], y_xla[2]) < 1e-5


def test_qarray_input():
    # An already-quantized (1, K) activation goes straight to the W8A8 gemv (same compiled
    # kernel as the (1,) block128 case above).
    x = jax.random.normal(jax.random.key(3), (1, K), jnp.bfloat16)
    xq = jfp8.quantize(x, jfp8.E4M3, jfp8.PerBlock((1, 128)))
    bias = jax.random.normal(jax.random.key(98), (N,))
    y, y_xla = both(xq, weights(jfp8.Recipe.block128()), bias=bias, out_dtype=jnp.float32)
    assert rel_err(y, y_xla) < 1e-5


def test_activation_quantization_is_bit_exact():
    x = jax.random.normal(jax.random.key(5), (5, K), jnp.bfloat16) * 7
    for recipe in (jfp8.Recipe.block128(),):
        q = _matmul_pallas.quantize_activations(x, recipe, interpret=True)
        ref = jfp8.quantize(x, recipe.act_format, recipe.act_granularity)
        assert q.granularity == ref.granularity
        np.testing.assert_array_equal(np.asarray(q.scale), np.asarray(ref.scale))
        np.testing.assert_array_equal(np.asarray(q.data.astype(jnp.float32)),
                                      np.asarray(ref.data.astype(jnp.float32)))


def test_fallbacks_use_the_xla_path_exactly():
    # f32 activations with a weights-only recipe and unsupported weight blocks go to XLA.
    x = jax.random.normal(jax.random.key(7), (4, K), jnp.float32)
    recipe = jfp8.Recipe.weights_only()
    y, y_xla = both(x, weights(recipe), out_dtype=jnp.float32, recipe=recipe)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_xla))
    wq = jfp8.quantize(jax.random.normal(jax.random.key(8), (N, K)), jfp8.E4M3, jfp8.PerBlock((1, 32)))
    assert _matmul_pallas.weight_layout(wq) is None


def _float64_reference(x, wq, recipe):
    xq = jfp8.quantize(x, recipe.act_format, recipe.act_granularity) if recipe.act_format else x
    xf = xq.dequantize(jnp.float32) if isinstance(xq, jfp8.QArray) else x.astype(jnp.float32)
    return np.asarray(xf, np.float64) @ np.asarray(wq.dequantize(jnp.float32), np.float64).T


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 64, 256])
@pytest.mark.parametrize("recipe", [jfp8.Recipe.weights_only(jfp8.PerBlock((128, 128))),
                                    jfp8.Recipe.block128(), jfp8.Recipe.per_tensor()],
                         ids=["w8a16_block", "block128", "per_tensor"])
def test_gpu_pallas_matches_float64(m, recipe):
    n, k = 4096, 4096
    x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
    wq = weights(recipe, n=n, k=k)
    with jfp8.use_backend("pallas"):
        y = jax.jit(lambda x: jfp8.matmul(x, wq, out_dtype=jnp.float32, recipe=recipe))(x)
    ref = _float64_reference(x, wq, recipe)
    fp8_cores = recipe.act_format is not None and (
        m > 64 or _matmul_pallas.DECODE_KERNEL[_matmul_pallas._m_class(m)] == "gemm")
    assert rel_err(y, ref) < (2.0**-10 if fp8_cores else 1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [3, 16])
def test_gpu_staged_w8a16_matches_float64(monkeypatch, m):
    # The f16-staged W8A16 path (jfp8.matmul stages on large weights; the threshold is lowered
    # here so a 4096 x 4096 weight takes it), compiled for the GPU: same bound as above.
    monkeypatch.setattr(_matmul_pallas, "F16_STAGING_MIN_WEIGHT", 0)
    recipe = jfp8.Recipe.weights_only(jfp8.PerBlock((128, 128)))
    x = jax.random.normal(jax.random.key(m), (m, 4096), jnp.bfloat16).at[0].multiply(1e5)
    wq = weights(recipe, n=4096, k=4096)
    with jfp8.use_backend("pallas"):
        y = jax.jit(lambda x: jfp8.matmul(x, wq, out_dtype=jnp.float32, recipe=recipe))(x)
    ref = _float64_reference(x, wq, recipe)
    assert rel_err(y[:1], ref[:1]) < 1e-4 and rel_err(y[1:], ref[1:]) < 1e-4   # row 0 at ~1e5


# Prologues: the interpret backend fuses RMSNorm and SwiGLU into fp8_gemv (W8A16, M == 1;
# _matmul_pallas.FUSED_PROLOGUES), runs each with the f16 staging as one kernel at
# 2 <= M <= 16 (W8A16, pallas_kernels.prologue_stage) and applies them in XLA first elsewhere; the XLA
# path applies the same formula first. The fused bf16 prologue output can flip one ulp where the f32 value differs
# in its last bit (tests/test_fp8_gemv.py: PROLOGUE_TOL), so f32 outputs agree to 1e-3 of
# max|ref| rather than the 1e-5 of plain matmuls.
@pytest.mark.parametrize("lead,kind,recipe", [
    ((1,), "rmsnorm", jfp8.Recipe.weights_only(jfp8.PerBlock((128, 128)))),   # fused
    ((1, 3), "rmsnorm", jfp8.Recipe.weights_only(jfp8.PerBlock((128, 128)))),  # M=3: staged
    ((1, 1), "swiglu", jfp8.Recipe.weights_only()),                           # fused, per-channel
    ((2, 1), "swiglu", jfp8.Recipe.weights_only()),                           # M=2: staged
    ((1,), "rmsnorm", jfp8.Recipe.block128()),                                # W8A8: XLA first
    ((1,), "swiglu", jfp8.Recipe.block128()),                                 # W8A8: XLA first
])
def test_prologue_interpret_matches_xla(lead, kind, recipe):
    wq = weights(recipe, seed=3)
    width = 2 * K if kind == "swiglu" else K
    x = (jax.random.normal(jax.random.key(4), (*lead, width)) * 2).astype(jnp.bfloat16)
    norm_w = jax.random.uniform(jax.random.key(5), (K,), jnp.float32, 0.5, 2).astype(jnp.bfloat16)
    prologue = jfp8.RMSNorm(norm_w, 1e-5) if kind == "rmsnorm" else jfp8.SwiGLU()
    y, y_xla = both(x, wq, recipe=recipe, out_dtype=jnp.float32, prologue=prologue)
    assert y.shape == (*lead, N)
    assert rel_err(y, y_xla) < 1e-3
    with jfp8.use_backend("xla"):   # the XLA path is exactly "prologue, then matmul"
        want = jfp8.matmul(prologue(x), wq, recipe=recipe, out_dtype=jnp.float32)
        got = jfp8.matmul(x, wq, recipe=recipe, out_dtype=jnp.float32, prologue=prologue)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("kind", ["rmsnorm", "swiglu"])
@pytest.mark.parametrize("fused", [True, False])
def test_prologue_runs_staged_kernel_at_m16(monkeypatch, kind, fused):
    """W8A16 at 2 <= M <= 16 with an RMSNorm / SwiGLU prologue: one prologue + staging kernel
    feeds the gemv with f16 rows (any weight size: here a small one), unless NORM_STAGE_FUSED /
    SWIGLU_STAGE_FUSED is off; the result stays the function of the XLA path (bound as above)."""
    from pallas_kernels import prologue_stage
    calls = []
    name = "rms_norm_stage_f16" if kind == "rmsnorm" else "swiglu_stage_f16"
    kernel = getattr(prologue_stage, name)
    monkeypatch.setattr(prologue_stage, name,
                        lambda x, *a, **kw: calls.append(x.shape) or kernel(x, *a, **kw))
    monkeypatch.setattr(_matmul_pallas, "NORM_STAGE_FUSED" if kind == "rmsnorm"
                        else "SWIGLU_STAGE_FUSED", fused)
    recipe = jfp8.Recipe.weights_only(jfp8.PerBlock((128, 128)))
    width = 2 * K if kind == "swiglu" else K
    x = (jax.random.normal(jax.random.key(6), (16, width)) * 3).astype(jnp.bfloat16)
    norm_w = jax.random.uniform(jax.random.key(7), (K,), jnp.float32, 0.5, 2).astype(jnp.bfloat16)
    prologue = jfp8.RMSNorm(norm_w, 1e-5) if kind == "rmsnorm" else jfp8.SwiGLU()
    y, y_xla = both(x, weights(recipe, seed=8), out_dtype=jnp.float32, recipe=recipe,
                    prologue=prologue)
    assert calls == ([(16, width)] if fused else [])
    assert rel_err(y, y_xla) < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["rmsnorm", "swiglu"])
def test_gpu_staged_prologue_m16_matches_float64(kind):
    # The prologue + staging kernel and the gemv on staged rows, compiled, at 8B decode shapes
    # (qkv after the norm, down after the SwiGLU).
    recipe = jfp8.Recipe.weights_only(jfp8.PerBlock((128, 128)))
    width, n, k = (4096, 6144, 4096) if kind == "rmsnorm" else (2 * 14336, 4096, 14336)
    x = jax.random.normal(jax.random.key(9), (16, width), jnp.bfloat16).at[3].multiply(1e2)
    norm_w = jax.random.uniform(jax.random.key(10), (4096,), jnp.float32, 0.5, 2).astype(jnp.bfloat16)
    prologue = jfp8.RMSNorm(norm_w, 1e-5) if kind == "rmsnorm" else jfp8.SwiGLU()
    wq = weights(recipe, n=n, k=k)
    with jfp8.use_backend("pallas"):
        y = jax.jit(lambda x: jfp8.matmul(x, wq, out_dtype=jnp.float32, recipe=recipe,
                                          prologue=prologue))(x)
    ref = _float64_reference(prologue(x), wq, recipe)
    assert rel_err(y, ref) < 1e-3    # a prologue element may flip one bf16 ulp (bound as above)


def test_prologue_bad_inputs():
    wq = weights(jfp8.Recipe.weights_only())
    x = jnp.ones((2, K), jnp.bfloat16)
    with pytest.raises(ValueError, match="x: expected last dim 768"):
        jfp8.matmul(x, wq, prologue=jfp8.SwiGLU())
    with pytest.raises(TypeError, match="prologue"):
        jfp8.matmul(x, wq, prologue="rmsnorm")
    with pytest.raises(ValueError, match="RMSNorm.weight"):
        jfp8.matmul(x, wq, prologue=jfp8.RMSNorm(jnp.ones((7,)), 1e-5))
    xq = jfp8.quantize(x.astype(jnp.float32), jfp8.E4M3, jfp8.PerTensor())
    with pytest.raises(TypeError, match="x: a prologue"):
        jfp8.matmul(xq, wq, prologue=jfp8.SwiGLU())


# MGPU_GEMV: W8A16 decode matmuls go to the Mosaic GPU decode kernel
# (pallas_kernels.fp8_gemv_mgpu, interpreted on the CPU): staged f16 rows at M >= 2 (wgmma,
# replaced by an f32 dot in the interpreter), one bf16 row at M = 1 (FMA, prologue fused). N = 256
# here because the kernel takes N multiples of 64 only (N = 200 stays on fp8_gemv).
@pytest.mark.parametrize("lead,kind", [((5,), None), ((1,), "rmsnorm"), ((3,), "swiglu"),
                                       ((1,), None)])
def test_mgpu_gemv_dispatch(monkeypatch, lead, kind):
    from pallas_kernels import fp8_gemv_mgpu
    if fp8_gemv_mgpu._INTERPRET_ERROR is not None:
        pytest.skip(fp8_gemv_mgpu._INTERPRET_ERROR)
    calls = []
    kernel = fp8_gemv_mgpu.fp8_gemv_mgpu
    monkeypatch.setattr(fp8_gemv_mgpu, "fp8_gemv_mgpu",
                        lambda a, *args, **kw: calls.append(a.shape) or kernel(a, *args, **kw))
    monkeypatch.setattr(_matmul_pallas, "MGPU_GEMV", True)
    monkeypatch.setattr(_matmul_pallas, "F16_STAGING_MIN_WEIGHT", 0)
    recipe = jfp8.Recipe.weights_only(jfp8.PerBlock((128, 128)))
    width = 2 * K if kind == "swiglu" else K
    x = (jax.random.normal(jax.random.key(12), (*lead, width)) * 2).astype(jnp.bfloat16)
    norm_w = jax.random.uniform(jax.random.key(13), (K,), jnp.float32, 0.5, 2).astype(jnp.bfloat16)
    prologue = {None: None, "rmsnorm": jfp8.RMSNorm(norm_w, 1e-5), "swiglu": jfp8.SwiGLU()}[kind]
    r = jax.random.normal(jax.random.key(14), (*lead, 256), jnp.bfloat16)
    y, y_xla = both(x, weights(recipe, seed=9, n=256), out_dtype=jnp.float32, recipe=recipe,
                    prologue=prologue, residual=r)
    assert calls == [(lead[0], K)]
    # a prologue's bf16 output may flip one ulp (bound as for the prologue tests above)
    assert rel_err(y, y_xla) < (1e-5 if kind is None else 1e-3)
    calls.clear()   # N = 200 is not the kernel's: fp8_gemv takes it, same function
    y, y_xla = both(x, weights(recipe, seed=9), out_dtype=jnp.float32, recipe=recipe,
                    prologue=prologue)
    assert calls == [] and rel_err(y, y_xla) < (1e-5 if kind is None else 1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16])
def test_gpu_mgpu_gemv_matches_float64(monkeypatch, m):
    # MGPU_GEMV on the GPU at an 8B shape (M = 1 staged too): same bound as the other gemvs.
    from pallas_kernels import fp8_gemv_mgpu
    if not fp8_gemv_mgpu.available():
        pytest.skip(fp8_gemv_mgpu.unavailable_reason())
    monkeypatch.setattr(_matmul_pallas, "MGPU_GEMV", True)
    monkeypatch.setattr(_matmul_pallas, "F16_STAGING_MIN_WEIGHT", 0)
    recipe = jfp8.Recipe.weights_only(jfp8.PerBlock((128, 128)))
    x = jax.random.normal(jax.random.key(m), (m, 4096), jnp.bfloat16)
    wq = weights(recipe, n=6144, k=4096)
    with jfp8.use_backend("pallas"):
        y = jax.jit(lambda x: jfp8.matmul(x, wq, out_dtype=jnp.float32, recipe=recipe))(x)
    assert rel_err(y, _float64_reference(x, wq, recipe)) < 1e-4
