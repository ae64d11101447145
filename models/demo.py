"""`jfp8 demo`, model part: a random-weight tiny Llama in BF16 and in FP8, side by side.

Prints how close the FP8 model's logits are to the BF16 model's (top-1 agreement, KL divergence,
over teacher-forced random sequences) and decode tokens/s of both (BF16 weights + BF16 KV cache
vs FP8 weights + FP8 KV cache), on whatever device JAX has (CPU or GPU). With random weights the
numbers say how much FP8 rounding moves the logits, not how well a trained model keeps quality:
`jfp8 eval` does that on a real checkpoint.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from models import generate as G
from models import llama


def _peaked(params, logit_std: float = 3.0):
    """Scale the lm_head so random logits spread like a trained LM's (std ~3), not ~0.01."""
    head = params["lm_head"]["kernel"]
    d = head.shape[0]
    params = dict(params)
    params["lm_head"] = {"kernel": (head.astype(jnp.float32) * (logit_std / (0.02 * d ** 0.5))).astype(head.dtype)}
    return params


def agreement(logits_ref, logits) -> dict:
    """top-1 agreement and mean KL(ref || other) in nats over all positions; logits (..., V)."""
    a = np.asarray(logits_ref, np.float64).reshape(-1, logits_ref.shape[-1])
    b = np.asarray(logits, np.float64).reshape(-1, logits.shape[-1])
    la = a - a.max(-1, keepdims=True)
    la -= np.log(np.exp(la).sum(-1, keepdims=True))
    lb = b - b.max(-1, keepdims=True)
    lb -= np.log(np.exp(lb).sum(-1, keepdims=True))
    kl = (np.exp(la) * (la - lb)).sum(-1)
    return {"top1": float((a.argmax(-1) == b.argmax(-1)).mean()), "kl_mean": float(kl.mean()),
            "kl_max": float(kl.max())}


def decode_tokens_per_s(model, params, *, batch: int, prompt_len: int, steps: int, kv_dtype: str,
                        seed: int = 0) -> float:
    """Tokens/s of the compiled decode loop alone (prefill and compile excluded), greedy."""
    rng = np.random.default_rng(seed)
    prompts = rng.integers(3, model.cfg.vocab_size, (batch, prompt_len))
    dec = G.Decoder(model, batch=batch, max_len=prompt_len + steps + 16, max_new_tokens=steps + 1,
                    kv_dtype=kv_dtype)
    until = jnp.asarray(steps + 1, jnp.int32)
    best = float("inf")
    for _ in range(2):  # the first call compiles
        state, stops, max_new, _ = dec.start(params, prompts)
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        state = dec.decode_fn(params, state, stops, max_new, until)
        jax.block_until_ready(state.tokens)
        best = min(best, time.perf_counter() - t0)
    return batch * steps / best


def run(argv: list[str] | None = None) -> int:
    """Build `--preset` (default tiny) with random weights; print BF16 vs FP8 agreement and speed."""
    import jfp8
    ap = argparse.ArgumentParser(prog="jfp8 demo (model)", description=run.__doc__)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64, help="teacher-forced tokens per sequence")
    ap.add_argument("--steps", type=int, default=32, help="decode steps timed")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv or [])
    cfg = llama.get_config(args.preset)
    t_start = time.perf_counter()
    bf16 = llama.Llama(cfg, fused=True)
    fp8 = llama.Llama(cfg, recipe=jfp8.Recipe.block128(), fused=True)
    params = _peaked(llama.init_params(bf16, jax.random.PRNGKey(args.seed)))
    params8 = llama.quantize_params(params, fp8.recipe)
    tokens = np.random.default_rng(args.seed).integers(3, cfg.vocab_size, (args.batch, args.seq))
    agree = agreement(llama.forward(bf16, params, tokens), llama.forward(fp8, params8, tokens))
    w16, w8 = llama.param_bytes(params), llama.param_bytes(params8)
    print(f"\nModel demo: '{args.preset}' Llama, random weights ({cfg.num_params() / 1e6:.1f}M params), "
          f"device {jax.devices()[0].platform}, backend {jfp8.get_backend()}")
    print(f"  weights: BF16 {w16 / 2**20:.2f} MiB -> FP8 block128 {w8 / 2**20:.2f} MiB "
          f"(embedding, norms, lm_head kept BF16)")
    print(f"  FP8 vs BF16 logits over {args.batch}x{args.seq} tokens: top-1 agreement "
          f"{agree['top1'] * 100:.1f}%, KL mean {agree['kl_mean']:.2e} nats (max {agree['kl_max']:.2e})")
    tps16 = decode_tokens_per_s(bf16, params, batch=args.batch, prompt_len=16, steps=args.steps, kv_dtype="bf16")
    tps8 = decode_tokens_per_s(fp8, params8, batch=args.batch, prompt_len=16, steps=args.steps, kv_dtype="fp8")
    print(f"  decode, batch {args.batch}: BF16 weights + BF16 KV {tps16:,.0f} tokens/s | "
          f"FP8 weights + FP8 KV {tps8:,.0f} tokens/s ({tps8 / tps16:.2f}x)")
    if jax.devices()[0].platform == "cpu":
        print("  (on CPU FP8 is emulated: speed-ups need the Hopper kernels; see benchmarks/decode_e2e.py)")
    print(f"  [{time.perf_counter() - t_start:.1f}s]")
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(run(sys.argv[1:]))
