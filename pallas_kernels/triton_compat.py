"""What the Triton-lowered kernels need from Pallas' Triton backend, in one place.

The backend module and its compiler-params class moved between jax releases (`CompilerParams`
today, `TritonCompilerParams` before); masked loads and stores exist only there. Kernels import
these helpers instead of probing jax themselves.
"""
from __future__ import annotations

try:
    from jax.experimental.pallas import triton as pltriton
except ImportError:  # pragma: no cover - a jax without the Triton backend
    pltriton = None


def compiler_params(*, num_warps: int, num_stages: int) -> dict:
    """Keyword arguments for `pl.pallas_call` that set warps and pipeline stages ({} without Triton)."""
    if pltriton is None:  # pragma: no cover
        return {}
    cls = getattr(pltriton, "CompilerParams", None) or getattr(pltriton, "TritonCompilerParams")
    return {"compiler_params": cls(num_warps=num_warps, num_stages=num_stages)}


def load(ref, mask=None, other=None):
    """ref[...], masked where `mask` is given. Triton cannot build an FP8 `other`: pass None
    for FP8 refs and zero the masked-off lanes after the upcast."""
    if mask is None:
        return ref[...]
    return pltriton.load(ref, mask=mask, other=other)


def store(ref, value, mask=None):
    """ref[...] = value, masked where `mask` is given."""
    if mask is None:
        ref[...] = value
    else:
        pltriton.store(ref, value, mask=mask)


def cta_barrier():
    """Synchronise the threads of one program (bar.sync): global stores before it are visible
    to the program's loads after it (CUDA's __syncthreads). Not for interpret mode."""
    pltriton.debug_barrier()
