"""float16 models on the CPU compute in float32 and round once, as ONNX Runtime does
(compiler/float16.py): small models compared with ONNX Runtime at a float16 ulp."""

from __future__ import annotations

import numpy as np
import onnx
from conftest import ort_run, save
from onnx import TensorProto, helper, numpy_helper

import forgeml


def _compile_and_run(tmp_path, model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> tuple[dict, dict]:
    path = save(model, tmp_path / "m.onnx")
    forgeml.compile_model(path, tmp_path / "m.fml", target="x86-64", verify=False)
    return forgeml.load(tmp_path / "m.fml").run(feeds), ort_run(path, feeds)


def _ulps(a: np.ndarray, b: np.ndarray) -> int:
    """The largest distance between two float16 arrays in units in the last place."""
    ia, ib = (np.asarray(x, np.float16).view(np.int16).astype(np.int32) for x in (a, b))
    ia, ib = (np.where(i < 0, -32768 - i, i) for i in (ia, ib))  # sign-magnitude to a monotonic integer
    return int(np.max(np.abs(ia - ib)))


def test_matmul_and_depthwise_conv_accumulate_in_float32(tmp_path):
    """A 256-long dot product and a grouped convolution in float16: TVM summed in float16 (tens of ulp off
    ONNX Runtime); now within one ulp."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((256, 8)).astype(np.float16)
    k = rng.standard_normal((4, 1, 4)).astype(np.float16)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"]),
             helper.make_node("Conv", ["c", "k"], ["z"], group=4)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [4, 256]),
                                           helper.make_tensor_value_info("c", TensorProto.FLOAT16, [2, 4, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [4, 8]),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT16, [2, 4, 61])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(k, "k")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    feeds = {"x": rng.standard_normal((4, 256)).astype(np.float16),
             "c": rng.standard_normal((2, 4, 64)).astype(np.float16)}
    got, want = _compile_and_run(tmp_path, model, feeds)
    assert _ulps(got["y"], want["y"]) <= 1 and _ulps(got["z"], want["z"]) <= 1


def test_chain_of_float16_ops_rounds_once(tmp_path):
    """MatMul -> Add -> Softmax -> MatMul in float16 (the attention core): ONNX Runtime keeps float32
    between the ops (TVM's float16 softmax, its fast exp at float16 precision, was hundreds of ulp off)."""
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("MatMul", ["q", "k"], ["s"]), helper.make_node("Add", ["s", "bias"], ["b"]),
             helper.make_node("Softmax", ["b"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "v"], ["y"])]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT16, s)
              for n, s in (("q", [8, 16]), ("k", [16, 32]), ("bias", [8, 32]), ("v", [32, 16]))]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [8, 16])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    feeds = {i.name: (rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]) * 2).astype(np.float16)
             for i in inputs}
    got, want = _compile_and_run(tmp_path, model, feeds)
    assert _ulps(got["y"], want["y"]) <= 1
