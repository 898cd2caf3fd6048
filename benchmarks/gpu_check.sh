#!/usr/bin/env bash
# The prepared GPU check: CUDA tests, then the three benchmarks on the device (degradation, training step with
# the real SD-Turbo architecture in mixed precision, inference). Run from the repository root on a CUDA machine:
#   OUT=gpu_check_out bash benchmarks/gpu_check.sh
# If a `.whl/` folder of wheels is present (made by benchmarks/gpu_wheels.sh for a bare GPU box), they are
# installed into /tmp/site first. Each stage has its own time limit so one slow stage cannot starve the others.
set -uo pipefail
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"

stage() {  # stage NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  echo "=== $name: rc=${PIPESTATUS[0]} in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
}

stage gpu_tests 90 python3 -m pytest -q -m gpu -p no:cacheprovider tests
stage degradation 25 python3 benchmarks/degradation.py --device cuda --iters 10 --warmup 2
stage train_step 100 python3 benchmarks/train_step.py --device cuda --real-arch --precision bf16-mixed \
  --batch-size 2 --steps 5 --warmup 2 --rounds 1
stage inference 60 python3 benchmarks/inference.py --device cuda --dtype float16 --real-arch --size 128 \
  --steps 1 5 --repeats 3 --warmup 1
cat "$OUT/summary.txt"
