"""NaN and infinities as ONNX Runtime treats them (issue 20 item 4): one-node models and the mlp compiled
at O2 without verification, run on inputs holding NaN, +inf and -inf, compared with ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import ort_run, save
from onnx import TensorProto, helper, numpy_helper

import forgeml

NAN, INF = np.float32(np.nan), np.float32(np.inf)
ROW = np.array([[NAN, INF, -INF, 0.0, 1.5, -2.0, 100.0, -100.0]], np.float32)


def _one_node(op: str, x: np.ndarray, out_type: int = TensorProto.FLOAT, opset: int = 18,
              weights: dict[str, np.ndarray] | None = None, **attrs) -> onnx.ModelProto:
    weights = weights or {}
    node = helper.make_node(op, ["x", *weights], ["y"], **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", out_type, None)],
                              [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def _run_both(tmp_path: Path, model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> tuple[dict, dict]:
    path = save(model, tmp_path / "m.onnx")
    forgeml.compile_model(path, tmp_path / "m.fml", target="x86-64", verify=False)
    return forgeml.load(tmp_path / "m.fml").run(feeds), ort_run(path, feeds)


def _assert_same(got: dict, want: dict) -> None:
    for name, ref in want.items():
        assert got[name].dtype == ref.dtype
        np.testing.assert_allclose(got[name], ref, rtol=1e-5, atol=1e-6, equal_nan=True, err_msg=name)
        np.testing.assert_array_equal(np.isinf(got[name]), np.isinf(ref), err_msg=f"{name}: infinities")


def test_relu_of_nan_is_nan(tmp_path):
    got, want = _run_both(tmp_path, _one_node("Relu", ROW), {"x": ROW})
    assert np.isnan(got["y"][0, 0]) and got["y"][0, 1] == INF
    _assert_same(got, want)


def _mlp(features: int = 16, hidden: int = 32, out: int = 10) -> onnx.ModelProto:
    """The zoo mlp's shape (three Linear layers, ReLU between them) with seeded weights."""
    rng = np.random.default_rng(0)
    sizes = [features, hidden, hidden, out]
    weights, nodes, h = {}, [], "x"
    for i in range(3):
        weights[f"w{i}"] = (rng.standard_normal(sizes[i:i + 2]) / np.sqrt(sizes[i])).astype(np.float32)
        weights[f"b{i}"] = (rng.standard_normal(sizes[i + 1]) * 0.1).astype(np.float32)
        nodes += [helper.make_node("MatMul", [h, f"w{i}"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"])]
        h = f"a{i}"
        if i < 2:
            nodes.append(helper.make_node("Relu", [h], [f"r{i}"]))
            h = f"r{i}"
    nodes[-1].output[0] = "y"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, features])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, out])],
                              [numpy_helper.from_array(v, k) for k, v in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
def test_mlp_with_one_nonfinite_input(tmp_path, value):
    """One NaN or +inf among the mlp's inputs: ONNX Runtime's outputs in that row are all NaN (+inf through
    weights of both signs: inf - inf in the second layer), and forgeml's too, not the ten finite numbers
    (the bias of the last layer) that Relu(NaN) = 0 gave."""
    x = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
    x[1, 3] = value
    got, want = _run_both(tmp_path, _mlp(), {"x": x})
    assert np.isnan(want["y"][1]).all() and np.isfinite(want["y"][[0, 2, 3]]).all()
    _assert_same(got, want)


@pytest.mark.parametrize(("op", "opset", "weights", "attrs"), [
    ("Clip", 18, {"lo": np.array(-1, np.float32), "hi": np.array(1, np.float32)}, {}),
    ("Clip", 18, {}, {}),  # no bounds: clamps to the finite range (ONNX spec, ONNX Runtime)
    ("Clip", 6, {}, {"min": -1.0, "max": 1.0}),
    ("Erf", 18, {}, {}),  # the fast approximation clamped NaN to 1
    ("Elu", 18, {}, {}), ("Selu", 18, {}, {}), ("Celu", 18, {}, {}), ("HardSigmoid", 18, {}, {}),
    ("ThresholdedRelu", 18, {}, {}), ("Sign", 18, {}, {}),
])
def test_activations(tmp_path, op, opset, weights, attrs):
    _assert_same(*_run_both(tmp_path, _one_node(op, ROW, opset=opset, weights=weights, **attrs), {"x": ROW}))


@pytest.mark.parametrize("op", ["Max", "Min"])
def test_comparisons_propagate_nan(tmp_path, op):
    """Max/Min of NaN and a number are NaN (TVM's `a > b ? a : b` dropped a NaN on the left)."""
    weights = {"b": np.array([[0.0], [-INF], [NAN]], np.float32)}  # broadcast against x's rows
    x = np.repeat(ROW, 3, axis=0)
    _assert_same(*_run_both(tmp_path, _one_node(op, x, weights=weights), {"x": x}))


@pytest.mark.parametrize(("op", "out_type", "attrs"), [
    ("ReduceMax", TensorProto.FLOAT, {"keepdims": 1}),
    ("ReduceMin", TensorProto.FLOAT, {"keepdims": 0}),
    ("ArgMax", TensorProto.INT64, {"axis": 1}),
    ("ArgMin", TensorProto.INT64, {"axis": 1, "keepdims": 0}),
])
def test_reductions(tmp_path, op, out_type, attrs):
    """Rows with NaN first (where ONNX Runtime's vectorized reductions are consistent), all -inf, all +inf."""
    x = np.array([[NAN, 1.0, INF, -INF], [-INF] * 4, [INF] * 4, [3.0, -1.0, 2.0, 3.0]], np.float32)
    _assert_same(*_run_both(tmp_path, _one_node(op, x, out_type=out_type, **attrs), {"x": x}))


def test_softmax_of_fully_masked_rows(tmp_path):
    """The ONNX Attention function's guard: rows whose bias is all -inf get probability 0, not the NaN of
    softmax over -inf (ReduceMax over -inf gave -3.4e38 and the guard never fired)."""
    nodes = [helper.make_node("Add", ["x", "bias"], ["s"]),
             helper.make_node("Softmax", ["s"], ["p"], axis=-1),
             helper.make_node("ReduceMax", ["bias", "axes"], ["m"], keepdims=1),
             helper.make_node("Equal", ["m", "neg_inf"], ["masked"]),
             helper.make_node("Where", ["masked", "zero", "p"], ["y"])]
    bias = np.array([[0, 0, -INF, 0], [-INF] * 4, [0, INF, 0, 0]], np.float32)
    weights = {"axes": np.array([-1], np.int64), "neg_inf": np.array(-INF, np.float32), "zero": np.array(0, np.float32)}
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [3, 4]) for name in ("x", "bias")]
    graph = helper.make_graph(nodes, "g", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])],
                              [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    got, want = _run_both(tmp_path, model, {"x": x, "bias": bias})
    assert (want["y"][1] == 0).all()
    _assert_same(got, want)


def test_verification_records_the_nonfinite_probe(tmp_path):
    """A default compile also runs both engines on inputs with NaN, +inf and -inf and records it."""
    path = save(_one_node("Relu", ROW), tmp_path / "m.onnx")
    manifest = forgeml.compile_model(path, tmp_path / "m.fml", target="x86-64")
    assert manifest.verification["passed"]
    assert manifest.verification["nonfinite"] == {"passed": True, "inputs": ["x"], "mismatch": None, "skipped": None,
                                                  "enforced": True, "unsettled": None}


def test_nonfinite_probe_reports_nan_positions(tmp_path):
    """forgeml's Relu against ONNX Runtime running Where(x > 0, x, 0): equal on finite inputs, not on NaN.
    The finite check passes, the probe names the output, what differs and where, and the result fails."""
    from forgeml.compiler.verify import nonfinite_inputs, verify_against_onnxruntime

    relu = save(_one_node("Relu", ROW), tmp_path / "relu.onnx")
    forgeml.compile_model(relu, tmp_path / "relu.fml", target="x86-64", verify=False)
    nodes = [helper.make_node("Greater", ["x", "zero"], ["above"]),
             helper.make_node("Where", ["above", "x", "zero"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(ROW.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(ROW.shape))],
                              [numpy_helper.from_array(np.array(0, np.float32), "zero")])
    where = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "where.onnx")
    result = verify_against_onnxruntime(forgeml.load(tmp_path / "relu.fml"), where, 1e-3)
    assert result.max_rel_error == 0.0 and not result.passed
    probe = result.nonfinite
    assert not probe["passed"] and probe["inputs"] == ["x"]
    assert probe["mismatch"].startswith("output 'y': NaN at 0 positions in ONNX Runtime, 1 in forgeml")
    assert "non-finite inputs" in result.failure()
    probed = nonfinite_inputs({"x": np.ones((2, 2), np.float32), "n": np.ones(3, np.int64)})
    assert np.isnan(probed["x"][0, 0]) and probed["x"][0, 1] == INF and probed["x"][1, 0] == -INF
    assert (probed["n"] == 1).all()


def test_clip_after_conv_fuses_into_the_conv_kernel(tmp_path):
    """A NaN-propagating Clip against constant bounds stays elementwise for fusion (as a 0-d tensor input
    TVM called it a broadcast, which never fuses after a convolution: every ReLU6 ran as a kernel of its
    own), and still passes NaN and infinities as ONNX Runtime does."""
    import dataclasses

    import onnxruntime as ort
    import tvm

    from forgeml.compiler import pipeline
    from forgeml.compiler.build import tvm_target
    from forgeml.compiler.frontend import onnx_model, relax_import
    from forgeml.compiler.frontend.normalize import normalize
    from forgeml.targets.registry import resolve_target

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((8, 4, 1, 1)).astype("float32"), "w"),
               numpy_helper.from_array(np.array(0, "float32"), "lo"),
               numpy_helper.from_array(np.array(6, "float32"), "hi")]
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"]),
                               helper.make_node("Clip", ["c", "lo", "hi"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 6, 6])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    loaded = onnx_model.load_onnx(path, {})
    loaded = dataclasses.replace(loaded, model=normalize(loaded.model)[0])
    mod = pipeline.get_pipeline("O2")(relax_import.import_onnx(loaded), tvm_target(resolve_target("x86-64")))
    kernels = [gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(kernels) == 1 and "conv2d" in kernels[0] and "minimum" in kernels[0], kernels
    forgeml.compile_model(path, tmp_path / "m.fml", target="x86-64")
    x = rng.standard_normal((1, 4, 6, 6)).astype("float32")
    x[0, 0, 0, :3] = [np.nan, np.inf, -np.inf]
    got = forgeml.load(tmp_path / "m.fml").run({"x": x})["y"]
    want = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(np.nan_to_num(got), np.nan_to_num(want), rtol=1e-5, atol=1e-5)
