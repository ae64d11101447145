"""Offline SASS of the decode-attention inner loop with the V cache stored (S, D) (as now) or
(D, S): a stripped copy of `pallas_kernels.decode_attention`'s loop (FP8 K/V, per-token scales,
online softmax, no masking), compiled for sm_90 on a machine with no GPU.

    pip install triton==3.6.0
    PYTHONPATH=$PWD python benchmarks/attention_loop_sass.py --head-dim 128 --block-k 128 --warps 4

Prints, per V layout, the longest loop body (warp instructions per block_k tokens) and the counts
of shared loads, FP8 conversions, MMAs and register moves (results/decode_attention_notes.md).
"""
from __future__ import annotations

import argparse
import collections
import functools
import os
import re
import sys

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernel_sass as KS  # noqa: E402
from pallas_kernels import triton_compat  # noqa: E402

S, ROWS = 4096, 16


def loop_kernel(q_ref, k_ref, v_ref, ks_ref, vs_ref, o_ref, *, block_k, v_transposed):
    q = q_ref[...].astype(jnp.float16)

    def step(j, carry):
        m, l, acc = carry
        off = j * block_k
        k = k_ref[pl.ds(off, block_k), :].astype(jnp.float16)                     # (bk, D)
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        s = s * ks_ref[pl.ds(off, block_k)][None, :]
        m_new = jnp.maximum(m, s.max(axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l = l * alpha + p.sum(axis=1)
        p = p * vs_ref[pl.ds(off, block_k)][None, :]
        if v_transposed:
            v = v_ref[:, pl.ds(off, block_k)].astype(jnp.float16)                 # (D, bk)
            pv = lax.dot_general(p.astype(jnp.float16), v, (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32)
        else:
            v = v_ref[pl.ds(off, block_k), :].astype(jnp.float16)                 # (bk, D)
            pv = lax.dot_general(p.astype(jnp.float16), v, (((1,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)
        return m_new, l, acc * alpha[:, None] + pv

    d = q.shape[1]
    init = (jnp.full((ROWS,), -jnp.inf, jnp.float32), jnp.zeros((ROWS,), jnp.float32),
            jnp.zeros((ROWS, d), jnp.float32))
    m, l, acc = lax.fori_loop(0, S // block_k, step, init)
    o_ref[...] = acc / l[:, None]


def loop_ops(sass: str) -> collections.Counter:
    """Opcode counts inside the longest loop body (`kernel_sass.longest_loop_body`)."""
    ops = collections.Counter()
    for text in KS.longest_loop_body(sass):
        op = re.sub(r"^@!?U?P\w+\s+", "", text.strip()).split()[0]
        ops["IMAD.MOV" if op.startswith("IMAD.MOV") else op.split(".")[0]] += 1
    ops["total"] = sum(ops.values())
    return ops


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-k", type=int, default=128)
    p.add_argument("--warps", type=int, default=4)
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--out", default="/tmp/attention_loop_sass")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    d, f8 = a.head_dim, jnp.float8_e4m3fn
    for vt in (False, True):
        def fn(q, k, v, ks, vs, vt=vt):
            return pl.pallas_call(
                functools.partial(loop_kernel, block_k=a.block_k, v_transposed=vt),
                out_shape=jax.ShapeDtypeStruct((ROWS, d), jnp.float32),
                **triton_compat.compiler_params(num_warps=a.warps, num_stages=a.stages))(q, k, v, ks, vs)
        args = (jax.ShapeDtypeStruct((ROWS, d), jnp.bfloat16), jax.ShapeDtypeStruct((S, d), f8),
                jax.ShapeDtypeStruct((d, S) if vt else (S, d), f8),
                jax.ShapeDtypeStruct((S,), jnp.float32), jax.ShapeDtypeStruct((S,), jnp.float32))
        base = os.path.join(a.out, f"loop_D{d}_bk{a.block_k}_w{a.warps}_{'VT' if vt else 'V'}")
        kernel = KS.compile_sm90(KS.triton_ir(fn, *args)[0], base + ".ttir", a.warps, a.stages)
        KS.sass_counts(kernel.asm["cubin"], base)
        ops = loop_ops(open(base + ".sass").read())
        per_128 = ops["total"] * a.warps * 128 // a.block_k
        print(f"V {'(D, S)' if vt else '(S, D)'}: loop {ops['total']} per warp per {a.block_k} "
              f"tokens ({per_128} warp instructions per 128 tokens); LDS {ops['LDS']}, "
              f"F2FP {ops['F2FP']}, HMMA {ops['HMMA']}, IMAD.MOV {ops['IMAD.MOV']}")


if __name__ == "__main__":
    main()
