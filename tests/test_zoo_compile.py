"""Every zoo model exports, compiles with the default schedules, and verifies against ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ort_run

import forgeml
from forgeml.zoo import ZOO, example_inputs, export_zoo_model


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_compiles_and_verifies(name, tmp_path):
    onnx_path = export_zoo_model(name, tmp_path / f"{name}.onnx")
    manifest = forgeml.compile_model(onnx_path, tmp_path / f"{name}.fml")
    assert manifest.verification["passed"] is True, manifest.verification
    feeds = example_inputs(name, seed=7)
    got = forgeml.load(tmp_path / f"{name}.fml").run(feeds)
    expected = ort_run(onnx_path, feeds)
    for key, ref in expected.items():
        scale = float(np.max(np.abs(ref)))
        assert float(np.max(np.abs(got[key] - ref))) <= 1e-3 * scale, key
