"""Tile sweep for the FP8 GEMM kernels (Triton and Mosaic GPU) on the H100.

Times every candidate config of pallas_kernels.fp8_gemm (block layout and per-tensor layout) and
pallas_kernels.fp8_gemm_mgpu (block layout) on prefill shapes, checks each against
fp8_gemm_reference in the same run, and prints the best per (kernel, layout, shape). The winners
are copied by hand into the TUNING tables of the kernel files (one table per kernel).

Usage (device machine): PYTHONPATH=$PWD python3 benchmarks/gemm_sweep.py --out $OUT --round 2
Writes gemm_sweep.json and gemm_sweep.md (committed as results/gemm_sweep_r<round>.*).
`benchmarks/gemm.py --tuning-from gemm_sweep.json` runs the benchmark with the sweep's winners.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import traceback

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import harness  # noqa: E402
from gemm import make_operands, rel_err  # noqa: E402
from gemm import shapes as gemm_shapes  # noqa: E402
from gemm import variants as gemm_variants  # noqa: E402
from pallas_kernels import _triton_fp8_shim  # noqa: E402
from pallas_kernels import fp8_gemm as G  # noqa: E402
from pallas_kernels import fp8_gemm_mgpu as MG  # noqa: E402

GC, MC = G.GemmConfig, MG.MgpuConfig
BIG = 1 << 20  # max_num_imprecise_acc larger than any dot's K: no partial accumulator at all

TRITON_BLOCK = [
    GC(64, 128, 128, 4, 4, 8, 128), GC(64, 128, 128, 4, 5, 8, 128), GC(64, 128, 128, 8, 4, 8, 128),
    GC(64, 128, 128, 4, 4, 0, 128), GC(128, 128, 128, 8, 3, 8, 128), GC(128, 128, 128, 4, 4, 8, 128),
    GC(128, 128, 128, 8, 4, 8, 128), GC(128, 64, 128, 4, 4, 8, 128), GC(256, 128, 128, 8, 3, 8, 128),
    GC(64, 128, 128, 4, 4, 8, BIG), GC(128, 128, 128, 8, 3, 8, BIG), GC(64, 128, 128, 4, 4, 8, None),
]
TRITON_PLAIN = [
    GC(128, 128, 128, 8, 3, 8, 128), GC(128, 256, 128, 8, 3, 8, 128), GC(128, 256, 64, 8, 4, 8, 128),
    GC(256, 128, 128, 8, 3, 8, 128), GC(128, 128, 128, 4, 4, 8, 128), GC(64, 128, 128, 4, 4, 8, 128),
    GC(128, 256, 128, 8, 4, 8, 128), GC(128, 128, 128, 8, 4, 8, 128), GC(128, 128, 128, 8, 3, 8, None),
]
MOSAIC = [
    MC(64, 128, "m", 4, "n", 8), MC(64, 128, "n", 4, "n", 8), MC(64, 128, "m", 5, "n", 8),
    MC(64, 128, "n", 3, "n", 8), MC(64, 128, "m", 4, "m", 8), MC(64, 128, "m", 4, "n", 16),
    MC(64, 128, "m", 4, "n", 4), MC(128, 128, "n", 3, "n", 8), MC(128, 128, "m", 3, "n", 8),
]
# Round 2: the round-1 winners again (same-run baselines) and new variants: two K blocks per
# Triton loop iteration; Mosaic promotion overlapped with the next wgmma, and one combined row
# scale per K step (tile_b_scale) instead of row x column scales.
ROUNDS = {
    1: dict(triton_block=TRITON_BLOCK, triton_plain=TRITON_PLAIN, mosaic=MOSAIC),
    2: dict(
        triton_block=[GC(64, 128, 128, 4, 4, 8, 128), GC(64, 128, 128, 4, 4, 0, 128),
                      GC(64, 128, 128, 4, 4, 8, 128, 2), GC(64, 128, 128, 4, 4, 0, 128, 2),
                      GC(64, 128, 128, 4, 3, 8, 128), GC(64, 128, 128, 4, 3, 8, 128, 2),
                      GC(128, 128, 128, 8, 3, 8, 128, 2)],
        triton_plain=[GC(128, 128, 128, 8, 4, 8, 128), GC(128, 128, 128, 8, 5, 8, 128),
                      GC(128, 128, 128, 8, 4, 0, 128)],
        mosaic=[MC(64, 128, "m", 4, "m", 8, tile_b_scale=False), MC(64, 128, "m", 4, "m", 8),
                MC(64, 128, "m", 4, "n", 8), MC(64, 128, "n", 4, "n", 8),
                MC(64, 128, "m", 4, "m", 8, overlap=True), MC(64, 128, "m", 3, "m", 8, overlap=True),
                MC(64, 128, "m", 5, "m", 8, overlap=True), MC(64, 128, "n", 4, "n", 8, overlap=True),
                MC(64, 128, "m", 4, "m", 8, overlap=True, tile_b_scale=False)]),
    # Round 3 (H200): TMA multicast across a 2-CTA cluster (MgpuConfig.cluster), XLA's bf16 and
    # per-tensor FP8 dots timed in the same run for the ratios.
    3: dict(
        xla=["xla_bf16", "xla_fp8_tensor"],
        mosaic=[MC(64, 128, "m", 4, "m", 8), MC(64, 128, "m", 4, "m", 8, cluster="m"),
                MC(64, 128, "m", 4, "m", 8, cluster="n"), MC(64, 128, "m", 4, "n", 8, cluster="m"),
                MC(64, 128, "m", 5, "m", 8, cluster="m"), MC(64, 128, "m", 4, "m", 16, cluster="m"),
                MC(64, 128, "n", 4, "m", 8, cluster="m")]),
    # Round 4 (H200): the K block's product in several fresh accumulators (MgpuConfig.parts),
    # each promoted as soon as its wgmma completes (`lag` parts in flight), and 64 x 256
    # warpgroup tiles (CTA 128 x 256) whose fresh registers are one or two 64-column parts.
    4: dict(
        xla=["xla_bf16", "xla_fp8_tensor"],
        mosaic=[MC(64, 128, "m", 4, "m", 8), MC(64, 128, "m", 4, "m", 8, parts=2, lag=1),
                MC(64, 128, "m", 4, "m", 8, parts=4, lag=2),
                MC(64, 256, "m", 3, "m", 8, parts=2, lag=0),
                MC(64, 256, "m", 3, "m", 8, parts=4, lag=1),
                MC(64, 256, "m", 3, "m", 8, parts=4, lag=0),
                MC(64, 256, "m", 3, "n", 8, parts=4, lag=1),
                MC(64, 256, "m", 3, "m", 8, parts=4, lag=1, cluster="m")]),
    # Round 5 (H200): around round 4's winner (64 x 128, parts=2, lag=1).
    5: dict(
        xla=["xla_bf16", "xla_fp8_tensor"],
        mosaic=[MC(64, 128, "m", 4, "m", 8, parts=2, lag=1),
                MC(64, 128, "m", 4, "m", 8, parts=2, lag=0),
                MC(64, 128, "m", 4, "m", 8, parts=2, lag=1, cluster="m"),
                MC(64, 128, "m", 4, "m", 8, parts=2, lag=1, cluster="n"),
                MC(64, 128, "m", 5, "m", 8, parts=2, lag=1),
                MC(64, 128, "m", 4, "n", 8, parts=2, lag=1),
                MC(64, 128, "m", 4, "m", 16, parts=2, lag=1)]),
    # Round 11 (H100): the Triton block kernel where it sat at 0.93-1.03x XLA bf16 on the H100
    # (results/gemm_h100_s12.md): around the table's 64 x 128 x 128, 4 warps, 4 stages.
    11: dict(
        xla=["xla_bf16"],
        triton_block=[GC(64, 128, 128, 4, 4, 0, 128), GC(64, 128, 128, 4, 4, 8, 128),
                      GC(64, 128, 128, 4, 3, 0, 128), GC(128, 128, 128, 8, 4, 0, 128),
                      GC(128, 128, 128, 8, 3, 0, 128), GC(128, 64, 128, 4, 4, 0, 128),
                      GC(128, 128, 128, 8, 4, 8, 128), GC(64, 128, 128, 8, 4, 0, 128)]),
}
SHAPES = [(8192, 8192, 8192, "8192^3"), (2048, 28672, 4096, "gate_up M=2048"),
          (2048, 4096, 4096, "o M=2048")]


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
  p.add_argument("--calls", type=int, default=10)
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--kernels", default="xla,triton_block,triton_plain,mosaic")
  p.add_argument("--shapes", type=int, default=len(SHAPES))
  p.add_argument("--labels", default="", help="comma-separated gemm.py shape labels (overrides --shapes)")
  p.add_argument("--round", type=int, default=max(ROUNDS), choices=sorted(ROUNDS))
  args = p.parse_args()
  os.makedirs(args.out, exist_ok=True)
  device = jax.devices()[0]
  meta = dict(device=str(getattr(device, "device_kind", device)), jax=jax.__version__,
              date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              triton_shim=_triton_fp8_shim.status(), mosaic=MG.unavailable_reason() or "available",
              timing=f"median of {args.reps} batches x >={args.calls} calls (>=25 ms per batch), "
                     "every config of a shape timed in interleaved rounds")
  lists = ROUNDS[args.round]
  meta["round"] = args.round
  groups = {"triton_block": ("block", lists.get("triton_block", ()), G.fp8_gemm),
            "triton_plain": ("tensor", lists.get("triton_plain", ()), G.fp8_gemm),
            "mosaic": ("block", lists.get("mosaic", ()), MG.fp8_gemm),
            "xla": ("tensor", lists.get("xla", ()), None)}
  xla = gemm_variants()
  rows = []
  todo = SHAPES[:args.shapes]
  if args.labels:  # any of gemm.py's shapes, by label
    by_label = {s[3]: s for s in gemm_shapes()}
    todo = [by_label[x] for x in args.labels.split(",")]
  for m, n, k, label in todo:
    a16, b16, q = make_operands(m, n, k)
    refs, shape_rows, timed = {}, [], {}
    for group in args.kernels.split(","):
      layout, configs, fn = groups[group]
      if (group == "mosaic" and not MG.available()) or not configs:
        continue
      ops = q[layout]
      if layout not in refs:
        refs[layout] = G.fp8_gemm_reference(*ops, layout=layout, out_dtype=jnp.float32)
      for cfg in configs:
        row = dict(shape=label, m=m, n=n, k=k, kernel=group, layout=layout,
                   config=vars(cfg) if fn is not None else dict(name=cfg))
        try:  # compile, run once, check against the f32 reference
          if fn is None:   # an XLA baseline: bf16 operands for xla_bf16
            f = xla[cfg][1]
            args_ = (a16, b16) if cfg == "xla_bf16" else ops
          else:
            f = jax.jit(lambda a, b, sa, sb, cfg=cfg: fn(a, b, sa, sb, layout=layout, config=cfg))
            args_ = ops
          out = jax.block_until_ready(f(*args_))
          row["rel_err"] = rel_err(out, refs[layout])
          del out
          timed[len(shape_rows)] = (f, args_)
        except Exception as e:
          row["error"] = (type(e).__name__ + ": " + str(e))[:600]
          traceback.print_exc(limit=3)
        shape_rows.append(row)
    # Every config of the shape in interleaved rounds (gemm.py's method: clock drift falls on all).
    batch_s, _ = harness.interleaved_times(timed, calls=args.calls, reps=args.reps, min_batch_s=0.025)
    for i, row in enumerate(shape_rows):
      if i in batch_s:
        t = statistics.median(batch_s[i])
        row.update(time_us=t * 1e6, tflops=2 * m * n * k / t / 1e12)
      print(json.dumps(row), flush=True)
      rows.append(row)
    del a16, b16, q, refs
  lines = [f"# FP8 GEMM tile sweep, {meta['device']}, jax {meta['jax']}, {meta['date']}", "",
           f"{meta['timing']}; shim: {meta['triton_shim']}", "",
           "| kernel | layout | shape | config | TFLOP/s | rel err |", "|---|---|---|---|---|---|"]
  for r in rows:
    c = r["config"]
    cfg = " ".join(f"{k}={v}" for k, v in c.items())
    val = f"{r['tflops']:.0f} | {r['rel_err']:.1e}" if "tflops" in r else f"ERR | {r['error'][:80]}"
    lines.append(f"| {r['kernel']} | {r['layout']} | {r['shape']} | {cfg} | {val} |")
  best = {}
  for r in rows:
    key = (r["kernel"], r["shape"])
    if "tflops" in r and r["tflops"] > best.get(key, {}).get("tflops", 0):
      best[key] = r
  lines += ["", "## best per kernel and shape", ""]
  for (kern, shape), r in best.items():
    lines.append(f"- {kern} {shape}: {r['tflops']:.0f} TFLOP/s with {r['config']}")
  table = "\n".join(lines) + "\n"
  json.dump(dict(meta=meta, rows=rows), open(os.path.join(args.out, "gemm_sweep.json"), "w"), indent=1)
  open(os.path.join(args.out, "gemm_sweep.md"), "w").write(table)
  print(table)


if __name__ == "__main__":
  main()
