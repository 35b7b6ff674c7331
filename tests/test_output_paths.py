"""Careless paths (issue 20): refused before any work with one line naming the problem, or made safe."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import mlp_model, save

import forgeml
from forgeml.compiler.build import STALE_AFTER_S
from forgeml.errors import InvalidInput
from forgeml.targets import resolve_target

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, umask: int | None = None) -> subprocess.CompletedProcess:
    """The CLI of this checkout in a fresh process (optionally under another umask)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "forgeml.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600, preexec_fn=None if umask is None else lambda: os.umask(umask))


def assert_one_line_error(proc: subprocess.CompletedProcess, code: int, *words: str) -> None:
    assert proc.returncode == code, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_output_that_is_the_model_is_refused(tmp_path):
    """`forgeml compile s.onnx -o s.onnx` exited 0 and replaced the source model with the artifact."""
    model = save(mlp_model(), tmp_path / "s.onnx")
    original = model.read_bytes()
    os.link(model, tmp_path / "link.onnx")
    for output in (model, tmp_path / "sub" / ".." / "s.onnx", tmp_path / "link.onnx"):
        proc = cli("compile", model, "-o", output)
        assert_one_line_error(proc, 2, "is the model being compiled", "s.fml")
    assert model.read_bytes() == original


def test_run_output_that_is_its_artifact_or_input_is_refused(compiled_mlp, tmp_path):
    artifact = tmp_path / "m.fml"
    artifact.write_bytes(compiled_mlp[1].read_bytes())
    x = tmp_path / "x.npy"
    np.save(x, np.zeros((4, 16), "float32"))
    for output in (artifact, x):
        kept = output.read_bytes()
        proc = cli("run", artifact, "-i", f"x={x}", "-o", output)
        assert_one_line_error(proc, 2, f"is {output}, which this run reads")
        assert output.read_bytes() == kept


def test_artifact_mode_follows_the_umask(tmp_path):
    """Artifacts were written with mode 600 whatever the umask (tempfile.mkstemp's mode)."""
    model = save(mlp_model(), tmp_path / "m.onnx")
    proc = cli("compile", model, "-o", tmp_path / "m.fml", "--no-verify", umask=0o022)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE((tmp_path / "m.fml").stat().st_mode) == 0o644
    x = tmp_path / "x.npy"
    np.save(x, np.zeros((4, 16), "float32"))
    proc = cli("run", tmp_path / "m.fml", "-i", f"x={x}", "-o", tmp_path / "y.npz", umask=0o027)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE((tmp_path / "y.npz").stat().st_mode) == 0o640


@pytest.mark.parametrize("target, words", [
    ('{"kind": "nonsense"}', ['Target kind "nonsense" is not defined']),
    ('{"kind": "llvm", "mtriple": "bogus-triple"}', ['"mtriple" "bogus-triple"', "x86_64"]),  # was a segfault
])
def test_bad_target_is_one_line_naming_it(tmp_path, target, words):
    """These gave 'internal error' and exit 1 with no reason (the bogus triple crashed LLVM)."""
    model = save(mlp_model(), tmp_path / "m.onnx")
    assert_one_line_error(cli("compile", model, "-t", target, "-o", tmp_path / "m.fml"), 2, *words)
    assert not (tmp_path / "m.fml").exists()


@pytest.mark.parametrize("target, match", [
    ('{"kind": "llvm", "mtriple": "mips64-linux-gnu"}', "mips64-linux-gnu.*is not a machine forgeml builds for"),
    ('{"kind": "cuda"}', 'a "cuda" target needs "arch": "sm_XY"'),
    ('{"kind": "llvm", "host": "llvm"}', '"host" must be an object'),
    ('{"kind": 3}', 'must be an object with a "kind"'),
])
def test_targets_forgeml_cannot_build_are_refused_up_front(target, match):
    """An unsupported triple or a CUDA target without an arch failed only when linking, after the compile."""
    with pytest.raises(InvalidInput, match=match):
        resolve_target(target)


def test_invalid_tvm_option_is_refused_before_loading_the_model(tmp_path):
    with pytest.raises(InvalidInput, match="target 'custom' is not a valid TVM target: .*num-cores"):
        forgeml.compile_model(tmp_path / "absent.onnx", tmp_path / "m.fml", '{"kind": "llvm", "num-cores": "two"}')


def _unwritable_dir(tmp_path: Path) -> Path:
    """A directory this process cannot create files in: a read-only one, or (as root, who may write
    anywhere else) one under /sys."""
    if os.geteuid() == 0:
        return Path("/sys/forgeml-test")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    return locked / "out"


def test_unwritable_output_directory_is_refused_before_compiling(tmp_path):
    """It was found only after the whole compile, as an OSError 'internal error'."""
    model = save(mlp_model(), tmp_path / "m.onnx")
    proc = cli("compile", model, "-o", _unwritable_dir(tmp_path) / "m.fml")
    assert_one_line_error(proc, 2, "cannot write", "is not writable")
    (tmp_path / "file").write_text("")
    proc = cli("compile", model, "-o", tmp_path / "file" / "m.fml")
    assert_one_line_error(proc, 2, "cannot write", "is a file, not a directory")


def test_stale_verification_directories_are_removed(tmp_path, monkeypatch):
    """A `kill -9` during verification left a hidden 47 MB .forgeml-verify-* directory beside the
    output that nothing removed. Stale ones (old, their process gone) go at the next verification."""
    scratch = tmp_path / "tmp"
    out_dir = tmp_path / "out"
    scratch.mkdir()
    out_dir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    old = time.time() - STALE_AFTER_S - 60
    dirs = {
        "dead and old": scratch / f"forgeml-verify-{dead.pid}-abc",
        "earlier version's, old": out_dir / ".forgeml-verify-k2j4h5",
        "dead but recent": scratch / f"forgeml-verify-{dead.pid}-new",
        "old but alive": scratch / f"forgeml-verify-{os.getpid()}-live",
    }
    for name, path in dirs.items():
        path.mkdir()
        (path / "m.fml").write_bytes(b"\0" * 1024)
        if "old" in name:
            os.utime(path, (old, old))
    model = save(mlp_model(), tmp_path / "m.onnx")
    manifest = forgeml.compile_model(model, out_dir / "m.fml")
    assert manifest.verification["passed"]
    left = {name for name, path in dirs.items() if path.exists()}
    assert left == {"dead but recent", "old but alive"}
    assert sorted(p.name for p in out_dir.iterdir()) == ["m.fml"]
    assert sorted(p.name for p in scratch.iterdir()) == sorted(dirs[n].name for n in left)
