"""Tests for pallas_kernels.fp8_gemm (Triton), fp8_gemm_mgpu (Mosaic GPU) and the Triton FP8 shim.

Reference: `fp8_gemm_reference`, the same FP8 inputs and scales dequantized to f32 and multiplied
with an f32 HIGHEST-precision dot. Metric: rel_err = ||out - ref||_F / ||ref||_F.

Error bounds, and where they come from:
* FP8 x FP8 products are exact in f32 (4-bit significands -> 8-bit products), scales are applied
  in f32, so on CPU the kernel and the reference differ only by f32 summation order over K=384
  terms: f32 output < 1e-5 (about 2**-24 * sqrt(K) * a few, with margin).
* bf16 output adds one bf16 rounding per element (relative 2**-9): bf16 output < 2**-8.
* On the GPU, Hopper's FP8 wgmma accumulates each 128-deep K block in reduced precision (about
  14 significand bits per the DeepSeek-V3 report) before promotion to f32: f32 output < 2**-10.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _triton_fp8_shim
from pallas_kernels import fp8_gemm as G

E4M3 = jnp.float8_e4m3fn
TOL = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 2.0**-8}
GPU_TOL = {jnp.dtype(jnp.float32): 2.0**-10, jnp.dtype(jnp.bfloat16): 2.0**-8}
# Small tiles keep the interpret-mode grids small on the 2-core CI box.
CPU_CONFIG = G.GemmConfig(64, 128, 128, num_warps=4, num_stages=2, group_m=2)


def rel_err(out, ref):
  out = np.asarray(out, np.float64)
  ref = np.asarray(ref, np.float64)
  assert np.isfinite(out).all(), "non-finite output"
  return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def scale_shapes(layout, m, n, k):
  kb, nb = -(-k // 128), -(-n // 128)
  return {"tensor": ((1, 1), (1, 1)), "row": ((m, 1), (n, 1)), "block": ((m, kb), (nb, kb))}[layout]


def make_inputs(seed, layout, m, n, k):
  """Fresh random FP8 operands (values spread over the E4M3 range) and positive f32 scales.

  numpy RNG: no per-shape jax.random compilations on the CI box."""
  rng = np.random.default_rng(seed)
  a = jnp.asarray((rng.standard_normal((m, k)) * 40).astype(np.float32)).astype(E4M3)
  b = jnp.asarray((rng.standard_normal((n, k)) * 40).astype(np.float32)).astype(E4M3)
  sa_shape, sb_shape = scale_shapes(layout, m, n, k)
  a_scale = jnp.asarray(rng.uniform(1e-3, 4e-3, sa_shape).astype(np.float32))
  b_scale = jnp.asarray(rng.uniform(1e-3, 4e-3, sb_shape).astype(np.float32))
  bias = jnp.asarray(rng.standard_normal((n,)).astype(np.float32))
  return a, b, a_scale, b_scale, bias


CASES = [(layout, m, out_dtype, use_bias)
         for layout in G.LAYOUTS
         for m, out_dtype, use_bias in ((1, jnp.bfloat16, True), (7, jnp.float32, False),
                                        (64, jnp.bfloat16, False), (130, jnp.float32, True))]


@pytest.mark.parametrize("layout,m,out_dtype,use_bias", CASES)
def test_matches_reference_interpret(layout, m, out_dtype, use_bias):
  n, k = 200, 384
  a, b, sa, sb, bias = make_inputs(1000 + m, layout, m, n, k)
  bias = bias if use_bias else None
  # M = 1 takes the tuning-table config (config=None), the others the small CPU tiles.
  out = G.fp8_gemm(a, b, sa, sb, layout=layout, bias=bias, out_dtype=out_dtype,
                   config=None if m == 1 else CPU_CONFIG, interpret=True)
  ref = G.fp8_gemm_reference(a, b, sa, sb, layout=layout, bias=bias, out_dtype=jnp.float32)
  assert out.shape == (m, n) and out.dtype == jnp.dtype(out_dtype)
  assert rel_err(out, ref) < TOL[jnp.dtype(out_dtype)]


@pytest.mark.parametrize("layout", G.LAYOUTS)
def test_k_not_multiple_of_128(layout):
  # K = 272: 2 full scale blocks + a 16-wide tail (block layout pads K with zeros in the wrapper;
  # tensor/row pick block_k = 16 dividing K).
  m, n, k = 33, 72, 272
  a, b, sa, sb, _ = make_inputs(7, layout, m, n, k)
  out = G.fp8_gemm(a, b, sa, sb, layout=layout, out_dtype=jnp.float32, config=CPU_CONFIG,
                   interpret=True)
  ref = G.fp8_gemm_reference(a, b, sa, sb, layout=layout, out_dtype=jnp.float32)
  assert rel_err(out, ref) < TOL[jnp.dtype(jnp.float32)]


def test_block_n_64_and_two_k_blocks_per_iteration():
  # A block_n that splits one 128-wide weight scale block, two K blocks per loop iteration.
  m, n, k = 16, 136, 256
  a, b, sa, sb, bias = make_inputs(3, "block", m, n, k)
  ref = G.fp8_gemm_reference(a, b, sa, sb, layout="block", bias=bias, out_dtype=jnp.float32)
  cfg = G.GemmConfig(32, 64, 128, num_warps=4, num_stages=2, group_m=0, k_per_iter=2)
  out = G.fp8_gemm(a, b, sa, sb, layout="block", bias=bias, out_dtype=jnp.float32, config=cfg,
                   interpret=True)
  assert rel_err(out, ref) < TOL[jnp.dtype(jnp.float32)]


def test_reference_block_scales_are_per_block():
  # The reference must apply a_scale per (row, 128-column group) and b_scale per 128x128 block:
  # scaling one K block by 2 on each side changes that block's contribution by 4.
  m, n, k = 4, 130, 256
  a, b, sa, sb, _ = make_inputs(11, "block", m, n, k)
  base = G.fp8_gemm_reference(a, b, sa, sb, layout="block", out_dtype=jnp.float32)
  sa2 = sa.at[:, 1].multiply(2.0)
  sb2 = sb.at[:, 1].multiply(2.0)
  scaled = G.fp8_gemm_reference(a, b, sa2, sb2, layout="block", out_dtype=jnp.float32)
  a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
  ea = jnp.repeat(sa, 128, axis=1)
  eb = jnp.repeat(jnp.repeat(sb, 128, axis=0)[:n], 128, axis=1)
  blk = slice(128, 256)
  part = (a32[:, blk] * ea[:, blk]) @ (b32[:, blk] * eb[:, blk]).T
  np.testing.assert_allclose(np.asarray(scaled - base), np.asarray(3 * part), rtol=1e-4, atol=1e-4)


def test_jit_and_trace_count():
  m, n, k = 8, 64, 128
  a, b, sa, sb, _ = make_inputs(5, "row", m, n, k)
  f = jax.jit(functools.partial(G.fp8_gemm, layout="row", config=CPU_CONFIG, interpret=True))
  out1 = f(a, b, sa, sb)
  out2 = f(a, b, sa * 2, sb)
  np.testing.assert_allclose(np.asarray(out2, np.float32), 2 * np.asarray(out1, np.float32),
                             rtol=2.0**-7)


# ---- bad input: errors name the argument ------------------------------------------------------

def _good(layout="block", m=8, n=64, k=256):
  a, b, sa, sb, bias = make_inputs(0, layout, m, n, k)
  return dict(a=a, b=b, a_scale=sa, b_scale=sb, layout=layout, bias=bias)


@pytest.mark.parametrize("change,exc,match", [
    (lambda d: d.update(b=d["b"][:, :128]), ValueError, r"b: expected \(N, K\) with K=256"),
    (lambda d: d.update(a=d["a"].astype(jnp.bfloat16)), TypeError, "a: expected dtype float8_e4m3fn"),
    (lambda d: d.update(b=d["b"].astype(jnp.float8_e5m2)), TypeError, "b: expected dtype"),
    (lambda d: d.update(a=d["a"][None]), ValueError, "a: expected a 2-D array"),
    (lambda d: d.update(b=d["b"][0]), ValueError, "b: expected a 2-D array"),
    (lambda d: d.update(a_scale=jnp.ones((8, 1))), ValueError, r"a_scale: expected shape \(8, 2\)"),
    (lambda d: d.update(b_scale=jnp.ones((64, 2))), ValueError, r"b_scale: expected shape \(1, 2\)"),
    (lambda d: d.update(a_scale=jnp.ones((8,))), ValueError, "a_scale: expected a 2-D scale"),
    (lambda d: d.update(layout="row"), ValueError, r"a_scale: expected shape \(8, 1\)"),
    (lambda d: d.update(layout="tile"), ValueError, "layout: expected one of"),
    (lambda d: d.update(bias=jnp.ones((63,))), ValueError, r"bias: expected shape \(64,\)"),
    (lambda d: d.update(a_scale=jnp.ones((8, 2), jnp.int32)), TypeError, "a_scale: expected a float32"),
    (lambda d: d.update(out_dtype=jnp.int8), TypeError, "out_dtype"),
])
def test_bad_inputs(change, exc, match):
  kwargs = _good()
  change(kwargs)
  with pytest.raises(exc, match=match):
    G.fp8_gemm(interpret=True, **kwargs)
  with pytest.raises(exc, match=match):
    G.fp8_gemm_reference(**kwargs)


def test_k_not_multiple_of_16_refused():
  a = jnp.zeros((4, 40), E4M3)
  b = jnp.zeros((8, 40), E4M3)
  with pytest.raises(ValueError, match="a: K=40 must be a multiple of 16"):
    G.fp8_gemm(a, b, jnp.ones((1, 1)), jnp.ones((1, 1)), layout="tensor", interpret=True)


def test_bad_config():
  with pytest.raises(ValueError, match="GemmConfig.block_m"):
    G.GemmConfig(block_m=48)
  with pytest.raises(ValueError, match="GemmConfig.k_per_iter"):
    G.GemmConfig(k_per_iter=3)
  kwargs = _good()
  with pytest.raises(ValueError, match="block_k == 128"):
    G.fp8_gemm(config=G.GemmConfig(64, 128, 64), interpret=True, **kwargs)


def test_pick_gemm_backend():
  for layout in G.LAYOUTS:
    for m in (1, 512, 8192):
      assert G.pick_gemm_backend(m, 4096, 4096, layout) in ("triton", "mosaic")
  with pytest.raises(ValueError, match="layout"):
    G.pick_gemm_backend(16, 16, 16, "bad")


# ---- the max_num_imprecise_acc shim -----------------------------------------------------------

def test_shim_name_roundtrip():
  assert _triton_fp8_shim.requested_imprecise_acc(_triton_fp8_shim.kernel_name("k", 128)) == 128
  assert _triton_fp8_shim.kernel_name("k", None) == "k"
  assert _triton_fp8_shim.requested_imprecise_acc("k") is None


def _triton_dot_lines(monkeypatch, cfg):
  """Cross-lowers the kernel for CUDA (works without a GPU) and returns the tt.dot lines."""
  from jax._src.pallas.triton import lowering
  captured = []
  inner = lowering.lower_jaxpr_to_triton_module

  def spy(jaxpr, *args, **kwargs):
    result = inner(jaxpr, *args, **kwargs)
    captured.append(result.module.operation.get_asm())
    return result

  monkeypatch.setattr(lowering, "lower_jaxpr_to_triton_module", spy)
  m, n, k = 64, 128, 256
  shapes = (jax.ShapeDtypeStruct((m, k), E4M3), jax.ShapeDtypeStruct((n, k), E4M3),
            jax.ShapeDtypeStruct((m, 2), jnp.float32), jax.ShapeDtypeStruct((1, 2), jnp.float32))
  f = functools.partial(G.fp8_gemm, layout="block", config=cfg)
  jax.jit(f).trace(*shapes).lower(lowering_platforms=("cuda",))
  assert len(captured) == 1
  return [line for line in captured[0].splitlines() if "tt.dot" in line]


def test_shim_sets_imprecise_acc_only_on_tagged_kernels(monkeypatch):
  if not _triton_fp8_shim.is_active():
    pytest.skip(f"shim not active here: {_triton_fp8_shim.status()}")
  tagged = _triton_dot_lines(monkeypatch, G.GemmConfig(64, 128, 128, 4, 4, 8, 128))
  assert tagged and all("maxNumImpreciseAcc = 128" in line for line in tagged)
  untagged = _triton_dot_lines(monkeypatch, G.GemmConfig(64, 128, 128, 4, 4, 8, None))
  assert untagged and not any("maxNumImpreciseAcc" in line for line in untagged)


def test_shim_refuses_untested_jax(monkeypatch):
  monkeypatch.setattr(_triton_fp8_shim, "_installed", False)
  monkeypatch.setattr(_triton_fp8_shim, "_jax_version", lambda: (9, 99))
  monkeypatch.delenv("JFP8_TRITON_SHIM", raising=False)
  assert _triton_fp8_shim.install() is False
  assert "not in tested versions" in _triton_fp8_shim.status()


# ---- GPU: real Triton and Mosaic GPU kernels ------------------------------------------------

GPU_SHAPES = [(1, 200, 384), (130, 200, 384), (256, 512, 1024), (512, 384, 640)]


@pytest.mark.gpu
@pytest.mark.parametrize("layout", G.LAYOUTS)
@pytest.mark.parametrize("m,n,k", GPU_SHAPES)
def test_triton_gpu_matches_reference(layout, m, n, k):
  a, b, sa, sb, bias = make_inputs(m + n + k, layout, m, n, k)
  ref = G.fp8_gemm_reference(a, b, sa, sb, layout=layout, bias=bias, out_dtype=jnp.float32)
  for out_dtype in (jnp.float32, jnp.bfloat16):
    out = G.fp8_gemm(a, b, sa, sb, layout=layout, bias=bias, out_dtype=out_dtype)
    assert rel_err(out, ref) < GPU_TOL[jnp.dtype(out_dtype)]


@pytest.mark.gpu
@pytest.mark.parametrize("layout", G.LAYOUTS)
@pytest.mark.parametrize("m,n,k", GPU_SHAPES)
def test_mosaic_gpu_matches_reference(layout, m, n, k):
  from pallas_kernels import fp8_gemm_mgpu as MG
  if not MG.available():
    pytest.skip(f"Mosaic GPU FP8 GEMM unavailable: {MG.unavailable_reason()}")
  a, b, sa, sb, bias = make_inputs(m + n + k, layout, m, n, k)
  ref = G.fp8_gemm_reference(a, b, sa, sb, layout=layout, bias=bias, out_dtype=jnp.float32)
  for out_dtype in (jnp.float32, jnp.bfloat16):
    out = MG.fp8_gemm(a, b, sa, sb, layout=layout, bias=bias, out_dtype=out_dtype)
    assert out.shape == (m, n)
    assert rel_err(out, ref) < GPU_TOL[jnp.dtype(out_dtype)]


# Schedule variants that must compute the same function as the plain kernel: the promotion
# overlapped with the next wgmma, 2-CTA clusters sharing one operand's tile through TMA
# multicast (M = 384 is an odd number of 128-row tiles: the wrapper pads M to the cluster pair),
# and the K block's product split into fresh accumulator parts promoted one by one (with 64 x 256
# warpgroup tiles spanning two weight-scale blocks, N = 512 one or two CTA columns).
MGPU_VARIANTS = {"overlap": dict(max_concurrent_steps=3, overlap=True),
                 "cluster_m": dict(cluster="m"), "cluster_n": dict(cluster="n"),
                 "parts2_lag1": dict(parts=2, lag=1),
                 "wide_parts4_lag1": dict(tile_n=256, max_concurrent_steps=3, parts=4, lag=1),
                 "wide_parts2_lag0": dict(tile_n=256, max_concurrent_steps=3, parts=2, lag=0)}


@pytest.mark.gpu
@pytest.mark.parametrize("layout", G.LAYOUTS)
@pytest.mark.parametrize("variant", sorted(MGPU_VARIANTS))
def test_mosaic_gpu_schedule_variants(layout, variant):
  from pallas_kernels import fp8_gemm_mgpu as MG
  if not MG.available():
    pytest.skip(f"Mosaic GPU FP8 GEMM unavailable: {MG.unavailable_reason()}")
  m, n, k = 384, 512, 1152
  a, b, sa, sb, bias = make_inputs(17, layout, m, n, k)
  ref = G.fp8_gemm_reference(a, b, sa, sb, layout=layout, bias=bias, out_dtype=jnp.float32)
  cfg = MG.MgpuConfig(**{**dict(tile_m=64, tile_n=128, wg_dim="m", max_concurrent_steps=4,
                                grid_minor="m", grid_tile_width=8), **MGPU_VARIANTS[variant]})
  out = MG.fp8_gemm(a, b, sa, sb, layout=layout, bias=bias, out_dtype=jnp.float32, config=cfg)
  assert out.shape == (m, n)
  assert rel_err(out, ref) < GPU_TOL[jnp.dtype(jnp.float32)]


def test_mgpu_cluster_config():
  from pallas_kernels import fp8_gemm_mgpu as MG
  cfg = MG.MgpuConfig(64, 128, "m", 4, "m", 8, cluster="m")
  assert (cfg.cluster_size, cfg.cluster_m, cfg.cluster_n) == (2, 256, 128)
  with pytest.raises(ValueError, match="cluster"):
    MG.MgpuConfig(cluster="k")


def test_mgpu_parts_config():
  from pallas_kernels import fp8_gemm_mgpu as MG
  cfg = MG.MgpuConfig(64, 256, "m", 3, "m", 8, parts=4, lag=1)
  assert (cfg.part_n, cfg.cta_n) == (64, 256)
  assert MG._uses_tile_b_scale(cfg, "block") and MG._uses_tile_b_scale(cfg, "tensor")
  assert not MG._uses_tile_b_scale(cfg, "row")
  # a 192-column part would straddle two weight-scale blocks: per-column scales instead
  assert not MG._uses_tile_b_scale(MG.MgpuConfig(64, 192, "n", 3, "m", 8), "block")
  # per-column scale rows wider than a TMA box (256 elements) are refused before lowering
  wide = MG.MgpuConfig(64, 256, "n", 2, "m", 8, parts=2)
  with pytest.raises(ValueError, match="TMA box"):
    MG.fp8_gemm(**_good("row"), config=wide)
  for bad in (dict(parts=3), dict(parts=2, lag=2), dict(parts=2, lag=-1), dict(parts=32),
              dict(parts=2, lag=1, overlap=True)):
    with pytest.raises(ValueError, match="parts|lag|overlap"):
      MG.MgpuConfig(**bad)


def test_mgpu_module_imports_and_validates():
  # Importing must work on CPU jax (guarded imports); validation runs before any lowering.
  from pallas_kernels import fp8_gemm_mgpu as MG
  kwargs = _good()
  kwargs["b"] = kwargs["b"][:, :128]
  with pytest.raises(ValueError, match=r"b: expected \(N, K\)"):
    MG.fp8_gemm(**kwargs)
  ref_kwargs = _good()
  out = MG.fp8_gemm_reference(**ref_kwargs)
  assert out.shape == (8, 64)


@pytest.mark.parametrize("layout,overlap,cluster,parts", [
    ("block", False, None, {}), ("row", True, None, {}), ("block", False, "m", {}),
    ("tensor", False, "n", {}), ("block", False, None, dict(tile_n=256, parts=4, lag=1)),
    ("row", False, None, dict(parts=2, lag=0))])
def test_mgpu_kernel_lowers_for_cuda(layout, overlap, cluster, parts):
  # Traces the Mosaic GPU kernel body and lowers it for CUDA without a GPU: catches kernel-body
  # errors on CPU CI (it cannot run here; the gpu-marked tests check its numerics).
  from pallas_kernels import fp8_gemm_mgpu as MG
  if MG._IMPORT_ERROR is not None:
    pytest.skip(MG._IMPORT_ERROR)
  m, n, k = 256, 256, 384
  sa_shape, sb_shape = scale_shapes(layout, m, n, k)
  args = (jax.ShapeDtypeStruct((m, k), E4M3), jax.ShapeDtypeStruct((n, k), E4M3),
          jax.ShapeDtypeStruct(sa_shape, jnp.float32), jax.ShapeDtypeStruct(sb_shape, jnp.float32),
          jax.ShapeDtypeStruct((n,), jnp.float32))
  cfg = MG.MgpuConfig(**{**dict(tile_m=64, tile_n=128, wg_dim="n" if overlap else "m",
                                max_concurrent_steps=3, grid_minor="n", grid_tile_width=8,
                                overlap=overlap, cluster=cluster), **parts})
  MG._fp8_gemm_jit.trace(*args, layout=layout, out_dtype=jnp.dtype(jnp.bfloat16), cfg=cfg,
                         num_sms=132).lower(lowering_platforms=("cuda",))
