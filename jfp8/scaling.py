"""Scaling granularities and scale rules.

A granularity is a value, not a code path: each one resolves to a *block shape* over the array,
and one set of functions handles them all. The scale array always has the data's rank, with
shape ceil(data.shape / block):

    PerTensor()            block = the whole array          (M, K) -> scale (1, 1)
    PerChannel(axis)       block 1 along `axis`, whole else (N, K), axis 0 -> scale (N, 1)
    PerBlock((1, 128))     activations per token group      (M, K) -> scale (M, ceil(K/128))
    PerBlock((128, 128))   weights, DeepSeek-V3 / DeepGEMM   (N, K) -> (ceil(N/128), ceil(K/128))
    PerBlock((1, 32))      MX-style groups

Scale convention (one, everywhere): x ≈ data.astype(f32) * scale, scale = amax / fmax in f32
(computed as amax * f32(1 / fmax)).
amax == 0 gives scale 1. Non-finite values are left out of the amax, so one inf or NaN only
saturates (inf) or stays NaN itself and never poisons the scale of its block or of others.

How the scale is chosen is separate from the granularity: current (`compute_scale`: this tensor's
amax), static (a given scale), delayed (`DelayedScaling`: amax history, the TransformerEngine
recipe, as pure functions from state to state).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jfp8.formats import Format, as_format

# The smallest scale we ever produce: a normal f32, so 1 / scale is finite (2**126 at most).
_MIN_SCALE = float(np.finfo(np.float32).tiny)


@dataclasses.dataclass(frozen=True)
class PerTensor:
    """One scale for the whole array."""

    def block_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(max(int(d), 1) for d in shape)


@dataclasses.dataclass(frozen=True)
class PerChannel:
    """One scale per index along `axis` (rowwise for axis 0 of an (N, K) weight)."""

    axis: int = 0

    def block_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        rank = len(shape)
        if not isinstance(self.axis, (int, np.integer)) or not -rank <= self.axis < rank:
            raise ValueError(f"granularity: PerChannel axis {self.axis!r} out of range for rank {rank}")
        axis = self.axis % rank
        return tuple(1 if i == axis else max(int(d), 1) for i, d in enumerate(shape))


@dataclasses.dataclass(frozen=True)
class PerBlock:
    """One scale per block of `block_shape` (same rank as the array, or shorter: then it applies
    to the trailing axes and leading axes get blocks of 1)."""

    block: tuple[int, ...]

    def __init__(self, block_shape: Sequence[int]):
        try:
            block = tuple(int(b) for b in block_shape)
        except TypeError:
            raise TypeError(f"block_shape: expected a tuple of ints, got {block_shape!r}") from None
        if not block or any(b <= 0 for b in block):
            raise ValueError(f"block_shape: expected positive sizes, got {block_shape!r}")
        object.__setattr__(self, "block", block)

    def block_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        if len(self.block) > len(shape):
            raise ValueError(
                f"granularity: PerBlock{self.block} has rank {len(self.block)}, the array has rank "
                f"{len(shape)} (shape {tuple(shape)})")
        return (1,) * (len(shape) - len(self.block)) + self.block

    def __repr__(self) -> str:
        return f"PerBlock({self.block})"


Granularity = PerTensor | PerChannel | PerBlock


def as_granularity(granularity) -> Granularity:
    if isinstance(granularity, (PerTensor, PerChannel, PerBlock)):
        return granularity
    raise TypeError(
        f"granularity: expected jfp8.PerTensor(), PerChannel(axis) or PerBlock(shape), got {granularity!r}")


def scale_shape(shape: Sequence[int], granularity: Granularity) -> tuple[int, ...]:
    """Shape of the scale array for data of `shape`: ceil(shape / block), same rank."""
    block = granularity.block_shape(shape)
    return tuple(math.ceil(d / b) if d else 0 for d, b in zip(shape, block))


def _blocked(x: jax.Array, block: tuple[int, ...], pad_value) -> jax.Array:
    """View x as (n0, b0, n1, b1, ...), padding each axis up to a multiple of its block."""
    pads = [(0, (-d) % b) for d, b in zip(x.shape, block)]
    if any(p for _, p in pads):
        x = jnp.pad(x, pads, constant_values=pad_value)
    split = []
    for d, b in zip(x.shape, block):
        split += [d // b, b]
    return x.reshape(split)


def block_amax(x: jax.Array, granularity: Granularity) -> jax.Array:
    """max |x| over each block, finite values only, f32, shape `scale_shape(x.shape, ...)`."""
    x = jnp.asarray(x)
    block = granularity.block_shape(x.shape)
    if x.ndim == 0:
        a = jnp.abs(x.astype(jnp.float32))
        return jnp.where(jnp.isfinite(a), a, 0.0)
    a = jnp.abs(x.astype(jnp.float32))
    a = jnp.where(jnp.isfinite(a), a, 0.0)
    if a.size == 0:
        return jnp.zeros(scale_shape(x.shape, granularity), jnp.float32)
    blocked = _blocked(a, block, 0.0)
    return jnp.max(blocked, axis=tuple(range(1, blocked.ndim, 2)))


def reciprocal(scale: jax.Array) -> jax.Array:
    """1 / scale in f32, rounded once (an IEEE division on the scale array itself).

    Quantization computes x * reciprocal(scale), not x / scale: XLA rewrites a division by a
    broadcast scale into exactly this multiply on some paths and not on others (the two differ
    when x / scale lands within an ulp of an FP8 rounding midpoint), so the library writes the
    multiply itself and every backend (XLA, the Pallas kernels, numpy) computes the same bits.
    """
    return jnp.float32(1.0) / jnp.asarray(scale, jnp.float32)


def scale_from_amax(amax: jax.Array, fmt: Format, margin: int | float = 0) -> jax.Array:
    """scale = amax * 2**margin / fmax in f32; amax 0 (or non-finite) gives 1.

    Computed as amax * f32(2**margin / fmax), one f32 multiply, so every backend (XLA folds a
    division by a constant into this multiply anyway, kernels, numpy) gets the same bits.
    """
    fmt = as_format(fmt)
    amax = jnp.asarray(amax, jnp.float32)
    scale = amax * jnp.float32(2.0 ** margin / fmt.max)
    ok = jnp.isfinite(amax) & (amax > 0)
    return jnp.where(ok, jnp.maximum(scale, _MIN_SCALE), jnp.float32(1.0))


def compute_scale(x: jax.Array, fmt, granularity: Granularity, margin: int | float = 0) -> jax.Array:
    """Current scaling: this tensor's own amax per block. Returns f32 of `scale_shape`."""
    return scale_from_amax(block_amax(x, as_granularity(granularity)), fmt, margin)


def expand_scale(scale: jax.Array, shape: Sequence[int], granularity: Granularity) -> jax.Array:
    """Repeat a per-block scale to the data's shape (slicing off block padding)."""
    block = granularity.block_shape(shape)
    out = scale
    for axis, b in enumerate(block):
        if b > 1 and out.shape[axis] > 0:
            out = jnp.repeat(out, b, axis=axis, total_repeat_length=out.shape[axis] * b)
    return out[tuple(slice(0, d) for d in shape)] if len(shape) else out


# ---------------------------------------------------------------------------------------------
# Delayed scaling (TransformerEngine recipe): the scale used at step t comes from the amax of the
# previous `history` steps, so the cast needs no reduction over the current tensor first.


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DelayedScalingState:
    """amax_history: (L, *scale_shape) f32, newest first. scale: the scale to use next."""

    amax_history: jax.Array
    scale: jax.Array


def delayed_scaling_init(history: int, scale_shape_: Sequence[int] = ()) -> DelayedScalingState:
    if int(history) < 1:
        raise ValueError(f"history: expected >= 1, got {history}")
    return DelayedScalingState(
        amax_history=jnp.zeros((int(history), *scale_shape_), jnp.float32),
        scale=jnp.ones(tuple(scale_shape_), jnp.float32),
    )


def delayed_scaling_update(state: DelayedScalingState, amax: jax.Array, fmt, *, margin: int | float = 0,
                           algorithm: str = "max") -> DelayedScalingState:
    """Push this step's amax into the history and derive the next scale from it.

    algorithm "max" takes the max over the history (TE default), "most_recent" the newest amax.
    A non-finite amax is recorded as 0 so it cannot poison later steps.
    """
    amax = jnp.asarray(amax, jnp.float32)
    amax = jnp.where(jnp.isfinite(amax), amax, 0.0)
    history = jnp.roll(state.amax_history, 1, axis=0).at[0].set(amax)
    if algorithm == "max":
        amax_used = jnp.max(history, axis=0)
    elif algorithm == "most_recent":
        amax_used = history[0]
    else:
        raise ValueError(f"algorithm: expected 'max' or 'most_recent', got {algorithm!r}")
    # An all-zero history keeps the previous scale rather than jumping to 1.
    new_scale = jnp.where(amax_used > 0, scale_from_amax(amax_used, fmt, margin), state.scale)
    return DelayedScalingState(amax_history=history, scale=new_scale)
