#!/usr/bin/env bash
# One device run: train the emoji-scenes model on the GPU, export it, generate the evaluation
# images (scored on the CPU afterwards by `unfog eval emoji --images`), and bring everything back.
#   device tool: run(command="bash scripts/gpu_emoji.sh", carry=[".whl"])
# Extra arguments go to train_default.py (a continuation: --init runs/emoji-gpu1/model, carried).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/greenlet-*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/train.log"
RUN=/tmp/runs/emoji
timeout ${TRAIN_TIMEOUT:-540} python3 scripts/train_default.py --world emoji --out $RUN --workers 14 \
  --ae-seconds ${AE_SECONDS:-80} --dm-seconds ${DM_SECONDS:-330} --eval-prompts 600 --eval-seeds 0,1 "$@" 2>&1 \
  | grep -v "it/s\]\|s/it\]" | tee -a "$OUT/train.log"
cp $RUN/eval-seed*.npz "$OUT/" 2>/dev/null
# at most 8 files of 16 MiB come back: the model (27 MB) and the run's records go as one split tar
(cd $RUN && tar cf - model report.json eval-seed*.png dm/metrics.jsonl ae/metrics.jsonl dm/samples ae/samples 2>/dev/null | split -b 15M - "$OUT/bundle.tar.")
ls -la "$OUT"
