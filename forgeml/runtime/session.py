"""Session: load a verified artifact with the TVM runtime only, validate inputs, run."""

from __future__ import annotations

import functools
import math
import os
import platform
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np

from forgeml.errors import ArtifactError, ForgeError, InvalidInput, RunFailed, last_line
from forgeml.runtime import native
from forgeml.runtime.artifact import ArtifactFile, Manifest, TensorSpec, open_artifact

_DEVICE_TYPES = {"cpu": 1, "cuda": 2}  # DLPack device types
_POOLED_ALLOCATOR = 2
_ALIGN = 64


def _exotic(dtype: np.dtype) -> bool:
    """ml_dtypes' types (bfloat16, float8_*): numpy kind 'V', which DLPack cannot carry; they cross as
    same-width unsigned integers into and out of tensors of the real dtype."""
    return np.dtype(dtype).kind == "V"


def _bits_view(array: np.ndarray) -> np.ndarray:
    """An ml_dtypes array viewed as unsigned integers of its width (what DLPack can carry)."""
    return array.view(np.dtype(f"uint{8 * array.dtype.itemsize}"))


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialized 64-byte aligned array with compact C strides. An empty one gets the strides TVM's
    compactness check expects (the product of the later dimensions: (0, 5, 1) elements for [3, 0, 5]),
    where numpy's reshape gave (5, 5, 1) and kernels refused it: "expected to be compact array"."""
    itemsize = np.dtype(dtype).itemsize
    nbytes = math.prod(shape) * itemsize
    raw = np.empty(nbytes + _ALIGN, dtype=np.uint8)
    start = (-raw.__array_interface__["data"][0]) % _ALIGN
    out = raw[start:start + nbytes].view(dtype).reshape(shape)
    if nbytes == 0 and len(shape) > 1:
        strides = tuple(math.prod(shape[i + 1:]) * itemsize for i in range(len(shape)))
        out = np.lib.stride_tricks.as_strided(out, shape, strides, writeable=True)
    return out


def _aligned(array: np.ndarray) -> np.ndarray:
    """A C-contiguous, 64-byte aligned array with the same values (compiled kernels assume alignment)."""
    flags = array.flags
    if flags.c_contiguous and flags.writeable and array.ctypes.data % _ALIGN == 0 and array.size:
        return array  # (an empty array may carry zero strides, which TVM refuses as not compact)
    out = _aligned_empty(array.shape, array.dtype)
    out[...] = array
    return out


def _check_compatible(manifest: Manifest, where: Path) -> None:
    arch = manifest.target.get("arch")
    if arch and arch != platform.machine():
        raise ArtifactError(
            f"{where} was compiled for {arch} (target '{manifest.target.get('name')}'), "
            f"but this machine is {platform.machine()}; compile with -t for this machine or run it on a {arch} device"
        )
    from forgeml.targets.host import detect_host  # stdlib only: reads /proc/cpuinfo

    flags = detect_host().features
    lacking = [f for f in manifest.target.get("cpu_features", []) if flags and f not in flags]
    if lacking:
        raise ArtifactError(
            f"{where} uses CPU features this machine lacks ({', '.join(lacking)}; target "
            f"'{manifest.target.get('name')}'): it would crash with an illegal instruction; "
            "compile it with -t x86-64 here"
        )
    device = manifest.target.get("device", "cpu")
    if device not in _DEVICE_TYPES:
        raise ArtifactError(f"{where} targets device '{device}', which this runtime does not support")


class Session:
    """A loaded model. `run({"x": array}) -> {"y": array}`, or onnxruntime.InferenceSession's
    `run(None, {"x": array}) -> [array]`. Holds its weights and library in this process's memory: the
    artifact file may be replaced or deleted while it runs.

    Safe to call from many threads: calls into one session are serialized. `threads` sizes TVM's CPU
    thread pool (None: $TVM_NUM_THREADS, else one thread per core the caller may use) in each thread
    that loads or runs the session; the calling thread's CPU affinity is never changed.
    `trusted_keys` (public key files): refuse the artifact unless one of them signed it.
    """

    def __init__(self, path: str | Path, threads: int | None = None,
                 trusted_keys: list[str | Path] | str | Path | None = None):
        self.path = Path(path)
        artifact = open_artifact(self.path)  # the manifest's digest and schema
        if trusted_keys is not None:
            from forgeml.runtime.trust import check_signature  # imports cryptography: only when keys are given

            check_signature(artifact.data, trusted_keys, str(self.path))
        _check_compatible(artifact.manifest, self.path)
        artifact.verify_checksums()  # before any native code is loaded
        self.manifest = artifact.manifest
        self.device = self.manifest.target.get("device", "cpu")
        self._on_cpu = self.device == "cpu"
        ffi = native.load_runtime(self.device)
        # CPU: always configure the pool (TVM's default pins the calling thread to core 0); a GPU session's
        # host code seldom uses the pool, so it is sized only when asked
        self._threads = native.default_threads() if threads is None and self._on_cpu else threads
        if self._threads is not None:
            native.set_num_threads(self._threads)
        self._ffi = ffi
        self._dev = ffi.device(self.device, 0)
        self._libraries: list[_Library] = []  # every library a VM of this session runs: kept loaded with it
        try:
            self._vm = self._load_vm(artifact)
        except ForgeError:
            raise
        except Exception as e:  # noqa: BLE001 (the TVM runtime raises its own error types)
            raise ArtifactError(f"{self.path}: the model failed to initialize: {last_line(e)}") from None
        self._main = self._vm["main"]
        self._weights = [self._to_device(w) for w in artifact.read_weights()]
        self._call, self._buckets, self._key_axes = (self._main, self._weights), {}, []
        if self.manifest.functions is not None:
            self._dispatch_table(artifact)
        self._lock = threading.Lock()
        # what run() compares each input against, precomputed: its per-call cost is part of the latency
        # (an input with dynamic dimensions has shape None there: `_check_dims` checks it against its ranges)
        self._input_checks = [(spec.name, np.dtype(spec.dtype), None if spec.dynamic else tuple(spec.shape))
                              for spec in self.manifest.inputs]
        self._dynamic = [(n, spec) for n, spec in enumerate(self.manifest.inputs) if spec.dynamic]
        self._any_exotic = any(_exotic(dtype) for _, dtype, _ in self._input_checks)
        self._ranges = [(n, spec) for n, spec in enumerate(self.manifest.inputs) if spec.valid_range is not None]
        self._output_names = [spec.name for spec in self.manifest.outputs]
        # the VM returns a tuple for several outputs, and for one sequence output (its elements)
        self._tuple_result = len(self._output_names) > 1
        self._stages: list[tuple[np.ndarray, Any] | None] = [None] * len(self._input_checks)

    def _dispatch_table(self, artifact: ArtifactFile) -> None:
        """Dynamic shapes: the symbolic `main` and each static bucket with its weights, keyed by the sizes
        of the dimension variables (sorted by name), and where to read each variable from the inputs."""
        axes = {}
        for n, spec in enumerate(self.manifest.inputs):
            for dim in spec.dynamic:
                axes.setdefault(dim.variable, (n, dim.axis))
        names = sorted(axes)
        self._key_axes = [axes[v] for v in names]
        try:
            for entry in self.manifest.functions:
                vm = self._vm if entry.get("library", self.manifest.library) == self.manifest.library else (
                    self._load_vm(artifact, entry["library"]))
                call = (vm[entry["name"]], [self._weights[i] for i in entry["weights"]])
                if entry["dimensions"] is None:
                    self._call = call
                else:
                    self._buckets[tuple(int(entry["dimensions"][v]) for v in names)] = call
        except (KeyError, IndexError, TypeError, AttributeError, ValueError) as e:
            raise ArtifactError(f"{self.path}: the manifest's functions are malformed ({type(e).__name__}: "
                                f"{last_line(e)})") from None

    @property
    def inputs(self) -> list[TensorSpec]:
        return list(self.manifest.inputs)

    @property
    def outputs(self) -> list[TensorSpec]:
        return list(self.manifest.outputs)

    def _load_vm(self, artifact: ArtifactFile, name: str | None = None) -> Any:
        """A VM over library member `name` (default: the manifest's library, which holds `main`); a
        dynamic-shape artifact holds one library per function (see `compiler.build._codegen`)."""
        name = name or self.manifest.library
        try:
            library = _shared_library(self._ffi, self.manifest.members.get(name), lambda: artifact.read_member(name))
        except ArtifactError:  # already says what to do (an unwritable $TMPDIR)
            raise
        except Exception as e:
            raise ArtifactError(f"{self.path}: the compiled library failed to load: {e}") from None
        self._libraries.append(library)
        module = library.module
        vm = module["vm_load_executable"]()
        device_type = _DEVICE_TYPES[self.device]
        if device_type == 1:
            vm["vm_initialization"](device_type, 0, _POOLED_ALLOCATOR)
        else:  # GPU kernels plus a CPU host device for shape computations
            vm["vm_initialization"](device_type, 0, _POOLED_ALLOCATOR, 1, 0, _POOLED_ALLOCATOR)
        return vm

    def _to_device(self, array: np.ndarray) -> Any:
        if _exotic(array.dtype):  # bfloat16, float8: a tensor of that dtype, filled with the bits
            host = self._ffi.get_global_func("runtime.TVMTensorAllocWithScope")(
                self._ffi.Shape(array.shape), str(array.dtype), self._ffi.device("cpu", 0), None)
            self._ffi.get_global_func("runtime.TVMTensorCopyFromTo")(
                self._ffi.from_dlpack(_bits_view(_aligned(array))), host)
            return host if self.device == "cpu" else _copy_to_device(self._ffi, host, self._dev)
        host = self._ffi.from_dlpack(_aligned(array))
        if self.device == "cpu":
            return host
        return _copy_to_device(self._ffi, host, self._dev)

    def _upload_inputs(self, arrays: list[np.ndarray]) -> list[Any]:
        """Inputs as the model's device sees them. On a GPU, into device buffers allocated once and reused
        (calls are serialized; a fresh cudaMalloc/cudaFree per call would stall the device)."""
        if self._on_cpu:
            return [self._to_device(a) for a in arrays]
        buffers = getattr(self, "_input_buffers", None)
        if buffers is None or (self._dynamic and any(tuple(t.shape) != a.shape for t, a in zip(buffers, arrays))):
            # (dynamic dimensions: new buffers when the shape changes; a server keeps to few shapes)
            self._input_buffers = [self._to_device(a) for a in arrays]
            return self._input_buffers
        copy = self._ffi.get_global_func("runtime.TVMTensorCopyFromTo")
        for array, buffer in zip(arrays, self._input_buffers):
            copy(self._ffi.from_dlpack(array), buffer)
        return self._input_buffers

    def _expected(self) -> str:
        return "; ".join(spec.describe() for spec in self.manifest.inputs)

    def _fast_inputs(self, feeds: dict[str, Any]) -> list[Any] | None:
        """The inputs as tensors when every one is a contiguous ndarray of the declared dtype and shape,
        else None (then `_check_inputs` says what is wrong). An aligned array is used in place; an
        unaligned one (numpy aligns small arrays to 16 bytes) is copied into the input's staging
        buffer, allocated once. Call with the lock held: the staging buffers are shared."""
        if len(feeds) != len(self._input_checks) or self._any_exotic:
            return None
        if self._dynamic:  # before any staging: a staging buffer holds the largest shape in range
            arrays = [feeds.get(name) for name, _, _ in self._input_checks]
            if any(type(array) is not np.ndarray for array in arrays):
                return None
            self._check_dims(arrays)
        tensors = []
        for n, (name, dtype, shape) in enumerate(self._input_checks):
            array = feeds.get(name)
            if type(array) is not np.ndarray or array.dtype != dtype or (array.shape != shape and shape is not None):
                return None
            flags = array.flags
            if not (flags.c_contiguous and flags.writeable):
                return None
            tensor = self._ffi.from_dlpack(array)
            if tensor.data_ptr() % _ALIGN or not array.size:  # empty: numpy may give it zero strides
                stage, tensor = self._staging(n, array.shape, dtype)
                np.copyto(stage, array)
            tensors.append(tensor)
        return tensors

    def _staging(self, n: int, shape: tuple[int, ...], dtype: np.dtype) -> tuple[np.ndarray, Any]:
        """Input n's aligned staging buffer and its tensor. A dynamic input's buffer is allocated once at
        its largest shape; smaller shapes use its leading elements (a new tensor header per call)."""
        spec = self.manifest.inputs[n]
        if self._stages[n] is None:
            largest = list(spec.shape)
            for dim in spec.dynamic:
                largest[dim.axis] = dim.max
            stage = _aligned_empty(tuple(largest), dtype)
            self._stages[n] = (stage, self._ffi.from_dlpack(stage))
        if not spec.dynamic:
            return self._stages[n]
        view = self._stages[n][0].reshape(-1)[:math.prod(shape)].reshape(shape)
        return view, self._ffi.from_dlpack(view)

    def _check_inputs(self, feeds: dict[str, Any]) -> list[np.ndarray]:
        specs = self.manifest.inputs
        if len(feeds) != len(specs) or any(spec.name not in feeds for spec in specs):
            expected = {spec.name for spec in specs}
            unknown = [name for name in feeds if name not in expected]
            missing = [spec.name for spec in specs if spec.name not in feeds]
            problem = f"unknown input '{unknown[0]}'" if unknown else f"missing input '{missing[0]}'"
            raise InvalidInput(f"{problem}; the model expects {self._expected()}")
        arrays = []
        for spec in specs:
            value = feeds[spec.name]
            array = value if isinstance(value, np.ndarray) else np.asarray(value)
            if array.dtype != spec.dtype:
                raise InvalidInput(f"input '{spec.name}' has dtype {array.dtype}, expected {spec.dtype}; "
                                   f"the model expects {self._expected()}")
            if array.shape != spec.shape and not spec.dynamic:
                raise InvalidInput(f"input '{spec.name}' has shape {list(array.shape)}, expected "
                                   f"{list(spec.shape)}; the model expects {self._expected()}")
            arrays.append(_aligned(array))
        self._check_dims(arrays)
        self._check_ranges(arrays)
        return arrays

    def _check_dims(self, arrays: list[np.ndarray]) -> None:
        """Refuse inputs whose shape lies outside the ranges the model was compiled for (its memory is
        planned for their upper bounds), or whose axes that share a dimension variable differ."""
        sizes: dict[str, tuple[int, str]] = {}
        for n, spec in self._dynamic:
            shape = arrays[n].shape
            fixed = [(axis, d) for axis, d in enumerate(spec.shape) if d >= 0]
            if len(shape) != len(spec.shape) or any(shape[axis] != d for axis, d in fixed):
                raise InvalidInput(f"input '{spec.name}' has shape {list(shape)}, expected {spec.describe()}")
            for dim in spec.dynamic:
                size = shape[dim.axis]
                if not dim.min <= size <= dim.max:
                    raise InvalidInput(f"input '{spec.name}' axis {dim.axis} ('{dim.variable}') is {size}, outside "
                                       f"the range {dim.min}..{dim.max} it was compiled for; the model expects "
                                       f"{self._expected()}")
                seen = sizes.setdefault(dim.variable, (size, f"'{spec.name}' axis {dim.axis}"))
                if seen[0] != size:
                    raise InvalidInput(f"input '{spec.name}' axis {dim.axis} is {size}, but {seen[1]} is {seen[0]}: "
                                       f"both are dimension '{dim.variable}'")

    def _check_ranges(self, arrays: list[np.ndarray]) -> None:
        """Refuse index inputs outside the tensor they index (the compiled gather would read out of
        bounds: a crash or garbage, where ONNX Runtime reports an error), and a nonzero Dropout ratio."""
        for n, spec in self._ranges:
            array = arrays[n]
            low, high = spec.valid_range
            if array.size and not (array.min() >= low and array.max() <= high):  # NaN is outside too
                bad = array[~((array >= low) & (array <= high))].flat[0]
                why = (f"it indexes a tensor with {high + 1} entries along the gathered axis" if low < 0 else
                       "it is a training-mode Dropout's ratio, which forgeml compiles as 0 only" if high == 0 else
                       f"it is a length along an axis of {high} entries")
                raise InvalidInput(f"input '{spec.name}' holds {bad}, outside [{low}, {high}]: {why}")

    @overload
    def run(self, feeds: Mapping[str, Any], output_names: Sequence[str] | None = None) -> dict[str, np.ndarray]: ...

    @overload
    def run(self, output_names: Sequence[str] | None, feeds: Mapping[str, Any]) -> list[np.ndarray]: ...

    def run(self, first: Any, second: Any = None) -> dict[str, np.ndarray] | list[np.ndarray]:
        """Run the model. Two call shapes:

        - `run(feeds)` or `run(feeds, ["y"])`: feeds is input name -> array; returns output name -> array.
        - `run(None, feeds)` or `run(["y"], feeds)`, onnxruntime.InferenceSession's: returns a list of
          arrays, every output in the model's order for None, else the named ones in the order given.
        """
        if type(first) is dict or isinstance(first, Mapping):
            if second is None:
                return self._run(first)
            names = self._known_outputs(second)
            outputs = self._run(first)
            return {n: outputs[n] for n in names}
        if not isinstance(second, Mapping):
            raise InvalidInput("run takes (feeds) or (feeds, output_names), where feeds is a dict of input "
                               "name -> array, or ONNX Runtime's (output_names or None, feeds); got "
                               f"({type(first).__name__}, {type(second).__name__})")
        names = self._output_names if first is None else self._known_outputs(first)
        outputs = self._run(second)
        return [outputs[n] for n in names]

    def _known_outputs(self, names: Any) -> list[str]:
        """`names` as a list, each checked to be one of the model's outputs."""
        if isinstance(names, str) or not isinstance(names, Sequence):
            raise InvalidInput(f"output names must be a list of strings, got {type(names).__name__}")
        unknown = [n for n in names if n not in self._output_names]
        if unknown:
            raise InvalidInput(f"unknown output '{unknown[0]}'; the model's outputs are "
                               f"{', '.join(self._output_names)}")
        return list(names)

    def _run(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Every output, name -> array, of one call on `feeds`."""
        with self._lock:
            if self._threads is not None and native.POOL.threads != self._threads:
                native.set_num_threads(self._threads)  # a thread's first run, or another session's count
            args = self._fast_inputs(feeds) if self._on_cpu else None
            if args is None:
                args = self._upload_inputs(self._check_inputs(feeds))
            elif self._ranges:
                self._check_ranges([feeds[name] for name, _, _ in self._input_checks])
            function, weights = self._call
            if self._buckets:  # a static bucket where the sizes match one exactly, else the symbolic main
                key = tuple(args[n].shape[axis] for n, axis in self._key_axes)
                function, weights = self._buckets.get(key, self._call)
            try:
                result = function(*args, *weights)
                tensors = list(result) if self._tuple_result else (result,)
                return dict(zip(self._output_names, [self._to_host(t) for t in tensors]))
            except ForgeError:
                raise
            except Exception as e:  # noqa: BLE001 (a kernel's runtime check, a tensor DLPack cannot carry)
                raise RunFailed(f"{self.path}: running the model failed: {last_line(e)}") from None

    def _to_host(self, tensor: Any) -> np.ndarray | list[np.ndarray]:
        if isinstance(tensor, self._ffi.Array):  # a sequence output: a list of arrays, as ONNX Runtime gives
            return [self._to_host(t) for t in tensor]
        dtype = str(tensor.dtype)
        if dtype.startswith(("bfloat", "float8", "float4", "float6")):  # no DLPack/numpy dtype: copy the bits
            import ml_dtypes  # noqa: F401 (registers these dtypes with numpy)

            out = _aligned_empty(tuple(tensor.shape), np.dtype(dtype))
            self._ffi.get_global_func("runtime.TVMTensorCopyFromTo")(tensor, self._ffi.from_dlpack(_bits_view(out)))
            return out
        if self._on_cpu:
            # a copy: an output may be an input, a weight or a constant of the model returned as is
            return np.from_dlpack(tensor).copy()
        return _copy_to_host(self._ffi, tensor)


class _Library:
    """A model library loaded in this process, shared by every session that loads the same bytes; it is
    unloaded (dlclose, its mappings gone) once no session and no function taken from it is left."""

    __slots__ = ("module", "__weakref__")

    def __init__(self, module: Any) -> None:
        self.module = module


_LIBRARIES: dict[str, weakref.ref[_Library]] = {}  # sha256 of the library's bytes -> the loaded library
_LIBRARIES_LOCK = threading.Lock()


def _shared_library(ffi: Any, sha256: str | None, read: Callable[[], bytes]) -> _Library:
    """The library whose bytes have this (verified) sha256, loaded from `read()` unless this process
    already holds it. Loading each library once per process and letting TVM unload it when its last
    user goes keeps reloads from growing memory: with tvm_ffi's default (every module kept alive for
    the process), 500 load/run/drop cycles of the mlp left 2,500 mappings of deleted library copies and
    RSS +40%."""
    if sha256 is None:  # a manifest that lists no checksum for it: nothing to share by
        return _Library(_load_library(ffi, read()))
    with _LIBRARIES_LOCK:
        ref = _LIBRARIES.get(sha256)
        library = ref() if ref is not None else None
        if library is None:
            library = _Library(_load_library(ffi, read()))
            _LIBRARIES[sha256] = weakref.ref(library, functools.partial(_forget, sha256))
        return library


def _forget(sha256: str, ref: weakref.ref[_Library]) -> None:
    """Drop a collected library's entry (unless a newer load of the same bytes already replaced it)."""
    if _LIBRARIES.get(sha256) is ref:
        del _LIBRARIES[sha256]


def _load_library(ffi: Any, library: bytes) -> Any:
    """dlopen the verified library bytes from a private file under $TMPDIR, removed right after loading.

    Every load gets a new random name: the dynamic loader hands back an already loaded library when a
    path repeats, which would run another model's kernels. (Not the tempfile module: importing it
    costs ~12 ms of cold start.) The module is not pinned for the process (tvm_ffi's default): the
    library is unloaded when the last reference to it goes."""
    tmpdir = next((os.environ[k] for k in ("TMPDIR", "TEMP", "TMP") if os.environ.get(k)), "/tmp")
    lib_path = os.path.join(tmpdir, f"forgeml-{os.getpid()}-{os.urandom(8).hex()}.so")
    try:
        fd = os.open(lib_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise ArtifactError(f"cannot write the model library to {tmpdir} ({e.strerror}); "
                            "set TMPDIR to a writable directory") from None
    try:
        with open(fd, "wb") as f:
            f.write(library)
        return ffi.load_module(lib_path, keep_module_alive=False)
    finally:
        os.unlink(lib_path)


def _copy_to_device(ffi: Any, host: Any, device: Any) -> Any:
    empty = ffi.get_global_func("runtime.TVMTensorAllocWithScope")
    copy = ffi.get_global_func("runtime.TVMTensorCopyFromTo")
    out = empty(host.shape, host.dtype, device, None)
    copy(host, out)
    return out


def _copy_to_host(ffi: Any, tensor: Any) -> np.ndarray:
    out = _aligned_empty(tuple(tensor.shape), np.dtype(str(tensor.dtype)))
    ffi.get_global_func("runtime.TVMTensorCopyFromTo")(tensor, ffi.from_dlpack(out))
    return out


def load(path: str | Path, threads: int | None = None, trusted_keys: list[str | Path] | None = None) -> Session:
    """Load a .fml artifact for inference (no compiler needed); with `trusted_keys` (public key files),
    only if one of them signed it."""
    return Session(path, threads=threads, trusted_keys=trusted_keys)
