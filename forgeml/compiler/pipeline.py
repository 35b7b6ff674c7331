"""The Relax pass pipelines, by optimization level.

Weights are bound as constants while optimizing (so batch norms fold into convolutions and
packed weight layouts fold into the constants), then lifted back out into parameters of `main`
by `lift_weights`, so they ship beside the code, not inside it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tvm
from tvm import relax

from forgeml.errors import InvalidInput

Pipeline = Callable[[tvm.IRModule, tvm.target.Target], tvm.IRModule]

_MIN_WEIGHT_ELEMENTS = 64  # smaller constants (scalars, shapes) stay in the code


def _graph_passes() -> list[tvm.transform.Pass]:
    return [
        fold_constants_with_numpy(),
        relax.transform.FoldConstant(),
        relax.transform.FoldBatchnormToConv2D(),
        fold_constants_with_numpy(),
        relax.transform.FoldConstant(),  # BN folds into conv only after the first FoldConstant
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
        relax.transform.FastMathTransform(),
        relax.get_pipeline("zero"),  # legalize ops, fuse, FuseTIR
    ]


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


def _fold_prepacked_weights() -> tvm.transform.Pass:
    """Move the schedules' weight repacking out of the kernels and fold it into the constants."""
    return tvm.transform.Sequential([
        relax.transform.SplitLayoutRewritePreproc(),
        relax.transform.FoldConstant(),
        relax.transform.DeadCodeElimination(),
    ])


def _o0(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """No schedules: TVM's naive loops. For debugging the compiler, not for speed."""
    with target:
        return tvm.transform.Sequential(_graph_passes())(mod)


def _o2(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Fused graph plus forgeml's rule-based schedules with packed weight layouts."""
    from forgeml.compiler.schedules import apply_cpu_schedules

    with target:
        mod = tvm.transform.Sequential(_graph_passes())(mod)
        mod = apply_cpu_schedules(mod, target)
        return _fold_prepacked_weights()(mod)


def tuning_input(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """The fused module whose kernels MetaSchedule tunes (CPU: weights marked layout-free for prepacking)."""
    if target.kind.name == "cuda":
        from forgeml.compiler.gpu import gpu_tuning_input

        return _without_schedule_rule_annotations(gpu_tuning_input(mod, target))
    with target:
        mod = tvm.transform.Sequential([*_graph_passes(), relax.transform.AttachAttrLayoutFreeBuffers()])(mod)
    return _without_schedule_rule_annotations(mod)


def _without_schedule_rule_annotations(mod: tvm.IRModule) -> tvm.IRModule:
    """Drop the `schedule_rule` block annotation legalization puts on some kernels (pooling: "meta_schedule.
    pool_max"). TVM registers no such rule for CPUs or CUDA, so MetaSchedule printed an "Unknown schedule
    rule" warning per pool kernel and then used its default rules, as it does without the annotation."""
    from tvm import s_tir

    for gv, func in list(mod.functions_items()):
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        sch = s_tir.Schedule(func)
        marked = [b for b in sch.get_child_blocks(sch.get_sblock("root"))
                  if "schedule_rule" in sch.get(b).annotations]
        for block in marked:
            sch.unannotate(block, "schedule_rule")
        if marked:
            mod[gv] = sch.mod["main"]
    return mod


def tuned_o2(mod: tvm.IRModule, target: tvm.target.Target, budget, progress=None):
    """O2 with the tuning database: tune kernels missing from it (within `budget`, possibly none),
    then use each tuned schedule only where it beats the rules. Returns (module, TuningSummary)."""
    from forgeml.compiler import tuning

    mod = tuning_input(mod, target)
    summary = tuning.tune(mod, target, budget, progress)
    winners = tuning.winning_database(mod, target, summary)
    with tuning.tuning_target(target), winners:
        mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
    if target.kind.name == "cuda":
        from forgeml.compiler.gpu import schedule_rest

        return schedule_rest(mod, target), summary
    from forgeml.compiler.schedules import apply_cpu_schedules

    with target:
        mod = apply_cpu_schedules(mod, target)  # every kernel the database did not schedule
        mod = _fold_prepacked_weights()(mod)
    return mod, summary


PIPELINES: dict[str, Pipeline] = {"O0": _o0, "O2": _o2}


def get_pipeline(name: str) -> Pipeline:
    if name not in PIPELINES:
        raise InvalidInput(f"unknown optimization level '{name}'; known: {', '.join(PIPELINES)}")
    return lambda mod, target: _for_target(name, target)(mod, target)


def _for_target(name: str, target: tvm.target.Target) -> Pipeline:
    """The level's pipeline for the target's kind: CUDA targets get the GPU pipelines (gpu.py)."""
    if target.kind.name == "cuda":
        from forgeml.compiler.gpu import GPU_PIPELINES

        return GPU_PIPELINES[name]
    return PIPELINES[name]


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
