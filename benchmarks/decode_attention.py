"""Decode attention on the GPU: jfp8's Pallas flash-decoding kernel over an FP8 KV cache vs the
baselines JAX offers, all in one run (one query token per sequence, Hq=32, Hkv=8, D=128).

    # on the device machine (writes JSON + markdown under --out):
    PYTHONPATH=$PWD python3 benchmarks/decode_attention.py --out $OUT --sweep
    # here, from the committed JSON (adds the PNG and rewrites the markdown):
    python benchmarks/decode_attention.py --report benchmarks/results/decode_attention.json

Methods (each timed the way a decode step runs it: one jit over `n` distinct layers, q distinct
per layer, n <= 32 chosen so one call reads >= 2 GB of FP8 (so per-call host dispatch is spread over
many layers), median of rounds of back-to-back calls; plus the GPU kernel time of the same calls
from a profiler trace, which excludes dispatch and launch gaps):
  xla_bf16        einsum softmax einsum on a bf16 cache (bf16 dots, f32 accumulate)
  cudnn_bf16      jax.nn.dot_product_attention(implementation="cudnn") on a bf16 cache
  xla_fp8_upcast  the XLA path on an E4M3 cache upcast to bf16 inside the jit (per-tensor scales)
  pallas_ops_bf16 jax.experimental.pallas.ops.gpu.decode_attention.gqa, default config, bf16
  ours_fp8        pallas_kernels.decode_attention, E4M3 cache, per-tensor scales, stored as
                  jfp8.KVCache stores it (layout "hsd": K head-major, V in token blocks of
                  kv_cache.v_block(D) tokens)
  ours_fp8_tok    the same with per-(token, head) scales (4 more bytes per token and head)
  ours_bf16       the same kernel on the bf16 cache in jfp8.KVCache's bf16 layout ("sd");
                  ours_bf16_hsd: stored "hsd" (V blocks of v_block(D, bf16) tokens)
  ours_fp8_kernel ours_fp8 without the combine of the splits (where the time goes)
  ours_fp8_sd, ours_fp8_tok_sd   ours_fp8 / ours_fp8_tok stored token-major, (S, Hkv, D)
(Result files before 2026-12-03 have V stored (Hkv, D, S) (layout "ds", since removed) in
ours_fp8 / ours_fp8_tok / ours_bf16, and ours_bf16_sd for the bf16 "sd" run; before 2026-12-02
(third session) the "sd" runs are named ours_fp8 / ours_fp8_tok and the "ds" ones ours_fp8_ds /
ours_fp8_tok_ds.)
Effective GB/s count the bytes each method must read (K and V, plus scales where used).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

HQ, HKV, D = 32, 8, 128
SHAPES = [(1, 1024), (1, 4096), (1, 32768), (1, 131072), (8, 1024), (8, 4096), (8, 32768),
          (32, 1024), (32, 4096), (32, 32768)]
BYTES_PER_CALL = 2e9   # FP8 K+V bytes one timed call reads (n layers)
SWEEP_SHAPES = SHAPES  # run 1 (2026-11-25) swept 11 configs on 8x32K and 1x32K; see results md
INTERPRET = os.environ.get("BENCH_INTERPRET") == "1"   # CPU dry run of the script only
# Rank configs (and report) by GPU kernel time from a profiler trace; wall time is kept too.
TRACE = not INTERPRET and os.environ.get("BENCH_TRACE", "1") == "1"
METHODS = ["xla_bf16", "cudnn_bf16", "xla_fp8_upcast", "pallas_ops_bf16", "ours_bf16",
           "ours_bf16_hsd", "ours_fp8", "ours_fp8_tok", "ours_fp8_kernel", "ours_fp8_sd",
           "ours_fp8_tok_sd"]
LIB_LAYOUT = "hsd"   # jfp8.KVCache's FP8 layout: the one ours_fp8* run


def to_hsd(k, v, k_scale=None, v_scale=None):
    """Token-major (..., S, Hkv, D) arrays -> the "hsd" layout jfp8.KVCache stores (V in blocks
    of kv_cache.v_block(D, dtype) tokens, zero-padded)."""
    import jax.numpy as jnp
    from jfp8 import kv_cache
    S, D = k.shape[-3], k.shape[-1]
    vb = kv_cache.v_block(D, k.dtype)
    nb = -(-S // vb)
    vt = jnp.moveaxis(v, -3, -1)                                         # (..., Hkv, D, S)
    vt = jnp.pad(vt, [(0, 0)] * (vt.ndim - 1) + [(0, nb * vb - S)])
    vt = jnp.swapaxes(vt.reshape(vt.shape[:-1] + (nb, vb)), -3, -2)      # (..., Hkv, NB, D, VB)
    if k_scale is not None and k_scale.ndim == k.ndim - 1:
        k_scale, v_scale = jnp.swapaxes(k_scale, -1, -2), jnp.swapaxes(v_scale, -1, -2)
    return jnp.swapaxes(k, -3, -2), vt, k_scale, v_scale


def _timeit(fn, args, calls=10, rounds=5):
    """Median seconds per call over `rounds` of `calls` back-to-back asynchronous calls."""
    return statistics.median(harness.call_times(fn, *args, calls=calls, reps=rounds, warmup=2)[0])


def copy_ceiling_gbs():
    return harness.copy_ceiling_gbs(1 << (24 if INTERPRET else 30))     # 1 GiB on the GPU


def build(B, S, n, key):
    """Per-layer bf16 caches, their E4M3 versions (per-tensor and per-token-head scales)."""
    import jax
    import jax.numpy as jnp
    f8 = jnp.float8_e4m3fn
    ks = jax.random.split(key, 3 * n)
    qs = jax.random.normal(ks[0], (n, B, 1, HQ, D), jnp.bfloat16)
    kb = [jax.random.normal(ks[3 * l + 1], (B, S, HKV, D), jnp.bfloat16) for l in range(n)]
    vb = [jax.random.normal(ks[3 * l + 2], (B, S, HKV, D), jnp.bfloat16) for l in range(n)]

    @jax.jit
    def quant_tensor(x):
        s = jnp.max(jnp.abs(x.astype(jnp.float32))) / 448.0
        return (x.astype(jnp.float32) / s).astype(f8), s

    @jax.jit
    def quant_token(x):
        s = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1) / 448.0
        return (x.astype(jnp.float32) / s[..., None]).astype(f8), s

    kt = [quant_tensor(x) for x in kb]
    vt = [quant_tensor(x) for x in vb]
    k8 = [a for a, _ in kt]
    v8 = [a for a, _ in vt]
    k8s = jnp.stack([s for _, s in kt])
    v8s = jnp.stack([s for _, s in vt])
    return dict(qs=qs, kb=kb, vb=vb, k8=k8, v8=v8, k8s=k8s, v8s=v8s, quant_token=quant_token)


def make_methods(data, B, S, n, config=None):
    import jax
    import jax.numpy as jnp
    from pallas_kernels import decode_attention as da
    G = HQ // HKV
    lengths = jnp.full((B,), S, jnp.int32)

    def xla_attn(q, k, v, ks=None, vs=None):   # q (B, 1, Hq, D)
        qg = q[:, 0].reshape(B, HKV, G, D)
        if k.dtype != jnp.bfloat16:
            k, v = k.astype(jnp.bfloat16), v.astype(jnp.bfloat16)
        s = jnp.einsum("bhgd,bshd->bhgs", qg, k, preferred_element_type=jnp.float32) / math.sqrt(D)
        if ks is not None:
            s = s * ks
        p = jax.nn.softmax(s, axis=-1).astype(jnp.bfloat16)
        o = jnp.einsum("bhgs,bshd->bhgd", p, v, preferred_element_type=jnp.float32)
        if vs is not None:
            o = o * vs
        return o.reshape(B, 1, HQ, D).astype(jnp.bfloat16)

    def per_layer(f):
        return jax.jit(lambda qs, ks, vs, *extra: [f(qs[l], ks[l], vs[l], *[e[l] for e in extra])
                                                   for l in range(n)])

    fns = {}
    fns["xla_bf16"] = (per_layer(xla_attn), (data["qs"], data["kb"], data["vb"]))
    fns["cudnn_bf16"] = (per_layer(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, implementation="cudnn")), (data["qs"], data["kb"], data["vb"]))
    fns["xla_fp8_upcast"] = (per_layer(xla_attn), (data["qs"], data["k8"], data["v8"],
                                                    data["k8s"], data["v8s"]))
    try:
        from jax.experimental.pallas.ops.gpu import decode_attention as ops_da
        fns["pallas_ops_bf16"] = (per_layer(lambda q, k, v: ops_da.gqa(q[:, 0], k, v)[:, None]),
                                  (data["qs"], data["kb"], data["vb"]))
    except ImportError as e:  # pragma: no cover
        print("pallas ops import failed", e)

    def ours(stacked_k, stacked_v, ks, vs, partials_only=False, cfg=config,
             layout=LIB_LAYOUT):
        cfg_ = cfg or da.config_for(B, S, D)

        def f(qs, k, v, ks, vs):
            outs = []
            for l in range(n):
                if partials_only:
                    outs.append(da._decode_attention_jit(
                        qs[l], k, v, lengths, ks, vs, l, sm_scale=D ** -0.5, config=cfg_,
                        interpret=INTERPRET, partials_only=True, layout=layout))
                else:
                    outs.append(da.decode_attention(qs[l], k, v, lengths, ks, vs, layer=l,
                                                    config=cfg_, interpret=INTERPRET,
                                                    layout=layout))
            return outs
        return jax.jit(f), (data["qs"], stacked_k, stacked_v, ks, vs)

    return fns, ours


def bytes_read(method, B, S):
    kv = 2 * B * S * HKV * D
    if method in ("xla_bf16", "cudnn_bf16", "pallas_ops_bf16", "ours_bf16", "ours_bf16_hsd"):
        return 2 * kv
    if method in ("ours_fp8_tok", "ours_fp8_tok_sd"):
        return kv + 2 * B * S * HKV * 4
    return kv


def run_shape(B, S, sweep_configs, log):
    import jax
    import jax.numpy as jnp
    from pallas_kernels import decode_attention as da
    n = int(min(int(os.environ.get("BENCH_MAX_LAYERS", 32)),
                max(1, math.ceil(BYTES_PER_CALL / (2 * B * S * HKV * D)))))
    data = build(B, S, n, jax.random.key(B * 100003 + S))
    fns, ours = make_methods(data, B, S, n)
    row = dict(B=B, S=S, Hq=HQ, Hkv=HKV, D=D, layers_per_call=n, us={}, gbs={}, errors={})
    # The cache in the library's layout ("hsd") for ours_*; the token-major copy for *_sd.
    lib = jax.jit(to_hsd)
    k8_sd, v8_sd = jnp.stack(data["k8"]), jnp.stack(data["v8"])
    k8, v8, _, _ = lib(k8_sd, v8_sd)
    def record(name, fn_args, cfg=None):
        fn, args = fn_args
        try:
            t = _timeit(fn, args) / n
        except Exception as e:  # record, keep going
            row["errors"][name] = f"{type(e).__name__}: {str(e)[:300]}"
            log(f"  {name}: ERROR {row['errors'][name][:200]}")
            return None
        row["us"][name] = t * 1e6
        row["gbs"][name] = bytes_read(name.split("@")[0], B, S) / t / 1e9
        kt = None
        if TRACE:  # GPU kernel time from a profiler trace: no host dispatch, no launch gaps
            kt = harness.kernel_time(fn, args)[0] / n
            row.setdefault("kernel_us", {})[name] = kt * 1e6
        log(f"  {name:18s} {t * 1e6:9.1f} us {row['gbs'][name]:7.0f} GB/s" +
            (f"  kernels {kt * 1e6:7.1f} us" if kt else "") + (f"  {cfg}" if cfg else ""))
        return kt if TRACE else t

    for name in ("xla_bf16", "cudnn_bf16", "xla_fp8_upcast", "pallas_ops_bf16"):
        if name in fns:
            record(name, fns[name])

    # Our kernel: the table's config, and the sweep's when given; the best is reported.
    configs = [da.config_for(B, S, D)] + list(sweep_configs)
    best = None
    sweep_rows = []
    for cfg in configs:
        fn_args = ours(k8, v8, data["k8s"], data["v8s"], cfg=cfg)
        name = f"ours_fp8@{_cfg_str(cfg)}"
        t = record(name, fn_args, cfg)
        sweep_rows.append(dict(config=dataclasses.asdict(cfg), us=row["us"].get(name),
                               kernel_us=row.get("kernel_us", {}).get(name)))
        if t is not None and (best is None or t < best[0]):
            best = (t, cfg, name)
    row["sweep"] = sweep_rows if sweep_configs else []
    if best is not None:   # the best config's figures become the "ours_fp8" entries
        for d in (row["us"], row["gbs"], row.get("kernel_us", {})):
            if best[2] in d:
                d["ours_fp8"] = d[best[2]]
    for d in (row["us"], row["gbs"], row.get("kernel_us", {})):
        for key in [k for k in d if k.startswith("ours_fp8@")]:
            d.pop(key)
    if best is None:
        return row
    cfg = best[1]
    row["config"] = dataclasses.asdict(cfg)
    record("ours_fp8_kernel", ours(k8, v8, data["k8s"], data["v8s"], partials_only=True, cfg=cfg))
    # Per-token-head scales.
    tok = [data["quant_token"](x) for x in data["kb"]]
    tov = [data["quant_token"](x) for x in data["vb"]]
    k8t = jnp.stack([a for a, _ in tok]); kst = jnp.stack([s for _, s in tok]); del tok
    v8t = jnp.stack([a for a, _ in tov]); vst = jnp.stack([s for _, s in tov]); del tov
    hsd_tok = lib(k8t, v8t, kst, vst)
    record("ours_fp8_tok", ours(*hsd_tok, cfg=cfg))
    # The same two stored token-major, (..., S, Hkv, D) (layout "sd").
    record("ours_fp8_sd", ours(k8_sd, v8_sd, data["k8s"], data["v8s"], cfg=cfg, layout="sd"))
    record("ours_fp8_tok_sd", ours(k8t, v8t, kst, vst, cfg=cfg, layout="sd"))
    del k8_sd, v8_sd
    # Accuracy of the timed configuration, layer 0, vs the f32 reference (when it fits).
    if B * S <= 8 * 32768:
        q0 = data["qs"][0]
        lengths = jnp.full((B,), S, jnp.int32)
        for name, (kk, vv, ks, vs, vl) in {
                "ours_fp8": (k8, v8, data["k8s"], data["v8s"], "hsd"),
                "ours_fp8_tok": (*hsd_tok, "hsd"),
                "ours_fp8_tok_sd": (k8t, v8t, kst, vst, "sd")}.items():
            o = da.decode_attention(q0, kk, vv, lengths, ks, vs, layer=0, config=cfg,
                                    interpret=INTERPRET, layout=vl)
            r = da.decode_attention_reference(q0, kk, vv, lengths, ks, vs, layer=0, layout=vl)
            o, r = o.astype(jnp.float32), r.astype(jnp.float32)
            row.setdefault("rel_err_vs_f32_reference", {})[name] = float(
                jnp.linalg.norm(o - r) / jnp.linalg.norm(r))
        log(f"  rel err vs f32 reference: {row['rel_err_vs_f32_reference']}")
    del k8t, v8t, hsd_tok
    if B * S <= 16 * 32768:   # bf16 through our kernel (needs stacked bf16 copies)
        kbs, vbs = jnp.stack(data["kb"]), jnp.stack(data["vb"])
        cfg16 = dataclasses.replace(cfg, dot_dtype="bfloat16")
        record("ours_bf16", ours(kbs, vbs, None, None, cfg=cfg16, layout="sd"))
        kbh, vbh, _, _ = lib(kbs, vbs)
        del kbs, vbs
        record("ours_bf16_hsd", ours(kbh, vbh, None, None, cfg=cfg16))
    return row


def smoke(log):
    """Kernel vs f32 reference on small odd cases (T > 1, S_max not a block multiple, every
    scale mode, bf16, E5M2; V in the library's layout), compiled for the GPU."""
    import jax
    import jax.numpy as jnp
    from pallas_kernels import decode_attention as da
    out = {}
    cases = [("e4m3_tensor_T1", jnp.float8_e4m3fn, "tensor", 1, 1000),
             ("e4m3_token_T4", jnp.float8_e4m3fn, "token", 4, 1000),
             ("e5m2_token_T1", jnp.float8_e5m2, "token", 1, 4096),
             ("bf16_T2", jnp.bfloat16, None, 2, 777)]
    for name, dt, mode, T, S in cases:
        try:
            key = jax.random.key(len(out))
            k1, k2, k3, k4 = jax.random.split(key, 4)
            Bs, L = 3, 2
            q = jax.random.normal(k1, (Bs, T, HQ, D), jnp.bfloat16)
            k = jax.random.normal(k2, (L, Bs, S, HKV, D), jnp.float32) * 3
            v = jax.random.normal(k3, (L, Bs, S, HKV, D), jnp.float32)
            fmax = 1.0 if dt == jnp.bfloat16 else float(jnp.finfo(dt).max)
            if mode == "token":
                ks = jnp.max(jnp.abs(k), -1) / fmax
                vs = jnp.max(jnp.abs(v), -1) / fmax
                kd, vd = (k / ks[..., None]).astype(dt), (v / vs[..., None]).astype(dt)
            elif mode == "tensor":
                ks = jnp.max(jnp.abs(k), axis=(1, 2, 3, 4)) / fmax
                vs = jnp.max(jnp.abs(v), axis=(1, 2, 3, 4)) / fmax
                kd = (k / ks[:, None, None, None, None]).astype(dt)
                vd = (v / vs[:, None, None, None, None]).astype(dt)
            else:
                ks = vs = None
                kd, vd = k.astype(dt), v.astype(dt)
            lengths = jnp.array([T, S // 2 + 3, S], jnp.int32)
            kd, vd, ks, vs = to_hsd(kd, vd, ks, vs)     # the library's FP8 layout
            kw = dict(layer=1, layout=LIB_LAYOUT)
            o = da.decode_attention(q, kd, vd, lengths, ks, vs, **kw).astype(jnp.float32)
            r = da.decode_attention_reference(q, kd, vd, lengths, ks, vs, **kw).astype(jnp.float32)
            out[name] = float(jnp.linalg.norm(o - r) / jnp.linalg.norm(r))
        except Exception as e:
            out[name] = f"{type(e).__name__}: {str(e)[:400]}"
        log(f"  smoke {name}: {out[name]}")
    return out


def _cfg_str(cfg):
    return (f"bk{cfg.block_k}_tp{cfg.target_programs}_mb{cfg.min_blocks_per_split}_"
            f"w{cfg.num_warps}_s{cfg.num_stages}_{cfg.dot_dtype}" + ("_ev" if cfg.early_v else ""))


def parse_config(text):
    """'bk128_tp264_mb2_w4_s2[_float16][_ev]' (the `_cfg_str` format; `_ev` = early_v) ->
    DecodeAttentionConfig."""
    from pallas_kernels.decode_attention import DecodeAttentionConfig as C
    keys = dict(bk="block_k", tp="target_programs", mb="min_blocks_per_split", w="num_warps",
                s="num_stages")
    kw = {}
    for part in text.split("_"):
        if part in ("float16", "bfloat16"):
            kw["dot_dtype"] = part
            continue
        if part == "ev":
            kw["early_v"] = True
            continue
        key = next((k for k in sorted(keys, key=len, reverse=True) if part.startswith(k)), None)
        if key is None or not part[len(key):].isdigit():
            raise ValueError(f"--configs: cannot read {part!r} in {text!r}")
        kw[keys[key]] = int(part[len(key):])
    return C(**kw)


def sweep_configs(spec=""):
    from pallas_kernels.decode_attention import DecodeAttentionConfig as C
    if spec:
        return [parse_config(t) for t in spec.split(",")]
    out = []
    for bk, tp, mb, w, st, dd in [
            (128, 256, 2, 4, 2, "float16"), (128, 512, 2, 4, 2, "float16"),
            (128, 512, 2, 4, 3, "float16"), (128, 1024, 2, 4, 2, "float16"),
            (128, 2048, 2, 4, 3, "float16")]:
        out.append(C(block_k=bk, target_programs=tp, min_blocks_per_split=mb, num_warps=w,
                     num_stages=st, dot_dtype=dd))
    return out


def write_markdown(res, path):
    lines = [f"# Decode attention, {res['device']} (jax {res['jax']}, {res['date']})", "",
             f"One query token, Hq={HQ}, Hkv={HKV}, D={D}, full-length caches. Copy ceiling "
             f"measured in the same run: {res['copy_gbs']:.0f} GB/s (read + write). "
             "µs per layer (GB/s on the bytes each method reads).", "",
             "| B | S | " + " | ".join(METHODS) + " | ours_fp8 / cuDNN | ours_fp8 % of copy |",
             "|---|---|" + "---|" * len(METHODS) + "---|---|"]
    for row in res["rows"]:
        cells = []
        for m in METHODS:
            if m in row["us"]:
                cells.append(f"{row['us'][m]:.1f} ({row['gbs'][m]:.0f})")
            else:
                cells.append("err" if m in row.get("errors", {}) else "–")
        ratio = (row["us"]["cudnn_bf16"] / row["us"]["ours_fp8"]
                 if "cudnn_bf16" in row["us"] and "ours_fp8" in row["us"] else float("nan"))
        pct = (100 * row["gbs"]["ours_fp8"] / res["copy_gbs"]) if "ours_fp8" in row["gbs"] else float("nan")
        lines.append(f"| {row['B']} | {row['S']} | " + " | ".join(cells) +
                     f" | {ratio:.2f}× | {pct:.0f}% |")
    traced = [r for r in res["rows"] if r.get("kernel_us")]
    if traced:
        lines += ["", "GPU kernel time per layer from a profiler trace (sum of the durations of the "
                  "kernels each method launches: no host dispatch, no launch gaps), µs (GB/s):", "",
                  "| B | S | " + " | ".join(METHODS) + " | ours_fp8 / cuDNN | ours_fp8 % of copy |",
                  "|---|---|" + "---|" * len(METHODS) + "---|---|"]
        for row in traced:
            ku = row["kernel_us"]
            cells = [f"{ku[m]:.1f} ({bytes_read(m, row['B'], row['S']) / ku[m] / 1e3:.0f})"
                     if m in ku else "–" for m in METHODS]
            ratio = ku["cudnn_bf16"] / ku["ours_fp8"] if "cudnn_bf16" in ku and "ours_fp8" in ku \
                else float("nan")
            pct = (100 * bytes_read("ours_fp8", row["B"], row["S"]) / ku["ours_fp8"] / 1e3
                   / res["copy_gbs"]) if "ours_fp8" in ku else float("nan")
            lines.append(f"| {row['B']} | {row['S']} | " + " | ".join(cells) +
                         f" | {ratio:.2f}× | {pct:.0f}% |")
    lines += ["", "ours_fp8 config per shape:", ""]
    for row in res["rows"]:
        if "config" in row:
            lines.append(f"- B={row['B']} S={row['S']}: `{row['config']}`")
    sweeps = [r for r in res["rows"] if r.get("sweep")]
    if sweeps:
        lines += ["", "## Config sweep (ours_fp8, µs per layer)", ""]
        for row in sweeps:
            lines.append(f"B={row['B']} S={row['S']}:")
            lines.append("")
            lines.append("| block_k | target_programs | min_blocks | warps | stages | dot | µs (wall) "
                         "| µs (kernels) |")
            lines.append("|---|---|---|---|---|---|---|---|")
            for s in row["sweep"]:
                c = s["config"]
                us = "err" if s["us"] is None else f"{s['us']:.1f}"
                ku = "–" if s.get("kernel_us") is None else f"{s['kernel_us']:.1f}"
                lines.append(f"| {c['block_k']} | {c['target_programs']} | "
                             f"{c['min_blocks_per_split']} | {c['num_warps']} | {c['num_stages']} | "
                             f"{c['dot_dtype']} | {us} | {ku} |")
            lines.append("")
    errs = {f"B={r['B']} S={r['S']} {k}": v for r in res["rows"] for k, v in r.get("errors", {}).items()}
    if errs:
        lines += ["", "Errors:", ""] + [f"- {k}: {v[:200]}" for k, v in errs.items()]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = res["rows"]
    methods = [m for m in METHODS if m != "ours_fp8_kernel"]
    fig, ax = plt.subplots(figsize=(12, 5))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        xs = [j + i * width for j, r in enumerate(rows) if m in r["gbs"]]
        ys = [r["gbs"][m] for r in rows if m in r["gbs"]]
        ax.bar(xs, ys, width, label=m)
    ax.axhline(res["copy_gbs"], color="k", ls="--", lw=1, label="copy ceiling")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))])
    ax.set_xticklabels([f"B={r['B']}\nS={r['S'] // 1024}K" for r in rows])
    ax.set_ylabel("effective GB/s (bytes read)")
    ax.set_title(f"Decode attention, Hq={HQ} Hkv={HKV} D={D}, {res['device']}")
    ax.legend(fontsize=8, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--sweep", action="store_true", help="sweep configs on SWEEP_SHAPES")
    ap.add_argument("--shapes", default="", help="e.g. 8x32768,1x32768 (default: all)")
    ap.add_argument("--report", default="", help="JSON to turn into markdown + PNG")
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip shapes after this long")
    ap.add_argument("--configs", default="", help="sweep these configs (comma list of "
                    "bk128_tp264_mb2_w4_s2) on every shape instead of the built-in sweep")
    ap.add_argument("--tag", default="", help="suffix of the output names")
    ap.add_argument("--heads", default="", help="HQ,HKV,D instead of 32,8,128 (Llama-3.1-8B); "
                    "32,8,64 is Llama-3.2-1B")
    a = ap.parse_args()
    if a.heads:
        global HQ, HKV, D
        HQ, HKV, D = (int(x) for x in a.heads.split(","))
    if a.report:
        res = json.load(open(a.report))
        base = os.path.splitext(a.report)[0]
        write_markdown(res, base + ".md")
        plot(res, base + ".png")
        return
    import jax
    os.makedirs(a.out, exist_ok=True)
    log_f = open(os.path.join(a.out, f"decode_attention{a.tag}.log"), "w")

    def log(msg):
        print(msg, flush=True)
        log_f.write(msg + "\n")
        log_f.flush()
    dev = jax.devices()[0]
    res = dict(device=getattr(dev, "device_kind", str(dev)), jax=jax.__version__,
               date=datetime.datetime.now().isoformat(timespec="seconds"), rows=[])
    res["copy_gbs"] = copy_ceiling_gbs()
    log(f"{res['device']} jax {res['jax']} copy ceiling {res['copy_gbs']:.0f} GB/s")
    t_start = time.time()
    res["smoke_rel_err"] = smoke(log)
    shapes = SHAPES
    if a.shapes:
        shapes = [tuple(int(x) for x in s.split("x")) for s in a.shapes.split(",")]
    first = [(8, 32768), (1, 32768)]   # the target shapes first, in case the time budget bites
    order = sorted(shapes, key=lambda s: (s not in first, SHAPES.index(s) if s in SHAPES else 0))
    for B, S in order:
        if time.time() - t_start > a.budget_s:
            log(f"B={B} S={S}: skipped (time budget)")
            res.setdefault("skipped", []).append([B, S])
            continue
        log(f"B={B} S={S}  (t={time.time() - t_start:.0f}s)")
        sweep = sweep_configs(a.configs) if (a.configs or (a.sweep and (B, S) in SWEEP_SHAPES)) \
            else []
        row = run_shape(B, S, sweep, log)
        res["rows"].append(row)
        res["rows"].sort(key=lambda r: (r["B"], r["S"]))
        json.dump(res, open(os.path.join(a.out, f"decode_attention{a.tag}.json"), "w"), indent=1)
        write_markdown(res, os.path.join(a.out, f"decode_attention{a.tag}.md"))
        jax.clear_caches()
    log("\nB     S  " + "  ".join(f"{m[:14]:>14s}" for m in METHODS) + "  ours/cudnn")
    for row in res["rows"]:
        cells = "  ".join(f"{row['us'].get(m, float('nan')):14.1f}" for m in METHODS)
        ratio = row["us"].get("cudnn_bf16", float("nan")) / row["us"].get("ours_fp8", float("nan"))
        log(f"{row['B']:<3d} {row['S']:6d}  {cells}  {ratio:.2f}")


if __name__ == "__main__":
    sys.exit(main())
