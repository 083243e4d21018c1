#!/usr/bin/env bash
# What can be checked of this folder on a GPU host without TensorRT-LLM: that
# build_engines.sh reads the GPU as it should (the fp8 gate, FP8 context FMHA,
# gpu_type), that a real run without a checkout stops before creating
# anything, and what the GPU does with the GEMM precisions the catalog names
# (gpu_precisions.py, needs PyTorch with CUDA). Runs nothing of TensorRT-LLM.
#
#   deploy/triton/gpu_check.sh            # ~1 minute on an H200
#
# Run on an H200 on 2026-12-04: see "Checked on a GPU" in README.md.
set -u
cd "$(dirname "$0")/../.."
hf=$(mktemp -d)
out=$(mktemp -d)
trap 'rm -rf "$hf" "$out"' EXIT

echo "== the GPU, as nvidia-smi reports it"
nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv

for precision in fp8 int8_sq int8_wo int4_awq fp16 bf16; do
  echo "== DRY_RUN=1 build_engines.sh ... $precision 1"
  DRY_RUN=1 deploy/triton/build_engines.sh "$hf" "$out/$precision" "$precision" 1 |
    grep -E '^(GPU|\+ |  precision=)'
done

echo "== a real run with no TensorRT-LLM checkout: refused before anything is made"
TRTLLM_DIR=$out/none deploy/triton/build_engines.sh "$hf" "$out/real" fp8 1
echo "exit status $? ; output dir made: $([[ -e $out/real ]] && echo yes || echo no)"

echo "== GEMMs in the catalog's precisions (PyTorch)"
timeout 300 "${PYTHON:-python3}" deploy/triton/gpu_precisions.py
