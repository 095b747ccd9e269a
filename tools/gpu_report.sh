#!/usr/bin/env bash
# The GPU part of the speed report, in one command for a CUDA machine:
#   1. tools/benchmark.py --compare at 800x1344, batch 1, float16 and bfloat16: latency of
#      mmeformer (eager, fused) against timm and the official-code stand-in, with the ratios.
#   2. tools/device_check.py: do the backbones compute on the GPU (float32 / float16 / bfloat16,
#      eager and deploy-fused) what they compute on CPU? Inference at 800x1344; inference and a
#      training step at 250x330 (a training check at 800x1344 costs four float32 CPU training
#      steps per variant for its reference: 76 s for L7 on 2 cores here, without the
#      sensitivity steps).
# Latency comes first: each part writes its own report, so a run stopped by a time limit keeps
# the latency tables.
#
#   tools/gpu_report.sh [OUT [ARCH ...]]     # default outputs/gpu, all 13 variants
#
# Needs torch with CUDA, mmengine and timm (no mmcv: the backbones import without it). Exit
# status 2 if a latency run failed, else 1 if a device check is above tolerance or failed; every
# part runs regardless.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-outputs/gpu}
shift || true
variants=()
if [ $# -gt 0 ]; then variants=(--variants "$@"); fi
python=${PYTHON:-python}

if ! "$python" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "tools/gpu_report.sh: no CUDA device is available to $python; run it on a GPU machine" >&2
    exit 2
fi
status=0
# --threads: the CPU builds the models and counts their MACs; the timed forwards run on the GPU.
for dtype in float16 bfloat16; do
    "$python" tools/benchmark.py --device cuda --dtype "$dtype" --compare --sizes 800x1344 \
        --runtimes eager fused --threads "$(nproc)" "${variants[@]}" \
        --out "$out/latency_$dtype" || status=2
done
"$python" tools/device_check.py --device cuda "${variants[@]}" --sizes 800x1344 --no-training \
    --out "$out/device_check_800x1344" || status=$(( status ? status : 1 ))
"$python" tools/device_check.py --device cuda "${variants[@]}" --sizes 250x330 \
    --out "$out/device_check_250x330" || status=$(( status ? status : 1 ))
echo "reports under $out: latency_float16/latency.md, latency_bfloat16/latency.md," \
     "device_check_800x1344/device_check.md, device_check_250x330/device_check.md"
exit $status
