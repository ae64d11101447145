"""KV cache in FP8 (E4M3 default, E5M2) or bf16, stacked over layers, with ragged lengths.

        cache = jfp8.KVCache.init(num_layers, batch, max_len, num_kv_heads, head_dim)   # E4M3
        cache = kv_cache.append(cache, layer, k_new, v_new)   # each layer, at cache.lengths[b]
        cache = kv_cache.advance(cache, num_tokens)           # once per step, after all layers

Layout by dtype (`cache.layout`, the `layout` argument of `pallas_kernels.decode_attention` and
`kv_append`; `cache.layer_kv(layer)` gives any layer token-major); `lengths` (B,) int32 tokens
already committed per sequence:
* FP8, "hsd": k (L, B, Hkv, S_max, D), head-major; v (L, B, Hkv, NB, D, VB), tokens in blocks of
    VB = `v_block(D)` tokens (16 KB of FP8: 128 tokens at D = 128), each block a contiguous
    (D, VB) tile with tokens last, NB = ceil(S_max / VB) (tokens >= S_max are never written or
    read); per-(token, head) scales (L, B, Hkv, S_max). The attention kernel's block is VB in
    the tuned long-context configs, so each K and V block it streams is one contiguous run (a
    divisor of VB elsewhere), and the P.V product reads V along
    tokens as the MMA wants it (token-major 8-bit V needs byte-wise shared-memory loads). On an
    H200 (results/attention_layout_probe_h200.md, attention per layer at B = 16, S = 32K): 274.1
    -> 254.6 µs at D = 128 and 169.7 -> 139.7 µs at D = 64 against K token-major with V rows
    (Hkv, D, S), which had itself cut the 8B B=16 4K step's attention 1660 -> 1521 µs against V
    like K (profile_decode_h200_r5.json vs r2). The new token's V is a strided write (kv_append
    60 -> 88 µs per 8B B=16 step for rows (Hkv, D, S)).
* bf16, "sd": k and v (L, B, S_max, Hkv, D). 16-bit rows are 256 bytes and read along tokens
    efficiently either way (ldmatrix.trans); V tokens last measured 4-5% slower (8B B=16 4K
    2352 -> 2443 µs, 1B B=16 32K 4040 -> 4248 µs).
Scales (x ~ data * scale, scale = amax / fmax):

* scaling="per_token_head" (default): `k_scale`, `v_scale` bfloat16 (`TOKEN_SCALE_DTYPE`), k's
    shape without D, one per written (token, head), from that row's amax over D, rounded to bf16
    before the row is quantized with it (data * scale is the dequantized row, exactly). Keys with
    outlier channels keep their other channels' precision relative to the row, and no scale ever
    changes after a write. Costs 2 bytes per (token, head) per K/V: 1.5% of an FP8 cache at
    D = 128, 3% at D = 64, which attention reads every step (f32 scales, 4 bytes, cost the 1B
    B=16 32K decode step ~0.27 GB of reads). bf16 keeps f32's exponent range, and the <= 2^-9
    relative rounding moves a row's amax at most to fmax * (1 + 2^-8), which saturates to fmax
    exactly as rounding to FP8 would (`pallas_kernels.quantize.round_scale`). Caches built with
    f32 scales (`dataclasses.replace`) work too: appends round to the array's dtype.
* scaling="per_tensor": `k_scale`, `v_scale` (L,) f32, one per layer, like vLLM's k_scale/v_scale.
    Static when given to `init`. Otherwise the first write into each layer (normally the prefill)
    sets it from that write's amax with a 2x headroom (one binade: FP8's relative precision is the
    same across binades, so the headroom costs nothing but the bottom subnormal binade); later
    tokens past the range saturate. (A scale that keeps growing with a running amax would
    invalidate every token already stored, so the scale is fixed once set.)
* dtype bf16: no scales (scaling "none"; scales are ones of shape (L,)).

Writes are scatters with `mode="drop"` at positions lengths[b] + t. Overflow (lengths[b] + T >
S_max): outside `jit` (concrete lengths) `append`/`advance` raise ValueError; inside `jit` the
writes past S_max are dropped (positions < S_max of that sequence are still written, no other
sequence or position is touched), `overflow[b]` is set to True and `advance` clamps lengths[b]
at S_max. Check `cache.overflow` on the host after a generate loop.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

try:  # concrete values are checked eagerly; tracers (under jit) are not
    _Tracer = jax.core.Tracer
except AttributeError:  # pragma: no cover
    from jax._src.core import Tracer as _Tracer

from jfp8.formats import Format, as_format, cast, is_fp8_dtype
from jfp8.scaling import reciprocal, scale_from_amax
from pallas_kernels.quantize import round_scale
from pallas_kernels.decode_attention import cache_dims, to_token_major, v_shape_for
from pallas_kernels.kv_append import rows_at

__all__ = ["KVCache", "append", "check_append", "advance", "tokens_per_gb", "bytes_per_token",
           "v_block", "SCALINGS"]

SCALINGS = ("per_token_head", "per_tensor")
#: dtype of per-(token, head) scales (module docstring).
TOKEN_SCALE_DTYPE = jnp.bfloat16
# Bytes of one V token block of an FP8 cache (`v_block`): 16 KB, the K/V bytes per step of the
# attention kernel's tuned 128-token block at D = 128 (and of its 256-token block at D = 64,
# results/decode_attention_h200_d64_sweep.md). Blocks are whole 128-byte lines: V rows padded to
# 16-byte alignment only (pitch 16) cost 8% at B=16 S=32K (282.7 vs 261.8 µs per layer,
# results/decode_attention_h200_pitch{16,128}.md). Costs < one block of V per (sequence, head).
V_BLOCK_BYTES = 16384
# Per-tensor scales set from a first write get one binade of headroom (margin 1 -> x2).
PER_TENSOR_MARGIN = 1


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Stacked per-layer KV cache (a pytree: pass it through jit, donate it).

    Attributes:
        k: FP8 (L, B, Hkv, S_max, D) float8_e4m3fn / float8_e5m2; bf16 (L, B, S_max, Hkv, D).
        v: FP8 (L, B, Hkv, ceil(S_max / VB), D, VB), VB = v_block(D); bf16 like k. See `layout`.
        k_scale, v_scale: (L,) f32 (per_tensor or bf16) or k's shape without D, f32
            (per_token_head).
            Per-tensor scale 0 means "not set yet" (dynamic, set by the first write of the layer).
        lengths: (B,) int32, tokens committed per sequence.
        overflow: (B,) bool, True once a write past S_max was dropped for that sequence.
        scaling: "per_token_head", "per_tensor" or "none" (bf16) (static).
    """
    k: jax.Array
    v: jax.Array
    k_scale: jax.Array
    v_scale: jax.Array
    lengths: jax.Array
    overflow: jax.Array
    scaling: str = dataclasses.field(metadata=dict(static=True))

    @classmethod
    def init(cls, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int, *,
             dtype=None, scaling: str = "per_token_head", k_scale=None, v_scale=None) -> "KVCache":
        """An empty cache (zeros, lengths 0).

        Args:
            num_layers, batch, max_len, num_kv_heads, head_dim: L, B, S_max, Hkv, D.
            dtype: jfp8.E4M3 (default), jfp8.E5M2 (a Format, FP8 dtype or name) or jnp.bfloat16.
            scaling: "per_token_head" or "per_tensor" (ignored for bf16).
            k_scale, v_scale: static per-tensor scales, scalar or (L,) (scaling="per_tensor" only);
                None: set by the first write of each layer.
        """
        for name, value in (("num_layers", num_layers), ("batch", batch), ("max_len", max_len),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        data_dtype, _ = _resolve_dtype(dtype)
        L = num_layers
        if data_dtype == jnp.bfloat16:                                  # layout "sd"
            shape = v_shape = (L, batch, max_len, num_kv_heads, head_dim)
            scaling = "none"
            if k_scale is not None or v_scale is not None:
                raise ValueError("k_scale, v_scale: a bf16 cache takes no scales, got some")
        else:                                                           # layout "hsd"
            shape = (L, batch, num_kv_heads, max_len, head_dim)
            v_shape = v_shape_for(shape, "hsd", v_block(head_dim, data_dtype))
            if scaling not in SCALINGS:
                raise ValueError(f"scaling: expected one of {SCALINGS}, got {scaling!r}")
        if scaling == "per_token_head":
            if k_scale is not None or v_scale is not None:
                raise ValueError("k_scale, v_scale: static scales need scaling='per_tensor', "
                                 "got scaling='per_token_head'")
            ks = jnp.ones(shape[:-1], TOKEN_SCALE_DTYPE)
            vs = jnp.ones(shape[:-1], TOKEN_SCALE_DTYPE)
        else:
            ks = _per_layer("k_scale", k_scale, L, default=1.0 if scaling == "none" else 0.0)
            vs = _per_layer("v_scale", v_scale, L, default=1.0 if scaling == "none" else 0.0)
        return cls(k=jnp.zeros(shape, data_dtype), v=jnp.zeros(v_shape, data_dtype), k_scale=ks,
                   v_scale=vs, lengths=jnp.zeros((batch,), jnp.int32),
                   overflow=jnp.zeros((batch,), bool), scaling=scaling)

    # ---- shape facts -------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return cache_dims(self.k.shape, self.layout)[1]

    @property
    def num_kv_heads(self) -> int:
        return cache_dims(self.k.shape, self.layout)[2]

    @property
    def head_dim(self) -> int:
        return self.k.shape[4]

    @property
    def dtype(self):
        return self.k.dtype

    @property
    def layout(self) -> str:
        """How k, v and per-token scales are stored: "hsd" (FP8) or "sd" (bf16); the `layout`
        argument of `pallas_kernels.decode_attention` and `kv_append`."""
        return "sd" if self.k.dtype == jnp.bfloat16 else "hsd"

    def layer_kv(self, layer):
        """One layer token-major: (k, v) (B, S_max, Hkv, D) and (k_scale, v_scale) as
        `layer_scales` gives them, per-(token, head) ones as (B, S_max, Hkv). A transpose for
        FP8: for references and the XLA path."""
        ks, vs = self.layer_scales(layer)
        return to_token_major(self.k[layer], self.v[layer], ks, vs, self.layout)

    @property
    def format(self) -> Format | None:
        """The FP8 Format of k/v, or None for a bf16 cache."""
        return as_format(self.k.dtype) if is_fp8_dtype(self.k.dtype) else None

    @property
    def nbytes(self) -> int:
        """Device bytes of all arrays of the cache."""
        return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize
                   for a in (self.k, self.v, self.k_scale, self.v_scale, self.lengths,
                             self.overflow))

    def layer_scales(self, layer):
        """(k_scale, v_scale) for one layer as the attention kernel takes them: per-tensor
        scalars, per-(token, head) (B, Hkv, S_max) arrays, or (None, None) for bf16."""
        if self.scaling == "none":
            return None, None
        return self.k_scale[layer], self.v_scale[layer]


def _resolve_dtype(dtype):
    if dtype is None:
        dtype = "e4m3"
    try:
        if jnp.dtype(dtype) == jnp.bfloat16:
            return jnp.dtype(jnp.bfloat16), None
    except TypeError:
        pass
    try:
        fmt = as_format(dtype)
    except (TypeError, ValueError):
        raise ValueError(f"dtype: expected jfp8.E4M3, jfp8.E5M2 or jnp.bfloat16, "
                         f"got {dtype!r}") from None
    if fmt.name not in ("e4m3", "e5m2"):
        raise ValueError(f"dtype: expected jfp8.E4M3, jfp8.E5M2 or jnp.bfloat16, got {fmt!r}")
    return jnp.dtype(fmt.dtype), fmt


def _per_layer(name, scale, L, default):
    if scale is None:
        return jnp.full((L,), default, jnp.float32)
    scale = jnp.asarray(scale, jnp.float32)
    if scale.shape not in ((), (L,)):
        raise ValueError(f"{name}: expected a scalar or shape ({L},), got {scale.shape}")
    if not isinstance(scale, _Tracer) and not bool(jnp.all(scale > 0)):
        raise ValueError(f"{name}: expected positive scales, got {scale}")
    return jnp.broadcast_to(scale, (L,))


def v_block(head_dim: int, dtype=jnp.float8_e4m3fn) -> int:
    """Tokens per V block of an FP8 cache: V_BLOCK_BYTES of one head's (D, VB) tile (a power of
    two >= 16): 128 at D = 128, 256 at D = 64."""
    tokens = V_BLOCK_BYTES // (head_dim * jnp.dtype(dtype).itemsize)
    return max(16, 1 << (max(tokens, 1).bit_length() - 1))


def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype=None,
                    scaling: str = "per_token_head") -> int:
    """Cache bytes one token takes over all layers (K and V, plus per-(token, head) bf16 scales); an
    FP8 cache also pads V to whole blocks of `v_block(D)` tokens (< one block per sequence and
    head)."""
    data_dtype, _ = _resolve_dtype(dtype)
    per_head = head_dim * data_dtype.itemsize
    if data_dtype != jnp.bfloat16 and scaling == "per_token_head":
        per_head += jnp.dtype(TOKEN_SCALE_DTYPE).itemsize
    elif data_dtype != jnp.bfloat16 and scaling not in SCALINGS:
        raise ValueError(f"scaling: expected one of {SCALINGS}, got {scaling!r}")
    return num_layers * 2 * num_kv_heads * per_head


def tokens_per_gb(num_layers: int, num_kv_heads: int, head_dim: int, dtype=None,
                  scaling: str = "per_token_head") -> int:
    """How many tokens (summed over the batch) fit in 1 GB (1e9 bytes) of cache.

    Llama-3-8B shape (32 layers, 8 KV heads, D 128): bf16 7629, FP8 per-tensor 15258 (2x),
    FP8 per-token-head (bf16 scales) 15024 (1.97x).
    """
    return int(1e9 // bytes_per_token(num_layers, num_kv_heads, head_dim, dtype, scaling))


def _check_kv(cache: KVCache, k_new, v_new):
    if k_new.ndim != 4:
        raise ValueError(f"k_new: expected (B, T, Hkv, D), got shape {k_new.shape}")
    B, T, Hkv, D = k_new.shape
    want = (cache.batch, T, cache.num_kv_heads, cache.head_dim)
    if k_new.shape != want:
        raise ValueError(f"k_new: expected shape (B, T, Hkv, D) = {want} to match the cache, "
                         f"got {k_new.shape}")
    if v_new.shape != k_new.shape:
        raise ValueError(f"v_new: expected shape {k_new.shape} like k_new, got {v_new.shape}")


def _is_concrete(x) -> bool:
    return not isinstance(x, _Tracer)


def _quantize_rows(x, cache: KVCache, layer, scale_now):
    """x (B, T, Hkv, D) -> (data, scale): per (token, head) scales (B, T, Hkv), or per tensor with
    the layer's scale (scale_now, a scalar)."""
    fmt = cache.format
    if fmt is None:
        return x.astype(jnp.bfloat16), None
    xf = x.astype(jnp.float32)
    if cache.scaling == "per_token_head":
        amax = jnp.max(jnp.where(jnp.isfinite(xf), jnp.abs(xf), 0.0), axis=-1)     # (B, T, Hkv)
        scale = round_scale(scale_from_amax(amax, fmt), cache.k_scale.dtype)
        return cast(xf * reciprocal(scale)[..., None], fmt), scale.astype(cache.k_scale.dtype)
    return cast(xf * reciprocal(scale_now), fmt), None


def append(cache: KVCache, layer, k_new, v_new, *, num_valid=None) -> KVCache:
    """Write T new tokens per sequence into `layer` at positions lengths[b] .. lengths[b] + T - 1.

    Does not advance `lengths` (every layer writes at the same positions; call `advance` once per
    step). Jit-friendly (scatter into the donated cache, no host sync under jit).

    Args:
        cache: the KVCache.
        layer: int or int32 scalar.
        k_new, v_new: (B, T, Hkv, D) float (bf16 / f32).
        num_valid: optional (B,) int, how many of the T tokens are real (right padding, as in
            prefill): only these count for the overflow check/flag; padding past S_max is dropped.
    Returns the updated cache. Overflow: see the module docstring.
    """
    num_valid = check_append(cache, layer, k_new, v_new, num_valid)
    return _append(cache, jnp.asarray(layer, jnp.int32), k_new, v_new, num_valid)


def check_append(cache: KVCache, layer, k_new, v_new, num_valid=None):
    """Validate an `append` (shapes, layer, and overflow when lengths are concrete); returns
    num_valid as a (B,) int32 array."""
    _check_kv(cache, k_new, v_new)
    B, T = k_new.shape[:2]
    S = cache.max_len
    if isinstance(layer, (int, np.integer)) and not 0 <= layer < cache.num_layers:
        raise ValueError(f"layer: expected 0 <= layer < {cache.num_layers}, got {layer}")
    num_valid = jnp.full((B,), T, jnp.int32) if num_valid is None else jnp.asarray(num_valid,
                                                                                    jnp.int32)
    if num_valid.shape != (B,):
        raise ValueError(f"num_valid: expected shape ({B},), got {num_valid.shape}")
    needed = cache.lengths + num_valid
    if _is_concrete(needed):
        needed_np = np.asarray(jax.device_get(needed))
        if (needed_np > S).any():
            raise ValueError(f"k_new: writing {T} tokens at lengths "
                             f"{np.asarray(cache.lengths).tolist()} overflows the cache "
                             f"(S_max={S}) for sequences {np.nonzero(needed_np > S)[0].tolist()}")
    return num_valid


@jax.jit
def _append(cache: KVCache, layer, k_new, v_new, num_valid) -> KVCache:
    B, T = k_new.shape[:2]
    S = cache.max_len
    overflow = cache.overflow | (cache.lengths + num_valid > S)
    k_scale, v_scale = cache.k_scale, cache.v_scale
    ks_now = vs_now = None
    if cache.scaling == "per_tensor":
        fmt = cache.format

        def first_write_scale(x, current):
            fresh = scale_from_amax(jnp.max(jnp.where(jnp.isfinite(x), jnp.abs(x), 0.0)), fmt,
                                    PER_TENSOR_MARGIN)
            return jnp.where(current > 0, current, fresh)
        ks_now = first_write_scale(k_new.astype(jnp.float32), k_scale[layer])
        vs_now = first_write_scale(v_new.astype(jnp.float32), v_scale[layer])
        k_scale = k_scale.at[layer].set(ks_now)
        v_scale = v_scale.at[layer].set(vs_now)

    kd, ks = _quantize_rows(k_new, cache, layer, ks_now)
    vd, vs = _quantize_rows(v_new, cache, layer, vs_now)
    b_idx = jnp.arange(B)[:, None]                                     # (B, 1)
    pos = cache.lengths[:, None] + jnp.arange(T)[None, :]               # (B, T); >= S dropped
    k = rows_at(cache.k, layer, b_idx, pos, S, cache.layout).set(kd, mode="drop")
    v = rows_at(cache.v, layer, b_idx, pos, S, cache.layout, is_v=True).set(vd, mode="drop")
    if ks is not None:
        k_scale = rows_at(k_scale, layer, b_idx, pos, S, cache.layout).set(ks, mode="drop")
        v_scale = rows_at(v_scale, layer, b_idx, pos, S, cache.layout).set(vs, mode="drop")
    return dataclasses.replace(cache, k=k, v=v, k_scale=k_scale, v_scale=v_scale,
                               overflow=overflow)


def advance(cache: KVCache, num_tokens) -> KVCache:
    """lengths += num_tokens (scalar or (B,)), once per step after every layer appended.

    Concrete: ValueError past S_max. Under jit: lengths clamp at S_max and `overflow` is set.
    """
    n = jnp.asarray(num_tokens, jnp.int32)
    if n.ndim not in (0, 1) or (n.ndim == 1 and n.shape != (cache.batch,)):
        raise ValueError(f"num_tokens: expected a scalar or shape ({cache.batch},), got {n.shape}")
    new = cache.lengths + n
    S = cache.max_len
    if _is_concrete(new):
        new_np = np.asarray(jax.device_get(new))
        if (new_np > S).any():
            raise ValueError(f"num_tokens: advancing lengths "
                             f"{np.asarray(cache.lengths).tolist()} by "
                             f"{np.asarray(n).tolist()} passes the cache's S_max={S}")
        if (new_np < 0).any():
            raise ValueError(f"num_tokens: lengths would become negative: {new_np.tolist()}")
    return _advance(cache, n)


@jax.jit
def _advance(cache: KVCache, n) -> KVCache:
    new = cache.lengths + n
    S = cache.max_len
    return dataclasses.replace(cache, lengths=jnp.clip(new, 0, S),
                               overflow=cache.overflow | (new > S))
