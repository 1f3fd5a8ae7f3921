#!/usr/bin/env bash
# The GPU figures of docs/BENCHMARKS.md in one call, so a GPU machine is started once:
#   1. tools/benchmark_gpu.py: training throughput and peak memory, resnet50 vs ptl_resnet50, fp32 vs AMP,
#      batch 64 at 256x128;
#   2. a short `train.amp True` training run of a PTL config ($MODEL, default ptl_resnet50, on the synthetic
#      dataset);
#   3. the same run under a one-process `torchrun` (DistributedDataParallel, nccl on CUDA).
# Everything goes under $OUT (default log/gpu_checks): gpu.md, amp.log, ddp.log and summary.txt.
#
#   OUT=log/gpu_checks bash tools/gpu_checks.sh            # on a CUDA machine with the project installed
#   # the same steps on the CPU, small and in fp32 (bf16 autocast is slow on most CPUs), to check the script:
#   DEVICE=cpu ITERS=1 BATCH=4 MODES=fp32 EPOCHS=1 MODEL=ptl_osnet_x0_25 AMP=False bash tools/gpu_checks.sh
#
# On a machine without a package registry, install the project first (see the GPU machine's setup script).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-log/gpu_checks}
DEVICE=${DEVICE:-cuda}
ITERS=${ITERS:-30}
BATCH=${BATCH:-64}
MODEL=${MODEL:-ptl_resnet50}
MODES=${MODES:-fp32,amp,amp_cl}  # benchmark_gpu.py's modes
AMP=${AMP:-True}                 # train.amp of the two training runs
EPOCHS=${EPOCHS:-2}
PY=${PYTHON:-python3}
mkdir -p "$OUT"

if [ "$DEVICE" = cuda ]; then
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_checks: no CUDA device is visible to torch; run it on a GPU machine (or DEVICE=cpu for a dry run)" >&2
        exit 2
    fi
    USE_GPU=True
else
    USE_GPU=False
fi
"$PY" -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')" \
    | tee "$OUT/summary.txt"

# 1. throughput, fp32 vs AMP (fp16 on CUDA)
"$PY" tools/benchmark_gpu.py --device "$DEVICE" --iters "$ITERS" --batch-size "$BATCH" --modes "$MODES" --out "$OUT/gpu.md"

# 2. and 3. a short PTL training run with AMP, plain and under torchrun. Synthetic data, generated on first use;
# the identity classifier starts from scratch, so the figures of interest are that it trains and how fast.
RUN=(--config-file configs/synthetic_demo.yaml --root "$OUT/data" model.name "$MODEL" train.amp "$AMP"
     train.max_epoch "$EPOCHS" train.stepsize "[$EPOCHS]" test.eval_freq -1 use_gpu "$USE_GPU"
     train.progress_bar False)
summarise() {  # the run's wall time, its last logged step and its final ranking figures
    echo "== $1: $2 s" >> "$OUT/summary.txt"
    grep -E "^epoch $EPOCHS/$EPOCHS " "$OUT/$1.log" | tail -n 1 >> "$OUT/summary.txt" || true
    grep -E "^(mAP|Rank-1 )" "$OUT/$1.log" | tail -n 2 >> "$OUT/summary.txt" || true
}
SECONDS=0
"$PY" -m ptl_torchreid "${RUN[@]}" data.save_dir "$OUT/amp" > "$OUT/amp.log" 2>&1
summarise amp "$SECONDS"
SECONDS=0
"$PY" -m torch.distributed.run --standalone --nproc_per_node=1 -m ptl_torchreid "${RUN[@]}" \
    data.save_dir "$OUT/ddp" > "$OUT/ddp.log" 2>&1
summarise ddp "$SECONDS"
cat "$OUT/summary.txt"
