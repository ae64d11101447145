"""`FP8Dense`: a drop-in for `flax.linen.Dense` that runs its matmul in FP8.

    from jfp8 import nn as fnn
    y = fnn.FP8Dense(features=4096, recipe=jfp8.Recipe.block128()).apply({"params": p}, x)

The mode follows from the parameters and the recipe, not from a flag:

  inference  `params["kernel"]` is a `jfp8.QArray` (N, K) made by `jfp8.quantize_params`: the layer
             calls `jfp8.matmul(x, kernel, bias=...)` directly (Pallas kernels on a Hopper GPU).
  dynamic    `kernel` is a plain (K, N) array (a Dense param tree loads unchanged) and the recipe
             scales currently: the kernel is quantized at call time per the recipe
             (`Recipe.block128()`, `.rowwise()`, `.weights_only()`...). Differentiable
             (straight-through, E5M2 output gradient), but that backward multiplies dequantized
             operands in f32: to train fast use the per-tensor recipes below.
  training   the recipe is `Recipe.delayed(...)` (or `Recipe.per_tensor()`): per-tensor E4M3
             forward, E5M2 output gradients, f32 master weights, through `jax.custom_vjp`
             (`jfp8.nn.training`). Delayed scaling keeps, per layer, amax histories and scales in
             the `"fp8_meta"` collection; the step's new meta is the gradient w.r.t. that
             collection:

                 def loss_fn(params, fp8_meta, x, y):
                     out = model.apply({"params": params, "fp8_meta": fp8_meta}, x)
                     return loss(out, y)
                 g_params, fp8_meta = jax.grad(loss_fn, argnums=(0, 1))(params, fp8_meta, x, y)
                 updates, opt_state = tx.update(g_params, opt_state, params)   # optimizer untouched

             Applied without an "fp8_meta" collection (e.g. evaluation with params only), a
             delayed layer falls back to current scaling.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen import initializers

from jfp8.nn import training
from jfp8.ops import matmul
from jfp8.pending import PendingSum, materialize
from jfp8.qarray import QArray, quantize
from jfp8.recipe import Recipe
from jfp8.scaling import PerTensor
from pallas_kernels.fp8_gemv import add_residual

default_kernel_init = initializers.lecun_normal()


def resolve_recipe(recipe: Recipe | None) -> Recipe:
    if recipe is None:
        return Recipe.block128()
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe: expected a jfp8.Recipe (or None for Recipe.block128()), got {recipe!r}")
    return recipe


def uses_training_path(recipe: Recipe) -> bool:
    """Per-tensor W8A8 recipes (delayed or current) run the fast FP8 training GEMMs fwd and bwd."""
    return (recipe.scaling == "delayed" or (
        recipe.act_format is not None and isinstance(recipe.act_granularity, PerTensor)
        and isinstance(recipe.weight_granularity, PerTensor)))


def fp8_dense_apply(x, kernel, bias, *, recipe: Recipe, out_dtype, meta=None, prologue=None,
                    residual=None, defer_sum: bool = False):
    """The FP8Dense computation on explicit arrays (shared by the linen and nnx modules).

    Args:
      x: (..., K) float input; (..., 2K) with a SwiGLU prologue.
      kernel: QArray (N, K) (inference) or a (K, N) float array (dynamic / training).
      bias: (N,) or None.
      recipe: the jfp8.Recipe.
      out_dtype: dtype of the result.
      meta: delayed-scaling state (`training.init_meta`) or None (current scaling).
      prologue: optional `jfp8.RMSNorm` / `jfp8.SwiGLU` applied to x first (fused into the
        inference matmul where a kernel can, see `jfp8.matmul`).
      residual: optional (..., N) array added to the result (`jfp8.matmul`'s residual: fused
        into the inference decode kernel's epilogue where it can).
      defer_sum: inference only, `jfp8.matmul`'s: the result may be a `jfp8.PendingSum` (x and
        residual may be PendingSums too).
    Returns: (..., N) array of out_dtype (or a `jfp8.PendingSum`, defer_sum).
    """
    if not (isinstance(x, PendingSum) and isinstance(kernel, QArray)):
        x = jnp.asarray(materialize(x))
    if isinstance(kernel, QArray):
        k_in = kernel.shape[-1] if prologue is None else prologue.in_features(kernel.shape[-1])
        if kernel.ndim != 2 or k_in != x.shape[-1]:
            raise ValueError(f"kernel: expected a QArray (N, K) taking inputs of width "
                             f"{x.shape[-1]}, got {kernel.shape}")
        act_recipe = recipe if recipe.act_format is None or recipe.scaling == "current" else \
            Recipe.per_tensor(act_format=recipe.act_format)
        return matmul(x, kernel, bias=bias, out_dtype=out_dtype, recipe=act_recipe,
                      prologue=prologue, residual=residual, defer_sum=defer_sum)
    residual = materialize(residual)
    if prologue is not None:
        x = prologue(x)
    if uses_training_path(recipe):
        # The GEMM writes out_dtype itself (bf16 activations: half the bytes of an f32 result).
        y = training.fp8_matmul_train(x, kernel, meta, recipe=recipe, out_dtype=out_dtype)
        y = y if bias is None else (y + jnp.asarray(bias).astype(out_dtype)).astype(out_dtype)
        return add_residual(y, residual)
    y = _dynamic_matmul(x, kernel, recipe)
    if bias is not None:
        y = y + jnp.asarray(bias, jnp.float32)
    return add_residual(y.astype(out_dtype), residual)


# -- dynamic mode: forward through jfp8.matmul with the recipe's granularities ------------------

def _dynamic_forward(x, kernel, recipe: Recipe):
    wq = quantize(kernel.T, recipe.weight_format, recipe.weight_granularity)
    y = matmul(x, wq, out_dtype=jnp.float32, recipe=recipe)
    return y, wq


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dynamic_matmul(x, kernel, recipe: Recipe):
    return _dynamic_forward(x, kernel, recipe)[0]


def _dynamic_fwd(x, kernel, recipe):
    y, wq = _dynamic_forward(x, kernel, recipe)
    if recipe.act_format is None:
        x_used = x
    else:
        x2 = x.reshape(-1, x.shape[-1])
        x_used = quantize(x2, recipe.act_format, recipe.act_granularity).dequantize(jnp.float32)
        x_used = x_used.reshape(x.shape)
    return y, (x_used, wq, jnp.zeros((0,), x.dtype), jnp.zeros((0,), kernel.dtype))


def _dynamic_bwd(recipe, res, g):
    # Straight-through: the gradient of the quantized forward w.r.t. the operands it quantized.
    # The output gradient goes through the recipe's grad format (E5M2, per tensor, current).
    x_used, wq, x_proto, k_proto = res
    g2 = g.reshape(-1, g.shape[-1]).astype(jnp.float32)
    g_used = quantize(g2, recipe.grad_format, PerTensor()).dequantize(jnp.float32)
    w = wq.dequantize(jnp.float32)  # (N, K)
    hi = jax.lax.Precision.HIGHEST
    dx = jnp.dot(g_used, w, precision=hi).reshape(x_used.shape)
    dk = jnp.dot(x_used.reshape(-1, x_used.shape[-1]).astype(jnp.float32).T, g_used, precision=hi)
    return dx.astype(x_proto.dtype), dk.astype(k_proto.dtype)


_dynamic_matmul.defvjp(_dynamic_fwd, _dynamic_bwd)


# -- the module ---------------------------------------------------------------------------------

class FP8Dense(nn.Module):
    """A linear transformation applied over the last dimension of the input, in FP8.

    Same arguments, in the same order, as `flax.linen.Dense`, plus `recipe`; same parameters
    (`kernel` (in, out), `bias` (out,)), so a Dense param tree loads unchanged.

    Attributes:
      features: the number of output features.
      use_bias: whether to add a bias to the output (default: True).
      dtype: the dtype of the computation's result (default: inferred from input and params).
      param_dtype: the dtype passed to parameter initializers (default: float32; the f32 master
        weights of FP8 training).
      precision: accepted for Dense compatibility; FP8 GEMMs have a single precision.
      kernel_init: initializer for the weight matrix.
      bias_init: initializer for the bias.
      recipe: a `jfp8.Recipe` (None: `Recipe.block128()`). `Recipe.delayed(history, margin)` for
        training with delayed scaling; `Recipe.weights_only()` for W8A16.
    """

    features: int
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Any = default_kernel_init
    bias_init: Any = initializers.zeros_init()
    recipe: Recipe | None = None

    @nn.compact
    def __call__(self, inputs: jax.Array, prologue=None, residual=None,
                 defer_sum: bool = False) -> jax.Array:
        """inputs (..., K) -> (..., features). `prologue` (a `jfp8.RMSNorm` / `jfp8.SwiGLU`) is
        applied to the inputs first, fused into the FP8 kernel where one can (then inputs are
        (..., 2K) for SwiGLU); `residual` (..., features) is added to the output (in f32, the
        sum rounded to the output dtype; in the FP8 decode kernel's epilogue where it can).
        `defer_sum` (pre-quantized kernels): `jfp8.matmul`'s, the output may be a
        `jfp8.PendingSum`; inputs and residual may be PendingSums."""
        recipe = resolve_recipe(self.recipe)
        pre_quantized = self.has_variable("params", "kernel") and isinstance(
            self.get_variable("params", "kernel"), QArray)
        if not isinstance(inputs, PendingSum):    # fp8_dense_apply sums it where it must
            inputs = jnp.asarray(inputs)
        if prologue is not None and not pre_quantized:
            inputs, prologue = prologue(inputs), None
        k = inputs.shape[-1] if prologue is None else \
            self.get_variable("params", "kernel").shape[-1]
        if pre_quantized:
            # Pre-quantized (N, K): read it as is; `self.param` would check it against the
            # (K, N) initializer shape.
            kernel = self.get_variable("params", "kernel")
            if kernel.shape != (self.features, k):
                raise ValueError(f"kernel: expected a QArray of shape ({self.features}, {k}) "
                                 f"(out, in), got {kernel.shape}")
        else:
            kernel = self.param("kernel", self.kernel_init, (k, self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) \
            if self.use_bias else None

        meta = None
        if recipe.scaling == "delayed" and not isinstance(kernel, QArray):
            if self.has_variable(training.META_COLLECTION, "input_scale") or \
                    self.is_mutable_collection(training.META_COLLECTION):
                meta = {name: self.variable(training.META_COLLECTION, name,
                                            lambda v=v: v).value
                        for name, v in training.init_meta(recipe.amax_history).items()}

        if self.dtype is not None:
            out_dtype = self.dtype
        elif isinstance(kernel, QArray):
            out_dtype = jnp.result_type(inputs.dtype, self.param_dtype)
        else:
            out_dtype = jnp.result_type(inputs.dtype, kernel.dtype)
        return fp8_dense_apply(inputs, kernel, bias, recipe=recipe, out_dtype=out_dtype, meta=meta,
                               prologue=prologue, residual=residual, defer_sum=defer_sum)
