"""QArray: FP8 data plus its f32 scales, as a JAX pytree.

    q = jfp8.quantize(w, jfp8.E4M3, jfp8.PerBlock((128, 128)))
    w_approx = q.dequantize(jnp.bfloat16)          # data * scale, per block

`data` is stored at the logical shape (blocks that overhang the edge are padded only while the
amax is taken), `scale` has the data's rank with shape ceil(shape / block). Format and granularity
are static pytree metadata, so QArrays pass through jit, vmap, scan and tree_map; under vmap the
mapped axis is added to data and scale alike.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jfp8.formats import Format, as_format, cast, is_fp8_dtype
from jfp8.scaling import (Granularity, PerBlock, as_granularity, compute_scale, expand_scale,
                          reciprocal, scale_shape)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QArray:
    """A quantized array.

    Attributes:
      data: FP8 array (fmt.dtype) of the logical shape.
      scale: f32 array, rank of data, shape ceil(data.shape / block).
      format: the FP8 Format (static).
      granularity: PerTensor / PerChannel / PerBlock (static).
    """

    data: jax.Array
    scale: jax.Array
    format: Format = dataclasses.field(metadata=dict(static=True))
    granularity: Granularity = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.data.shape)) * self.data.dtype.itemsize + int(
            np.prod(self.scale.shape)) * 4

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """data * scale in f32 (scale repeated over its block), then cast to `dtype`."""
        block = _block_of(self.data.shape, self.scale.shape, self.granularity)
        full = expand_scale(self.scale, self.data.shape, _Blocks(block))
        return (self.data.astype(jnp.float32) * full).astype(dtype)

    def __repr__(self) -> str:
        return (f"QArray(shape={self.shape}, format={self.format!r}, granularity={self.granularity!r}, "
                f"scale_shape={tuple(self.scale.shape)})")


@dataclasses.dataclass(frozen=True)
class _Blocks:
    block: tuple

    def block_shape(self, shape):
        return self.block


def _block_of(data_shape, scale_shape_, granularity: Granularity) -> tuple[int, ...]:
    """The block along each axis, from the data and scale shapes.

    Under vmap/scan the data and scale gain the same leading axes, which the granularity does not
    know about; along those (and wherever scale and data agree) the block is 1, where the scale
    has one entry it is the whole axis, elsewhere it is PerBlock's block for that trailing axis.
    """
    trailing = granularity.block if isinstance(granularity, PerBlock) else ()
    out = []
    for i, (d, s) in enumerate(zip(data_shape, scale_shape_)):
        j = i - (len(data_shape) - len(trailing))
        if s == d:
            out.append(1)
        elif j >= 0 and -(-d // trailing[j]) == s:
            out.append(trailing[j])
        elif s == 1:
            out.append(max(d, 1))
        else:
            raise ValueError(f"scale: shape {tuple(scale_shape_)} does not tile data {tuple(data_shape)} "
                             f"with {granularity!r}")
    return tuple(out)


def quantize(x, fmt, granularity: Granularity, *, scale=None, margin: int | float = 0) -> QArray:
    """Quantize `x` to FP8.

    Args:
      x: float array (f32, bf16, f16), any shape (scalars and empty arrays work).
      fmt: jfp8.E4M3 or jfp8.E5M2 (or their dtype / name).
      granularity: PerTensor(), PerChannel(axis) or PerBlock(block_shape).
      scale: optional static scale (calibrated), broadcastable f32 of `scale_shape`; default is
        current scaling (this tensor's amax per block).
      margin: extra headroom in powers of two (scale * 2**margin).
    Returns: QArray with data = saturating RNE cast of x_f32 * (1 / scale) (the reciprocal
      rounded once, `jfp8.scaling.reciprocal`). f32 subnormal inputs (|x| < 2^-126) read as
      zero: XLA flushes them on CPU and GPU alike.
    """
    fmt = as_format(fmt)
    granularity = as_granularity(granularity)
    x = jnp.asarray(x) if not isinstance(x, np.ndarray) else jnp.asarray(x)
    if is_fp8_dtype(x.dtype):
        raise TypeError(f"x: already FP8 ({x.dtype}); expected a bf16/f16/f32 array to quantize")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x: expected a floating array (bf16/f16/f32), got {x.dtype}")
    expected = scale_shape(x.shape, granularity)
    if scale is None:
        scale = compute_scale(x, fmt, granularity, margin)
    else:
        scale = jnp.asarray(scale, jnp.float32)
        try:
            scale = jnp.broadcast_to(scale, expected)
        except ValueError:
            raise ValueError(f"scale: expected shape {expected} (or broadcastable) for x of shape "
                             f"{x.shape} with {granularity!r}, got {scale.shape}") from None
    data = cast(x.astype(jnp.float32) * expand_scale(reciprocal(scale), x.shape, granularity), fmt)
    return QArray(data=data, scale=scale, format=fmt, granularity=granularity)


def from_parts(data, scale, fmt=None, granularity: Granularity | None = None) -> QArray:
    """Wrap existing FP8 data and scales (e.g. from a checkpoint), checking shapes and dtypes."""
    data = jnp.asarray(data)
    if not is_fp8_dtype(data.dtype):
        raise TypeError(f"data: expected an FP8 array, got {data.dtype}")
    fmt = as_format(data.dtype if fmt is None else fmt)
    if data.dtype != fmt.dtype:
        raise TypeError(f"data: dtype {data.dtype} does not match format {fmt!r}")
    granularity = as_granularity(granularity)
    scale = jnp.asarray(scale, jnp.float32)
    expected = scale_shape(data.shape, granularity)
    if tuple(scale.shape) != expected:
        raise ValueError(f"scale: expected shape {expected} for data {tuple(data.shape)} with "
                         f"{granularity!r}, got {tuple(scale.shape)}")
    return QArray(data=data, scale=scale, format=fmt, granularity=granularity)
