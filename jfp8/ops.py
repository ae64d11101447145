"""Backend dispatch and the FP8 matmul.

    jfp8.set_backend("auto" | "xla" | "pallas" | "interpret")
    with jfp8.use_backend("interpret"): ...
    y = jfp8.matmul(x, wq)                      # x (..., K) bf16 or QArray; wq QArray (N, K)
    y = jfp8.matmul(h, wq, prologue=jfp8.RMSNorm(w, eps))   # the norm fused where a kernel can
    y = jfp8.matmul(a, wq, residual=h)          # h + a · wᵀ, the add in the kernel's epilogue

Backends: "xla" runs plain XLA (dequantize + f32 dot, or XLA's FP8 dot_general on a GPU for
per-tensor scales); "pallas" runs the Pallas kernels compiled for the GPU; "interpret" runs the
same Pallas kernels with interpret=True (CPU tests); "auto" resolves to "pallas" on a Hopper GPU
and "xla" elsewhere. The backend is read at trace time: a jitted function keeps the backend it
was traced with.

Numerics contract, every backend: y = Σ_k (x_q·x_scale)(w_q·w_scale) accumulated in f32 (the
kernels promote the f32 partial per 128-K block), plus bias, cast to out_dtype once (then a
residual added in f32 and cast again, as XLA adds two arrays). Backends
differ only by f32 summation order and (on the GPU's FP8 tensor cores) the 128-K promotion.
"""
from __future__ import annotations

import contextlib
import functools
import threading

import jax
import jax.numpy as jnp

from jfp8.pending import PendingSum, materialize
from jfp8.prologue import RMSNorm, SwiGLU
from jfp8.qarray import QArray, quantize
from jfp8.recipe import Recipe
from jfp8.scaling import PerChannel, PerTensor
from pallas_kernels.fp8_gemv import add_residual

BACKENDS = ("auto", "xla", "pallas", "interpret")
_state = threading.local()


def set_backend(name: str) -> None:
    """Set the process-wide default backend ("auto", "xla", "pallas", "interpret")."""
    if name not in BACKENDS:
        raise ValueError(f"name: expected one of {BACKENDS}, got {name!r}")
    global _default_backend
    _default_backend = name


_default_backend = "auto"


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager: use `name` for ops traced inside the block (this thread only)."""
    if name not in BACKENDS:
        raise ValueError(f"name: expected one of {BACKENDS}, got {name!r}")
    previous = getattr(_state, "backend", None)
    _state.backend = name
    try:
        yield
    finally:
        _state.backend = previous


@functools.cache
def is_hopper_gpu() -> bool:
    """True when JAX's default device is an NVIDIA GPU of compute capability 9.x."""
    try:
        device = jax.devices()[0]
    except RuntimeError:
        return False
    if device.platform != "gpu":
        return False
    capability = getattr(device, "compute_capability", "")
    return str(capability).startswith("9")


def get_backend() -> str:
    """The backend ops use now, resolved: "xla", "pallas" or "interpret"."""
    name = getattr(_state, "backend", None) or _default_backend
    if name == "auto":
        return "pallas" if is_hopper_gpu() else "xla"
    return name


# ---------------------------------------------------------------------------------------------
# matmul

def default_act_recipe(wq: QArray) -> Recipe:
    """The activation quantization that pairs with a weight's granularity."""
    g = wq.granularity
    if isinstance(g, PerTensor):
        return Recipe.per_tensor(weight_format=wq.format)
    if isinstance(g, PerChannel):
        return Recipe.rowwise(weight_format=wq.format)
    return Recipe.block128(weight_format=wq.format)


def _check_weight(wq) -> None:
    if not isinstance(wq, QArray):
        raise TypeError(f"wq: expected a jfp8.QArray of shape (N, K), got {type(wq).__name__}")
    if wq.ndim != 2:
        raise ValueError(f"wq: expected a 2-D (N, K) QArray, got shape {wq.shape}")
    if isinstance(wq.granularity, PerChannel) and wq.granularity.axis % 2 != 0:
        raise ValueError("wq: per-channel weights must be scaled along axis 0 (N, output channels)")


def matmul(x, wq: QArray, *, bias=None, out_dtype=jnp.bfloat16, recipe: Recipe | None = None,
           prologue: RMSNorm | SwiGLU | None = None, residual=None, defer_sum: bool = False):
    """y = P(x) · wᵀ with FP8 weights (and FP8 activations unless the recipe is weights-only).

    Args:
      x: (..., K) bf16/f16/f32 array, quantized on the fly per `recipe`'s activation settings, or a
        QArray of shape (M, K) already quantized.
      wq: QArray (N, K), (out, in), K-major.
      bias: optional (N,) array, added in f32 before the output cast.
      out_dtype: output dtype (bf16 default, or f32).
      recipe: activation quantization; default pairs with wq's granularity (per-tensor with
        per-tensor, per-token with per-channel, 1×128 with 128×128). A weights-only recipe keeps x
        in high precision (W8A16).
      prologue: optional `jfp8.RMSNorm` / `jfp8.SwiGLU` (jfp8.prologue) applied to x first, fused
        into the decode kernel where that measured faster (W8A16, M == 1:
        `jfp8._matmul_pallas.FUSED_PROLOGUES`), in XLA otherwise. With SwiGLU x is (..., 2K) = [gate | up].
      residual: optional (..., N) float array added to y as XLA adds two arrays (y rounded to
        out_dtype, plus residual in f32, rounded to out_dtype): a transformer's skip connection,
        added by the decode kernel in its epilogue where it writes y itself (one launch fewer).
        A `jfp8.PendingSum` is summed first.
      defer_sum: where the Pallas decode kernel splits K and the sum (then the cast and the
        residual) is all that follows, return a `jfp8.PendingSum` (`jfp8.pending`) for the next
        matmul's RMSNorm to sum (`jfp8._matmul_pallas.DEFER_SPLIT_K_SUMS` switches this on).
        x may be a PendingSum too: summed by the RMSNorm prologue's staging kernel where it runs
        (`pallas_kernels.prologue_stage.sum_rms_norm_stage_f16`), by XLA otherwise.
    Returns: (..., N) array of out_dtype, or a `jfp8.PendingSum` of that shape (defer_sum).
    """
    _check_weight(wq)
    residual = materialize(residual)
    if isinstance(x, PendingSum) and not (isinstance(prologue, RMSNorm)
                                          and get_backend() in ("pallas", "interpret")):
        x = x.materialize()     # only the norm-staging kernel sums partials as it loads them
    n, k = wq.shape
    if prologue is not None and not isinstance(prologue, (RMSNorm, SwiGLU)):
        raise TypeError(f"prologue: expected jfp8.RMSNorm, jfp8.SwiGLU or None, got {prologue!r}")
    if prologue is not None and isinstance(x, QArray):
        raise TypeError("x: a prologue needs a high-precision x, got a QArray")
    k_in = k if prologue is None else prologue.in_features(k)
    if isinstance(x, (QArray, PendingSum)):
        if isinstance(x, QArray) and x.ndim != 2:
            raise ValueError(f"x: expected a 2-D (M, K) QArray, got shape {x.shape}")
        lead, xk = x.shape[:-1], x.shape[-1]
    else:
        x = jnp.asarray(x)
        if x.ndim < 1 or not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"x: expected a float array (..., K), got {x.dtype} of shape {x.shape}")
        lead, xk = x.shape[:-1], x.shape[-1]
    if xk != k_in:
        want = f"K={k}" if prologue is None else f"{k_in} ({type(prologue).__name__} of K={k})"
        raise ValueError(f"x: expected last dim {want} to match wq (N, K)={wq.shape}, got {xk}")
    if bias is not None:
        bias = jnp.asarray(bias)
        if bias.shape != (n,):
            raise ValueError(f"bias: expected shape ({n},), got {bias.shape}")
    if residual is not None:
        residual = jnp.asarray(residual)
        if residual.shape != (*lead, n) or not jnp.issubdtype(residual.dtype, jnp.floating):
            raise ValueError(f"residual: expected a float array of the output's shape "
                             f"{(*lead, n)}, got {residual.dtype} {residual.shape}")
        residual = residual.reshape(-1, n)
    recipe = default_act_recipe(wq) if recipe is None else recipe

    x2 = x if isinstance(x, QArray) else x.reshape(-1, k_in)
    backend = get_backend()
    if backend in ("pallas", "interpret"):
        from jfp8 import _matmul_pallas  # the kernels' wiring; imported only when used
        y = _matmul_pallas.matmul(x2, wq, bias=bias, out_dtype=out_dtype, recipe=recipe,
                                  prologue=prologue, residual=residual, defer_sum=defer_sum,
                                  interpret=backend == "interpret")
    else:
        x2 = x2 if prologue is None else prologue(x2)
        y = add_residual(_matmul_xla(x2, wq, bias=bias, out_dtype=out_dtype, recipe=recipe),
                         residual)
    return y.reshape(*lead, n)


def quantize_activations(x2, recipe: Recipe):
    """(M, K) activations -> QArray per the recipe, or x itself for weights-only recipes."""
    if isinstance(x2, QArray) or recipe.act_format is None:
        return x2
    return quantize(x2, recipe.act_format, recipe.act_granularity)


def _matmul_xla(x2, wq: QArray, *, bias, out_dtype, recipe: Recipe):
    xq = quantize_activations(x2, recipe)
    on_gpu = jax.devices()[0].platform == "gpu"
    if (on_gpu and isinstance(xq, QArray) and isinstance(xq.granularity, PerTensor)
            and isinstance(wq.granularity, PerTensor)):
        # XLA's own FP8 GEMM (cuBLASLt): fp8 operands, f32 accumulation, scales applied after.
        acc = jax.lax.dot_general(xq.data, wq.data, (((1,), (1,)), ((), ())),
                                  preferred_element_type=jnp.float32)
        acc = acc * (xq.scale.reshape(()) * wq.scale.reshape(()))
    else:
        xf = xq.dequantize(jnp.float32) if isinstance(xq, QArray) else xq.astype(jnp.float32)
        wf = wq.dequantize(jnp.float32)
        acc = jax.lax.dot_general(xf, wf, (((1,), (1,)), ((), ())),
                                  precision=jax.lax.Precision.HIGHEST,
                                  preferred_element_type=jnp.float32)
    if bias is not None:
        acc = acc + bias.astype(jnp.float32)
    return acc.astype(out_dtype)
