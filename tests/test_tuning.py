"""Tuning is never wasted: records persist per target, are shared across models, and a warm
compile runs no trials. Budgets are tiny here; speed is proven by benchmarks/cpu.py."""

from __future__ import annotations

import json

import pytest
from conftest import mlp_model, save

import forgeml
from forgeml.cli import main as cli_main
from forgeml.compiler.build import CompileOptions, compile_model, tune_model
from forgeml.errors import InvalidInput
from forgeml.runtime.artifact import open_artifact


@pytest.mark.slow
def test_tune_then_warm_compile_runs_no_trials(tmp_path, isolated_cache):
    onnx_path = save(mlp_model(), tmp_path / "mlp.onnx")
    first = tune_model(onnx_path, "x86-64", trials=8)
    assert first.tasks >= 2 and first.trials >= 8 and first.tasks_from_cache == 0
    assert cli_main(["tune", str(onnx_path), "--trials", "8"]) == 0  # the CLI path: resumes, same database
    db_dirs = list((isolated_cache / "tuning").iterdir())
    assert len(db_dirs) == 1 and db_dirs[0].name.startswith("llvm-")
    assert (db_dirs[0] / "records.json").stat().st_size > 0

    # Another model holding the same kernels (other weights) reuses them: matching is structural.
    other = save(mlp_model(seed=1), tmp_path / "other.onnx")
    manifest = compile_model(other, tmp_path / "other.fml")
    t = manifest.tuning
    assert t["trials"] == 0 and t["tasks_from_cache"] >= 1
    assert t["tuned_kernels_used"] + t["rule_kernels_kept"] >= 1
    assert manifest.verification["passed"] is True
    rules = json.loads((db_dirs[0] / "rule_latency.json").read_text())
    assert rules, "the rule-based schedules were measured for comparison"

    assert cli_main(["compile", str(other), "-o", str(tmp_path / "plain.fml"), "--no-tuning-db"]) == 0
    assert open_artifact(tmp_path / "plain.fml").manifest.tuning == {}
    untuned = compile_model(other, tmp_path / "plain2.fml", CompileOptions(use_tuning_db=False))
    assert untuned.tuning == {}
    assert forgeml.load(tmp_path / "other.fml").inputs == forgeml.load(tmp_path / "plain.fml").inputs


def test_tune_needs_a_budget(tmp_path):
    onnx_path = save(mlp_model(), tmp_path / "mlp.onnx")
    with pytest.raises(InvalidInput, match="budget"):
        tune_model(onnx_path, "x86-64")


def _pool_model():
    import numpy as np
    from conftest import _model
    from onnx import TensorProto, helper

    w = np.random.default_rng(0).standard_normal((8, 4, 3, 3)).astype("float32")
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("MaxPool", ["c"], ["y"], kernel_shape=[2, 2], strides=[2, 2])]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 4, 4])], {"W": w})


@pytest.mark.parametrize("target_json", [{"kind": "llvm", "mcpu": "haswell", "num-cores": 2},
                                         {"kind": "cuda", "arch": "sm_90", "host": {"kind": "llvm"}}])
def test_tuning_input_has_no_unregistered_schedule_rules(tmp_path, target_json):
    """Legalized pooling carries schedule_rule="meta_schedule.pool_max", which TVM registers for no CPU
    and not for CUDA: MetaSchedule warned "Unknown schedule rule" per pool kernel. The tuning input drops it."""
    import tvm

    from forgeml.compiler import pipeline
    from forgeml.compiler.frontend import onnx_model
    from forgeml.compiler.frontend.relax_import import import_onnx as _import_onnx

    loaded = onnx_model.load_onnx(save(_pool_model(), tmp_path / "pool.onnx"), {})
    target = tvm.target.Target(target_json)
    mod = pipeline.tuning_input(_import_onnx(loaded), target)
    kernels = {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    assert any("pool" in name for name in kernels)
    assert not [name for name, f in kernels.items() if "schedule_rule" in f.script()]


@pytest.mark.slow
def test_tuning_a_pool_prints_no_unknown_rule_warning(tmp_path):
    """`forgeml tune` on a model with a max pool, in a subprocess (TVM's C++ warnings go to fd 2)."""
    import os
    import subprocess
    import sys

    onnx_path = save(_pool_model(), tmp_path / "pool.onnx")
    code = f"from forgeml.cli import main; raise SystemExit(main(['tune', {str(onnx_path)!r}, '--trials', '4']))"
    env = {**os.environ, "FORGEML_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "trials" in done.stderr + done.stdout
    assert "Unknown schedule rule" not in done.stderr + done.stdout


@pytest.mark.slow
def test_kernels_are_tuned_in_order_of_rule_time(tmp_path, isolated_cache):
    """`by_rule_time` orders the kernels by the rules' latency x uses (cached in rule_latency.json, so
    the comparison after tuning measures nothing again); unmeasurable kernels come first."""
    import tvm

    from forgeml.compiler import pipeline
    from forgeml.compiler.frontend import onnx_model, relax_import
    from forgeml.compiler.tuning import database, search
    from forgeml.targets.registry import resolve_target

    onnx_path = save(mlp_model(), tmp_path / "mlp.onnx")
    loaded = onnx_model.load_onnx(onnx_path)
    target = tvm.target.Target(resolve_target("x86-64").tvm_target())
    mod = pipeline.tuning_input(relax_import.import_onnx(loaded), target)
    tasks = search.extract(mod, search.tuning_target(target))
    assert len(tasks) >= 2
    tuning_target = search.tuning_target(target)
    ordered = search.by_rule_time(tasks, tuning_target)  # measures each rule schedule once
    assert sorted(t.task_name for t in ordered) == sorted(t.task_name for t in tasks)
    keys = [search.rule_key(t.dispatched[0], tuning_target) for t in tasks]
    cached = database.read_rule_latencies(tuning_target)
    assert all(k in cached for k in keys)
    # with made-up latencies the order follows them: the cheapest first in FLOPs order goes last
    fake = {k: 1e-3 * (n + 1) for n, k in enumerate(keys)}
    fake[keys[-1]] = None
    database.save_rule_latencies(tuning_target, fake)
    ordered = search.by_rule_time(tasks, tuning_target)
    expect = [tasks[-1]] + [tasks[n] for n in sorted(range(len(tasks) - 1),
                                                     key=lambda n: -fake[keys[n]] * float(tasks[n].weight))]
    assert [t.task_name for t in ordered] == [t.task_name for t in expect]
