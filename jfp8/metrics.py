"""Quantization error as data: what a format and granularity cost on a given tensor."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jfp8.formats import as_format
from jfp8.qarray import quantize
from jfp8.scaling import Granularity, expand_scale


@dataclasses.dataclass(frozen=True)
class QuantizationError:
    """Error of quantize → dequantize on one tensor (all figures over finite entries).

    Attributes:
      mean_rel_error: mean |x̂ - x| / |x| over nonzero entries.
      max_abs_error: max |x̂ - x|.
      sqnr_db: 10 log10(Σx² / Σ(x̂ - x)²).
      frac_clipped: fraction of entries whose |x| / scale exceeds fmax (saturated).
      frac_flushed: fraction of nonzero entries that became 0.
    """

    mean_rel_error: float
    max_abs_error: float
    sqnr_db: float
    frac_clipped: float
    frac_flushed: float


def quantization_error(x, fmt, granularity: Granularity, *, scale=None) -> QuantizationError:
    """Quantize `x` (any float array) with `fmt` and `granularity` and measure the error in f64."""
    fmt = as_format(fmt)
    q = quantize(x, fmt, granularity, scale=scale)
    x64 = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    xhat = np.asarray(q.dequantize(jnp.float32), np.float64)
    finite = np.isfinite(x64)
    x64, xhat_f = x64[finite], xhat[finite]
    err = np.abs(xhat_f - x64)
    nonzero = x64 != 0
    mean_rel = float(np.mean(err[nonzero] / np.abs(x64[nonzero]))) if nonzero.any() else 0.0
    signal, noise = float(np.sum(x64 ** 2)), float(np.sum(err ** 2))
    sqnr = float("inf") if noise == 0 else (float(10 * np.log10(signal / noise)) if signal > 0 else float("-inf"))
    full_scale = np.asarray(expand_scale(q.scale, q.shape, granularity), np.float64)[finite] \
        if q.ndim else np.asarray(q.scale, np.float64).reshape(1)
    n = max(x64.size, 1)
    return QuantizationError(
        mean_rel_error=mean_rel,
        max_abs_error=float(err.max()) if err.size else 0.0,
        sqnr_db=sqnr,
        frac_clipped=float(np.sum(np.abs(x64) / full_scale > fmt.max)) / n,
        frac_flushed=float(np.sum(nonzero & (xhat_f == 0))) / max(int(nonzero.sum()), 1),
    )
