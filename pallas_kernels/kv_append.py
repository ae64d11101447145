"""Write T new tokens' K and V into a stacked KV cache in place, quantizing per (token, head).

For every sequence b and new token t (position p = lengths[b] + t; positions >= S_max dropped):

        scale[l, b, p, h] = R(amax_d |x[b, t, h, d]| * (1 / fmax))  (amax 0 -> 1)  FP8 cache
        cache[l, b, p, h, :] = RNE-cast(clip(x[b, t, h, :] * (1 / scale), -fmax, fmax))
        cache[l, b, p, h, :] = x[b, t, h, :].astype(bf16)                         bf16 cache

for x = k_new into (k_cache, k_scale) and x = v_new into (v_cache, v_scale), in one launch. The
numerics are those of `pallas_kernels.quantize` (and so of `jfp8.quantize` with one scale per
row of D): x times the reciprocal of its scale rounded once, NaN kept, ±inf saturated,
non-finite values left out of the amax. R rounds the f32 scale to the scale array's dtype
(bfloat16, RNE, or float32: `quantize.round_scale`), and the data are quantized with that value.

Why a kernel: XLA runs the same update as a quantize fusion plus one dynamic-update-slice and
select per array written (K, V and, for FP8, their scales), about ten launches per layer and
decode step. Here the cache buffers are aliased to the outputs (`input_output_aliases`), so only
the T new rows are written and the rest of the cache is never touched.

Layouts (`decode_attention.LAYOUTS`, stacked over layers): "sd": k_cache, v_cache (L, B, S_max,
Hkv, D), scales (L, B, S_max, Hkv) (jfp8.KVCache's bf16 layout); "hsd": k_cache (L, B, Hkv,
S_max, D), v_cache (L, B, Hkv, NB, D, VB) (tokens in blocks of VB, tokens last), scales (L, B,
Hkv, S_max) (the FP8 cache's layout). New rows (B, T, Hkv, D). Grid (B, T, 2): one program
writes one token's Hkv x D values of K (one contiguous run for "sd", Hkv runs of D for "hsd") or
of V ("sd" like K; "hsd" one element per (head, d), strided). Hkv is padded to a power of two
inside the kernel (masked), D must be a power of two.

`kv_append_qkv` takes the fused projection instead, qkv (B, T, (Hq + 2 Hkv) D) holding q, k, v
head after head, plus the RoPE tables cos, sin (B, T, D/2) f32, and also does the decode step's
split and RoPE (HF rotate_half, f32 math rounded back to qkv.dtype):

        rope(x) = concat(x1 c - x2 s, x2 c + x1 s)      x1, x2 the halves of each head's D
        q_out = rope(q);  k_new = rope(k);  v_new = v;   then as above

in one launch (grid (B, T, 3): q, K or V), where XLA runs a slice fusion for v and a concatenate
fusion for each of q and k. K is rounded to qkv.dtype before it is quantized, so the cache holds
the bits of the unfused path (RoPE in XLA, then `kv_append`).

Public: `kv_append`, `kv_append_reference`, `kv_append_qkv`, `kv_append_qkv_reference`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels import triton_compat
# The cache layouts, and RoPE's one formula (the fused decode kernel there applies it too).
from pallas_kernels.decode_attention import (CACHE_DTYPES, LAYOUTS, cache_dims, check_cache_scales,
                                             rotate_halves, v_shape_matches)
from pallas_kernels.quantize import _quantize_along

__all__ = ["kv_append", "kv_append_reference", "kv_append_qkv", "kv_append_qkv_reference",
           "rows_at", "LAYOUTS"]

def _write_rows(xs, dsts, scale_dst, write_ok, *, fp8, fmax, exact_div):
    """Store f32 column blocks xs[i] (Hp, w_i) of the same Hp rows into the ref views dsts[i];
    FP8: one scale per row over all blocks, stored into scale_dst (Hp,)."""
    if fp8:
        xs, scale = _quantize_along(xs, 1, fmax, exact_div, scale_dst.dtype)   # scale (Hp,)
        triton_compat.store(scale_dst, scale.astype(scale_dst.dtype), write_ok)
    for x, dst in zip(xs, dsts):
        triton_compat.store(dst, x.astype(dst.dtype), write_ok[:, None])


def _k_row(k_out, layer, b, rows, pos, cols, hsd):
    """The ref view of one token's (Hp, cols) K values."""
    return k_out.at[layer, b, rows, pos, cols] if hsd else k_out.at[layer, b, pos, rows, cols]


def _v_row(v_out, layer, b, rows, pos, hsd):
    """The ref view of one token's (Hp, D) V values ("hsd": block pos // VB, column pos % VB)."""
    if hsd:
        vb = v_out.shape[-1]
        return v_out.at[layer, b, rows, pos // vb, :, pos % vb]
    return v_out.at[layer, b, pos, rows, :]


def _scale_row(scale_out, layer, b, rows, pos, hsd):
    """The ref view of one token's (Hp,) per-head scales."""
    return scale_out.at[layer, b, rows, pos] if hsd else scale_out.at[layer, b, pos, rows]


def _kv_append_kernel(lengths_ref, layer_ref, k_new_ref, v_new_ref, *refs, max_len, heads,
                      heads_pad, fp8, fmax, exact_div, hsd):
    if fp8:
        k_out, v_out, ks_out, vs_out = refs[4:]
    else:
        k_out, v_out = refs[2:]
    b = pl.program_id(0)
    t = pl.program_id(1)
    layer = layer_ref[0]
    pos = lengths_ref[b] + t
    row_ok = jnp.arange(heads_pad) < heads
    write_ok = row_ok & (pos < max_len)

    rows = pl.ds(0, heads_pad)

    def write(new_ref, dst, scale_ref):
        x = triton_compat.load(new_ref.at[b, t, rows, :], row_ok[:, None],
                               other=0.0).astype(jnp.float32)                  # (Hp, D)
        _write_rows([x], [dst], _scale_row(scale_ref, layer, b, rows, pos, hsd) if fp8 else None,
                    write_ok, fp8=fp8, fmax=fmax, exact_div=exact_div)

    # Grid axis 2 picks K (0) or V (1): two short programs run side by side, not one after.
    pl.when(pl.program_id(2) == 0)(lambda: write(
        k_new_ref, _k_row(k_out, layer, b, rows, pos, slice(None), hsd), ks_out if fp8 else None))
    pl.when(pl.program_id(2) == 1)(lambda: write(
        v_new_ref, _v_row(v_out, layer, b, rows, pos, hsd), vs_out if fp8 else None))


def _kv_append_qkv_kernel(lengths_ref, layer_ref, qkv_ref, cos_ref, sin_ref, *refs, max_len,
                          q_heads, q_heads_pad, kv_heads, kv_heads_pad, head_dim, fp8, fmax,
                          exact_div, hsd):
    if fp8:
        k_out, v_out, ks_out, vs_out, q_out = refs[4:]
    else:
        k_out, v_out, q_out = refs[2:]
    b = pl.program_id(0)
    t = pl.program_id(1)
    which = pl.program_id(2)                          # 0: q, 1: K, 2: V
    layer = layer_ref[0]
    pos = lengths_ref[b] + t
    half = head_dim // 2
    lo, hi = pl.ds(0, half), pl.ds(half, half)
    # First head of this program's block in qkv. Traced on purpose: a static nonzero start is
    # bounds-checked at trace time against the unpadded head count, though masked rows past the
    # end are never read.
    h0 = jnp.where(which == 0, 0, q_heads + (which - 1) * kv_heads)

    def load(heads, heads_pad, cols):
        ok = jnp.arange(heads_pad) < heads
        return triton_compat.load(qkv_ref.at[b, t, pl.ds(h0, heads_pad), cols], ok[:, None],
                                  other=0.0).astype(jnp.float32)               # (Hp, w)

    def rope(heads, heads_pad):
        c = cos_ref[b, t, :][None, :]
        s = sin_ref[b, t, :][None, :]
        r1, r2 = rotate_halves(load(heads, heads_pad, lo), load(heads, heads_pad, hi), c, s)
        # apply_rope's final cast: K is quantized from the rounded values, as in the XLA path.
        return [r.astype(qkv_ref.dtype).astype(jnp.float32) for r in (r1, r2)]

    def write_q():
        ok = jnp.arange(q_heads_pad) < q_heads
        for r, cols in zip(rope(q_heads, q_heads_pad), (lo, hi)):
            triton_compat.store(q_out.at[b, t, pl.ds(0, q_heads_pad), cols], r.astype(q_out.dtype),
                                ok[:, None])

    kv_rows = pl.ds(0, kv_heads_pad)
    write_ok = (jnp.arange(kv_heads_pad) < kv_heads) & (pos < max_len)
    kw = dict(fp8=fp8, fmax=fmax, exact_div=exact_div)

    def write_k():
        _write_rows(rope(kv_heads, kv_heads_pad),
                    [_k_row(k_out, layer, b, kv_rows, pos, lo, hsd),
                     _k_row(k_out, layer, b, kv_rows, pos, hi, hsd)],
                    _scale_row(ks_out, layer, b, kv_rows, pos, hsd) if fp8 else None, write_ok,
                    **kw)

    def write_v():
        _write_rows([load(kv_heads, kv_heads_pad, slice(None))],
                    [_v_row(v_out, layer, b, kv_rows, pos, hsd)],
                    _scale_row(vs_out, layer, b, kv_rows, pos, hsd) if fp8 else None, write_ok,
                    **kw)

    pl.when(which == 0)(write_q)
    pl.when(which == 1)(write_k)
    pl.when(which == 2)(write_v)


_K_AXES = {"sd": "(L, B, S, Hkv, D)", "hsd": "(L, B, Hkv, S, D)"}


def _checked_dims(k_cache, layout):
    """(B, S, Hkv, D) of a stacked K cache in `layout`; raises on a bad layout or rank."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    if k_cache.ndim != 5:
        raise ValueError(f"k_cache: expected {_K_AXES[layout]}, got shape {k_cache.shape}")
    return cache_dims(k_cache.shape, layout)


def _check(k_cache, v_cache, k_scale, v_scale, k_new, v_new, lengths, layout):
    L = k_cache.shape[0]
    B, S, H, D = _checked_dims(k_cache, layout)
    want = f"{k_cache.shape} like k_cache" if layout == "sd" else \
        f"(L, B, Hkv, ceil(S / VB), D, VB) = ({L}, {B}, {H}, ceil({S} / VB), {D}, VB), VB a " \
        f"power of two >= 16"
    if not v_shape_matches(k_cache.shape, v_cache.shape, layout) \
            or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"v_cache: expected {want} (layout {layout!r}), {k_cache.dtype} "
                         f"(k_cache's dtype), got {v_cache.shape} {v_cache.dtype}")
    dtype = jnp.dtype(k_cache.dtype)
    if dtype not in CACHE_DTYPES:
        raise TypeError(f"k_cache: expected float8_e4m3fn, float8_e5m2 or bfloat16, got {dtype}")
    if D & (D - 1):
        raise ValueError(f"k_cache: head dim D must be a power of two, got {D}")
    fp8 = check_cache_scales(k_cache, k_scale, v_scale, "k_cache")
    if k_new.ndim != 4 or k_new.shape[0] != B or k_new.shape[2:] != (H, D):
        raise ValueError(f"k_new: expected (B, T, Hkv, D) = ({B}, T, {H}, {D}), got {k_new.shape}")
    if v_new.shape != k_new.shape:
        raise ValueError(f"v_new: expected shape {k_new.shape} like k_new, got {v_new.shape}")
    if tuple(jnp.shape(lengths)) != (B,):
        raise ValueError(f"lengths: expected shape ({B},), got {jnp.shape(lengths)}")
    return fp8


def kv_append(k_cache, v_cache, k_scale, v_scale, k_new, v_new, lengths, layer, *,
              layout: str = "sd", interpret: bool = False):
    """Quantize and write k_new / v_new at positions lengths[b] + t of `layer`, in place.

    Args:
      k_cache, v_cache: in `layout`: "sd" both (L, B, S, Hkv, D); "hsd" k_cache (L, B, Hkv, S,
        D), v_cache (L, B, Hkv, ceil(S / VB), D, VB) (tokens >= S are never written);
        float8_e4m3fn / float8_e5m2 / bfloat16 (both the same). Inside a jit
        that donates them or carries them through a loop the update is in place; called eagerly,
        XLA first copies them (the caller's arrays stay valid).
      k_scale, v_scale: bfloat16 or float32 per-(token, head) scales for an FP8 cache, k_cache's shape
        without D; None for a bf16 cache.
      k_new, v_new: (B, T, Hkv, D) bfloat16 / float16 / float32.
      lengths: (B,) int32, the first position written for each sequence; rows landing at
        positions >= S are dropped (nothing else is touched).
      layer: int or int32 scalar, 0 <= layer < L (not checked under jit).
      layout: "sd" or "hsd" (`LAYOUTS`), how the cache is stored.
      interpret: run the Pallas kernel in interpret mode (CPU tests).
    Returns (k_cache, v_cache, k_scale, v_scale) updated (scales None for a bf16 cache).
    """
    fp8 = _check(k_cache, v_cache, k_scale, v_scale, k_new, v_new, lengths, layout)
    return _kv_append_jit(k_cache, v_cache, k_scale, v_scale, k_new, v_new,
                          jnp.asarray(lengths, jnp.int32), jnp.asarray(layer, jnp.int32).reshape(1),
                          fp8=fp8, layout=layout, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("fp8", "layout", "interpret"))
def _kv_append_jit(k_cache, v_cache, k_scale, v_scale, k_new, v_new, lengths, layer, *, fp8,
                   layout, interpret):
    B, S, H, D = cache_dims(k_cache.shape, layout)
    T = k_new.shape[1]
    fmax = float(jnp.finfo(k_cache.dtype).max) if fp8 else 1.0
    kernel = functools.partial(
        _kv_append_kernel, max_len=S, heads=H, heads_pad=max(2, pl.next_power_of_2(H)), fp8=fp8,
        fmax=fmax, exact_div=not interpret, hsd=layout == "hsd")
    caches = [k_cache, v_cache] + ([k_scale, v_scale] if fp8 else [])
    out_shape = [jax.ShapeDtypeStruct(c.shape, c.dtype) for c in caches]
    kw = dict(interpret=True) if interpret else triton_compat.compiler_params(num_warps=4,
                                                                              num_stages=1)
    out = pl.pallas_call(
        kernel, grid=(B, T, 2), out_shape=out_shape, name="jfp8_kv_append",
        input_output_aliases={4 + i: i for i in range(len(caches))}, **kw,
    )(lengths, layer, k_new, v_new, *caches)
    return tuple(out) if fp8 else (out[0], out[1], None, None)


def kv_append_reference(k_cache, v_cache, k_scale, v_scale, k_new, v_new, lengths, layer, *,
                        layout: str = "sd", interpret: bool = False):
    """Plain-JAX version of `kv_append` (same signature and results; interpret ignored)."""
    del interpret
    fp8 = _check(k_cache, v_cache, k_scale, v_scale, k_new, v_new, lengths, layout)
    B, T = k_new.shape[:2]
    S = cache_dims(k_cache.shape, layout)[1]
    pos = jnp.asarray(lengths, jnp.int32)[:, None] + jnp.arange(T)[None, :]        # (B, T)
    b_idx = jnp.arange(B)[:, None]
    out = []
    for x, cache, scale in ((k_new, k_cache, k_scale), (v_new, v_cache, v_scale)):
        at = rows_at(cache, layer, b_idx, pos, S, layout, is_v=cache is v_cache)
        xf = x.astype(jnp.float32)
        if fp8:
            fmax = float(jnp.finfo(cache.dtype).max)
            amax = jnp.max(jnp.where(jnp.isfinite(xf), jnp.abs(xf), 0.0), axis=-1)
            s = jnp.where(amax > 0, jnp.maximum(amax * np.float32(1 / np.float32(fmax)),
                                                np.finfo(np.float32).tiny), 1.0)
            s = s.astype(scale.dtype).astype(jnp.float32)     # the value stored (bf16: RNE)
            y = xf * (1.0 / s)[..., None]
            data = jnp.where(jnp.isnan(y), y, jnp.clip(y, -fmax, fmax)).astype(cache.dtype)
            scale = rows_at(scale, layer, b_idx, pos, S, layout).set(s.astype(scale.dtype),
                                                                    mode="drop")
        else:
            data = xf.astype(cache.dtype)
        out += [at.set(data, mode="drop"), scale]
    return out[0], out[2], out[1], out[3]


def rows_at(cache, layer, b_idx, pos, S, layout, is_v=False):
    """`cache.at[...]` of the rows of positions pos (B, T) of every head, for a (B, T, Hkv[, D])
    update (the indices split by slices put (B, T) first); positions >= S are sent past the end
    of their axis, so a `mode="drop"` update drops them (also inside V's last, padded block)."""
    if layout == "sd":
        return cache.at[layer, b_idx, pos]
    if not is_v:                                  # k (L, B, H, S, D), scales (L, B, H, S)
        return cache.at[layer, b_idx, :, pos]
    nb, vb = cache.shape[-3], cache.shape[-1]     # v (L, B, H, NB, D, VB)
    return cache.at[layer, b_idx, :, jnp.where(pos < S, pos // vb, nb), :, pos % vb]


def _check_qkv(k_cache, v_cache, k_scale, v_scale, qkv, cos, sin, lengths, num_q_heads,
               layout):
    """Validate `kv_append_qkv`'s arguments; returns (fp8, Hq, Hkv, D)."""
    B, _, H, D = _checked_dims(k_cache, layout)
    if not isinstance(num_q_heads, (int, np.integer)) or num_q_heads < 1:
        raise ValueError(f"num_q_heads: expected a positive int, got {num_q_heads!r}")
    Hq = int(num_q_heads)
    if qkv.ndim != 3 or qkv.shape[0] != B or qkv.shape[2] != (Hq + 2 * H) * D:
        raise ValueError(f"qkv: expected (B, T, (Hq + 2 Hkv) D) = ({B}, T, {(Hq + 2 * H) * D}) "
                         f"for Hq={Hq}, the cache's Hkv={H} and D={D}, got {qkv.shape}")
    B, T = qkv.shape[:2]
    for name, x in (("cos", cos), ("sin", sin)):
        if tuple(x.shape) != (B, T, D // 2) or x.dtype != jnp.float32:
            raise ValueError(f"{name}: expected ({B}, {T}, {D // 2}) float32 (B, T, D/2), got "
                             f"{tuple(x.shape)} {x.dtype}")
    new = jax.ShapeDtypeStruct((B, T, H, D), qkv.dtype)
    fp8 = _check(k_cache, v_cache, k_scale, v_scale, new, new, lengths, layout)
    return fp8, Hq, H, D


def kv_append_qkv(k_cache, v_cache, k_scale, v_scale, qkv, cos, sin, lengths, layer, *,
                  num_q_heads: int, layout: str = "sd", interpret: bool = False):
    """Split qkv, RoPE q and k, write k and v as `kv_append` does, in place; return q rotated.

    Args:
      k_cache, v_cache, k_scale, v_scale, lengths, layer, layout, interpret: as for
        `kv_append`.
      qkv: (B, T, (Hq + 2 Hkv) D) bfloat16 / float16 / float32, the fused q/k/v projection
        (q heads, then k heads, then v heads; D per head), before RoPE.
      cos, sin: (B, T, D/2) float32 RoPE tables of the T new positions.
      num_q_heads: Hq.
    Returns (q (B, T, Hq, D) qkv.dtype rotated, k_cache, v_cache, k_scale, v_scale) (scales None
    for a bf16 cache).
    """
    fp8, Hq, _, _ = _check_qkv(k_cache, v_cache, k_scale, v_scale, qkv, cos, sin, lengths,
                               num_q_heads, layout)
    return _kv_append_qkv_jit(k_cache, v_cache, k_scale, v_scale, qkv, cos, sin,
                              jnp.asarray(lengths, jnp.int32),
                              jnp.asarray(layer, jnp.int32).reshape(1), num_q_heads=Hq, fp8=fp8,
                              layout=layout, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("num_q_heads", "fp8", "layout", "interpret"))
def _kv_append_qkv_jit(k_cache, v_cache, k_scale, v_scale, qkv, cos, sin, lengths, layer, *,
                       num_q_heads, fp8, layout, interpret):
    B, S, H, D = cache_dims(k_cache.shape, layout)
    T = qkv.shape[1]
    Hq = num_q_heads
    fmax = float(jnp.finfo(k_cache.dtype).max) if fp8 else 1.0
    kernel = functools.partial(
        _kv_append_qkv_kernel, max_len=S, q_heads=Hq, q_heads_pad=max(2, pl.next_power_of_2(Hq)),
        kv_heads=H, kv_heads_pad=max(2, pl.next_power_of_2(H)), head_dim=D, fp8=fp8, fmax=fmax,
        exact_div=not interpret, hsd=layout == "hsd")
    caches = [k_cache, v_cache] + ([k_scale, v_scale] if fp8 else [])
    out_shape = [jax.ShapeDtypeStruct(c.shape, c.dtype) for c in caches]
    out_shape.append(jax.ShapeDtypeStruct((B, T, Hq, D), qkv.dtype))
    kw = dict(interpret=True) if interpret else triton_compat.compiler_params(num_warps=4,
                                                                              num_stages=1)
    out = pl.pallas_call(
        kernel, grid=(B, T, 3), out_shape=out_shape, name="jfp8_kv_append_qkv",
        input_output_aliases={5 + i: i for i in range(len(caches))}, **kw,
    )(lengths, layer, qkv.reshape(B, T, Hq + 2 * H, D), cos, sin, *caches)
    q = out[-1]
    return (q,) + tuple(out[:-1]) if fp8 else (q, out[0], out[1], None, None)


def kv_append_qkv_reference(k_cache, v_cache, k_scale, v_scale, qkv, cos, sin, lengths, layer, *,
                            num_q_heads: int, layout: str = "sd", interpret: bool = False):
    """Plain-JAX version of `kv_append_qkv` (same signature and results; interpret ignored):
    slice, RoPE in f32 cast back to qkv.dtype, then `kv_append_reference`."""
    del interpret
    _, Hq, H, D = _check_qkv(k_cache, v_cache, k_scale, v_scale, qkv, cos, sin, lengths,
                             num_q_heads, layout)
    B, T = qkv.shape[:2]
    heads = qkv.reshape(B, T, Hq + 2 * H, D)
    c, s = cos[:, :, None, :], sin[:, :, None, :]

    def rope(x):
        x = x.astype(jnp.float32)
        r1, r2 = rotate_halves(x[..., :D // 2], x[..., D // 2:], c, s)
        return jnp.concatenate([r1, r2], axis=-1).astype(qkv.dtype)

    q, k, v = rope(heads[:, :, :Hq]), rope(heads[:, :, Hq:Hq + H]), heads[:, :, Hq + H:]
    return (q,) + kv_append_reference(k_cache, v_cache, k_scale, v_scale, k, v, lengths, layer,
                                      layout=layout)
