"""Decode-shaped FP8 matmul (M <= 16) through Pallas Mosaic GPU (Hopper): TMA-streamed weights.

Same contract as `pallas_kernels.fp8_gemv.fp8_gemv` (Triton) in its W8A16 modes:

    C[m, n] = sum_k (P(a)[m, k] * sa[m]) * (W[n, k] * sw) + bias[n]   (+ residual)

`w: (N, K) float8_e4m3fn` (out, in), K-major, with `w_scale` float32 in the layouts of
`fp8_gemm`: "tensor" (1, 1), "row" (N, 1), "block" (ceil(N/128), ceil(K/128)). Two kernels,
picked by the activations:
- staged rows, 1 <= M <= 16: `a: (M, K) float16` with `a_scale: (M, 1) float32` from
  `fp8_gemv.stage_f16_rows(x)` of bf16 activations (exact down to amax * 2^-31): the wgmma
  kernel. P is the identity (the norm / SwiGLU staging kernels run before it).
- one row, M == 1: `a: (1, K) bfloat16 | float16`, `a_scale` None: the FMA kernel, with P the
  RMSNorm or SwiGLU prologue of `fp8_gemv` fused (same roundings) and, with block scales and one
  split, the epilogue too (bias, cast, residual): one launch per matmul, as the Triton GEMV.
Reference: `fp8_gemv.fp8_gemv_reference` (the Triton module's).

Why a second backend. At M <= 16 the matmul reads its FP8 weight once and does almost no math,
so its speed is the rate at which a kernel keeps HBM reads in flight. The Triton kernels hold
their in-flight weight tiles in registers, which caps the bytes in flight per SM (the persistent
chain of session 11, results/decode_e2e_notes.md: 0.7-1.7 TB/s); here the weight tiles travel
by TMA into a `max_concurrent_steps`-deep ring of shared-memory stages (8 KB of weight a stage
at 64 rows, several CTAs per SM), so registers hold only the tile being multiplied.

Technique. Grid (N / tile_n, split_k), one warpgroup per CTA; a CTA walks its K range in 128-wide
steps through `plgpu.emit_pipeline` (TMA loads of the (tile_n, 128) weight tile and of the
step's activations, `max_concurrent_steps` in flight). Each step loads the weight tile from
shared memory into registers and upcasts it e4m3 -> f16 (exact; one instruction per pair, the
only FP8 conversion this Mosaic / ptxas offers; e4m3 -> bf16 is refused), then:
- wgmma kernel: the transposed product on the tensor cores, swap-AB: the f16 weight tile is the
  register A operand (M = tile_n rows of W), the f16 row tile a transposed shared-memory B
  operand (N = m_pad, 8 or 16), f32 accumulation into a fresh accumulator per step;
- FMA kernel: f32 multiply-add of the tile with the step's activations (after the prologue)
  broadcast over its rows, reduced along K: a (tile_n,) partial, a slice of the output row.
The step's partial is scaled by its weight-block scale and added to the running f32 sum (the
DeepGEMM promotion; "block" layout; "row" / "tensor" scales are applied once after the sum).
The FMA kernel with block scales and one split then adds the bias, casts, adds the residual
(`fp8_gemv.add_residual`) and writes its slice of the (1, N) output. Otherwise the CTA stores an
f32 partial, (tile_n,) or (tile_n, m_pad), and XLA sums the split_k partials in split order,
transposes, applies the rows' staging scales, per-row / per-tensor weight scales and bias,
casts, and adds the residual: one small fusion, as the Triton kernel's split-K epilogue (the
wgmma kernel's (tile_n, M) tile cannot be stored transposed: Mosaic refuses the strided store).
Prologues: "rmsnorm" brings the row and the norm weight, (K / 128, 128) each, into shared memory
first and reduces 1 / rms from them (K <= MAX_RMS_K); "swiglu" takes the gate and up slices of
each step.

`prefetch` (optional): a second FP8 weight (N2, K2), the next matmul's; each CTA, once its own
K range is done, asks TMA to bring `prefetch_rows` rows of it into L2
(`plgpu.async_prefetch`, cp.async.bulk.prefetch), so that the next launch's first reads hit L2
while HBM keeps streaming during this launch's tail. It changes no value; whether it pays is for
the benchmark (benchmarks/gemm_decode.py --mgpu) to say.

Shapes: N a multiple of tile_n and K of 128 (every Llama / Qwen / Mistral projection), so no
weight is ever copied to pad it; `supports` says whether a shape qualifies, and dispatch keeps
the Triton kernel otherwise. K <= 32768 (one TMA box holds a weight-block row's scales).

Runs only on Hopper with jax >= 0.10 (developed against jax 0.10.2 / 0.11.2); importing this
module never fails (guarded imports). `interpret=True` runs the kernel in Pallas' Mosaic GPU
interpreter on the CPU (TMA pipeline, barriers, shared memory, indexing, scales, prologues and
epilogue simulated) with two substitutions: the wgmma becomes an f32 `jnp.dot` of the same
operands (the interpreter's wgmma takes A from shared memory only), and register-layout hints
(`plgpu.layout_cast`, which the interpreter lacks) are skipped. Not yet timed on a GPU (session
14 had no device); the gpu-marked tests check the real kernels.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.fp8_gemm_mgpu import hopper_device_reason
from pallas_kernels.fp8_gemv import (
    SCALE_BLOCK, _check_inputs, _shape_class, _sum_in_order, add_residual,
    fp8_gemv_reference)

try:
  import jax.experimental.pallas as pl
  import jax.experimental.pallas.mosaic_gpu as plgpu
  _IMPORT_ERROR = None
  for _name in ("emit_pipeline", "kernel", "wgmma", "ACC", "async_prefetch", "find_swizzle",
                "TilingTransform", "SwizzleTransform", "LoweringSemantics"):
    if not hasattr(plgpu, _name):
      _IMPORT_ERROR = f"jax.experimental.pallas.mosaic_gpu has no {_name}"
except Exception as e:  # jax without Mosaic GPU Pallas
  pl = plgpu = None
  _IMPORT_ERROR = f"{type(e).__name__}: {e}"
try:  # the CPU interpreter (private module; tests only), separately: the kernel runs without it
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
  _INTERPRET_ERROR = _IMPORT_ERROR
except Exception as e:
  InterpretGPUParams = None
  _INTERPRET_ERROR = f"no Mosaic GPU interpreter in this jax: {type(e).__name__}: {e}"

__all__ = ["fp8_gemv_mgpu", "fp8_gemv_reference", "MgpuGemvConfig", "config_for", "supports",
           "available", "unavailable_reason", "TUNING", "MAX_M"]

TILE_K = 128  # K per pipeline step: one 128-byte swizzled FP8 row, one weight-scale block
#: Largest M this kernel takes (rows padded to 8 or 16, the wgmma N of the transposed product).
MAX_M = 16
#: Largest K: a weight-block row's scales (K / 128 of them) must fit one TMA box (256 elements).
MAX_K = 256 * TILE_K
#: Largest K of the fused RMSNorm: the row and the norm weight wait in shared memory (4 K bytes).
MAX_RMS_K = 8192
_SMS = 132  # H100 SXM and H200 alike; the split-K rule sizes the grid in CTAs per SM of it


@dataclasses.dataclass(frozen=True)
class MgpuGemvConfig:
  """Tile and pipeline parameters of the Mosaic GPU decode kernel.

  Attributes:
    tile_n: weight rows per CTA (64 or 128: one or two 64-row wgmma A tiles).
    max_concurrent_steps: TMA pipeline depth (shared-memory stages in flight per CTA).
    ctas_per_sm: CTAs the grid is sized for per SM: split-K is the divisor of K / 128 that
      brings (N / tile_n) * split_k closest (by ratio) to ctas_per_sm * 132.
    split_k: fixed split-K (a divisor of K / 128), or 0 for the rule above.
  """
  tile_n: int = 64
  max_concurrent_steps: int = 4
  ctas_per_sm: int = 4
  split_k: int = 0

  def __post_init__(self):
    if self.tile_n not in (64, 128):
      raise ValueError(f"MgpuGemvConfig.tile_n: expected 64 or 128, got {self.tile_n}")
    if self.max_concurrent_steps < 1 or self.ctas_per_sm < 1 or self.split_k < 0:
      raise ValueError(f"MgpuGemvConfig: expected max_concurrent_steps, ctas_per_sm >= 1 and "
                       f"split_k >= 0, got {self}")


# Tuning table keyed by `fp8_gemv._shape_class` (only the M <= 16 classes apply). Not yet timed
# on a GPU; benchmarks/gemm_decode.py --mgpu sweeps it. Starting points: at M = 1 (the FMA
# kernel) one split, so that the kernel ends the matmul itself (no XLA epilogue launch: what
# batch-1 decode loses is per-launch time), with a deeper ring to keep bytes in flight on the
# fewer CTAs; at M <= 16 the split-K rule.
TUNING: dict[tuple[str, str, str], MgpuGemvConfig] = {
    (m_class, n_class, k_class): (MgpuGemvConfig(split_k=1, max_concurrent_steps=6)
                                  if m_class == "m1" else MgpuGemvConfig())
    for m_class in ("m1", "m16") for n_class in ("n_tiny", "n_small", "n_large")
    for k_class in ("k_short", "k_long")
}


def config_for(m: int, n: int, k: int) -> MgpuGemvConfig:
  """The tuned config for an (M, N, K) decode matmul (M > 16 takes the M <= 16 entry; the
  kernel refuses such M anyway)."""
  _, n_class, k_class = _shape_class(m, n, k)
  return TUNING[("m1" if m == 1 else "m16", n_class, k_class)]


def _split_k(cfg: MgpuGemvConfig, n: int, k: int) -> int:
  num_k = k // TILE_K
  if cfg.split_k:
    return cfg.split_k
  target = cfg.ctas_per_sm * _SMS
  return min((s for s in range(1, num_k + 1) if num_k % s == 0),
             key=lambda s: abs(math.log((n // cfg.tile_n) * s / target)))


def unavailable_reason() -> str | None:
  """None when the kernel can run here on a GPU, else why not."""
  return _IMPORT_ERROR or hopper_device_reason()


def available() -> bool:
  return unavailable_reason() is None


def supports(m: int, n: int, k: int, *, config: MgpuGemvConfig | None = None,
             prologue: str | None = None) -> bool:
  """Whether this kernel takes the shape as it is (no weight padding): 1 <= M <= 16, N a
  multiple of the tile, K a multiple of 128 up to MAX_K (MAX_RMS_K with the rmsnorm prologue)."""
  cfg = config or config_for(max(m, 1), max(n, 1), max(k, 1))
  max_k = MAX_RMS_K if prologue == "rmsnorm" else MAX_K
  return 1 <= m <= MAX_M and n > 0 and n % cfg.tile_n == 0 and 0 < k <= max_k and k % TILE_K == 0


def _transforms(row_bytes: int, itemsize: int):
  swizzle = plgpu.find_swizzle(row_bytes * 8)
  return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def _kernel(a_g, w_g, *rest, scale_smem, bias_smem, res_smem, row_smem, norm_smem, barriers,
            fma, prologue, eps, k, tile_n, m_pad, steps, block_scaled, final, has_bias,
            has_residual, out_dtype, prefetch_rows, max_concurrent_steps, interpret):
  """One CTA: weight rows [i_n * tile_n, +tile_n) over K steps [i_s * steps, +steps).

  fma (M = 1, bf16 / f16 row): f32 multiply-add of the upcast weight tile with the row tile
  broadcast over its rows, reduced along K per step; the (tile_n,) sum is a row of the output.
  Else (staged rows): swap-AB wgmma, the (tile_n, m_pad) sum a transposed tile of it.
  final (fma, split_k 1, block scales): bias, output cast and residual in the kernel, which
  writes (1, N) out_dtype; else f32 partials for XLA's epilogue.
  prologue (fma): "rmsnorm": the whole row and the norm weight, (K / 128, 128) each, come into
  shared memory first, 1 / rms is reduced from them and each step normalises its slice as
  `fp8_gemv.rms_norm_reference` does (two roundings to the row's dtype); "swiglu": a_g is
  [gate | up] and each step takes both slices, silu(gate) * up rounded once.
  """
  rest = list(rest)
  scale_g = rest.pop(0) if block_scaled else None
  bias_g = rest.pop(0) if has_bias else None
  res_g = rest.pop(0) if has_residual else None
  norm_g = rest.pop(0) if prologue == "rmsnorm" else None
  next_g = rest.pop(0) if prefetch_rows else None
  (out_g,) = rest
  i_n = lax.axis_index("n")
  i_s = lax.axis_index("s")
  n0 = i_n * tile_n
  k0 = i_s * (steps * TILE_K)

  def hint(x, layout):  # register layouts for Mosaic's inference; the interpreter has none
    return x if interpret else plgpu.layout_cast(x, layout)
  row_layout = plgpu.Layout.WGMMA.reduce(1)     # a (tile_n,) vector along the tile's rows

  # One-off loads (TMA): the weight-block row of this CTA's scales (K / 128, padded to 4),
  # and for the in-kernel epilogue its slices of bias and residual.
  loads = []
  if block_scaled:
    loads.append((scale_g.at[pl.ds(n0 // SCALE_BLOCK, 1)], scale_smem))
  if final and has_bias:
    loads.append((bias_g.at[:, pl.ds(n0, tile_n)], bias_smem))
  if final and has_residual:
    loads.append((res_g.at[:, pl.ds(n0, tile_n)], res_smem))
  if prologue == "rmsnorm":
    loads += [(a_g, row_smem), (norm_g, norm_smem)]
  for i, (src, dst) in enumerate(loads):
    plgpu.copy_gmem_to_smem(src, dst, barriers.at[i])
  for i in range(len(loads)):
    plgpu.barrier_wait(barriers.at[i])
  f32 = jnp.float32
  a_dtype = a_g.dtype
  col_layout = plgpu.Layout.WGMMA.reduce(0)     # a (128,) vector along the tile's columns
  if prologue == "rmsnorm":   # fp8_gemv.rms_inv_reference: rsqrt(mean(x^2) + eps) in f32
    row = row_smem[...].astype(f32)
    rms_inv = lax.rsqrt(jnp.sum(row * row) / k + eps)

  def activations(j, a_refs):
    """The (128,) f32 activations of this CTA's K step j (after the prologue)."""
    if prologue == "rmsnorm":
      step = i_s * steps + j
      x = hint(row_smem.at[step][...], col_layout).astype(f32)
      y = (x * rms_inv).astype(a_dtype).astype(f32)
      return (y * hint(norm_smem.at[step][...], col_layout).astype(f32)).astype(a_dtype
                                                                             ).astype(f32)
    x = hint(a_refs[0].at[0][...], col_layout).astype(f32)
    if prologue == "swiglu":   # fp8_gemv.swiglu_reference
      up = hint(a_refs[1].at[0][...], col_layout).astype(f32)
      return (x / (1.0 + jnp.exp(-x)) * up).astype(a_dtype).astype(f32)
    return x

  def body(idx, *refs):
    (j,) = idx
    *a_refs, w_s, acc = refs
    w_f16 = w_s[...].astype(jnp.float16)          # e4m3 -> f16: exact
    if fma:
      w32 = hint(w_f16, plgpu.Layout.WGMMA).astype(f32)
      x32 = activations(j, a_refs)
      part = jnp.sum(w32 * lax.broadcast_in_dim(x32, (tile_n, TILE_K), [1]), axis=1)
    elif interpret:  # the interpreter's wgmma reads A from shared memory only
      part = jnp.dot(w_f16.astype(f32), a_refs[0][...].astype(f32).T,
                     precision=lax.Precision.HIGHEST)
    else:
      def mma(acc_ref):
        plgpu.wgmma(acc_ref, w_f16, a_refs[0].T)
        return acc_ref[...]
      part = pl.run_scoped(mma, plgpu.ACC((tile_n, m_pad), jnp.float32))
    if block_scaled:
      part = part * scale_smem[0, i_s * steps + j]
    return acc + part

  k_range = pl.ds(k0, steps * TILE_K)
  row_spec = plgpu.BlockSpec((1, TILE_K), lambda j: (0, j))
  if not fma:
    a_specs = [plgpu.BlockSpec((m_pad, TILE_K), lambda j: (0, j),
                               transforms=_transforms(TILE_K * 2, 2))]
    a_srcs = [a_g.at[:, k_range]]
  elif prologue == "rmsnorm":   # the row is in shared memory already
    a_specs, a_srcs = [], []
  elif prologue == "swiglu":    # [gate | up]: both slices of the step
    a_specs = [row_spec, row_spec]
    a_srcs = [a_g.at[:, k_range], a_g.at[:, pl.ds(k + k0, steps * TILE_K)]]
  else:
    a_specs, a_srcs = [row_spec], [a_g.at[:, k_range]]
  if fma:
    acc0 = hint(jnp.zeros((tile_n,), f32), row_layout)
  else:
    acc0 = jnp.zeros((tile_n, m_pad), f32)
  acc = plgpu.emit_pipeline(
      body,
      grid=(steps,),
      in_specs=a_specs + [plgpu.BlockSpec((tile_n, TILE_K), lambda j: (0, j),
                                          transforms=_transforms(TILE_K, 1))],
      max_concurrent_steps=max_concurrent_steps,
      init_carry=acc0,
  )(*a_srcs, w_g.at[pl.ds(n0, tile_n), k_range])
  if prefetch_rows and not interpret:  # no effect on values; the interpreter has no L2
    cta = i_n * lax.axis_size("s") + i_s
    k2 = next_g.shape[1]
    for c0 in range(0, k2, 256):  # one TMA box is at most 256 elements wide
      plgpu.async_prefetch(next_g.at[pl.ds(cta * prefetch_rows, prefetch_rows),
                                     pl.ds(c0, min(256, k2 - c0))])
  if not final:
    if fma:
      out_g.at[i_s][pl.ds(n0, tile_n)] = acc
    else:
      out_g[i_s, pl.ds(n0, tile_n), :] = acc
    return
  if has_bias:
    acc = acc + hint(bias_smem.at[0][...], row_layout)
  y = acc.astype(out_dtype)
  if has_residual:   # the rounded output plus the residual in f32, as fp8_gemv's epilogue
    y = add_residual(y, hint(res_smem.at[0][...], row_layout))
  out_g.at[0][pl.ds(n0, tile_n)] = y


def fp8_gemv_mgpu(a, w, a_scale, w_scale, *, layout, bias=None, out_dtype=jnp.bfloat16,
                  prologue: str | None = None, norm_weight=None, eps: float = 1e-6,
                  residual=None, prefetch=None, prefetch_bytes: int = 8 << 20,
                  config: MgpuGemvConfig | None = None, interpret: bool = False):
  """C = (a · sa) · (w · sw)ᵀ + bias (+ residual) for M <= 16, Mosaic GPU kernel.

  Args:
    a: (M, K) float16 staged activations with `a_scale` (`fp8_gemv.stage_f16_rows`; the wgmma
      kernel), or a single (1, K) bfloat16 / float16 row with `a_scale` None (the FMA kernel;
      (1, 2K) = [gate | up] for the swiglu prologue).
    w: (N, K) float8_e4m3fn weights (out, in).
    a_scale: (M, 1) float32, the rows' staging scales, or None (one row, W8A16).
    w_scale: float32, (1, 1) | (N, 1) | (ceil(N/128), ceil(K/128)) for layout
      "tensor" | "row" | "block".
    layout: the weight scale layout.
    bias: optional (N,) array, added in f32 before the output cast.
    out_dtype: bfloat16 (default), float16 or float32.
    prologue: None, "rmsnorm" or "swiglu" (FMA kernel: one row): the activation transform of
      `fp8_gemv.fp8_gemv`'s prologues, with the same roundings, inside this kernel.
    norm_weight: (K,) RMSNorm weight (prologue "rmsnorm"); eps: its epsilon.
    residual: optional (M, N) float array: C rounded to out_dtype, plus residual in f32, rounded
      again (`fp8_gemv.add_residual`).
    prefetch: optional (N2, K2) float8 array (the next matmul's weight) to warm in L2 at the
      end of each CTA; no effect on the result.
    prefetch_bytes: about how many bytes of `prefetch` the whole grid brings into L2.
    config: MgpuGemvConfig override; default `config_for(M, N, K)`.
    interpret: run in the Mosaic GPU interpreter on the CPU (wgmma replaced, see the module).
  Returns: (M, N) out_dtype.
  """
  _check_inputs(a, w, a_scale, w_scale, layout, bias, out_dtype, prologue, norm_weight,
                residual)
  m = a.shape[0]
  n, k = w.shape
  staged = jnp.dtype(a.dtype) == jnp.float16 and a_scale is not None and a_scale.shape == (m, 1)
  fma = m == 1 and a_scale is None
  if prologue == "rmsnorm" and k > MAX_RMS_K:
    raise ValueError(f"prologue: the fused RMSNorm keeps the row in shared memory, K <= "
                     f"{MAX_RMS_K}; got K={k}")
  if prologue is not None and not fma:
    raise ValueError(f"prologue: the Mosaic GPU kernel fuses {prologue!r} for one bf16 / f16 "
                     f"row (a_scale None) only, got a {a.shape} with a_scale "
                     f"{getattr(a_scale, 'shape', None)}")
  if not (staged or fma):
    raise TypeError(f"a: expected float16 staged rows (M, K) with a_scale (M, 1) float32 "
                    f"(fp8_gemv.stage_f16_rows), or one bfloat16 / float16 row with a_scale "
                    f"None; got {a.dtype} {a.shape} with a_scale "
                    f"{getattr(a_scale, 'shape', None)}")
  if jnp.dtype(w.dtype) != jnp.float8_e4m3fn:
    raise TypeError(f"w: expected float8_e4m3fn (Hopper converts only e4m3 to f16 in one "
                    f"instruction), got {w.dtype}")
  cfg = config or config_for(m, n, k)
  if not supports(m, n, k, config=cfg):
    raise ValueError(f"w: expected (N, K) with N a multiple of {cfg.tile_n}, K a multiple of "
                     f"{TILE_K} up to {MAX_K}, and 1 <= M <= {MAX_M}; got w {w.shape}, a "
                     f"{a.shape} (fp8_gemv takes any shape)")
  if cfg.split_k and (k // TILE_K) % cfg.split_k:
    raise ValueError(f"config: split_k must divide K / {TILE_K} = {k // TILE_K}, got "
                     f"{cfg.split_k}")
  prefetch_rows = 0
  if prefetch is not None:
    if not hasattr(prefetch, "shape") or len(prefetch.shape) != 2 or \
        jnp.dtype(prefetch.dtype).itemsize != 1:
      raise ValueError(f"prefetch: expected a 2-D one-byte (FP8) weight, got "
                       f"{getattr(prefetch, 'dtype', None)} {getattr(prefetch, 'shape', None)}")
    num_cta = (n // cfg.tile_n) * _split_k(cfg, n, k)
    prefetch_rows = min(256, prefetch.shape[0] // num_cta,
                        max(1, prefetch_bytes // (num_cta * prefetch.shape[1])))
    if prefetch_rows < 1 or prefetch.shape[1] % 16:
      prefetch, prefetch_rows = None, 0   # too small to share out (or not TMA-aligned): skip
  if interpret and _INTERPRET_ERROR is not None:
    raise RuntimeError(f"fp8_gemv_mgpu: cannot interpret here: {_INTERPRET_ERROR}")
  if not interpret:
    reason = unavailable_reason()
    if reason is not None:
      raise RuntimeError(f"fp8_gemv_mgpu: cannot run here: {reason}")
  return _fp8_gemv_mgpu_jit(a, w, a_scale, w_scale, bias, norm_weight, residual, prefetch,
                            layout=layout, out_dtype=jnp.dtype(out_dtype), prologue=prologue,
                            eps=float(eps) if prologue == "rmsnorm" else 0.0, cfg=cfg,
                            prefetch_rows=prefetch_rows, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("layout", "out_dtype", "prologue", "eps", "cfg",
                                             "prefetch_rows", "interpret"))
def _fp8_gemv_mgpu_jit(a, w, a_scale, w_scale, bias, norm_weight, residual, prefetch, *,
                       layout, out_dtype, prologue, eps, cfg, prefetch_rows, interpret):
  m = a.shape[0]
  n, k = w.shape
  fma = a_scale is None
  m_pad = 1 if fma else (8 if m <= 8 else 16)
  split_k = _split_k(cfg, n, k)
  steps = k // TILE_K // split_k
  block_scaled = layout == "block"
  # The FMA kernel writes the (1, N) output itself where nothing but bias, cast and residual
  # follows the sum: one split, block scales (applied in the loop).
  final = fma and split_k == 1 and block_scaled
  if prologue == "rmsnorm":   # the row as (K / 128, 128): one TMA box brings all of it
    a = a.reshape(k // TILE_K, TILE_K)
  operands = [a if fma else jnp.pad(a, ((0, m_pad - m), (0, 0))), w]
  f32 = jnp.float32
  scratch = dict(scale_smem=None, bias_smem=None, res_smem=None, row_smem=None, norm_smem=None)
  if block_scaled:
    num_k4 = -(-(k // TILE_K) // 4) * 4   # a TMA row is a multiple of 16 bytes
    operands.append(jnp.pad(w_scale, ((0, 0), (0, num_k4 - w_scale.shape[1]))))
    scratch["scale_smem"] = plgpu.SMEM((1, num_k4), f32)
  has_bias = final and bias is not None
  has_residual = final and residual is not None
  if has_bias:
    operands.append(bias.astype(f32).reshape(1, n))
    scratch["bias_smem"] = plgpu.SMEM((1, cfg.tile_n), f32)
  if has_residual:
    operands.append(residual)
    scratch["res_smem"] = plgpu.SMEM((1, cfg.tile_n), residual.dtype)
  if prologue == "rmsnorm":
    operands.append(norm_weight.astype(a.dtype).reshape(k // TILE_K, TILE_K))
    scratch["row_smem"] = plgpu.SMEM((k // TILE_K, TILE_K), a.dtype)
    scratch["norm_smem"] = plgpu.SMEM((k // TILE_K, TILE_K), a.dtype)
  if prefetch_rows:
    operands.append(prefetch)
  scratch["barriers"] = plgpu.Barrier(num_barriers=5)
  body = functools.partial(
      _kernel, fma=fma, prologue=prologue, eps=eps, k=k, tile_n=cfg.tile_n, m_pad=m_pad, steps=steps, block_scaled=block_scaled,
      final=final, has_bias=has_bias, has_residual=has_residual, out_dtype=out_dtype,
      prefetch_rows=prefetch_rows, max_concurrent_steps=min(cfg.max_concurrent_steps, steps),
      interpret=interpret)
  if final:
    out_type = jax.ShapeDtypeStruct((1, n), out_dtype)
  elif fma:
    out_type = jax.ShapeDtypeStruct((split_k, n), f32)
  else:
    out_type = jax.ShapeDtypeStruct((split_k, n, m_pad), f32)
  used = [key for key, value in scratch.items() if value is not None]

  def kernel(*refs):  # operands and output, then the scratch buffers this call allocates
    given = dict(zip(used, refs[len(refs) - len(used):]))
    body(*refs[:len(refs) - len(used)], **{key: given.get(key) for key in scratch})
  call = plgpu.kernel(
      kernel,
      out_type=out_type,
      grid=(n // cfg.tile_n, split_k),
      grid_names=("n", "s"),
      scratch_types=[scratch[key] for key in used],
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      **(dict(interpret=InterpretGPUParams()) if interpret else {}),  # the GPU call as before
  )
  out = call(*operands)
  if final:
    return out
  acc = _sum_in_order(out)                                   # (N,) or (N, m_pad) f32
  acc = acc.reshape(1, n) if fma else acc[:, :m].T * a_scale   # (M, N)
  if layout in ("tensor", "row"):
    acc = acc * w_scale.reshape(1, -1)
  if bias is not None:
    acc = acc + bias.astype(f32)
  return add_residual(acc.astype(out_dtype), residual)
