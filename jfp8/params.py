"""Whole param trees to FP8: `quantize_params` and its `quantization_summary`.

    params8 = jfp8.quantize_params(params, jfp8.Recipe.block128())
    print(jfp8.quantization_summary(params, params8))     # bytes before/after, per-layer error

Which leaves become FP8 is decided by rules on the '/'-joined path of each leaf (e.g.
"layers_3/mlp/down_proj/kernel"), in this order:

  1. `include` (regex, list of regexes, or predicate(path, leaf) -> bool) must match; default:
     leaves named `kernel` (Flax's Dense / FP8Dense weight).
  2. overrides, first match wins: `overrides=` given here, then `recipe.overrides`. Each maps a
     path regex to a Granularity (e.g. PerChannel(0) for an outlier-heavy layer), a Recipe (its
     weight format and granularity), or None (keep that layer in high precision).
  3. `exclude` (same forms as include) and `recipe.keep_high_precision` keep a leaf in high
     precision: norms, embeddings, routers and the lm_head by default.
  4. Only 2-D floating leaves (K, N) are quantized (`stacked=True` also takes (..., K, N) stacks
     of layers, e.g. from `nn.scan`, with one set of scales per layer).

A quantized `kernel` (K, N) = (in, out) becomes a `jfp8.QArray` of shape (N, K) = (out, in):
transposed once, here, so FP8 GEMMs read both operands K-major (`jfp8.nn.FP8Dense` and
`jfp8.matmul` expect this). Everything else is returned unchanged, in the same nesting.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jfp8.formats import Format
from jfp8.metrics import QuantizationError, quantization_error
from jfp8.qarray import QArray, quantize
from jfp8.recipe import Recipe
from jfp8.scaling import Granularity, PerBlock, PerChannel, PerTensor

DEFAULT_INCLUDE = r"(^|/)kernel$"

PathRule = str | Sequence[str] | Callable[[str, Any], bool] | None


def _rule(rule: PathRule, name: str) -> Callable[[str, Any], bool]:
    """Compile a path rule (regex, list of regexes, predicate or None) to a predicate."""
    if rule is None:
        return lambda path, leaf: False
    if callable(rule):
        return rule
    if isinstance(rule, str):
        rule = [rule]
    try:
        patterns = [re.compile(p) for p in rule]
    except (TypeError, re.error) as e:
        raise TypeError(f"{name}: expected a regex, a list of regexes or a predicate(path, leaf), "
                        f"got {rule!r} ({e})") from None
    return lambda path, leaf: any(p.search(path) for p in patterns)


def _override_list(overrides) -> list[tuple[str, Any]]:
    if overrides is None:
        return []
    items = list(overrides.items()) if isinstance(overrides, Mapping) else list(overrides)
    out = []
    for item in items:
        try:
            pattern, target = item
            re.compile(pattern)
        except (TypeError, ValueError, re.error):
            raise TypeError(f"overrides: expected {{path regex: Granularity | Recipe | None}} or "
                            f"[(regex, ...), ...], got entry {item!r}") from None
        if target is not None and not isinstance(target, (PerTensor, PerChannel, PerBlock, Recipe)):
            raise TypeError(f"overrides: target for {pattern!r} must be a Granularity, a Recipe or "
                            f"None, got {target!r}")
        out.append((pattern, target))
    return out


def _flatten(tree, prefix=()) -> list[tuple[tuple[str, ...], Any]]:
    if isinstance(tree, Mapping):
        out = []
        for k, v in tree.items():
            out += _flatten(v, prefix + (str(k),))
        return out
    return [(prefix, tree)]


def _rebuild(tree, fn, prefix=()):
    """Same nesting as `tree` (dicts, FrozenDicts as plain dicts), leaves replaced by fn(path, leaf)."""
    if isinstance(tree, Mapping):
        return {k: _rebuild(v, fn, prefix + (str(k),)) for k, v in tree.items()}
    return fn(prefix, tree)


def plan(params, recipe: Recipe | None = None, *, include: PathRule = DEFAULT_INCLUDE,
         exclude: PathRule = None, overrides=None, stacked: bool = False
         ) -> dict[str, tuple[Format, Granularity] | None]:
    """Decide, without quantizing, what each leaf becomes: {path: (format, granularity) or None}."""
    recipe = Recipe.block128() if recipe is None else recipe
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe: expected a jfp8.Recipe, got {recipe!r}")
    if not isinstance(params, Mapping):
        raise TypeError(f"params: expected a nested dict of arrays (a Flax param tree), "
                        f"got {type(params).__name__}")
    included = _rule(include, "include")
    excluded = _rule(exclude, "exclude")
    rules = _override_list(overrides) + list(recipe.overrides)
    out = {}
    for keys, leaf in _flatten(params):
        path = "/".join(keys)
        out[path] = None
        if isinstance(leaf, QArray) or not included(path, leaf):
            continue
        shape = np.shape(leaf)
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            continue
        if len(shape) != 2 and not (stacked and len(shape) > 2):
            continue
        fmt, gran, decided = recipe.weight_format, recipe.weight_granularity, False
        for pattern, target in rules:
            if re.search(pattern, path):
                decided = True
                if target is None:
                    fmt = None
                elif isinstance(target, Recipe):
                    fmt, gran = target.weight_format, target.weight_granularity
                else:
                    gran = target
                break
        if not decided and (excluded(path, leaf) or
                            any(re.search(p, path) for p in recipe.keep_high_precision)):
            fmt = None
        if fmt is not None:
            out[path] = (fmt, gran)
    return out


@functools.partial(jax.jit, static_argnums=(1, 2))
def _quantize_kernel(kernel, fmt: Format, gran: Granularity) -> QArray:
    if kernel.ndim == 2:
        return quantize(kernel.T, fmt, gran)
    # A stack (..., K, N): one QArray with the leading axes on data and scale alike.
    flat = kernel.reshape(-1, *kernel.shape[-2:])
    q = jax.vmap(lambda w: quantize(w.T, fmt, gran))(flat)
    lead = kernel.shape[:-2]
    return QArray(data=q.data.reshape(*lead, *q.data.shape[1:]),
                  scale=q.scale.reshape(*lead, *q.scale.shape[1:]), format=q.format,
                  granularity=q.granularity)


def quantize_params(params, recipe: Recipe | None = None, *, include: PathRule = DEFAULT_INCLUDE,
                    exclude: PathRule = None, overrides=None, stacked: bool = False):
    """Quantize the linear kernels of a Flax param tree to FP8.

    Args:
      params: nested dict (or FrozenDict) of arrays, e.g. `variables["params"]`.
      recipe: weight format and granularity, `keep_high_precision` and `overrides`
        (default `Recipe.block128()`).
      include: which leaves are candidates (regex / list / predicate(path, leaf)); default
        leaves named `kernel`.
      exclude: extra leaves to keep in high precision, on top of `recipe.keep_high_precision`.
      overrides: {path regex: Granularity | Recipe | None}, checked before the recipe's own.
      stacked: also quantize (..., K, N) stacks of kernels (scanned layers), per layer.
    Returns: a tree of the same nesting (plain dicts); each quantized kernel (K, N) is a QArray
      (N, K). Use `quantization_summary(params, params8)` for bytes and per-layer error.
    """
    decisions = plan(params, recipe, include=include, exclude=exclude, overrides=overrides,
                     stacked=stacked)

    def convert(keys, leaf):
        decision = decisions["/".join(keys)]
        return leaf if decision is None else _quantize_kernel(leaf, *decision)

    return _rebuild(params, convert)


# -- summary --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LayerSummary:
    """One leaf: path, shape (as stored before), what it became, bytes, and its error if FP8."""

    path: str
    shape: tuple[int, ...]
    kind: str                 # "e4m3 PerBlock((128, 128))" or "kept bfloat16"
    bytes_before: int
    bytes_after: int
    error: QuantizationError | None


@dataclasses.dataclass(frozen=True)
class QuantizationSummary:
    """What `quantize_params` did to a tree. `str()` gives a table."""

    layers: tuple[LayerSummary, ...]

    @property
    def bytes_before(self) -> int:
        return sum(l.bytes_before for l in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(l.bytes_after for l in self.layers)

    @property
    def num_quantized(self) -> int:
        return sum(l.error is not None for l in self.layers)

    def worst(self, n: int = 5) -> list[LayerSummary]:
        """The n quantized layers with the lowest SQNR."""
        q = [l for l in self.layers if l.error is not None]
        return sorted(q, key=lambda l: l.error.sqnr_db)[:n]

    def __str__(self) -> str:
        lines = [f"{'path':<48} {'shape':<16} {'as':<30} {'MB before':>9} {'MB after':>9} "
                 f"{'SQNR dB':>8} {'mean rel':>9} {'clipped':>8}"]
        for l in self.layers:
            e = l.error
            err = (f"{e.sqnr_db:8.1f} {e.mean_rel_error:9.4f} {e.frac_clipped:8.1e}" if e else "")
            lines.append(f"{l.path:<48} {str(l.shape):<16} {l.kind:<30} "
                         f"{l.bytes_before / 1e6:9.3f} {l.bytes_after / 1e6:9.3f} {err}")
        lines.append(f"total: {self.bytes_before / 1e6:.3f} MB -> {self.bytes_after / 1e6:.3f} MB "
                     f"({self.bytes_after / max(self.bytes_before, 1):.2%}), "
                     f"{self.num_quantized} of {len(self.layers)} leaves in FP8")
        return "\n".join(lines)


def _nbytes(leaf) -> int:
    if isinstance(leaf, QArray):
        return leaf.nbytes
    return int(np.prod(np.shape(leaf))) * np.dtype(getattr(leaf, "dtype", np.float32)).itemsize


def quantization_summary(params, params8, *, errors: bool = True) -> QuantizationSummary:
    """Compare a tree with its quantized version: bytes and `jfp8.quantization_error` per layer.

    The error is measured against the scales actually stored in `params8` (errors=False skips it,
    which is faster on large models).
    """
    before = dict(_flatten(params))
    layers = []
    for keys, leaf8 in _flatten(params8):
        leaf = before.get(keys)
        path = "/".join(keys)
        if leaf is None:
            raise ValueError(f"params8: path {path!r} is not in params")
        if isinstance(leaf8, QArray) and not isinstance(leaf, QArray):
            kind = f"{leaf8.format.name} {leaf8.granularity!r}"
            err = None
            if errors:
                w = jnp.swapaxes(jnp.asarray(leaf), -1, -2)
                if w.ndim == 2:
                    err = quantization_error(w, leaf8.format, leaf8.granularity, scale=leaf8.scale)
                else:  # a stack: measure the layers as one tensor with the stored per-layer scales
                    err = _stack_error(w, leaf8)
        else:
            kind = f"kept {np.dtype(getattr(leaf8, 'dtype', np.float32)).name}" \
                if not isinstance(leaf8, QArray) else "already FP8"
            err = None
        layers.append(LayerSummary(path=path, shape=tuple(np.shape(leaf)), kind=kind,
                                   bytes_before=_nbytes(leaf), bytes_after=_nbytes(leaf8), error=err))
    return QuantizationSummary(layers=tuple(layers))


def _stack_error(w, q: QArray) -> QuantizationError:
    x64 = np.asarray(w, np.float64)
    xhat = np.asarray(q.dequantize(jnp.float32), np.float64)
    err = np.abs(xhat - x64)
    nz = x64 != 0
    noise = float(np.sum(err ** 2))
    sqnr = float("inf") if noise == 0 else 10 * np.log10(float(np.sum(x64 ** 2)) / noise)
    return QuantizationError(
        mean_rel_error=float(np.mean(err[nz] / np.abs(x64[nz]))) if nz.any() else 0.0,
        max_abs_error=float(err.max()) if err.size else 0.0, sqnr_db=sqnr,
        frac_clipped=float("nan"), frac_flushed=float(np.sum(nz & (xhat == 0))) / max(int(nz.sum()), 1))
