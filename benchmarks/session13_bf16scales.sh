# The FP8 KV cache's per-(token, head) scales in bf16 (jfp8.kv_cache.TOKEN_SCALE_DTYPE), one
# device call (session 13): the GPU tests of the cache, append and attention kernels, then the
# issue's decode rows end to end (1B B=16 32K pair first: its target is 1.7x BF16).
#   bash benchmarks/session13_bf16scales.sh     (device, repository root; writes under $OUT)
export PYTHONPATH=$PWD
timeout 170 python3 -m pytest -q -m gpu tests/test_kv_append.py tests/test_decode_attention.py \
  tests/test_decode_attention_qkv.py tests/test_attention.py tests/test_kv_cache.py > $OUT/gpu_tests.log 2>&1
mem=$(python3 -c "import jax; print(int(jax.devices()[0].memory_stats()['bytes_limit'] * 0.98))")
rows=llama3.2-1b:fp8wkv_w8a16_head:16:32768,llama3.2-1b:bf16:16:32768
rows=$rows,llama3.1-8b:fp8wkv_w8a16_head:1:4096,llama3.1-8b:fp8wkv_w8a16_head:16:4096
rows=$rows,llama3.1-8b:bf16:1:4096,llama3.1-8b:bf16:16:4096
timeout 330 python3 benchmarks/decode_e2e.py --out $OUT --budget-s 290 --device-mem $mem --reps 5 \
  --tag h100_s13_bf16scales --rows $rows > $OUT/e2e.log 2>&1
echo "== gpu tests"; tail -3 $OUT/gpu_tests.log
echo "== e2e"; grep -E "^\| llama" $OUT/decode_e2e_h100_s13_bf16scales.md | head -20 || tail -5 $OUT/e2e.log
true
