"""Graph-level passes every device shares: constant folding (numpy first, then TVM's), batch norms folded
into convolutions, inference decompositions; and weight lifting.

Weights are bound as constants while optimizing (so batch norms fold into convolutions and
packed weight layouts fold into the constants), then lifted back out into parameters of `main`
by `lift_weights`, so they ship beside the code, not inside it."""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import tvm
from tvm import relax

from forgeml.compiler import nonfinite  # noqa: F401 (registers NaN/inf-correct legalizations on import)
from forgeml.compiler.float16 import compute_float16_in_float32

_MIN_WEIGHT_ELEMENTS = 64  # smaller constants (scalars, shapes) stay in the code


def _legalize_dynamic_strided_slice(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """TVM's legalization of relax.dynamic_strided_slice (ONNX Slice with run-time starts/ends) with each
    output length clamped at 0: TVM's shape function gave an empty slice (start past end, e.g. starts 5,
    ends 2) a negative length, and allocating the output died of std::bad_alloc where ONNX Runtime
    returns an empty tensor."""
    from tvm import te, tirx, topi

    data, begin, end, strides = call.args

    def shape_func(data, begin, end, strides):
        def length_of(i):
            extent = tirx.const(-1, "int64")
            for axis in range(data.ndim):
                extent = tirx.Select(i == tirx.const(axis, "int64"), data.shape[axis], extent)
            step = strides[i]

            def canonical(index):
                low = tirx.Select(step < 0, tirx.const(-1, "int64"), tirx.const(0, "int64"))
                high = tirx.Select(step < 0, extent - 1, extent)
                return tirx.Min(tirx.Max(tirx.Select(index < 0, index + extent, index), low), high)

            first, last = canonical(begin[i]), canonical(end[i])
            length = tirx.Select(step < 0, tirx.ceildiv(first - last, -step), tirx.ceildiv(last - first, step))
            return tirx.Max(length, tirx.const(0, "int64"))

        return te.compute((begin.shape[0],), length_of, name="T_shape_func_strided_slice_dynamic")

    shape = bb.normalize(bb.call_te(shape_func, data, begin, end, strides))
    shape = bb.emit(relax.op.tensor_to_shape(shape))
    dims = [tirx.Var("s", "int64") for _ in range(int(shape.ty.ndim))]
    bb.match_cast(shape, relax.ShapeType(dims))
    return bb.call_te(topi.dynamic_strided_slice, data, begin, end, strides, output_shape=dims)


tvm.ir.register_op_attr("relax.dynamic_strided_slice", "FLegalize", _legalize_dynamic_strided_slice, level=11)


def graph_passes(before_fusion: list[tvm.transform.Pass] | None = None) -> list[tvm.transform.Pass]:
    """The shared passes; a device's `before_fusion` passes run last before legalization and fusion."""
    return [
        fold_constants_with_numpy(),
        fold_constants(),
        relax.transform.FoldBatchnormToConv2D(),
        fold_constants_with_numpy(),
        fold_constants(),  # BN folds into conv only after the first FoldConstant
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
        compute_float16_in_float32(),  # before fast_math: its approximations then run in float32 too
        fast_math(),
        *(before_fusion or []),
        relax.get_pipeline("zero"),  # legalize ops, fuse, FuseTIR
    ]


def fold_constants() -> tvm.transform.Pass:
    """TVM's FoldConstant before legalization, then its leftovers removed. To see whether a call folds,
    FoldConstant legalizes it in the function's builder; an op whose legalization emits bindings of its
    own (dynamic_strided_slice: a `shape_func` kernel call, tensor_to_shape and a match_cast) leaves them
    behind even when the call does not fold, calling a `shape_func` the module never receives, and FuseOps
    then failed with "There is no definition of I.GlobalVar("shape_func")" (ONNX Slice with run-time
    starts/ends). DeadCodeElimination keeps them (a match_cast may fail), so `_drop_dangling_calls` does."""
    return tvm.transform.Sequential([relax.transform.FoldConstant(), _drop_dangling_calls()],
                                    name="ForgemlFoldConstant")


def _drop_dangling_calls() -> tvm.transform.Pass:
    """Remove the bindings that call a function the module does not define, with the bindings that use
    their results, where nothing else uses any of them."""

    def clean(func: relax.Function, defined: set[str]) -> relax.Function | None:
        body = func.body
        if not isinstance(body, relax.SeqExpr):
            return None
        dangling: set = set()
        for block in body.blocks:
            for b in block.bindings:
                value = b.value
                callee = value.args[0] if isinstance(value, relax.Call) and len(value.args) else None
                if (isinstance(callee, tvm.ir.GlobalVar) and callee.name_hint not in defined) or (
                        any(v in dangling for v in relax.analysis.free_vars(value))):
                    dangling.add(b.var)
        if not dangling:
            return None
        kept = [[b for b in block.bindings if b.var not in dangling] for block in body.blocks]
        used = {v for bindings in kept for b in bindings for v in relax.analysis.free_vars(b.value)}
        used |= set(relax.analysis.free_vars(body.body))
        if used & dangling:  # their results are used after all: leave the function for TVM to report
            return None
        blocks = [type(block)(bindings) for block, bindings in zip(body.blocks, kept, strict=True)]
        return relax.Function(func.params, relax.SeqExpr(blocks, body.body), func.ret_ty, func.is_pure,
                              func.attrs)

    @tvm.transform.module_pass(opt_level=0, name="ForgemlDropDanglingCalls")
    def transform(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        defined = {gv.name_hint for gv in mod.get_global_vars()}
        for gv, func in list(mod.functions_items()):
            if isinstance(func, relax.Function) and (cleaned := clean(func, defined)) is not None:
                mod[gv] = cleaned
        return mod

    return transform


def _fast_sigmoid(x):
    """1 / (1 + e^-x) with TVM's polynomial exp, in one elementwise stage. LLVM's exp intrinsic is a
    libm call per lane: HF EfficientNet-B0's SiLU convolutions (x * sigmoid(x)) spent most of their time
    in it (1-thread CPU time, Zen 4: its 16->96 expansion conv at 112x112 6.2 ms, ONNX Runtime 0.8 ms).
    Float32 only (topi's fast_exp is); other dtypes keep the exact sigmoid."""
    from tvm import te, topi

    if x.dtype != "float32":
        return topi.sigmoid(x)
    one = tvm.tirx.const(1.0, "float32")
    exp = topi.fast_exp(te.compute(x.shape, lambda *i: -x(*i), name="T_neg"))
    return te.compute(x.shape, lambda *i: one / (one + exp(*i)), name="T_sigmoid")


def _small_integer_exponent(call: relax.Call) -> int | None:
    """n where `call` is power(x, n) of a float x with a constant scalar exponent n in 2..4, else None."""
    exponent = constant_array(call.args[1])
    dtype = str(getattr(call.args[0].ty, "dtype", ""))
    if exponent is None or exponent.size != 1 or not dtype.startswith(("float", "bfloat")):
        return None
    value = float(exponent.reshape(-1)[0])
    return int(value) if value in (2.0, 3.0, 4.0) else None


def fast_math() -> tvm.transform.Pass:
    """TVM's FastMathTransform (softmax, exp, erf, tanh, sigmoid -> fast approximations) that leaves calls to
    anything but an operator alone: TVM's own read `call.op.name` of every call and raised
    "'ExternFunc' object has no attribute 'name'" on R.call_packed / call_dps_packed calls.

    The approximations keep ONNX Runtime's NaN/inf results (tests/test_nonfinite.py) except fast_erf,
    which clamps its input to [-4, 4] and so gave erf(NaN) = 1: it passes NaN through.

    Also x ** n for a constant n in 2..4 becomes products, as ONNX Runtime's Pow computes them: TVM
    called powf per element, which no loop vectorizes (GPT-2's GELU x ** 3: 2.3 ms per call for
    128 x 3072 elements, ONNX Runtime's whole FastGelu 0.18 ms)."""
    from tvm import topi
    from tvm.relax import expr_functor

    fast = {"relax.nn.softmax": lambda call: (topi.nn.fast_softmax, call.args[0], call.attrs.axis),
            "relax.exp": lambda call: (topi.fast_exp, call.args[0]),
            "relax.sigmoid": lambda call: (_fast_sigmoid, call.args[0]),
            "relax.erf": lambda call: (_nan_passing(topi.fast_erf), call.args[0]),
            "relax.tanh": lambda call: (topi.fast_tanh, call.args[0])}

    @expr_functor.mutator
    class FastMath(relax.PyExprMutator):
        def visit_call_(self, call):
            if isinstance(call.op, tvm.ir.Op) and call.op.name in fast:
                return self.builder_.call_te(*fast[call.op.name](call))
            if isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.power":
                times = _small_integer_exponent(call)
                if times:
                    x = self.visit_expr(call.args[0])
                    return self.builder_.call_te(lambda t: functools.reduce(lambda a, _: a * t, range(times - 1), t),
                                                 x, primfunc_name_hint="power")
            return super().visit_call_(call)

    @tvm.transform.module_pass(opt_level=0, name="ForgemlFastMath")
    def transform(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        mutator = FastMath(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                mutator.builder_.update_func(gv, mutator.visit_expr(func))
        return mutator.builder_.get()

    return transform


def _nan_passing(fast: Callable) -> Callable:
    """`fast` (a TE function of one tensor) returning NaN where its input is NaN."""
    from tvm import te, tirx

    def compute(x):
        y = fast(x)
        if str(x.dtype) not in ("float16", "float32", "float64"):  # TVM's isnan lowers these only
            return y
        return te.compute(x.shape, lambda *i: tirx.Select(tirx.isnan(x[i]), x[i], y[i]), name=y.op.name + "_nan")

    compute.__name__ = fast.__name__  # the kernel's name
    return compute


# Elementwise and layout ops on constants that numpy computes exactly as the compiled kernels would.
_NUMPY_OPS: dict[str, Callable[..., np.ndarray]] = {
    "relax.add": lambda call, a, b: np.add(a, b),
    "relax.subtract": lambda call, a, b: np.subtract(a, b),
    "relax.multiply": lambda call, a, b: np.multiply(a, b),
    "relax.divide": lambda call, a, b: np.divide(a, b),
    "relax.sqrt": lambda call, a: np.sqrt(a),
    "relax.negative": lambda call, a: np.negative(a),
    "relax.isnan": lambda call, a: np.isnan(a),
    "relax.where": lambda call, c, a, b: np.where(c, a, b),
    "relax.reshape": lambda call, a, shape: np.reshape(a, shape),
    "relax.permute_dims": lambda call, a: np.transpose(
        a, None if call.attrs.axes is None else [int(x) for x in call.attrs.axes]),
}


class _Unknown:
    pass


def constant_array(expr, lookup_binding=None) -> np.ndarray | None:
    """The value of a Relax constant (through a bound variable when `lookup_binding` is given), else None."""
    if lookup_binding is not None and isinstance(expr, relax.Var):
        expr = lookup_binding(expr)
    if type(expr).__name__ in ("GenericConst", "Constant"):
        return expr.value.numpy()
    return None


@relax.expr_functor.mutator
class _NumpyConstantFolder(relax.PyExprMutator):
    """Fold calls of `_NUMPY_OPS` whose arguments are all constants, in numpy."""

    def visit_call_(self, call):  # noqa: N802 (TVM's visitor naming)
        call = self.visit_expr_post_order(call)
        op = call.op.name if isinstance(call.op, tvm.ir.Op) else None
        if op not in _NUMPY_OPS:
            return call
        args = [self._value(a) for a in call.args]
        if any(a is _Unknown for a in args):
            return call
        ty = call.ty
        dtype, shape = str(getattr(ty, "dtype", "")), getattr(ty, "shape", None)
        if not dtype or shape is None:
            return call
        try:
            with np.errstate(all="ignore"):
                out = np.asarray(_NUMPY_OPS[op](call, *args))
            want = tuple(int(d) for d in shape)
        except (TypeError, ValueError):  # symbolic shapes, unexpected attrs: leave it to FoldConstant
            return call
        if out.shape != want or np.dtype(out.dtype).kind != np.dtype(dtype).kind:
            return call
        return relax.const(out.astype(dtype), dtype)

    def _value(self, arg):
        if isinstance(arg, relax.Var):
            arg = self.lookup_binding(arg)
        array = constant_array(arg)
        if array is not None:
            return array
        name = type(arg).__name__
        if name in ("FloatImm", "IntImm"):  # a scalar operand, e.g. batch norm's epsilon
            return arg.value
        if name == "PrimValue" and hasattr(arg.value, "value"):
            return arg.value.value
        if name == "ShapeExpr":
            try:
                return tuple(int(v) for v in arg.values)
            except TypeError:
                return _Unknown
        return _Unknown


def fold_constants_with_numpy() -> tvm.transform.Pass:
    """Constant-fold the cheap ops on weights in numpy before TVM's FoldConstant, which compiles a
    kernel with LLVM for every folded call: on MobileNetV2 (52 batch norms -> 5 ops each, and 70
    Clip bound checks) that took 40 s of a 57 s compile."""

    @tvm.transform.module_pass(opt_level=0, name="ForgemlNumpyFoldConstant")
    def fold(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        folder = _NumpyConstantFolder(mod)
        for gv, func in list(mod.functions_items()):
            if isinstance(func, relax.Function):
                mod[gv] = folder.visit_expr(func)
        return mod

    return fold


@relax.expr_functor.mutator
class _ConstantsToParams(relax.PyExprMutator):
    """Replace each large constant in a function body by a new parameter (shared uses stay shared)."""

    def __init__(self, mod: tvm.IRModule, min_elements: int):
        super().__init__(mod)
        self.min_elements = min_elements
        self.new_params: list[relax.Var] = []
        self.values: list[np.ndarray] = []
        self._seen: dict = {}

    def visit_generic_const_(self, op):  # noqa: N802 (TVM's visitor naming)
        if int(np.prod(op.value.shape, dtype=np.int64)) < self.min_elements:
            return op
        if op not in self._seen:
            var = relax.Var(f"w{len(self.new_params)}", op.ty)
            self._seen[op] = var
            self.new_params.append(var)
            self.values.append(op.value.numpy())
        return self._seen[op]


def lift_weights(mod: tvm.IRModule, func_name: str = "main") -> tuple[tvm.IRModule, list[np.ndarray]]:
    """Turn the large constants of `func_name` into trailing parameters; returns their values in order."""
    func = mod[func_name]
    mutator = _ConstantsToParams(mod, _MIN_WEIGHT_ELEMENTS)
    body = mutator.visit_expr(func.body)
    new_func = relax.Function(list(func.params) + mutator.new_params, body, func.ret_ty, func.is_pure, func.attrs)
    mod[func_name] = new_func
    return mod, mutator.values
