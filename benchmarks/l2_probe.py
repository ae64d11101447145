"""Does an M = 1 decode GEMV read faster when its FP8 weight is already in L2?

Motivation: at B = 1 the HBM is mostly idle while the latency-bound kernels of a layer run
(attention, combine, K/V append, norms: ~13 µs a layer at 8B 4K), so the next projection's
weight could be pulled into L2 meanwhile. That only pays if the GEMV reading an L2-resident
weight is much faster than one reading HBM. Times `fp8_gemv` (table config, W8A16, block scales)
on R weights back to back in one jit: "cold" = R distinct weights (R x size >> L2, every call
reads HBM); "hot" = the same weight R times with a different activation row each (no CSE), so
from the second call on the weight is in L2 when it fits (50 MB L2 on the H100 / H200).

    PYTHONPATH=$PWD python3 benchmarks/l2_probe.py --out $OUT
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import harness  # noqa: E402
from pallas_kernels import fp8_gemv as G  # noqa: E402

SHAPES = [(4096, 4096, "o"), (6144, 4096, "qkv"), (5120, 4096, "gate_up slice 21 MB"),
          (4096, 14336, "down"), (28672, 4096, "gate_up")]
R = 16


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default="benchmarks/results")
  args = p.parse_args()
  rows = []
  for n, k, name in SHAPES:
    key = jax.random.key(n + k)
    ws = [jax.random.normal(jax.random.fold_in(key, i), (n, k), jnp.float32).astype(jnp.float8_e4m3fn)
          for i in range(R)]
    s = jnp.ones((n // 128, k // 128), jnp.float32)
    xs = jax.random.normal(key, (R, 1, k), jnp.bfloat16)
    gemv = lambda x, w: G.fp8_gemv(x, w, None, s, layout="block")
    cold = jax.jit(lambda xs, ws: [gemv(xs[i], ws[i]) for i in range(R)])
    hot = jax.jit(lambda xs, w: [gemv(xs[i], w) for i in range(R)])
    t_cold = min(harness.call_times(cold, xs, ws, calls=10, reps=5)[0]) / R
    t_hot = min(harness.call_times(hot, xs, ws[0], calls=10, reps=5)[0]) / R
    row = dict(name=name, n=n, k=k, mbytes=n * k / 1e6, cold_us=round(t_cold * 1e6, 2),
               hot_us=round(t_hot * 1e6, 2), cold_tbs=round(n * k / t_cold / 1e12, 2),
               hot_tbs=round(n * k / t_hot / 1e12, 2))
    print(json.dumps(row), flush=True)
    rows.append(row)
    del ws
  meta = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__, R=R)
  json.dump(dict(meta=meta, rows=rows), open(os.path.join(args.out, "l2_probe.json"), "w"), indent=1)
  lines = [f"# M = 1 GEMV, weight in L2 or not ({meta['device']}, jax {meta['jax']})", "",
           "| weight | MB | cold µs (TB/s) | hot µs (TB/s) |", "|---|---|---|---|"]
  lines += [f"| {r['name']} | {r['mbytes']:.1f} | {r['cold_us']} ({r['cold_tbs']}) | "
            f"{r['hot_us']} ({r['hot_tbs']}) |" for r in rows]
  open(os.path.join(args.out, "l2_probe.md"), "w").write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
