"""Offline SASS of the decode GEMV (`pallas_kernels.fp8_gemv`) or the decode attention kernel
(`pallas_kernels.decode_attention`) for sm_90, on a machine with no GPU.

    pip install triton==3.6.0        # the device image's version; no GPU needed to compile
    PYTHONPATH=$PWD python benchmarks/kernel_sass.py --config 32,512,2 --prologue rmsnorm
    PYTHONPATH=$PWD python benchmarks/kernel_sass.py --kernel attention --head-dim 64 --kv fp8_token
    PYTHONPATH=$PWD python benchmarks/kernel_sass.py --kernel attention --kv fp8_token --layout sd
    PYTHONPATH=$PWD python benchmarks/kernel_sass.py --kernel chain --config 8,512,512 --loop-stages 3

Lowers the kernel's `pallas_call` for the "cuda" platform (jax's cross-platform lowering), takes
the Triton IR out of the custom call, compiles it with `triton.compile` for compute capability 9.0
and counts SASS instructions: shared-memory stores/loads (STS/LDS) and shuffles (SHFL) inside a
GEMV loop mean Triton converts a tile's layout every step, which is what made the fused RMSNorm
prologue slow (fp8_gemv.fetch's docstring). Writes <out>/<name>.{ttgir,ptx,sass} with --out.
XLA's bundled Triton may differ from pip's in details; counts are a guide, not a
timing. For the attention kernel it also prints the length of the longest loop body (one K/V
block's instructions per warp, the per-token cost that bytes do not show).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess

import jax
import jax.numpy as jnp
from jax._src.lib import triton as jax_triton
from jax._src.lib.mlir import ir

from pallas_kernels import fp8_gemv as G


def triton_ir(fn, *args) -> list[bytes]:
    """The Triton IR (MLIR bytecode) of every Triton custom call in fn's cuda lowering."""
    module = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).compiler_ir("stablehlo")
    out = []

    def walk(op):
        for region in op.regions:
            for block in region.blocks:
                for o in block.operations:
                    if o.name == "stablehlo.custom_call" and "mhlo.backend_config" in o.attributes:
                        cfg = o.attributes["mhlo.backend_config"]
                        if "ir" in cfg:
                            out.append(bytes(ir.StringAttr(cfg["ir"]).value_bytes))
                    walk(o)
    walk(module.operation)
    return out


def compile_sm90(ttir_bytes: bytes, path: str, num_warps: int, num_stages: int):
    """Compile Triton IR to sm_90 with pip's triton; returns the compiled kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    with ir.Context() as ctx:
        jax_triton.dialect.register_dialect(ctx)
        ctx.allow_unregistered_dialects = True
        text = str(ir.Module.parse(ttir_bytes))
    # jax's MLIR prints gpu.barrier with a property (an empty one, or a location) that pip's
    # Triton cannot parse.
    text = re.sub(r'"gpu\.barrier"\(\) <.*> : \(\) -> \(\)$', "gpu.barrier", text, flags=re.M)
    with open(path, "w") as f:
        f.write(text)
    return triton.compile(path, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def cuobjdump() -> str:
    """pip triton's bundled cuobjdump."""
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def sass_counts(cubin: bytes, path: str) -> collections.Counter:
    tool = cuobjdump()
    with open(path + ".cubin", "wb") as f:
        f.write(cubin)
    sass = subprocess.run([tool, "-sass", path + ".cubin"], capture_output=True, text=True,
                          check=True).stdout
    with open(path + ".sass", "w") as f:
        f.write(sass)
    ops = re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", sass)
    counts = collections.Counter(op.split(".")[0] for op in ops)
    counts["total"] = len(ops)
    return counts


def longest_loop_body(sass: str) -> list[str]:
    """The instructions of the longest backward-branch range of a SASS listing (a loop body)."""
    addr = [(int(a, 16), t) for a, t in re.findall(r"/\*([0-9a-f]{4})\*/\s+([^;]*);", sass)]
    best = []
    for a, text in addr:
        target = re.search(r"\bBRA\s+0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < a:
            body = [t for x, t in addr if int(target.group(1), 16) <= x <= a]
            best = max(best, body, key=len)
    return best


def longest_loop(sass: str) -> int:
    """Instructions in the longest backward-branch range of a SASS listing (a loop body)."""
    return len(longest_loop_body(sass))


def attention(a):
    """SASS of the decode-attention kernel at B = --batch (16), Hq=32, Hkv=8, S_max = --seq-len
    (32K: the large/long class); with --fused-append the kernel of `decode_attention_qkv`."""
    from pallas_kernels import decode_attention as DA
    B, S, Hq, Hkv, L, D = a.batch, a.seq_len, 32, 8, 2, a.head_dim
    kv_dtype = jnp.bfloat16 if a.kv == "bf16" else jnp.float8_e4m3fn
    q = jax.ShapeDtypeStruct((B, 1, Hq, D), jnp.bfloat16)
    k_shape = (L, B, Hkv, S, D) if a.layout == "hsd" else (L, B, S, Hkv, D)
    kv = jax.ShapeDtypeStruct(k_shape, kv_dtype)
    vv = jax.ShapeDtypeStruct(DA.v_shape_for(k_shape, a.layout, a.v_block), kv_dtype)
    lens = jax.ShapeDtypeStruct((B,), jnp.int32)
    cfg = DA.DecodeAttentionConfig(block_k=a.block_k, target_programs=256, num_warps=a.warps,
                                   num_stages=a.stages, early_v=a.early_v)
    if a.kv == "fp8_token":
        scales = jax.ShapeDtypeStruct(k_shape[:-1], jnp.float32)
        args = (q, kv, vv, lens, scales, scales)
    else:
        args = (q, kv, vv, lens)
    tensor_scale = None if a.kv == "bf16" else 1.0

    def fn(q, k, v, lens, ks=tensor_scale, vs=tensor_scale):
        return DA.decode_attention(q, k, v, lens, ks, vs, layer=1, config=cfg, layout=a.layout)
    if a.fused_append:
        if a.kv == "fp8_tensor":
            raise SystemExit("--fused-append: per-(token, head) or bf16 caches only")
        args = (jax.ShapeDtypeStruct((B, 1, (Hq + 2 * Hkv) * D), jnp.bfloat16),
                jax.ShapeDtypeStruct((B, 1, D // 2), jnp.float32)) + args[1:]

        def fn(qkv, cs, k, v, lens, ks=None, vs=None):
            return DA.decode_attention_qkv(qkv, cs, cs, k, v, ks, vs, lens, layer=1,
                                           num_q_heads=Hq, config=cfg, layout=a.layout)
    name = (f"decode_attention{'_qkv' if a.fused_append else ''}_B{B}_D{D}_S{S}_{a.kv}"
            f"_bk{a.block_k}_w{a.warps}_s{a.stages}{'_ev' if a.early_v else ''}"
            f"_{a.layout}" + (f"_vb{a.v_block}" if a.layout == "hsd" else ""))
    base = os.path.join(a.out, name)
    kernel = compile_sm90(triton_ir(fn, *args)[0], base + ".ttir", a.warps, a.stages)
    c = sass_counts(kernel.asm["cubin"], base)
    with open(base + ".sass") as f:
        body = longest_loop(f.read())
    print(f"{name}: {c['total']} SASS instructions, longest loop body {body} (one {a.block_k}-token "
          f"block per warp); F2FP {c['F2FP']}, MUFU {c['MUFU']}, HMMA {c['HMMA']}, "
          f"LDGSTS {c['LDGSTS']}, SHFL {c['SHFL']}, BAR {c['BAR']}; files {base}.*")


def chain(a):
    """benchmarks/mlp_chain_probe.py's persistent kernel, 8B shapes, --config bn,bk,programs."""
    import mlp_chain_probe as MC
    bn, bk, programs = (int(v) for v in a.config.split(","))
    d, f = 4096, 14336
    e4, f32 = jnp.float8_e4m3fn, jnp.float32
    args = (jax.ShapeDtypeStruct((1, d), jnp.bfloat16), jax.ShapeDtypeStruct((1, d), jnp.bfloat16),
            jax.ShapeDtypeStruct((d, d), e4), jax.ShapeDtypeStruct((d // 128, d // 128), f32),
            jax.ShapeDtypeStruct((d,), jnp.bfloat16), jax.ShapeDtypeStruct((2 * f, d), e4),
            jax.ShapeDtypeStruct((2 * f // 128, d // 128), f32), jax.ShapeDtypeStruct((d, f), e4),
            jax.ShapeDtypeStruct((d // 128, f // 128), f32))
    prefetch = a.prefetch or a.loop_stages <= 1

    def fn(*xs):
        return MC.mlp_chain(*xs, bn=bn, bk=bk, programs=programs, warps=a.warps, prefetch=prefetch,
                            phases=a.phases, loop_stages=a.loop_stages)
    name = f"mlp_chain_{bn}_{bk}_{programs}_w{a.warps}_p{a.phases}_st{a.loop_stages}"
    base = os.path.join(a.out, name)
    [ttir] = triton_ir(fn, *args)
    kernel = compile_sm90(ttir, base + ".ttir", a.warps, max(1, a.loop_stages))
    c = sass_counts(kernel.asm["cubin"], base)
    usage = subprocess.run([cuobjdump(), "-res-usage", base + ".cubin"], capture_output=True,
                           text=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    with open(base + ".sass") as fh:
        body = longest_loop(fh.read())
    print(f"{name}: {regs.group(1) if regs else '?'} registers, {kernel.metadata.shared} shared bytes, "
          f"longest loop body {body}; LDG {c['LDG']}, LDGSTS {c['LDGSTS']}, LDS {c['LDS']}, "
          f"STS {c['STS']}, BAR {c['BAR']}, FFMA {c['FFMA']}; files {base}.*")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kernel", default="gemv", choices=("gemv", "attention", "chain"))
    p.add_argument("--loop-stages", type=int, default=1,
                   help="chain: the probe's loop_stages (tt.num_stages on its K loops)")
    p.add_argument("--phases", type=int, default=3, help="chain: phases compiled (1-3)")
    p.add_argument("--head-dim", type=int, default=128, help="attention: D")
    p.add_argument("--kv", default="fp8_token", choices=("fp8_token", "fp8_tensor", "bf16"),
                   help="attention: cache dtype and scale granularity")
    p.add_argument("--block-k", type=int, default=128, help="attention: KV tokens per step")
    p.add_argument("--batch", type=int, default=16, help="attention: B")
    p.add_argument("--early-v", action="store_true", help="attention: DecodeAttentionConfig.early_v")
    p.add_argument("--fused-append", action="store_true",
                   help="attention: the kernel with the step's K/V append (decode_attention_qkv)")
    p.add_argument("--layout", default="hsd", choices=("sd", "hsd"),
                   help="attention: cache layout (decode_attention.LAYOUTS)")
    p.add_argument("--seq-len", type=int, default=32768, help="attention: S_max of the cache")
    p.add_argument("--v-block", type=int, default=128, help="attention, hsd: tokens per V block "
                   "(jfp8.kv_cache.v_block)")
    p.add_argument("--shape", default="1,28672,4096", help="M,N,K")
    p.add_argument("--config", default="32,512,2", help="block_n,block_k,split_k (FMA if M == 1)")
    p.add_argument("--warps", type=int, default=4)
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--prologue", default="none", choices=("none", "rmsnorm", "swiglu"))
    p.add_argument("--act-dtype", default="bfloat16", choices=("bfloat16", "float16"),
                   help="gemv: activation dtype (W8A16)")
    p.add_argument("--prefetch", action="store_true", help="GemvConfig.prefetch (manual double buffer)")
    p.add_argument("--row-blocks", type=int, default=1, help="GemvConfig.row_blocks")
    p.add_argument("--swap-ab", action="store_true",
                   help="GemvConfig.swap_ab (the weight as the dot's A operand)")
    p.add_argument("--out", default="/tmp/kernel_sass")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    if a.kernel == "attention":
        return attention(a)
    if a.kernel == "chain":
        return chain(a)
    m, n, k = (int(v) for v in a.shape.split(","))
    bn, bk, sk = (int(v) for v in a.config.split(","))
    cfg = G.GemvConfig(bn, bk, split_k=sk, use_dot=m > 1, prefetch=a.prefetch, num_warps=a.warps,
                       num_stages=a.stages, row_blocks=a.row_blocks, swap_ab=a.swap_ab)
    pro = None if a.prologue == "none" else a.prologue
    x = jax.ShapeDtypeStruct((m, 2 * k if pro == "swiglu" else k), jnp.dtype(a.act_dtype))
    w = jax.ShapeDtypeStruct((n, k), jnp.float8_e4m3fn)
    ws = jax.ShapeDtypeStruct((-(-n // 128), -(-k // 128)), jnp.float32)
    nw = jax.ShapeDtypeStruct((k,), jnp.bfloat16)

    def fn(x, w, ws, nw):
        kw = dict(norm_weight=nw, eps=1e-5) if pro == "rmsnorm" else {}
        return G.fp8_gemv(x, w, None, ws, layout="block", prologue=pro, config=cfg, **kw)

    name = (f"fp8_gemv_{m}x{n}x{k}_{bn}_{bk}_{sk}_{a.prologue}{'_prefetch' if a.prefetch else ''}"
            f"{f'_rb{a.row_blocks}' if a.row_blocks > 1 else ''}{'_swap' if a.swap_ab else ''}"
            f"_{a.act_dtype}")
    base = os.path.join(a.out, name)
    [ttir] = triton_ir(fn, x, w, ws, nw)
    kernel = compile_sm90(ttir, base + ".ttir", a.warps, a.stages)
    for key in ("ttgir", "ptx"):
        with open(f"{base}.{key}", "w") as f:
            f.write(kernel.asm[key])
    c = sass_counts(kernel.asm["cubin"], base)
    with open(base + ".sass") as f:
        body = longest_loop(f.read())
    print(f"{name}: {c['total']} SASS instructions, longest loop body {body}; LDG {c['LDG']}, "
          f"LDGSTS {c['LDGSTS']}, STS {c['STS']}, LDS {c['LDS']}, SHFL {c['SHFL']}, BAR {c['BAR']}, "
          f"FFMA {c['FFMA']}, shared bytes {kernel.metadata.shared}; "
          f"files {base}.*")


if __name__ == "__main__":
    main()
