"""Timing helpers shared by the benchmark scripts.

`kernel_time`: GPU time of a jitted call measured from a profiler trace, i.e. the sum of the
durations of the kernels it launches (no host dispatch, no launch gaps). For calls whose GPU
work is tens of microseconds, wall-clock timing of back-to-back calls mostly measures host
dispatch; the trace measures what the GPU did. Both are reported where it matters, labelled.
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import tempfile


def gpu_kernel_times(trace_dir: str) -> dict[str, list[float]]:
    """{kernel name: [duration µs, ...]} for every event on a GPU device track of a
    `jax.profiler.trace(..., create_perfetto_trace=True)` directory."""
    paths = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True) + \
        glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    if not paths:
        raise FileNotFoundError(f"no trace json under {trace_dir}")
    with gzip.open(paths[0], "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                and "GPU" in str(e.get("args", {}).get("name", "")).upper()}
    out = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in gpu_pids and "dur" in e:
            out[e["name"]].append(float(e["dur"]))
    return out


def kernel_time(fn, args, calls: int = 10) -> tuple[float, dict[str, float]]:
    """(GPU kernel seconds per call, {kernel name: µs per call}) of `fn(*args)`, from a trace of
    `calls` back-to-back calls after two warm-up calls. Empty on a machine without a GPU."""
    import jax
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(calls):
                out = fn(*args)
            jax.block_until_ready(out)
        times = gpu_kernel_times(d)
    per_kernel = {name: sum(v) / calls for name, v in times.items()}
    return sum(per_kernel.values()) * 1e-6, per_kernel
