"""forgeml bundle: a deploy folder that runs in a Python holding only numpy."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

import forgeml
from forgeml.bundle import bundle
from forgeml.compiler.verify import seeded_inputs
from forgeml.errors import InvalidInput


@pytest.fixture(scope="module")
def numpy_only_python(tmp_path_factory) -> Path:
    """A fresh virtual environment whose only package is numpy (copied, so no network is needed)."""
    venv = tmp_path_factory.mktemp("venv") / "numpy-only"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    query = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", query],
                               capture_output=True, text=True, check=True).stdout.strip())
    here = Path(sysconfig.get_paths()["purelib"])
    import shutil

    for name in ("numpy", "numpy.libs"):
        if (here / name).exists():
            shutil.copytree(here / name, site / name)
    return venv / "bin" / "python"


def test_bundle_runs_with_numpy_only(compiled_cnn, tmp_path, numpy_only_python):
    _, artifact = compiled_cnn
    out = tmp_path / "deploy"
    sizes = bundle(artifact, out)
    assert sizes["runtime_mb"] < 10, sizes
    assert (out / "run.py").is_file() and (out / artifact.name).is_file()
    session = forgeml.load(artifact)
    expected = session.run(seeded_inputs(session.inputs))["y"]
    check = f"""
import sys; sys.path.insert(0, {str(out / 'site')!r})
import numpy as np, forgeml
s = forgeml.load({str(out / artifact.name)!r})
rng = np.random.default_rng(0)
y = s.run({{"x": rng.standard_normal((1, 3, 32, 32)).astype("float32")}})["y"]
np.save({str(tmp_path / 'y.npy')!r}, y)
print(sorted(m for m in sys.modules if m.split(".")[0] in ("tvm", "onnx", "torch")))
"""
    proc = subprocess.run([str(numpy_only_python), "-c", check], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), expected)
    demo = subprocess.run([str(numpy_only_python), str(out / "run.py")], capture_output=True, text=True)
    assert demo.returncode == 0 and "y: float32[1, 10]" in demo.stdout, demo.stderr


def test_bundle_refuses_non_empty_output(compiled_mlp, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("keep me")
    with pytest.raises(InvalidInput, match="not an empty directory"):
        bundle(compiled_mlp[1], tmp_path / "taken")
    assert (tmp_path / "taken" / "file").read_text() == "keep me"


@pytest.mark.slow
def test_bundle_measures_a_tuning_batch_with_numpy_only(compiled_mlp, tmp_path, numpy_only_python, monkeypatch):
    """A device with a deploy bundle and numpy can time a tuning batch (forgeml tune --measure-elsewhere)."""
    import json
    import os

    from conftest import mlp_model, save

    from forgeml.compiler.build import tune_model

    monkeypatch.setenv("FORGEML_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "deploy"
    bundle(compiled_mlp[1], out)
    batch_dir = tmp_path / "batch"
    tune_model(save(mlp_model(), tmp_path / "mlp.onnx"), "x86-64", trials=4, measure_elsewhere=batch_dir)
    env = {**os.environ, "PYTHONPATH": str(out / "site")}
    proc = subprocess.run([str(numpy_only_python), "-m", "forgeml.runtime.measure", str(batch_dir)],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((batch_dir / "results.json").read_text())["results"]
    assert results and all("run_secs" in r for r in results.values()), results
