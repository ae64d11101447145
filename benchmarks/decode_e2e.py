"""End-to-end decode benchmark: BF16 vs FP8 weights vs FP8 weights + FP8 KV cache.

    PYTHONPATH=$PWD python3 benchmarks/decode_e2e.py --out $OUT            # H100, full sweep
    PYTHONPATH=$PWD python benchmarks/decode_e2e.py --smoke --out /tmp/x     # CPU, tiny preset
    python benchmarks/decode_e2e.py --plot benchmarks/results/decode_e2e.json  # md + PNG only

Random weights in Llama-3.1-8B and Llama-3.2-1B shapes (models.llama presets). For each row the
decode loop (`models.generate.Decoder.decode_fn`: one jit, lax.while_loop, cache donated; q/k/v and
gate/up fused into one matmul each, `llama.fuse`, for every mode alike) runs from
a cache already holding `ctx` tokens per sequence (contents are zeros: attention reads every byte
regardless), `steps` tokens per call, best of `reps` calls. Modes:
  bf16    BF16 weights (flax Dense, XLA dots), BF16 KV cache
  fp8w    FP8 weights (Recipe.block128 via jfp8.matmul), BF16 KV cache
  fp8wkv  FP8 weights + FP8 E4M3 KV cache (per token-head scales)
Byte limit of a step = (weight bytes read: every linear kernel + lm_head, QArray scales included;
KV bytes read: K and V of ctx tokens over all layers, scales included) / copy ceiling (measured
at the start of the run on a GPU, `harness.copy_ceiling_gbs`; 2936 GB/s, notes/h100.md's H100
figure, for CPU smoke runs). `frac` = limit / measured. Host overhead: one call per token vs the
in-loop step.
Max 32K-token batch in 70 GB: (70e9 - weight bytes - 2 GB workspace) / cache bytes per sequence.
Rows are written to JSON as they finish; `--budget-s` stops the sweep early (rows left are listed).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

COPY_GBPS = 2936.0          # device-to-device copy ceiling; main() measures it on a GPU
MEM_BUDGET = 70e9           # "largest batch of 32K-token sequences in 70 GB"
WORKSPACE = 2e9             # activations / XLA workspace reserved in that estimate
CAP_MODES = ("bf16", "fp8w", "fp8wkv", "fp8wkvt")  # the 32K-capacity table (weights-only variants read the same bytes)

# mode -> (weight recipe key, KV dtype). Recipes: block128 = FP8 weights per 128x128 block and FP8
# activations per 1x128 group (W8A8, the recipe); w8a16 = the same weights with BF16
# activations (Recipe.weights_only(PerBlock((128, 128)))); w8a16_head = that plus an FP8 lm_head.
# "fp8wkvt" = an FP8 cache with one scale per layer (kv_scaling="per_tensor", like vLLM's
# k_scale / v_scale; set from the first write) instead of per (token, head): no scale bytes read.
MODES = {"bf16": ("bf16", "bf16"), "fp8w": ("block128", "bf16"), "fp8wkv": ("block128", "fp8"),
         "fp8wkv_w8a16": ("w8a16", "fp8"), "fp8wkv_w8a16_head": ("w8a16_head", "fp8"),
         "fp8wkvt": ("block128", "fp8"), "fp8wkvt_w8a16_head": ("w8a16_head", "fp8")}


def kv_scaling(mode):
    return "per_tensor" if mode.startswith("fp8wkvt") else "per_token_head"


def recipe_for(key):
    import jfp8
    return None if key == "bf16" else jfp8.Recipe.from_name(
        {"block128": "block128", "w8a16": "weights_only_block128",
         "w8a16_head": "weights_only_block128+head"}[key])


# (kind, (preset, mode, batch, ctx)) in priority order, grouped by weight recipe (one FP8 copy of
# the weights lives at a time): the targets first, so a run cut short by --budget-s still has them.
# 8B BF16 at B=16 x 32K does not fit 80 GB (69 GB of cache + 16 GB of weights), so the 32K
# batch-16 comparison also runs in the 1B shape.
_8B, _1B = "llama3.1-8b", "llama3.2-1b"
PLAN = [("decode", (_1B, m, 16, 32768)) for m in ("bf16", "fp8wkv_w8a16", "fp8wkv")] + \
       [("decode", (_8B, "bf16", b, 4096)) for b in (1, 16)] + \
       [("decode", (_8B, m, b, 4096)) for m in ("fp8wkv_w8a16", "fp8wkv_w8a16_head") for b in (1, 16)] + \
       [("decode", (_8B, "fp8wkv_w8a16", 16, 32768))] + \
       [("decode", (_8B, m, b, 4096)) for m in ("fp8wkv", "fp8w") for b in (1, 16)] + \
       [("decode", (_8B, m, 64, 4096)) for m in ("fp8wkv", "bf16")] + \
       [("prefill", (_8B, m, 1, 2048)) for m in ("bf16", "fp8wkv")] + \
       [("decode", (_8B, m, 1, 32768)) for m in ("bf16", "fp8wkv")] + \
       [("decode", (_1B, m, b, 4096)) for b in (1, 16) for m in ("bf16", "fp8wkv")]


def kv_bytes_per_token(cfg, mode):
    from jfp8 import kv_cache
    import jax.numpy as jnp
    import jfp8
    dt = jfp8.E4M3 if MODES[mode][1] == "fp8" else jnp.bfloat16
    return kv_cache.bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dt,
                                    kv_scaling(mode))


def weight_bytes_read(cfg, params):
    """Bytes a decode step reads from the weights (`models.eval.weight_bytes_per_token`: all
    params, the embedding table only where it is also the head)."""
    from models import eval as model_eval
    return model_eval.weight_bytes_per_token(params, cfg)


def decode_setup(model, cfg, mode, B, ctx, max_len, max_new_tokens):
    """(Decoder, DecodeState, stops, max_new) for timing decode steps: a cache already holding
    `ctx` tokens per sequence (zeros: attention reads every byte regardless), random last tokens."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from models import generate as G
    dec = G.Decoder(model, batch=B, max_len=max_len, max_new_tokens=max_new_tokens,
                    kv_dtype=MODES[mode][1], kv_scaling=kv_scaling(mode))
    cache = dataclasses.replace(dec.init_cache(), lengths=jnp.full((B,), ctx, jnp.int32))
    N = dec.max_new_tokens
    state = G.DecodeState(cache=cache, tokens=jnp.zeros((B, N), jnp.int32),
                          num_generated=jnp.ones((B,), jnp.int32),
                          last=jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, B), jnp.int32),
                          done=jnp.zeros((B,), bool), step=jnp.ones((), jnp.int32),
                          key=jax.random.PRNGKey(1))
    return dec, state, dec._stop_array(()), jnp.full((B,), N, jnp.int32)


class Bench:
    def __init__(self, args):
        import jax
        import jfp8
        self.args, self.jax, self.jfp8 = args, jax, jfp8
        self.params = {}
        self.rows = []
        self.t0 = time.perf_counter()

    def model_params(self, preset, mode):
        """(cfg, model, params) for a mode; keeps the BF16 weights and one FP8 copy at a time."""
        import jax
        from models import llama
        cfg = llama.get_config(preset) if not self.args.smoke else llama.get_config("tiny")
        rkey = MODES[mode][0]
        key = (rkey, preset)
        if key not in self.params:
            for k in [k for k in self.params if k[1] != preset or (k[0] != "bf16" and k != key)]:
                del self.params[k]
            gc.collect()
            if ("bf16", preset) not in self.params:
                self.params[("bf16", preset)] = llama.init_params(llama.Llama(cfg, fused=self.args.fused),
                                                                  jax.random.PRNGKey(0))
            if rkey != "bf16":
                self.params[key] = llama.quantize_params(self.params[("bf16", preset)], recipe_for(rkey))
            jax.block_until_ready(self.params[key])
        return cfg, llama.Llama(cfg, recipe=recipe_for(rkey), fused=self.args.fused), self.params[key]

    def decode_row(self, preset, mode, B, ctx):
        import jax
        import jax.numpy as jnp
        import numpy as np
        cfg, model, params = self.model_params(preset, mode)
        steps, reps = self.args.steps, self.args.reps
        max_len = ctx + steps * (reps + 2) + 8
        row = dict(kind="decode", preset=preset if not self.args.smoke else "tiny", mode=mode, batch=B, ctx=ctx,
                   steps=steps)
        per_seq = kv_bytes_per_token(cfg, mode) * ctx
        wbytes = weight_bytes_read(cfg, params)
        cache_need = per_seq * B
        in_use = (jax.devices()[0].memory_stats() or {}).get("bytes_in_use", wbytes)  # all weight copies held
        if in_use + cache_need + WORKSPACE > self.args.device_mem:
            row.update(status=f"does not fit ({(in_use + cache_need) / 1e9:.0f} GB needed)")
            return row
        dec, state, stops, max_new = decode_setup(model, cfg, mode, B, ctx, max_len,
                                                  steps * (reps + 3))
        t = time.perf_counter()
        state = dec.decode_fn(params, state, stops, max_new, jnp.asarray(2, jnp.int32))
        jax.block_until_ready(state.tokens)
        row["compile_s"] = time.perf_counter() - t
        # one token per call (what a Python loop around a jitted step would pay)
        one = []
        for _ in range(3):
            u = jnp.asarray(int(state.step) + 1, jnp.int32)
            t = time.perf_counter()
            state = dec.decode_fn(params, state, stops, max_new, u)
            jax.block_until_ready(state.tokens)
            one.append(time.perf_counter() - t)
        times = []
        for _ in range(reps):
            u = jnp.asarray(int(state.step) + steps, jnp.int32)
            t = time.perf_counter()
            state = dec.decode_fn(params, state, stops, max_new, u)
            jax.block_until_ready(state.tokens)
            times.append((time.perf_counter() - t) / steps)
        assert dec.decode_traces == 1
        step_s = min(times)
        kv_read = per_seq * B
        limit_s = (wbytes + kv_read) / (COPY_GBPS * 1e9)
        stats = jax.devices()[0].memory_stats() or {}
        row.update(status="ok", step_ms=step_s * 1e3, step_ms_median=float(np.median(times)) * 1e3,
                   tokens_per_s=B / step_s, weight_gb=wbytes / 1e9, kv_read_gb=kv_read / 1e9,
                   limit_ms=limit_s * 1e3, frac_of_limit=limit_s / step_s,
                   one_call_per_token_ms=min(one) * 1e3,
                   host_overhead_frac_in_loop=max(0.0, (min(one) - step_s)) / steps / step_s,
                   bytes_in_use_gb=stats.get("bytes_in_use", 0) / 1e9,
                   peak_gb=stats.get("peak_bytes_in_use", 0) / 1e9, overflow=bool(np.any(state.cache.overflow)))
        del state, dec
        gc.collect()
        return row

    def prefill_row(self, preset, mode, B, T):
        import jax
        import jax.numpy as jnp
        import numpy as np
        from models import generate as G
        cfg, model, params = self.model_params(preset, mode)
        dec = G.Decoder(model, batch=B, max_len=T + 16, max_new_tokens=2, kv_dtype=MODES[mode][1],
                        kv_scaling=kv_scaling(mode))
        tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T)), jnp.int32)
        lens = jnp.full((B,), T, jnp.int32)
        stops, max_new = dec._stop_array(()), jnp.full((B,), 2, jnp.int32)
        row = dict(kind="prefill", preset=preset if not self.args.smoke else "tiny", mode=mode, batch=B, ctx=T)
        times = []
        for i in range(1 + self.args.reps):
            cache = dec.init_cache()
            jax.block_until_ready(cache)
            t = time.perf_counter()
            state, _ = dec.prefill_fn(params, cache, tokens, lens, jax.random.PRNGKey(0), stops, max_new)
            jax.block_until_ready(state.tokens)
            (times.append(time.perf_counter() - t) if i else row.__setitem__("compile_s", time.perf_counter() - t))
            del state
        row.update(status="ok", prefill_ms=min(times) * 1e3, tokens_per_s=B * T / min(times))
        return row

    def run(self, plan):
        for kind, item in plan:
            if time.perf_counter() - self.t0 > self.args.budget_s:
                self.rows.append(dict(kind=kind, preset=item[0], mode=item[1], batch=item[2], ctx=item[3],
                                      status="skipped: time budget"))
                continue
            try:
                row = self.decode_row(*item) if kind == "decode" else self.prefill_row(*item)
            except Exception as e:  # keep the sweep going; the row says what failed
                row = dict(kind=kind, preset=item[0], mode=item[1], batch=item[2], ctx=item[3],
                           status=f"error: {type(e).__name__}: {str(e)[:300]}")
                gc.collect()
            row["elapsed_s"] = time.perf_counter() - self.t0
            self.rows.append(row)
            print(json.dumps(row), flush=True)
            self.save()
        return self.rows

    def save(self):
        import jax
        from models import llama
        cap = {}
        for preset in ("llama3.1-8b", "llama3.2-1b"):
            cfg = llama.get_config(preset)
            wb16 = cfg.num_params() * 2 - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size * 2)
            out = {}
            for mode in CAP_MODES:
                wb = wb16 if mode == "bf16" else None
                if wb is None:  # FP8 linear kernels (1 byte + block scales), BF16 embedding/norms/head
                    d, F, D = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
                    lin = cfg.num_layers * d * D * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + cfg.num_layers * 3 * d * F
                    wb = wb16 - lin * 2 + lin * (1 + 4 / 128 ** 2)
                total_w = wb + (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size * 2)
                per_seq = kv_bytes_per_token(cfg, mode) * 32768
                out[mode] = dict(weights_gb=total_w / 1e9, kv_gb_per_32k_seq=per_seq / 1e9,
                                 max_batch_32k_in_70gb=int((MEM_BUDGET - total_w - WORKSPACE) // per_seq))
            for m in ("fp8wkv", "fp8wkvt"):
                out[f"{m}_over_bf16"] = out[m]["max_batch_32k_in_70gb"] / max(1, out["bf16"]["max_batch_32k_in_70gb"])
            cap[preset] = out
        dev = jax.devices()[0]
        meta = dict(device=getattr(dev, "device_kind", str(dev)), platform=dev.platform,
                    jax_version=jax.__version__, backend=self.jfp8.get_backend(),
                    modes={m: dict(weights=k, kv=kv) for m, (k, kv) in MODES.items()},
                    date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    xla_flags=os.environ.get("XLA_FLAGS", ""), variant=getattr(self.args, "variant", ""), copy_gbps=COPY_GBPS, steps=self.args.steps, reps=self.args.reps, fused=self.args.fused,
                    command=" ".join(sys.argv))
        with open(os.path.join(self.args.out, out_name(self.args, "json")), "w") as f:
            json.dump(dict(meta=meta, capacity_32k=cap, rows=self.rows), f, indent=1)


def out_name(args, ext):
    return f"decode_e2e{'_' + args.tag if args.tag else ''}.{ext}"


def ratios(rows):
    """{(preset, batch, ctx): {mode: tokens/s}} for decode rows that ran."""
    out = {}
    for r in rows:
        if r.get("kind") == "decode" and r.get("status") == "ok":
            out.setdefault((r["preset"], r["batch"], r["ctx"]), {})[r["mode"]] = r["tokens_per_s"]
    return out


def write_report(path_json, out_dir, stem=None):
    with open(path_json) as f:
        res = json.load(f)
    meta, rows = res["meta"], res["rows"]
    lines = [f"# Decode end to end ({meta['device']}, jax {meta['jax_version']}, backend {meta['backend']}, "
             f"{meta['date']})", "",
             "Modes: bf16 = BF16 weights + BF16 KV; fp8w = FP8 weights (block128: 128x128 weight blocks, "
             "1x128 FP8 activations) + BF16 KV; fp8wkv = that + FP8 E4M3 KV (per token-head scales); "
             "_w8a16 = same FP8 weights with BF16 activations (weights_only_block128); _head = lm_head in "
             "FP8 too (otherwise BF16); fp8wkvt = FP8 KV with one scale per layer (per_tensor, set by the "
             "first write) instead of per (token, head).", "",
             f"`{meta['command']}`; random weights; decode loop in one jit; best of {meta['reps']} calls of "
             f"{meta['steps']} steps; limit = bytes read per step / {meta['copy_gbps']:.0f} GB/s; "
             f"XLA_FLAGS='{meta.get('xla_flags', '')}'"
             + (f"; tuning variant `{meta['variant']}`" if meta.get("variant") else "") + ".", "",
             "| model | mode | B | ctx | ms/step | tokens/s | limit ms | frac of limit | vs bf16 | host ovh/token | peak GB | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rat = ratios(rows)
    for r in rows:
        if r["kind"] != "decode":
            continue
        if r.get("status") != "ok":
            lines.append(f"| {r['preset']} | {r['mode']} | {r['batch']} | {r['ctx']} | | | | | | | | {r['status']} |")
            continue
        base = rat.get((r["preset"], r["batch"], r["ctx"]), {}).get("bf16")
        vs = f"{r['tokens_per_s'] / base:.2f}x" if base else "n/a"
        lines.append(f"| {r['preset']} | {r['mode']} | {r['batch']} | {r['ctx']} | {r['step_ms']:.2f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['limit_ms']:.2f} | {r['frac_of_limit'] * 100:.0f}% | {vs} | "
                     f"{r['host_overhead_frac_in_loop'] * 100:.2f}% | {r['peak_gb']:.1f} | ok |")
    pre = [r for r in rows if r["kind"] == "prefill"]
    if pre:
        lines += ["", "| prefill | mode | B | T | ms | tokens/s | status |", "|---|---|---|---|---|---|---|"]
        for r in pre:
            if r.get("status") == "ok":
                lines.append(f"| {r['preset']} | {r['mode']} | {r['batch']} | {r['ctx']} | {r['prefill_ms']:.1f} | "
                             f"{r['tokens_per_s']:,.0f} | ok |")
            else:
                lines.append(f"| {r['preset']} | {r['mode']} | {r['batch']} | {r['ctx']} | | | {r['status']} |")
    lines += ["", "Concurrent 32K-token sequences in 70 GB (weights + cache bytes, 2 GB workspace):", "",
              "| model | mode | weights GB | KV GB / 32K seq | max batch |", "|---|---|---|---|---|"]
    for preset, cap in res["capacity_32k"].items():
        for mode in (m for m in CAP_MODES if m in cap):
            c = cap[mode]
            lines.append(f"| {preset} | {mode} | {c['weights_gb']:.1f} | {c['kv_gb_per_32k_seq']:.2f} | "
                         f"{c['max_batch_32k_in_70gb']} |")
        for m in ("fp8wkv", "fp8wkvt"):
            if f"{m}_over_bf16" in cap:  # older JSONs have no fp8wkvt
                lines.append(f"| {preset} | {m} / bf16 | | | {cap[f'{m}_over_bf16']:.2f}x |")
    md = "\n".join(lines) + "\n"
    stem = stem or os.path.splitext(os.path.basename(path_json))[0]
    with open(os.path.join(out_dir, stem + ".md"), "w") as f:
        f.write(md)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        keys = sorted(rat, key=lambda k: (k[0], k[2], k[1]))
        fig, ax = plt.subplots(1, 2, figsize=(13, 4.5))
        modes = [m for m in MODES if any(m in rat[k] for k in keys)]
        w = 0.8 / max(1, len(modes))
        for i, mode in enumerate(modes):
            off = (i - (len(modes) - 1) / 2) * w
            ax[0].bar([j + off for j in range(len(keys))], [rat[k].get(mode, 0) for k in keys], w, label=mode)
            fr = {(r["preset"], r["batch"], r["ctx"]): r["frac_of_limit"] for r in rows
                  if r["kind"] == "decode" and r.get("status") == "ok" and r["mode"] == mode}
            ax[1].bar([j + off for j in range(len(keys))], [fr.get(k, 0) * 100 for k in keys], w, label=mode)
        labels = [f"{k[0].split('-')[-1]}\nB{k[1]} {k[2] // 1024}K" for k in keys]
        for a in ax:
            a.set_xticks(range(len(keys)))
            a.set_xticklabels(labels, fontsize=8)
            a.legend()
        ax[0].set_yscale("log")
        ax[0].set_ylabel("decode tokens/s")
        ax[1].set_ylabel("% of byte limit")
        ax[1].axhline(85, color="k", lw=0.8, ls="--")
        fig.suptitle(f"Decode end to end, {meta['device']}")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, stem + ".png"), dpi=110)
    except ImportError:
        print("matplotlib missing: no PNG", file=sys.stderr)
    return md


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=420.0)
    ap.add_argument("--device-mem", type=float, default=79e9)
    ap.add_argument("--only", default="all", help="all | 8b | 1b | prefill (comma list)")
    ap.add_argument("--smoke", action="store_true", help="tiny preset, short contexts (CPU check)")
    ap.add_argument("--unfused", dest="fused", action="store_false",
                    help="separate q/k/v and gate/up matmuls (default: fused, as llama.fuse makes them)")
    ap.add_argument("--plot", default=None, help="only write md + PNG from this JSON")
    ap.add_argument("--rows", default=None,
                    help="only these decode rows: preset:mode:batch:ctx,... (overrides --only)")
    ap.add_argument("--tag", default="", help="suffix of the output names (decode_e2e_TAG.json)")
    ap.add_argument("--variant", default="", help="tuning overrides for the whole run, in "
                    "profile_decode.py's --variants syntax (one variant); '' = committed tables")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.variant:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import profile_decode
        profile_decode.apply_overrides(args.variant)
    if args.plot:
        print(write_report(args.plot, args.out))
        return 0
    plan = []
    parts = args.only.split(",")
    keep = {"all": lambda k, x: True, "8b": lambda k, x: x[0] == "llama3.1-8b" and k == "decode",
            "1b": lambda k, x: x[0] == "llama3.2-1b", "prefill": lambda k, x: k == "prefill"}
    if args.smoke:
        plan = [("decode", ("tiny", m, b, c)) for b, c in [(1, 64), (4, 128)] for m in MODES] + \
               [("prefill", ("tiny", m, 1, 32)) for m in ("bf16", "fp8wkv")]
        args.steps, args.reps = 4, 2
    else:
        plan = [(k, x) for k, x in PLAN if any(keep[p](k, x) for p in parts)]
        if args.rows:
            plan = [("decode", (p, m, int(b), int(c))) for p, m, b, c in
                    (r.split(":") for r in args.rows.split(","))]
    global COPY_GBPS
    import jax
    if jax.devices()[0].platform == "gpu":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import harness
        COPY_GBPS = harness.copy_ceiling_gbs(1 << 30, calls=20, stat=min)
        print(f"# copy ceiling {COPY_GBPS:.0f} GB/s (measured)", flush=True)
    bench = Bench(args)
    print(f"# device {bench.jax.devices()[0]}, backend {bench.jfp8.get_backend()}, {len(plan)} rows", flush=True)
    bench.run(plan)
    bench.save()
    print(write_report(os.path.join(args.out, out_name(args, "json")), args.out, out_name(args, "")[:-1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
