"""FP8 training matmuls: E4M3 forward, E5M2 gradients, through `jax.custom_vjp`.

    y = fp8_dot_general(x, w, dimension_numbers)               # current scaling, stateless
    y = fp8_dot_general(x, w, dn, meta=meta, recipe=Recipe.delayed())   # delayed scaling

Forward:  y   = (x_q · w_q) * (s_x s_w)        x_q, w_q E4M3, one scale per tensor, f32 accumulate
Backward: dx  = (g_q · w_qᵀ) * (s_g s_w)       g_q = E5M2(g / s_g): the gradient keeps range
          dw  = (x_qᵀ · g_q) * (s_x s_g)       master weights and their gradient stay f32

These are the TransformerEngine / Flax `fp8_ops` numerics: every GEMM of the step runs on FP8
operands with f32 accumulation (XLA lowers an FP8 dot_general with per-tensor scales to cuBLASLt's
FP8 GEMM on Hopper). The backward reuses the forward's quantized operands, which is exact for
per-tensor scales (a transpose does not change a per-tensor scale).

Scales, one per tensor (x, w, g):
  current  each call's own amax (scale = amax / fmax), nothing to carry between steps.
  delayed  the scale comes from an amax history of earlier steps (TransformerEngine's recipe):
           `meta` holds, for x, w and g, an amax history (L,) and the scale to use (). The cast
           needs no reduction over the current tensor first. The step's amaxes are pushed into
           the history and the next scales derived (`jfp8.delayed_scaling_update`). A tensor whose
           history is still all zero (the first step) uses current scaling for that step, so the
           first gradients do not underflow at scale 1.

The new `meta` comes back as the *gradient* of `meta` ("overwrite with gradient", as in Flax's
fp8_ops): take `grads["fp8_meta"]` as the next state, never feed it to an optimizer. A layer
that is called more than once per differentiated step gets its meta cotangents summed, which is
wrong: call each FP8 layer once per step (separate layers, or `nn.scan` with its own meta axis).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jfp8.formats import E4M3, E5M2, Format, as_format, cast
from jfp8.recipe import Recipe
from jfp8.scaling import DelayedScalingState, delayed_scaling_update, reciprocal, scale_from_amax

META_COLLECTION = "fp8_meta"
# The three tensors whose scales a training matmul keeps: input, kernel (weights), output grad.
META_TENSORS = ("input", "kernel", "grad")

Meta = dict  # {"input_amax_history": (L,), "input_scale": (), "kernel_...", "grad_..."} f32

# Tuning knobs read when a layer is traced (benchmarks/train_step.py compares them on the H100).
GEMM_STYLE = "out"        # how scales attach to the FP8 GEMMs: "out", "f32" or "qdq" (`_gemm`)
FIRST_STEP = "current"    # empty history: "current" / "select" (own amax) or "unit" (scale 1)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Static settings of one training matmul (hashable, so it can be a nondiff argument).

    Attributes:
      fwd_format: format of x and w in the forward (E4M3).
      grad_format: format of the output gradient in the backward (E5M2).
      margin: delayed-scaling headroom in powers of two.
      algorithm: delayed-scaling amax reduction over the history ("max" or "most_recent").
      out_dtype: dtype of y (name string, so the config hashes).
      gemm: how scales attach to the FP8 GEMMs ("out", "f32", "qdq"; see `_gemm`).
      first_step: scale of a tensor whose history is all zero: "current" (its own amax, chosen
        by `lax.cond`), "select" (the same through `jnp.where`) or "unit" (scale 1,
        TransformerEngine's behaviour; no data dependency at all).
    """

    fwd_format: Format = E4M3
    grad_format: Format = E5M2
    margin: int = 0
    algorithm: str = "max"
    out_dtype: str = "float32"
    gemm: str = "out"
    first_step: str = "current"

    def __post_init__(self):
        if self.gemm not in ("out", "f32", "qdq"):
            raise ValueError(f"gemm: expected 'out', 'f32' or 'qdq', got {self.gemm!r}")
        if self.first_step not in ("current", "select", "unit"):
            raise ValueError(f"first_step: expected 'current', 'select' or 'unit', got {self.first_step!r}")
        if self.algorithm not in ("max", "most_recent"):
            raise ValueError(f"algorithm: expected 'max' or 'most_recent', got {self.algorithm!r}")

    @classmethod
    def from_recipe(cls, recipe: Recipe, out_dtype) -> "TrainConfig":
        fwd = recipe.act_format if recipe.act_format is not None else recipe.weight_format
        return cls(fwd_format=as_format(fwd), grad_format=as_format(recipe.grad_format),
                   margin=int(recipe.margin), out_dtype=jnp.dtype(out_dtype).name,
                   gemm=GEMM_STYLE, first_step=FIRST_STEP)


def init_meta(history: int) -> Meta:
    """Fresh delayed-scaling state for one matmul: zero histories, unit scales."""
    if int(history) < 1:
        raise ValueError(f"history: expected >= 1, got {history}")
    meta = {}
    for t in META_TENSORS:
        meta[f"{t}_amax_history"] = jnp.zeros((int(history),), jnp.float32)
        meta[f"{t}_scale"] = jnp.ones((), jnp.float32)
    return meta


def _check_meta(meta) -> None:
    missing = [f"{t}_{k}" for t in META_TENSORS for k in ("amax_history", "scale")
               if f"{t}_{k}" not in meta]
    if missing:
        raise ValueError(f"meta: missing {missing}; build it with jfp8.nn.init_meta(history)")


def _amax(x) -> jax.Array:
    """max |x| over finite entries, f32 scalar (non-finite entries only saturate in the cast)."""
    a = jnp.abs(x.astype(jnp.float32))
    return jnp.max(jnp.where(jnp.isfinite(a), a, 0.0)) if a.size else jnp.zeros((), jnp.float32)


def _scale_for(x, fmt: Format, cfg: TrainConfig, meta, name: str):
    """The scale for tensor `name` (delayed if meta is given, else current) and x's amax."""
    amax = _amax(x)
    if meta is None:
        return scale_from_amax(amax, fmt, 0), amax
    history = meta[f"{name}_amax_history"]
    delayed = meta[f"{name}_scale"].astype(jnp.float32).reshape(())
    # The first step has no history: use this tensor's own amax instead of scale 1. `cond`
    # keeps the steady state free of a dependency on this step's reduction.
    if cfg.first_step == "unit":
        return delayed, amax
    if cfg.first_step == "select":  # branch-free, but the cast then waits for this amax
        return jnp.where(jnp.max(history) > 0, delayed, scale_from_amax(amax, fmt, cfg.margin)), amax
    scale = lax.cond(jnp.max(history) > 0, lambda: delayed,
                     lambda: scale_from_amax(amax, fmt, cfg.margin))
    return scale, amax


def _update(meta, name: str, amax, fmt: Format, cfg: TrainConfig) -> dict:
    state = DelayedScalingState(amax_history=meta[f"{name}_amax_history"],
                                scale=meta[f"{name}_scale"].astype(jnp.float32).reshape(()))
    new = delayed_scaling_update(state, amax, fmt, margin=cfg.margin, algorithm=cfg.algorithm)
    return {f"{name}_amax_history": new.amax_history.astype(meta[f"{name}_amax_history"].dtype),
            f"{name}_scale": new.scale.reshape(meta[f"{name}_scale"].shape)
            .astype(meta[f"{name}_scale"].dtype)}


# -- dot_general transposes on FP8 operands (the rules of lax.dot_general's own transpose) -------

def _remaining(original, *removed_lists):
    removed = set(int(i) for lst in removed_lists for i in lst)
    return [i for i in original if i not in removed]


def _ranges_like(*xs):
    start = 0
    for x in xs:
        yield tuple(range(start, start + len(x)))
        start += len(x)


def _transpose_lhs(g, s_g, x_ndim: int, y, s_y, dimension_numbers, out_dtype, cfg,
                   swap_ans: bool = False):
    """d lhs of dot_general(x, y, dn) given the output cotangent g: g · y contracted back."""
    (x_contract, y_contract), (x_batch, y_batch) = dimension_numbers
    x_kept = _remaining(range(x_ndim), x_contract, x_batch)
    y_kept = _remaining(range(y.ndim), y_contract, y_batch)
    if swap_ans:
        ans_batch, ans_y, _ = _ranges_like(x_batch, y_kept, x_kept)
    else:
        ans_batch, _, ans_y = _ranges_like(x_batch, x_kept, y_kept)
    dims = ((ans_y, tuple(y_kept)), (ans_batch, tuple(y_batch)))
    x_contract_sorted_by_y = list(np.take(np.asarray(x_contract, int), np.argsort(y_contract)))
    out_axes = tuple(int(a) for a in np.argsort(list(x_batch) + x_kept + x_contract_sorted_by_y))
    out = _gemm(g, s_g, y, s_y, dims, out_dtype, cfg)
    return out if out_axes == tuple(range(len(out_axes))) else lax.transpose(out, out_axes)


def _transpose_rhs(g, s_g, x, s_x, y_ndim: int, dimension_numbers, out_dtype, cfg):
    (x_contract, y_contract), (x_batch, y_batch) = dimension_numbers
    swapped = ((y_contract, x_contract), (y_batch, x_batch))
    return _transpose_lhs(g, s_g, y_ndim, x, s_x, swapped, out_dtype, cfg, swap_ans=True)


def _normalize_dn(dimension_numbers, lhs_ndim, rhs_ndim):
    (lc, rc), (lb, rb) = dimension_numbers
    norm = lambda axes, nd: tuple(int(a) % nd for a in axes)
    return ((norm(lc, lhs_ndim), norm(rc, rhs_ndim)), (norm(lb, lhs_ndim), norm(rb, rhs_ndim)))


# -- the custom_vjp ------------------------------------------------------------------------------

def _gemm(a_q, s_a, b_q, s_b, dims, out_dtype, cfg: TrainConfig):
    """(a_q s_a) · (b_q s_b) over `dims` with FP8 operands, f32 accumulation, in `out_dtype`.

    How the scales are attached is what XLA's GEMM rewriter sees (cuBLASLt FP8 on Hopper):
      "f32"  FP8 dot to f32, times s_a s_b, cast (the f32 product is materialised if XLA does not
             fold the epilogue);
      "out"  FP8 dot straight to out_dtype (cuBLASLt accumulates in f32 either way), then the
             scale in out_dtype: half the bytes of "f32" for a bf16 output;
      "qdq"  dequantize (convert × scale) then dot, the pattern XLA rewrites into an FP8 GEMM
             with the scales as cuBLASLt operands.
    """
    out_dtype = jnp.dtype(out_dtype)
    if cfg.gemm == "qdq":
        deq = lambda q, s: q.astype(out_dtype) * s.astype(out_dtype)
        return lax.dot_general(deq(a_q, s_a), deq(b_q, s_b), dims, preferred_element_type=out_dtype)
    if cfg.gemm == "out":
        acc = lax.dot_general(a_q, b_q, dims, preferred_element_type=out_dtype)
        return (acc * (s_a * s_b).astype(out_dtype)).astype(out_dtype)
    acc = lax.dot_general(a_q, b_q, dims, preferred_element_type=jnp.float32)
    return (acc * (s_a * s_b)).astype(out_dtype)


_DENSE_DN = (((1,), (0,)), ((), ()))  # x (M, K) · w (K, N): the Flax Dense layout


def _forward(lhs, rhs, meta, dn, cfg: TrainConfig):
    fmt = cfg.fwd_format
    s_x, amax_x = _scale_for(lhs, fmt, cfg, meta, "input")
    s_w, amax_w = _scale_for(rhs, fmt, cfg, meta, "kernel")
    x_q = cast(lhs.astype(jnp.float32) * reciprocal(s_x), fmt)
    w_q = cast(rhs.astype(jnp.float32) * reciprocal(s_w), fmt)
    y = _gemm(x_q, s_x, w_q, s_w, dn, cfg.out_dtype, cfg)
    return y, (x_q, s_x, amax_x, w_q, s_w, amax_w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fp8_dot_general(lhs, rhs, meta, dn, cfg: TrainConfig):
    return _forward(lhs, rhs, meta, dn, cfg)[0]


def _fp8_dot_general_fwd(lhs, rhs, meta, dn, cfg):
    y, (x_q, s_x, amax_x, w_q, s_w, amax_w) = _forward(lhs, rhs, meta, dn, cfg)
    res = (x_q, s_x, amax_x, w_q, s_w, amax_w, meta,
           jnp.zeros((0,), lhs.dtype), jnp.zeros((0,), rhs.dtype))
    return y, res


def _fp8_dot_general_bwd(dn, cfg, res, g):
    x_q, s_x, amax_x, w_q, s_w, amax_w, meta, lhs_proto, rhs_proto = res
    gfmt = cfg.grad_format
    s_g, amax_g = _scale_for(g, gfmt, cfg, meta, "grad")
    g_q = cast(g.astype(jnp.float32) * reciprocal(s_g), gfmt)
    if dn == _DENSE_DN:
        # Written out so each GEMM comes out in its final layout (no transpose of an f32 result):
        # dx (M, K) = g (M, N) · w (K, N) over N;  dw (K, N) = x (M, K) · g (M, N) over M.
        d_lhs = _gemm(g_q, s_g, w_q, s_w, (((1,), (1,)), ((), ())), lhs_proto.dtype, cfg)
        d_rhs = _gemm(x_q, s_x, g_q, s_g, (((0,), (0,)), ((), ())), rhs_proto.dtype, cfg)
    else:
        d_lhs = _transpose_lhs(g_q, s_g, x_q.ndim, w_q, s_w, dn, lhs_proto.dtype, cfg)
        d_rhs = _transpose_rhs(g_q, s_g, x_q, s_x, w_q.ndim, dn, rhs_proto.dtype, cfg)
    if meta is None:
        d_meta = None
    else:
        d_meta = {**_update(meta, "input", amax_x, cfg.fwd_format, cfg),
                  **_update(meta, "kernel", amax_w, cfg.fwd_format, cfg),
                  **_update(meta, "grad", amax_g, gfmt, cfg)}
        d_meta = {k: d_meta[k] for k in meta}  # same key order as the primal
    return d_lhs.astype(lhs_proto.dtype), d_rhs.astype(rhs_proto.dtype), d_meta


_fp8_dot_general.defvjp(_fp8_dot_general_fwd, _fp8_dot_general_bwd)


def fp8_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                    *, meta: Meta | None = None, recipe: Recipe | None = None):
    """`lax.dot_general` in FP8 with an FP8 backward; a drop-in `dot_general=` for Flax layers.

        nn.Dense(features, dot_general=jfp8.nn.fp8_dot_general)
        nn.DenseGeneral(features, axis=(-2, -1), dot_general=jfp8.nn.fp8_dot_general)
        jnp.einsum("btd,dhf->bthf", x, w, _dot_general=jfp8.nn.fp8_dot_general)

    (`nn.Einsum` takes no dot_general in Flax 0.12; `jnp.einsum`'s `_dot_general` does the job.)

    Args:
      lhs, rhs: float arrays (bf16/f16/f32); quantized per tensor to the recipe's forward format
        (E4M3) with current scaling, or with `meta`'s delayed scales.
      dimension_numbers: as in `lax.dot_general`.
      precision: ignored (FP8 tensor cores have one precision); accepted for the Flax signature.
      preferred_element_type: output dtype; default the promoted input dtype.
      meta: delayed-scaling state from `init_meta`; None for current scaling.
      recipe: formats and margin (default `Recipe.delayed()`'s E4M3 / E5M2, margin 0).
    Returns: the dot_general result; its VJP gives (d lhs, d rhs, new meta) as described in the
      module docstring.
    """
    del precision
    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
    for name, a in (("lhs", lhs), ("rhs", rhs)):
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise TypeError(f"{name}: expected a float array (bf16/f16/f32), got {a.dtype}")
    recipe = Recipe.delayed() if recipe is None else recipe
    out_dtype = preferred_element_type or jnp.result_type(lhs.dtype, rhs.dtype)
    dn = _normalize_dn(dimension_numbers, lhs.ndim, rhs.ndim)
    if meta is not None:
        _check_meta(meta)
    return _fp8_dot_general(lhs, rhs, meta, dn, TrainConfig.from_recipe(recipe, out_dtype))


def fp8_matmul_train(x, kernel, meta: Meta | None = None, *, recipe: Recipe | None = None,
                     out_dtype=None):
    """x (..., K) · kernel (K, N) -> (..., N) through `fp8_dot_general` (2-D GEMMs inside).

    The Flax (in, out) kernel layout; x is flattened to (M, K) so the GEMMs are plain 2-D ones.
    """
    x, kernel = jnp.asarray(x), jnp.asarray(kernel)
    if kernel.ndim != 2 or x.shape[-1] != kernel.shape[0]:
        raise ValueError(f"kernel: expected (K, N) with K={x.shape[-1]}, got {kernel.shape}")
    lead = x.shape[:-1]
    y = fp8_dot_general(x.reshape(-1, x.shape[-1]), kernel, (((1,), (0,)), ((), ())),
                        preferred_element_type=out_dtype, meta=meta, recipe=recipe)
    return y.reshape(*lead, kernel.shape[1])
