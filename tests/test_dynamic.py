"""Dynamic shapes (issue 21): --input-shape ranges, one artifact for every shape inside them, static
buckets dispatched at run time, memory planned from the bounds, one-line refusals outside the ranges."""

from __future__ import annotations

import json
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import _model, ort_run, save
from onnx import TensorProto, helper
from test_cli import assert_one_line_error, forgeml

import forgeml as fm
from forgeml.compiler.build import CompileOptions, compile_model
from forgeml.errors import InvalidInput
from forgeml.shapes import check_points, parse_input_shapes


def _manifest(path: Path) -> dict:
    with tarfile.open(path) as tar:
        return json.load(tar.extractfile("manifest.json"))


def dynamic_cnn(seed: int = 0) -> onnx.ModelProto:
    """conv3x3-ReLU, conv3x3/2, global average pool, flatten, linear over a symbolic batch 'N'."""
    rng = np.random.default_rng(seed)
    w = {"c1": rng.standard_normal((16, 3, 3, 3)).astype("float32") * 0.3,
         "c1b": rng.standard_normal(16).astype("float32") * 0.1,
         "c2": rng.standard_normal((32, 16, 3, 3)).astype("float32") * 0.1,
         "fc": rng.standard_normal((32, 10)).astype("float32") * 0.3}
    nodes = [helper.make_node("Conv", ["x", "c1", "c1b"], ["a"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["a"], ["r"], name="relu1"),
             helper.make_node("Conv", ["r", "c2"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv2"),
             helper.make_node("GlobalAveragePool", ["c"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("MatMul", ["f", "fc"], ["y"], name="fc")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], w)


def shared_batch_model() -> onnx.ModelProto:
    """y = a @ W + b: inputs a [N, 8] and b [N, 4] share the dim_param N."""
    w = {"W": np.random.default_rng(0).standard_normal((8, 4)).astype("float32")}
    nodes = [helper.make_node("MatMul", ["a", "W"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])]
    return _model(nodes, [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 8]),
                          helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 4])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], w)


def test_input_shape_parses_sizes_and_ranges():
    assert parse_input_shapes(["ids=1..8,1..128", "x=1,3"]) == {"ids": ((1, 8), (1, 128)), "x": (1, 3)}
    assert parse_input_shapes(["x=4..4,3"]) == {"x": (4, 3)}  # a one-size range is a size
    for bad, words in [("x=8..1", "1 <= A <= B"), ("x=0..4", "1 <= A <= B"), ("x=1..n", "neither a size"),
                       ("x", "NAME=D1"), ("x=-2", "sizes")]:
        with pytest.raises(InvalidInput, match=words):
            parse_input_shapes([bad])
    assert check_points({"b": (1, 8), "s": (1, 128)}) == [{"b": 1, "s": 1}, {"b": 5, "s": 77}, {"b": 8, "s": 128}]


@pytest.fixture(scope="module")
def cnn_artifact(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("dynamic-cnn")
    path = save(dynamic_cnn(), tmp / "cnn.onnx")
    compile_model(path, tmp / "cnn.fml", CompileOptions(input_shapes=parse_input_shapes(["x=1..16,3,32,32"])))
    return path, tmp / "cnn.fml"


def test_cnn_batch_range_matches_onnxruntime_and_dispatches_buckets(cnn_artifact):
    onnx_path, artifact = cnn_artifact
    session = fm.load(artifact)
    rng = np.random.default_rng(1)
    for batch in (1, 5, 16):
        x = rng.standard_normal((batch, 3, 32, 32)).astype("float32")
        np.testing.assert_allclose(session.run({"x": x})["y"], ort_run(onnx_path, {"x": x})["y"], rtol=1e-4, atol=1e-4)
        unaligned = np.empty(x.size + 1, np.float32)[1:].reshape(x.shape)  # through the staging buffer
        unaligned[...] = x
        np.testing.assert_allclose(session.run({"x": unaligned})["y"], session.run({"x": x})["y"], rtol=0, atol=0)
    functions = {f["name"]: f for f in session.manifest.functions}
    assert functions["main"]["dimensions"] is None
    assert functions["main_1"]["dimensions"] == {"N": 1} and functions["main_16"]["dimensions"] == {"N": 16}
    assert session._buckets.keys() == {(1,), (16,)}  # 5 runs the symbolic main


def test_manifest_records_ranges_verification_points_and_memory(cnn_artifact):
    m = _manifest(cnn_artifact[1])
    assert m["inputs"][0]["shape"] == [-1, 3, 32, 32]
    assert m["inputs"][0]["dynamic"] == [{"axis": 0, "variable": "N", "min": 1, "max": 16}]
    assert m["compile_options"]["input_shapes"] == {"x": [[1, 16], 3, 32, 32]}
    points = m["verification"]["points"]
    assert [(p["dimensions"]["N"], p["function"]) for p in points] == [(1, "main_1"), (10, "main"), (16, "main_16")]
    assert all(p["passed"] for p in points) and m["verification"]["passed"]
    main = next(f for f in m["functions"] if f["name"] == "main")
    largest = next(f for f in m["functions"] if f["name"] == "main_16")
    # the symbolic main's buffers are planned once, at the bucket-16 sizes: nothing sized at run time
    assert main["memory"]["symbolic_storage"] == 0
    assert main["memory"]["planned_bytes"] == largest["memory"]["planned_bytes"] > 0
    weights = {i for f in m["functions"] for i in f["weights"]}
    assert weights == set(range(len(m["weights"])))  # equal weights stored once, every one used


@pytest.mark.parametrize("shape, words", [
    ((17, 3, 32, 32), ["input 'x' axis 0 ('N') is 17", "range 1..16"]),
    ((2, 3, 32, 31), ["input 'x' has shape [2, 3, 32, 31]", "x: float32[1..16, 3, 32, 32]"]),
    ((2, 3, 32), ["input 'x' has shape [2, 3, 32]"]),
])
def test_shapes_outside_the_ranges_are_refused_in_one_line(cnn_artifact, shape, words):
    session = fm.load(cnn_artifact[1])
    unaligned = np.zeros(int(np.prod(shape)) + 1, np.float32)[1:].reshape(shape)  # would go to staging
    for x in (np.zeros(shape, np.float32), unaligned, np.asfortranarray(np.zeros(shape, np.float32))):
        with pytest.raises(InvalidInput) as info:
            session.run({"x": x})
        assert "\n" not in str(info.value) and all(w in str(info.value) for w in words), str(info.value)


def test_memory_is_planned_from_the_bounds(tmp_path):
    """TVM's planner leaves storage of symbolic size without the bounds forgeml sets from the ranges."""
    import dataclasses

    import tvm

    from forgeml.compiler import graph
    from forgeml.compiler.cpu.pipeline import cpu_o2
    from forgeml.compiler.dynamic import memory_plan
    from forgeml.compiler.frontend import onnx_model, relax_import
    from forgeml.targets import resolve_target

    loaded = onnx_model.load_onnx(save(dynamic_cnn(), tmp_path / "cnn.onnx"), {"x": ((1, 16), 3, 32, 32)})
    bounded = relax_import.import_onnx(loaded)
    unbounded = relax_import.import_onnx(dataclasses.replace(loaded, ranges={}))
    target = tvm.target.Target(resolve_target("x86-64").tvm_target())
    plans = [memory_plan(graph.lift_weights(cpu_o2(mod, target))[0], target)["main"] for mod in (bounded, unbounded)]
    assert plans[0]["symbolic_storage"] == 0 and plans[0]["planned_bytes"] > 0
    assert plans[1]["symbolic_storage"] > 0


def test_inputs_sharing_a_dim_param_are_one_variable(tmp_path):
    path = save(shared_batch_model(), tmp_path / "m.onnx")
    compile_model(path, tmp_path / "m.fml", CompileOptions(input_shapes={"a": ((1, 4), 8)}, buckets="none"))
    session = fm.load(tmp_path / "m.fml")
    assert [s.dynamic[0].variable for s in session.inputs] == ["N", "N"]  # b was not named: it shares N
    rng = np.random.default_rng(0)
    feeds = {"a": rng.standard_normal((3, 8)).astype("float32"), "b": rng.standard_normal((3, 4)).astype("float32")}
    np.testing.assert_allclose(session.run(feeds)["y"], ort_run(path, feeds)["y"], rtol=1e-5, atol=1e-5)
    with pytest.raises(InvalidInput, match=r"input 'b' axis 0 is 2, but 'a' axis 0 is 3: both are dimension 'N'"):
        session.run({"a": feeds["a"], "b": feeds["b"][:2]})


@pytest.mark.parametrize("shapes, words", [
    ({"a": ((1, 4), (1, 8))}, "axis 1 is fixed at 8 in the model; it cannot take the range 1..8"),
    ({"a": ((1, 4), 8), "b": ((1, 2), 4)}, "shares the dimension 'N' with 'a' axis 0, which has the range 1..4"),
    ({"a": ((1, 4), 8), "b": (3, 4)}, "dimension 'N' is pinned at 'b' axis 0 but varies at 'a' axis 0"),
])
def test_inconsistent_ranges_are_refused(tmp_path, shapes, words):
    path = save(shared_batch_model(), tmp_path / "m.onnx")
    with pytest.raises(InvalidInput, match=words):
        compile_model(path, tmp_path / "m.fml", CompileOptions(input_shapes=shapes))
    assert not (tmp_path / "m.fml").exists()


def test_static_compiles_keep_their_manifest(tmp_path):
    path = save(dynamic_cnn(), tmp_path / "cnn.onnx")
    compile_model(path, tmp_path / "cnn.fml", CompileOptions(input_shapes={"x": (2, 3, 32, 32)}))
    m = _manifest(tmp_path / "cnn.fml")
    assert "functions" not in m and "dynamic" not in m["inputs"][0] and "points" not in m["verification"]


def test_bert_tiny_exported_dynamic_compiles_once_for_batch_and_sequence(tmp_path):
    """The issue's case through the CLI: export with dynamic axes, compile for batch 1..8 and sequence
    1..128, match ONNX Runtime at (1,1), (1,128), (3,77), (8,128); refuse (9,16) and (1,129)."""
    onnx_path, artifact = tmp_path / "bert.onnx", tmp_path / "bert.fml"
    proc = forgeml("export", "forgeml.zoo.models:build_bert_tiny", "--input-shape", "input_ids=1,128:int64",
                   "--dynamic-axis", "input_ids=0", "--dynamic-axis", "input_ids=1", "-o", onnx_path)
    assert proc.returncode == 0, proc.stderr
    proc = forgeml("compile", onnx_path, "--input-shape", "input_ids=1..8,1..128", "-o", artifact)
    assert proc.returncode == 0, proc.stderr
    session = fm.load(artifact)
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (1, 128), (3, 77), (8, 128)]:
        ids = rng.integers(0, 1000, size=shape, dtype=np.int64)
        got, want = session.run({"input_ids": ids}), ort_run(onnx_path, {"input_ids": ids})
        np.testing.assert_allclose(got[session.outputs[0].name], want[session.outputs[0].name], rtol=1e-4, atol=1e-4)
    for shape, axis, bounds in [((9, 16), 0, "1..8"), ((1, 129), 1, "1..128")]:
        np.save(tmp_path / "ids.npy", np.zeros(shape, np.int64))
        proc = forgeml("run", artifact, "--input", f"input_ids={tmp_path / 'ids.npy'}")
        assert_one_line_error(proc, 2, "input 'input_ids'", f"axis {axis}", f"range {bounds}")
    names = {f["name"] for f in session.manifest.functions}
    assert names == {"main", "main_1x1", "main_1x128", "main_8x1", "main_8x128"}
    checked = {tuple(p["dimensions"].values()) for p in session.manifest.verification["points"]}
    assert {(1, 1), (5, 77), (8, 128)} <= checked


def test_bench_times_a_shape_inside_the_range(cnn_artifact):
    proc = forgeml("bench", cnn_artifact[1], "--input-shape", "x=3,3,32,32", "--repeat", "3", "--warmup", "1",
                   "--no-memory", "--baseline", "none")
    assert proc.returncode == 0, proc.stderr
    proc = forgeml("bench", cnn_artifact[1], "--input-shape", "x=20,3,32,32", "--baseline", "none")
    assert_one_line_error(proc, 2, "axis 0 ('N') is 20", "range 1..16")


def test_cuda_build_of_a_dynamic_model(tmp_path):
    """CUDA targets take ranges too (dlight schedules symbolic extents); built here, not run (no GPU)."""
    path = save(shared_batch_model(), tmp_path / "m.onnx")
    manifest = compile_model(path, tmp_path / "m.fml", CompileOptions(target="cuda-sm90", verify=False,
                                                                      input_shapes={"a": ((1, 64), 8)}))
    assert [f["name"] for f in manifest.functions] == ["main", "main_1", "main_64"]
    assert manifest.inputs[1].dynamic[0].max == 64


def test_cli_refuses_a_bad_range_in_one_line(tmp_path):
    path = save(shared_batch_model(), tmp_path / "m.onnx")
    proc = forgeml("compile", path, "--input-shape", "a=4..1,8")
    assert_one_line_error(proc, 2, "--input-shape", "4..1")


def test_bundle_demo_runs_a_dynamic_artifact(cnn_artifact, tmp_path):
    import sys

    from forgeml.bundle import bundle

    bundle(cnn_artifact[1], tmp_path / "deploy")
    demo = subprocess.run([sys.executable, str(tmp_path / "deploy" / "run.py")], capture_output=True, text=True)
    assert demo.returncode == 0 and "y: float32[16, 10]" in demo.stdout, demo.stderr  # at the upper bound
