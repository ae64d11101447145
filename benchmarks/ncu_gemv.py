"""Run each Llama-3-8B projection's decode GEMV (W8A16, block-scaled FP8 weights, committed tuning
table) a few times, for Nsight Compute to read the hardware counters of.

    ncu --clock-control none -k regex:fp8_gemv --launch-skip 4 --launch-count 5 \
        --section SpeedOfLight --section Occupancy --section WarpStateStats \
        python3 benchmarks/ncu_gemv.py --m 1

The first call per shape compiles; ncu's --launch-skip passes over the warm-up launches.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from pallas_kernels import fp8_gemv as G

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
          "down": (4096, 14336), "lm_head": (128256, 4096)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--shapes", default="qkv,o,gate_up,down,lm_head")
    ap.add_argument("--calls", type=int, default=2)
    args = ap.parse_args()
    key = jax.random.key(0)
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        w = jax.random.normal(key, (n, k), jnp.float32).astype(jnp.float8_e4m3fn)
        ws = jnp.ones((-(-n // 128), -(-k // 128)), jnp.float32)
        a = jax.random.normal(key, (args.m, k), jnp.float32).astype(jnp.bfloat16)
        for _ in range(args.calls):
            jax.block_until_ready(G.fp8_gemv(a, w, None, ws, layout="block"))
        print(name, G.config_for(args.m, n, k, "block"), flush=True)


if __name__ == "__main__":
    main()
