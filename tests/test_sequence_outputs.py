"""Sequence-of-tensor graph outputs (SplitToSequence, If returning a sequence): compiled, described in
the manifest as `{"name", "kind": "sequence", "dtype"}`, returned by the runtime as a list of arrays (as
ONNX Runtime returns them), verified element by element, printed and saved by the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from conftest import ort_run, save
from onnx import TensorProto, helper

import forgeml
from forgeml.compiler import verify
from forgeml.runtime.artifact import open_artifact

F = TensorProto.FLOAT


def _split_model() -> onnx.ModelProto:
    """x [3, 6] -> SplitToSequence into pieces of [2, 4] columns (uneven) and a plain tensor output."""
    nodes = [helper.make_node("Constant", [], ["sizes"], value=helper.make_tensor("s", TensorProto.INT64, [2], [2, 4])),
             helper.make_node("SplitToSequence", ["x", "sizes"], ["seq"], axis=1),
             helper.make_node("Relu", ["x"], ["y"])]
    seq = helper.make_tensor_sequence_value_info("seq", F, None)
    graph = helper.make_graph(nodes, "split", [helper.make_tensor_value_info("x", F, [3, 6])],
                              [seq, helper.make_tensor_value_info("y", F, [3, 6])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model


def test_split_to_sequence_runs_as_onnxruntime(tmp_path: Path):
    path = save(_split_model(), tmp_path / "split.onnx")
    forgeml.compile_model(path, tmp_path / "split.fml", target="x86-64", opt_level="O0")  # verified
    x = np.random.default_rng(0).standard_normal((3, 6)).astype(np.float32)
    expected = ort_run(path, {"x": x})
    session = forgeml.load(tmp_path / "split.fml")
    got = session.run({"x": x})
    assert isinstance(got["seq"], list) and len(got["seq"]) == 2
    assert [a.shape for a in got["seq"]] == [(3, 2), (3, 4)]
    for a, b in zip(got["seq"], expected["seq"]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(got["y"], expected["y"])
    seq_list, _ = session.run(None, {"x": x})  # ONNX Runtime's call shape
    assert isinstance(seq_list, list) and len(seq_list) == 2
    spec = open_artifact(tmp_path / "split.fml").data["outputs"][0]
    assert spec == {"name": "seq", "kind": "sequence", "dtype": "float32"}
    assert session.outputs[0].describe() == "seq: sequence of float32 tensors"


def test_a_single_sequence_output_is_a_list_not_its_elements(tmp_path: Path):
    model = _split_model()
    del model.graph.output[1]
    del model.graph.node[2]
    path = save(model, tmp_path / "one.onnx")
    forgeml.compile_model(path, tmp_path / "one.fml", target="x86-64", opt_level="O0")
    x = np.arange(18, dtype=np.float32).reshape(3, 6)
    got = forgeml.load(tmp_path / "one.fml").run({"x": x})
    assert list(got) == ["seq"] and [a.shape for a in got["seq"]] == [(3, 2), (3, 4)]


def test_verification_compares_sequences_element_by_element():
    expected = {"seq": [np.zeros(2, np.float32), np.ones(3, np.float32)]}
    assert verify.compare({"seq": [np.zeros(2, np.float32), np.ones(3, np.float32)]}, expected) == (0.0, 0.0)
    max_abs, _ = verify.compare({"seq": [np.zeros(2, np.float32), np.full(3, 1.5, np.float32)]}, expected)
    assert max_abs == 0.5
    try:
        verify.compare({"seq": [np.zeros(2, np.float32)]}, expected)
    except forgeml.errors.VerificationFailed as e:
        assert "sequence of 1 tensors, ONNX Runtime gives 2" in str(e)
    else:
        raise AssertionError("a shorter sequence passed verification")


def test_cli_prints_and_saves_sequence_elements(tmp_path: Path):
    path = save(_split_model(), tmp_path / "split.onnx")
    forgeml.compile_model(path, tmp_path / "split.fml", target="x86-64", opt_level="O0", verify=False)
    x = np.arange(18, dtype=np.float32).reshape(3, 6)
    np.save(tmp_path / "x.npy", x)
    cli = [sys.executable, "-m", "forgeml.cli"]
    run = subprocess.run([*cli, "run", str(tmp_path / "split.fml"), "-i", f"x={tmp_path / 'x.npy'}", "-o",
                          str(tmp_path / "out.npz")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    with np.load(tmp_path / "out.npz") as saved:
        assert sorted(saved.files) == ["seq_0", "seq_1", "y"]
        np.testing.assert_array_equal(saved["seq_1"], x[:, 2:])
    shown = subprocess.run([*cli, "run", str(tmp_path / "split.fml"), "-i", f"x={tmp_path / 'x.npy'}"],
                           capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0 and "seq: sequence of 2 tensors" in shown.stdout and "seq[1]: float32[3, 4]" \
        in shown.stdout, shown.stdout + shown.stderr
    inspect = subprocess.run([*cli, "inspect", str(tmp_path / "split.fml")], capture_output=True, text=True,
                             timeout=300)
    assert "seq: sequence of float32 tensors" in inspect.stdout, inspect.stdout + inspect.stderr
    assert open_artifact(tmp_path / "split.fml").data["outputs"][1]["shape"] == [3, 6]  # tensors as before
