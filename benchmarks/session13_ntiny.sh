# The n_tiny GEMV class (fp8_gemv.N_TINY) on the device, one call: the GPU GEMV tests, the 1B
# B=16 32K pair end to end, and the 1B FP8 step profiled with two more levers on top
# (deferred split-K sums; gate_up at bn64).   bash benchmarks/session13_ntiny.sh  (writes $OUT)
export PYTHONPATH=$PWD
timeout 150 python3 -m pytest -q -m gpu tests/test_fp8_gemv.py > $OUT/gpu_tests.log 2>&1
mem=$(python3 -c "import jax; print(int(jax.devices()[0].memory_stats()['bytes_limit'] * 0.98))")
timeout 200 python3 benchmarks/decode_e2e.py --out $OUT --budget-s 170 --device-mem $mem \
  --tag h100_s13_ntiny --rows llama3.2-1b:fp8wkv_w8a16_head:16:32768,llama3.2-1b:bf16:16:32768 \
  > $OUT/e2e.log 2>&1
v="|defer:1|gemvf16:m16/n_large/k_short=64,256,1,8,3,0|defer:1;gemvf16:m16/n_large/k_short=64,256,1,8,3,0"
timeout 200 python3 benchmarks/profile_decode.py --out $OUT --rows llama3.2-1b:fp8wkv_w8a16_head:16:32768 \
  --top 14 --variants "$v" > $OUT/profile.log 2>&1
echo "== gpu tests"; tail -1 $OUT/gpu_tests.log
echo "== e2e"; grep -E "^\| llama" $OUT/decode_e2e_h100_s13_ntiny.md || tail -5 $OUT/e2e.log
echo "== profile"; grep -E "^## " $OUT/profile.log | cut -c1-200 || tail -5 $OUT/profile.log
true
