"""Detect the local CPU: architecture, model name, vector features, LLVM cpu name."""

from __future__ import annotations

import functools
import os
import platform
from typing import NamedTuple


class HostCPU(NamedTuple):  # not a dataclass: the runtime reads this at load, and dataclasses cost ~1.5 ms
    arch: str  # "x86_64", "aarch64", ...
    model: str
    features: frozenset[str]
    cores: int

    @property
    def llvm_mcpu(self) -> str:
        """A conservative LLVM cpu name that enables the vector units the host really has."""
        if self.arch != "x86_64":
            return "generic"
        if {"avx512f", "avx512bw", "avx512vl"} <= self.features:
            # The CPU rules use 16-lane tiles (8 where channels need it) and 32 registers here (cpu/common.py).
            return "skylake-avx512"
        if {"avx2", "fma"} <= self.features:
            return "haswell"
        return "x86-64"

    @property
    def vector_bits(self) -> int:
        if "avx512f" in self.features:
            return 512
        if "avx2" in self.features or "avx" in self.features:
            return 256
        return 128


def _read_cpuinfo() -> tuple[str, frozenset[str]]:
    model, flags = "unknown", set()  # not platform.processor(): it runs `uname -p` in a subprocess
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model") and model in ("unknown", "", platform.machine()):
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    if model == "unknown":
        model = platform.processor() or "unknown"
    return model, frozenset(flags)


@functools.cache
def detect_host() -> HostCPU:
    """Describe this machine's CPU (read once per process)."""
    model, flags = _read_cpuinfo()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return HostCPU(arch=platform.machine(), model=model, features=flags, cores=cores)


def has_cuda_gpu() -> bool:
    """Whether this machine has an NVIDIA GPU with its driver (CUDA kernels can run here)."""
    import shutil

    return shutil.which("nvidia-smi") is not None and os.path.exists("/dev/nvidia0")
