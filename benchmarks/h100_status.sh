# The issues' headline figures on the GPU they name (H100), with the current code, in two device
# calls (each < 10 min). Device machine, repository root:
#   bash benchmarks/h100_status.sh e2e    # issue 7: decode rows + GPU tests  -> $OUT/e2e.log ...
#   bash benchmarks/h100_status.sh gemm   # issue 6: prefill table (interleaved timing)
# Writes under $OUT; prints a short summary last.
set -u
export PYTHONPATH=$PWD
case "${1:-}" in
  e2e)
    timeout 420 python3 benchmarks/decode_e2e.py --out $OUT --budget-s 330 --device-mem 79e9 \
      --tag h100_s12 --rows llama3.1-8b:fp8wkv_w8a16_head:1:4096,llama3.1-8b:bf16:1:4096,llama3.1-8b:fp8wkv_w8a16_head:16:4096,llama3.1-8b:bf16:16:4096,llama3.2-1b:fp8wkv_w8a16_head:16:32768,llama3.2-1b:bf16:16:32768 \
      > $OUT/e2e.log 2>&1
    timeout 150 python3 -m pytest -q -m gpu -x tests/ > $OUT/gpu_tests.log 2>&1
    echo "== e2e"; grep -E "^\| llama" $OUT/decode_e2e_h100_s12.md 2>/dev/null || tail -5 $OUT/e2e.log
    echo "== GPU tests"; tail -3 $OUT/gpu_tests.log ;;
  gemm)
    timeout 430 python3 benchmarks/gemm.py --out $OUT/run1 \
      --only xla_bf16,xla_fp8,triton_block,mosaic_block \
      --labels "8192^3,down M=2048,lm_head M=2048,gate_up M=2048,qkv M=8192,down M=8192,gate_up M=8192,o M=8192,qkv M=2048,o M=2048" \
      > $OUT/gemm_h100_s12_run1.log 2>&1
    timeout 110 python3 benchmarks/gemm.py --out $OUT/run2 --only xla_bf16,triton_block,mosaic_block \
      --labels "lm_head M=8192" > $OUT/gemm_h100_s12_run2.log 2>&1
    python3 benchmarks/gemm.py --out $OUT \
      --from-logs $OUT/gemm_h100_s12_run1.log,$OUT/gemm_h100_s12_run2.log > $OUT/summary.log 2>&1
    echo "== gemm"; grep -E "^\| " $OUT/gemm.md | head -14 | cut -c1-250 ;;
  *) echo "usage: bash benchmarks/h100_status.sh e2e|gemm" >&2; exit 2 ;;
esac
true
