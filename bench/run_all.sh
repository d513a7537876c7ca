#!/usr/bin/env bash
# Run every robustft benchmark in sequence; each prints its tables and writes <OUT>/<name>.json.
#
#   bench/run_all.sh                 # everything, the ~15-minute demo last
#   SKIP_DEMO=1 bench/run_all.sh     # everything but the demo
#   OUT=/tmp/mybench WAIT_QUIET=600 bench/run_all.sh
#
# Environment: OUT (default /tmp/robustft-bench-<date>), PYTHON (default .venv/bin/python), WAIT_QUIET (seconds
# each benchmark first waits for the 1-min loadavg to stay below QUIET_LOAD, default 300 / 1.2), SKIP_DEMO,
# DEVICE (cpu or cuda; with cuda the extraction and training rows are also run for open_clip ViT-B-32 in bf16).
# Never writes into the checkout's results/.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-/tmp/robustft-bench-$(date +%Y%m%d-%H%M%S)}
WAIT_QUIET=${WAIT_QUIET:-300}
QUIET_LOAD=${QUIET_LOAD:-1.2}
DEVICE=${DEVICE:-cpu}
mkdir -p "$OUT"
common=(--wait-quiet "$WAIT_QUIET" --quiet-load "$QUIET_LOAD")
echo "# outputs in $OUT"
{ nproc; grep -m1 'model name' /proc/cpuinfo; grep MemTotal /proc/meminfo; } | tee "$OUT/machine.txt"

run() {  # name, then the command
  local name=$1; shift
  echo; echo "=================== $name: $*"
  "$@" 2>&1 | grep -v -e '^\s*warnings.warn' -e 'UserWarning' | tee "$OUT/$name.txt"
}

# 1. feature extraction (EfficientNet-Lite0, real packaged weights; 500 photo images at 224 px)
run extraction "$PYTHON" bench/bench_extraction.py --n 500 --image-size 224 --memory-sizes 250,1000 --probe \
  --storage --device "$DEVICE" "${common[@]}" --json "$OUT/extraction.json"
# ... and at the demo's 96 px (where JPEG decoding is a larger share of the plain loop)
run extraction_96px "$PYTHON" bench/bench_extraction.py --n 500 --image-size 96 --memory-sizes '' \
  --device "$DEVICE" "${common[@]}" --json "$OUT/extraction_96px.json"
# 2. training: shared trainer vs plain loop (demo resolution and batch)
run training "$PYTHON" bench/bench_training.py --image-size 96 --batch-size 32 --steps 30 --repeats 3 --finetune-run \
  --device "$DEVICE" "${common[@]}" --json "$OUT/training.json"
# ... gradient accumulation and 2 data-parallel ranks (gloo on CPU, NCCL on CUDA) at the same global batch
run parallel "$PYTHON" bench/bench_parallel.py --image-size 96 --batch-size 32 --steps 12 --micro-splits 4 --repeats 3 \
  --device "$DEVICE" "${common[@]}" --json "$OUT/parallel.json"
# ... reading the caches: chunk layout before/after, sequential and in the trainer's random order, warm and cold
run reads "$PYTHON" bench/bench_reads.py --mb 200 --repeats 3 "${common[@]}" --json "$OUT/reads.json"
# 3. WiSE-FT sweep of 11 alphas: demo-sized eval splits, then the tiny test config's sizes
run sweep "$PYTHON" bench/bench_sweep.py --image-size 96 --val 70 --per-split 140 "${common[@]}" --json "$OUT/sweep.json"
run sweep_small "$PYTHON" bench/bench_sweep.py --image-size 64 --val 21 --per-split 28 "${common[@]}" \
  --json "$OUT/sweep_small.json"
# 4. snakemake: 10,000-job dry run, parse alone, no-op rerun of the tiny pipeline
run snakemake "$PYTHON" bench/bench_snakemake.py --jobs 10000 --repeats 3 "${common[@]}" --json "$OUT/snakemake.json"
if [[ "$DEVICE" == cuda ]]; then
  run extraction_vitb32 "$PYTHON" bench/bench_extraction.py --backbone open_clip --model ViT-B-32 --device cuda \
    --n 2000 --batch-size 256 --memory-sizes '' --probe --probe-batch-sizes 64,256,512 --json "$OUT/extraction_vitb32.json"
  run training_vitb32 "$PYTHON" bench/bench_training.py --backbone open_clip --model ViT-B-32 --device cuda \
    --batch-size 128 --steps 40 --repeats 3 --json "$OUT/training_vitb32.json"
fi
# 4b. scale: every stage at N and 8N synthetic images, peak memory per stage; streaming vs in-memory training
run scale "$PYTHON" bench/bench_scale.py --n 8000 "${common[@]}" --json "$OUT/scale.json"
# 5. the whole demo (about 15 minutes on 2 cores): last, once
if [[ -z "${SKIP_DEMO:-}" ]]; then
  run demo "$PYTHON" bench/bench_demo.py --cores 2 "${common[@]}" --json "$OUT/demo.json"
fi
echo; echo "# done: $OUT"
