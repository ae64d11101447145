"""Calibration statistics from a decoder, GPTQ'd FP8 params, sensitivity and BF16 fallback.

    hs = collect_hessians(model, params, calib_tokens)            # {"layers_0/self_attn/q_proj": H}
    params8 = gptq_params(params, jfp8.Recipe.block128(), hs)     # QArray kernels, same format
    sens = sensitivity(evaluator, eval_recipe, calib_tokens, unit="projection", hessians=hs)
                                                     # {"layers_0/self_attn/qkv_proj": KL, ...}
    keep = choose_fallback(sens, params, budget=0.10)              # best units within 10% bytes
    recipe = with_fallback(jfp8.Recipe.block128(), keep)           # per-path overrides -> None
    fallback_patterns(keep)                                        # the `jfp8 quantize --keep` regexes

The rounding of one weight given its statistics is `jfp8.calibrate`; this module only knows
where the statistics come from: the input of every linear layer of `models.llama.Llama`, taken
with a Flax method interceptor during a high-precision forward over calibration text (the
Hessian x^T x is summed inside the jitted forward, so no activations leave the device).
Layers that share an input (q/k/v, gate/up) share one Hessian.

Fallback units are whole layers or a layer's four matmuls (qkv, o, gate_up, down): one
projection often carries most of a layer's KL at a fraction of its bytes, and q/k/v (gate/up)
stay together so the kept model still fuses them into one matmul.
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


SENSITIVITY_UNITS = ("layer", "projection")
# Linears that read one input and run as one matmul in a fused model (`models.llama.fuse`):
# a fallback unit keeps all of them or none, so the kept model still fuses, and a W8A8
# recipe's one quantized input serves all of them.
_GROUPS = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
           "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}
_MEMBERS = {"qkv_proj": "(?:q|k|v|qkv)_proj", "gate_up_proj": "(?:gate|up|gate_up)_proj"}


def fallback_units(params, unit: str = "layer") -> dict[str, list[str]]:
    """The units a fallback chooses from: name -> the kernel paths it covers.

    unit "layer": 'layers_3' (all seven linears of the layer); "projection": the layer's four
    matmuls as a fused model runs them, 'layers_3/self_attn/qkv_proj' (q, k, v),
    'layers_3/self_attn/o_proj', 'layers_3/mlp/gate_up_proj' (gate, up), 'layers_3/mlp/down_proj'.
    `with_fallback` keeps exactly a unit's kernels in high precision, fused or not.
    """
    if unit not in SENSITIVITY_UNITS:
        raise ValueError(f"unit: expected one of {SENSITIVITY_UNITS}, got {unit!r}")
    out: dict[str, list[str]] = {}
    for path_t, _ in _flat(params):
        path = "/".join(path_t)
        m = _KERNEL_RE.match(path)
        if m:
            layer, block, proj = m.groups()
            name = layer if unit == "layer" else f"{layer}/{block}/{_GROUPS.get(proj, proj)}"
            out.setdefault(name, []).append(path)
    return out


def fallback_patterns(names) -> list[str]:
    """Path regexes (recipe overrides, `jfp8 quantize --keep`) for fallback unit names: a layer
    'layers_3', a projection 'layers_3/mlp/down_proj', or a fused group 'layers_3/self_attn/qkv_proj'
    (matches q/k/v_proj and qkv_proj)."""
    out = []
    for name in names:
        head, _, last = name.rpartition("/")
        if last in _MEMBERS:
            out.append(rf"^{re.escape(head)}/{_MEMBERS[last]}/")
        else:
            out.append(rf"^{re.escape(name)}/")
    return out


def _kernel_sizes(params) -> dict[str, int]:
    return {"/".join(p): int(np.prod(leaf.shape)) for p, leaf in _flat(params)
            if _KERNEL_RE.match("/".join(p))}


def _unit_elements(params, names) -> dict[str, int]:
    sizes = _kernel_sizes(params)
    out = {}
    for name, pattern in zip(names, fallback_patterns(names)):
        out[name] = sum(n for path, n in sizes.items() if re.search(pattern, path))
        if out[name] == 0:
            raise ValueError(f"sensitivity: {name!r} names no linear kernel of params")
    return out


def _masked_kl_fn(model, act_recipe):
    """jit: (params, alt {path: (K, N)}, mask {path: 0/1}, tokens (B, T), ref_logp) -> KL (B, T-1).

    Every linear `path` of the high-precision model runs with kernel alt[path] and (W8A8)
    activations quantized per `act_recipe` where mask[path] is 1, as itself where 0: one
    compiled forward serves every choice of units, so a sensitivity sweep compiles once. The
    FP8 arithmetic is the CPU path of `jfp8.ops.matmul` (dequantized operands, f32 dot).
    """
    from flax import linen as nn

    from jfp8.ops import quantize_activations

    def fn(params, alt, mask, tokens, ref_logp):
        def interceptor(next_fun, args, kwargs, context):
            mod = context.module
            path = "/".join(mod.path)
            if context.method_name != "__call__" or not isinstance(mod, nn.Dense) or path not in alt:
                return next_fun(*args, **kwargs)
            x, on = args[0], mask[path] > 0
            kernel = jnp.where(on, alt[path], mod.get_variable("params", "kernel"))
            if act_recipe is not None and act_recipe.act_format is not None:
                x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
                xq = quantize_activations(x2, act_recipe).dequantize(jnp.float32).reshape(x.shape)
                x = jnp.where(on, xq.astype(x.dtype), x)
            dtype = mod.dtype or x.dtype
            y = jnp.dot(x.astype(dtype), kernel.astype(dtype), precision=jax.lax.Precision.HIGHEST,
                        preferred_element_type=jnp.float32)
            if mod.use_bias:
                y = y + mod.get_variable("params", "bias").astype(jnp.float32)
            return y.astype(dtype)

        B, T = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        with nn.intercept_methods(interceptor):
            logits, _ = model.apply({"params": params}, tokens, positions, None, None, "forward")
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
        return jnp.sum(jnp.exp(ref_logp) * (ref_logp - logp), axis=-1)

    return jax.jit(fn)


def sensitivity(evaluator, eval_recipe, tokens, *, unit: str = "layer", hessians=None,
                qparams=None, window: int = 1024) -> dict[str, float]:
    """KL(high precision || only this unit in FP8) on `tokens`, for each fallback unit.

    unit: "layer" or "projection" (`fallback_units`). Only the unit's linear weights (and, for
    W8A8 recipes, their input activations) are FP8, rounded as the row rounds them (GPTQ with
    `hessians` when eval_recipe.calibrate, else round-to-nearest); the KV cache stays high
    precision, so the number is the unit's own contribution. All weights are rounded once (GPTQ
    per layer reads only high-precision statistics, so rounding all at once is the same as one
    at a time) and one compiled forward runs every unit; or pass them rounded already as
    `qparams` (the FP8 params of the whole model by eval_recipe's recipe). Returns
    {unit name: mean KL}.
    """
    from models.eval import windows_of
    w = windows_of(tokens, min(window, len(tokens)))
    er = dataclasses.replace(eval_recipe, kv_format=None, kv_scaling=None, fallback_budget=0.0)
    if er.recipe is None:
        raise ValueError(f"eval_recipe: {er.name!r} has no FP8 recipe to measure")
    units = fallback_units(evaluator.params, unit)
    if qparams is None:
        qparams = (gptq_params(evaluator.params, er.recipe, hessians)
                   if er.calibrate and hessians is not None
                   else jfp8.quantize_params(evaluator.params, er.recipe))
    alt = {path[: -len("/kernel")]: jnp.asarray(leaf.dequantize(jnp.float32)).T
           for path, leaf in ((("/".join(p)), v) for p, v in _flat(qparams))
           if isinstance(leaf, jfp8.QArray) and _KERNEL_RE.match(path)}
    ref = evaluator.reference(w.ravel(), w.shape[1])
    fn = _masked_kl_fn(evaluator.model, er.recipe)
    out = {}
    for name, paths in units.items():
        on = {p[: -len("/kernel")] for p in paths}
        if not on & alt.keys():
            continue  # the recipe keeps this unit in high precision anyway
        mask = {k: jnp.float32(k in on) for k in alt}
        kl = [fn(evaluator.params, alt, mask, jnp.asarray(w[i:i + 1]), ref.logp[i])
              for i in range(len(w))]
        out[name] = float(np.mean([np.asarray(k) for k in kl]))
    return out


def choose_fallback(sensitivity: dict, params, budget: float) -> list[str]:
    """The units to keep in high precision: the set with the largest summed KL whose linear
    weights fit in `budget` (a fraction of all linear-weight bytes), an exact 0/1 knapsack.

    sensitivity: {unit name: KL} from `sensitivity` (layers or projections; a name is a path
    prefix). Returns the chosen names, largest KL first.
    """
    if not 0.0 <= budget <= 1.0:
        raise ValueError(f"budget: expected a fraction in [0, 1], got {budget}")
    names = [n for n in sensitivity if sensitivity[n] > 0]
    sizes = _unit_elements(params, names)
    total = sum(_kernel_sizes(params).values())
    cap_elems = budget * total
    # Knapsack over sizes in units of their gcd; a coarser grid (sizes rounded up, so never over
    # budget) if that would be too fine.
    quantum = int(np.gcd.reduce([sizes[n] for n in names])) if names else 1
    quantum = max(quantum, int(np.ceil(cap_elems / 100_000)))
    cap = int(np.floor(cap_elems / quantum + 1e-9))
    cost = [-(-sizes[n] // quantum) for n in names]
    best = np.zeros(cap + 1)
    take = np.zeros((len(names), cap + 1), bool)
    for i, n in enumerate(names):
        c = cost[i]
        if c > cap:
            continue
        cand = best[:cap + 1 - c] + sensitivity[n]
        better = cand > best[c:]
        take[i, c:] = better
        best[c:] = np.where(better, cand, best[c:])
    chosen, room = [], cap
    for i in range(len(names) - 1, -1, -1):
        if take[i, room]:
            chosen.append(names[i])
            room -= cost[i]
    return sorted(chosen, key=lambda n: -sensitivity[n])


def with_fallback(recipe: jfp8.Recipe, units) -> jfp8.Recipe:
    """`recipe` with each named unit's linear weights kept in high precision (overrides -> None).

    units: layer, projection or fused-group names (`fallback_units`, `choose_fallback`). The
    overrides are path regexes (`fallback_patterns`), so `jfp8.quantize_params`,
    `models.checkpoint.params_from_hf` and a saved recipe all honour them.
    """
    extra = tuple((p, None) for p in fallback_patterns(units))
    return dataclasses.replace(recipe, overrides=extra + tuple(recipe.overrides))
