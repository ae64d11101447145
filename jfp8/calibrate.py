"""Calibrated FP8 weight rounding: GPTQ / OBQ-style error feedback with fixed FP8 scales.

Round-to-nearest FP8 rounds each weight alone. For a linear layer y = x W^T the loss that matters
is the output error over real inputs, E||x (W - Q)^T||^2 = sum_rows (w - q) H (w - q)^T with
H = E[x^T x] (K, K), the input's second moment. GPTQ (Frantar et al. 2022, after OBQ) quantizes
the columns of W one by one and spreads each column's rounding error over the columns not yet
quantized, in the direction H says is cheapest:

    for k in 0..K-1:   q_k = fp8_round(w_k / s_k) * s_k
                       e = (w_k - q_k) / U[k, k]
                       w_j -= e * U[k, j]        for j > k      (U: upper Cholesky of H^-1)

The FP8 scales are fixed first from the original weights (amax / fmax per channel or block, the
same rule as `jfp8.quantize`), so the result is an ordinary `QArray` that the same kernels run;
an updated weight that outgrows its block's range saturates at ±fmax (the saturating cast).

    h = jfp8.calibrate.hessian(x)                          # x: (tokens, K) inputs of the layer
    q = jfp8.calibrate.gptq_quantize(w, h, jfp8.E4M3, jfp8.PerChannel(0))   # QArray (N, K)

Statistics and the Cholesky factor in numpy (float64), the column sweep jitted (one weight at a time; the layer's statistics come from a decoder in
`models.calibration`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jfp8.formats import Format, as_format
from jfp8.qarray import QArray, from_parts
from jfp8.scaling import Granularity, as_granularity, scale_from_amax, scale_shape

__all__ = ["hessian", "HessianAccumulator", "gptq_quantize", "gptq_quantize_group", "rtn_quantize",
           "output_error"]


def hessian(x) -> np.ndarray:
    """Second moment of a layer's inputs: x (..., K) -> H = X^T X / n, (K, K) float64."""
    x = np.asarray(x, np.float64)
    if x.ndim < 1:
        raise ValueError("x: expected inputs of shape (..., K), got a scalar")
    x = x.reshape(-1, x.shape[-1])
    if x.shape[0] == 0:
        raise ValueError("x: expected at least one input row, got 0")
    return x.T @ x / x.shape[0]


class HessianAccumulator:
    """Running H = E[x^T x] over batches of inputs (..., K), in float64."""

    def __init__(self, k: int):
        if int(k) < 1:
            raise ValueError(f"k: expected a positive input size, got {k}")
        self.sum = np.zeros((int(k), int(k)), np.float64)
        self.count = 0

    def add(self, x) -> None:
        x = np.asarray(x, np.float64).reshape(-1, self.sum.shape[0])
        self.sum += x.T @ x
        self.count += x.shape[0]

    @property
    def value(self) -> np.ndarray:
        if self.count == 0:
            raise ValueError("HessianAccumulator: no inputs added")
        return self.sum / self.count


def _round_fp8(v: np.ndarray, s: np.ndarray, fmt: Format) -> np.ndarray:
    """FP8 codes of v * (1 / s) (the reciprocal rounded once, as `jfp8.quantize` computes it),
    clipped to ±fmax, RNE (as `jfp8.cast`)."""
    r = v.astype(np.float32) * (np.float32(1) / s.astype(np.float32))
    return np.clip(r, -fmt.max, fmt.max).astype(fmt.dtype)


def _block_scale(w: np.ndarray, fmt: Format, granularity: Granularity) -> np.ndarray:
    """`jfp8.compute_scale` with the block amax taken in numpy (host arrays, no per-shape compile)."""
    block = granularity.block_shape(w.shape)
    a = np.abs(w.astype(np.float32))
    a = np.where(np.isfinite(a), a, 0.0)
    pads = [(0, (-d) % b) for d, b in zip(a.shape, block)]
    a = np.pad(a, pads)
    split = [x for d, b in zip(a.shape, block) for x in (d // b, b)]
    amax = a.reshape(split).max(axis=tuple(range(1, 2 * a.ndim, 2))).astype(np.float32)
    return np.asarray(scale_from_amax(amax, fmt), np.float32)  # the one scale rule


def _expand(scale: np.ndarray, shape, granularity: Granularity) -> np.ndarray:
    block = granularity.block_shape(shape)
    out = scale
    for axis, b in enumerate(block):
        out = np.repeat(out, b, axis=axis)
    return np.ascontiguousarray(out[tuple(slice(0, d) for d in shape)])


def _checked(w, h, fmt, granularity):
    fmt = as_format(fmt)
    granularity = as_granularity(granularity)
    w = np.asarray(w, np.float32)
    if w.ndim != 2:
        raise ValueError(f"w: expected a 2-D weight (N, K) = (out, in), got shape {w.shape}")
    if h is not None:
        h = np.asarray(h, np.float64)
        if h.shape != (w.shape[1], w.shape[1]):
            raise ValueError(f"h: expected ({w.shape[1]}, {w.shape[1]}) = (K, K) for w {w.shape}, "
                             f"got {h.shape}")
        if not np.all(np.isfinite(h)):
            raise ValueError("h: contains inf or NaN")
    if not np.all(np.isfinite(w)):
        raise ValueError("w: contains inf or NaN; calibrated rounding needs finite weights")
    return w, h, fmt, granularity


def rtn_quantize(w, fmt, granularity: Granularity, *, scale=None) -> QArray:
    """Round-to-nearest with the same fixed scales `gptq_quantize` uses (the baseline)."""
    w, _, fmt, granularity = _checked(w, None, fmt, granularity)
    scale = _block_scale(w, fmt, granularity) if scale is None else np.broadcast_to(
        np.asarray(scale, np.float32), scale_shape(w.shape, granularity))
    full = _expand(scale, w.shape, granularity)
    return from_parts(_round_fp8(w, full, fmt), scale, fmt, granularity)


def gptq_quantize(w, h, fmt, granularity: Granularity, *, damp: float = 0.01,
                  block_size: int = 128, act_order: bool = False, scale=None) -> QArray:
    """Hessian-aware FP8 rounding of one weight (GPTQ with fixed scales).

    Args:
      w: (N, K) = (out, in) float weight.
      h: (K, K) second moment of the layer's inputs (`hessian` / `HessianAccumulator`).
      fmt: FP8 format (jfp8.E4M3 / E5M2).
      granularity: PerTensor, PerChannel(0) or PerBlock((bn, bk)) over (N, K).
      damp: added to the diagonal, as a fraction of its mean (numerical safety of the inverse).
      block_size: columns updated eagerly before the lazy update of the rest (speed only).
      act_order: quantize columns in order of decreasing H diagonal (largest inputs first).
      scale: optional fixed scale of `scale_shape(w.shape, granularity)`; default amax / fmax
        of the original weights per block.
    Returns: QArray (N, K) with exactly `scale` and FP8 data; dequantize() gives the rounded
    weight. With H diagonal the result equals round-to-nearest.
    """
    return gptq_quantize_group([w], h, fmt, [granularity], damp=damp, block_size=block_size,
                               act_order=act_order, scales=[scale])[0]


def gptq_quantize_group(ws, h, fmt, granularities, *, damp: float = 0.01, block_size: int = 128,
                        act_order: bool = False, scales=None) -> list[QArray]:
    """`gptq_quantize` for several weights that read the same input (q/k/v, gate/up).

    GPTQ treats each output row on its own given H, so weights with one input share one
    factorization of H and run as one sweep over their stacked rows; each keeps its own
    granularity and scales. Returns one QArray per weight, in order.
    """
    if isinstance(granularities, (list, tuple)) and len(granularities) != len(ws):
        raise ValueError(f"granularities: expected {len(ws)} (one per weight), got {len(granularities)}")
    scales = [None] * len(ws) if scales is None else list(scales)
    parts = []
    for w, g, sc in zip(ws, granularities, scales):
        w, h_checked, fmt_, g = _checked(w, h, fmt, g)
        sc = _block_scale(w, fmt_, g) if sc is None else np.broadcast_to(
            np.asarray(sc, np.float32), scale_shape(w.shape, g))
        parts.append((w, g, sc, _expand(sc, w.shape, g)))
    h, fmt = h_checked, fmt_
    if damp < 0:
        raise ValueError(f"damp: expected >= 0, got {damp}")
    if int(block_size) < 1:
        raise ValueError(f"block_size: expected >= 1, got {block_size}")
    k = h.shape[0]
    w_all = np.concatenate([p[0] for p in parts], axis=0)
    s_all = np.concatenate([p[3] for p in parts], axis=0)

    h = h.copy()
    dead = np.diag(h) <= 0  # inputs that are always zero: their weights never matter
    h[dead, dead] = 1.0
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    U = _inverse_cholesky_upper(h[perm][:, perm])
    codes = np.asarray(_gptq_columns(jnp.asarray(w_all[:, perm]), jnp.asarray(s_all[:, perm]),
                                     jnp.asarray(U), fmt_name=fmt.name, block=int(block_size)))
    codes = codes[:, np.argsort(perm)].astype(fmt.dtype)
    out, row = [], 0
    for w, g, sc, _ in parts:
        out.append(from_parts(codes[row:row + w.shape[0]], sc, fmt, g))
        row += w.shape[0]
    return out


def _inverse_cholesky_upper(h: np.ndarray) -> np.ndarray:
    """U upper triangular with H^-1 = U^T U, f32; from one Cholesky of H with its index order
    reversed (P H P = L L^T gives U = P L^-1 P), so H^-1 itself is never formed."""
    import scipy.linalg

    rev = np.ascontiguousarray(h[::-1, ::-1])
    try:
        low = scipy.linalg.cholesky(rev, lower=True, check_finite=False)
    except np.linalg.LinAlgError:
        raise ValueError("h: not positive definite even after damping; raise `damp`") from None
    if not np.all(np.isfinite(low)):
        raise ValueError("h: not positive definite even after damping; raise `damp`")
    low_inv = scipy.linalg.solve_triangular(low, np.eye(len(h)), lower=True, check_finite=False)
    return np.ascontiguousarray(low_inv[::-1, ::-1]).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("fmt_name", "block"))
def _gptq_columns(W, S, U, *, fmt_name: str, block: int):
    """The GPTQ column sweep, jitted: W, S (N, K) f32 weights and per-element scales, U (K, K)
    upper Cholesky of H^-1. Returns the FP8 codes as f32 values (exact), (N, K).

    Columns go in blocks of `block`: inside a block each column's error updates the block's
    remaining columns at once (a rank-1 update); the columns after the block get the block's
    errors in one matmul (GPTQ's lazy batch update). K is padded to a multiple of `block` with
    zero weights and an identity tail of U, which quantize to 0 and feed back nothing.
    """
    fmt = as_format(fmt_name)
    n, k = W.shape
    kp = -(-k // block) * block
    pad = kp - k
    W = jnp.pad(W, ((0, 0), (0, pad)))
    S = jnp.pad(S, ((0, 0), (0, pad)), constant_values=1.0)
    U = jnp.pad(U, ((0, pad), (0, pad)))
    U = U + jnp.diag(jnp.concatenate([jnp.zeros(k), jnp.ones(pad)])).astype(U.dtype)
    idx = jnp.arange(block)
    cols = jnp.arange(kp)

    def round_col(w, s):
        return jnp.clip(w * (1.0 / s), -fmt.max, fmt.max).astype(fmt.dtype).astype(jnp.float32)

    def block_step(b, carry):
        W, C = carry
        i1 = b * block
        W1 = jax.lax.dynamic_slice(W, (0, i1), (n, block))
        S1 = jax.lax.dynamic_slice(S, (0, i1), (n, block))
        U1 = jax.lax.dynamic_slice(U, (i1, i1), (block, block))

        def col_step(i, carry):
            W1, C1, E1 = carry
            w = jax.lax.dynamic_index_in_dim(W1, i, axis=1, keepdims=False)
            s = jax.lax.dynamic_index_in_dim(S1, i, axis=1, keepdims=False)
            c = round_col(w, s)
            u = jax.lax.dynamic_index_in_dim(U1, i, axis=0, keepdims=False)
            err = (w - c * s) / u[i]
            W1 = W1 - jnp.outer(err, jnp.where(idx > i, u, 0.0))
            C1 = jax.lax.dynamic_update_index_in_dim(C1, c, i, axis=1)
            E1 = jax.lax.dynamic_update_index_in_dim(E1, err, i, axis=1)
            return W1, C1, E1

        zeros = jnp.zeros((n, block), jnp.float32)
        _, C1, E1 = jax.lax.fori_loop(0, block, col_step, (W1, zeros, zeros))
        rows = jax.lax.dynamic_slice(U, (i1, 0), (block, kp))
        rows = jnp.where(cols[None, :] >= i1 + block, rows, 0.0)
        W = W - E1 @ rows
        C = jax.lax.dynamic_update_slice(C, C1, (0, i1))
        return W, C

    _, C = jax.lax.fori_loop(0, kp // block, block_step, (W, jnp.zeros((n, kp), jnp.float32)))
    return C[:, :k]


def output_error(w, q, h) -> float:
    """Relative output error of a rounded weight: tr((W-Q) H (W-Q)^T) / tr(W H W^T)."""
    w = np.asarray(w, np.float64)
    qd = np.asarray(q.dequantize(jnp.float32) if isinstance(q, QArray) else q, np.float64)
    h = np.asarray(h, np.float64)
    d = w - qd
    return float(np.einsum("nk,kl,nl->", d, h, d) / np.einsum("nk,kl,nl->", w, h, w))
