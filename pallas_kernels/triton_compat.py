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


# ---------------------------------------------------------------------------------------------
# Software pipelining of loops without a dot.
#
# Triton's pipeliner (AssignLatencies) streams a loop's loads through shared memory with cp.async
# only for loads that feed a dot, unless the loop itself carries a `tt.num_stages` attribute
# (what `tl.range(..., num_stages=n)` sets in Triton's Python frontend); then every wide enough
# load in a dot-free loop is pipelined. Pallas has no way to set it, so kernels that want it get a
# name from `pipelined_loops_name`, and a hook on Pallas' Triton lowering sets the attribute on
# every scf.for of the kernels so named (and of no other kernel).
_LOOP_STAGES: dict[str, int] = {}


def pipelined_loops_name(name: str, num_stages: int) -> str:
    """A `pl.pallas_call` name under which the kernel's loops carry `tt.num_stages = num_stages`
    (loads in dot-free loops pipelined `num_stages - 1` iterations ahead). `name` for
    num_stages <= 1 or where the hook cannot be installed."""
    if num_stages <= 1 or not _install_loop_stages_hook():
        return name
    tagged = f"{name}_pipelined{num_stages}"
    _LOOP_STAGES[tagged] = num_stages
    return tagged


_HOOKED = []


def _install_loop_stages_hook() -> bool:
    if _HOOKED:
        return _HOOKED[0]
    try:
        from jax._src.lib.mlir import ir
        from jax._src.pallas.triton import lowering
        original = lowering.lower_jaxpr_to_triton_module
    except (ImportError, AttributeError):  # pragma: no cover - another jax layout
        _HOOKED.append(False)
        return False

    def set_stages(op, attr):
        for region in op.regions:
            for block in region.blocks:
                for inner in block.operations:
                    inner = inner.operation
                    if inner.name == "scf.for":
                        inner.attributes["tt.num_stages"] = attr
                    set_stages(inner, attr)

    def lower_with_loop_stages(jaxpr, *args, **kwargs):
        result = original(jaxpr, *args, **kwargs)
        stages = _LOOP_STAGES.get(getattr(jaxpr.debug_info, "func_name", None))
        if stages:
            module = result.module
            with module.context:
                set_stages(module.operation,
                           ir.IntegerAttr.get(ir.IntegerType.get_signless(32), stages))
        return result

    lowering.lower_jaxpr_to_triton_module = lower_with_loop_stages
    _HOOKED.append(True)
    return True
