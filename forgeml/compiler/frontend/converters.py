"""forgeml's ONNX -> Relax converters that replace TVM's where TVM's importer returns wrong results.

TVM's importer looks its converters up through `onnx_frontend._get_convert_map()` on every node;
`forgeml_converters()` swaps in a map with these overrides for the duration of one import (the installed
TVM files are not touched). Each override follows TVM's `OnnxOpConverter` protocol (`_impl_vNN`), and
raises `Refused` where forgeml will not lower a node: relax_import turns that into one
`UnsupportedOperator` naming the node and the reason.

Fixed: IsInf (detect_positive / detect_negative were ignored), LayerNormalization (Mean and InvStdDev came
back as 0-d zeros), Dropout (the mask was float32, training_mode ignored), BatchNormalization
(training_mode=1 used the running statistics), Mod (floating-point floor mod: 0 * inf made NaNs of
infinite divisors), ConvTranspose (output_shape ignored), SpaceToDepth (mode CRD ignored), Expand (a
run-time target shape replaced the input's dimensions instead of broadcasting with them), Trilu (a
run-time k failed to import: unnormalized mask), Clip (emitted TE kernels that dropped NaN), ThresholdedRelu
(NaN and -inf gave NaN). Refused:
RoiAlign mode=max (TVM's max pooling is not ONNX's max of bilinear samples), Dropout in training mode
with a nonzero or computed ratio (random masks; a ratio given as a graph input is held to 0 at run time).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import tvm
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend
from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

from forgeml.compiler.frontend.attention import FORGEML_CONVERTERS as ATTENTION_CONVERTERS

_ORIGINAL_MAP = onnx_frontend._get_convert_map
_LOCK = threading.RLock()


class Refused(Exception):
    """A node forgeml will not lower; the message says which attribute, input or mode."""


def _const_value(expr: Any, params: Any) -> Any:
    """The numpy value of `expr` if it is a constant at import time, else None."""
    expr = onnx_frontend.get_constant(expr, params)
    return expr.value.numpy() if isinstance(expr, tvm.ir.Constant) else None


def _mode(attr: dict, name: str, default: str) -> str:
    value = attr.get(name, default)
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class IsInf(OnnxOpConverter):
    """IsInf honouring detect_positive / detect_negative."""

    @classmethod
    def _impl_v10(cls, bb, inputs, attr, params):
        x = inputs[0]
        positive, negative = int(attr.get("detect_positive", 1)), int(attr.get("detect_negative", 1))
        inf = relax.op.isinf(x)
        if positive and negative:
            return inf
        if not positive and not negative:
            return relax.op.zeros_like(inf)
        zero = relax.const(0, x.ty.dtype)
        side = relax.op.greater(x, zero) if positive else relax.op.less(x, zero)
        return relax.op.logical_and(inf, side)


class LayerNormalization(OnnxOpConverter):
    """LayerNormalization with its Mean and InvStdDev outputs (shape of X, normalized axes 1), computed in
    float32 (stash_type 1) and returned in X's type as ONNX's reference does; TVM's fused layer_norm
    gives Y. Unused statistics are dropped by dead-code elimination."""

    @classmethod
    def _impl_v17(cls, bb, inputs, attr, params):
        x = inputs[0]
        y = onnx_frontend.LayerNormalization._impl_v17(bb, inputs, dict(attr), params)[0]
        if attr["tvm_custom"]["num_outputs"] == 1:
            return y
        rank, dtype = x.ty.ndim, x.ty.dtype
        axis = int(attr.get("axis", -1))
        axes = list(range(axis % rank, rank))
        stash = "float32" if int(attr.get("stash_type", 1)) == 1 else dtype
        xs = relax.op.astype(x, stash) if stash != dtype else x
        mean = relax.op.mean(xs, axes, keepdims=True)
        centered = relax.op.subtract(xs, mean)
        var = relax.op.mean(relax.op.multiply(centered, centered), axes, keepdims=True)
        eps = relax.const(float(attr.get("epsilon", 1e-5)), stash)
        inv_std = relax.op.rsqrt(relax.op.add(var, eps))
        if stash != dtype:
            mean, inv_std = relax.op.astype(mean, dtype), relax.op.astype(inv_std, dtype)
        return relax.Tuple([y, mean, inv_std])


def _dropout_outputs(x: relax.Expr, attr: dict, mask_dtype: str) -> relax.Expr:
    """Inference-mode Dropout: X unchanged, and (when asked for) a mask of ones."""
    if attr["tvm_custom"]["num_outputs"] == 1:
        return x
    return relax.Tuple([x, relax.op.ones(x.ty.shape, mask_dtype)])


def _is_graph_input(bb: relax.BlockBuilder, expr: Any) -> bool:
    """Whether `expr` is one of the function's parameters (a graph input). TVM 0.27's BlockBuilder keeps
    them in `_func._params`; where that is missing, the answer is False (forgeml then refuses the node)."""
    params = getattr(getattr(bb, "_func", None), "_params", None) or []
    return isinstance(expr, relax.Var) and any(expr.same_as(p) for p in params)


class Dropout(OnnxOpConverter):
    """Dropout: identity with a mask of ones (bool from opset 10, X's type before); from opset 12 in
    training mode only when the ratio is 0: a constant 0, or a graph input the runtime holds to 0
    (onnx_model.dropout_ratio_inputs gives it the range [0, 0]). Any other ratio draws random masks."""

    @classmethod
    def _impl_v7(cls, bb, inputs, attr, params):
        return _dropout_outputs(inputs[0], attr, inputs[0].ty.dtype)

    @classmethod
    def _impl_v10(cls, bb, inputs, attr, params):
        return _dropout_outputs(inputs[0], attr, "bool")

    @classmethod
    def _impl_v12(cls, bb, inputs, attr, params):
        training = inputs[2] if len(inputs) > 2 else None
        if training is not None:
            mode = _const_value(training, params)
            ratio_input = inputs[1] if len(inputs) > 1 else None
            if ratio_input is not None and _is_graph_input(bb, ratio_input):
                return _dropout_outputs(inputs[0], attr, "bool")  # ratio 0, checked at run time
            if mode is None:
                raise Refused("training_mode is given at run time with a ratio that is not a graph input "
                              "(training-mode dropout is random)")
            if bool(mode):
                ratio = _const_value(inputs[1], params) if len(inputs) > 1 and inputs[1] is not None else 0.5
                if ratio is None:
                    raise Refused("training_mode=1 with a ratio given at run time (random masks)")
                if float(ratio) != 0.0:
                    raise Refused(f"training_mode=1 with ratio {float(ratio):g} (random masks)")
        return _dropout_outputs(inputs[0], attr, "bool")


class BatchNormalization(OnnxOpConverter):
    """BatchNormalization; with training_mode=1 normalized by the batch's own statistics (population
    variance), the running statistics updated with `momentum`, as ONNX specifies."""

    @classmethod
    def _impl_v15(cls, bb, inputs, attr, params):
        if not int(attr.get("training_mode", 0)):
            return onnx_frontend.BatchNormalization._impl_v15(bb, inputs, attr, params)
        x, scale, bias, mean, var = inputs[:5]
        dtype = x.ty.dtype
        if {scale.ty.dtype, bias.ty.dtype, mean.ty.dtype, var.ty.dtype} != {dtype}:
            raise Refused("training_mode=1 with inputs of mixed types")
        compute = "float32" if dtype == "float16" else dtype
        xc = relax.op.astype(x, compute) if compute != dtype else x
        rank = x.ty.ndim
        axes = [0, *range(2, rank)]
        batch_mean = bb.emit(relax.op.mean(xc, axes))
        batch_var = bb.emit(relax.op.variance(xc, axes))
        shape = [1, -1] + [1] * (rank - 2)

        def per_channel(v: relax.Expr) -> relax.Expr:
            v = relax.op.astype(v, compute) if compute != dtype else v
            return relax.op.reshape(v, shape)

        eps = relax.const(float(attr.get("epsilon", 1e-5)), compute)
        norm = relax.op.divide(relax.op.subtract(xc, relax.op.reshape(batch_mean, shape)),
                               relax.op.sqrt(relax.op.add(relax.op.reshape(batch_var, shape), eps)))
        y = relax.op.add(relax.op.multiply(norm, per_channel(scale)), per_channel(bias))
        momentum = float(attr.get("momentum", 0.9))
        keep, take = relax.const(momentum, compute), relax.const(1.0 - momentum, compute)

        def running(old: relax.Expr, batch: relax.Expr) -> relax.Expr:
            old = relax.op.astype(old, compute) if compute != dtype else old
            return relax.op.add(relax.op.multiply(old, keep), relax.op.multiply(batch, take))

        outs = [y, running(mean, batch_mean), running(var, batch_var)]
        if compute != dtype:
            outs = [relax.op.astype(o, dtype) for o in outs]
        return relax.Tuple(outs)


class Mod(OnnxOpConverter):
    """Mod. Floating-point fmod=0 is numpy's floor mod built on the truncated remainder: r = fmod(a, b);
    r + b where r is nonzero and its sign differs from b's (so an infinite divisor keeps a finite
    dividend, as numpy and ONNX Runtime do; TVM's a - floor(a / b) * b made NaN of it)."""

    @classmethod
    def _impl_v10(cls, bb, inputs, attr, params):
        a, b = inputs[0], inputs[1]
        floating = isinstance(a, relax.Expr) and "float" in str(a.ty.dtype)
        if int(attr.get("fmod", 0)) == 1 or not floating:
            return onnx_frontend.Mod._impl_v10(bb, inputs, attr, params)
        r = bb.emit(relax.op.mod(a, b))
        zero = relax.const(0, a.ty.dtype)
        differ = relax.op.logical_xor(relax.op.less(r, zero), relax.op.less(b, zero))
        fix = relax.op.logical_and(relax.op.not_equal(r, zero), differ)
        return relax.op.where(fix, relax.op.add(r, b), r)


class ConvTranspose(OnnxOpConverter):
    """ConvTranspose honouring output_shape as ONNX Runtime does: total padding = max(0, natural size -
    output size), split evenly with the odd one at the end for SAME_UPPER (at the start otherwise), and
    any size still missing added as output padding (zeros plus bias at the end). TVM's converter ignored
    output_shape; it does the rest."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        if "output_shape" in attr:
            attr = dict(attr)
            x, w = inputs[0], inputs[1]
            spatial = x.ty.ndim - 2
            sizes = [int(d) for d in x.ty.shape.values[2:]]
            out = [int(d) for d in attr.pop("output_shape")][-spatial:]
            strides = list(attr.get("strides", [1] * spatial))
            dilations = list(attr.get("dilations", [1] * spatial))
            output_padding = list(attr.get("output_padding", [0] * spatial))
            kernel = list(attr.get("kernel_shape", [int(d) for d in w.ty.shape.values[2:]]))
            upper = _mode(attr, "auto_pad", "NOTSET") == "SAME_UPPER"
            begin, end = [], []
            for i in range(spatial):
                natural = strides[i] * (sizes[i] - 1) + output_padding[i] + (kernel[i] - 1) * dilations[i] + 1
                total = max(0, natural - out[i])
                small, large = total // 2, total - total // 2
                begin.append(small if upper else large)
                end.append(large if upper else small)
                output_padding[i] += out[i] - (natural - total)
                if output_padding[i] >= max(strides[i], dilations[i]):
                    raise Refused(f"output_shape {out} needs output padding {output_padding[i]} >= the stride")
            attr.pop("auto_pad", None)
            attr["pads"] = begin + end
            attr["output_padding"] = output_padding
        return onnx_frontend.ConvTranspose._impl_v1(bb, inputs, attr, params)


class RoiAlign(OnnxOpConverter):
    """RoiAlign; mode=max refused (TVM's max differs from ONNX's, the max of the weighted samples)."""

    @classmethod
    def _impl_v10(cls, bb, inputs, attr, params):
        if _mode(attr, "mode", "avg") == "max":
            raise Refused("mode=max")
        return onnx_frontend.RoiAlign._impl_v10(bb, inputs, attr, params)

    @classmethod
    def _impl_v16(cls, bb, inputs, attr, params):
        if _mode(attr, "mode", "avg") == "max":
            raise Refused("mode=max")
        return onnx_frontend.RoiAlign._impl_v16(bb, inputs, attr, params)


class SpaceToDepth(OnnxOpConverter):
    """SpaceToDepth honouring mode (CRD: channel, then row and column offsets; TVM always did DCR)."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        if _mode(attr, "mode", "DCR") != "CRD":
            return onnx_frontend.SpaceToDepth._impl_v1(bb, inputs, attr, params)
        size = int(attr["blocksize"])
        b, c, h, w = inputs[0].ty.shape
        x = relax.op.reshape(inputs[0], (b, c, h // size, size, w // size, size))
        x = relax.op.permute_dims(x, [0, 1, 3, 5, 2, 4])
        return relax.op.reshape(x, (b, c * size * size, h // size, w // size))


class Expand(OnnxOpConverter):
    """Expand with the target shape given at run time: each output dimension is numpy's broadcast of the
    input's and the target's (the target's where the input's is 1, the input's otherwise), with shapes
    right-aligned. TVM broadcast the input to the target shape itself, so [3, 1] expanded by [2, 1, 6]
    came out [2, 1, 6] instead of [2, 3, 6], and a target shorter than the input failed. Constant and
    shape-expression targets keep TVM's converter."""

    @classmethod
    def _impl_v8(cls, bb, inputs, attr, params):
        data, shape = inputs[0], inputs[1]
        if isinstance(shape, relax.ShapeExpr) or _const_value(shape, params) is not None:
            return onnx_frontend.Expand._impl_v13(bb, inputs, attr, params)
        data_shape = list(data.ty.shape)
        if any(not isinstance(d, tvm.tirx.IntImm) for d in data_shape):
            raise Refused(f"input shape {data_shape} is not static and the target shape is given at run time")
        n = int(shape.ty.shape[0])
        as_shape = bb.emit(relax.Call(relax.ExternFunc("vm.builtin.tensor_to_shape"), [shape],
                                      ty_args=[relax.ShapeType(ndim=n)]))
        targets = [tvm.tirx.Var(f"expand_{i}", "int64") for i in range(n)]
        bb.match_cast(as_shape, relax.ShapeType(targets))
        rank = max(n, len(data_shape))
        padded = [tvm.tirx.IntImm("int64", 1)] * (rank - len(data_shape)) + data_shape
        targets = [None] * (rank - n) + targets
        out = [t if int(d) == 1 and t is not None else d for d, t in zip(padded, targets, strict=True)]
        if rank > len(data_shape):
            data = bb.normalize(relax.op.reshape(data, relax.ShapeExpr(padded)))
        return bb.normalize(relax.op.broadcast_to(data, relax.ShapeExpr(out)))

    _impl_v13 = _impl_v8


class Trilu(OnnxOpConverter):
    """Trilu with k given at run time: the row/column mask built from normalized expressions. TVM's
    converter reshaped an unnormalized arange and failed with "The type is not populated" (on a
    zero-size input). A constant or absent k keeps TVM's converter (relax triu/tril)."""

    @classmethod
    def _impl_v14(cls, bb, inputs, attr, params):
        x = inputs[0]
        k = inputs[1] if len(inputs) > 1 else None
        if k is None or not isinstance(k, relax.Expr) or tvm.ir.is_prim_expr(k) or (
                _const_value(k, params) is not None):
            return onnx_frontend.Trilu._impl_v14(bb, inputs, attr, params)
        m, n = x.ty.shape[-2], x.ty.shape[-1]
        rows = bb.normalize(relax.op.reshape(bb.normalize(relax.op.arange(0, m, dtype="int64")), (m, 1)))
        cols = bb.normalize(relax.op.reshape(bb.normalize(relax.op.arange(0, n, dtype="int64")), (1, n)))
        diff = bb.normalize(relax.op.subtract(cols, rows))
        k = bb.normalize(relax.op.astype(k, "int64"))
        compare = relax.op.greater_equal if attr.get("upper", True) else relax.op.less_equal
        mask = bb.normalize(relax.op.broadcast_to(bb.normalize(compare(diff, k)), x.ty.shape))
        return relax.op.where(mask, x, relax.const(0, x.ty.dtype))


class Clip(OnnxOpConverter):
    """Clip as relax.maximum/minimum ops (TVM's emits TE kernels directly, which skip forgeml's NaN-passing
    legalization in compiler/nonfinite.py: Clip(NaN) was the lower bound, ONNX Runtime gives NaN). A missing
    bound is the type's lowest/highest finite value, as the ONNX spec and ONNX Runtime have it (Clip(inf)
    without `max` is 3.4e38; TVM's left it inf)."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        dtype = str(inputs[0].ty.dtype)
        low, high = _finite_range(dtype)
        lo, hi = float(attr.get("min", low)), float(attr.get("max", high))
        return relax.op.minimum(relax.op.maximum(inputs[0], relax.const(lo, dtype)), relax.const(hi, dtype))

    @classmethod
    def _impl_v11(cls, bb, inputs, attr, params):
        x = inputs[0]
        dtype = str(x.ty.dtype)
        low, high = _finite_range(dtype)
        bounds = [inputs[i] if len(inputs) > i and inputs[i] is not None else None for i in (1, 2)]
        if bounds[0] is not None:
            lo = onnx_frontend.Clip._sanitize_nan_clip_bound(bb, bounds[0], for_min=True)
        else:
            lo = None if low is None else relax.const(low, dtype)
        if bounds[1] is not None:
            hi = onnx_frontend.Clip._sanitize_nan_clip_bound(bb, bounds[1], for_min=False)
        else:
            hi = None if high is None else relax.const(high, dtype)
        result = x if lo is None else bb.normalize(relax.op.maximum(x, lo))
        return result if hi is None else bb.normalize(relax.op.minimum(result, hi))


def _finite_range(dtype: str) -> tuple[float | None, float | None]:
    """(lowest, highest) finite value of float16/32/64; no bound (None) for other types (an integer's own
    range clips nothing)."""
    if dtype not in ("float16", "float32", "float64"):
        return None, None
    info = np.finfo(np.dtype(dtype))
    return float(info.min), float(info.max)


class ThresholdedRelu(OnnxOpConverter):
    """x where x > alpha, else 0 (TVM's multiplied x by the comparison: NaN and -inf gave NaN, ONNX 0)."""

    @classmethod
    def _impl_v10(cls, bb, inputs, attr, params):
        x = inputs[0]
        dtype = x.ty.dtype
        above = relax.op.greater(x, relax.const(float(attr.get("alpha", 1.0)), dtype))
        return relax.op.where(above, x, relax.const(0, dtype))


OVERRIDES: dict[str, type] = {
    "IsInf": IsInf, "LayerNormalization": LayerNormalization, "Dropout": Dropout,
    "BatchNormalization": BatchNormalization, "Mod": Mod, "ConvTranspose": ConvTranspose, "RoiAlign": RoiAlign,
    "SpaceToDepth": SpaceToDepth, "Expand": Expand, "Trilu": Trilu, "Clip": Clip,
    "ThresholdedRelu": ThresholdedRelu, **ATTENTION_CONVERTERS,
}


def convert_map() -> dict[str, type]:
    """TVM's converter map with forgeml's overrides."""
    return {**_ORIGINAL_MAP(), **OVERRIDES}


@contextlib.contextmanager
def forgeml_converters() -> Iterator[None]:
    """Within the block, TVM's ONNX importer converts with `convert_map()` (one import at a time)."""
    with _LOCK:
        saved = onnx_frontend._get_convert_map
        onnx_frontend._get_convert_map = convert_map
        try:
            yield
        finally:
            onnx_frontend._get_convert_map = saved
