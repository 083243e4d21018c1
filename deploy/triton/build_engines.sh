#!/usr/bin/env bash
# Build a TensorRT-LLM engine for one GymBilling catalog model.
#
# Two steps, both from a TensorRT-LLM checkout ($TRTLLM_DIR):
#   1. Hugging Face checkpoint -> TensorRT-LLM checkpoint, quantized as asked:
#        fp8       examples/quantization/quantize.py --qformat fp8 --kv_cache_dtype fp8
#        int8_sq   examples/quantization/quantize.py --qformat int8_sq --kv_cache_dtype int8
#        int4_awq  examples/quantization/quantize.py --qformat int4_awq
#        int8_wo   <model>/convert_checkpoint.py --use_weight_only --weight_only_precision int8
#        fp16/bf16 <model>/convert_checkpoint.py --dtype float16|bfloat16
#   2. trtllm-build: checkpoint -> engine (paged context FMHA always, because
#      Triton's enable_kv_cache_reuse needs it; FP8 context FMHA on Hopper for fp8).
#
# Output: $OUT_DIR/checkpoint (intermediate) and $OUT_DIR/engine (what Triton's
# tensorrt_llm model loads as engine_dir; see fill_repository.sh).
#
# CI runs it with DRY_RUN=1 only (tests/deploy; no GPU there): check a real
# build on a GPU before trusting it.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: build_engines.sh HF_CHECKPOINT_DIR OUTPUT_DIR PRECISION TP_SIZE

  HF_CHECKPOINT_DIR  Hugging Face model directory (config.json, weights, tokenizer)
  OUTPUT_DIR         gets checkpoint/ and engine/ (must not already hold an engine/)
  PRECISION          fp8 | int8_sq | int8_wo | int4_awq | fp16 | bf16
                     (the same values as CatalogModel.precision)
  TP_SIZE            tensor-parallel size = GPUs per engine (CatalogModel.tensor_parallel)

Environment:
  TRTLLM_DIR         TensorRT-LLM checkout (required, except with DRY_RUN=1)
  DRY_RUN            1: check the arguments and the GPU, print the commands it would
                     run and the CatalogModel values, and run and create nothing
                     (default 0)
  CONVERT_SCRIPT     the model family's convert_checkpoint.py, for int8_wo/fp16/bf16
                     (default: $TRTLLM_DIR/examples/models/core/llama/convert_checkpoint.py,
                     or $TRTLLM_DIR/examples/llama/convert_checkpoint.py where only that exists)
  DTYPE              activation dtype for quantized formats: bfloat16 (default) | float16
  MAX_BATCH_SIZE     engine max batch size (default 64)
  MAX_INPUT_LEN      longest prompt in tokens (default 4096)
  MAX_SEQ_LEN        prompt + output tokens (default 8192; >= CatalogModel.context_limit)
  MAX_NUM_TOKENS     tokens per engine iteration (default 8192)
  CALIB_SIZE         calibration samples for fp8/int8_sq/int4_awq (default 512)
  FP8_CONTEXT_FMHA   auto (default: enable when fp8 on compute capability >= 9.0) | enable | disable
  PYTHON             python interpreter (default python3)
USAGE
}

if [[ $# -ne 4 ]]; then
  usage >&2
  exit 2
fi

HF_DIR=$1
OUT_DIR=$2
PRECISION=$3
TP=$4

DRY_RUN=${DRY_RUN:-0}
PYTHON=${PYTHON:-python3}
DTYPE=${DTYPE:-bfloat16}
MAX_BATCH_SIZE=${MAX_BATCH_SIZE:-64}
MAX_INPUT_LEN=${MAX_INPUT_LEN:-4096}
MAX_SEQ_LEN=${MAX_SEQ_LEN:-8192}
MAX_NUM_TOKENS=${MAX_NUM_TOKENS:-8192}
CALIB_SIZE=${CALIB_SIZE:-512}
FP8_CONTEXT_FMHA=${FP8_CONTEXT_FMHA:-auto}

die() { echo "build_engines.sh: $*" >&2; exit 1; }

[[ $DRY_RUN == 0 || $DRY_RUN == 1 ]] || die "DRY_RUN must be 0 or 1"
if ((DRY_RUN)); then
  # Operators review a build before they have the checkout: without one the
  # commands name the path as the variable.
  TRTLLM_DIR=${TRTLLM_DIR:-'$TRTLLM_DIR'}
else
  [[ -n ${TRTLLM_DIR:-} ]] || die "set TRTLLM_DIR to a TensorRT-LLM checkout"
fi

# Everything is checked before anything runs: step 1 takes hours, so a bad
# value must not surface only at step 2.
[[ -d $HF_DIR ]] || die "no such checkpoint directory: $HF_DIR"
[[ $TP =~ ^[1-9][0-9]*$ ]] || die "TP_SIZE must be a positive integer, got '$TP'"
[[ $DTYPE == bfloat16 || $DTYPE == float16 ]] || die "DTYPE must be bfloat16 or float16"
[[ $FP8_CONTEXT_FMHA =~ ^(auto|enable|disable)$ ]] || die "FP8_CONTEXT_FMHA must be auto, enable or disable"
[[ ! -e $OUT_DIR/engine ]] || die "$OUT_DIR/engine already exists; refusing to overwrite"

# GPU 0's name and compute capability as an integer (9.0 -> 90; 0 when unknown).
sm=0 cap= gpu=
if command -v nvidia-smi >/dev/null 2>&1; then
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 || true)
  gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1 || true)
  if [[ $cap =~ ^([0-9]+)\.([0-9]+) ]]; then
    sm=$((BASH_REMATCH[1] * 10 + BASH_REMATCH[2]))
  fi
fi
if ((sm)); then
  echo "GPU 0: ${gpu:-(name unknown)}, compute capability $cap"
else
  echo "no GPU visible (nvidia-smi absent or silent): fp8 is not checked against the GPU"
fi

QUANTIZE=$TRTLLM_DIR/examples/quantization/quantize.py
if [[ -z ${CONVERT_SCRIPT:-} ]]; then
  CONVERT_SCRIPT=$TRTLLM_DIR/examples/models/core/llama/convert_checkpoint.py
  old_layout=$TRTLLM_DIR/examples/llama/convert_checkpoint.py
  [[ -f $CONVERT_SCRIPT || ! -f $old_layout ]] || CONVERT_SCRIPT=$old_layout
fi
CKPT_DIR=$OUT_DIR/checkpoint
ENGINE_DIR=$OUT_DIR/engine

quantize=("$PYTHON" "$QUANTIZE" --model_dir "$HF_DIR" --output_dir "$CKPT_DIR"
  --dtype "$DTYPE" --tp_size "$TP" --calib_size "$CALIB_SIZE")
convert=("$PYTHON" "$CONVERT_SCRIPT" --model_dir "$HF_DIR" --output_dir "$CKPT_DIR"
  --tp_size "$TP")

# Weight-only formats keep the KV cache in the activation dtype.
if [[ $DTYPE == bfloat16 ]]; then BASE_KV=bf16; else BASE_KV=fp16; fi

# Step 1: checkpoint. KV_DTYPE is what to record in CatalogModel.kv_cache_dtype.
case $PRECISION in
  fp8)
    ((sm == 0 || sm >= 89)) || die "fp8 needs compute capability >= 8.9 (Ada/Hopper); this GPU ($gpu) is $cap"
    checkpoint=("${quantize[@]}" --qformat fp8 --kv_cache_dtype fp8)
    KV_DTYPE=fp8 ;;
  int8_sq)
    checkpoint=("${quantize[@]}" --qformat int8_sq --kv_cache_dtype int8)
    KV_DTYPE=int8 ;;
  int4_awq)
    checkpoint=("${quantize[@]}" --qformat int4_awq)
    KV_DTYPE=$BASE_KV ;;
  int8_wo)
    checkpoint=("${convert[@]}" --dtype "$DTYPE" --use_weight_only --weight_only_precision int8)
    KV_DTYPE=$BASE_KV ;;
  fp16)
    checkpoint=("${convert[@]}" --dtype float16)
    KV_DTYPE=fp16 ;;
  bf16)
    checkpoint=("${convert[@]}" --dtype bfloat16)
    KV_DTYPE=bf16 ;;
  *)
    usage >&2
    die "unknown precision '$PRECISION'" ;;
esac

# Step 2: engine. --gemm_plugin auto takes the checkpoint's dtype.
build=(trtllm-build
  --checkpoint_dir "$CKPT_DIR"
  --output_dir "$ENGINE_DIR"
  --gemm_plugin auto
  --max_batch_size "$MAX_BATCH_SIZE"
  --max_input_len "$MAX_INPUT_LEN"
  --max_seq_len "$MAX_SEQ_LEN"
  --max_num_tokens "$MAX_NUM_TOKENS"
  --use_paged_context_fmha enable   # needed for KV-cache (prefix) reuse and chunked context
)
if [[ $PRECISION == fp8 ]]; then
  case $FP8_CONTEXT_FMHA in
    enable) build+=(--use_fp8_context_fmha enable) ;;
    auto) if ((sm >= 90)); then build+=(--use_fp8_context_fmha enable); fi ;;
  esac
fi

# Print a command as the shell reads it back, then run it (not in a dry run).
# A dry run's placeholder stays $TRTLLM_DIR, to expand where it is pasted.
run() {
  local line
  line=$(printf ' %q' "$@")
  echo "+${line//\\\$TRTLLM_DIR/\$TRTLLM_DIR}"
  ((DRY_RUN)) || "$@"
}

if ((!DRY_RUN)); then
  [[ -f ${checkpoint[1]} ]] || die "no ${checkpoint[1]##*/} at ${checkpoint[1]} (set TRTLLM_DIR, or CONVERT_SCRIPT for convert_checkpoint.py)"
  command -v trtllm-build >/dev/null 2>&1 || die "trtllm-build is not on PATH"
  mkdir -p "$OUT_DIR"
fi
run "${checkpoint[@]}"
run "${build[@]}"

((!DRY_RUN)) || echo $'\nDRY_RUN=1: nothing above was run; nothing was created.'
cat <<SUMMARY

Engine: $ENGINE_DIR
Record on the CatalogModel row:
  precision=$PRECISION kv_cache_dtype=$KV_DTYPE tensor_parallel=$TP gpu_type=${gpu:-<GPU model>}
  context_limit <= $MAX_SEQ_LEN
Next: deploy/triton/fill_repository.sh (ENGINE_DIR=$ENGINE_DIR TOKENIZER_DIR=$HF_DIR)
SUMMARY
