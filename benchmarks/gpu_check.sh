#!/usr/bin/env bash
# The prepared GPU check: CUDA tests, then the three benchmarks on the device (degradation, training step with
# the real SD-Turbo architecture in mixed precision, inference: eager vs compiled, fp16 vs fp32 noise predictor).
# Without a GPU it says so and exits 0. Run from the repository root on a CUDA machine:
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
if ! command -v nvidia-smi >/dev/null 2>&1 || ! python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "no CUDA device here: nothing to check (run this on a GPU machine)" | tee "$OUT/summary.txt"
  exit 0
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

# Stage limits add up to 550 s: one device command (600 s at most) on a machine whose start takes ~4 of the
# session's 15 minutes.
stage gpu_tests 80 python3 -m pytest -q -m gpu -p no:cacheprovider tests
stage degradation 20 python3 benchmarks/degradation.py --device cuda --iters 10 --warmup 2
# issue 13 training target: the paper's per-GPU batch (16) in bf16, eager vs compiled side by side
stage train_step 180 python3 benchmarks/train_step.py --device cuda --real-arch --precision bf16-mixed \
  --batch-size 16 --steps 5 --warmup 2 --rounds 1 --compile
# issue 13 inference targets: real architecture, 1 step, 128 -> 512, fp16, batch 1: eager (fp32 NP under autocast)
# vs fp16 NP vs compiled (fp16 NP, channels_last); the first compiled call includes compilation.
stage inference_compiled 200 python3 benchmarks/inference.py --device cuda --dtype float16 --real-arch --size 128 \
  --steps 1 --repeats 20 --warmup 3 --no-stages --half-np --channels-last --compile --json "$OUT/inference_compiled.json"
stage inference_cudagraphs 70 python3 benchmarks/inference.py --device cuda --dtype float16 --real-arch --size 128 \
  --steps 1 --repeats 10 --warmup 3 --no-stages --half-np --compile --compile-mode reduce-overhead
cat "$OUT/summary.txt"
