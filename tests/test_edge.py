"""Edge targets end to end: resnet18 cross-compiled for aarch64 and riscv64, an aarch64 artifact verified
under qemu against ONNX Runtime, and RPC benchmarks against a local server and an aarch64 server
under qemu, all in the benchmark report format.

Needs `make toolchains` (cross compilers, qemu-user, Debian's arm64 package lists; without them those
tests skip with the reason, and fail instead under FORGEML_REQUIRE_TOOLCHAINS=1, as in CI); the emulated
aarch64 device (Debian .debs + aarch64 wheels) is built on first use under $FORGEML_CACHE.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cnn_model, save
from test_targets import EM_AARCH64, EM_RISCV, elf_header
from toolchains import CROSS_COMPILERS, QEMU, require_tools, skip_or_fail

import forgeml
from forgeml.cli import main


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def device():
    """The emulated aarch64 device (about 40 s to build the first time, then cached)."""
    from forgeml.errors import ToolchainMissing
    from forgeml.targets.emulate import prepare

    require_tools(*QEMU)
    try:
        return prepare("aarch64")
    except ToolchainMissing as e:  # e.g. no arm64 package lists (`make toolchains` adds them)
        skip_or_fail(f"emulated aarch64 device unavailable: {e}")


@pytest.fixture(scope="module")
def cnn(tmp_path_factory) -> dict[str, Path]:
    """A small CNN (conv-BN-ReLU, strided conv, pool, linear) for x86-64."""
    d = tmp_path_factory.mktemp("edge")
    out = {"onnx": save(cnn_model(), d / "cnn.onnx"), "x86-64": d / "cnn-x86-64.fml"}
    forgeml.compile_model(out["onnx"], out["x86-64"], target="x86-64")
    return out


@pytest.fixture(scope="module")
def cnn_arm(cnn) -> Path:
    """The same CNN cross-compiled for aarch64 (needs the cross compiler)."""
    require_tools(CROSS_COMPILERS[0])
    path = cnn["onnx"].with_name("cnn-aarch64.fml")
    if not path.exists():
        forgeml.compile_model(cnn["onnx"], path, target="aarch64")
    return path


@pytest.mark.slow
def test_resnet18_cross_compiles_to_elf_for_aarch64_and_riscv64(tmp_path: Path):
    from forgeml.zoo import export_zoo_model

    require_tools(*CROSS_COMPILERS)

    onnx_path = tmp_path / "resnet18.onnx"
    export_zoo_model("resnet18", onnx_path)
    for target, machine in (("aarch64", EM_AARCH64), ("riscv64", EM_RISCV)):
        artifact = tmp_path / f"resnet18-{target}.fml"
        manifest = forgeml.compile_model(onnx_path, artifact, target=target)
        magic, e_machine, _ = elf_header(artifact)
        assert (magic, e_machine) == (b"\x7fELF", machine), target
        assert manifest.target["arch"] == target and manifest.verification["skipped"]


def test_verify_emulate_passes_against_onnxruntime(device, cnn_arm, capsys):
    assert main(["verify", str(cnn_arm), "--emulate"]) == 0
    out = capsys.readouterr().out
    assert "verified" in out and "(emulated)" in out and "max rel error" in out


def test_verify_emulate_exits_3_beyond_tolerance(device, cnn_arm, capsys):
    assert main(["verify", str(cnn_arm), "--emulate", "--tolerance", "-1"]) == 3
    assert "differ from ONNX Runtime" in capsys.readouterr().err


def test_emulated_device_runs_the_lean_runtime_without_tvm(device, cnn_arm, tmp_path):
    """Under qemu, forgeml.load uses numpy, tvm_ffi and the aarch64 libtvm_runtime.so only."""
    from forgeml.targets.emulate import copy_forgeml

    copy_forgeml(tmp_path)
    script = ("import platform, sys, numpy as np, forgeml\n"
              f"s = forgeml.load({str(cnn_arm)!r})\n"
              "y = s.run({'x': np.ones((1, 3, 32, 32), 'float32')})['y']\n"
              "maps = open('/proc/self/maps').read()\n"
              "print(platform.machine(), y.shape, sorted(m for m in sys.modules if m.split('.')[0] in "
              "('tvm', 'onnx', 'onnxruntime', 'torch')), 'libtvm_compiler' in maps)\n")
    proc = subprocess.run(device.command("-c", script), env=device.environ(tmp_path), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[0] == "aarch64 (1, 10) [] False"


def _serve(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "forgeml.cli", "device", "serve", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    for line in proc.stdout:
        if "serving TVM RPC on" in line:
            return proc
    raise AssertionError(f"forgeml device serve did not start (exit {proc.wait()})")


def _cases(path: Path) -> dict[str, dict]:
    report = json.loads(path.read_text())
    return {c["extra"].get("placement", c["engine"]): c for c in report["cases"]}


def test_rpc_bench_against_a_local_server(cnn, tmp_path, capsys):
    server = _serve(free_port())
    try:
        address = f"127.0.0.1:{server.args[-1]}"
        code = main(["bench", str(cnn["x86-64"]), "--rpc", address, "--repeat", "20", "--warmup", "3",
                     "--no-memory", "--json", str(tmp_path / "r.json")])
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    assert code == 0
    cases = _cases(tmp_path / "r.json")
    assert set(cases) == {"forgeml", "onnxruntime", "rpc"}
    rpc = cases["rpc"]
    assert rpc["extra"]["device_arch"] == "x86_64" and len(rpc["samples_ms"]) == 20
    assert rpc["extra"]["max_rel_error"] < 1e-3 and rpc["stats"]["p50_ms"] > 0
    assert "(x86-64, rpc" in capsys.readouterr().out  # a row of the same table


@pytest.mark.slow
def test_cross_target_report_native_emulated_and_rpc_under_qemu(device, cnn, cnn_arm, tmp_path, capsys):
    """x86-64 native, aarch64 over RPC (a server under qemu, found through a tracker) and aarch64
    emulated, in one report with ONNX Runtime on the host as the reference."""
    from tvm.rpc.tracker import Tracker

    from forgeml.targets.rpc import EmulatedServer

    port = free_port()
    tracker = Tracker("127.0.0.1", port=port, port_end=port + 20, silent=True)
    tracker_address = f"127.0.0.1:{tracker.port}"
    try:
        with EmulatedServer("aarch64", port=free_port(), tracker=tracker_address, key="qemu-a64") as server:
            assert "aarch64" in server.log[-1]
            code = main(["bench", str(cnn["x86-64"]), str(cnn_arm), "--emulate", "--tracker",
                         tracker_address, "--device-key", "qemu-a64", "--repeat", "20", "--warmup", "3",
                         "--offsite-seconds", "10", "--no-memory", "--json", str(tmp_path / "cross.json")])
    finally:
        tracker.terminate()
    assert code == 0, capsys.readouterr().err
    cases = _cases(tmp_path / "cross.json")
    assert set(cases) == {"forgeml", "onnxruntime", "rpc", "emulated"}
    for placement in ("rpc", "emulated"):
        extra = cases[placement]["extra"]
        assert extra["device_arch"] == "aarch64" and extra["max_rel_error"] < 1e-3, placement
        assert cases[placement]["stats"]["p50_ms"] > 0 and extra["runs"] >= 3
    assert cases["onnxruntime"]["extra"]["reference"]
    out = capsys.readouterr().out  # one table: every row beside the ONNX Runtime reference
    assert "(aarch64, emulated)" in out and "(aarch64, rpc aarch64)" in out and "ref" in out


@pytest.mark.slow
def test_tuning_batch_for_a_raspberry_pi_measured_on_the_emulated_device(device, tmp_path, monkeypatch):
    """Edge tuning without a compiler on the device: candidates cross-compiled here, timed by the lean
    runtime on the (emulated) aarch64 device, imported, and used by the next aarch64 compile. Timings
    under qemu say nothing about hardware; the flow is what is checked."""
    import json
    import shlex
    import subprocess

    from conftest import mlp_model

    from forgeml.compiler.build import import_measurements, tune_model
    from forgeml.errors import InvalidInput
    from forgeml.targets.emulate import copy_forgeml

    require_tools(CROSS_COMPILERS[0])
    shared_cache = os.environ["FORGEML_CACHE"]  # holds the emulated device
    monkeypatch.setenv("FORGEML_CACHE", str(tmp_path / "cache"))  # a tuning database of this test's own
    onnx_path = save(mlp_model(), tmp_path / "mlp.onnx")
    batch_dir = tmp_path / "batch"
    with pytest.raises(InvalidInput, match="core count"):  # generic aarch64: how many cores is unknown
        tune_model(onnx_path, "aarch64", trials=8, measure_elsewhere=batch_dir)
    summary = tune_model(onnx_path, "rpi4", trials=8, measure_elsewhere=batch_dir)
    assert summary.candidates >= 2 and summary.build_errors == 0
    library = batch_dir / json.loads((batch_dir / "batch.json").read_text())["candidates"][0]["library"]
    assert library.read_bytes()[18] == EM_AARCH64

    copy_forgeml(tmp_path / "py")
    env = device.environ(tmp_path / "py", {"FORGEML_MEASURE_PYTHON": shlex.join(device.command())})
    done = subprocess.run(device.command("-m", "forgeml.runtime.measure", str(batch_dir)), env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((batch_dir / "results.json").read_text())["results"]
    assert results and all("run_secs" in r for r in results.values()), results

    imported = import_measurements(batch_dir)
    assert imported.records == summary.candidates and imported.rule_latencies == summary.rule_candidates
    manifest = forgeml.compile_model(onnx_path, tmp_path / "mlp-arm.fml", target="rpi4")
    assert manifest.tuning["tasks_from_cache"] == 2
    assert manifest.tuning["tuned_kernels_used"] + manifest.tuning["rule_kernels_kept"] == 2
    monkeypatch.setenv("FORGEML_CACHE", shared_cache)
    assert main(["verify", str(tmp_path / "mlp-arm.fml"), "--onnx", str(onnx_path), "--emulate"]) == 0
