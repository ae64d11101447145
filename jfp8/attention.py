"""Attention over a `jfp8.KVCache`: prefill (prompt, writes the cache) and decode (reads it).

    o, cache = jfp8.attention.prefill(q, k, v, cache, layer=i, lengths=prompt_lengths)
    ...after every layer: cache = jfp8.kv_cache.advance(cache, prompt_lengths)
    o, cache = jfp8.attention.decode(q, k_new, v_new, cache, layer=i)     # T = 1 .. 16 tokens
    ...after every layer: cache = jfp8.kv_cache.advance(cache, T)

Backends (`jfp8.get_backend()`, read at trace time): "pallas" runs the flash-decoding kernel of
`pallas_kernels.decode_attention` on the FP8 cache; "interpret" the same kernel in interpret mode;
"xla" a plain XLA path (dequantize to f32, masked softmax in f32), also the one used for T > 16.
Prefill runs bf16 causal attention through `jax.nn.dot_product_attention` (cuDNN on a GPU, XLA
elsewhere) on the unquantized prompt K/V; only the cache holds FP8.

Shapes: q (B, T, Hq, D) bf16, query head n reads KV head n // G (G = Hq / Hkv, the grouping of
HF Llama and jax.nn.dot_product_attention); k/v (B, T, Hkv, D); output (B, T, Hq, D) bf16.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jfp8 import kv_cache as kvc
from jfp8.kv_cache import KVCache
from jfp8.ops import get_backend

__all__ = ["decode", "prefill", "decode_xla", "MAX_KERNEL_TOKENS"]

MAX_KERNEL_TOKENS = 16   # query tokens per sequence the decode kernel takes (chunked/speculative)


def _check_qkv(q, k, v, cache: KVCache):
    if q.ndim != 4:
        raise ValueError(f"q: expected (B, T, Hq, D), got shape {q.shape}")
    B, T, Hq, D = q.shape
    if D != cache.head_dim:
        raise ValueError(f"q: expected head dim D={cache.head_dim} (the cache's), got {D}")
    if B != cache.batch:
        raise ValueError(f"q: expected batch B={cache.batch} (the cache's), got {B}")
    if Hq % cache.num_kv_heads:
        raise ValueError(f"q: number of query heads Hq={Hq} must be a multiple of the cache's "
                         f"Hkv={cache.num_kv_heads}")
    want = (B, T, cache.num_kv_heads, D)
    if k.shape != want:
        raise ValueError(f"k: expected shape (B, T, Hkv, D) = {want}, got {k.shape}")
    if v.shape != want:
        raise ValueError(f"v: expected shape (B, T, Hkv, D) = {want}, got {v.shape}")


def decode(q, k_new, v_new, cache: KVCache, *, layer, sm_scale: float | None = None):
    """Append T new tokens' K/V at cache.lengths[b], then attend over lengths[b] + T tokens.

    Causal inside the T new tokens (token t sees the cache and new tokens 0..t). lengths are not
    advanced (call `kv_cache.advance(cache, T)` once per step).

    Args:
      q: (B, T, Hq, D) bf16, T >= 1 (the kernel takes T <= 16; larger T runs the XLA path).
      k_new, v_new: (B, T, Hkv, D) bf16/f32, quantized into the cache's format.
      cache: KVCache.
      layer: int or int32 scalar.
      sm_scale: softmax scale, default D ** -0.5.
    Returns (o (B, T, Hq, D) bf16, cache).
    """
    _check_qkv(q, k_new, v_new, cache)
    num_valid = kvc.check_append(cache, layer, k_new, v_new)
    return _decode(q, k_new, v_new, cache, jnp.asarray(layer, jnp.int32), num_valid,
                   backend=get_backend(), sm_scale=sm_scale)


@functools.partial(jax.jit, static_argnames=("backend", "sm_scale"))
def _decode(q, k_new, v_new, cache, layer, num_valid, *, backend, sm_scale):
    T = q.shape[1]
    cache = _append(cache, layer, k_new, v_new, num_valid, backend=backend)
    kv_lengths = jnp.minimum(cache.lengths + T, cache.max_len)
    k_scale, v_scale = _kernel_scales(cache)
    # The kernel's smallest K/V block is 16 rows (one MMA); tinier caches take the XLA path.
    if backend in ("pallas", "interpret") and T <= MAX_KERNEL_TOKENS and cache.max_len >= 16:
        from pallas_kernels import decode_attention as kernel
        o = kernel.decode_attention(q, cache.k, cache.v, kv_lengths, k_scale, v_scale, layer=layer,
                                    sm_scale=sm_scale, interpret=backend == "interpret")
    else:
        o = decode_xla(q, cache, layer, kv_lengths, sm_scale=sm_scale)
    return o, cache


def _append(cache: KVCache, layer, k_new, v_new, num_valid, *, backend):
    """kv_cache.append, as one in-place Pallas launch where it applies (per-(token, head) or bf16
    caches, power-of-two head dim, T <= 16 on the pallas/interpret backends); same bits."""
    T, D = k_new.shape[1], k_new.shape[3]
    if backend not in ("pallas", "interpret") or T > MAX_KERNEL_TOKENS or D & (D - 1) or \
            cache.scaling not in ("per_token_head", "none"):
        return kvc._append(cache, layer, k_new, v_new, num_valid)
    from pallas_kernels import kv_append as kernel
    fp8 = cache.scaling == "per_token_head"
    k, v, ks, vs = kernel.kv_append(cache.k, cache.v, cache.k_scale if fp8 else None,
                                    cache.v_scale if fp8 else None, k_new, v_new, cache.lengths,
                                    layer, interpret=backend == "interpret")
    overflow = cache.overflow | (cache.lengths + num_valid > cache.max_len)
    return dataclasses.replace(cache, k=k, v=v, k_scale=ks if fp8 else cache.k_scale,
                               v_scale=vs if fp8 else cache.v_scale, overflow=overflow)


def _kernel_scales(cache: KVCache):
    """The stacked scales as the kernel takes them (it indexes the layer itself)."""
    if cache.scaling == "none":
        return None, None
    return cache.k_scale, cache.v_scale


def decode_xla(q, cache: KVCache, layer, kv_lengths, *, sm_scale: float | None = None):
    """Plain XLA decode attention (f32 softmax over the dequantized layer), any T: the kernel's
    reference math (`pallas_kernels.decode_attention.reference_math`) on one layer of the cache.

    Query t of sequence b sits at position kv_lengths[b] - T + t and sees positions <= it.
    """
    from pallas_kernels.decode_attention import reference_math
    D = q.shape[-1]
    sm_scale = float(D ** -0.5 if sm_scale is None else sm_scale)
    scaled = cache.scaling != "none"
    return reference_math(q, cache.k[layer], cache.v[layer], kv_lengths,
                          cache.k_scale[layer] if scaled else None,
                          cache.v_scale[layer] if scaled else None,
                          sm_scale=sm_scale, per_token=cache.scaling == "per_token_head")


def prefill(q, k, v, cache: KVCache, *, layer, lengths, sm_scale: float | None = None):
    """Causal attention over a right-padded prompt; writes its K/V into the cache.

    The prompt's tokens attend to each other only (bf16 compute on the unquantized K/V); K/V are
    written at positions [cache.lengths[b], cache.lengths[b] + T) (normally lengths 0). Rows of o
    past lengths[b] are padding (finite, meaningless). Call `kv_cache.advance(cache, lengths)`
    after all layers.

    Args:
      q: (B, T, Hq, D) bf16; k, v: (B, T, Hkv, D) bf16.
      cache: KVCache; layer: int or int32 scalar.
      lengths: (B,) int32 valid prompt tokens per sequence (only these count for overflow).
      sm_scale: softmax scale, default D ** -0.5.
    Returns (o (B, T, Hq, D) bf16, cache).
    """
    _check_qkv(q, k, v, cache)
    B, T = q.shape[:2]
    lengths = jnp.asarray(lengths, jnp.int32)
    if lengths.shape != (B,):
        raise ValueError(f"lengths: expected shape ({B},), got {lengths.shape}")
    num_valid = kvc.check_append(cache, layer, k, v, lengths)
    return _prefill(q, k, v, cache, jnp.asarray(layer, jnp.int32), num_valid, sm_scale=sm_scale)


@functools.partial(jax.jit, static_argnames=("sm_scale",))
def _prefill(q, k, v, cache, layer, num_valid, *, sm_scale):
    cache = kvc._append(cache, layer, k, v, num_valid)
    return _causal_attention(q, k, v, sm_scale), cache


def _causal_attention(q, k, v, sm_scale):
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    on_gpu = jax.devices()[0].platform == "gpu"
    if on_gpu:
        try:
            return jax.nn.dot_product_attention(q, k, v, scale=sm_scale, is_causal=True,
                                                implementation="cudnn")
        except Exception:  # cuDNN rejects some shapes (e.g. D or T limits): fall back to XLA.
            pass
    # Causal masking alone suffices for right padding: a valid query row only sees keys at
    # positions <= its own, all valid.
    return jax.nn.dot_product_attention(q, k, v, scale=sm_scale, is_causal=True,
                                        implementation="xla")
