"""Run one prefill GEMM a few times, for Nsight Compute to read the hardware counters of: our Mosaic
GPU block-scaled kernel (committed table) or XLA's per-tensor FP8 dot (cuBLASLt).

    ncu --clock-control none -k regex:mosaic --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
        --section WarpStateStats python3 benchmarks/ncu_gemm.py --kernel mosaic
    ncu ... -k regex:"gemm|xmma|cutlass" ... python3 benchmarks/ncu_gemm.py --kernel xla_fp8

The first call compiles; ncu's --launch-skip passes over the warm-up launches.
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pallas_kernels import fp8_gemm_mgpu as MG  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", choices=("mosaic", "xla_fp8"), default="mosaic")
    ap.add_argument("--mnk", default="8192,8192,8192")
    ap.add_argument("--calls", type=int, default=4)
    args = ap.parse_args()
    m, n, k = map(int, args.mnk.split(","))
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (m, k), jnp.float32).astype(jnp.float8_e4m3fn)
    b = jax.random.normal(kb, (n, k), jnp.float32).astype(jnp.float8_e4m3fn)
    if args.kernel == "mosaic":
        sa = jnp.ones((m, k // 128), jnp.float32)
        sb = jnp.ones((n // 128, k // 128), jnp.float32)
        fn = lambda: MG.fp8_gemm(a, b, sa, sb, layout="block")  # noqa: E731
    else:
        dot = jax.jit(lambda a, b: lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                                                   preferred_element_type=jnp.float32
                                                   ).astype(jnp.bfloat16))
        fn = lambda: dot(a, b)  # noqa: E731
    for _ in range(args.calls):
        jax.block_until_ready(fn())
    print(args.kernel, (m, n, k), MG.config_for(m, n, k, "block") if args.kernel == "mosaic" else "",
          flush=True)


if __name__ == "__main__":
    main()
