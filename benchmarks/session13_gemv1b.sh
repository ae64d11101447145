# The 1B decode GEMVs at M = 16 (Llama-3.2-1B B=16 32K row, 1.67x BF16 on the H100, target 1.7x):
# their grids are 128-192 programs on 132 SMs under the 8B-tuned classes, and they read at ~50%
# of the copy ceiling in the step (profile_decode_h100_s12_1b_32k.log). One device call:
#  1. standalone sweep of the four 1B projections at M = 16 on staged f16 rows (gemm_decode.py);
#  2. the 1B B=16 32K step profiled under tuning variants of the classes those shapes fall in.
#   bash benchmarks/session13_gemv1b.sh      (device, repository root; writes under $OUT)
export PYTHONPATH=$PWD
cfgs="32,256,1;32,256,2;32,256,4;32,256,8;16,256,2;16,256,4;16,256,8;64,256,2;64,256,4;64,256,1,8;128,256,1,8;128,256,2,8;128,256,4,8;32,512,4;32,128,8"
timeout 290 python3 benchmarks/gemm_decode.py --out $OUT --quick --xla --sweep-act staged --ms 16 \
  --shapes qkv_1b,o_1b,gate_up_1b,down_1b --configs "$cfgs" --tag h100_1b_m16 > $OUT/sweep.log 2>&1
v="|gemv:m16/n_small/k_short=32,256,4,4,3,0|gemv:m16/n_small/k_short=32,256,8,4,3,0"
v="$v|gemv:m16/n_small/k_short=16,256,4,4,3,0|gemvf16:m16/n_large/k_short=64,256,1,8,3,0"
v="$v|gemvf16:m16/n_large/k_short=64,256,1,4,3,0|gemvf16:m16/n_large/k_short=128,256,2,8,3,0"
timeout 280 python3 benchmarks/profile_decode.py --out $OUT --rows llama3.2-1b:fp8wkv_w8a16_head:16:32768 \
  --top 12 --variants "$v" > $OUT/profile.log 2>&1
echo "== sweep (µs per matmul, staged)"; grep -E "^\| (qkv|o|gate|down)_1b \| 16 \|" $OUT/gemm_decode_h100_1b_m16.md | cut -c1-90 || tail -5 $OUT/sweep.log
echo "== profile"; grep -E "^## |fp8_gemv" $OUT/profile.log | cut -c1-150 || tail -5 $OUT/profile.log
true
