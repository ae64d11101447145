"""jfp8.quantize_params / quantization_summary: path rules, layout, bytes, error, save/load."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax.core import FrozenDict

import jfp8
from jfp8 import nn as fnn
from jfp8.params import plan, quantization_summary, quantize_params
from jfp8.serialization import load_params, save_params


def _seed() -> int:
    return int(np.random.default_rng().integers(1 << 30))


class TinyDecoder(nn.Module):
    """Llama-shaped names: embed, norms, attention and MLP projections, router, lm_head."""

    dense: type = nn.Dense
    recipe: jfp8.Recipe | None = None

    @nn.compact
    def __call__(self, tokens):
        kw = {} if self.dense is nn.Dense else {"recipe": self.recipe}
        x = nn.Embed(50, 64, name="embed_tokens")(tokens)
        for i in range(2):
            h = nn.RMSNorm(name=f"layers_{i}_input_norm")(x)
            q = self.dense(64, use_bias=False, name=f"layers_{i}_q_proj", **kw)(h)
            x = x + self.dense(64, use_bias=False, name=f"layers_{i}_o_proj", **kw)(q)
            h = nn.RMSNorm(name=f"layers_{i}_post_norm")(x)
            gate = self.dense(160, use_bias=False, name=f"layers_{i}_gate_proj", **kw)(h)
            up = self.dense(160, use_bias=False, name=f"layers_{i}_up_proj", **kw)(h)
            x = x + self.dense(64, use_bias=False, name=f"layers_{i}_down_proj", **kw)(nn.silu(gate) * up)
        _ = nn.Dense(4, name="router")(x)  # MoE-style router: kept high precision by default
        return nn.Dense(50, use_bias=False, name="lm_head")(nn.RMSNorm(name="final_norm")(x))


def _init():
    tokens = jnp.asarray(np.random.default_rng().integers(0, 50, (2, 7)), jnp.int32)
    params = jax.jit(TinyDecoder().init)(jax.random.key(_seed()), tokens)["params"]
    return tokens, params


def test_default_rules_quantize_projections_and_keep_the_rest():
    _, params = _init()
    params8 = quantize_params(params, jfp8.Recipe.block128())
    for name, leaf in params8.items():
        if "proj" in name:
            assert isinstance(leaf["kernel"], jfp8.QArray), name
        else:  # embed, norms, router, lm_head
            for sub in jax.tree.leaves(leaf, is_leaf=lambda x: isinstance(x, jfp8.QArray)):
                assert not isinstance(sub, jfp8.QArray), name
            chex.assert_trees_all_equal(leaf, params[name])
    q = params8["layers_0_gate_proj"]["kernel"]
    w = params["layers_0_gate_proj"]["kernel"]           # (K, N) = (64, 160)
    assert q.shape == (160, 64) and q.data.dtype == jnp.float8_e4m3fn
    assert q.scale.shape == (2, 1)                       # ceil(160/128), ceil(64/128)
    # Stored (N, K): the dequantized weight is the transposed kernel within E4M3 rounding
    # (relative half-ulp 2**-4 per entry, exact scale per 128×128 block).
    deq = np.asarray(q.dequantize(jnp.float32))
    np.testing.assert_allclose(deq, np.asarray(w).T, rtol=2.0 ** -4,
                               atol=float(q.scale.max()) * 2.0 ** -9)  # subnormal step


def test_overrides_include_exclude_and_predicates():
    _, params = _init()
    recipe = jfp8.Recipe.block128(overrides=((r"down_proj", jfp8.PerChannel(0)),))
    params8 = quantize_params(
        params, recipe,
        overrides={r"layers_1_q_proj": None, r"layers_0_o_proj": jfp8.Recipe.per_tensor()},
        exclude=lambda path, leaf: path.startswith("layers_1_up"))
    assert params8["layers_0_down_proj"]["kernel"].granularity == jfp8.PerChannel(0)
    assert params8["layers_0_down_proj"]["kernel"].scale.shape == (64, 1)
    assert params8["layers_0_o_proj"]["kernel"].granularity == jfp8.PerTensor()
    assert not isinstance(params8["layers_1_q_proj"]["kernel"], jfp8.QArray)   # override: skip
    assert not isinstance(params8["layers_1_up_proj"]["kernel"], jfp8.QArray)   # predicate exclude
    assert isinstance(params8["layers_0_q_proj"]["kernel"], jfp8.QArray)
    # An override beats keep_high_precision: the router can be forced into FP8.
    forced = quantize_params(params, jfp8.Recipe.rowwise(), overrides={r"^router/": jfp8.PerChannel(0)})
    assert isinstance(forced["router"]["kernel"], jfp8.QArray)
    # include narrows the candidates (regex list); E5M2 weights through the recipe.
    only = quantize_params(params, jfp8.Recipe.per_tensor(weight_format=jfp8.E5M2),
                           include=[r"gate_proj/kernel$"])
    kinds = {k: isinstance(v.get("kernel"), jfp8.QArray) for k, v in only.items()}
    assert sum(kinds.values()) == 2 and kinds["layers_0_gate_proj"]
    assert only["layers_0_gate_proj"]["kernel"].format == jfp8.E5M2
    decisions = plan(params, jfp8.Recipe.block128())
    assert decisions["lm_head/kernel"] is None and decisions["layers_0_q_proj/kernel"] is not None


def test_summary_bytes_and_errors():
    _, params = _init()
    params8 = quantize_params(params, jfp8.Recipe.block128())
    summary = quantization_summary(params, params8)
    n_bytes = sum(int(np.asarray(x).nbytes) for x in jax.tree.leaves(params))
    assert summary.bytes_before == n_bytes
    fp8_layers = [l for l in summary.layers if l.error is not None]
    assert len(fp8_layers) == summary.num_quantized == 10
    for l in fp8_layers:
        k, n = l.shape
        assert l.bytes_before == 4 * k * n
        assert l.bytes_after == k * n + 4 * (-(-n // 128)) * (-(-k // 128))
        # Gaussian weights, block scales: SQNR of E4M3 rounding ≈ 31 dB (rms ≈ 2.6 %); > 25 dB.
        # Nothing clips past the block amax (which itself may land a rounding above fmax).
        assert l.error.sqnr_db > 25 and l.error.frac_clipped * k * n <= (-(-n // 128)) * (-(-k // 128))
    saved = sum(l.bytes_before - l.bytes_after for l in fp8_layers)
    assert summary.bytes_before - summary.bytes_after == saved
    text = str(summary)
    assert "layers_0_q_proj/kernel" in text and "total:" in text
    assert summary.worst(1)[0].error.sqnr_db == min(l.error.sqnr_db for l in fp8_layers)


@pytest.mark.parametrize("recipe", [jfp8.Recipe.block128(), jfp8.Recipe.weights_only()],
                         ids=lambda r: r.name)
def test_save_load_same_outputs(tmp_path, recipe):
    tokens, params = _init()
    params8 = quantize_params(FrozenDict(params), recipe)     # FrozenDict in, dict out
    assert isinstance(params8, dict)
    path = tmp_path / "model.safetensors"
    save_params(path, params8, metadata={"recipe": recipe.name})
    loaded = load_params(path)
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, params8), jax.tree.map(np.asarray, loaded))
    model = TinyDecoder(fnn.FP8Dense, recipe)
    apply = jax.jit(model.apply)
    y8 = apply({"params": params8}, tokens)
    y_loaded = apply({"params": loaded}, tokens)
    np.testing.assert_array_equal(np.asarray(y8), np.asarray(y_loaded))
    # And the FP8 model is close to the high-precision one: 10 FP8 GEMMs lie on the path to the
    # logits, each ≈0.051 relative rms (tests/test_nn_linen.py); undiluted by the residual stream
    # they would add to √10 · 0.051 ≈ 0.16 (measured 0.06-0.095). Bound 0.2.
    y_ref = jax.jit(TinyDecoder().apply)({"params": params}, tokens)
    rel = np.linalg.norm(np.asarray(y8 - y_ref)) / np.linalg.norm(np.asarray(y_ref))
    assert rel < 0.2, rel


def test_stacked_kernels():
    w = jax.random.normal(jax.random.key(_seed()), (3, 64, 40))  # (L, K, N) from nn.scan
    params = {"layers": {"mlp": {"kernel": w}}}
    assert not isinstance(quantize_params(params)["layers"]["mlp"]["kernel"], jfp8.QArray)
    q = quantize_params(params, jfp8.Recipe.rowwise(), stacked=True)["layers"]["mlp"]["kernel"]
    assert q.data.shape == (3, 40, 64) and q.scale.shape == (3, 40, 1)
    for i in range(3):
        qi = jfp8.quantize(w[i].T, jfp8.E4M3, jfp8.PerChannel(0))
        np.testing.assert_array_equal(np.asarray(q.data[i], np.float32), np.asarray(qi.data, np.float32))
        np.testing.assert_array_equal(q.scale[i], qi.scale)


def test_idempotent_and_bad_inputs():
    _, params = _init()
    params8 = quantize_params(params)
    again = quantize_params(params8)
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, params8), jax.tree.map(np.asarray, again))
    with pytest.raises(TypeError, match="params"):
        quantize_params([1, 2, 3])
    with pytest.raises(TypeError, match="recipe"):
        quantize_params(params, "block128")
    with pytest.raises(TypeError, match="overrides"):
        quantize_params(params, overrides={"q_proj": "per_channel"})
    with pytest.raises(TypeError, match="include"):
        quantize_params(params, include=3)
