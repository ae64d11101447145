"""FP8 training step of a GPT-shaped MLP block on the H100: BF16 vs FP8 (jfp8.nn.FP8Dense).

One step = forward + backward (grads of the f32 master weights and of the input) of
    gelu:   y = down(gelu(up(x)))                  d_model 4096, MLP 14336, 8192 tokens (GPT)
    swiglu: y = down(silu(gate(x)) * up(x))        same sizes (Llama-3-8B's MLP)
BF16 is `flax.linen.Dense(dtype=bf16, param_dtype=f32)` (mixed precision: bf16 GEMMs, f32 master
weights); FP8 is the same model with `jfp8.nn.FP8Dense(dtype=bf16, recipe=...)`:
`Recipe.delayed()` (E4M3 forward, E5M2 output gradients, scales from a 1024-step amax history in
"fp8_meta") and `Recipe.per_tensor()` (current scaling: each tensor's own amax). Every GEMM of the
FP8 step is XLA's FP8 dot_general with per-tensor scales (cuBLASLt FP8 on Hopper).

Same run, same inputs: the two single GEMM ceilings (bf16 and FP8 8192×14336×4096) say what the
step could reach if only GEMMs cost time; FP8 gradients are checked against the BF16 step's.
Timing: median over `--reps` batches of back-to-back steps (host clock after block_until_ready,
batches ≥ 50 ms), after warm-up; the delayed-scaling meta is filled by one step first.

Usage (device): PYTHONPATH=$PWD python3 benchmarks/train_step.py --out $OUT
CPU smoke test: python benchmarks/train_step.py --small --out /tmp/ts
Plot from a result: python benchmarks/train_step.py --plot benchmarks/results/train_step.json
Writes train_step.json (device, jax version, date, every config), train_step.md, train_step.png.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import linen as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import jfp8  # noqa: E402
from jfp8 import nn as fnn  # noqa: E402
from jfp8.nn import training  # noqa: E402


class MLPBlock(nn.Module):
    kind: str
    d_model: int
    d_mlp: int
    recipe: jfp8.Recipe | None = None

    @nn.compact
    def __call__(self, x):
        def dense(features, name):
            if self.recipe is None:
                return nn.Dense(features, use_bias=False, dtype=jnp.bfloat16, name=name)
            return fnn.FP8Dense(features, use_bias=False, dtype=jnp.bfloat16, recipe=self.recipe,
                                name=name)
        if self.kind == "gelu":
            return dense(self.d_model, "down")(nn.gelu(dense(self.d_mlp, "up")(x)))
        h = nn.silu(dense(self.d_mlp, "gate")(x)) * dense(self.d_mlp, "up")(x)
        return dense(self.d_model, "down")(h)


def bench(f, *args, reps=7, min_batch_s=0.05):
    """(median, min seconds per call, output) over `reps` batches lasting >= min_batch_s."""
    times, out = harness.call_times(f, *args, calls=3, reps=reps, min_batch_s=min_batch_s)
    return statistics.median(times), min(times), out


def rel_err(a, b) -> float:
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def gemm_calls(compiled_text: str) -> dict:
    """GEMM custom calls in the compiled step: how many, and how many are cuBLASLt FP8."""
    targets = [l.split('custom_call_target="')[1].split('"')[0] for l in compiled_text.splitlines()
               if 'custom_call_target="' in l]
    gemms = [t for t in targets if "cublas" in t.lower() or "gemm" in t.lower()]
    return {"gemm_calls": len(gemms), "fp8_gemm_calls": sum("f8" in t for t in gemms),
            "custom_call_targets": sorted(set(targets))}


def parse_mode(mode: str):
    """'bf16' or 'fp8_delayed[:gemm style[:first step]]' / 'fp8_current[:style]'."""
    name, *rest = mode.split(":")
    style = rest[0] if rest else training.GEMM_STYLE
    first = rest[1] if len(rest) > 1 else training.FIRST_STEP
    recipe = {"bf16": None, "fp8_delayed": jfp8.Recipe.delayed(history=1024),
              "fp8_current": jfp8.Recipe.per_tensor()}[name]
    return recipe, style, first


def run(args) -> dict:
    m, d, f = (256, 256, 512) if args.small else (args.tokens, args.d_model, args.d_mlp)
    key = jax.random.key(0)
    kx, kdy, kp = jax.random.split(key, 3)
    x = jax.random.normal(kx, (m, d), jnp.bfloat16)
    dy = (jax.random.normal(kdy, (m, d), jnp.float32) * 1e-3).astype(jnp.bfloat16)
    result = {"device": str(jax.devices()[0].device_kind), "platform": jax.devices()[0].platform,
              "jax": jax.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "tokens": m, "d_model": d, "d_mlp": f, "configs": [], "gemm": {}}
    print(result["device"], "jax", jax.__version__, f"M={m} d={d} mlp={f}", flush=True)

    # GEMM ceilings at the block's shape: one (M, d) x (d, mlp) GEMM, bf16 and FP8 per-tensor.
    a = jax.random.normal(kx, (m, d), jnp.bfloat16)
    b = jax.random.normal(kdy, (f, d), jnp.bfloat16)
    dn = (((1,), (1,)), ((), ()))
    g_bf16 = jax.jit(lambda a, b: jax.lax.dot_general(a, b, dn, preferred_element_type=jnp.bfloat16))
    g_fp8 = jax.jit(lambda a, b: (jax.lax.dot_general(a, b, dn, preferred_element_type=jnp.float32)
                                  * 0.5).astype(jnp.bfloat16))
    flops = 2 * m * d * f
    t, _, _ = bench(g_bf16, a, b)
    result["gemm"]["bf16_ms"] = t * 1e3
    result["gemm"]["bf16_tflops"] = flops / t / 1e12
    a8, b8 = a.astype(jnp.float8_e4m3fn), b.astype(jnp.float8_e4m3fn)
    t, _, _ = bench(g_fp8, a8, b8)
    result["gemm"]["fp8_ms"] = t * 1e3
    result["gemm"]["fp8_tflops"] = flops / t / 1e12
    # The same FP8 GEMM as the training step writes it, per scale-attachment style.
    s_a, s_b = jnp.float32(0.01), jnp.float32(0.02)
    for style in ("out", "f32", "qdq"):
        cfg = training.TrainConfig(out_dtype="bfloat16", gemm=style)
        try:
            f_style = jax.jit(lambda a, b, sa, sb, cfg=cfg: training._gemm(a, sa, b, sb, dn, jnp.bfloat16, cfg))
            f_style = f_style.lower(a8, b8, s_a, s_b).compile()
            t, _, _ = bench(f_style, a8, b8, s_a, s_b)
            result["gemm"][f"fp8_{style}_ms"] = t * 1e3
            result["gemm"][f"fp8_{style}_calls"] = gemm_calls(f_style.as_text())
        except Exception as e:
            result["gemm"][f"fp8_{style}_ms"] = float("nan")
            result["gemm"][f"fp8_{style}_calls"] = {"fp8_gemm_calls": -1, "error": repr(e)[:500]}
    print("gemm", json.dumps(result["gemm"]), flush=True)

    for kind, modes in (("gelu", args.gelu_modes), ("swiglu", args.swiglu_modes)):
        if not modes:
            continue
        n_gemm = 2 if kind == "gelu" else 3
        step_flops = 3 * n_gemm * flops  # forward + dgrad + wgrad per layer
        ref_grads = None
        for name in ["bf16"] + [m for m in modes if m != "bf16"]:
            try:
                row, grads = run_config(args, kind, name, x, dy, kp, d, f, step_flops, n_gemm,
                                        result, ref_grads)
                if name == "bf16":
                    ref_grads = grads
            except Exception as e:  # record and go on: one failing variant must not cost the run
                row = {"mlp": kind, "mode": name, "error": repr(e)[:2000]}
            result["configs"].append(row)
            print(json.dumps(row), flush=True)
            if args.out:  # partial results survive a time-out
                os.makedirs(args.out, exist_ok=True)
                with open(os.path.join(args.out, "train_step.json"), "w") as fh:
                    json.dump(result, fh, indent=1)
    return result


def run_config(args, kind, name, x, dy, kp, d, f, step_flops, n_gemm, result, ref_grads):
    """Compile, time and check one (MLP kind, mode) step. Returns (row, (g_params, g_x))."""
    recipe, training.GEMM_STYLE, training.FIRST_STEP = parse_mode(name)
    model = MLPBlock(kind, d, f, recipe)
    variables = jax.jit(model.init)(kp, x)
    params = variables["params"]
    meta = {k: v for k, v in variables.items() if k != "params"}

    def step(params, meta, x, dy):
        def fwd(p, meta, x):
            return model.apply({"params": p, **meta}, x)
        y, vjp = jax.vjp(fwd, params, meta, x)
        g_params, new_meta, g_x = vjp(dy)
        # y is returned so XLA cannot drop the last layer's forward GEMM as dead code.
        return g_params, new_meta, g_x, y

    t0 = time.perf_counter()
    step = jax.jit(step).lower(params, meta, x, dy).compile()
    compile_s = time.perf_counter() - t0
    counts = gemm_calls(step.as_text())
    if args.out and kind == "gelu" and name in args.dump_hlo:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"hlo_{kind}_{name.replace(':', '_')}.txt"), "w") as fh:
            fh.write(step.as_text())
    g_params, meta, g_x, _ = step(params, meta, x, dy)  # fills the amax histories
    t_med, t_min, (g_params, _, g_x, _) = bench(step, params, meta, x, dy, reps=args.reps)
    row = {"mlp": kind, "mode": name, "step_ms": t_med * 1e3, "step_min_ms": t_min * 1e3,
           "step_tflops": step_flops / t_med / 1e12, "compile_s": compile_s, "gemm_only_ms":
           3 * n_gemm * result["gemm"]["bf16_ms" if name == "bf16" else "fp8_ms"], **counts}
    if name != "bf16" and ref_grads is not None:
        row["dx_rel_err_vs_bf16"] = rel_err(g_x, ref_grads[1])
        row["dw_rel_err_vs_bf16"] = {k: rel_err(g_params[k]["kernel"], ref_grads[0][k]["kernel"])
                                     for k in g_params}
    if not all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves((g_params, g_x))):
        row["nonfinite_grads"] = True
    return row, (g_params, g_x)


def finalize(result: dict) -> dict:
    """Speedups vs the same MLP's BF16 step, and the GEMMs-alone time of each mode's own style."""
    g = result["gemm"]
    for r in result["configs"]:
        if "step_ms" not in r:
            continue
        n_gemms = r.get("gemms_in_step", 3 * (2 if r["mlp"] == "gelu" else 3))
        if r["mode"] == "bf16":
            r["gemm_only_ms"] = n_gemms * g["bf16_ms"]
        else:
            style = parse_mode(r["mode"])[1]
            r["gemm_only_ms"] = n_gemms * g.get(f"fp8_{style}_ms", g["fp8_ms"])
        base = next((b for b in result["configs"] if b["mlp"] == r["mlp"] and b["mode"] == "bf16"
                     and "step_ms" in b), None)
        if base is not None:
            r["speedup_vs_bf16"] = base["step_ms"] / r["step_ms"]
    return result


def write_md(result: dict, path: str) -> None:
    g = result["gemm"]
    lines = [f"# FP8 training step, MLP block ({result['device']}, jax {result['jax']}, {result['date'][:10]})",
             "", f"tokens {result['tokens']}, d_model {result['d_model']}, MLP {result['d_mlp']}; "
             f"forward + backward (weight and input grads), f32 master weights.", "",
             f"Single GEMM {result['tokens']}×{result['d_mlp']}×{result['d_model']}: bf16 "
             f"{g['bf16_ms']:.3f} ms ({g['bf16_tflops']:.0f} TFLOP/s), FP8 per-tensor "
             f"{g['fp8_ms']:.3f} ms ({g['fp8_tflops']:.0f} TFLOP/s), ratio {g['bf16_ms'] / g['fp8_ms']:.2f}×. "
             "The FP8 GEMM as the step writes it, by scale style (see jfp8/nn/training.py `_gemm`): "
             + ", ".join(f"{s} {g[f'fp8_{s}_ms']:.3f} ms ({g[f'fp8_{s}_calls']['fp8_gemm_calls']} FP8 "
                         f"GEMM call)" for s in ("out", "f32", "qdq")) + ".",
             "", "Modes: `fp8_delayed:<gemm style>[:<first step>]`; FP8 GEMMs / GEMMs counts the "
             "cuBLAS custom calls in the compiled step.",
             "", "| MLP | mode | step ms | TFLOP/s | GEMMs alone ms | FP8 GEMMs / GEMMs | speedup vs BF16 | dx rel err |",
             "|---|---|---|---|---|---|---|---|"]
    lines.insert(-2, "GEMMs alone = GEMMs in the step × the single-GEMM time of the mode's own "
                     "style (bf16 for BF16).\n")
    for r in result["configs"]:
        if "error" in r:
            lines.append(f"| {r['mlp']} | {r['mode']} | failed: {r['error'][:120]} | | | | | |")
            continue
        lines.append(f"| {r['mlp']} | {r['mode']} | {r['step_ms']:.2f} | {r['step_tflops']:.0f} | "
                     f"{r['gemm_only_ms']:.2f} | {r['fp8_gemm_calls']}/{r['gemm_calls']} | "
                     f"{r.get('speedup_vs_bf16', float('nan')):.2f}× | "
                     f"{r.get('dx_rel_err_vs_bf16', float('nan')):.3f} |")
    if result.get("notes"):
        lines += ["", result["notes"]]
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in result["configs"] if "step_ms" in r]
    labels = [f"{r['mlp']}\n{r['mode']}" for r in rows]
    fig, ax = plt.subplots(figsize=(1.4 * len(rows) + 2, 4))
    colors = ["#888888" if r["mode"] == "bf16" else "#1f77b4" for r in rows]
    bars = ax.bar(labels, [r["step_ms"] for r in rows], color=colors)
    ax.bar(labels, [r["gemm_only_ms"] for r in rows], color="none", edgecolor="black",
           linestyle="--", label="GEMMs alone (single-GEMM rate)")
    for bar, r in zip(bars, rows):
        ax.annotate(f"{r.get('speedup_vs_bf16', 1):.2f}×", (bar.get_x() + bar.get_width() / 2,
                    bar.get_height()), ha="center", va="bottom")
    ax.set_ylabel("ms per step (fwd + bwd)")
    ax.set_title(f"MLP block train step, {result['tokens']} tokens, d {result['d_model']}, "
                 f"MLP {result['d_mlp']} ({result['device']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--small", action="store_true", help="CPU smoke test sizes")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--d-model", type=int, default=4096)
    p.add_argument("--d-mlp", type=int, default=14336)
    p.add_argument("--gelu-modes", nargs="*", default=[
        "fp8_delayed:out", "fp8_delayed:f32", "fp8_delayed:qdq", "fp8_delayed:out:unit",
        "fp8_delayed:out:select", "fp8_current:out"])
    p.add_argument("--swiglu-modes", nargs="*", default=["fp8_delayed:out", "fp8_delayed:qdq"])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--dump-hlo", nargs="*", default=["bf16", "fp8_delayed:out", "fp8_delayed:qdq"],
                   help="gelu modes whose compiled HLO is written to --out")
    p.add_argument("--plot", help="only plot/tabulate an existing train_step.json")
    args = p.parse_args()
    if args.plot:
        result = finalize(json.load(open(args.plot)))
        out = os.path.dirname(args.plot)
    else:
        result = finalize(run(args))
        out = args.out
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "train_step.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    write_md(result, os.path.join(out, "train_step.md"))
    try:
        plot(result, os.path.join(out, "train_step.png"))
    except ImportError as e:
        print("no plot:", e)
    print(open(os.path.join(out, "train_step.md")).read())


if __name__ == "__main__":
    main()
