"""PendingSum: a decode matmul's output left as split-K partials, for the next kernel to sum.

    h = jfp8.matmul(x, wq_o, residual=h, defer_sum=True)    # PendingSum, or an array
    y = jfp8.matmul(h, wq_gate_up, prologue=jfp8.RMSNorm(w, eps))   # sums h as it normalises it
    h_array = jfp8.materialize(h)                                    # anything else

At decode batch sizes the FP8 GEMV splits K across programs and XLA sums the f32 partials (then
the cast and the skip connection) in a fusion of its own, ~1.5-2 µs a launch inside an 8B decode
step at B = 16 (results/profile_decode_h200_r14_sums.log). With `defer_sum=True` the matmul
returns the partials unsummed where that is its whole epilogue, and a consumer that loads its
input anyway sums them on the way: the RMSNorm + f16 staging kernel before the next W8A16 matmul
(`pallas_kernels.prologue_stage.sum_rms_norm_stage_f16`), which also writes the summed value out
for the consumers after it. Every other consumer calls `materialize`, XLA's sum.

The value is `fp8_gemv.sum_split_k(parts, m, dtype, residual, row_scale=...)`: the partials added
in split order (a left fold, which the kernels follow too, so every consumer sees the same bits),
times the rows' activation scales where the matmul took staged f16 rows, rounded to dtype, plus
the residual in f32, rounded. A PendingSum lives inside one trace (a jit, a decode
loop's body): it is not a pytree and cannot cross a jit boundary; `materialize` caches its value,
so a value summed once (by XLA or by a kernel, `provide`) is not summed again.

Public: `PendingSum`, `materialize`.
"""
from __future__ import annotations

import math

import jax.numpy as jnp

from pallas_kernels.fp8_gemv import SplitKParts, sum_split_k


class PendingSum:
    """y (shape, dtype) = sum_split_k(parts, m, dtype, residual), not yet computed.

    Attributes:
      parts: `pallas_kernels.fp8_gemv.SplitKParts` (f32 (S, m_pad, N) partials, m valid rows).
      dtype: the output dtype (what the matmul would have returned).
      residual: None, an (m, N) array, or a PendingSum of that shape, added after the cast.
      shape: the output's logical shape (..., N), its leading dims multiplying to m.
    """

    def __init__(self, parts: SplitKParts, dtype, residual=None, shape=None):
        _, _, n = parts.parts.shape
        self.parts = parts
        self.dtype = jnp.dtype(dtype)
        self.residual = residual
        self.shape = tuple(shape) if shape is not None else (parts.m, n)
        if math.prod(self.shape[:-1]) != parts.m or self.shape[-1] != n:
            raise ValueError(f"shape: expected (..., {n}) with leading dims multiplying to "
                             f"m={parts.m}, got {self.shape}")
        self._cell = [None]    # the (m, N) value once summed, shared with every reshaped view

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def reshape(self, *shape) -> "PendingSum":
        """The same pending value seen with another logical shape (the same rows)."""
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        out = PendingSum(self.parts, self.dtype, self.residual,
                         _resolve(tuple(shape), self.parts.m * self.shape[-1]))
        out._cell = self._cell
        return out

    def rows(self):
        """The residual as an (m, N) array (materialized where it is itself pending)."""
        r = materialize(self.residual)
        return None if r is None else r.reshape(self.parts.m, self.shape[-1])

    def provide(self, value) -> None:
        """Record the value (shape, dtype) a kernel computed from the partials, summing them in
        the same order, so `materialize` returns it instead of summing again."""
        value = jnp.asarray(value)
        if value.size != math.prod(self.shape) or value.dtype != self.dtype:
            raise ValueError(f"value: expected {self.shape} {self.dtype}, got {value.shape} "
                             f"{value.dtype}")
        self._cell[0] = value.reshape(self.parts.m, self.shape[-1])

    @property
    def summed(self) -> bool:
        """Whether the value is known (summed by XLA or provided by a kernel)."""
        return self._cell[0] is not None

    def materialize(self):
        """The value as an array (XLA's sum, once for this value and all its views)."""
        if self._cell[0] is None:
            self._cell[0] = sum_split_k(self.parts.parts, self.parts.m, self.dtype, self.rows(),
                                        row_scale=self.parts.row_scale)
        return self._cell[0].reshape(self.shape)

    def __repr__(self) -> str:
        return (f"PendingSum(shape={self.shape}, dtype={self.dtype}, splits="
                f"{self.parts.parts.shape[0]}, residual={self.residual is not None})")


def materialize(x):
    """x as an array: a PendingSum's value (`PendingSum.materialize`), anything else unchanged."""
    return x.materialize() if isinstance(x, PendingSum) else x


def _resolve(shape: tuple, size: int) -> tuple:
    """A reshape's target with at most one -1 resolved against `size` elements."""
    if shape.count(-1) > 1:
        raise ValueError(f"shape: at most one -1, got {shape}")
    if -1 in shape:
        known = math.prod(d for d in shape if d != -1)
        shape = tuple(size // known if d == -1 else d for d in shape)
    if math.prod(shape) != size:
        raise ValueError(f"shape: cannot view {size} elements as {shape}")
    return shape
