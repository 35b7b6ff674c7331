"""ONNX in: load, check, infer shapes, fix input shapes, and report unsupported operators early."""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import shape_inference

from forgeml.errors import InvalidInput, UnsupportedOperator
from forgeml.runtime.artifact import DynamicDim, TensorSpec
from forgeml.shapes import InputShapes, format_dim

_ONNX_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class LoadedModel:
    """An ONNX model that passed the checker, with every input and output shape fixed."""

    model: onnx.ModelProto
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    sha256: str
    path: Path
    ranges: dict[str, tuple[int, int]] = field(default_factory=dict)  # dimension variable -> (low, high)


# element types forgeml cannot compile: TVM packs them below a byte (numpy/ml_dtypes use a byte each, so
# no buffer can cross), its LLVM code generator does not lower them, or its float8 casts round
# differently from ONNX (FNUZ, saturation, e8m0: wrong values the conformance suite shows, which ONNX
# Runtime's Python API cannot check); float6 has no numpy type at all
_UNSUPPORTED_DTYPES = {"int4", "uint4", "int2", "uint2", "float4_e2m1fn", "float6_e2m3fn", "float6_e3m2fn",
                       "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu"}
# ... except as graph inputs: float8 e8m0 values are powers of two, which every wider float holds exactly, so
# reading them (Cast to float, as the conformance cases do) is exact; producing them still rounds wrongly
_READABLE_DTYPES = {"float8_e8m0fnu"}
# operators TVM's importer converts but whose kernels give wrong results (NonMaxSuppression: the selected
# boxes' count and order differ from ONNX on the conformance cases)
_WRONG_OPS = {"NonMaxSuppression"}


def _dtype_of(elem_type: int, what: str = "a tensor", read_only: bool = False) -> str:
    """The numpy dtype name of an ONNX element type; InvalidInput for types forgeml cannot compile
    (`read_only`: the value is a graph input, never computed)."""
    try:
        name = str(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, ValueError):
        name = None
    if read_only and name in _READABLE_DTYPES:
        return name
    if name is None or name in _UNSUPPORTED_DTYPES or name in ("object", "complex64", "complex128"):
        label = onnx.TensorProto.DataType.Name(elem_type) if elem_type in onnx.TensorProto.DataType.values() \
            else str(elem_type)
        raise InvalidInput(f"{what} has element type {label}, which forgeml cannot compile")
    return name


def _check_types(model: onnx.ModelProto) -> None:
    """Refuse, naming the value, graph inputs and outputs that are not tensors (sequences, optionals,
    maps) or whose element type forgeml cannot compile, and Cast/CastLike nodes to such a type."""
    graph = model.graph
    for kind, values in (("input", _graph_inputs(model)), ("output", graph.output)):
        for value in values:
            field = value.type.WhichOneof("value")
            if kind == "output" and _is_tensor_sequence(value):  # a list of tensors: the manifest's "sequence"
                elem_type = value.type.sequence_type.elem_type.tensor_type.elem_type
                if elem_type:
                    _dtype_of(elem_type, f"graph output '{value.name}' (a sequence)")
                continue
            if field != "tensor_type":
                what = (field or "untyped_value").replace("_type", "").replace("_", " ")
                article = "an" if what[0] in "aeiou" else "a"
                raise InvalidInput(f"graph {kind} '{value.name}' is {article} {what}; forgeml "
                                   "compiles tensor inputs and tensor or sequence-of-tensor outputs only "
                                   "(no sequence inputs, optionals or maps)")
            if value.type.tensor_type.elem_type:  # 0: not given (shape inference fills it in)
                _dtype_of(value.type.tensor_type.elem_type, f"graph {kind} '{value.name}'", kind == "input")
    for i, node in enumerate(graph.node):
        if node.op_type in ("Cast", "QuantizeLinear") and node.domain in _ONNX_DOMAINS:
            to = next((a.i for a in node.attribute if a.name in ("to", "output_dtype")), None)
            if to:
                _dtype_of(to, f"node '{node.name or f'#{i}'}' ({node.op_type})'s target")


def _optional_inputs_as_tensors(model: onnx.ModelProto) -> None:
    """Give graph inputs of type optional(tensor) their tensor type: forgeml compiles them as present
    (OptionalHasElement is then true, OptionalGetElement the tensor, as TVM's importer converts them);
    the runtime refuses None for them by name. Optional sequences stay optional (and are refused)."""
    for value in _graph_inputs(model):
        if value.type.WhichOneof("value") == "optional_type" and \
                value.type.optional_type.elem_type.WhichOneof("value") == "tensor_type":
            tensor = onnx.TypeProto()
            tensor.CopyFrom(value.type.optional_type.elem_type)
            value.type.CopyFrom(tensor)


def _is_tensor_sequence(value: onnx.ValueInfoProto) -> bool:
    """Whether `value` is a sequence of tensors."""
    return value.type.WhichOneof("value") == "sequence_type" and \
        value.type.sequence_type.elem_type.WhichOneof("value") == "tensor_type"


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Real inputs: graph inputs that are not also initializers (old exporters list weights too)."""
    weights = {init.name for init in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in weights]


def _drop_weight_inputs(model: onnx.ModelProto) -> None:
    """Remove graph inputs that have an initializer: weights, not user inputs. Exporters before ONNX IR 4
    (the classic model zoo) list every weight as an input too; the importer then made two parameters of
    one name ("Function contains multiple parameters with name ...")."""
    weights = {init.name for init in model.graph.initializer}
    kept = [i for i in model.graph.input if i.name not in weights]
    if len(kept) != len(model.graph.input):
        del model.graph.input[:]
        model.graph.input.extend(kept)
        model.ir_version = max(model.ir_version, 4)  # IR 4 lets initializers be more than input defaults


def _read_model(path: Path) -> tuple[onnx.ModelProto, str]:
    if not path.exists():
        raise InvalidInput(f"model file not found: {path}")
    if path.is_dir():
        raise InvalidInput(f"model path is a directory, not an ONNX file: {path}")
    data = path.read_bytes()
    try:
        model = onnx.load_from_string(data)
    except Exception as e:  # protobuf raises DecodeError, RuntimeWarning, ... on junk
        raise InvalidInput(f"{path} is not a readable ONNX model ({type(e).__name__}: {e})") from None
    if not model.graph.node and not model.graph.output:
        raise InvalidInput(f"{path} is not an ONNX model (no graph found; truncated or another format?)")
    _load_external_data(model, path)
    return model, hashlib.sha256(data).hexdigest()


def _load_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Read weights saved beside the model (`save_as_external_data`) from the model's folder, as ONNX
    specifies, not from the working directory."""
    from onnx import external_data_helper

    folder = path.resolve().parent
    for tensor in model.graph.initializer:
        if not external_data_helper.uses_external_data(tensor):
            continue
        location = external_data_helper.ExternalDataInfo(tensor).location
        if not (folder / location).is_file():
            raise InvalidInput(f"{path}: weight '{tensor.name}' is stored in '{location}', which is not a file "
                               f"in the model's folder {folder}")
    try:
        external_data_helper.load_external_data_for_model(model, str(folder))
    except Exception as e:  # onnx raises ValidationError, OSError, ... on bad locations or offsets
        raise InvalidInput(f"{path}: cannot read its external data: {str(e).strip().splitlines()[0]}") from None


def _fix_input_shapes(model: onnx.ModelProto, input_shapes: InputShapes, path: Path) -> dict[str, tuple[int, int]]:
    """Write user-given shapes into the graph; refuse any dimension still symbolic. A range `A..B` keeps the
    dimension symbolic under its ONNX dim_param (or `<input>_dim<axis>` where it had none), so that axes
    sharing a dim_param stay one variable. Returns variable -> (low, high)."""
    inputs = {i.name: i for i in _graph_inputs(model)}
    for name in input_shapes:
        if name not in inputs:
            raise InvalidInput(f"--input-shape names '{name}', but the model's inputs are: {', '.join(inputs)}")
    ranges: dict[str, tuple[int, int]] = {}
    given: dict[str, str] = {}  # variable -> the input axis whose range set it
    pinned: dict[str, str] = {}  # dim_param -> the input axis pinned to a size
    for name, shape in input_shapes.items():
        dims = inputs[name].type.tensor_type.shape.dim
        if len(shape) != len(dims):
            raise InvalidInput(
                f"--input-shape {name} has rank {len(shape)}, but the model's input '{name}' has rank {len(dims)}"
            )
        for axis, (dim, size) in enumerate(zip(dims, shape)):
            if not isinstance(size, tuple):
                if dim.dim_param:
                    pinned.setdefault(dim.dim_param, f"'{name}' axis {axis}")
                dim.ClearField("dim_param")
                dim.dim_value = size
                continue
            if dim.HasField("dim_value") and dim.dim_value > 0:
                raise InvalidInput(f"--input-shape {name}: axis {axis} is fixed at {dim.dim_value} in the model; "
                                   f"it cannot take the range {format_dim(size)}")
            variable = dim.dim_param or f"{name}_dim{axis}"
            if ranges.setdefault(variable, size) != size:
                raise InvalidInput(f"--input-shape {name}: axis {axis} shares the dimension '{variable}' with "
                                   f"{given[variable]}, which has the range {format_dim(ranges[variable])}, "
                                   f"not {format_dim(size)}")
            given.setdefault(variable, f"'{name}' axis {axis}")
            dim.dim_param = variable
    for variable in ranges.keys() & pinned.keys():
        raise InvalidInput(f"--input-shape: dimension '{variable}' is pinned at {pinned[variable]} but varies at "
                           f"{given[variable]}; give both the same size or the same range")
    for name, value in inputs.items():
        dims = value.type.tensor_type.shape.dim
        for axis, dim in enumerate(dims):
            if dim.dim_param in ranges and not dim.HasField("dim_value"):
                continue
            if not dim.HasField("dim_value") or dim.dim_value < 0:
                label = dim.dim_param or "?"
                raise InvalidInput(
                    f"input '{name}' of {path.name} has a symbolic dimension '{label}' (axis {axis}); "
                    f"give its size (or a range A..B) with --input-shape {name}=" + ",".join(
                        str(d.dim_value) if d.HasField("dim_value") else "N" for d in dims)
                )
    return ranges


def supported_ops() -> set[str]:
    """ONNX operator types the TVM Relax importer (with forgeml's converters) can convert."""
    from forgeml.compiler.frontend.converters import convert_map

    return set(convert_map())


def find_unsupported(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Operator type -> node names, for every node the importer cannot convert once the operators ONNX
    defines as functions are expanded (as normalize does)."""
    from forgeml.compiler.frontend.legalize import expand_functions

    known = (supported_ops() | {"If"}) - _WRONG_OPS  # the importer converts If itself, outside its converter map
    model = expand_functions(model, known)[0]
    missing: dict[str, list[str]] = defaultdict(list)
    for i, node in enumerate(model.graph.node):
        if node.domain not in _ONNX_DOMAINS or node.op_type not in known:
            op = node.op_type if node.domain in _ONNX_DOMAINS else f"{node.domain}.{node.op_type}"
            missing[op].append(node.name or f"#{i}")
    return dict(missing)


def _tensor_specs(values, ranges: dict[str, tuple[int, int]] | None = None,
                  read_only: bool = False) -> tuple[TensorSpec, ...]:
    """Specs of graph values; axes whose dim_param is in `ranges` carry their range."""
    specs = []
    for v in values:
        if _is_tensor_sequence(v):  # elements' shapes may differ: the spec has the element type only
            elem = v.type.sequence_type.elem_type.tensor_type.elem_type
            specs.append(TensorSpec(v.name, (), _dtype_of(elem, f"'{v.name}'"), kind="sequence"))
            continue
        t = v.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
        dynamic = tuple(DynamicDim(axis, d.dim_param, *ranges[d.dim_param]) for axis, d in enumerate(t.shape.dim)
                        if ranges and not d.HasField("dim_value") and d.dim_param in ranges)
        specs.append(TensorSpec(v.name, shape, _dtype_of(t.elem_type, f"'{v.name}'", read_only), dynamic=dynamic))
    return tuple(specs)


def load_onnx(path: str | Path, input_shapes: InputShapes | None = None) -> LoadedModel:
    """Read, check and shape-infer an ONNX model; fail early on anything the compiler cannot take."""
    path = Path(path)
    model, sha = _read_model(path)
    try:
        onnx.checker.check_model(model, full_check=False)
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "invalid model"
        raise InvalidInput(f"{path} fails the ONNX checker: {first}") from None
    unsupported = find_unsupported(model)
    if unsupported:
        raise UnsupportedOperator(unsupported)
    _drop_weight_inputs(model)
    _optional_inputs_as_tensors(model)
    _check_types(model)
    dim_ranges = _fix_input_shapes(model, input_shapes or {}, path)
    model = _infer_shapes(model, path)
    outputs = _tensor_specs(model.graph.output)
    ranges = index_ranges(model)
    ratios = dropout_ratio_inputs(model)
    inputs = tuple(spec._replace(valid_range=ranges.get(spec.name)) if "int" in spec.dtype else
                   spec._replace(valid_range=(0, 0)) if spec.name in ratios else spec
                   for spec in _tensor_specs(_graph_inputs(model), dim_ranges, read_only=True))
    return LoadedModel(model, inputs, outputs, sha, path, dim_ranges)


def _infer_shapes(model: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    """ONNX shape inference in strict mode. Where it fails inside the body onnx defines for a function
    operator, not in the model's own nodes (onnx 1.23's MeanVarianceNormalization-13 body holds a Constant
    its own strict check refuses), the lenient mode's result is used."""
    try:
        return shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except Exception as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        failure = InvalidInput(f"{path}: ONNX shape inference failed: {message}")
    ops = re.findall(r"\(op_type:([A-Za-z0-9_]+)", message)
    if len(ops) < 2 or not _is_function_op(ops[0], model):
        raise failure
    try:
        return shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 (onnx raises several types)
        raise failure from None


def _is_function_op(op_type: str, model: onnx.ModelProto) -> bool:
    """Whether ONNX defines `op_type`, at the model's opset, by a function body."""
    version = max((o.version for o in model.opset_import if o.domain in _ONNX_DOMAINS), default=1)
    try:
        schema = onnx.defs.get_schema(op_type, version, "")
    except onnx.defs.SchemaError:
        return False
    return bool(schema.has_function or schema.has_context_dependent_function)


_PASS_THROUGH = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Expand", "Transpose"}


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _indexed_sizes(node: onnx.NodeProto, sizes: dict[str, tuple[int, ...]]) -> tuple[str, int, int] | None:
    """(indices input, lowest valid index, the size its values index) for a node that indexes a tensor
    with one of its inputs, else None. Element-wise indexers (Gather, GatherElements, Scatter,
    ScatterElements) index one axis of their data; GatherND/ScatterND index the leading dimensions
    (the smallest of those bounds all of them); NegativeLogLikelihoodLoss's target indexes the classes."""
    op, ins = node.op_type, node.input
    if len(ins) < 2:
        return None
    shape = sizes.get(ins[0])
    if shape is None or not shape:
        return None
    if op in ("Gather", "GatherElements", "Scatter", "ScatterElements"):
        axis = _attr(node, "axis", 0)
        if not -len(shape) <= axis < len(shape):
            return None
        return ins[1], -shape[axis], shape[axis]
    if op in ("GatherND", "ScatterND"):
        depth = sizes.get(ins[1])
        batch = _attr(node, "batch_dims", 0)
        if depth is None or not depth or depth[-1] + batch > len(shape):
            return None
        size = min(shape[batch:batch + depth[-1]], default=1)
        return ins[1], -size, size
    if op == "NegativeLogLikelihoodLoss" and len(shape) >= 2:
        ignore = next((a.i for a in node.attribute if a.name == "ignore_index"), None)
        low = 0 if ignore is None else min(0, ignore)
        return ins[1], low, max(shape[1], (ignore + 1) if ignore is not None else 0)
    return None


def _value_sizes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    sizes = {init.name: tuple(init.dims) for init in model.graph.initializer}
    for v in list(model.graph.value_info) + list(model.graph.input):
        dims = v.type.tensor_type.shape.dim
        if v.type.HasField("tensor_type") and all(d.HasField("dim_value") for d in dims):
            sizes.setdefault(v.name, tuple(d.dim_value for d in dims))
    return sizes


def _sources(model: onnx.ModelProto):
    """A function: value name -> the graph input it is (directly or through shape-only ops), or None."""
    producers = {out: node for node in model.graph.node for out in node.output}
    inputs = {v.name for v in model.graph.input}

    def source(name: str) -> str | None:
        while name not in inputs:
            node = producers.get(name)
            if node is None or node.op_type not in _PASS_THROUGH or not node.input:
                return None
            name = node.input[0]
        return name

    return source


def index_ranges(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """Graph input -> the values it may hold, for integer inputs used (directly or through shape-only
    ops) as indices into a tensor of known size (Gather, GatherElements, GatherND, Scatter,
    ScatterElements, ScatterND, NegativeLogLikelihoodLoss's target): [-size, size - 1] along the
    indexed axis, or as Attention's nonpad_kv_seqlen: [0, K's sequence length]; intersected over every use."""
    sizes = _value_sizes(model)
    source = _sources(model)
    ranges: dict[str, tuple[int, int]] = {}
    for node in model.graph.node:
        if node.domain not in _ONNX_DOMAINS:
            continue
        found = _indexed_sizes(node, sizes)
        if found is None:
            continue
        indices, lowest, size = found
        origin = source(indices)
        if origin is None:
            continue
        low, high = ranges.get(origin, (lowest, size - 1))
        ranges[origin] = (max(low, lowest), min(high, size - 1))
    for node in model.graph.node:  # Attention's nonpad_kv_seqlen: a length in [0, K's sequence length]
        if node.op_type != "Attention" or node.domain not in _ONNX_DOMAINS or len(node.input) < 7:
            continue
        origin, k_shape = source(node.input[6]), sizes.get(node.input[1])
        if origin is None or k_shape is None or len(k_shape) not in (3, 4):
            continue
        kv_len = k_shape[-2] if len(k_shape) == 4 else k_shape[1]
        low, high = ranges.get(origin, (0, kv_len))
        ranges[origin] = (max(low, 0), min(high, kv_len))
    return ranges


def _nodes_and_subgraph_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of `graph` and of the graphs its nodes' attributes hold (If branches, Loop bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                yield from _nodes_and_subgraph_nodes(sub)


def dropout_ratio_inputs(model: onnx.ModelProto) -> set[str]:
    """Graph inputs that are a Dropout's ratio where its training_mode is given (opset 12 on): forgeml
    compiles such a Dropout as ratio 0 (the output is the input, the mask all true), and the runtime
    refuses any other ratio (manifest range [0, 0]): a nonzero ratio in training mode draws random masks."""
    inputs = {v.name for v in _graph_inputs(model)}
    return {node.input[1] for node in _nodes_and_subgraph_nodes(model.graph) if node.op_type == "Dropout"
            and node.domain in _ONNX_DOMAINS and len(node.input) > 2 and node.input[2]
            and node.input[1] in inputs}


def unit_interval_inputs(model: onnx.ModelProto) -> set[str]:
    """Graph inputs used as NonMaxSuppression's iou_threshold or score_threshold: verification's seeded
    inputs draw them from [0, 1] (ONNX Runtime rejects an IoU threshold outside it)."""
    source = _sources(model)
    return {origin for node in model.graph.node if node.op_type == "NonMaxSuppression"
            for name in node.input[3:5] if name and (origin := source(name)) is not None}


def convolution_weight_inputs(model: onnx.ModelProto) -> set[str]:
    """Graph inputs used as a convolution's weight or bias (Conv, ConvTranspose inputs 1 and 2): the
    non-finite verification probe leaves them finite. TVM's ConvTranspose multiplies its weights by the
    zeros it inserts between input pixels, so an infinite weight gives NaN where ONNX Runtime's col2im
    adds only real products (ONNX's test_convtranspose: 34 NaN against 21); weights are not data."""
    source = _sources(model)
    return {origin for node in model.graph.node
            if node.op_type in ("Conv", "ConvTranspose") and node.domain in _ONNX_DOMAINS
            for name in node.input[1:3] if name and (origin := source(name)) is not None}


def divisor_inputs(model: onnx.ModelProto) -> set[str]:
    """Graph inputs used (directly or through shape-only ops) as the divisor of an integer Div or Mod:
    verification's seeded inputs keep them non-zero (integer division by zero is undefined)."""
    source = _sources(model)
    integer = {v.name for v in model.graph.input
               if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type not in _FLOAT_TYPES}
    found = set()
    for node in model.graph.node:
        if node.op_type in ("Div", "Mod") and node.domain in _ONNX_DOMAINS and len(node.input) > 1:
            origin = source(node.input[1])
            if origin in integer:
                found.add(origin)
    return found


_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
