#!/usr/bin/env bash
# The GPU part of the speed report, in one command for a CUDA machine:
#   1. tools/device_check.py: do the backbones compute on the GPU (float32 / float16 / bfloat16,
#      eager and deploy-fused, inference and a training step) what they compute on CPU?
#   2. tools/benchmark.py --compare at 800x1344, batch 1, float16 and bfloat16: latency of
#      mmeformer (eager, fused) against timm and the official-code stand-in, with the ratios.
#
#   tools/gpu_report.sh [OUT [ARCH ...]]     # default outputs/gpu, all 13 variants
#
# Needs torch with CUDA, mmengine and timm (no mmcv: the backbones import without it). Exit
# status 1 if a device check is above tolerance (the latency runs go on regardless).
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
"$python" tools/device_check.py --device cuda "${variants[@]}" --out "$out/device_check" \
    || status=1
for dtype in float16 bfloat16; do
    "$python" tools/benchmark.py --device cuda --dtype "$dtype" --compare --sizes 800x1344 \
        --runtimes eager fused "${variants[@]}" --out "$out/latency_$dtype" || exit 2
done
echo "reports under $out: device_check/device_check.md, latency_float16/latency.md," \
     "latency_bfloat16/latency.md"
exit $status
