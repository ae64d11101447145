"""Run the decode attention (and its split combine) on the 8B B = 1 decode shape a few times, for
Nsight Compute to read the hardware counters of: FP8 "hsd" cache, per-token scales, Hq 32, Hkv 8,
D 128, a 4K context plus 32 generated tokens of room, stacked over 2 layers (layer 1 read).

    ncu --clock-control none -k regex:jfp8_decode_attention --launch-skip 4 --launch-count 2 \
        --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
        python3 benchmarks/ncu_attention.py

Each call is two launches (attention, combine); the first call compiles. --fused-append runs
the decode step's form instead (`decode_attention_qkv`: the new token's K/V append in the
attention kernel; qkv and RoPE tables random).
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from jfp8.kv_cache import v_block
from pallas_kernels import decode_attention as A


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--length", type=int, default=4097, help="valid tokens incl. the new one")
  ap.add_argument("--max-len", type=int, default=4096 + 32)
  ap.add_argument("--calls", type=int, default=3)
  ap.add_argument("--fused-append", action="store_true")
  args = ap.parse_args()
  L, B, Hq, Hkv, D, S = 2, args.batch, 32, 8, 128, args.max_len
  ks = jax.random.split(jax.random.key(0), 7)
  f8 = jnp.float8_e4m3fn
  q = jax.random.normal(ks[0], (B, 1, Hq, D), jnp.float32).astype(jnp.bfloat16)
  k = jax.random.normal(ks[1], (L, B, Hkv, S, D), jnp.float32).astype(f8)
  v = jax.random.normal(ks[2], A.v_shape_for(k.shape, "hsd", v_block(D)), jnp.float32).astype(f8)
  k_scale = jax.random.uniform(ks[3], (L, B, Hkv, S), jnp.float32, 0.01, 0.1)
  v_scale = jax.random.uniform(ks[4], (L, B, Hkv, S), jnp.float32, 0.01, 0.1)
  lengths = jnp.full((B,), args.length, jnp.int32)
  qkv = jax.random.normal(ks[5], (B, 1, (Hq + 2 * Hkv) * D), jnp.float32).astype(jnp.bfloat16)
  angles = jax.random.uniform(ks[6], (B, 1, D // 2), jnp.float32, 0.0, 6.0)
  for _ in range(args.calls):
    if args.fused_append:
      out = A.decode_attention_qkv(qkv, jnp.cos(angles), jnp.sin(angles), k, v, k_scale, v_scale,
                                   lengths - 1, layer=1, num_q_heads=Hq, layout="hsd")
    else:
      out = A.decode_attention(q, k, v, lengths, k_scale, v_scale, layer=1, layout="hsd")
    jax.block_until_ready(out)
  cfg = A.config_for(B, S, D)
  print("config", cfg, "splits", cfg.num_splits(B, Hkv, S), flush=True)


if __name__ == "__main__":
  main()
