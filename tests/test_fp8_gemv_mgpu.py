"""Tests for pallas_kernels.fp8_gemv_mgpu (decode-shaped FP8 matmul through Mosaic GPU).

Reference: `fp8_gemv.fp8_gemv_reference` on the bf16 activations before staging (both operands
dequantized to f32, HIGHEST-precision dot). Metric: rel_err = max|out - ref| / max|ref|.

Error bounds, and where they come from:
* Staging is exact for these rows (bf16 values times a power of two fit f16, see
  `stage_f16_rows`), e4m3 -> f16 is exact and f16 x f16 products are exact in f32, so kernel and
  reference differ only by f32 summation order over K and the scale multiplications: f32 output
  < 1e-5 (as tests/test_fp8_gemv.py; measured ~5e-7).
* bf16 output: one bf16 ulp of the element at most, < 2**-7 of max|ref|.
* GPU: tensor-core accumulation order over K = 4096 as well: f32 output < 1e-4.
Interpret mode runs the kernel in Pallas' Mosaic GPU interpreter (TMA pipeline, shared memory,
barriers, indexing, scales) with the wgmma replaced by an f32 dot of the same operands (see the
module docstring); `test_lowers_for_cuda` lowers the real wgmma path.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import fp8_gemv as G
from pallas_kernels import fp8_gemv_mgpu as MG

E4M3 = jnp.float8_e4m3fn
TOL = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 2.0**-7}
GPU_TOL = {jnp.dtype(jnp.float32): 1e-4, jnp.dtype(jnp.bfloat16): 2.0**-7}
needs_mosaic = pytest.mark.skipif(MG._IMPORT_ERROR is not None,
                                  reason=f"no Mosaic GPU Pallas here: {MG._IMPORT_ERROR}")
needs_interpreter = pytest.mark.skipif(MG._INTERPRET_ERROR is not None,
                                       reason=str(MG._INTERPRET_ERROR))


def rel_err(out, ref):
  out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
  ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
  assert np.isfinite(out).all(), "non-finite output"
  return float(np.abs(out - ref).max() / np.abs(ref).max())


def make(m, n, k, layout, *, seed):
  """bf16 activations, FP8 weights spanning e4m3's range, positive scales, bias, residual."""
  ks = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(ks[0], (m, k), jnp.bfloat16)
  w = jnp.clip(jax.random.normal(ks[1], (n, k)) * 100, -448, 448).astype(E4M3)
  shape = {"tensor": (1, 1), "row": (n, 1), "block": (-(-n // 128), -(-k // 128))}[layout]
  w_scale = jax.random.uniform(ks[2], shape, minval=1e-3, maxval=2e-2)
  bias = jax.random.normal(ks[3], (n,), jnp.float32)
  residual = jax.random.normal(ks[4], (m, n), jnp.bfloat16)
  return x, w, w_scale, bias, residual


Cfg = MG.MgpuGemvConfig
# (M, N, K, layout, config, bias, residual, out dtype): M in {1, 7, 9, 16} (rows padded to 8 or
# 16), one and two 64-row wgmma tiles per CTA, split-K 1 / 2 / 3 / 5 and the rule (0), pipelines
# deeper than, equal to and shorter than a CTA's K steps (10 steps through a 3-stage ring: the
# ring wraps three times), the three scale layouts, bias,
# residual, both output dtypes; N and K multiples of 64 and 128 (what the kernel takes).
CASES = [
    (1, 64, 128, "tensor", Cfg(max_concurrent_steps=2), False, False, jnp.float32),
    (7, 192, 640, "row", Cfg(split_k=5, max_concurrent_steps=3), True, False, jnp.float32),
    (9, 256, 384, "block", Cfg(tile_n=128, split_k=3), False, True, jnp.bfloat16),
    (16, 128, 1024, "block", Cfg(max_concurrent_steps=3), True, True, jnp.float32),
    (4, 320, 768, "block", Cfg(split_k=2, max_concurrent_steps=2), False, False, jnp.bfloat16),
    (2, 128, 1280, "block", Cfg(split_k=1, max_concurrent_steps=3), True, False, jnp.float32),
]


@needs_interpreter
@pytest.mark.parametrize("m,n,k,layout,cfg,use_bias,use_res,out_dtype", CASES)
def test_matches_reference_interpret(m, n, k, layout, cfg, use_bias, use_res, out_dtype):
  x, w, w_scale, bias, residual = make(m, n, k, layout, seed=m + n + k)
  bias = bias if use_bias else None
  residual = residual if use_res else None
  rows, row_scale = G.stage_f16_rows(x)
  out = MG.fp8_gemv_mgpu(rows, w, row_scale, w_scale, layout=layout, bias=bias,
                         residual=residual, out_dtype=out_dtype, config=cfg, interpret=True)
  ref = G.fp8_gemv_reference(x, w, None, w_scale, layout=layout, bias=bias, residual=residual,
                             out_dtype=out_dtype)
  assert out.shape == (m, n) and out.dtype == jnp.dtype(out_dtype)
  assert rel_err(out, ref) < TOL[jnp.dtype(out_dtype)]


# The FMA kernel (M = 1, bf16 / f16 row, no staging): block scales with split-K 1 finish in
# the kernel (bias, cast, residual: (1, N) written by it), else XLA sums the partials.
FMA_CASES = [
    (256, 512, "block", Cfg(split_k=1, max_concurrent_steps=3), True, True, jnp.bfloat16,
     jnp.bfloat16),
    (128, 1280, "block", Cfg(split_k=1, tile_n=128), False, True, jnp.float32, jnp.float16),
    (192, 384, "block", Cfg(split_k=3), True, True, jnp.float32, jnp.bfloat16),
    (64, 640, "row", Cfg(split_k=1, max_concurrent_steps=2), True, False, jnp.float32,
     jnp.bfloat16),
    (128, 256, "tensor", Cfg(split_k=2), False, True, jnp.bfloat16, jnp.bfloat16),
]


@needs_interpreter
@pytest.mark.parametrize("n,k,layout,cfg,use_bias,use_res,out_dtype,a_dtype", FMA_CASES)
def test_fma_row_matches_reference_interpret(n, k, layout, cfg, use_bias, use_res, out_dtype,
                                             a_dtype):
  x, w, w_scale, bias, residual = make(1, n, k, layout, seed=n + k)
  x = x.astype(a_dtype)
  bias = bias if use_bias else None
  residual = residual if use_res else None
  out = MG.fp8_gemv_mgpu(x, w, None, w_scale, layout=layout, bias=bias, residual=residual,
                         out_dtype=out_dtype, config=cfg, interpret=True)
  ref = G.fp8_gemv_reference(x, w, None, w_scale, layout=layout, bias=bias, residual=residual,
                             out_dtype=out_dtype)
  assert out.shape == (1, n) and out.dtype == jnp.dtype(out_dtype)
  assert rel_err(out, ref) < TOL[jnp.dtype(out_dtype)]


# Prologues fused into the FMA kernel, against fp8_gemv_reference's prologue (the same
# formulas): the prologue's bf16 output can flip one ulp where the kernel's f32 value (1 / rms
# summed in another order, exp) differs in its last bit, as in tests/test_fp8_gemv.py: f32
# output < 1e-3, bf16 < 2**-7.
PROLOGUE_TOL = {jnp.dtype(jnp.float32): 1e-3, jnp.dtype(jnp.bfloat16): 2.0**-7}


@needs_interpreter
@pytest.mark.parametrize("prologue,n,k,layout,cfg,use_res,out_dtype", [
    ("rmsnorm", 128, 640, "block", Cfg(split_k=1, max_concurrent_steps=2), True, jnp.bfloat16),
    ("rmsnorm", 192, 512, "block", Cfg(split_k=2), False, jnp.float32),   # 1/rms per split
    ("swiglu", 256, 384, "block", Cfg(split_k=1), True, jnp.float32),
    ("swiglu", 64, 512, "row", Cfg(split_k=4, max_concurrent_steps=1), False, jnp.bfloat16),
])
def test_fma_prologue_matches_reference_interpret(prologue, n, k, layout, cfg, use_res,
                                                  out_dtype):
  width = 2 * k if prologue == "swiglu" else k
  x, w, w_scale, bias, residual = make(1, n, k, layout, seed=n + k + 1)
  x = (jax.random.normal(jax.random.key(k), (1, width)) * 3).astype(jnp.bfloat16)
  kw = dict(layout=layout, bias=bias, residual=residual if use_res else None,
            out_dtype=out_dtype, prologue=prologue)
  if prologue == "rmsnorm":
    kw.update(norm_weight=jax.random.uniform(jax.random.key(1), (k,), jnp.float32, 0.5, 2.0
                                             ).astype(jnp.bfloat16), eps=1e-5)
  out = MG.fp8_gemv_mgpu(x, w, None, w_scale, config=cfg, interpret=True, **kw)
  ref = G.fp8_gemv_reference(x, w, None, w_scale, **kw)
  assert out.shape == (1, n) and out.dtype == jnp.dtype(out_dtype)
  assert rel_err(out, ref) < PROLOGUE_TOL[jnp.dtype(out_dtype)]


@needs_interpreter
def test_block_scales_reach_their_blocks():
  # One weight block of scale 1 among zeros: a mis-indexed scale (wrong row block, wrong K step,
  # wrong split) moves the only non-zero block's contribution.
  m, n, k = 3, 256, 512
  x, w, _, _, _ = make(m, n, k, "block", seed=11)
  for nb, kb in ((0, 0), (1, 3), (1, 1)):
    w_scale = jnp.zeros((2, 4), jnp.float32).at[nb, kb].set(1.0)
    rows, row_scale = G.stage_f16_rows(x)
    out = MG.fp8_gemv_mgpu(rows, w, row_scale, w_scale, layout="block", out_dtype=jnp.float32,
                           config=Cfg(split_k=2, max_concurrent_steps=2), interpret=True)
    ref = G.fp8_gemv_reference(x, w, None, w_scale, layout="block", out_dtype=jnp.float32)
    assert rel_err(out, ref) < TOL[jnp.dtype(jnp.float32)]
    assert float(jnp.abs(out[:, :128 * nb]).max(initial=0.0)) == 0.0


def test_split_k_rule_fills_the_grid():
  # The divisor of K / 128 that brings the grid closest (by ratio) to ctas_per_sm x 132 CTAs:
  # e.g. Qwen2.5-0.5B's 4864 x 896 has 76 row tiles and 7 K steps: split 7 (532 CTAs), not 1 (76).
  cfg = Cfg()
  for n, k, expect in ((6144, 4096, 4), (4096, 4096, 8), (28672, 4096, 1), (4096, 14336, 8),
                       (3072, 2048, 8), (128256, 4096, 1), (4864, 896, 7)):
    s = MG._split_k(cfg, n, k)
    assert s == expect, (n, k, s)
    assert (k // 128) % s == 0
  assert MG._split_k(Cfg(split_k=2), 4096, 4096) == 2


def test_supports_and_config():
  assert MG.supports(16, 4096, 14336) and MG.supports(1, 128256, 4096)
  assert not MG.supports(17, 4096, 4096)          # M > 16: the GEMM's
  assert not MG.supports(4, 200, 384)              # N not a multiple of 64
  assert not MG.supports(4, 256, 200)              # K not a multiple of 128
  assert not MG.supports(4, 256, MG.MAX_K + 128)   # scales beyond one TMA box
  assert not MG.supports(4, 192, 256, config=Cfg(tile_n=128))
  assert isinstance(MG.config_for(16, 4096, 4096), Cfg)
  for bad in (dict(tile_n=32), dict(max_concurrent_steps=0), dict(split_k=-1)):
    with pytest.raises(ValueError, match="MgpuGemvConfig"):
      Cfg(**bad)


def _good(m=4, n=128, k=256):
  x, w, w_scale, _, _ = make(m, n, k, "block", seed=1)
  rows, row_scale = G.stage_f16_rows(x)
  return dict(a=rows, w=w, a_scale=row_scale, w_scale=w_scale, layout="block")


@pytest.mark.parametrize("change,match,error", [
    (dict(a=jnp.ones((4, 256), jnp.bfloat16), a_scale=None), "a: expected float16 staged",
     TypeError),
    (dict(w=jnp.ones((128, 256), jnp.float8_e5m2)), "w: expected float8_e4m3fn", TypeError),
    (dict(w=jnp.ones((128, 128), E4M3)), r"w: expected \(N, K\)", ValueError),
    (dict(w=jnp.ones((96, 256), E4M3), w_scale=jnp.ones((1, 2))), "multiple of 64", ValueError),
    (dict(w_scale=jnp.ones((1, 1))), "w_scale: expected", ValueError),
    (dict(bias=jnp.ones((7,))), "bias: expected", ValueError),
    (dict(prefetch=jnp.ones((128,), E4M3)), "prefetch: expected", ValueError),
    (dict(config=Cfg(split_k=3)), "split_k must divide", ValueError),
    (dict(prologue="swiglu"), r"a: the swiglu prologue takes \(M, 2K\)", ValueError),
    (dict(a=jnp.ones((4, 512), jnp.bfloat16), a_scale=None, prologue="swiglu"),
     "one bf16 / f16 row", ValueError),
    (dict(a=jnp.ones((1, 16384), jnp.bfloat16), a_scale=None, prologue="rmsnorm",
          norm_weight=jnp.ones((16384,)), w=jnp.ones((128, 16384), E4M3),
          w_scale=jnp.ones((1, 128))), "K <= 8192", ValueError),
    (dict(a=jnp.ones((1, 256), jnp.bfloat16), a_scale=None, prologue="rmsnorm"),
     "norm_weight: expected shape", ValueError),
])
def test_bad_input_names_the_argument(change, match, error):
  kwargs = {**_good(), **change}
  with pytest.raises(error, match=match):
    MG.fp8_gemv_mgpu(**kwargs, interpret=True)


def test_refuses_to_run_without_a_hopper_gpu():
  if MG.available():
    pytest.skip("a Hopper GPU is here")
  with pytest.raises(RuntimeError, match="cannot run here"):
    MG.fp8_gemv_mgpu(**_good())


@needs_mosaic
@pytest.mark.parametrize("m,tile_n,layout,prefetch,fma,split_k,prologue", [
    (16, 64, "block", False, False, 0, None), (1, 128, "block", True, False, 0, None),
    (9, 64, "row", True, False, 0, None),
    (1, 64, "block", True, True, 1, None), (1, 128, "block", False, True, 1, None),  # FMA, own end
    (1, 64, "block", False, True, 2, None), (1, 64, "row", False, True, 1, None),   # XLA's end
    (1, 64, "block", False, True, 1, "rmsnorm"), (1, 64, "block", False, True, 2, "swiglu")])
def test_lowers_for_cuda(m, tile_n, layout, prefetch, fma, split_k, prologue):
  # Traces the real kernel (wgmma with the f16 weight tile in registers, or the FMA loop with
  # its register layouts; the L2 prefetch; the in-kernel epilogue) and lowers it for CUDA
  # without a GPU: Mosaic GPU's own passes run here, so kernel-body errors show on CPU CI; the
  # gpu-marked tests check what it computes.
  n, k = 512, 1024
  shape = {"row": (n, 1), "block": (n // 128, k // 128)}[layout]
  width = 2 * k if prologue == "swiglu" else k
  a = jax.ShapeDtypeStruct((m, width), jnp.bfloat16 if fma else jnp.float16)
  args = (a, jax.ShapeDtypeStruct((n, k), E4M3),
          None if fma else jax.ShapeDtypeStruct((m, 1), jnp.float32),
          jax.ShapeDtypeStruct(shape, jnp.float32), jax.ShapeDtypeStruct((n,), jnp.float32),
          jax.ShapeDtypeStruct((k,), jnp.bfloat16) if prologue == "rmsnorm" else None,
          jax.ShapeDtypeStruct((m, n), jnp.bfloat16),
          jax.ShapeDtypeStruct((1024, 512), E4M3) if prefetch else None)
  MG._fp8_gemv_mgpu_jit.trace(
      *args, layout=layout, out_dtype=jnp.dtype(jnp.bfloat16), prologue=prologue,
      eps=1e-5 if prologue == "rmsnorm" else 0.0, cfg=Cfg(tile_n=tile_n, split_k=split_k),
      prefetch_rows=2 if prefetch else 0, interpret=False).lower(lowering_platforms=("cuda",))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 7, 16])
@pytest.mark.parametrize("layout", ["block", "row"])
def test_gpu_matches_reference(m, layout):
  if not MG.available():
    pytest.skip(MG.unavailable_reason())
  n, k = 4096, 4096
  x, w, w_scale, bias, residual = make(m, n, k, layout, seed=m)
  rows, row_scale = G.stage_f16_rows(x)
  for out_dtype in (jnp.float32, jnp.bfloat16):
    out = MG.fp8_gemv_mgpu(rows, w, row_scale, w_scale, layout=layout, bias=bias,
                           out_dtype=out_dtype)
    ref = G.fp8_gemv_reference(x, w, None, w_scale, layout=layout, bias=bias,
                               out_dtype=out_dtype)
    assert rel_err(out, ref) < GPU_TOL[jnp.dtype(out_dtype)]
  # every tile, split and the prefetch path, on the real wgmma
  for cfg in (Cfg(tile_n=128), Cfg(split_k=32, max_concurrent_steps=1), Cfg(split_k=1)):
    out = MG.fp8_gemv_mgpu(rows, w, row_scale, w_scale, layout=layout, residual=residual,
                           out_dtype=jnp.float32, config=cfg, prefetch=w)
    ref = G.fp8_gemv_reference(x, w, None, w_scale, layout=layout, residual=residual,
                               out_dtype=jnp.float32)
    assert rel_err(out, ref) < GPU_TOL[jnp.dtype(jnp.float32)], cfg


@pytest.mark.gpu
@pytest.mark.parametrize("prologue,n,k", [(None, 4096, 4096), ("rmsnorm", 6144, 4096),
                                          ("swiglu", 4096, 14336)])
def test_gpu_fma_row_matches_reference(prologue, n, k):
  # The batch-1 kernel at 8B shapes (o with its skip connection, qkv after the norm, down after
  # the SwiGLU), ending in the kernel (one split) and through XLA (split 4).
  if not MG.available():
    pytest.skip(MG.unavailable_reason())
  width = 2 * k if prologue == "swiglu" else k
  _, w, w_scale, bias, residual = make(1, n, k, "block", seed=k)
  x = (jax.random.normal(jax.random.key(n), (1, width)) * 2).astype(jnp.bfloat16)
  kw = dict(layout="block", bias=bias, residual=residual, prologue=prologue)
  if prologue == "rmsnorm":
    kw.update(norm_weight=jax.random.uniform(jax.random.key(3), (k,), jnp.float32, 0.5, 2.0
                                             ).astype(jnp.bfloat16), eps=1e-5)
  for cfg in (Cfg(split_k=1, max_concurrent_steps=6), Cfg(split_k=4)):
    for out_dtype in (jnp.float32, jnp.bfloat16):
      out = MG.fp8_gemv_mgpu(x, w, None, w_scale, out_dtype=out_dtype, config=cfg, **kw)
      ref = G.fp8_gemv_reference(x, w, None, w_scale, out_dtype=out_dtype, **kw)
      tol = PROLOGUE_TOL if prologue else GPU_TOL
      assert rel_err(out, ref) < tol[jnp.dtype(out_dtype)], (cfg, out_dtype)
