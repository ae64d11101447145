"""Probe: does the FP8 KV cache's memory layout limit the decode-attention kernel's read rate?

The library stores K as (L, B, S, Hkv, D): one token's head row is 128 bytes (FP8, D = 128) and
the next token of the same head is Hkv * D bytes further on, so a 128-token K block is 128 lines
1 KB apart; V "ds" is (L, B, Hkv, D, P): a block is D lines of 128 bytes, P bytes apart. This
times the same kernel on the same values stored so that blocks are contiguous:

  base   K (L, B, S, Hkv, D),  V (L, B, Hkv, D, P)          the library's layout
  khsd   K (L, B, Hkv, S, D),  V as base                    a K block is 16 KB contiguous
  vblk   K as base,            V (L, B, Hkv, S/bk, D, bk)  a V block is 16 KB contiguous
  both   both of the above

    PYTHONPATH=$PWD python3 benchmarks/attention_layout_probe.py --out $OUT

GPU kernel time per layer (profiler trace, attention + combine), per-tensor and per-token scales;
every variant's output is checked equal to base's (same blocks, same order: bit-identical).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from pallas_kernels import decode_attention as da  # noqa: E402

HQ, HKV = 32, 8


def probe(B, S, D, pitch_mult=128, log=print):
    cfg = da.config_for(B, S, D)
    bk = cfg.block_k
    n = max(1, min(16, math.ceil(2e9 / (2 * B * S * HKV * D))))
    key = jax.random.key(B * 7 + S)
    k1, k2, k3 = jax.random.split(key, 3)
    k8 = (jax.random.normal(k1, (n, B, S, HKV, D), jnp.float32) * 40).astype(jnp.float8_e4m3fn)
    v8 = (jax.random.normal(k2, (n, B, S, HKV, D), jnp.float32) * 40).astype(jnp.float8_e4m3fn)
    q = jax.random.normal(k3, (n, B, 1, HQ, D), jnp.bfloat16)
    ks_tok = jax.random.uniform(k1, (n, B, S, HKV), jnp.float32, 0.01, 0.02)
    vs_tok = jax.random.uniform(k2, (n, B, S, HKV), jnp.float32, 0.01, 0.02)
    lengths = jnp.full((B,), S, jnp.int32)
    P = -(-S // pitch_mult) * pitch_mult
    nb = -(-S // bk)
    v_ds = jnp.pad(jnp.moveaxis(v8, 2, -1), [(0, 0)] * 4 + [(0, P - S)])          # (n,B,H,D,P)
    v_pad = jnp.pad(jnp.moveaxis(v8, 2, -1), [(0, 0)] * 4 + [(0, nb * bk - S)])
    v_blk = jnp.moveaxis(v_pad.reshape(n, B, HKV, D, nb, bk), 4, 3)                # (n,B,H,NB,D,bk)
    del v_pad
    k_hsd = jnp.moveaxis(k8, 3, 2)                                                  # (n,B,H,S,D)
    ks_hsd, vs_hsd = jnp.moveaxis(ks_tok, 3, 2), jnp.moveaxis(vs_tok, 3, 2)
    jax.block_until_ready((v_ds, v_blk, k_hsd, ks_hsd, vs_hsd))
    del v8
    variants = {"base": (k8, v_ds, "shd", "ds"), "khsd": (k_hsd, v_ds, "hsd", "ds"),
                "vblk": (k8, v_blk, "shd", "dsb"), "both": (k_hsd, v_blk, "hsd", "dsb")}
    row = dict(B=B, S=S, D=D, layers=n, config=str(cfg), us={}, gbs={}, equal_to_base={})
    nbytes = 2 * B * S * HKV * D
    ref = {}
    for scales in ("tensor", "token"):
        for name, (kk, vv, kl, vl) in variants.items():
            if scales == "token":
                ks, vs = (ks_hsd, vs_hsd) if kl == "hsd" else (ks_tok, vs_tok)
            else:
                ks = vs = jnp.full((n,), 0.015, jnp.float32)

            def fn(q, kk, vv, ks, vs, kl=kl, vl=vl):
                return [da._decode_attention_jit(q[l], kk, vv, lengths, ks, vs, l,
                                                 sm_scale=D ** -0.5, config=cfg, interpret=False,
                                                 v_layout=vl, k_layout=kl) for l in range(n)]
            fn = jax.jit(fn)
            out = fn(q, kk, vv, ks, vs)
            t, _ = harness.kernel_time(fn, (q, kk, vv, ks, vs))
            tag = f"{name}_{scales}"
            row["us"][tag] = t / n * 1e6
            row["gbs"][tag] = nbytes / (t / n) / 1e9
            o0 = jnp.stack(out).astype(jnp.float32)
            if name == "base":
                ref[scales] = o0
            row["equal_to_base"][tag] = bool(jnp.array_equal(o0, ref[scales]))
            log(f"B={B} S={S} D={D} {tag:12s} {row['us'][tag]:8.1f} us/layer "
                f"{row['gbs'][tag]:6.0f} GB/s equal={row['equal_to_base'][tag]}")
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--shapes", default="16x32808x128,16x4104x128,1x4104x128,16x32808x64")
    ap.add_argument("--tag", default="h200")
    a = ap.parse_args()
    rows = []
    for spec in a.shapes.split(","):
        B, S, D = map(int, spec.split("x"))
        rows.append(probe(B, S, D))
    meta = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"attention_layout_probe_{a.tag}.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print("| B | S | D | " + " | ".join(rows[0]["us"]) + " |")
    for r in rows:
        print(f"| {r['B']} | {r['S']} | {r['D']} | " +
              " | ".join(f"{v:.1f}" for v in r["us"].values()) + " |")


if __name__ == "__main__":
    main()
