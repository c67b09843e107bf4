#!/usr/bin/env bash
# The GPU calls behind docs/benchmarks.md, run from the repository root on the device machine:
#   bash bench/run_gpu.sh check     # machine, imports, tiny smoke tests of every bench on the GPU
#   bash bench/run_gpu.sh log_z2    # bench/log_z2.py
#   bash bench/run_gpu.sh mu_paths  # bench/mu_paths.py (every mu path against float64, the auto choice)
#   bash bench/run_gpu.sh attention # bench/attention.py
#   bash bench/run_gpu.sh profile   # bench/profile_mimic.py (host vs device time of MimIC)
#   bash bench/run_gpu.sh idefics2  # bench/suite.py, Idefics2-8B shape, 8-shot (env N, STEPS, WORKERS, WRITERS, SECTIONS)
#   bash bench/run_gpu.sh idefics1  # bench/suite.py, Idefics-9B shape, 32-shot
#   bash bench/run_gpu.sh evalbatch # bench/eval_batch.py: largest batch and queries/s per mode, 3 beams
#   bash bench/run_gpu.sh sdpafirst # bench/sdpa_first_call.py: sdpa's first-call cost per sequence length (fresh machine)
#   bash bench/run_gpu.sh pipelined # bench/pipelined_check.py: stored states right with the copies waited for late
#   bash bench/run_gpu.sh stage1    # bench/suite.py --sections stage1, one fresh process per variant (cold, then warm)
# Wheels for zarr & co. travel in .whl/ (see docs/benchmarks.md); logs go to $OUT (default results/).
set -o pipefail
OUT=${OUT:-results}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
  if [ -d .whl/tf524 ]; then  # the lock's transformers (the image's 5.17 runs multi-image beam search wrong)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site524 \
      .whl/tf524/*.whl || exit 1
    export PYTHONPATH=/tmp/site524:$PYTHONPATH
  fi
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
cd bench || exit 1
case "$1" in
  check)
    nvidia-smi | tee "$OUT/nvidia-smi.txt"
    nproc; df -h /dev/shm /tmp; free -g
    python3 -c "import torch, transformers, zarr, numcodecs, google_crc32c, crc32c, triton; print(torch.__version__, transformers.__version__, zarr.__version__, numcodecs.__version__, triton.__version__, torch.cuda.get_device_name())" || exit 1
    python3 suite.py --model idefics2-8b --tiny --n 8 --batch 2 --steps 3 --workers 2 --queries 2 --out /tmp/tiny2 2>&1 | tee "$OUT/tiny2.log" | grep -E "FAILED|Error|^\[" | head -60
    python3 suite.py --model idefics-9b --tiny --shots 8 --icl-shots 8 --n 8 --batch 2 --steps 3 --workers 2 --queries 2 --out /tmp/tiny1 2>&1 | tee "$OUT/tiny1.log" | grep -E "FAILED|Error" | head -40
    ;;
  log_z2)
    python3 log_z2.py --out "$OUT/log_z2.json" 2>&1 | tee "$OUT/log_z2.log" | grep -E "FAIL|Error|checks|^\|"
    ;;
  mu_paths)
    python3 mu_paths.py --out "$OUT/mu_paths.json" 2>&1 | tee "$OUT/mu_paths.log" | grep -E "FAIL|Error|PASS|mu paths"
    ;;
  profile)
    python3 profile_mimic.py --model "${MODEL:-idefics2-8b}" --out "$OUT/profile.json" 2>&1 | tee "$OUT/profile.log" | grep -E "FAIL|Error|^\|"
    ;;
  attention)
    python3 attention.py --out "$OUT/attention.json" 2>&1 | tee "$OUT/attention.log" | grep -E "FAIL|Error|^\|"
    ;;
  idefics2)
    python3 suite.py --model idefics2-8b --shots 8 --icl-shots 8 32 --n "${N:-96}" --batch 8 --steps "${STEPS:-12}" \
      --workers "${WORKERS:-8}" ${WRITERS:+--writers "$WRITERS"} --sections "${SECTIONS:-stage1,stage2,overhead,infer,compiled,store}" --infer-batch "${INFER_BATCH:-4}" --out "$OUT/idefics2" \
      --work /tmp/bench-idefics2 2>&1 | tee "$OUT/idefics2.log" | grep -E "FAILED|Error|^\[|^\|"
    ;;
  idefics1)
    python3 suite.py --model idefics-9b --shots 32 --icl-shots 8 32 --n "${N:-96}" --batch 8 --steps "${STEPS:-12}" \
      --workers "${WORKERS:-8}" --sections "${SECTIONS:-stage1,stage2,overhead,infer,compiled,store}" --infer-batch "${INFER_BATCH:-4}" --out "$OUT/idefics1" \
      --work /tmp/bench-idefics1 2>&1 | tee "$OUT/idefics1.log" | grep -E "FAILED|Error|^\[|^\|"
    ;;
  stage1)  # each variant in a fresh process: its first teacher-cache is the cold run a user meets
    for v in ${VARIANTS:-default writers1 hostreg}; do
      extra=""; conf=""
      [ "$v" = writers1 ] && extra="--writers 1"
      [ "$v" = hostreg ] && conf="pinned_use_cuda_host_register:True,pinned_num_register_threads:8"
      PYTORCH_CUDA_ALLOC_CONF=$conf python3 suite.py --model idefics2-8b --shots 8 --n "${N:-160}" --batch 8 \
        --workers "${WORKERS:-8}" $extra --sections stage1 --out "$OUT/stage1-$v" --work "/tmp/bench-stage1-$v" \
        2>&1 | tee "$OUT/stage1-$v.log" | grep -E "FAILED|Error|^\[" | sed "s/^/$v /"
      rm -rf "/tmp/bench-stage1-$v"
    done
    ;;
  pipelined)
    python3 pipelined_check.py 2>&1 | tee "$OUT/pipelined_check.log" | grep -E "Error|pipelined check"
    ;;
  sdpafirst)
    python3 sdpa_first_call.py --out "$OUT/sdpa_first_call.json" 2>&1 | tee "$OUT/sdpa_first_call.log"
    ;;
  evalbatch)
    python3 eval_batch.py --model "${MODEL:-idefics2-8b}" --shots 8 32 --max-batch "${MAX_BATCH:-256}" \
      --out "$OUT/eval_batch" 2>&1 | tee "$OUT/eval_batch.log" | grep -E "FAIL|Error|^\|"
    ;;
  *) echo "usage: bash bench/run_gpu.sh check|log_z2|mu_paths|attention|profile|idefics2|idefics1|evalbatch|stage1|sdpafirst|pipelined"; exit 2 ;;
esac
