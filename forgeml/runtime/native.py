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
import threading
from collections.abc import Sequence
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


class _NotInstalled(ModuleNotFoundError):
    pass


def _not_installed(name: str):
    raise _NotInstalled(name)


class _MetadataWhileImporting(ModuleType):
    """`importlib.metadata` as tvm_ffi sees it while the runtime imports it: every distribution 'not
    installed', so tvm_ffi.libinfo takes libtvm_ffi.so from beside the package (its own fallback, the
    one a deploy bundle relies on). Afterwards every attribute comes from the real module."""

    def __init__(self) -> None:
        super().__init__("importlib.metadata")
        self.shielding = True

    def __getattr__(self, name: str):
        if self.shielding and name in ("distribution", "PackageNotFoundError"):
            return _not_installed if name == "distribution" else _NotInstalled
        import importlib

        return getattr(importlib.import_module("importlib.metadata"), name)


_ABI_GENERATOR = "tvm_ffi.dataclasses.gen_abi_cpp"


def _gen_abi_cpp(type_keys: str | Sequence[str]) -> str:
    """`tvm_ffi.dataclasses.gen_abi_cpp` (C++ ABI headers from reflection data), imported on first call."""
    import importlib

    real = importlib.import_module(_ABI_GENERATOR).gen_abi_cpp
    sys.modules["tvm_ffi.dataclasses"].gen_abi_cpp = real  # the package exports the function, not the module
    return real(type_keys)


def _abi_generator_while_importing() -> ModuleType:
    """Stands in for `tvm_ffi.dataclasses.gen_abi_cpp` while tvm_ffi imports: the package only binds
    `gen_abi_cpp` from it, here a forwarder to the real one. Any other name loads the real module."""
    module = ModuleType(_ABI_GENERATOR)
    module.gen_abi_cpp = _gen_abi_cpp

    def __getattr__(name: str) -> object:
        if name.startswith("__"):  # the import system probing for __path__ and the like
            raise AttributeError(name)
        if sys.modules.get(_ABI_GENERATOR) is module:
            del sys.modules[_ABI_GENERATOR]
        import importlib

        return getattr(importlib.import_module(_ABI_GENERATOR), name)

    module.__getattr__ = __getattr__
    return module


def _stand_ins() -> dict[str, ModuleType | None]:
    """Modules tvm_ffi imports eagerly that the runtime never uses, and what stands in for them while
    it imports (None makes `import` raise ImportError, which tvm_ffi handles for optional packages).
    Measured cold-start cost on a 2-core EPYC: torch seconds, importlib.metadata ~30 ms (email, zipfile,
    csv), tvm_ffi.cpp ~25 ms (JIT C++ build helpers: subprocess, logging, hashlib), its optional torch
    DLPack accelerator ~15 ms (logging, subprocess), ml_dtypes ~10 ms, the C++ ABI header generator
    ~7 ms (five dataclasses, fnmatch)."""
    return {"torch": None, "ml_dtypes": None, "importlib.metadata": _MetadataWhileImporting(),
            _ABI_GENERATOR: _abi_generator_while_importing(),
            **{name: ModuleType(name) for name in _EMPTY_STAND_INS}}


_EMPTY_STAND_INS = ("tvm_ffi.cpp", "tvm_ffi._optional_torch_c_dlpack")


@functools.cache
def tvm_ffi() -> ModuleType:
    """Import tvm_ffi without the optional modules it imports eagerly (see `_stand_ins`).

    The stand-ins are removed from sys.modules right after, so a later `import torch` or
    `import tvm_ffi.cpp` in the same process gets the real module."""
    if "tvm_ffi" in sys.modules:
        return sys.modules["tvm_ffi"]
    placed = {name: mod for name, mod in _stand_ins().items() if name not in sys.modules}
    sys.modules.update(placed)
    try:
        import tvm_ffi as ffi
    finally:
        for name, mod in placed.items():
            if sys.modules.get(name, 0) is mod:
                del sys.modules[name]
            if isinstance(mod, _MetadataWhileImporting):
                mod.shielding = False
        package = sys.modules.get("tvm_ffi")
        for name in _EMPTY_STAND_INS:
            attr = name.rsplit(".", 1)[1]
            if name in placed and getattr(package, attr, None) is placed[name]:
                delattr(package, attr)  # the next `import tvm_ffi.<attr>` loads the real one
    return ffi


# How many times an idle TVM pool worker calls sched_yield before it sleeps. TVM's default, 300000, kept
# a worker busy for ~150 ms after every run on a 2-vCPU VM (0.49 us a call), taking a core from whatever
# the process or the machine ran next: an engine timed after forgeml read up to 1.6x slower. 10000 is
# ~5 ms there, still far longer than the microseconds between one run's kernels.
POOL_SPIN_COUNT = 10000
SPIN_ENV = "TVM_THREAD_POOL_SPIN_COUNT"


@functools.cache
def load_runtime(device: str = "cpu") -> ModuleType:
    """Load the TVM runtime libraries for `device` once per process; returns tvm_ffi. Sets $SPIN_ENV to
    POOL_SPIN_COUNT unless it is set already (TVM reads it when its first pool worker starts, later)."""
    os.environ.setdefault(SPIN_ENV, str(POOL_SPIN_COUNT))
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


_SHARE_ALL_CORES = -3  # TVM's kSpecifyThreadShareAllCore: every pool thread may run on any of `cpus`


class _PoolState(threading.local):
    """Per calling thread (TVM's pool is thread-local): the thread count `set_num_threads` gave its pool
    here, None before. An attribute, not a function: `Session.run` reads it on every call."""

    threads: int | None = None


POOL = _PoolState()


def caller_cpus() -> list[int]:
    """The cores the calling thread may run on."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def default_threads() -> int:
    """Threads when none are asked for: $TVM_NUM_THREADS or $OMP_NUM_THREADS, else 0 (one per core the
    calling thread may use)."""
    for name in ("TVM_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return 0


def set_num_threads(threads: int) -> None:
    """Size TVM's CPU thread pool for the calling thread (0: one thread per core it may use), leaving
    the calling thread's CPU affinity as it was.

    TVM's pool is thread-local. Its default configuration (kBig) binds each worker to one core and the
    calling thread, which runs task 0, to the first cores of the machine (core 0 alone on a 2-core x86
    host, whose pool it also sizes to cores / 2): every thread or process the caller creates afterwards
    inherits that. Here the pool is configured over the caller's own cores instead, all of its threads
    sharing them (kSpecifyThreadShareAllCore, which also sets the caller to exactly those cores, i.e.
    leaves it unchanged), with `threads` threads, and the caller's mask is restored in case a TVM build
    set it otherwise. The pool's size is fixed when TVM first creates it in a thread: it gets at least
    one worker per core, so a later, larger `threads` up to that count still applies."""
    if threads < 0:
        raise ValueError(f"threads must be >= 0, got {threads}")
    ffi = load_runtime("cpu")
    config = ffi.get_global_func("runtime.config_threadpool", allow_missing=True)
    if config is None:  # a runtime built without the pool: nothing to size, nothing that binds
        POOL.threads = threads
        return
    cpus = caller_cpus()
    # TVM sizes a new pool to len(cpus): one entry per thread wanted, cores repeated past the caller's
    slots = [str(cpus[n % len(cpus)]) for n in range(max(threads, len(cpus)))]
    config(_SHARE_ALL_CORES, int(threads), slots)
    if hasattr(os, "sched_setaffinity") and caller_cpus() != cpus:
        os.sched_setaffinity(0, cpus)
    POOL.threads = threads
