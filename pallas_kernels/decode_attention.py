"""Flash-decoding attention over an FP8 (or bf16) KV cache, for T <= 16 query tokens per sequence.

Computes, for each sequence b, query token t and query head n (KV head h = n // G):

        o[b, t, n] = softmax_j(q[b, t, n] . K[b, j, h] * sm_scale) @ V[b, j, h],
        j < lengths[b] - T + t + 1   (ragged lengths; causal inside the T new tokens)

where K = k.astype(f32) * k_scale and V = v.astype(f32) * v_scale (scale convention x ~ data *
scale). Scales are per tensor (one scalar, or one per layer) or per (token, head).

Layouts (`LAYOUTS`), each unstacked or stacked over layers (a leading L axis, with a `layer`
index: the stacked array is read in place, since slicing a layer out would copy it, see
notes/h100.md on `lax.scan` over stacked weights):
- "sd" (token-major): k, v (B, S, Hkv, D); per-(token, head) scales (B, S, Hkv). jfp8.KVCache's
  bf16 layout.
- "hsd" (head-major, blocked V): k (B, Hkv, S, D), every head's tokens contiguous; v
  (B, Hkv, NB, D, VB), tokens in blocks of VB (a power of two >= 16, NB * VB >= S), each block a
  contiguous (D, VB) tile with tokens last, as the P.V product reads it; scales (B, Hkv, S). The
  kernel's block is at most VB tokens (a divisor of it); at VB every K and V block it loads is
  one contiguous run (16 KB for an FP8 cache at D = 128, VB = 128), where token-major FP8 rows
  are 128-byte pieces Hkv * D bytes apart: 5-18% faster at B = 16, S = 32K on an H200
  (results/attention_layout_probe_h200.md). jfp8.KVCache's FP8 layout.
q is (B, T, Hq, D) with query head n = h * G + g (the GQA grouping of HF Llama and
`jax.nn.dot_product_attention`).

Kernel (Triton-lowered Pallas): grid (Hkv, splits, B), Hkv fastest (in "sd" the programs that run
together then read neighbouring head rows of the same tokens and share the sectors of the
per-token scales in L2; in "hsd" each program streams contiguous blocks of its own). One
program holds the T*G query rows of one KV head (padded to >= 16 rows for the MMA), walks its
S-split in `block_k` steps with an online softmax in f32 (base 2), upcasts FP8 to
f16 in registers (exact for E4M3 and E5M2, and a cheaper conversion than to bf16), applies the
scales after the QK dot (per-token K scales on the logits columns, per-token V scales folded into
P), skips blocks past the sequence's length, and writes an unnormalised partial (acc, m, l). A
second small kernel (grid (B, Hkv, D parts)) combines the splits by log-sum-exp and writes bf16;
D is split across programs when few (sequence, KV head) pairs run (`COMBINE_MIN_PROGRAMS`).

`decode_attention_qkv` is the decode step's form (T = 1) with the step's own K/V append in the
same launch: it takes the fused qkv projection before RoPE, every program rotates its query rows
itself, and the program that owns the new position quantizes and writes the new K / V row before
its threads read the block (`kv_append.kv_append_qkv` + `decode_attention`, one launch fewer).

Block sizes, warps, stages and the split count come from `DecodeAttentionConfig` and the
`CONFIGS` table keyed by shape class (`config_for`); an explicit `config=` overrides.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

try:  # concrete values are checked eagerly; tracers (under jit) are not
    _Tracer = jax.core.Tracer
except AttributeError:  # pragma: no cover
    from jax._src.core import Tracer as _Tracer

from pallas_kernels import triton_compat
from pallas_kernels.quantize import _quantize_along

__all__ = ["DecodeAttentionConfig", "CONFIGS", "LAYOUTS", "cache_dims", "v_shape_for",
           "v_shape_matches", "to_token_major", "config_for",
           "decode_attention", "decode_attention_reference", "reference_math",
           "decode_attention_qkv", "decode_attention_qkv_reference", "rotate_halves",
           "CACHE_DTYPES", "check_cache_scales"]

_LOG2E = math.log2(math.e)
#: Cache layouts (module docstring): "sd" token-major, "hsd" head-major with V in token blocks.
LAYOUTS = ("sd", "hsd")
MAX_QUERY_TOKENS = 16


#: Dtypes of a cache that takes appends: FP8 with per-(token, head) scales, or bf16 without.
CACHE_DTYPES = (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2), jnp.dtype(jnp.bfloat16))
#: Dtypes of per-(token, head) scales: bfloat16 (jfp8.KVCache's, 2 bytes per token and head:
#: 3% of an FP8 cache's bytes at D = 64 instead of 6%) or float32. Appends round a new scale to
#: the array's dtype before quantizing with it (`quantize.round_scale`).
SCALE_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))


def check_cache_scales(k, k_scale, v_scale, k_name: str) -> bool:
    """An appendable cache's scales: per-(token, head) bfloat16 or float32 (`SCALE_DTYPES`, one
    dtype for both) of k's shape without D for an FP8 cache, None for a bf16 one (errors name
    the argument and `k_name`). Returns whether k is FP8."""
    fp8 = jnp.dtype(k.dtype) != jnp.bfloat16
    for name, sc in (("k_scale", k_scale), ("v_scale", v_scale)):
        if fp8 and (sc is None or tuple(sc.shape) != tuple(k.shape[:-1])
                    or jnp.dtype(sc.dtype) not in SCALE_DTYPES
                    or jnp.dtype(sc.dtype) != jnp.dtype(k_scale.dtype)):
            raise ValueError(f"{name}: expected {tuple(k.shape[:-1])} bfloat16 or float32 "
                             f"per-(token, head) scales ({k_name}'s shape without D, k_scale's "
                             f"dtype) for an FP8 cache, got "
                             f"{None if sc is None else (tuple(sc.shape), sc.dtype)}")
        if not fp8 and sc is not None:
            raise ValueError(f"{name}: expected None for a bf16 cache, got an array")
    return fp8


@dataclasses.dataclass(frozen=True)
class DecodeAttentionConfig:
    """Static tiling of the decode-attention kernel.

    block_k: KV tokens per inner step (power of 2, >= 16).
    target_programs: the split count is chosen so that about this many programs (Hkv * splits * B)
        run, enough to fill 132 SMs several programs deep; each split holds >= min_blocks_per_split
        blocks.
    num_warps, num_stages: Triton launch parameters (stages = software-pipelining depth of the K/V
        loads).
    dot_dtype: operand dtype of the two MMAs for an FP8 cache ("float16" is an exact upcast of E4M3
        and E5M2; a bf16 cache always uses bf16).
    early_v: issue each block's V (and V-scale) loads at the top of the step, next to K's, rather
        than after the softmax: for programs of one block, which have no software pipeline, the
        chain load K -> QK dot -> softmax -> load V -> PV dot loses one load latency.
    """
    block_k: int = 128
    target_programs: int = 1024
    min_blocks_per_split: int = 2
    num_warps: int = 4
    num_stages: int = 3
    dot_dtype: str = "float16"
    early_v: bool = False

    def num_splits(self, batch: int, kv_heads: int, max_len: int) -> int:
        """Splits per (sequence, KV head): about target_programs / (B * Hkv), each of at most
        ceil(blocks / that) and at least min_blocks_per_split blocks. The split count is the
        fewest that keeps the longest split that short (a program's time is its split's length);
        blocks are then dealt out evenly (split s holds [s * nb // splits, (s + 1) * nb // splits))."""
        blocks = pl.cdiv(max_len, self.block_k)
        want = max(1, self.target_programs // (batch * kv_heads))
        blocks_per_split = max(self.min_blocks_per_split, pl.cdiv(blocks, want))
        return pl.cdiv(blocks, blocks_per_split)


# Keyed by (batch class, max_len class). Classes: batch "1" (B == 1), "small" (B <= 8), "large"
# (B > 8); max_len "short" (<= 8192, so a 4K context plus its generated tokens stays short) or
# "long". From the H100 sweeps in benchmarks/results/decode_attention*.json (Hq 32, Hkv 8, D 128;
# per-shape differences under ~10% are within run-to-run noise there). Fewer, longer programs win
# once the GPU is full (B=8, S=32K: 512 programs of 32 blocks beat 1024 of 16); 2 pipeline stages
# win where programs are short (B = 1). B=1 long from decode_attention_r5.json (>= 2 GB per timed
# call, kernel time from a profiler trace): 256 programs 35.4 µs vs 512 programs 37.6 µs.
CONFIGS: dict[tuple[str, ...], DecodeAttentionConfig] = {
    ("1", "short"): DecodeAttentionConfig(block_k=128, target_programs=1024, min_blocks_per_split=1,
                                          num_warps=8, num_stages=1, early_v=True),
    ("1", "long"): DecodeAttentionConfig(block_k=128, target_programs=256, min_blocks_per_split=1,
                                         num_stages=2),
    ("small", "short"): DecodeAttentionConfig(block_k=64, target_programs=512,
                                              min_blocks_per_split=1),
    ("small", "long"): DecodeAttentionConfig(block_k=128, target_programs=512),
    ("large", "short"): DecodeAttentionConfig(block_k=128, target_programs=256),
    ("large", "long"): DecodeAttentionConfig(block_k=128, target_programs=256),
}
# Head dim 64 (Llama-3.2-1B: Hq 32, Hkv 8), B > 8, S = 32K, swept on the H200
# (results/decode_attention_h200_d64_sweep.md, kernel µs per layer): 256-token blocks (the bytes
# per step of a 128-token block at D = 128) 154.4 against 166.0 for the D = 128 entry; 8 warps
# 157.6, 2 stages 173.1, 512 programs 183.9, 128 programs 178.1. At S = 4K every config was
# within 27.1-27.4 µs except the slower 8-warp / 2-stage / 64-token ones: no d64 entry there.
CONFIGS[("large", "long", "d64")] = DecodeAttentionConfig(block_k=256, target_programs=256,
                                                          min_blocks_per_split=1)
# B = 1 short re-swept inside the 8B decode step on the H200 (4K context;
# profile_decode_h200_r2.json, attention + combine per step over 32 layers): one 128-token block per program (256 programs)
# 255 + 111 µs, against 2 blocks per program 322 + 93 µs; 64-token blocks 251-293 + 180 µs;
# 256-token blocks with 8 warps 469 + 94 µs.
# Then (profile_decode_h200_r11_attn_b1*.log, two calls): each of those 264 programs holds one
# block, so software pipelining has nothing to overlap; 1 stage instead of 2 and 8 warps: attention
# + combine 237 + 74 -> 218 + 73 µs per step (4 warps, 1 stage 222-224; 64-token blocks 207 + 83;
# 2 warps 379). ncu (ncu_attention_b1_h200.txt): 151 registers, 3 programs per SM at most, 43% of
# the issue gaps waiting on global loads: a latency chain, not a bandwidth limit (1.0 TB/s).
# V's loads issued with K's (early_v; profile_decode_h200_r11_attn_ev.log): 218 -> 204 µs per
# step at 8 warps (4 warps 223; 64-token blocks 204 + 83); at B = 16 4K (several blocks per
# program, pipelined) 1398 -> 1415: off there.
# B > 8 re-swept on the H200 (decode_attention_h200_b16.json, B=16, FP8 per-tensor cache, µs per
# layer): S=4K tp256 s3 52.2 vs the H100's tp512 s2 58.5-59.5 and tp1024 62.8; S=32K tp256 312.1
# vs the H100's tp2048 324.9-337.0 and tp1024 326.6. 8 warps and 256-token blocks lost (68-87 µs
# at 4K).


#: The combine kernel splits D (down to 32 columns) until about this many programs run. At B = 1
#: (8 KV heads, 33 splits) 4 parts of 32 columns: 112.5 -> 74.6 µs per 8B decode step on the H200
#: (results/profile_decode_h200_r7_8b_b1_combine.json).
COMBINE_MIN_PROGRAMS = 64


def config_for(batch: int, max_len: int, head_dim: int = 128) -> DecodeAttentionConfig:
    """The tuned config for a shape class (see CONFIGS): (batch class, length class, "d64") for
    head_dim <= 64 where the table has that key, else (batch class, length class)."""
    b = "1" if batch == 1 else ("small" if batch <= 8 else "large")
    s = "short" if max_len <= 8192 else "long"
    if head_dim <= 64 and (b, s, "d64") in CONFIGS:
        return CONFIGS[(b, s, "d64")]
    return CONFIGS[(b, s)]


def rotate_halves(x1, x2, c, s):
    """RoPE on the halves x1, x2 of a head (HF rotate_half), f32 in and out: the one formula of
    the kernels here and in kv_append and of their references (jfp8.attention.apply_rope
    computes the same; no import across the layers)."""
    return x1 * c - x2 * s, x2 * c + x1 * s


@dataclasses.dataclass(frozen=True)
class _Append:
    """The decode step's own K / V append, fused into the attention kernel (T = 1)."""
    q_heads: int          # Hq: qkv's rows are Hq query heads, then Hkv key heads, then Hkv values
    kv_heads: int
    fp8: bool             # quantize per (token, head) as kv_append does; False: a bf16 cache
    fmax: float
    interpret: bool       # interpret mode: XLA's division, no barrier


class _RowRope:
    """RoPE of whole rows of qkv (Hq + 2 Hkv, D): each row is loaded as stored and with its
    halves swapped (a gather), so the rotated row is one (n, D) tile (Pallas' Triton lowering has
    no concatenation of two halves)."""

    def __init__(self, qkv_ref, cos_ref, sin_ref, D):
        self.ref = qkv_ref
        self.cols = jnp.arange(D)
        self.first = self.cols < D // 2
        self.swapped = jnp.where(self.first, self.cols + D // 2, self.cols - D // 2)
        within = jnp.where(self.first, self.cols, self.cols - D // 2)
        self.c = cos_ref[within][None, :]
        self.s = sin_ref[within][None, :]

    def raw(self, heads):
        """(n, D) f32 rows `heads` (n,) of qkv, as stored."""
        return self.ref[heads[:, None], self.cols[None, :]].astype(jnp.float32)

    def __call__(self, heads):
        """(n, D) f32: the rows rotated (`rotate_halves`) and rounded to qkv's dtype, as
        `kv_append_qkv` writes q and quantizes k."""
        x = self.raw(heads)
        xs = self.ref[heads[:, None], self.swapped[None, :]].astype(jnp.float32)
        lo, _ = rotate_halves(x, xs, self.c, self.s)    # first half: x1 c - x2 s
        _, hi = rotate_halves(xs, x, self.c, self.s)    # second half: x2 c + x1 s
        r = jnp.where(self.first[None, :], lo, hi)
        return r.astype(self.ref.dtype).astype(jnp.float32)


def _quantize_row(x, axis, append: _Append, scale_dtype):
    """(data f32, scale (1,) f32 or None) of one token's head x (1, D) / (D, 1): kv_append's
    per-(token, head) quantization (`quantize._quantize_along`, the scale rounded to
    `scale_dtype`, the dtype it is stored in); a bf16 cache keeps x."""
    if not append.fp8:
        return x, None
    (data,), scale = _quantize_along([x], axis, append.fmax, not append.interpret, scale_dtype)
    return data, scale


def _append_row(append: _Append, rope: _RowRope, h, D, v_block, cache_out, layer, pos, writes):
    """Quantize the new token's K (rotated) and V rows of KV head h and write them, with their
    scales, at position pos of `layer` (the refs of one (sequence, KV head)) where `writes` (a
    scalar bool). Every program loads and quantizes the rows, only the stores are predicated:
    behind a branch the loads would start a memory round trip of their own (SASS), after q's."""
    k_out, v_out, *scales_out = cache_out
    k = rope(jnp.full((1,), append.q_heads + h))                                    # (1, D)
    v_head = append.q_heads + append.kv_heads + h
    if v_block:   # "hsd": V stored tokens last, the row is a (D, 1) column
        v = rope.ref[jnp.full((D, 1), v_head), rope.cols[:, None]].astype(jnp.float32)
        v_at = v_out.at[layer, pos // v_block, :, pl.ds(pos % v_block, 1)]
    else:
        v = rope.raw(jnp.full((1,), v_head))
        v_at = v_out.at[layer, pl.ds(pos, 1), :]
    # Both rows loaded before either amax: a reduction's barriers would hold V's load back.
    scale_dtype = scales_out[0].dtype if scales_out else jnp.float32
    k, ks = _quantize_row(k, 1, append, scale_dtype)
    v, vs = _quantize_row(v, 0 if v_block else 1, append, scale_dtype)
    _store(k_out.at[layer, pl.ds(pos, 1), :], k, mask=jnp.broadcast_to(writes, k.shape))
    _store(v_at, v, mask=jnp.broadcast_to(writes, v.shape))
    for scale, out in zip((ks, vs), scales_out):
        _store(out.at[layer, pl.ds(pos, 1)], scale.astype(out.dtype),
               mask=jnp.broadcast_to(writes, (1,)))


def _decode_attention_kernel(layer_ref, lengths_ref, qk_scale_ref, q_ref, k_ref, v_ref, *rest,
                             block_k: int, num_blocks: int, num_splits: int, num_queries: int,
                             group: int, rows: int, max_len: int, per_token_scales: bool, dot_dtype,
                             v_boost: float, sm_scale: float, v_block: int = 0,
                             early_v: bool = False, append: _Append | None = None):
    """One (KV head, split, sequence): flash-decoding over the split's blocks (module docstring).

    With `append` (T = 1, `decode_attention_qkv`): q_ref is the sequence's qkv rows
    (Hq + 2 Hkv, D) before RoPE, lengths_ref the new token's position (the length before the
    append), cos_ref / sin_ref (D/2,) follow the scales, and the cache refs k_out, v_out
    (, ks_out, vs_out) aliased to k_ref, v_ref (, ks_ref, vs_ref) follow the partials. Every
    program rotates its query rows itself; the program whose blocks hold the new position
    quantizes the new K / V row and writes it, then (after a barrier of its threads) every
    program reads the cache through the output refs: the same memory on a GPU, and in interpret
    mode the refs that hold the writes."""
    rest = list(rest)
    ks_ref = vs_ref = None
    if per_token_scales:
        ks_ref, vs_ref = rest.pop(0), rest.pop(0)
    if append is not None:
        cos_ref, sin_ref = rest.pop(0), rest.pop(0)
    o_ref, m_ref, l_ref, *cache_out = rest
    i_split = pl.program_id(1)
    layer = layer_ref[0]
    qk_scale = qk_scale_ref[0]                       # log2(e) (* per-tensor k_scale)
    num_rows = num_queries * group
    row_ids = jnp.arange(rows, dtype=jnp.int32)
    D = k_ref.shape[-1]
    hsd = v_block > 0
    if append is None:
        kv_len = lengths_ref[0]
        q = _load(q_ref, mask=(row_ids < num_rows)[:, None], other=0.0).astype(jnp.float32)
    else:
        new_pos = lengths_ref[0]
        kv_len = jnp.minimum(new_pos + 1, max_len)
        rope = _RowRope(q_ref, cos_ref, sin_ref, D)
        h = pl.program_id(0)
        # Rows past the group repeat its last head (in bounds; their outputs are never stored).
        q = rope(h * group + jnp.minimum(row_ids, group - 1))
        k_ref, v_ref, *scale_refs = cache_out
        if per_token_scales:
            ks_ref, vs_ref = scale_refs
    # sm_scale goes on q in f32 before the f16 cast, so large queries stay in f16 range.
    q = (q * sm_scale).astype(dot_dtype)                                         # (R, D)
    # Query row r = t * G + g sits at position kv_len - T + t and sees positions <= that one.
    last_pos = kv_len - num_queries + jnp.minimum(row_ids // group, num_queries - 1)   # (R,)

    # Split i_split owns blocks [i * nb // splits, (i + 1) * nb // splits): sizes differ by <= 1.
    start = (i_split * num_blocks) // num_splits * block_k
    end = jnp.minimum((i_split + 1) * num_blocks // num_splits * block_k, kv_len)
    n_blocks = jnp.maximum(pl.cdiv(end - start, block_k), 0)
    # Blocks every query row sees in full need no mask (all but the last one or two).
    n_full = jnp.clip((kv_len - num_queries + 1 - start) // block_k, 0, n_blocks)
    needs_bounds = max_len % block_k != 0             # the last block may run past S_max
    cols = jnp.arange(block_k, dtype=jnp.int32)
    if append is not None:   # the split that holds the new position writes its row first
        own_end = (i_split + 1) * num_blocks // num_splits * block_k
        _append_row(append, rope, h, D, v_block, cache_out, layer, jnp.minimum(new_pos, max_len - 1),
                    (new_pos >= start) & (new_pos < own_end) & (new_pos < max_len))
        if not append.interpret:   # its threads' stores before any of them loads the block
            triton_compat.cta_barrier()

    def load_kv(ref, off, bounded, tokens_last=False):
        """(block_k, D) tile of tokens [off, off + block_k), or (D, block_k) of V in the "hsd"
        layout: columns [off % VB, + block_k) of token block off // VB of (NB, D, VB)."""
        if tokens_last:
            col = 0 if block_k == v_block else pl.multiple_of(off % v_block, block_k)
            kv_ref = ref.at[layer, off // v_block, :, pl.ds(col, block_k)]
        else:
            kv_ref = ref.at[layer, pl.ds(off, block_k), :]
        if bounded:
            # Tokens past S_max are not read; zero them after the upcast (Triton cannot splat an
            # int `other` into an FP8 tensor, and p = 0 must not meet a NaN pattern).
            in_bounds = (off + cols) < max_len
            in_bounds = in_bounds[None, :] if tokens_last else in_bounds[:, None]
            return jnp.where(in_bounds, _load(kv_ref, mask=in_bounds, other=None).astype(dot_dtype),
                             0.0).astype(dot_dtype)
        return kv_ref[...].astype(dot_dtype)

    def load_scales(ref, off, bounded):
        """(block_k,) f32 per-token scales of tokens [off, off + block_k) (0 past S_max)."""
        if not bounded:
            return ref[layer, pl.ds(off, block_k)].astype(jnp.float32)
        return _load(ref.at[layer, pl.ds(off, block_k)], mask=(off + cols) < max_len,
                     other=0.0).astype(jnp.float32)

    def step(j, carry, masked):
        m, l, acc = carry
        off = start + j * block_k
        bounded = masked and needs_bounds
        k = load_kv(k_ref, off, bounded)                                       # (bk, D)
        # V stored tokens last ("hsd"): the MMA reads it along tokens without byte loads.
        if early_v:
            v = load_kv(v_ref, off, bounded, tokens_last=hsd)                  # (bk, D) | (D, bk)
            vs = load_scales(vs_ref, off, bounded) if per_token_scales else None
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32)                # (R, bk)
        if per_token_scales:
            s = s * (load_scales(ks_ref, off, bounded) * qk_scale)[None, :]
        else:
            s = s * qk_scale
        if masked:
            visible = (off + cols)[None, :] <= last_pos[:, None]
            s = jnp.where(visible, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=1))
        # A row may see nothing yet (m_new = -inf): exponentiate against 0 so no inf - inf appears.
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
        alpha = jnp.exp2(m - m_use)
        p = jnp.exp2(s - m_use[:, None])
        l = l * alpha + p.sum(axis=1)
        if per_token_scales:
            if not early_v:
                vs = load_scales(vs_ref, off, bounded)
            # v_boost (a power of 2 ~ fmax / 2) keeps p * v_scale in f16's normal range; undone
            # in the combine.
            p = p * (vs * v_boost)[None, :]
        if not early_v:
            v = load_kv(v_ref, off, bounded, tokens_last=hsd)                  # (bk, D) | (D, bk)
        pv = lax.dot_general(p.astype(dot_dtype), v, (((1,), (1 if hsd else 0,)), ((), ())),
                             preferred_element_type=jnp.float32)
        acc = acc * alpha[:, None] + pv
        return m_new, l, acc

    carry = (jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32),
             jnp.zeros((rows, D), jnp.float32))
    carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
    m, l, acc = lax.fori_loop(n_full, n_blocks, functools.partial(step, masked=True), carry)
    row_mask = row_ids < num_rows
    _store(o_ref, acc, mask=row_mask[:, None])
    _store(m_ref, m, mask=row_mask)
    _store(l_ref, l, mask=row_mask)


def _combine_kernel(out_scale_ref, acc_ref, m_ref, l_ref, o_ref, *, splits, rows, chunk):
    """One (sequence, KV head, D part): o = sum_s w_s acc_s / sum_s w_s l_s,
    w_s = 2^(m_s - max_s m_s).

    acc_ref (splits_pad, rows_pad, Dc), m_ref / l_ref (splits_pad, rows_pad) f32 (entries past
    `splits` / `rows` are never written and never read: masked); o_ref (rows, Dc); Dc = D or a
    power-of-two part of it (grid axis 2)."""
    splits_pad, rows_pad = m_ref.shape
    r_ok = (jnp.arange(rows_pad) < rows)[None, :]
    ok = (jnp.arange(splits_pad) < splits)[:, None] & r_ok
    m = _load(m_ref, mask=ok, other=-jnp.inf)
    l = _load(l_ref, mask=ok, other=0.0)
    m_max = m.max(axis=0)                                               # (rows_pad,)
    m_max = jnp.where(m_max == -jnp.inf, 0.0, m_max)                  # every split empty
    l_tot = (l * jnp.exp2(m - m_max[None, :])).sum(axis=0)

    def add_chunk(c, o):
        part = pl.ds(c * chunk, chunk)
        okc = ((c * chunk + jnp.arange(chunk)) < splits)[:, None] & r_ok    # (chunk, rows_pad)
        w = jnp.exp2(_load(m_ref.at[part, :], mask=okc, other=-jnp.inf) - m_max[None, :])
        a = _load(acc_ref.at[part, :, :], mask=okc[:, :, None], other=0.0)  # (chunk, rows_pad, D)
        return o + (a * w[:, :, None]).sum(axis=0)
    o = lax.fori_loop(0, pl.cdiv(splits, chunk), add_chunk,
                      jnp.zeros(acc_ref.shape[1:], jnp.float32))
    o = o * (out_scale_ref[0] / jnp.where(l_tot == 0, 1.0, l_tot))[:, None]
    _store(o_ref.at[pl.ds(0, rows_pad), :], o, mask=r_ok.reshape(rows_pad, 1))


def _load(ref, *, mask, other):
    return triton_compat.load(ref, mask, other)


def _store(ref, val, *, mask):
    triton_compat.store(ref, val.astype(ref.dtype), mask)


def cache_dims(k_shape, layout: str):
    """(B, S, Hkv, D) of a (possibly stacked) K cache of shape k_shape in `layout`."""
    if layout == "hsd":
        B, Hkv, S, D = k_shape[-4:]
    else:
        B, S, Hkv, D = k_shape[-4:]
    return B, S, Hkv, D


def v_shape_for(k_shape, layout: str, v_block: int | None = None):
    """The V cache shape that goes with a K cache shape: like k ("sd"), or
    (..., B, Hkv, ceil(S / v_block), D, v_block) ("hsd")."""
    if layout == "sd":
        return tuple(k_shape)
    B, S, Hkv, D = cache_dims(k_shape, layout)
    return (*k_shape[:-4], B, Hkv, -(-S // v_block), D, v_block)


def v_shape_matches(k_shape, v_shape, layout: str) -> bool:
    """Whether a V cache of v_shape goes with a K cache of k_shape in `layout`."""
    if layout == "sd":
        return tuple(v_shape) == tuple(k_shape)
    if len(v_shape) != len(k_shape) + 1:
        return False
    vb = v_shape[-1]
    return (vb >= 16 and vb & (vb - 1) == 0
            and tuple(v_shape) == v_shape_for(k_shape, layout, vb))


def to_token_major(k, v, k_scale, v_scale, layout: str):
    """A cache in `layout` as "sd" arrays: k, v (..., S, Hkv, D); per-(token, head) scales
    (..., S, Hkv) (per-tensor scales and None pass through). A transpose: for references and the
    XLA path, not for a decode loop."""
    if layout == "sd":
        return k, v, k_scale, v_scale
    S = k.shape[-2]
    k_sd = jnp.swapaxes(k, -3, -2)
    *lead, Hkv, NB, D, VB = v.shape
    n = v.ndim                                              # (..., Hkv, NB, D, VB) ->
    v_sd = jnp.transpose(v, (*range(n - 4), n - 3, n - 1, n - 4, n - 2))   # (..., NB, VB, Hkv, D)
    v_sd = v_sd.reshape(*lead, NB * VB, Hkv, D)[..., :S, :, :]
    per_token = k_scale is not None and jnp.ndim(k_scale) == k.ndim - 1
    if per_token:
        k_scale, v_scale = jnp.swapaxes(k_scale, -1, -2), jnp.swapaxes(v_scale, -1, -2)
    return k_sd, v_sd, k_scale, v_scale


def _scale_mode(name, scale, k_shape, stacked):
    """'none', 'tensor' or 'token' for a k_scale / v_scale argument; raises on a bad shape.
    Per-(token, head) scales have k's shape without D, in either layout."""
    if scale is None:
        return "none"
    shape = tuple(jnp.shape(scale))
    L = k_shape[0] if stacked else None
    if shape in ((), (1,)) or (stacked and shape == (L,)):
        return "tensor"
    if shape == tuple(k_shape[:-1]):
        if jnp.dtype(jnp.result_type(scale)) not in SCALE_DTYPES:
            raise TypeError(f"{name}: expected bfloat16 or float32 per-(token, head) scales, got "
                            f"{jnp.result_type(scale)}")
        return "token"
    per_tensor = "(), (1,)" + (f" or (L,)=({L},)" if stacked else "")
    raise ValueError(f"{name}: expected a per-tensor scale of shape {per_tensor}, or a per-(token, "
                     f"head) scale of shape {tuple(k_shape[:-1])}, got {shape}")


def _validate(q, k, v, lengths, k_scale, v_scale, layer, layout="sd"):
    if q.ndim != 4:
        raise ValueError(f"q: expected (B, T, Hq, D), got shape {q.shape}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    k_axes = "(B, Hkv, S, D)" if layout == "hsd" else "(B, S, Hkv, D)"
    if k.ndim not in (4, 5):
        raise ValueError(f"k: expected {k_axes} or stacked (L, ...) for layout {layout!r}, got "
                         f"shape {k.shape}")
    if not v_shape_matches(k.shape, v.shape, layout) or v.dtype != k.dtype:
        want = (str(tuple(k.shape)) if layout == "sd" else
                "(" + ", ".join(map(str, k.shape[:-3])) + f", {k.shape[-3]}, ceil(S / VB), "
                f"{k.shape[-1]}, VB) with S={k.shape[-2]}, VB a power of two >= 16")
        raise ValueError(f"v: expected shape {want} (layout {layout!r}) and dtype {k.dtype} like "
                         f"k, got {v.shape} {v.dtype}")
    stacked = k.ndim == 5
    if stacked and layer is None:
        raise ValueError("layer: required for a stacked (L, ...) cache, got None")
    B, T, Hq, D = q.shape
    kB, S, Hkv, kD = cache_dims(k.shape, layout)
    if kB != B:
        raise ValueError(f"k: expected batch {B} (from q), got shape {k.shape}")
    if kD != D:
        raise ValueError(f"k: expected head dim D={D} (from q), got shape {k.shape}")
    if D not in (64, 128):
        raise ValueError(f"q: head dim D must be 64 or 128, got {D}")
    if Hq % Hkv:
        raise ValueError(f"q: number of query heads Hq={Hq} must be a multiple of Hkv={Hkv} "
                         f"(from k)")
    if not 1 <= T <= MAX_QUERY_TOKENS:
        raise ValueError(f"q: expected 1 <= T <= {MAX_QUERY_TOKENS} query tokens, got T={T}")
    if jnp.shape(lengths) != (B,):
        raise ValueError(f"lengths: expected shape ({B},), got {jnp.shape(lengths)}")
    if not jnp.issubdtype(jnp.result_type(lengths), jnp.integer):
        raise ValueError(f"lengths: expected an integer array, got {jnp.result_type(lengths)}")
    if not isinstance(lengths, _Tracer):
        lens = jax.device_get(lengths)
        if (lens > S).any() or (lens < T).any():
            raise ValueError(f"lengths: expected {T} <= lengths[b] <= S_max={S} (T new tokens "
                             f"included), got {lens.tolist()}")
    k_mode = _scale_mode("k_scale", k_scale, k.shape, stacked)
    v_mode = _scale_mode("v_scale", v_scale, k.shape, stacked)
    if (k_mode == "token") != (v_mode == "token"):
        raise ValueError(f"k_scale, v_scale: expected the same granularity, "
                         f"got {k_mode} and {v_mode}")
    return stacked, k_mode == "token"


def _per_layer_scalar(scale, layer, stacked):
    if scale is None:
        return jnp.float32(1.0)
    scale = jnp.asarray(scale, jnp.float32)
    if stacked and scale.ndim == 1 and scale.shape[0] > 1:
        return scale[layer]
    return scale.reshape(())


@functools.partial(jax.jit, static_argnames=("sm_scale", "config", "interpret", "partials_only",
                                             "layout", "append"))
def _decode_attention_jit(q, k, v, lengths, k_scale, v_scale, layer, cos=None, sin=None, *,
                          sm_scale, config, interpret, partials_only=False, layout="sd",
                          append: _Append | None = None):
    """The kernel and the combine; with `append`, q is qkv (B, 1, (Hq + 2 Hkv) D), lengths
    the lengths before the append, and the updated cache arrays come back after o."""
    L = k.shape[0]
    _, S, Hkv, D = cache_dims(k.shape, layout)
    if append is None:
        B, T, Hq, _ = q.shape
    else:
        B, T, Hq = q.shape[0], 1, append.q_heads
    G = Hq // Hkv
    TG = T * G
    R = max(16, pl.next_power_of_2(TG))  # MMA needs >= 16 rows
    per_token = k_scale is not None and jnp.ndim(k_scale) == 4
    v_block = v.shape[-1] if layout == "hsd" else 0
    if v_block and config.block_k > v_block:   # a kernel block lies inside one V block
        config = dataclasses.replace(config, block_k=v_block)
    if S < config.block_k:  # a block longer than the whole cache: shrink it (>= 16 for the MMA)
        config = dataclasses.replace(config, block_k=max(16, 1 << (S.bit_length() - 1)))
    splits = config.num_splits(B, Hkv, S)
    if k.dtype == jnp.bfloat16 or k.dtype == jnp.float16:
        dot_dtype = k.dtype
    else:
        dot_dtype = jnp.dtype(config.dot_dtype)

    layer_arr = jnp.asarray(layer, jnp.int32).reshape(1)
    lengths = jnp.minimum(lengths.astype(jnp.int32), S)   # never read past S_max (nor write)
    qk_scale = jnp.float32(_LOG2E)
    if not per_token:
        qk_scale = qk_scale * _per_layer_scalar(k_scale, layer_arr[0], True)
    qk_scale = qk_scale.reshape(1)
    # (B, T, Hkv, G, D) -> (B, Hkv, T*G, D): row r = t * G + g (a free reshape when T = 1).
    if append is None:
        qg = q.reshape(B, T, Hkv, G, D)
        if T > 1:
            qg = qg.transpose(0, 2, 1, 3, 4)
        qg = qg.reshape(B, Hkv, TG, D)
    v_boost = 1.0
    if per_token and dot_dtype == jnp.float16:
        v_boost = float(2.0 ** math.floor(math.log2(float(jnp.finfo(k.dtype).max) / 2)))

    kernel = functools.partial(
        _decode_attention_kernel, block_k=config.block_k,
        num_blocks=pl.cdiv(S, config.block_k), num_splits=splits,
        num_queries=T, group=G, rows=R, max_len=S, per_token_scales=per_token, dot_dtype=dot_dtype,
        v_boost=v_boost, sm_scale=sm_scale, v_block=v_block, early_v=config.early_v,
        append=append)
    if layout == "hsd":
        kv_spec = pl.BlockSpec((L, None, None, S, D), lambda h, s, b: (0, b, h, 0, 0))
        v_spec = pl.BlockSpec((L, None, None) + tuple(v.shape[3:]),
                              lambda h, s, b: (0, b, h, 0, 0, 0))
    else:
        kv_spec = v_spec = pl.BlockSpec((L, None, S, None, D), lambda h, s, b: (0, b, 0, h, 0))
    if append is None:   # the q rows of one KV head
        q_spec = pl.BlockSpec((None, None, R, D), lambda h, s, b: (b, h, 0, 0))
    else:                # the sequence's qkv rows: each program gathers its own
        qg = q.reshape(B, Hq + 2 * Hkv, D)
        q_spec = pl.BlockSpec((None, Hq + 2 * Hkv, D), lambda h, s, b: (b, 0, 0))
    in_specs = [
        pl.BlockSpec((1,), lambda h, s, b: (0,)),                       # layer
        pl.BlockSpec((1,), lambda h, s, b: (b,)),                       # lengths
        pl.BlockSpec((1,), lambda h, s, b: (0,)),                       # qk_scale
        q_spec, kv_spec, v_spec]
    args = [layer_arr, lengths, qk_scale, qg, k, v]
    caches = [k, v]
    cache_specs = [kv_spec, v_spec]
    if per_token:
        scale_spec = (pl.BlockSpec((L, None, None, S), lambda h, s, b: (0, b, h, 0))
                      if layout == "hsd" else
                      pl.BlockSpec((L, None, S, None), lambda h, s, b: (0, b, 0, h)))
        in_specs += [scale_spec, scale_spec]
        args += [k_scale, v_scale]
        caches += args[-2:]
        cache_specs += [scale_spec, scale_spec]
    if append is not None:   # cos, sin of the new position
        rope_spec = pl.BlockSpec((None, None, D // 2), lambda h, s, b: (b, 0, 0))
        in_specs += [rope_spec, rope_spec]
        args += [cos, sin]
    # Partials padded to powers of two (splits, rows) so the combine loads whole tiles; only
    # the first `splits` x TG entries are ever written or read.
    splits_pad, rows_pad = pl.next_power_of_2(splits), pl.next_power_of_2(TG)
    out_specs = [
        pl.BlockSpec((None, None, None, R, D), lambda h, s, b: (b, h, s, 0, 0)),
        pl.BlockSpec((None, None, None, R), lambda h, s, b: (b, h, s, 0)),
        pl.BlockSpec((None, None, None, R), lambda h, s, b: (b, h, s, 0))]
    out_shape = [jax.ShapeDtypeStruct((B, Hkv, splits_pad, rows_pad, D), jnp.float32),
                 jax.ShapeDtypeStruct((B, Hkv, splits_pad, rows_pad), jnp.float32),
                 jax.ShapeDtypeStruct((B, Hkv, splits_pad, rows_pad), jnp.float32)]
    aliases = {}
    if append is not None:   # the cache arrays (inputs 4, 5[, 6, 7]), updated in place
        out_specs += cache_specs
        out_shape += [jax.ShapeDtypeStruct(c.shape, c.dtype) for c in caches]
        aliases = {4 + i: 3 + i for i in range(len(caches))}
    kw = dict(interpret=True) if interpret else triton_compat.compiler_params(
        num_warps=config.num_warps, num_stages=config.num_stages)
    acc, m, l, *cache_out = pl.pallas_call(
        kernel, grid=(Hkv, splits, B), in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape, input_output_aliases=aliases, name="jfp8_decode_attention",
        **kw)(*args)
    if partials_only:  # benchmarks time the kernel without the combine
        return acc, m, l

    # Log-sum-exp combine of the splits (base 2; empty splits have m = -inf, l = 0), the value
    # scale, the bf16 cast: one Pallas launch (XLA needs three fusions for it).
    if per_token:
        out_scale = jnp.full((1,), 1.0 / v_boost, jnp.float32)
    else:
        out_scale = _per_layer_scalar(v_scale, layer_arr[0], True).reshape(1)
    # Few (sequence, KV head) pairs (B = 1: 8 programs, each walking all splits' partials,
    # latency-bound): split D too, so about COMBINE_MIN_PROGRAMS programs share the loads.
    d_parts = 1
    while (B * Hkv * d_parts < COMBINE_MIN_PROGRAMS and D // (2 * d_parts) >= 32
           and D % (2 * d_parts) == 0):
        d_parts *= 2
    dc = D // d_parts
    # Partials of up to 16K f32 are loaded at once (every load issued up front: one memory
    # latency per program); larger ones in chunks of 8K.
    chunk = splits_pad if splits_pad * rows_pad * dc <= 16384 else max(1, 8192 // (rows_pad * dc))
    o = pl.pallas_call(
        functools.partial(_combine_kernel, splits=splits, rows=TG, chunk=chunk),
        grid=(B, Hkv, d_parts),
        in_specs=[pl.BlockSpec((1,), lambda b, h, c: (0,)),
                  pl.BlockSpec((None, None, splits_pad, rows_pad, dc),
                               lambda b, h, c: (b, h, 0, 0, c)),
                  pl.BlockSpec((None, None, splits_pad, rows_pad), lambda b, h, c: (b, h, 0, 0)),
                  pl.BlockSpec((None, None, splits_pad, rows_pad), lambda b, h, c: (b, h, 0, 0))],
        out_specs=pl.BlockSpec((None, None, TG, dc), lambda b, h, c: (b, h, 0, c)),
        out_shape=jax.ShapeDtypeStruct((B, Hkv, TG, D), jnp.bfloat16),
        name="jfp8_decode_attention_combine",
        **(dict(interpret=True) if interpret else
           triton_compat.compiler_params(num_warps=8, num_stages=1)))(out_scale, acc, m, l)
    # (B, Hkv, T*G, D) -> (B, T, Hq, D): a free reshape when T = 1.
    o = o.reshape(B, Hkv, T, G, D)
    if T > 1:
        o = o.transpose(0, 2, 1, 3, 4)
    o = o.reshape(B, T, Hq, D)
    if append is None:
        return o
    k, v, *scales = cache_out
    return (o, k, v) + (tuple(scales) if scales else (None, None))


def decode_attention(q, k, v, lengths, k_scale=None, v_scale=None, *, layer=None,
                     sm_scale: float | None = None,
                     config: DecodeAttentionConfig | None = None, interpret: bool = False,
                     layout: str = "sd"):
    """Attention of T new query tokens over a (ragged) KV cache; returns (B, T, Hq, D) bfloat16.

    Args:
        q: (B, T, Hq, D) bfloat16 (or float32), 1 <= T <= 16; query head n uses KV head n // G.
        k, v: float8_e4m3fn / float8_e5m2 / bfloat16 in `layout` (module docstring), unstacked
            or stacked over layers (L, ...): "sd" k and v (B, S, Hkv, D); "hsd" k (B, Hkv, S, D),
            v (B, Hkv, ceil(S / VB), D, VB) with VB a power of two >= 16 (the kernel's block).
        lengths: (B,) int32, valid KV tokens per sequence *including* the T new ones (already
            written): query t sits at position lengths[b] - T + t and sees positions <= it.
            Needs T <= lengths[b] <= S (checked when concrete; clamped to S under jit).
        k_scale, v_scale: None (data is the value), per tensor: () / (1,) / (L,) float32 (one per
            layer), or per (token, head): k's shape without D, bfloat16 or float32.
        layer: int or int32 scalar, required with a stacked cache.
        sm_scale: softmax scale, default D ** -0.5.
        config: override the tuned `config_for(B, S, D)` ("hsd": block_k at most VB).
        interpret: run the Pallas kernel in interpret mode (CPU tests).
        layout: "sd" or "hsd" (`LAYOUTS`).
    """
    stacked, _ = _validate(q, k, v, lengths, k_scale, v_scale, layer, layout)
    D = q.shape[-1]
    sm_scale = float(D ** -0.5 if sm_scale is None else sm_scale)
    if not stacked:
        k, v = k[None], v[None]
        k_scale = k_scale if k_scale is None or jnp.ndim(k_scale) != 3 else k_scale[None]
        v_scale = v_scale if v_scale is None or jnp.ndim(v_scale) != 3 else v_scale[None]
        layer = 0
    if config is None:
        config = config_for(q.shape[0], cache_dims(k.shape, layout)[1], D)
    return _decode_attention_jit(q, k, v, lengths, k_scale, v_scale, layer, sm_scale=sm_scale,
                                 config=config, interpret=interpret, layout=layout)


def decode_attention_reference(q, k, v, lengths, k_scale=None, v_scale=None, *, layer=None,
                               sm_scale: float | None = None, config=None, interpret=False,
                               layout: str = "sd"):
    """Plain-JAX f32 reference of `decode_attention`, same signature (config/interpret ignored)."""
    del config, interpret
    stacked, per_token = _validate(q, k, v, lengths, k_scale, v_scale, layer, layout)
    k, v, k_scale, v_scale = to_token_major(k, v, k_scale, v_scale, layout)
    D = q.shape[-1]
    sm_scale = float(D ** -0.5 if sm_scale is None else sm_scale)
    if stacked:
        k, v = k[layer], v[layer]
        if per_token:
            k_scale, v_scale = k_scale[layer], v_scale[layer]
        else:
            k_scale = _per_layer_scalar(k_scale, layer, True)
            v_scale = _per_layer_scalar(v_scale, layer, True)
    return reference_math(q, k, v, jnp.asarray(lengths, jnp.int32), k_scale, v_scale,
                          sm_scale=sm_scale, per_token=per_token)


def decode_attention_qkv(qkv, cos, sin, k, v, k_scale, v_scale, lengths, *, layer,
                         num_q_heads: int, sm_scale: float | None = None,
                         config: DecodeAttentionConfig | None = None, interpret: bool = False,
                         layout: str = "sd"):
    """One decode step's attention with its own K / V append in the same launch (T = 1):
    `kv_append.kv_append_qkv` (split qkv, RoPE q and k, quantize and write k and v at position
    lengths[b]) followed by `decode_attention` over lengths + 1 tokens, without the append's
    launch or q's round trip through memory. Same cache bits; o as `decode_attention` computes
    it from the same rotated q (bit for bit in interpret mode; on the GPU up to how the compiler
    contracts RoPE's multiply-adds in the two kernels).

    Args:
      qkv: (B, 1, (Hq + 2 Hkv) D) bfloat16 / float16 / float32: q heads, then k heads, then v
        heads, before RoPE.
      cos, sin: (B, 1, D/2) float32 RoPE tables of the new position.
      k, v, k_scale, v_scale: the stacked cache (L, ...) in `layout`, as `kv_append` takes it:
        FP8 with per-(token, head) float32 scales, or bfloat16 with both scales None. Updated in
        place inside a jit that donates them or carries them through a loop.
      lengths: (B,) int32, tokens in the cache before this one (the new token's position),
        0 <= lengths[b] <= S; at S (a full cache) the write is dropped, as `kv_append` drops it,
        and the token attends the S cached ones.
      layer, sm_scale, config, interpret, layout: as for `decode_attention`.
      num_q_heads: Hq, a multiple of Hkv.
    Returns (o (B, 1, Hq, D) bfloat16, k, v, k_scale, v_scale) (scales None for a bf16 cache).
    """
    fp8, Hq, Hkv, D = _check_append(qkv, cos, sin, k, v, k_scale, v_scale, lengths, layer,
                                    num_q_heads, layout)
    sm_scale = float(D ** -0.5 if sm_scale is None else sm_scale)
    if config is None:
        config = config_for(qkv.shape[0], cache_dims(k.shape, layout)[1], D)
    append = _Append(q_heads=Hq, kv_heads=Hkv, fp8=fp8,
                     fmax=float(jnp.finfo(k.dtype).max) if fp8 else 1.0, interpret=interpret)
    return _decode_attention_jit(qkv, k, v, jnp.asarray(lengths, jnp.int32), k_scale, v_scale,
                                 layer, jnp.asarray(cos, jnp.float32), jnp.asarray(sin, jnp.float32),
                                 sm_scale=sm_scale, config=config, interpret=interpret,
                                 layout=layout, append=append)


def _check_append(qkv, cos, sin, k, v, k_scale, v_scale, lengths, layer, num_q_heads, layout):
    """Validate `decode_attention_qkv`'s arguments; returns (fp8, Hq, Hkv, D)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    if k.ndim != 5:
        raise ValueError(f"k: expected a stacked cache (L, B, ...) of rank 5, got shape {k.shape}")
    B, S, Hkv, D = cache_dims(k.shape, layout)
    if not isinstance(num_q_heads, (int, np.integer)) or num_q_heads < 1 or num_q_heads % Hkv:
        raise ValueError(f"num_q_heads: expected a positive multiple of Hkv={Hkv}, got "
                         f"{num_q_heads!r}")
    Hq = int(num_q_heads)
    if qkv.ndim != 3 or qkv.shape[:2] != (B, 1) or qkv.shape[2] != (Hq + 2 * Hkv) * D:
        raise ValueError(f"qkv: expected (B, 1, (Hq + 2 Hkv) D) = ({B}, 1, {(Hq + 2 * Hkv) * D}) "
                         f"for Hq={Hq} and the cache's Hkv={Hkv}, D={D}, got {qkv.shape}")
    if jnp.dtype(qkv.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16),
                                    jnp.dtype(jnp.float32)):
        raise TypeError(f"qkv: expected bfloat16, float16 or float32, got {qkv.dtype}")
    for name, x in (("cos", cos), ("sin", sin)):
        if tuple(jnp.shape(x)) != (B, 1, D // 2):
            raise ValueError(f"{name}: expected (B, 1, D/2) = ({B}, 1, {D // 2}), got "
                             f"{tuple(jnp.shape(x))}")
    if jnp.dtype(k.dtype) not in CACHE_DTYPES:
        raise TypeError(f"k: expected float8_e4m3fn, float8_e5m2 or bfloat16, got {k.dtype}")
    fp8 = check_cache_scales(k, k_scale, v_scale, "k")
    q = jax.ShapeDtypeStruct((B, 1, Hq, D), qkv.dtype)
    if not isinstance(lengths, _Tracer):
        lens = np.asarray(jax.device_get(lengths))
        if lens.shape == (B,) and ((lens > S) | (lens < 0)).any():
            raise ValueError(f"lengths: expected 0 <= lengths[b] <= S_max={S} (the new token's "
                             f"position), got {lens.tolist()}")
    _validate(q, k, v, jnp.minimum(jnp.asarray(lengths) + 1, S), k_scale, v_scale, layer, layout)
    return fp8, Hq, Hkv, D


def decode_attention_qkv_reference(qkv, cos, sin, k, v, k_scale, v_scale, lengths, *, layer,
                                   num_q_heads: int, sm_scale: float | None = None, config=None,
                                   interpret=False, layout: str = "sd"):
    """Plain-JAX version of `decode_attention_qkv` (same signature and results; config and
    interpret ignored): `kv_append_qkv_reference`, then `decode_attention_reference`."""
    from pallas_kernels import kv_append   # it imports this module
    del config, interpret
    _check_append(qkv, cos, sin, k, v, k_scale, v_scale, lengths, layer, num_q_heads, layout)
    q, k, v, k_scale, v_scale = kv_append.kv_append_qkv_reference(
        k, v, k_scale, v_scale, qkv, cos, sin, lengths, layer, num_q_heads=num_q_heads,
        layout=layout)
    S = cache_dims(k.shape, layout)[1]
    o = decode_attention_reference(q, k, v, jnp.minimum(jnp.asarray(lengths, jnp.int32) + 1, S),
                                   k_scale, v_scale, layer=layer, sm_scale=sm_scale, layout=layout)
    return o, k, v, k_scale, v_scale


@functools.partial(jax.jit, static_argnames=("sm_scale", "per_token"))
def reference_math(q, k, v, lengths, k_scale, v_scale, *, sm_scale: float, per_token: bool):
    """The reference's math without its kernel-shape checks (any T): f32 attention of q
    (B, T, Hq, D) over one layer's k, v (B, S, Hkv, D) dequantized with per-(token, head) scales
    (B, S, Hkv) (per_token) or scalar scales (None = 1); query t of sequence b sits at
    lengths[b] - T + t and sees positions <= it. Returns (B, T, Hq, D) bfloat16."""
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    kf = k.astype(jnp.float32)
    vf = v.astype(jnp.float32)
    if per_token:
        kf = kf * k_scale[..., None]
        vf = vf * v_scale[..., None]
    else:
        kf = kf * _per_layer_scalar(k_scale, 0, False)
        vf = vf * _per_layer_scalar(v_scale, 0, False)
    lengths = jnp.minimum(lengths, S)
    qg = q.astype(jnp.float32).reshape(B, T, Hkv, G, D)
    s = jnp.einsum("bthgd,bshd->bhgts", qg, kf, precision=lax.Precision.HIGHEST) * sm_scale
    pos = jnp.arange(S)
    last = lengths[:, None] - T + jnp.arange(T)[None, :]                  # (B, T)
    visible = pos[None, None, :] <= last[:, :, None]                      # (B, T, S)
    s = jnp.where(visible[:, None, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bhgts,bshd->bthgd", p, vf, precision=lax.Precision.HIGHEST)
    return o.reshape(B, T, Hq, D).astype(jnp.bfloat16)
