"""What ptxas makes of the Mosaic GPU FP8 GEMM (`pallas_kernels.fp8_gemm_mgpu`) per config: registers,
spills, ptxas warnings (a serialised wgmma pipeline is reported there) and SASS instruction counts.

    PYTHONPATH=$PWD python3 benchmarks/mgpu_sass.py --out $OUT \
        --configs "64,128,m,4,m,8;64,128,m,4,m,8,parts=2,lag=1;64,256,m,3,m,8,parts=4,lag=0"
    PYTHONPATH=$PWD python3 benchmarks/mgpu_sass.py --kernel gemv --out $OUT --configs "64,4,4;m1/64,6,4,1"

Needs the GPU machine (Mosaic GPU compiles through the CUDA plugin). Each config is compiled and
run once on a 1024 x 1024 x 1024 block-scaled problem (checked against the reference) with
MOSAIC_GPU_DUMP_PTXAS / MOSAIC_GPU_DUMP_SASS set and MOSAIC_GPU_DUMP_TO pointing at
<out>/<config>/; the summary reads those dumps: ptxas' "Used N registers" line (the launch count;
consumer warpgroups raise theirs with setmaxnreg), its spill lines and its warnings and
performance remarks (C75xx, e.g. a serialised wgmma pipeline), and, where the dump has SASS, the
count of wgmma instructions (HGMMA / QGMMA), warpgroup waits and FFMA / FMUL. The H200 image's
dump had no SASS file; the PTX it keeps assembles offline: `ptxas -arch=sm_90a -v X.ptx -o X.cubin`
(a ptxas that reads PTX 9.0: CUDA >= 13) and `cuobjdump -sass X.cubin` (e.g. the one in pip's
triton, triton/backends/nvidia/bin). `--module` swaps in another copy of the kernel module (a probe
of a variant that is not on main).
"""
from __future__ import annotations

import argparse
import collections
import glob
import importlib.util
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_config(spec: str, MG):
    """'tile_m,tile_n,wg_dim,stages,grid_minor,width[,field=value...]' -> MgpuConfig."""
    parts = spec.split(",")
    fields = dict(tile_m=int(parts[0]), tile_n=int(parts[1]), wg_dim=parts[2],
                  max_concurrent_steps=int(parts[3]), grid_minor=parts[4],
                  grid_tile_width=int(parts[5]))
    for item in parts[6:]:
        key, value = item.split("=")
        fields[key] = {"True": True, "False": False}.get(value, int(value) if value.isdigit()
                                                         else value)
    return MG.MgpuConfig(**fields)


def summarize(dump_dir: str) -> dict:
    text = {p: open(p, errors="replace").read() for p in glob.glob(f"{dump_dir}/**/*", recursive=True)
            if os.path.isfile(p)}
    # By file name, not path: the dump directory's own name (e.g. /tmp/mgpu_sass) says nothing.
    ptxas = "\n".join(t for p, t in text.items() if p.endswith(".ptxas"))
    sass = "\n".join(t for p, t in text.items() if p.endswith(".sass"))
    regs = re.findall(r"Used (\d+) registers", ptxas)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas)
    warnings = sorted({line.strip() for line in ptxas.splitlines()
                       if "warning" in line.lower() or "(C75" in line})
    ops = collections.Counter(m.group(1) for m in re.finditer(r"\b(HGMMA|QGMMA|WARPGROUP\.DEPBAR|"
                                                               r"WARPGROUP\.ARRIVE|FFMA|FMUL|"
                                                               r"STL|LDL|F2FP|LDS|SHFL)\b", sass))
    return dict(files=sorted(os.path.relpath(p, dump_dir) for p in text), registers=regs,
                spills=spills, warnings=warnings[:20], sass_ops=dict(ops))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/mgpu_sass"))
    ap.add_argument("--configs", required=True, help="';'-separated config specs")
    ap.add_argument("--module", default="", help="path of another copy of fp8_gemm_mgpu.py")
    ap.add_argument("--layout", default="block")
    ap.add_argument("--kernel", default="gemm", choices=("gemm", "gemv"),
                    help="gemv: pallas_kernels.fp8_gemv_mgpu on a 4096 x 4096 weight, configs "
                    "'[m1/]tile_n,stages,ctas_per_sm[,split_k]' (m1/: the one-row FMA kernel, "
                    "else staged rows at M = 16)")
    args = ap.parse_args()
    if args.kernel == "gemv":
        return main_gemv(args)
    import jax
    import jax.numpy as jnp
    if args.module:
        spec = importlib.util.spec_from_file_location("mgpu_probe", args.module)
        MG = importlib.util.module_from_spec(spec)
        sys.modules["mgpu_probe"] = MG   # dataclasses look their module up while defining
        spec.loader.exec_module(MG)
    else:
        from pallas_kernels import fp8_gemm_mgpu as MG
    from pallas_kernels import fp8_gemm as G
    m = n = k = 1024
    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (m, k), jnp.float32).astype(jnp.float8_e4m3fn)
    b = jax.random.normal(kb, (n, k), jnp.float32).astype(jnp.float8_e4m3fn)
    sa = jax.random.uniform(ka, (m, k // 128), jnp.float32, 0.5, 2.0)
    sb = jax.random.uniform(kb, (n // 128, k // 128), jnp.float32, 0.5, 2.0)
    ref = G.fp8_gemm_reference(a, b, sa, sb, layout=args.layout, out_dtype=jnp.float32)
    rows = []
    for spec in filter(None, args.configs.split(";")):
        cfg = parse_config(spec, MG)
        rows.append(compile_and_dump(
            args.out, spec, ref,
            lambda cfg=cfg: MG.fp8_gemm(a, b, sa, sb, layout=args.layout, out_dtype=jnp.float32,
                                        config=cfg)))
    report(args, rows)


def compile_and_dump(out_dir: str, name: str, ref, run) -> dict:
    """Run `run()` (compiles one kernel config) with Mosaic GPU's PTX / ptxas / SASS dumps under
    out_dir/<name>/, keep those (not the MLIR), and return its row: rel. error against `ref` (or
    the error raised) and `summarize` of the dumps."""
    import jax.numpy as jnp
    dump = os.path.join(out_dir, re.sub(r"[^A-Za-z0-9]+", "_", name))
    os.makedirs(dump, exist_ok=True)
    os.environ.update(MOSAIC_GPU_DUMP_PTXAS="1", MOSAIC_GPU_DUMP_SASS="1", MOSAIC_GPU_DUMP_TO=dump)
    row = dict(config=name)
    try:
        out = run()
        row["rel_err"] = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    except Exception as e:  # report and go on with the next config
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    for path in glob.glob(f"{dump}/*"):
        if not path.endswith((".ptx", ".ptxas", ".resources.txt", ".sass")):
            os.remove(path)
    row.update(summarize(dump))
    print(json.dumps(row), flush=True)
    return row


def main_gemv(args):
    """The same dumps for the Mosaic GPU decode kernel on a 4096 x 4096 weight: its wgmma kernel
    (staged rows, M = 16), or with an `m1/` prefix on the config its FMA kernel (one bf16 row)."""
    import jax
    import jax.numpy as jnp
    from pallas_kernels import fp8_gemv as G
    from pallas_kernels import fp8_gemv_mgpu as MG
    m, n, k = 16, 4096, 4096
    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(ka, (m, k), jnp.bfloat16)
    w = jax.random.normal(kb, (n, k), jnp.float32).astype(jnp.float8_e4m3fn)
    ws = jax.random.uniform(kb, (n // 128, k // 128), jnp.float32, 0.5, 2.0)
    rows_f16, row_scale = G.stage_f16_rows(x)
    ref = G.fp8_gemv_reference(x, w, None, ws, layout="block", out_dtype=jnp.float32)
    rows = []
    ref1 = G.fp8_gemv_reference(x[:1], w, None, ws, layout="block", out_dtype=jnp.float32)
    for spec in filter(None, args.configs.split(";")):
        one_row = spec.startswith("m1/")
        vals = [int(v) for v in spec.removeprefix("m1/").split(",")]
        cfg = MG.MgpuGemvConfig(tile_n=vals[0], max_concurrent_steps=vals[1], ctas_per_sm=vals[2],
                                split_k=vals[3] if len(vals) > 3 else 0)
        if one_row:
            run = lambda cfg=cfg: MG.fp8_gemv_mgpu(x[:1], w, None, ws, layout="block",
                                                   out_dtype=jnp.float32, config=cfg)
        else:
            run = lambda cfg=cfg: MG.fp8_gemv_mgpu(rows_f16, w, row_scale, ws, layout="block",
                                                   out_dtype=jnp.float32, config=cfg)
        rows.append(compile_and_dump(args.out, "gemv " + spec, ref1 if one_row else ref, run))
    report(args, rows)


def report(args, rows):
    json.dump(rows, open(os.path.join(args.out, f"mgpu_sass_{args.kernel}.json"), "w"), indent=1)
    print("\n| config | rel err | registers | spills (st, ld) | HGMMA/QGMMA | DEPBAR | FFMA | "
          "STL/LDL | F2FP / LDS / SHFL | ptxas warnings and remarks |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        o = r["sass_ops"]
        print(f"| {r['config']} | {r.get('rel_err', r.get('error', ''))!s:.8} | "
              f"{','.join(r['registers'])} | {r['spills']} | "
              f"{o.get('HGMMA', 0) + o.get('QGMMA', 0)} | {o.get('WARPGROUP.DEPBAR', 0)} | "
              f"{o.get('FFMA', 0)} | {o.get('STL', 0)}/{o.get('LDL', 0)} | "
              f"{o.get('F2FP', 0)} / {o.get('LDS', 0)} / {o.get('SHFL', 0)} | "
              f"{'; '.join(r['warnings'])[:300]} |")


if __name__ == "__main__":
    main()
