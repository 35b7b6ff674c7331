"""ONNX -> Relax: TVM's importer with the weights bound as constants (its failures as one line naming the
node, its IR dumps kept off the terminal), and the specs of the imported model's outputs."""

from __future__ import annotations

import contextlib
import gc
import io
import os
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np

from forgeml.errors import ForgeError, InvalidInput, UnsupportedOperator
from forgeml.runtime.artifact import TensorSpec


def import_onnx(loaded) -> Any:
    """ONNX -> Relax with weights bound as constants."""
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from forgeml.compiler.frontend.converters import forgeml_converters

    shapes = {spec.name: list(spec.shape) for spec in loaded.inputs if not spec.dynamic}  # dynamic: dim_params
    dtypes = {spec.name: spec.dtype for spec in loaded.inputs}
    model = small_integer_initializers_as_constants(loaded.model)
    failure = None
    # the importer prints the failing node's inputs as IR (a screenful on a real model), and TVM logs a
    # BlockBuilder warning to fd 2 when the failed import is collected: keep both off the terminal
    with _silenced_output(), forgeml_converters():
        try:
            mod = from_onnx(model, shape_dict=shapes, dtype_dict=dtypes, keep_params_in_input=True)
        except Exception as e:
            failure = e.with_traceback(None) if isinstance(e, ForgeError) else _importer_failure(e, loaded.path.name)
            del e
            gc.collect()
    if failure is not None:
        raise failure
    mod, params = relax.frontend.detach_params(mod)
    func = mod["main"]
    num_input = int(func.attrs["num_input"]) if func.attrs and "num_input" in func.attrs else len(loaded.inputs)
    names = [p.name for p in func.params[num_input:]]
    if params.get("main"):
        mod = relax.transform.BindParams("main", dict(zip(names, params["main"])))(mod)
    return with_dimension_bounds(_shapes_as_tensors(mod), loaded.ranges)


def with_dimension_bounds(mod, ranges: dict[str, tuple[int, int]]):
    """`main` annotated with each dimension variable's bounds (`tir_var_lower_bound`/`tir_var_upper_bound`,
    as TVM's PyTorch importer sets them; its ONNX importer sets none): StaticPlanBlockMemory then plans
    every intermediate buffer once, at its size for the upper bounds, and the arithmetic analyzer knows
    the ranges."""
    if not ranges:
        return mod
    func = mod["main"]
    func = func.with_attr("tir_var_lower_bound", {k: lo for k, (lo, _) in ranges.items()})
    mod["main"] = func.with_attr("tir_var_upper_bound", {k: hi for k, (_, hi) in ranges.items()})
    return mod


_INTEGER_TYPES = {6, 7}  # onnx.TensorProto.INT32, INT64
_SMALL = 64  # elements: positions, axes, shapes, pads; compiler/graph.py keeps constants this small inline too


def small_integer_initializers_as_constants(model):
    """`model` with its small integer initializers given by Constant nodes instead (a copy; `model` itself
    when it has none). The importer is called with the weights kept as parameters, so an initializer is a
    Var to it, and converters that need a constant (SequenceInsert/SequenceErase/SequenceAt positions,
    Unsqueeze axes) refused it ("Position must be a constant") where TVM's plain import saw a constant."""
    import onnx
    from onnx import helper

    small = [t for t in model.graph.initializer
             if t.data_type in _INTEGER_TYPES and int(np.prod(t.dims, dtype=np.int64)) <= _SMALL]
    if not small:
        return model
    result = onnx.ModelProto()
    result.CopyFrom(model)
    names = {t.name for t in small}
    kept = [t for t in result.graph.initializer if t.name not in names]
    del result.graph.initializer[:]
    result.graph.initializer.extend(kept)
    nodes = [helper.make_node("Constant", [], [t.name], value=t, name=f"{t.name}__constant") for t in small]
    nodes += list(result.graph.node)
    del result.graph.node[:]
    result.graph.node.extend(nodes)
    return result


@contextlib.contextmanager
def _silenced_output() -> Iterator[None]:
    """Discard what is written to stdout and stderr (Python and C++ alike) inside the block."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(io.StringIO()):
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def _importer_failure(e: BaseException, file_name: str) -> InvalidInput:
    """The importer's exception as one line naming the node it was converting (from its traceback)."""
    node = None
    tb = e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "_construct_nodes":
            node = tb.tb_frame.f_locals.get("node", node)
        tb = tb.tb_next
    from forgeml.compiler.frontend.converters import Refused

    if isinstance(e, Refused) and node is not None:  # a forgeml converter refused the node: say why
        return UnsupportedOperator({node.op_type: [f"{node.name or node.output[0]}: {e}"]})
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    reason = lines[-1] if lines else type(e).__name__
    at = ""
    if node is not None and hasattr(node, "op_type"):
        at = f" at node '{node.name or node.output[0]}' ({node.op_type})"
    return InvalidInput(f"{file_name}: the TVM ONNX importer failed{at}: {reason}")


def _shapes_as_tensors(mod):
    """`main` returning int64 tensors where it returned Relax shapes: ONNX `Shape` outputs import as
    shape values, which have no dtype or tensor shape and which the VM hands back as a ShapeTuple."""
    from tvm import relax

    func = mod["main"]
    out = func.body.body
    is_tuple = isinstance(out.ty, relax.TupleType)
    items = [relax.TupleGetItem(out, i) for i in range(len(out.ty.fields))] if is_tuple else [out]
    types = list(out.ty.fields) if is_tuple else [out.ty]
    if not any(isinstance(ty, relax.ShapeType) for ty in types):
        return mod
    items = [relax.op.shape_to_tensor(item) if isinstance(ty, relax.ShapeType) else item
             for item, ty in zip(items, types)]
    body = relax.BlockBuilder().normalize(relax.SeqExpr(func.body.blocks, relax.Tuple(items) if is_tuple
                                                        else items[0]))
    mod["main"] = relax.Function(func.params, body, None, func.is_pure, func.attrs)
    return mod


def _sequence_spec(onnx_spec: TensorSpec, ty) -> TensorSpec:
    """A sequence output's spec: it imports as a tuple of tensors of the sequence's element type."""
    from tvm import relax

    elements = list(ty.fields) if isinstance(ty, relax.TupleType) else None
    if elements is None or not all(isinstance(t, relax.TensorType) and t.dtype == onnx_spec.dtype for t in elements):
        raise InvalidInput(f"output '{onnx_spec.name}' is a sequence of {onnx_spec.dtype} tensors but imports as "
                           f"{type(ty).__name__}; forgeml needs it to import as a tuple of such tensors")
    return onnx_spec


def output_specs(mod, onnx_outputs: tuple[TensorSpec, ...]) -> list[TensorSpec]:
    """Each output's spec: Relax's type, with dimensions it leaves open taken from ONNX shape inference
    where that knows them; a dimension known only at run time (NonZero's count) is -1. A sequence output
    (a tuple of tensors in Relax) keeps its element type only."""
    from tvm import relax, tirx

    ret = mod["main"].ret_ty
    fields = list(ret.fields) if len(onnx_outputs) > 1 else [ret]
    specs = []
    for onnx_spec, ty in zip(onnx_outputs, fields):
        name = onnx_spec.name
        if onnx_spec.kind == "sequence":
            specs.append(_sequence_spec(onnx_spec, ty))
            continue
        if not isinstance(ty, relax.TensorType) or ty.ndim < 0:
            what = "tensor of unknown rank" if isinstance(ty, relax.TensorType) else type(ty).__name__
            raise InvalidInput(f"output '{name}' imports as a {what}; forgeml needs every output to be a "
                               "tensor of known rank")
        values = getattr(ty.shape, "values", None) or [None] * ty.ndim
        dims = [int(d) if isinstance(d, tirx.IntImm) else -1 for d in values]
        if len(onnx_spec.shape) == len(dims):
            dims = [o if d < 0 else d for d, o in zip(dims, onnx_spec.shape)]
        specs.append(TensorSpec(name, tuple(dims), str(ty.dtype)))
    return specs
