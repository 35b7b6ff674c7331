"""forgeml.compile_model: checks first, weights as parameters, verification recorded, atomic output."""

from __future__ import annotations

import math
import tarfile

import numpy as np
import onnx
import pytest
from conftest import cnn_model, mlp_model, ort_run, save, unsupported_model

import forgeml
from forgeml.compiler.build import CompileOptions, compile_model
from forgeml.errors import InvalidInput, UnsupportedOperator, VerificationFailed
from forgeml.runtime.artifact import open_artifact


def test_mlp_matches_onnxruntime(compiled_mlp):
    onnx_path, artifact = compiled_mlp
    x = np.random.default_rng(1).standard_normal((4, 16)).astype("float32")
    got = forgeml.load(artifact).run({"x": x})["y"]
    np.testing.assert_allclose(got, ort_run(onnx_path, {"x": x})["y"], rtol=1e-4, atol=1e-4)


def test_cnn_with_batchnorm_matches_onnxruntime(compiled_cnn):
    onnx_path, artifact = compiled_cnn
    x = np.random.default_rng(2).standard_normal((1, 3, 32, 32)).astype("float32")
    got = forgeml.load(artifact).run({"x": x})["y"]
    np.testing.assert_allclose(got, ort_run(onnx_path, {"x": x})["y"], rtol=1e-4, atol=1e-4)


def test_manifest_records_verification_and_checksums(compiled_cnn):
    onnx_path, artifact = compiled_cnn
    m = open_artifact(artifact).manifest
    assert m.verification["passed"] is True and m.verification["skipped"] is None
    assert 0 <= m.verification["max_rel_error"] <= m.verification["tolerance"]
    assert set(m.members) == {"model.so", "weights.bin"}
    assert m.inputs[0].shape == (1, 3, 32, 32) and m.outputs[0].shape == (1, 10)
    assert m.versions["tvm"].startswith("0.27") and m.target["arch"] == "x86_64"


def test_weights_ship_as_parameters_not_code(tmp_path):
    big = mlp_model(features=256, hidden=512, out=256)
    path = save(big, tmp_path / "big.onnx")
    forgeml.compile_model(path, tmp_path / "big.fml")
    with tarfile.open(tmp_path / "big.fml") as tar:
        sizes = {m.name: m.size for m in tar.getmembers()}
    weight_bytes = (256 * 512 + 512 + 512 * 256) * 4
    assert sizes["weights.bin"] >= weight_bytes
    assert sizes["model.so"] < weight_bytes / 4, "weights were baked into the library"


def test_symbolic_dimension_needs_input_shape(tmp_path):
    path = save(mlp_model(batch="N"), tmp_path / "dyn.onnx")
    with pytest.raises(InvalidInput, match=r"input 'x'.*symbolic dimension 'N'.*--input-shape x="):
        compile_model(path, tmp_path / "dyn.fml")
    assert not (tmp_path / "dyn.fml").exists()
    compile_model(path, tmp_path / "dyn.fml", CompileOptions(input_shapes={"x": (3, 16)}))
    assert forgeml.load(tmp_path / "dyn.fml").inputs[0].shape == (3, 16)


def test_unsupported_operators_are_reported_together(tmp_path):
    path = save(unsupported_model(), tmp_path / "bad.onnx")
    with pytest.raises(UnsupportedOperator) as info:
        compile_model(path, tmp_path / "bad.fml")
    assert info.value.unsupported == {"DFT": ["dft1", "dft2"], "StringNormalizer": ["norm_a"]}
    assert "DFT x2 (dft1, dft2)" in str(info.value) and "StringNormalizer x1" in str(info.value)
    assert not (tmp_path / "bad.fml").exists()


def test_verification_failure_writes_nothing(tmp_path):
    path = save(cnn_model(), tmp_path / "cnn.onnx")
    out = tmp_path / "cnn.fml"
    with pytest.raises(VerificationFailed, match="tolerance"):
        compile_model(path, out, CompileOptions(tolerance=0.0))
    assert list(tmp_path.iterdir()) == [path], "no artifact and no temp files may be left"


def test_failed_compile_keeps_existing_artifact(compiled_mlp, tmp_path):
    _, artifact = compiled_mlp
    out = tmp_path / "keep.fml"
    out.write_bytes(artifact.read_bytes())
    before = out.read_bytes()
    bad = tmp_path / "trunc.onnx"
    bad.write_bytes(onnx.load(str(compiled_mlp[0])).SerializeToString()[:100])
    with pytest.raises(InvalidInput):
        compile_model(bad, out)
    assert out.read_bytes() == before


def test_relax_module_serializes(tmp_path):
    """apache-tvm-ffi 0.1.15.post2 segfaults here (and in every MetaSchedule database write)."""
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    mod = from_onnx(cnn_model(), keep_params_in_input=True)
    text = tvm.ir.save_json(mod)
    assert len(text) > 1000
    assert "main" in [gv.name_hint for gv in tvm.ir.load_json(text).get_global_vars()]


def _ir3_conv_gemm_model(seed: int = 0) -> onnx.ModelProto:
    """A model as the classic ONNX model zoo's exporters wrote it: IR version 3, opset 9, every weight
    listed as a graph input as well as an initializer."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weights = {"conv_w": rng.standard_normal((8, 3, 3, 3)).astype("float32") * 0.3,
               "conv_b": rng.standard_normal(8).astype("float32") * 0.1,
               "fc_w": rng.standard_normal((10, 8 * 6 * 6)).astype("float32") * 0.05,
               "fc_b": rng.standard_normal(10).astype("float32") * 0.1}
    nodes = [helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], name="conv", kernel_shape=[3, 3]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flatten", axis=1),
             helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], name="fc", transB=1)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])] + [
        helper.make_tensor_value_info(name, TensorProto.FLOAT, list(w.shape)) for name, w in weights.items()]
    graph = helper.make_graph(nodes, "ir3", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
                              [numpy_helper.from_array(w, name) for name, w in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 3
    onnx.checker.check_model(model)
    return model


def test_ir3_weights_listed_as_inputs(tmp_path):
    """Inputs with an initializer are weights: they were imported twice ("Function contains multiple
    parameters with name 'conv_w'")."""
    path = save(_ir3_conv_gemm_model(), tmp_path / "ir3.onnx")
    manifest = compile_model(path, tmp_path / "ir3.fml")
    assert [spec.name for spec in manifest.inputs] == ["x"]
    assert manifest.verification["passed"] is True
    x = np.random.default_rng(3).standard_normal((1, 3, 8, 8)).astype("float32")
    got = forgeml.load(tmp_path / "ir3.fml").run({"x": x})["y"]
    np.testing.assert_allclose(got, ort_run(path, {"x": x})["y"], rtol=1e-4, atol=1e-4)


def test_shape_and_data_dependent_outputs(tmp_path):
    """A `Shape` output imports as a Relax shape (no dtype, no tensor shape) and NonZero's count is known
    only at run time: both failed in `_output_specs`. They compile to int64 tensors; the unknown
    dimension is recorded as -1."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu"),
             helper.make_node("Shape", ["y"], ["s"], name="shape"),
             helper.make_node("NonZero", ["y"], ["nz"], name="nonzero")]
    graph = helper.make_graph(nodes, "outs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 5]),
                               helper.make_tensor_value_info("s", TensorProto.INT64, [2]),
                               helper.make_tensor_value_info("nz", TensorProto.INT64, [2, None])])
    model = onnx.helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = save(model, tmp_path / "outs.onnx")
    manifest = compile_model(path, tmp_path / "outs.fml")
    assert [(o.name, o.shape, o.dtype) for o in manifest.outputs] == [
        ("y", (3, 5), "float32"), ("s", (2,), "int64"), ("nz", (2, -1), "int64")]
    assert manifest.verification["passed"] is True
    assert manifest.outputs[2].describe() == "nz: int64[2, ?]"
    session = forgeml.load(tmp_path / "outs.fml")
    for seed in (4, 5):
        x = np.random.default_rng(seed).standard_normal((3, 5)).astype("float32")
        got, want = session.run({"x": x}), ort_run(path, {"x": x})
        for name in ("y", "s", "nz"):
            np.testing.assert_array_equal(got[name], want[name])


def test_zero_size_dimension(tmp_path):
    """A dimension of 0 is a size, not a symbolic dimension: the model compiles, verifies and runs on
    empty inputs (numpy may give an empty array zero strides, which TVM refused as not compact)."""
    path = save(mlp_model(batch=0), tmp_path / "empty.onnx")
    manifest = compile_model(path, tmp_path / "empty.fml")
    assert manifest.inputs[0].shape == (0, 16) and manifest.outputs[0].shape == (0, 10)
    assert manifest.verification["passed"] is True
    session = forgeml.load(tmp_path / "empty.fml")
    buffer = np.empty(64 + 16, "float32")
    offset = (-buffer.ctypes.data % 64) // 4
    zero_strides = np.ndarray((0, 16), "float32", buffer=buffer[offset:offset + 16], strides=(0, 0))
    assert zero_strides.ctypes.data % 64 == 0 and zero_strides.flags.c_contiguous
    for x in (np.zeros((0, 16), "float32"), zero_strides):
        assert session.run({"x": x})["y"].shape == (0, 10)
    dyn = save(mlp_model(batch="N"), tmp_path / "dyn.onnx")
    manifest = compile_model(dyn, tmp_path / "dyn.fml", CompileOptions(input_shapes={"x": (0, 16)}))
    assert manifest.inputs[0].shape == (0, 16)


def test_slice_with_runtime_starts_and_ends(tmp_path):
    """Slice whose starts, ends, axes and steps are inputs: FoldConstant left the bindings of
    dynamic_strided_slice's trial legalization (a call of a `shape_func` the module never received)
    and FuseOps failed with "There is no definition of I.GlobalVar("shape_func")". An empty slice (start
    past end) is an empty tensor, not a negative length (std::bad_alloc)."""
    from onnx import TensorProto, helper

    ints = [helper.make_tensor_value_info(n, TensorProto.INT64, [2]) for n in ("starts", "ends", "axes", "steps")]
    graph = helper.make_graph([helper.make_node("Slice", ["x", "starts", "ends", "axes", "steps"], ["y"],
                                                name="slice")], "slice",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [20, 10, 5]), *ints],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None, None])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = save(model, tmp_path / "slice.onnx")
    compile_model(path, tmp_path / "slice.fml", CompileOptions(verify=False))
    session = forgeml.load(tmp_path / "slice.fml")
    x = np.random.default_rng(0).standard_normal((20, 10, 5)).astype("float32")
    for starts, ends, axes, steps in (([0, 0], [3, 10], [0, 1], [1, 1]), ([-1, 1], [-8, 1000], [0, -1], [-2, 2]),
                                      ([5, 0], [2, 10], [0, 1], [1, 1]), ([2, 0], [5, 10], [0, 1], [-1, 1])):
        feeds = {"x": x, **{k: np.array(v, "int64") for k, v in
                            zip(("starts", "ends", "axes", "steps"), (starts, ends, axes, steps), strict=True)}}
        np.testing.assert_array_equal(session.run(feeds)["y"], ort_run(path, feeds)["y"])


def test_seeded_inputs_both_runtimes_reject_skip_verification(tmp_path):
    """Squeeze's axes as an input: the seeded axes (random in [0, 10)) name dimensions that are not 1, so
    ONNX Runtime refuses them and forgeml's match_cast fails on them too. That is a skipped verification,
    not a compile failure; valid axes then run as in ONNX Runtime."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Squeeze", ["x", "axes"], ["y"], name="squeeze")], "squeeze",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 5]),
                               helper.make_tensor_value_info("axes", TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4, 5])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = save(model, tmp_path / "squeeze.onnx")
    manifest = compile_model(path, tmp_path / "squeeze.fml")
    assert "forgeml rejects them too" in manifest.verification["skipped"]
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 3, 4, 5)).astype("float32"),
             "axes": np.array([0], "int64")}
    np.testing.assert_array_equal(forgeml.load(tmp_path / "squeeze.fml").run(feeds)["y"], ort_run(path, feeds)["y"])


def test_expand_with_runtime_shape(tmp_path):
    """Expand whose target shape is an input broadcasts with the input's dimensions: [3, 1] by [2, 1, 6]
    is [2, 3, 6] (TVM gave [2, 1, 6])."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Expand", ["x", "shape"], ["y"], name="expand")], "expand",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 1]),
                               helper.make_tensor_value_info("shape", TensorProto.INT64, [3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None, None])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = save(model, tmp_path / "expand.onnx")
    compile_model(path, tmp_path / "expand.fml")
    session = forgeml.load(tmp_path / "expand.fml")
    x = np.arange(3, dtype="float32").reshape(3, 1)
    for shape in ([2, 1, 6], [1, 3, 4], [4, 1, 1]):
        feeds = {"x": x, "shape": np.array(shape, "int64")}
        np.testing.assert_array_equal(session.run(feeds)["y"], ort_run(path, feeds)["y"])


@pytest.mark.parametrize("shape", [(2, 3, 4), (3, 0, 5)])
def test_trilu_with_runtime_k(tmp_path, shape):
    """Trilu whose k is an input: TVM's converter failed to import a zero-size one ("The type is not
    populated"), and the empty [3, 0, 5] input's staging buffer had numpy's strides (5, 5, 1) where TVM
    wants the compact (0, 5, 1): "expected to be compact array"."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Trilu", ["x", "k"], ["y"], name="tril", upper=0)], "tril",
                              [helper.make_tensor_value_info("x", TensorProto.INT64, list(shape)),
                               helper.make_tensor_value_info("k", TensorProto.INT64, [])],
                              [helper.make_tensor_value_info("y", TensorProto.INT64, list(shape))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = save(model, tmp_path / "tril.onnx")
    assert compile_model(path, tmp_path / "tril.fml").verification["passed"] is True
    session = forgeml.load(tmp_path / "tril.fml")
    x = np.arange(math.prod(shape), dtype="int64").reshape(shape)
    for k in (-1, 0, 2):
        feeds = {"x": x, "k": np.array(k, "int64")}
        np.testing.assert_array_equal(session.run(feeds)["y"], ort_run(path, feeds)["y"])
