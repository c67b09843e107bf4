#!/usr/bin/env bash
# Every method of the tool on one teacher store, then one evaluation of them all (docs/results.md):
#   bash bench/results_grid.sh TASK MODEL [TEACHER_QUERIES] [EVAL_QUERIES]
# TASK MODEL: e.g. plurals smollm2-135m, or shapes_group_vqa smollm2-vlm. TEACHER_QUERIES: the store's
# queries (default: the command's default). EVAL_QUERIES: evaluate's --n-queries (default 0 = the whole
# eval split). Every flag of every command at its default otherwise, except
# --dtype float32 (the CPU runs' dtype) and the device (DEVICE, default auto). Runs go to runs/<task>-*,
# results to results/<task>/ (table.md), the store to cache/<task>.zarr; `pipeline` is PIPELINE
# (default `python3 -m pipeline`). Every step resumes: run it again after a kill to finish.
set -euo pipefail
task=$1 model=$2 teacher_n=${3:-} eval_n=${4:-0}
P=${PIPELINE:-python3 -m pipeline}
common=(--dtype float32 --device "${DEVICE:-auto}")
store=cache/$task.zarr
$P teacher-cache --task "$task" --model "$model" ${teacher_n:+--n-queries "$teacher_n"} --out "$store" "${common[@]}"
runs=()
train() {  # a method that fails is reported and left out of the evaluation, the others go on
  local name=$1; shift
  if $P train-student --cache "$store" --name "$name" "$@" "${common[@]}"; then runs+=("runs/$name")
  else echo "FAILED: train-student $name $*"; fi
}
for method in mimic live lora hificl mimic-lora tv fv; do
  train "$task-$method" --method "$method"
done
train "$task-hificl-mse" --method hificl --align mse
$P evaluate --runs "${runs[@]}" --n-queries "$eval_n" "${common[@]}"
