"""Load TVM's *runtime* library and tvm_ffi, never the compiler (libtvm_compiler, 248 MB).

`import tvm` loads the compiler and, through tvm_ffi, torch. Here we load only
`libtvm_runtime.so` (3 MB) into the global symbol namespace and talk to compiled modules through
tvm_ffi's packed functions.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

from forgeml.errors import ArtifactError

_RUNTIME_LIBS = {"cpu": ["libtvm_runtime.so"], "cuda": ["libtvm_runtime.so", "libtvm_runtime_cuda.so"]}


def _library_dirs() -> list[Path]:
    """Where the TVM runtime libraries may be: $FORGEML_TVM_LIB, a deploy bundle's lib/, the tvm wheel."""
    dirs = []
    if os.environ.get("FORGEML_TVM_LIB"):
        dirs.append(Path(os.environ["FORGEML_TVM_LIB"]))
    dirs.append(Path(__file__).resolve().parent / "lib")
    spec = importlib.util.find_spec("tvm")  # locates the package without importing it
    if spec and spec.submodule_search_locations:
        dirs += [Path(p) / "lib" for p in spec.submodule_search_locations]
    return dirs


def _find_library(name: str) -> Path:
    for d in _library_dirs():
        if (d / name).is_file():
            return d / name
    searched = ", ".join(str(d) for d in _library_dirs())
    raise ArtifactError(f"TVM runtime library {name} not found (searched {searched}); "
                        "install apache-tvm or set FORGEML_TVM_LIB")


@functools.cache
def tvm_ffi() -> ModuleType:
    """Import tvm_ffi without letting it pull in torch (it imports torch eagerly when installed)."""
    block_torch = "torch" not in sys.modules
    if block_torch:
        sys.modules["torch"] = None  # type: ignore[assignment]  # makes `import torch` raise ImportError
    try:
        import tvm_ffi as ffi
    finally:
        if block_torch and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return ffi


@functools.cache
def load_runtime(device: str = "cpu") -> ModuleType:
    """Load the TVM runtime libraries for `device` once per process; returns tvm_ffi."""
    ffi = tvm_ffi()
    for name in _RUNTIME_LIBS.get(device, _RUNTIME_LIBS["cpu"]):
        try:
            ctypes.CDLL(str(_find_library(name)), ctypes.RTLD_GLOBAL)
        except OSError as e:
            if device == "cuda":  # libtvm_runtime_cuda.so needs the NVIDIA driver (libcuda) and libcudart
                raise ArtifactError(f"this artifact runs on a CUDA GPU, and the CUDA runtime could not be "
                                    f"loaded here ({e}); run it on a machine with an NVIDIA GPU and driver") from None
            raise
    return ffi


def set_num_threads(threads: int) -> None:
    """Size TVM's CPU thread pool for this process (0: one thread per core)."""
    ffi = load_runtime("cpu")
    config = ffi.get_global_func("runtime.config_threadpool", allow_missing=True)
    if config is not None:
        config(1, int(threads))  # affinity mode 1 (kBig: all cores on a homogeneous CPU)
