# One device call (session 13): is gate_up's tile bn64 (8 warps) better than the committed bn128
# at M = 16 on staged rows, for the 8B as well as the 1B (the class also holds lm_head)? And the
# 1B B=16 32K pair again (its ratio sits at the 1.7x target: 1.695x / 1.704x in two runs).
#   bash benchmarks/session13_gateup.sh     (device, repository root; writes under $OUT)
export PYTHONPATH=$PWD
V="gemvf16:m16/n_large/k_short=64,256,1,8,3,0"
mem=$(python3 -c "import jax; print(int(jax.devices()[0].memory_stats()['bytes_limit'] * 0.98))")
rows=llama3.2-1b:fp8wkv_w8a16_head:16:32768,llama3.2-1b:bf16:16:32768,llama3.1-8b:fp8wkv_w8a16_head:16:4096
timeout 200 python3 benchmarks/decode_e2e.py --out $OUT --budget-s 170 --device-mem $mem --reps 5 \
  --tag h100_s13_rep --rows $rows > $OUT/all.log 2>&1
timeout 200 python3 benchmarks/decode_e2e.py --out $OUT --budget-s 170 --device-mem $mem --reps 5 \
  --tag h100_s13_gateup64 --variant "$V" --rows $rows >> $OUT/all.log 2>&1
rm -f $OUT/decode_e2e_h100_s13_gateup64.png
timeout 150 python3 benchmarks/profile_decode.py --out $OUT --rows llama3.1-8b:fp8wkv_w8a16_head:16:4096 \
  --top 14 --variants "|$V" >> $OUT/all.log 2>&1
for t in rep gateup64; do echo "== e2e $t"; grep -E "^\| llama.*\| (16) \| (32768|4096) \|" $OUT/decode_e2e_h100_s13_$t.md; done
echo "== profile 8B B=16"; grep -E "^## |fp8_gemv" $OUT/all.log | cut -c1-160
true
