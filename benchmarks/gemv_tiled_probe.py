"""Probe: does a tile-major FP8 weight layout raise the M = 1 GEMV's read rate?

The M = 1 decode GEMV (`fp8_gemv`, FMA loop) reads each program's (block_n, block_k) weight tile
as block_n rows of block_k bytes, K bytes apart (a 16 x 512 tile: sixteen 512-byte pieces), and
streams gate_up at ~3.3 TB/s where an XLA reduction over the same bytes reads 4.0 TB/s
(results/gemv_layout_h200.md). This times a minimal W8A16 FMA GEMV (one per-tensor scale, f32
accumulation, no split-K) on the weight stored
- "nk": (N, K) as today, the tile read as block_n row pieces;
- "tiled": (N / block_n, K / block_k, block_n, block_k), every tile one contiguous run;
- "kblk": (K / block_k, N, block_k), K-blocked: any block_n rows of one K block are contiguous
  (only block_k is baked into the layout),
and the committed `fp8_gemv` (its tables) on (N, K) and on K-blocked weights
(`fp8_gemv.to_k_blocked`, K blocks of 512 and 1024) as the baseline, R distinct weights per jit, GPU kernel time from a
profiler trace. Not library code: a measurement for the decision (results/gemv_tiled_probe_*.md).

    PYTHONPATH=$PWD python3 benchmarks/gemv_tiled_probe.py --out $OUT
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import fp8_gemv as G
from pallas_kernels import triton_compat

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from gemv_layout import timed_us  # noqa: E402  (R weights per jit, GPU time from a trace)

SUB = 128  # K width of one FMA sub-tile (the committed kernel's scale block)
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
          "down": (4096, 14336), "lm_head": (128256, 4096)}


def _kernel(a_ref, w_ref, s_ref, o_ref, *, bn, bk, steps, tiled, split):
    """One program: rows [i bn, (i + 1) bn) over its K split, in bk steps of 128-wide sub-tiles
    accumulated into a (bn, 128) f32 tile (the committed kernel's FMA loop and registers)."""
    i = pl.program_id(0)
    j = pl.program_id(1)

    def body(t, acc):
        kt = j * steps + t
        for sub in range(bk // SUB):
            a = a_ref[pl.ds(0, 1), pl.ds(kt * bk + sub * SUB, SUB)].astype(jnp.float32)
            if tiled == "tiled":
                w = w_ref[i, kt, :, pl.ds(sub * SUB, SUB)]
            elif tiled == "kblk":
                w = w_ref[kt, pl.ds(i * bn, bn), pl.ds(sub * SUB, SUB)]
            else:
                w = w_ref[pl.ds(i * bn, bn), pl.ds(kt * bk + sub * SUB, SUB)]
            acc = acc + w.astype(jnp.float32) * a
        return acc

    acc = lax.fori_loop(0, steps, body, jnp.zeros((bn, SUB), jnp.float32))
    out = jnp.sum(acc, axis=1)[None, :] * s_ref[0]
    if split == 1:
        o_ref[pl.ds(0, 1), pl.ds(i * bn, bn)] = out.astype(o_ref.dtype)
    else:
        o_ref[pl.ds(j, 1), pl.ds(i * bn, bn)] = out


@functools.partial(jax.jit, static_argnames=("n", "k", "bn", "bk", "tiled", "split", "warps"))
def gemv(a, w, s, *, n, k, bn, bk, tiled, split, warps):
    steps = k // bk // split
    out_dtype = jnp.bfloat16 if split == 1 else jnp.float32
    o = pl.pallas_call(
        functools.partial(_kernel, bn=bn, bk=bk, steps=steps, tiled=tiled, split=split),
        grid=(n // bn, split),
        out_shape=jax.ShapeDtypeStruct((split, n), out_dtype),
        name="gemv_probe",
        **triton_compat.compiler_params(num_warps=warps, num_stages=3))(a, w, s)
    return o if split == 1 else o.sum(0, keepdims=True).astype(jnp.bfloat16)


def to_layout(w, layout, bn, bk):
    n, k = w.shape
    if layout == "tiled":
        return w.reshape(n // bn, bn, k // bk, bk).transpose(0, 2, 1, 3).copy()
    if layout == "kblk":
        return G.to_k_blocked(w, bk).copy()
    return w


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tag", default=None, help="file name tag (default: h100 / h200 from the device)")
    ap.add_argument("--shapes", default="gate_up,down,qkv,o,lm_head")
    ap.add_argument("--configs", default="16,512,1,4;8,1024,1,4;32,256,1,4;16,1024,1,4;16,512,4,4",
                    help="';'-separated bn,bk,split_k,warps")
    args = ap.parse_args(argv)
    ceiling = harness.copy_ceiling_gbs(1 << 30, calls=20)
    rows = []
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        r = max(4, min(32, round(512e6 / (n * k))))
        keys = jax.random.split(jax.random.key(n + k), r)
        ws = [jnp.clip(jax.random.normal(kk, (n, k), jnp.float32) * 100, -448, 448
                       ).astype(jnp.float8_e4m3fn) for kk in keys]
        a = jax.random.normal(jax.random.key(1), (1, k), jnp.bfloat16)
        s = jnp.full((1,), 1 / 448, jnp.float32)
        ws_block = jnp.full((-(-n // 128), -(-k // 128)), 1 / 448, jnp.float32)
        row = dict(name=name, N=n, K=k, R=r, us={})
        ref = jnp.dot(a.astype(jnp.float32), ws[0].astype(jnp.float32).T) / 448
        row["us"]["committed fp8_gemv"] = round(timed_us(
            lambda a, w, wsb: G.fp8_gemv(a, w, None, wsb, layout="block"), a, ws, ws_block), 2)
        for wb in (512, 1024):   # the committed kernel and tables on K-blocked weights
            wl = [G.to_k_blocked(w, wb) for w in ws]
            row["us"][f"committed fp8_gemv, kblk{wb}"] = round(timed_us(
                lambda a, w, wsb: G.fp8_gemv(a, w, None, wsb, layout="block"), a, wl, ws_block), 2)
            del wl
        row["us"]["xla_read_floor"] = round(timed_us(lambda a, w: jnp.max(lax.bitcast_convert_type(
            w.reshape(n, k // 4, 4), jnp.uint32)), a, ws), 2)
        for spec in args.configs.split(";"):
            bn, bk, split, warps = (int(v) for v in spec.split(","))
            if k % (bk * split) or n % bn:
                continue
            for tiled in ("nk", "tiled", "kblk"):
                wl = [to_layout(w, tiled, bn, bk) for w in ws]
                f = functools.partial(gemv, n=n, k=k, bn=bn, bk=bk, tiled=tiled, split=split,
                                      warps=warps)
                label = f"{tiled} bn{bn} bk{bk} sk{split} w{warps}"
                try:
                    err = float(jnp.max(jnp.abs(f(a, wl[0], s).astype(jnp.float32) - ref))
                                / jnp.max(jnp.abs(ref)))
                    row["us"][label] = round(timed_us(f, a, wl, s), 2)
                    row.setdefault("err", {})[label] = err
                except Exception as e:  # noqa: BLE001 - record and go on
                    row["us"][label] = f"error: {type(e).__name__}: {str(e)[:160]}"
                del wl
        rows.append(row)
        print(f"{name}: " + "  ".join(f"{kk}={v}" for kk, v in row["us"].items()), flush=True)
    meta = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                copy_ceiling_gbs=round(ceiling, 1), command="python3 benchmarks/gemv_tiled_probe.py "
                + " ".join(argv or sys.argv[1:]))
    tag = args.tag or ("h200" if "H200" in meta["device"] else "h100")
    stem = os.path.join(args.out, f"gemv_tiled_probe_{tag}")
    with open(stem + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(f"# M = 1 GEMV: (N, K) vs tile-major FP8 weights, {meta['device']}, jax {meta['jax']}, "
                f"{meta['date']}\n\n`{meta['command']}`; copy ceiling {meta['copy_ceiling_gbs']} GB/s; "
                "GPU µs per matmul (R distinct weights per jit), TB/s on the weight bytes in brackets.\n\n")
        labels = list(dict.fromkeys(lab for row in rows for lab in row["us"]))
        f.write("| variant | " + " | ".join(r["name"] for r in rows) + " |\n|---|"
                + "---|" * len(rows) + "\n")
        for lab in labels:
            cells = []
            for row in rows:
                v = row["us"].get(lab, "-")
                cells.append(f"{v} ({row['N'] * row['K'] / v / 1e6:.2f})" if isinstance(v, float)
                             else str(v)[:30])
            f.write(f"| {lab} | " + " | ".join(cells) + " |\n")
    print(open(stem + ".md").read())


if __name__ == "__main__":
    main()
