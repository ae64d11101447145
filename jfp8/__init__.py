"""jfp8: FP8 for JAX on Hopper GPUs.

The scale carries the dynamic range; FP8 carries the values.

    import jfp8
    q = jfp8.quantize(w, jfp8.E4M3, jfp8.PerBlock((128, 128)))   # QArray
    y = jfp8.matmul(x, q)                                       # x bf16 (..., K), q (N, K)
"""
from jfp8.formats import (BF16, E4M3, E4M3FNUZ, E5M2, E5M2FNUZ, FP16, FP32, FP8_FORMATS, Format,
                          as_format, cast)
from jfp8.metrics import QuantizationError, quantization_error
from jfp8.ops import get_backend, matmul, set_backend, use_backend
from jfp8.pending import PendingSum, materialize
from jfp8.prologue import RMSNorm, SwiGLU
from jfp8.params import QuantizationSummary, quantization_summary, quantize_params
from jfp8 import attention, kv_cache
from jfp8.kv_cache import KVCache
from jfp8.qarray import QArray, from_parts, quantize
from jfp8.recipe import Recipe
from jfp8.scaling import (DelayedScalingState, PerBlock, PerChannel, PerTensor, compute_scale,
                          delayed_scaling_init, delayed_scaling_update, scale_shape)

__version__ = "0.1.0"

__all__ = [
    "BF16", "E4M3", "E4M3FNUZ", "E5M2", "E5M2FNUZ", "FP16", "FP32", "FP8_FORMATS", "Format",
    "as_format", "cast", "QuantizationError", "quantization_error", "get_backend", "matmul",
    "set_backend", "use_backend", "QArray", "from_parts", "quantize", "Recipe",
    "DelayedScalingState", "PerBlock", "PerChannel", "PerTensor", "compute_scale",
    "delayed_scaling_init", "delayed_scaling_update", "scale_shape", "QuantizationSummary",
    "quantization_summary", "quantize_params", "attention", "kv_cache", "KVCache", "RMSNorm",
    "SwiGLU", "PendingSum", "materialize",
]
