"""Checkpoint IO: HF-layout directories in, jfp8-quantized directories out.

    model, params = checkpoint.load("Llama-3.1-8B/", quantize=jfp8.Recipe.block128())
    checkpoint.save("llama8b-fp8/", model, params)           # atomic: temp dir + rename
    model, params = checkpoint.load("llama8b-fp8/")            # FP8 as saved, no re-quantization
    tok = checkpoint.load_tokenizer("Llama-3.1-8B/")           # tokenizers.Tokenizer

What a directory may hold:
  * config.json (llama / mistral / qwen2) and model.safetensors, or shards listed by
    model.safetensors.index.json (`weight_map`: tensor name -> shard file);
  * BF16 / FP16 / F32 weights: each linear weight is quantized as it is read (tensor by tensor,
    so host memory stays near the FP8 model plus one tensor) when a recipe is given;
  * FP8 weights as published:
      - DeepSeek-V3 / HF "fine-grained FP8": `weight` float8_e4m3fn (N, K) + `weight_scale_inv`
        f32 (ceil(N/128), ceil(K/128)). Despite its name that array multiplies the data
        (x = data * weight_scale_inv), so in our convention it IS the scale;
      - compressed-tensors per-channel FP8: `weight` (N, K) + `weight_scale` (N, 1) (or one per
        tensor), optional static `input_scale` (read and dropped: activations are scaled
        dynamically here);
      - a jfp8 save: `weight` + `weight_scale` with the granularity in jfp8_quant.json.
  * tokenizer.json (read with the `tokenizers` package).

safetensors files go through `jfp8.serialization` (memory-mapped, one tensor at a time, FP8 and
bfloat16 as ml_dtypes arrays), because the `safetensors` numpy API cannot read those dtypes.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile
from typing import Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jfp8.serialization import write_safetensors  # atomic, FP8/bf16-aware
from models.configs import LlamaConfig

QUANT_FILE = "jfp8_quant.json"  # marks a jfp8-quantized save; holds recipe + granularities

# ---------------------------------------------------------------------------------------------
# safetensors (jfp8.serialization reads bfloat16 / float8 lazily through a memory map)
# ---------------------------------------------------------------------------------------------
def iter_safetensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, array) one tensor at a time (file order)."""
    from jfp8.serialization import SafetensorsFile
    f = SafetensorsFile(path)
    for name in f.names():
        try:
            yield name, f.get(name)
        except ValueError as e:
            raise ValueError(f"tensor {name!r}: {e}") from None


def checkpoint_files(path: str) -> list[str]:
    """The safetensors files of a checkpoint dir (from the shard index when there is one)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
        for fn in files:
            if not os.path.exists(os.path.join(path, fn)):
                raise ValueError(f"{index}: shard {fn!r} listed in weight_map is missing")
        return [os.path.join(path, fn) for fn in files]
    files = sorted(fn for fn in os.listdir(path) if fn.endswith(".safetensors"))
    if not files:
        raise ValueError(f"{path}: no *.safetensors files (and no model.safetensors.index.json)")
    return [os.path.join(path, fn) for fn in files]


def iter_checkpoint(path: str) -> Iterator[tuple[str, np.ndarray]]:
    """Every tensor of a checkpoint dir, shard by shard, one at a time."""
    for fn in checkpoint_files(path):
        yield from iter_safetensors(fn)


def read_config(path: str) -> LlamaConfig:
    fn = os.path.join(path, "config.json")
    if not os.path.exists(fn):
        raise ValueError(f"{path}: no config.json")
    with open(fn) as f:
        return LlamaConfig.from_hf(json.load(f))


def load_tokenizer(path: str):
    """tokenizers.Tokenizer from PATH/tokenizer.json."""
    from tokenizers import Tokenizer
    fn = os.path.join(path, "tokenizer.json")
    if not os.path.exists(fn):
        raise ValueError(f"{path}: no tokenizer.json")
    return Tokenizer.from_file(fn)


# ---------------------------------------------------------------------------------------------
# HF names <-> our param tree
# ---------------------------------------------------------------------------------------------
_LINEAR = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.(weight|bias)$")
_NORM_RE = re.compile(r"^model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight$")
_FP8_AUX = ("weight_scale_inv", "weight_scale", "input_scale")
_FP8_DTYPES = (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2))


def expected_tensors(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> HF shape for every tensor the model needs."""
    d, F, D = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    Hq, Hkv = cfg.num_heads, cfg.num_kv_heads
    out = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, d)
    shapes = {"q_proj": (Hq * D, d), "k_proj": (Hkv * D, d), "v_proj": (Hkv * D, d),
              "o_proj": (d, Hq * D), "gate_proj": (F, d), "up_proj": (F, d), "down_proj": (d, F)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (d,)
        out[p + "post_attention_layernorm.weight"] = (d,)
        for proj, (n, k) in shapes.items():
            out[f"{p}{_LINEAR[proj]}.{proj}.weight"] = (n, k)
            has_bias = (cfg.qkv_bias and proj in ("q_proj", "k_proj", "v_proj")) or \
                       (cfg.o_bias and proj == "o_proj") or (cfg.mlp_bias and _LINEAR[proj] == "mlp")
            if has_bias:
                out[f"{p}{_LINEAR[proj]}.{proj}.bias"] = (n,)
    return out


def param_path(name: str) -> tuple[str, ...]:
    """HF tensor name -> path in our params tree (linear weights map to `kernel`)."""
    if name == "model.embed_tokens.weight":
        return ("embed_tokens", "embedding")
    if name == "model.norm.weight":
        return ("norm", "weight")
    if name == "lm_head.weight":
        return ("lm_head", "kernel")
    m = _LAYER_RE.match(name)
    if m:
        i, block, proj, kind = m.groups()
        return (f"layers_{i}", block, proj, "kernel" if kind == "weight" else "bias")
    m = _NORM_RE.match(name)
    if m:
        return (f"layers_{m.group(1)}", m.group(2), "weight")
    raise ValueError(f"tensor {name!r}: not a tensor of a llama/mistral/qwen2 decoder")


def hf_name(path: tuple[str, ...]) -> str:
    """Inverse of `param_path`."""
    if path == ("embed_tokens", "embedding"):
        return "model.embed_tokens.weight"
    if path == ("norm", "weight"):
        return "model.norm.weight"
    if path == ("lm_head", "kernel"):
        return "lm_head.weight"
    layer = path[0].split("_")[1]
    if len(path) == 3:
        return f"model.layers.{layer}.{path[1]}.weight"
    return f"model.layers.{layer}.{path[1]}.{path[2]}." + ("weight" if path[3] == "kernel" else "bias")


def _set(tree: dict, path: tuple[str, ...], value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _granularity_from_scale(name: str, w_shape, s_shape, aux: str, block=(128, 128)):
    """The jfp8 granularity of an FP8 checkpoint tensor from its scale's shape.

    block: the checkpoint's block (config.json quantization_config.weight_block_size, default
    128x128), used when the scale is 2-D with more than one column.
    """
    from jfp8 import PerBlock, PerChannel, PerTensor
    n, k = w_shape
    s_shape = tuple(s_shape)
    if s_shape in ((), (1,), (1, 1)):
        return PerTensor(), (1, 1)
    if s_shape in ((n,), (n, 1)) and aux == "weight_scale":
        return PerChannel(0), (n, 1)
    bn, bk = block
    want = (-(-n // bn), -(-k // bk))
    if s_shape == want:
        return PerBlock((bn, bk)), s_shape
    raise ValueError(f"tensor {name}.{aux}: expected shape {want} ({bn}x{bk} blocks of weight "
                     f"{tuple(w_shape)}), ({n}, 1) per channel, or a scalar; got {s_shape}")


def params_from_hf(cfg: LlamaConfig, tensors, recipe=None, *, dtype=jnp.bfloat16,
                   progress: bool = False, keep_fp8: bool = True, fp8_block=(128, 128)):
    """Turn HF-named tensors into our params tree, streaming tensor by tensor.

    Args:
      cfg: the model config (shapes are checked against it).
      tensors: iterable of (name, array) (or a dict name -> array), HF layout: linear weights
        (N, K) = (out, in). Floating (bf16/f16/f32) or FP8 with a scale tensor beside it.
      recipe: jfp8.Recipe to quantize float linear weights while loading (each becomes a QArray
        (N, K)); None keeps float weights in `dtype` (kernels transposed to flax's (K, N)).
        FP8 tensors of the checkpoint become QArrays as stored (or are re-quantized when the
        recipe asks for another granularity, or the recipe keeps that layer in high precision).
      dtype: dtype of high-precision params (norms, embedding, lm_head, unquantized kernels).
      progress: show a tqdm bar.
      keep_fp8: with recipe None, keep FP8 checkpoint tensors as QArrays (True) or dequantize
        them to `dtype` kernels (False: a BF16 model from an FP8 checkpoint).
      fp8_block: block shape of block-scaled FP8 checkpoints (`weight_block_size`).
    Returns: the params tree (a nested dict; QArray leaves for quantized kernels). A tied model
      gets an FP8 `lm_head` where the recipe quantizes the head (`llama.quantize_tied_head`) or
      the checkpoint stores one as FP8 (a jfp8 save of such a model).
    Raises ValueError naming the tensor for missing, unexpected or mis-shaped tensors and
    unsupported dtypes.
    """
    return _params_from_hf(cfg, tensors, recipe, dtype=dtype, progress=progress, keep_fp8=keep_fp8,
                           fp8_block=fp8_block)[0]


def _params_from_hf(cfg, tensors, recipe, *, dtype, progress, keep_fp8, fp8_block=(128, 128)):
    """params_from_hf, also returning {granularity repr: count} of the FP8 tensors found."""
    import jfp8
    from models import llama
    expected = expected_tensors(cfg)
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    if progress:
        from tqdm import tqdm
        items = tqdm(items, total=len(expected), desc="loading", unit="tensor", leave=False)
    params: dict = {}
    seen: set[str] = set()
    pending: dict[str, dict[str, np.ndarray]] = {}  # FP8 weight waiting for its scale (or v.v.)
    found_fp8: dict[str, int] = {}

    def put_linear(name: str, w: np.ndarray, scale: np.ndarray | None, aux: str | None):
        path = param_path(name)
        gran = None if recipe is None else recipe.weight_granularity_for("/".join(path))
        if scale is not None:  # an FP8 checkpoint tensor
            ck_gran, s_shape = _granularity_from_scale(name, w.shape, scale.shape, aux, fp8_block)
            if w.dtype not in _FP8_DTYPES:
                raise ValueError(f"tensor {name}: has a {aux} so expected float8_e4m3fn/e5m2, got {w.dtype}")
            q = jfp8.from_parts(jnp.asarray(w), jnp.asarray(np.asarray(scale, np.float32).reshape(s_shape)),
                                granularity=ck_gran)
            found_fp8[repr(ck_gran)] = found_fp8.get(repr(ck_gran), 0) + 1
            if gran is None and (recipe is not None or not keep_fp8):
                value = q.dequantize(jnp.float32).astype(dtype).T
            elif gran is not None and repr(gran) != repr(ck_gran):
                value = jfp8.quantize(q.dequantize(jnp.float32), recipe.weight_format, gran)
            else:
                value = q
        else:
            if w.dtype.kind != "f" and w.dtype != np.dtype(ml_dtypes.bfloat16):
                raise ValueError(f"tensor {name}: expected a floating dtype, got {w.dtype}")
            if w.dtype in _FP8_DTYPES:
                raise ValueError(f"tensor {name}: FP8 weight without a weight_scale_inv / weight_scale "
                                 f"tensor beside it")
            if gran is None:
                value = jnp.asarray(w).astype(dtype).T
            else:
                value = jfp8.quantize(jnp.asarray(w), recipe.weight_format, gran)
        _set(params, path, value)

    def put_fp8_weight(name: str, w: np.ndarray):
        """An FP8 weight tensor: put once its scale tensor has been seen too (either order)."""
        entry = pending.setdefault(name, {})
        entry["weight"] = w
        if "scale" in entry:
            put_linear(name, w, entry["scale"], entry["aux"])
            del pending[name]

    for name, arr in items:
        arr = np.asarray(arr)
        base, _, leaf = name.rpartition(".")
        if leaf in _FP8_AUX:
            wname = base + ".weight"
            if wname not in expected and not (wname == "lm_head.weight" and cfg.tie_word_embeddings):
                raise ValueError(f"tensor {name!r}: scale of {wname!r}, which the model does not have")
            if leaf == "input_scale":
                seen.add(name)
                continue  # static activation scale: dropped, activations are scaled per call
            entry = pending.setdefault(wname, {})
            entry["scale"], entry["aux"] = arr, leaf
            seen.add(name)
            if "weight" in entry:
                put_linear(wname, entry["weight"], arr, leaf)
                del pending[wname]
            continue
        if name not in expected:
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                if arr.dtype in _FP8_DTYPES:
                    # a tied model's FP8 head saved by jfp8 (`llama.quantize_tied_head`): kept
                    put_fp8_weight(name, arr)
                continue  # some tied checkpoints store a float copy too: the embedding serves
            if name.endswith("rotary_emb.inv_freq"):
                continue  # old HF Llama saves; recomputed from the config
            raise ValueError(f"tensor {name!r}: unexpected for {cfg.model_type} with {cfg.num_layers} "
                             f"layers (tied={cfg.tie_word_embeddings}, qkv_bias={cfg.qkv_bias})")
        if tuple(arr.shape) != expected[name]:
            raise ValueError(f"tensor {name!r}: expected shape {expected[name]}, got {tuple(arr.shape)}")
        if name in seen:
            raise ValueError(f"tensor {name!r}: appears twice")
        seen.add(name)
        path = param_path(name)
        is_linear = path[-1] == "kernel"  # lm_head too: the recipe decides (BF16 by default)
        if is_linear:
            if arr.dtype in _FP8_DTYPES:
                put_fp8_weight(name, arr)
            else:
                put_linear(name, arr, None, None)
        else:
            if arr.dtype.kind != "f" and arr.dtype != np.dtype(ml_dtypes.bfloat16) or \
                    arr.dtype in _FP8_DTYPES:
                raise ValueError(f"tensor {name!r}: expected bf16/f16/f32, got {arr.dtype}")
            value = jnp.asarray(arr).astype(dtype)
            _set(params, path, value.T if path[-1] == "kernel" else value)
    for wname, entry in pending.items():
        if "weight" in entry:
            raise ValueError(f"tensor {wname!r}: FP8 weight without its weight_scale_inv / weight_scale")
        raise ValueError(f"tensor {wname!r}: missing (only its {entry['aux']} was found)")
    missing = [n for n in expected if n not in seen]
    if missing:
        raise ValueError(f"tensor {missing[0]!r}: missing from the checkpoint (expected shape "
                         f"{expected[missing[0]]}; {len(missing)} missing in all)")
    if cfg.tie_word_embeddings and "lm_head" in params and not llama.has_quantized_head(params):
        del params["lm_head"]  # a stored FP8 head the recipe keeps in BF16: the embedding serves
    return llama.quantize_tied_head(params, recipe), found_fp8


def _recipe_for(found_fp8: dict[str, int]):
    """The recipe matching an FP8 checkpoint's weight granularity (block -> block128, channel -> rowwise)."""
    import jfp8
    if not found_fp8:
        return None
    kinds = set(found_fp8)
    if len(kinds) > 1:
        raise ValueError(f"checkpoint mixes FP8 weight granularities {sorted(kinds)}; expected one")
    kind = kinds.pop()
    if kind.startswith("PerBlock"):
        return jfp8.Recipe.block128()
    if kind.startswith("PerChannel"):
        return jfp8.Recipe.rowwise()
    return jfp8.Recipe.per_tensor()


def _as_recipe(quantize):
    if quantize is None:
        return None
    import jfp8
    if isinstance(quantize, str):
        return jfp8.Recipe.from_name(quantize)
    if not isinstance(quantize, jfp8.Recipe):
        raise TypeError(f"quantize: expected a jfp8.Recipe, a preset name or None, got {type(quantize).__name__}")
    return quantize


def load(path: str, quantize=None, *, dtype=jnp.bfloat16, progress: bool = True):
    """Load a checkpoint directory -> (model, params).

    quantize: jfp8.Recipe or preset name ("block128", "rowwise", ...) to quantize float weights
      while loading; None keeps the checkpoint as stored: float weights stay `dtype` (a BF16
      model) and FP8 checkpoints stay FP8 (the model gets the matching recipe).
    """
    from models.llama import Llama
    import jfp8
    if not os.path.isdir(path):
        raise ValueError(f"path: expected a checkpoint directory, got {path!r}")
    cfg = read_config(path)
    recipe = _as_recipe(quantize)
    saved_recipe = None
    qfile = os.path.join(path, QUANT_FILE)
    if os.path.exists(qfile):
        with open(qfile) as f:
            saved_recipe = jfp8.Recipe.from_name(json.load(f)["recipe"])
    with open(os.path.join(path, "config.json")) as f:
        qcfg = json.load(f).get("quantization_config") or {}
    block = tuple(qcfg.get("weight_block_size") or (128, 128))
    params, found = _params_from_hf(cfg, iter_checkpoint(path), recipe, dtype=dtype, progress=progress,
                                    keep_fp8=True, fp8_block=block)
    model_recipe = recipe or saved_recipe or _recipe_for(found)
    return Llama(cfg, recipe=model_recipe, dtype=dtype), params


def save(path: str, model, params, *, tokenizer_from: str | None = None, overwrite: bool = False):
    """Write `params` as an HF-layout dir (config.json, model.safetensors, jfp8_quant.json).

    QArray kernels are written as `weight` (FP8, (N, K)) + `weight_scale` (f32, x = data * scale);
    float kernels as (N, K) in their dtype. The directory is built under a temporary name beside
    `path` and renamed into place at the end, so an interrupted save leaves no loadable model.
    tokenizer_from: a dir whose tokenizer*.json / special_tokens_map.json are copied along.
    """
    import jfp8
    if getattr(model, "fused", False):
        raise ValueError("model: save the unfused model (HF names keep q/k/v and gate/up apart); "
                         "`llama.fuse` after loading instead")
    if os.path.exists(path) and not overwrite:
        raise ValueError(f"path: {path!r} exists; pass overwrite=True to replace it")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".jfp8-save-", dir=parent)
    try:
        tensors: dict[str, np.ndarray] = {}
        flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, jfp8.QArray))[0]
        granularities = {}
        for kp, leaf in flat:
            keys = tuple(k.key for k in kp)
            name = hf_name(keys)
            if isinstance(leaf, jfp8.QArray):
                tensors[name] = np.asarray(leaf.data)
                tensors[name[:-len("weight")] + "weight_scale"] = np.asarray(leaf.scale, np.float32)
                granularities[name] = repr(leaf.granularity)
            else:
                a = np.asarray(leaf)
                tensors[name] = a.T if keys[-1] == "kernel" else a
        write_safetensors(os.path.join(tmp, "model.safetensors"), tensors, {"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(model.cfg.to_hf(), f, indent=1)
        if model.recipe is not None:
            with open(os.path.join(tmp, QUANT_FILE), "w") as f:
                json.dump({"recipe": model.recipe.name, "scale_convention": "x = weight * weight_scale",
                           "granularities": granularities}, f, indent=1)
        if tokenizer_from:
            for fn in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                       "generation_config.json"):
                src = os.path.join(tokenizer_from, fn)
                if os.path.exists(src):
                    shutil.copy(src, os.path.join(tmp, fn))
        if os.path.exists(path):
            old = path.rstrip("/") + ".old-" + os.path.basename(tmp)
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def cli(argv: list[str]) -> int:
    """`jfp8 quantize IN_DIR OUT_DIR --recipe block128`: quantize an HF checkpoint once, save it."""
    ap = argparse.ArgumentParser(prog="jfp8 quantize", description=cli.__doc__)
    ap.add_argument("in_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--recipe", default="block128",
                    help="block128 | rowwise | per_tensor | weights_only | weights_only_block128; "
                         "NAME+head quantizes the lm_head too (tied: an FP8 copy of the embedding)")
    ap.add_argument("--keep", action="append", default=[], metavar="REGEX",
                    help="keep matching parameter paths in BF16 (repeatable), e.g. a layer that "
                         "`jfp8 eval` / models.calibration found sensitive: --keep '^layers_29/'")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    try:
        recipe = _as_recipe(args.recipe)
        if args.keep:  # per-path fallback: overrides to None keep those kernels high precision
            recipe = dataclasses.replace(recipe, overrides=tuple((k, None) for k in args.keep)
                                         + tuple(recipe.overrides))
        model, params = load(args.in_dir, quantize=recipe)
        save(args.out_dir, model, params, tokenizer_from=args.in_dir, overwrite=args.overwrite)
    except (ValueError, TypeError) as e:
        print(f"jfp8 quantize: {e}", file=sys.stderr)
        return 1
    from models.llama import param_bytes
    print(f"wrote {args.out_dir}: recipe {args.recipe}, {param_bytes(params) / 2**20:.1f} MiB of weights")
    return 0
