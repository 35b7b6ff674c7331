"""GPU (CUDA) pipelines: the fused graph scheduled by TVM's rule-based GPU schedules (dlight).

`pipeline.get_pipeline` dispatches here when the target's kind is "cuda". The pipelines are the
CPU graph passes (constant folding, batch norm folded into convolutions, inference decompositions),
split-K for convolutions that would leave most SMs idle (`gpu_splitk`: batch-1 deep layers through
im2col, fp16 tensor-core ones such as ResNet's layer4 at batch 32 along their input channels), fp16
RGB stems as im2col + a tensor-core GEMM (`gpu_stem`),
optional fp16 mixed precision, TVM's legalize + fuse, then `dlight.gpu` rules on every kernel:

- TensorCoreMatmul (forgeml's): fp16 GEMMs and convolutions with every dimension at least 64 and
  16M+ multiply-adds on tensor cores (dlight's wmma schedule, fp32 accumulators; 128 x 64 tiles when
  N is 64, `gpu_wmma.py`); dlight's own rule asks for more than 64, which left 64-channel
  convolutions on FMA.
- Matmul: matmuls, dense layers and convolutions (dlight re-indexes a convolution into an implicit
  im2col GEMM, staged through shared memory; 32 x 64 output tiles, one thread block each).
- GEMV / LowBatchGEMV: matrix-vector products (batch-1 dense layers with [N, K] weights).
- ShortReduction (forgeml's): kernels whose reduction is at most 49 long, i.e. depthwise convolutions
  and 7x7 pools: one thread per output element (dlight's row reductions wasted most threads on them).
- Reduction: means and other single reductions (one thread block per row).
- WarpRowReduction (`gpu_rows.py`, dlight's GeneralReduction with its threads per row as a
  parameter): softmax, layer norms; one warp per row of at most 512 elements (BERT's 128), dlight's
  256-thread block per row otherwise.
- Transpose, Fallback: everything else (elementwise, pooling, depthwise convolutions).

fp16 (`precision="fp16"`) is relax.transform.ToMixedPrecision(out_dtype="float32"): convolutions
and matmuls read fp16 activations and fp16 weights and accumulate in fp32; the weights fold into
fp16 constants (half the size in the artifact and on the GPU); the model's inputs and outputs stay
float32. The precision travels to the pipeline as an IRModule attribute (`PRECISION_ATTR`), so the
pipeline signature stays `(mod, target) -> mod`; so does the convolution layout (`LAYOUT_ATTR`).

`conv_layout="NHWC"` converts the convolutions to NHWC/OHWI (relax ConvertLayout: one transpose of
the input, the rest of the graph follows; the weights are transposed at compile time). In NCHW the
implicit-GEMM operand A gathers its K (channels x taps) across planes: scalar 2-byte loads, each
behind divisions by H*W, W, 9 and 3 (ResNet-18's layer1 kernel). In NHWC, K runs along the
channels: 8-byte vector loads with one division per K step. The tensor-core split and the stem
rewrite run after the conversion, in NHWC (split-K through im2col, NCHW only, before it). Not the
default until measured on a GPU.
"""

from __future__ import annotations

import functools

import tvm
from tvm import relax

from forgeml.compiler.gpu_rows import WarpRowReduction
from forgeml.compiler.gpu_splitk import TENSOR_CORE_MIN_EXTENT, split_k_convolutions
from forgeml.compiler.gpu_stem import stem_cols_rule, stem_convolutions
from forgeml.errors import InvalidInput

PRECISION_ATTR = "forgeml_precision"
PRECISIONS = ("fp32", "fp16")
LAYOUT_ATTR = "forgeml_conv_layout"
CONV_LAYOUTS = ("NCHW", "NHWC")
TENSOR_CORE_ATTR = "forgeml_tensor_core_schedule"
TENSOR_CORE_SCHEDULES = ("wmma", "mma")


def with_precision(mod: tvm.IRModule, precision: str) -> tvm.IRModule:
    """Mark `mod` for compilation at `precision` ("fp32" or "fp16")."""
    return _with_option(mod, PRECISION_ATTR, precision, PRECISIONS, "precision")


def precision_of(mod: tvm.IRModule) -> str:
    return _option_of(mod, PRECISION_ATTR, "fp32")


def with_conv_layout(mod: tvm.IRModule, layout: str) -> tvm.IRModule:
    """Mark `mod` for convolutions in `layout`: "NCHW" (as ONNX models hold them) or "NHWC"."""
    return _with_option(mod, LAYOUT_ATTR, layout, CONV_LAYOUTS, "convolution layout")


def conv_layout_of(mod: tvm.IRModule) -> str:
    return _option_of(mod, LAYOUT_ATTR, "NCHW")


def with_tensor_core_schedule(mod: tvm.IRModule, schedule: str) -> tvm.IRModule:
    """Mark `mod` for fp16 GEMMs scheduled with "wmma" (dlight's, `gpu_wmma.py`) or "mma" (mma.sync
    with a cp.async pipeline, sm_80+, `gpu_mma.py`)."""
    return _with_option(mod, TENSOR_CORE_ATTR, schedule, TENSOR_CORE_SCHEDULES, "tensor-core schedule")


def tensor_core_schedule_of(mod: tvm.IRModule) -> str:
    return _option_of(mod, TENSOR_CORE_ATTR, "wmma")


def _with_option(mod: tvm.IRModule, attr: str, value: str, known: tuple[str, ...], what: str) -> tvm.IRModule:
    if value not in known:
        raise InvalidInput(f"unknown {what} '{value}'; known: {', '.join(known)}")
    return mod.with_attr(attr, value)


def _option_of(mod: tvm.IRModule, attr: str, default: str) -> str:
    attrs = mod.attrs
    return str(attrs[attr]) if attrs is not None and attr in attrs else default


def _graph_passes(precision: str, conv_layout: str = "NCHW") -> list[tvm.transform.Pass]:
    passes = [
        relax.transform.FoldConstant(),
        relax.transform.FoldBatchnormToConv2D(),
        relax.transform.FoldConstant(),  # BN folds into conv only after the first FoldConstant
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
    ]
    # No FastMathTransform (the CPU pipeline's polynomial exp/erf): CUDA has fast expf/erff, and the
    # long polynomial fused into a matmul epilogue makes dlight's tensor-core Matmul rule take minutes.
    if precision == "fp16":
        passes += [
            _wrap_call_tir_pass(),  # ToMixedPrecision crashes on call_tir (the ONNX importer emits Clip so)
            relax.transform.ToMixedPrecision(out_dtype="float32"),
            relax.transform.InlinePrivateFunctions(),
            relax.transform.FoldConstant(),  # the weights become fp16 constants
        ]
    # after the precision passes, so that the im2col it adds moves fp16 data in fp16 builds; split-K
    # through im2col (batch-1 deep layers) rewrites NCHW convolutions only, so it runs before ConvertLayout,
    # the tensor-core split and the stem rewrite after it (in either layout)
    if conv_layout == "NHWC":
        passes += [split_k_convolutions(tensor_cores=False),
                   relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "OHWI"]}),
                   relax.transform.FoldConstant(),  # the weights' transposes fold into OHWI constants
                   split_k_convolutions(im2col=False)]
    else:
        passes.append(split_k_convolutions())
    passes.append(stem_convolutions())  # fp16 RGB stems: im2col + a GEMM
    return passes


def _wrap_call_tir_pass() -> tvm.transform.Pass:
    """Move each `R.call_tir` of `main` into a private Relax function called in its place.

    ToMixedPrecision (TVM 0.27) fails with "Expected TensorType, but got R.Callable" when a call_tir
    gets an argument whose dtype it changed. Behind a function call it casts the arguments back to
    their original dtype instead, so such kernels simply run in fp32; InlinePrivateFunctions undoes
    the wrapping afterwards.
    """

    @relax.expr_functor.mutator
    class Wrap(relax.PyExprMutator):
        def visit_call_(self, call):  # noqa: N802 (TVM's visitor naming)
            call = super().visit_call_(call)
            if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.call_tir"):
                return call
            args = call.args[1]
            fields = list(args.fields) if isinstance(args, relax.Tuple) else None
            if not fields or not all(isinstance(f, (relax.Var, tvm.ir.expr.Constant)) for f in fields):
                return call
            outer = [f for f in fields if isinstance(f, relax.Var)]  # constants stay inside
            params = {id(f): relax.Var(f"a{i}", f.ty) for i, f in enumerate(outer)}
            inner = [params.get(id(f), f) for f in fields]
            bb = relax.BlockBuilder()
            with bb.function("wrap", [params[id(f)] for f in outer], private=True):
                out = bb.emit(relax.Call(call.op, [call.args[0], relax.Tuple(inner), *call.args[2:]],
                                         call.attrs, call.ty_args))
                bb.emit_func_output(out)
            gv = self.builder_.add_func(bb.get()["wrap"], f"forgeml_amp_wrap_{call.args[0].name_hint}")
            return self.builder_.normalize(relax.Call(gv, outer))

    @tvm.transform.module_pass(opt_level=0, name="ForgemlWrapCallTIR")
    def wrap(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        mutator = Wrap(mod)
        for gv, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                mutator.builder_.update_func(gv, mutator.visit_expr(func))
        return mutator.builder_.get()

    return wrap


def _lower_passes() -> list[tvm.transform.Pass]:
    """TVM's legalize and fuse (the CUDA backend's own order)."""
    return [
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]


@functools.cache
def _import_tensor_intrinsics() -> None:
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


def _short_reduction_rule(max_extent: int = 49):
    """A rule for kernels whose only reduction is short (depthwise convolutions: kh*kw; 7x7 pools):
    one thread per output element, the reduction in its registers (dlight's Fallback schedule).

    dlight's Reduction/GeneralReduction give each output row a thread block that reduces cooperatively,
    so a 3x3 depthwise convolution kept 9 of 256 threads busy: MobileNetV2 at batch 32 took 69 ms on
    an H200 (PyTorch eager: 6 ms).
    """
    from tvm import s_tir, tirx
    from tvm.s_tir import dlight as dl
    from tvm.s_tir.dlight.gpu.base import GPUScheduleRule

    def reduction_extents(func) -> list[int | None]:
        sch = s_tir.Schedule(func)
        extents: list[int | None] = []

        def walk(block_rv) -> None:
            for child in sch.get_child_blocks(block_rv):
                block = sch.get(child)
                red = [iv.dom.extent for iv in block.iter_vars if iv.iter_type == tirx.IterVar.CommReduce]
                if red:
                    total = 1
                    for e in red:
                        total = total * int(e) if isinstance(e, tirx.IntImm) else None if total is None else None
                    extents.append(total)
                walk(child)

        walk(sch.get_sblock("root"))
        return extents

    class ShortReduction(GPUScheduleRule):
        def apply(self, func, target, tunable):
            if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
                return None
            extents = reduction_extents(func)
            if len(extents) != 1 or extents[0] is None or extents[0] > max_extent:
                return None
            return dl.gpu.Fallback().apply(func, target, tunable)

    return ShortReduction()


def gemm_extents(func) -> tuple[str, tuple[int, ...]] | None:
    """(input dtype, (M, N, K)) of a GEMM-shaped kernel (convolutions as implicit GEMMs) after dlight's
    normalization to C[S, I, J] += A[S, I, K] * B[S, J, K]; None for other kernels or symbolic shapes."""
    from tvm import s_tir, tirx
    from tvm.s_tir.dlight.analysis import get_root_block
    from tvm.s_tir.dlight.gpu.matmul import get_in_out_dtypes, get_index_map, get_reduction_blocks

    try:
        sch = s_tir.Schedule(func)
        blocks = get_reduction_blocks(sch, sch.get_child_blocks(get_root_block(sch)))
        if not blocks or not get_index_map(sch.get(blocks[0])):
            return None
        main = blocks[0]
        for buffer, index in (("read", 0), ("read", 1), ("write", 0)):
            sch.reindex(main, (buffer, index))
        matmul_map = get_index_map(sch.get(main))[0]
        sch.transform_block_layout(main, matmul_map)
        extents = [iv.dom.extent for iv in sch.get(main).iter_vars[1:]]
        if not all(isinstance(e, tirx.IntImm) for e in extents):
            return None
        return get_in_out_dtypes(sch.get(main))[0], tuple(int(e) for e in extents)
    except Exception:  # noqa: BLE001 (not a GEMM this analysis understands: leave it to the other rules)
        return None


def tensor_core_gemm(func, target, min_extent: int = TENSOR_CORE_MIN_EXTENT,
                     min_macs: int = 1 << 24) -> tuple[int, int, int] | None:
    """(M, N, K) of an fp16 GEMM or convolution that goes on tensor cores on `target` (sm_70+): every
    extent at least `min_extent` and `min_macs` multiply-adds or more; None for any other kernel.

    dlight's Matmul rule tensorizes only when every extent exceeds 64, so ResNet-18's 64-channel
    convolutions (N = 64) ran on FP32 FMA in fp16 builds: each layer1 convolution took 396 us at batch
    32 on an H200 (169 us on tensor cores); layer4's, with as many multiply-adds, 235 us on tensor
    cores. The wmma tiles are 128 x 128 x 64 (padded; 128 x 64 when N is 64), so small GEMMs (under
    `min_macs` multiply-adds) stay with Matmul.
    """
    from tvm.s_tir.dlight.gpu.matmul import check_sm_version

    if target.kind.name != "cuda" or check_sm_version(str(target.attrs.get("arch", ""))) < 70:
        return None
    found = gemm_extents(func)
    if found is None or str(found[0]) != "float16":
        return None
    m, n, k = found[1]
    if min(m, n, k) < min_extent or m * n * k < min_macs:
        return None
    return m, n, k


def _tensor_core_rule(schedule: str = "wmma", conv_layout: str = "NCHW"):
    """fp16 GEMMs on tensor cores where `tensor_core_gemm` says so: dlight's wmma schedule, or with
    `schedule` "mma" on sm_80+, forgeml's mma.sync one (`gpu_mma.rule_tiles`)."""
    from tvm.s_tir.dlight.gpu.base import GPUScheduleRule
    from tvm.s_tir.dlight.gpu.matmul import MatmulTensorization

    from forgeml.compiler import gpu_mma

    class TensorCoreMatmul(GPUScheduleRule):
        def apply(self, func, target, tunable):
            if not self.is_target_available(target):
                return None
            found = tensor_core_gemm(func, target)
            if found is None:
                return None
            if schedule == "mma" and gpu_mma.supports(target):
                return gpu_mma.mma_matmul(func, target, gpu_mma.rule_tiles(func, target, found[1], conv_layout))
            if found[1] <= 64:  # dlight's 128-wide N tile would be half padding
                from forgeml.compiler.gpu_wmma import WmmaTiles, wmma_matmul

                return wmma_matmul(func, target, WmmaTiles(frags_n=1))
            return MatmulTensorization().apply(func, target, tunable)

    return TensorCoreMatmul()


def default_rules(tensor_core_schedule: str = "wmma", conv_layout: str = "NCHW") -> list:
    """The dlight GPU rules, most specific first; Fallback catches every remaining kernel."""
    from tvm.s_tir import dlight as dl

    _import_tensor_intrinsics()

    return [
        stem_cols_rule(),
        _tensor_core_rule(tensor_core_schedule, conv_layout),
        dl.gpu.Matmul(),
        dl.gpu.GEMV(),
        dl.gpu.LowBatchGEMV(),
        _short_reduction_rule(),  # before the row reductions, after every GEMM-shaped rule
        dl.gpu.Reduction(),
        WarpRowReduction(),  # dlight's GeneralReduction, a warp per short row (softmax, layer norm)
        dl.gpu.Transpose(),
        dl.gpu.Fallback(),
    ]


def _check_target(target: tvm.target.Target) -> None:
    if "gpu" not in target.keys:
        raise InvalidInput(f"the GPU pipeline needs a GPU target (cuda), got '{target.kind.name}'")


def gpu_o0(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Legalized kernels with the generic Fallback schedule only (GPU code needs thread bindings)."""
    from tvm.s_tir import dlight as dl

    mod = gpu_tuning_input(mod, target)
    with target:
        return dl.ApplyDefaultSchedule(dl.gpu.Fallback())(mod)


def gpu_tuning_input(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """The fused, legalized module before any schedule: what MetaSchedule tunes (precision included)."""
    _check_target(target)
    with target:
        return tvm.transform.Sequential(_graph_passes(precision_of(mod), conv_layout_of(mod)) + _lower_passes())(mod)


def schedule_rest(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """dlight's rules on every kernel not scheduled yet (tuned kernels are marked scheduled)."""
    from tvm.s_tir import dlight as dl

    with target:
        mod = dl.ApplyDefaultSchedule(*default_rules(tensor_core_schedule_of(mod), conv_layout_of(mod)))(mod)
        return relax.transform.DeadCodeElimination()(mod)


def gpu_o2(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Fused graph plus dlight's GPU rules (tensor cores for fp16 GEMMs and convolutions)."""
    return schedule_rest(gpu_tuning_input(mod, target), target)


GPU_PIPELINES = {"O0": gpu_o0, "O2": gpu_o2}


def schedule_summary(mod: tvm.IRModule, target: tvm.target.Target) -> dict[str, str]:
    """Which dlight rule schedules each kernel of a legalized, fused module (for tests and reports)."""
    rules = default_rules()
    summary = {}
    with target:
        for gv, func in mod.functions.items():
            if not isinstance(func, tvm.tirx.PrimFunc):
                continue
            summary[gv.name_hint] = "none"
            for rule in rules:
                try:
                    if rule.apply(func, target, False) is not None:
                        summary[gv.name_hint] = type(rule).__name__
                        break
                except Exception:  # noqa: BLE001 (a rule that does not fit may raise)
                    continue
    return summary


# ---------------------------------------------------------------------------------------------
# Export: CUDA kernels as a fatbin inside the library
#
# TVM 0.27's compiler library has no CUDA runtime linked in: `tvm.compile` leaves the kernels as
# CUDA C source in a module of format "cuda", which the CUDA runtime would compile at load time
# through a Python callback (`tvm_callback_cuda_compile`, i.e. the compiler package and nvcc on the
# device). forgeml's runtime has neither, so at export the CUDA source is compiled here with nvcc
# into a fatbin (SASS for the target's sm_XY plus PTX, which newer GPUs JIT-compile), and the
# packed module blob (`__tvm_ffi__library_bin`) is rewritten to format "fatbin" before linking:
# the runtime's CUDA module then loads it with cuModuleLoadData, no compiler involved.
# ---------------------------------------------------------------------------------------------

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
