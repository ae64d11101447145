"""Probe: a decode layer's whole MLP chain at M = 1 in one persistent launch.

At B = 1 the 8B decode step is ~370 launches; each GEMV pays a ramp-up and a tail (20-28% of its
time, results/ncu_gemv_h200.md), and the small ones (o: 16.8 MB) read at half the copy ceiling
even from L2 (results/l2_probe.md). PDL cannot overlap Pallas' Triton custom calls
(decode_e2e_notes.md, session 10). This times the alternative: one launch of G programs (all
resident at once) that runs

    h2  = o_proj(x) + h                                  phase 1: D / bn tiles of W_o
    act = swiglu(gate_up(rmsnorm(h2)))                   phase 2: F / bn tiles of [W_g; W_u]
    out = down(act) + h2                                 phase 3: D / bn tiles of W_d

with every phase's tiles strided over the programs and each phase waiting on a counter in
global memory (a program signals after each tile it stores: CTA barrier, then an acq_rel atomic
add; a waiting program spins on an atomic read). With `prefetch`, a program issues the first
weight loads of its next phase's first tile before it waits, so the HBM keeps streaming while
the previous phase's last tiles finish (what a launch boundary forbids). Numerics are those of
the committed path (o with its residual, the RMSNorm prologue's roundings, SwiGLU's), which the
probe also times: `fp8_gemv` x 3 as `jfp8.matmul` dispatches them at M = 1.

Not library code: a measurement for the decision (results/mlp_chain_probe_*.md). Measured on
the H100: correct, but 1.4-3.3x slower than the three launches (the persistent programs stream
weights at 0.7-1.7 TB/s against 2.4; decode_e2e_notes.md, session 11), with the next step's
tiles carried in registers. `loop_stages` (a config's sixth field) instead leaves the loads in
their step and sets `tt.num_stages` on the K loops, so Triton issues them as cp.async into
shared memory stages ahead (offline SASS: LDGSTS in the loop, 96 registers instead of 156, so
more programs fit per SM); not yet timed. GPU only for the
timing (the spin-waits need every program resident); `--check` runs the kernel with one program
in interpret mode on the CPU against the committed path.

    PYTHONPATH=$PWD python3 benchmarks/mlp_chain_probe.py --out $OUT
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import fp8_gemv as G
from pallas_kernels import triton_compat

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

SUB = 128          # K width of one FMA sub-tile and of a weight scale block
MAX_SPINS = 1 << 16  # a wait gives up after this many atomic reads (~50 ms: flags an error, no hang)
ERR = 7            # counter slot that counts waits that gave up
EPS = 1e-5


def _wait(cnt_ref, idx, target, zero):
    """Spin until counter idx >= target (atomic reads: acq_rel, gpu scope). zero: a traced int32
    0 (indices and operands derived from it stay out of the loop's constants, which interpret
    mode cannot discharge)."""
    def read():
        return pltriton.atomic_add(cnt_ref, (zero + idx,), zero)

    def cond(c):
        return (c[0] < target) & (c[1] < MAX_SPINS)

    def body(c):
        return read(), c[1] + 1
    v, _ = lax.while_loop(cond, body, (read(), zero))

    @pl.when(v < target)
    def _():
        pltriton.atomic_add(cnt_ref, (zero + ERR,), zero + 1)


def _signal(cnt_ref, idx, zero, interpret):
    """Counter idx += 1 once every thread's stores of this tile are issued (bar.sync first)."""
    if not interpret:
        triton_compat.cta_barrier()
    pltriton.atomic_add(cnt_ref, (zero + idx,), zero + 1)


def _load_shared(ref):
    """A load of data other programs wrote in this launch: volatile (L2, never a stale L1 line;
    this jax's Pallas rejects the .cg cache modifier it means to accept)."""
    return pltriton.load(ref, volatile=True)


def _chain_kernel(x_ref, h_ref, wo_ref, so_ref, nw_ref, wgu_ref, sgu_ref, wd_ref, sd_ref,
                  _cnt_in, h2_ref, act_ref, out_ref, cnt_ref, *, d, f, bn, bk, prefetch,
                  interpret, phases=3, loop_stages=1):
    pid, nprog = pl.program_id(0), pl.num_programs(0)
    zero = pid * 0
    t_o, t_gu, t_d = d // bn, f // bn, d // bn
    subs = bk // SUB

    def gemv_rows(w_ref, s_ref, rows0, k_len, load_act, prep_act, w_first):
        """sum_k W[r0 + i, k] * sw * a[k] for each r0 in rows0: [(1, bn) f32, ...]. Per 128-wide
        sub-tile the raw activation (load_act(k0)), weight tiles and scales are loaded one step
        ahead and interleaved as fp8_gemv.fetch loads them, the activation transformed
        (prep_act(raw, k0) -> (1, 128) f32) in the compute step: the placement that keeps the
        weight tile in its load layout (other placements made Triton move it through shared
        memory every step)."""
        steps = k_len // bk

        def fetch(step, ws=None):
            tiles = []
            for j in range(subs):
                k0 = step * bk + j * SUB
                a = load_act(k0)   # before the weight tile (the order fp8_gemv.fetch loads in)
                w = [w_ref[pl.ds(r0, bn), pl.ds(k0, SUB)] for r0 in rows0] if ws is None \
                    else [wr[j] for wr in ws]
                tiles.append((a, w,
                              [s_ref[pl.ds(r0 // SUB, 1), pl.ds(step * subs + j, 1)]
                               for r0 in rows0]))
            return tiles

        def compute(step, tiles, accs):
            accs = list(accs)
            for j, (a, ws, ss) in enumerate(tiles):
                a = prep_act(a, step * bk + j * SUB)
                for i, (w, sc) in enumerate(zip(ws, ss)):
                    accs[i] = accs[i] + w.astype(jnp.float32) * (a * sc)
            return accs

        acc0 = [jnp.zeros((bn, SUB), jnp.float32) for _ in rows0]
        if loop_stages > 1:  # loads in the step that uses them: Triton's pipeliner stages them
            accs = compute(0, fetch(0, w_first), acc0)
            accs = lax.fori_loop(1, steps, lambda step, a: compute(step, fetch(step), a), accs)
        else:                # the next step's tiles loaded by hand, carried in registers
            def body(step, carry):
                accs, tiles = carry
                nxt = fetch(jnp.minimum(step + 1, steps - 1))
                return compute(step, tiles, accs), nxt
            accs, _ = lax.fori_loop(0, steps, body, (acc0, fetch(0, w_first)))
        return [jnp.sum(acc, axis=1)[None, :] for acc in accs]     # (1, bn) each

    def fetch_w(w_ref, rows0, step):
        """The weight tiles of one step, [row block][sub-tile]: what a phase loads before its wait."""
        return [[w_ref[pl.ds(r0, bn), pl.ds(step * bk + j * SUB, SUB)] for j in range(subs)]
                for r0 in rows0]

    def phase(n_tiles, rows_of, tile_fn, wait_idx, wait_target, w_ref):
        first_w = None
        if prefetch and wait_idx is not None:
            first_w = fetch_w(w_ref, rows_of(pid), 0)
        if wait_idx is not None:   # the first tile outside the loop: it takes first_w
            _wait(cnt_ref, wait_idx, wait_target, zero)
            tile_fn(pid, first_w)

        def one(t, c):
            tile = pid + t * nprog

            @pl.when(tile < n_tiles)
            def _():
                tile_fn(tile, None)
            return c
        lax.fori_loop(0 if wait_idx is None else 1, pl.cdiv(n_tiles, nprog), one, 0)

    # phase 1: h2 = round(round(W_o x) + h)
    def o_tile(tile, w_first):
        r0 = tile * bn

        (y,) = gemv_rows(wo_ref, so_ref, [r0], d,
                         lambda k0: x_ref[pl.ds(0, 1), pl.ds(k0, SUB)],
                         lambda a, k0: a.astype(jnp.float32), w_first)
        h = h_ref[pl.ds(0, 1), pl.ds(r0, bn)].astype(jnp.float32)
        h2_ref[pl.ds(0, 1), pl.ds(r0, bn)] = (
            y.astype(jnp.bfloat16).astype(jnp.float32) + h).astype(jnp.bfloat16)
        _signal(cnt_ref, 0, zero, interpret)
    phase(t_o, lambda t: [t * bn], o_tile, None, None, wo_ref)

    # phase 2: act = swiglu(gate_up(rmsnorm(h2))) with the fused prologue's roundings
    def gu_tile(tile, w_first):
        r0 = tile * bn
        row = _load_shared(h2_ref.at[pl.ds(0, 1), pl.ds(0, d)]).astype(jnp.float32)
        inv = lax.rsqrt(jnp.sum(row * row, axis=1, keepdims=True) / d + EPS)

        def load_act(k0):
            return (_load_shared(h2_ref.at[pl.ds(0, 1), pl.ds(k0, SUB)]),
                    nw_ref[pl.ds(0, 1), pl.ds(k0, SUB)])

        def prep_act(raw, k0):
            xk, nw = raw
            y = (xk.astype(jnp.float32) * inv).astype(jnp.bfloat16)
            return (y.astype(jnp.float32) * nw.astype(jnp.float32)).astype(
                jnp.bfloat16).astype(jnp.float32)
        g, u = gemv_rows(wgu_ref, sgu_ref, [r0, f + r0], d, load_act, prep_act, w_first)
        g = g.astype(jnp.bfloat16).astype(jnp.float32)
        u = u.astype(jnp.bfloat16).astype(jnp.float32)
        act_ref[pl.ds(0, 1), pl.ds(r0, bn)] = (g / (1.0 + jnp.exp(-g)) * u).astype(jnp.bfloat16)
        _signal(cnt_ref, 1, zero, interpret)
    if phases > 1:
        phase(t_gu, lambda t: [t * bn, f + t * bn], gu_tile, 0, t_o, wgu_ref)

    # phase 3: out = round(round(W_d act) + h2)
    def d_tile(tile, w_first):
        r0 = tile * bn

        (y,) = gemv_rows(wd_ref, sd_ref, [r0], f,
                         lambda k0: _load_shared(act_ref.at[pl.ds(0, 1), pl.ds(k0, SUB)]),
                         lambda a, k0: a.astype(jnp.float32), w_first)
        h2 = _load_shared(h2_ref.at[pl.ds(0, 1), pl.ds(r0, bn)]).astype(jnp.float32)
        out_ref[pl.ds(0, 1), pl.ds(r0, bn)] = (
            y.astype(jnp.bfloat16).astype(jnp.float32) + h2).astype(jnp.bfloat16)
        _signal(cnt_ref, 2, zero, interpret)
    if phases > 2:
        phase(t_d, lambda t: [t * bn], d_tile, 1, t_gu, wd_ref)


@functools.partial(jax.jit, static_argnames=("bn", "bk", "programs", "warps", "prefetch",
                                             "interpret", "phases", "loop_stages"))
def mlp_chain(x, h, wo, so, nw, wgu, sgu, wd, sd, *, bn=8, bk=512, programs=396, warps=4,
              prefetch=True, interpret=False, phases=3, loop_stages=1):
    """(out, h2, counters) of one layer's MLP chain at M = 1: x, h (1, D) bf16; wo (D, D),
    wgu (2F, D), wd (D, F) float8_e4m3fn with (128, 128) block scales; nw (D,) norm weight.
    counters (8,) int32: tiles done per phase, [7] = waits that gave up (must be 0). All
    `programs` must be resident at once on the GPU (see --configs); `phases` < 3 stops after
    the first phase(s), for reading the compiled code of one loop. `loop_stages` > 1: each K
    step loads its own tiles and the K loops carry `tt.num_stages = loop_stages`, so Triton's
    pipeliner issues them as cp.async `loop_stages - 1` steps ahead into shared memory (bytes in
    flight no longer held in registers; `_pipelined_name`)."""
    d, f = wo.shape[0], wd.shape[1]
    assert d % bk == 0 and f % bk == 0 and d % bn == 0 and f % bn == 0 and SUB % bn == 0
    assert programs <= min(d, f) // bn, "every program needs a first tile in every phase"
    kernel = functools.partial(_chain_kernel, d=d, f=f, bn=bn, bk=bk, prefetch=prefetch,
                               interpret=interpret, phases=phases, loop_stages=loop_stages)
    kw = (dict(interpret=True) if interpret else
          triton_compat.compiler_params(num_warps=warps, num_stages=1))
    out_shape = [jax.ShapeDtypeStruct((1, d), jnp.bfloat16), jax.ShapeDtypeStruct((1, f), jnp.bfloat16),
                 jax.ShapeDtypeStruct((1, d), jnp.bfloat16), jax.ShapeDtypeStruct((8,), jnp.int32)]
    name = _pipelined_name("mlp_chain", 1 if interpret else loop_stages)
    h2, _, out, cnt = pl.pallas_call(
        kernel, grid=(programs,), out_shape=out_shape, input_output_aliases={9: 3},
        name=name, **kw)(x, h, wo, so, nw.astype(jnp.bfloat16).reshape(1, d), wgu, sgu,
                         wd, sd, jnp.zeros((8,), jnp.int32))
    return out, h2, cnt


# Triton software-pipelines loads that feed no dot only in loops that carry `tt.num_stages`
# (`tl.range(..., num_stages=n)` in Triton's frontend), which Pallas cannot set. For this probe
# only, a hook on Pallas' private Triton lowering sets it on every scf.for of kernels named by
# `_pipelined_name` (session 6 used the same hook on the GEMV, commit 42fdfda).
_LOOP_STAGES: dict[str, int] = {}
_HOOKED: list[bool] = []


def _pipelined_name(name: str, stages: int) -> str:
    if stages <= 1:
        return name
    if not _HOOKED:
        from jax._src.lib.mlir import ir
        from jax._src.pallas.triton import lowering
        original = lowering.lower_jaxpr_to_triton_module

        def tag(op, attr):
            for region in op.regions:
                for block in region.blocks:
                    for inner in block.operations:
                        inner = inner.operation
                        if inner.name == "scf.for":
                            inner.attributes["tt.num_stages"] = attr
                        tag(inner, attr)

        def lower(jaxpr, *args, **kwargs):
            result = original(jaxpr, *args, **kwargs)
            n = _LOOP_STAGES.get(getattr(jaxpr.debug_info, "func_name", None))
            if n:
                with result.module.context:
                    tag(result.module.operation, ir.IntegerAttr.get(ir.IntegerType.get_signless(32), n))
            return result
        lowering.lower_jaxpr_to_triton_module = lower
        _HOOKED.append(True)
    tagged = f"{name}_pipelined{stages}"
    _LOOP_STAGES[tagged] = stages
    return tagged


def committed_chain(x, h, wo, so, nw, wgu, sgu, wd, sd, *, interpret=False):
    """The same layer as the step runs it today: three `fp8_gemv` launches (the table's configs,
    o with its residual, the RMSNorm and SwiGLU prologues, down's split-K sum + residual)."""
    h2 = G.fp8_gemv(x, wo, None, so, layout="block", residual=h, interpret=interpret)
    gu = G.fp8_gemv(h2, wgu, None, sgu, layout="block", prologue="rmsnorm", norm_weight=nw,
                    eps=EPS, interpret=interpret)
    out = G.fp8_gemv(gu, wd, None, sd, layout="block", prologue="swiglu", residual=h2,
                     interpret=interpret)
    return out, h2


def make_layer(key, d, f):
    ks = jax.random.split(key, 4)

    def q(k, n, kk):
        w = (jax.random.normal(k, (n, kk), jnp.float32) * 0.5).astype(jnp.float8_e4m3fn)
        s = jax.random.uniform(jax.random.fold_in(k, 1), (n // SUB, kk // SUB), jnp.float32,
                               0.5, 1.5) / np.sqrt(kk)
        return w, s
    wo, so = q(ks[0], d, d)
    wgu, sgu = q(ks[1], 2 * f, d)
    wd, sd = q(ks[2], d, f)
    nw = 1.0 + 0.1 * jax.random.normal(ks[3], (d,), jnp.float32)
    return wo, so, nw, wgu, sgu, wd, sd


def check(d=256, f=512, bn=8, bk=256, loop_stages=1):
    """Interpret mode, one program: the chain kernel against the committed path."""
    key = jax.random.PRNGKey(0)
    layer = make_layer(key, d, f)
    x = jax.random.normal(jax.random.fold_in(key, 7), (1, d), jnp.float32).astype(jnp.bfloat16)
    h = jax.random.normal(jax.random.fold_in(key, 8), (1, d), jnp.float32).astype(jnp.bfloat16)
    ref_out, ref_h2 = committed_chain(x, h, *layer, interpret=True)
    out, h2, cnt = mlp_chain(x, h, *layer, bn=bn, bk=bk, programs=1, interpret=True,
                             loop_stages=loop_stages)
    return _compare(out, h2, cnt, ref_out, ref_h2, d, f, bn)


def _compare(out, h2, cnt, ref_out, ref_h2, d, f, bn):
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    err_h2 = float(np.max(np.abs(f32(h2) - f32(ref_h2)) / (np.abs(f32(ref_h2)) + 1e-2)))
    err_out = float(np.max(np.abs(f32(out) - f32(ref_out))) / np.max(np.abs(f32(ref_out))))
    cnt = [int(c) for c in np.asarray(cnt)]
    ok = cnt[:3] == [d // bn, f // bn, d // bn] and cnt[ERR] == 0 and err_h2 < 2 ** -6 and \
        err_out < 2 ** -5
    return dict(ok=ok, counters=cnt, err_h2=err_h2, err_out_vs_amax=err_out)


def _write(out_dir, rows, R, layer_bytes, copy) -> str:
    """Write mlp_chain_probe_<device>.{json,md} under out_dir; returns the markdown path."""
    dev = jax.devices()[0]
    tag = "h200" if "H200" in dev.device_kind else "h100"
    result = dict(device=dev.device_kind, jax=jax.__version__,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                  layer_mb=layer_bytes / 1e6, layers=R, copy_ceiling_gbs=copy, rows=rows)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"mlp_chain_probe_{tag}.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    lines = [f"# M = 1 MLP chain (o, gate_up, down of the 8B shape) per layer ({dev.device_kind}, "
             f"jax {jax.__version__})", "",
             f"{R} layers of distinct weights per jit, {layer_bytes / 1e6:.1f} MB of FP8 weights a "
             f"layer; copy ceiling {copy:.0f} GB/s (read + write).", "",
             "| variant | GPU kernel µs / layer (TB/s) | wall µs / layer (TB/s) | check |",
             "|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | error: {r['error'][:120]} | | |")
            continue
        chk = "reference" if "ok" not in r else (
            f"{'ok' if r['ok'] else 'FAIL'} (h2 {r['err_h2']:.1e}, out {r['err_out_vs_amax']:.1e}, "
            f"counters {r['counters']})")
        lines.append(f"| {r['variant']} | {r['kernel_us_per_layer']:.1f} ({r['kernel_tbs']:.2f}) | "
                     f"{r['wall_us_per_layer']:.1f} ({r['wall_tbs']:.2f}) | {chk} |")
    with open(os.path.join(out_dir, f"mlp_chain_probe_{tag}.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return os.path.join(out_dir, f"mlp_chain_probe_{tag}.md")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--check", action="store_true", help="interpret-mode check only (CPU)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--configs", default="8,512,396,4,1;8,512,512,4,0,3;8,512,512,4,0,4;"
                    "8,512,396,4,0,3;16,512,256,4,0,3",
                    help="bn,bk,programs,warps,prefetch[,loop_stages];... Every program must be "
                         "resident at once (132 SMs): offline ptxas gives 156-159 registers at bn 8 "
                         "/ 4 warps with hand-carried tiles (3 programs per SM: G <= 396), 128 at "
                         "8 warps (2: G <= 264), 255 at bn 16 / 4 warps (2: G <= 264); with "
                         "loop_stages 3 / 4, 96 registers and 16.5 / 24.7 KB of shared memory at "
                         "bn 8 (5 per SM; G <= d / bn = 512 by tiles). bk 1024 compiles in ~4 min.")
    args = ap.parse_args(argv)
    if args.check:
        r = check()
        print(json.dumps(r))
        return 0 if r["ok"] else 1
    d, f, R = 4096, 14336, args.layers
    key = jax.random.PRNGKey(0)
    layers = [make_layer(jax.random.fold_in(key, i), d, f) for i in range(R)]
    x0 = jax.random.normal(jax.random.fold_in(key, 99), (1, d), jnp.float32).astype(jnp.bfloat16)
    layer_bytes = d * d + 2 * f * d + d * f
    copy = harness.copy_ceiling_gbs()

    def stack(fn):
        def run(x, layers):
            outs = []
            for lw in layers:
                out = fn(x, x, *lw)
                x = out[0]
                outs.append(out)
            return outs
        return jax.jit(run)

    rows = []
    variants = [("committed fp8_gemv x3", committed_chain, None)]
    for spec in args.configs.split(";"):
        bn, bk, progs, warps, pre, *st = (int(v) for v in spec.split(","))
        st = st[0] if st else 1
        variants.append((f"chain bn{bn} bk{bk} G{progs} w{warps} pre{pre}" + (f" st{st}" if st > 1 else ""),
                         functools.partial(mlp_chain, bn=bn, bk=bk, programs=progs, warps=warps,
                                           prefetch=bool(pre), loop_stages=st), (bn,)))
    ref = None
    for name, fn, extra in variants:
        row = dict(variant=name)
        try:
            g = stack(fn)
            t0 = time.perf_counter()
            outs = jax.block_until_ready(g(x0, layers))
            row["first_call_s"] = round(time.perf_counter() - t0, 1)   # mostly compilation
            if ref is None:
                ref = outs
            else:
                # layer 0 only: later layers' inputs already differ by the summation order
                row.update(_compare(outs[0][0], outs[0][1], outs[0][2], ref[0][0], ref[0][1],
                                    d, f, extra[0]))
            secs, per_kernel = harness.kernel_time(g, (x0, layers), calls=5)
            wall, _ = harness.call_times(g, x0, layers, calls=10, reps=5)
            row.update(kernel_us_per_layer=secs * 1e6 / R,
                       wall_us_per_layer=statistics.median(wall) * 1e6 / R,
                       kernels={k: v / R for k, v in sorted(per_kernel.items(),
                                                            key=lambda kv: -kv[1])[:6]})
            row["kernel_tbs"] = layer_bytes / (row["kernel_us_per_layer"] * 1e-6) / 1e12
            row["wall_tbs"] = layer_bytes / (row["wall_us_per_layer"] * 1e-6) / 1e12
        except Exception as e:  # noqa: BLE001 - a variant that fails is a result too
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(json.dumps(row), flush=True)
        rows.append(row)
        _write(args.out, rows, R, layer_bytes, copy)   # after every variant: a timeout keeps them

    print(open(_write(args.out, rows, R, layer_bytes, copy)).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
