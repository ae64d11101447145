"""Decode-shaped FP8 matmul (M <= 64): weight-bandwidth bound, Pallas lowered through Triton.

    C[m, n] = sum_k (A[m, k] * sa) * (W[n, k] * sw) + bias[n]     (f32 math, bf16/f32 output)

Two modes, picked by a's dtype:
- W8A16: `a: (M, K) bfloat16 | float16`, `a_scale=None`. FP8 weights are upcast in registers to
  the activations' dtype (e4m3 is exact in both); bf16 / f16 x e4m3 products are exact in f32, so
  only the f32 summation order differs from the reference.
- Staged W8A16: `a: (M, K) float16` with `a_scale` (M, 1), from `stage_f16_rows(x)` of bf16
  activations: each row times a power of two that puts its amax in [2^14, 2^15), rounded to f16,
  which holds every bf16 value of the row exactly down to amax * 2^-31 (below that f16
  subnormals round; error <= amax * 2^-39). The MMA then runs on f16 operands: the weight's
  e4m3 -> f16 upcast is one instruction per pair where bf16 takes four (offline SASS of the M = 16
  loop: 221 instructions per K step against 320), 15-23% faster at M = 16 on the H200 with the
  conversion not timed (results/gemm_decode_h200_m16_f16act.md).
- W8A8: `a: (M, K) float8_e4m3fn` with `a_scale` (1, 1), (M, 1) or (M, ceil(K/128)) float32 (per
  tensor, per token, per 1x128 token group). Both operands are upcast to f16 (exact, and one
  conversion instruction per pair where bf16 takes four), so the products are exact too; FP8
  tensor cores (wgmma) need M >= 64 and buy nothing at these shapes.

`w: (N, K) float8_e4m3fn` (out, in), K-major, with `w_scale` in the layouts of `fp8_gemm`:
"tensor" (1, 1), "row" (N, 1), "block" (ceil(N/128), ceil(K/128)). Per-tensor / per-row scales
are applied once in the epilogue; block and token-group scales per 128-wide K block inside the
loop (each block's partial product is scaled before it joins the f32 accumulator).

The kernel reads each weight byte once: grid (ceil(ceil(N / block_n) / row_blocks), split_k); a
program walks its K range in `block_k` steps, for each of its `row_blocks` row blocks. With
split_k == 1 the program writes the final (M, N) output (scales, bias, cast and an optional
residual add fused: a transformer's skip connection costs no launch of its own) and the matmul
is one launch; with split_k > 1 it writes f32 partials that XLA sums (one small fused epilogue,
which takes the residual add too).
M is padded to a power of two >= 16 inside the kernel (masked loads, nothing is copied), since
Triton's dot needs 16 rows; M == 1 may instead use an elementwise multiply-accumulate over a
(block_n, block_k) f32 tile reduced once at the end (`use_dot=False`). `swap_ab` computes the
transposed product Wtile·Aᵀ, putting the weight in the dot's left operand (the one Hopper's wgmma
can take from registers).

Notes that apply (notes/h100.md): time decode kernels as a decode step runs them (many distinct
weights in one jit); XLA's FP8-upcast dot reads FP8 at 56-79% of the copy ceiling, which is the
figure to beat. The tuning table comes from benchmarks/gemm_decode.py (results/gemm_decode.json).

Prologues (W8A16): the activation transform before a decode matmul can run inside the kernel's
activation load instead of as its own XLA launches: "rmsnorm" (the RMSNorm before qkv and
gate/up: each program reduces the rows' 1 / rms from one whole-row load when the rows fit
`RMS_ROW_TILE`, else takes it from an XLA reduction, then scales and rounds its tiles) and
"swiglu" (silu(gate) * up before down). Every program computes the prologue of its K range for
all M rows. Measured inside an 8B decode step on the H200 (results/profile_decode_h200*.json):
"swiglu" at M = 1 costs the down GEMV ~0.7 µs and saves the SwiGLU launch; "rmsnorm" at M = 1
costs the GEMVs it feeds ~2 µs (the whole-row load is one more memory round trip per program)
and saves three launches per norm; `jfp8.matmul` dispatches both at M = 1
(`jfp8._matmul_pallas.FUSED_PROLOGUES`). The weight tile must not change layout when a prologue
joins: the norm weight loaded in the compute step made Triton convert the weight tile through
shared memory every step and the GEMV 1.5-1.75x slower (see `fetch`). `rms_norm_reference` /
`swiglu_reference` state their numerics.

Public: `fp8_gemv`, `fp8_gemv_reference`, `rms_norm_reference`, `swiglu_reference`,
`add_residual`, `to_k_blocked` / `from_k_blocked` (the K-blocked weight layout), `SplitKParts` /
`sum_split_k` (deferred split-K partials), `GemvConfig`,
`config_for`, `TUNING` / `TUNING_F16` (the tuning tables).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import triton_compat
from pallas_kernels.quantize import _finite_abs

LAYOUTS = ("tensor", "row", "block")
#: K width of one scale block ("block" weight layout, 1x128 activation groups).
SCALE_BLOCK = 128
#: Largest M this path takes; larger M belongs to the GEMM (fp8_gemm).
MAX_M = 64
FP8_DTYPES = (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2))
#: Activation transforms the kernel can fuse into its input load (W8A16).
PROLOGUES = (None, "rmsnorm", "swiglu")
ACT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
OUT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
_MIN_DOT_M = 16  # Triton's dot needs at least 16 rows
#: Largest (m_pad, next_pow2(K)) row tile, in elements, whose 1 / rms a program reduces itself.
RMS_ROW_TILE = 16384


@dataclasses.dataclass(frozen=True)
class GemvConfig:
    """Tile and launch parameters of the decode kernel.

    Attributes:
      block_n: weight rows per program (power of two; must divide 128 for the "block" layout).
      block_k: K per loop step (power of two; a multiple of 128 when scales vary along K).
      split_k: programs sharing one row block's K range (partials summed by XLA when > 1).
      use_dot: tensor-core dot on M padded to 16 rows; False = elementwise FMA (M == 1 only).
      swap_ab: compute (Wtile · Aᵀ) so the weight tile is the dot's left operand.
      prefetch: carry the next step's raw tiles through the loop (manual double buffering).
      fp8_dot: W8A8 only: feed the raw FP8 tiles to the tensor-core dot (no upcast of the
        weight); needs use_dot and K a multiple of the K chunk (no masked K lanes).
      row_blocks: row blocks each program walks one after another (strided by the number of
        programs along N): fewer, longer programs with equal work (no partial last wave), and an
        RMSNorm prologue's 1 / rms reduced once per program. Fewer programs also means fewer
        loads in flight: it paid for qkv at split-K 8, not for gate_up (TUNING's comments).
      rms_in_kernel: prologue "rmsnorm": every program reduces the rows' 1 / rms itself from one
        whole-row load (from L2: every program reads the same rows) instead of taking it from an
        XLA reduction launched before the kernel; used where the rows fit one tile
        (m_pad * next_pow2(K) <= RMS_ROW_TILE elements), else the XLA reduction.
      num_warps, num_stages: Triton launch parameters (stages = software-pipelining depth).
    """
    block_n: int = 64
    block_k: int = 256
    split_k: int = 1
    use_dot: bool = True
    swap_ab: bool = False
    prefetch: bool = False
    fp8_dot: bool = False
    row_blocks: int = 1
    rms_in_kernel: bool = True
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        for name, least in (("block_n", 1), ("block_k", 16)):
            v = getattr(self, name)
            if v < least or v & (v - 1):
                raise ValueError(f"GemvConfig.{name}: expected a power of two >= {least}, got {v}")
        if self.use_dot and self.block_n < 16:
            raise ValueError(f"GemvConfig.block_n: the dot path needs >= 16 rows, got {self.block_n}")
        for name in ("split_k", "row_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"GemvConfig.{name}: expected >= 1, got {getattr(self, name)}")


#: Largest N of the "n_tiny" class (weights with too few row blocks to fill the GPU unsplit).
N_TINY = 3072
# Tuning table: (M class, N class, K class) -> config; classes from `_shape_class`. From
# benchmarks/results/gemm_decode.json (H100 80GB HBM3, jax 0.11.2, block layout; M = 8 / 32 reuse
# the M = 16 / 64 winner) and, for M <= 16 on N <= 8192, the split-K side sweep
# results/gemm_decode_m16_splitk.json (qkv 19.2 -> 16.3 µs, o 15.3 -> 12.4, down 46.1 -> 29.9 with
# split-K 4). Every variant tried is listed in benchmarks/results/gemm_decode_sweep_log.md.
_M1 = GemvConfig(block_n=32, block_k=512, split_k=2, use_dot=False)   # FMA, 2-way split-K
_M16 = GemvConfig(block_n=32, block_k=256, split_k=1)                 # mma on M padded to 16
_M64 = GemvConfig(block_n=64, block_k=128, split_k=1)
TUNING: dict[tuple[str, str, str], GemvConfig] = {
    (m_class, n_class, k_class): cfg
    for m_class, cfg in (("m1", _M1), ("m16", _M16), ("m64", _M64))
    for n_class in ("n_small", "n_large") for k_class in ("k_short", "k_long")
}
# Few row blocks (N <= 8192): split K so that enough programs fill the 132 SMs.
# M = 16 in the 8B B=16 decode step on the H200 (results/profile_decode_h200_r2.json, run 5):
# split-K 2 for gate_up (1490 -> 1439 µs per step; the partial sum fuses into XLA's SwiGLU) and split-K 8
# for down (834 -> 813 µs; was 4 from the H100's standalone sweep).
TUNING[("m16", "n_small", "k_short")] = dataclasses.replace(_M16, split_k=2)
TUNING[("m16", "n_small", "k_long")] = dataclasses.replace(_M16, split_k=8)
TUNING[("m16", "n_large", "k_short")] = dataclasses.replace(_M16, split_k=2)
# M = 1 on N <= 8192, chosen inside a real decode step (benchmarks/profile_decode.py, 8B shape,
# B=1, 4K context): on the H100 (results/profile_decode.json) split-K 4 cut qkv 11.5 -> 10.9 µs and
# o 9.4 -> 8.1 µs per layer (bk 256), and 16-row blocks with split-K 4 cut down 26.6 -> 23.5 µs; on
# the H200 (profile_decode_h200_r2.json, run 5) split-K 8 with two row blocks per program (768
# programs, as with split-K 4) cut qkv 375 -> 325 µs per step (o 227 -> 235).
# Then no split-K at all, 8-row blocks and 1024-wide K steps (768 / 512 programs for qkv / o):
# the GEMVs are slower (qkv 324 -> 345, o 233 -> 247 µs per step) but write their outputs
# themselves, so qkv's split-K sum launch goes and o adds the residual in its epilogue (`residual`):
# GPU busy per 8B B=1 4K step 3.021 -> 2.924 ms, 1B 0.872 -> 0.853 (whose down, K = 8192, is in
# this class and got slower: 162 -> 203 µs); B=16 unchanged (profile_decode_h200_r13_residual.log).
TUNING[("m1", "n_small", "k_short")] = dataclasses.replace(_M1, block_n=8, block_k=1024, split_k=1)
TUNING[("m1", "n_small", "k_long")] = dataclasses.replace(_M1, block_n=16, block_k=256, split_k=4)
# M = 1 on N > 8192 (gate_up, lm_head) in the H200 decode step (results/profile_decode_h200_r2.json,
# runs 1 and 4): 16-row blocks, one program per row block writing the output itself (no split-K
# sum launch): gate_up 36.2 µs per call, against 37.5 + 1.2 (sum) with bn32 split-K 2 and 39.2
# with bn32 split-K 1, 37.2-41.3 with 2-4 row blocks per program; the 8B step's GPU time 3.246 ->
# 3.144 ms. ncu on the standalone gate_up
# (bn32 bk512 split-K 1, results/ncu_gemv_h200.md): 123 registers/thread cap residency at 4
# programs per SM (25% occupancy), 896 programs are 1.7 waves, SMs active 80% of the kernel,
# DRAM 64% of peak.
TUNING[("m1", "n_large", "k_short")] = dataclasses.replace(_M1, block_n=16, split_k=1)
# N <= 3072 (Llama-3.2-1B's qkv, o and down; Qwen2.5-0.5B's): few row blocks, so at M = 16 the
# n_small tile ran 128-192 programs on 132 SMs and read at 30-50% of the copy ceiling. In the 1B
# B=16 32K decode step on the H100 (results/profile_decode_h100_s13_1b.log), split-K 8 with bk256
# (512-768 programs of one or four K steps): GPU busy 4.165 -> 4.098 ms per step (qkv 90.0 -> 78.6,
# o 85.1 -> 72.1, down 195.9 -> 144.9 µs per step; split-K 4: 4.116; bn16 split-K 4: 4.294). The
# standalone sweep agrees (results/gemm_decode_h100_1b_m16.md). Other M take the n_small entries.
for (_m, _n, _k), _cfg in list(TUNING.items()):
    if _n == "n_small":
        TUNING[(_m, "n_tiny", _k)] = _cfg
del _m, _n, _k, _cfg
TUNING[("m16", "n_tiny", "k_short")] = dataclasses.replace(_M16, split_k=8)


# f16 MMA operands (staged bf16 rows, `stage_f16_rows`, or f16 activations) at M <= 16 take
# XLA's own tile for its FP8-upcast dot (16 x 128 outputs, 8 warps: the tile dump in
# results/gemv_layout_h200_m16.md). On the H200 with staged rows, staging timed
# (results/gemm_decode_h200_m16_bn128.md, µs per matmul): gate_up 45.36 -> 39.72 and lm_head
# 154.99 -> 136.17 (93% of copy) with bn128 split-K 1 (against bn32 split-K 2); down 28.98 ->
# 22.66 with bn128 split-K 8; qkv / o within 2% (13.02 / 10.45 with bn128 split-K 4), so they keep
# the table's tile. In the 8B B=16 4K decode step (gate_up and lm_head staged): 4.91 -> 4.68 ms
# (results/decode_e2e_h200_r10.md -> r11.md; r11 also has the head-major KV cache, which leaves
# attention at 4K unchanged). Staging down too (bn128 split-K 8 then applies) did not pay in the
# step (results/profile_decode_h200_r8_hsd_stage.log). Not measured on bf16 operands (their loop
# converts the weight with four instructions per pair instead of one), which keep TUNING.
TUNING_F16: dict[tuple[str, str, str], GemvConfig] = {
    ("m16", "n_large", "k_short"): dataclasses.replace(_M16, block_n=128, num_warps=8),
    ("m16", "n_small", "k_long"): dataclasses.replace(_M16, block_n=128, split_k=8, num_warps=8),
}
TUNING_F16[("m16", "n_tiny", "k_long")] = TUNING_F16[("m16", "n_small", "k_long")]


def _shape_class(m: int, n: int, k: int) -> tuple[str, str, str]:
    m_class = "m1" if m == 1 else ("m16" if m <= 16 else "m64")
    n_class = "n_tiny" if n <= N_TINY else ("n_small" if n <= 8192 else "n_large")
    k_class = "k_short" if k <= 8192 else "k_long"
    return m_class, n_class, k_class


def config_for(m: int, n: int, k: int, layout: str, *, w8a8: bool = False,
               f16_act: bool = False) -> GemvConfig:
    """The tuned config for a shape, made valid for the layout (block scales need block_n | 128
    and block_k a multiple of 128) and for the sizes (no tile wider than the padded array).
    f16_act: the activations are float16 (staged bf16 rows or f16): `TUNING_F16` first."""
    del w8a8  # one table serves both modes: the weight stream is the same
    key = _shape_class(m, n, k)
    cfg = TUNING_F16.get(key, TUNING[key]) if f16_act else TUNING[key]
    if m > 1 and not cfg.use_dot:
        cfg = dataclasses.replace(cfg, use_dot=True)
    block_n = min(cfg.block_n, max(16, _next_pow2(n)))
    block_k = min(cfg.block_k, max(16, _next_pow2(k)))
    if layout == "block":
        block_n = min(block_n, SCALE_BLOCK)
        block_k = max(block_k, SCALE_BLOCK)
    return dataclasses.replace(cfg, block_n=block_n, block_k=block_k)


def to_k_blocked(w, w_block: int = 512):
    """(N, K) weight -> its K-blocked layout (K / w_block, N, w_block): element (n, k) at
    [k // w_block, n, k % w_block], so any rows of one K block are one contiguous run (a
    (block_n, block_k <= w_block) tile of the decode kernel is block_n * block_k bytes in a row,
    where (N, K) rows hand it out as block_n pieces K bytes apart). K must be a multiple of
    w_block, w_block a multiple of 128."""
    n, k = w.shape
    if w_block % SCALE_BLOCK or k % w_block:
        raise ValueError(f"w_block: expected a multiple of {SCALE_BLOCK} dividing K={k}, got "
                         f"{w_block}")
    return w.reshape(n, k // w_block, w_block).transpose(1, 0, 2)


def from_k_blocked(w3):
    """Inverse of `to_k_blocked`: (K / w_block, N, w_block) -> (N, K)."""
    kb, n, wb = w3.shape
    return w3.transpose(1, 0, 2).reshape(n, kb * wb)


def _logical(w):
    """(N, K) of a weight given (N, K) or K-blocked (rank 3), and its K block (0 for (N, K))."""
    if len(w.shape) == 3:
        kb, n, wb = w.shape
        return (n, kb * wb), wb
    return tuple(w.shape), 0


def _next_pow2(x: int) -> int:
    return 1 << max(int(x) - 1, 0).bit_length()


# --------------------------------------------------------------------------------------------
# kernel body


def _load(ref, mask):
    """Masked load; masked-off lanes are left undefined (callers zero them after the upcast:
    Triton cannot build an FP8 `other` value)."""
    return triton_compat.load(ref, mask)


def _zero_outside(x, mask):
    return x if mask is None else jnp.where(mask, x, jnp.zeros((), x.dtype))


def _fp8_gemv_kernel(a_ref, w_ref, a_scale_ref, w_scale_ref, *rest, m, n, k, m_pad, block_n,
                     block_k, k_chunk, a_kind, w_kind, has_bias, final, use_dot, swap_ab,
                     prefetch, fp8_dot, prologue, rms_in_kernel, eps, row_blocks, mask_m, mask_n,
                     mask_k, has_residual=False, w_block=0):
    """One program: rows [n0, n0 + block_n) of W over K range [k_begin, k_begin + k_chunk), for
    `row_blocks` row blocks n0 (strided by the grid's N extent).

    a_ref (M, K), w_ref (N, K), or K-blocked (K / w_block, N, w_block) when w_block > 0
    (`to_k_blocked`), a_scale_ref ((1, 1) | (1, M) | (Kb, M): transposed so a token's
    scales are a row), w_scale_ref ((1, 1) | (1, N) | (Nb, Kb)), bias_ref (1, N) if has_bias,
    residual_ref (M, N) if has_residual (final only), o_ref (M, N) when `final`, else
    (split_k * m_pad, N) f32 partials. With prologue
    "rmsnorm" norm_ref (1, K) and, unless `rms_in_kernel`, inv_ref (1, M) (1 / rms per row) come
    before bias_ref; with "swiglu" a_ref is (M, 2K) [gate | up].

    With `prefetch`, the loop carries the raw tiles (and block scales) of the next step, so
    their loads are in flight while the current step computes (Triton's own pipeliner only
    covers loads that feed a dot).
    """
    rest = list(rest)
    norm_ref = rest.pop(0) if prologue == "rmsnorm" else None
    inv_ref = rest.pop(0) if prologue == "rmsnorm" and not rms_in_kernel else None
    bias_ref = rest.pop(0) if has_bias else None
    residual_ref = rest.pop(0) if has_residual else None
    (o_ref,) = rest
    i_split = pl.program_id(1)
    k_begin = i_split * k_chunk
    num_steps = k_chunk // block_k
    k_blocked = a_kind == "group" or w_kind == "block"
    # A K-blocked weight's sub-tiles must not straddle its K blocks.
    sub_k = SCALE_BLOCK if k_blocked or (w_block and w_block % block_k) else block_k
    num_sub = block_k // sub_k
    # MMA operands: bf16 for bf16 activations; f16 for f16 activations (bf16 would round them)
    # and for W8A8 (e4m3 is exact in f16, and e4m3x2 -> f16x2 is one conversion instruction
    # where bf16 takes four: offline SASS, benchmarks/kernel_sass.py).
    compute_dtype = jnp.float32 if not use_dot else (
        jnp.bfloat16 if a_ref.dtype == jnp.bfloat16 else jnp.float16)
    rows_m = jnp.arange(m_pad)[:, None]

    inv_rms = None
    if prologue == "rmsnorm" and rms_in_kernel:   # the rows' 1 / rms from one whole-row load
        k_pow2 = _next_pow2(k)
        cols = jnp.arange(k_pow2)[None, :]
        rm = (rows_m < m) & (cols < k) if (mask_m or k_pow2 != k) else None
        x = _zero_outside(_load(a_ref.at[pl.ds(0, m_pad), pl.ds(0, k_pow2)], rm).astype(
            jnp.float32), rm)
        inv_rms = lax.rsqrt(jnp.sum(x * x, axis=1, keepdims=True) / k + eps)   # (m_pad, 1)
    elif prologue == "rmsnorm":   # the rows' 1 / rms, (1, M) computed by XLA before the launch
        mm = (jnp.arange(m_pad)[None, :] < m) if mask_m else None
        inv_rms = _zero_outside(_load(inv_ref.at[pl.ds(0, 1), pl.ds(0, m_pad)], mm), mm)
        inv_rms = inv_rms.reshape(m_pad, 1)

    def k_mask(k0):
        return None if not mask_k else (k0 + jnp.arange(sub_k)[None, :]) < k

    def a_mask(k0):
        if not (mask_m or mask_k):
            return None
        return (rows_m < m) & ((k0 + jnp.arange(sub_k)[None, :]) < k)

    def row_block(n0):
        """The program's work on rows [n0, n0 + block_n): K loop and epilogue."""
        rows_n = n0 + jnp.arange(block_n)[:, None]

        def w_mask(k0):
            if not (mask_n or mask_k):
                return None
            return (rows_n < n) & ((k0 + jnp.arange(sub_k)[None, :]) < k)

        def scale_of(k0):
            """Scale of the 128-wide K block at k0: (m_pad, 1) | (1, m_pad) | (1, 1) f32."""
            kb = jnp.minimum(k0 // SCALE_BLOCK, pl.cdiv(k, SCALE_BLOCK) - 1)
            s = None
            if w_kind == "block":
                s = w_scale_ref[pl.ds(n0 // SCALE_BLOCK, 1), pl.ds(kb, 1)]            # (1, 1)
            if a_kind == "group":
                ma = (jnp.arange(m_pad)[None, :] < m) if mask_m else None
                sa = _zero_outside(_load(a_scale_ref.at[pl.ds(kb, 1), pl.ds(0, m_pad)], ma), ma)
                if not swap_ab:
                    sa = sa.reshape(m_pad, 1)
                s = sa if s is None else sa * s
            return s

        def prologue_of(a_raw, k0):
            """The matmul's input tile from the loaded one(s): RMSNorm or SwiGLU, rounded to a's
            dtype exactly as `rms_norm_reference` / `swiglu_reference` round."""
            if prologue == "rmsnorm":
                a_raw, nw = a_raw
                nw = _zero_outside(nw, k_mask(k0))
                y = (a_raw.astype(jnp.float32) * inv_rms).astype(a_raw.dtype)
                return (y.astype(jnp.float32) * nw.astype(jnp.float32)).astype(a_raw.dtype)
            gate, up = a_raw
            g = gate.astype(jnp.float32)
            return (g / (1.0 + jnp.exp(-g)) * up.astype(jnp.float32)).astype(gate.dtype)

        def fetch(step):
            """Raw (not yet upcast) tiles of one step, and their block scales. A prologue's second
            operand (up, or the norm weight) is loaded here too, next to the activation: loaded in
            the compute step instead, the norm weight made Triton convert the weight tile through
            shared memory every step (SASS of bn32 bk512 sk2: 1488 instructions, 105 STS, 162 SHFL,
            against 616 / 1 / 6 loaded here and 576 / 1 / 6 with no prologue;
            benchmarks/kernel_sass.py)."""
            tiles = []
            for sub in range(num_sub):
                k0 = k_begin + step * block_k + sub * sub_k
                a = _load(a_ref.at[pl.ds(0, m_pad), pl.ds(k0, sub_k)], a_mask(k0))
                if prologue == "swiglu":
                    a = (a, _load(a_ref.at[pl.ds(0, m_pad), pl.ds(k + k0, sub_k)], a_mask(k0)))
                elif prologue == "rmsnorm":
                    a = (a, _load(norm_ref.at[pl.ds(0, 1), pl.ds(k0, sub_k)], k_mask(k0)))
                if w_block:   # K-blocked: the sub-tile lies inside one K block (sub_k | w_block)
                    w_at = w_ref.at[jnp.minimum(k0, k - 1) // w_block, pl.ds(n0, block_n),
                                    pl.ds(pl.multiple_of(k0 % w_block, sub_k), sub_k)]
                else:
                    w_at = w_ref.at[pl.ds(n0, block_n), pl.ds(k0, sub_k)]
                w = _load(w_at, w_mask(k0))
                tiles.append((a, w, scale_of(k0) if k_blocked else None))
            return tiles

        def compute(step, tiles, acc):
            for sub, (a, w, s) in enumerate(tiles):
                k0 = k_begin + step * block_k + sub * sub_k
                if prologue is not None:
                    a = prologue_of(a, k0)
                if not fp8_dot:
                    # fp8_dot: undefined masked-off M / N lanes only reach output rows never stored
                    a = _zero_outside(a.astype(compute_dtype), a_mask(k0))
                    w = _zero_outside(w.astype(compute_dtype), w_mask(k0))
                if not use_dot:                               # m_pad == 1: FMA tile (block_n, sub_k)
                    part = w * (a if s is None else a * s)
                elif swap_ab:                                 # (block_n, m_pad)
                    part = lax.dot_general(w, a, (((1,), (1,)), ((), ())),
                                           preferred_element_type=jnp.float32)
                else:                                         # (m_pad, block_n)
                    part = lax.dot_general(a, w, (((1,), (1,)), ((), ())),
                                           preferred_element_type=jnp.float32)
                if use_dot and s is not None:
                    part = part * s
                acc = acc + part
            return acc

        if not use_dot:
            acc0 = jnp.zeros((block_n, sub_k), jnp.float32)
        elif swap_ab:
            acc0 = jnp.zeros((block_n, m_pad), jnp.float32)
        else:
            acc0 = jnp.zeros((m_pad, block_n), jnp.float32)
        if prefetch:
            def body(step, carry):
                acc, tiles = carry
                nxt = fetch(jnp.minimum(step + 1, num_steps - 1))   # the last step re-reads (L2)
                return compute(step, tiles, acc), nxt
            acc, _ = lax.fori_loop(0, num_steps, body, (acc0, fetch(0)))
        else:
            acc = lax.fori_loop(0, num_steps, lambda step, acc: compute(step, fetch(step), acc), acc0)
        if not use_dot:
            acc = jnp.sum(acc, axis=1)[None, :]               # (1, block_n)
        elif swap_ab:
            acc = acc.T                                       # (m_pad, block_n)

        cols_n = n0 + jnp.arange(block_n)[None, :]
        if not final:
            mask = jnp.broadcast_to(cols_n < n, acc.shape) if mask_n else None
            _store(o_ref.at[pl.ds(i_split * m_pad, m_pad), pl.ds(n0, block_n)], acc, mask)
            return
        ma = (jnp.arange(m_pad)[None, :] < m) if mask_m else None
        mn = (cols_n < n) if mask_n else None
        if a_kind == "tensor":
            acc = acc * a_scale_ref[pl.ds(0, 1), pl.ds(0, 1)]
        elif a_kind == "row":
            sa = _zero_outside(_load(a_scale_ref.at[pl.ds(0, 1), pl.ds(0, m_pad)], ma), ma)
            acc = acc * sa.reshape(m_pad, 1)
        if w_kind == "tensor":
            acc = acc * w_scale_ref[pl.ds(0, 1), pl.ds(0, 1)]
        elif w_kind == "row":
            acc = acc * _zero_outside(_load(w_scale_ref.at[pl.ds(0, 1), pl.ds(n0, block_n)], mn), mn)
        if has_bias:
            acc = acc + _zero_outside(
                _load(bias_ref.at[pl.ds(0, 1), pl.ds(n0, block_n)], mn).astype(jnp.float32), mn)
        mask = None
        if mask_m or mask_n:
            mask = (rows_m < m) & (cols_n < n)
        out = acc.astype(o_ref.dtype)
        if has_residual:   # the product rounded first, then the sum rounded: XLA's y + r
            r = _load(residual_ref.at[pl.ds(0, m_pad), pl.ds(n0, block_n)], mask)
            out = (out.astype(jnp.float32) + _zero_outside(r.astype(jnp.float32), mask)
                   ).astype(o_ref.dtype)
        _store(o_ref.at[pl.ds(0, m_pad), pl.ds(n0, block_n)], out, mask)

    if row_blocks == 1:
        row_block(pl.program_id(0) * block_n)
        return
    # Row blocks i, i + P, i + 2P, ... (P programs along N): every program gets row_blocks
    # or row_blocks - 1 of them, so all finish within one block's time of each other.
    num_row_blocks = pl.cdiv(n, block_n)
    first, stride = pl.program_id(0), pl.num_programs(0)   # read outside the loop (interpret)

    def one(t, carry):
        r = first + t * stride

        @pl.when(r < num_row_blocks)
        def _():
            row_block(r * block_n)
        return carry
    lax.fori_loop(0, row_blocks, one, 0)


_store = triton_compat.store


# --------------------------------------------------------------------------------------------
# wrapper


def _a_kind(a_scale, m: int, k: int) -> str | None:
    if a_scale is None:
        return None
    kb = -(-k // SCALE_BLOCK)
    shape = tuple(a_scale.shape)
    if shape == (1, 1):
        return "tensor"
    if shape == (m, 1):
        return "row"
    if shape == (m, kb):
        return "group"
    raise ValueError(f"a_scale: expected (1, 1), ({m}, 1) or ({m}, {kb}) float32, got {shape}")


def _check_inputs(a, w, a_scale, w_scale, layout, bias, out_dtype, prologue=None, norm_weight=None,
                  residual=None):
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    if not hasattr(a, "shape") or len(a.shape) != 2:
        raise ValueError(f"a: expected a 2-D array, got shape {getattr(a, 'shape', None)}")
    if not hasattr(w, "shape") or len(w.shape) not in (2, 3):
        raise ValueError(f"w: expected a 2-D (N, K) array or its K-blocked (K / B, N, B) form, got "
                         f"shape {getattr(w, 'shape', None)}")
    if len(w.shape) == 3 and w.shape[2] % SCALE_BLOCK:
        raise ValueError(f"w: a K-blocked weight's block (last axis) must be a multiple of "
                         f"{SCALE_BLOCK}, got {w.shape}")
    if prologue not in PROLOGUES:
        raise ValueError(f"prologue: expected one of {PROLOGUES}, got {prologue!r}")
    m, k = a.shape
    (n, kw), _ = _logical(w)
    if prologue == "swiglu":
        if k != 2 * kw:
            raise ValueError(f"a: the swiglu prologue takes (M, 2K) = [gate | up] with K={kw} "
                             f"(w is {w.shape}), got {a.shape}")
        k = kw
    if kw != k:
        logical = f" (K-blocked: N={n}, K={kw})" if len(w.shape) == 3 else ""
        raise ValueError(f"w: expected (N, K) with K={k} (a is {a.shape}), got {w.shape}{logical}")
    if prologue is not None and (a_scale is not None or jnp.dtype(a.dtype) not in ACT_DTYPES):
        raise TypeError(f"a: prologue {prologue!r} needs bfloat16/float16 activations (W8A16), "
                        f"got {a.dtype}{' with a_scale' if a_scale is not None else ''}")
    if prologue == "rmsnorm":
        if not hasattr(norm_weight, "shape") or tuple(norm_weight.shape) != (k,):
            raise ValueError(f"norm_weight: expected shape ({k},) for the rmsnorm prologue, got "
                             f"{getattr(norm_weight, 'shape', None)}")
    elif norm_weight is not None:
        raise ValueError(f"norm_weight: only the rmsnorm prologue takes one "
                         f"(prologue={prologue!r})")
    if m < 1 or m > MAX_M:
        raise ValueError(f"a: expected 1 <= M <= {MAX_M} rows (decode path; use fp8_gemm for "
                         f"more), got M={m}")
    if n < 1 or k < 1:
        raise ValueError(f"w: expected non-empty (N, K), got {w.shape}")
    if jnp.dtype(w.dtype) not in FP8_DTYPES:
        raise TypeError(f"w: expected float8_e4m3fn or float8_e5m2, got {w.dtype}")
    a_dtype = jnp.dtype(a.dtype)
    if a_dtype in FP8_DTYPES:
        if a_scale is None:
            raise ValueError("a_scale: an FP8 `a` (W8A8) needs its scales, got None")
    elif a_dtype == jnp.float16 and a_scale is not None:
        pass   # f16 rows with their scales: bf16 activations staged by `stage_f16_rows`
    elif a_dtype in ACT_DTYPES:
        if a_scale is not None:
            raise ValueError(f"a_scale: expected None for a {a_dtype} `a` (W8A16), got an array")
    else:
        raise TypeError(f"a: expected bfloat16 / float16 (W8A16) or float8_e4m3fn (W8A8), got {a.dtype}")
    kind = _a_kind(a_scale, m, k)
    if a_scale is not None and jnp.dtype(a_scale.dtype) != jnp.float32:
        raise TypeError(f"a_scale: expected float32, got {a_scale.dtype}")
    expected = {"tensor": (1, 1), "row": (n, 1),
                "block": (-(-n // SCALE_BLOCK), -(-k // SCALE_BLOCK))}[layout]
    if not hasattr(w_scale, "shape") or tuple(w_scale.shape) != expected:
        raise ValueError(f"w_scale: expected {expected} float32 for layout {layout!r}, got "
                         f"{getattr(w_scale, 'shape', None)}")
    if jnp.dtype(w_scale.dtype) != jnp.float32:
        raise TypeError(f"w_scale: expected float32, got {w_scale.dtype}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias: expected shape ({n},), got {bias.shape}")
    if jnp.dtype(out_dtype) not in OUT_DTYPES:
        raise TypeError(f"out_dtype: expected one of bfloat16, float16, float32, got {out_dtype}")
    if residual is not None:
        if tuple(getattr(residual, "shape", ())) != (m, n):
            raise ValueError(f"residual: expected shape ({m}, {n}) like the output, got "
                             f"{getattr(residual, 'shape', None)}")
        if not jnp.issubdtype(residual.dtype, jnp.floating):
            raise TypeError(f"residual: expected a float array, got {residual.dtype}")
    return kind


def fp8_gemv(a, w, a_scale, w_scale, *, layout, bias=None, out_dtype=jnp.bfloat16,
             prologue: str | None = None, norm_weight=None, eps: float = 1e-6,
             residual=None, config: GemvConfig | None = None, interpret: bool = False,
             defer_sum: bool = False):
    """C = (P(a) · sa) · (w · sw)ᵀ + bias for decode shapes (M <= 64), plus `residual` when given.

    P is the identity, or a prologue fused into the kernel's activation load (W8A16 only):
    "rmsnorm" = `rms_norm_reference(a, norm_weight, eps)` (the rows' 1 / rms reduced by XLA before
    the launch, the normalisation in the kernel); "swiglu" = `swiglu_reference(a)` on
    a = [gate | up].

    Args:
      a: (M, K) bfloat16/float16 (W8A16, a_scale None) or float8_e4m3fn (W8A8); (M, 2K) for the
        swiglu prologue.
      w: (N, K) float8_e4m3fn weights, or their K-blocked form (K / B, N, B) (`to_k_blocked`,
        B a multiple of 128 dividing K): every tile the kernel reads is then one contiguous run.
      a_scale: None, or (1, 1) | (M, 1) | (M, ceil(K/128)) float32.
      w_scale: float32, (1, 1) | (N, 1) | (ceil(N/128), ceil(K/128)) for layout
        "tensor" | "row" | "block".
      layout: the weight scale layout.
      bias: optional (N,) array, added in f32 before the output cast.
      out_dtype: bfloat16 (default), float16 or float32.
      prologue: None, "rmsnorm" or "swiglu".
      norm_weight: (K,) RMSNorm weight (prologue "rmsnorm").
      eps: RMSNorm epsilon (prologue "rmsnorm").
      residual: optional (M, N) float array added to the output: C rounded to out_dtype, plus
        residual in f32, rounded to out_dtype again (XLA's `C + residual`), in the kernel's
        epilogue when it writes C itself (split_k == 1: one launch for both), else with the
        split-K sum.
      config: GemvConfig override; default `config_for(M, N, K, layout)`.
      interpret: run the Pallas kernel in interpret mode (CPU tests).
      defer_sum: where the kernel runs split-K and nothing but the sum (then the rows'
        activation scales, the cast and the residual) follows it ("block" weights, no bias, no
        per-tensor activation scale), return the f32 partials unsummed, `SplitKParts`, for the
        next kernel to sum as it loads them (`sum_split_k` is that sum); the residual is then
        left to the caller.
    Returns: (M, N) out_dtype, or `SplitKParts` (defer_sum).
    """
    a_kind = _check_inputs(a, w, a_scale, w_scale, layout, bias, out_dtype, prologue, norm_weight,
                           residual)
    m = a.shape[0]
    (n, k), w_block = _logical(w)
    if config is None:
        cfg = config_for(m, n, k, layout, w8a8=jnp.dtype(a.dtype) in FP8_DTYPES,
                         f16_act=jnp.dtype(a.dtype) == jnp.float16)
    else:
        cfg = config
    k_blocked = a_kind == "group" or layout == "block"
    if k_blocked and cfg.block_k % SCALE_BLOCK:
        raise ValueError(f"config: block_k must be a multiple of {SCALE_BLOCK} when scales vary "
                         f"along K, got {cfg.block_k}")
    if layout == "block" and SCALE_BLOCK % cfg.block_n:
        raise ValueError(f"config: block_n must divide {SCALE_BLOCK} for the block layout, got "
                         f"{cfg.block_n}")
    if not cfg.use_dot and m != 1:
        raise ValueError(f"config: use_dot=False needs M == 1, got M={m}")
    if w_block and cfg.block_k % SCALE_BLOCK:
        raise ValueError(f"config: block_k must be a multiple of {SCALE_BLOCK} for a K-blocked "
                         f"weight, got {cfg.block_k}")
    defer = defer_sum and layout == "block" and bias is None and a_kind in (None, "group", "row")
    out = _fp8_gemv_jit(a, w, a_scale, w_scale, bias, norm_weight, residual,
                        layout=layout, a_kind=a_kind, out_dtype=jnp.dtype(out_dtype),
                        prologue=prologue, eps=float(eps) if prologue == "rmsnorm" else 0.0,
                        cfg=cfg, interpret=interpret, defer=defer)
    if out.ndim != 3:
        return out
    return SplitKParts(out, m, a_scale if a_kind == "row" else None)


class SplitKParts(NamedTuple):
    """A split-K decode matmul's f32 partials, not yet summed: parts (S, m_pad, N), rows [0, m)
    valid, and the rows' activation scales (m, 1) f32 when they apply after the sum (staged f16
    rows) else None; the output is `sum_split_k(parts, m, out_dtype, row_scale=row_scale)`."""
    parts: jax.Array
    m: int
    row_scale: jax.Array | None = None


def sum_split_k(parts, m: int, out_dtype, residual=None, *, row_scale=None):
    """The output of split-K partials parts (S, m_pad, N) f32: summed in split order, rows
    [0, m), times row_scale (m, 1) when given, rounded to out_dtype, then `add_residual` (what
    `fp8_gemv` returns for them)."""
    acc = _sum_in_order(parts)[:m]
    if row_scale is not None:
        acc = acc * row_scale
    return add_residual(acc.astype(out_dtype), residual)


def _sum_in_order(parts):
    """parts (S, ...) summed as ((p0 + p1) + p2) + ...: one order for XLA and for the kernels
    that sum deferred partials as they load them, so every consumer gets the same bits."""
    acc = parts[0]
    for i in range(1, parts.shape[0]):
        acc = acc + parts[i]
    return acc


@functools.partial(jax.jit, static_argnames=("layout", "a_kind", "out_dtype", "prologue", "eps",
                                             "cfg", "interpret", "defer"))
def _fp8_gemv_jit(a, w, a_scale, w_scale, bias, norm_weight, residual, *, layout, a_kind,
                  out_dtype,
                  prologue, eps, cfg, interpret, defer=False):
    m = a.shape[0]
    (n, k), w_block = _logical(w)
    m_pad = max(_MIN_DOT_M, _next_pow2(m)) if cfg.use_dot else 1
    split_k = cfg.split_k
    k_chunk = pl.cdiv(pl.cdiv(k, split_k), cfg.block_k) * cfg.block_k
    split_k = pl.cdiv(k, k_chunk)  # drop programs that would own no K at all
    final = split_k == 1
    fp8_dot = (cfg.fp8_dot and cfg.use_dot and a_kind is not None and k % k_chunk == 0
               and a.dtype == w.dtype)
    row_blocks = min(cfg.row_blocks, pl.cdiv(n, cfg.block_n))
    grid = (pl.cdiv(pl.cdiv(n, cfg.block_n), row_blocks), split_k)
    # Scales as rows: a token's scales along the last axis, so one masked (1, m_pad) load
    # fetches them; weight row scales as (1, N) for the same reason.
    if a_kind is None:
        a_s = jnp.ones((1, 1), jnp.float32)
    elif a_kind == "tensor":
        a_s = a_scale
    else:
        a_s = a_scale.T                                    # (1, M) or (Kb, M)
    w_s = w_scale.reshape(1, n) if layout == "row" else w_scale
    operands = [a, w, a_s, w_s]
    rms_in_kernel = cfg.rms_in_kernel and m_pad * _next_pow2(k) <= RMS_ROW_TILE
    if prologue == "rmsnorm":
        operands.append(norm_weight.astype(a.dtype).reshape(1, k))
        if not rms_in_kernel:
            operands.append(rms_inv_reference(a, eps).reshape(1, m))
    if bias is not None:
        operands.append(bias.reshape(1, n))
    if residual is not None and final:
        operands.append(residual)
    body = functools.partial(
        _fp8_gemv_kernel, m=m, n=n, k=k, m_pad=m_pad, block_n=cfg.block_n, block_k=cfg.block_k,
        k_chunk=k_chunk, a_kind=a_kind or "none", w_kind=layout, has_bias=bias is not None,
        final=final, use_dot=cfg.use_dot, swap_ab=cfg.swap_ab, prefetch=cfg.prefetch,
        fp8_dot=fp8_dot, prologue=prologue, rms_in_kernel=rms_in_kernel, eps=eps,
        row_blocks=row_blocks, has_residual=residual is not None and final, w_block=w_block,
        mask_m=m != m_pad,
        mask_n=n % cfg.block_n != 0, mask_k=k % k_chunk != 0)
    if final:
        out_shape = jax.ShapeDtypeStruct((m, n), out_dtype)
    else:
        out_shape = jax.ShapeDtypeStruct((split_k * m_pad, n), jnp.float32)
    if interpret:
        kw = dict(interpret=True)
    else:
        kw = triton_compat.compiler_params(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    out = pl.pallas_call(body, grid=grid, out_shape=out_shape, name="fp8_gemv", **kw)(*operands)
    if final:
        return out
    if defer:   # the epilogue is the sum alone: left to the next kernel (3-D: fp8_gemv wraps it)
        return out.reshape(split_k, m_pad, n)
    acc = _sum_in_order(out.reshape(split_k, m_pad, n))[:m]
    if a_kind in ("tensor", "row"):
        acc = acc * a_scale
    if layout in ("tensor", "row"):
        acc = acc * w_scale.reshape(1, -1)
    if bias is not None:
        acc = acc + bias.astype(jnp.float32)
    return add_residual(acc.astype(out_dtype), residual)


def add_residual(y, residual):
    """y + residual as XLA adds them: in f32, rounded to y.dtype (y returned if residual is
    None)."""
    if residual is None:
        return y
    return (y.astype(jnp.float32) + residual.astype(jnp.float32)).astype(y.dtype)


def _expand(scale, rows: int, cols: int):
    """Repeat a (1,1) / (R,1) / (R, ceil(cols/128)) / (ceil(rows/128), ...) scale to (rows, cols)."""
    r_block = 1 if scale.shape[0] == rows else (rows if scale.shape[0] == 1 else SCALE_BLOCK)
    c_block = cols if scale.shape[1] == 1 else SCALE_BLOCK
    full = jnp.repeat(jnp.repeat(scale, r_block, axis=0), c_block, axis=1)
    return full[:rows, :cols]


def rms_inv_reference(x, eps: float):
    """1 / rms of each row of x (..., K): rsqrt(mean(x**2) + eps) in f32, shape (..., 1)."""
    x32 = x.astype(jnp.float32)
    return lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


def rms_norm_reference(x, weight, eps: float):
    """RMSNorm as HF Llama computes it: x (..., K) normalised in f32, cast to x.dtype, times
    weight (K,) in x.dtype (one rounding: the product of two x.dtype values is exact in f32)."""
    y = (x.astype(jnp.float32) * rms_inv_reference(x, eps)).astype(x.dtype)
    return (y.astype(jnp.float32) * weight.astype(x.dtype).astype(jnp.float32)).astype(x.dtype)


def swiglu_reference(x):
    """SwiGLU on x (..., 2F) = [gate | up]: silu(gate) * up in f32, rounded once to x.dtype."""
    f = x.shape[-1] // 2
    g = x[..., :f].astype(jnp.float32)
    return (g / (1.0 + jnp.exp(-g)) * x[..., f:].astype(jnp.float32)).astype(x.dtype)


def stage_f16_rows(a):
    """bf16 / f16 activations (M, K) -> (f16 rows (M, K), scales (M, 1) f32), a ~ rows *
    scales: each row times 2^-e, e = floor(log2(amax of its finite values)) - 14 (e = 0 for an
    all-zero row), so the row's amax lands in [2^14, 2^15) (f16 max 65504) and its bf16 values
    stay exact in f16 down to amax * 2^-31. Non-finite values stay non-finite. XLA ops (a row
    reduction and one scaling pass), jittable; `fp8_gemv` takes the pair as W8A8 takes FP8 rows.
    f32 activations are refused: f16 would round their 24-bit significands."""
    if not hasattr(a, "shape") or len(a.shape) != 2:
        raise ValueError(f"a: expected a 2-D (M, K) array, got shape {getattr(a, 'shape', None)}")
    if jnp.dtype(a.dtype) not in ACT_DTYPES:
        raise TypeError(f"a: expected bfloat16 or float16 activations, got {a.dtype}")
    x = a.astype(jnp.float32)
    amax = jnp.max(_finite_abs(x), axis=1, keepdims=True)
    _, ex = jnp.frexp(amax)                         # amax = f * 2^ex, f in [0.5, 1)
    e = jnp.where(amax > 0, ex - 15, 0)             # floor(log2(amax)) - 14
    return jnp.ldexp(x, -e).astype(jnp.float16), jnp.ldexp(jnp.ones_like(amax), e)


def fp8_gemv_reference(a, w, a_scale, w_scale, *, layout, bias=None, out_dtype=jnp.bfloat16,
                       prologue=None, norm_weight=None, eps=1e-6, residual=None, config=None,
                       interpret=False):
    """Plain jax.numpy version of `fp8_gemv` (same signature; config/interpret ignored): the
    prologue, then both operands dequantized in f32, f32 matmul at HIGHEST precision, bias, one
    output cast, then `add_residual`."""
    del config, interpret
    _check_inputs(a, w, a_scale, w_scale, layout, bias, out_dtype, prologue, norm_weight,
                  residual)
    if len(w.shape) == 3:
        w = from_k_blocked(w)
    if prologue == "rmsnorm":
        a = rms_norm_reference(a, norm_weight, eps)
    elif prologue == "swiglu":
        a = swiglu_reference(a)
    m, k = a.shape
    n = w.shape[0]
    af = a.astype(jnp.float32)
    if a_scale is not None:
        af = af * _expand(a_scale, m, k)
    wf = w.astype(jnp.float32) * _expand(w_scale, n, k)
    out = jnp.dot(af, wf.T, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    if bias is not None:
        out = out + bias.astype(jnp.float32)
    return add_residual(out.astype(out_dtype), residual)
