"""models.eval (perplexity, agreement, KL, bytes, simulated FP8 KV) and models.calibration,
on small random decoders."""
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jfp8
from models import calibration as C
from models import eval as E
from models import llama
from models.configs import LlamaConfig

CFG = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=32, rope_theta=10000.0, max_position_embeddings=512)


@pytest.fixture(scope="module")
def ev():
    model = llama.Llama(CFG, recipe=None, dtype=jnp.float32, param_dtype=jnp.float32)
    params = llama.init_params(model, jax.random.PRNGKey(np.random.randint(1 << 30)))
    # Larger weights than the 0.02 init so logits (and FP8 effects) are not all near zero.
    params = jax.tree_util.tree_map(lambda x: x * 4.0 if x.ndim == 2 else x, params)
    return E.Evaluator(model, params)


def _tokens(n):
    return np.random.default_rng().integers(0, CFG.vocab_size, size=n).astype(np.int32)


def _ppl_direct(model, params, windows):
    """exp(mean NLL) straight from llama.forward, windows as a batch."""
    logits = np.asarray(llama.forward(model, params, windows), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp[:, :-1], windows[:, 1:, None], -1)
    return float(np.exp(nll.mean())), logp[:, :-1]


def test_reference_perplexity_matches_direct_forward(ev):
    tokens = _tokens(3 * 64 + 5)  # a tail shorter than a window is dropped
    ref = ev.reference(tokens, window=64)
    assert ref.windows.shape == (3, 64)
    want, _ = _ppl_direct(ev.model, ev.params, tokens[:192].reshape(3, 64))
    assert abs(ref.ppl / want - 1) < 1e-5  # f32 log-softmax vs f64


def test_identity_row_and_fp8_rows(ev):
    tokens = _tokens(128)
    ref = ev.reference(tokens, 64)
    same = ev.evaluate(E.EVAL_RECIPES["bf16"], ref)
    assert same.agreement == 1.0 and abs(same.kl) < 1e-6 and abs(same.delta_ppl_pct) < 1e-4
    row = ev.evaluate(E.EVAL_RECIPES["w8a8_block+kv_token_head"], ref)
    # KL against an independent computation from llama.forward with the FP8 model (the KV
    # round trip is then absent, so check the W8A8 row there).
    w8 = ev.evaluate(E.EVAL_RECIPES["w8a8_block"], ref)
    params8 = jfp8.quantize_params(ev.params, jfp8.Recipe.block128())
    ppl8, logp8 = _ppl_direct(ev.model.clone(recipe=jfp8.Recipe.block128()), params8, ref.windows)
    _, logp = _ppl_direct(ev.model, ev.params, ref.windows)
    kl = np.mean(np.sum(np.exp(logp) * (logp - logp8), -1))
    assert abs(w8.ppl / ppl8 - 1) < 1e-4 and abs(w8.kl - kl) < 1e-4 + 1e-3 * kl
    assert np.isclose(w8.agreement, np.mean(logp.argmax(-1) == logp8.argmax(-1)), atol=1 / 128)
    assert 0 < w8.kl and 0 < row.kl and 0.5 < row.agreement <= 1.0
    assert row.fp8_linear_fraction == 1.0 and w8.fp8_linear_fraction == 1.0


def test_bytes_per_token(ev):
    tokens = _tokens(64)
    ref = ev.reference(tokens, 64)
    d, V, L, Hkv, D = CFG.hidden_size, CFG.vocab_size, CFG.num_layers, CFG.num_kv_heads, CFG.head_dim
    n_lin = L * (2 * d * 4 * D + 2 * d * Hkv * D + 3 * d * CFG.intermediate_size)
    hp = ev.reference_row(ref)
    # bf16 storage: linear weights + untied lm_head + norms + one embedding row.
    assert hp.weight_bytes_per_token == 2 * (n_lin + V * d + (2 * L + 1) * d + d)
    assert hp.kv_bytes_per_token == 2 * L * Hkv * D * 2
    wo = ev.evaluate(E.EVAL_RECIPES["weights_only_channel"], ref)
    scales = L * 4 * (4 * D + 2 * Hkv * D + 2 * d + 2 * CFG.intermediate_size)  # one f32 per row
    assert wo.weight_bytes_per_token == hp.weight_bytes_per_token - n_lin + scales
    kv = ev.evaluate(E.EVAL_RECIPES["w8a8_block+kv_token_head"], ref)
    assert kv.kv_bytes_per_token == 2 * L * Hkv * (D + 2)
    assert ev.evaluate(E.EVAL_RECIPES["w8a8_block+kv_tensor"], ref).kv_bytes_per_token == 2 * L * Hkv * D


@pytest.mark.parametrize("scaling", E.KV_MODES)
@pytest.mark.parametrize("fmt", [jfp8.E4M3, jfp8.E5M2], ids=lambda f: f.name)
def test_kv_fake_quant(scaling, fmt):
    x = jax.random.normal(jax.random.PRNGKey(np.random.randint(1 << 30)), (1, 9, 3, 32)) * \
        jnp.exp(jax.random.normal(jax.random.PRNGKey(1), (1, 9, 3, 1)))
    y = np.asarray(E.kv_fake_quant(x, fmt, scaling))
    x = np.asarray(x)
    assert y.shape == x.shape and not np.array_equal(x, y)
    if scaling == "per_token_head":
        amax = np.abs(x).max(-1, keepdims=True)
        # normals: half an ulp relative; the per-row scale puts the row max at fmax exactly.
        assert np.all(np.abs(y - x) <= fmt.relative_precision * np.abs(x) + amax * 2.0 ** -12)
        np.testing.assert_allclose(np.abs(y).max(-1), amax[..., 0], rtol=1e-6)
    else:
        scale = np.abs(x).max() * 2 / fmt.max  # 2x headroom
        assert np.all(np.abs(y - x) <= fmt.relative_precision * np.abs(x) + scale * 2.0 ** -9)


def test_kv_patch_is_scoped(ev):
    original = llama.causal_attention
    ref = ev.reference(_tokens(64), 64)
    ev.evaluate(E.EVAL_RECIPES["kv_token_head_only"], ref)
    assert llama.causal_attention is original
    with pytest.raises(RuntimeError):
        with E._kv_patch(jfp8.E4M3, "per_tensor"):
            assert llama.causal_attention is not original
            raise RuntimeError
    assert llama.causal_attention is original


def test_fallback_layers_run_in_high_precision(ev):
    ref = ev.reference(_tokens(64), 64)
    all_hp = C.with_fallback(jfp8.Recipe.block128(), C.layer_names(ev.params))
    params = jfp8.quantize_params(ev.params, all_hp)
    assert not any(isinstance(x, jfp8.QArray) for x in jax.tree_util.tree_leaves(
        params, is_leaf=lambda x: isinstance(x, jfp8.QArray)))
    nll, top1, kl = ev.stats(E.EVAL_RECIPES["w8a8_block"], params, ref.windows, ref)
    assert np.all(top1 == ref.top1) and np.abs(kl).max() < 1e-6  # no FP8 left anywhere
    one = jfp8.quantize_params(ev.params, C.with_fallback(jfp8.Recipe.block128(), ["layers_1"]))
    assert isinstance(one["layers_0"]["mlp"]["up_proj"]["kernel"], jfp8.QArray)
    assert not isinstance(one["layers_1"]["mlp"]["up_proj"]["kernel"], jfp8.QArray)
    row = ev.evaluate(E.EVAL_RECIPES["w8a8_block"], ref)
    _, _, kl_one = ev.stats(E.EVAL_RECIPES["w8a8_block"], one, ref.windows, ref)
    assert kl_one.mean() < row.kl  # one layer fewer in FP8, less divergence


def test_collect_hessians_matches_manual(ev):
    tokens = _tokens(96)
    hs = C.collect_hessians(ev.model, ev.params, tokens, window=48)
    assert len(hs) == 4 * CFG.num_layers
    # Layer 0's q_proj input is RMSNorm(embedding) * weight: compute it by hand.
    p = ev.params
    x = np.asarray(p["embed_tokens"]["embedding"], np.float64)[tokens]
    x = x / np.sqrt((x * x).mean(-1, keepdims=True) + CFG.rms_norm_eps)
    x = x * np.asarray(p["layers_0"]["input_layernorm"]["weight"], np.float64)
    np.testing.assert_allclose(hs["layers_0/self_attn/q_proj"], x.T @ x / len(x), rtol=2e-5, atol=1e-6)
    assert hs["layers_1/mlp/down_proj"].shape == (CFG.intermediate_size,) * 2
    h = C.hessian_for(hs, "layers_1/self_attn/v_proj/kernel")
    assert h is hs["layers_1/self_attn/q_proj"]


def test_gptq_params_reduce_layer_output_error(ev):
    tokens = _tokens(256)
    hs = C.collect_hessians(ev.model, ev.params, tokens, window=128)
    recipe = C.with_fallback(jfp8.Recipe.weights_only(), ["layers_1"])
    g = C.gptq_params(ev.params, recipe, hs)
    r = jfp8.quantize_params(ev.params, recipe)
    for proj in ("q_proj", "o_proj"):
        path = f"layers_0/self_attn/{proj}/kernel"
        w = np.asarray(ev.params["layers_0"]["self_attn"][proj]["kernel"]).T
        qg, qr = g["layers_0"]["self_attn"][proj]["kernel"], r["layers_0"]["self_attn"][proj]["kernel"]
        assert qg.granularity == jfp8.PerChannel(0) and qg.shape == w.shape
        np.testing.assert_array_equal(np.asarray(qg.scale), np.asarray(qr.scale))
        h = C.hessian_for(hs, path)
        assert jfp8.calibrate.output_error(w, qg, h) < jfp8.calibrate.output_error(w, qr, h)
    assert not isinstance(g["layers_1"]["mlp"]["down_proj"]["kernel"], jfp8.QArray)  # fallback kept


def test_sensitivity_and_choose_fallback(ev):
    tokens = _tokens(64)
    sens = C.sensitivity(ev, E.EVAL_RECIPES["w8a8_block"], tokens, window=64)
    assert set(sens) == {"layers_0", "layers_1"} and all(v > 0 for v in sens.values())
    worst = max(sens, key=sens.get)
    assert C.choose_fallback(sens, ev.params, 0.5) == [worst]   # each layer is half the bytes
    assert C.choose_fallback(sens, ev.params, 0.49) == []
    assert sorted(C.choose_fallback(sens, ev.params, 1.0)) == ["layers_0", "layers_1"]
    with pytest.raises(ValueError, match="budget"):
        C.choose_fallback(sens, ev.params, 1.5)


@pytest.mark.parametrize("name", ["w8a8_block+kv_token_head+gptq", "weights_only_channel"])
def test_projection_sensitivity_is_the_fp8_forward(ev, name):
    """Each projection's KL from the one-compile masked forward equals the real FP8 model
    (QArray kernels through FP8Dense, W8A8 activations) with only that projection in FP8."""
    tokens = _tokens(64)
    er = E.EVAL_RECIPES[name]
    hs = C.collect_hessians(ev.model, ev.params, tokens, window=64) if er.calibrate else None
    sens = C.sensitivity(ev, er, tokens, unit="projection", hessians=hs, window=64)
    units = C.fallback_units(ev.params, "projection")
    assert set(sens) == set(units) and len(sens) == 4 * CFG.num_layers
    assert sorted(units["layers_1/self_attn/qkv_proj"]) == [f"layers_1/self_attn/{p}_proj/kernel" for p in "kqv"]
    ref = ev.reference(tokens, 64)
    plain = er.replace(kv_format=None, kv_scaling=None)
    rng = np.random.default_rng()
    for unit in rng.choice(sorted(sens), 2, replace=False):
        only = C.with_fallback(er.recipe, [u for u in units if u != unit])
        params = C.gptq_params(ev.params, only, hs) if er.calibrate else jfp8.quantize_params(ev.params, only)
        assert {p for p, x in E._leaves_with_paths(params) if isinstance(x, jfp8.QArray)} == set(units[unit])
        _, _, kl = ev.stats(plain.replace(recipe=only), params, ref.windows, ref)
        # Same operands and f32 dots in both paths; 1e-5 relative covers XLA's op fusion order.
        assert abs(sens[unit] - kl.mean()) <= 1e-5 * kl.mean() + 1e-9, (unit, sens[unit], kl.mean())


def test_choose_fallback_is_the_best_subset_within_budget(ev):
    units = C.fallback_units(ev.params, "projection")
    rng = np.random.default_rng()
    names = sorted(units)  # 8: two layers of qkv, o, gate_up, down
    sens = {n: float(rng.exponential()) for n in names}
    sizes = {n: sum(int(np.prod(np.shape(_leaf(ev.params, p)))) for p in units[n]) for n in names}
    total = sum(int(np.prod(np.shape(_leaf(ev.params, p)))) for ps in units.values() for p in ps)
    budget = float(rng.uniform(0.05, 0.3))
    best = max((s for r in range(len(names) + 1) for s in itertools.combinations(names, r)
                if sum(sizes[n] for n in s) <= budget * total),
               key=lambda s: sum(sens[n] for n in s))
    chosen = C.choose_fallback(sens, ev.params, budget)
    assert np.isclose(sum(sens[n] for n in chosen), sum(sens[n] for n in best))  # brute force
    assert chosen == sorted(chosen, key=lambda n: -sens[n])
    # The recipe keeps exactly those projections in high precision, within the byte budget.
    params = jfp8.quantize_params(ev.params, C.with_fallback(jfp8.Recipe.block128(), chosen))
    kept = {path for path, leaf in E._leaves_with_paths(params)
            if path.endswith("_proj/kernel") and not isinstance(leaf, jfp8.QArray)}
    assert kept == {p for n in chosen for p in units[n]}
    assert E.fp8_linear_fraction(params) >= 1.0 - budget
    # A fused model (q/k/v and gate/up joined) keeps the same units in high precision.
    fmodel, fparams = llama.fuse(ev.model, params)
    fkept = {path for path, leaf in E._leaves_with_paths(fparams)
             if path.endswith("_proj/kernel") and not isinstance(leaf, jfp8.QArray)}
    assert fkept == {f"{n}/kernel" for n in chosen}  # unit names are the fused model's paths
    with pytest.raises(ValueError, match="names no linear kernel"):
        C.choose_fallback({"layers_9/mlp": 1.0}, ev.params, 0.5)
    with pytest.raises(ValueError, match="unit: expected one of"):
        C.fallback_units(ev.params, "head")


def _leaf(params, path):
    for k in path.split("/"):
        params = params[k]
    return params


def test_bad_input(ev):
    with pytest.raises(ValueError, match="at least one window of 64 tokens, got 10"):
        ev.reference(_tokens(10), 64)
    with pytest.raises(ValueError, match="window: expected >= 2"):
        E.windows_of(_tokens(10), 1)
    with pytest.raises(ValueError, match="kv_scaling"):
        E.EvalRecipe("x", None, jfp8.E4M3, "per_row")
    with pytest.raises(ValueError, match="give both or neither"):
        E.EvalRecipe("x", None, jfp8.E4M3, None)
    with pytest.raises(ValueError, match="needs calibration tokens"):
        ev.evaluate(E.EVAL_RECIPES["weights_only_channel+gptq"], ev.reference(_tokens(64), 64))
    with pytest.raises(ValueError, match="recipe None"):
        E.Evaluator(ev.model.clone(recipe=jfp8.Recipe.block128()), ev.params)


def test_cli_on_a_gguf(tmp_path, capsys):
    from test_gguf import write_tiny
    write_tiny(tmp_path / "m.gguf", np.random.default_rng())
    text = tmp_path / "t.txt"
    text.write_text("the the 12 " * 40)
    out = tmp_path / "r.json"
    rc = E.cli([str(tmp_path / "m.gguf"), "--text", str(text), "--tokens", "64", "--window", "32",
                "--recipe", "weights_only_channel", "--recipe", "w8a8_block+kv_tensor",
                "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "weights_only_channel" in printed and "Δppl %" in printed
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows] == ["reference", "weights_only_channel", "w8a8_block+kv_tensor"]
    assert E.cli([str(tmp_path / "m.gguf"), "--text", str(text), "--recipe", "nope"]) == 2


def test_fallback_interceptor_applies_prologue_and_residual():
    """An FP8Dense left with a high-precision kernel runs as a plain dense under the eval's
    interceptor, with what the layer was given: the prologue first, the skip connection after
    (models.llama passes both to FP8Dense; dropping the residual would lose the skip)."""
    from flax import linen as nn
    from jfp8.nn import FP8Dense
    ks = jax.random.split(jax.random.key(5), 4)
    x = jax.random.normal(ks[0], (3, 64), jnp.float32)
    r = jax.random.normal(ks[1], (3, 32), jnp.float32)
    norm = jfp8.RMSNorm(jax.random.uniform(ks[2], (64,), jnp.float32, 0.5, 2.0), 1e-5)
    layer = FP8Dense(32, use_bias=True, dtype=jnp.float32, param_dtype=jnp.float32,
                     recipe=jfp8.Recipe.block128())
    params = layer.init(ks[3], x)
    params = jax.tree_util.tree_map(lambda p: p + 0.1, params)   # a non-zero bias
    with nn.intercept_methods(E._interceptor):
        got = layer.apply(params, x, prologue=norm, residual=r)
    kernel, bias = params["params"]["kernel"], params["params"]["bias"]
    want = jnp.dot(norm(x), kernel, precision="highest") + bias + r
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
