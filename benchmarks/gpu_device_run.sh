#!/bin/bash
# Device call 2 (carry $BUNDLE, default .gpubundle): install tvm_ffi, unpack the artifacts, check them
# against ONNX Runtime CPU reference outputs, benchmark forgeml vs ONNX Runtime CUDA (the
# onnxruntime-gpu that gpu_device_ort.sh left in /root/ortsite, if this is still that machine) vs
# PyTorch eager, then profile forgeml's kernels (PROFILE=1). ISOLATE="fp16 mma": those variants'
# artifacts first run in a process of their own (a faulting kernel would end the whole run).
cd "$(dirname "$0")/.."  # the repository root
BUNDLE=${BUNDLE:-.gpubundle}; NAME=${NAME:-gpu}
START=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap,clocks.max.sm --format=csv
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $BUNDLE/wheels/*.whl || exit 3
[ -f /root/ort_env.txt ] && export $(cat /root/ort_env.txt) || echo "no onnxruntime-gpu here (fresh machine)"
export PYTHONPATH=/tmp/site:/root/ortsite:$PWD PYTHONUNBUFFERED=1 TVM_FFI_DISABLE_TORCH_C_DLPACK=1
python3 -c "import numpy, torch, onnxruntime as o; print('numpy', numpy.__version__, 'torch', torch.__version__, torch.cuda.is_available(), 'ort', o.__version__, o.get_available_providers())"
timeout ${RUN_TIMEOUT:-300} python3 benchmarks/gpu.py run --bundle $BUNDLE --onnx-dir /root/onnx --out $OUT/$NAME --budget-s ${BUDGET:-0.8} ${NO_MEMORY:+--no-memory} ${ISOLATE:+--isolate "$ISOLATE"} 2>&1 | tee $OUT/$NAME.log | grep -v "^|"
echo "run rc=${PIPESTATUS[0]} after $(( $(date +%s) - START )) s"
if [ "${PROFILE:-0}" = 1 ]; then
  timeout 120 python3 benchmarks/gpu_profile.py --work ${TMPDIR:-/tmp}/forgeml-gpu-bench --out $OUT/${NAME}_profile.json --models ${PROFILE_MODELS:-resnet18} 2>&1 | grep -v -i warn | head -${PROFILE_LINES:-80}
fi
echo "total $(( $(date +%s) - START )) s"
