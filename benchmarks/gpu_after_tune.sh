#!/bin/bash
# Here, between the device calls: import what benchmarks/gpu_tune_device.sh measured, build the
# benchmark's artifacts with the new records, and pack them for benchmarks/gpu_device_run.sh.
#   bash benchmarks/gpu_after_tune.sh <files_at of the measuring call, or "none" before any>
# PACK_DIRS: the `gpu_tune.py write --out` folders measured; WORK/BUNDLE/MODELS/BATCHES/VARIANTS as
# benchmarks/gpu.py takes them (artifacts already in WORK are kept: --reuse). WITH_PACKS: pack
# folders to carry in the bundle too (as $BUNDLE/<folder without its dot>/tune.tar.xz), so that the
# benchmark's device call can measure them after it:
#   BUNDLE=.gpunext bash benchmarks/gpu_device_run.sh; PACKS=.gpunext/gputune_var/tune.tar.xz bash benchmarks/gpu_tune_device.sh
set -euo pipefail
cd "$(dirname "$0")/.."  # the repository root
RESULTS=${1:?usage: gpu_after_tune.sh <files_at of the measuring call, or none>}
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
  --variants "${VARIANTS:-fp16 untuned,fp16 nchw untuned,fp16,fp16 nchw}"
$PY benchmarks/gpu.py pack --work "$WORK" --bundle "$BUNDLE"
mkdir -p "$BUNDLE/wheels" && cp .gpubundle/wheels/apache_tvm_ffi-*cp312*.whl "$BUNDLE/wheels/"
for dir in ${WITH_PACKS:-}; do
  name=$(basename "$dir"); name=${name#.}
  mkdir -p "$BUNDLE/$name" && cp "$dir/tune.tar.xz" "$BUNDLE/$name/"
done
SIZE=$(du -sm "$BUNDLE" | cut -f1)
echo "$BUNDLE: $SIZE MiB$( [ "$SIZE" -ge 64 ] && echo ' [over the 64 MiB a device call carries: fewer variants]')"
echo "next: device call with .ortgpu (bash benchmarks/gpu_device_ort.sh), then within 30 s" \
     "BUNDLE=$BUNDLE bash benchmarks/gpu_device_run.sh carrying $BUNDLE"
