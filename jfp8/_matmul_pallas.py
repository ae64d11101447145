"""The Pallas branches of `jfp8.matmul` (backends "pallas" and "interpret").

Called by `jfp8.ops.matmul` with x2 an (M, K) array or QArray, wq an (N, K) QArray and a concrete
recipe. "interpret" runs the same kernels with interpret=True (CPU tests). The numerics contract is
the one of `jfp8.ops` on every path: activations are quantized exactly as `jfp8.quantize` does
(the quantize kernel is bit-exact with it), products are exact, sums are f32, bias in f32, one
output cast. So backends differ only by f32 summation order (and, for FP8 tensor cores, the
per-128-K promotion).

Which kernel, by shape and recipe:

| case | kernel |
|---|---|
| M <= 64, weights-only recipe, x bf16/f16 | `fp8_gemv` W8A16 (FP8 weights upcast in registers; bf16 x staged into f16 rows first where `F16_STAGING_*` say) |
| M <= 64, FP8 activations (x quantized here, or given as a QArray) | `fp8_gemv` W8A8, or `fp8_gemm` where `DECODE_KERNEL` measured it faster |
| M > 64, FP8 activations, matching scale layouts (tensor/tensor, row/row, 1x128 / 128x128) | `fp8_gemm` (Triton) or its Mosaic GPU twin, per `pick_gemm_backend` |
| anything else (f32 W8A16 activations, M > 64 weights-only, other granularities) | the XLA path |

Prologues (RMSNorm, SwiGLU) run inside `fp8_gemv` on the W8A16 path at M <=
`FUSED_PROLOGUE_MAX_M`; at 2 <= M <= 16 (W8A16, bf16 x) each runs as one Pallas launch that also
stages the rows to f16 (`pallas_kernels.prologue_stage`, `NORM_STAGE_FUSED` / `SWIGLU_STAGE_FUSED`).
Inside `fp8_gemv`, every program recomputes the prologue of its K range for all M rows (and,
for RMSNorm, the rows' 1 / rms from one whole-row load); nothing at M = 1, but half the weight's
element count in exps at M = 16, which made the 8B step at B = 16 slower than BF16 on the H200
(results/decode_e2e_h200.json, 9.3 vs 6.5 ms). Elsewhere XLA applies the prologue before the
chosen kernel. Measured inside an 8B decode step at B = 1, 4K context on the H200
(results/profile_decode_h200_r2.json): the fused RMSNorm makes the GEMVs it feeds longer (qkv
9.1 -> 11.7 µs, gate_up 35.6 -> 37.5 µs per call: one more memory round trip per program) and
removes the three XLA launches of each norm (sum of squares, normalise, residual add folded into
one): 501 -> 372 launches per step, GPU-busy time equal (3.285 vs 3.281 ms), wall under the
profiler 3.52 -> 3.46 ms (decode_e2e's wall: 3.26 -> 3.24-3.27 ms, within its run-to-run spread).

Activation quantization on the fly uses the fused `quantize_fp8` kernel for 1x128 groups and
per-tensor scales, and `jfp8.quantize` (XLA) for per-token (PerChannel) scales.

Weights-only (W8A16) vs W8A8 is the recipe's choice, not a speed choice: the two compute
different functions (W8A8 rounds the activations to FP8), and the contract says every backend
computes the same one. The measured cost of each at decode shapes is in
benchmarks/results/gemm_decode.md (W8A8 pays the extra quantize launch).
"""
from __future__ import annotations

import functools

import jax.numpy as jnp

from jfp8.pending import PendingSum, materialize
from jfp8.prologue import RMSNorm, SwiGLU
from jfp8.qarray import QArray, quantize
from jfp8.recipe import Recipe
from jfp8.scaling import PerBlock, PerChannel, PerTensor
from pallas_kernels import fp8_gemv, prologue_stage
from pallas_kernels import quantize as quantize_kernel

#: Largest M the decode kernel takes.
DECODE_MAX_M = fp8_gemv.MAX_M
#: Prologues dispatch fuses into the decode kernel (measured faster inside a decode step), and
#: the largest M it does so at.
FUSED_PROLOGUES = (RMSNorm, SwiGLU)
FUSED_PROLOGUE_MAX_M = 1

# W8A8 at M <= 64: decode kernel ("gemv") or the prefill GEMM ("gemm"), per M class (M == 1 /
# M <= 16 / M <= 64), from the block-layout rows of benchmarks/results/gemm_decode.json (H100,
# same run, quantize included in both): M = 1 gemv 11-33 µs vs gemm 20-55 µs on the small
# projections (equal on lm_head); M = 8..64 gemm wins everywhere (e.g. qkv M = 16: 21.6 vs 37.5 µs,
# lm_head M = 16: 203 vs 458 µs), the gemv's per-128-K group-scale path being slow at M > 1.
DECODE_KERNEL: dict[str, str] = {"m1": "gemv", "m16": "gemm", "m64": "gemm"}
# W8A16 with bf16 x at 2 <= M <= F16_STAGING_MAX_M on weights of >= F16_STAGING_MIN_WEIGHT
# elements: x goes through `fp8_gemv.stage_f16_rows` (per-row power of two, f16; exact for the
# bf16 values that matter, see there) so the kernel's MMA runs on f16 operands. Standalone at
# M = 16 on the H200 (results/gemm_decode_h200_m16_f16act.md, staging not timed): qkv 16.2 ->
# 12.9 µs, o 12.9 -> 10.6, gate_up 51.3 -> 39.7, down 29.8 -> 25.5. The staging (XLA row
# reduction + scaling) costs ~4 µs per matmul inside a step, so only large weights gain: 8B
# B=16 4K decode step 5.24 ms unstaged, 5.11 staging all four projections, 4.99 staging weights
# >= 2^26 elements (gate_up, lm_head); 1B B=16 32K 4.00 / 4.14 / 4.00 ms
# (results/decode_e2e_h200_r7.md, _r8_f16stage.md, _r9_f16stage_big.md). M = 1 runs an FMA
# loop in f32 (no MMA to feed). Staged rows then take `fp8_gemv.TUNING_F16`'s tile (gate_up
# 45.4 -> 39.7 µs at M = 16 standalone, results/gemm_decode_h200_m16_bn128.md).
F16_STAGING_MAX_M = 16
F16_STAGING_MIN_WEIGHT = 1 << 26
# An RMSNorm prologue at 2 <= M <= F16_STAGING_MAX_M (W8A16, bf16 x) runs as one Pallas launch
# that also stages the rows (`pallas_kernels.prologue_stage`), in place of XLA's two norm launches
# and two staging launches; staging then costs nothing, so it applies at every weight size (qkv
# too; F16_STAGING_MIN_WEIGHT still rules inputs without a norm: o, down). In the 8B B=16 4K
# decode step on the H200: norm + staging 337 -> 141 µs per step, qkv 421 -> 334 µs, GPU busy
# 4.786 -> 4.627 ms (results/profile_decode_h200_r9_normstage.log). False: the previous dispatch.
NORM_STAGE_FUSED = True
# The same for a SwiGLU prologue (down's input): one launch in place of XLA's SwiGLU fusion, and
# down then takes f16 rows (TUNING_F16's bn128 split-K 8) at any weight size. In the 8B B=16 4K
# decode step on the H200 (results/profile_decode_h200_r10_swiglustage.log, one call): down
# 817 -> 611 µs per step, the SwiGLU 70 µs (XLA) -> 150 µs (this kernel: 16 programs, one per
# row), GPU busy 4.665 -> 4.532 ms, wall 4.785 -> 4.598 ms. False: XLA's SwiGLU, bf16 rows.
SWIGLU_STAGE_FUSED = True
# `jfp8.matmul(defer_sum=True)` returns a split-K decode matmul's partials unsummed
# (`jfp8.PendingSum`) for the next RMSNorm's staging kernel to sum with the residual
# (`prologue_stage.sum_rms_norm_stage_f16`): one XLA sum launch fewer per deferred matmul. In an
# 8B B=16 4K step those sums (o's and down's, with the skip connection) take ~100 µs of GPU time
# (results/profile_decode_h200_r14_sums.log). Off until timed in the step: built without a GPU.
DEFER_SPLIT_K_SUMS = False
# W8A16 decode matmuls go to the Mosaic GPU decode kernel (`pallas_kernels.fp8_gemv_mgpu`:
# TMA-streamed weight tiles) where it takes the shape: staged f16 rows (2 <= M <= 16) to its
# wgmma kernel, one bf16 row (M = 1) to its FMA kernel with the RMSNorm / SwiGLU prologue and
# the residual fused as in fp8_gemv. Off until timed: built without a GPU (session 14);
# benchmarks/profile_decode.py's `mgpu:1` variant and gemm_decode.py --mgpu time it.
MGPU_GEMV = False

_E4M3 = jnp.dtype(jnp.float8_e4m3fn)


def _m_class(m: int) -> str:
    return "m1" if m == 1 else ("m16" if m <= 16 else "m64")


def _scale_layout(q: QArray, block: tuple[int, int], block_name: str) -> str | None:
    """The kernel name of a 2-D QArray's scale layout: "tensor", "row" (one scale per row), or
    `block_name` for `block`-shaped scale blocks; None if no kernel takes it."""
    g = q.granularity
    if isinstance(g, PerTensor):
        return "tensor"
    if isinstance(g, PerChannel) and g.axis % 2 == 0:
        return "row"
    if isinstance(g, PerBlock) and g.block_shape(q.shape) == block:
        return block_name
    return None


def weight_layout(wq: QArray) -> str | None:
    """The kernel scale layout of a 2-D (N, K) weight: "tensor", "row", "block" (128x128) or None."""
    return _scale_layout(wq, (128, 128), "block")


def act_kind(xq: QArray) -> str | None:
    """The activation scale kind of a 2-D (M, K) QArray: "tensor", "row", "group" (1x128) or None."""
    return _scale_layout(xq, (1, 128), "group")


def quantize_activations(x2, recipe: Recipe, *, interpret: bool) -> QArray:
    """(M, K) x -> QArray per the recipe's activation format and granularity (bit-exact with
    `jfp8.quantize`), through the fused kernel where it has the layout."""
    fmt, gran = recipe.act_format, recipe.act_granularity
    layout = None
    if isinstance(gran, PerTensor):
        layout = "tensor"
    elif isinstance(gran, PerBlock) and gran.block_shape(x2.shape) == (1, 128):
        layout = "group"
    if layout is None or jnp.dtype(x2.dtype) not in quantize_kernel.IN_DTYPES:
        return quantize(x2, fmt, gran)
    data, scale = quantize_kernel.quantize_fp8(x2, layout=layout, dtype=fmt.dtype, interpret=interpret)
    return QArray(data=data, scale=scale, format=fmt, granularity=gran)


def _mgpu_takes(a, a_scale, wq: QArray, w_layout: str, interpret: bool, prologue=None,
                **_) -> bool:
    """Whether `fp8_gemv_mgpu` runs this decode matmul: staged f16 rows with their (M, 1)
    scales and no prologue, or one bf16 / f16 row (a prologue allowed); an e4m3 (N, K) weight
    of a shape it takes; a Hopper GPU (or the interpreter)."""
    from pallas_kernels import fp8_gemv_mgpu
    m = a.shape[0]
    n, k = wq.shape
    staged = (jnp.dtype(a.dtype) == jnp.float16 and a_scale is not None
              and tuple(a_scale.shape) == (m, 1) and prologue is None)
    one_row = m == 1 and a_scale is None and jnp.dtype(a.dtype) in fp8_gemv.ACT_DTYPES
    return ((staged or one_row) and wq.data.ndim == 2
            and jnp.dtype(wq.dtype) == _E4M3 and w_layout is not None
            and fp8_gemv_mgpu.supports(m, n, k, prologue=prologue)
            and (fp8_gemv_mgpu._INTERPRET_ERROR is None if interpret
                 else fp8_gemv_mgpu.available()))


def matmul(x2, wq: QArray, *, bias, out_dtype, recipe: Recipe, interpret: bool,
           prologue: RMSNorm | SwiGLU | None = None, residual=None, defer_sum: bool = False):
    """y (M, N) = P(x2) · wqᵀ (+ bias) (+ residual (M, N), `fp8_gemv.add_residual`) on the
    Pallas kernels, XLA where none fits; the decode kernel adds the residual in its epilogue.
    x2 may be a `jfp8.PendingSum` with an RMSNorm prologue (summed by the staging kernel where
    it runs); with `defer_sum` (and DEFER_SPLIT_K_SUMS) a split-K decode matmul returns one."""
    from jfp8 import ops  # the XLA path lives there; imported late (ops imports this module lazily)

    w_layout = weight_layout(wq)
    m = x2.shape[0]
    plus = functools.partial(fp8_gemv.add_residual, residual=residual)
    fallback = lambda x: plus(ops._matmul_xla(x, wq, bias=bias, out_dtype=out_dtype,
                                              recipe=recipe))

    def gemv(a, a_scale, **kw):
        if MGPU_GEMV and _mgpu_takes(a, a_scale, wq, w_layout, interpret, **kw):
            from pallas_kernels import fp8_gemv_mgpu
            return fp8_gemv_mgpu.fp8_gemv_mgpu(a, wq.data, a_scale, wq.scale, layout=w_layout,
                                               bias=bias, out_dtype=out_dtype, residual=residual,
                                               interpret=interpret, **kw)
        y = fp8_gemv.fp8_gemv(a, wq.data, a_scale, wq.scale, layout=w_layout, bias=bias,
                              out_dtype=out_dtype, residual=residual, interpret=interpret,
                              defer_sum=defer_sum and DEFER_SPLIT_K_SUMS, **kw)
        if isinstance(y, fp8_gemv.SplitKParts):
            return PendingSum(y, out_dtype, residual, (m, wq.shape[0]))
        return y
    gemv_w8a16 = (w_layout is not None and 0 < m <= DECODE_MAX_M and recipe.act_format is None
                  and not isinstance(x2, QArray) and jnp.dtype(x2.dtype) in fp8_gemv.ACT_DTYPES)
    # W8A16 rows the f16 staging applies to (a prologue keeps x2's dtype).
    f16_rows = gemv_w8a16 and 2 <= m <= F16_STAGING_MAX_M and jnp.dtype(x2.dtype) == jnp.bfloat16
    if prologue is not None:
        staged = None
        if f16_rows and NORM_STAGE_FUSED and isinstance(prologue, RMSNorm) and \
                isinstance(x2, PendingSum):   # the split-K sum and the residual in the same launch
            rows, scales, h = prologue_stage.sum_rms_norm_stage_f16(
                x2.parts.parts, m, x2.rows(), prologue.weight, prologue.eps,
                row_scale=x2.parts.row_scale, dtype=x2.dtype, interpret=interpret)
            x2.provide(h)
            staged = rows, scales
        elif f16_rows and NORM_STAGE_FUSED and isinstance(prologue, RMSNorm):
            staged = prologue_stage.rms_norm_stage_f16(x2, prologue.weight, prologue.eps,
                                                       interpret=interpret)
        elif f16_rows and SWIGLU_STAGE_FUSED and isinstance(prologue, SwiGLU):
            staged = prologue_stage.swiglu_stage_f16(x2, interpret=interpret)
        if staged is not None:
            a, a_scale = staged
            return gemv(a, a_scale=a_scale)
        x2 = materialize(x2)
        if gemv_w8a16 and isinstance(prologue, FUSED_PROLOGUES) and m <= FUSED_PROLOGUE_MAX_M:
            kind = "swiglu" if isinstance(prologue, SwiGLU) else "rmsnorm"
            norm = dict(norm_weight=prologue.weight, eps=prologue.eps) if kind == "rmsnorm" else {}
            return gemv(x2, a_scale=None, prologue=kind, **norm)
        x2 = prologue(x2)
    if w_layout is None or m == 0:
        return fallback(x2)

    if not isinstance(x2, QArray) and recipe.act_format is None:          # W8A16
        if gemv_w8a16:
            a, a_scale = x2, None
            if f16_rows and wq.shape[0] * wq.shape[1] >= F16_STAGING_MIN_WEIGHT:
                a, a_scale = fp8_gemv.stage_f16_rows(x2)
            return gemv(a, a_scale=a_scale)
        return fallback(x2)

    xq = x2 if isinstance(x2, QArray) else quantize_activations(x2, recipe, interpret=interpret)
    kind = act_kind(xq)
    if kind is None:
        return fallback(xq)
    use_gemm = m > DECODE_MAX_M or DECODE_KERNEL[_m_class(m)] == "gemm"
    gemm_layout = {("tensor", "tensor"): "tensor", ("row", "row"): "row",
                   ("group", "block"): "block"}.get((kind, w_layout))
    gemm_ok = (gemm_layout is not None and jnp.dtype(xq.dtype) == _E4M3
               and jnp.dtype(wq.dtype) == _E4M3 and wq.shape[1] % 16 == 0)
    if use_gemm and gemm_ok:
        from pallas_kernels import fp8_gemm
        fn = fp8_gemm.fp8_gemm
        if not interpret and fp8_gemm.pick_gemm_backend(m, wq.shape[0], wq.shape[1], gemm_layout) == "mosaic":
            from pallas_kernels import fp8_gemm_mgpu
            fn = fp8_gemm_mgpu.fp8_gemm
        return plus(fn(xq.data, wq.data, xq.scale, wq.scale, layout=gemm_layout, bias=bias,
                       out_dtype=out_dtype, interpret=interpret))
    if m <= DECODE_MAX_M:
        return gemv(xq.data, a_scale=xq.scale)
    return fallback(xq)
