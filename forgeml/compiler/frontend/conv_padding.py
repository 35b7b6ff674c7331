"""Convolution padding as the Conv's own `pads`: ONNX -> ONNX, before TVM's importer.

Two exporter idioms left a separate padding copy in front of convolutions:

- `auto_pad="SAME_UPPER"/"SAME_LOWER"` (torch's `padding="same"`: every conv of HF EfficientNet): TVM's
  importer turns it into an explicit pad kernel, even for a 1x1 conv whose padding is zero (a full copy
  of the activation per conv).
- a `Pad` node of zeros feeding a Conv (HF MobileNetV2's TF-"same" padding pads before every conv,
  zero widths before the 1x1s; EfficientNet's stride-2 `ZeroPad2d`).

Either way the pad became a stage fused onto the end of the producing conv's kernel, which the conv
rules could not schedule (a write shaped unlike the conv's output), so those convs fell to the generic
rule: on a 2-core Zen 4, HF MobileNetV2's four stride-2 expansion convs took 5.5 ms of 10.2. With the
padding in the Conv's `pads`, the conv kernel pads its own input (a depthwise conv in the channel-blocked
copy it makes anyway) and the producer keeps its plain elementwise epilogue.

Rewritten only where exact: constant-mode Pads of zeros with constant pads, only on the two spatial axes,
non-negative, whose every consumer is a 2-D Conv reading it as data; auto_pad where the input's spatial
shape is known. The verification still runs against the user's original file.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

_ONNX_DOMAINS = ("", "ai.onnx")


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _set_attr(node: onnx.NodeProto, name: str, value) -> None:
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(kept)
    if value is not None:
        node.attribute.append(onnx.helper.make_attribute(name, value))


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Values of the graph's initializers and Constant nodes (`value` form) by name."""
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in _ONNX_DOMAINS:
            value = _attr(node, "value")
            if value is not None:
                values[node.output[0]] = numpy_helper.to_array(value)
    return values


def _spatial_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Static shapes of the 4-D tensors onnx's shape inference knows."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001 (an invalid model: leave auto_pad to the importer)
        return {}
    shapes = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info]:
        dims = vi.type.tensor_type.shape.dim
        if len(dims) == 4 and all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = [d.dim_value for d in dims]
    return shapes


def _is_conv2d(node: onnx.NodeProto) -> bool:
    return node.op_type == "Conv" and node.domain in _ONNX_DOMAINS


def _explicit_same_pads(node: onnx.NodeProto, shape: list[int]) -> list[int] | None:
    """The pads ONNX defines for a Conv's SAME_UPPER/SAME_LOWER auto_pad on an input of `shape`."""
    mode = _attr(node, "auto_pad", b"NOTSET")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    kernel = _attr(node, "kernel_shape")
    if mode not in ("SAME_UPPER", "SAME_LOWER") or kernel is None or len(kernel) != 2:
        return None
    strides = _attr(node, "strides", [1, 1])
    dilations = _attr(node, "dilations", [1, 1])
    begin, end = [], []
    for size, k, s, d in zip(shape[2:], kernel, strides, dilations, strict=True):
        total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small = total // 2
        begin.append(small if mode == "SAME_UPPER" else total - small)
        end.append(total - begin[-1])
    return begin + end


def _zero_spatial_pads(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> list[int] | None:
    """[top, left, bottom, right] of a constant-mode Pad of zeros on the spatial axes of a 4-D tensor."""
    if node.op_type != "Pad" or node.domain not in _ONNX_DOMAINS or len(node.input) < 2:
        return None
    mode = _attr(node, "mode", b"constant")
    if (mode.decode() if isinstance(mode, bytes) else mode) != "constant":
        return None
    if len(node.input) > 3 and node.input[3]:
        return None  # axes given: rare, and not needed by the exporters seen
    pads = constants.get(node.input[1])
    value = constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(())
    if pads is None or value is None or pads.shape != (8,) or np.any(np.asarray(value) != 0):
        return None
    pads = [int(p) for p in pads]
    if any(pads[i] for i in (0, 1, 4, 5)) or min(pads) < 0:
        return None
    return [pads[2], pads[3], pads[6], pads[7]]


def fold_conv_padding(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """`model` with SAME auto_pads made explicit and zero Pads folded into the Convs they feed; returns
    (the model, or `model` itself when nothing applies, and the number of Convs rewritten)."""
    nodes = list(model.graph.node)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in model.graph.output}
    constants = None
    shapes = None
    out = None
    rewritten = 0

    def writable() -> onnx.ModelProto:
        nonlocal out
        if out is None:
            out = onnx.ModelProto()
            out.CopyFrom(model)
        return out

    for i, node in enumerate(nodes):
        if _is_conv2d(node) and _attr(node, "auto_pad", b"NOTSET") in (b"SAME_UPPER", b"SAME_LOWER"):
            shapes = _spatial_shapes(model) if shapes is None else shapes
            pads = _explicit_same_pads(node, shapes[node.input[0]]) if node.input[0] in shapes else None
            if pads is not None:
                conv = writable().graph.node[i]
                _set_attr(conv, "auto_pad", None)
                _set_attr(conv, "pads", pads)
                rewritten += 1
        elif node.op_type == "Pad" and node.output[0] not in outputs:
            constants = _constants(model) if constants is None else constants
            spatial = _zero_spatial_pads(node, constants)
            users = consumers.get(node.output[0], [])
            if spatial is None or not users or not all(
                    _is_conv2d(u) and u.input[0] == node.output[0] and list(u.input).count(node.output[0]) == 1
                    and _attr(u, "auto_pad", b"NOTSET") in (b"NOTSET", b"VALID") for u in users):
                continue
            graph = writable().graph
            for user in users:
                j = nodes.index(user)
                conv = graph.node[j]
                own = _attr(conv, "pads", [0, 0, 0, 0]) if _attr(conv, "auto_pad", b"NOTSET") == b"NOTSET" else [0] * 4
                _set_attr(conv, "auto_pad", None)
                _set_attr(conv, "pads", [a + b for a, b in zip(own, spatial, strict=True)])
                conv.input[0] = node.input[0]
                rewritten += 1
    if out is None:
        return model, 0
    pads_left = {n.output[0] for n in out.graph.node if n.op_type == "Pad"}
    used = {name for n in out.graph.node for name in n.input} | outputs
    kept = [n for n in out.graph.node if not (n.op_type == "Pad" and n.output[0] in pads_left
                                               and n.output[0] not in used)]
    del out.graph.node[:]
    out.graph.node.extend(kept)
    return out, rewritten
