"""Small real models built in the tests with onnx.helper, and helpers to compare with ONNX Runtime."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Tests never read or write the user's tuning database and caches."""
    import os

    path = tmp_path_factory.mktemp("forgeml-cache")
    old = os.environ.get("FORGEML_CACHE")
    os.environ["FORGEML_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("FORGEML_CACHE", None)
    else:
        os.environ["FORGEML_CACHE"] = old


def _model(nodes, inputs, outputs, weights, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs,
                              [numpy_helper.from_array(w, name) for name, w in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def mlp_model(batch: int | str = 4, features: int = 16, hidden: int = 32, out: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    weights = {
        "W1": rng.standard_normal((features, hidden)).astype("float32") * 0.3,
        "B1": rng.standard_normal(hidden).astype("float32"),
        "W2": rng.standard_normal((hidden, out)).astype("float32") * 0.3,
    }
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
             helper.make_node("Add", ["h", "B1"], ["h2"], name="bias1"),
             helper.make_node("Relu", ["h2"], ["h3"], name="relu1"),
             helper.make_node("MatMul", ["h3", "W2"], ["y"], name="fc2")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, features])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, out])], weights)


def cnn_model(seed: int = 0):
    """conv3x3-BN-ReLU, conv3x3/2, global average pool, linear: the shape of a small CNN."""
    rng = np.random.default_rng(seed)
    w = {
        "c1": rng.standard_normal((16, 3, 3, 3)).astype("float32") * 0.3,
        "c1b": rng.standard_normal(16).astype("float32") * 0.1,
        "g": rng.uniform(0.5, 1.5, 16).astype("float32"), "b": rng.standard_normal(16).astype("float32") * 0.1,
        "m": rng.standard_normal(16).astype("float32") * 0.1, "v": rng.uniform(0.5, 1.5, 16).astype("float32"),
        "c2": rng.standard_normal((32, 16, 3, 3)).astype("float32") * 0.1,
        "fc": rng.standard_normal((32, 10)).astype("float32") * 0.3,
        "shape": np.array([1, 32], dtype=np.int64),
    }
    nodes = [
        helper.make_node("Conv", ["x", "c1", "c1b"], ["a"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("BatchNormalization", ["a", "g", "b", "m", "v"], ["bn"], name="bn1"),
        helper.make_node("Relu", ["bn"], ["r"], name="relu1"),
        helper.make_node("Conv", ["r", "c2"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv2"),
        helper.make_node("GlobalAveragePool", ["c"], ["p"], name="pool"),
        helper.make_node("Reshape", ["p", "shape"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["f", "fc"], ["y"], name="fc"),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], w)


def unsupported_model():
    """A graph with two operators the TVM importer lacks, among supported ones."""
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="relu"),
             helper.make_node("StringNormalizer", ["s"], ["s2"], name="norm_a"),
             helper.make_node("DFT", ["a"], ["b"], name="dft1"),
             helper.make_node("DFT", ["b"], ["y"], name="dft2")]
    graph = helper.make_graph(nodes, "unsupported", [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 1]),
        helper.make_tensor_value_info("s", TensorProto.STRING, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 2]),
         helper.make_tensor_value_info("s2", TensorProto.STRING, [2])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def artifact_library(artifact: Path) -> bytes:
    """The compiled library inside a .fml artifact."""
    with tarfile.open(artifact) as tar:
        return tar.extractfile("model.so").read()


def ort_run(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def _compile_once(tmp_path_factory, name: str, model) -> tuple[Path, Path]:
    import forgeml

    d = tmp_path_factory.mktemp(name)
    onnx_path = save(model, d / f"{name}.onnx")
    forgeml.compile_model(onnx_path, d / f"{name}.fml")
    return onnx_path, d / f"{name}.fml"


@pytest.fixture(scope="session")
def compiled_mlp(tmp_path_factory):
    """(onnx path, artifact path) of a small MLP compiled once for the whole test session."""
    return _compile_once(tmp_path_factory, "mlp", mlp_model())


@pytest.fixture(scope="session")
def compiled_cnn(tmp_path_factory):
    """(onnx path, artifact path) of a small CNN (conv, batch norm, pool, linear), compiled once."""
    return _compile_once(tmp_path_factory, "cnn", cnn_model())
