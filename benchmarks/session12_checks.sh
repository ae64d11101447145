# What session 12 built but could not time (its device time ran out), in one device call (< 10 min).
# Device machine (H100 preferred: the issues' GPU), repository root:
#   bash benchmarks/session12_checks.sh
# Writes under $OUT: decode_e2e_<tag>.{json,md,png} + e2e.log, mlp_chain_probe_<device>.{json,md}
# + chain.log; prints a short summary last.
#  1. Tied models' FP8 head (llama.quantize_tied_head): the 1B rows whose `_head` recipe ran a
#     BF16 tied head until now (H100, session 12: 1B B=16 32K 1.64x BF16, head 177 µs per step).
#  2. The persistent MLP chain with cp.async stages (mlp_chain_probe loop_stages 3 / 4).
export PYTHONPATH=$PWD
mem=$(python3 -c "import jax; print(int(jax.devices()[0].memory_stats()['bytes_limit'] * 0.98))")
timeout 240 python3 benchmarks/decode_e2e.py --out $OUT --budget-s 200 --device-mem $mem \
  --tag s12_tiedhead --rows llama3.2-1b:fp8wkv_w8a16_head:16:32768,llama3.2-1b:bf16:16:32768,llama3.2-1b:fp8wkv_w8a16_head:1:4096,llama3.2-1b:bf16:1:4096 \
  > $OUT/e2e.log 2>&1
timeout 300 python3 benchmarks/mlp_chain_probe.py --out $OUT > $OUT/chain.log 2>&1
echo "== e2e (tied FP8 head)"; grep -E "^\| llama" $OUT/decode_e2e_s12_tiedhead.md 2>/dev/null | head -4 || tail -5 $OUT/e2e.log
echo "== chain"; grep -E "^\| " $OUT/mlp_chain_probe_*.md 2>/dev/null | cut -c1-200 || tail -5 $OUT/chain.log
true
