"""Decode-shaped FP8 matmul benchmark (M <= 64) on Llama-3-8B projection weights.

Same run, per (N, K, M): device-to-device copy (the ceiling), XLA bf16 dot, XLA with the FP8
weight upcast inside the dot, XLA's per-tensor FP8 dot (cuBLASLt, activations pre-quantized), and
ours: `fp8_gemv` W8A16 (block-scaled weights; a small config sweep, every variant recorded; at
M > 1 also the winning config on f16 activations, `w8a16_block_f16act`, and on bf16 ones staged
into f16 rows, staging timed, `w8a16_block_staged`) and W8A8
(the `quantize_fp8` 1x128 activation quantization included in the time). Each timing runs R
distinct weights back to back inside one jit (a decode step touches many weights; a Python loop
of single calls would time host dispatch), R chosen so a call moves >= ~0.5 GB of FP8 weights.
GB/s counts weight bytes (bf16 2 B/elem, FP8 1 B/elem + scales); "% copy" = GB/s over the copy
ceiling (read + write bytes of a 1 GiB copy).

    PYTHONPATH=$PWD python3 benchmarks/gemm_decode.py --out benchmarks/results
    PYTHONPATH=$PWD python3 benchmarks/gemm_decode.py --smoke      # CPU, interpret mode, tiny
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import fp8_gemv as G
from pallas_kernels import quantize as Q

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gemv_layout  # noqa: E402
import harness  # noqa: E402

SHAPES = [(6144, 4096, "qkv"), (4096, 4096, "o"), (28672, 4096, "gate_up"),
          (4096, 14336, "down"), (128256, 4096, "lm_head")]
# Llama-3.2-1B's projections (d 2048, FFN 8192, 8 KV heads of 64): run only when --shapes names
# them. Their grids are small for 132 SMs under the 8B-tuned classes (128-192 programs at M = 16).
SHAPES_1B = [(3072, 2048, "qkv_1b"), (2048, 2048, "o_1b"), (16384, 2048, "gate_up_1b"),
             (2048, 8192, "down_1b")]
#: Row order of the results: the shapes above, then the smoke shapes.
SHAPE_ORDER = [s[2] for s in SHAPES + SHAPES_1B] + ["odd", "odd64"]
MS = [1, 8, 16, 32, 64]
# Configs are swept at these M; M = 8 and 32 reuse the best config of M = 16 and 64 (same kernel
# tile, fewer compiles on a scarce device).
SWEEP_FROM = {8: 16, 32: 64}
F8 = jnp.float8_e4m3fn
DN = (((1,), (1,)), ((), ()))


def candidates(m: int, n: int, k: int) -> list[G.GemvConfig]:
    """Sweep list for the block layout (block_n | 128, block_k a multiple of 128). Earlier runs'
    variants and figures are kept in results/gemm_decode_sweep_log.md."""
    C = G.GemvConfig
    if m == 1:
        return [C(16, 512, use_dot=False, prefetch=True), C(32, 512, split_k=2, use_dot=False, prefetch=True),
                C(16, 512, split_k=2, use_dot=False, prefetch=True), C(32, 512, split_k=2, use_dot=False)]
    if m <= 16:
        return [C(32, 256), C(32, 256, prefetch=True), C(32, 512, split_k=2, prefetch=True),
                C(16, 512, split_k=2, prefetch=True)]
    return [C(64, 128), C(64, 128, prefetch=True), C(32, 128, prefetch=True),
            C(64, 256, prefetch=True, num_warps=8)]


def rel_err(out, ref) -> float:
    out = out.astype(jnp.float32)
    ref = ref.astype(jnp.float32)
    return float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))


def bench(f, *args, n_calls=10, reps=5):
    """Best seconds per call over `reps` batches of `n_calls` back-to-back calls."""
    return min(harness.call_times(f, *args, calls=n_calls, reps=reps)[0])


def timed(op, a, weights, *extra, interpret=False, n_calls=10):
    """Seconds per matmul: R weights through `op` in one jit, outputs returned (no extra ops)."""
    f = jax.jit(lambda a, ws, *e: tuple(op(a, w, *e) for w in ws))
    return bench(f, a, weights, *extra, n_calls=n_calls, reps=2 if interpret else 5) / len(weights)


def copy_ceiling_gbs(nbytes=1 << 30):
    return harness.copy_ceiling_gbs(nbytes, calls=20, stat=min)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode (CPU)")
    p.add_argument("--shapes", default="", help="comma list of shape names to run (default all)")
    p.add_argument("--ms", default="", help="comma list of M (default 1,8,16,32,64)")
    p.add_argument("--configs", default="", help="override the sweep: "
                   "'bn,bk,sk[,warps[,stages[,fma[,field=int...]]]];...' (extra GemvConfig fields, "
                   "e.g. swap_ab=1)")
    p.add_argument("--quick", action="store_true", help="W8A16 sweep only (no baselines, W8A8, GEMM)")
    p.add_argument("--xla", action="store_true", help="with --quick: the XLA baselines too")
    p.add_argument("--sweep-act", default="bf16", choices=("bf16", "staged"),
                   help="activations the W8A16 sweep runs on at M > 1: bf16 rows, or bf16 rows "
                   "staged into f16 by stage_f16_rows (staging timed), as jfp8.matmul runs them")
    p.add_argument("--tag", default="", help="suffix for the output files (a side sweep)")
    p.add_argument("--mgpu", default="", help="also time pallas_kernels.fp8_gemv_mgpu (Mosaic GPU; "
                   "M = 1 on the bf16 row, else on staged rows, staging timed) at M <= 16 in these "
                   "configs: "
                   "'tile_n,stages,ctas_per_sm[,split_k[,p]];...' (p: L2-prefetch the next "
                   "weight), or 'default' for MGPU_SWEEP")
    args = p.parse_args()
    interpret = args.smoke
    shapes = [(200, 384, "odd")] if args.smoke else SHAPES
    if args.smoke and args.mgpu:   # the Mosaic kernel takes N a multiple of 64 only
        shapes.append((256, 384, "odd64"))
    if args.shapes:
        shapes = [s for s in shapes + SHAPES_1B if s[2] in args.shapes.split(",")]
    ms = [int(x) for x in args.ms.split(",")] if args.ms else ([1, 7] if args.smoke else MS)
    dev = jax.devices()[0]
    ceiling = copy_ceiling_gbs(1 << 20 if args.smoke else 1 << 30)
    print(f"device {dev.device_kind}  copy ceiling {ceiling:.0f} GB/s", flush=True)
    rows = []
    for (n, k, name) in shapes:
        r = 2 if args.smoke else max(4, min(32, round(512e6 / (n * k))))
        keys = jax.random.split(jax.random.key(n + k), r)
        w16 = [jax.random.normal(kk, (n, k), jnp.bfloat16) * 0.02 for kk in keys]
        w8 = [jnp.clip(w * (448 / 0.1), -448, 448).astype(F8) for w in w16]
        kb, nb = -(-k // 128), -(-n // 128)
        ws_block = jnp.full((nb, kb), 0.1 / 448, jnp.float32)
        ws_row = jnp.full((n, 1), 0.1 / 448, jnp.float32)
        ws_t = jnp.full((1, 1), 0.1 / 448, jnp.float32)
        best_cfg = {}
        order = sorted(ms, key=lambda m: (m in SWEEP_FROM and SWEEP_FROM[m] in ms, m))
        for m in order:
            a = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
            a8, as8 = Q.quantize_fp8_reference(a, layout="tensor")
            row = dict(name=name, N=n, K=k, M=m, R=r)
            fp8_bytes = n * k + ws_block.size * 4

            def rec(key, t, nbytes):
                row[key] = dict(us=round(t * 1e6, 2), GBs=round(nbytes / t / 1e9, 1),
                                pct_copy=round(100 * nbytes / t / 1e9 / ceiling, 1))

            if not interpret and (not args.quick or args.xla):
                t = timed(lambda a, w: lax.dot_general(a, w, DN, preferred_element_type=jnp.float32
                                                       ).astype(jnp.bfloat16), a, w16)
                rec("xla_bf16", t, 2 * n * k)
                t = timed(lambda a, w, s: (lax.dot_general(a, w.astype(jnp.bfloat16), DN,
                                                           preferred_element_type=jnp.float32)
                                           * s).astype(jnp.bfloat16), a, w8, ws_t)
                rec("xla_fp8_upcast", t, n * k)
                t = timed(lambda a, w, s: (lax.dot_general(a, w, DN, preferred_element_type=jnp.float32)
                                           * s).astype(jnp.bfloat16), a8, w8, as8 * ws_t)
                rec("xla_fp8_pertensor", t, n * k)
                # Read floor: an XLA reduction that only reads the FP8 weight bytes (as uint32).
                t = timed(lambda a, w: jnp.max(lax.bitcast_convert_type(w.reshape(n, k // 4, 4), jnp.uint32)),
                          a, w8)
                rec("xla_read_floor", t, n * k)
            sweep = []
            cands = ([best_cfg[SWEEP_FROM[m]]] if m in SWEEP_FROM and SWEEP_FROM[m] in best_cfg
                     else candidates(m, n, k))
            if args.configs:
                cands = [parse_config(c, m) for c in args.configs.split(";")]
            ref = G.fp8_gemv_reference(a, w8[0], None, ws_block, layout="block", out_dtype=jnp.float32)
            staged_sweep = args.sweep_act == "staged" and m > 1
            row["sweep_act"] = "staged" if staged_sweep else "bf16"

            def gemv(a, w, s, cfg, *, staged=staged_sweep, layout="block", out_dtype=jnp.bfloat16):
                """W8A16 fp8_gemv; staged: a goes through stage_f16_rows first (timed with it),
                as jfp8.matmul runs large weights at 2 <= M <= 16."""
                a_scale = None
                if staged:
                    a, a_scale = G.stage_f16_rows(a)
                return G.fp8_gemv(a, w, a_scale, s, layout=layout, config=cfg, out_dtype=out_dtype,
                                  interpret=interpret)
            for cfg in cands:
                try:
                    err = rel_err(gemv(a, w8[0], ws_block, cfg, out_dtype=jnp.float32), ref)
                    t = timed(lambda a, w, s, cfg=cfg: gemv(a, w, s, cfg), a, w8, ws_block,
                              interpret=interpret)
                except Exception as e:  # record the failure, keep sweeping
                    sweep.append(dict(cfg=dataclasses.asdict(cfg), error=repr(e)[:300]))
                    continue
                sweep.append(dict(cfg=dataclasses.asdict(cfg), us=round(t * 1e6, 2),
                                  GBs=round(fp8_bytes / t / 1e9, 1), rel_err=err))
            # 1e-4: f32 sums of exact products over K <= 14336 (tests/test_fp8_gemv.py).
            ok = [s for s in sweep if "us" in s and s["rel_err"] < 1e-4]
            row["w8a16_sweep"] = sweep
            if not ok:
                rows.append(row)
                print(json.dumps(row), flush=True)
                continue
            best = min(ok, key=lambda s: s["us"])
            cfg = G.GemvConfig(**best["cfg"])
            best_cfg[m] = cfg
            row["w8a16_block"] = dict(us=best["us"], GBs=best["GBs"],
                                      pct_copy=round(100 * best["GBs"] / ceiling, 1), cfg=best["cfg"])
            # The same kernel and config on f16 activations (f16 MMA operands: the weight's
            # e4m3 -> f16 upcast is one instruction per pair, to bf16 four).
            if m > 1:
                t = timed(lambda a, w, s: gemv(a, w, s, cfg, staged=False), a.astype(jnp.float16),
                          w8, ws_block, interpret=interpret)
                rec("w8a16_block_f16act", t, fp8_bytes)
                t = timed(lambda a, w, s: gemv(a, w, s, cfg, staged=True), a, w8, ws_block,
                          interpret=interpret)
                rec("w8a16_block_staged", t, fp8_bytes)
            if args.mgpu and m <= 16:
                time_mgpu(row, args.mgpu, a, w8, ws_block, fp8_bytes, rec, interpret)
            if args.quick and args.xla:
                # The best config on a per-tensor weight scale (the XLA FP8-upcast row's scaling):
                # what the per-128-K block scales cost.
                t = timed(lambda a, w, s: gemv(a, w, s, cfg, layout="tensor"), a, w8, ws_t,
                          interpret=interpret)
                rec("w8a16_tensor", t, n * k)
            if args.quick:
                if "xla_bf16" in row:
                    row["ratio_w8a16_vs_xla_bf16"] = round(
                        row["xla_bf16"]["us"] / row["w8a16_block"]["us"], 3)
                rows.append(row)
                dump(args, dev, ceiling, interpret, rows)
                continue
            if m not in SWEEP_FROM:
                t = timed(lambda a, w, s: G.fp8_gemv(a, w, None, s, layout="row", config=cfg,
                                                     interpret=interpret), a, w8, ws_row, interpret=interpret)
                rec("w8a16_row", t, n * k + n * 4)
            # W8A8: 1x128 activation quantization inside the timed op (once per weight).

            def w8a8(a, w, s):
                aq, asc = Q.quantize_fp8(a, layout="group", interpret=interpret)
                return G.fp8_gemv(aq, w, asc, s, layout="block", config=cfg, interpret=interpret)
            t = timed(w8a8, a, w8, ws_block, interpret=interpret)
            rec("w8a8_block_incl_quant", t, fp8_bytes)
            # The prefill GEMM (fp8_gemm, Triton) on the same decode shape, same quantize: the
            # dispatcher's alternative for M <= 64.
            try:
                from pallas_kernels import fp8_gemm as GE

                def gemm(a, w, s):
                    aq, asc = Q.quantize_fp8(a, layout="group", interpret=interpret)
                    return GE.fp8_gemm(aq, w, asc, s, layout="block", interpret=interpret)
                t = timed(gemm, a, w8, ws_block, interpret=interpret)
                rec("fp8_gemm_block_incl_quant", t, fp8_bytes)
            except Exception as e:
                row["fp8_gemm_block_incl_quant"] = dict(error=repr(e)[:300])
            if not interpret:
                row["ratio_w8a16_vs_xla_bf16"] = round(row["xla_bf16"]["us"] / row["w8a16_block"]["us"], 3)
                row["ratio_w8a16_vs_xla_fp8_upcast"] = round(
                    row["xla_fp8_upcast"]["us"] / row["w8a16_block"]["us"], 3)
                row["ratio_w8a8_vs_xla_bf16"] = round(
                    row["xla_bf16"]["us"] / row["w8a8_block_incl_quant"]["us"], 3)
            rows.append(row)
            short = {kk: (v["us"] if isinstance(v, dict) and "us" in v else v) for kk, v in row.items()
                     if kk != "w8a16_sweep"}
            print(json.dumps(short), flush=True)
            dump(args, dev, ceiling, interpret, rows)
        del w16, w8
    dump(args, dev, ceiling, interpret, rows, final=True)


# The Mosaic GPU decode kernel's first sweep (not yet timed anywhere): the split-K rule against
# one split (the M = 1 dispatch default: the kernel then ends the matmul itself), pipeline depth,
# two 64-row tiles per CTA, and the L2 prefetch (CTAs per SM: add e.g. "64,4,8" by hand).
MGPU_SWEEP = "64,4,4;64,6,4,1;64,2,4;128,4,4;64,4,4,0,p"


def time_mgpu(row, spec, a, w8, ws_block, fp8_bytes, rec, interpret):
    """Rows `mgpu_<tile_n>_<stages>_<ctas>[_s<split>][_p]` of `row`: fp8_gemv_mgpu, every weight
    in `w8` back to back in one jit: at M = 1 its FMA kernel on the bf16 row, else its wgmma
    kernel on `a` staged by stage_f16_rows (timed with it); with p, each call prefetches the
    next weight of the list into L2. Errors are recorded, not raised."""
    from pallas_kernels import fp8_gemv_mgpu as MG
    n, k = w8[0].shape
    ref = G.fp8_gemv_reference(a, w8[0], None, ws_block, layout="block", out_dtype=jnp.float32)
    for item in (MGPU_SWEEP if spec == "default" else spec).split(";"):
        vals = item.split(",")
        tile_n, stages, ctas = (int(v) for v in vals[:3])
        split = int(vals[3]) if len(vals) > 3 else 0
        pref = len(vals) > 4 and vals[4] == "p"
        key = f"mgpu_{tile_n}_{stages}_{ctas}" + (f"_s{split}" if split else "") + ("_p" if pref else "")
        try:
            cfg = MG.MgpuGemvConfig(tile_n=tile_n, max_concurrent_steps=stages, ctas_per_sm=ctas,
                                    split_k=split)

            def op(a, w, s, nxt=None, cfg=cfg, out_dtype=jnp.bfloat16):
                rows, scale = (a, None) if a.shape[0] == 1 else G.stage_f16_rows(a)
                return MG.fp8_gemv_mgpu(rows, w, scale, s, layout="block", config=cfg,
                                        prefetch=nxt, out_dtype=out_dtype, interpret=interpret)
            if not MG.supports(a.shape[0], n, k, config=cfg):
                row[key] = dict(error=f"shape {n}x{k} at M={a.shape[0]} not taken")
                continue
            err = rel_err(op(a, w8[0], ws_block, out_dtype=jnp.float32), ref)
            if pref:
                f = jax.jit(lambda a, ws, s: tuple(op(a, w, s, ws[(i + 1) % len(ws)])
                                                   for i, w in enumerate(ws)))
                t = bench(f, a, w8, ws_block, reps=2 if interpret else 5) / len(w8)
            else:
                t = timed(op, a, w8, ws_block, interpret=interpret)
        except Exception as e:  # record the failure, keep going
            row[key] = dict(error=repr(e)[:300])
            continue
        rec(key, t, fp8_bytes)
        row[key].update(rel_err=err, split_k=MG._split_k(cfg, n, k))


def parse_config(text: str, m: int) -> G.GemvConfig:
    """'bn,bk,sk[,warps[,stages[,fma[,field=int...]]]]' (the defaults 4 warps, 3 stages, dot; the
    extra fields as in gemv_layout.parse_config); fma only at M = 1."""
    head = [v for v in text.split(",") if "=" not in v]
    extra = [v for v in text.split(",") if "=" in v]
    head += ["4", "3", "0"][len(head) - 3:] if len(head) < 6 else []
    cfg = gemv_layout.parse_config(",".join(head + extra))
    return dataclasses.replace(cfg, use_dot=cfg.use_dot or m > 1)


def dump(args, dev, ceiling, interpret, rows, final=False):
    rows = sorted(rows, key=lambda r: (SHAPE_ORDER.index(r["name"]), r["M"]))
    result = dict(device=dev.device_kind, platform=dev.platform, jax=jax.__version__,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  host=platform.node(), copy_ceiling_GBs=round(ceiling, 1), interpret=interpret,
                  command=" ".join(sys.argv), rows=rows)
    os.makedirs(args.out, exist_ok=True)
    stem = ("gemm_decode_smoke" if args.smoke else "gemm_decode") + (f"_{args.tag}" if args.tag else "")
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump(result, f, indent=1)
    write_markdown(result, os.path.join(args.out, stem + ".md"))
    if not final:
        return
    try:
        plot(result, os.path.join(args.out, stem + ".png"))
    except Exception as e:  # matplotlib missing: the JSON and table still stand
        print("plot skipped:", repr(e))


def write_markdown(result, path):
    c = result["copy_ceiling_GBs"]
    lines = [f"# Decode FP8 matmul, {result['device']}, jax {result['jax']}, {result['date']}",
             "", f"Copy ceiling (same run): {c} GB/s. µs per matmul (R distinct weights per jit); "
             "GB/s on weight bytes; % = of the copy ceiling; ratio = XLA bf16 µs / ours.", "",
             "| weight | N×K | M | XLA read floor µs (GB/s) | XLA bf16 µs (GB/s) | XLA FP8-upcast µs (GB/s) | XLA FP8 per-tensor µs | "
             "ours W8A16 block µs (GB/s, % copy) | same, f16 activations µs | same, staged µs | "
             "ours W8A16 row µs | ours W8A16 per-tensor µs | ours W8A8 incl. quant µs | "
             "fp8_gemm W8A8 incl. quant µs | "
             "W8A16 vs bf16 | W8A16 vs FP8-upcast | best config |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        def g(key, fmt="{us} ({GBs})"):
            v = r.get(key)
            return fmt.format(**v) if isinstance(v, dict) and "us" in v else "-"
        cfg = r.get("w8a16_block", {}).get("cfg")
        cfg_s = (f"bn{cfg['block_n']} bk{cfg['block_k']} sk{cfg['split_k']}"
                 f"{'' if cfg['use_dot'] else ' fma'}{' swap' if cfg['swap_ab'] else ''}{' pf' if cfg['prefetch'] else ''} w{cfg['num_warps']}"
                 if cfg else "-") + (" on staged f16" if r.get("sweep_act") == "staged" else "")
        lines.append(
            f"| {r['name']} | {r['N']}×{r['K']} | {r['M']} | {g('xla_read_floor')} | {g('xla_bf16')} | {g('xla_fp8_upcast')} | "
            f"{g('xla_fp8_pertensor', '{us}')} | {g('w8a16_block', '{us} ({GBs}, {pct_copy}%)')} | "
            f"{g('w8a16_block_f16act', '{us}')} | {g('w8a16_block_staged', '{us}')} | "
            f"{g('w8a16_row', '{us}')} | {g('w8a16_tensor', '{us}')} | "
            f"{g('w8a8_block_incl_quant', '{us}')} | "
            f"{g('fp8_gemm_block_incl_quant', '{us}')} | "
            f"{r.get('ratio_w8a16_vs_xla_bf16', '-')} | {r.get('ratio_w8a16_vs_xla_fp8_upcast', '-')} | {cfg_s} |")
    mgpu = sorted({key for r in result["rows"] for key in r if key.startswith("mgpu_")})
    if mgpu:
        lines += ["", "## Mosaic GPU decode kernel (fp8_gemv_mgpu)", "",
                  "M = 1: its FMA kernel on the bf16 row; M > 1: its wgmma kernel on staged rows, "
                  "staging timed. Key: mgpu_<tile_n>_<pipeline stages>_<CTAs per SM>[_s<split-K>]"
                  "[_p = L2 prefetch of the next weight]. µs (GB/s, % copy) [split-K]; Triton = "
                  "the best fp8_gemv config on the same input (M > 1: staged rows).", "",
                  "| weight | M | Triton µs | " + " | ".join(mgpu) + " |",
                  "|---|---|---|" + "---|" * len(mgpu)]
        for r in result["rows"]:
            if not any(key in r for key in mgpu):
                continue
            cells = []
            for key in mgpu:
                v = r.get(key, {})
                cells.append(f"{v['us']} ({v['GBs']}, {v['pct_copy']}%) [s{v['split_k']}]"
                             if "us" in v else ("error" if "error" in v else "-"))
            staged = r.get("w8a16_block_staged", r.get("w8a16_block", {})).get("us", "-")
            lines.append(f"| {r['name']} | {r['M']} | {staged} | " + " | ".join(cells) + " |")
    lines += ["", "## Every W8A16 variant tried (µs)", "",
              "| weight | M | config | µs | GB/s | rel err |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        for s in r.get("w8a16_sweep", []):
            cfg = s["cfg"]
            cs = (f"bn{cfg['block_n']} bk{cfg['block_k']} sk{cfg['split_k']}"
                  f"{'' if cfg['use_dot'] else ' fma'}{' swap' if cfg['swap_ab'] else ''}{' pf' if cfg['prefetch'] else ''} w{cfg['num_warps']}")
            lines.append(f"| {r['name']} | {r['M']} | {cs} | {s.get('us', 'error')} | "
                         f"{s.get('GBs', s.get('error', '')[:80])} | {s.get('rel_err', '-'):.1e} |"
                         if "rel_err" in s else f"| {r['name']} | {r['M']} | {cs} | error | {s.get('error', '')[:80]} | - |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = sorted({r["name"] for r in result["rows"]}, key=SHAPE_ORDER.index)
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        rs = [r for r in result["rows"] if r["name"] == name]
        ms = [r["M"] for r in rs]
        for key, label in [("xla_bf16", "XLA bf16"), ("xla_fp8_upcast", "XLA FP8 upcast"),
                           ("xla_fp8_pertensor", "XLA FP8 per-tensor"), ("w8a16_block", "ours W8A16"),
                           ("w8a8_block_incl_quant", "ours W8A8 + quant")]:
            ys = [r[key]["pct_copy"] if key in r and "pct_copy" in r[key] else None for r in rs]
            if any(y is not None for y in ys):
                ax.plot(ms, [y if y is not None else float("nan") for y in ys], marker="o", label=label)
        ax.set_title(f"{name} {rs[0]['N']}×{rs[0]['K']}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("M")
        ax.set_ylabel("% of copy ceiling (weight bytes)")
        ax.axhline(85, color="gray", lw=0.8, ls="--")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Decode FP8 matmul, {result['device']} (copy {result['copy_ceiling_GBs']} GB/s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
