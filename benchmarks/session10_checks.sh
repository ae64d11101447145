# The GPU checks session 10 could not run (no device was lent after its first call), in one
# device call (< 10 min). Device machine, repository root:   bash benchmarks/session10_checks.sh
# Writes under $OUT: gpu_tests.log, gemv_tiled_probe_h200.{json,md} + probe.log, profile_decode.json
# + defer.log; prints a short summary last.
#  1. GPU tests of the K-blocked GEMV weights and the split-K-summing norm kernel.
#  2. benchmarks/gemv_tiled_probe.py: does a K-blocked / tile-major weight raise the M = 1 read rate?
#  3. The 8B B=16 4K step with and without deferred split-K sums (jfp8.pending).
export PYTHONPATH=$PWD
timeout 150 python3 -m pytest -q -m gpu tests/test_fp8_gemv.py tests/test_prologue_stage.py \
  -k "k_blocked or sum_norm or variants" > $OUT/gpu_tests.log 2>&1
timeout 280 python3 benchmarks/gemv_tiled_probe.py --out $OUT \
  --configs "16,512,1,4;8,1024,1,4;16,256,4,4" > $OUT/probe.log 2>&1
timeout 140 python3 benchmarks/profile_decode.py --out $OUT \
  --rows llama3.1-8b:fp8wkv_w8a16_head:16:4096 --variants "|defer:1" > $OUT/defer.log 2>&1
echo "== GPU tests"; tail -2 $OUT/gpu_tests.log
echo "== probe (µs per matmul)"; grep -E "^\| " $OUT/gemv_tiled_probe_h200.md 2>/dev/null | cut -c1-240 || tail -5 $OUT/probe.log
echo "== defer"; grep -E "^## |fp8_gemv|stage|fusion" $OUT/defer.log | cut -c1-160
true
