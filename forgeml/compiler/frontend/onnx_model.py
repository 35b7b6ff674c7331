"""ONNX in: load, check, infer shapes, fix input shapes, and report unsupported operators early."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import shape_inference

from forgeml.errors import InvalidInput, UnsupportedOperator
from forgeml.runtime.artifact import TensorSpec

_ONNX_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class LoadedModel:
    """An ONNX model that passed the checker, with every input and output shape fixed."""

    model: onnx.ModelProto
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    sha256: str
    path: Path


def _dtype_of(elem_type: int) -> str:
    return str(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


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


def _fix_input_shapes(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]], path: Path) -> None:
    """Write user-given shapes into the graph; refuse any dimension still symbolic."""
    inputs = {i.name: i for i in _graph_inputs(model)}
    for name in input_shapes:
        if name not in inputs:
            raise InvalidInput(f"--input-shape names '{name}', but the model's inputs are: {', '.join(inputs)}")
    for name, value in inputs.items():
        dims = value.type.tensor_type.shape.dim
        if name in input_shapes:
            shape = input_shapes[name]
            if len(shape) != len(dims):
                raise InvalidInput(
                    f"--input-shape {name} has rank {len(shape)}, but the model's input '{name}' has rank {len(dims)}"
                )
            for dim, size in zip(dims, shape):
                dim.ClearField("dim_param")
                dim.dim_value = size
        for axis, dim in enumerate(dims):
            if not dim.HasField("dim_value") or dim.dim_value < 0:
                label = dim.dim_param or "?"
                raise InvalidInput(
                    f"input '{name}' of {path.name} has a symbolic dimension '{label}' (axis {axis}); "
                    f"give its size with --input-shape {name}=" + ",".join(
                        str(d.dim_value) if d.HasField("dim_value") else "N" for d in dims)
                )


def supported_ops() -> set[str]:
    """ONNX operator types the TVM Relax importer can convert."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    return set(_get_convert_map())


def find_unsupported(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Operator type -> node names, for every node the importer cannot convert."""
    known = supported_ops()
    missing: dict[str, list[str]] = defaultdict(list)
    for i, node in enumerate(model.graph.node):
        if node.domain not in _ONNX_DOMAINS or node.op_type not in known:
            op = node.op_type if node.domain in _ONNX_DOMAINS else f"{node.domain}.{node.op_type}"
            missing[op].append(node.name or f"#{i}")
    return dict(missing)


def _tensor_specs(values) -> tuple[TensorSpec, ...]:
    specs = []
    for v in values:
        t = v.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
        specs.append(TensorSpec(v.name, shape, _dtype_of(t.elem_type)))
    return tuple(specs)


def load_onnx(path: str | Path, input_shapes: dict[str, tuple[int, ...]] | None = None) -> LoadedModel:
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
    _fix_input_shapes(model, input_shapes or {}, path)
    try:
        model = shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except Exception as e:
        raise InvalidInput(f"{path}: ONNX shape inference failed: {str(e).strip().splitlines()[0]}") from None
    outputs = _tensor_specs(model.graph.output)
    ranges = index_ranges(model)
    inputs = tuple(spec._replace(valid_range=ranges.get(spec.name)) if "int" in spec.dtype else spec
                   for spec in _tensor_specs(_graph_inputs(model)))
    return LoadedModel(model, inputs, outputs, sha, path)


_PASS_THROUGH = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Expand", "Transpose"}


def index_ranges(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """Graph input -> the values it may hold, for integer inputs used (directly or through shape-only
    ops) as Gather indices into a tensor of known size: [-size, size - 1] along the gathered axis, or as
    Attention's nonpad_kv_seqlen: [0, K's sequence length]; intersected over every such use."""
    producers = {out: node for node in model.graph.node for out in node.output}
    inputs = {v.name for v in model.graph.input}
    sizes = {init.name: tuple(init.dims) for init in model.graph.initializer}
    for v in list(model.graph.value_info) + list(model.graph.input):
        dims = v.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            sizes.setdefault(v.name, tuple(d.dim_value for d in dims))

    def source(name: str) -> str | None:
        while name not in inputs:
            node = producers.get(name)
            if node is None or node.op_type not in _PASS_THROUGH:
                return None
            name = node.input[0]
        return name

    ranges: dict[str, tuple[int, int]] = {}
    for node in model.graph.node:
        if node.op_type != "Gather" or len(node.input) < 2:
            continue
        origin, shape = source(node.input[1]), sizes.get(node.input[0])
        if origin is None or shape is None:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        size = shape[axis]
        low, high = ranges.get(origin, (-size, size - 1))
        ranges[origin] = (max(low, -size), min(high, size - 1))
    for node in model.graph.node:
        if node.op_type != "Attention" or node.domain not in _ONNX_DOMAINS or len(node.input) < 7:
            continue
        origin, k_shape = source(node.input[6]), sizes.get(node.input[1])
        if origin is None or k_shape is None or len(k_shape) not in (3, 4):
            continue
        kv_len = k_shape[-2] if len(k_shape) == 4 else k_shape[1]
        low, high = ranges.get(origin, (0, kv_len))
        ranges[origin] = (max(low, 0), min(high, kv_len))
    return ranges
