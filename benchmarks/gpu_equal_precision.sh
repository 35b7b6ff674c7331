#!/bin/bash
# Issue 22's table at equal precision: ResNet-18 and BERT-tiny at batch 1 and 32; forgeml fp16 and fp32,
# ONNX Runtime CUDA on an fp16 copy of the model (onnxconverter-common, fp32 inputs and outputs),
# ONNX Runtime TensorRT fp16 (engine build time apart), ONNX Runtime CUDA fp32 with TF32 on and off,
# PyTorch eager fp16 and fp32; every output checked against ONNX Runtime CPU; a per-kernel profile of
# forgeml's kernels. Results: $OUT/gpu_equal_precision_{a,b}.{md,json,log} and ..._profile.json.
#
# Prepared on a machine with the compiler (no GPU needed):
#   python benchmarks/gpu.py prepare --work build/gpu-eq --models resnet18,bert_tiny --batches 1,32 --variants fp32,fp16
#   python benchmarks/gpu.py pack --work build/gpu-eq --bundle .gpubundle-eq-a --cases resnet18_b1,bert_tiny_b1,bert_tiny_b32
#   python benchmarks/gpu.py pack --work build/gpu-eq --bundle .gpubundle-eq-b --cases resnet18_b32
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d /tmp/eqwheels apache-tvm-ffi==0.1.14.post1
#   pip download --no-deps -d /tmp/eqwheels onnxconverter-common==1.16.0      # pure Python, 90 kB
#   for p in a b; do mkdir -p .gpubundle-eq-$p/wheels && cp /tmp/eqwheels/*.whl .gpubundle-eq-$p/wheels/; done
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d /tmp/ortgpu onnxruntime-gpu==1.31.1
#   python benchmarks/ort_cuda_pack.py /tmp/ortgpu/onnxruntime_gpu-*.whl -o .ortgpu/site.tar.xz --sm 90 --with-tensorrt
#   cp build/gpu-eq/plan.json .ortgpu/
#
# On the GPU machine, three calls on the same warm machine (a call carries 64 MiB with the working tree:
# onnxruntime-gpu cut to sm_90 is ~58 MiB; ResNet-18's fp32 weights differ per batch, 39 MB each packed,
# so ResNet-18 b32 travels alone):
#   STAGE=ort bash benchmarks/gpu_equal_precision.sh            # carry .ortgpu: onnxruntime-gpu, ONNX export
#   STAGE=run PART=a bash benchmarks/gpu_equal_precision.sh     # carry .gpubundle-eq-a: ResNet-18 b1, BERT-tiny b1+b32
#   STAGE=run PART=b bash benchmarks/gpu_equal_precision.sh     # carry .gpubundle-eq-b: ResNet-18 b32
# About 1.5 + 2 + 2.5 minutes of device time (BUDGET=0.5 s per engine per case; no memory subprocesses).
# TensorRT needs its own libraries (libnvinfer) on the machine; where they are missing the TensorRT
# rows say "provider not available" and the rest of the table stands.
cd "$(dirname "$0")/.."
case "${STAGE:-}" in
  ort)
    SKIP_CHECK=1 exec bash benchmarks/gpu_device_ort.sh ;;
  run)
    BUNDLE=.gpubundle-eq-${PART:?PART=a or PART=b}
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      $BUNDLE/wheels/*.whl || exit 3
    [ -f /root/ort_env.txt ] && export $(cat /root/ort_env.txt)
    PYTHONPATH=/tmp/site:/root/ortsite:$PWD python3 -c "
import ctypes.util, onnx, onnxconverter_common, onnxruntime as o
print('onnx', onnx.__version__, 'onnxconverter-common', onnxconverter_common.__version__, 'ort', o.__version__,
      o.get_available_providers(), 'libnvinfer', ctypes.util.find_library('nvinfer'))" || exit 4
    BUNDLE=$BUNDLE NAME=gpu_equal_precision_$PART NO_MEMORY=1 RUN_TIMEOUT=${RUN_TIMEOUT:-200} BUDGET=${BUDGET:-0.5} \
      PROFILE=1 PROFILE_MODELS=resnet18,bert_tiny PROFILE_LINES=60 exec bash benchmarks/gpu_device_run.sh ;;
  *)
    echo "STAGE=ort (carry .ortgpu), then STAGE=run PART=a and PART=b (carry .gpubundle-eq-a/-b)" >&2; exit 2 ;;
esac
