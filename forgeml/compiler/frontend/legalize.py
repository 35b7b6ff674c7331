"""ONNX -> ONNX rewrites before TVM's importer sees a model.

* Constant nodes given by `value_float(s)`, `value_int(s)`, `value_string(s)` or `sparse_value` become the
  `value` tensor form, the only one TVM's importer reads ("no value in Constant" otherwise). Every
  function-expanded ONNX model (onnxscript, the `*_expanded` conformance cases) writes scalars that way.
* Operators TVM's importer lacks but ONNX defines as functions (SoftmaxCrossEntropyLoss,
  NegativeLogLikelihoodLoss, CenterCropPad, Celu, the window functions ...; plain or context-dependent
  function bodies) are replaced by their bodies with onnx's inliner, repeatedly, since a body may call
  another such operator (SoftmaxCrossEntropyLoss calls NegativeLogLikelihoodLoss).

A model that needs neither comes back as the same object.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import numpy as np
import onnx
from onnx import helper, numpy_helper

_ONNX_DOMAINS = ("", "ai.onnx")
_ROUNDS = 8  # function bodies calling function ops, nested this deep at most
_CONSTANT_FORMS = ("value_float", "value_floats", "value_int", "value_ints", "value_string", "value_strings",
                   "sparse_value")


def onnx_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain opset version."""
    return max((o.version for o in model.opset_import if o.domain in _ONNX_DOMAINS), default=1)


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of `graph` and of the subgraphs (If/Loop/Scan bodies) inside it."""
    for node in graph.node:
        yield node
        for sub in _subgraphs(node):
            yield from _all_nodes(sub)


def _sparse_to_dense(sparse: onnx.SparseTensorProto) -> onnx.TensorProto:
    """A sparse tensor as the dense tensor it stands for (zeros where no value is given)."""
    values = numpy_helper.to_array(sparse.values)
    dense = np.zeros(int(np.prod(sparse.dims, dtype=np.int64)), dtype=values.dtype)
    if values.size:
        indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
        flat = indices if indices.ndim == 1 else np.ravel_multi_index(tuple(indices.T), tuple(sparse.dims))
        dense[flat] = values
    return numpy_helper.from_array(dense.reshape(tuple(sparse.dims)))


def _constant_value(attr: onnx.AttributeProto) -> onnx.TensorProto:
    """The `value` tensor equivalent to a Constant's `value_*` / `sparse_value` attribute."""
    name = attr.name
    if name == "value_float":
        return helper.make_tensor("value", onnx.TensorProto.FLOAT, [], [attr.f])
    if name == "value_floats":
        return helper.make_tensor("value", onnx.TensorProto.FLOAT, [len(attr.floats)], list(attr.floats))
    if name == "value_int":
        return helper.make_tensor("value", onnx.TensorProto.INT64, [], [attr.i])
    if name == "value_ints":
        return helper.make_tensor("value", onnx.TensorProto.INT64, [len(attr.ints)], list(attr.ints))
    if name == "value_string":
        return helper.make_tensor("value", onnx.TensorProto.STRING, [], [attr.s])
    if name == "value_strings":
        return helper.make_tensor("value", onnx.TensorProto.STRING, [len(attr.strings)], list(attr.strings))
    tensor = _sparse_to_dense(attr.sparse_tensor)
    tensor.name = "value"
    return tensor


def _needs_value_form(node: onnx.NodeProto) -> bool:
    return (node.op_type == "Constant" and node.domain in _ONNX_DOMAINS
            and any(a.name in _CONSTANT_FORMS for a in node.attribute))


def constants_to_value_form(model: onnx.ModelProto) -> int:
    """Rewrite, in place, every Constant node not in the `value` tensor form into it; returns how many."""
    count = 0
    for node in _all_nodes(model.graph):
        if not _needs_value_form(node):
            continue
        attr = next(a for a in node.attribute if a.name in _CONSTANT_FORMS)
        value = helper.make_attribute("value", _constant_value(attr))
        del node.attribute[:]
        node.attribute.append(value)
        count += 1
    return count


def _has_function(op_type: str, opset: int) -> bool:
    """Whether ONNX defines `op_type` (default domain) at `opset` by a function body."""
    try:
        schema = onnx.defs.get_schema(op_type, opset, "")
    except onnx.defs.SchemaError:
        return False
    return bool(schema.has_function or schema.has_context_dependent_function)


def _to_expand(model: onnx.ModelProto, supported: set[str]) -> set[str]:
    """Default-domain op types in `model` the importer lacks (not in `supported`) that ONNX defines by a
    function at the model's opset."""
    opset = onnx_opset(model)
    return {node.op_type for node in _all_nodes(model.graph)
            if node.domain in _ONNX_DOMAINS and node.op_type not in supported and _has_function(node.op_type, opset)}


def expand_functions(model: onnx.ModelProto, supported: set[str]) -> tuple[onnx.ModelProto, dict[str, int]]:
    """`model` with every node of a type the importer lacks (not in `supported`) that ONNX defines by a
    function replaced by its function body, recursively; plus op type -> nodes expanded. `model` itself
    is returned (unchanged) when there is nothing to expand."""
    expanded: Counter = Counter()
    failed: set[str] = set()  # op types whose bodies onnx cannot inline here: left for the unsupported report
    for _ in range(_ROUNDS):
        ops = _to_expand(model, supported) - failed
        if not ops:
            break
        before = _count(model, ops)
        result, unexpandable = _inline(model, ops)
        failed |= unexpandable
        after = _count(result, ops)
        if sum(after.values()) >= sum(before.values()):  # no body could be built (e.g. input types unknown)
            if unexpandable:
                continue
            break
        expanded.update(before - after)
        model = result
    return model, dict(expanded)


def _inline(model: onnx.ModelProto, ops: set[str]) -> tuple[onnx.ModelProto, set[str]]:
    """`model` with the nodes of `ops` replaced by their function bodies, and the op types whose bodies
    onnx's inliner failed to build (it raised "GetType: Assertion false failed: Type unknown" on
    LinearAttention and CausalConvWithState with a past state): those it leaves as they are."""
    import onnx.inliner

    def inline(m: onnx.ModelProto, selected: set[str]) -> onnx.ModelProto:
        return onnx.inliner.inline_selected_functions(
            _typed(m), [(domain, op) for op in sorted(selected) for domain in _ONNX_DOMAINS],
            inline_schema_functions=True)

    try:
        return inline(model, ops), set()
    except Exception:  # noqa: BLE001 (onnx's C++ checks raise RuntimeError, its Python ones others)
        pass
    failed = set()
    for op in sorted(ops):  # one op type at a time, keeping the ones that inline
        try:
            model = inline(model, {op})
        except Exception:  # noqa: BLE001
            failed.add(op)
    return model, failed


def _count(model: onnx.ModelProto, ops: set[str]) -> Counter:
    return Counter(n.op_type for n in _all_nodes(model.graph) if n.domain in _ONNX_DOMAINS and n.op_type in ops)


def _typed(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with its intermediate values typed where ONNX shape inference can (context-dependent function
    bodies depend on their inputs' types); `model` itself if inference fails."""
    try:
        return onnx.shape_inference.infer_shapes(model)
    except Exception:  # an invalid model is reported later by the checker or the importer
        return model


def legalize(model: onnx.ModelProto, supported: set[str]) -> tuple[onnx.ModelProto, dict[str, int], int]:
    """Expand function ops the importer lacks and put Constants in the `value` form.
    Returns the model (a copy if anything changed, else `model` itself), op type -> nodes expanded, and
    the number of Constant nodes rewritten."""
    result, expanded = expand_functions(model, supported)
    if result is model and not any(_needs_value_form(n) for n in _all_nodes(model.graph)):
        return model, expanded, 0
    if result is model:
        result = onnx.ModelProto()
        result.CopyFrom(model)
    return result, expanded, constants_to_value_form(result)
