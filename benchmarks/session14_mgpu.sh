# The Mosaic GPU decode kernel (pallas_kernels.fp8_gemv_mgpu, session 14, built without a GPU):
# its GPU tests, then standalone against the Triton kernel and XLA, then inside the decode step.
# Two device calls (each < 10 min), repository root:
#   bash benchmarks/session14_mgpu.sh gemv     # GPU tests, ptxas/SASS, gemm_decode --mgpu (8B, M 1/16)
#   bash benchmarks/session14_mgpu.sh step     # profile_decode "|mgpu:1" + decode_e2e --variant mgpu:1
# Writes under $OUT; prints a short summary last. On a gain: switch MGPU_GEMV on (or per class),
# fill fp8_gemv_mgpu.TUNING from the sweep, rerun decode_e2e, and write the figures in the notes.
export PYTHONPATH=$PWD
part=${1:-gemv}
if [ "$part" = gemv ]; then
  timeout 120 python3 -m pytest -q -m gpu tests/test_fp8_gemv_mgpu.py tests/test_ops_dispatch.py \
    tests/test_llama.py -k "mgpu" > $OUT/gpu_tests_mgpu.log 2>&1
  timeout 60 python3 benchmarks/mgpu_sass.py --kernel gemv --out /tmp/sass --configs \
    "64,4,4;128,4,4;m1/64,6,4,1;m1/128,6,4,1" > $OUT/sass_gemv.log 2>&1   # regs, spills, SASS
  timeout 390 python3 benchmarks/gemm_decode.py --out $OUT --quick --xla --sweep-act staged \
    --ms 1,16 --shapes qkv,o,gate_up,down --mgpu default --tag h100_s14_mgpu > $OUT/gemm_decode.log 2>&1
  echo "== gpu tests"; tail -3 $OUT/gpu_tests_mgpu.log
  echo "== ptxas / SASS"; grep "^|" $OUT/sass_gemv.log | cut -c1-300 || tail -5 $OUT/sass_gemv.log
  echo "== mgpu vs triton (µs)"; sed -n '/Mosaic GPU decode kernel/,/^## Every/p' \
    $OUT/gemm_decode_h100_s14_mgpu.md | grep "^|" | cut -c1-400 || tail -5 $OUT/gemm_decode.log
else
  rows=llama3.1-8b:fp8wkv_w8a16_head:1:4096,llama3.1-8b:fp8wkv_w8a16_head:16:4096
  timeout 300 python3 benchmarks/profile_decode.py --out $OUT --rows $rows \
    --variants "|mgpu:1|mgpu:1;stage:0" > $OUT/profile_mgpu.log 2>&1
  mem=$(python3 -c "import jax; print(int(jax.devices()[0].memory_stats()['bytes_limit'] * 0.98))")
  timeout 260 python3 benchmarks/decode_e2e.py --out $OUT --budget-s 220 --device-mem $mem \
    --reps 3 --variant "mgpu:1" --tag h100_s14_mgpu --rows $rows,llama3.1-8b:bf16:1:4096 \
    > $OUT/e2e.log 2>&1
  echo "== profile (wall, GPU busy per step)"; grep -E "^## " $OUT/profile_mgpu.log | cut -c1-230
  echo "== e2e mgpu:1"; grep -E "^\| llama" $OUT/decode_e2e_h100_s14_mgpu.md | head -6 || tail -5 $OUT/e2e.log
fi
true
