"""The benchmark harness (benchmarks/harness.py): GPU events from a Perfetto trace and the idle
time of a GPU timeline (synthetic traces: no GPU needed), the interleaved timing rounds, the GEMM
benchmark's per-round ratio; and the MLP chain probe's kernel in interpret mode."""
import gzip
import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import harness  # noqa: E402


def test_timeline_union_and_gaps():
    # (start, duration, name), sorted: a 2 µs gap after "a", "c" overlaps "b", a 5 µs gap after "c"
    events = [(0.0, 3.0, "a"), (5.0, 4.0, "b"), (6.0, 6.0, "c"), (17.0, 1.0, "d")]
    tl = harness.timeline(events)
    assert tl["span_us"] == pytest.approx(18.0)
    assert tl["busy_us"] == pytest.approx(3.0 + 7.0 + 1.0)   # [0,3) + [5,12) + [17,18)
    assert tl["idle_us"] == pytest.approx(7.0)
    assert tl["largest_gaps"] == [(5.0, "c", "d"), (2.0, "a", "b")]
    assert harness.timeline([]) == dict(span_us=0.0, busy_us=0.0, idle_us=0.0, largest_gaps=[])


def test_gpu_events_reads_only_gpu_tracks(tmp_path):
    trace = {"traceEvents": [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}},
        {"ph": "X", "pid": 1, "ts": 0, "dur": 50, "name": "host_op"},
        {"ph": "X", "pid": 2, "ts": 10, "dur": 4, "name": "fp8_gemv"},
        {"ph": "X", "pid": 2, "ts": 2, "dur": 3, "name": "jfp8_decode_attention"},
        {"ph": "X", "pid": 2, "ts": 20, "dur": 4, "name": "fp8_gemv"},
    ]}
    d = tmp_path / "plugins" / "profile" / "run"
    d.mkdir(parents=True)
    with gzip.open(d / "perfetto_trace.json.gz", "wt") as f:
        json.dump(trace, f)
    events = harness.gpu_events(str(tmp_path))
    assert events == [(2.0, 3.0, "jfp8_decode_attention"), (10.0, 4.0, "fp8_gemv"),
                      (20.0, 4.0, "fp8_gemv")]
    assert dict(harness.gpu_kernel_times(str(tmp_path))) == {
        "jfp8_decode_attention": [3.0], "fp8_gemv": [4.0, 4.0]}
    with pytest.raises(FileNotFoundError, match="no trace json"):
        harness.gpu_events(str(tmp_path / "plugins" / "nothing"))


@pytest.mark.parametrize("loop_stages", [1, 3])
def test_mlp_chain_probe_matches_the_committed_path(loop_stages):
    """benchmarks/mlp_chain_probe.py's persistent kernel, one program in interpret mode (its
    waits then find every earlier phase done), against the committed three `fp8_gemv` launches
    (same roundings; only the f32 summation order may differ with the tables' configs: h2 within
    2^-6 relative, the output within 2^-5 of its amax), and every phase counted all its tiles;
    with hand-carried next-step tiles (loop_stages 1) and with loads left to Triton's pipeliner."""
    import mlp_chain_probe
    r = mlp_chain_probe.check(d=256, f=384, bn=8, bk=128, loop_stages=loop_stages)
    assert r["ok"], r
    assert r["counters"][:3] == [256 // 8, 384 // 8, 256 // 8]


def test_interleaved_times_runs_every_call_in_rounds():
  import harness
  order = []

  def make(name):
    def f(x):
      order.append(name)
      return x + 1
    return f

  x = np.float32(1.0)
  times, samples = harness.interleaved_times(
      {"a": (make("a"), (x,)), "b": (make("b"), (x,))}, calls=2, reps=3, warmup=1,
      between_rounds=lambda: len(order))
  assert set(times) == {"a", "b"} and all(len(v) == 3 and min(v) > 0 for v in times.values())
  timed = order[2:]  # after one warm-up call of each
  assert timed == ["a", "a", "b", "b"] * 3
  assert samples == [6, 10, 14]


def test_gemm_paired_ratio():
  import gemm
  vs = {"xla_fp8_tensor": {"batch_us": [10.0, 12.0, 11.0]},
        "triton_block": {"batch_us": [20.0, 20.0, 20.0]},
        "mosaic_block": {"batch_us": [10.0, 10.0, 12.0]}}
  assert gemm.paired_ratio(vs) == 1.0  # rounds: 1.0, 1.2, 11/12
  assert gemm.paired_ratio({"xla_fp8_tensor": {"batch_us": [1.0]}}) is None
