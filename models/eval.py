"""Quality of an FP8 model on real text: perplexity, and against BF16 top-1 agreement and KL.

    jfp8 eval model.gguf --text lee_background.cor --tokens 1024
    jfp8 eval model.gguf --text t.txt --recipe w8a8_block+kv_token_head --calibrate lee.cor

Python:
    ev = Evaluator.from_path("model.gguf", dtype=jnp.float32)       # BF16 reference loaded once
    tokens = ev.tokenize(open("lee_background.cor").read())[:1024]
    ref = ev.reference(tokens, window=1024)                       # BF16 logits stats, once
    row = ev.evaluate(EVAL_RECIPES["w8a8_block+kv_token_head"], tokens, ref)
    row.ppl, row.delta_ppl_pct, row.agreement, row.kl

Perplexity is over non-overlapping windows (each window predicts its tokens 1..T-1 from the
ones before, no context carried across windows). Against the high-precision run of the same
model on the same windows: top-1 agreement (argmax equal) and mean KL(ref || FP8) per predicted
token. Bytes per token: weight bytes a decode step reads (all linear weights incl. scales, the
lm_head / tied embedding, the norms; one embedding row) and KV-cache bytes one token adds.

An FP8 KV cache is simulated in the full-sequence forward: K (after RoPE, as the cache stores it)
and V are quantized and dequantized before attention, so every query sees the cached values a
decode step would see. Per-tensor: one scale per layer from the window's amax with 2x headroom
(`jfp8.kv_cache`'s rule for a first write); per-(token, head): one scale per row of D.
Layers kept in high precision by a recipe's overrides (per-layer fallback) run as plain dense.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import jfp8
from models.calibration import SENSITIVITY_UNITS

LINEAR_PROJS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
KV_MODES = ("per_tensor", "per_token_head")


@dataclasses.dataclass(frozen=True)
class EvalRecipe:
    """One row of the eval table.

    Attributes:
      name: row label.
      recipe: jfp8.Recipe for the linear weights (and activations), or None (high precision).
      kv_format: FP8 format of the simulated KV cache, or None (cache in the model dtype).
      kv_scaling: "per_tensor" or "per_token_head" when kv_format is set.
      calibrate: round the weights with `jfp8.calibrate.gptq_quantize` (needs calibration text).
      fallback_budget: fraction of linear-weight bytes that may stay BF16, chosen by measured
        sensitivity on the calibration text (0: none).
      fallback_unit: what the fallback keeps in BF16: whole "layer"s or single "projection"s
        (`models.calibration.fallback_units`).
    """
    name: str
    recipe: Any = None
    kv_format: Any = None
    kv_scaling: str | None = None
    calibrate: bool = False
    fallback_budget: float = 0.0
    fallback_unit: str = "layer"

    def __post_init__(self):
        if (self.kv_format is None) != (self.kv_scaling is None):
            raise ValueError(f"{self.name}: kv_format and kv_scaling: give both or neither")
        if self.kv_scaling is not None and self.kv_scaling not in KV_MODES:
            raise ValueError(f"kv_scaling: expected one of {KV_MODES}, got {self.kv_scaling!r}")
        if not 0.0 <= self.fallback_budget <= 1.0:
            raise ValueError(f"fallback_budget: expected a fraction in [0, 1], got {self.fallback_budget}")
        if self.fallback_unit not in SENSITIVITY_UNITS:
            raise ValueError(f"fallback_unit: expected one of {SENSITIVITY_UNITS}, got "
                             f"{self.fallback_unit!r}")

    def replace(self, **kw) -> "EvalRecipe":
        return dataclasses.replace(self, **kw)


def _presets() -> dict[str, EvalRecipe]:
    R, E4, E5 = jfp8.Recipe, jfp8.E4M3, jfp8.E5M2
    wo_ch = R.weights_only(jfp8.PerChannel(0))
    wo_blk = R.weights_only(jfp8.PerBlock((128, 128)))
    w8a8 = R.block128()
    w8a8_e5 = R.block128(weight_format=E5, act_format=E5)
    out = {
        "bf16": EvalRecipe("bf16"),
        "weights_only_channel": EvalRecipe("weights_only_channel", wo_ch),
        "weights_only_block": EvalRecipe("weights_only_block", wo_blk),
        "w8a8_block": EvalRecipe("w8a8_block", w8a8),
        "w8a8_block+kv_tensor": EvalRecipe("w8a8_block+kv_tensor", w8a8, E4, "per_tensor"),
        "w8a8_block+kv_token_head": EvalRecipe("w8a8_block+kv_token_head", w8a8, E4, "per_token_head"),
        "w8a8_block_e5m2+kv_token_head_e5m2": EvalRecipe(
            "w8a8_block_e5m2+kv_token_head_e5m2", w8a8_e5, E5, "per_token_head"),
        "kv_token_head_only": EvalRecipe("kv_token_head_only", None, E4, "per_token_head"),
    }
    # Calibrated variants: GPTQ rounding, and GPTQ + BF16 fallback within 10% of linear bytes,
    # chosen per projection (qkv, o, gate_up, down of each layer) or per whole layer.
    for base in ("weights_only_channel", "weights_only_block", "w8a8_block+kv_token_head"):
        out[base + "+gptq"] = out[base].replace(name=base + "+gptq", calibrate=True)
        out[base + "+gptq+fallback10"] = out[base].replace(
            name=base + "+gptq+fallback10", calibrate=True, fallback_budget=0.10,
            fallback_unit="projection")
        out[base + "+gptq+layerfallback10"] = out[base].replace(
            name=base + "+gptq+layerfallback10", calibrate=True, fallback_budget=0.10)
    return out


EVAL_RECIPES = _presets()
DEFAULT_TABLE = ("weights_only_channel", "weights_only_block", "w8a8_block", "w8a8_block+kv_tensor",
                 "w8a8_block+kv_token_head", "w8a8_block_e5m2+kv_token_head_e5m2")


# ---------------------------------------------------------------------------------------------
# the forward with simulated FP8 KV cache and high-precision fallback layers
# ---------------------------------------------------------------------------------------------
def kv_fake_quant(x, fmt, scaling: str):
    """Quantize then dequantize K or V (B, T, Hkv, D) as an FP8 cache would store it."""
    if scaling == "per_token_head":
        q = jfp8.quantize(x, fmt, jfp8.PerBlock((1, 1, 1, x.shape[-1])))
    else:  # one scale per layer, 2x headroom (kv_cache's first-write rule)
        q = jfp8.quantize(x, fmt, jfp8.PerTensor(), margin=1)
    return q.dequantize(x.dtype)


def _interceptor(next_fun, args, kwargs, context):
    """FP8Dense whose kernel was kept in high precision (fallback) -> plain dense, no FP8."""
    from jfp8.nn.linen import FP8Dense
    mod = context.module
    if isinstance(mod, FP8Dense) and context.method_name == "__call__" and \
            mod.has_variable("params", "kernel") and \
            not isinstance(mod.get_variable("params", "kernel"), jfp8.QArray):
        from pallas_kernels.fp8_gemv import add_residual
        x = jfp8.materialize(args[0])
        prologue = kwargs.get("prologue", args[1] if len(args) > 1 else None)
        residual = kwargs.get("residual", args[2] if len(args) > 2 else None)
        x = x if prologue is None else prologue(x)   # jfp8.RMSNorm / SwiGLU (models.llama)
        kernel = mod.get_variable("params", "kernel")
        dtype = mod.dtype or x.dtype
        y = jnp.dot(x.astype(dtype), kernel.astype(dtype), preferred_element_type=jnp.float32)
        if mod.use_bias:
            y = y + mod.get_variable("params", "bias").astype(jnp.float32)
        # FP8Dense adds the skip connection it is given (models.llama._project): so does this
        return add_residual(y.astype(dtype), jfp8.materialize(residual))
    return next_fun(*args, **kwargs)


@contextlib.contextmanager
def _kv_patch(kv_format, kv_scaling):
    """Route models.llama's full-sequence attention through an FP8 K/V round trip."""
    from models import llama
    if kv_format is None:
        yield
        return
    original = llama.causal_attention

    def attention(q, k, v, lengths=None):
        return original(q, kv_fake_quant(k, kv_format, kv_scaling),
                        kv_fake_quant(v, kv_format, kv_scaling), lengths)

    llama.causal_attention = attention
    try:
        yield
    finally:
        llama.causal_attention = original


def _window_stats_fn(model, kv_format, kv_scaling, with_ref: bool):
    """jit: (params, tokens (B, T), [ref_logp (B, T-1, V)]) -> per-position stats."""
    from flax import linen as nn

    def fn(params, tokens, ref_logp=None):
        B, T = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        with _kv_patch(kv_format, kv_scaling), nn.intercept_methods(_interceptor):
            logits, _ = model.apply({"params": params}, tokens, positions, None, None, "forward")
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
        top1 = jnp.argmax(logp, axis=-1)
        if ref_logp is None:
            return nll, top1, logp
        kl = jnp.sum(jnp.exp(ref_logp) * (ref_logp - logp), axis=-1)
        return nll, top1, kl

    return jax.jit(fn)


@dataclasses.dataclass
class Reference:
    """High-precision stats on the eval windows: the baseline of every row."""
    windows: np.ndarray        # (W, T) int32 token windows
    nll: np.ndarray            # (W, T-1)
    top1: np.ndarray           # (W, T-1)
    logp: list                 # per window (T-1, V) f32 log-probs (device arrays)

    @property
    def ppl(self) -> float:
        return float(np.exp(self.nll.mean()))


@dataclasses.dataclass
class Row:
    name: str
    ppl: float
    delta_ppl_pct: float
    agreement: float
    kl: float
    weight_bytes_per_token: int
    kv_bytes_per_token: float
    fp8_linear_fraction: float
    seconds: float
    fallback: list = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def windows_of(tokens, window: int) -> np.ndarray:
    """Non-overlapping windows (W, window) of a token list; a short tail is dropped."""
    tokens = np.asarray(tokens, np.int32).ravel()
    if window < 2:
        raise ValueError(f"window: expected >= 2 tokens, got {window}")
    n = len(tokens) // window
    if n == 0:
        raise ValueError(f"tokens: expected at least one window of {window} tokens, got {len(tokens)}")
    return tokens[: n * window].reshape(n, window)


# ---------------------------------------------------------------------------------------------
# bytes
# ---------------------------------------------------------------------------------------------
def _leaves_with_paths(params):
    flat = jax.tree_util.tree_flatten_with_path(
        params, is_leaf=lambda x: isinstance(x, jfp8.QArray))[0]
    for path, leaf in flat:
        yield "/".join(str(getattr(p, "key", p)) for p in path), leaf


def _nbytes(leaf) -> int:
    """Stored bytes: QArray data + f32 scales; high-precision leaves counted as BF16 (2 bytes),
    how they are stored and read on the GPU, whatever dtype the eval computes in."""
    if isinstance(leaf, jfp8.QArray):
        return leaf.nbytes
    return int(np.prod(leaf.shape)) * 2


def weight_bytes_per_token(params, cfg) -> int:
    """Bytes a decode step reads: every param except the embedding table (one row of it is read),
    unless the embedding is tied and so read whole as the lm_head (no FP8 copy of it as the head,
    `llama.quantize_tied_head`)."""
    from models import llama
    gathered_only = not cfg.tie_word_embeddings or llama.has_quantized_head(params)
    total = 0
    for path, leaf in _leaves_with_paths(params):
        if path.startswith("embed_tokens") and gathered_only:
            total += _nbytes(leaf) // cfg.vocab_size
        else:
            total += _nbytes(leaf)
    return total


def fp8_linear_fraction(params) -> float:
    """Fraction of the linear layers' weights (by element count) stored in FP8."""
    fp8 = total = 0
    for path, leaf in _leaves_with_paths(params):
        if path.split("/")[-1] == "kernel" and not path.startswith("lm_head"):
            n = int(np.prod(leaf.shape))
            total += n
            fp8 += n if isinstance(leaf, jfp8.QArray) else 0
    return fp8 / total if total else 0.0


def kv_bytes_per_token(cfg, kv_format, kv_scaling) -> float:
    """K and V bytes per token over all layers (`jfp8.kv_cache.bytes_per_token`): FP8 or BF16
    values, plus the per-(token, head) scales (a per-tensor scale is per layer, not per token)."""
    from jfp8 import kv_cache
    dtype = kv_format.dtype if kv_format is not None else jnp.bfloat16
    return kv_cache.bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype,
                                    kv_scaling)


# ---------------------------------------------------------------------------------------------
# evaluator
# ---------------------------------------------------------------------------------------------
class Evaluator:
    """Holds a high-precision model (params once) and evaluates FP8 recipes of it.

    model: models.llama.Llama with recipe None; params: its float params (kernels (K, N)).
    tokenizer: a `tokenizers.Tokenizer` (optional: needed by `tokenize`).
    """

    def __init__(self, model, params, tokenizer=None, *, batch: int = 1,
                 sensitivity_tokens: int = 512):
        if model.recipe is not None:
            raise ValueError("model: expected the high-precision model (recipe None); the "
                             "recipes to compare are given to evaluate()")
        self.model, self.params, self.tokenizer, self.batch = model, params, tokenizer, int(batch)
        self.cfg = model.cfg
        self.sensitivity_tokens = int(sensitivity_tokens)  # per-layer KL: 1 forward per layer
        self._fns: dict = {}
        self._calib_cache: dict = {}

    @classmethod
    def from_path(cls, path: str, *, dtype=jnp.float32, progress: bool = False) -> "Evaluator":
        from models import gguf
        if gguf.is_gguf(path):
            model, params, g = gguf.load(path, None, dtype=dtype, progress=progress)
            return cls(model, params, g.tokenizer)
        from models import checkpoint
        model, params = checkpoint.load(path, None, dtype=dtype, progress=progress)
        if model.recipe is not None:
            raise ValueError(f"{path}: an FP8 checkpoint; eval needs the high-precision model")
        return cls(model, params, checkpoint.load_tokenizer(path))

    def tokenize(self, text: str) -> np.ndarray:
        if self.tokenizer is None:
            raise ValueError("tokenize: this Evaluator has no tokenizer")
        return np.asarray(self.tokenizer.encode(text).ids, np.int32)

    def _fn(self, model, kv_format, kv_scaling, with_ref):
        key = (model, kv_format, kv_scaling, with_ref)
        if key not in self._fns:
            self._fns[key] = _window_stats_fn(model, kv_format, kv_scaling, with_ref)
        return self._fns[key]

    def reference(self, tokens, window: int = 1024) -> Reference:
        w = windows_of(tokens, window)
        fn = self._fn(self.model, None, None, False)
        nll, top1, logp = [], [], []
        for i in range(len(w)):
            a, b, c = fn(self.params, jnp.asarray(w[i:i + 1]))
            nll.append(np.asarray(a[0])), top1.append(np.asarray(b[0])), logp.append(c)
        return Reference(w, np.stack(nll), np.stack(top1), logp)

    # -- params for a recipe ---------------------------------------------------------------------
    def quantized_params(self, er: EvalRecipe, calib_tokens=None, *, log=print):
        """The FP8 param tree for a row (round-to-nearest, or GPTQ, plus fallback overrides)."""
        recipe = er.recipe
        if recipe is None:
            return self.params, []
        fallback = []
        if er.fallback_budget > 0:
            if calib_tokens is None:
                raise ValueError(f"{er.name}: fallback needs calibration tokens (--calibrate FILE)")
            from models import calibration
            sens = self._sensitivity(er, calib_tokens, log=log)
            fallback = calibration.choose_fallback(sens, self.params, er.fallback_budget)
            recipe = calibration.with_fallback(recipe, fallback)
        if er.calibrate:
            if calib_tokens is None:
                raise ValueError(f"{er.name}: GPTQ needs calibration tokens (--calibrate FILE)")
            from models import calibration
            hs = self._hessians(calib_tokens, log=log)
            params = calibration.gptq_params(self.params, recipe, hs)
        else:
            params = jfp8.quantize_params(self.params, recipe)
        return params, fallback

    def _hessians(self, calib_tokens, *, log=print):
        key = ("hessians", calib_tokens.tobytes())
        if key not in self._calib_cache:
            from models import calibration
            t = time.time()
            self._calib_cache[key] = calibration.collect_hessians(self.model, self.params, calib_tokens)
            log(f"  calibration statistics: {len(self._calib_cache[key])} inputs, {time.time() - t:.1f}s")
        return self._calib_cache[key]

    def _sensitivity(self, er: EvalRecipe, calib_tokens, *, log=print):
        key = ("sens", er.recipe, er.kv_format, er.kv_scaling, er.calibrate, calib_tokens.tobytes(),
               er.fallback_unit)
        if key not in self._calib_cache:
            from models import calibration
            t = time.time()
            hs = self._hessians(calib_tokens, log=log) if er.calibrate else None
            few = calib_tokens[: self.sensitivity_tokens]
            self._calib_cache[key] = calibration.sensitivity(self, er, few, unit=er.fallback_unit,
                                                             hessians=hs, window=len(few))
            log(f"  per-{er.fallback_unit} sensitivity: {time.time() - t:.1f}s")
        return self._calib_cache[key]

    # -- evaluation --------------------------------------------------------------------------------
    def stats(self, er: EvalRecipe, params, windows: np.ndarray, ref: Reference | None):
        """(nll (W, T-1), top1 (W, T-1), kl (W, T-1) or None) of `params` under `er`."""
        model = self.model if er.recipe is None else self.model.clone(recipe=er.recipe)
        fn = self._fn(model, er.kv_format, er.kv_scaling, ref is not None)
        nll, top1, kl = [], [], []
        for i in range(len(windows)):
            out = fn(params, jnp.asarray(windows[i:i + 1]), *([ref.logp[i]] if ref is not None else []))
            nll.append(np.asarray(out[0][0])), top1.append(np.asarray(out[1][0]))
            if ref is not None:
                kl.append(np.asarray(out[2][0]))
        return np.stack(nll), np.stack(top1), (np.stack(kl) if ref is not None else None)

    def evaluate(self, er: EvalRecipe, tokens_or_ref, ref: Reference | None = None, *,
                 window: int = 1024, calib_tokens=None, log=print) -> Row:
        if ref is None:
            ref = self.reference(tokens_or_ref, window) if not isinstance(tokens_or_ref, Reference) \
                else tokens_or_ref
        t = time.time()
        params, fallback = self.quantized_params(er, calib_tokens, log=log)
        nll, top1, kl = self.stats(er, params, ref.windows, ref)
        ppl = float(np.exp(nll.mean()))
        fmt = er.kv_format
        return Row(
            name=er.name, ppl=ppl, delta_ppl_pct=100.0 * (ppl / ref.ppl - 1.0),
            agreement=float(np.mean(top1 == ref.top1)), kl=float(kl.mean()),
            weight_bytes_per_token=weight_bytes_per_token(params, self.cfg),
            kv_bytes_per_token=kv_bytes_per_token(self.cfg, fmt, er.kv_scaling),
            fp8_linear_fraction=fp8_linear_fraction(params), seconds=time.time() - t,
            fallback=list(fallback))

    def reference_row(self, ref: Reference, seconds: float = 0.0) -> Row:
        return Row(name="reference", ppl=ref.ppl, delta_ppl_pct=0.0, agreement=1.0, kl=0.0,
                   weight_bytes_per_token=weight_bytes_per_token(self.params, self.cfg),
                   kv_bytes_per_token=kv_bytes_per_token(self.cfg, None, None),
                   fp8_linear_fraction=0.0, seconds=seconds)


def format_table(rows: Sequence[Row]) -> str:
    head = (f"{'recipe':<44} {'ppl':>8} {'Δppl %':>7} {'top-1':>6} {'KL':>7} "
            f"{'W MB/tok':>9} {'KV B/tok':>9} {'FP8 lin':>7} {'s':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.name:<44} {r.ppl:8.3f} {r.delta_ppl_pct:+7.2f} {r.agreement:6.3f} "
                     f"{r.kl:7.4f} {r.weight_bytes_per_token / 1e6:9.2f} {r.kv_bytes_per_token:9.0f} "
                     f"{r.fp8_linear_fraction:7.1%} {r.seconds:6.1f}")
    return "\n".join(lines)


def read_text(path: str) -> str:
    """UTF-8 text, falling back to Latin-1 (gensim's lee.cor is Latin-1)."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="jfp8 eval", description=__doc__.splitlines()[0])
    p.add_argument("model", help="a .gguf file or an HF checkpoint directory")
    p.add_argument("--text", required=True, help="evaluation text file")
    p.add_argument("--tokens", type=int, default=1024, help="evaluate the first N tokens (default 1024)")
    p.add_argument("--window", type=int, default=1024, help="tokens per window (default 1024)")
    p.add_argument("--recipe", action="append", default=None,
                   help=f"row(s) to evaluate, repeatable; one of {sorted(EVAL_RECIPES)}; "
                        f"default: {', '.join(DEFAULT_TABLE)}")
    p.add_argument("--calibrate", default=None,
                   help="calibration text for +gptq / +fallback rows (disjoint from --text)")
    p.add_argument("--calib-tokens", type=int, default=2048)
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="high-precision dtype (default: bfloat16 on GPU, float32 on CPU, "
                        "where XLA's f32 dots are the fast ones)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    a = p.parse_args(argv)
    names = a.recipe or list(DEFAULT_TABLE)
    for n in names:
        if n not in EVAL_RECIPES:
            print(f"jfp8 eval: --recipe {n!r}: expected one of {sorted(EVAL_RECIPES)}", file=sys.stderr)
            return 2
    if a.tokens < a.window:
        print(f"jfp8 eval: --tokens {a.tokens} is less than --window {a.window}", file=sys.stderr)
        return 2
    dtype = a.dtype or ("bfloat16" if jax.default_backend() == "gpu" else "float32")
    t = time.time()
    ev = Evaluator.from_path(a.model, dtype=jnp.dtype(dtype))
    tokens = ev.tokenize(read_text(a.text))[: a.tokens]
    if len(tokens) < a.tokens:
        print(f"jfp8 eval: {a.text} has only {len(tokens)} tokens; evaluating those", file=sys.stderr)
    calib = None
    if a.calibrate:
        calib = ev.tokenize(read_text(a.calibrate))[: a.calib_tokens]
    print(f"loaded {a.model} ({dtype}) in {time.time() - t:.1f}s; {len(tokens)} tokens, "
          f"window {a.window}, backend {jax.default_backend()}", flush=True)
    t = time.time()
    ref = ev.reference(tokens, a.window)
    rows = [ev.reference_row(ref, time.time() - t)]
    for n in names:
        rows.append(ev.evaluate(EVAL_RECIPES[n], ref, calib_tokens=calib))
        print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(format_table(rows))
    for r in rows:
        if r.fallback:
            from models.calibration import fallback_patterns
            print(f"{r.name}: kept in BF16 {', '.join(r.fallback)}; jfp8 quantize " +
                  " ".join(f"--keep '{p}'" for p in fallback_patterns(r.fallback)))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "text": a.text, "tokens": int(ref.windows.size),
                       "window": a.window, "dtype": dtype, "backend": jax.default_backend(),
                       "rows": [r.as_dict() for r in rows]}, f, indent=1)
    return 0
