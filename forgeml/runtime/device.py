"""Device-side helpers for benchmarking a loaded Session: synchronize, run on device-resident inputs,
time with TVM's in-runtime timer (CUDA events on GPUs), and read GPU memory. Runtime-only: numpy,
tvm_ffi and the TVM runtime libraries (libcudart through libtvm_runtime_cuda.so), never the compiler.
"""

from __future__ import annotations

import ctypes
import functools
import shutil
import struct
import subprocess
from typing import Any

import numpy as np

from forgeml.runtime.session import _DEVICE_TYPES


def synchronize(session) -> None:
    """Wait until every kernel queued on the session's device has finished (no-op on the CPU)."""
    if session.device != "cpu":
        session._ffi.get_global_func("runtime.Device_StreamSync")(session._dev, 0)


class DeviceRunner:
    """Runs a session's model on inputs uploaded once: what the device computes, without the
    host-device copies of `Session.run`. `runner()` returns after the device has finished."""

    def __init__(self, session, feeds: dict[str, np.ndarray]):
        self.session = session
        arrays = session._check_inputs(feeds)
        self.args = [session._to_device(a) for a in arrays]
        self._outputs: Any = None

    def __call__(self) -> None:
        with self.session._lock:
            self._outputs = self.session._main(*self.args, *self.session._weights)
            synchronize(self.session)

    def outputs(self) -> dict[str, np.ndarray]:
        """The last call's outputs, copied to the host."""
        if self._outputs is None:
            self()
        result = self._outputs
        tensors = list(result) if len(self.session.manifest.outputs) > 1 else [result]  # one: maybe a sequence
        return {spec.name: self.session._to_host(t) for spec, t in zip(self.session.manifest.outputs, tensors)}


def time_evaluator(session, feeds: dict[str, np.ndarray], number: int = 10, repeat: int = 10,
                   min_repeat_ms: int = 0) -> list[float]:
    """Seconds per run, `repeat` means of `number` runs each, timed inside the TVM runtime
    (`runtime.RPCTimeEvaluator`: CUDA events on a GPU, so no Python or launch-queue gaps count)."""
    runner = DeviceRunner(session, feeds)
    vm = session._vm
    vm["set_input"]("main", *runner.args, *session._weights)
    return evaluate(session._ffi, vm, "invoke_stateful", session.device, ("main",), number, repeat, min_repeat_ms)


def evaluate(ffi: Any, module: Any, name: str, device: str, args: tuple, number: int, repeat: int,
             min_repeat_ms: int = 0) -> list[float]:
    """Seconds per call of `module[name](*args)`: `repeat` means of `number` calls (more when a sample
    takes under `min_repeat_ms`), timed inside the TVM runtime after one untimed call."""
    evaluator = ffi.get_global_func("runtime.RPCTimeEvaluator")
    feval = evaluator(module, name, _DEVICE_TYPES[device], 0, number, repeat, min_repeat_ms, 0, 0, 1, 0, "")
    return list(struct.unpack("@" + "d" * repeat, bytes(feval(*args))))


@functools.cache
def _cudart() -> ctypes.CDLL | None:
    for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def cuda_memory() -> dict[str, float] | None:
    """Free and total memory of the current CUDA device in MiB (cudaMemGetInfo), or None."""
    lib = _cudart()
    if lib is None:
        return None
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    if lib.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)) != 0:
        return None
    return {"free_mib": free.value / 2**20, "total_mib": total.value / 2**20}


def gpu_info() -> dict[str, str]:
    """The GPU's name, driver and memory as nvidia-smi reports them ({} without nvidia-smi)."""
    if not shutil.which("nvidia-smi"):
        return {}
    fields = ["name", "driver_version", "memory.total", "compute_cap", "clocks.max.sm"]
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    first = out.strip().splitlines()[0] if out.strip() else ""
    return dict(zip(fields, (v.strip() for v in first.split(","))))


def bench_runner(session, feeds: dict[str, np.ndarray]) -> tuple[Any, dict[str, Any]]:
    """What `forgeml bench` times for a session: Session.run on the CPU; on a GPU, the model on
    device-resident inputs with a synchronize after each call. Also GPU facts for the report: weights plus
    the drop in free device memory across input upload and three warm-up runs (granularity 2 MiB; the
    CUDA context not included), and the in-runtime (CUDA event) time."""
    if session.device == "cpu":
        return (lambda: session.run(feeds)), {}
    before = cuda_memory()
    runner = DeviceRunner(session, feeds)
    for _ in range(3):
        runner()
    after = cuda_memory()
    extra: dict[str, Any] = {"timing": "device-resident inputs, host timer around call + synchronize",
                             "gpu": gpu_info().get("name")}
    weights_mib = sum(w.nbytes for w in session.manifest.weights) / 2**20  # uploaded at load, before `before`
    extra["gpu_weights_mib"] = round(weights_mib, 1)
    if before and after:  # activations and workspace (TVM's pooled allocator), inputs, kernels
        extra["gpu_workspace_mib"] = round(before["free_mib"] - after["free_mib"], 1)
        extra["gpu_mem_mib"] = round(weights_mib + extra["gpu_workspace_mib"], 1)
    try:
        extra["device_timer_ms"] = float(np.median(time_evaluator(session, feeds, number=10, repeat=5))) * 1e3
    except Exception as e:  # noqa: BLE001 (an extra figure; the host-timer samples stand)
        extra["device_timer_error"] = str(e)[:200]
    return runner, extra
