"""forgeml.runtime: loads without the compiler, validates inputs, refuses bad artifacts, thread-safe."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import ort_run

import forgeml
from forgeml.errors import ArtifactError, InvalidInput
from forgeml.runtime.artifact import MANIFEST, Manifest, open_artifact, write_artifact
from forgeml.runtime.schema import seal


def _rewrite(src: Path, dst: Path, edit_manifest=None, edit_member=None) -> Path:
    """A copy of `src` with its manifest and members edited, the manifest's digest recomputed (as anyone can)."""
    with tarfile.open(src) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    manifest = json.loads(members.pop(MANIFEST))
    if edit_manifest:
        edit_manifest(manifest)
    if edit_member:
        name, fn = edit_member
        members[name] = fn(members[name])
    with tarfile.open(dst, "w") as tar:
        import io

        for name, data in [(MANIFEST, seal(manifest)), *members.items()]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return dst


def test_run_matches_onnxruntime(compiled_cnn):
    onnx_path, artifact = compiled_cnn
    session = forgeml.load(artifact)
    x = np.random.default_rng(3).standard_normal((1, 3, 32, 32)).astype("float32")
    np.testing.assert_allclose(session.run({"x": x})["y"], ort_run(onnx_path, {"x": x})["y"], rtol=1e-4, atol=1e-4)


def test_wrong_inputs_list_what_the_model_expects(compiled_mlp):
    session = forgeml.load(compiled_mlp[1])
    x = np.zeros((4, 16), "float32")
    with pytest.raises(InvalidInput, match=r"unknown input 'inp'; the model expects x: float32\[4, 16\]"):
        session.run({"inp": x})
    with pytest.raises(InvalidInput, match=r"input 'x' has shape \[4, 15\], expected \[4, 16\]"):
        session.run({"x": np.zeros((4, 15), "float32")})
    with pytest.raises(InvalidInput, match="input 'x' has dtype float64, expected float32"):
        session.run({"x": x.astype("float64")})  # refused, as ONNX Runtime refuses it
    with pytest.raises(InvalidInput, match="missing input 'x'"):
        session.run({})


def test_non_contiguous_input_is_copied(compiled_mlp):
    session = forgeml.load(compiled_mlp[1])
    base = np.random.default_rng(4).standard_normal((16, 4)).astype("float32")
    strided = base.T  # a view, not C-contiguous
    assert not strided.flags.c_contiguous
    np.testing.assert_array_equal(session.run({"x": strided})["y"], session.run({"x": strided.copy()})["y"])


def test_outputs_stay_valid_and_unaligned_inputs_are_staged(compiled_mlp):
    """A later run must not overwrite earlier outputs; an input that is not 64-byte aligned goes through
    the session's staging buffer and gives the same result."""
    session = forgeml.load(compiled_mlp[1])
    rng = np.random.default_rng(6)
    x1, x2 = (rng.standard_normal((4, 16)).astype("float32") for _ in range(2))
    first = session.run({"x": x1})["y"]
    kept = first.copy()
    second = session.run({"x": x2})["y"]
    np.testing.assert_array_equal(first, kept)
    assert not np.array_equal(first, second)
    raw = np.empty(4 * 16 * 4 + 64 + 4, np.uint8)
    start = (-raw.ctypes.data) % 64 + 4  # 4 bytes past a 64-byte boundary
    unaligned = raw[start:start + 4 * 16 * 4].view("float32").reshape(4, 16)
    unaligned[...] = x1
    assert unaligned.ctypes.data % 64 == 4
    np.testing.assert_array_equal(session.run({"x": unaligned})["y"], kept)


def test_outputs_that_are_an_input_or_a_weight_are_copies(tmp_path):
    """A model may return an input, a weight or a constant as is: writing to the output array must not
    change the caller's array or the model."""
    from conftest import _model, save
    from onnx import TensorProto, helper

    w = np.arange(8, dtype="float32").reshape(2, 4)
    nodes = [helper.make_node("Identity", ["x"], ["same"]), helper.make_node("Identity", ["W"], ["weight"]),
             helper.make_node("Add", ["x", "W"], ["sum"])]
    spec = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 4]) for n in ("same", "weight", "sum")]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])], spec, {"W": w})
    onnx_path = save(model, tmp_path / "alias.onnx")
    forgeml.compile_model(onnx_path, tmp_path / "alias.fml")
    session = forgeml.load(tmp_path / "alias.fml")
    x = np.ones((2, 4), "float32")
    for _ in range(2):
        out = session.run({"x": x})
        np.testing.assert_array_equal(out["sum"], x + w)
        for name in ("same", "weight"):
            out[name][...] = -1.0
        np.testing.assert_array_equal(x, np.ones((2, 4), "float32"))
        np.testing.assert_array_equal(session.run({"x": x})["weight"], w)


def test_fast_tar_reader_agrees_with_tarfile(compiled_cnn, tmp_path):
    """The runtime reads write_artifact's plain ustar headers itself (no tarfile import at load); any
    other layout (here a pax header for a long name) falls back to tarfile."""
    from forgeml.runtime.artifact import _plain_ustar_members, _tar_members

    artifact = compiled_cnn[1]
    assert _plain_ustar_members(artifact) == _tar_members(artifact)
    import io
    import tarfile

    with tarfile.open(tmp_path / "pax.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("manifest.json", "x" * 150):
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    assert _plain_ustar_members(tmp_path / "pax.tar") is None
    assert set(_tar_members(tmp_path / "pax.tar")) == {"manifest.json", "x" * 150}


def test_tampered_member_is_refused_before_loading(compiled_mlp, tmp_path):
    bad = _rewrite(compiled_mlp[1], tmp_path / "bad.fml",
                   edit_member=("model.so", lambda b: b[:-1] + bytes([b[-1] ^ 1])))
    with pytest.raises(ArtifactError, match="checksum mismatch in 'model.so'"):
        forgeml.load(bad)


def test_weight_outside_weights_bin_is_refused(compiled_mlp, tmp_path):
    bad = _rewrite(compiled_mlp[1], tmp_path / "bad.fml",
                   edit_manifest=lambda m: m["weights"][0].update(offset=1 << 30))
    with pytest.raises(ArtifactError, match="weight 'w0' lies outside weights.bin"):
        forgeml.load(bad)


def test_manifest_round_trips_through_json(compiled_mlp):
    manifest = open_artifact(compiled_mlp[1]).manifest
    data = manifest.to_json()
    assert Manifest.from_json(json.loads(json.dumps(data))) == manifest
    data["target"]["arch"] = "edited"  # a copy: the manifest keeps its own
    assert manifest.target["arch"] != "edited"
    assert manifest.inputs[0].describe() == "x: float32[4, 16]"


def test_newer_format_and_other_arch_are_refused(compiled_mlp, tmp_path):
    newer = _rewrite(compiled_mlp[1], tmp_path / "newer.fml", edit_manifest=lambda m: m.update(format_version=99))
    with pytest.raises(ArtifactError, match="format 99, newer than this runtime understands"):
        forgeml.load(newer)
    other = _rewrite(compiled_mlp[1], tmp_path / "arm.fml",
                     edit_manifest=lambda m: m["target"].update(arch="aarch64", name="rpi4"))
    with pytest.raises(ArtifactError, match="compiled for aarch64"):
        forgeml.load(other)


def test_not_an_artifact(tmp_path):
    junk = tmp_path / "junk.fml"
    junk.write_bytes(b"not a tar file at all" * 10)
    with pytest.raises(ArtifactError, match="not a readable forgeml artifact"):
        forgeml.load(junk)
    with pytest.raises(ArtifactError, match="artifact not found"):
        forgeml.load(tmp_path / "missing.fml")


def test_write_is_atomic(tmp_path, compiled_mlp):
    manifest = open_artifact(compiled_mlp[1]).manifest

    class Boom(bytes):
        def __len__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        weights = open_artifact(compiled_mlp[1]).read_member("weights.bin")
        write_artifact(tmp_path / "a.fml", manifest, {"model.so": Boom(b"x"), "weights.bin": weights})
    assert list(tmp_path.iterdir()) == []


def test_many_threads_give_serial_outputs(compiled_cnn):
    session = forgeml.load(compiled_cnn[1])
    rng = np.random.default_rng(5)
    inputs = [rng.standard_normal((1, 3, 32, 32)).astype("float32") for _ in range(8)]
    expected = [session.run({"x": x})["y"] for x in inputs]
    errors = []

    def worker(i: int) -> None:
        for _ in range(200):
            if not np.array_equal(session.run({"x": inputs[i]})["y"], expected[i]):
                errors.append(i)
                return

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_runtime_loads_without_compiler_onnx_or_torch(compiled_mlp):
    code = f"""
import sys, numpy as np, forgeml
s = forgeml.load({str(compiled_mlp[1])!r})
s.run({{"x": np.zeros((4, 16), "float32")}})
mods = sorted(m for m in sys.modules if m.split(".")[0] in ("onnx", "onnxruntime", "torch", "tvm"))
maps = open("/proc/self/maps").read()
print(mods, "libtvm_compiler" in maps, "libtvm_runtime" in maps, "libtorch" in maps)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] False True False"


def test_artifacts_loaded_one_after_another_keep_their_own_kernels(compiled_mlp, compiled_cnn):
    """A fresh process loads one model, then another while the first stays loaded: each must run its own
    library (the dynamic loader hands back an already loaded library when a path repeats)."""
    code = f"""
import sys, numpy as np, forgeml
sessions = []
for path, shape in [({str(compiled_mlp[1])!r}, (4, 16)), ({str(compiled_cnn[1])!r}, (1, 3, 32, 32))]:
    sessions.append(forgeml.load(path))
    x = np.random.default_rng(0).standard_normal(shape).astype("float32")
    np.save(sys.argv[1] + "/" + str(len(shape)) + ".npy", sessions[-1].run({{"x": x}})["y"])
"""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-c", code, tmp], capture_output=True, text=True, check=True)
        for (onnx_path, _), shape in [(compiled_mlp, (4, 16)), (compiled_cnn, (1, 3, 32, 32))]:
            x = np.random.default_rng(0).standard_normal(shape).astype("float32")
            got = np.load(f"{tmp}/{len(shape)}.npy")
            np.testing.assert_allclose(got, ort_run(onnx_path, {"x": x})["y"], rtol=1e-4, atol=1e-4)


def test_modules_skipped_at_runtime_import_stay_importable(compiled_mlp):
    """The runtime keeps tvm_ffi's optional imports (torch, importlib.metadata, tvm_ffi.cpp, ...) out of
    its cold start; afterwards the same process must still get the real modules, and the compiler."""
    code = f"""
import sys, numpy as np, forgeml
s = forgeml.load({str(compiled_mlp[1])!r})
y = s.run({{"x": np.ones((4, 16), "float32")}})["y"]
stand_ins = [m for m in ("importlib.metadata", "tvm_ffi.cpp", "tvm_ffi._optional_torch_c_dlpack", "ml_dtypes",
                         "tvm_ffi.dataclasses.gen_abi_cpp") if m in sys.modules]
import importlib.metadata, tvm_ffi.cpp, tvm_ffi._optional_torch_c_dlpack
assert importlib.metadata.version("numpy") == np.__version__
assert callable(tvm_ffi.cpp.load_inline)
from tvm_ffi.dataclasses import gen_abi_cpp
assert "static_assert(sizeof(::tvm::ffi::Object)" in gen_abi_cpp("ffi.Object")
assert tvm_ffi.dataclasses.gen_abi_cpp is sys.modules["tvm_ffi.dataclasses.gen_abi_cpp"].gen_abi_cpp
import tvm
assert tvm.target.Target("llvm").kind.name == "llvm"
print(stand_ins, float(s.run({{"x": np.ones((4, 16), "float32")}})["y"].sum() - y.sum()))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] 0.0"


def test_ten_thousand_runs_do_not_grow_memory(compiled_cnn):
    code = f"""
import resource, numpy as np, forgeml
s = forgeml.load({str(compiled_cnn[1])!r}, threads=2)
x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype("float32")
for _ in range(100):
    s.run({{"x": x}})
after_100 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for _ in range(10_000):
    s.run({{"x": x}})
print(after_100, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    after_100, after_10k = int(out[0]), int(out[1])
    assert after_10k <= after_100 * 1.05, (after_100, after_10k)


def _embedding_model(vocab: int = 50):
    """ids [2, 3] (through Unsqueeze/Squeeze, shape-only) -> Gather rows of a [vocab, 8] table."""
    from conftest import _model
    from onnx import TensorProto, helper

    weights = {"table": np.random.default_rng(0).standard_normal((vocab, 8)).astype("float32"),
               "axes": np.array([0], "int64")}
    nodes = [helper.make_node("Unsqueeze", ["ids", "axes"], ["ids1"]),
             helper.make_node("Squeeze", ["ids1", "axes"], ["ids2"]),
             helper.make_node("Gather", ["table", "ids2"], ["y"], axis=0)]
    return _model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 3])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 8])], weights)


@pytest.fixture(scope="module")
def compiled_embedding(tmp_path_factory):
    from conftest import _compile_once

    return _compile_once(tmp_path_factory, "embedding", _embedding_model())


def test_gather_indices_get_a_valid_range(compiled_embedding):
    onnx_path, artifact = compiled_embedding
    session = forgeml.load(artifact)
    assert session.inputs[0].valid_range == (-50, 49)
    ids = np.array([[0, 49, -50], [-1, 7, 3]], dtype="int64")  # negative indices count from the end (ONNX)
    np.testing.assert_array_equal(session.run({"ids": ids})["y"], ort_run(onnx_path, {"ids": ids})["y"])


@pytest.mark.parametrize("bad", [50, -51, 10**9])
def test_out_of_range_indices_are_refused_not_a_crash(compiled_embedding, bad):
    """A compiled gather does not check bounds (it read out of bounds and crashed the process)."""
    session = forgeml.load(compiled_embedding[1])
    ids = np.array([[1, 2, 3], [4, bad, 6]], dtype="int64")
    with pytest.raises(InvalidInput, match=f"input 'ids' holds {bad}, outside \\[-50, 49\\]"):
        session.run({"ids": ids})  # the fast path (contiguous int64)
    with pytest.raises(InvalidInput, match="outside"):
        session.run({"ids": ids.tolist()})  # the general path
    assert session.run({"ids": np.zeros((2, 3), "int64")})["y"].shape == (2, 3, 8)


def test_small_tables_verify_with_indices_inside_them(tmp_path):
    """Seeded verification inputs stay inside an index input's range (ids up to 9 into a 5-row table
    made ONNX Runtime itself fail)."""
    from conftest import save

    manifest = forgeml.compile_model(save(_embedding_model(vocab=5), tmp_path / "e.onnx"), tmp_path / "e.fml")
    assert manifest.verification["passed"] and manifest.inputs[0].valid_range == (-5, 4)


def test_unwritable_tmpdir_is_one_clear_error(compiled_mlp, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "missing"))
    with pytest.raises(ArtifactError) as info:
        forgeml.load(compiled_mlp[1])
    message = str(info.value)
    assert "cannot write the model library" in message and "set TMPDIR" in message
    assert "failed to load" not in message  # not wrapped a second time
