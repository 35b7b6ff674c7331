"""float16 models on the CPU: computed in float32 throughout, rounded to float16 where the graph hands a
tensor over in float16 (its outputs, and ops forgeml leaves in float16).

TVM computes a float16 matmul, convolution, softmax or exp in float16: sums accumulate in float16 and the
fast exp polynomial runs at float16 precision. ONNX Runtime's CPU kernels compute in float32 and, where
it inserts casts around ops that lack a float16 kernel, removes the float32 -> float16 -> float32 pairs
between them, so a chain of float16 ops rounds once at its end. On the conformance suite's float16 cases
TVM's way was off by a few ulp, beyond the suite's rtol 1e-3 (CausalConvWithState silu fp16: 9 of 64
outputs, max 1.6e-3 relative). Rounding after every op, as the ONNX reference does, still left 2 of 192
Attention fp16 outputs 2 ulp off the reference (max abs error to a float64 computation 4.0e-4, the
reference's own 5.0e-4, ONNX Runtime's 2.4e-4); rounding once matches ONNX Runtime (1 of 192 differs by
an ulp) and passes. x86 CPUs have no float16 arithmetic (LLVM widens each op to float32 anyway).
"""

from __future__ import annotations

import tvm
from tvm import relax

# ops left as they are: casts themselves, calls into kernels and packed functions (their signatures are fixed)
_KEEP = {"relax.astype", "relax.wrap_param", "relax.shape_of", "relax.print", "relax.assert_op"}
_NOT_FIELDS = {"get_int", "get_int_tuple", "get_str", "same_as", "id_", "is_"}


def _is_half(expr: relax.Expr) -> bool:
    ty = expr.ty
    return isinstance(ty, relax.TensorType) and str(ty.dtype) == "float16"


def _widened_attrs(attrs):
    """`attrs` with an out_dtype of float16 set to float32 (the op then returns float32)."""
    if attrs is None or str(getattr(attrs, "out_dtype", None)) != "float16":
        return attrs
    fields = {k: getattr(attrs, k) for k in dir(attrs) if not k.startswith("_") and k not in _NOT_FIELDS}
    fields["out_dtype"] = "float32"
    return tvm.ir.make_node(type(attrs).__name__ if "." in type(attrs).__name__ else
                            f"relax.attrs.{type(attrs).__name__}", **fields)


def _dtype(expr: relax.Expr) -> str | None:
    return str(expr.ty.dtype) if isinstance(expr.ty, relax.TensorType) else None


@relax.expr_functor.mutator
class _Widen(relax.PyExprMutator):
    def visit_call_(self, call):  # noqa: N802 (TVM's visitor naming)
        call = self.visit_expr_post_order(call)
        op = call.op
        if not isinstance(op, tvm.ir.Op) or op.name in _KEEP or op.name.startswith("relax.call_") or \
                not any(_is_half(a) for a in call.args):
            return call
        args = [self._wide(a) if _is_half(a) else a for a in call.args]
        try:
            wide = self.builder_.normalize(relax.Call(op, args, _widened_attrs(call.attrs), call.ty_args))
        except tvm.TVMError:  # an op that insists on float16 operands: leave it
            return call
        if _dtype(call) == "float16" and _dtype(wide) == "float32":
            return relax.op.astype(wide, "float16")
        if _dtype(call) is not None and _dtype(wide) == _dtype(call):  # comparisons, indices
            return wide
        return call

    def _wide(self, arg: relax.Expr) -> relax.Expr:
        """`arg` in float32: the float32 value it was rounded from, where the rounding is one of this pass's
        or any float32 -> float16 cast (ONNX Runtime 1.32 drops those too: Cast(to fp16) -> Softmax ->
        Cast(to fp32) returns the unrounded float32 softmax; a lone Cast pair, whose consumer is a cast
        here too, keeps its rounding in both), else a cast."""
        value = self.lookup_binding(arg) if isinstance(arg, relax.Var) else arg
        if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) and value.op.name == "relax.astype" \
                and _dtype(value.args[0]) == "float32":
            return value.args[0]
        return relax.op.astype(arg, "float32")


def compute_float16_in_float32() -> tvm.transform.Pass:
    """Every op on float16 tensors computed on float32 ones, a float16 result rounded from the float32 one
    and consumers of it reading the float32 value."""

    @tvm.transform.module_pass(opt_level=0, name="ForgemlFloat16InFloat32")
    def transform(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        widen = _Widen(mod)
        for gv, func in list(mod.functions_items()):
            if isinstance(func, relax.Function):
                mod[gv] = widen.visit_expr(func)
        return mod

    return transform
