"""NaN and infinity as ONNX Runtime treats them, in TVM's lowering of max/min-based ops.

TVM lowers a float `max(a, b)` to `a > b ? a : b`, so a NaN in `a` is dropped: Relu(NaN) = 0, Clip(NaN)
= lo, Max(NaN, 0) = 0, and the MLP with one NaN input returned ten finite numbers where ONNX Runtime
returns NaN. Its max/min reductions start from the lowest finite float, so ReduceMax over a row of -inf
gave -3.4e38 (the ONNX Attention function's "fully masked row" test compares that with -inf and got
NaN probabilities instead of zeros). ArgMax/ArgMin skipped NaN (ONNX Runtime and numpy pick the first
NaN), Sign(NaN) was 0.

Importing this module replaces TVM's legalization of those Relax ops (for float dtypes; integers keep
TVM's) with computes that propagate NaN and start reductions from -inf/+inf. Max pooling keeps TVM's
(ONNX Runtime's MaxPool also skips NaN). Each select costs one compare and one blend per element;
measured on the zoo models in benchmarks/results (see ARCHITECTURE.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import tvm
from tvm import relax, te, tirx, topi

_LEVEL = 11  # above TVM's own registrations (level 10)


def _is_float(dtype: str) -> bool:
    """float16/32/64 (TVM's isnan has no bfloat16 or float8 lowering: those keep TVM's kernels)."""
    return str(dtype) in ("float16", "float32", "float64")


def nan_max(a: tirx.PrimExpr, b: tirx.PrimExpr) -> tirx.PrimExpr:
    """max(a, b), NaN if either is NaN."""
    return tirx.Select(tirx.Or(tirx.isnan(b), a < b), b, a)


def nan_min(a: tirx.PrimExpr, b: tirx.PrimExpr) -> tirx.PrimExpr:
    """min(a, b), NaN if either is NaN."""
    return tirx.Select(tirx.Or(tirx.isnan(b), b < a), b, a)


def _broadcast_index(tensor: te.Tensor, index: Sequence, ndim: int) -> list:
    """`index` into an output of rank `ndim`, mapped onto a tensor that broadcasts to it (numpy rules)."""
    offset = ndim - len(tensor.shape)
    return [0 if isinstance(dim, tirx.IntImm) and int(dim) == 1 else index[offset + i]
            for i, dim in enumerate(tensor.shape)]


def _binary(combine: Callable, fallback: Callable) -> Callable:
    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        if not _is_float(call.ty.dtype) or call.ty.shape is None:
            return bb.call_te(fallback, *call.args)
        shape = list(call.ty.shape)

        def compute(a: te.Tensor, b: te.Tensor) -> te.Tensor:
            def element(*index):
                rank = len(shape)
                return combine(a[tuple(_broadcast_index(a, index, rank))], b[tuple(_broadcast_index(b, index, rank))])

            return te.compute(shape, element, name="T_nan_" + fallback.__name__, tag="broadcast")

        for side, arg in enumerate(call.args):
            if isinstance(arg, tvm.ir.expr.GenericConst) and getattr(arg.ty, "ndim", -1) == 0:
                # against a constant scalar (Clip's bounds, a max with 0) the value goes into the kernel: as a
                # 0-d tensor input TVM's pattern analysis calls the op a broadcast, which FuseOps never fuses
                # after a convolution or matmul (only elementwise ops follow those), so every ReLU6 of
                # MobileNetV2 ran as a kernel of its own (zoo mobilenet_v2, 2 threads: 1.43x -> 1.69x ORT)
                value = tirx.const(arg.value.numpy().item(), call.ty.dtype)
                other = call.args[1 - side]

                def scalar_compute(x: te.Tensor, value=value, side=side) -> te.Tensor:
                    return te.compute(x.shape, lambda *i: combine(*((x[i], value) if side else (value, x[i]))),
                                      name="T_nan_" + fallback.__name__, tag="elemwise")

                if list(other.ty.shape) == shape:
                    return bb.call_te(scalar_compute, other, primfunc_name_hint=fallback.__name__)
        return bb.call_te(compute, *call.args, primfunc_name_hint=fallback.__name__)

    return legalize


def _elementwise(element: Callable, fallback: Callable) -> Callable:
    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        if not _is_float(call.ty.dtype):
            return bb.call_te(fallback, call.args[0])
        return bb.call_te(lambda x: te.compute(x.shape, lambda *i: element(x[i]), name="T_" + fallback.__name__,
                                               tag="elemwise"), call.args[0], primfunc_name_hint=fallback.__name__)

    return legalize


def _relu(v: tirx.PrimExpr) -> tirx.PrimExpr:
    return tirx.Select(v < tirx.const(0, v.dtype), tirx.const(0, v.dtype), v)


def _sign(v: tirx.PrimExpr) -> tirx.PrimExpr:
    one, zero = tirx.const(1, v.dtype), tirx.const(0, v.dtype)
    return tirx.Select(v > zero, one, tirx.Select(v < zero, -one, tirx.Select(v == zero, zero, v)))


def _clip(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    x, lo, hi = call.args
    if not _is_float(call.ty.dtype):
        return bb.call_te(topi.clip, x, lo, hi)

    def compute(x: te.Tensor, lo: tirx.PrimExpr, hi: tirx.PrimExpr) -> te.Tensor:
        def element(*i):
            v = x[i]
            low, high = tirx.Cast(v.dtype, lo), tirx.Cast(v.dtype, hi)
            return tirx.Select(v < low, low, tirx.Select(v > high, high, v))

        return te.compute(x.shape, element, name="T_clip", tag="elemwise")

    return bb.call_te(compute, x, lo, hi, primfunc_name_hint="clip")


def _reduce_axes(call: relax.Call, ndim: int) -> list[int]:
    axis = call.attrs.axis
    if axis is None:
        return list(range(ndim))
    axes = [int(a) for a in axis] if isinstance(axis, (list, tuple)) or hasattr(axis, "__len__") else [int(axis)]
    return sorted(a % ndim for a in axes)


def _reduction(combine: Callable, start: float, fallback: Callable) -> Callable:
    """relax.max / relax.min: NaN-propagating, starting from -inf (max) or +inf (min)."""

    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        x = call.args[0]
        if not _is_float(call.ty.dtype):
            return bb.call_te(fallback, x, call.attrs.axis, call.attrs.keepdims)
        axes, keepdims = _reduce_axes(call, x.ty.ndim), bool(call.attrs.keepdims)
        reducer = te.comm_reducer(combine, lambda dtype: tirx.const(start, dtype), name="nan_" + fallback.__name__)

        def compute(data: te.Tensor) -> te.Tensor:
            rk = {a: te.reduce_axis((0, data.shape[a]), name=f"k{a}") for a in axes}
            kept = [a for a in range(len(data.shape)) if a not in rk]
            shape = [1 if a in rk else data.shape[a] for a in range(len(data.shape))] if keepdims else \
                [data.shape[a] for a in kept]

            def element(*index):
                it = iter(index)
                full = [rk[a] if a in rk else None for a in range(len(data.shape))]
                for a in range(len(data.shape)):
                    if keepdims:
                        value = next(it)
                        full[a] = rk[a] if a in rk else value
                    elif a not in rk:
                        full[a] = next(it)
                return reducer(data[tuple(full)], axis=list(rk.values()))

            return te.compute(shape, element, name="T_" + fallback.__name__, tag="comm_reduce")

        return bb.call_te(compute, x, primfunc_name_hint=fallback.__name__)

    return legalize


def _arg_reduction(better: Callable, worst: float, fallback: Callable) -> Callable:
    """relax.argmax / relax.argmin: the first index of the largest (smallest) value, where NaN beats
    every number (ONNX Runtime and numpy)."""

    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        x = call.args[0]
        if not _is_float(x.ty.dtype):
            return bb.call_te(fallback, x, call.attrs.axis, call.attrs.keepdims)
        axes, keepdims = _reduce_axes(call, x.ty.ndim), bool(call.attrs.keepdims)
        out_dtype = call.ty.dtype

        def combine(lhs, rhs):
            left_wins = better(lhs[1], rhs[1])
            tie = tirx.Not(tirx.Or(left_wins, better(rhs[1], lhs[1])))
            keep = tirx.Or(left_wins, tirx.And(tie, lhs[0] <= rhs[0]))
            return tirx.Select(keep, lhs[0], rhs[0]), tirx.Select(keep, lhs[1], rhs[1])

        def identity(index_dtype, value_dtype):
            # a value no element loses to, at an index no element loses a tie to
            return tirx.max_value(index_dtype), tirx.const(worst, value_dtype)

        reducer = te.comm_reducer(combine, identity, name="nan_" + fallback.__name__)

        def compute(data: te.Tensor) -> te.Tensor:
            rk = {a: te.reduce_axis((0, data.shape[a]), name=f"k{a}") for a in axes}
            shape = [1 if a in rk else data.shape[a] for a in range(len(data.shape)) if keepdims or a not in rk]

            def element(*index):
                it = iter(index)
                full = []
                for a in range(len(data.shape)):
                    value = next(it) if keepdims or a not in rk else None
                    full.append(rk[a] if a in rk else value)
                flat = tirx.const(0, out_dtype)
                for a in axes:  # the position along the reduced axes, row-major
                    flat = flat * tirx.Cast(out_dtype, data.shape[a]) + tirx.Cast(out_dtype, rk[a])
                return reducer((flat, data[tuple(full)]), axis=list(rk.values()))

            return te.compute(shape, element, name="T_" + fallback.__name__, tag="comm_reduce_idx")[0]

        return bb.call_te(compute, x, primfunc_name_hint=fallback.__name__)

    return legalize


def _argmax_better(a, b):
    return tirx.Or(tirx.And(tirx.isnan(a), tirx.Not(tirx.isnan(b))), a > b)


def _argmin_better(a, b):
    return tirx.Or(tirx.And(tirx.isnan(a), tirx.Not(tirx.isnan(b))), a < b)


def register() -> None:
    """Install the legalizations (idempotent; TVM keeps the highest level)."""
    for op, legalize in {
        "relax.nn.relu": _elementwise(_relu, topi.nn.relu),
        "relax.sign": _elementwise(_sign, topi.sign),
        "relax.maximum": _binary(nan_max, topi.maximum),
        "relax.minimum": _binary(nan_min, topi.minimum),
        "relax.clip": _clip,
        "relax.max": _reduction(nan_max, float("-inf"), topi.max),
        "relax.min": _reduction(nan_min, float("inf"), topi.min),
        "relax.argmax": _arg_reduction(_argmax_better, float("-inf"), topi.argmax),
        "relax.argmin": _arg_reduction(_argmin_better, float("inf"), topi.argmin),
    }.items():
        tvm.ir.register_op_attr(op, "FLegalize", legalize, level=_LEVEL)


register()
