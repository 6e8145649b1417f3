#!/usr/bin/env bash
# One command, one NVIDIA GPU, about 8 minutes: how fast this library trains and decodes GPT-2
# there, and how that compares with PyTorch doing the same in the same run.
#
#     bash benchmarks/gpu_check.sh                    # a machine with one GPU and jax[cuda], torch
#     GPU_CHECK_TINY=1 bash benchmarks/gpu_check.sh   # every stage at a tiny shape on the CPU
#
# Installs and downloads nothing: random weights and tokens; `transformers` models are built from
# a GPT2Config of the same shape. Stages, each in its own process(es) under `timeout`; a stage
# that fails or runs out of time says why and the next one runs:
#
#   train     configs/gpt2_small.py's step (124M, 16 x 1024 tokens, bfloat16, vocab 50257,
#             attention dropout 0, as cuDNN attention needs): tokens/s and MFU against
#             the chip's published dense bf16 peak (989 TFLOP/s for H100/H200), beside
#             transformers GPT2LMHeadModel in torch (SDPA, bf16 autocast, fused AdamW, gradient
#             clipping, dropout 0.1/0, torch.compile) in the same process (train_throughput.py)
#   variant   the same step with `--set model.kernels=cpu`: the hand-written backward passes
#   scaling   GPT-2 small/medium/large/XL shapes at context 1024, batch 16/8/8/4, layers under
#             nn.scan, no remat where it fits: tokens/s, MFU, peak device memory
#             (model_scaling.py)
#   decode    gpt2_small KV-cache decoding, batch 1 and 16, prompt 16, 256 new tokens, against
#             transformers generate with its static (compiled) cache (generation.py)
#   largest   the deepest width-2048 GPT whose step fits, with and without remat: XLA's memory
#             estimate at two depths, then two steps at the predicted depth (largest_model.py)
#   summary   every headline number and ratio (gpu_check_summary.py)
#
# Time boxes on one H100/H200 (timeout / expected, seconds; expected from the shapes, not yet
# measured by this project): start and device check -/10; train 180/90 (JAX compile ~20,
# torch.compile ~60, 3 x 10 steps each); variant 75/30; scaling 150/100 (4 x: start ~8,
# compile ~15, 10 steps); decode 2 x 75/2 x 45 (transformers compiles its decoding step ~30);
# largest 120/80 (4 abstract compiles, 2 trained depths). Stages also never run past
# GPU_CHECK_BUDGET_S (default 480) from the start: later stages get what is left, or are skipped.
#
# Results: the tables on stdout; in $OUT (default /tmp/gpu_check) summary.json (every number,
# each stage's own JSON included) and gpu_check.log (all of stdout), and each stage's JSON in
# $OUT/stages. Exit status 0 when every stage, its torch reference included, succeeded.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check}"
STAGE_DIR="$OUT/stages"
mkdir -p "$STAGE_DIR"
rm -f "$STAGE_DIR"/*.json "$OUT/summary.json"
exec > >(tee "$OUT/gpu_check.log") 2>&1
TEE=$!
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python}"
TINY="${GPU_CHECK_TINY:-0}"
TOTAL="${GPU_CHECK_BUDGET_S:-480}"
[[ "$TINY" == 1 ]] && TOTAL="${GPU_CHECK_BUDGET_S:-900}"  # a loaded 2-core CPU is slow
DEADLINE=$((SECONDS + TOTAL))

# cuDNN attention on a GPU where it applies, the fused einsum on CPU; the variant re-runs the
# step with the hand-written backward passes that `kernels=auto` keeps for CPUs.
ATTN=auto
VARIANTS=("model.kernels=cpu")

if [[ "$TINY" == 1 ]]; then
  # Same code paths, CPU-sized: 2 layers x 64 wide, context 64, float32 (bf16 is slow on CPU).
  COMMON=(--set model.dtype=float32 --set model.attention_dropout_rate=0.0
          --set "model.attention_impl=$ATTN")
  TRAIN=(--config configs/gpt2_small.py --layers 2 --heads 2 --width 64 --context 64
         --batch 2 --vocab 512 "${COMMON[@]}")
  STEPS=(--steps 4 --warmup 1 --rounds 1)
  REFERENCE=(--reference-compile)  # try torch.compile on the CPU too; it falls back if it fails
  SCALING=(--shapes small:2:2:64:2,xl:3:2:96:2 --context 64 --vocab 512 --steps 2 --warmup 1
           --set model.scan_layers=true)
  DECODE=(--config configs/gpt2_small.py --vocab 512 --prompt-len 8 --new-tokens 8 --repeats 1
          --set model.num_decoder_layers=2 --set model.d_model=64 --set model.num_heads=2
          --set model.d_ff=256 --set model.dtype=float32)
  DECODE_BATCHES=(1 2)
  LARGEST=(--width 64 --heads 2 --context 64 --batch 2 --vocab 512 --probe-layers 2,4
           --capacity-gib 0.02)
else
  "$PY" - <<'EOF' || exit 2
import sys, jax
devices = jax.devices()
print(f"jax {jax.__version__}: {len(devices)} x {devices[0].device_kind} ({devices[0].platform})")
if devices[0].platform != "gpu":
    sys.exit("no GPU visible to JAX: install jax[cuda] and run on a GPU machine "
             "(or GPU_CHECK_TINY=1 to check the script on CPU)")
EOF
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv,noheader || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.cuda.is_available())" \
    || echo "torch is not importable: the torch references will be skipped"
  # 16 sequences x 1024 tokens per step, no gradient accumulation (one step = one batch).
  # jax.nn.dot_product_attention has no dropout on the weights: the config's attn_pdrop goes.
  COMMON=(--set model.attention_dropout_rate=0.0 --set "model.attention_impl=$ATTN")
  TRAIN=(--config configs/gpt2_small.py --batch 16 --vocab 50257 "${COMMON[@]}")
  STEPS=(--steps 30 --warmup 3 --rounds 3)
  REFERENCE=()
  # Layers under nn.scan: one compiled layer whatever the depth, or the four compiles (120
  # layers unrolled) would not fit the time box; it costs a few percent of tokens/s.
  SCALING=(--context 1024 --vocab 50257 --steps 8 --warmup 2 --set model.scan_layers=true)
  # Inference weights in bfloat16, as the reference's.
  DECODE=(--config configs/gpt2_small.py --vocab 50257 --prompt-len 16 --new-tokens 256
          --repeats 3 --set model.param_dtype=bfloat16)
  DECODE_BATCHES=(1 16)
  LARGEST=(--width 2048 --heads 16 --context 1024 --batch 4 --vocab 50257 --probe-layers 8,16)
fi

STAGES=()
B=0
# budget NAME SECONDS: sets B to the stage's time box, cut to what is left of the total (10 s
# kept for the summary); returns 1, and records the stage as skipped, when under 20 s are left.
budget() {
  local left=$((DEADLINE - SECONDS - 10))
  B=$(($2 < left ? $2 : left))
  if ((B < 20)); then
    echo "== $1: skipped, the ${TOTAL} s time box is spent"
    STAGES+=("--stage" "$1:skipped:0")
    return 1
  fi
}
# stage NAME COMMAND...: runs it under `timeout $B`, says how it ended, records it.
stage() {
  local name=$1 start=$SECONDS rc=0
  shift
  echo
  echo "== $name (time box $B s): ${*:2}"
  timeout --kill-after=10 "$B" "$@" || rc=$?
  if ((rc == 124 || rc == 137)); then
    echo "== $name: stopped at its $B s time box"
  elif ((rc != 0)); then
    echo "== $name: failed (exit $rc); the error is above"
  fi
  STAGES+=("--stage" "$name:$rc:$((SECONDS - start))")
}

TRAIN_FILES=(--train "shipped=train_shipped.json")

budget train 180 && stage train "$PY" benchmarks/train_throughput.py "${TRAIN[@]}" "${STEPS[@]}" \
  "${REFERENCE[@]}" --json "$STAGE_DIR/train_shipped.json"

for variant in "${VARIANTS[@]}"; do
  file="train_$(echo "${variant#model.}" | tr -c 'a-zA-Z0-9\n' '_').json"
  TRAIN_FILES+=(--train "$variant=$file")
  budget "variant $variant" 75 && stage "variant $variant" "$PY" benchmarks/train_throughput.py \
    "${TRAIN[@]}" "${STEPS[@]}" --set "$variant" --no-reference --json "$STAGE_DIR/$file"
done

budget scaling 150 && stage scaling "$PY" benchmarks/model_scaling.py "${SCALING[@]}" \
  "${COMMON[@]}" --timeout-s 75 --budget-s $((B - 15)) --json "$STAGE_DIR/scaling.json"

DECODE_FILES=()
for batch in "${DECODE_BATCHES[@]}"; do
  DECODE_FILES+=(--decode "decode_b$batch.json")
  budget "decode batch $batch" 75 && stage "decode batch $batch" "$PY" benchmarks/generation.py \
    "${DECODE[@]}" --batch "$batch" --no-recompute --cache-implementation static \
    --json "$STAGE_DIR/decode_b$batch.json"
done

budget largest 120 && stage largest "$PY" benchmarks/largest_model.py "${LARGEST[@]}" \
  "${COMMON[@]}" --budget-s $((B - 15)) --json "$STAGE_DIR/largest.json"

echo
rc=0
"$PY" benchmarks/gpu_check_summary.py --stages "$STAGE_DIR" "${TRAIN_FILES[@]}" \
  "${DECODE_FILES[@]}" --scaling scaling.json --largest largest.json "${STAGES[@]}" \
  --json "$OUT/summary.json" || rc=1
echo "total ${SECONDS} s"
for ((i = 1; i < ${#STAGES[@]}; i += 2)); do
  [[ "${STAGES[$i]}" == *:0:* ]] || rc=1
done
exec >&- 2>&-  # let tee write out the log and the terminal before this script ends
wait "$TEE" 2>/dev/null
exit $rc
