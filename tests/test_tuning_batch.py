"""Tuning measured elsewhere: candidates built here, timed by the runtime alone, records imported back.

Here the "elsewhere" is this machine's CPU (the same code path a GPU server or a device takes);
tests/test_cuda.py writes a CUDA batch. Budgets are tiny; speed is proven by the benchmarks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import artifact_library, mlp_model, save

from forgeml.cli import main as cli_main
from forgeml.compiler.build import CompileOptions, compile_model, import_measurements, tune_model
from forgeml.errors import InvalidInput
from forgeml.runtime.measure import measure_batch


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """A tuning database of this test's own (the session's is shared with other tests)."""
    monkeypatch.setenv("FORGEML_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _measure_in_runtime_only_process(batch_dir) -> str:
    """Run the measuring worker in a fresh process; returns what it imported/mapped of the compiler."""
    code = f"""
import json, sys
from pathlib import Path
from forgeml.runtime.measure import _worker
batch = json.loads(Path({str(batch_dir)!r}, "batch.json").read_text())
_worker(Path({str(batch_dir)!r}), [c["id"] for c in batch["candidates"]][:2])
mods = sorted(m for m in sys.modules if m.split(".")[0] in ("onnx", "onnxruntime", "torch", "tvm"))
print(mods, "libtvm_compiler" in open("/proc/self/maps").read(), file=sys.stderr)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(lines) == 2 and all("run_secs" in line for line in lines), lines
    return done.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_batch_round_trip_then_compile_uses_it(tmp_path, own_cache):
    onnx_path = save(mlp_model(batch=8, features=64, hidden=128), tmp_path / "mlp.onnx")
    batch_dir = tmp_path / "batch"
    summary = tune_model(onnx_path, "x86-64", trials=8, measure_elsewhere=batch_dir)
    assert summary.kernels_in_batch == summary.kernels == 2
    assert summary.candidates >= 2 and summary.rule_candidates == 2 and summary.build_errors == 0
    batch = json.loads((batch_dir / "batch.json").read_text())
    assert batch["device"] == "cpu" and len(batch["candidates"]) == summary.candidates + summary.rule_candidates
    assert all((batch_dir / c["library"]).is_file() for c in batch["candidates"])

    # The measuring side needs the runtime only.
    assert _measure_in_runtime_only_process(batch_dir) == "[] False"

    with pytest.raises(InvalidInput, match="measure it first"):
        import_measurements(batch_dir)
    assert cli_main(["measure", str(batch_dir)]) == 0
    results = json.loads((batch_dir / "results.json").read_text())["results"]
    assert set(results) == {c["id"] for c in batch["candidates"]}
    assert all(r.get("run_secs") and min(r["run_secs"]) > 0 for r in results.values()), results

    assert cli_main(["tune-import", str(batch_dir)]) == 0
    with pytest.raises(InvalidInput, match="already imported"):
        import_measurements(batch_dir)
    (db,) = (own_cache / "tuning").iterdir()
    assert len((db / "records.json").read_text().splitlines()) == summary.candidates
    assert len(json.loads((db / "rule_latency.json").read_text())) >= 2

    # Every kernel now has records: a compile applies them wherever they beat the rules, and verifies.
    manifest = compile_model(onnx_path, tmp_path / "mlp.fml")
    t = manifest.tuning
    assert t["tasks_from_cache"] == 2 and t["trials"] == 0
    assert t["tuned_kernels_used"] + t["rule_kernels_kept"] == 2
    assert manifest.verification["passed"] is True
    if t["tuned_kernels_used"]:  # a record counted as used is in the code
        compile_model(onnx_path, tmp_path / "rules.fml", CompileOptions(use_tuning_db=False))
        assert artifact_library(tmp_path / "mlp.fml") != artifact_library(tmp_path / "rules.fml")

    # A second batch searches only with --refine, starting from the records (the cost model learns them).
    with pytest.raises(InvalidInput, match="--refine"):
        tune_model(onnx_path, "x86-64", trials=8, measure_elsewhere=tmp_path / "again")
    again = tune_model(onnx_path, "x86-64", trials=8, measure_elsewhere=tmp_path / "again", refine=True)
    assert again.candidates >= 1 and again.rule_candidates == 2  # the rules are retimed beside them
    def schedules(path):
        entries = json.loads((path / "candidates.json").read_text())["candidates"]
        return [json.dumps(e["record"][0]) for e in entries if e["kind"] == "tuned"]

    assert not set(schedules(batch_dir)) & set(schedules(tmp_path / "again")), "a measured schedule came back"


def _softmax_model():
    """One CPU kernel whose schedules all take the same arguments (no packed weights): outputs comparable."""
    from conftest import _model
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 256])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 256])
    return _model([helper.make_node("Softmax", ["x"], ["s"], axis=-1), helper.make_node("Sigmoid", ["s"], ["y"])],
                  [x], [y], {})


def _wrong_kernel_library(path, shape) -> None:
    """A kernel with the same signature that computes something else (x + 1)."""
    import tvm
    from tvm import te

    x = te.placeholder(shape, "float32", name="x")
    y = te.compute(shape, lambda i, j: x[i, j] + 1.0, name="y")
    tvm.compile(tvm.IRModule({"main": te.create_prim_func([x, y])}), target="llvm").export_library(str(path))


def test_candidates_with_wrong_outputs_are_never_committed(tmp_path, own_cache):
    onnx_path = save(_softmax_model(), tmp_path / "softmax.onnx")
    batch_dir = tmp_path / "batch"
    summary = tune_model(onnx_path, "x86-64", trials=6, measure_elsewhere=batch_dir)
    batch = json.loads((batch_dir / "batch.json").read_text())
    tuned = [c for c in batch["candidates"] if c["kind"] == "tuned"]
    assert all(c["comparable"] and c["outputs"] == [1] for c in batch["candidates"])
    bad = tuned[0]
    _wrong_kernel_library(batch_dir / bad["library"], tuple(bad["args"][0]["shape"]))

    results = measure_batch(batch_dir)["results"]
    assert results[bad["id"]]["max_rel_error"] > 0.1
    assert all(results[c["id"]]["max_rel_error"] < 1e-5 for c in tuned[1:]), results
    assert not (batch_dir / "references").exists()  # the rule schedule's outputs go once measured

    imported = import_measurements(batch_dir)
    assert imported.wrong == 1 and imported.records == summary.candidates - 1
    (db,) = (own_cache / "tuning").iterdir()
    assert len((db / "records.json").read_text().splitlines()) == summary.candidates - 1


def test_max_relative_error():
    import numpy as np

    from forgeml.runtime.measure import max_relative_error

    ref = np.array([[1.0, -4.0], [np.nan, np.inf]], np.float32)
    assert max_relative_error([ref.copy()], [ref]) == 0.0  # NaN and inf where the reference has them
    off = ref.copy()
    off[0, 0] = 1.4
    assert max_relative_error([off], [ref]) == pytest.approx(0.1)  # |1.4 - 1| / max finite |ref| (4)
    off[0, 0] = np.nan
    assert max_relative_error([off], [ref]) == float("inf")
    assert max_relative_error([ref[:1]], [ref]) == float("inf")


def test_candidate_arguments_are_reused_and_outputs_poisoned():
    """A kernel's inputs are filled once for all its candidates; its outputs are overwritten before
    each one (NaN, or an integer's maximum), so a candidate that skips elements cannot pass on the
    values its predecessor wrote."""
    import numpy as np

    from forgeml.runtime.measure import _arguments
    from forgeml.runtime.native import load_runtime

    ffi = load_runtime("cpu")
    specs = [{"dtype": "float32", "shape": [4, 4]}, {"dtype": "int32", "shape": [3]},
             {"dtype": "float16", "shape": [2, 2]}]
    cache: dict = {}
    first = _arguments(ffi, specs, [1, 2], "cpu", cache)
    inputs = np.from_dlpack(first[0]).copy()
    np.from_dlpack(first[1])[:] = 7  # what a candidate wrote
    np.from_dlpack(first[2])[:] = 1
    again = _arguments(ffi, specs, [1, 2], "cpu", cache)
    assert again is first and np.array_equal(np.from_dlpack(again[0]), inputs) and np.abs(inputs).max() > 0
    assert (np.from_dlpack(again[1]) == np.iinfo(np.int32).max).all() and np.isnan(np.from_dlpack(again[2])).all()
    other = _arguments(ffi, specs[:1], [0], "cpu", cache)  # the next kernel: arguments of its own
    assert other is not first and np.isnan(np.from_dlpack(other[0])).all()


def test_measure_records_hung_candidates_and_resumes(tmp_path, own_cache):
    onnx_path = save(mlp_model(), tmp_path / "mlp.onnx")
    batch_dir = tmp_path / "batch"
    tune_model(onnx_path, "x86-64", trials=4, measure_elsewhere=batch_dir)
    ids = [c["id"] for c in json.loads((batch_dir / "batch.json").read_text())["candidates"]]

    doc = measure_batch(batch_dir, timeout_s=1e-4)  # no worker answers that fast: each one is killed
    assert set(doc["results"]) == set(ids)
    assert all("took over" in r["error"] for r in doc["results"].values()), doc["results"]

    # Drop two results: a new run measures just those and keeps the others as they were.
    kept = json.loads((batch_dir / "results.json").read_text())
    for cid in ids[:2]:
        del kept["results"][cid]
    (batch_dir / "results.json").write_text(json.dumps(kept))
    batch = json.loads((batch_dir / "batch.json").read_text())
    (batch_dir / batch["candidates"][1]["library"]).write_bytes(b"not a library")  # fails to load: a result
    seen = []
    doc = measure_batch(batch_dir, progress=lambda n, total: seen.append(n))
    assert "run_secs" in doc["results"][ids[0]] and "error" in doc["results"][ids[1]]
    assert "took over" not in doc["results"][ids[1]]["error"]
    assert all("took over" in doc["results"][cid]["error"] for cid in ids[2:])
    assert seen[0] == len(ids) - 1  # the first save already counted the kept results


def test_batch_errors_are_one_line(tmp_path, own_cache, capsys):
    onnx_path = save(mlp_model(), tmp_path / "mlp.onnx")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert cli_main(["tune", str(onnx_path), "--trials", "4", "--measure-elsewhere", str(tmp_path / "full")]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert cli_main(["tune", str(onnx_path), "--minutes", "1", "--measure-elsewhere", str(tmp_path / "b")]) == 2
    assert "--trials" in capsys.readouterr().err
    assert cli_main(["measure", str(tmp_path)]) == 2
    assert "no batch.json" in capsys.readouterr().err
    assert cli_main(["tune-import", str(tmp_path)]) == 2
    assert "not a forgeml measurement batch" in capsys.readouterr().err
    assert cli_main(["tune", str(onnx_path), "--precision", "fp16", "--trials", "4"]) == 2
    assert "GPU target" in capsys.readouterr().err
    with pytest.raises(InvalidInput, match="-O O2"):
        compile_model(onnx_path, tmp_path / "x.fml", CompileOptions(opt_level="O0", tune_trials=4))
    assert not (tmp_path / "b").exists() and not (tmp_path / "x.fml").exists()


def test_cuda_tuning_target_and_design_space():
    """CUDA targets get the limits MetaSchedule's GPU rules need, under the same database key; the
    tensor-core design space only where the GPU has tensor cores (sm_70+)."""
    import tvm

    from forgeml.compiler.tuning import database, search

    raw = tvm.target.Target({"kind": "cuda", "arch": "sm_90", "host": {"kind": "llvm"}})
    full = database.tuning_target(raw)
    assert int(full.attrs["max_threads_per_block"]) == 1024 and full.host is not None
    assert database.tuning_target(full).same_as(full)  # idempotent
    assert database.target_key(raw) == database.target_key(full)
    assert database.target_key(raw) != database.target_key(tvm.target.Target({"kind": "cuda", "arch": "sm_80"}))
    other_host = tvm.target.Target({"kind": "cuda", "arch": "sm_90", "host": {"kind": "llvm", "mcpu": "znver4"}})
    assert database.target_key(other_host) == database.target_key(raw)  # kernels do not depend on the host CPU

    def rule_names(arch):
        space = search.space_generator(tvm.target.Target({"kind": "cuda", "arch": arch}))
        return [type(r).__name__ for r in space.sch_rules]

    assert "MultiLevelTilingTensorCore" in rule_names("sm_90")
    assert "MultiLevelTilingTensorCore" not in rule_names("sm_61")
    assert search.space_generator(tvm.target.Target("llvm")) == "post-order-apply"


def test_candidates_are_shared_by_flops(tmp_path):
    """The heavier kernel gets more of a batch; every kernel covered gets the minimum; no more than asked."""
    import tvm

    from forgeml.compiler import pipeline
    from forgeml.compiler.frontend import onnx_model
    from forgeml.compiler.frontend.relax_import import import_onnx as _import_onnx
    from forgeml.compiler.tuning import search
    from forgeml.compiler.tuning.batch import MIN_PER_KERNEL, share_trials

    loaded = onnx_model.load_onnx(save(mlp_model(batch=8, features=64, hidden=128), tmp_path / "mlp.onnx"), {})
    target = tvm.target.Target({"kind": "llvm", "mcpu": "haswell", "num-cores": 2})
    kernels = sorted(search.extract(pipeline.tuning_input(_import_onnx(loaded), target), target),
                     key=search.flops, reverse=True)
    assert len(kernels) == 2 and search.flops(kernels[0]) > 5 * search.flops(kernels[1])
    shares = share_trials(kernels, 100)
    assert len(shares) == 2 and sum(shares) <= 100 and shares[0] > 5 * shares[1] >= 5 * MIN_PER_KERNEL
    assert share_trials(kernels, 2 * MIN_PER_KERNEL) == [MIN_PER_KERNEL, MIN_PER_KERNEL]
    assert share_trials(kernels, MIN_PER_KERNEL + 1) == [MIN_PER_KERNEL + 1]  # the heaviest only
    assert share_trials(kernels, 2) == [2]
