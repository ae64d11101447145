"""Does the weight's memory layout decide the M = 1 read rate? XLA's own M = 1 dots, both layouts,
the Triton tile XLA picked, and our FP8 GEMV configs, in one run.

The 8B BF16 decode step's XLA dots read their (K, N) weights at up to ~4.3 TB/s inside the step
(results/profile_decode_h200*.json: gate_up 54 µs for 235 MB), while the standalone benchmark's
(N, K) bf16 dot of the same shape took 64 µs and our K-major FP8 GEMV reads at ~3.2 TB/s. This
times, per Llama-3-8B projection, R distinct weights back to back in one jit (so nothing stays in
L2), GPU kernel time from a profiler trace:
- XLA bf16 dot with the weight stored (N, K) and (K, N); XLA's FP8-upcast dot in both layouts;
- an XLA read of the FP8 bytes alone (max over the weight viewed as uint32);
- `fp8_gemv` W8A16, block-scaled, each config of --configs (bn,bk,sk,warps,stages,fma[,field=v]).
and prints the Triton tile XLA chose for each dot (the optimized HLO's backend config).

    PYTHONPATH=$PWD python3 benchmarks/gemv_layout.py --out $OUT --tag h200
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import sys

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import fp8_gemm_mgpu as M
from pallas_kernels import fp8_gemv as G

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
          "down": (4096, 14336), "lm_head": (128256, 4096)}
DN_NK = (((1,), (1,)), ((), ()))     # a (1, K) . w (N, K)^T
DN_KN = (((1,), (0,)), ((), ()))     # a (1, K) . w (K, N)
DEFAULT_CONFIGS = ("committed;16,512,1,4,3,1;8,1024,1,4,3,1;8,2048,1,4,3,1;4,4096,1,4,3,1;"
                   "4,4096,1,2,3,1;16,1024,1,4,3,1")


def parse_config(spec: str) -> G.GemvConfig | None:
    """'committed' -> None (the tuning table), else bn,bk,sk,warps,stages,fma[,field=int...]
    (extra GemvConfig fields such as row_blocks=2; 0/1 for bool ones). Also the spec format of
    profile_decode.py's `gemv:` variants."""
    if spec == "committed":
        return None
    fields = spec.split(",")
    bn, bk, sk, warps, stages, fma = (int(v) for v in fields[:6])
    base = G.GemvConfig(bn, bk, split_k=sk, num_warps=warps, num_stages=stages, use_dot=not fma)
    extra = {f: type(getattr(base, f))(int(v)) for f, v in (x.split("=") for x in fields[6:])}
    return dataclasses.replace(base, **extra)


def xla_tiles(f, *args) -> list[str]:
    """The Triton GEMM configs (or other custom kernels) in `f`'s optimized HLO."""
    text = jax.jit(f).lower(*args).compile().as_text()
    found = [text[m.end():m.end() + 320].split("}}}")[0]
             for m in re.finditer(r'"fusion_backend_config":', text) if "gemm" in
             text[m.end():m.end() + 80] or "block_level" in text[m.end():m.end() + 120]]
    found += re.findall(r'custom_call_target="([^"]+)"', text)
    return sorted(set(found))


def timed_us(f, a, ws, *extra) -> float:
    """GPU µs per matmul: R weights through f in one jit (kernel time from a trace)."""
    g = jax.jit(lambda a, ws, *e: tuple(f(a, w, *e) for w in ws))
    secs, _ = harness.kernel_time(g, (a, ws, *extra), calls=5)
    return secs * 1e6 / len(ws)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tag", default="")
    ap.add_argument("--shapes", default="qkv,o,gate_up,down,lm_head")
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help="';'-separated GEMV configs")
    ap.add_argument("--mgpu", default="", help="';'-separated swap-AB probes of the Mosaic GEMM: "
                    "layout,tile_m,tile_n,stages (layout tensor | block)")
    ap.add_argument("--skip-xla", action="store_true")
    ap.add_argument("--m", type=int, default=1, help="activation rows (tokens)")
    args = ap.parse_args(argv)
    ceiling = harness.copy_ceiling_gbs(1 << 30, calls=20)
    dev = jax.devices()[0]
    rows = []
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        r = max(4, min(32, round(512e6 / (n * k))))
        keys = jax.random.split(jax.random.key(n + k), r)
        w_nk = [jax.random.normal(kk, (n, k), jnp.bfloat16) * 0.02 for kk in keys]
        w_kn = [w.T.copy() for w in w_nk]
        f8_nk = [jnp.clip(w * (448 / 0.1), -448, 448).astype(jnp.float8_e4m3fn) for w in w_nk]
        f8_kn = [w.T.copy() for w in f8_nk]
        ws_block = jnp.full((-(-n // 128), -(-k // 128)), 0.1 / 448, jnp.float32)
        s = jnp.full((1, 1), 0.1 / 448, jnp.float32)
        a = jax.random.normal(jax.random.key(1), (args.m, k), jnp.bfloat16)
        row = dict(name=name, N=n, K=k, R=r, us={}, xla_tiles={})

        def bf16_dot(dn):
            return lambda a, w: lax.dot_general(a, w, dn, preferred_element_type=jnp.float32
                                                ).astype(jnp.bfloat16)

        def fp8_upcast(dn):
            return lambda a, w, s: (lax.dot_general(a, w.astype(jnp.bfloat16), dn,
                                                    preferred_element_type=jnp.float32) * s
                                    ).astype(jnp.bfloat16)

        cases = [("xla_bf16_nk", bf16_dot(DN_NK), w_nk, ()), ("xla_bf16_kn", bf16_dot(DN_KN), w_kn, ()),
                 ("xla_fp8_upcast_nk", fp8_upcast(DN_NK), f8_nk, (s,)),
                 ("xla_fp8_upcast_kn", fp8_upcast(DN_KN), f8_kn, (s,)),
                 ("xla_read_floor", lambda a, w: jnp.max(lax.bitcast_convert_type(
                     w.reshape(n, k // 4, 4), jnp.uint32)), f8_nk, ())]
        for label, f, ws, extra in ([] if args.skip_xla else cases):
            row["us"][label] = round(timed_us(f, a, ws, *extra), 2)
            if label.startswith("xla_bf16") or label.startswith("xla_fp8"):
                row["xla_tiles"][label] = xla_tiles(f, a, ws[0], *extra)
        for spec in args.configs.split(";"):
            cfg = parse_config(spec)
            f = (lambda a, w, ws, cfg=cfg: G.fp8_gemv(a, w, None, ws, layout="block", config=cfg))
            try:
                row["us"][f"gemv {spec}"] = round(timed_us(f, a, f8_nk, ws_block), 2)
            except Exception as e:  # a config Triton refuses: record why, go on
                row["us"][f"gemv {spec}"] = f"error: {type(e).__name__}: {str(e)[:200]}"
        for spec in filter(None, args.mgpu.split(";")):
            # Swap-AB probe: the weight as the Mosaic GEMM's A operand (N rows), the token as a
            # 1-row B padded to the CTA tile; per-tensor or per-row-group scales.
            layout, tm, tn, stages = spec.split(",")
            cfg = M.MgpuConfig(int(tm), int(tn), "m", int(stages), "n", 8)
            x8 = a.astype(jnp.float8_e4m3fn)
            if layout == "tensor":
                sa, sb = s, s
            else:
                sa = jnp.full((n, -(-k // 128)), 0.1 / 448, jnp.float32)
                sb = jnp.ones((1, -(-k // 128)), jnp.float32)
            f = (lambda x8, w, sa, sb, cfg=cfg, layout=layout: M.fp8_gemm(
                w, x8, sa, sb, layout="tensor" if layout == "tensor" else "block", config=cfg))
            try:
                g = jax.jit(lambda x8, ws, sa, sb, f=f: tuple(f(x8, w, sa, sb) for w in ws))
                secs, _ = harness.kernel_time(g, (x8, f8_nk, sa, sb), calls=5)
                row["us"][f"mgpu {spec}"] = round(secs * 1e6 / len(f8_nk), 2)
            except Exception as e:
                row["us"][f"mgpu {spec}"] = f"error: {type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
        line = "  ".join(f"{kk}={v}" for kk, v in row["us"].items())
        print(f"{name} N={n} K={k} R={r}: {line}", flush=True)
        for kk, v in row["xla_tiles"].items():
            print(f"   {kk}: {v}", flush=True)
    meta = dict(device=dev.device_kind, jax=jax.__version__, date=datetime.datetime.now(
        datetime.timezone.utc).isoformat(timespec="seconds"), copy_ceiling_gbs=round(ceiling, 1))
    stem = os.path.join(args.out, "gemv_layout" + (f"_{args.tag}" if args.tag else ""))
    with open(stem + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    labels = list(rows[0]["us"]) if rows else []
    with open(stem + ".md", "w") as f:
        f.write(f"# M = {args.m} read rate by weight layout, {meta['device']}, jax {meta['jax']}, "
                f"{meta['date']}\n\nCopy ceiling {meta['copy_ceiling_gbs']} GB/s. GPU µs per "
                "matmul (R distinct weights per jit); GB/s on the weight bytes in brackets.\n\n")
        f.write("| weight | " + " | ".join(labels) + " |\n|---|" + "---|" * len(labels) + "\n")
        for row in rows:
            cells = []
            for lab in labels:
                v = row["us"][lab]
                nbytes = row["N"] * row["K"] * (2 if lab.startswith("xla_bf16") else 1)
                cells.append(f"{v} ({nbytes / v / 1e3:.0f})" if isinstance(v, float) and v > 0
                             else str(v)[:40])
            f.write(f"| {row['name']} | " + " | ".join(cells) + " |\n")
        f.write("\nXLA's Triton tiles:\n\n")
        for row in rows:
            for kk, v in row["xla_tiles"].items():
                f.write(f"- {row['name']} {kk}: `{v}`\n")
    print(open(stem + ".md").read())


if __name__ == "__main__":
    main()
