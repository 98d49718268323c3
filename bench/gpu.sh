#!/usr/bin/env bash
# One device run: the CUDA tests, then the speed harness on the GPU (results under $OUT).
#   device tool: run(command="bash bench/gpu.sh", carry=[".whl"])
# .whl holds diffusers 0.42.1 and importlib_metadata 8.7.0 (pip download, see the device README).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__)" | tee -a "$OUT/gpu.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_graphs.py 2>&1 | tail -25 | tee "$OUT/tests.log"
timeout "${BENCH_TIMEOUT:-400}" python3 bench/speed.py --compile ${BENCH_ARGS:-} --json "$OUT/results-cuda.json" 2>&1 \
  | grep -v -i "warn\|kept in float32\|Writing model" | tee "$OUT/bench.log"
echo "exit codes: ${PIPESTATUS[*]}"
