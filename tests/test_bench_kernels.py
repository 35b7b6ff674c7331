"""Per-kernel profiles (forgeml.bench.kernels): both engines profiled in processes of their own, on a
small real model; only the shape of the result is checked, never a speed."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import mlp_model, save

from forgeml.bench import kernels
from forgeml.compiler.build import CompileOptions, compile_model
from forgeml.errors import InvalidInput


def test_profiles_of_both_engines_and_their_table(tmp_path, isolated_cache):
    onnx_path = save(mlp_model(), tmp_path / "mlp.onnx")
    compile_model(onnx_path, tmp_path / "mlp.fml", CompileOptions(use_tuning_db=False))
    feeds = {"x": np.random.default_rng(0).standard_normal((4, 16)).astype("float32")}
    pair = kernels.profile_pair(tmp_path / "mlp.fml", onnx_path, threads=1, runs=3, feeds=feeds)
    forgeml = [kernels.KernelTime(**r) for r in pair["forgeml"]]
    ort = [kernels.KernelTime(**r) for r in pair["onnxruntime"]]
    assert forgeml and ort
    assert [r.ms for r in forgeml] == sorted((r.ms for r in forgeml), reverse=True)
    assert any("matmul" in r.name for r in forgeml), forgeml  # the model's kernels, by their fused ops
    assert all(r.calls >= 1 and r.ms >= 0 for r in forgeml + ort)
    assert any(r.name.startswith("MatMul") or r.name.startswith("Gemm") for r in ort), ort
    lines = kernels.section("mlp", pair, top=3)
    assert lines[0] == "### mlp" and sum(line.startswith("| ") for line in lines) == 1 + 3 + 1  # header, rows, total


def test_unknown_engine_and_a_failing_profile_are_one_line_errors(tmp_path):
    with pytest.raises(InvalidInput, match="unknown engine 'tvm'"):
        kernels.profile("tvm", tmp_path / "m.fml", {}, 1)
    with pytest.raises(Exception, match="forgeml kernel profile failed") as err:
        kernels.profile("forgeml", tmp_path / "missing.fml", {}, 1)
    assert "\n" not in str(err.value)
