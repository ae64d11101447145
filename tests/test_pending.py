"""jfp8.pending: split-K sums deferred to the next RMSNorm's staging kernel (interpret mode).

Every check here is exact: the deferred path sums the same f32 partials in the same order
(`fp8_gemv.sum_split_k`, a left fold) and rounds the same way as the matmul that sums them
itself, and the staging kernel's norm is the same code as `rms_norm_stage_f16`; so values,
staged rows and a model's logits are the same bits with the deferral on and off.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jfp8
from jfp8 import _matmul_pallas
from models import llama
from models.configs import CONFIGS
from pallas_kernels import fp8_gemv as G

E4M3 = jnp.float8_e4m3fn
W8A16 = jfp8.Recipe.weights_only(jfp8.PerBlock((128, 128)))


@pytest.fixture
def deferred(monkeypatch):
    monkeypatch.setattr(_matmul_pallas, "DEFER_SPLIT_K_SUMS", True)


def _weight(n, k, seed):
    w = jax.random.normal(jax.random.key(seed), (n, k), jnp.float32) * 0.05
    return jfp8.quantize(w, jfp8.E4M3, jfp8.PerBlock((128, 128)))


def _rows(shape, seed, scale=1.0):
    return (jax.random.normal(jax.random.key(seed), shape) * scale).astype(jnp.bfloat16)


def _bits(x):
    return np.asarray(jnp.asarray(x, jnp.float32))


def test_matmul_defers_a_split_k_sum_and_materializes_the_same_bits(deferred):
    """M = 4 on a K = 1024 weight: the decode kernel splits K (m16 n_tiny table: split-K 8,
    four K steps here, so 4 parts), so
    defer_sum returns a PendingSum whose value is the matmul's own output, bit for bit, with the
    leading dims kept; without split-K (K = 256) the array itself comes back."""
    wq = _weight(384, 1024, 1)
    x, r = _rows((2, 2, 1024), 2), _rows((2, 2, 384), 3, 30.0)
    with jfp8.use_backend("interpret"):
        want = jfp8.matmul(x, wq, recipe=W8A16, residual=r)
        got = jfp8.matmul(x, wq, recipe=W8A16, residual=r, defer_sum=True)
        plain = jfp8.matmul(x[..., :256], _weight(384, 256, 4), recipe=W8A16, defer_sum=True)
    assert isinstance(got, jfp8.PendingSum) and got.shape == (2, 2, 384)
    assert got.dtype == jnp.bfloat16 and got.parts.parts.shape[0] == 4
    np.testing.assert_array_equal(_bits(got.materialize()), _bits(want))
    assert got.summed
    assert not isinstance(plain, jfp8.PendingSum) and plain.shape == (2, 2, 384)


def test_norm_prologue_sums_a_pending_input_in_its_kernel(deferred):
    """A PendingSum into an RMSNorm prologue at 2 <= M <= 16: the staging kernel sums the
    partials with the residual (`sum_rms_norm_stage_f16`), hands the sum back to the PendingSum
    (so the skip connection after it reads that array, not a second sum) and the matmul's
    output is the one of the summed input."""
    w1, w2 = _weight(512, 1024, 5), _weight(256, 512, 6)
    x, r = _rows((4, 1024), 7), _rows((4, 512), 8, 10.0)
    norm = jfp8.RMSNorm(jax.random.uniform(jax.random.key(9), (512,), jnp.float32, 0.5, 2.0), 1e-5)
    with jfp8.use_backend("interpret"):
        h = jfp8.matmul(x, w1, recipe=W8A16, residual=r, defer_sum=True)
        assert isinstance(h, jfp8.PendingSum)
        want_h = G.sum_split_k(h.parts.parts, h.parts.m, jnp.bfloat16, r)
        got = jfp8.matmul(h, w2, recipe=W8A16, prologue=norm)
        want = jfp8.matmul(want_h, w2, recipe=W8A16, prologue=norm)
    assert h.summed                                             # provided by the kernel
    np.testing.assert_array_equal(_bits(h.materialize()), _bits(want_h))
    np.testing.assert_array_equal(_bits(got), _bits(want))


def test_without_the_switch_nothing_is_deferred():
    assert not _matmul_pallas.DEFER_SPLIT_K_SUMS   # off until timed on the GPU (its comment)
    with jfp8.use_backend("interpret"):
        y = jfp8.matmul(_rows((4, 1024), 1), _weight(384, 1024, 2), recipe=W8A16, defer_sum=True)
    assert not isinstance(y, jfp8.PendingSum)


def test_every_other_consumer_materializes(deferred):
    """XLA backend: no deferral; a PendingSum given to any matmul, prologue or Dense is summed."""
    wq = _weight(256, 1024, 3)
    with jfp8.use_backend("interpret"):
        h = jfp8.matmul(_rows((4, 1024), 4), wq, recipe=W8A16, defer_sum=True)
    v = h.materialize()
    with jfp8.use_backend("xla"):
        assert not isinstance(jfp8.matmul(_rows((4, 1024), 4), wq, recipe=W8A16, defer_sum=True),
                              jfp8.PendingSum)
        np.testing.assert_array_equal(_bits(jfp8.matmul(h, _weight(128, 256, 5), recipe=W8A16)),
                                      _bits(jfp8.matmul(v, _weight(128, 256, 5), recipe=W8A16)))
    np.testing.assert_array_equal(_bits(jfp8.SwiGLU()(h)), _bits(jfp8.SwiGLU()(v)))
    norm = jfp8.RMSNorm(jnp.ones((256,)), 1e-6)
    np.testing.assert_array_equal(_bits(norm(h)), _bits(norm(v)))
    assert jfp8.materialize(v) is v and jfp8.materialize(None) is None


def test_pending_sum_checks_and_views():
    parts = G.SplitKParts(jnp.zeros((2, 16, 8), jnp.float32), 6)
    p = jfp8.PendingSum(parts, jnp.bfloat16, None, (2, 3, 8))
    assert p.reshape(-1, 8).shape == (6, 8) and p.reshape((3, 2, 8)).ndim == 3
    assert "splits=2" in repr(p)
    with pytest.raises(ValueError, match="shape: expected"):
        jfp8.PendingSum(parts, jnp.bfloat16, None, (4, 8))
    with pytest.raises(ValueError, match="cannot view"):
        p.reshape(5, 8)
    with pytest.raises(ValueError, match="at most one -1"):
        p.reshape(-1, -1)
    with pytest.raises(ValueError, match="value: expected"):
        p.provide(jnp.zeros((6, 8), jnp.float32))


def test_model_decode_step_same_bits_with_deferred_sums(monkeypatch):
    """A fused W8A16 model's decode step at B = 4 on "interpret": down (K = 768, split-K 2)
    leaves its sum and skip connection to the next layer's RMSNorm kernel; the logits and the
    cache are the same bits as with XLA's sums."""
    from jfp8 import kv_cache
    cfg = CONFIGS["tiny"]
    model = llama.Llama(cfg)
    params = llama.init_params(model, jax.random.PRNGKey(2))
    model, params = llama.fuse(llama.Llama(cfg, recipe=W8A16), llama.quantize_params(params, W8A16))
    cache = kv_cache.advance(kv_cache.KVCache.init(cfg.num_layers, 4, 16, cfg.num_kv_heads,
                                                   cfg.head_dim), jnp.array([5, 9, 2, 12]))
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (4, 1)))
    from pallas_kernels import prologue_stage
    calls = []
    kernel = prologue_stage.sum_rms_norm_stage_f16
    monkeypatch.setattr(prologue_stage, "sum_rms_norm_stage_f16",
                        lambda *a, **k: calls.append(1) or kernel(*a, **k))
    out = {}
    for on in (False, True):
        monkeypatch.setattr(_matmul_pallas, "DEFER_SPLIT_K_SUMS", on)
        with jfp8.use_backend("interpret"):
            logits, c = jax.jit(lambda p, c: model.apply(
                {"params": p}, tokens, c.lengths[:, None], c, None, "decode"))(params, cache)
        out[on] = (_bits(logits), _bits(c.k), _bits(c.v))
    assert len(calls) == cfg.num_layers - 1     # layer 0's down feeds layer 1's norm kernel
    for a, b in zip(out[False], out[True]):
        np.testing.assert_array_equal(a, b)
