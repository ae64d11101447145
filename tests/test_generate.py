"""models/generate.py: prefill + decode against the full forward, ragged batches, sampling, limits.

The model is a 2-layer tiny Llama with weights scaled so logits are well separated (greedy
choices are then stable under the bf16 rounding of the cached path); f32 activations.
"""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import generate as G
from models import llama
from models.configs import CONFIGS

CFG = dataclasses.replace(CONFIGS["tiny"], num_layers=2, vocab_size=384)


@pytest.fixture(scope="module")
def model_params():
    model = llama.Llama(CFG, dtype=jnp.float32)
    params = llama.init_params(model, jax.random.PRNGKey(np.random.SeedSequence().entropy % 2**31))
    # peaked logits: a larger embedding (tied-free lm_head scaled up too)
    params["embed_tokens"]["embedding"] = params["embed_tokens"]["embedding"] * 25
    params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 25
    params = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), params)
    return model, params


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("kv_dtype", ["bf16", "fp8"])
def test_prefill_then_decode_equals_full_forward(model_params, kv_dtype):
    """Teacher-forced: logits of prefill + T single-token decode steps == forward over it all."""
    from jfp8 import kv_cache
    model, params = model_params
    rng = np.random.default_rng()
    B, extra = 2, 6
    lens = np.array([5, 11])
    seqs = rng.integers(0, CFG.vocab_size, (B, 11 + extra))
    dec = G.Decoder(model, batch=B, max_len=32, max_new_tokens=extra + 1, kv_dtype=kv_dtype)
    prompts = [seqs[b, :lens[b]].tolist() for b in range(B)]
    state, _, _, logits0 = dec.start(params, prompts)
    step = jax.jit(lambda p, c, tok: model.apply({"params": p}, tok, c.lengths[:, None], c, None,
                                                 "decode", last_only=True))
    got = [logits0]
    cache = state.cache
    for t in range(extra):
        tok = jnp.asarray(seqs[np.arange(B), lens + t])[:, None]
        lg, cache = step(params, cache, tok)
        cache = kv_cache.advance(cache, 1)
        got.append(lg)
    full = llama.forward(model, params, seqs)
    # measured (seeds 0-2): bf16 cache 2-3e-4 (bf16 attention outputs), FP8 cache 1.9-3.0e-3
    # (E4M3 K/V, 2^-4 relative per element, averaged over the softmax); bounds leave 7x / 3x margin
    tol = 2e-3 if kv_dtype == "bf16" else 1e-2
    for t in range(extra + 1):
        want = full[np.arange(B), lens - 1 + t]
        assert rel_err(got[t], want) < tol, (t, rel_err(got[t], want))
    # the decisions agree where the reference's margin exceeds the error
    top2 = np.sort(np.asarray(full[np.arange(B), lens - 1]), -1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.5
    assert (np.argmax(got[0], -1) == np.argmax(full[np.arange(B), lens - 1], -1))[clear].all()


def test_ragged_batch_equals_each_alone_and_left_padding(model_params):
    model, params = model_params
    rng = np.random.default_rng()
    prompts = [rng.integers(0, CFG.vocab_size, n).tolist() for n in (3, 9, 6)]
    kw = dict(max_new_tokens=6, kv_dtype="bf16", max_len=32)
    batch = G.generate(model, params, prompts, **kw)
    alone = [G.generate(model, params, [p], **kw)[0] for p in prompts]
    assert batch == alone
    assert all(len(t) == 6 for t in batch)
    # the same prompts given as a left-padded array
    arr = np.full((3, 9), 7, np.int32)
    for b, p in enumerate(prompts):
        arr[b, 9 - len(p):] = p
    left = G.generate(model, params, arr, lengths=[3, 9, 6], padding="left", **kw)
    assert left == batch


def test_no_retrace_across_chunks_and_calls(model_params):
    model, params = model_params
    rng = np.random.default_rng()
    dec = G.Decoder(model, batch=2, max_len=48, max_new_tokens=12, kv_dtype="fp8")
    # chex guard around the loop body function, as the decode executable is built
    guarded = jax.jit(chex.assert_max_traces(lambda *a: dec._decode_impl(*a), n=1), donate_argnums=(1,))
    dec.decode_fn = guarded
    streamed = []
    for _ in range(2):  # two requests, different prompts and limits, same shapes
        prompts = [rng.integers(0, CFG.vocab_size, n).tolist() for n in (4, 7)]
        chunks = list(dec.stream(params, prompts, chunk_size=3, max_new_tokens=[12, 5]))
        rows = [sum((c[0][b] for c in chunks), []) for b in range(2)]
        assert [len(r) for r in rows] == [12, 5]
        assert len(chunks) == 1 + 4  # prefill token, then ceil(11 / 3) chunks
        streamed.append((prompts, rows))
    # the streamed tokens equal one uninterrupted run (same executable again)
    prompts, rows = streamed[-1]
    state = dec.run(params, prompts, max_new_tokens=[12, 5])
    whole = [np.asarray(state.tokens)[b, :n].tolist() for b, n in enumerate(np.asarray(state.num_generated))]
    assert whole == rows
    assert guarded._cache_size() == 1


def test_stop_tokens_and_per_sequence_limits(model_params):
    model, params = model_params
    prompts = [[5, 6, 7], [9, 10]]
    kw = dict(kv_dtype="bf16", max_len=32)
    free = G.generate(model, params, prompts, max_new_tokens=8, **kw)
    stop = free[0][3]
    first = free[0].index(stop)
    out = G.generate(model, params, prompts, max_new_tokens=8, stop_tokens=(stop,), **kw)
    assert out[0] == free[0][:first + 1]
    if stop in free[1]:
        assert out[1] == free[1][:free[1].index(stop) + 1]
    else:
        assert out[1] == free[1]
    out = G.generate(model, params, prompts, max_new_tokens=[2, 8], **kw)
    assert out == [free[0][:2], free[1]]


def test_sampling_rules():
    key = jax.random.PRNGKey(np.random.SeedSequence().entropy % 2**31)
    logits = jnp.asarray(np.random.default_rng().normal(0, 2, (4, 50)), jnp.float32)
    greedy = G.sample(logits, key, G.Sampling())
    assert (greedy == jnp.argmax(logits, -1)).all()
    assert (G.sample(logits, key, G.Sampling(temperature=1.0, top_k=1)) == greedy).all()
    assert (G.sample(logits, key, G.Sampling(temperature=1.0, top_p=1e-6)) == greedy).all()
    # top-k=3: only the 3 largest appear; their frequencies follow the renormalised softmax
    n = 4000
    draws = jax.jit(jax.vmap(lambda k: G.sample(logits[:1], k, G.Sampling(temperature=1.0, top_k=3))))(
        jax.random.split(key, n))[:, 0]
    top3 = np.argsort(-np.asarray(logits[0]))[:3]
    assert set(np.unique(np.asarray(draws))) <= set(top3.tolist())
    p = np.asarray(jax.nn.softmax(logits[0][top3]))
    freq = np.array([(np.asarray(draws) == t).mean() for t in top3])
    assert np.abs(freq - p).max() < 4 * np.sqrt(0.25 / n)  # 4 sigma of a binomial proportion
    # top-p keeps the smallest prefix reaching p
    probs = np.asarray(jax.nn.softmax(logits[1]))
    order = np.argsort(-probs)
    keep = order[:np.searchsorted(np.cumsum(probs[order]), 0.5) + 1]
    draws = jax.jit(jax.vmap(lambda k: G.sample(logits[1:2], k, G.Sampling(temperature=1.0, top_p=0.5))))(
        jax.random.split(key, 500))[:, 0]
    assert set(np.unique(np.asarray(draws))) <= set(keep.tolist())
    # same key -> same draw
    s = G.Sampling(temperature=0.8, top_k=10, top_p=0.9)
    assert (G.sample(logits, key, s) == G.sample(logits, key, s)).all()


def test_bad_inputs(model_params):
    model, params = model_params
    with pytest.raises(ValueError, match="temperature"):
        G.Sampling(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        G.Sampling(top_p=0)
    with pytest.raises(ValueError, match="kv_dtype"):
        G.Decoder(model, batch=1, max_len=16, max_new_tokens=4, kv_dtype="int4")
    dec = G.Decoder(model, batch=1, max_len=16, max_new_tokens=4)
    with pytest.raises(ValueError, match="prompts"):
        dec.pack_prompts([[1, 2], [3]])
    with pytest.raises(ValueError, match=r"prompts\[0\]"):
        dec.pack_prompts([[CFG.vocab_size]])
    with pytest.raises(ValueError, match="max_new_tokens"):
        dec._max_new_array(5, np.array([3]))
    with pytest.raises(ValueError, match="max_len"):
        dec._max_new_array(4, np.array([14]))
