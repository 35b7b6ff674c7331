#!/bin/bash
# Here, between the device calls: import what benchmarks/gpu_tune_device.sh measured, build the
# benchmark's artifacts with the new records, and pack them for benchmarks/gpu_device_run.sh.
#   bash benchmarks/gpu_after_tune.sh <files_at of the measuring call>
# PACK_DIRS: the `gpu_tune.py write --out` folders measured; WORK/BUNDLE/MODELS/BATCHES/VARIANTS as
# benchmarks/gpu.py takes them (artifacts already in WORK are kept: --reuse).
set -euo pipefail
cd "$(dirname "$0")/.."  # the repository root
RESULTS=${1:?usage: gpu_after_tune.sh <files_at of the measuring call>}
PY=${PY:-.venv/bin/python}
for dir in ${PACK_DIRS:-.gputune_var .gputune_nhwc .gputune}; do
  name=$(basename "$dir"); name=${name#.}
  if [ -d "$RESULTS/$name" ]; then
    $PY benchmarks/gpu_tune.py import --out "$dir" --results "$RESULTS/$name"
  else
    echo "no results for $dir in $RESULTS (not measured): skipped"
  fi
done
WORK=${WORK:-build/gpu_next}; BUNDLE=${BUNDLE:-.gpunext}
$PY benchmarks/gpu.py prepare --work "$WORK" --models "${MODELS:-resnet18}" --batches "${BATCHES:-32}" --reuse \
  --variants "${VARIANTS:-fp16 untuned,fp16 nhwc untuned,fp16,fp16 nhwc}"
$PY benchmarks/gpu.py pack --work "$WORK" --bundle "$BUNDLE"
mkdir -p "$BUNDLE/wheels" && cp .gpubundle/wheels/apache_tvm_ffi-*cp312*.whl "$BUNDLE/wheels/"
SIZE=$(du -sm "$BUNDLE" | cut -f1)
echo "$BUNDLE: $SIZE MiB$( [ "$SIZE" -ge 64 ] && echo ' [over the 64 MiB a device call carries: fewer variants]')"
echo "next: device call with .ortgpu (bash benchmarks/gpu_device_ort.sh), then within 30 s" \
     "BUNDLE=$BUNDLE bash benchmarks/gpu_device_run.sh carrying $BUNDLE"
