"""Logits of models/llama.py == transformers' LlamaForCausalLM / Qwen2ForCausalLM (GPU machine).

Random-init HF models (float32, eager attention, on the CPU side of torch) are saved with
`save_pretrained` (safetensors) and loaded through `models.checkpoint.load`; JAX runs in f32
with highest matmul precision. Marked gpu: torch and transformers are installed there only.
"""
import numpy as np
import pytest

pytestmark = pytest.mark.gpu


def _hf_model(kind):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(vocab_size=320, hidden_size=256, intermediate_size=640, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  initializer_range=0.05)
    v5 = int(transformers.__version__.split(".")[0]) >= 5  # v5 keeps theta + scaling in rope_parameters
    if kind == "llama":
        scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 64}
        rope = dict(rope_parameters={**scaling, "rope_theta": 500000.0}) if v5 else \
            dict(rope_theta=500000.0, rope_scaling=scaling)
        cfg = transformers.LlamaConfig(**common, **rope, rms_norm_eps=1e-5, tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        rope = dict(rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}) if v5 else \
            dict(rope_theta=1000000.0)
        cfg = transformers.Qwen2Config(**common, **rope, rms_norm_eps=1e-6, tie_word_embeddings=True)
        model = transformers.Qwen2ForCausalLM(cfg)
        with torch.no_grad():  # HF inits biases to zero; make them count
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.1)
    return model.float().eval()  # default attention (sdpa/eager): exact math in f32 on the CPU


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_logits_match_transformers(tmp_path, kind):
    import jax
    import jax.numpy as jnp
    import torch
    from models import checkpoint, llama

    hf = _hf_model(kind)
    hf.save_pretrained(tmp_path)  # safetensors by default (4.x and 5.x)
    tokens = np.random.default_rng(0).integers(0, 320, (2, 100))  # past the 64-token RoPE knee
    with torch.no_grad():
        want = hf(torch.from_numpy(tokens)).logits.numpy()
    model, params = checkpoint.load(str(tmp_path), dtype=jnp.float32, progress=False)
    assert model.cfg.model_type == kind
    with jax.default_matmul_precision("highest"):
        got = np.asarray(llama.forward(model, params, tokens))
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err < 1e-4, err  # f32 both sides, different summation order
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.99
