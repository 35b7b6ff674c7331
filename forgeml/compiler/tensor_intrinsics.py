"""TVM's tensor intrinsics (wmma/mma for CUDA, NEON dot products, AVX-512/VNNI dot products), registered
once per process the fast way. dlight's tensor-core rule and MetaSchedule's rules on every target family
look them up by name."""

from __future__ import annotations

import functools


@functools.cache
def register_tensor_intrinsics() -> None:
    """Import tvm.s_tir.tensor_intrin (dlight's tensor-core rule needs it) with a fast inspect.stack.

    That package parses ~500 TVMScript functions at import, each calling inspect.stack(), whose
    getmodule() scans sys.modules for every frame: with torch loaded (tvm_ffi imports it) that took
    7 minutes on a busy 2-core machine. The parser only needs each frame's file, line and source
    line, which this stand-in gives without the scan.
    """
    import inspect
    import linecache
    import sys

    def fast_stack(context: int = 1) -> list[inspect.FrameInfo]:
        frames, frame = [], sys._getframe(1)
        while frame is not None:
            filename, lineno = frame.f_code.co_filename, frame.f_lineno
            line = linecache.getline(filename, lineno)
            frames.append(inspect.FrameInfo(frame, filename, lineno, frame.f_code.co_name,
                                            [line] if line else None, 0 if line else None))
            frame = frame.f_back
        return frames

    original = inspect.stack
    inspect.stack = fast_stack
    try:
        import tvm.s_tir.tensor_intrin.cuda  # noqa: F401
    finally:
        inspect.stack = original
