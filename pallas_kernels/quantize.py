"""Fused FP8 activation quantization (amax, scale, saturating cast), Pallas lowered through Triton.

    scale[g] = amax_g * (1 / fmax)   (amax over the finite |x| of group g; amax 0 -> scale 1)
    data     = RNE-cast(clip(x_f32 * (1 / scale[g]), -fmax, fmax))   (NaN stays NaN, ±inf -> ±fmax)

`x: (M, K) bfloat16 | float16 | float32` -> `(data: (M, K) float8_e4m3fn (or e5m2), scale)` with

| layout   | scale                     | passes over x                                           |
|----------|---------------------------|---------------------------------------------------------|
| "group"  | (M, ceil(K/128)) float32  | one: each program owns whole 1x128 groups               |
| "tensor" | (1, 1) float32            | two: partial amax per tile, then the cast (see below)   |

The numerics are exactly `jfp8.quantize(x, fmt, PerBlock((1, 128)) | PerTensor())` as XLA runs it:
the scale is amax times the f32 constant RN(1/fmax) (XLA's algebraic simplifier rewrites
`amax / fmax` into that product, so this is what `jfp8.scaling.scale_from_amax` computes), floored
at the smallest normal f32; x is multiplied by the reciprocal of its scale, rounded once
(`jfp8.scaling.reciprocal`; on the GPU through `div.rn.f32`: Triton lowers `/` on f32 to the
approximate `div.full.f32`), not divided by it, because XLA turns a division by a broadcast scale
into that multiply on some paths and not others; the clip before the cast keeps NaN
(the Triton lowering of max/min is `maxnumf`, which would turn NaN into -fmax). The per-tensor layout
reads x twice because its scale depends on every element: a single pass would need a grid-wide
barrier, which Pallas' Triton backend cannot express; the partial amaxes (one f32 per tile) are
reduced by XLA between the passes.

With the scale known before the data (static or delayed scaling, TransformerEngine's recipe:
the scale comes from the amax history of earlier steps), `cast_fp8` is the per-tensor quantize in
one pass: it casts with the given scale and returns this tensor's amax for the history, read from
the same tiles (x is read once).

Public: `quantize_fp8`, `quantize_fp8_reference`, `cast_fp8`, `cast_fp8_reference`,
`QuantizeConfig`, `config_for`.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels import triton_compat

LAYOUTS = ("group", "tensor")
#: Width of one activation scale group along K (DeepSeek-V3 1x128 token groups).
GROUP = 128
IN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
OUT_DTYPES = (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2))
# Scales never go below the smallest normal f32 (jfp8.scaling._MIN_SCALE): 1 / scale is finite.
_MIN_SCALE = float(np.finfo(np.float32).tiny)


@dataclasses.dataclass(frozen=True)
class QuantizeConfig:
    """Tile and launch parameters.

    Attributes:
      block_m: rows per program (power of two).
      groups: 128-wide K groups per program (power of two); the tile is block_m x groups*128.
      num_warps: Triton warps per program.
    """
    block_m: int = 16
    groups: int = 4
    num_warps: int = 4

    def __post_init__(self):
        for name in ("block_m", "groups", "num_warps"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"QuantizeConfig.{name}: expected a power of two, got {v}")

    @property
    def block_k(self) -> int:
        return self.groups * GROUP


# Tuning table, keyed by M class (`_m_class`). Filled from benchmarks/results/quantize.json
# (H100, jax 0.11.2): see benchmarks/quantize.py for the sweep that chose them.
# Measured (same run, µs, group layout): 16x4096 bm4 g4 7.3 vs bm1 g4 8.2; 64x4096 bm1 g8 10.4 vs
# bm4 g4 11.6; 8192x4096 bm8 g4 42.0 vs bm16 g4 46.5 vs bm16 g8 w8 52.1.
TUNING: dict[str, QuantizeConfig] = {
    "decode": QuantizeConfig(block_m=4, groups=4, num_warps=4),
    "small": QuantizeConfig(block_m=1, groups=8, num_warps=4),
    "large": QuantizeConfig(block_m=8, groups=4, num_warps=4),
}


def _m_class(m: int) -> str:
    if m <= 16:
        return "decode"
    if m <= 512:
        return "small"
    return "large"


def config_for(m: int, k: int) -> QuantizeConfig:
    """The tuned config for an (m, k) input; block_m is clipped to the rows that exist."""
    cfg = TUNING[_m_class(m)]
    block_m = min(cfg.block_m, _next_pow2(m))
    groups = min(cfg.groups, _next_pow2(-(-k // GROUP)))
    return dataclasses.replace(cfg, block_m=block_m, groups=groups)


def _next_pow2(x: int) -> int:
    return 1 << max(int(x) - 1, 0).bit_length()


def _compiler_params(num_warps: int):
    return triton_compat.compiler_params(num_warps=num_warps, num_stages=1)


# --------------------------------------------------------------------------------------------
# kernel bodies


def _rcp(s, exact_div: bool):
    """1 / s in f32 rounded once (IEEE division, as `jfp8.scaling.reciprocal`), elementwise."""
    one = jnp.ones(s.shape, jnp.float32)
    if not exact_div:
        return one / s
    [out] = triton_compat.pltriton.elementwise_inline_asm(
        "div.rn.f32 $0, $1, $2;", args=[one, s], constraints="=f,f,f", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(s.shape, jnp.float32)])
    return out


def _finite_abs(x):
    a = jnp.abs(x)
    return jnp.where(a < jnp.inf, a, 0.0)  # inf and NaN leave the amax (jfp8.scaling.block_amax)


def _inv(fmax: float) -> float:
    return float(np.float32(1.0) / np.float32(fmax))


def _scale_of(amax, fmax: float):
    scale = amax * _inv(fmax)
    return jnp.where(amax > 0, jnp.maximum(scale, _MIN_SCALE), 1.0)


def round_scale(scale, scale_dtype):
    """An f32 scale as it is stored in `scale_dtype` (float32: unchanged; bfloat16: rounded to
    nearest even), back in f32. Quantizing with the stored value keeps data * scale the
    dequantization. A bf16 scale rounded down by <= 2^-9 lets the row's amax reach at most
    fmax * (1 + 2^-8), which the saturation maps to fmax: for E4M3 that is what rounding does
    anyway (449.75 < 464, the midpoint of 448 and the next code), for E5M2 (57344, next code
    61440) likewise, so the data lose nothing to the shorter scale."""
    if jnp.dtype(scale_dtype) == jnp.float32:
        return scale
    return scale.astype(scale_dtype).astype(jnp.float32)


def _saturate(y, fmax: float):
    clipped = jnp.minimum(jnp.maximum(y, -fmax), fmax)
    return jnp.where(y != y, y, clipped)  # keep NaN: Triton's max/min are maxnumf/minnumf


def _quantize_along(xs, axis: int, fmax: float, exact_div: bool, scale_dtype=jnp.float32):
    """Quantize f32 tiles xs that share all axes but `axis` with one scale per slice along it:
    amax of the finite values over every tile (`_finite_abs`), scale = `_scale_of(amax)` rounded
    to `scale_dtype` (`round_scale`), data = `_saturate(x * rcp(scale))`. Returns ([data f32 per
    tile], scale f32) with `axis` reduced away: the (1, 128) groups of `quantize_fp8`, and a
    token's (head) rows in the K/V append kernels."""
    amax = functools.reduce(jnp.maximum, [jnp.max(_finite_abs(x), axis=axis) for x in xs])
    scale = round_scale(_scale_of(amax, fmax), scale_dtype)
    rcp = jnp.expand_dims(_rcp(scale, exact_div), axis)
    return [_saturate(x * rcp, fmax) for x in xs], scale


def _tile_mask(i_m, i_k, block_m, block_k, m, k, masked):
    if not masked:
        return None
    rows = i_m * block_m + jnp.arange(block_m)[:, None]
    cols = i_k * block_k + jnp.arange(block_k)[None, :]
    return (rows < m) & (cols < k)


def _group_kernel(x_ref, data_ref, scale_ref, *, block_m, groups, m, k, fmax, exact_div,
                  masked):
    i_m = pl.program_id(0)
    i_k = pl.program_id(1)
    block_k = groups * GROUP
    mask = _tile_mask(i_m, i_k, block_m, block_k, m, k, masked)
    tile = (pl.ds(i_m * block_m, block_m), pl.ds(i_k * block_k, block_k))
    x = _load(x_ref.at[tile], mask).astype(jnp.float32)                 # (block_m, block_k)
    (y,), scale = _quantize_along([x.reshape(block_m, groups, GROUP)], 2, fmax, exact_div)
    y = y.reshape(block_m, block_k)                                     # scale (block_m, groups)
    _store(data_ref.at[tile], y.astype(data_ref.dtype), mask)
    kb = -(-k // GROUP)
    scale_tile = (pl.ds(i_m * block_m, block_m), pl.ds(i_k * groups, groups))
    _store(scale_ref.at[scale_tile], scale,
           _tile_mask(i_m, i_k, block_m, groups, m, kb, masked))


def _amax_kernel(x_ref, amax_ref, *, block_m, block_k, m, k, masked):
    i_m = pl.program_id(0)
    i_k = pl.program_id(1)
    mask = _tile_mask(i_m, i_k, block_m, block_k, m, k, masked)
    tile = (pl.ds(i_m * block_m, block_m), pl.ds(i_k * block_k, block_k))
    x = _load(x_ref.at[tile], mask).astype(jnp.float32)
    amax = jnp.max(jnp.max(_finite_abs(x), axis=1, keepdims=True), axis=0, keepdims=True)
    amax_ref[pl.ds(i_m, 1), pl.ds(i_k, 1)] = amax


def _cast_amax_kernel(x_ref, scale_ref, data_ref, amax_ref, *, block_m, block_k, m, k, fmax,
                      exact_div, masked):
    """One tile: the cast with the given scale, and the tile's finite amax, from one read."""
    i_m = pl.program_id(0)
    i_k = pl.program_id(1)
    mask = _tile_mask(i_m, i_k, block_m, block_k, m, k, masked)
    tile = (pl.ds(i_m * block_m, block_m), pl.ds(i_k * block_k, block_k))
    x = _load(x_ref.at[tile], mask).astype(jnp.float32)
    y = _saturate(x * _rcp(scale_ref[pl.ds(0, 1), pl.ds(0, 1)], exact_div), fmax)
    _store(data_ref.at[tile], y.astype(data_ref.dtype), mask)
    amax_ref[pl.ds(i_m, 1), pl.ds(i_k, 1)] = jnp.max(
        jnp.max(_finite_abs(x), axis=1, keepdims=True), axis=0, keepdims=True)


def _load(ref, mask):
    return triton_compat.load(ref, mask, other=0)


_store = triton_compat.store


# --------------------------------------------------------------------------------------------
# wrapper


def _check(x, layout, dtype):
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    if not hasattr(x, "shape") or len(x.shape) != 2:
        raise ValueError(f"x: expected a 2-D (M, K) array, got shape {getattr(x, 'shape', None)}")
    if jnp.dtype(x.dtype) not in IN_DTYPES:
        raise TypeError(f"x: expected bfloat16, float16 or float32, got {x.dtype}")
    if jnp.dtype(dtype) not in OUT_DTYPES:
        raise TypeError(f"dtype: expected float8_e4m3fn or float8_e5m2, got {dtype}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"x: expected a non-empty (M, K) array, got shape {x.shape}")


def quantize_fp8(x, *, layout="group", dtype=jnp.float8_e4m3fn, config: QuantizeConfig | None = None,
                 interpret: bool = False):
    """Quantize activations to FP8 in one fused kernel (two for layout="tensor").

    Args:
      x: (M, K) bfloat16 / float16 / float32.
      layout: "group" (one scale per row and 128-wide K group) or "tensor" (one scale).
      dtype: float8_e4m3fn (default) or float8_e5m2.
      config: tile override; default from `config_for(M, K)`.
      interpret: run the Pallas kernels in interpret mode (CPU tests).
    Returns:
      data: (M, K) `dtype`; scale: (M, ceil(K/128)) or (1, 1) float32, with x ≈ data * scale.
    """
    _check(x, layout, dtype)
    m, k = x.shape
    cfg = config_for(m, k) if config is None else config
    return _quantize_jit(x, layout=layout, dtype=jnp.dtype(dtype), cfg=cfg, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("layout", "dtype", "cfg", "interpret"))
def _quantize_jit(x, *, layout, dtype, cfg, interpret):
    m, k = x.shape
    fmax = float(jnp.finfo(dtype).max)
    exact_div = not interpret
    kw = dict(interpret=True) if interpret else _compiler_params(cfg.num_warps)
    block_m, block_k = cfg.block_m, cfg.block_k
    grid = (pl.cdiv(m, block_m), pl.cdiv(k, block_k))
    masked = m % block_m != 0 or k % block_k != 0
    if layout == "group":
        kb = pl.cdiv(k, GROUP)
        body = functools.partial(_group_kernel, block_m=block_m, groups=cfg.groups, m=m, k=k,
                                 fmax=fmax, exact_div=exact_div, masked=masked)
        return pl.pallas_call(
            body, grid=grid,
            out_shape=(jax.ShapeDtypeStruct((m, k), dtype),
                       jax.ShapeDtypeStruct((m, kb), jnp.float32)),
            name="fp8_quantize_group", **kw)(x)
    partial_amax = pl.pallas_call(
        functools.partial(_amax_kernel, block_m=block_m, block_k=block_k, m=m, k=k, masked=masked),
        grid=grid, out_shape=jax.ShapeDtypeStruct(grid, jnp.float32),
        name="fp8_quantize_amax", **kw)(x)
    amax = jnp.max(partial_amax).reshape(1, 1)
    scale = _scale_of(amax, fmax)
    data, _ = pl.pallas_call(     # the second pass: cast_fp8's kernel (its amax is not needed)
        functools.partial(_cast_amax_kernel, block_m=block_m, block_k=block_k, m=m, k=k, fmax=fmax,
                          exact_div=exact_div, masked=masked),
        grid=grid, out_shape=(jax.ShapeDtypeStruct((m, k), dtype),
                              jax.ShapeDtypeStruct(grid, jnp.float32)),
        name="fp8_quantize_cast", **kw)(x, scale)
    return data, scale


def quantize_fp8_reference(x, *, layout="group", dtype=jnp.float8_e4m3fn, config=None,
                           interpret=False):
    """Plain jax.numpy version of `quantize_fp8` (same signature; config/interpret ignored)."""
    del config, interpret
    _check(x, layout, dtype)
    dtype = jnp.dtype(dtype)
    fmax = float(jnp.finfo(dtype).max)
    m, k = x.shape
    xf = x.astype(jnp.float32)
    a = jnp.abs(xf)
    a = jnp.where(jnp.isfinite(a), a, 0.0)
    if layout == "group":
        kb = -(-k // GROUP)
        amax = jnp.pad(a, ((0, 0), (0, kb * GROUP - k))).reshape(m, kb, GROUP).max(axis=2)
    else:
        amax = jnp.max(a).reshape(1, 1)
    scale = _scale_of(amax, fmax)
    full = jnp.repeat(scale, GROUP, axis=1)[:, :k] if layout == "group" else scale
    data = jnp.clip(xf * (1.0 / full), -fmax, fmax).astype(dtype)
    return data, scale


def cast_fp8(x, scale, *, dtype=jnp.float8_e4m3fn, config: QuantizeConfig | None = None,
             interpret: bool = False):
    """Per-tensor FP8 cast with a given scale (static / delayed scaling), one pass over x.

    Args:
      x: (M, K) bfloat16 / float16 / float32.
      scale: (1, 1) float32 > 0 (x ~ data * scale), e.g. from `jfp8.delayed_scaling_update`.
      dtype: float8_e4m3fn (default) or float8_e5m2.
      config, interpret: as for `quantize_fp8`.
    Returns:
      data: (M, K) `dtype` = RNE-cast(clip(x * (1 / scale), -fmax, fmax)) (NaN kept, ±inf -> ±fmax);
      amax: () float32, max |x| over the finite elements (0 if none): the next history entry.
    """
    _check(x, "tensor", dtype)
    if not hasattr(scale, "shape") or tuple(scale.shape) != (1, 1) or \
            jnp.dtype(scale.dtype) != jnp.float32:
        raise ValueError(f"scale: expected a (1, 1) float32 array, got "
                         f"{getattr(scale, 'shape', None)} {getattr(scale, 'dtype', type(scale))}")
    m, k = x.shape
    cfg = config_for(m, k) if config is None else config
    return _cast_jit(x, scale, dtype=jnp.dtype(dtype), cfg=cfg, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("dtype", "cfg", "interpret"))
def _cast_jit(x, scale, *, dtype, cfg, interpret):
    m, k = x.shape
    block_m, block_k = cfg.block_m, cfg.block_k
    grid = (pl.cdiv(m, block_m), pl.cdiv(k, block_k))
    kw = dict(interpret=True) if interpret else _compiler_params(cfg.num_warps)
    data, partial_amax = pl.pallas_call(
        functools.partial(_cast_amax_kernel, block_m=block_m, block_k=block_k, m=m, k=k,
                          fmax=float(jnp.finfo(dtype).max), exact_div=not interpret,
                          masked=m % block_m != 0 or k % block_k != 0),
        grid=grid, out_shape=(jax.ShapeDtypeStruct((m, k), dtype),
                              jax.ShapeDtypeStruct(grid, jnp.float32)),
        name="fp8_cast_amax", **kw)(x, scale)
    return data, jnp.max(partial_amax)


def cast_fp8_reference(x, scale, *, dtype=jnp.float8_e4m3fn, config=None, interpret=False):
    """Plain jax.numpy version of `cast_fp8` (same signature and results)."""
    del config, interpret
    _check(x, "tensor", dtype)
    xf = x.astype(jnp.float32)
    fmax = float(jnp.finfo(dtype).max)
    y = xf * (1.0 / scale)
    data = jnp.where(jnp.isnan(y), y, jnp.clip(y, -fmax, fmax)).astype(dtype)
    amax = jnp.max(jnp.where(jnp.isfinite(xf), jnp.abs(xf), 0.0))
    return data, amax
