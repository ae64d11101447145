"""FP8 GEMM with per-tensor, per-row or block scales, Pallas lowered through Mosaic GPU (Hopper).

Same contract as `pallas_kernels.fp8_gemm` (Triton): `C = (A * a_scale) @ (B * b_scale)^T + bias`,
`a: (M, K) float8_e4m3fn`, `b: (N, K) float8_e4m3fn`, scales (1,1)/(1,1), (M,1)/(N,1) or
(M, ceil(K/128)) / (ceil(N/128), ceil(K/128)) f32 for layout "tensor" / "row" / "block", optional
(N,) bias, bf16/f16/f32 output. Reference: `fp8_gemm_reference` (the Triton module's).

Technique (notes/h100.md, probe mosaic_gpu_fp8_matmul.py): persistent grid of one CTA per SM
walking output tiles in planar-snake order; per CTA a TMA producer warpgroup and two wgmma
consumer warpgroups (`emit_pipeline_warp_specialized`), K step 128 so one FP8 row is one
128-byte swizzle, B stored (N, K) and fed to wgmma as a transposed SMEM view. Every K block's
wgmma goes into a fresh f32 accumulator that is scaled and added to the running f32 tile
(DeepGEMM promotion): `acc += acc_k * a_scale[m, k] * b_scale[n, k]`. All three layouts take this
path: per-tensor and per-row scales are broadcast to per-K-block rows by the wrapper, so every
layout has the same numerics (promotion every 128 K, as the Triton kernel with
max_num_imprecise_acc=128). Scale rows travel through the same TMA pipeline as the operands
((K/128, M) and (K/128, N) f32 arrays, one row per K step). Bias is TMA-loaded per tile into SMEM
and added in the epilogue; the output goes registers -> SMEM -> TMA in 64-row tiles.

Runs only on Hopper with jax >= 0.10 (developed on jax 0.11.2); importing this module never fails
(guarded imports), `available()` says whether it can run here.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.fp8_gemm import LAYOUTS, SCALE_BLOCK, _check_inputs, _pad_to, _round_up
from pallas_kernels.fp8_gemm import fp8_gemm_reference  # noqa: F401  (same reference)

try:
  import jax.experimental.pallas as pl
  import jax.experimental.pallas.mosaic_gpu as plgpu
  from jax.extend import backend as _backend
  _IMPORT_ERROR = None
  for _name in ("emit_pipeline_warp_specialized", "kernel", "wgmma", "ACC", "nd_loop",
                "planar_snake", "find_swizzle", "layout_cast", "load", "LoweringSemantics"):
    if not hasattr(plgpu, _name):
      _IMPORT_ERROR = f"jax.experimental.pallas.mosaic_gpu has no {_name}"
except Exception as e:  # jax without Mosaic GPU Pallas
  pl = plgpu = _backend = None
  _IMPORT_ERROR = f"{type(e).__name__}: {e}"

TILE_K = 128  # one 128-byte swizzled FP8 row per K step; equals the scale block


@dataclasses.dataclass(frozen=True)
class MgpuConfig:
  """Tile and schedule parameters of the Mosaic GPU FP8 GEMM.

  Attributes:
    tile_m, tile_n: output tile of ONE consumer warpgroup (64 x 128: two f32 register tiles, the
      running sum and the K block's partial product, fit the register budget).
    wg_dim: "m" or "n": the axis along which the two consumer warpgroups split the CTA tile.
    max_concurrent_steps: TMA pipeline depth (SMEM stages).
    grid_minor: "m" or "n": minor axis of the planar-snake tile order; grid_tile_width: its width.
    epi_m: rows per epilogue SMEM tile.
    overlap: fold the previous K block's scaled partial product into the running sum while this
      K block's wgmma runs (one more register tile; hides the promotion behind the tensor core).
    tile_b_scale: when one weight scale covers each accumulator part (block or per-tensor
      layout, every part inside one 128-column scale block), combine it with the activation row
      scales into one row vector (one FFMA per element per K step instead of FMUL + FFMA). The
      row layout always takes per-column weight scales.
    parts: the warpgroup's K-block product goes into `parts` fresh accumulators of
      tile_n / parts columns each (one wgmma per part), so the promotion of one part can run
      while a later part's wgmma is still in flight, and a wide warpgroup tile (64 x 256: half
      the operand traffic per FLOP of 64 x 128) needs fresh registers for only a few parts.
    lag: parts whose wgmma may still be in flight when the oldest one is promoted: 0 issues,
      waits for and promotes each part in turn; `parts - 1` issues every part before promoting
      any. The fresh registers live at once are min(lag + 1, parts) parts.
    cluster: None, or "m" / "n": two CTAs per cluster take neighbouring output tiles along that
      axis and share the other operand's tile, which TMA multicasts to both (half the L2 -> SMEM
      traffic for that operand; DeepGEMM's scheme). Needs the tile count along that axis even
      (the wrapper pads M; N must divide). H200: +1-4% on some shapes, not others
      (results/gemm_sweep_r3_h200.md), so no table entry uses it.
  """
  tile_m: int = 64
  tile_n: int = 128
  wg_dim: str = "m"
  max_concurrent_steps: int = 4
  grid_minor: str = "n"
  grid_tile_width: int = 8
  epi_m: int = 64
  overlap: bool = False
  tile_b_scale: bool = True
  cluster: str | None = None
  parts: int = 1
  lag: int = 0

  def __post_init__(self):
    if self.wg_dim not in ("m", "n") or self.grid_minor not in ("m", "n"):
      raise ValueError(f"MgpuConfig: wg_dim/grid_minor must be 'm' or 'n', got {self}")
    if self.tile_m % 64 or self.tile_n % 64 or self.tile_m % self.epi_m:
      raise ValueError(f"MgpuConfig: tile_m, tile_n multiples of 64 (wgmma), epi_m | tile_m: {self}")
    if self.cluster not in (None, "m", "n"):
      raise ValueError(f"MgpuConfig: cluster must be None, 'm' or 'n', got {self.cluster!r}")
    if self.parts < 1 or self.tile_n % self.parts or self.part_n % 8:
      raise ValueError(f"MgpuConfig: parts must split tile_n into multiples of 8 columns: {self}")
    if not 0 <= self.lag < self.parts:
      raise ValueError(f"MgpuConfig: lag must be in [0, parts), got {self.lag} for {self.parts}")
    if self.overlap and self.parts != 1:
      raise ValueError(f"MgpuConfig: overlap needs parts == 1: {self}")

  @property
  def part_n(self) -> int:
    """Columns of one fresh accumulator (one wgmma)."""
    return self.tile_n // self.parts

  @property
  def cta_m(self) -> int:
    return self.tile_m * (2 if self.wg_dim == "m" else 1)

  @property
  def cta_n(self) -> int:
    return self.tile_n * (2 if self.wg_dim == "n" else 1)

  @property
  def pair_m(self) -> int:
    """CTAs of a cluster along M (2 with cluster "m", else 1)."""
    return 2 if self.cluster == "m" else 1

  @property
  def pair_n(self) -> int:
    """CTAs of a cluster along N (2 with cluster "n", else 1)."""
    return 2 if self.cluster == "n" else 1

  @property
  def cluster_size(self) -> int:
    return self.pair_m * self.pair_n

  @property
  def cluster_m(self) -> int:
    """Rows of output one cluster covers (the M padding unit)."""
    return self.cta_m * self.pair_m

  @property
  def cluster_n(self) -> int:
    return self.cta_n * self.pair_n


# Tuning table: M class -> config (filled from benchmarks/results/gemm_sweep_r1.json and _r2.json,
# H100; `benchmarks/gemm_sweep.py`).
# "medium" / "large": the K block's product in two 64-column parts, the first promoted while the
# second's wgmma runs (parts=2, lag=1), from the H200 round 4 (results/gemm_sweep_r4_h200.md,
# TFLOP/s): 8192^3 1083 -> 1143, gate_up M=2048 1046 -> 1103, down M=2048 1053 -> 1182; 64 x 256
# warpgroup tiles lost (428-1026): they spill at the 232-register consumer budget
# (results/mgpu_sass_h200.md). Nothing beat it in rounds 5-8 (clusters, stages, tile order, wgmmas
# carried across K steps, A fed from registers, a larger register share; results/gemm_notes.md).
TUNING: dict[str, MgpuConfig] = {
    "small": MgpuConfig(64, 128, "m", 4, "n", 8),
    "medium": MgpuConfig(64, 128, "m", 4, "m", 8, parts=2, lag=1),
    "large": MgpuConfig(64, 128, "m", 4, "m", 8, parts=2, lag=1),
}


def config_for(m: int, n: int, k: int, layout: str) -> MgpuConfig:
  del k, layout
  cls = "small" if m <= 64 else ("medium" if m <= 1024 else "large")
  cfg = TUNING[cls]
  if n % cfg.cta_n and cfg.wg_dim == "n":  # avoid padding the weight when an M split fits
    cfg = dataclasses.replace(cfg, wg_dim="m")
  if n % cfg.cluster_n:  # a cluster along N would pad the weight: pair CTAs along M instead
    cfg = dataclasses.replace(cfg, cluster="m" if cfg.cluster else None)
  return cfg


def unavailable_reason() -> str | None:
  """None when the kernel can run here, else why not."""
  return _IMPORT_ERROR or hopper_device_reason()


def hopper_device_reason() -> str | None:
  """None when the default device is a Hopper GPU (wgmma, TMA), else why not: the device half
  of every Mosaic GPU kernel's `unavailable_reason`."""
  try:
    device = jax.devices()[0]
  except RuntimeError as e:
    return str(e)
  if device.platform != "gpu":
    return f"needs a Hopper GPU, default device is {device.platform}"
  cc = getattr(device, "compute_capability", "")
  if not str(cc).startswith("9"):
    return f"needs compute capability 9.x (wgmma), got {cc}"
  return None


def available() -> bool:
  return unavailable_reason() is None


def supports(m: int, n: int, k: int, layout: str) -> bool:
  """Whether this kernel takes the shape without copying the weight (no N or K padding)."""
  if layout not in LAYOUTS or not available():
    return False
  cfg = config_for(m, n, k, layout)
  return k % TILE_K == 0 and n % cfg.cluster_n == 0


def _uses_tile_b_scale(cfg: MgpuConfig, layout: str) -> bool:
  """Whether every accumulator part lies in one 128-column weight-scale block, so the weight
  scales travel as one value per (block, K step), repeated tile_m times (see MgpuConfig)."""
  if not cfg.tile_b_scale or layout == "row":
    return False
  return cfg.cta_n % SCALE_BLOCK == 0 and SCALE_BLOCK % cfg.part_n == 0


def _kernel(a_g, b_g, as_g, bs_g, *rest, cfg, out_dtype, num_m, num_n, num_k, has_bias,
            tile_b):
  if has_bias:
    bias_g, o_g = rest
  else:
    bias_g = None
    (o_g,) = rest
  tile_m, tile_n, cta_m, cta_n = cfg.tile_m, cfg.tile_n, cfg.cta_m, cfg.cta_n
  fp8 = jnp.float8_e4m3fn
  swizzle = plgpu.find_swizzle(TILE_K * jnp.dtype(fp8).itemsize * 8)
  transforms = (plgpu.TilingTransform((8, swizzle // jnp.dtype(fp8).itemsize)),
                plgpu.SwizzleTransform(swizzle))
  out_itemsize = jnp.dtype(out_dtype).itemsize
  epi_m = cfg.epi_m
  part_n, parts = cfg.part_n, cfg.parts
  epi_n = min(part_n, 128 // out_itemsize)  # one 128-byte swizzled row per epilogue tile row
  out_swizzle = plgpu.find_swizzle(epi_n * out_itemsize * 8)
  out_transforms = (plgpu.TilingTransform((8, out_swizzle // out_itemsize)),
                    plgpu.SwizzleTransform(out_swizzle))

  # Weight-scale row per K step: per column (cta_n wide), or per 128-column scale block
  # repeated tile_m times so it loads in the same row layout as the activation scales.
  b_width = (cta_n // SCALE_BLOCK) * tile_m if tile_b else cta_n

  # Clustered CTAs share one operand's tile: TMA multicasts it (collective BlockSpec).
  shared_a = ("cluster",) if cfg.cluster == "n" else ()
  shared_b = ("cluster",) if cfg.cluster == "m" else ()

  def get_pipeline(body, compute_context):
    return plgpu.emit_pipeline_warp_specialized(
        body,
        grid=(num_k,),
        memory_registers=40,
        in_specs=[
            plgpu.BlockSpec((cta_m, TILE_K), lambda i_k: (0, i_k), transforms=transforms,
                            memory_space=plgpu.SMEM, collective_axes=shared_a),
            plgpu.BlockSpec((cta_n, TILE_K), lambda i_k: (0, i_k), transforms=transforms,
                            memory_space=plgpu.SMEM, collective_axes=shared_b),
            plgpu.BlockSpec((1, cta_m), lambda i_k: (i_k, 0), memory_space=plgpu.SMEM),
            plgpu.BlockSpec((1, b_width), lambda i_k: (i_k, 0), memory_space=plgpu.SMEM),
        ],
        wg_axis="wg",
        num_compute_wgs=2,
        max_concurrent_steps=cfg.max_concurrent_steps,
        compute_context=compute_context,
    )

  ignore = lambda *_, **__: None
  scoped = dict(
      allocs=get_pipeline(ignore, ignore).get_allocations(a_g, b_g, as_g, bs_g),
      out_smem=plgpu.SMEM((2, 2, epi_m, epi_n), out_dtype, transforms=out_transforms),
  )
  if has_bias:
    scoped["bias_smem"] = plgpu.SMEM((2, tile_n), jnp.float32)
    scoped["bias_barrier"] = plgpu.Barrier(num_barriers=2)

  @functools.partial(pl.run_scoped, collective_axes="wg", **scoped)
  def _scope(allocs, out_smem, bias_smem=None, bias_barrier=None):
    wg = lax.axis_index("wg")
    minor = 0 if cfg.grid_minor == "m" else 1

    @plgpu.nd_loop(((num_m // cfg.pair_m) * (num_n // cfg.pair_n),),
                   collective_axes="cluster_grid")
    def _tile_loop(info):
      (lin,) = info.index
      i_m, i_n = plgpu.planar_snake(lin, (num_m // cfg.pair_m, num_n // cfg.pair_n), minor,
                                    cfg.grid_tile_width)
      if cfg.cluster is not None:  # this CTA's tile of the cluster's pair
        cta = lax.axis_index("cluster")
        i_m, i_n = (i_m * 2 + cta, i_n) if cfg.cluster == "m" else (i_m, i_n * 2 + cta)
      ms = pl.ds(i_m * cta_m, cta_m)
      ns = pl.ds(i_n * cta_n, cta_n)
      wm = pl.ds(wg * tile_m, tile_m) if cfg.wg_dim == "m" else slice(None)
      wg_col = wg * tile_n if cfg.wg_dim == "n" else 0   # the warpgroup's first column in the CTA
      wn = pl.ds(wg_col, tile_n) if cfg.wg_dim == "n" else slice(None)

      def part_cols(p):
        return pl.ds(wg_col + p * part_n, part_n)

      def load_scales(as_s, bs_s):
        """Per part: the scales of its columns as (row vector,) or (row, column vectors)."""
        # (ref, index) form: the form checked on jax 0.11.2 (it warns that ref.at[idx] is preferred).
        a_vec = plgpu.load(as_s.at[0], (wm,), layout=plgpu.Layout.WGMMA.reduce(1))
        out = []
        for p in range(parts):
          if tile_b:
            blk = (wg_col + p * part_n) // SCALE_BLOCK
            b_vec = plgpu.load(bs_s.at[0], (pl.ds(blk * tile_m, tile_m),),
                               layout=plgpu.Layout.WGMMA.reduce(1))
            out.append((a_vec * b_vec,))
          else:
            out.append((a_vec, plgpu.load(bs_s.at[0], (part_cols(p),),
                                          layout=plgpu.Layout.WGMMA.reduce(0))))
        return out

      def zero_scales():
        row = plgpu.layout_cast(jnp.zeros((tile_m,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        if tile_b:
          return (row,)
        return row, plgpu.layout_cast(jnp.zeros((part_n,), jnp.float32),
                                      plgpu.Layout.WGMMA.reduce(0))

      def scale_tile(*scales):
        tile = lax.broadcast_in_dim(scales[0], (tile_m, part_n), [0])
        if len(scales) == 2:
          tile = tile * lax.broadcast_in_dim(scales[1], (tile_m, part_n), [1])
        return tile

      def zeros_tile():
        return plgpu.layout_cast(jnp.zeros((tile_m, part_n), jnp.float32), plgpu.Layout.WGMMA)

      def compute_context(eval_pipeline):
        if cfg.overlap:   # parts == 1
          acc, prev, scales = eval_pipeline((zeros_tile(), zeros_tile(), zero_scales()))
          accs = (acc + prev * scale_tile(*scales),)
        else:
          accs = eval_pipeline(tuple(zeros_tile() for _ in range(parts)))
        if has_bias:
          plgpu.copy_gmem_to_smem(bias_g.at[ns].at[wn], bias_smem.at[wg], bias_barrier.at[wg])
          plgpu.barrier_wait(bias_barrier.at[wg])
          accs = tuple(
              acc + lax.broadcast_in_dim(
                  plgpu.load(bias_smem.at[wg], (pl.ds(p * part_n, part_n),),
                             layout=plgpu.Layout.WGMMA.reduce(0)), (tile_m, part_n), [1])
              for p, acc in enumerate(accs))
        outs = [acc.astype(out_dtype) for acc in accs]
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        i_epi = 0
        for e_m in range(tile_m // epi_m):
          for p in range(parts):
            for e_n in range(part_n // epi_n):
              slot = i_epi % 2
              i_epi += 1
              plgpu.wait_smem_to_gmem(1, wait_read_only=True)
              out_smem[wg, slot] = outs[p][e_m * epi_m:(e_m + 1) * epi_m,
                                           e_n * epi_n:(e_n + 1) * epi_n]
              plgpu.commit_smem()
              plgpu.copy_smem_to_gmem(
                  out_smem.at[wg, slot],
                  o_g.at[ms, ns].at[wm, wn].at[pl.ds(e_m * epi_m, epi_m),
                                               pl.ds(p * part_n + e_n * epi_n, epi_n)])

      def body(idxs, a_s, b_s, as_s, bs_s, carry):
        if cfg.overlap:
          acc, prev, prev_scales = carry

          def mma(acc_ref):
            plgpu.wgmma(acc_ref, a_s.at[wm], b_s.at[wn].T)
            # Promotion of the previous K block runs while this block's wgmma is in flight.
            new_acc = acc + prev * scale_tile(*prev_scales)
            plgpu.wgmma_wait(0)
            return new_acc, acc_ref[...]
          acc, part = pl.run_scoped(mma, plgpu.ACC((tile_m, tile_n), jnp.float32))
          return acc, part, load_scales(as_s, bs_s)[0]

        scales = load_scales(as_s, bs_s)

        def promote(p, acc_ref, wait_n):
          return carry[p] + plgpu.wgmma_accumulator_load(acc_ref, wait_n=wait_n) * scale_tile(
              *scales[p])

        def issue(p, pending):
          """Issue part p's wgmma into a fresh accumulator, promote the parts beyond `lag` in
          flight, recurse; returns {part: promoted tile} for the parts promoted here or deeper.
          Nested scopes keep a part's fresh registers alive only until its promotion."""
          if p == parts:
            return {q: promote(q, ref, len(pending) - 1 - i) for i, (q, ref) in enumerate(pending)}

          def scope(acc_ref):
            plgpu.wgmma(acc_ref, a_s.at[wm], b_s.at[part_cols(p)].T)
            in_flight = pending + [(p, acc_ref)]
            done = {}
            while len(in_flight) > cfg.lag:
              q, ref = in_flight.pop(0)
              done[q] = promote(q, ref, len(in_flight))
            return {**done, **issue(p + 1, in_flight)}
          return pl.run_scoped(scope, plgpu.ACC((tile_m, part_n), jnp.float32))

        done = issue(0, [])
        return tuple(done[p] for p in range(parts))

      get_pipeline(body, compute_context)(
          a_g.at[ms, :], b_g.at[ns, :], as_g.at[:, ms], bs_g.at[:, pl.ds(i_n * b_width, b_width)],
          allocations=allocs)

  plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def fp8_gemm(a, b, a_scale, b_scale, *, layout, bias=None, out_dtype=jnp.bfloat16, config=None,
             interpret=False):
  """Mosaic GPU version of `pallas_kernels.fp8_gemm.fp8_gemm` (same arguments and result).

  `interpret=True` runs the reference instead: Mosaic GPU has no CPU interpreter for wgmma/TMA.
  """
  m, n, k = _check_inputs(a, b, a_scale, b_scale, layout, bias, out_dtype)
  if interpret:
    return fp8_gemm_reference(a, b, a_scale, b_scale, layout=layout, bias=bias,
                              out_dtype=out_dtype)
  cfg = config or config_for(m, n, k, layout)
  if not _uses_tile_b_scale(cfg, layout) and cfg.cta_n > 256:
    raise ValueError(f"config: per-column weight scales load one (1, cta_n) row per K step and "
                     f"a TMA box holds at most 256 elements; cta_n={cfg.cta_n} for layout "
                     f"{layout!r}")
  reason = unavailable_reason()
  if reason is not None:
    raise RuntimeError(f"fp8_gemm_mgpu: cannot run here: {reason}")
  num_sms = _backend.get_default_device().core_count
  return _fp8_gemm_jit(a, b, a_scale, b_scale, bias, layout=layout,
                       out_dtype=jnp.dtype(out_dtype), cfg=cfg, num_sms=num_sms)


@functools.partial(jax.jit, static_argnames=("layout", "out_dtype", "cfg", "num_sms"))
def _fp8_gemm_jit(a, b, a_scale, b_scale, bias, *, layout, out_dtype, cfg, num_sms):
  m, k = a.shape
  n = b.shape[0]
  m_pad, n_pad, k_pad = _round_up(m, cfg.cluster_m), _round_up(n, cfg.cluster_n), _round_up(k, TILE_K)
  num_k = k_pad // TILE_K
  f32 = jnp.float32
  a = _pad_to(a, (m_pad, k_pad))
  b = _pad_to(b, (n_pad, k_pad))
  # Scale rows, one per K step, f32, so TMA brings each step's row: (num_k, M) for A; for B
  # (num_k, N) per column, or per warpgroup tile repeated tile_m times (see MgpuConfig).
  tile_b = _uses_tile_b_scale(cfg, layout)
  if layout == "tensor":
    a_rows = jnp.broadcast_to((a_scale * b_scale).astype(f32).reshape(1, 1), (num_k, m_pad))
    b_rows = jnp.ones((num_k, (n_pad // SCALE_BLOCK) * cfg.tile_m if tile_b else n_pad), f32)
  elif layout == "row":
    a_rows = jnp.broadcast_to(_pad_to(a_scale.astype(f32), (m_pad, 1)).T, (num_k, m_pad))
    b_rows = jnp.broadcast_to(_pad_to(b_scale.astype(f32), (n_pad, 1)).T, (num_k, n_pad))
  elif tile_b:  # block layout: one weight scale per 128-column block, repeated tile_m times
    a_rows = _pad_to(a_scale.astype(f32), (m_pad, num_k)).T
    b_rows = jnp.repeat(_pad_to(b_scale.astype(f32), (n_pad // SCALE_BLOCK, num_k)).T,
                        cfg.tile_m, axis=1)
  else:
    a_rows = _pad_to(a_scale.astype(f32), (m_pad, num_k)).T
    b_rows = _pad_to(jnp.repeat(b_scale.astype(f32), SCALE_BLOCK, axis=0)[:n], (n_pad, num_k)).T
  operands = [a, b, a_rows, b_rows]
  has_bias = bias is not None
  if has_bias:
    operands.append(_pad_to(bias.astype(f32), (n_pad,)))
  kernel = functools.partial(_kernel, cfg=cfg, out_dtype=out_dtype, num_m=m_pad // cfg.cta_m,
                             num_n=n_pad // cfg.cta_n, num_k=num_k, has_bias=has_bias,
                             tile_b=tile_b)
  call = plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct((m_pad, n_pad), out_dtype),
      grid=(num_sms // cfg.cluster_size,),
      grid_names=("cluster_grid",),
      cluster=(cfg.cluster_size,),
      cluster_names=("cluster",),
      num_threads=3,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
  )
  out = call(*operands)
  if (m_pad, n_pad) != (m, n):
    out = out[:m, :n]
  return out
