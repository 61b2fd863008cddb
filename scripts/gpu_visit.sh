#!/usr/bin/env bash
# Issue #10's open GPU measurements in ONE call to a lent GPU machine (at most 9 minutes of steps).
#
# Here first:  bash ../shared/device/make-site.sh      (hydra, omegaconf, smp, ... into .device-site/)
# Then one device call with carry [".device-site"]:    bash scripts/gpu_visit.sh
#
# Each step has its own time limit and writes its log under $OUT as it runs (unbuffered; bench_step.py prints a
# "# done:" line per case), so a step that runs out of time keeps what it measured and the next step still runs.
# Record the figures, with the card's name, in docs/benchmarks.md ("Step cost on a GPU").
set -u
OUT=${OUT:-/tmp/gpu-visit}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/.device-site:$PWD/src" PYTHONUNBUFFERED=1 WANDB_MODE=disabled
PY=${PYTHON:-python3}

step() {  # step NAME SECONDS COMMAND...: run COMMAND under a time limit, log to $OUT/NAME.log, then its status
    local name=$1 limit=$2 start
    shift 2
    start=$(date +%s)
    echo "== $name (limit ${limit} s): $*"
    timeout -s INT -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "== $name: exit $?, $(($(date +%s) - start)) s" | tee -a "$OUT/$name.log"
}

{ nvidia-smi -L; "$PY" -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"; } \
    >"$OUT/device.txt" 2>&1
cat "$OUT/device.txt"
BENCH=("$PY" scripts/bench_step.py --device cuda --precision bf16 --shapes 512x8)
rm -rf /tmp/main_cg /tmp/main_eager  # a second visit on a still-warm machine: train.py refuses a used run folder

# 1. The main job under CUDA graphs with one encoder graph (target: the whole job < 45 s); Lightning's simple
#    profiler prints where the time went.
step main_cudagraphs 140 "$PY" train.py trainer=gpu logger=csv data.num_workers=8 model.compile=train \
    +model.compile_options.backend=cudagraphs model.pack_multiple=24 +trainer.profiler=simple hydra.run.dir=/tmp/main_cg
# 2. Eager bf16, both backbones at 512 x 8, with the 20 ops of most self time per step (which SGF kernels are slow).
step eager_512x8 130 "${BENCH[@]}" --profile 20 --out "$OUT/eager_512x8.json"
# 3. PVT-v2-b2 under CUDA graphs (the targets: sgma step <= 1.40 x, SGF inference <= 1.15 x baseline).
step pvt_cudagraphs 110 "${BENCH[@]}" --backbones tu-pvt_v2_b2 --compile --compile-backend cudagraphs \
    --out "$OUT/pvt_cudagraphs.json"
# 4. PVT-v2-b2 eager with channels-last (SGF's 11 x 11 depthwise convolutions on cuDNN).
step pvt_channels_last 50 "${BENCH[@]}" --backbones tu-pvt_v2_b2 --channels-last --out "$OUT/pvt_channels_last.json"
# 5. The main job eager, as `python train.py trainer=gpu` runs it.
step main_eager 110 "$PY" train.py trainer=gpu logger=csv data.num_workers=8 hydra.run.dir=/tmp/main_eager
