"""Baselines at stated precisions: the fp16 copy of a model (onnxconverter-common) run by ONNX Runtime
on the CPU, GPU baselines refused in one line where their provider is missing, and ratios printed
only between rows of equal precision."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import cnn_model, ort_run, save

from forgeml.bench.baselines import BASELINES, PROVIDERS, available_providers, check_provider, fp16_copy, gpu_runner
from forgeml.bench.harness import CaseResult, Report, Stats
from forgeml.bench.report import rows
from forgeml.cli import main
from forgeml.errors import BaselineUnavailable, InvalidInput


def test_fp16_copy_keeps_fp32_io_and_matches_within_fp16_tolerance(tmp_path):
    source = save(cnn_model(), tmp_path / "cnn.onnx")
    copy = fp16_copy(source)
    assert fp16_copy(source) == copy and not list(copy.parent.glob("*.tmp"))  # once per content, atomic
    model = onnx.load(copy)
    float_type = onnx.TensorProto.FLOAT
    assert all(v.type.tensor_type.elem_type == float_type for v in [*model.graph.input, *model.graph.output])
    floats = {float_type, onnx.TensorProto.FLOAT16}
    assert {i.data_type for i in model.graph.initializer if i.data_type in floats} == {onnx.TensorProto.FLOAT16}
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)}
    expected, got = ort_run(source, feeds), ort_run(copy, feeds)  # the CPU provider runs the fp16 model
    for name, ref in expected.items():
        assert got[name].dtype == np.float32 and got[name].shape == ref.shape
        rel = float(np.abs(got[name] - ref).max() / np.abs(ref).max())
        assert 0 < rel < 1e-2, (name, rel)  # computed in fp16 (not bit-equal), within fp16 tolerance


def test_fp16_copy_of_a_broken_model_is_one_line(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(InvalidInput, match="cannot make an fp16 copy of bad.onnx") as err:
        fp16_copy(bad)
    assert "\n" not in str(err.value)
    with pytest.raises(InvalidInput, match="cannot read the baseline model"):
        fp16_copy(tmp_path / "missing.onnx")


@pytest.mark.parametrize("name", ["onnxruntime-trt-fp16", "onnxruntime-tf32-off"])
def test_gpu_baselines_without_their_provider_are_one_line(name, tmp_path):
    provider = PROVIDERS[BASELINES[name].provider]
    if provider in available_providers():
        pytest.skip(f"{provider} is available here")
    with pytest.raises(BaselineUnavailable, match=f"baseline {name}: provider not available: .*no {provider}"):
        check_provider(BASELINES[name])
    source = save(cnn_model(), tmp_path / "cnn.onnx")
    with pytest.raises(BaselineUnavailable, match="provider not available"):
        gpu_runner(BASELINES[name], source, {"x": np.zeros((1, 3, 32, 32), np.float32)})


def test_bench_refuses_a_missing_provider_in_one_line(compiled_mlp, capsys):
    if PROVIDERS["tensorrt"] in available_providers():
        pytest.skip("TensorRT is available here")
    _, artifact = compiled_mlp
    assert main(["bench", str(artifact), "--baseline", "onnxruntime-trt-fp16", "--repeat", "3", "--no-memory"]) == 2
    err = capsys.readouterr().err.strip()
    assert "provider not available" in err and "TensorrtExecutionProvider" in err and len(err.splitlines()) <= 3


def _case(name: str, model: str, precision: str, p50: float, reference: bool = False) -> CaseResult:
    return CaseResult(name=name, engine="onnxruntime" if reference else "forgeml", model=model,
                      stats=Stats.of([p50 / 1e3] * 3), samples_ms=[p50] * 3,
                      extra={"reference": reference, "precision": precision})


def test_ratios_only_between_rows_of_equal_precision():
    report = Report(machine={}, settings={}, cases=[
        _case("forgeml fp16", "m", "fp16", 1.0),
        _case("forgeml fp32", "m", "fp32", 4.0),
        _case("onnxruntime-cuda (TF32)", "m", "tf32", 2.0, reference=True),
        _case("onnxruntime-cuda-fp16", "m", "fp16", 1.6, reference=True),
        _case("onnxruntime-trt-fp16", "m", "fp16", 0.8, reference=True),
        _case("forgeml fp16 other model", "n", "fp16", 1.0),
    ])
    table = {r[0]: (r[1], r[-1]) for r in rows(report)}
    assert table["forgeml fp16"] == ("fp16", "0.62x")  # against ORT fp16, never the TF32 row
    assert table["forgeml fp32"] == ("fp32", "-")  # no fp32 baseline: no ratio (TF32 is not fp32)
    assert table["onnxruntime-cuda (TF32)"] == ("tf32", "ref")
    assert table["onnxruntime-cuda-fp16"] == ("fp16", "ref")
    assert table["onnxruntime-trt-fp16"] == ("fp16", "0.50x")
    assert table["forgeml fp16 other model"] == ("fp16", "-")


def test_bench_fp16_baseline_runs_on_the_cpu_and_names_every_precision(compiled_mlp, tmp_path, capsys):
    _, artifact = compiled_mlp
    code = main(["bench", str(artifact), "--baseline", "onnxruntime", "--baseline", "onnxruntime-fp16",
                 "--repeat", "10", "--warmup", "2", "--no-memory", "--json", str(tmp_path / "r.json")])
    assert code == 0, capsys.readouterr().err
    cases = {c["name"].split()[0]: c for c in json.loads((tmp_path / "r.json").read_text())["cases"]}
    assert {k: c["extra"]["precision"] for k, c in cases.items()} == {
        "forgeml": "fp32", "onnxruntime": "fp32", "onnxruntime-fp16": "fp16"}
    assert cases["onnxruntime-fp16"]["extra"]["path"].endswith("-fp16.onnx")
    out = capsys.readouterr().out
    assert "precision" in out and "fp16" in out


def _gpu_bench_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
    spec = importlib.util.spec_from_file_location("forgeml_gpu_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_report_ratios_only_between_equal_precisions():
    gpu = _gpu_bench_module()
    info = {"torch_tf32_conv": True, "torch_tf32_matmul": False}
    assert [gpu._precision(label, info) for label in ("forgeml fp16", "forgeml fp32", "onnxruntime cuda tf32",
            "onnxruntime cuda fp32", "onnxruntime cuda fp16", "onnxruntime trt fp16", "pytorch eager fp32",
            "pytorch eager fp16")] == ["fp16", "fp32", "tf32", "fp32", "fp16", "fp16", "tf32", "fp16"]

    def row(precision: str, p50: float) -> dict:
        return {"precision": precision, "passed": True, "max_rel_error": 1e-3,
                "stats": {"p50_ms": p50, "p90_ms": p50, "min_ms": p50, "throughput_per_s": 1e3 / p50}}

    engines = {"forgeml fp16": row("fp16", 1.0), "forgeml fp32": row("fp32", 4.0),
               "onnxruntime cuda tf32": row("tf32", 2.0), "onnxruntime cuda fp16": row("fp16", 1.5),
               "onnxruntime trt fp16": {"precision": "fp16", "error": "BaselineUnavailable: baseline "
                                        "onnxruntime-trt-fp16: provider not available"},
               "pytorch eager fp16": row("fp16", 3.0)}
    assert gpu.same_precision_ratio(engines, "onnxruntime cuda", "fp16", 1.0) == "1.50x"
    assert gpu.same_precision_ratio(engines, "onnxruntime cuda", "fp32", 4.0) == "-"  # the TF32 row is not fp32
    assert gpu.same_precision_ratio(engines, "onnxruntime trt", "fp16", 1.0) == "-"  # not measured
    results = {"machine": {"gpu": {}}, "settings": {}, "target": "cuda-sm90", "cases": [
        {"id": "resnet18_b1", "model": "resnet18", "batch": 1, "engines": engines}]}
    table = {line.split("|")[3].strip(): line for line in gpu.markdown(results).splitlines()
             if line.startswith("| resnet18")}
    assert "| fp16 | 1.000 |" in table["forgeml fp16"] and "| 1.50x | - | 3.00x |" in table["forgeml fp16"]
    assert "| - | - | - |" in table["forgeml fp32"]
    assert "not measured: BaselineUnavailable" in table["onnxruntime trt fp16"]


def test_paired_ratio_cancels_a_drift_that_the_p50_ratio_takes_in():
    """forgeml 0.9x ONNX Runtime throughout; the machine slows 3x in round 5, between forgeml's block and
    ONNX Runtime's. ORT then has half its samples slow and forgeml 40%: the p50s land in different
    clusters and their ratio reads 0.47x. The paired ratio (rounds of blocks) stays 0.9x."""
    from forgeml.bench.harness import paired_ratio

    rng = np.random.default_rng(0)
    forgeml, ort = [], []
    for round_ in range(10):
        forgeml += list(0.9 * (3.0 if round_ >= 6 else 1.0) * (1 + 0.01 * rng.standard_normal(10)))
        ort += list(1.0 * (3.0 if round_ >= 5 else 1.0) * (1 + 0.01 * rng.standard_normal(10)))
    assert np.median(forgeml) / np.median(ort) < 0.6
    assert paired_ratio(forgeml, ort) == pytest.approx(0.9, rel=0.03)
    assert paired_ratio([1.0] * 5, [1.0] * 5) is None  # less than one round


def test_alternation_rotates_which_engine_starts_each_round():
    """Round k starts with engine k: no engine always runs right after the same other one."""
    from forgeml.bench.harness import measure_blocks

    order: list[str] = []

    def runner(name):
        def run_block(n):
            order.append(name)
            return [1.0] * n
        return run_block

    samples = measure_blocks({n: runner(n) for n in "abc"}, warmup=1, repeat=6, block=2, pause_s=0)
    assert order[:3] == ["a", "b", "c"]  # the warm-up calls
    assert "".join(order[3:]) == "abc" + "bca" + "cab"
    assert all(len(v) == 6 for v in samples.values())
