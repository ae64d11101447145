"""Flax modules for FP8: `FP8Dense` (linen), `FP8Linear` (nnx), `fp8_dot_general`, FP8 training.

    from jfp8 import nn as fnn
    fnn.FP8Dense(features=4096, recipe=jfp8.Recipe.block128())     # drop-in for flax.linen.Dense
    fnn.FP8Linear(in_f, out_f, rngs=rngs, recipe=...)               # drop-in for flax.nnx.Linear
    nn.Dense(features, dot_general=fnn.fp8_dot_general)            # FP8 inside layers you don't own

Training (E4M3 forward, E5M2 gradients, delayed scaling in the "fp8_meta" collection) is described
in jfp8/nn/training.py and jfp8/nn/linen.py.
"""
from jfp8.nn.linen import FP8Dense, fp8_dense_apply
from jfp8.nn.nnx import FP8Linear, FP8Meta, apply_meta_grads, quantize_model
from jfp8.nn.training import META_COLLECTION, fp8_dot_general, fp8_matmul_train, init_meta

__all__ = ["FP8Dense", "fp8_dense_apply", "FP8Linear", "FP8Meta", "apply_meta_grads",
           "quantize_model", "META_COLLECTION", "fp8_dot_general", "fp8_matmul_train", "init_meta"]
