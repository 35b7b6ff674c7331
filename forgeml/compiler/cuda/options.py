"""The CUDA build options a module carries as IRModule attributes (precision, convolution layout, tensor-core
schedule), so that every pipeline keeps the signature `(mod, target) -> mod`."""

from __future__ import annotations

import tvm

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
    """Mark `mod` for fp16 GEMMs scheduled with "wmma" (dlight's, `wmma.py`) or "mma" (mma.sync
    with a cp.async pipeline, sm_80+, `mma.py`)."""
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
