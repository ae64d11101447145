"""Where a decode step's GPU time goes: per-kernel durations from a profiler trace.

    PYTHONPATH=$PWD python3 benchmarks/profile_decode.py --out $OUT \
        --rows llama3.1-8b:fp8wkv_w8a16_head:1:4096,llama3.1-8b:bf16:1:4096

Builds the row exactly as `benchmarks/decode_e2e.py` does (random weights, fused q/k/v and gate/up,
the decode loop in one jit), runs `steps` decode steps under `jax.profiler.trace` and reads the
Perfetto trace it writes: every GPU kernel's duration, summed by kernel name and divided by the
number of steps. Writes `profile_decode.json` (per row: kernels sorted by time per step, their
count per step, the GPU-busy time per step, the measured wall step) and prints a table per row.
It also reads the GPU timeline itself (`harness.timeline`): its span per step and the idle time
inside it (gaps between kernels: launch gaps, or a GPU waiting on the host), with the largest
gaps and the kernels around them, so "wall > busy" can be told apart from inflated kernels.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import decode_e2e  # noqa: E402  (same directory: reuses its model and state set-up)
from harness import durations_by_name, gpu_events, timeline  # noqa: E402


def profile_row(bench, preset, mode, B, ctx, steps, wall_calls=3):
    import jax
    import jax.numpy as jnp
    cfg, model, params = bench.model_params(preset, mode)
    dec, state, stops, max_new = decode_e2e.decode_setup(model, cfg, mode, B, ctx,
                                                         ctx + (wall_calls + 3) * steps + 8,
                                                         (wall_calls + 3) * steps)
    state = dec.decode_fn(params, state, stops, max_new, jnp.asarray(2, jnp.int32))
    jax.block_until_ready(state.tokens)
    walls = []
    for _ in range(wall_calls):  # best of a few calls: one call's wall moves by 1-2%
        u = jnp.asarray(int(state.step) + steps, jnp.int32)
        t = time.perf_counter()
        state = dec.decode_fn(params, state, stops, max_new, u)
        jax.block_until_ready(state.tokens)
        walls.append((time.perf_counter() - t) / steps * 1e3)
    wall_ms = min(walls)
    with tempfile.TemporaryDirectory() as d:
        u = jnp.asarray(int(state.step) + steps, jnp.int32)
        with jax.profiler.trace(d, create_perfetto_trace=True):
            state = dec.decode_fn(params, state, stops, max_new, u)
            jax.block_until_ready(state.tokens)
        events = gpu_events(d)
    times = durations_by_name(events)
    kernels = sorted(((name, sum(v) / steps, len(v) / steps) for name, v in times.items()),
                     key=lambda r: -r[1])
    busy = sum(r[1] for r in kernels)
    tl = timeline(events)
    return dict(preset=preset, mode=mode, batch=B, ctx=ctx, steps=steps, wall_ms_per_step=wall_ms,
                gpu_busy_us_per_step=busy, gpu_span_us_per_step=tl["span_us"] / steps,
                gpu_idle_us_per_step=tl["idle_us"] / steps, largest_gaps=tl["largest_gaps"],
                kernels=[dict(name=n, us_per_step=us, count_per_step=c) for n, us, c in kernels])


def apply_overrides(spec: str) -> None:
    """Patch the kernels' tuning tables for one variant. spec: ';'-separated items
    `gemv:M_CLASS/N_CLASS/K_CLASS=bn,bk,sk,warps,stages,fma[,field=int...]`
    (pallas_kernels.fp8_gemv.TUNING; extra GemvConfig fields such as prefetch=1, row_blocks=2;
    `gemvf16:` the same for TUNING_F16, the tiles of f16 / staged activations),
    `attn:BATCH_CLASS/LEN_CLASS=bk128_tp256_mb1_w4_s2` (pallas_kernels.decode_attention.CONFIGS)
    , `fuse:RMSNorm+SwiGLU` (the prologues dispatch fuses, jfp8._matmul_pallas.FUSED_PROLOGUES;
    `fuse:` alone fuses none) or `stage:N` (W8A16 f16 staging on weights >= N elements,
    jfp8._matmul_pallas.F16_STAGING_MIN_WEIGHT; `stage:0` stages all, a huge N none) or
    `vblock:N` (bytes of the FP8 cache's V token blocks, jfp8.kv_cache.V_BLOCK_BYTES),
    `normstage:0|1` / `swiglustage:0|1` (jfp8._matmul_pallas.NORM_STAGE_FUSED /
    SWIGLU_STAGE_FUSED), `appendattn:0|1` (jfp8.attention.APPEND_IN_ATTENTION), `combine:N`
    (pallas_kernels.decode_attention.COMBINE_MIN_PROGRAMS; 1 = one program per KV head) or
    `defer:0|1` (jfp8._matmul_pallas.DEFER_SPLIT_K_SUMS: split-K sums left to the next norm)
    or `mgpu:0|1` (jfp8._matmul_pallas.MGPU_GEMV: staged rows to the Mosaic GPU decode kernel)."""
    import decode_attention as bench_attn
    import gemv_layout
    import jfp8
    from jfp8 import _matmul_pallas, kv_cache
    from pallas_kernels import decode_attention as da
    from pallas_kernels import fp8_gemv as gv
    for item in filter(None, spec.split(";")):
        kind, rest = item.split(":", 1)
        if kind == "fuse":
            _matmul_pallas.FUSED_PROLOGUES = tuple(getattr(jfp8, name)
                                                   for name in filter(None, rest.split("+")))
            continue
        if kind == "stage":
            _matmul_pallas.F16_STAGING_MIN_WEIGHT = int(rest)
            continue
        if kind == "normstage":
            _matmul_pallas.NORM_STAGE_FUSED = bool(int(rest))
            continue
        if kind == "swiglustage":
            _matmul_pallas.SWIGLU_STAGE_FUSED = bool(int(rest))
            continue
        if kind == "mgpu":
            _matmul_pallas.MGPU_GEMV = bool(int(rest))
            continue
        if kind == "vblock":
            kv_cache.V_BLOCK_BYTES = int(rest)
            continue
        if kind == "combine":
            da.COMBINE_MIN_PROGRAMS = int(rest)
            continue
        if kind == "appendattn":
            from jfp8 import attention
            attention.APPEND_IN_ATTENTION = bool(int(rest))
            continue
        if kind == "defer":
            _matmul_pallas.DEFER_SPLIT_K_SUMS = bool(int(rest))
            continue
        key, value = rest.split("=", 1)
        key = tuple(key.split("/"))
        if kind == "gemv":
            gv.TUNING[key] = gemv_layout.parse_config(value)
        elif kind == "gemvf16":
            gv.TUNING_F16[key] = gemv_layout.parse_config(value)
        elif kind == "attn":
            da.CONFIGS[key] = bench_attn.parse_config(value)
        else:
            raise ValueError(f"--variants: unknown kind {kind!r} in {item!r}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--rows", default="llama3.1-8b:fp8wkv_w8a16_head:1:4096")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--variants", default="", help="'|'-separated tuning overrides profiled one "
                    "after another on every row (see apply_overrides); '' = the tables as committed")
    args = ap.parse_args(argv)
    bench = decode_e2e.Bench(argparse.Namespace(smoke=False, fused=True, steps=args.steps, reps=1))
    results = []
    import jax
    from jfp8 import _matmul_pallas, attention, kv_cache
    from pallas_kernels import decode_attention as da
    from pallas_kernels import fp8_gemv as gv
    # every variant starts from the committed tables and switches
    tables = (gv.TUNING, gv.TUNING_F16, da.CONFIGS)
    switches = [(_matmul_pallas, "FUSED_PROLOGUES"), (_matmul_pallas, "F16_STAGING_MIN_WEIGHT"),
                (_matmul_pallas, "NORM_STAGE_FUSED"), (_matmul_pallas, "SWIGLU_STAGE_FUSED"),
                (kv_cache, "V_BLOCK_BYTES"), (da, "COMBINE_MIN_PROGRAMS"),
                (attention, "APPEND_IN_ATTENTION"), (_matmul_pallas, "DEFER_SPLIT_K_SUMS"),
                (_matmul_pallas, "MGPU_GEMV")]
    committed_tables = [dict(t) for t in tables]
    committed_switches = [getattr(module, name) for module, name in switches]
    for variant in args.variants.split("|"):
        for table, saved in zip(tables, committed_tables):
            table.clear(), table.update(saved)
        for (module, name), saved in zip(switches, committed_switches):
            setattr(module, name, saved)
        # Inner jits (e.g. jfp8.attention's) cache their traces by shape: without this a
        # variant's table would only reach the kernels traced for the first time.
        jax.clear_caches()
        apply_overrides(variant)
        for spec in args.rows.split(","):
            preset, mode, B, ctx = spec.split(":")
            r = profile_row(bench, preset, mode, int(B), int(ctx), args.steps)
            r["variant"] = variant
            results.append(r)
            print(f"\n## {preset} {mode} B={B} ctx={ctx} [{variant or 'committed tables'}]: wall "
                  f"{r['wall_ms_per_step']:.3f} ms/step, GPU busy "
                  f"{r['gpu_busy_us_per_step'] / 1e3:.3f} ms/step, GPU timeline span "
                  f"{r['gpu_span_us_per_step'] / 1e3:.3f} ms/step of which idle "
                  f"{r['gpu_idle_us_per_step']:.1f} µs; largest gaps (µs, before, after): "
                  + "; ".join(f"{g:.1f} {a[:30]} -> {b[:30]}" for g, a, b in r["largest_gaps"][:3]))
            print(f"{'us/step':>9} {'n/step':>7}  kernel")
            for k in r["kernels"][:args.top]:
                print(f"{k['us_per_step']:9.1f} {k['count_per_step']:7.1f}  {k['name'][:110]}")
            with open(os.path.join(args.out, "profile_decode.json"), "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
