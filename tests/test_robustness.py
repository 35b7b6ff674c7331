"""Verification that accepts correct models and every failure a forgeml error: small onnx.helper models
compiled at O2, run and compared with ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from conftest import ort_run, save
from onnx import TensorProto, helper

import forgeml
from forgeml.compiler.verify import compare, seeded_inputs
from forgeml.errors import ForgeError, InvalidInput, VerificationFailed
from forgeml.runtime.artifact import TensorSpec


def _model(nodes, inputs, outputs, opset: int = 18, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _vi(name: str, elem: int, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def _compile(tmp_path: Path, model: onnx.ModelProto):
    path = save(model, tmp_path / "m.onnx")
    manifest = forgeml.compile_model(path, tmp_path / "m.fml", target="x86-64")
    return path, manifest, forgeml.load(tmp_path / "m.fml")


def test_compare_nan_and_inf_on_both_sides_are_equal():
    ref = np.array([np.nan, np.inf, -np.inf, 1.0], np.float32)
    assert compare({"y": ref.copy()}, {"y": ref}) == (0.0, 0.0)
    assert compare({"y": np.array([0.0, np.inf, -np.inf, 1.0])}, {"y": ref})[0] == float("inf")
    assert compare({"y": np.array([np.nan, -np.inf, -np.inf, 1.0])}, {"y": ref})[0] == float("inf")
    with pytest.raises(VerificationFailed, match="has shape"):
        compare({"y": np.zeros(())}, {"y": ref})


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
                                   "bool", "float16", "float64", "bfloat16", "float8_e4m3fn", "int4", "uint2"])
def test_seeded_inputs_every_dtype(dtype):
    feeds = seeded_inputs([TensorSpec("x", (3, 4), dtype)], nonzero={"x"})
    assert feeds["x"].dtype == np.dtype(dtype) and feeds["x"].shape == (3, 4)
    if np.dtype(dtype).kind in "iu":
        assert (feeds["x"] != 0).all()


def test_nan_where_onnxruntime_gives_nan_verifies(tmp_path):
    """sqrt/log of the negative seeded inputs are NaN on both sides: verified, not refused."""
    model = _model([helper.make_node("Sqrt", ["x"], ["s"]), helper.make_node("Log", ["s"], ["y"])],
                   [_vi("x", TensorProto.FLOAT, [4, 8])], [_vi("y", TensorProto.FLOAT, [4, 8])])
    _, manifest, _ = _compile(tmp_path, model)
    assert manifest.verification["passed"] and manifest.verification["skipped"] is None


def test_onnxruntime_without_a_kernel_skips_verification(tmp_path):
    """ONNX Runtime has no Max for int16: the artifact is written, verification recorded as skipped."""
    model = _model([helper.make_node("Max", ["a", "b"], ["y"])],
                   [_vi("a", TensorProto.INT16, [5]), _vi("b", TensorProto.INT16, [5])],
                   [_vi("y", TensorProto.INT16, [5])])
    _, manifest, session = _compile(tmp_path, model)
    assert "NOT_IMPLEMENTED" not in manifest.verification["skipped"]
    assert "Max" in manifest.verification["skipped"]
    a, b = np.array([1, -2, 3, -4, 5], np.int16), np.array([0, 0, 9, -9, 5], np.int16)
    np.testing.assert_array_equal(session.run({"a": a, "b": b})["y"], np.maximum(a, b))


def test_integer_divisors_are_never_zero(tmp_path):
    model = _model([helper.make_node("Div", ["a", "b"], ["q"]), helper.make_node("Mod", ["a", "b"], ["r"])],
                   [_vi("a", TensorProto.INT8, [16]), _vi("b", TensorProto.INT8, [16])],
                   [_vi("q", TensorProto.INT8, [16]), _vi("r", TensorProto.INT8, [16])])
    _, manifest, _ = _compile(tmp_path, model)
    assert manifest.verification["passed"]


@pytest.mark.parametrize("op,attrs,data,indices,updates,out", [
    ("GatherElements", {"axis": 1}, [3, 6], [3, 4], None, [3, 4]),
    ("GatherND", {}, [5, 7], [4, 2], None, [4]),
    ("ScatterElements", {"axis": 0}, [6, 3], [2, 3], [2, 3], [6, 3]),
    ("ScatterND", {}, [8], [1, 1], [1], [8]),
])
def test_index_inputs_are_made_valid(tmp_path, op, attrs, data, indices, updates, out):
    inputs = [_vi("data", TensorProto.FLOAT, data), _vi("idx", TensorProto.INT64, indices)]
    if updates:
        inputs.append(_vi("upd", TensorProto.FLOAT, updates))
    node = helper.make_node(op, ["data", "idx"] + (["upd"] if updates else []), ["y"], **attrs)
    model = _model([node], inputs, [_vi("y", TensorProto.FLOAT, out)])
    path, manifest, session = _compile(tmp_path, model)
    assert manifest.verification["passed"], manifest.verification
    idx = next(spec for spec in session.inputs if spec.name == "idx")
    assert idx.valid_range is not None and idx.valid_range[1] >= 0
    feeds = seeded_inputs(session.inputs, seed=3)
    np.testing.assert_allclose(session.run(feeds)["y"], ort_run(path, feeds)["y"], rtol=1e-6)


def test_scatter_elements_and_cosh_compile_at_o2(tmp_path):
    """Kernels the O2 rules or the weight-repack split used to break keep working schedules."""
    model = _model([helper.make_node("ScatterElements", ["data", "idx", "upd"], ["s"], axis=1),
                    helper.make_node("Cosh", ["s"], ["y"])],
                   [_vi("data", TensorProto.FLOAT, [1, 5]), _vi("idx", TensorProto.INT64, [1, 2]),
                    _vi("upd", TensorProto.FLOAT, [1, 2])], [_vi("y", TensorProto.FLOAT, [1, 5])])
    _, manifest, _ = _compile(tmp_path, model)
    assert manifest.verification["passed"]


def test_if_is_supported(tmp_path):
    then = helper.make_graph([helper.make_node("Identity", ["a"], ["t"])], "then", [],
                             [_vi("t", TensorProto.FLOAT, [3])])
    other = helper.make_graph([helper.make_node("Neg", ["a"], ["e"])], "else", [],
                              [_vi("e", TensorProto.FLOAT, [3])])
    model = _model([helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)],
                   [_vi("c", TensorProto.BOOL, []), _vi("a", TensorProto.FLOAT, [3])],
                   [_vi("y", TensorProto.FLOAT, [3])])
    _, manifest, session = _compile(tmp_path, model)
    a = np.array([1, 2, 3], np.float32)
    np.testing.assert_array_equal(session.run({"c": np.array(False), "a": a})["y"], -a)


def test_bfloat16_runs_and_verification_is_skipped(tmp_path):
    """ONNX Runtime's Python API takes no bfloat16 arrays: verification is skipped, the model runs."""
    model = _model([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.BFLOAT16)],
                   [_vi("x", TensorProto.FLOAT, [6])], [_vi("y", TensorProto.BFLOAT16, [6])])
    _, manifest, session = _compile(tmp_path, model)
    assert manifest.verification["skipped"].startswith("ONNX Runtime cannot")
    x = np.array([1.0, -2.5, 3.25, 0.0, 1e3, -7.0], np.float32)
    y = session.run({"x": x})["y"]
    assert y.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(y, x.astype(ml_dtypes.bfloat16))


@pytest.mark.parametrize("elem,where", [(TensorProto.INT4, "graph input 'x'"),
                                        (TensorProto.FLOAT4E2M1, "graph output 'y'")])
def test_sub_byte_types_are_refused_by_name(tmp_path, elem, where):
    if where.startswith("graph input"):
        model = _model([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)],
                       [_vi("x", elem, [4])], [_vi("y", TensorProto.FLOAT, [4])], opset=21)
    else:
        model = _model([helper.make_node("Cast", ["x"], ["y"], to=elem)],
                       [_vi("x", TensorProto.FLOAT, [4])], [_vi("y", elem, [4])], opset=23)
    with pytest.raises(InvalidInput, match=f"{where} has element type"):
        _compile(tmp_path, model)


def test_sequence_input_is_refused_by_name(tmp_path):
    """Sequence outputs compile (tests/test_sequence_outputs.py); sequence inputs do not."""
    model = _model([helper.make_node("SequenceAt", ["seq", "i"], ["y"])],
                   [helper.make_tensor_sequence_value_info("seq", TensorProto.FLOAT, [2]),
                    _vi("i", TensorProto.INT64, [])],
                   [_vi("y", TensorProto.FLOAT, [2])])
    with pytest.raises(InvalidInput, match="graph input 'seq' is a sequence; forgeml compiles tensor inputs"):
        _compile(tmp_path, model)


def test_tvm_failure_is_a_forge_error(tmp_path):
    """RMSNormalization over axis 0 breaks TVM's legalization: one forgeml error, no TVM traceback."""
    model = _model([helper.make_node("RMSNormalization", ["x", "s"], ["y"], axis=0)],
                   [_vi("x", TensorProto.FLOAT, [3, 4]), _vi("s", TensorProto.FLOAT, [3, 4])],
                   [_vi("y", TensorProto.FLOAT, [3, 4])], opset=23)
    try:
        _compile(tmp_path, model)
    except ForgeError as err:
        assert "\n" not in str(err) and "failed" in str(err)
