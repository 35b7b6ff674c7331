"""CUDA targets: compile here (nvcc, no GPU needed), kernels prebuilt into the library as a fatbin,
fp16 mixed precision, verification skipped with a reason when no GPU; running needs a GPU (skipped
with a reason otherwise)."""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import artifact_library, cnn_model, mlp_model, ort_run, save

from forgeml.compiler.build import CompileOptions, compile_model
from forgeml.errors import ArtifactError, InvalidInput
from forgeml.runtime.artifact import open_artifact

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) is not installed here")


def _has_gpu() -> bool:
    from forgeml.targets.host import has_cuda_gpu

    return has_cuda_gpu()


NO_GPU = "no CUDA GPU on this machine: CUDA artifacts are built and inspected here, run on a GPU machine"


def _compiled(tmp_path_factory, model, name: str, **options):
    """(onnx path, artifact path, manifest) of `model` compiled with CompileOptions(**options)."""
    d = tmp_path_factory.mktemp(name)
    onnx_path = save(model, d / f"{name}.onnx")
    manifest = compile_model(onnx_path, d / f"{name}.fml", CompileOptions(**options))
    return onnx_path, d / f"{name}.fml", manifest


@pytest.fixture(scope="module")
def cuda_mlp(tmp_path_factory):
    return _compiled(tmp_path_factory, mlp_model(), "mlp", target="cuda-sm90", cuda_graph=False)


@pytest.fixture(scope="module")
def cuda_cnn_fp16(tmp_path_factory):
    return _compiled(tmp_path_factory, cnn_model(), "cnn16", target="cuda", precision="fp16")


@pytest.fixture(scope="module")
def cuda_cnn_graph(tmp_path_factory):
    return _compiled(tmp_path_factory, cnn_model(), "cnn_graph", target="cuda-sm90")


def test_cuda_graph_captures_the_static_launches(cuda_cnn_graph, cuda_mlp):
    _, artifact, manifest = cuda_cnn_graph
    assert manifest.compile_options["cuda_graph"] is True, "on by default for CUDA targets"
    assert b"vm.builtin.cuda_graph.run_or_capture" in artifact_library(artifact)
    _, plain, manifest = cuda_mlp  # --no-cuda-graph
    assert manifest.compile_options["cuda_graph"] is False
    assert b"vm.builtin.cuda_graph" not in artifact_library(plain)


def test_cuda_graph_needs_a_gpu_target(tmp_path):
    path = save(mlp_model(), tmp_path / "m.onnx")
    with pytest.raises(InvalidInput, match="--cuda-graph needs a GPU target"):
        compile_model(path, tmp_path / "m.fml", CompileOptions(target="x86-64", cuda_graph=True))
    assert not (tmp_path / "m.fml").exists()


def test_cuda_artifact_embeds_prebuilt_kernels(cuda_mlp):
    from forgeml.compiler.cuda.fatbin import FATBIN_MAGIC, embedded_cuda_kernels

    _, artifact, manifest = cuda_mlp
    assert manifest.target["device"] == "cuda" and manifest.target["target"]["kind"] == "cuda"
    assert manifest.target["target"]["arch"] == "sm_90"
    kernels = embedded_cuda_kernels(artifact_library(artifact))
    assert kernels and all(fmt == "fatbin" and size > 1000 for fmt, size in kernels), kernels
    assert FATBIN_MAGIC in artifact_library(artifact)
    assert manifest.compile_options["cuda_kernels"]["kernels_format"] == "fatbin"
    assert manifest.compile_options["precision"] == "fp32"
    assert open_artifact(artifact).manifest.members.keys() == {"model.so", "weights.bin"}


def test_cuda_verification_skipped_with_reason(cuda_mlp):
    _, _, manifest = cuda_mlp
    if _has_gpu():
        assert manifest.verification["passed"] is True
    else:
        assert manifest.verification["skipped"] == "no CUDA GPU on this machine"
        assert manifest.verification["tolerance"] == 1e-3


def test_cuda_weights_are_parameters(cuda_mlp):
    _, artifact, manifest = cuda_mlp
    shapes = sorted(tuple(w.shape) for w in manifest.weights)
    assert shapes == [(16, 32), (32, 10)] and all(w.dtype == "float32" for w in manifest.weights)
    assert len(artifact_library(artifact)) < 2_000_000


def test_fp16_mixed_precision(cuda_cnn_fp16):
    _, _, manifest = cuda_cnn_fp16
    assert manifest.compile_options["precision"] == "fp16"
    assert manifest.verification["tolerance"] == 2e-2
    assert {w.dtype for w in manifest.weights} == {"float16"}, "weights should fold into fp16 constants"
    assert [t.dtype for t in manifest.inputs] == ["float32"] and [t.dtype for t in manifest.outputs] == ["float32"]


def test_fp16_needs_a_gpu_target(tmp_path):
    path = save(mlp_model(), tmp_path / "m.onnx")
    with pytest.raises(InvalidInput, match="--precision fp16 needs a GPU target"):
        compile_model(path, tmp_path / "m.fml", CompileOptions(target="x86-64", precision="fp16"))
    assert not (tmp_path / "m.fml").exists()


def test_every_gpu_kernel_is_scheduled_convs_as_gemm():
    import tvm

    from forgeml.compiler.cuda import pipeline as cuda_pipeline
    from forgeml.compiler.frontend import onnx_model
    from forgeml.compiler.frontend.relax_import import import_onnx as _import_onnx

    with tempfile.TemporaryDirectory() as tmp:
        loaded = onnx_model.load_onnx(save(cnn_model(), Path(tmp) / "cnn.onnx"), {})
        mod = _import_onnx(loaded)
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90", "host": {"kind": "llvm"}})
    with target:
        mod = tvm.transform.Sequential(cuda_pipeline.graph_passes("fp32") + cuda_pipeline.lower_passes())(mod)
    summary = cuda_pipeline.schedule_summary(mod, target)
    assert "none" not in summary.values(), summary
    assert all(rule == "Matmul" for name, rule in summary.items() if "conv2d" in name), summary


def test_module_blob_roundtrip():
    from forgeml.compiler.cuda.fatbin import _str, pack_module_blob, parse_module_blob, split_cuda_module

    cuda = _str(b"fatbin") + (0).to_bytes(8, "little") + _str(b"\x50\xed\x55\xba payload")
    blob = pack_module_blob([0, 1, 2, 2], [1, 2], [("relax.VMExecutable", b"exe"), ("_lib", None),
                                                    ("cuda", cuda)])
    assert parse_module_blob(blob) == ([0, 1, 2, 2], [1, 2], [("relax.VMExecutable", b"exe"), ("_lib", None),
                                                              ("cuda", cuda)])
    assert split_cuda_module(cuda) == ("fatbin", (0).to_bytes(8, "little"), b"\x50\xed\x55\xba payload")


def test_cli_compiles_fp16_for_cuda(tmp_path):
    path = save(mlp_model(), tmp_path / "m.onnx")
    proc = subprocess.run([sys.executable, "-m", "forgeml.cli", "compile", str(path), "-t", "cuda-sm90",
                           "--precision", "fp16", "-o", str(tmp_path / "m.fml")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    manifest = open_artifact(tmp_path / "m.fml").manifest
    assert manifest.compile_options["precision"] == "fp16"
    if not _has_gpu():
        assert "not verified: no CUDA GPU on this machine" in proc.stderr


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None and platform.machine() != "aarch64",
                    reason="jetson-orin needs g++-aarch64-linux-gnu (make toolchains)")
def test_jetson_orin_cross_links_host_code(tmp_path):
    from forgeml.compiler.cuda.fatbin import embedded_cuda_kernels

    path = save(mlp_model(), tmp_path / "m.onnx")
    manifest = compile_model(path, tmp_path / "m.fml", CompileOptions(target="jetson-orin"))
    lib = artifact_library(tmp_path / "m.fml")
    assert lib[:4] == b"\x7fELF" and lib[18:20] == (183).to_bytes(2, "little")  # e_machine EM_AARCH64
    assert manifest.target["arch"] == "aarch64" and manifest.compile_options["cuda_kernels"]["arch"] == "sm_87"
    assert embedded_cuda_kernels(lib)[0][0] == "fatbin"


def test_loading_without_gpu_is_a_clear_error(cuda_mlp):
    if _has_gpu():
        pytest.skip("this machine has a CUDA GPU")
    code = (f"import forgeml\ntry:\n    forgeml.load({str(cuda_mlp[1])!r})\nexcept Exception as e:\n"
            "    print(type(e).__name__, e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    if ArtifactError.__name__ not in out:  # the CUDA runtime loaded (driver present, no device)
        pytest.skip(f"CUDA runtime loadable here: {out.strip()[:200]}")
    assert "runs on a CUDA GPU" in out


@pytest.mark.parametrize("which", ["cuda_mlp", "cuda_cnn_fp16", "cuda_cnn_graph"])
def test_cuda_artifact_runs_on_gpu(which, request):
    if not _has_gpu():
        pytest.skip(NO_GPU)
    import forgeml
    from forgeml.runtime.device import DeviceRunner

    onnx_path, artifact, manifest = request.getfixturevalue(which)
    session = forgeml.load(artifact)
    x = np.random.default_rng(1).standard_normal(session.inputs[0].shape).astype("float32")
    expected = ort_run(onnx_path, {"x": x})
    got = session.run({"x": x})
    tol = manifest.verification["tolerance"]
    for name, ref in expected.items():
        assert np.max(np.abs(got[name] - ref)) <= tol * max(np.max(np.abs(ref)), 1e-12)
    again = session.run({"x": 2 * x})  # a CUDA graph replays with the new input
    for name, ref in ort_run(onnx_path, {"x": 2 * x}).items():
        assert np.max(np.abs(again[name] - ref)) <= tol * max(np.max(np.abs(ref)), 1e-12)
    runner = DeviceRunner(session, {"x": x})
    runner()
    np.testing.assert_allclose(runner.outputs()["y"], got["y"], rtol=1e-6, atol=1e-6)


def test_depthwise_conv_gets_one_thread_per_output():
    """dlight's row-reduction rules wasted most threads on 3x3 depthwise convolutions (MobileNetV2 b32: 69 ms
    vs PyTorch's 6 ms on an H200); forgeml's ShortReduction rule takes them."""
    import onnx
    import tvm
    from onnx import TensorProto, helper, numpy_helper

    from forgeml.compiler.cuda import pipeline as cuda_pipeline
    from forgeml.compiler.frontend import onnx_model
    from forgeml.compiler.frontend.relax_import import import_onnx as _import_onnx

    w = np.random.default_rng(0).standard_normal((32, 1, 3, 3)).astype("float32")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], group=32, name="dw")], "dw",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 32, 28, 28])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 32, 28, 28])], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(model, str(Path(tmp) / "dw.onnx"))
        mod = _import_onnx(onnx_model.load_onnx(Path(tmp) / "dw.onnx", {}))
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90", "host": {"kind": "llvm"}})
    with target:
        mod = tvm.transform.Sequential(cuda_pipeline.graph_passes("fp32") + cuda_pipeline.lower_passes())(mod)
    summary = cuda_pipeline.schedule_summary(mod, target)
    assert [rule for name, rule in summary.items() if "conv2d" in name] == ["ShortReduction"], summary


def _conv64_model():
    """A 64-channel 3x3 convolution + bias + ReLU at batch 8, 32x32: an fp16 tensor-core GEMM."""
    from conftest import _model
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    weights = {"w": (rng.standard_normal((64, 64, 3, 3)) * 0.05).astype("float32"),
               "b": rng.standard_normal(64).astype("float32")}
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"])]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 64, 32, 32])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 64, 32, 32])], weights)


def _check_on_gpu(onnx_path: Path, artifact: Path) -> None:
    """Where a GPU is at hand: the artifact's output matches ONNX Runtime's within fp16's tolerance."""
    if not _has_gpu():
        return
    import forgeml

    x = np.random.default_rng(1).standard_normal((8, 64, 32, 32)).astype("float32")
    got = forgeml.load(artifact).run({"x": x})["y"]
    ref = ort_run(onnx_path, {"x": x})["y"]
    assert np.max(np.abs(got - ref)) <= 2e-2 * np.max(np.abs(ref))


def test_fp16_64_channel_convolution_builds_with_64_wide_tensor_core_tiles(tmp_path):
    """N = 64 GEMMs get 128 x 64 wmma tiles (forgeml's copy of dlight's schedule); their fp32
    staging tile must live in static shared memory, else TVM's lowering rejects the build."""
    path = save(_conv64_model(), tmp_path / "conv64.onnx")
    manifest = compile_model(path, tmp_path / "conv64.fml", CompileOptions(target="cuda-sm90", precision="fp16"))
    assert manifest.compile_options["precision"] == "fp16"
    _check_on_gpu(path, tmp_path / "conv64.fml")


def test_mma_tensor_core_schedule_builds_and_is_recorded(tmp_path):
    """`--tensor-core-schedule mma`: the fp16 convolutions on mma.sync + cp.async (nvcc builds them);
    on a GPU, the outputs match ONNX Runtime's."""
    path = save(_conv64_model(), tmp_path / "conv64.onnx")
    mma = compile_model(path, tmp_path / "mma.fml", CompileOptions(target="cuda-sm90", precision="fp16",
                                                                   tensor_core_schedule="mma"))
    compile_model(path, tmp_path / "wmma.fml", CompileOptions(target="cuda-sm90", precision="fp16"))
    assert mma.compile_options["tensor_core_schedule"] == "mma"
    assert artifact_library(tmp_path / "mma.fml") != artifact_library(tmp_path / "wmma.fml")
    _check_on_gpu(path, tmp_path / "mma.fml")
    with pytest.raises(InvalidInput, match="add --precision fp16"):
        compile_model(path, tmp_path / "x.fml", CompileOptions(target="cuda-sm90", tensor_core_schedule="mma"))
    with pytest.raises(InvalidInput, match="needs an sm_80\\+ GPU target"):
        compile_model(path, tmp_path / "x.fml", CompileOptions(target="x86-64", precision="fp16",
                                                               tensor_core_schedule="mma"))
    assert not (tmp_path / "x.fml").exists()


def test_cuda_tuning_batch_builds_tensor_core_candidates_and_tuned_kernels_compile(tmp_path, monkeypatch):
    """MetaSchedule on CUDA: a measurement batch of fp16 candidates, tensor-core ones included (TVM's
    own rule's candidates all failed to build: forgeml stages accumulators in static shared memory),
    each a library with prebuilt kernels. Without a GPU the timings are written here in its place (the
    rule-based schedules made slowest), to check that imported CUDA records compile into an artifact."""
    import json

    from forgeml.compiler.build import import_measurements, tune_model
    from forgeml.compiler.cuda.fatbin import embedded_cuda_kernels
    from forgeml.runtime.measure import measure_batch

    monkeypatch.setenv("FORGEML_CACHE", str(tmp_path / "cache"))
    path = save(mlp_model(batch=64, features=64, hidden=64, out=64), tmp_path / "mlp64.onnx")
    batch_dir = tmp_path / "batch"
    summary = tune_model(path, "cuda-sm90", trials=8, precision="fp16", measure_elsewhere=batch_dir)
    assert summary.kernels_in_batch == 2 and summary.candidates >= 4 and summary.build_errors == 0
    batch = json.loads((batch_dir / "batch.json").read_text())
    assert batch["device"] == "cuda"
    for c in batch["candidates"]:
        assert [fmt for fmt, _ in embedded_cuda_kernels((batch_dir / c["library"]).read_bytes())] == ["fatbin"]
    records = (batch_dir / "candidates.json").read_text()
    assert "wmma_sync_16x16x16_f16f16f32" in records, "no tensor-core candidate"

    if not _has_gpu():
        with pytest.raises(InvalidInput, match="no CUDA GPU"):
            tune_model(path, "cuda-sm90", trials=8, precision="fp16")
        with pytest.raises(InvalidInput, match="CUDA GPU"):
            measure_batch(batch_dir)
        stand_in = {c["id"]: {"run_secs": [1e-3 if c["kind"] == "rules" else 1e-5 * (i + 1)]}
                    for i, c in enumerate(batch["candidates"])}
        (batch_dir / "results.json").write_text(json.dumps({"format": 1, "results": stand_in,
                                                            "device": {"name": "stand-in"}}))
    else:
        measure_batch(batch_dir)
    imported = import_measurements(batch_dir)
    assert imported.records == summary.candidates and imported.rule_latencies == 2
    manifest = compile_model(path, tmp_path / "tuned.fml", CompileOptions(target="cuda-sm90", precision="fp16"))
    assert manifest.tuning["tasks_from_cache"] == 2
    assert manifest.tuning["tuned_kernels_used"] + manifest.tuning["rule_kernels_kept"] == 2
    if not _has_gpu():
        assert manifest.tuning["tuned_kernels_used"] == 2
    else:
        x = np.random.default_rng(0).standard_normal((64, 64)).astype("float32")
        import forgeml

        got = forgeml.load(tmp_path / "tuned.fml").run({"x": x})["y"]
        ref = ort_run(path, {"x": x})["y"]
        assert np.max(np.abs(got - ref)) <= 2e-2 * np.max(np.abs(ref))


def test_cuda_batch_of_tensor_core_tilings_alone(tmp_path, monkeypatch):
    """`--trials 0`: forgeml's own tensor-core tilings of each fp16 GEMM (no MetaSchedule search),
    timed beside the rule's schedule; an imported tiling is replayed from the database at compile."""
    import json

    from conftest import _model
    from onnx import TensorProto, helper

    from forgeml.compiler.build import import_measurements, tune_model

    monkeypatch.setenv("FORGEML_CACHE", str(tmp_path / "cache"))
    w = np.random.default_rng(0).standard_normal((256, 64)).astype("float32") / 16
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1024, 256])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1024, 64])
    path = save(_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [x], [y], {"w": w}), tmp_path / "mm.onnx")
    batch_dir = tmp_path / "batch"
    summary = tune_model(path, "cuda-sm90", trials=0, precision="fp16", measure_elsewhere=batch_dir)
    assert summary.kernels_in_batch == 2 and summary.rule_candidates == 2  # the matmul and the input's cast
    # wmma: 5 tilings x 2 A orders; mma.sync: 128 x 64 and 64 x 64 tiles x 2 K steps x 2 C orders
    assert summary.variants == 18 and summary.candidates == 18 and summary.build_errors == 0
    candidates = json.loads((batch_dir / "candidates.json").read_text())["candidates"]
    sources = [c["source"] for c in candidates if c["kind"] == "tuned"]
    assert "wmma 128x64x64 (4 warps, A by rows)" in sources and all(c["comparable"] for c in candidates)
    fastest = "mma 128x64x32 (4 warps, 3 stages, 8-byte copies)"  # w is [K, N]: B's K is strided
    assert fastest in sources, "; ".join(sources)

    if _has_gpu():
        from forgeml.runtime.measure import measure_batch

        measure_batch(batch_dir)
    else:  # stand-in timings: an mma.sync tiling fastest
        stand_in = {c["id"]: {"run_secs": [1e-5 if c.get("source") == fastest else 1e-3]} for c in candidates}
        (batch_dir / "results.json").write_text(json.dumps({"format": 1, "results": stand_in,
                                                            "device": {"name": "stand-in"}}))
    imported = import_measurements(batch_dir)
    assert imported.records == 18 and imported.wrong == 0
    if not _has_gpu():
        assert {k["kernel"]: k["best_source"] for k in imported.kernels}["matmul"] == fastest
    manifest = compile_model(path, tmp_path / "mm.fml", CompileOptions(target="cuda-sm90", precision="fp16"))
    if not _has_gpu():
        assert manifest.tuning["tuned_kernels_used"] == 1
        # and the tiling is in the code (once, a rule latency computed at compile rescheduled the
        # database's workload in place: the records were counted as used and matched nothing)
        compile_model(path, tmp_path / "rules.fml", CompileOptions(target="cuda-sm90", precision="fp16",
                                                                  use_tuning_db=False))
        assert artifact_library(tmp_path / "mm.fml") != artifact_library(tmp_path / "rules.fml")
    else:
        feeds = {"x": np.random.default_rng(1).standard_normal((1024, 256)).astype("float32")}
        import forgeml

        got = forgeml.load(tmp_path / "mm.fml").run(feeds)["y"]
        ref = ort_run(path, feeds)["y"]
        assert np.max(np.abs(got - ref)) <= 2e-2 * np.max(np.abs(ref))


def _depthwise_model():
    """Depthwise 3x3 (groups = channels), ReLU, pointwise 1x1, global average pool: MobileNet's block."""
    from conftest import _model
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w = {"dw": rng.standard_normal((8, 1, 3, 3)).astype("float32"),
         "pw": rng.standard_normal((16, 8, 1, 1)).astype("float32") * 0.3}
    nodes = [helper.make_node("Conv", ["x", "dw"], ["a"], pads=[1, 1, 1, 1], group=8),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Conv", ["r", "pw"], ["c"]),
             helper.make_node("GlobalAveragePool", ["c"], ["y"])]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8, 16, 16])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16, 1, 1])], w)


def _deep_conv_model():
    """Two 3x3 convolutions of 64 channels on 7x7 at batch 1: few output tiles and K = 576, split
    along K (gpu_splitk) before the layout conversion."""
    from conftest import _model
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w = {"w1": rng.standard_normal((64, 64, 3, 3)).astype("float32") * 0.05,
         "w2": rng.standard_normal((64, 64, 3, 3)).astype("float32") * 0.05}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1, 1, 1, 1])]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 7, 7])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 7, 7])], w)


@pytest.mark.parametrize("make_model", [cnn_model, _depthwise_model, _deep_conv_model])
def test_nhwc_graph_computes_what_the_model_does(tmp_path, make_model):
    """--conv-layout NHWC rewrites the graph (relax ConvertLayout: transposed input, OHWI weights, the
    pool and flatten following); the rewrite is target-independent, so it is checked on the CPU here
    (TVM's default CPU build of the rewritten graph) against ONNX Runtime."""
    import tvm
    from tvm import relax

    from forgeml.compiler.cuda import pipeline as cuda_pipeline
    from forgeml.compiler.frontend import onnx_model
    from forgeml.compiler.frontend.relax_import import import_onnx as _import_onnx

    path = save(make_model(), tmp_path / "m.onnx")
    loaded = onnx_model.load_onnx(path, {})
    with tvm.target.Target("llvm"):
        mod = tvm.transform.Sequential(cuda_pipeline.graph_passes("fp32", "NHWC"))(_import_onnx(loaded))
    text = mod.script(show_meta=False)
    assert 'data_layout="NCHW"' not in text
    assert ('data_layout="NHWC"' in text) != (make_model is _deep_conv_model)  # split-K: no convolution left
    spec = loaded.inputs[0]
    x = np.random.default_rng(1).standard_normal(spec.shape).astype("float32")
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    ref = ort_run(path, {spec.name: x})[loaded.model.graph.output[0].name]
    assert np.max(np.abs(got - ref)) <= 1e-4 * np.max(np.abs(ref))


def test_fp16_convolutions_default_to_nhwc(tmp_path, cuda_cnn_fp16, cuda_cnn_graph):
    """fp16 GPU builds put the convolutions in NHWC by default (`--conv-layout auto`, the resolved
    layout recorded in the manifest); NCHW is one option away and builds other kernels; fp32 builds
    keep NCHW; CPU targets take `auto` and refuse NHWC in one line. On a GPU, both fp16 layouts
    compute what ONNX Runtime does."""
    from forgeml.compiler.cuda.fatbin import embedded_cuda_kernels

    path, nhwc_artifact, nhwc = cuda_cnn_fp16
    assert nhwc.compile_options["conv_layout"] == "NHWC"
    assert cuda_cnn_graph[2].compile_options["conv_layout"] == "NCHW"
    nchw = compile_model(path, tmp_path / "nchw.fml",
                         CompileOptions(target="cuda", precision="fp16", conv_layout="NCHW"))
    assert nchw.compile_options["conv_layout"] == "NCHW"
    assert [fmt for fmt, _ in embedded_cuda_kernels(artifact_library(tmp_path / "nchw.fml"))] == ["fatbin"]
    assert artifact_library(tmp_path / "nchw.fml") != artifact_library(nhwc_artifact)
    with pytest.raises(InvalidInput, match="--conv-layout NHWC needs a GPU target"):
        compile_model(path, tmp_path / "cpu.fml", CompileOptions(target="x86-64", conv_layout="NHWC"))
    assert not (tmp_path / "cpu.fml").exists()
    if _has_gpu():
        import forgeml

        x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype("float32")
        ref = ort_run(path, {"x": x})["y"]
        for artifact in (nhwc_artifact, tmp_path / "nchw.fml"):
            got = forgeml.load(artifact).run({"x": x})["y"]
            assert np.max(np.abs(got - ref)) <= 2e-2 * np.max(np.abs(ref)), artifact.name
