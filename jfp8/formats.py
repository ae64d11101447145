"""FP8 formats as data, and the saturating round-to-nearest-even cast into them.

A `Format` describes one 8-bit float encoding. Every figure (max, smallest normal and subnormal,
bias) is derived from `ml_dtypes.finfo`, not typed in; tests cross-check them against an
independent bit-level decoder of all 256 codes.

    E4M3  float8_e4m3fn  1-4-3, bias 7,  max 448,   no inf, NaN = S.1111.111
    E5M2  float8_e5m2    1-5-2, bias 15, max 57344, IEEE inf and NaN

The FNUZ variants (AMD MI300: no negative zero, NaN = 0x80, bias one larger) are provided as data;
no kernel targets them.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import ml_dtypes
import numpy as np


@dataclasses.dataclass(frozen=True)
class Format:
    """An 8-bit (or wider, for the formats table) floating-point encoding.

    Attributes:
      name: short name, e.g. "e4m3".
      dtype: the numpy/JAX dtype (an ml_dtypes type for FP8).
      exponent_bits, mantissa_bits: field widths (sign is always one bit).
      bias: exponent bias.
      max: largest finite value.
      smallest_normal: 2 ** (1 - bias) for IEEE-like formats.
      smallest_subnormal: smallest positive value.
      has_inf: whether the encoding has infinities.
    """

    name: str
    dtype: np.dtype
    exponent_bits: int
    mantissa_bits: int
    bias: int
    max: float
    smallest_normal: float
    smallest_subnormal: float
    has_inf: bool

    @classmethod
    def from_dtype(cls, name: str, dtype) -> "Format":
        dtype = np.dtype(dtype)
        info = ml_dtypes.finfo(dtype)
        exponent_bits = int(info.nexp)
        mantissa_bits = int(info.nmant)
        # minexp = 1 - bias for every format here (IEEE-like and FNUZ alike).
        bias = 1 - int(info.minexp)
        with np.errstate(over="ignore", invalid="ignore"):
            has_inf = bool(np.isinf(np.array(np.inf, np.float32).astype(dtype)))
        return cls(
            name=name,
            dtype=dtype,
            exponent_bits=exponent_bits,
            mantissa_bits=mantissa_bits,
            bias=bias,
            max=float(info.max),
            smallest_normal=float(info.smallest_normal),
            smallest_subnormal=float(info.smallest_subnormal),
            has_inf=has_inf,
        )

    @property
    def bits(self) -> int:
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def relative_precision(self) -> float:
        """Half an ulp relative to the value: the worst relative rounding error of a normal."""
        return 2.0 ** -(self.mantissa_bits + 1)

    def __repr__(self) -> str:
        return f"jfp8.{self.name.upper()}"


E4M3 = Format.from_dtype("e4m3", ml_dtypes.float8_e4m3fn)
E5M2 = Format.from_dtype("e5m2", ml_dtypes.float8_e5m2)
E4M3FNUZ = Format.from_dtype("e4m3fnuz", ml_dtypes.float8_e4m3fnuz)
E5M2FNUZ = Format.from_dtype("e5m2fnuz", ml_dtypes.float8_e5m2fnuz)
FP8_FORMATS = (E4M3, E5M2, E4M3FNUZ, E5M2FNUZ)

# Wider formats, for the formats table in `jfp8 demo`.
FP32 = Format.from_dtype("fp32", np.float32)
FP16 = Format.from_dtype("fp16", np.float16)
BF16 = Format.from_dtype("bf16", ml_dtypes.bfloat16)


def as_format(fmt) -> Format:
    """Accept a Format, an FP8 dtype, or a name ("e4m3", "e5m2", ...); return the Format."""
    if isinstance(fmt, Format):
        return fmt
    if isinstance(fmt, str):
        for f in FP8_FORMATS:
            if fmt.lower() in (f.name, f.dtype.name):
                return f
        raise ValueError(f"fmt: expected one of {[f.name for f in FP8_FORMATS]}, got {fmt!r}")
    try:
        dtype = np.dtype(fmt)
    except TypeError:
        raise TypeError(f"fmt: expected a jfp8.Format, an FP8 dtype or a name, got {fmt!r}") from None
    for f in FP8_FORMATS:
        if f.dtype == dtype:
            return f
    raise ValueError(f"fmt: expected an FP8 dtype, got {dtype}")


def is_fp8_dtype(dtype) -> bool:
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        return False
    return any(f.dtype == dtype for f in FP8_FORMATS)


def cast(x, fmt, *, saturate: bool = True):
    """Cast a float array to FP8 with round-to-nearest-even.

    Args:
      x: float array of any shape (f32, bf16, f16, f64).
      fmt: target Format (or dtype / name).
      saturate: if True (default), finite values past ±fmt.max and ±inf become ±fmt.max, the
        behaviour scaling recipes want. If False, the raw ml_dtypes behaviour: values that round
        past max become NaN in E4M3 (it has no inf) and inf in E5M2.
    NaN stays NaN either way. Returns an array of `fmt.dtype` with x's shape.
    """
    fmt = as_format(fmt)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating) or is_fp8_dtype(x.dtype):
        raise TypeError(f"x: expected a bf16/f16/f32/f64 array, got {x.dtype}")
    if saturate:
        # Clip before the cast; jnp.clip keeps NaN. Clipping at max is exact: any value in
        # (max, max + ulp/2) rounds to max anyway under RNE.
        x = jnp.clip(x, -fmt.max, fmt.max)
    elif x.dtype != jnp.float32 and x.dtype != jnp.float64:
        # One rounding, from an exact f32 copy (bf16/f16 widen exactly).
        x = x.astype(jnp.float32)
    return x.astype(fmt.dtype)
