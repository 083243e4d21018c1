#!/usr/bin/env bash
# Make a Triton model repository that serves one TensorRT-LLM engine as `ensemble`.
#
# Copies TensorRT-LLM's inflight_batcher_llm templates (ensemble, preprocessing,
# tensorrt_llm, postprocessing, tensorrt_llm_bls) into OUTPUT_REPO and fills
# their ${...} placeholders with TensorRT-LLM's own tools/fill_template.py.
# GymBilling sends every request over the gRPC stream and needs streaming, so
# the models are decoupled; exclude_input_in_output defaults to true (the
# gateway also sends it per request); KV-cache reuse is on for prefix caching.
#
# CI runs it against stand-in templates and fill_template.py (tests/deploy; no
# GPU there): check it with the real container on a GPU before trusting it.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: ENGINE_DIR=... TOKENIZER_DIR=... fill_repository.sh OUTPUT_REPO

  OUTPUT_REPO  new directory for the model repository (must not exist)

Environment:
  TRTLLM_DIR                      TensorRT-LLM checkout (required)
  ENGINE_DIR                      engine from build_engines.sh, as the server sees it (required)
  TOKENIZER_DIR                   Hugging Face tokenizer directory, as the server sees it (required)
  MAX_BATCH_SIZE                  Triton max_batch_size of every model (default 64;
                                  the engine's build-time max_batch_size caps the real batch)
  TP                              tensor-parallel size of the engine = MPI world size (default 1)
  KV_CACHE_FREE_GPU_MEM_FRACTION  share of free GPU memory for the KV cache (default 0.9)
  ENABLE_CHUNKED_CONTEXT          true | false (default true; engine needs paged context FMHA)
  INSTANCE_COUNT                  pre/postprocessing and BLS instances (default 1)
  MAX_QUEUE_DELAY_MICROSECONDS    Triton dynamic batching delay (default 0)
  ADD_SPECIAL_TOKENS              true | false: preprocessing adds the tokenizer's special
                                  tokens (a BOS) to every prompt (default true, the backend's
                                  own default); the catalog's prompt_special_tokens must agree
  PYTHON                          python interpreter (default python3)
USAGE
}

if [[ $# -ne 1 ]]; then
  usage >&2
  exit 2
fi
REPO=$1

die() { echo "fill_repository.sh: $*" >&2; exit 1; }

[[ -n ${TRTLLM_DIR:-} ]] || die "set TRTLLM_DIR to a TensorRT-LLM checkout"
[[ -n ${ENGINE_DIR:-} ]] || die "set ENGINE_DIR to the engine directory"
[[ -n ${TOKENIZER_DIR:-} ]] || die "set TOKENIZER_DIR to the tokenizer directory"
MAX_BATCH_SIZE=${MAX_BATCH_SIZE:-64}
TP=${TP:-1}
KV_CACHE_FREE_GPU_MEM_FRACTION=${KV_CACHE_FREE_GPU_MEM_FRACTION:-0.9}
ENABLE_CHUNKED_CONTEXT=${ENABLE_CHUNKED_CONTEXT:-true}
INSTANCE_COUNT=${INSTANCE_COUNT:-1}
MAX_QUEUE_DELAY_MICROSECONDS=${MAX_QUEUE_DELAY_MICROSECONDS:-0}
ADD_SPECIAL_TOKENS=${ADD_SPECIAL_TOKENS:-true}
PYTHON=${PYTHON:-python3}

# Since 2025 the backend lives in the TensorRT-LLM repository.
TEMPLATES=$TRTLLM_DIR/triton_backend/all_models/inflight_batcher_llm
FILL_TEMPLATE=$TRTLLM_DIR/triton_backend/tools/fill_template.py
MODELS=(ensemble preprocessing tensorrt_llm postprocessing tensorrt_llm_bls)
[[ -d $TEMPLATES ]] || die "no templates at $TEMPLATES"
# All checked before OUTPUT_REPO exists: a half-made one would refuse the rerun.
for model in "${MODELS[@]}"; do
  [[ -f $TEMPLATES/$model/config.pbtxt ]] || die "template $model missing from $TEMPLATES"
done
[[ -f $FILL_TEMPLATE ]] || die "no fill_template.py at $FILL_TEMPLATE"
[[ ! -e $REPO ]] || die "$REPO already exists; fill_template.py edits in place, so start from a fresh copy"
[[ $MAX_BATCH_SIZE =~ ^[1-9][0-9]*$ ]] || die "MAX_BATCH_SIZE must be a positive integer"
[[ $TP =~ ^[1-9][0-9]*$ ]] || die "TP must be a positive integer"
[[ $ADD_SPECIAL_TOKENS == true || $ADD_SPECIAL_TOKENS == false ]] || die "ADD_SPECIAL_TOKENS must be true or false"
[[ -f $ENGINE_DIR/config.json ]] || echo "warning: no $ENGINE_DIR/config.json here (fine only if the server mounts it elsewhere)" >&2

mkdir -p "$REPO"
for model in "${MODELS[@]}"; do
  cp -R "$TEMPLATES/$model" "$REPO/"
done

# fill MODEL key:value... -- fill_template.py asserts every key is in the file,
# and template keys differ between TensorRT-LLM versions, so keys the file
# lacks are skipped (with a note). fill_template.py splits twice, each split
# taking one level of backslash escapes: the list on ',', then each pair on
# ':'. So in a value '\' becomes '\\\\', ':' becomes '\\\:' (one backslash
# still there for the second split) and ',' becomes '\,'; a path with a ':'
# escaped once made fill_template.py fail.
fill() {
  local model=$1 pair key value subs=()
  local config=$REPO/$model/config.pbtxt
  shift
  for pair in "$@"; do
    key=${pair%%:*}
    value=${pair#*:}
    if grep -qF "\${$key}" "$config"; then
      value=${value//\\/\\\\\\\\}
      value=${value//:/\\\\\\:}
      value=${value//,/\\,}
      subs+=("$key:$value")
    else
      echo "note: $model has no \${$key}; skipped" >&2
    fi
  done
  # With nothing to fill, fill_template.py would fail on the empty list.
  ((${#subs[@]})) || return 0
  (IFS=,; "$PYTHON" "$FILL_TEMPLATE" -i "$config" "${subs[*]}")
}

fill ensemble \
  "triton_max_batch_size:$MAX_BATCH_SIZE" \
  logits_datatype:TYPE_FP32

fill preprocessing \
  "tokenizer_dir:$TOKENIZER_DIR" \
  "add_special_tokens:$ADD_SPECIAL_TOKENS" \
  "triton_max_batch_size:$MAX_BATCH_SIZE" \
  "preprocessing_instance_count:$INSTANCE_COUNT"

fill tensorrt_llm \
  triton_backend:tensorrtllm \
  "triton_max_batch_size:$MAX_BATCH_SIZE" \
  decoupled_mode:true \
  "engine_dir:$ENGINE_DIR" \
  max_beam_width:1 \
  batching_strategy:inflight_fused_batching \
  batch_scheduler_policy:guaranteed_no_evict \
  "kv_cache_free_gpu_mem_fraction:$KV_CACHE_FREE_GPU_MEM_FRACTION" \
  enable_kv_cache_reuse:true \
  "enable_chunked_context:$ENABLE_CHUNKED_CONTEXT" \
  exclude_input_in_output:true \
  "max_queue_delay_microseconds:$MAX_QUEUE_DELAY_MICROSECONDS" \
  max_queue_size:0 \
  encoder_input_features_data_type:TYPE_FP16 \
  prompt_embedding_table_data_type:TYPE_FP16 \
  logits_datatype:TYPE_FP32

fill postprocessing \
  "tokenizer_dir:$TOKENIZER_DIR" \
  "triton_max_batch_size:$MAX_BATCH_SIZE" \
  "postprocessing_instance_count:$INSTANCE_COUNT"

fill tensorrt_llm_bls \
  "triton_max_batch_size:$MAX_BATCH_SIZE" \
  decoupled_mode:true \
  "bls_instance_count:$INSTANCE_COUNT" \
  accumulate_tokens:false \
  prompt_embedding_table_data_type:TYPE_FP16 \
  logits_datatype:TYPE_FP32

# Placeholders left inside `string_value: "${...}"` are read as "unset" by the
# backend; anywhere else (a data type, a batch size) the config would not parse.
if grep -n '\${' "$REPO"/*/config.pbtxt | grep -v 'string_value'; then
  die "placeholders above are still unfilled; add them to the fill calls"
fi

echo
echo "Model repository ready: $REPO"
if ((TP == 1)); then
  echo "Start it (gRPC 8001 is what ServerPool.grpc_urls points at):"
  echo "  tritonserver --model-repository=$REPO --grpc-port=8001 --http-port=8000 --metrics-port=8002"
else
  echo "Start it on $TP GPUs (one MPI rank per GPU):"
  echo "  python3 $TRTLLM_DIR/triton_backend/scripts/launch_triton_server.py --world_size=$TP --model_repo=$REPO --grpc_port=8001 --http_port=8000 --metrics_port=8002"
fi

# The catalog entry must count a prompt as this deployment does (the context
# check, the hold's bound, a prompt billed by the tokenizer): print its
# values. The special tokens are counted as the preprocessing model counts
# them (transformers' AutoTokenizer, which may rebuild the post-processor
# from tokenizer_config.json), else as the gateway reads tokenizer.json.
echo
echo "Catalog entry (admin: Inference > Catalog models) for this engine:"
if ! "$PYTHON" - "$TOKENIZER_DIR" "$ENGINE_DIR" "$ADD_SPECIAL_TOKENS" <<'PY'
import json
import sys
from pathlib import Path

tokenizer_dir, engine_dir, add_special = sys.argv[1:]
tokenizer_file = Path(tokenizer_dir) / "tokenizer.json"
special, read_by = 0, "ADD_SPECIAL_TOKENS=false"
if add_special == "true":
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(
            tokenizer_dir, legacy=False, padding_side="left", trust_remote_code=True
        )
        special, read_by = len(tokenizer.encode("", add_special_tokens=True)), "transformers"
    except ImportError:
        from tokenizers import Tokenizer

        encoded = Tokenizer.from_file(str(tokenizer_file)).encode("", add_special_tokens=True)
        special, read_by = len(encoded.ids), "tokenizers (no transformers here)"
print(f"  tokenizer_file         {tokenizer_file}  (copy it where the API and workers read it)")
print(f"  prompt_special_tokens  {special}  (read by {read_by})")
config = Path(engine_dir) / "config.json"
if config.exists():
    build = json.loads(config.read_text()).get("build_config", {})
    print(f"  max_input_tokens       {build.get('max_input_len', '(not in config.json)')}")
    print(f"  context_limit          at most {build.get('max_seq_len', '(not in config.json)')}")
else:
    print(f"  max_input_tokens       max_input_len of {config} (not readable here)")
PY
then
  echo "  (not read here: needs Python's tokenizers and \$TOKENIZER_DIR/tokenizer.json; see deploy/triton/README.md)"
fi
