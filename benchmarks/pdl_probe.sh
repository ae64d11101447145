# Does XLA's programmatic dependent launch (PDL) shorten the B = 1 decode step?
# At B = 1 a step is ~370 kernel launches of ~8 µs, 20-28% of each GEMV's time ramp-up and tail
# (ncu_gemv_h200.md); PDL lets the next kernel start launching during the previous one's tail.
# Probes that this jax's XLA knows the flags (an unknown XLA flag aborts), then runs the 8B B = 1
# 4K rows (FP8 W+KV and BF16) with PDL off, on, and on with early launch of dependents.
# Device machine, repository root:   bash benchmarks/pdl_probe.sh
# Writes decode_e2e_pdl_{off,on,launch}.{json,md} under $OUT (results/decode_e2e_h200_pdl_*).
export PYTHONPATH=$PWD
probe() { XLA_FLAGS="$1" timeout 90 python3 -c "import jax,jax.numpy as jnp; print(jax.jit(lambda x:x+1)(jnp.ones(4)))" > /dev/null 2>$OUT/probe.err && echo yes || echo no; }
P1=$(probe --xla_gpu_enable_pdl=true); P2=$(probe "--xla_gpu_enable_pdl=true --xla_gpu_enable_pdl_launch=true")
echo "pdl flag: $P1, pdl_launch flag: $P2"; tail -2 $OUT/probe.err
ROWS=llama3.1-8b:fp8wkv_w8a16_head:1:4096,llama3.1-8b:bf16:1:4096
run() { XLA_FLAGS="$2" timeout 160 python3 benchmarks/decode_e2e.py --out $OUT --budget-s 100 --device-mem 140e9 --tag $1 --rows $ROWS > $OUT/$1.log 2>&1; echo "== $1"; grep -E "^\| (llama|8B|1B)" $OUT/decode_e2e_$1.md | cut -c1-220; }
if [ $P1 = yes ]; then run pdl_off "--xla_gpu_enable_pdl=false"; run pdl_on "--xla_gpu_enable_pdl=true"; else run default ""; fi
[ $P2 = yes ] && run pdl_launch "--xla_gpu_enable_pdl=true --xla_gpu_enable_pdl_launch=true"
true
