"""jfp8.nn.FP8Linear (nnx): drop-in for nnx.Linear, quantize_model, delayed-scaling training step."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jfp8
from jfp8.nn import FP8Linear, FP8Meta, apply_meta_grads, quantize_model

# One E4M3 × E4M3 dot: relative rms error ≈ √2·2**-4/√3 ≈ 0.051 (see tests/test_nn_linen.py).
RMS_E4M3_DOT = np.sqrt(2) * 2.0 ** -4 / np.sqrt(3)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


class MLP(nnx.Module):
    """A user's nnx model: only the Linear class changes."""

    def __init__(self, linear, rngs, **kw):
        self.norm = nnx.LayerNorm(40, rngs=rngs)
        self.up = linear(40, 96, rngs=rngs, **kw)
        self.down = linear(96, 24, rngs=rngs, **kw)

    def __call__(self, x):
        return self.down(nnx.gelu(self.up(self.norm(x))))


def _seed() -> int:
    return int(np.random.default_rng().integers(1 << 30))


@pytest.mark.parametrize("recipe", [jfp8.Recipe.block128(), jfp8.Recipe.delayed(history=8),
                                    jfp8.Recipe.weights_only()], ids=lambda r: r.name)
def test_dropin_and_quantize_model(recipe):
    seed = _seed()
    x = jax.random.normal(jax.random.key(seed + 1), (3, 5, 40))
    ref_model = MLP(nnx.Linear, nnx.Rngs(seed))
    model = MLP(FP8Linear, nnx.Rngs(seed), recipe=recipe)
    # Same parameters: the nnx.Linear state loads into the FP8 model unchanged.
    ref_params = nnx.state(ref_model, nnx.Param)
    jax.tree.map(np.testing.assert_array_equal, ref_params, nnx.state(model, nnx.Param))
    ref = ref_model(x)
    y = nnx.jit(lambda m, x: m(x))(model, x)
    # Two layers of E4M3 rounding (one for W8A16): bound 2 × the one-layer rms.
    assert rel_err(y, ref) < 2 * RMS_E4M3_DOT
    quantize_model(model, recipe)
    assert isinstance(model.up.kernel.get_value(), jfp8.QArray)
    assert model.up.kernel.get_value().shape == (96, 40)
    y8 = nnx.jit(lambda m, x: m(x))(model, x)
    if recipe.scaling == "current":  # same scales as quantizing at call time
        np.testing.assert_allclose(np.asarray(y8), np.asarray(y), rtol=1e-5, atol=1e-5)
    assert rel_err(y8, ref) < 2 * RMS_E4M3_DOT


def test_delayed_training_step_updates_meta_and_params():
    seed = _seed()
    model = MLP(FP8Linear, nnx.Rngs(seed), recipe=jfp8.Recipe.delayed(history=4))
    ref_model = MLP(nnx.Linear, nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(16, 40)), jnp.float32)
    target = jnp.asarray(rng.normal(size=(16, 24)), jnp.float32)

    def loss_fn(model, x, target):
        return jnp.mean((model(x) - target) ** 2)

    grad_fn = nnx.grad(loss_fn, argnums=nnx.DiffState(0, (nnx.Param, FP8Meta)))

    @nnx.jit
    def step(model, optimizer, x, target):
        grads = grad_fn(model, x, target)
        param_grads = apply_meta_grads(model, grads)
        optimizer.update(model, param_grads)
        return param_grads

    # The first step's gradient matches the f32 gradient within E5M2 × E4M3 rounding (rms ≈ 0.081).
    ref_grads = nnx.grad(loss_fn)(ref_model, x, target)
    losses = []
    for i in range(3):
        norm_amax = float(np.max(np.abs(np.asarray(model.norm(x)))))  # the up layer's input
        g = step(model, optimizer, x, target)
        if i == 0:
            assert rel_err(g["up"]["kernel"].get_value(), ref_grads["up"]["kernel"].get_value()) < 0.15
        losses.append(float(loss_fn(model, x, target)))
        hist = np.asarray(model.up.input_amax_history.get_value())
        assert np.count_nonzero(hist) == i + 1  # one amax per step, newest first
    assert losses[-1] < losses[0]
    # The newest input amax of the up layer is the last step's LayerNorm output amax.
    np.testing.assert_allclose(model.up.input_amax_history.get_value()[0], norm_amax, rtol=1e-5)
    assert np.asarray(model.down.grad_amax_history.get_value())[0] > 0
    assert np.all(np.isfinite(np.asarray(model.up.kernel.get_value())))


def test_bad_inputs():
    with pytest.raises(TypeError, match="recipe"):
        FP8Linear(4, 8, rngs=nnx.Rngs(0), recipe="delayed")
    layer = FP8Linear(4, 8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="kernel"):
        layer.kernel.set_value(jfp8.quantize(jnp.ones((4, 8)), jfp8.E4M3, jfp8.PerTensor()))
        layer(jnp.ones((2, 4)))


def test_prologue_equals_transformed_input():
    """FP8Linear(x, prologue=SwiGLU()) == FP8Linear(SwiGLU()(x)), call-time and quantized kernels."""
    seed = _seed()
    layer = FP8Linear(64, 32, recipe=jfp8.Recipe.weights_only(), rngs=nnx.Rngs(seed))
    x = jax.random.normal(jax.random.key(seed + 1), (2, 128), jnp.bfloat16)
    pro = jfp8.SwiGLU()
    np.testing.assert_array_equal(np.asarray(layer(x, prologue=pro)), np.asarray(layer(pro(x))))
    quantize_model(layer, jfp8.Recipe.weights_only())
    np.testing.assert_array_equal(np.asarray(layer(x, prologue=pro)), np.asarray(layer(pro(x))))
    with pytest.raises(ValueError, match="kernel"):
        layer(x[:, :100], prologue=pro)
