"""models/llama.py against an independent plain-jax.numpy Llama written here.

The reference below shares no code with models/: it reads HF-named weights (out, in) directly,
computes RoPE frequencies the way Meta's reference `apply_scaling` loop does, rotates halves with
complex numbers, repeats KV heads explicitly and runs attention one head at a time.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import checkpoint, llama
from models.configs import CONFIGS, LlamaConfig

HI = jax.lax.Precision.HIGHEST


# ------------------------------------------------------------------------------- reference
def ref_inv_freq(head_dim, theta, scaling):
    freqs = [1.0 / theta ** (i / head_dim) for i in range(0, head_dim, 2)]
    if not scaling:
        return np.array(freqs)
    factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / hi:
            out.append(f)
        elif wavelen > old / lo:
            out.append(f / factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append((1 - smooth) * f / factor + smooth * f)
    return np.array(out)


def ref_rope(x, pos, inv_freq):
    """x (T, H, D): pairs (i, i + D/2) rotated by pos * inv_freq[i], as a complex product."""
    half = x.shape[-1] // 2
    z = x[..., :half] + 1j * x[..., half:]
    ang = pos[:, None].astype(np.float64) * inv_freq[None, :]
    z = z * jnp.exp(1j * jnp.asarray(ang, jnp.float32))[:, None, :]
    return jnp.concatenate([z.real, z.imag], axis=-1).astype(jnp.float32)


def ref_rmsnorm(x, w, eps):
    return x / jnp.sqrt(jnp.mean(x ** 2, axis=-1, keepdims=True) + eps) * w


def ref_llama(hf: dict, c: dict, tokens):
    """Logits (T, V) of one unpadded sequence. hf: name -> float32 array (HF layout); c: config.json."""
    W = {k: jnp.asarray(v, jnp.float32) for k, v in hf.items()}
    lin = lambda x, name: jnp.matmul(x, W[name + ".weight"].T, precision=HI) + (
        W[name + ".bias"] if name + ".bias" in W else 0.0)
    Hq, Hkv, D = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    T = len(tokens)
    inv = ref_inv_freq(D, c["rope_theta"], c.get("rope_scaling"))
    pos = np.arange(T)
    x = W["model.embed_tokens.weight"][np.asarray(tokens)]
    causal = np.tril(np.ones((T, T), bool))
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = ref_rmsnorm(x, W[p + "input_layernorm.weight"], c["rms_norm_eps"])
        q = ref_rope(lin(a, p + "self_attn.q_proj").reshape(T, Hq, D), pos, inv)
        k = ref_rope(lin(a, p + "self_attn.k_proj").reshape(T, Hkv, D), pos, inv)
        v = lin(a, p + "self_attn.v_proj").reshape(T, Hkv, D)
        k = jnp.repeat(k, Hq // Hkv, axis=1)
        v = jnp.repeat(v, Hq // Hkv, axis=1)
        heads = []
        for h in range(Hq):
            s = jnp.matmul(q[:, h], k[:, h].T, precision=HI) / math.sqrt(D)
            s = jnp.where(causal, s, -1e30)
            s = jnp.exp(s - s.max(-1, keepdims=True))
            heads.append(jnp.matmul(s / s.sum(-1, keepdims=True), v[:, h], precision=HI))
        x = x + lin(jnp.concatenate(heads, axis=-1), p + "self_attn.o_proj")
        m = ref_rmsnorm(x, W[p + "post_attention_layernorm.weight"], c["rms_norm_eps"])
        g = lin(m, p + "mlp.gate_proj")
        x = x + lin(g / (1 + jnp.exp(-g)) * lin(m, p + "mlp.up_proj"), p + "mlp.down_proj")
    x = ref_rmsnorm(x, W["model.norm.weight"], c["rms_norm_eps"])
    head = W["model.embed_tokens.weight"] if c["tie_word_embeddings"] else W["lm_head.weight"]
    return jnp.matmul(x, head.T, precision=HI)


def random_hf_state(c: dict, seed: int) -> dict:
    """Random HF-layout float32 tensors for a config.json dict (norm weights near 1)."""
    rng = np.random.default_rng(seed)
    d, F, V = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    Hq, Hkv, D = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    t = {"model.embed_tokens.weight": rng.normal(0, 0.5, (V, d)),
         "model.norm.weight": 1 + rng.normal(0, 0.1, (d,))}
    if not c["tie_word_embeddings"]:
        t["lm_head.weight"] = rng.normal(0, 0.05, (V, d))
    bias = c["model_type"] == "qwen2"
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = 1 + rng.normal(0, 0.1, (d,))
        t[p + "post_attention_layernorm.weight"] = 1 + rng.normal(0, 0.1, (d,))
        for name, (n, k) in {"q_proj": (Hq * D, d), "k_proj": (Hkv * D, d), "v_proj": (Hkv * D, d),
                             "o_proj": (d, Hq * D)}.items():
            t[p + f"self_attn.{name}.weight"] = rng.normal(0, 1 / math.sqrt(k), (n, k))
            if bias and name != "o_proj":
                t[p + f"self_attn.{name}.bias"] = rng.normal(0, 0.1, (n,))
        for name, (n, k) in {"gate_proj": (F, d), "up_proj": (F, d), "down_proj": (d, F)}.items():
            t[p + f"mlp.{name}.weight"] = rng.normal(0, 1 / math.sqrt(k), (n, k))
    return {k: v.astype(np.float32) for k, v in t.items()}


TINY = CONFIGS["tiny"]
SMALL = dataclasses.replace(TINY, num_layers=2, vocab_size=320)
VARIANTS = {
    "llama": SMALL,
    "llama3_scaling": dataclasses.replace(
        SMALL, num_layers=1, rope_theta=500000.0, rope_scaling=(("rope_type", "llama3"), ("factor", 8.0),
                                                  ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                                                  ("original_max_position_embeddings", 64))),
    "qwen2_tied": dataclasses.replace(SMALL, num_layers=1, model_type="qwen2", qkv_bias=True, tie_word_embeddings=True,
                                      rms_norm_eps=1e-6, rope_theta=1e6, num_kv_heads=1),
}


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_forward_matches_reference(variant):
    cfg = VARIANTS[variant]
    c = cfg.to_hf()
    hf = random_hf_state(c, seed=np.random.SeedSequence().entropy % 2**31)
    model = llama.Llama(cfg, dtype=jnp.float32)
    params = checkpoint.params_from_hf(cfg, hf, dtype=jnp.float32)
    rng = np.random.default_rng()
    T = 37  # odd on purpose
    tokens = rng.integers(0, cfg.vocab_size, (2, T))
    got = llama.forward(model, params, tokens)
    for b in range(2):
        want = ref_llama(hf, c, tokens[b])
        # f32 end to end; the two implementations differ only in summation order
        assert rel_err(got[b], want) < 2e-5, variant


def test_forward_padding_mask_and_config_entry():
    """Right-padded rows with `lengths` give the logits of each row alone (valid positions)."""
    cfg = VARIANTS["llama3_scaling"]
    hf = random_hf_state(cfg.to_hf(), seed=3)
    params = checkpoint.params_from_hf(cfg, hf, dtype=jnp.float32)
    rng = np.random.default_rng()
    lens = [5, 12]
    tokens = np.zeros((2, 12), np.int32)
    for b, n in enumerate(lens):
        tokens[b, :n] = rng.integers(0, cfg.vocab_size, n)
    got = llama.forward(cfg, params, tokens, lengths=np.array(lens), dtype=jnp.float32)
    for b, n in enumerate(lens):
        alone = llama.forward(cfg, params, tokens[b:b + 1, :n], dtype=jnp.float32)[0]
        assert rel_err(got[b, :n], alone) < 1e-5


def test_bf16_forward_close_to_f32():
    cfg = VARIANTS["llama3_scaling"]
    hf = random_hf_state(cfg.to_hf(), seed=4)
    tokens = np.random.default_rng().integers(0, cfg.vocab_size, (1, 16))
    p32 = checkpoint.params_from_hf(cfg, hf, dtype=jnp.float32)
    p16 = checkpoint.params_from_hf(cfg, hf, dtype=jnp.bfloat16)
    l32 = llama.forward(llama.Llama(cfg, dtype=jnp.float32), p32, tokens)
    l16 = llama.forward(llama.Llama(cfg), p16, tokens)
    assert l16.dtype == jnp.float32
    # bf16 weights and activations: 8 mantissa bits, 2 layers -> a few 2^-8 of relative error
    assert rel_err(l16, l32) < 0.03


def test_init_params_tree_names_and_bytes():
    model = llama.Llama(VARIANTS["qwen2_tied"])
    params = llama.init_params(model, jax.random.PRNGKey(0))
    assert "lm_head" not in params
    attn = params["layers_0"]["self_attn"]
    assert attn["q_proj"]["kernel"].shape == (256, 256)
    assert attn["k_proj"]["bias"].shape == (64,)
    assert "bias" not in attn["o_proj"]
    assert params["embed_tokens"]["embedding"].dtype == jnp.bfloat16
    assert llama.param_bytes(params) == 2 * VARIANTS["qwen2_tied"].num_params()


def test_config_from_hf_roundtrip_and_errors():
    for name in ("tiny", "llama3.2-1b", "llama3.1-8b", "qwen2.5-0.5b", "qwen2.5-7b", "mistral-7b",
                 "smollm2-135m"):
        cfg = CONFIGS[name]
        assert LlamaConfig.from_hf(cfg.to_hf()) == cfg, name
    c = CONFIGS["tiny"].to_hf()
    # transformers v5 layout: theta and scaling under rope_parameters
    c5 = {k: v for k, v in CONFIGS["llama3.1-8b"].to_hf().items() if k not in ("rope_theta", "rope_scaling")}
    c5["rope_parameters"] = {"rope_theta": 500000.0, **CONFIGS["llama3.1-8b"].rope_scaling_dict}
    assert LlamaConfig.from_hf(c5) == CONFIGS["llama3.1-8b"]
    with pytest.raises(ValueError, match="model_type"):
        LlamaConfig.from_hf({**c, "model_type": "gpt2"})
    with pytest.raises(ValueError, match="rope_scaling"):
        LlamaConfig.from_hf({**c, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="num_kv_heads"):
        dataclasses.replace(CONFIGS["tiny"], num_kv_heads=3)
    with pytest.raises(ValueError, match="config name"):
        llama.get_config("llama-99b")
    # published shape figures
    assert abs(CONFIGS["llama3.1-8b"].num_params() / 1e9 - 8.03) < 0.01
    assert abs(CONFIGS["llama3.2-1b"].num_params() / 1e9 - 1.236) < 0.01
    assert abs(CONFIGS["qwen2.5-0.5b"].num_params() / 1e9 - 0.494) < 0.01


def test_fp8_logits_close_to_bf16():
    """block128 FP8 weights + 1x128 FP8 activations vs the same model in BF16.

    Bounds: E4M3 keeps 3 mantissa bits (relative rounding <= 2^-4 per element); per-block scales
    keep every block's error relative to its own amax, so logits move by a few percent of their
    spread: measured top-1 agreement 0.87-0.90 (random weights give many near-ties) and mean KL
    2.6e-3 nats on this model; the bounds (0.75, 0.02) leave margin for fresh random weights.
    """
    import jfp8
    cfg = VARIANTS["llama3_scaling"]
    hf = random_hf_state(cfg.to_hf(), seed=np.random.SeedSequence().entropy % 2**31)
    params = checkpoint.params_from_hf(cfg, hf)
    params8 = checkpoint.params_from_hf(cfg, hf, recipe=jfp8.Recipe.block128())
    tokens = np.random.default_rng().integers(0, cfg.vocab_size, (2, 48))
    l16 = np.asarray(llama.forward(llama.Llama(cfg), params, tokens), np.float64)
    l8 = np.asarray(llama.forward(llama.Llama(cfg, recipe=jfp8.Recipe.block128()), params8, tokens), np.float64)
    lp16 = l16 - np.log(np.exp(l16 - l16.max(-1, keepdims=True)).sum(-1, keepdims=True)) - l16.max(-1, keepdims=True)
    lp8 = l8 - np.log(np.exp(l8 - l8.max(-1, keepdims=True)).sum(-1, keepdims=True)) - l8.max(-1, keepdims=True)
    kl = (np.exp(lp16) * (lp16 - lp8)).sum(-1)
    top1 = (l16.argmax(-1) == l8.argmax(-1)).mean()
    assert top1 >= 0.75, top1
    assert kl.mean() < 0.02, kl.mean()


def test_fused_projections_equal_separate():
    """`fuse` joins q/k/v and gate/up along N: same logits (exact split for 128-multiple N)."""
    import jfp8
    cfg = dataclasses.replace(VARIANTS["qwen2_tied"], num_kv_heads=2)  # biases; every N a multiple of 128
    hf = random_hf_state(cfg.to_hf(), seed=np.random.SeedSequence().entropy % 2**31)
    tokens = np.random.default_rng().integers(0, cfg.vocab_size, (1, 16))
    for recipe in (jfp8.Recipe.block128(),):  # BF16 kernels concatenate trivially; FP8 joins scales
        model = llama.Llama(cfg, recipe=recipe, dtype=jnp.float32)
        params = checkpoint.params_from_hf(cfg, hf, recipe=recipe, dtype=jnp.float32)
        fmodel, fparams = llama.fuse(model, params)
        assert "qkv_proj" in fparams["layers_0"]["self_attn"] and "q_proj" not in fparams["layers_0"]["self_attn"]
        a = llama.forward(model, params, tokens)
        b = llama.forward(fmodel, fparams, tokens)
        assert rel_err(b, a) < 1e-5, recipe  # f32 activations; same weights, same sums


@pytest.mark.parametrize("backend", ["xla", "interpret"])
def test_fused_decode_step_equals_separate(backend):
    """A fused model's decode step runs `jfp8.attention.decode_qkv` (split, RoPE and the K/V
    append in one kernel on "interpret"): the logits and cache of separate q/k/v projections.
    Bound 2^-7: the fused matmul may round its bf16 columns differently (one product, N wider)."""
    import jfp8
    from jfp8 import kv_cache
    cfg = dataclasses.replace(CONFIGS["tiny"], num_layers=1)
    model = llama.Llama(cfg)
    params = llama.init_params(model, jax.random.PRNGKey(3))
    fmodel, fparams = llama.fuse(model, params)
    cache = kv_cache.advance(kv_cache.KVCache.init(1, 2, 16, cfg.num_kv_heads, cfg.head_dim),
                             jnp.array([3, 9]))
    tokens = jnp.array([[5], [7]])

    def step(m, p, c):
        return m.apply({"params": p}, tokens, c.lengths[:, None], c, None, "decode")
    with jfp8.use_backend(backend):
        want, wc = jax.jit(lambda p, c: step(model, p, c))(params, cache)
        got, gc = jax.jit(lambda p, c: step(fmodel, p, c))(fparams, cache)
    assert rel_err(got, want) < 2 ** -7
    for name in ("k", "v"):
        assert rel_err(np.asarray(getattr(gc, name), np.float32),
                       np.asarray(getattr(wc, name), np.float32)) < 2 ** -7, name


def _tiny_w8a16_decode_logits(backend, batch, seed):
    """{"xla": logits, backend: logits} (f32 numpy) of one decode step of the fused tiny model
    with W8A16 block-128 weights, B = batch sequences of different lengths."""
    import jfp8
    from jfp8 import kv_cache
    cfg = CONFIGS["tiny"]
    recipe = jfp8.Recipe.weights_only(jfp8.PerBlock((128, 128)))
    model = llama.Llama(cfg)
    params = llama.init_params(model, jax.random.PRNGKey(seed))
    model, params = llama.fuse(llama.Llama(cfg, recipe=recipe),
                               llama.quantize_params(params, recipe))
    cache = kv_cache.advance(kv_cache.KVCache.init(cfg.num_layers, batch, 16, cfg.num_kv_heads,
                                                   cfg.head_dim), jnp.array([5, 9, 2, 12][:batch]))
    tokens = jnp.asarray(np.random.default_rng().integers(3, cfg.vocab_size, (batch, 1)))

    def step(p, c):
        return model.apply({"params": p}, tokens, c.lengths[:, None], c, None, "decode")
    out = {}
    for name in ("xla", backend):
        with jfp8.use_backend(name):
            # a fresh function per backend: jit's cache would reuse the other backend's trace
            logits = jax.jit(lambda p, c: step(p, c))(params, cache)[0]
            out[name] = np.asarray(logits, np.float32)
    return out


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("backend", ["interpret", pytest.param("pallas", marks=pytest.mark.gpu)])
def test_fp8_decode_step_kernels_match_xla(backend, batch):
    """Decode of a fused W8A16 model on "interpret" / "pallas" runs every projection in
    `fp8_gemv`: at B=1 with the RMSNorms and the SwiGLU fused as prologues
    (`_matmul_pallas.FUSED_PROLOGUES`), at B=4 after the RMSNorm / SwiGLU + f16 staging kernels
    (`pallas_kernels.prologue_stage`) on f16 operands; XLA applies the same formulas first. Both round bf16 activations from f32 sums taken in another order (and
    the kernel's 1 / rms and exp may differ in the last f32 bit), so activations move by a bf16
    ulp (2^-8) here and there, and the moves grow through the layers: measured up to 0.021 of
    max|logit| over nine tokens (2 layers, random weights); bound 2^-4. The greedy token agrees
    where the top two logits are further apart than twice that."""
    import jfp8
    from jfp8 import _matmul_pallas
    assert jfp8.RMSNorm in _matmul_pallas.FUSED_PROLOGUES  # the path this test is for
    out = _tiny_w8a16_decode_logits(backend, batch, seed=11)
    assert rel_err(out[backend], out["xla"]) < 2 ** -4
    for b in range(batch):
        top2 = np.sort(out["xla"][b, -1])[-2:]
        if top2[1] - top2[0] > 2 ** -3 * np.abs(out["xla"]).max():
            assert out[backend][b, -1].argmax() == out["xla"][b, -1].argmax()


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("backend", ["interpret", pytest.param("pallas", marks=pytest.mark.gpu)])
def test_fp8_decode_step_mgpu_matches_xla(monkeypatch, backend, batch):
    """The same decode step with `_matmul_pallas.MGPU_GEMV` on: every projection of the tiny
    model through `pallas_kernels.fp8_gemv_mgpu` (B = 1: its FMA kernel with the norms, the
    SwiGLU and the residuals fused; B = 4: its wgmma kernel on staged rows), in the Mosaic GPU
    interpreter on "interpret": same bound and argument as the test above."""
    from jfp8 import _matmul_pallas
    from pallas_kernels import fp8_gemv_mgpu
    if (fp8_gemv_mgpu._INTERPRET_ERROR if backend == "interpret"
            else fp8_gemv_mgpu.unavailable_reason()) is not None:
        pytest.skip("no Mosaic GPU kernel or interpreter here")
    calls = []
    kernel = fp8_gemv_mgpu.fp8_gemv_mgpu
    monkeypatch.setattr(fp8_gemv_mgpu, "fp8_gemv_mgpu",
                        lambda a, w, *args, **kw: calls.append(w.shape) or kernel(a, w, *args, **kw))
    monkeypatch.setattr(_matmul_pallas, "MGPU_GEMV", True)
    monkeypatch.setattr(_matmul_pallas, "F16_STAGING_MIN_WEIGHT", 0)
    out = _tiny_w8a16_decode_logits(backend, batch, seed=12)
    # qkv, o, gate_up, down per layer (the head stays BF16 in this recipe)
    assert len(calls) == 4 * CONFIGS["tiny"].num_layers, calls
    assert rel_err(out[backend], out["xla"]) < 2 ** -4


def _head_only_recipe():
    """Weights-only block128 that quantizes the lm_head and nothing else (so logits differ from the
    BF16 model's by the head's rounding alone)."""
    import jfp8
    from jfp8.recipe import DEFAULT_KEEP_HIGH_PRECISION
    keep = tuple(p for p in DEFAULT_KEEP_HIGH_PRECISION if p != "lm_head") + (r"layers_",)
    return jfp8.Recipe.weights_only(jfp8.PerBlock((128, 128)), keep_high_precision=keep)


def test_tied_model_gets_the_fp8_head_its_recipe_asks_for(tmp_path):
    """A tied model (no lm_head tensor) whose recipe quantizes the head gets an FP8 copy of the
    embedding as its head (`llama.quantize_tied_head`): loaded or initialised, run by the model,
    saved and loaded back bit for bit. The default recipes keep a tied head on the embedding."""
    import jfp8
    cfg = VARIANTS["qwen2_tied"]  # vocab 320: not a multiple of the 128-row scale block
    hf = random_hf_state(cfg.to_hf(), seed=np.random.SeedSequence().entropy % 2**31)
    tokens = np.random.default_rng().integers(0, cfg.vocab_size, (2, 9))
    recipe = _head_only_recipe()
    assert "lm_head" not in checkpoint.params_from_hf(cfg, hf, recipe=jfp8.Recipe.block128())
    params = checkpoint.params_from_hf(cfg, hf, recipe=recipe, dtype=jnp.float32)
    head = params["lm_head"]["kernel"]
    assert llama.has_quantized_head(params) and head.shape == (cfg.vocab_size, cfg.hidden_size)
    want = jfp8.quantize(params["embed_tokens"]["embedding"], recipe.weight_format, jfp8.PerBlock((128, 128)))
    np.testing.assert_array_equal(np.asarray(head.data, np.float32), np.asarray(want.data, np.float32))
    np.testing.assert_array_equal(np.asarray(head.scale), np.asarray(want.scale))
    # bytes a decode step reads: the FP8 head instead of the whole BF16 table (one row gathered)
    from models import eval as model_eval
    V, d = cfg.vocab_size, cfg.hidden_size
    without = {k: v for k, v in params.items() if k != "lm_head"}
    assert model_eval.weight_bytes_per_token(params, cfg) == \
        model_eval.weight_bytes_per_token(without, cfg) - 2 * V * d + 2 * d + head.nbytes  # as BF16
    # init_params -> quantize_params takes the same path
    init = llama.init_params(llama.Llama(cfg, recipe=recipe), jax.random.PRNGKey(1))
    assert llama.has_quantized_head(init)

    model = llama.Llama(cfg, recipe=recipe, dtype=jnp.float32)
    logits = llama.forward(model, params, tokens)
    ref = llama.forward(llama.Llama(cfg, dtype=jnp.float32),
                        checkpoint.params_from_hf(cfg, hf, recipe=None, dtype=jnp.float32), tokens)
    # Only the head differs: E4M3 rounds each weight by <= 2^-4 relative (3 mantissa bits),
    # ~2.5% RMS, and independent roundings add in quadrature like the logits themselves.
    err = rel_err(logits, ref)
    assert 1e-4 < err < 0.05, err

    path = str(tmp_path / "tied_fp8_head")
    checkpoint.save(path, model, params)
    names = {n for n, _ in checkpoint.iter_checkpoint(path)}
    assert {"lm_head.weight", "lm_head.weight_scale"} <= names
    model2, params2 = checkpoint.load(path, dtype=jnp.float32, progress=False)
    assert llama.has_quantized_head(params2)
    np.testing.assert_array_equal(np.asarray(params2["lm_head"]["kernel"].data, np.float32),
                                  np.asarray(head.data, np.float32))
    np.testing.assert_array_equal(np.asarray(llama.forward(model2, params2, tokens)), np.asarray(logits))
    # loaded as a BF16 model (recipe None, FP8 tensors dequantized): the stored head is dropped
    bf16 = checkpoint.params_from_hf(cfg, dict(checkpoint.iter_checkpoint(path)), recipe=None,
                                     keep_fp8=False, dtype=jnp.float32)
    assert "lm_head" not in bf16
