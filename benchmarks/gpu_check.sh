#!/usr/bin/env bash
# One command, one NVIDIA GPU, about 8 minutes: how fast this library trains and decodes GPT-2
# there, and how that compares with PyTorch doing the same in the same run.
#
#     bash benchmarks/gpu_check.sh                    # a machine with one GPU and jax[cuda], torch
#     GPU_CHECK_TINY=1 bash benchmarks/gpu_check.sh   # the stages at a tiny shape on the CPU
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
#   profile   the same step and its torch reference, 5 steps each under the JAX and torch
#             profilers: milliseconds per step by kind of op (matmuls, attention, norms, loss
#             and logits, optimizer, copies, ...), side by side (profile_trace.py)
#   flags     the same step without torch under XLA flag sets (latency-hiding scheduler,
#             cuBLASLt, cuDNN layer norm, command buffers off), a fresh process each, against
#             XLA's defaults (run first and, time allowing, last: their run-to-run spread); a
#             set wins when it beats the defaults by more than that spread and 2%. Winners are
#             for transformer/train/xla_flags.py to ship, by hand (xla_flags.py)
#   scaling   GPT-2 small and XL shapes (12 and 48 layers) at context 1024, batch 16/4, no remat
#             where it fits, each with its layers under nn.scan, under nn.scan with 4 layers per
#             iteration (model.scan_unroll=4) and unrolled, the last only where its compile,
#             extrapolated from the other two, fits the time left: tokens/s, MFU, compile time,
#             peak device memory (model_scaling.py; all four GPT-2 sizes take it ~5 minutes)
#   decode    gpt2_small KV-cache decoding, batch 1 and 16, prompt 16, 256 new tokens, against
#             transformers generate with its static (compiled) cache (generation.py)
#   largest   only when named in GPU_CHECK_STAGES: the deepest width-2048 GPT whose step fits,
#             with and without remat: XLA's memory estimate at two depths, then two steps at the
#             predicted depth (largest_model.py)
#   summary   every headline number and ratio (gpu_check_summary.py); always runs
#
# GPU_CHECK_STAGES picks stages, comma- or space-separated, in the order above whatever the
# order given (default "train profile flags scaling decode"; "all" adds largest), e.g.
# GPU_CHECK_STAGES=flags,largest. The train, profile and flags stages share a JAX compilation
# cache, fresh each run ($OUT/jax_cache): the train stage's compile time is a real one, the
# later two load that step instead of compiling it again (the flag sets other than the
# defaults change the program, so compile afresh).
#
# Time boxes on one H100/H200 (timeout / expected, seconds): start and device check -/10;
# train 180/90 (JAX compile ~20, torch.compile ~60, 3 x 10 steps each); profile 90/55 (start
# ~8, our step from the cache, torch.compile again, shortened by inductor's own cache, 7 steps
# each, reading the traces); flags 130/120 (6 processes: start ~8, compile ~20 but the
# defaults' from the cache, 12 steps); scaling 120/110 (6 processes: start ~8, compile ~5-30,
# 10 steps; XL unrolled predicted not to fit and not started); decode 2 x 75/2 x 45
# (transformers compiles its decoding step ~30); largest 120/80 (4 abstract compiles, 2 trained
# depths). Expected in all, the default stages: ~475 s. The one measured run so far (train,
# a variant of its step, scaling with scan only, decode, largest) took 455 s; the profile, flags
# and scaling figures are estimates from what they run, to be replaced by the first measured
# run. Stages also never run past GPU_CHECK_BUDGET_S (default 480) from the start: later stages
# get what is left, or are skipped; flags and scaling stop starting new processes when their
# time box is nearly spent, so they end inside it.
#
# Results: the tables on stdout; in $OUT (default /tmp/gpu_check) summary.json (every number,
# each stage's own JSON included) and gpu_check.log (all of stdout), and each stage's JSON in
# $OUT/stages. Exit status 0 when every stage asked for, its torch reference included,
# succeeded; 2 for an unknown stage name or no GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
KNOWN="train profile flags scaling decode largest"
SELECTED=" "
for name in $(tr ',' ' ' <<<"${GPU_CHECK_STAGES:-train profile flags scaling decode}"); do
  if [[ " $KNOWN summary all " != *" $name "* ]]; then
    echo "GPU_CHECK_STAGES: no stage '$name'; the stages are: $KNOWN summary (or all)" >&2
    exit 2
  fi
  [[ "$name" == all ]] && name=$KNOWN
  SELECTED+="$name "
done
# wanted NAME: whether GPU_CHECK_STAGES names the stage.
wanted() { [[ "$SELECTED" == *" $1 "* ]]; }

OUT="${OUT:-/tmp/gpu_check}"
STAGE_DIR="$OUT/stages"
mkdir -p "$STAGE_DIR"
rm -rf "$STAGE_DIR"/*.json "$OUT/summary.json" "$OUT/jax_cache"
exec > >(tee "$OUT/gpu_check.log") 2>&1
TEE=$!
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python}"
TINY="${GPU_CHECK_TINY:-0}"
TOTAL="${GPU_CHECK_BUDGET_S:-480}"
[[ "$TINY" == 1 ]] && TOTAL="${GPU_CHECK_BUDGET_S:-900}"  # a loaded 2-core CPU is slow
DEADLINE=$((SECONDS + TOTAL))
# The step the train stage compiles, loaded again by the profile and flags stages.
CACHE=(env "JAX_COMPILATION_CACHE_DIR=$OUT/jax_cache")

# cuDNN attention on a GPU where it applies, the fused einsum on CPU.
ATTN=auto

if [[ "$TINY" == 1 ]]; then
  # Same code paths, CPU-sized: 2 layers x 64 wide, context 64, float32 (bf16 is slow on CPU).
  COMMON=(--set model.dtype=float32 --set model.attention_dropout_rate=0.0
          --set "model.attention_impl=$ATTN")
  TRAIN=(--config configs/gpt2_small.py --layers 2 --heads 2 --width 64 --context 64
         --batch 2 --vocab 512 "${COMMON[@]}")
  STEPS=(--steps 4 --warmup 1 --rounds 1)
  REFERENCE=(--reference-compile)  # try torch.compile on the CPU too; it falls back if it fails
  PROFILE=(--steps 2 --warmup 1)
  # The GPU flags parse on the CPU (and change nothing there): the same sets run.
  FLAGS=(--steps 4 --warmup 1 --rounds 1 --timeout-s 60)
  # 3 layers with 2 per scan iteration: a remainder, as 48 with 4 has none.
  SCALING=(--shapes small:2:2:64:2,xl:3:2:96:2 --context 64 --vocab 512 --steps 2 --warmup 1
           --unroll 2)
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
  PROFILE=(--steps 5 --warmup 2)
  FLAGS=(--steps 10 --warmup 2 --rounds 1 --timeout-s 60)
  # The shallowest and the deepest GPT-2: scan, scan with 4 layers per iteration, unrolled.
  SCALING=(--shapes small:12:12:768:16,xl:48:25:1600:4 --context 1024 --vocab 50257 --steps 8
           --warmup 2 --unroll 4)
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
  local shown=("$@")  # the command from its script on
  while ((${#shown[@]} > 1)) && [[ "${shown[0]}" != *.py ]]; do shown=("${shown[@]:1}"); done
  echo
  echo "== $name (time box $B s): ${shown[*]}"
  timeout --kill-after=10 "$B" "$@" || rc=$?
  if ((rc == 124 || rc == 137)); then
    echo "== $name: stopped at its $B s time box"
  elif ((rc != 0)); then
    echo "== $name: failed (exit $rc); the error is above"
  fi
  STAGES+=("--stage" "$name:$rc:$((SECONDS - start))")
}

echo "stages: $(for name in $KNOWN; do wanted "$name" && echo -n "$name "; done)summary" \
  "(GPU_CHECK_STAGES; all: $KNOWN summary)"

wanted train && budget train 180 && stage train "${CACHE[@]}" "$PY" benchmarks/train_throughput.py \
  "${TRAIN[@]}" "${STEPS[@]}" "${REFERENCE[@]}" --json "$STAGE_DIR/train_shipped.json"

wanted profile && budget profile 90 && stage profile "${CACHE[@]}" "$PY" \
  benchmarks/profile_trace.py "${TRAIN[@]}" "${PROFILE[@]}" "${REFERENCE[@]}" \
  --json "$STAGE_DIR/profile.json"

wanted flags && budget flags 130 && stage flags "${CACHE[@]}" "$PY" benchmarks/xla_flags.py \
  "${TRAIN[@]}" "${FLAGS[@]}" --budget-s $((B - 5)) --json "$STAGE_DIR/flags.json"

wanted scaling && budget scaling 120 && stage scaling "$PY" benchmarks/model_scaling.py \
  "${SCALING[@]}" "${COMMON[@]}" --timeout-s 75 --budget-s $((B - 10)) \
  --json "$STAGE_DIR/scaling.json"

DECODE_FILES=()
for batch in "${DECODE_BATCHES[@]}"; do
  DECODE_FILES+=(--decode "decode_b$batch.json")
  wanted decode && budget "decode batch $batch" 75 && stage "decode batch $batch" "$PY" \
    benchmarks/generation.py "${DECODE[@]}" --batch "$batch" --no-recompute \
    --cache-implementation static --json "$STAGE_DIR/decode_b$batch.json"
done

LARGEST_FILE=()
if wanted largest; then
  LARGEST_FILE=(--largest largest.json)
  budget largest 120 && stage largest "$PY" benchmarks/largest_model.py "${LARGEST[@]}" \
    "${COMMON[@]}" --budget-s $((B - 15)) --json "$STAGE_DIR/largest.json"
fi

echo
rc=0
"$PY" benchmarks/gpu_check_summary.py --stages "$STAGE_DIR" --train train_shipped.json \
  --profile profile.json --flags flags.json --scaling scaling.json "${DECODE_FILES[@]}" \
  "${LARGEST_FILE[@]}" "${STAGES[@]}" --json "$OUT/summary.json" || rc=1
echo "total ${SECONDS} s"
for ((i = 1; i < ${#STAGES[@]}; i += 2)); do
  [[ "${STAGES[$i]}" == *:0:* ]] || rc=1
done
exec >&- 2>&-  # let tee write out the log and the terminal before this script ends
wait "$TEE" 2>/dev/null
exit $rc
