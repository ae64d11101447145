"""Version-checked shim: set Triton's `max_num_imprecise_acc` on FP8 `tt.dot` ops from Pallas.

Why (notes/h100.md, "Pallas (Triton lowering) FP8 matmul"): `jax/_src/pallas/triton/lowering.py`
emits `tt.dot` without `max_num_imprecise_acc`, so Triton takes its precise FP8 accumulation path
(a partial accumulator promoted after every wgmma K step): 419-494 TFLOP/s at 8192^3 instead of
~780 with `max_num_imprecise_acc=128`. There is no public Pallas knob, so this module wraps two
internals of the Pallas Triton lowering, and nothing else:

* `lowering.lower_jaxpr_to_triton_module` is wrapped so that, while a kernel whose name carries the
  tag written by `kernel_name(base, n)` is lowered, a thread-local holds `n`;
* `lowering.tt_dialect` is replaced by a proxy whose `dot` adds `max_num_imprecise_acc=n` to dots
  with FP8 operands while that thread-local is set. Every other attribute forwards to the real
  dialect module, and kernels without the tag lower exactly as before.

Opt-in per kernel, so other people's Pallas kernels in the same process are untouched. The shim
installs only on jax versions it was tested on (`TESTED_JAX`) and only when the internals still
have the expected shape; otherwise `install()` returns False, `status()` says why, and kernels
run unpatched (correct, slower). Interpret mode never lowers to Triton, so it is unaffected.
Set JFP8_TRITON_SHIM=0 to disable, JFP8_TRITON_SHIM=force to skip the version check.
"""
from __future__ import annotations

import inspect
import os
import re
import threading

import jax

#: jax (major, minor) versions whose Pallas Triton lowering this shim was checked against.
TESTED_JAX = ((0, 10), (0, 11))

_TAG = "_impacc"
_TAG_RE = re.compile(_TAG + r"(\d+)$")
_local = threading.local()
_status = "not installed"
_installed = False
_lock = threading.Lock()


def kernel_name(base: str, max_num_imprecise_acc: int | None) -> str:
  """Name for `pl.pallas_call(name=...)` that asks the shim for `max_num_imprecise_acc`."""
  if not max_num_imprecise_acc:
    return base
  return f"{base}{_TAG}{int(max_num_imprecise_acc)}"


def requested_imprecise_acc(name: str) -> int | None:
  """Inverse of `kernel_name`: the value encoded in a kernel name, or None."""
  match = _TAG_RE.search(name or "")
  return int(match.group(1)) if match else None


def _jax_version() -> tuple[int, int]:
  major, minor = jax.__version__.split(".")[:2]
  return int(major), int(minor)


class _DialectProxy:
  """Forwards to the real Triton dialect module; adds the attribute to tagged FP8 dots."""

  def __init__(self, dialect, ir):
    self._dialect = dialect
    self._ir = ir

  def __getattr__(self, name):
    return getattr(self._dialect, name)

  def dot(self, a, b, c, **kwargs):
    n = getattr(_local, "imprecise_acc", None)
    if n is not None and "max_num_imprecise_acc" not in kwargs:
      element_type = str(self._ir.RankedTensorType(a.type).element_type).lower()
      if "f8" in element_type:
        kwargs["max_num_imprecise_acc"] = n
    return self._dialect.dot(a, b, c, **kwargs)


def install() -> bool:
  """Installs the shim once; returns whether it is active. Never raises."""
  global _installed, _status
  with _lock:
    if _installed:
      return True
    mode = os.environ.get("JFP8_TRITON_SHIM", "1").lower()
    if mode in ("0", "off", "false"):
      _status = "disabled by JFP8_TRITON_SHIM"
      return False
    version = _jax_version()
    if mode != "force" and version not in TESTED_JAX:
      _status = f"jax {jax.__version__} not in tested versions {TESTED_JAX}"
      return False
    try:
      from jax._src.lib.mlir import ir
      from jax._src.pallas.triton import lowering
    except Exception as e:  # jaxlib without Triton support, or modules moved
      _status = f"Pallas Triton lowering not importable: {type(e).__name__}: {e}"
      return False
    dialect = getattr(lowering, "tt_dialect", None)
    lower_fn = getattr(lowering, "lower_jaxpr_to_triton_module", None)
    if dialect is None or lower_fn is None or not hasattr(dialect, "dot"):
      _status = "lowering internals changed: tt_dialect.dot / lower_jaxpr_to_triton_module missing"
      return False
    try:
      dot_params = inspect.signature(dialect.dot).parameters
      lower_params = list(inspect.signature(lower_fn).parameters)
    except (TypeError, ValueError) as e:
      _status = f"cannot inspect lowering internals: {e}"
      return False
    if "max_num_imprecise_acc" not in dot_params or not lower_params or lower_params[0] != "jaxpr":
      _status = "lowering internals changed: unexpected signatures"
      return False

    def lower_jaxpr_to_triton_module(jaxpr, *args, **kwargs):
      debug_info = getattr(jaxpr, "debug_info", None)
      name = getattr(debug_info, "func_name", "") or ""
      previous = getattr(_local, "imprecise_acc", None)
      _local.imprecise_acc = requested_imprecise_acc(name)
      try:
        return lower_fn(jaxpr, *args, **kwargs)
      finally:
        _local.imprecise_acc = previous

    lower_jaxpr_to_triton_module.__wrapped__ = lower_fn
    lowering.tt_dialect = _DialectProxy(dialect, ir)
    lowering.lower_jaxpr_to_triton_module = lower_jaxpr_to_triton_module
    _installed = True
    _status = f"installed (jax {jax.__version__})"
    return True


def is_active() -> bool:
  return _installed


def status() -> str:
  """One line: installed, or why not."""
  return _status
