#!/usr/bin/env bash
# One device run for issue 17 item 3 (GPU speed) and low-memory mode on CUDA: the CUDA tests of
# graphs and low-memory mode, then bench/gpu_round2.py (results under $OUT).
#   device tool: run(command="bash bench/gpu_round2.sh", carry=[".whl"])
# PARTS=images runs only those parts; BENCH_ARGS="--tuning" or "--autotune" adds those compiles.
# .whl holds diffusers 0.42.1, importlib_metadata 8.7.0 and greenlet for the device's Python 3.12
# (pip download --no-deps --only-binary=:all:, see the device README).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers; print(torch.__version__, diffusers.__version__)" | tee -a "$OUT/gpu.txt"
timeout ${TEST_TIMEOUT:-100} python3 -m pytest -q -p no:cacheprovider tests/test_graphs.py tests/test_offload.py -k "cuda or offload" 2>&1 | tail -15 | tee "$OUT/tests.log"
timeout ${BENCH_TIMEOUT:-420} python3 bench/gpu_round2.py --json "$OUT/gpu-round2.json" --profile "$OUT/profile.txt" --budget-s ${BUDGET_S:-400} \
  ${PARTS:+--parts $PARTS} ${BENCH_ARGS:-} 2>&1 | grep -v -i "warn\|kept in float32\|Writing model\|torchvision" | tee "$OUT/bench.log"
echo "exit codes: ${PIPESTATUS[*]}"
