"""Quality of FP8 KV caches: attention output with an FP8 cache vs with a bf16 cache.

    PYTHONPATH=. python benchmarks/kv_quality.py      # CPU, ~1 min; writes benchmarks/results/kv_quality.{json,md}

For each key distribution, cache format (E4M3, E5M2) and scaling (per-tensor, per-(token, head)),
K/V go through the library path (`kv_cache.append` writes a 2048-token prompt into a
`jfp8.KVCache` as prefill does, `attention.decode` appends one token and attends, XLA backend so
only the cache quantization differs: f32 softmax). The reference is the same decode over a bf16
cache. Queries are scaled so the logits have std 2.5 in every case (same attention sharpness).

Key distributions (B=4, Hq=32, Hkv=8, D=128, logits scaled to a realistic spread):
  gaussian         i.i.d. N(0, 1) keys
  outlier_channels 4 of 128 channels 20x larger in every token and head (the massive key
                   channels of Llama-family models, e.g. Sun et al. 2024 "Massive Activations";
                   the regime where per-tensor scales lose the other channels' bits)
  outlier_tokens   a few tokens (incl. token 0, an attention sink) with 30x larger keys and values
Metrics: rel = ||o - o_bf16|| / ||o_bf16|| (Frobenius, all heads and sequences);
max = max |o - o_bf16| / max |o_bf16|.
"""
from __future__ import annotations

import datetime
import json
import os

import jax
import jax.numpy as jnp

import jfp8
from jfp8 import attention
from jfp8 import kv_cache as kvc

B, S, HQ, HKV, D = 4, 2048, 32, 8, 128


def make_kv(kind, key):
    kk, kv, kt = jax.random.split(key, 3)
    k = jax.random.normal(kk, (B, S + 1, HKV, D), jnp.float32)
    v = jax.random.normal(kv, (B, S + 1, HKV, D), jnp.float32)
    if kind == "outlier_channels":
        chan = jnp.zeros(D).at[jnp.array([7, 45, 90, 121])].set(1.0)
        k = k * (1.0 + 19.0 * chan)
    elif kind == "outlier_tokens":
        tok = jnp.zeros(S + 1).at[0].set(1.0)
        tok = tok.at[jax.random.choice(kt, S, (8,), replace=False) + 1].set(1.0)
        k = k * (1.0 + 29.0 * tok)[None, :, None, None]
        v = v * (1.0 + 29.0 * tok)[None, :, None, None]
    return k.astype(jnp.bfloat16), v.astype(jnp.bfloat16)


@jax.jit
def _decode(q, k, v, cache):
    """Write the prompt (library append path), then decode one token over it (XLA backend)."""
    lengths = jnp.full((B,), S, jnp.int32)
    cache = kvc.append(cache, 0, k[:, :S], v[:, :S])
    cache = kvc.advance(cache, lengths)
    with jfp8.use_backend("xla"):
        o, cache = attention.decode(q, k[:, S:], v[:, S:], cache, layer=0)
    k_deq = attention_inputs(cache)
    return o.astype(jnp.float32), k_deq


def attention_inputs(cache):
    """The dequantized keys as attention sees them (L=0, first S tokens)."""
    k, _, ks, _ = cache.layer_kv(0)
    kd = k[:, :S].astype(jnp.float32)
    if ks is None:                                  # bf16 cache: no scales
        return kd
    if cache.scaling == "per_token_head":
        return kd * ks[:, :S, :, None]
    return kd * ks


def run_case(q, k, v, dtype, scaling):
    cache = kvc.KVCache.init(1, B, S + 1, HKV, D, dtype=dtype, scaling=scaling)
    return _decode(q, k, v, cache)


def main():
    key = jax.random.key(0)
    kq, kd = jax.random.split(key)
    q0 = jax.random.normal(kq, (B, 1, HQ, D), jnp.float32)
    rows = []
    for kind in ("gaussian", "outlier_channels", "outlier_tokens"):
        k, v = make_kv(kind, kd)
        # Scale q so the logits q.k / sqrt(D) have std 2.5 in every case: the same attention
        # sharpness, only the key distribution changes.
        G = HQ // HKV
        logits = jnp.einsum("bqhgd,bshd->bhgs", q0.reshape(B, 1, HKV, G, D),
                            k[:, :S].astype(jnp.float32)) / D ** 0.5
        q = (q0 * (2.5 / jnp.std(logits))).astype(jnp.bfloat16)
        ref, _ = run_case(q, k, v, jnp.bfloat16, "per_tensor")
        kf = k[:, :S].astype(jnp.float32)
        for fmt in (jfp8.E4M3, jfp8.E5M2):
            for scaling in ("per_tensor", "per_token_head"):
                o, k_deq = run_case(q, k, v, fmt, scaling)
                rel = float(jnp.linalg.norm(o - ref) / jnp.linalg.norm(ref))
                mx = float(jnp.max(jnp.abs(o - ref)) / jnp.max(jnp.abs(ref)))
                k_rel = float(jnp.linalg.norm(k_deq - kf) / jnp.linalg.norm(kf))
                rows.append(dict(keys=kind, format=fmt.name, scaling=scaling, rel=rel, max=mx,
                                 k_rel=k_rel))
                print(f"{kind:17s} {fmt.name} {scaling:15s} rel {rel:.2e} max {mx:.2e} "
                      f"K rel {k_rel:.2e}", flush=True)
    res = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), jax=jax.__version__,
               shape=dict(B=B, S=S, Hq=HQ, Hkv=HKV, D=D), rows=rows,
               note="FP8-KV attention output vs bf16-KV attention output, XLA path (f32 softmax)")
    out = os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out, exist_ok=True)
    json.dump(res, open(os.path.join(out, "kv_quality.json"), "w"), indent=1)
    lines = ["# FP8 KV cache quality: attention output vs a bf16 KV cache", "",
             f"B={B}, prompt S={S} + 1 decoded token, Hq={HQ}, Hkv={HKV}, D={D}; library path "
             "(append writes the prompt as prefill does, decode appends and attends; XLA backend, "
             "f32 softmax; queries scaled to a logit std of 2.5). "
             "rel = ‖o − o_bf16‖/‖o_bf16‖, max = max|o − o_bf16| / max|o_bf16|. "
             f"Generated by benchmarks/kv_quality.py ({res['date']}, jax {res['jax']}).", "",
             "K rel = ‖K_fp8 − K‖/‖K‖, the cache's own key error, for scale.", "",
             "| keys | format | scaling | rel | max | K rel |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['keys']} | {r['format']} | {r['scaling']} | {r['rel']:.2e} | "
                     f"{r['max']:.2e} | {r['k_rel']:.2e} |")
    open(os.path.join(out, "kv_quality.md"), "w").write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
