"""models/checkpoint.py: HF dirs written here (real safetensors files, a real tokenizer.json),
both published FP8 layouts, jfp8 save/load, atomic saves, errors naming the tensor, the CLIs.

The FP8 checkpoints are made by a numpy quantizer written here (per 128x128 block amax / 448,
ml_dtypes cast), not by jfp8, so the loader is checked against an independent encoding.
"""
import json
import math
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from models import checkpoint, llama
from models.configs import LlamaConfig

# widths that are not multiples of 128, so 128x128 blocks overhang the edges
CFG = LlamaConfig(vocab_size=300, hidden_size=192, intermediate_size=320, num_layers=1, num_heads=3,
                  num_kv_heads=1, head_dim=64, bos_token_id=1, eos_token_ids=(2,))
WORDS = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(297)]
E4M3 = ml_dtypes.float8_e4m3fn


def hf_tensors(cfg, seed):
    rng = np.random.default_rng(seed)
    t = {"model.embed_tokens.weight": rng.normal(0, 1, (cfg.vocab_size, cfg.hidden_size)),
         "model.norm.weight": 1 + rng.normal(0, 0.1, cfg.hidden_size),
         "lm_head.weight": rng.normal(0, 0.05, (cfg.vocab_size, cfg.hidden_size))}
    for name, shape in checkpoint.expected_tensors(cfg).items():
        if name not in t:
            fan_in = shape[-1] if len(shape) == 2 else 1
            t[name] = (1 + rng.normal(0, 0.1, shape)) if name.endswith("layernorm.weight") else \
                rng.normal(0, 1 / math.sqrt(fan_in), shape)
    return {k: v.astype(np.float32) for k, v in t.items()}


def write_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    tok.save(os.path.join(path, "tokenizer.json"))


def write_hf_dir(path, cfg, tensors, *, shards=2, dtype=np.float16):
    """config.json + sharded model-0000i-of-0000n.safetensors + index json, via `safetensors`."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg.to_hf(), f)
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        fn = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n].astype(dtype) for n in names[s::shards]}
        safetensors.numpy.save_file(part, os.path.join(path, fn))
        weight_map.update({n: fn for n in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    write_tokenizer(path)


def np_block_fp8(w, block=128):
    """(N, K) f32 -> (e4m3 data, f32 scale (ceil(N/128), ceil(K/128))), x = data * scale.
    Written the way published FP8 checkpoints are made (amax / 448, a true division)."""
    N, K = w.shape
    nb, kb = -(-N // block), -(-K // block)
    data = np.zeros((N, K), E4M3)
    scale = np.ones((nb, kb), np.float32)
    for i in range(nb):
        for j in range(kb):
            blk = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
            amax = np.abs(blk).max()
            s = np.float32(amax / 448.0) if amax > 0 else np.float32(1.0)
            scale[i, j] = s
            data[i * block:(i + 1) * block, j * block:(j + 1) * block] = \
                np.clip(blk / s, -448, 448).astype(E4M3)
    return data, scale


def np_channel_fp8(w):
    amax = np.abs(w).max(axis=1, keepdims=True)
    s = np.where(amax > 0, amax / 448.0, 1.0).astype(np.float32)
    return np.clip(w / s, -448, 448).astype(E4M3), s


def dequant(data, scale, block=128):
    full = np.repeat(np.repeat(scale, block, 0), block, 1)[:data.shape[0], :data.shape[1]] \
        if scale.shape[1] > 1 else scale
    return data.astype(np.float32) * full


def is_linear(name):
    return name.endswith("_proj.weight")


def leaf(params, name):
    node = params
    for k in checkpoint.param_path(name):
        node = node[k]
    return node


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("hf") / "tiny")
    tensors = hf_tensors(CFG, np.random.SeedSequence().entropy % 2**31)
    write_hf_dir(path, CFG, tensors)
    return path, tensors


def test_load_bf16_and_quantize_while_loading(hf_dir):
    path, tensors = hf_dir
    model, params = checkpoint.load(path, progress=False)
    assert model.recipe is None and model.cfg == CFG
    k = leaf(params, "model.layers.0.mlp.down_proj.weight")
    assert k.dtype == jnp.bfloat16 and k.shape == (320, 192)  # flax (in, out)
    np.testing.assert_array_equal(np.asarray(k, np.float32),
                                  tensors["model.layers.0.mlp.down_proj.weight"].astype(np.float16)
                                  .astype(ml_dtypes.bfloat16).astype(np.float32).T)
    model8, params8 = checkpoint.load(path, quantize="block128", progress=False)
    import jfp8
    q = leaf(params8, "model.layers.0.self_attn.q_proj.weight")
    assert isinstance(q, jfp8.QArray) and q.shape == (192, 192) and q.scale.shape == (2, 2)
    assert leaf(params8, "model.embed_tokens.weight").dtype == jnp.bfloat16  # kept high precision
    # the same bits as quantizing the fp16 tensor independently with jfp8's contract (numpy):
    # scale = amax * f32(1/448), data = RNE(clip(w * RN(1/scale)))
    w = tensors["model.layers.0.self_attn.q_proj.weight"].astype(np.float16).astype(np.float32)
    scale = np.ones((2, 2), np.float32)
    data = np.zeros(w.shape, E4M3)
    for i in range(2):
        for j in range(2):
            blk = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            s_ = np.float32(np.abs(blk).max()) * np.float32(1 / np.float32(448))
            scale[i, j] = s_
            data[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = np.clip(
                blk * (np.float32(1) / s_), -448, 448).astype(E4M3)
    np.testing.assert_array_equal(np.asarray(q.scale), scale)
    np.testing.assert_array_equal(np.asarray(q.data).view(np.uint8), data.view(np.uint8))
    # FP8 logits near BF16 logits (measured 0.83-0.96 top-1 over 24 tokens for seeds 0-5: random
    # weights leave near-ties; 128 tokens and a 0.75 floor keep this a sanity check, not a coin flip)
    tokens = np.random.default_rng().integers(0, CFG.vocab_size, (2, 64))
    l16 = np.asarray(llama.forward(model, params, tokens))
    l8 = np.asarray(llama.forward(model8, params8, tokens))
    assert (l16.argmax(-1) == l8.argmax(-1)).mean() >= 0.75
    tok = checkpoint.load_tokenizer(path)
    assert tok.encode("w5 w7").ids == [8, 10]


@pytest.mark.parametrize("layout", ["block", "channel"])
def test_fp8_checkpoint_layouts_load_to_same_weights(tmp_path, hf_dir, layout):
    _, tensors = hf_dir
    path = str(tmp_path / layout)
    os.makedirs(path)
    out, want = {}, {}
    for name, w in tensors.items():
        if not is_linear(name):
            out[name] = w.astype(ml_dtypes.bfloat16)
            continue
        base = name[:-len(".weight")]
        if layout == "block":  # DeepSeek-V3 / HF fine-grained FP8
            data, scale = np_block_fp8(w)
            out[base + ".weight_scale_inv"] = scale
        else:  # compressed-tensors per channel, with a static input scale
            data, scale = np_channel_fp8(w)
            out[base + ".weight_scale"] = scale
            out[base + ".input_scale"] = np.array([0.02], np.float32)
        out[name] = data
        want[name] = dequant(data, scale)
    cfg_json = CFG.to_hf()
    cfg_json["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg_json, f)
    # scales stored before their weights in one shard, after them in the other
    names = sorted(out)
    checkpoint.write_safetensors(os.path.join(path, "a.safetensors"), {n: out[n] for n in names[::2]})
    checkpoint.write_safetensors(os.path.join(path, "b.safetensors"), {n: out[n] for n in names[1::2]})
    model, params = checkpoint.load(path, progress=False)
    assert model.recipe.name == ("block128" if layout == "block" else "rowwise")
    for name, w in want.items():
        q = leaf(params, name)
        np.testing.assert_array_equal(np.asarray(q.dequantize(jnp.float32)), w, err_msg=name)
    # the same weights dequantized to a BF16 model (recipe keeps nothing in FP8)
    p16 = checkpoint.params_from_hf(CFG, checkpoint.iter_checkpoint(path), keep_fp8=False, dtype=jnp.float32)
    name = "model.layers.0.mlp.up_proj.weight"
    np.testing.assert_array_equal(np.asarray(leaf(p16, name)).T, want[name])


def test_save_load_roundtrip_and_atomic(tmp_path, hf_dir, monkeypatch):
    path, _ = hf_dir
    model, params = checkpoint.load(path, quantize="block128", progress=False)
    out = str(tmp_path / "fp8")
    checkpoint.save(out, model, params, tokenizer_from=path)
    assert sorted(os.listdir(out)) == ["config.json", checkpoint.QUANT_FILE, "model.safetensors", "tokenizer.json"]
    model2, params2 = checkpoint.load(out, progress=False)
    assert model2 == model
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params2)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    with pytest.raises(ValueError, match="exists"):
        checkpoint.save(out, model, params)
    # a save interrupted while writing leaves neither the target nor a temp dir behind
    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(checkpoint, "write_safetensors", boom)
    target = str(tmp_path / "interrupted")
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(target, model, params)
    assert not os.path.exists(target)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".jfp8-save")]
    # overwrite keeps the old model intact until the new one is complete
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(out, model, params, overwrite=True)
    assert checkpoint.load(out, progress=False)[0] == model


def test_errors_name_the_tensor(hf_dir):
    _, tensors = hf_dir
    t = dict(tensors)
    del t["model.layers.0.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match="model.layers.0.mlp.up_proj.weight.*missing"):
        checkpoint.params_from_hf(CFG, t)
    t = dict(tensors, **{"model.layers.1.mlp.up_proj.weight": tensors["model.layers.0.mlp.up_proj.weight"]})
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight.*unexpected"):
        checkpoint.params_from_hf(CFG, t)
    t = dict(tensors)
    t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((192, 192), np.float32)
    with pytest.raises(ValueError, match=r"k_proj.weight.*expected shape \(64, 192\)"):
        checkpoint.params_from_hf(CFG, t)
    t = dict(tensors)
    t["model.layers.0.self_attn.q_proj.weight"] = np_block_fp8(t["model.layers.0.self_attn.q_proj.weight"])[0]
    with pytest.raises(ValueError, match="q_proj.weight.*without"):
        checkpoint.params_from_hf(CFG, t)
    t = dict(tensors)
    t["model.norm.weight"] = np.ones(192, np.int32)
    with pytest.raises(ValueError, match="model.norm.weight.*int32"):
        checkpoint.params_from_hf(CFG, t)
    with pytest.raises(ValueError, match="model_type"):
        LlamaConfig.from_hf({**CFG.to_hf(), "model_type": "falcon"})


def test_cli_quantize_then_generate(tmp_path, hf_dir, capsys):
    from models import generate
    path, _ = hf_dir
    out = str(tmp_path / "q")
    assert checkpoint.cli([path, out, "--recipe", "block128"]) == 0
    assert os.path.exists(os.path.join(out, checkpoint.QUANT_FILE))
    assert checkpoint.cli([str(tmp_path / "nope"), out]) == 1
    assert "checkpoint directory" in capsys.readouterr().err
    assert generate.cli([out, "--prompt", "w5 w6 w7", "--max-new-tokens", "5", "--kv-dtype", "fp8"]) == 0
    err = capsys.readouterr().err
    assert "tokens/s" in err and "block128" in err


def test_cli_quantize_keeps_fallback_units_in_bf16(tmp_path, hf_dir):
    """`jfp8 quantize --keep REGEX` writes the matching kernels in high precision: the patterns
    `models.calibration.fallback_patterns` gives for a chosen fallback (q/k/v as one fused unit,
    a down_proj); the saved model still fuses (`jfp8 generate` runs it fused)."""
    import jfp8
    from models import calibration, llama
    path, _ = hf_dir
    out = str(tmp_path / "q")
    keep = calibration.fallback_patterns(["layers_0/self_attn/qkv_proj", "layers_0/mlp/down_proj"])
    assert checkpoint.cli([path, out, "--recipe", "block128"] + [a for k in keep for a in ("--keep", k)]) == 0
    model, params = checkpoint.load(out)
    kernels = {"/".join(str(getattr(k, "key", k)) for k in kp): v for kp, v in
               jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, jfp8.QArray))[0]
               if str(getattr(kp[-1], "key", "")) == "kernel" and str(kp[0].key).startswith("layers_")}
    bf16 = {k for k, v in kernels.items() if not isinstance(v, jfp8.QArray)}
    assert bf16 == {"layers_0/self_attn/q_proj/kernel", "layers_0/self_attn/k_proj/kernel",
                    "layers_0/self_attn/v_proj/kernel", "layers_0/mlp/down_proj/kernel"}
    _, fused = llama.fuse(model, params)
    assert not isinstance(fused["layers_0"]["self_attn"]["qkv_proj"]["kernel"], jfp8.QArray)
    assert isinstance(fused["layers_0"]["mlp"]["gate_up_proj"]["kernel"], jfp8.QArray)
    assert isinstance(fused["layers_0"]["self_attn"]["o_proj"]["kernel"], jfp8.QArray)


def test_cli_quantize_with_the_head(tmp_path, hf_dir, capsys):
    """`--recipe NAME+head` quantizes the lm_head too; the name is saved and read back, the head
    stays FP8 through save and load, and `jfp8 generate` runs the saved model."""
    import json

    import jfp8
    from models import generate
    path, _ = hf_dir
    out = str(tmp_path / "qh")
    assert checkpoint.cli([path, out, "--recipe", "weights_only_block128+head"]) == 0
    with open(os.path.join(out, checkpoint.QUANT_FILE)) as f:
        assert json.load(f)["recipe"] == "weights_only_block128+head"
    model, params = checkpoint.load(out, progress=False)
    assert model.recipe.name == "weights_only_block128+head"
    assert isinstance(params["lm_head"]["kernel"], jfp8.QArray)  # CFG is untied: its own head
    assert not isinstance(params["embed_tokens"]["embedding"], jfp8.QArray)
    assert generate.cli([out, "--prompt", "w5 w6 w7", "--max-new-tokens", "3", "--kv-dtype", "bf16"]) == 0
    assert "weights_only_block128+head" in capsys.readouterr().err
