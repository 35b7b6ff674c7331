"""Rewrites before import (frontend/legalize.py) and forgeml's converters (frontend/converters.py): small
onnx.helper models compiled at O0 without verification, compared with ONNX's reference implementation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import ort_run
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

import forgeml
from forgeml.compiler.build import CompileOptions, compile_model
from forgeml.compiler.frontend import legalize, onnx_model
from forgeml.compiler.frontend.normalize import normalize
from forgeml.errors import InvalidInput, UnsupportedOperator

F, I64, B = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL


def _model(nodes: list, inputs: list, outputs: list, opset: int = 18) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(*i) for i in inputs],
                              [helper.make_tensor_value_info(*o) for o in outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _compile_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], tmp_path: Path) -> list[np.ndarray]:
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    compile_model(path, tmp_path / "m.fml", CompileOptions(opt_level="O0", verify=False))
    out = forgeml.load(tmp_path / "m.fml").run(feeds)
    return list(out.values()) if isinstance(out, dict) else list(out)


def _check(model: onnx.ModelProto, feeds: dict[str, np.ndarray], tmp_path: Path, ort: bool = False,
           **tol: float) -> None:
    """forgeml's outputs equal ONNX's reference implementation's (ONNX Runtime's with `ort`)."""
    if ort:
        import onnxruntime

        session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        expected = session.run(None, feeds)
    else:
        expected = ReferenceEvaluator(model).run(None, feeds)
    got = _compile_run(model, feeds, tmp_path)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        g = np.asarray(g)
        assert g.dtype == e.dtype and g.shape == e.shape, (g.dtype, g.shape, e.dtype, e.shape)
        np.testing.assert_allclose(g, e, rtol=tol.get("rtol", 1e-5), atol=tol.get("atol", 1e-6))


def test_constant_forms_become_value_tensors(tmp_path: Path):
    sparse = helper.make_sparse_tensor(helper.make_tensor("v", F, [2], [5.0, 7.0]),
                                       helper.make_tensor("i", I64, [2], [1, 4]), [2, 3])
    nodes = [helper.make_node("Constant", [], ["a"], value_float=2.5),
             helper.make_node("Constant", [], ["b"], value_floats=[1.0, 2.0, 3.0]),
             helper.make_node("Constant", [], ["s"], sparse_value=sparse),
             helper.make_node("Constant", [], ["n"], value_ints=[2, 3]),
             helper.make_node("Mul", ["x", "a"], ["xa"]), helper.make_node("Add", ["xa", "b"], ["xb"]),
             helper.make_node("Add", ["xb", "s"], ["xs"]), helper.make_node("Reshape", ["xs", "n"], ["y"])]
    model = _model(nodes, [("x", F, [2, 3])], [("y", F, [2, 3])])
    legal, expanded, rewritten = legalize.legalize(model, onnx_model.supported_ops())
    assert rewritten == 4 and not expanded and legal is not model
    assert all(a.name == "value" for n in legal.graph.node if n.op_type == "Constant" for a in n.attribute)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    dense = np.array([[0, 5, 0], [0, 7, 0]], dtype=np.float32)  # the reference evaluator lacks sparse constants
    (got,) = _compile_run(model, {"x": x}, tmp_path)
    np.testing.assert_array_equal(got, x * 2.5 + np.array([1, 2, 3], dtype=np.float32) + dense)


def test_untouched_model_is_returned_as_is():
    model = _model([helper.make_node("Relu", ["x"], ["y"])], [("x", F, [2])], [("y", F, [2])])
    assert legalize.legalize(model, onnx_model.supported_ops()) == (model, {}, 0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_softmax_cross_entropy_expands_and_matches(tmp_path: Path, reduction: str):
    node = helper.make_node("SoftmaxCrossEntropyLoss", ["x", "t", "w"], ["loss", "logp"], reduction=reduction,
                            ignore_index=2)
    out = [] if reduction != "none" else [3, 2]
    model = _model([node], [("x", F, [3, 5, 2]), ("t", I64, [3, 2]), ("w", F, [5])],
                   [("loss", F, out), ("logp", F, [3, 5, 2])], opset=13)
    assert onnx_model.find_unsupported(model) == {}
    _, record = normalize(model)
    assert record.expanded == {"SoftmaxCrossEntropyLoss": 1, "NegativeLogLikelihoodLoss": 1}
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((3, 5, 2), dtype=np.float32), "t": np.array([[0, 2], [4, 1], [2, 3]]),
             "w": rng.random(5, dtype=np.float32)}
    _check(model, feeds, tmp_path)


def test_function_op_with_unsupported_body_is_still_reported():
    """An op with no function and no converter stays unsupported, named as before."""
    node = helper.make_node("DFT", ["x"], ["y"])
    model = _model([node], [("x", F, [4, 2])], [("y", F, [4, 2])], opset=17)
    assert onnx_model.find_unsupported(model) == {"DFT": ["#0"]}


@pytest.mark.parametrize("positive,negative", [(1, 0), (0, 1), (0, 0), (1, 1)])
def test_isinf_detect_flags(tmp_path: Path, positive: int, negative: int):
    node = helper.make_node("IsInf", ["x"], ["y"], detect_positive=positive, detect_negative=negative)
    model = _model([node], [("x", F, [5])], [("y", B, [5])])
    _check(model, {"x": np.array([np.inf, -np.inf, 1.0, np.nan, -2.0], dtype=np.float32)}, tmp_path)


@pytest.mark.parametrize("axis", [1, -1, 0])
def test_layer_normalization_statistics(tmp_path: Path, axis: int):
    node = helper.make_node("LayerNormalization", ["x", "s", "b"], ["y", "mean", "inv"], axis=axis, epsilon=1e-3)
    shape = [2, 3, 4]
    norm = shape[axis % 3:]
    stat = [d if i < axis % 3 else 1 for i, d in enumerate(shape)]
    model = _model([node], [("x", F, shape), ("s", F, norm), ("b", F, norm)],
                   [("y", F, shape), ("mean", F, stat), ("inv", F, stat)])
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal(shape, dtype=np.float32), "s": rng.standard_normal(norm, dtype=np.float32),
             "b": rng.standard_normal(norm, dtype=np.float32)}
    _check(model, feeds, tmp_path, rtol=1e-4, atol=1e-5)


def test_dropout_mask_is_bool_and_training_with_zero_ratio_is_identity(tmp_path: Path):
    ratio = helper.make_tensor("r", F, [], [0.0])
    training = helper.make_tensor("t", B, [], [True])
    nodes = [helper.make_node("Constant", [], ["r"], value=ratio),
             helper.make_node("Constant", [], ["t"], value=training),
             helper.make_node("Dropout", ["x", "r", "t"], ["y", "mask"])]
    model = _model(nodes, [("x", F, [2, 3])], [("y", F, [2, 3]), ("mask", B, [2, 3])])
    _check(model, {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}, tmp_path)
    inference = _model([helper.make_node("Dropout", ["x"], ["y", "mask"])], [("x", F, [4])],
                       [("y", F, [4]), ("mask", B, [4])])
    _check(inference, {"x": np.arange(4, dtype=np.float32)}, tmp_path)


def test_dropout_with_a_computed_ratio_in_training_mode_is_refused(tmp_path: Path):
    nodes = [helper.make_node("Abs", ["r"], ["ratio"]),
             helper.make_node("Dropout", ["x", "ratio", "t"], ["y", "mask"], name="drop")]
    model = _model(nodes, [("x", F, [2, 3]), ("r", F, []), ("t", B, [])], [("y", F, [2, 3]), ("mask", B, [2, 3])])
    onnx.save(model, str(tmp_path / "m.onnx"))
    with pytest.raises(UnsupportedOperator, match=r"Dropout x1 \(drop: training_mode is given at run time"):
        compile_model(tmp_path / "m.onnx", tmp_path / "m.fml", CompileOptions(opt_level="O0", verify=False))


def test_dropout_ratio_input_is_held_to_zero_at_run_time(tmp_path: Path):
    """training_mode and ratio as graph inputs (test_training_dropout_zero_ratio): compiled as ratio 0 and
    verified against ONNX Runtime; any other ratio (or NaN) is refused in one line naming the input."""
    node = helper.make_node("Dropout", ["x", "r", "t"], ["y", "mask"])
    model = _model([node], [("x", F, [2, 3]), ("r", F, []), ("t", B, [])], [("y", F, [2, 3]), ("mask", B, [2, 3])])
    onnx.save(model, str(tmp_path / "m.onnx"))
    compile_model(tmp_path / "m.onnx", tmp_path / "m.fml", CompileOptions(opt_level="O0"))  # verified
    session = forgeml.load(tmp_path / "m.fml")
    assert session.inputs[1].valid_range == (0, 0)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    for training in (True, False):
        feeds = {"x": x, "r": np.array(0.0, np.float32), "t": np.array(training)}
        expected = ort_run(tmp_path / "m.onnx", feeds)
        got = session.run(feeds)
        np.testing.assert_array_equal(got["y"], expected["y"])
        np.testing.assert_array_equal(got["mask"], expected["mask"])
        assert got["mask"].dtype == np.bool_
    for ratio in (0.5, np.nan):
        with pytest.raises(InvalidInput) as caught:
            session.run({"x": x, "r": np.array(ratio, np.float32), "t": np.array(True)})
        message = str(caught.value)
        assert "input 'r'" in message and "outside [0, 0]" in message and "Dropout" in message, message
        assert "\n" not in message


def test_batch_normalization_training_mode(tmp_path: Path):
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y", "rm", "rv"], training_mode=1,
                            momentum=0.8, epsilon=1e-3)
    model = _model([node], [("x", F, [2, 3, 4, 5])] + [(n, F, [3]) for n in "sbmv"],
                   [("y", F, [2, 3, 4, 5]), ("rm", F, [3]), ("rv", F, [3])], opset=15)
    rng = np.random.default_rng(2)
    feeds = {"x": rng.standard_normal((2, 3, 4, 5), dtype=np.float32)}
    feeds.update({n: rng.random(3, dtype=np.float32) + 0.5 for n in "sbmv"})
    _check(model, feeds, tmp_path, rtol=1e-4, atol=1e-5)


def test_float_floor_mod_edge_cases(tmp_path: Path):
    x = np.array([0.0, -0.0, -3.0, 3.0, -1.0, 1.0, np.inf, 1.0, 5.5, -5.5], dtype=np.float32)
    y = np.array([-2.0, 2.0, np.inf, np.inf, -np.inf, -np.inf, 2.0, 0.0, -2.0, 2.0], dtype=np.float32)
    model = _model([helper.make_node("Mod", ["x", "y"], ["z"], fmod=0)], [("x", F, [10]), ("y", F, [10])],
                   [("z", F, [10])])
    with np.errstate(all="ignore"):
        _check(model, {"x": x, "y": y}, tmp_path)
    fmod = _model([helper.make_node("Mod", ["x", "y"], ["z"], fmod=1)], [("x", F, [10]), ("y", F, [10])],
                  [("z", F, [10])])
    with np.errstate(all="ignore"):
        _check(fmod, {"x": x, "y": y}, tmp_path)


@pytest.mark.parametrize("auto_pad,shape", [("NOTSET", [10, 8]), ("NOTSET", [8, 6]), ("SAME_UPPER", [10, 8]),
                                             ("SAME_UPPER", [8, 6]), ("SAME_LOWER", [10, 8])])
def test_conv_transpose_output_shape(tmp_path: Path, auto_pad: str, shape: list[int]):
    """Against ONNX Runtime (the verifier): ONNX's reference places a SAME_UPPER extension differently."""
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], strides=[3, 2], output_shape=shape,
                            auto_pad=auto_pad)
    model = _model([node], [("x", F, [1, 1, 3, 3]), ("w", F, [1, 2, 3, 3])], [("y", F, [1, 2, *shape])])
    rng = np.random.default_rng(3)
    feeds = {"x": rng.standard_normal((1, 1, 3, 3), dtype=np.float32),
             "w": rng.standard_normal((1, 2, 3, 3), dtype=np.float32)}
    _check(model, feeds, tmp_path, ort=True, rtol=1e-4, atol=1e-5)


def test_roi_align_max_is_refused(tmp_path: Path):
    node = helper.make_node("RoiAlign", ["x", "rois", "idx"], ["y"], mode="max", name="roi")
    model = _model([node], [("x", F, [1, 1, 8, 8]), ("rois", F, [2, 4]), ("idx", I64, [2])],
                   [("y", F, [2, 1, 1, 1])], opset=16)
    onnx.save(model, str(tmp_path / "m.onnx"))
    with pytest.raises(UnsupportedOperator, match=r"RoiAlign x1 \(roi: mode=max\)"):
        compile_model(tmp_path / "m.onnx", tmp_path / "m.fml", CompileOptions(opt_level="O0", verify=False))


@pytest.mark.parametrize("mode", ["CRD", "DCR"])
def test_space_to_depth_modes(tmp_path: Path, mode: str):
    node = helper.make_node("SpaceToDepth", ["x"], ["y"], blocksize=2, mode=mode)
    model = _model([node], [("x", F, [1, 3, 4, 6])], [("y", F, [1, 12, 2, 3])], opset=28)
    _check(model, {"x": np.arange(72, dtype=np.float32).reshape(1, 3, 4, 6)}, tmp_path)


def test_function_op_onnx_cannot_inline_is_reported_not_raised(tmp_path: Path):
    """onnx's inliner raised RuntimeError ("GetType: Assertion false failed: Type unknown") building the
    body of CausalConvWithState with a past state (and of LinearAttention); that op stays as it is and
    the compile fails with the unsupported-operator report naming the node. A second function op in the
    same model (Softplus, with nothing supported) still expands."""
    nodes = [helper.make_node("CausalConvWithState", ["x", "w", "", "past"], ["y", "state"], name="conv"),
             helper.make_node("Softplus", ["y"], ["z"], name="soft")]
    model = _model(nodes, [("x", F, [2, 4, 8]), ("w", F, [4, 1, 4]), ("past", F, [2, 4, 3])],
                   [("z", F, [2, 4, 8]), ("state", F, [2, 4, 3])], opset=27)
    model.ir_version = 13
    result, expanded = legalize.expand_functions(model, set())
    assert expanded.get("Softplus") == 1 and "CausalConvWithState" not in expanded
    assert [n.op_type for n in result.graph.node if n.op_type == "CausalConvWithState"] == ["CausalConvWithState"]
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    with pytest.raises(UnsupportedOperator, match=r"CausalConvWithState x1 \(conv\)"):
        compile_model(path, tmp_path / "m.fml", CompileOptions(verify=False))


def test_dropout_ratio_inputs_are_found_inside_if_branches():
    """A Dropout inside an If branch whose ratio is an outer graph input gets the run-time check too."""
    def branch(name: str) -> onnx.GraphProto:
        return helper.make_graph([helper.make_node("Dropout", ["x", "r", "t"], [f"{name}_y"])], name, [],
                                 [helper.make_tensor_value_info(f"{name}_y", F, [2])])

    node = helper.make_node("If", ["c"], ["y"], then_branch=branch("then"), else_branch=branch("else"))
    model = _model([node], [("c", B, []), ("x", F, [2]), ("r", F, []), ("t", B, [])], [("y", F, [2])])
    assert onnx_model.dropout_ratio_inputs(model) == {"r"}
