"""llama.cpp GGUF files -> our config, HF-named weights and a `tokenizers.Tokenizer`.

Reads a `llama`-architecture GGUF through the `gguf` package (which dequantizes every llama.cpp
tensor type it knows in numpy: F32/F16/BF16, Q4_0/Q4_1/Q5_x/Q8_0, k-quants, ...) and yields the
weights under their Hugging Face names, (out, in) float32, one tensor at a time, so the loader can
quantize each tensor to the recipe as it arrives and the dequantized model never sits on host whole.

Two things differ from an HF checkpoint and are undone here:
- llama.cpp's converter permutes the rows of `q_proj` and `k_proj` so that its interleaved
  ("GPT-J") RoPE computes what HF's half-split ("NeoX") RoPE computes; we use the HF form, so
  each head's rows are put back: GGUF row (h, i, j) of shape (H, D/2, 2) -> HF row (h, j, i).
- GGUF stores dims innermost-first (`ne0` = in-features); the `gguf` reader already returns the
  row-major (out, in) view.

    model = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    model.config                     # HF config.json-style dict
    for name, w in model.tensors():  # ("model.layers.0.self_attn.q_proj.weight", (576, 576) f32)
        ...
    ids = model.tokenizer.encode("The capital of France is").ids
    cfg, params = load(path, recipe=jfp8.Recipe.block128())  # through models.checkpoint
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator

import numpy as np

GGUF_MAGIC = b"GGUF"
SUPPORTED_ARCHITECTURES = ("llama",)

# llama.cpp `tokenizer.ggml.pre` -> how the text is split before byte-level BPE.
# "digits+bytelevel": each digit its own piece, then GPT-2's byte-level regex (llama.cpp's
# STARCODER/SMOLLM/... group: regexes "\p{N}" then the GPT-2 pattern).
# "bytelevel": GPT-2's pattern only. "split:<regex>": one regex, then byte-level without regex.
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    "smollm": "digits+bytelevel", "starcoder": "digits+bytelevel", "refact": "digits+bytelevel",
    "command-r": "digits+bytelevel", "codeshell": "digits+bytelevel",
    "exaone": "digits+bytelevel", "minerva-7b": "digits+bytelevel",
    "gpt-2": "bytelevel", "gpt2": "bytelevel", "mpt": "bytelevel", "olmo": "bytelevel",
    "jais": "bytelevel",
    "llama-bpe": "split:" + _LLAMA3_REGEX, "llama3": "split:" + _LLAMA3_REGEX,
    "qwen2": "split:" + _QWEN2_REGEX,
}

# llama.cpp token types (llama_token_type): 3 = control, 4 = user-defined. Both are matched
# whole in the input text before BPE, like HF's added special tokens.
_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED = 3, 4

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def hf_name(gguf_name: str) -> str:
    """GGUF tensor name -> HF Llama name (`blk.3.attn_q.weight` -> `model.layers.3.self_attn...`)."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_TENSORS:
        return f"model.layers.{parts[1]}.{_BLOCK_TENSORS[parts[2]]}"
    raise ValueError(f"GGUF tensor {gguf_name!r}: not a llama tensor; expected one of "
                     f"{sorted(_GLOBAL_TENSORS)} or blk.N.{{{', '.join(sorted(_BLOCK_TENSORS))}}}")


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: w (H*D, K) in GGUF order -> HF order.

    The converter maps HF rows (h, j, i) with shape (H, 2, D/2) to (h, i, j) of shape (H, D/2, 2),
    i.e. it interleaves the two RoPE halves of each head; this is its inverse. Also works on a
    bias (H*D,).
    """
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"unpermute_qk: expected rows divisible by 2*n_heads={2 * n_heads}, "
                         f"got shape {w.shape}")
    half = rows // n_heads // 2
    return (w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's permutation (HF -> GGUF order); the inverse of `unpermute_qk`."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclasses.dataclass(frozen=True)
class GGUFModel:
    """A GGUF file opened for loading (tensors are memory-mapped, read one at a time).

    Attributes:
      path: the file.
      config: HF `config.json`-style dict (LlamaForCausalLM keys).
      tokenizer: `tokenizers.Tokenizer` built from the metadata (None if `tokenizer=False`).
      bos_token_id, eos_token_id: from the metadata (None if absent).
      add_bos_token: whether llama.cpp prepends BOS when encoding.
      chat_template: Jinja template string, or None.
      metadata: every scalar/string metadata field (arrays left out).
    """
    path: str
    config: dict
    tokenizer: Any
    bos_token_id: int | None
    eos_token_id: int | None
    add_bos_token: bool
    chat_template: str | None
    metadata: dict
    _reader: Any = dataclasses.field(repr=False, compare=False)

    def tensor_types(self) -> dict[str, str]:
        """HF name -> llama.cpp storage type name (e.g. 'Q4_1')."""
        return {hf_name(t.name): t.tensor_type.name for t in self._reader.tensors}

    def tensors(self, dtype=np.float32) -> Iterator[tuple[str, np.ndarray]]:
        """Yield (HF name, array) with linear weights as (out, in), dequantized, Q/K un-permuted.

        `lm_head.weight` is yielded only if the file has `output.weight` (untied embeddings).
        """
        from gguf import quants

        cfg = self.config
        for t in self._reader.tensors:
            name = hf_name(t.name)
            try:
                w = quants.dequantize(np.asarray(t.data), t.tensor_type)
            except NotImplementedError as e:
                raise ValueError(f"{self.path}: tensor {t.name!r} has type {t.tensor_type.name}, "
                                 f"which cannot be dequantized ({e}); expected one of "
                                 f"{supported_tensor_types()}") from None
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            w = np.asarray(w, dtype=np.float32).reshape(shape)
            if name.endswith("q_proj.weight") or name.endswith("q_proj.bias"):
                w = unpermute_qk(w, cfg["num_attention_heads"])
            elif name.endswith("k_proj.weight") or name.endswith("k_proj.bias"):
                w = unpermute_qk(w, cfg["num_key_value_heads"])
            yield name, w.astype(dtype, copy=False)


def supported_tensor_types() -> list[str]:
    """llama.cpp tensor types this loader can turn into float weights."""
    from gguf import quants
    from gguf.constants import GGMLQuantizationType as T

    floats = [T.F32, T.F16]
    return [t.name for t in floats] + sorted(t.name for t in quants._type_traits)


def _open_reader(path: str):
    import gguf

    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(f"{path}: not a GGUF file: expected magic {GGUF_MAGIC!r}, found {magic!r}")
    size = os.path.getsize(path)
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader fails with numpy reshape / index / enum errors
        raise ValueError(f"{path}: truncated or corrupt GGUF file ({size} bytes): "
                         f"{type(e).__name__}: {e}") from None
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size or t.data.nbytes != t.n_bytes:
            raise ValueError(f"{path}: truncated GGUF file: tensor {t.name!r} needs bytes up to "
                             f"{end}, file has {size}")
    return reader


def _metadata(reader) -> tuple[dict, dict]:
    """(scalar fields, array fields) of the GGUF metadata."""
    from gguf.constants import GGUFValueType

    scalars, arrays = {}, {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if field.types and field.types[0] == GGUFValueType.ARRAY:
            arrays[key] = field
        else:
            value = field.contents()
            scalars[key] = value.item() if isinstance(value, np.generic) else value
    return scalars, arrays


def _config(meta: dict, arrays: dict, tensor_names: set[str], path: str) -> dict:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{path}: unsupported architecture {arch!r}; expected one of "
                         f"{list(SUPPORTED_ARCHITECTURES)}")

    def need(key):
        full = f"{arch}.{key}"
        if full not in meta:
            raise ValueError(f"{path}: metadata field {full!r} missing (needed for the config)")
        return meta[full]

    if "rope_freqs.weight" in tensor_names:
        raise ValueError(f"{path}: tensor 'rope_freqs.weight' (Llama-3.1 RoPE frequency factors) "
                         f"is not supported; expected plain RoPE (rope.freq_base only)")
    if meta.get(f"{arch}.rope.scaling.type", "none") not in ("none",):
        raise ValueError(f"{path}: rope scaling {meta[f'{arch}.rope.scaling.type']!r} is not "
                         f"supported; expected 'none'")
    d_model, n_heads = int(need("embedding_length")), int(need("attention.head_count"))
    n_kv = int(meta.get(f"{arch}.attention.head_count_kv", n_heads))
    head_dim = int(meta.get(f"{arch}.attention.key_length", d_model // n_heads))
    rope_dim = int(meta.get(f"{arch}.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(f"{path}: partial RoPE (rope.dimension_count={rope_dim}) is not "
                         f"supported; expected head_dim={head_dim}")
    vocab = meta.get(f"{arch}.vocab_size")
    if vocab is None:
        vocab = len(arrays["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in arrays else None
    if vocab is None:
        raise ValueError(f"{path}: vocab size unknown: neither {arch}.vocab_size nor "
                         f"tokenizer.ggml.tokens present")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": d_model,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        # stored as f32: 1e-5 reads back as 9.9999997e-06; 7 significant digits recover it
        "rms_norm_eps": float(f"{meta.get(f'{arch}.attention.layer_norm_rms_epsilon', 1e-5):.7g}"),
        "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "max_position_embeddings": int(meta.get(f"{arch}.context_length", 2048)),
        "vocab_size": int(vocab),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "mlp_bias": False,
        "hidden_act": "silu",
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }


def build_tokenizer(meta: dict, arrays: dict, path: str = "<gguf>"):
    """A `tokenizers.Tokenizer` for a byte-level BPE ("gpt2") vocabulary in GGUF metadata."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{path}: tokenizer.ggml.model is {kind!r}; only byte-level BPE "
                         f"('gpt2') vocabularies are supported (SentencePiece 'llama' is not)")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"{path}: tokenizer.ggml.pre is {pre!r}; expected one of "
                         f"{sorted(PRE_TOKENIZERS)}")
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        if key not in arrays:
            raise ValueError(f"{path}: metadata array {key!r} missing; cannot build the tokenizer")
    tokens = arrays["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ", 1)) for m in arrays["tokenizer.ggml.merges"].contents()]
    bad = [m for m in merges if len(m) != 2]
    if bad:
        raise ValueError(f"{path}: tokenizer merge {' '.join(bad[0])!r} is not 'left right'")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    how = PRE_TOKENIZERS[pre]
    if how == "digits+bytelevel":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    elif how == "bytelevel":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(how[len("split:"):]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    if "tokenizer.ggml.token_type" in arrays:
        types = np.asarray(arrays["tokenizer.ggml.token_type"].contents())
        special = [AddedToken(tokens[i], special=True, normalized=False)
                   for i in np.flatnonzero(types == _TOKEN_TYPE_CONTROL)]
        user = [AddedToken(tokens[i], special=False, normalized=False)
                for i in np.flatnonzero(types == _TOKEN_TYPE_USER_DEFINED)]
        if special:
            tok.add_special_tokens(special)
        if user:
            tok.add_tokens(user)
    return tok


def read_gguf(path: str | os.PathLike, *, tokenizer: bool = True) -> GGUFModel:
    """Open a llama-architecture GGUF file: config, tokenizer, special ids; tensors lazily."""
    path = os.fspath(path)
    reader = _open_reader(path)
    meta, arrays = _metadata(reader)
    names = {t.name for t in reader.tensors}
    config = _config(meta, arrays, names, path)
    for t in reader.tensors:  # fail on a foreign tensor or an undecodable type before loading
        hf_name(t.name)
        if t.tensor_type.name not in supported_tensor_types():
            raise ValueError(f"{path}: tensor {t.name!r} has unsupported type "
                             f"{t.tensor_type.name}; expected one of {supported_tensor_types()}")
    n_layers = config["num_hidden_layers"]
    for want in ["token_embd.weight", "output_norm.weight"] + [
            f"blk.{i}.{k}" for i in range(n_layers) for k in _BLOCK_TENSORS
            if not k.endswith(".bias")]:
        if want not in names:
            raise ValueError(f"{path}: tensor {want!r} missing (llama with {n_layers} layers)")
    tok = build_tokenizer(meta, arrays, path) if tokenizer else None
    return GGUFModel(
        path=path, config=config, tokenizer=tok,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        chat_template=meta.get("tokenizer.chat_template"),
        metadata=meta, _reader=reader)


def is_gguf(path: str | os.PathLike) -> bool:
    """True if `path` is a file starting with the GGUF magic."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def load(path: str | os.PathLike, quantize=None, *, dtype=None, progress: bool = False):
    """Load a GGUF model -> (model, params, gguf_model), quantizing tensor by tensor.

    quantize: a jfp8.Recipe (or preset name) for the linear weights, or None for a high-precision
      model (the GGUF's weights dequantized). dtype: activation / high-precision param dtype
      (default bfloat16).
    The returned `gguf_model` carries the tokenizer, BOS/EOS ids and chat template.
    """
    import jax.numpy as jnp

    import jfp8
    from models import checkpoint
    from models.configs import LlamaConfig
    from models.llama import Llama

    dtype = jnp.bfloat16 if dtype is None else dtype
    if isinstance(quantize, str):
        quantize = jfp8.Recipe.from_name(quantize)
    g = read_gguf(path)
    cfg = LlamaConfig.from_hf(g.config)
    params = checkpoint.params_from_hf(cfg, g.tensors(), quantize, dtype=dtype, progress=progress)
    return Llama(cfg, recipe=quantize, dtype=dtype, param_dtype=dtype), params, g
