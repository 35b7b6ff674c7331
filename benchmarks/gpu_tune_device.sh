#!/bin/bash
# Device call (carry .gputune/tune.tar.xz, written by `python benchmarks/gpu_tune.py write`): install tvm_ffi and
# the TVM runtime libraries, time every batch's candidates with forgeml's runtime (no compiler here),
# return <case>.results.json under $OUT. Then here: python benchmarks/gpu_tune.py import --results <files_at>.
cd "$(dirname "$0")/.."  # the repository root
START=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader
WORK=${TMPDIR:-/tmp}/gputune
rm -rf $WORK && mkdir -p $WORK && tar -C $WORK -xJf ${PACK:-.gputune/tune.tar.xz} || exit 3
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $WORK/gputune/wheels/*.whl \
  || echo "no tvm_ffi wheel installed (using the machine's)"
mkdir -p $WORK/lib && for f in $WORK/gputune/lib/*.xz; do xz -dc $f > $WORK/lib/$(basename ${f%.xz}); done
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 FORGEML_TVM_LIB=$WORK/lib TVM_FFI_DISABLE_TORCH_C_DLPACK=1
# libcudart from the bundle when the machine has none on its library path
ldconfig -p | grep -q libcudart.so.13 || export LD_LIBRARY_PATH=$WORK/lib:$LD_LIBRARY_PATH
echo "unpacked after $(( $(date +%s) - START )) s"
for case in $(python3 -c "import json; print(' '.join(json.load(open('$WORK/gputune/cases.json'))))"); do
  timeout ${CASE_TIMEOUT:-400} python3 -m forgeml.runtime.measure $WORK/gputune/batches/$case --timeout ${TIMEOUT:-20} 2>&1 | tail -2
  cp $WORK/gputune/batches/$case/results.json $OUT/$case.results.json
  echo "$case done after $(( $(date +%s) - START )) s"
done
