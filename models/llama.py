"""Llama-family decoder (Llama 2/3, Mistral, Qwen2) in Flax linen, BF16 or FP8 by recipe.

    from models import llama
    cfg = llama.CONFIGS["llama3.1-8b"]
    model = llama.Llama(cfg, recipe=jfp8.Recipe.block128())   # recipe=None: plain BF16
    params = llama.init_params(model, jax.random.PRNGKey(0))  # or llama.load(dir)
    logits = llama.forward(model, params, tokens)              # (B, T, V) f32, full sequence

Architecture: token embedding -> L x [RMSNorm -> GQA attention with RoPE (Llama-3 frequency
scaling, `rope_theta`) -> residual -> RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> lm_head
(tied to the embedding or not). Qwen2 adds q/k/v biases.

One code path serves BF16 and FP8: a linear layer whose kernel is a `jfp8.QArray` (N, K) (made by
`quantize_params` / an FP8 checkpoint, per the recipe's rules) runs `jfp8.nn.FP8Dense` with the
model's recipe; a plain kernel runs `flax.linen.Dense` in BF16. With the default recipes norms,
the embedding and the lm_head stay BF16.

Parameter tree (the `params` collection, names mirror HF so checkpoint mapping is one rule):
    embed_tokens/embedding (V, d)
    layers_{i}/input_layernorm/weight (d,), layers_{i}/post_attention_layernorm/weight (d,)
    layers_{i}/self_attn/{q,k,v,o}_proj/kernel (K, N) BF16 or QArray (N, K); bias (N,) when used
    layers_{i}/mlp/{gate,up,down}_proj/kernel
    norm/weight (d,), lm_head/kernel (d, V) (absent when tied, unless the recipe quantizes the
    head: then a QArray (V, d) copy of the embedding, `quantize_tied_head`)
Layers are separate submodules with separate arrays (no scan over a stacked weight: notes/h100.md
measured 1.6-2.8x slower decode steps when a scan slices a weight stack).

Three call modes share the weights:
  * full forward (`cache=None`): causal attention over the given tokens in XLA, for perplexity;
  * `mode="prefill"`: writes K/V of a right-padded prompt into a `jfp8.KVCache`;
  * `mode="decode"`: T new tokens per sequence appended at `cache.lengths`, attending the cache.
`generate` (models/generate.py) drives the last two.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models.configs import CONFIGS, LlamaConfig, get_config, rope_inv_freq

__all__ = ["CONFIGS", "LlamaConfig", "get_config", "Llama", "init_params", "forward", "load",
           "generate", "rope_tables", "param_bytes", "fuse", "quantize_params", "quantize_tied_head",
           "has_quantized_head"]

Params = Any


# ---------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """RMSNorm as HF Llama computes it: normalise in f32, cast to `dtype`, times the weight
    (`jfp8.RMSNorm`, one formula with the fused kernels).

    Attributes:
      eps: added to the mean square.
      dtype: output dtype.
      param_dtype: dtype of `weight` (d,).

    __call__(x, deferred=False): the normalised x, or with `deferred` the `jfp8.RMSNorm` itself,
    for the next matmul to apply as its prologue (fused into the FP8 decode kernel).
    """
    eps: float = 1e-5
    dtype: Any = jnp.bfloat16
    param_dtype: Any = jnp.bfloat16

    @nn.compact
    def __call__(self, x, deferred: bool = False):
        import jfp8
        w = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        norm = jfp8.RMSNorm(w.astype(self.dtype), self.eps)
        return norm if deferred else norm(jfp8.materialize(x).astype(self.dtype))


def _project(layer: nn.Module, x, prologue=None, residual=None, defer_sum=False):
    """residual + layer(prologue(x)): an FP8Dense takes the prologue and the residual to fuse
    them into its kernel, a BF16 Dense gets x transformed first and the residual added after.
    x and residual may be `jfp8.PendingSum`s; with `defer_sum` an FP8Dense may return one (its
    split-K sum left to the next RMSNorm's kernel, `jfp8.pending`)."""
    import jfp8
    from jfp8.nn import FP8Dense
    if isinstance(layer, FP8Dense):
        return layer(x, prologue=prologue, residual=residual, defer_sum=defer_sum)
    x, residual = jfp8.materialize(x), jfp8.materialize(residual)
    y = layer(x if prologue is None else prologue(x))
    return y if residual is None else y + residual


def rope_tables(cfg: LlamaConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin of RoPE angles: positions (B, T) int -> two (B, T, D/2) f32 arrays."""
    inv_freq = jnp.asarray(rope_inv_freq(cfg), jnp.float32)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate halves (HF `rotate_half` convention): x (B, T, H, D), cos/sin (B, T, D/2).

    `jfp8.attention.apply_rope`: one formula for every mode, fused decode included."""
    from jfp8 import attention
    return attention.apply_rope(x, cos, sin)


def _dense(parent: nn.Module, features: int, use_bias: bool, name: str):
    """The linear layer `name` of `parent`: FP8 when its stored kernel is a QArray, BF16 otherwise.

    A QArray kernel (N, K) (from `quantize_params` or an FP8 checkpoint) runs `jfp8.nn.FP8Dense`
    with the model's recipe (activation quantization, kernels); a plain (K, N) kernel runs
    `flax.linen.Dense`. So whatever the recipe kept in high precision (`keep_high_precision`,
    `overrides`: lm_head by default) stays BF16, and nothing is quantized at call time.
    """
    import jfp8
    init = nn.initializers.normal(0.02)
    kernel = parent.variables.get("params", {}).get(name, {}).get("kernel")
    if isinstance(kernel, jfp8.QArray):
        from jfp8.nn import FP8Dense
        return FP8Dense(features, use_bias=use_bias, dtype=parent.dtype, param_dtype=parent.param_dtype,
                        kernel_init=init, recipe=getattr(parent, "recipe", None), name=name)
    return nn.Dense(features, use_bias=use_bias, dtype=parent.dtype, param_dtype=parent.param_dtype,
                    kernel_init=init, name=name)


def causal_attention(q, k, v, lengths=None):
    """Plain XLA causal GQA attention over a whole sequence (the full-forward path).

    q: (B, T, Hq, D); k, v: (B, T, Hkv, D); lengths: optional (B,) int, keys at or past a
    sequence's length are masked (right padding). Softmax in f32. Returns (B, T, Hq, D) in q.dtype.
    """
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    qg = q.reshape(B, T, Hkv, G, D)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    s = s * (1.0 / np.sqrt(D))
    mask = jnp.tril(jnp.ones((T, T), bool))[None, None, None]
    if lengths is not None:
        mask = mask & (jnp.arange(T)[None, :] < lengths[:, None])[:, None, None, None, :]
    s = jnp.where(mask, s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    p = jnp.where(jnp.isnan(p), 0.0, p)  # fully masked rows (padding queries) give 0, not NaN
    o = jnp.einsum("bkgts,bskd->btkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.reshape(B, T, Hq, D).astype(q.dtype)


class Attention(nn.Module):
    """GQA self-attention with RoPE; full-sequence, prefill-into-cache or decode-from-cache.

    fused: one `qkv_proj` (N = (Hq + 2 Hkv) D) instead of q/k/v_proj (see `fuse`)."""
    cfg: LlamaConfig
    layer: int
    recipe: Any = None
    dtype: Any = jnp.bfloat16
    param_dtype: Any = jnp.bfloat16
    fused: bool = False

    @nn.compact
    def __call__(self, x, cos, sin, cache=None, lengths=None, mode="forward", prologue=None,
                 residual=None):
        """x (B, T, d), normalised by `prologue` (a jfp8.RMSNorm) first when given (fused into
        an FP8 qkv projection's kernel); `residual` (B, T, d) is added to the output (the skip
        connection, fused into an FP8 o projection's kernel)."""
        cfg = self.cfg
        B, T, _ = x.shape
        Hq, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        mk = functools.partial(_dense, self)
        o = None
        if prologue is not None and not self.fused:
            x, prologue = prologue(x), None     # three projections: normalise once
        if self.fused:
            qkv = _project(mk((Hq + 2 * Hkv) * D, cfg.qkv_bias, name="qkv_proj"), x, prologue)
            if cache is not None and mode == "decode":
                # Split, RoPE and the K/V append in one launch (kv_append_qkv) where it applies.
                from jfp8 import attention
                o, cache = attention.decode_qkv(qkv, cache, layer=self.layer, num_q_heads=Hq,
                                                cos=cos, sin=sin)
            else:
                q = qkv[..., :Hq * D].reshape(B, T, Hq, D)
                k = qkv[..., Hq * D:(Hq + Hkv) * D].reshape(B, T, Hkv, D)
                v = qkv[..., (Hq + Hkv) * D:].reshape(B, T, Hkv, D)
        else:
            q = mk(Hq * D, cfg.qkv_bias, name="q_proj")(x).reshape(B, T, Hq, D)
            k = mk(Hkv * D, cfg.qkv_bias, name="k_proj")(x).reshape(B, T, Hkv, D)
            v = mk(Hkv * D, cfg.qkv_bias, name="v_proj")(x).reshape(B, T, Hkv, D)
        if o is None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            if cache is None:
                o = causal_attention(q, k, v, lengths)
            elif mode == "prefill":
                from jfp8 import attention
                o, cache = attention.prefill(q, k, v, cache, layer=self.layer, lengths=lengths)
            elif mode == "decode":
                from jfp8 import attention
                o, cache = attention.decode(q, k, v, cache, layer=self.layer)
            else:
                raise ValueError(f"mode: expected 'forward', 'prefill' or 'decode', got {mode!r}")
        # The sum of a split-K o projection (with the skip connection) is left to the
        # post-attention RMSNorm's kernel where the decode path defers it (jfp8.pending).
        out = _project(mk(cfg.hidden_size, cfg.o_bias, name="o_proj"),
                       o.astype(self.dtype).reshape(B, T, Hq * D), residual=residual,
                       defer_sum=True)
        return out, cache


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); fused: one `gate_up_proj` (N = 2F)."""
    cfg: LlamaConfig
    recipe: Any = None
    dtype: Any = jnp.bfloat16
    param_dtype: Any = jnp.bfloat16
    fused: bool = False

    @nn.compact
    def __call__(self, x, prologue=None, residual=None):
        """x (B, T, d), normalised by `prologue` (a jfp8.RMSNorm) first when given; `residual`
        (B, T, d) added to the output (fused into an FP8 down projection's kernel)."""
        import jfp8
        cfg = self.cfg
        mk = functools.partial(_dense, self)
        if self.fused:
            gu = _project(mk(2 * cfg.intermediate_size, cfg.mlp_bias, name="gate_up_proj"), x, prologue)
        else:
            x = x if prologue is None else prologue(x)
            gu = jnp.concatenate([mk(cfg.intermediate_size, cfg.mlp_bias, name="gate_proj")(x),
                                  mk(cfg.intermediate_size, cfg.mlp_bias, name="up_proj")(x)], -1)
        # silu(gate) * up, fused into an FP8 down projection's input load (jfp8.SwiGLU)
        return _project(mk(cfg.hidden_size, cfg.mlp_bias, name="down_proj"), gu, jfp8.SwiGLU(),
                        residual, defer_sum=True)     # summed by the next RMSNorm's kernel


class DecoderLayer(nn.Module):
    cfg: LlamaConfig
    layer: int
    recipe: Any = None
    dtype: Any = jnp.bfloat16
    param_dtype: Any = jnp.bfloat16
    fused: bool = False

    @nn.compact
    def __call__(self, h, cos, sin, cache=None, lengths=None, mode="forward"):
        cfg = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = RMSNorm(cfg.rms_norm_eps, name="input_layernorm", **kw)(h, deferred=True)
        # The skip connections go into the o / down projections (their kernels' epilogues).
        h, cache = Attention(cfg, self.layer, self.recipe, name="self_attn", fused=self.fused, **kw)(
            h, cos, sin, cache, lengths, mode, norm, residual=h)
        norm = RMSNorm(cfg.rms_norm_eps, name="post_attention_layernorm", **kw)(h, deferred=True)
        return MLP(cfg, self.recipe, name="mlp", fused=self.fused, **kw)(h, norm, residual=h), cache


class Llama(nn.Module):
    """The decoder. Hashable (a frozen dataclass), so it is a static argument of jitted functions.

    Attributes:
      cfg: LlamaConfig (shapes, RoPE, biases, tying).
      recipe: jfp8.Recipe the FP8 layers run with (activation quantization); which layers are
        FP8 is decided by the params (QArray kernels), so a BF16 param tree runs BF16.
      dtype: compute / activation dtype (bf16; f32 for reference tests).
      param_dtype: dtype of freshly initialised high-precision params.
      fused: q/k/v and gate/up projections as one matmul each (`qkv_proj`, `gate_up_proj`);
        fewer, larger kernels per decode step. `fuse(model, params)` converts a loaded model.

    __call__(tokens (B, T) int, positions (B, T) int, cache=None, lengths=None, mode="forward",
             last_only=False) -> (logits f32, cache)
      logits: (B, T, V), or (B, V) at position lengths-1 (prefill) / T-1 (decode) when last_only.
    """
    cfg: LlamaConfig
    recipe: Any = None
    dtype: Any = jnp.bfloat16
    param_dtype: Any = jnp.bfloat16
    fused: bool = False

    @nn.compact
    def __call__(self, tokens, positions, cache=None, lengths=None, mode="forward", last_only=False):
        import jfp8
        cfg = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=nn.initializers.normal(0.02),
                         name="embed_tokens", **kw)
        h = embed(tokens)
        cos, sin = rope_tables(cfg, positions)
        for i in range(cfg.num_layers):  # unrolled: each layer reads its own weight arrays in place
            h, cache = DecoderLayer(cfg, i, self.recipe, name=f"layers_{i}", fused=self.fused, **kw)(
                h, cos, sin, cache, lengths, mode)
        if last_only:
            h = jfp8.materialize(h)
            if mode == "prefill" and lengths is not None:
                h = jnp.take_along_axis(h, (lengths - 1)[:, None, None].astype(jnp.int32), axis=1)[:, 0]
            else:
                h = h[:, -1]
        norm = RMSNorm(cfg.rms_norm_eps, name="norm", **kw)(h, deferred=True)
        if cfg.tie_word_embeddings and not has_quantized_head(self.variables.get("params", {})):
            logits = embed.attend(norm(h))
        else:
            logits = _project(_dense(self, cfg.vocab_size, False, "lm_head"), h, norm)
        return logits.astype(jnp.float32), cache


# ---------------------------------------------------------------------------------------------
# functional entry points
# ---------------------------------------------------------------------------------------------
def init_params(model: Llama, key: jax.Array, *, quantize: bool = True) -> Params:
    """Random params for `model`: normal(0.02) kernels and embedding, unit norms, zero biases.

    Leaves are drawn one by one on the default device (no forward pass traced, no host copy), so
    8B-shaped random models for benchmarks build quickly. With a recipe and `quantize=True`,
    linear kernels are quantized with `jfp8.quantize_params` (QArray (N, K)), the way a loaded
    checkpoint looks. Returns the `params` collection.
    """
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    shapes = jax.eval_shape(model.clone(recipe=None).init, key, tokens, tokens)["params"]
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    keys = jax.random.split(key, len(flat))
    # small models: numpy draws (no per-shape compiles); large ones: on device, leaf by leaf
    small = sum(int(np.prod(s.shape)) for _, s in flat) < 50_000_000
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist()) if small else None
    leaves = []
    for (kp, sds), k in zip(flat, keys):
        last = kp[-1].key
        kind = "ones" if last == "weight" else "zeros" if last == "bias" else "normal"
        if small:
            a = (np.ones(sds.shape, np.float32) if kind == "ones" else np.zeros(sds.shape, np.float32)
                 if kind == "zeros" else rng.standard_normal(sds.shape, np.float32) * 0.02)
            leaves.append(jnp.asarray(a, sds.dtype))
        else:
            leaves.append(_random_leaf(k, sds.shape, sds.dtype, kind))
    params = jax.tree_util.tree_unflatten(treedef, leaves)
    if model.recipe is not None and quantize:
        params = quantize_params(params, model.recipe)
    return params


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _random_leaf(key, shape, dtype, kind):
    if kind == "ones":
        return jnp.ones(shape, dtype)
    if kind == "zeros":
        return jnp.zeros(shape, dtype)
    return (jax.random.normal(key, shape, jnp.float32) * 0.02).astype(dtype)


def quantize_params(params: Params, recipe) -> Params:
    """Quantize every linear kernel (K, N) of a BF16 param tree to a QArray (N, K) by `recipe`,
    and give a tied model the FP8 head its recipe asks for (`quantize_tied_head`)."""
    n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    if n < 50_000_000:
        return quantize_tied_head(_quantize_params_jit(params, recipe), recipe)
    from jfp8.params import quantize_params as _quantize_params  # per kernel: bounded peak memory
    return quantize_tied_head(_quantize_params(params, recipe), recipe)


def has_quantized_head(params: Params) -> bool:
    """Whether `params` holds an FP8 lm_head (a QArray kernel)."""
    import jfp8
    return isinstance(params.get("lm_head", {}).get("kernel"), jfp8.QArray)


def quantize_tied_head(params: Params, recipe) -> Params:
    """For a tied model (no `lm_head` in `params`) whose recipe quantizes `lm_head/kernel`: add
    `lm_head/kernel`, the embedding table (V, d) quantized as a (N=V, K=d) QArray, which the
    model's last projection then runs as an FP8Dense; the BF16 table stays for the token gather.

    The copy costs V x d bytes (+ scales) of memory and saves V x d bytes of reads per decode step
    (the BF16 table is read in full by a tied head). Untied models, recipes that keep the head in
    high precision (the default) and trees that already hold a head are returned unchanged."""
    import jfp8
    if recipe is None or "lm_head" in params or "embed_tokens" not in params:
        return params
    gran = recipe.weight_granularity_for("lm_head/kernel")
    if gran is None:
        return params
    table = params["embed_tokens"]["embedding"]
    return {**params, "lm_head": {"kernel": jfp8.quantize(table, recipe.weight_format, gran)}}


@functools.partial(jax.jit, static_argnums=(1,))
def _quantize_params_jit(params, recipe):
    # one executable instead of a few eager ops per kernel (seconds saved on small models)
    from jfp8.params import quantize_params as _quantize_params
    return _quantize_params(params, recipe)


_FUSE_GROUPS = (("self_attn", "qkv_proj", ("q_proj", "k_proj", "v_proj")),
                ("mlp", "gate_up_proj", ("gate_proj", "up_proj")))


def _concat_kernels(parts):
    """Concatenate linear kernels along N: (K, N_i) arrays on axis 1, QArrays (N_i, K) on axis 0."""
    import jfp8
    if not isinstance(parts[0], jfp8.QArray):
        return jnp.concatenate(parts, axis=1)
    g = parts[0].granularity
    aligned = isinstance(g, jfp8.PerChannel) or (
        isinstance(g, jfp8.PerBlock) and all(p.shape[0] % g.block_shape(p.shape)[0] == 0 for p in parts[:-1]))
    if aligned and all(p.granularity == g and p.format == parts[0].format for p in parts):
        return jfp8.from_parts(jnp.concatenate([p.data for p in parts], 0),
                               jnp.concatenate([p.scale for p in parts], 0), parts[0].format, g)
    # scale blocks that would straddle two parts: re-quantize the joined weight
    w = jnp.concatenate([p.dequantize(jnp.float32) for p in parts], 0)
    return jfp8.quantize(w, parts[0].format, g)


def fuse(model: Llama, params: Params) -> tuple[Llama, Params]:
    """(model, params) with q/k/v and gate/up kernels (and biases) joined along N.

    Exact for BF16 kernels, for per-channel FP8 and for 128x128 blocks when every part's N is a
    multiple of 128 (all published Llama/Qwen/Mistral shapes); otherwise the joined weight is
    re-quantized with the same granularity.
    """
    if model.fused:
        return model, params
    out = dict(params)
    for i in range(model.cfg.num_layers):
        layer = {k: dict(v) for k, v in params[f"layers_{i}"].items()}
        for block, fused_name, names in _FUSE_GROUPS:
            parts = [layer[block].pop(n) for n in names]
            new = {"kernel": _concat_kernels([p["kernel"] for p in parts])}
            if "bias" in parts[0]:
                new["bias"] = jnp.concatenate([p["bias"] for p in parts])
            layer[block][fused_name] = new
        out[f"layers_{i}"] = layer
    return model.clone(fused=True), out


@functools.partial(jax.jit, static_argnames=("model",))
def _forward(model, params, tokens, lengths):
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    logits, _ = model.apply({"params": params}, tokens, positions, None, lengths, "forward")
    return logits


def forward(model, params: Params, tokens, *, lengths=None, recipe=None, dtype=jnp.bfloat16) -> jax.Array:
    """Full-sequence causal forward (no cache) -> logits (B, T, V) f32.

    model: a `Llama` module, or a `LlamaConfig` (then `recipe` and `dtype` build the module;
      the recipe must match the params: QArray kernels need the recipe they were quantized by).
    tokens: (B, T) int32, right-padded; lengths: optional (B,) int32 true lengths (keys past a
    sequence's length are masked; logits there are meaningless). Usable for perplexity.
    """
    if isinstance(model, LlamaConfig):
        model = Llama(model, recipe=recipe, dtype=dtype)
    elif not isinstance(model, Llama):
        raise TypeError(f"model: expected a Llama module or a LlamaConfig, got {type(model).__name__}")
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2:
        raise ValueError(f"tokens: expected (B, T) int, got shape {tokens.shape}")
    if lengths is not None:
        lengths = jnp.asarray(lengths, jnp.int32)
    return _forward(model, params, tokens, lengths)


def param_bytes(params: Params) -> int:
    """Bytes of all arrays in a param tree (QArray data + scales counted)."""
    return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params)))


def load(path: str, quantize=None, *, dtype=jnp.bfloat16, progress: bool = True):
    """Load an HF-layout checkpoint dir (BF16/FP16/F32, FP8 block or per-channel, or a jfp8 save).

    quantize: a jfp8.Recipe (or preset name) to quantize BF16 weights while loading; None keeps
    the checkpoint's own precision (FP8 checkpoints load as QArrays with their recipe).
    Returns (model, params). See models/checkpoint.py.
    """
    from models import checkpoint
    return checkpoint.load(path, quantize=quantize, dtype=dtype, progress=progress)


def generate(model: Llama, params: Params, prompts, **kw):
    """Generate tokens; see `models.generate.generate` for the arguments."""
    from models import generate as gen
    return gen.generate(model, params, prompts, **kw)
