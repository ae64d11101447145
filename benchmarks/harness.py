"""Timing helpers shared by the benchmark scripts.

`call_times`: wall-clock seconds per call over batches of back-to-back asynchronous calls (one
sync per batch), the scripts' common method; each script reports the statistic it documents.
`copy_ceiling_gbs`: the device-to-device copy ceiling (read + write bytes) those figures are
compared with.
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
import statistics
import tempfile
import time


def _batch_calls(f, args, calls: int, min_batch_s: float) -> int:
    """`calls`, raised (from a 3-call estimate) so a batch of back-to-back calls lasts at least
    `min_batch_s` and host dispatch is amortised."""
    if min_batch_s <= 0:
        return calls
    import jax
    t0 = time.perf_counter()
    for _ in range(3):
        out = f(*args)
    jax.block_until_ready(out)
    return max(calls, int(min_batch_s / max((time.perf_counter() - t0) / 3, 1e-7)) + 1)


def call_times(f, *args, calls: int = 10, reps: int = 5, warmup: int = 1,
               min_batch_s: float = 0.0):
    """([seconds per call of each of `reps` batches], last output) of `f(*args)`.

    `warmup` synchronised calls first. A batch is `calls` back-to-back calls and one sync; with
    min_batch_s > 0, `calls` is raised (from a 3-call estimate) so a batch lasts at least that
    long and host dispatch is amortised."""
    import jax
    out = None
    for _ in range(warmup):
        out = f(*args)
        jax.block_until_ready(out)
    calls = _batch_calls(f, args, calls, min_batch_s)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(calls):
            out = f(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / calls)
    return times, out


def interleaved_times(calls_by_name, *, calls: int = 10, reps: int = 5, warmup: int = 1,
                      min_batch_s: float = 0.0, between_rounds=None):
    """{name: [seconds per call of each of `reps` batches]} for several jitted calls, timed in
    rounds: every round runs one batch of each call in turn, so slow drifts of the clock (a GPU
    at its power limit warms up and slows down over tens of seconds) fall on every call alike
    instead of on whichever was timed last. `calls_by_name`: {name: (f, args)}. Batches are sized
    per call as in `call_times`. `between_rounds()`, if given, is called after each round (e.g.
    to sample clocks); its results are returned as the second value."""
    import jax
    sizes = {}
    for name, (f, args) in calls_by_name.items():
        for _ in range(warmup):
            jax.block_until_ready(f(*args))
        sizes[name] = _batch_calls(f, args, calls, min_batch_s)
    times = {name: [] for name in calls_by_name}
    samples = []
    for _ in range(reps):
        for name, (f, args) in calls_by_name.items():
            t0 = time.perf_counter()
            for _ in range(sizes[name]):
                out = f(*args)
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - t0) / sizes[name])
            del out
        if between_rounds is not None:
            samples.append(between_rounds())
    return times, samples


def gpu_clock_sample() -> dict | None:
    """One nvidia-smi reading of SM clock (MHz), power (W) and temperature (C), or None where
    nvidia-smi is absent: recorded beside timings that a power-limited GPU's clock moves."""
    import subprocess
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,power.draw,temperature.gpu",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=10).stdout.strip().splitlines()[0]
        sm, power, temp = (float(x) for x in out.split(","))
        return dict(sm_mhz=sm, power_w=power, temp_c=temp)
    except Exception:
        return None


def copy_ceiling_gbs(nbytes: int = 1 << 30, *, calls: int = 10, stat=statistics.median) -> float:
    """GB/s of an elementwise uint32 pass over `nbytes` (read + write counted): the copy ceiling."""
    import jax
    import jax.numpy as jnp
    x = jnp.arange(nbytes // 4, dtype=jnp.uint32)
    f = jax.jit(lambda x: x ^ jnp.uint32(0x5A5A5A5A))
    return 2 * x.nbytes / stat(call_times(f, x, calls=calls)[0]) / 1e9


def gpu_events(trace_dir: str) -> list[tuple[float, float, str]]:
    """(start µs, duration µs, name) of every event on a GPU device track of a
    `jax.profiler.trace(..., create_perfetto_trace=True)` directory, sorted by start."""
    paths = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True) + \
        glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    if not paths:
        raise FileNotFoundError(f"no trace json under {trace_dir}")
    with gzip.open(paths[0], "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                and "GPU" in str(e.get("args", {}).get("name", "")).upper()}
    return sorted((float(e["ts"]), float(e["dur"]), e["name"]) for e in events
                  if e.get("ph") == "X" and e.get("pid") in gpu_pids and "dur" in e)


def durations_by_name(events) -> dict[str, list[float]]:
    """{name: [duration µs, ...]} of (start µs, duration µs, name) events."""
    out = collections.defaultdict(list)
    for _, dur, name in events:
        out[name].append(dur)
    return out


def gpu_kernel_times(trace_dir: str) -> dict[str, list[float]]:
    """{kernel name: [duration µs, ...]} for every event on a GPU device track (`gpu_events`)."""
    return durations_by_name(gpu_events(trace_dir))


def timeline(events, top: int = 5) -> dict:
    """What a GPU timeline says about idle time. events: (start µs, duration µs, name), sorted.

    Returns span_us (first start to last end), busy_us (the union of the events' intervals, so
    overlapping events count once), idle_us = span - busy, and the `top` largest idle gaps as
    (gap µs, name of the event before it, name of the event after it)."""
    if not events:
        return dict(span_us=0.0, busy_us=0.0, idle_us=0.0, largest_gaps=[])
    busy, gaps = 0.0, []
    cur_start, cur_end, cur_name = events[0][0], events[0][0] + events[0][1], events[0][2]
    for start, dur, name in events[1:]:
        if start > cur_end:                       # a gap: close the current busy interval
            busy += cur_end - cur_start
            gaps.append((start - cur_end, cur_name, name))
            cur_start, cur_end, cur_name = start, start + dur, name
        elif start + dur > cur_end:
            cur_end, cur_name = start + dur, name
    busy += cur_end - cur_start
    span = cur_end - events[0][0]
    return dict(span_us=span, busy_us=busy, idle_us=span - busy,
                largest_gaps=sorted(gaps, reverse=True)[:top])


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
