"""Calibration statistics from a decoder, GPTQ'd FP8 params, per-layer sensitivity and fallback.

    hs = collect_hessians(model, params, calib_tokens)            # {"layers_0/self_attn/q_proj": H}
    params8 = gptq_params(params, jfp8.Recipe.block128(), hs)     # QArray kernels, same format
    sens = layer_sensitivity(evaluator, eval_recipe, calib_tokens) # {"layers_0": KL, ...}
    keep = choose_fallback(sens, params, budget=0.10)              # worst layers within 10% bytes
    recipe = with_fallback(jfp8.Recipe.block128(), keep)           # per-path overrides -> None

The rounding of one weight given its statistics is `jfp8.calibrate`; this module only knows
where the statistics come from: the input of every linear layer of `models.llama.Llama`, taken
with a Flax method interceptor during a high-precision forward over calibration text (the
Hessian x^T x is summed inside the jitted forward, so no activations leave the device).
Layers that share an input (q/k/v, gate/up) share one Hessian.
"""
from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np

import jfp8
from jfp8 import calibrate

# Which linear's input each linear reads (q, k, v read the same normed hidden state, as do
# gate and up), so one Hessian serves the group.
INPUT_OWNER = {"q_proj": "q_proj", "k_proj": "q_proj", "v_proj": "q_proj", "o_proj": "o_proj",
               "gate_proj": "gate_proj", "up_proj": "gate_proj", "down_proj": "down_proj"}
_KERNEL_RE = re.compile(r"^(layers_\d+)/(self_attn|mlp)/(\w+_proj)/kernel$")


def _hessian_fn(model):
    from flax import linen as nn

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name == "__call__" and isinstance(mod, nn.Dense) and \
                mod.name in ("q_proj", "o_proj", "gate_proj", "down_proj"):
            x = args[0].astype(jnp.float32)
            x2 = x.reshape(-1, x.shape[-1])
            mod.sow("intermediates", "xtx", x2.T @ x2)
        return next_fun(*args, **kwargs)

    def fn(params, tokens):
        B, T = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        with nn.intercept_methods(interceptor):
            _, state = model.apply({"params": params}, tokens, positions, None, None, "forward",
                                   mutable=["intermediates"])
        return state["intermediates"]

    return jax.jit(fn)


def collect_hessians(model, params, tokens, *, window: int = 1024) -> dict[str, np.ndarray]:
    """H = E[x^T x] of the input of every linear layer over `tokens` in windows of `window`.

    model: a high-precision `models.llama.Llama` (recipe None); params: its float params.
    Returns {"layers_{i}/{self_attn|mlp}/{q|o|gate|down}_proj": (K, K) float64}.
    """
    if model.recipe is not None:
        raise ValueError("model: expected the high-precision model (recipe None)")
    tokens = np.asarray(tokens, np.int32).ravel()
    window = min(int(window), len(tokens))
    if window < 1:
        raise ValueError("tokens: expected at least one calibration token")
    fn = _hessian_fn(model)
    sums: dict[str, np.ndarray] = {}
    count = 0
    for start in range(0, len(tokens) - window + 1, window):
        tree = fn(params, jnp.asarray(tokens[None, start:start + window]))
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            keys = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
            name = "/".join(k for k in keys if k != "xtx")
            sums[name] = sums.get(name, 0.0) + np.asarray(leaf, np.float64)
        count += window
    return {k: v / count for k, v in sums.items()}


def hessian_for(hessians: dict, kernel_path: str) -> np.ndarray:
    """The Hessian for a kernel path like 'layers_3/self_attn/k_proj/kernel'."""
    m = _KERNEL_RE.match(kernel_path)
    if not m:
        raise ValueError(f"kernel_path: expected 'layers_N/(self_attn|mlp)/X_proj/kernel', got {kernel_path!r}")
    layer, block, proj = m.groups()
    key = f"{layer}/{block}/{INPUT_OWNER[proj]}"
    if key not in hessians:
        raise ValueError(f"hessians: no statistics for {key!r} (needed by {kernel_path!r})")
    return hessians[key]


def _flat(params, prefix=()):
    for k, v in params.items():
        if isinstance(v, dict) or (hasattr(v, "items") and not isinstance(v, jfp8.QArray)):
            yield from _flat(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _rebuild(params, fn, prefix=()):
    out = {}
    for k, v in params.items():
        if isinstance(v, dict) or (hasattr(v, "items") and not isinstance(v, jfp8.QArray)):
            out[k] = _rebuild(v, fn, prefix + (k,))
        else:
            out[k] = fn("/".join(prefix + (k,)), v)
    return out


def gptq_params(params, recipe: jfp8.Recipe, hessians: dict, *, damp: float = 0.01,
                act_order: bool = True, layers=None) -> dict:
    """Quantize the decoder's linear kernels (K, N) with `jfp8.calibrate.gptq_quantize`.

    The recipe decides granularity per path (overrides, keep_high_precision) exactly as
    `jfp8.quantize_params` does; kernels it keeps in high precision stay as they are.
    layers: optional set of 'layers_i' names to quantize (others stay high precision).
    Returns a params tree with QArray (N, K) kernels.
    """
    # One GPTQ sweep per input: q/k/v together, gate/up together (rows are independent given H).
    todo: dict[str, list[tuple[str, np.ndarray, object]]] = {}
    for path_t, leaf in _flat(params):
        path = "/".join(path_t)
        m = _KERNEL_RE.match(path)
        if not m or isinstance(leaf, jfp8.QArray):
            continue
        if layers is not None and m.group(1) not in layers:
            continue
        gran = recipe.weight_granularity_for(path)
        if gran is None:
            continue
        key = f"{m.group(1)}/{m.group(2)}/{INPUT_OWNER[m.group(3)]}"
        todo.setdefault(key, []).append((path, np.asarray(leaf, np.float32).T, gran))
    done = {}
    for key, group in todo.items():
        qs = calibrate.gptq_quantize_group([w for _, w, _ in group], hessian_for(hessians, group[0][0]),
                                           recipe.weight_format, [g for _, _, g in group],
                                           damp=damp, act_order=act_order)
        done.update({path: q for (path, _, _), q in zip(group, qs)})
    return _rebuild(params, lambda path, leaf: done.get(path, leaf))


def layer_names(params) -> list[str]:
    return sorted({p[0] for p, _ in _flat(params) if re.fullmatch(r"layers_\d+", p[0])},
                  key=lambda s: int(s.split("_")[1]))


def layer_linear_bytes(params, bytes_per_elem: int = 2) -> dict[str, int]:
    """High-precision bytes of each layer's linear kernels."""
    out: dict[str, int] = {}
    for path, leaf in _flat(params):
        p = "/".join(path)
        if _KERNEL_RE.match(p):
            out[path[0]] = out.get(path[0], 0) + int(np.prod(leaf.shape)) * bytes_per_elem
    return out


def layer_sensitivity(evaluator, eval_recipe, tokens, *, hessians=None, window: int = 1024) -> dict:
    """KL(high precision || only layer i in FP8) on `tokens`, for each decoder layer i.

    Only that layer's linear weights (and, for W8A8 recipes, their input activations) are FP8;
    the KV cache stays high precision, so the number is the layer's own contribution.
    """
    from models.eval import windows_of
    w = windows_of(tokens, min(window, len(tokens)))
    ref = evaluator.reference(w.ravel(), w.shape[1])
    er = dataclasses.replace(eval_recipe, kv_format=None, kv_scaling=None, fallback_budget=0.0)
    out = {}
    for layer in layer_names(evaluator.params):
        only = jfp8.Recipe(**{**{f.name: getattr(er.recipe, f.name)
                                 for f in dataclasses.fields(er.recipe)},
                              "overrides": ((rf"^(?!{layer}/)", None),) + er.recipe.overrides})
        if er.calibrate and hessians is not None:
            params = gptq_params(evaluator.params, only, hessians, layers={layer})
        else:
            params = jfp8.quantize_params(evaluator.params, only)
        _, _, kl = evaluator.stats(er, params, ref.windows, ref)
        out[layer] = float(kl.mean())
    return out


def choose_fallback(sensitivity: dict, params, budget: float) -> list[str]:
    """The layers to keep in high precision: most KL per byte first, within `budget` (a
    fraction of all linear-weight bytes)."""
    if not 0.0 <= budget <= 1.0:
        raise ValueError(f"budget: expected a fraction in [0, 1], got {budget}")
    sizes = layer_linear_bytes(params)
    total = sum(sizes.values())
    chosen, used = [], 0
    for layer in sorted(sensitivity, key=lambda l: -sensitivity[l] / sizes[l]):
        if used + sizes[layer] <= budget * total:
            chosen.append(layer)
            used += sizes[layer]
    return chosen


def with_fallback(recipe: jfp8.Recipe, layers) -> jfp8.Recipe:
    """`recipe` with each named layer's linear weights kept in high precision (overrides -> None).

    The overrides are path regexes, so `jfp8.quantize_params`, `models.checkpoint.params_from_hf`
    and a saved recipe all honour them.
    """
    extra = tuple((rf"^{re.escape(l)}/", None) for l in layers)
    return dataclasses.replace(recipe, overrides=extra + tuple(recipe.overrides))
