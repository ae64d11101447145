"""Attention over a `jfp8.KVCache`: prefill (prompt, writes the cache) and decode (reads it).

    o, cache = jfp8.attention.prefill(q, k, v, cache, layer=i, lengths=prompt_lengths)
    ...after every layer: cache = jfp8.kv_cache.advance(cache, prompt_lengths)
    o, cache = jfp8.attention.decode(q, k_new, v_new, cache, layer=i)     # T = 1 .. 16 tokens
    ...after every layer: cache = jfp8.kv_cache.advance(cache, T)

`decode_qkv(qkv, cache, layer=i, num_q_heads=Hq, cos=cos, sin=sin)` is `decode` on the fused
q/k/v projection before RoPE: it splits qkv (B, T, (Hq + 2 Hkv) D), applies `apply_rope` to q and
k and decodes; on the pallas/interpret backends the split, RoPE and the K/V append are one kernel
(`pallas_kernels.kv_append.kv_append_qkv`), and for one new token (T = 1) they run inside the
decode-attention kernel itself (`pallas_kernels.decode_attention.decode_attention_qkv`), with the
cache bits and output of the unfused path.

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
import numpy as np

from jfp8 import kv_cache as kvc
from jfp8.kv_cache import KVCache
from jfp8.ops import get_backend

__all__ = ["decode", "decode_qkv", "prefill", "decode_xla", "apply_rope", "MAX_KERNEL_TOKENS"]

MAX_KERNEL_TOKENS = 16   # query tokens per sequence the decode kernel takes (chunked/speculative)
#: One decode token (T = 1): the K/V append runs inside the attention kernel
#: (`decode_attention_qkv`) instead of as its own launch (read at trace time).
APPEND_IN_ATTENTION = True


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
    cache = _append(cache, layer, k_new, v_new, num_valid, backend=backend)
    return _attend(q, cache, layer, backend=backend, sm_scale=sm_scale), cache


def apply_rope(x, cos, sin):
    """RoPE, HF `rotate_half` convention: x (B, T, H, D), cos/sin (B, T, D/2) f32 -> x.dtype.

    Each head's halves x1, x2 become (x1 cos - x2 sin, x2 cos + x1 sin), in f32, cast back to
    x.dtype (the formula of `kv_append_qkv` and its reference too)."""
    half = x.shape[-1] // 2
    x1 = x[..., :half].astype(jnp.float32)
    x2 = x[..., half:].astype(jnp.float32)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


def _split_qkv(qkv, num_q_heads: int, num_kv_heads: int):
    """qkv (B, T, (Hq + 2 Hkv) D) -> q (B, T, Hq, D), k, v (B, T, Hkv, D) (no RoPE)."""
    B, T, N = qkv.shape
    D = N // (num_q_heads + 2 * num_kv_heads)
    heads = qkv.reshape(B, T, num_q_heads + 2 * num_kv_heads, D)
    return (heads[:, :, :num_q_heads], heads[:, :, num_q_heads:num_q_heads + num_kv_heads],
            heads[:, :, num_q_heads + num_kv_heads:])


def decode_qkv(qkv, cache: KVCache, *, layer, num_q_heads: int, cos, sin,
               sm_scale: float | None = None):
    """`decode` on the fused projection: split qkv, `apply_rope` to q and k, append, attend.

    Same results as `decode(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, cache, ...)`
    for q, k, v the query, key and value heads of qkv: on the pallas/interpret backends, where the
    K/V append kernel applies (per-(token, head) or bf16 cache, power-of-two D, T <= 16), the
    split, RoPE and append are one launch (`pallas_kernels.kv_append.kv_append_qkv`), at T = 1
    inside the attention's own launch (`pallas_kernels.decode_attention.decode_attention_qkv`);
    otherwise XLA slices and rotates and `decode`'s path runs.

    Args:
      qkv: (B, T, (Hq + 2 Hkv) D) bf16/f32: q heads, then k heads, then v heads, before RoPE.
      cache: KVCache (gives Hkv and D).
      layer: int or int32 scalar.
      num_q_heads: Hq, a multiple of the cache's Hkv.
      cos, sin: (B, T, D/2) f32 RoPE tables of the new positions.
      sm_scale: softmax scale, default D ** -0.5.
    Returns (o (B, T, Hq, D) bf16, cache).
    """
    Hkv, D = cache.num_kv_heads, cache.head_dim
    if not isinstance(num_q_heads, (int, np.integer)) or num_q_heads < 1 or num_q_heads % Hkv:
        raise ValueError(f"num_q_heads: expected a positive multiple of the cache's Hkv={Hkv}, "
                         f"got {num_q_heads!r}")
    Hq = int(num_q_heads)
    if D % 2:
        raise ValueError(f"cache: RoPE needs an even head dim D, got {D}")
    if qkv.ndim != 3 or qkv.shape[0] != cache.batch or qkv.shape[2] != (Hq + 2 * Hkv) * D:
        raise ValueError(f"qkv: expected (B, T, (Hq + 2 Hkv) D) = ({cache.batch}, T, "
                         f"{(Hq + 2 * Hkv) * D}) for Hq={Hq} and the cache's Hkv={Hkv}, "
                         f"D={D}, got {qkv.shape}")
    B, T = qkv.shape[:2]
    for name, x in (("cos", cos), ("sin", sin)):
        if tuple(jnp.shape(x)) != (B, T, D // 2):
            raise ValueError(f"{name}: expected (B, T, D/2) = ({B}, {T}, {D // 2}), got "
                             f"{tuple(jnp.shape(x))}")
    new = jax.ShapeDtypeStruct((B, T, Hkv, D), qkv.dtype)
    try:
        num_valid = kvc.check_append(cache, layer, new, new)
    except ValueError as e:   # the overflow message names k_new, which is qkv's part here
        raise ValueError(str(e).replace("k_new:", "qkv:", 1)) from None
    return _decode_qkv(qkv, jnp.asarray(cos, jnp.float32), jnp.asarray(sin, jnp.float32), cache,
                       jnp.asarray(layer, jnp.int32), num_valid, num_q_heads=Hq,
                       backend=get_backend(), sm_scale=sm_scale)


@functools.partial(jax.jit, static_argnames=("num_q_heads", "backend", "sm_scale"))
def _decode_qkv(qkv, cos, sin, cache, layer, num_valid, *, num_q_heads, backend, sm_scale):
    T, D = qkv.shape[1], cache.head_dim
    if (T == 1 and APPEND_IN_ATTENTION and _kernel_append_applies(cache, T, D, backend)
            and cache.max_len >= 16):
        # One decode token: the append runs inside the attention kernel (one launch fewer).
        from pallas_kernels import decode_attention as kernel
        fp8 = cache.scaling == "per_token_head"
        o, k, v, ks, vs = kernel.decode_attention_qkv(
            qkv, cos, sin, cache.k, cache.v, cache.k_scale if fp8 else None,
            cache.v_scale if fp8 else None, cache.lengths, layer=layer, num_q_heads=num_q_heads,
            sm_scale=sm_scale, interpret=backend == "interpret", layout=cache.layout)
        return o, _replace_appended(cache, k, v, ks, vs, num_valid)
    if _kernel_append_applies(cache, T, D, backend):
        from pallas_kernels import kv_append as kernel
        fp8 = cache.scaling == "per_token_head"
        q, k, v, ks, vs = kernel.kv_append_qkv(
            cache.k, cache.v, cache.k_scale if fp8 else None, cache.v_scale if fp8 else None, qkv,
            cos, sin, cache.lengths, layer, num_q_heads=num_q_heads, layout=cache.layout,
            interpret=backend == "interpret")
        cache = _replace_appended(cache, k, v, ks, vs, num_valid)
    else:
        q, k, v = _split_qkv(qkv, num_q_heads, cache.num_kv_heads)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache = _append(cache, layer, k, v, num_valid, backend=backend)
    return _attend(q, cache, layer, backend=backend, sm_scale=sm_scale), cache


def _attend(q, cache: KVCache, layer, *, backend, sm_scale):
    """Decode attention of q (B, T, Hq, D) over the cache, its T new tokens already appended."""
    T = q.shape[1]
    kv_lengths = jnp.minimum(cache.lengths + T, cache.max_len)
    k_scale, v_scale = _kernel_scales(cache)
    # The kernel's smallest K/V block is 16 rows (one MMA); tinier caches take the XLA path.
    if backend in ("pallas", "interpret") and T <= MAX_KERNEL_TOKENS and cache.max_len >= 16:
        from pallas_kernels import decode_attention as kernel
        o = kernel.decode_attention(q, cache.k, cache.v, kv_lengths, k_scale, v_scale, layer=layer,
                                    sm_scale=sm_scale, interpret=backend == "interpret",
                                    layout=cache.layout)
    else:
        o = decode_xla(q, cache, layer, kv_lengths, sm_scale=sm_scale)
    return o


def _kernel_append_applies(cache: KVCache, T: int, D: int, backend: str) -> bool:
    """Whether the in-place K/V append kernel runs: per-(token, head) or bf16 caches,
    power-of-two head dim, T <= 16, pallas/interpret backends."""
    return backend in ("pallas", "interpret") and T <= MAX_KERNEL_TOKENS and not D & (D - 1) \
        and cache.scaling in ("per_token_head", "none")


def _append(cache: KVCache, layer, k_new, v_new, num_valid, *, backend):
    """kv_cache.append, as one in-place Pallas launch where `_kernel_append_applies`; same bits."""
    T, D = k_new.shape[1], k_new.shape[3]
    if not _kernel_append_applies(cache, T, D, backend):
        return kvc._append(cache, layer, k_new, v_new, num_valid)
    from pallas_kernels import kv_append as kernel
    fp8 = cache.scaling == "per_token_head"
    k, v, ks, vs = kernel.kv_append(cache.k, cache.v, cache.k_scale if fp8 else None,
                                    cache.v_scale if fp8 else None, k_new, v_new, cache.lengths,
                                    layer, layout=cache.layout,
                                    interpret=backend == "interpret")
    return _replace_appended(cache, k, v, ks, vs, num_valid)


def _replace_appended(cache: KVCache, k, v, k_scale, v_scale, num_valid) -> KVCache:
    """The cache with the kernel's outputs (scales None for bf16) and the overflow flags set."""
    overflow = cache.overflow | (cache.lengths + num_valid > cache.max_len)
    return dataclasses.replace(cache, k=k, v=v,
                               k_scale=cache.k_scale if k_scale is None else k_scale,
                               v_scale=cache.v_scale if v_scale is None else v_scale,
                               overflow=overflow)


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
    k, v, k_scale, v_scale = cache.layer_kv(layer)
    return reference_math(q, k, v, kv_lengths, k_scale, v_scale, sm_scale=sm_scale,
                          per_token=cache.scaling == "per_token_head")


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
