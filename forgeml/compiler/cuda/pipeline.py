"""GPU (CUDA) pipelines: the fused graph scheduled by TVM's rule-based GPU schedules (dlight).

`pipeline.get_pipeline` dispatches here when the target's kind is "cuda". The pipelines are the
CPU graph passes (constant folding, batch norm folded into convolutions, inference decompositions),
split-K for convolutions that would leave most SMs idle (`splitk.py`: batch-1 deep layers through
im2col, fp16 tensor-core ones such as ResNet's layer4 at batch 32 along their input channels), fp16
RGB stems as im2col + a tensor-core GEMM (`stem.py`),
optional fp16 mixed precision, TVM's legalize + fuse, then `dlight.gpu` rules on every kernel:

- TensorCoreMatmul (forgeml's): fp16 GEMMs and convolutions with every dimension at least 64 and
  16M+ multiply-adds on tensor cores (dlight's wmma schedule, fp32 accumulators; 128 x 64 tiles when
  N is 64, `wmma.py`); dlight's own rule asks for more than 64, which left 64-channel
  convolutions on FMA.
- Matmul: matmuls, dense layers and convolutions (dlight re-indexes a convolution into an implicit
  im2col GEMM, staged through shared memory; 32 x 64 output tiles, one thread block each).
- GEMV / LowBatchGEMV: matrix-vector products (batch-1 dense layers with [N, K] weights).
- ShortReduction (forgeml's): kernels whose reduction is at most 49 long, i.e. depthwise convolutions
  and 7x7 pools: one thread per output element (dlight's row reductions wasted most threads on them).
- Reduction: means and other single reductions (one thread block per row).
- WarpRowReduction (`rows.py`, dlight's GeneralReduction with its threads per row as a
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

import tvm
from tvm import relax

from forgeml.compiler.cuda.options import conv_layout_of, precision_of, tensor_core_schedule_of
from forgeml.compiler.cuda.rows import WarpRowReduction
from forgeml.compiler.cuda.short_reduction import short_reduction_rule
from forgeml.compiler.cuda.splitk import split_k_convolutions
from forgeml.compiler.cuda.stem import stem_cols_rule, stem_convolutions
from forgeml.compiler.cuda.tensor_cores import tensor_core_rule
from forgeml.compiler.graph import fold_constants
from forgeml.compiler.tensor_intrinsics import register_tensor_intrinsics
from forgeml.errors import InvalidInput


def graph_passes(precision: str, conv_layout: str = "NCHW") -> list[tvm.transform.Pass]:
    passes = [
        fold_constants(),
        relax.transform.FoldBatchnormToConv2D(),
        fold_constants(),  # BN folds into conv only after the first FoldConstant
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


def lower_passes() -> list[tvm.transform.Pass]:
    """TVM's legalize and fuse (the CUDA backend's own order)."""
    return [
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]


def default_rules(tensor_core_schedule: str = "wmma", conv_layout: str = "NCHW") -> list:
    """The dlight GPU rules, most specific first; Fallback catches every remaining kernel."""
    from tvm.s_tir import dlight as dl

    register_tensor_intrinsics()

    return [
        stem_cols_rule(),
        tensor_core_rule(tensor_core_schedule, conv_layout),
        dl.gpu.Matmul(),
        dl.gpu.GEMV(),
        dl.gpu.LowBatchGEMV(),
        short_reduction_rule(),  # before the row reductions, after every GEMM-shaped rule
        dl.gpu.Reduction(),
        WarpRowReduction(),  # dlight's GeneralReduction, a warp per short row (softmax, layer norm)
        dl.gpu.Transpose(),
        dl.gpu.Fallback(),
    ]


def _check_target(target: tvm.target.Target) -> None:
    if "gpu" not in target.keys:
        raise InvalidInput(f"the GPU pipeline needs a GPU target (cuda), got '{target.kind.name}'")


def o0(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Legalized kernels with the generic Fallback schedule only (GPU code needs thread bindings)."""
    from tvm.s_tir import dlight as dl

    mod = tuning_input(mod, target)
    with target:
        return dl.ApplyDefaultSchedule(dl.gpu.Fallback())(mod)


def tuning_input(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """The fused, legalized module before any schedule: what MetaSchedule tunes (precision included)."""
    _check_target(target)
    with target:
        return tvm.transform.Sequential(graph_passes(precision_of(mod), conv_layout_of(mod)) + lower_passes())(mod)


def schedule_rest(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """dlight's rules on every kernel not scheduled yet (tuned kernels are marked scheduled)."""
    from tvm.s_tir import dlight as dl

    with target:
        mod = dl.ApplyDefaultSchedule(*default_rules(tensor_core_schedule_of(mod), conv_layout_of(mod)))(mod)
        return relax.transform.DeadCodeElimination()(mod)


def o2(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Fused graph plus dlight's GPU rules (tensor cores for fp16 GEMMs and convolutions)."""
    return schedule_rest(tuning_input(mod, target), target)


PIPELINES = {"O0": o0, "O2": o2}


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
