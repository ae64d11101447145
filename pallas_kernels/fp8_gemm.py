"""FP8 GEMM with per-tensor, per-row or block scales, Pallas lowered through Triton.

    C[m, n] = sum_k (A[m, k] * sa) * (B[n, k] * sb) + bias[n]       (f32 math, bf16/f32 output)

`a: (M, K) float8_e4m3fn`, `b: (N, K) float8_e4m3fn` (weights stored (out, in), K-major, as FP8
tensor cores want both operands). Scales are 2-D f32 arrays with the shapes of jfp8 QArray scales:

| layout   | a_scale              | b_scale                        | applied                       |
|----------|----------------------|--------------------------------|-------------------------------|
| "tensor" | (1, 1)               | (1, 1)                         | once, in the epilogue         |
| "row"    | (M, 1)               | (N, 1)                         | once, in the epilogue         |
| "block"  | (M, ceil(K/128))     | (ceil(N/128), ceil(K/128))     | per 128-wide K block, in loop |

The block layout is the DeepSeek-V3 / DeepGEMM recipe (1x128 token groups for activations, 128x128
blocks for weights): each K block's dot goes into a fresh f32 tile that is scaled and added to the
running f32 accumulator ("promotion"). Notes that apply (notes/h100.md): FP8 `tt.dot` needs
`max_num_imprecise_acc` (set through `_triton_fp8_shim`, opt-in by kernel name), and tile configs
must be swept, not guessed. The tuning table below comes from `benchmarks/gemm_sweep.py`.

Public: `fp8_gemm`, `fp8_gemm_reference`, `GemmConfig`, `config_for`, `pick_gemm_backend`.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _triton_fp8_shim, triton_compat


_triton_fp8_shim.install()

LAYOUTS = ("tensor", "row", "block")
#: K width of one scale block in the "block" layout (DeepSeek-V3 / DeepGEMM).
SCALE_BLOCK = 128
FP8_DTYPE = jnp.dtype(jnp.float8_e4m3fn)
OUT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class GemmConfig:
  """Tile and launch parameters of the Triton FP8 GEMM.

  Attributes:
    block_m, block_n, block_k: output tile (block_m x block_n) and K step. "block" layout needs
      block_k == 128 and block_n dividing 128 (one weight scale per tile per K step).
    num_warps, num_stages: Triton launch / software-pipelining depth.
    group_m: grouped program order (rows of tiles walked together for L2 reuse); 0 = plain 2-D grid.
    max_num_imprecise_acc: FP8 `tt.dot` attribute set through the shim (None = Triton default).
    k_per_iter: K blocks per loop iteration (2: two independent dots before the scaled adds,
      fewer wgmma wait points; used when the number of K blocks is even).
  """
  block_m: int = 128
  block_n: int = 128
  block_k: int = 128
  num_warps: int = 8
  num_stages: int = 3
  group_m: int = 8
  max_num_imprecise_acc: int | None = 128
  k_per_iter: int = 1

  def __post_init__(self):
    if self.k_per_iter not in (1, 2):
      raise ValueError(f"GemmConfig.k_per_iter: expected 1 or 2, got {self.k_per_iter}")
    for name in ("block_m", "block_n", "block_k"):
      v = getattr(self, name)
      if v < 16 or v & (v - 1):
        raise ValueError(f"GemmConfig.{name}: expected a power of two >= 16, got {v}")


# Tuning table: (layout class, M class) -> config. Layout class "block" or "plain" (tensor/row);
# M class from `_m_class`. Filled from benchmarks/results/gemm_sweep_r1.json and _r2.json (H100,
# jax 0.11.2; `benchmarks/gemm_sweep.py`).
TUNING: dict[tuple[str, str], GemmConfig] = {
    ("plain", "small"): GemmConfig(64, 128, 128, num_warps=4, num_stages=4, group_m=8),
    ("plain", "medium"): GemmConfig(128, 128, 128, num_warps=8, num_stages=4, group_m=8),
    ("plain", "large"): GemmConfig(128, 128, 128, num_warps=8, num_stages=4, group_m=8),
    ("block", "small"): GemmConfig(64, 128, 128, num_warps=4, num_stages=4, group_m=0),
    ("block", "medium"): GemmConfig(64, 128, 128, num_warps=4, num_stages=4, group_m=0),
    ("block", "large"): GemmConfig(64, 128, 128, num_warps=4, num_stages=4, group_m=0),
}

# Measured backend choice per (layout, M class): which of the Triton kernel and the Mosaic GPU
# kernel (fp8_gemm_mgpu.py) was faster in benchmarks/results/gemm.json (H100, M = 2048 and 8192:
# Mosaic won every block and per-tensor shape; row was a tie, 4 of 7 shapes to Triton). The small
# class (decode, M <= 64) was not measured here: Triton (decode shapes go to fp8_gemv anyway).
# Shapes the Mosaic kernel does not take without padding the weight (fp8_gemm_mgpu.supports)
# always go to Triton.
BACKEND_TABLE: dict[tuple[str, str], str] = {
    ("tensor", "small"): "triton",
    ("tensor", "medium"): "mosaic",
    ("tensor", "large"): "mosaic",
    ("row", "small"): "triton",
    ("row", "medium"): "triton",
    ("row", "large"): "triton",
    ("block", "small"): "triton",
    ("block", "medium"): "mosaic",
    ("block", "large"): "mosaic",
}


def _m_class(m: int) -> str:
  if m <= 64:
    return "small"
  if m <= 1024:
    return "medium"
  return "large"


def config_for(m: int, n: int, k: int, layout: str) -> GemmConfig:
  """The tuning-table config for a problem (n, k kept for future shape classes)."""
  del n, k
  return TUNING[("block" if layout == "block" else "plain", _m_class(m))]


def pick_gemm_backend(m: int, n: int, k: int, layout: str) -> str:
  """"triton" or "mosaic": the backend measured faster for this shape class and layout."""
  if layout not in LAYOUTS:
    raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
  choice = BACKEND_TABLE.get((layout, _m_class(m)), "triton")
  if choice == "mosaic":
    from pallas_kernels import fp8_gemm_mgpu  # lazy: Mosaic GPU import is heavier
    if not fp8_gemm_mgpu.supports(m, n, k, layout):
      return "triton"
  return choice


def _program_ids(pid, num_m: int, num_n: int, group_m: int):
  """Grouped order: `group_m` rows of tiles are walked column by column (L2 reuse of B)."""
  width = group_m * num_n
  group = pid // width
  first_m = group * group_m
  size_m = jnp.minimum(num_m - first_m, group_m)
  i_m = first_m + (pid % width) % size_m
  i_n = (pid % width) // size_m
  return i_m, i_n


def _fp8_gemm_kernel(a_ref, b_ref, a_scale_ref, b_scale_ref, *rest, layout, block_k, num_k,
                     k_per_iter, has_bias):
  if has_bias:
    bias_ref, o_ref = rest
  else:
    (o_ref,) = rest
  block_m, block_n = o_ref.shape
  dims = (((1,), (1,)), ((), ()))

  def block_product(i_k):
    a = a_ref[:, pl.ds(i_k * block_k, block_k)]
    b = b_ref[:, pl.ds(i_k * block_k, block_k)]
    part = lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)
    if layout == "block":
      # DeepGEMM promotion: scale this K block's f32 partial product, then accumulate.
      part = part * (a_scale_ref[:, pl.ds(i_k, 1)] * b_scale_ref[:, pl.ds(i_k, 1)])
    return part

  def body(i, acc):
    parts = [block_product(i * k_per_iter + j) for j in range(k_per_iter)]
    for part in parts:
      acc = acc + part
    return acc

  acc = lax.fori_loop(0, num_k // k_per_iter, body, jnp.zeros((block_m, block_n), jnp.float32))
  if layout == "tensor":
    acc = acc * a_scale_ref[...]  # (1, 1): a_scale * b_scale, combined in the wrapper
  elif layout == "row":
    acc = acc * a_scale_ref[...] * b_scale_ref[...]  # (block_m, 1) * (1, block_n)
  if has_bias:
    acc = acc + bias_ref[...]
  o_ref[...] = acc.astype(o_ref.dtype)


def _check_inputs(a, b, a_scale, b_scale, layout, bias, out_dtype):
  """Validates shapes/dtypes in Python before tracing; returns (M, N, K)."""
  if layout not in LAYOUTS:
    raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
  for name, x in (("a", a), ("b", b)):
    if getattr(x, "ndim", None) != 2:
      raise ValueError(f"{name}: expected a 2-D array, got shape {getattr(x, 'shape', None)}")
    if jnp.dtype(x.dtype) != FP8_DTYPE:
      raise TypeError(f"{name}: expected dtype float8_e4m3fn, got {x.dtype}")
  m, k = a.shape
  n, k_b = b.shape
  if k_b != k:
    raise ValueError(f"b: expected (N, K) with K={k} (from a), got {b.shape}")
  if k % 16:
    raise ValueError(f"a: K={k} must be a multiple of 16 (FP8 tensor-core K granularity)")
  if m == 0 or n == 0 or k == 0:
    raise ValueError(f"a, b: empty dimensions are not supported, got a {a.shape}, b {b.shape}")
  kb = -(-k // SCALE_BLOCK)
  nb = -(-n // SCALE_BLOCK)
  expected = {
      "tensor": ((1, 1), (1, 1)),
      "row": ((m, 1), (n, 1)),
      "block": ((m, kb), (nb, kb)),
  }[layout]
  for name, s, shape in (("a_scale", a_scale, expected[0]), ("b_scale", b_scale, expected[1])):
    if getattr(s, "ndim", None) != 2:
      raise ValueError(f"{name}: expected a 2-D scale array {shape} for layout={layout!r}, "
                       f"got shape {getattr(s, 'shape', None)}")
    if tuple(s.shape) != shape:
      raise ValueError(f"{name}: expected shape {shape} for layout={layout!r}, got {s.shape}")
    if not jnp.issubdtype(s.dtype, jnp.floating):
      raise TypeError(f"{name}: expected a float32 scale array, got {s.dtype}")
  if bias is not None:
    if getattr(bias, "shape", None) != (n,):
      raise ValueError(f"bias: expected shape ({n},), got {getattr(bias, 'shape', None)}")
    if not jnp.issubdtype(bias.dtype, jnp.floating):
      raise TypeError(f"bias: expected a floating dtype, got {bias.dtype}")
  if jnp.dtype(out_dtype) not in OUT_DTYPES:
    raise TypeError(f"out_dtype: expected one of bfloat16, float16, float32, got {out_dtype}")
  return m, n, k


def _pad_to(x, shape):
  pads = [(0, t - s) for s, t in zip(x.shape, shape)]
  if all(p == (0, 0) for p in pads):
    return x
  return jnp.pad(x, pads)


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _pick_block_k(k: int, block_k: int) -> int:
  """Largest power of two <= block_k dividing K (K is a multiple of 16)."""
  while k % block_k:
    block_k //= 2
  return block_k


def fp8_gemm(a, b, a_scale, b_scale, *, layout, bias=None, out_dtype=jnp.bfloat16, config=None,
             interpret=False):
  """C = (A * a_scale) @ (B * b_scale)^T (+ bias), FP8 operands, f32 accumulation.

  Args:
    a: (M, K) float8_e4m3fn.
    b: (N, K) float8_e4m3fn (weights, out x in).
    a_scale, b_scale: float32, shapes per `layout` (module docstring).
    layout: "tensor", "row" or "block".
    bias: optional (N,) floating, added in f32 before the output cast.
    out_dtype: bfloat16 (default), float16 or float32.
    config: GemmConfig overriding the tuning table.
    interpret: run the kernel in Pallas interpret mode (CPU tests).
  Returns:
    (M, N) out_dtype.
  """
  m, n, k = _check_inputs(a, b, a_scale, b_scale, layout, bias, out_dtype)
  cfg = config or config_for(m, n, k, layout)
  return _fp8_gemm_jit(a, b, a_scale, b_scale, bias, layout=layout,
                       out_dtype=jnp.dtype(out_dtype), cfg=cfg, interpret=bool(interpret))


@functools.partial(jax.jit, static_argnames=("layout", "out_dtype", "cfg", "interpret"))
def _fp8_gemm_jit(a, b, a_scale, b_scale, bias, *, layout, out_dtype, cfg, interpret):
  m, k = a.shape
  n = b.shape[0]
  block_m, block_n = cfg.block_m, cfg.block_n
  if layout == "block":
    if cfg.block_k != SCALE_BLOCK or SCALE_BLOCK % block_n:
      raise ValueError(f"config: layout='block' needs block_k == {SCALE_BLOCK} and block_n "
                       f"dividing {SCALE_BLOCK}, got {cfg}")
    block_k = SCALE_BLOCK
    k_pad = _round_up(k, SCALE_BLOCK)  # zero K padding adds nothing to the dot
  else:
    block_k = _pick_block_k(k, cfg.block_k)
    k_pad = k
  m_pad, n_pad = _round_up(m, block_m), _round_up(n, block_n)
  num_m, num_n, num_k = m_pad // block_m, n_pad // block_n, k_pad // block_k
  a = _pad_to(a, (m_pad, k_pad))
  b = _pad_to(b, (n_pad, k_pad))

  if cfg.group_m:
    grid = (num_m * num_n,)
    ids = lambda pid: _program_ids(pid, num_m, num_n, cfg.group_m)
  else:
    grid = (num_m, num_n)
    ids = lambda i_m, i_n: (i_m, i_n)

  def im(f):  # index map in (i_m, i_n) terms, whatever the grid
    return lambda *pids: f(*ids(*pids))

  in_specs = [pl.BlockSpec((block_m, k_pad), im(lambda i_m, i_n: (i_m, 0))),
              pl.BlockSpec((block_n, k_pad), im(lambda i_m, i_n: (i_n, 0)))]
  f32 = jnp.float32
  if layout == "tensor":
    scales = [(a_scale.astype(f32) * b_scale.astype(f32)).reshape(1, 1), jnp.ones((1, 1), f32)]
    in_specs += [pl.BlockSpec((1, 1), im(lambda i_m, i_n: (0, 0)))] * 2
  elif layout == "row":
    scales = [_pad_to(a_scale.astype(f32), (m_pad, 1)),
              _pad_to(b_scale.astype(f32).reshape(1, n), (1, n_pad))]
    in_specs += [pl.BlockSpec((block_m, 1), im(lambda i_m, i_n: (i_m, 0))),
                 pl.BlockSpec((1, block_n), im(lambda i_m, i_n: (0, i_n)))]
  else:
    # Triton blocks must be powers of two: pad the K-block axis of both scale arrays.
    kb_pad = 1 << max(0, math.ceil(math.log2(num_k)))
    nb_pad = -(-n_pad // SCALE_BLOCK)
    tiles_per_scale = SCALE_BLOCK // block_n
    scales = [_pad_to(a_scale.astype(f32), (m_pad, kb_pad)),
              _pad_to(b_scale.astype(f32), (nb_pad, kb_pad))]
    in_specs += [pl.BlockSpec((block_m, kb_pad), im(lambda i_m, i_n: (i_m, 0))),
                 pl.BlockSpec((1, kb_pad), im(lambda i_m, i_n: (i_n // tiles_per_scale, 0)))]
  operands = [a, b, *scales]
  has_bias = bias is not None
  if has_bias:
    operands.append(_pad_to(bias.astype(f32).reshape(1, n), (1, n_pad)))
    in_specs.append(pl.BlockSpec((1, block_n), im(lambda i_m, i_n: (0, i_n))))

  k_per_iter = cfg.k_per_iter if num_k % cfg.k_per_iter == 0 else 1
  kernel = functools.partial(_fp8_gemm_kernel, layout=layout, block_k=block_k, num_k=num_k,
                             k_per_iter=k_per_iter, has_bias=has_bias)
  params = {} if interpret else triton_compat.compiler_params(num_warps=cfg.num_warps,
                                                             num_stages=cfg.num_stages)
  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((m_pad, n_pad), out_dtype),
      grid=grid,
      in_specs=in_specs,
      out_specs=pl.BlockSpec((block_m, block_n), im(lambda i_m, i_n: (i_m, i_n))),
      interpret=interpret,
      name=_triton_fp8_shim.kernel_name(f"jfp8_fp8_gemm_{layout}", cfg.max_num_imprecise_acc),
      **params,
  )(*operands)
  if (m_pad, n_pad) != (m, n):
    out = out[:m, :n]
  return out


def _expand_scale(scale, shape, layout, kind):
  """Per-element f32 scale of an (R, K) operand, from its layout's scale array."""
  r, k = shape
  scale = scale.astype(jnp.float32)
  if layout == "tensor":
    return jnp.broadcast_to(scale, shape)
  if layout == "row":
    return jnp.broadcast_to(scale, shape)
  rows = scale if kind == "a" else jnp.repeat(scale, SCALE_BLOCK, axis=0)[:r]
  return jnp.repeat(rows, SCALE_BLOCK, axis=1)[:, :k]


def fp8_gemm_reference(a, b, a_scale, b_scale, *, layout, bias=None, out_dtype=jnp.bfloat16,
                       config=None, interpret=False):
  """Plain jax.numpy reference of `fp8_gemm`: dequantize to f32, f32 dot, bias, cast."""
  del config, interpret
  _check_inputs(a, b, a_scale, b_scale, layout, bias, out_dtype)
  a32 = a.astype(jnp.float32) * _expand_scale(a_scale, a.shape, layout, "a")
  b32 = b.astype(jnp.float32) * _expand_scale(b_scale, b.shape, layout, "b")
  out = lax.dot_general(a32, b32, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST,
                        preferred_element_type=jnp.float32)
  if bias is not None:
    out = out + bias.astype(jnp.float32)
  return out.astype(out_dtype)
