#!/usr/bin/env bash
# One device run (issue 10): the CUDA tests, then one 50-step SD 1.5 512² image with
# optimize() and optimize(compile=True), timed for the previous unfog (a copy of its package in
# .cache/old_unfog) and for this checkout, alternately, on the same random weights, so both
# figures come from one machine.
#   device tool: run(command="bash bench/gpu_compare.sh", carry=[".whl", ".cache/old_unfog"])
# .whl holds diffusers 0.42.1, importlib_metadata 8.7.0 and greenlet for the device's Python
# (pip download --no-deps; greenlet with --python-version 3.12 --only-binary=:all:).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
start=$SECONDS
for w in .whl/*.whl; do  # a wheel for another Python is skipped (the dry run here has 3.11)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$w" 2>/dev/null || echo "skipped $w"
done
python3 -c "import sys; sys.path.insert(0, '/tmp/site'); import greenlet, diffusers" || exit 1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
PYTHONPATH=/tmp/site:$PWD timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_graphs.py 2>&1 | tail -15 | tee "$OUT/tests.log"
FOLDER=${FOLDER:-}
if [ -z "$FOLDER" ]; then
  PYTHONPATH=/tmp/site:$PWD timeout 150 python3 bench/image_time.py --build /tmp/sd15 2>&1 | grep -v -i warn | tail -3
  FOLDER=/tmp/sd15/sd
fi
for round in 1 2; do
  for who in old new; do
    if [ $((SECONDS - start)) -gt ${BUDGET_S:-420} ]; then echo "skipping $who round $round: ${SECONDS}s used"; continue; fi
    src=$PWD; [ "$who" = old ] && src=$PWD/.cache/old_unfog
    PYTHONPATH=/tmp/site:$src timeout 240 python3 bench/image_time.py --folder "$FOLDER" --variants "${VARIANTS:-optimize(),optimize(compile=True)}" \
      --repeats ${REPEATS:-5} ${IMAGE_ARGS:-} --json "$OUT/image-$who-$round.json" 2>&1 | grep -v -i "warn" | tail -4
  done
done
echo "done in $((SECONDS - start)) s"
