"""Target presets, cross-compilation of a small model, and the one-line errors of emulation and RPC.

Fast: no qemu run here (tests/test_edge.py runs the emulated and RPC devices). The cross compilers
come from `make toolchains` (CI runs it before the tests); without them those tests skip, saying so.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest
from conftest import mlp_model, save
from toolchains import CROSS_COMPILERS, require_tools

import forgeml
from forgeml.cli import main
from forgeml.errors import ArtifactError, InvalidInput, ToolchainMissing
from forgeml.runtime.artifact import open_artifact
from forgeml.targets import PRESETS, resolve_target
from forgeml.targets.emulate import emulator_for, runs_here
from forgeml.targets.host import HostCPU
from forgeml.targets.rpc import parse_address

EM_AARCH64, EM_RISCV = 183, 243


def elf_header(artifact: Path) -> tuple[bytes, int, int]:
    """(magic, e_machine, e_flags) of the artifact's model.so (64-bit little-endian ELF)."""
    data = open_artifact(artifact).read_member("model.so")[:64]
    return data[:4], struct.unpack_from("<H", data, 18)[0], struct.unpack_from("<I", data, 48)[0]


@pytest.fixture(scope="module")
def mlp_onnx(tmp_path_factory) -> Path:
    return save(mlp_model(), tmp_path_factory.mktemp("targets") / "mlp.onnx")


@pytest.fixture(scope="module")
def cross_mlp(mlp_onnx: Path) -> dict[str, Path]:
    """The MLP compiled for aarch64 and riscv64 (skips native verification: another architecture)."""
    require_tools(*CROSS_COMPILERS)
    out = {}
    for target in ("aarch64", "riscv64"):
        out[target] = mlp_onnx.with_name(f"mlp-{target}.fml")
        forgeml.compile_model(mlp_onnx, out[target], target=target)
    return out


def test_every_preset_resolves_to_a_tvm_target_with_its_runtime_arch():
    import tvm

    for name, spec in PRESETS.items():
        spec = resolve_target(name)
        target = tvm.target.Target(spec.tvm_target())
        assert spec.to_json()["arch"] == spec.arch, name
        triple = str(target.host.attrs.get("mtriple") if target.host else target.attrs.get("mtriple"))
        assert triple.startswith(spec.arch), (name, triple)
        if spec.arch != "x86_64":
            assert spec.cross_compiler and spec.needs, name


def test_cross_presets_name_the_debian_package_of_their_compiler():
    assert resolve_target("aarch64").needs == ("g++-aarch64-linux-gnu",)
    assert resolve_target("rpi4").cross_compiler == "aarch64-linux-gnu-g++"
    assert resolve_target("riscv64").needs == ("g++-riscv64-linux-gnu",)


def test_riscv64_preset_is_hard_float():
    target = resolve_target("riscv64").target
    assert target["mabi"] == "lp64d" and {"+f", "+d"} <= set(target["mattr"])


def test_target_json_gets_the_cross_compiler_of_its_triple():
    spec = resolve_target('{"kind": "llvm", "mtriple": "riscv64-linux-gnu", "mabi": "lp64d", '
                          '"mattr": ["+64bit", "+m", "+a", "+f", "+d", "+c"]}')
    assert (spec.arch, spec.cross_compiler, spec.needs) == ("riscv64", "riscv64-linux-gnu-g++",
                                                            ("g++-riscv64-linux-gnu",))


def test_target_json_for_riscv64_without_an_fpu_is_refused():
    # LLVM would warn, link a "double-float" library and fill it with soft-float calls (__mulsf3)
    with pytest.raises(InvalidInput, match=r'needs "\+d"'):
        resolve_target('{"kind": "llvm", "mtriple": "riscv64-linux-gnu", "mabi": "lp64d", "mattr": ["+m"]}')


def test_avx512_preset_records_the_cpu_features_it_needs():
    assert {"avx512f", "avx512bw"} <= set(resolve_target("x86-64-avx512").to_json()["cpu_features"])
    assert "cpu_features" not in resolve_target("aarch64").to_json()


def test_runtime_refuses_code_for_cpu_features_this_machine_lacks(mlp_onnx, monkeypatch, tmp_path):
    """An AVX-512 artifact on an AVX2 machine is a clear error, not a SIGILL."""
    import forgeml.targets.host as host

    fake = HostCPU("x86_64", "test cpu", frozenset({"sse2", "avx", "avx2", "fma"}), 2)
    monkeypatch.setattr(host, "detect_host", lambda: fake)
    manifest = forgeml.compile_model(mlp_onnx, tmp_path / "m.fml", target="x86-64-avx512")
    assert "avx512f" in manifest.verification["skipped"]
    with pytest.raises(ArtifactError, match="lacks .*avx512f.*illegal instruction"):
        forgeml.load(tmp_path / "m.fml")


def test_targets_command_says_what_runs_from_here(capsys):
    assert main(["targets"]) == 0
    text = capsys.readouterr().out
    assert "runs from here" in text and "g++-riscv64-linux-gnu" in text
    assert "emulated" in runs_here(resolve_target("rpi4"))
    assert "no riscv64 TVM runtime" in runs_here(resolve_target("riscv64"))


def test_cross_compiled_libraries_are_elf_for_their_machine(cross_mlp):
    magic, machine, _ = elf_header(cross_mlp["aarch64"])
    assert (magic, machine) == (b"\x7fELF", EM_AARCH64)
    magic, machine, flags = elf_header(cross_mlp["riscv64"])
    assert (magic, machine) == (b"\x7fELF", EM_RISCV)
    assert flags & 0x6 == 0x4  # EF_RISCV_FLOAT_ABI_DOUBLE
    library = open_artifact(cross_mlp["riscv64"]).read_member("model.so")
    assert b"__mulsf3" not in library and b"__addsf3" not in library  # no soft-float helpers


def test_cross_artifacts_record_why_they_were_not_verified(cross_mlp):
    assert "verify --emulate" in open_artifact(cross_mlp["aarch64"]).manifest.verification["skipped"]
    assert "riscv64 device" in open_artifact(cross_mlp["riscv64"]).manifest.verification["skipped"]


def test_missing_cross_compiler_names_the_package(mlp_onnx, monkeypatch, tmp_path):
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda cmd, *a, **k: None if "linux-gnu-g++" in cmd else real_which(cmd))
    with pytest.raises(ToolchainMissing, match="apt-get install g\\+\\+-aarch64-linux-gnu"):
        forgeml.compile_model(mlp_onnx, tmp_path / "m.fml", target="aarch64")
    assert not (tmp_path / "m.fml").exists()


def test_riscv64_emulation_is_refused_in_one_line(cross_mlp, capsys):
    assert main(["verify", str(cross_mlp["riscv64"]), "--emulate"]) == 2
    err = capsys.readouterr().err
    assert "no riscv64 wheels of apache-tvm" in err and len(err.strip().splitlines()) <= 3  # one line, wrapped


def test_missing_qemu_names_the_debian_package(monkeypatch):
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda cmd, *a, **k: None if cmd.startswith("qemu-") else real_which(cmd))
    with pytest.raises(ToolchainMissing, match="apt-get install qemu-user"):
        emulator_for("aarch64")


def test_foreign_artifact_without_emulate_is_refused(cross_mlp, capsys):
    assert main(["verify", str(cross_mlp["aarch64"])]) == 2
    assert "add --emulate" in capsys.readouterr().err
    assert main(["bench", str(cross_mlp["aarch64"]), "--no-memory", "--repeat", "3"]) == 2
    assert "--emulate, or --rpc" in capsys.readouterr().err


def test_verify_reruns_ort_comparison_for_a_host_artifact(mlp_onnx, tmp_path, capsys):
    forgeml.compile_model(mlp_onnx, tmp_path / "m.fml")
    assert main(["verify", str(tmp_path / "m.fml"), "--onnx", str(mlp_onnx)]) == 0
    assert "verified" in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "m.fml"), "--tolerance", "-1"]) == 3


@pytest.mark.parametrize("text", ["9090", "host", "host:port", ":9090"])
def test_bad_rpc_addresses_are_refused(text):
    with pytest.raises(InvalidInput, match="HOST:PORT"):
        parse_address(text, "--rpc")


def test_unreachable_rpc_device_is_one_line(mlp_onnx, tmp_path, capsys):
    import socket

    forgeml.compile_model(mlp_onnx, tmp_path / "m.fml")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["bench", str(tmp_path / "m.fml"), "--rpc", f"127.0.0.1:{port}", "--no-memory", "--repeat", "3",
                 "--warmup", "1"]) == 2
    assert "cannot reach the RPC device" in capsys.readouterr().err


def test_emulated_device_files_are_the_lean_runtime(tmp_path):
    from forgeml.targets.emulate import copy_forgeml

    copy_forgeml(tmp_path)
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.py"))
    assert "forgeml/runtime/session.py" in files and "forgeml/targets/rpc.py" in files
    assert not any(f.startswith(("forgeml/compiler", "forgeml/bench", "forgeml/cli")) for f in files)
