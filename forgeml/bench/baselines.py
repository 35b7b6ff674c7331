"""ONNX Runtime baselines at stated precisions, so that a ratio compares equal precisions only.

    onnxruntime            the model as given (fp32); on CUDA with ONNX Runtime's default TF32 convolutions
                           and matmuls (precision "tf32"), on the CPU plain fp32
    onnxruntime-tf32-off   CUDA only: the fp32 model with `use_tf32=0` (precision "fp32")
    onnxruntime-fp16       an fp16 copy of the model (onnxconverter-common's float16 conversion, inputs and
                           outputs kept fp32 so the call is the same); on CUDA, or on the CPU where ONNX
                           Runtime has no CUDA provider (precision "fp16")
    onnxruntime-trt-fp16   CUDA only: ONNX Runtime's TensorRT provider with `trt_fp16_enable` on the fp32
                           model, its engine cache in a temporary directory; the engine build time (session
                           creation and first run) is reported apart from the latency (precision "fp16")

A forgeml row's precision is its artifact's (`compile_options.precision`: "fp16" is fp16 compute with
fp32 accumulation, "fp32" never uses TF32). Reports print a ratio only between rows of equal precision.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from forgeml.errors import BaselineUnavailable, InvalidInput, last_line


class Baseline(NamedTuple):
    name: str
    fp16_model: bool  # run an fp16 copy of the model
    provider: str  # "cuda-or-cpu" | "cuda" | "tensorrt"
    tf32: bool  # CUDA's use_tf32 (fp32 convolutions and matmuls on TF32 tensor cores)
    description: str


BASELINES: dict[str, Baseline] = {b.name: b for b in (
    Baseline("onnxruntime", False, "cuda-or-cpu", True, "ONNX Runtime on the model as given (CUDA: TF32 on)"),
    Baseline("onnxruntime-tf32-off", False, "cuda", False, "ONNX Runtime CUDA, fp32 with TF32 off"),
    Baseline("onnxruntime-fp16", True, "cuda-or-cpu", True, "ONNX Runtime on an fp16 copy of the model"),
    Baseline("onnxruntime-trt-fp16", False, "tensorrt", True, "ONNX Runtime's TensorRT provider, fp16"),
)}
PROVIDERS = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def get_baseline(name: str) -> Baseline:
    try:
        return BASELINES[name]
    except KeyError:
        raise InvalidInput(f"unknown baseline '{name}'; known: {', '.join(BASELINES)}, none") from None


def precision_of(baseline: Baseline, on_cuda: bool) -> str:
    """The precision a baseline row computes in: "fp16", "tf32" or "fp32"."""
    if baseline.fp16_model or baseline.provider == "tensorrt":
        return "fp16"
    return "tf32" if on_cuda and baseline.tf32 else "fp32"


def artifact_precision(compile_options: dict[str, Any]) -> str:
    """A forgeml artifact's precision ("fp32" or "fp16")."""
    return str(compile_options.get("precision") or "fp32")


def _cache_dir() -> Path:
    return Path(os.environ.get("FORGEML_CACHE") or "~/.cache/forgeml").expanduser() / "baselines"


def fp16_copy(source: str | Path, dest: str | Path | None = None) -> Path:
    """An fp16 copy of an ONNX model with fp32 inputs and outputs (onnxconverter-common), written once
    per source content under $FORGEML_CACHE/baselines (or at `dest`), atomically."""
    source = Path(source)
    try:
        data = source.read_bytes()
    except OSError as e:
        raise InvalidInput(f"cannot read the baseline model {source}: {e.strerror}") from None
    out = Path(dest) if dest else _cache_dir() / f"{hashlib.sha256(data).hexdigest()[:24]}-fp16.onnx"
    if out.exists():
        return out
    try:
        from onnxconverter_common import float16
    except ImportError:
        raise BaselineUnavailable("the onnxruntime-fp16 baseline needs onnxconverter-common "
                                  "(pip install onnxconverter-common, or the bench extra)") from None
    import onnx

    try:
        model = onnx.load_from_string(data)
        converted = float16.convert_float_to_float16(model, keep_io_types=True)
    except Exception as e:  # the converter's own errors (unsupported op, malformed model)
        raise InvalidInput(f"cannot make an fp16 copy of {source.name}: {last_line(e)}") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name, suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        onnx.save(converted, tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def baseline_model(baseline: Baseline, source: Path) -> Path:
    """The ONNX file the baseline runs."""
    return fp16_copy(source) if baseline.fp16_model else source


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def check_provider(baseline: Baseline) -> str | None:
    """The ONNX Runtime provider the baseline runs on ("CPUExecutionProvider" for a CPU fallback), or a
    BaselineUnavailable naming what is missing."""
    providers = available_providers()
    if baseline.provider == "cuda-or-cpu":
        return PROVIDERS["cuda"] if PROVIDERS["cuda"] in providers else "CPUExecutionProvider"
    wanted = PROVIDERS[baseline.provider]
    if wanted not in providers:
        raise BaselineUnavailable(f"baseline {baseline.name}: provider not available: this onnxruntime has no "
                                  f"{wanted} (it has {', '.join(providers)})")
    return wanted


class GpuBaseline(NamedTuple):
    run: Callable[[], None]  # one call on device-resident inputs, returns when the GPU is done
    outputs: Callable[[], dict[str, np.ndarray]]  # the last run's outputs, by name
    extra: dict[str, Any]  # provider options as ONNX Runtime reports them; build_s for TensorRT


def gpu_runner(baseline: Baseline, source: Path, feeds: dict[str, np.ndarray],
               engine_cache: str | Path | None = None) -> GpuBaseline:
    """ONNX Runtime on the GPU for `baseline` (io binding: inputs and outputs stay on the device).
    BaselineUnavailable when its provider is missing or does not load (ORT falls back silently)."""
    import onnxruntime as ort

    wanted = check_provider(baseline)
    if wanted == "CPUExecutionProvider":
        raise BaselineUnavailable(f"baseline {baseline.name}: provider not available: this onnxruntime has no "
                                  "CUDAExecutionProvider")
    model = baseline_model(baseline, source)
    cuda_options = {"use_tf32": "1" if baseline.tf32 else "0"}
    if baseline.provider == "tensorrt":
        cache = Path(engine_cache or tempfile.mkdtemp(prefix="forgeml-trt-"))
        trt_options = {"trt_fp16_enable": "True", "trt_engine_cache_enable": "True",
                       "trt_engine_cache_path": str(cache), "trt_timing_cache_enable": "True",
                       "trt_timing_cache_path": str(cache)}
        providers = [(PROVIDERS["tensorrt"], trt_options), (PROVIDERS["cuda"], cuda_options)]
    else:
        providers = [(PROVIDERS["cuda"], cuda_options)]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    start = time.perf_counter()
    try:
        session = ort.InferenceSession(str(model), options, providers=providers)
    except Exception as e:  # a provider library that fails to load, a model TensorRT cannot parse
        raise BaselineUnavailable(f"baseline {baseline.name}: provider not available: {last_line(e)}") from None
    if wanted not in session.get_providers():
        raise BaselineUnavailable(f"baseline {baseline.name}: provider not available: {wanted} did not load "
                                  f"(missing CUDA, cuDNN or TensorRT libraries?); the session runs on "
                                  f"{session.get_providers()}")
    binding = session.io_binding()
    for name, value in feeds.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
    names = [o.name for o in session.get_outputs()]
    for name in names:
        binding.bind_output(name, "cuda")

    def run() -> None:
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()

    run()  # TensorRT builds its engine here
    build_s = time.perf_counter() - start
    reported = session.get_provider_options()
    extra: dict[str, Any] = {"provider": wanted, "model": str(model),
                             "provider_options": {k: reported.get(k, {}) for k in (wanted, PROVIDERS["cuda"])}}
    if baseline.provider == "tensorrt":
        extra["build_s"] = round(build_s, 3)  # engine build: reported apart, never in the latency
    return GpuBaseline(run, lambda: dict(zip(names, binding.copy_outputs_to_cpu())), extra)
