"""models.gguf on GGUF files the tests write with the `gguf` package."""
import os

import numpy as np
import pytest

from models import gguf as G

# A dependency of the package (pyproject.toml), so CI always has it; the GPU machine's image, which
# has no network to install it, skips this module instead of failing collection.
gg = pytest.importorskip("gguf")
QT = gg.GGMLQuantizationType

CFG = dict(d=64, heads=4, kv_heads=2, ffn=96, layers=2)


def _byte_chars():
    """GPT-2's byte -> printable unicode table (what byte-level BPE vocabularies are written in)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b), cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


MERGES = ["t h", "th e", "Ġ the", "1 2"]


def _vocab():
    tokens = ["<|end|>"] + _byte_chars() + ["th", "the", "Ġthe", "12"]
    types = [3] + [1] * (len(tokens) - 1)  # 3 = control token
    return tokens, types


def _hf_tensors(rng, vocab):
    d, H, Hkv, F = CFG["d"], CFG["heads"], CFG["kv_heads"], CFG["ffn"]
    D = d // H
    out = {"model.embed_tokens.weight": rng.normal(size=(vocab, d)),
           "model.norm.weight": rng.uniform(0.5, 1.5, d),
           "lm_head.weight": rng.normal(size=(vocab, d))}
    for i in range(CFG["layers"]):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": rng.uniform(0.5, 1.5, d),
                    p + "post_attention_layernorm.weight": rng.uniform(0.5, 1.5, d),
                    p + "self_attn.q_proj.weight": rng.normal(size=(H * D, d)),
                    p + "self_attn.k_proj.weight": rng.normal(size=(Hkv * D, d)),
                    p + "self_attn.v_proj.weight": rng.normal(size=(Hkv * D, d)),
                    p + "self_attn.o_proj.weight": rng.normal(size=(d, H * D)),
                    p + "mlp.gate_proj.weight": rng.normal(size=(F, d)),
                    p + "mlp.up_proj.weight": rng.normal(size=(F, d)),
                    p + "mlp.down_proj.weight": rng.normal(size=(d, F))})
    return {k: (0.1 * v).astype(np.float32) for k, v in out.items()}


def _llama_cpp_permute(w, n_head):
    """convert_hf_to_gguf.py's LlamaModel.permute, written out independently."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny(path, rng, *, arch="llama", pre="smollm", tok_model="gpt2", extra=None,
               skip=(), raw=None, dtype=np.float32):
    """A tiny llama GGUF with F32 tensors from HF-layout weights; returns the HF tensors."""
    tokens, types = _vocab()
    hf = _hf_tensors(rng, len(tokens))
    w = gg.GGUFWriter(str(path), arch)
    w.add_block_count(CFG["layers"]), w.add_context_length(256)
    w.add_embedding_length(CFG["d"]), w.add_feed_forward_length(CFG["ffn"])
    w.add_head_count(CFG["heads"]), w.add_head_count_kv(CFG["kv_heads"])
    w.add_rope_freq_base(10000.0), w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model(tok_model), w.add_tokenizer_pre(pre)
    w.add_token_list(tokens), w.add_token_types(types), w.add_token_merges(MERGES)
    w.add_bos_token_id(0), w.add_eos_token_id(0), w.add_chat_template("{{ messages }}")
    for k, v in (extra or {}).items():
        w.add_string(k, v)
    names = {v: k for k, v in G._GLOBAL_TENSORS.items()}
    for name, t in hf.items():
        if name.startswith("model.layers."):
            i, rest = name[len("model.layers."):].split(".", 1)
            gname = f"blk.{i}." + {v: k for k, v in G._BLOCK_TENSORS.items()}[rest]
        else:
            gname = names[name]
        if gname in skip:
            continue
        if "attn_q" in gname:
            t = _llama_cpp_permute(t, CFG["heads"])
        elif "attn_k" in gname:
            t = _llama_cpp_permute(t, CFG["kv_heads"])
        if raw and gname in raw:
            w.add_tensor(gname, raw[gname][0], raw_dtype=raw[gname][1])
        else:
            w.add_tensor(gname, t.astype(dtype))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file()
    w.close()
    return hf


def test_config_tensors_and_qk_unpermute(tmp_path):
    rng = np.random.default_rng()
    hf = write_tiny(tmp_path / "m.gguf", rng)
    m = G.read_gguf(tmp_path / "m.gguf")
    c = m.config
    assert (c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"],
            c["intermediate_size"], c["num_hidden_layers"]) == (64, 4, 2, 16, 96, 2)
    assert c["rms_norm_eps"] == 1e-5 and c["rope_theta"] == 10000.0 and not c["tie_word_embeddings"]
    assert c["vocab_size"] == len(_vocab()[0])
    assert (m.bos_token_id, m.eos_token_id, m.chat_template) == (0, 0, "{{ messages }}")
    got = dict(m.tensors())
    assert set(got) == set(hf)
    for name, t in hf.items():  # F32 storage: exact, rows back in HF order
        np.testing.assert_array_equal(got[name], t, err_msg=name)


def test_unpermute_is_inverse_and_not_identity():
    rng = np.random.default_rng()
    w = rng.normal(size=(4 * 16, 8))
    p = G.permute_qk(w, 4)
    assert not np.array_equal(p, w)
    np.testing.assert_array_equal(G.unpermute_qk(p, 4), w)
    np.testing.assert_array_equal(G.permute_qk(w, 4), _llama_cpp_permute(w, 4))
    # Row r = h*D + i*2 + j of the GGUF layout holds HF row h*D + j*D/2 + i.
    D = 16
    for h, i, j in [(0, 0, 1), (2, 3, 0), (3, 7, 1)]:
        np.testing.assert_array_equal(p[h * D + 2 * i + j], w[h * D + j * D // 2 + i])


def _q8_0_bytes(d, q):
    """One Q8_0 row: per 32 values, f16 scale d then int8 q; value = d * q."""
    return np.concatenate([np.frombuffer(np.float16(d).tobytes() + q.astype(np.int8).tobytes(),
                                         np.uint8)])


def _q4_1_bytes(d, m, q):
    """One Q4_1 block of 32: f16 d, f16 m, 16 bytes; value j = d*q_j + m, q_j low nibble of byte j
    for j < 16 and high nibble of byte j-16 otherwise."""
    packed = (q[:16] | (q[16:] << 4)).astype(np.uint8)
    return np.frombuffer(np.float16(d).tobytes() + np.float16(m).tobytes() + packed.tobytes(),
                         np.uint8)


def test_q8_0_and_q4_1_dequantization(tmp_path):
    rng = np.random.default_rng()
    d = CFG["d"]  # 64 = two blocks of 32 per row
    q8 = rng.integers(-127, 128, size=(d, d))
    s8 = rng.uniform(0.001, 0.01, size=(d, 2)).astype(np.float16)
    q8_rows = np.stack([np.concatenate([_q8_0_bytes(s8[r, b], q8[r, 32 * b:32 * b + 32])
                                        for b in range(2)]) for r in range(d)])
    want8 = np.repeat(s8.astype(np.float32), 32, axis=1) * q8
    F = CFG["ffn"]
    q4 = rng.integers(0, 16, size=(F, d))
    s4 = rng.uniform(0.001, 0.01, size=(F, 2)).astype(np.float16)
    m4 = rng.uniform(-0.05, 0.0, size=(F, 2)).astype(np.float16)
    q4_rows = np.stack([np.concatenate([_q4_1_bytes(s4[r, b], m4[r, b], q4[r, 32 * b:32 * b + 32])
                                        for b in range(2)]) for r in range(F)])
    want4 = np.repeat(s4.astype(np.float32), 32, 1) * q4 + np.repeat(m4.astype(np.float32), 32, 1)
    write_tiny(tmp_path / "q.gguf", rng, raw={"blk.0.attn_output.weight": (q8_rows, QT.Q8_0),
                                              "blk.1.ffn_up.weight": (q4_rows, QT.Q4_1)})
    m = G.read_gguf(tmp_path / "q.gguf")
    types = m.tensor_types()
    assert types["model.layers.0.self_attn.o_proj.weight"] == "Q8_0"
    assert types["model.layers.1.mlp.up_proj.weight"] == "Q4_1"
    got = dict(m.tensors())
    # f16 scale times a small integer, summed once: exact in f32 up to one rounding.
    np.testing.assert_allclose(got["model.layers.0.self_attn.o_proj.weight"], want8, rtol=1e-6)
    np.testing.assert_allclose(got["model.layers.1.mlp.up_proj.weight"], want4, rtol=1e-6, atol=1e-7)


def test_tokenizer_smollm_pretokenizer_and_specials(tmp_path):
    write_tiny(tmp_path / "t.gguf", np.random.default_rng())
    tok = G.read_gguf(tmp_path / "t.gguf").tokenizer
    enc = tok.encode("the the 12<|end|>")
    # smollm splits every digit alone (no "12" merge applies), merges "the" / "Ġthe",
    # and matches the control token whole.
    assert enc.tokens == ["the", "Ġthe", "Ġ", "1", "2", "<|end|>"]
    assert enc.ids[-1] == 0
    assert tok.decode(enc.ids, skip_special_tokens=False) == "the the 12<|end|>"
    text = "Größe: 3.5 km — naïve café\n\n  x"
    assert tok.decode(tok.encode(text).ids) == text  # byte-level: lossless on any UTF-8


def test_tokenizer_gpt2_pretokenizer_keeps_digit_runs(tmp_path):
    write_tiny(tmp_path / "t.gguf", np.random.default_rng(), pre="gpt-2")
    tok = G.read_gguf(tmp_path / "t.gguf").tokenizer
    assert tok.encode(" 12").tokens == ["Ġ", "12"]


def test_load_into_decoder(tmp_path):
    jnp = pytest.importorskip("jax.numpy")
    from models import checkpoint, llama
    from models.configs import LlamaConfig
    rng = np.random.default_rng()
    hf = write_tiny(tmp_path / "m.gguf", rng)
    model, params, g = G.load(tmp_path / "m.gguf", None, dtype=jnp.float32)
    want = checkpoint.params_from_hf(LlamaConfig.from_hf(g.config), hf, None, dtype=jnp.float32)
    import jax
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, want)
    logits = llama.forward(model, params, np.array([[1, 2, 3]]))
    assert logits.shape == (1, 3, len(_vocab()[0])) and np.all(np.isfinite(np.asarray(logits)))


def test_not_gguf_and_truncated(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04" + os.urandom(100))
    with pytest.raises(ValueError, match=r"not a GGUF file: expected magic b'GGUF', found b'PK"):
        G.read_gguf(bad)
    write_tiny(tmp_path / "m.gguf", np.random.default_rng())
    data = (tmp_path / "m.gguf").read_bytes()
    for cut in (len(data) // 2, len(data) - 100, 24):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated"):
            G.read_gguf(tmp_path / "cut.gguf")
    with pytest.raises(FileNotFoundError):
        G.read_gguf(tmp_path / "absent.gguf")


def test_unsupported_architecture_and_tensor_type(tmp_path):
    rng = np.random.default_rng()
    write_tiny(tmp_path / "a.gguf", rng, arch="gpt2")
    with pytest.raises(ValueError, match=r"unsupported architecture 'gpt2'; expected one of \['llama'\]"):
        G.read_gguf(tmp_path / "a.gguf")
    q8_1 = np.zeros((CFG["d"], 2 * 40), np.uint8)  # Q8_1 (40 B / 32 values): no numpy dequantizer
    write_tiny(tmp_path / "t.gguf", rng, raw={"blk.0.attn_output.weight": (q8_1, QT.Q8_1)})
    with pytest.raises(ValueError, match="'blk.0.attn_output.weight' has unsupported type Q8_1; expected one of"):
        G.read_gguf(tmp_path / "t.gguf")
    write_tiny(tmp_path / "m.gguf", rng, skip=("blk.1.ffn_down.weight",))
    with pytest.raises(ValueError, match="tensor 'blk.1.ffn_down.weight' missing"):
        G.read_gguf(tmp_path / "m.gguf")


def test_tokenizer_it_cannot_build(tmp_path):
    rng = np.random.default_rng()
    write_tiny(tmp_path / "a.gguf", rng, tok_model="llama")
    with pytest.raises(ValueError, match="tokenizer.ggml.model is 'llama'; only byte-level BPE"):
        G.read_gguf(tmp_path / "a.gguf")
    write_tiny(tmp_path / "b.gguf", rng, pre="mystery-9000")
    with pytest.raises(ValueError, match="tokenizer.ggml.pre is 'mystery-9000'; expected one of"):
        G.read_gguf(tmp_path / "b.gguf")
    m = G.read_gguf(tmp_path / "b.gguf", tokenizer=False)  # the weights still load without it
    assert m.tokenizer is None and m.config["num_hidden_layers"] == 2


def test_hf_name_rejects_foreign_tensors():
    assert G.hf_name("blk.12.ffn_down.weight") == "model.layers.12.mlp.down_proj.weight"
    with pytest.raises(ValueError, match="'blk.0.ssm_conv1d.weight': not a llama tensor"):
        G.hf_name("blk.0.ssm_conv1d.weight")


def test_cli_generate_reads_a_gguf_file(tmp_path, capsys):
    """`jfp8 generate model.gguf` loads config, weights and tokenizer from the file and decodes
    exactly what the Python API decodes (greedy, FP8 weights and KV)."""
    from models import generate, llama
    write_tiny(tmp_path / "m.gguf", np.random.default_rng(5))
    assert generate.cli([str(tmp_path / "m.gguf"), "--prompt", "hello world", "--max-new-tokens", "4",
                         "--recipe", "block128"]) == 0
    captured = capsys.readouterr()
    assert "recipe block128" in captured.err
    model, params, g = G.load(tmp_path / "m.gguf", "block128")
    model, params = llama.fuse(model, params)
    prompt = ([g.bos_token_id] if g.add_bos_token else []) + g.tokenizer.encode("hello world").ids
    [want] = generate.generate(model, params, [prompt], max_new_tokens=4, stop_tokens=[g.eos_token_id])
    assert captured.out.rstrip("\n") == g.tokenizer.decode(want)
