#!/bin/bash
# Device call (carry the packs written by `python benchmarks/gpu_tune.py write --out DIR`, default
# .gputune/tune.tar.xz; several: PACKS="A/tune.tar.xz B/tune.tar.xz"): install tvm_ffi and the TVM
# runtime libraries, time every batch's candidates with forgeml's runtime (no compiler here), return
# <pack dir>/<case>.results.json under $OUT. Then here, per pack:
#   python benchmarks/gpu_tune.py import --out DIR --results <files_at>/<DIR without its leading dot>
# CASE_TIMEOUT caps each batch: an unfinished one returns what it measured, and a rerun on the same
# warm machine resumes it (a fresh machine starts over).
cd "$(dirname "$0")/.."  # the repository root
START=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader
for PACK in ${PACKS:-${PACK:-.gputune/tune.tar.xz}}; do
  NAME=$(basename "$(dirname "$PACK")"); NAME=${NAME#.}
  WORK=${TMPDIR:-/tmp}/gputune/$NAME
  mkdir -p $WORK $OUT/$NAME && { [ -d $WORK/gputune ] || tar -C $WORK -xJf $PACK; } || exit 3
  if [ ! -d /tmp/site/tvm_ffi ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $WORK/gputune/wheels/*.whl \
      || echo "no tvm_ffi wheel installed (using the machine's)"
  fi
  LIB=${TMPDIR:-/tmp}/gputune/lib
  mkdir -p $LIB && for f in $WORK/gputune/lib/*.xz; do xz -dc $f > $LIB/$(basename ${f%.xz}); done
  export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 FORGEML_TVM_LIB=$LIB TVM_FFI_DISABLE_TORCH_C_DLPACK=1
  # libcudart from the pack when the machine has none on its library path
  ldconfig -p | grep -q libcudart.so.13 || export LD_LIBRARY_PATH=$LIB:$LD_LIBRARY_PATH
  echo "$NAME unpacked after $(( $(date +%s) - START )) s"
  for case in $(python3 -c "import json; print(' '.join(json.load(open('$WORK/gputune/cases.json'))))"); do
    timeout ${CASE_TIMEOUT:-400} python3 -m forgeml.runtime.measure $WORK/gputune/batches/$case --timeout ${TIMEOUT:-20} 2>&1 | tail -2
    cp $WORK/gputune/batches/$case/results.json $OUT/$NAME/$case.results.json
    echo "$NAME/$case done after $(( $(date +%s) - START )) s"
  done
done
