"""Probe: can down's f16 staging be per 128-column group instead of per row? The SwiGLU +
staging kernel runs one program per row (16 programs at B = 16, ~4.7 µs in the 8B step against
~2.2 µs for XLA's SwiGLU fusion); per-group scales would let every program stage its own columns.
Times, at M = 16 on the 8B down projection (R distinct weights per jit, GPU kernel time):
`fp8_gemv` on staged f16 rows with (M, 1) row scales vs (M, K/128) group scales, and the SwiGLU
staging launches (XLA SwiGLU + `stage_f16_rows`, and `prologue_stage.swiglu_stage_f16`).

    PYTHONPATH=$PWD python3 benchmarks/stage_probe.py
"""
import os
import sys

import jax
import jax.numpy as jnp

from pallas_kernels import fp8_gemv as G
from pallas_kernels import prologue_stage as PS

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gemv_layout as GL  # noqa: E402
import harness  # noqa: E402


def main():
    m, n, k = 16, 4096, 14336
    keys = jax.random.split(jax.random.key(0), 8)
    w8 = [jnp.clip(jax.random.normal(kk, (n, k)) * 50, -448, 448).astype(jnp.float8_e4m3fn)
          for kk in keys]
    wsb = jnp.full((n // 128, k // 128), 1e-3, jnp.float32)
    gu = jax.random.normal(jax.random.key(1), (m, 2 * k), jnp.bfloat16)
    rows, s_row = PS.swiglu_stage_f16(gu)
    s_group = jnp.repeat(s_row, k // 128, axis=1)
    ref = G.fp8_gemv_reference(rows, w8[0], s_row, wsb, layout="block", out_dtype=jnp.float32)
    for label, s in (("row scales (M, 1)", s_row), ("group scales (M, K/128)", s_group)):
        got = G.fp8_gemv(rows, w8[0], s, wsb, layout="block", out_dtype=jnp.float32)
        err = float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref)))
        us = GL.timed_us(lambda a, w, wsb, s=s: G.fp8_gemv(a, w, s, wsb, layout="block"),
                         rows, w8, wsb)
        print(f"down M=16 f16 {label}: {us:.2f} µs (max err {err:.1e})", flush=True)
    xs = [jax.random.normal(kk, (m, 2 * k), jnp.bfloat16) for kk in keys]
    hs = [jax.random.normal(kk, (m, 4096), jnp.bfloat16) for kk in keys]
    nw = jnp.ones((4096,), jnp.bfloat16)
    cases = [("XLA SwiGLU + stage_f16_rows", lambda x: G.stage_f16_rows(G.swiglu_reference(x)), xs),
             ("XLA SwiGLU alone", G.swiglu_reference, xs)]
    # the kernels at several warp counts (ELEMENTS_PER_WARP sets them: k_pad / it, 4..16)
    for epw in (256, 512, 1024, 2048, 4096):
        cases.append((f"swiglu_stage_f16, {epw} elements/warp",
                      lambda x, epw=epw: PS.swiglu_stage_f16(x), xs, epw))
        cases.append((f"rms_norm_stage_f16 (K=4096), {epw} elements/warp",
                      lambda h, epw=epw: PS.rms_norm_stage_f16(h, nw, 1e-5), hs, epw))
    for label, f, args, *epw in cases:
        if epw:
            PS.ELEMENTS_PER_WARP = epw[0]
            jax.clear_caches()
        g = jax.jit(lambda xs, f=f: tuple(f(x) for x in xs))
        secs, per = harness.kernel_time(g, (args,), calls=5)
        print(f"{label}: {secs * 1e6 / len(args):.2f} µs per call ({len(per)} kernels)", flush=True)


if __name__ == "__main__":
    main()
