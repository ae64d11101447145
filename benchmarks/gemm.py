"""Prefill FP8 GEMM benchmark on the H100: XLA bf16 / XLA FP8 (cuBLASLt) vs our Pallas kernels.

Same run, same inputs: XLA bf16 dot; XLA FP8 dot with per-tensor scales (e4m3 operands,
lax.dot_general with preferred_element_type f32, scales applied after, as cuBLASLt does); our
Triton kernel (pallas_kernels.fp8_gemm) in its three scale layouts; our Mosaic GPU kernel
(pallas_kernels.fp8_gemm_mgpu) in its three layouts. Every variant is checked against
fp8_gemm_reference (f32 math on the same FP8 inputs and scales) in the same run.

Shapes: prefill M in {2048, 8192} x Llama-3-8B projections (N x K) and 8192^3.
Timing: median over `--reps` batches of `--calls` back-to-back calls (host clock after
block_until_ready; >= 25 ms per batch, so launch overhead is amortised), after a warm-up call.
The variants of a shape are timed in rounds, one batch of each per round (`harness.
interleaved_times`): at its power limit the GPU's clock drifts over tens of seconds, and timing
each variant's batches back to back (`--sequential`, the method of the runs before 2026-12-05)
hands that drift to whichever variant runs last. Each row keeps its per-batch times and the SM
clock / power sampled after each round.

Usage (device machine): PYTHONPATH=$PWD python3 benchmarks/gemm.py --out $OUT
Writes gemm.json (device, jax version, date, every config), gemm.md (table) and gemm.png.
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
import numpy as np
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from pallas_kernels import _triton_fp8_shim  # noqa: E402
from pallas_kernels import fp8_gemm as G  # noqa: E402
from pallas_kernels import fp8_gemm_mgpu as MG  # noqa: E402

LLAMA3_8B_NK = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
                "down": (4096, 14336), "lm_head": (128256, 4096)}
E4M3 = jnp.float8_e4m3fn
DIMS = (((1,), (1,)), ((), ()))
# rel_err is taken over the first REF_ROWS output rows: the f32 HIGHEST-precision reference of a
# whole M=8192 lm_head (8.6 TFLOP per layout) takes minutes; any row slice tests every column.
REF_ROWS = 1024


def shapes():
  out = [(m, n, k, f"{name} M={m}") for m in (2048, 8192) for name, (n, k) in LLAMA3_8B_NK.items()]
  out.append((8192, 8192, 8192, "8192^3"))
  return out


def make_operands(m, n, k, seed=0):
  """bf16 A, B and their FP8 quantizations in every layout (scales = amax / 448)."""
  ka, kb = jax.random.split(jax.random.PRNGKey(seed))
  a = jax.random.normal(ka, (m, k), jnp.bfloat16)
  b = (jax.random.normal(kb, (n, k), jnp.bfloat16) * 0.02).astype(jnp.bfloat16)

  @jax.jit
  def quant(a, b):
    f32 = jnp.float32
    a32, b32 = a.astype(f32), b.astype(f32)
    def q(x, s):
      return jnp.clip(x / s, -448, 448).astype(E4M3)
    out = {}
    sa, sb = jnp.max(jnp.abs(a32)).reshape(1, 1) / 448, jnp.max(jnp.abs(b32)).reshape(1, 1) / 448
    out["tensor"] = (q(a32, sa), q(b32, sb), sa, sb)
    sa, sb = jnp.max(jnp.abs(a32), 1, keepdims=True) / 448, jnp.max(jnp.abs(b32), 1, keepdims=True) / 448
    out["row"] = (q(a32, sa), q(b32, sb), sa, sb)
    kb_ = k // 128
    sa = jnp.max(jnp.abs(a32.reshape(m, kb_, 128)), 2) / 448
    sb = jnp.max(jnp.abs(b32.reshape(n // 128, 128, kb_, 128)), (1, 3)) / 448
    qa = q(a32, jnp.repeat(sa, 128, 1))
    qb = q(b32, jnp.repeat(jnp.repeat(sb, 128, 0), 128, 1))
    out["block"] = (qa, qb, sa, sb)
    return out
  return a, b, quant(a, b)


def rel_err(out, ref):
  out = out.astype(jnp.float32)
  return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


def variants():
  """name -> (layout or None, builder(q) -> jitted fn of operands)."""
  xla_bf16 = jax.jit(lambda a, b: lax.dot_general(a, b, DIMS, preferred_element_type=jnp.float32)
                     .astype(jnp.bfloat16))
  xla_fp8 = jax.jit(lambda a, b, sa, sb: (lax.dot_general(
      a, b, DIMS, preferred_element_type=jnp.float32) * (sa * sb)).astype(jnp.bfloat16))
  out = {"xla_bf16": (None, xla_bf16), "xla_fp8_tensor": ("tensor", xla_fp8)}
  for layout in G.LAYOUTS:
    out[f"triton_{layout}"] = (layout, jax.jit(
        lambda a, b, sa, sb, layout=layout: G.fp8_gemm(a, b, sa, sb, layout=layout)))
  for layout in ("block", "tensor", "row"):
    out[f"mosaic_{layout}"] = (layout, jax.jit(
        lambda a, b, sa, sb, layout=layout: MG.fp8_gemm(a, b, sa, sb, layout=layout)))
  return out


def apply_sweep(path):
  """Puts the sweep's best config per kernel (highest summed TFLOP/s over shapes where every
  candidate ran) into the in-process tuning tables of the prefill shape classes."""
  rows = json.load(open(path))["rows"]
  chosen = {}
  for kernel in ("triton_block", "triton_plain", "mosaic"):
    totals, counts = {}, {}
    for r in rows:
      if r["kernel"] != kernel:
        continue
      key = json.dumps(r["config"], sort_keys=True)
      counts[key] = counts.get(key, 0) + 1
      totals[key] = totals.get(key, 0.0) + r.get("tflops", float("-inf"))
    if not totals:
      continue
    best = json.loads(max(totals, key=lambda c: (counts[c], totals[c])))
    chosen[kernel] = best
    for cls in ("medium", "large"):
      if kernel == "mosaic":
        MG.TUNING[cls] = MG.MgpuConfig(**best)
      else:
        lay = "block" if kernel == "triton_block" else "plain"
        G.TUNING[(lay, cls)] = G.GemmConfig(**best)
  return chosen


def run(args):
  chosen = apply_sweep(args.tuning_from) if args.tuning_from else None
  device = jax.devices()[0]
  meta = dict(device=str(getattr(device, "device_kind", device)), jax=jax.__version__,
              date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              triton_shim=_triton_fp8_shim.status(), mosaic=MG.unavailable_reason() or "available",
              timing=(f"median of {args.reps} batches x >={args.calls} calls (>=25 ms per batch), "
                      + ("each variant's batches back to back" if args.sequential else
                         "batches interleaved: every round times one batch of each variant")),
              triton_tuning={f"{k[0]}/{k[1]}": vars(v) for k, v in G.TUNING.items()},
              mosaic_tuning={k: vars(v) for k, v in MG.TUNING.items()},
              tuning_from_sweep=chosen)
  print(json.dumps({"meta": meta}), flush=True)
  rows = []
  todo = shapes()
  if args.quick:
    todo = [s for s in todo if s[3] in ("8192^3", "gate_up M=2048")]
  if args.labels:
    wanted = args.labels.split(",")
    todo = sorted((s for s in todo if s[3] in wanted), key=lambda s: wanted.index(s[3]))
  for m, n, k, label in todo:
    a, b, q = make_operands(m, n, k)
    refs = {}
    flops = 2 * m * n * k
    shape_rows, timed = [], {}
    for name, (layout, fn) in variants().items():
      if args.only and not any(name.startswith(p) for p in args.only.split(",")):
        continue
      if name.startswith("mosaic") and not MG.available():
        continue
      row = dict(shape=label, m=m, n=n, k=k, variant=name)
      try:  # compile, run once, check against the f32 reference
        if layout is None:
          ops = (a, b)
          ref = lax.dot_general(a[:REF_ROWS], b, DIMS, preferred_element_type=jnp.float32,
                                precision=lax.Precision.HIGHEST)
          in_bytes = 2 * (m * k + n * k)
        else:
          ops = q[layout]
          if layout not in refs:
            a8, b8, sa, sb = ops
            refs[layout] = G.fp8_gemm_reference(
                a8[:REF_ROWS], b8, sa if sa.shape[0] == 1 else sa[:REF_ROWS], sb, layout=layout,
                out_dtype=jnp.float32)
          ref = refs[layout]
          in_bytes = m * k + n * k
        out = jax.block_until_ready(fn(*ops))
        row.update(rel_err=rel_err(out[:REF_ROWS], ref), in_bytes=in_bytes)
        del out, ref
        timed[name] = (fn, ops)
      except Exception as e:  # record, keep going
        row["error"] = (type(e).__name__ + ": " + str(e))[:400]
        traceback.print_exc(limit=2)
      shape_rows.append(row)
    if args.sequential:
      batch_s = {name: harness.call_times(f, *ops, calls=args.calls, reps=args.reps,
                                          min_batch_s=0.025)[0]
                 for name, (f, ops) in timed.items()}
      clocks = []
    else:
      batch_s, clocks = harness.interleaved_times(timed, calls=args.calls, reps=args.reps,
                                                  min_batch_s=0.025,
                                                  between_rounds=harness.gpu_clock_sample)
    for row in shape_rows:
      if row["variant"] in batch_s:
        t = statistics.median(batch_s[row["variant"]])
        row.update(time_us=t * 1e6, tflops=flops / t / 1e12,
                   gbps=(row.pop("in_bytes") + 2 * m * n) / t / 1e9,
                   batch_us=[round(x * 1e6, 3) for x in batch_s[row["variant"]]])
      if clocks:
        row["gpu_clock_per_round"] = clocks
      print(json.dumps(row), flush=True)
      rows.append(row)
    del a, b, q, refs, timed
  return meta, rows


def from_logs(paths):
  """Rows and per-run metadata from the JSON-lines logs of earlier runs (first row per
  (shape, variant) wins, so list the logs in the order their rows should be preferred)."""
  runs, rows, seen = [], [], set()
  for path in paths:
    for line in open(path):
      if not line.startswith("{"):
        continue
      obj = json.loads(line)
      if "meta" in obj:
        runs.append(dict(obj["meta"], log=os.path.basename(path)))
        continue
      key = (obj["shape"], obj["variant"])
      if key not in seen:
        seen.add(key)
        rows.append(dict(obj, log=os.path.basename(path)))
  order = {s[3]: i for i, s in enumerate(shapes())}
  rows.sort(key=lambda r: order.get(r["shape"], 99))
  first = runs[0] if runs else {}
  meta = dict(device=first.get("device", "?"), jax=first.get("jax", "?"),
              date=first.get("date", "?"), timing=first.get("timing", "?"), runs=runs)
  return meta, rows


def paired_ratio(vs):
  """Median over rounds of XLA FP8's time / the faster block kernel's time in the same round
  (interleaved runs only: rows with per-batch times from the same rounds), else None."""
  fp8 = vs.get("xla_fp8_tensor", {}).get("batch_us")
  blocks = [vs[v]["batch_us"] for v in ("triton_block", "mosaic_block") if "batch_us" in vs.get(v, {})]
  if not fp8 or not blocks or any(len(b) != len(fp8) for b in blocks):
    return None
  return statistics.median(f / min(b[i] for b in blocks) for i, f in enumerate(fp8))


def summarize(meta, rows):
  by = {}
  for r in rows:
    by.setdefault(r["shape"], {})[r["variant"]] = r
  names = sorted({r["variant"] for r in rows}, key=lambda v: list(variants()).index(v))
  lines = [f"# FP8 GEMM, {meta['device']}, jax {meta['jax']}, {meta['date']}", "",
           f"TFLOP/s ({meta['timing']}); ratios vs XLA bf16 and XLA FP8 per-tensor (cuBLASLt) of "
           "the same run; rel err vs fp8_gemm_reference (f32 math) over the first 1024 output rows.", "",
           "| shape | " + " | ".join(names) + " | triton_block / bf16 | best block / xla_fp8 "
           "| same, median of per-round ratios |",
           "|" + "---|" * (len(names) + 4)]
  ratios = {}
  for shape, vs in by.items():
    cells = []
    for v in names:
      r = vs.get(v)
      cells.append("-" if r is None else ("ERR" if "error" in r else
                   f"{r['tflops']:.0f} ({r['rel_err']:.1e})"))
    bf16 = vs.get("xla_bf16", {}).get("tflops")
    fp8 = vs.get("xla_fp8_tensor", {}).get("tflops")
    tb = vs.get("triton_block", {}).get("tflops")
    blocks = [vs[v]["tflops"] for v in ("triton_block", "mosaic_block") if "tflops" in vs.get(v, {})]
    r1 = tb / bf16 if tb and bf16 else None
    r2 = max(blocks) / fp8 if blocks and fp8 else None
    ratios[shape] = dict(triton_block_vs_bf16=r1, best_block_vs_xla_fp8=r2,
                         best_block_vs_xla_fp8_paired=paired_ratio(vs))
    fmt = lambda x: "-" if x is None else f"{x:.2f}x"
    lines.append(f"| {shape} | " + " | ".join(cells)
                 + f" | {fmt(r1)} | {fmt(r2)} | {fmt(ratios[shape]['best_block_vs_xla_fp8_paired'])} |")
  lines += ["", "GB/s (A and B read once, C written once; bf16 operands for xla_bf16, FP8 otherwise):", "",
            "| shape | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
  for shape, vs in by.items():
    cells = [f"{vs[v]['gbps']:.0f}" if "gbps" in vs.get(v, {}) else "-" for v in names]
    lines.append(f"| {shape} | " + " | ".join(cells) + " |")
  clock_lines = []
  for shape, vs in by.items():
    samples = [c for r in vs.values() for c in (r.get("gpu_clock_per_round") or []) if c][:64]
    if samples:
      sm = [c["sm_mhz"] for c in samples]
      pw = [c["power_w"] for c in samples]
      clock_lines.append(f"| {shape} | {min(sm):.0f}-{max(sm):.0f} | {min(pw):.0f}-{max(pw):.0f} |")
  if clock_lines:
    lines += ["", "nvidia-smi after each round (SM clock MHz, power W):", "",
              "| shape | SM clock | power |", "|---|---|---|"] + clock_lines
  for run_meta in meta.get("runs", []):
    lines.append(f"\nRun {run_meta.get('log')}: {run_meta.get('device')}, jax {run_meta.get('jax')}, "
                 f"{run_meta.get('date')}, {run_meta.get('timing')}. {run_meta.get('note', '')}")
  lines.append("\nEach shape's variants, baselines included, were timed in the same run.")
  return "\n".join(lines) + "\n", ratios


def plot(rows, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  shapes_ = list(dict.fromkeys(r["shape"] for r in rows))
  names = list(dict.fromkeys(r["variant"] for r in rows))
  fig, ax = plt.subplots(figsize=(max(10, 1.2 * len(shapes_)), 5))
  width = 0.8 / len(names)
  for i, v in enumerate(names):
    ys = [next((r.get("tflops", 0) for r in rows if r["shape"] == s and r["variant"] == v), 0)
          for s in shapes_]
    ax.bar(np.arange(len(shapes_)) + i * width, ys, width, label=v)
  ax.set_xticks(np.arange(len(shapes_)) + 0.4)
  ax.set_xticklabels(shapes_, rotation=30, ha="right", fontsize=8)
  ax.set_ylabel("TFLOP/s")
  ax.set_title("FP8 GEMM (Llama-3-8B prefill projections), H100")
  ax.legend(fontsize=7, ncol=3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
  p.add_argument("--calls", type=int, default=10)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--quick", action="store_true", help="two shapes only")
  p.add_argument("--sequential", action="store_true",
                 help="time each variant's batches back to back (the method of runs before "
                      "2026-12-05) instead of interleaving the variants round by round")
  p.add_argument("--only", default="", help="comma-separated variant name prefixes")
  p.add_argument("--tuning-from", default="", help="gemm_sweep.json whose winners to use")
  p.add_argument("--labels", default="", help="comma-separated shape labels to run, in order")
  p.add_argument("--from-logs", default="",
                 help="comma-separated logs of earlier runs (JSON lines): summarise, no timing")
  args = p.parse_args()
  os.makedirs(args.out, exist_ok=True)
  if args.from_logs:
    meta, rows = from_logs(args.from_logs.split(","))
  else:
    meta, rows = run(args)
  table, ratios = summarize(meta, rows)
  json.dump(dict(meta=meta, rows=rows, ratios=ratios), open(os.path.join(args.out, "gemm.json"), "w"),
            indent=1)
  open(os.path.join(args.out, "gemm.md"), "w").write(table)
  try:
    plot(rows, os.path.join(args.out, "gemm.png"))
  except Exception as e:
    print("plot failed:", e)
  print(table)


if __name__ == "__main__":
  main()
