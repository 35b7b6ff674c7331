#!/bin/bash
# Device call 1 (carry .ortgpu: site.tar.xz from benchmarks/ort_cuda_pack.py, plan.json from prepare):
# unpack onnxruntime-gpu to /root/ortsite, check its CUDA provider on two zoo models, export the zoo
# ONNX models with the device's torch to /root/onnx. Both stay while the machine is warm: run
# benchmarks/gpu_device_run.sh (carry .gpubundle) right after it. SKIP_CHECK=1 skips the provider
# check (two models timed on ONNX Runtime CUDA) to save device time.
cd "$(dirname "$0")/.."
START=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
mkdir -p /root/ortsite && tar -C /root/ortsite -xJf ${ORT_PACK:-.ortgpu/site.tar.xz} || exit 3
echo "unpacked after $(( $(date +%s) - START )) s"
SP=$(python3 -c "import site; print(site.getsitepackages()[0])")
export LD_LIBRARY_PATH=$(ls -d $SP/nvidia/*/lib $SP/nvidia/cu13/lib 2>/dev/null | tr '\n' ':')$LD_LIBRARY_PATH
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH" > /root/ort_env.txt
export PYTHONPATH=/root/ortsite:$PWD PYTHONUNBUFFERED=1 TVM_FFI_DISABLE_TORCH_C_DLPACK=1
timeout 200 python3 benchmarks/gpu.py export-onnx --work .ortgpu --onnx-dir /root/onnx 2>&1 | tail -12
echo "exported after $(( $(date +%s) - START )) s"; ls -la /root/onnx
[ "${SKIP_CHECK:-0}" = 1 ] && { echo "total $(( $(date +%s) - START )) s (provider check skipped)"; exit 0; }
timeout 120 python3 - <<'PY'
import numpy as np, onnxruntime as ort, time
print("ort", ort.__version__, ort.__file__, ort.get_available_providers())
from forgeml.compiler.verify import onnxruntime_cuda_runner, compare
for name in ("resnet18_b1", "bert_tiny_b1"):
    path = f"/root/onnx/{name}.onnx"
    cpu = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feeds = {}
    for i in cpu.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in i.shape]
        feeds[i.name] = (np.random.rand(*shape).astype(np.float32) if "float" in i.type
                         else np.random.randint(0, 100, shape).astype(np.int64))
    ref = dict(zip([o.name for o in cpu.get_outputs()], cpu.run(None, feeds)))
    t = time.time(); run, outputs = onnxruntime_cuda_runner(path, feeds); run(); t1 = time.time() - t
    print(name, "cuda session+first run", round(t1, 2), "s; error vs ORT CPU", compare(outputs(), ref))
    s = ort.InferenceSession(path, providers=["CUDAExecutionProvider"])
    print("providers", s.get_providers(), {k: v for k, v in s.get_provider_options()["CUDAExecutionProvider"].items() if k in ("use_tf32", "cudnn_conv_algo_search", "enable_cuda_graph", "prefer_nhwc")})
    t = time.time()
    for _ in range(50): run()
    print(name, "ORT CUDA mean ms", round((time.time() - t) / 50 * 1e3, 3))
PY
echo "total $(( $(date +%s) - START )) s"
