"""Probe: decode GEMV variants at one M on the Llama-3-8B projections (µs per matmul, R distinct
weights per jit as in gemm_decode.py). W8A16 FMA vs W8A8 with the FP8 weight fed raw to the
tensor-core dot (`GemvConfig.fp8_dot`, activations pre-quantized 1x128, quantize not timed).

    PYTHONPATH=$PWD python3 benchmarks/gemv_probe.py --out $OUT --m 1
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp

from pallas_kernels import fp8_gemv as G
from pallas_kernels import quantize as Q

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gemm_decode as GD  # noqa: E402

C = G.GemvConfig
VARIANTS = {
    "w8a16 fma bn32 bk256 sk4": ("w8a16", C(32, 256, split_k=4, use_dot=False)),
    "w8a8 fma bn32 bk256 sk4": ("w8a8", C(32, 256, split_k=4, use_dot=False)),
    "w8a8 fp8dot swap bn64 bk128 sk2": ("w8a8", C(64, 128, split_k=2, swap_ab=True, fp8_dot=True)),
    "w8a8 fp8dot swap bn64 bk256 sk2": ("w8a8", C(64, 256, split_k=2, swap_ab=True, fp8_dot=True)),
    "w8a8 fp8dot swap bn64 bk512 sk2": ("w8a8", C(64, 512, split_k=2, swap_ab=True, fp8_dot=True)),
    "w8a8 fp8dot swap bn128 bk256 sk2 w8": ("w8a8", C(128, 256, split_k=2, swap_ab=True, fp8_dot=True, num_warps=8)),
    "w8a8 fp8dot swap bn64 bk256 sk4 st4": ("w8a8", C(64, 256, split_k=4, swap_ab=True, fp8_dot=True, num_stages=4)),
    "w8a8 fp8dot bn64 bk256 sk2 (no swap)": ("w8a8", C(64, 256, split_k=2, fp8_dot=True)),
    "w8a8 bf16dot swap bn64 bk256 sk2": ("w8a8", C(64, 256, split_k=2, swap_ab=True)),
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--m", type=int, default=1)
    p.add_argument("--shapes", default="")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    interp = args.smoke
    shapes = [(256, 384, "odd")] if interp else GD.SHAPES
    if args.shapes:
        shapes = [s for s in shapes if s[2] in args.shapes.split(",")]
    ceiling = GD.copy_ceiling_gbs(1 << 20 if interp else 1 << 30)
    out = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, m=args.m, ceiling=ceiling, rows=[])
    for n, k, name in shapes:
        r = 2 if interp else max(4, min(32, round(512e6 / (n * k))))
        keys = jax.random.split(jax.random.key(n + k), r)
        w8 = [jnp.clip(jax.random.normal(kk, (n, k), jnp.float32) * 448 / 5, -448, 448
                       ).astype(jnp.float8_e4m3fn) for kk in keys]
        ws = jax.random.uniform(jax.random.key(1), (-(-n // 128), -(-k // 128)), jnp.float32, 1e-4, 1e-3)
        a = jax.random.normal(jax.random.key(2), (args.m, k), jnp.bfloat16)
        aq, asc = Q.quantize_fp8_reference(a, layout="group")
        for vname, (mode, cfg) in VARIANTS.items():
            x, xs = (a, None) if mode == "w8a16" else (aq, asc)
            row = dict(shape=name, N=n, K=k, variant=vname, cfg=dataclasses.asdict(cfg))
            try:
                ref = G.fp8_gemv_reference(x, w8[0], xs, ws, layout="block", out_dtype=jnp.float32)
                got = G.fp8_gemv(x, w8[0], xs, ws, layout="block", config=cfg, out_dtype=jnp.float32,
                                 interpret=interp)
                row["rel_err"] = GD.rel_err(got, ref)
                t = GD.timed(lambda x, w, s, xs=xs, cfg=cfg: G.fp8_gemv(
                    x, w, xs, s, layout="block", config=cfg, interpret=interp), x, w8, ws, interpret=interp)
                row["us"] = round(t * 1e6, 2)
                row["pct_copy"] = round(100 * n * k / t / 1e9 / ceiling, 1)
            except Exception as e:
                row["error"] = repr(e)[:400]
            out["rows"].append(row)
            print(f"{name:8s} {vname:40s} {row.get('us', '-'):>8} us {row.get('pct_copy', '-'):>6}% "
                  f"err {row.get('rel_err', row.get('error', ''))}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"gemv_probe_m{args.m}.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
