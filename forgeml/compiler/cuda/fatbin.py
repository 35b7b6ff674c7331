"""Export: CUDA kernels as a fatbin inside the library

TVM 0.27's compiler library has no CUDA runtime linked in: `tvm.compile` leaves the kernels as
CUDA C source in a module of format "cuda", which the CUDA runtime would compile at load time
through a Python callback (`tvm_callback_cuda_compile`, i.e. the compiler package and nvcc on the
device). forgeml's runtime has neither, so at export the CUDA source is compiled here with nvcc
into a fatbin (SASS for the target's sm_XY plus PTX, which newer GPUs JIT-compile), and the
packed module blob (`__tvm_ffi__library_bin`) is rewritten to format "fatbin" before linking:
the runtime's CUDA module then loads it with cuModuleLoadData, no compiler involved."""

from __future__ import annotations

import tvm

FATBIN_MAGIC = b"\x50\xed\x55\xba"  # fatbin wrapper magic 0xBA55ED50, little-endian


_BLOB_SYMBOL = "__tvm_ffi__library_bin"


class _Reader:
    def __init__(self, data: bytes, pos: int = 0):
        self.data, self.pos = data, pos

    def u64(self) -> int:
        import struct

        (value,) = struct.unpack_from("<Q", self.data, self.pos)
        self.pos += 8
        return value

    def skip(self, n: int) -> None:
        self.pos += n

    def bytes_(self) -> bytes:
        n = self.u64()
        value = self.data[self.pos:self.pos + n]
        if len(value) != n:
            raise ValueError("truncated module blob")
        self.pos += n
        return value


def _u64(value: int) -> bytes:
    import struct

    return struct.pack("<Q", value)


def _str(value: bytes) -> bytes:
    return _u64(len(value)) + value


def parse_module_blob(blob: bytes) -> tuple[list[int], list[int], list[tuple[str, bytes | None]]]:
    """Split a packed import blob into (tree row pointers, child indices, [(kind, bytes)])."""
    r = _Reader(blob)
    total = r.u64()
    if total + 8 != len(blob):
        raise ValueError(f"module blob says {total} bytes, holds {len(blob) - 8}")
    row_ptr = [r.u64() for _ in range(r.u64())]
    children = [r.u64() for _ in range(r.u64())]
    modules: list[tuple[str, bytes | None]] = []
    for _ in range(len(row_ptr) - 1):
        kind = r.bytes_().decode()
        modules.append((kind, None if kind == "_lib" else r.bytes_()))
    if r.pos != len(blob):
        raise ValueError("trailing bytes after the module blob")
    return row_ptr, children, modules


def pack_module_blob(row_ptr: list[int], children: list[int], modules: list[tuple[str, bytes | None]]) -> bytes:
    body = _u64(len(row_ptr)) + b"".join(map(_u64, row_ptr)) + _u64(len(children)) + b"".join(map(_u64, children))
    for kind, data in modules:
        body += _str(kind.encode())
        if data is not None:
            body += _str(data)
    return _u64(len(body)) + body


def split_cuda_module(data: bytes) -> tuple[str, bytes, bytes]:
    """A serialized CUDA module: (format, function-info map bytes, payload: source or binary).

    Layout (TVM 0.27): format string; map size, then per kernel: key, name, argument dtypes
    (4 bytes each), launch parameter tags (strings), argument extra tags (4 bytes each); payload.
    """
    r = _Reader(data)
    fmt = r.bytes_().decode()
    fmap_start = r.pos
    for _ in range(r.u64()):
        r.bytes_()  # key
        r.bytes_()  # FunctionInfo.name
        r.skip(4 * r.u64())  # arg_types: DLDataType
        for _ in range(r.u64()):  # launch_param_tags
            r.bytes_()
        r.skip(4 * r.u64())  # arg_extra_tags
    fmap = data[fmap_start:r.pos]
    payload = r.bytes_()
    if r.pos != len(data):
        raise ValueError("unexpected layout of a serialized CUDA module")
    return fmt, fmap, payload


def _nvcc_fatbin(source: str, arch: str) -> bytes:
    """CUDA source -> fatbin with SASS for `arch` (sm_XY) and PTX for newer GPUs (JIT at load)."""
    from tvm.support import nvcc

    compute = arch.replace("sm_", "compute_")
    gencode = ["-gencode", f"arch={compute},code=[{arch},{compute}]"]
    with tvm.target.Target({"kind": "cuda", "arch": arch}):  # nvcc.py reads the arch from the scope
        return bytes(nvcc.compile_cuda(source, target_format="fatbin", arch=gencode, compiler="nvcc"))


def _compile_cuda_modules(blob: bytes, arch: str) -> tuple[bytes, dict]:
    row_ptr, children, modules = parse_module_blob(blob)
    info = {"kernels_format": None, "fatbin_bytes": 0, "arch": arch}
    out = []
    for kind, data in modules:
        if kind == "cuda" and data is not None:
            fmt, fmap, payload = split_cuda_module(data)
            if fmt == "cuda":  # source: compile it here
                payload = _nvcc_fatbin(payload.decode(), arch)
                fmt = "fatbin"
            data = _str(fmt.encode()) + fmap + _str(payload)
            info["kernels_format"] = fmt
            info["fatbin_bytes"] += len(payload)
        out.append((kind, data))
    return pack_module_blob(row_ptr, children, out), info


def export_cuda_library(module, out_path, arch: str, fcompile=None) -> dict:
    """Export a CUDA-target runtime module (a Relax executable's `.mod`, or a single kernel built
    for tuning) to a shared library whose CUDA kernels are a prebuilt fatbin.

    Returns a summary (kernel format, fatbin size, arch) for the manifest.
    """
    import os

    from tvm.runtime import _ffi_api

    summary: dict = {}

    def fpack_imports(module, is_system_lib, prefix, workspace_dir):
        tensor = _ffi_api.ModulePackImportsToTensor(module)
        import numpy as np

        blob, info = _compile_cuda_modules(np.from_dlpack(tensor).tobytes(), arch)
        summary.update(info)
        blob_path = os.path.join(workspace_dir, "forgeml_kernels.bin")
        with open(blob_path, "wb") as f:
            f.write(blob)
        asm_path = os.path.join(workspace_dir, f"{prefix}devc.S")
        with open(asm_path, "w") as f:
            f.write(
                "\t.section .rodata\n"
                f"\t.globl {prefix}{_BLOB_SYMBOL}\n"
                f"\t.type {prefix}{_BLOB_SYMBOL}, %object\n"
                "\t.balign 16\n"
                f"{prefix}{_BLOB_SYMBOL}:\n"
                f'\t.incbin "{blob_path}"\n'
                f"\t.size {prefix}{_BLOB_SYMBOL}, {len(blob)}\n"
                '\t.section .note.GNU-stack,"",%progbits\n'
            )
        return asm_path

    module.export_library(str(out_path), fcompile=fcompile, fpack_imports=fpack_imports)
    return summary


def embedded_cuda_kernels(library: bytes) -> list[tuple[str, int]]:
    """(format, payload size) of each CUDA module packed into a compiled library's bytes (for tests,
    `forgeml inspect`): "fatbin" means prebuilt kernels; "cuda" would mean source needing nvcc at load."""
    found = []
    marker = _str(b"cuda")
    start = 0
    while (i := library.find(marker, start)) >= 0:
        start = i + 1
        try:
            r = _Reader(library, i + len(marker))
            data = r.bytes_()
            fmt, _, payload = split_cuda_module(data)
        except Exception:  # noqa: BLE001 (an unrelated occurrence of the marker)
            continue
        if fmt in ("fatbin", "cubin", "ptx", "cuda"):
            found.append((fmt, len(payload)))
    return found
