#!/usr/bin/env bash
# GPT-2 small (124M, context 1024, bfloat16 compute, cuDNN attention) training throughput and
# MFU against the H100's published 989 TFLOP/s dense bf16 peak, on one GPU, in a few minutes.
#
#     bash benchmarks/gpu_check.sh                 # on a machine with an NVIDIA GPU and jax[cuda]
#     GPU_CHECK_TINY=1 bash benchmarks/gpu_check.sh   # a tiny shape on CPU: checks the script runs
#
# Installs nothing. Results: the tables on stdout and JSON files in $OUT (default
# /tmp/gpu_check). Steps: GPT-2 small train step for a few dozen steps (train_throughput.py),
# then the compile time of its step with and without nn.scan (compile_time.py), if time allows.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"

if [[ "${GPU_CHECK_TINY:-0}" == 1 ]]; then
  # Same code path, CPU-sized: 2 layers x 64 wide, context 64, float32 (bf16 is slow on CPU).
  SHAPE=(--layers 2 --heads 2 --width 64 --context 64 --batch 2 --vocab 512
         --set model.dtype=float32 --set model.attention_impl=xla
         --set model.attention_dropout_rate=0.0)
  STEPS=(--steps 4 --warmup 1 --rounds 1)
  COMPILE=(--set model.num_decoder_layers=2 --set model.d_model=64 --set model.num_heads=2
           --set model.d_ff=256 --set data.seq_len=64 --set train.batch_size=4
           --set train.grad_accum_steps=2 --vocab 512)
else
  "$PY" - <<'EOF'
import sys, jax
devices = jax.devices()
print(f"jax {jax.__version__}: {len(devices)} x {devices[0].device_kind} ({devices[0].platform})")
if devices[0].platform != "gpu":
    sys.exit("no GPU visible to JAX: install jax[cuda12] and run on a GPU machine "
             "(or GPU_CHECK_TINY=1 to check the script on CPU)")
EOF
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv,noheader || true
  # 16 sequences x 1024 tokens per step, no gradient accumulation (one step = one batch).
  # jax.nn.dot_product_attention has no dropout on the weights: the config's attn_pdrop goes.
  SHAPE=(--batch 16 --vocab 50257 --set model.attention_impl=cudnn
         --set model.attention_dropout_rate=0.0)
  STEPS=(--steps 30 --warmup 3 --rounds 1)
  COMPILE=(--vocab 50257)
fi

echo "== train throughput: configs/gpt2_small.py ${SHAPE[*]}"
"$PY" benchmarks/train_throughput.py --config configs/gpt2_small.py "${SHAPE[@]}" "${STEPS[@]}" \
  --no-reference --json "$OUT/train_throughput.json"

echo "== compile time, scan vs unrolled (skipped if it takes over 150 s)"
timeout 150 "$PY" benchmarks/compile_time.py --config configs/gpt2_small.py --repeats 1 "${COMPILE[@]}" \
  --json "$OUT/compile_time.json" || echo "compile_time.py did not finish in 150 s; skipped"

"$PY" - "$OUT/train_throughput.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
o = r["ours"]
peak = r["published_peak_flops"] or 989e12  # H100 SXM dense bf16
print(
    f"SUMMARY {r['machine']['device_kind']}: {o['tokens_per_s']:,.0f} tokens/s, "
    f"step {1e3 * o['step_s_median']:.0f} ms, MFU {100 * o['achieved_flops_per_device'] / peak:.1f}% "
    f"of {peak / 1e12:.0f} TFLOP/s (measured {r['measured_matmul_dtype']} matmul: "
    f"{r['measured_matmul_flops'] / 1e12:.0f} TFLOP/s)"
)
EOF
