"""FP8 quality on a real pretrained model: SmolLM2-135M-Instruct (GGUF) on lee_background.

    .ci/fetch_data.sh                               # the GGUF and the texts, into .cache/jfp8-data
    PYTHONPATH=. python benchmarks/eval_smollm2.py --tokens 8192 \
        --out benchmarks/results/eval_smollm2

Evaluates every row (round-to-nearest recipes, then the levers: GPTQ rounding calibrated on
gensim's lee.cor, disjoint from the eval text, and per-layer BF16 fallback within a byte budget)
against the high-precision run of the same GGUF weights, and writes <out>.json (every row, the
per-layer sensitivities, the settings) and <out>.md (the table and the targets).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models import eval as E  # noqa: E402

DATA = os.environ.get("JFP8_DATA", os.path.join(os.path.dirname(__file__), "..", ".cache", "jfp8-data"))
ROWS = (  # the target rows first, so a cut-short run still answers the targets
    "w8a8_block+kv_token_head+gptq+fallback10", "weights_only_channel+gptq",
    "weights_only_channel", "weights_only_block", "w8a8_block", "w8a8_block+kv_tensor",
    "w8a8_block+kv_token_head", "w8a8_block_e5m2+kv_token_head_e5m2",
    "w8a8_block+kv_token_head+gptq", "weights_only_block+gptq",
    "weights_only_channel+gptq+fallback10", "w8a8_block+kv_token_head+gptq+layerfallback10",
    "weights_only_channel+gptq+layerfallback10",
)
LEVERS = {  # what each row changes, for the levers table
    "weights_only_channel": "round-to-nearest E4M3 weights, one scale per output channel, BF16 activations",
    "weights_only_block": "round-to-nearest E4M3 weights, one scale per 128x128 block",
    "w8a8_block": "+ E4M3 activations per 1x128 token group (the FP8 GEMM recipe)",
    "w8a8_block+kv_tensor": "+ E4M3 KV cache, one scale per layer (window amax, 2x headroom)",
    "w8a8_block+kv_token_head": "+ E4M3 KV cache, one scale per (token, head)",
    "w8a8_block_e5m2+kv_token_head_e5m2": "the same in E5M2 (2 mantissa bits): range is not the problem here",
    "weights_only_channel+gptq": "lever: GPTQ rounding (Hessian error feedback, act-order, damp 0.01), scales fixed",
    "weights_only_block+gptq": "lever: GPTQ rounding with 128x128 block scales",
    "w8a8_block+kv_token_head+gptq": "lever: GPTQ weights in the full W8A8 + FP8 KV recipe",
    "weights_only_channel+gptq+fallback10": "lever: GPTQ + the most KL-sensitive projections (qkv, o, gate_up, down of a layer) kept BF16 within 10% of linear bytes",
    "w8a8_block+kv_token_head+gptq+fallback10": "lever: GPTQ + per-projection BF16 fallback (qkv, o, gate_up, down; knapsack on measured KL) within 10% of linear bytes",
    "w8a8_block+kv_token_head+gptq+layerfallback10": "lever: GPTQ + per-layer BF16 fallback (whole layers) within 10% of linear bytes",
    "weights_only_channel+gptq+layerfallback10": "lever: GPTQ + the most KL-sensitive whole layers kept BF16 within 10% of linear bytes",
}
TARGETS = {
    "w8a8_block+kv_token_head": "Δppl ≤ +2.0 %, KL ≤ 0.02, top-1 ≥ 0.92, ≥ 90 % of linear bytes FP8",
    "weights_only": "Δppl ≤ +1.0 %",
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=os.path.join(DATA, "SmolLM2-135M-Instruct.Q4_1.gguf"))
    p.add_argument("--text", default=os.path.join(DATA, "lee_background.cor"))
    p.add_argument("--calib", default=os.path.join(DATA, "lee.cor"))
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--calib-tokens", type=int, default=4096)
    p.add_argument("--sensitivity-tokens", type=int, default=512,
                   help="calibration tokens per sensitivity forward (one forward per fallback unit)")
    p.add_argument("--rows", nargs="*", default=list(ROWS))
    p.add_argument("--out", default="benchmarks/results/eval_smollm2")
    p.add_argument("--render", default=None, metavar="JSON",
                   help="only re-render <out>.md from a JSON this script wrote")
    p.add_argument("--merge", action="store_true",
                   help="keep the rows of an existing <out>.json that --rows does not re-run "
                        "(same model, text, tokens and reference)")
    a = p.parse_args(argv)
    if a.render:
        with open(a.render) as f:
            result = json.load(f)
        with open(a.out + ".md", "w") as f:
            f.write(render_md(result))
        return 0
    for path in (a.model, a.text, a.calib):
        if not os.path.exists(path):
            print(f"missing {path}: run .ci/fetch_data.sh first", file=sys.stderr)
            return 2
    t0 = time.time()
    ev = E.Evaluator.from_path(a.model, dtype=jnp.float32)
    ev.sensitivity_tokens = a.sensitivity_tokens
    tokens = ev.tokenize(E.read_text(a.text))[: a.tokens]
    calib = ev.tokenize(E.read_text(a.calib))[: a.calib_tokens]
    print(f"loaded in {time.time() - t0:.1f}s: {len(tokens)} eval tokens, {len(calib)} calibration "
          f"tokens", flush=True)
    t = time.time()
    ref = ev.reference(tokens, a.window)
    rows = [ev.reference_row(ref, time.time() - t)]
    print(E.format_table(rows), flush=True)
    old = _previous(a, ref, len(calib)) if a.merge else None
    for name in a.rows:
        rows.append(ev.evaluate(E.EVAL_RECIPES[name], ref, calib_tokens=calib))
        r = rows[-1]
        print(E.format_table([r]).splitlines()[-1] + (f"  fallback={r.fallback}" if r.fallback else ""),
              flush=True)
        write(a, ev, ref, calib, rows, t0, old)  # after every row: a cut-short run keeps its rows
    print(f"\nwrote {a.out}.json and {a.out}.md ({time.time() - t0:.0f}s)")
    return 0


def _previous(a, ref, n_calib):
    """The rows and sensitivities of an earlier run of the same eval, to merge with this one."""
    try:
        with open(a.out + ".json") as f:
            old = json.load(f)
    except FileNotFoundError:
        return None
    same = (old["model"] == os.path.basename(a.model) and old["text"] == os.path.basename(a.text)
            and old["eval_tokens"] == int(ref.windows.size) and old["window"] == a.window
            and old["calibration_tokens"] == n_calib
            and abs(old["rows"][0]["ppl"] - ref.ppl) < 1e-3 * ref.ppl)
    if not same:
        raise SystemExit(f"--merge: {a.out}.json is a different eval (model, text, tokens or "
                         f"reference); run without --merge")
    return old


def write(a, ev, ref, calib, rows, t0, old=None):
    sens = {k[1].name + ("+gptq" if k[4] else "") + f" per {k[6]}": v
            for k, v in ev._calib_cache.items() if k[0] == "sens"}
    rerun = [r.name for r in rows[1:]]
    if old is not None:  # earlier rows this run did not redo, in the table's order
        kept = {r["name"]: r for r in old["rows"][1:] if r["name"] not in rerun}
        mine = {r.name: r for r in rows[1:]}
        order = [n for n in ROWS if n in mine or n in kept] + \
                [n for n in list(kept) + rerun if n not in ROWS]
        rows = rows[:1] + [mine[n] if n in mine else E.Row(**kept[n]) for n in order]
        sens = {**{k: v for k, v in old.get("layer_sensitivity_kl", {}).items()
                   if " per " in k and k not in sens}, **sens}
    result = {
        "model": os.path.basename(a.model), "text": os.path.basename(a.text),
        "calibration_text": os.path.basename(a.calib), "eval_tokens": int(ref.windows.size),
        "window": a.window, "calibration_tokens": int(len(calib)),
        "sensitivity_tokens": ev.sensitivity_tokens, "dtype": "float32",
        "backend": jax.default_backend(), "jax": jax.__version__, "machine": platform.machine(),
        "cpus": os.cpu_count(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "rows": [r.as_dict() for r in rows], "layer_sensitivity_kl": sens,
        "total_seconds": time.time() - t0,
    }
    if old is not None:
        result["merged"] = {"rerun_rows": rerun, "earlier_rows_from": old["date"],
                            "earlier_total_seconds": old.get("total_seconds")}
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(a.out + ".md", "w") as f:
        f.write(render_md(result))


def render_md(result: dict) -> str:
    rows = [E.Row(**r) for r in result["rows"]]
    lines = [
        f"# FP8 quality on {result['model']} ({result['text']}, first {result['eval_tokens']} "
        f"tokens, windows of {result['window']})",
        "",
        f"Generated by `benchmarks/eval_smollm2.py` on {result['date']} ({result['backend']}, "
        f"jax {result['jax']}, {result['cpus']} CPUs, compute {result['dtype']}). Reference: the GGUF's "
        f"weights dequantized (Q4_1 linears, Q8_0 embedding), high precision. Calibration (GPTQ "
        f"Hessians, fallback sensitivity): {result['calibration_tokens']} tokens of "
        f"{result['calibration_text']}, disjoint from the eval text.",
        "",
        "W MB/tok: weight bytes a decode step reads (linear weights + scales, tied embedding as "
        "lm_head in BF16, norms). KV B/tok: K+V bytes per token over all layers (+ bf16 per-(token, "
        "head) scales). FP8 lin: fraction of linear-weight elements stored in FP8.",
        "",
        "```",
        E.format_table(rows),
        "```",
        "",
    ]
    lines += ["| row | what it changes | Δppl % | KL | top-1 |", "|---|---|---|---|---|"]
    for r in rows[1:]:
        lines.append(f"| `{r.name}` | {LEVERS.get(r.name, '')} | {r.delta_ppl_pct:+.2f} | {r.kl:.4f} "
                     f"| {r.agreement:.3f} |")
    lines.append("")
    for r in rows:
        if r.fallback:
            lines.append(f"- `{r.name}` kept in BF16: {', '.join(r.fallback)}")
    if any(r.fallback for r in rows):
        lines.append("- a kept unit is a layer or one of its four matmuls as a fused model runs them "
                     "(qkv_proj = q, k, v; gate_up_proj = gate, up); `models.calibration."
                     "fallback_patterns(names)` gives the `jfp8 quantize --keep` regexes")
    sens = result.get("layer_sensitivity_kl") or {}
    for name, per_unit in sens.items():
        top = sorted(per_unit.items(), key=lambda kv: -kv[1])[:6]
        lines.append(f"- KL with only one unit FP8 ({name}, {result.get('sensitivity_tokens')} "
                     f"calibration tokens), worst: " + ", ".join(f"{k} {v:.4f}" for k, v in top))
    merged = result.get("merged")
    if merged:
        lines += ["", f"Rows re-run on {result['date']}: {', '.join(merged['rerun_rows'])}; the "
                  f"others are from the run of {merged['earlier_rows_from']} (same model, text, "
                  f"tokens, calibration and reference perplexity)."]
        for new_name, old_name in merged.get("renamed", {}).items():
            lines.append(f"`{new_name}` is that run's `{old_name}` row (whole-layer fallback, what "
                         f"the name meant then).")
    lines += ["", "Targets: " + "; ".join(f"{k}: {v}" for k, v in TARGETS.items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
