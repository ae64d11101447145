"""`FP8Linear`: a drop-in for `flax.nnx.Linear` that runs its matmul in FP8.

    layer = FP8Linear(4096, 14336, rngs=nnx.Rngs(0), recipe=jfp8.Recipe.block128())

Same modes as `jfp8.nn.FP8Dense` (see jfp8/nn/linen.py): a `kernel` Param holding a QArray (N, K)
runs inference through `jfp8.matmul`; a (in, out) float kernel is quantized at call time
(dynamic); `Recipe.delayed()` trains with per-tensor E4M3 forward / E5M2 backward and keeps amax
histories and scales in `FP8Meta` variables (`input_amax_history`, `input_scale`, `kernel_...`,
`grad_...`). Their new values arrive as their gradient:

    grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, (nnx.Param, FP8Meta)))(model, x, y)
    param_grads = apply_meta_grads(model, grads)    # writes the new FP8Meta into the model
    optimizer.update(model, param_grads)            # the optimizer sees Params only

`quantize_model(model, recipe)` turns a trained model's kernels into QArrays in place, by the
same path rules as `jfp8.quantize_params`.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import initializers

from jfp8.nn import training
from jfp8.nn.linen import fp8_dense_apply, resolve_recipe
from jfp8.params import quantize_params
from jfp8.qarray import QArray
from jfp8.recipe import Recipe

default_kernel_init = initializers.lecun_normal()


def _value(variable):
    """A Variable's value (`get_value()` where Flax has it, `.value` on older versions)."""
    return variable.get_value() if hasattr(variable, "get_value") else variable.value


class FP8Meta(nnx.Variable):
    """Delayed-scaling state of an FP8 layer (amax histories and scales); not a parameter."""


class FP8Linear(nnx.Module):
    """A linear transformation applied over the last dimension of the input, in FP8.

    Same arguments as `flax.nnx.Linear` plus `recipe`; same parameters (`kernel` (in, out),
    `bias` (out,)).

    Attributes:
      in_features, out_features: input and output sizes.
      use_bias: whether to add a bias (default True).
      dtype: dtype of the result (default: inferred from input and params).
      param_dtype: dtype of the parameters (default float32: FP8 training's master weights).
      precision: accepted for Linear compatibility; FP8 GEMMs have one precision.
      kernel_init, bias_init: initializers.
      recipe: a `jfp8.Recipe` (None: `Recipe.block128()`).
      rngs: `nnx.Rngs` for the initializers.
    """

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
                 dtype: Any = None, param_dtype: Any = jnp.float32, precision: Any = None,
                 kernel_init: Any = default_kernel_init,
                 bias_init: Any = initializers.zeros_init(), recipe: Recipe | None = None,
                 rngs: nnx.Rngs):
        self.in_features = in_features
        self.out_features = out_features
        self.use_bias = use_bias
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.precision = precision
        self.recipe = resolve_recipe(recipe)
        self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features), param_dtype))
        self.bias = nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype)) \
            if use_bias else None
        if self.recipe.scaling == "delayed":
            for name, value in training.init_meta(self.recipe.amax_history).items():
                setattr(self, name, FP8Meta(value))

    def _meta(self):
        if self.recipe.scaling != "delayed" or isinstance(_value(self.kernel), QArray):
            return None
        return {name: _value(getattr(self, name)) for t in training.META_TENSORS
                for name in (f"{t}_amax_history", f"{t}_scale")}

    def __call__(self, inputs: jax.Array, prologue=None, residual=None) -> jax.Array:
        """inputs (..., in_features) -> (..., out_features). `prologue` (a `jfp8.RMSNorm` /
        `jfp8.SwiGLU`) is applied to the inputs first, fused into the FP8 kernel where one can
        (then inputs are (..., 2 * in_features) for SwiGLU); `residual` (..., out_features) is
        added to the output (in f32, the sum rounded to the output dtype; in the FP8 decode
        kernel's epilogue where it can)."""
        inputs = jnp.asarray(inputs)
        kernel = _value(self.kernel)
        bias = _value(self.bias) if self.bias is not None else None
        if isinstance(kernel, QArray):
            k_in = self.in_features if prologue is None else prologue.in_features(self.in_features)
            if kernel.shape != (self.out_features, self.in_features) or inputs.shape[-1] != k_in:
                raise ValueError(f"kernel: expected a QArray of shape ({self.out_features}, "
                                 f"{self.in_features}) (out, in) taking inputs of width {k_in}, "
                                 f"got {kernel.shape} and inputs {inputs.shape}")
            default = jnp.result_type(inputs.dtype, self.param_dtype)
        else:
            default = jnp.result_type(inputs.dtype, kernel.dtype)
        out_dtype = self.dtype if self.dtype is not None else default
        return fp8_dense_apply(inputs, kernel, bias, recipe=self.recipe, out_dtype=out_dtype,
                               meta=self._meta(), prologue=prologue, residual=residual)


def apply_meta_grads(model: nnx.Module, grads: nnx.State) -> nnx.State:
    """Write the FP8Meta part of `grads` (the new delayed-scaling state) into `model`; return the
    rest (the parameter gradients, for the optimizer)."""
    meta, rest = nnx.split_state(grads, FP8Meta, ...) if hasattr(nnx, "split_state") else \
        grads.split(FP8Meta, ...)
    nnx.update(model, meta)
    return rest


def quantize_model(model: nnx.Module, recipe: Recipe | None = None, **rules) -> nnx.Module:
    """Replace the model's linear kernels by QArrays (N, K) in place, by `quantize_params` rules
    (`include`, `exclude`, `overrides`, `stacked`). Returns the model."""
    state = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(state) if hasattr(nnx, "to_pure_dict") else state.to_pure_dict()
    quantized = quantize_params(pure, recipe, **rules)
    nnx.replace_by_pure_dict(state, quantized)
    nnx.update(model, state)
    return model
