"""pytest-benchmark suite: forgeml and ONNX Runtime on the same zoo model, inputs and threads.

    .venv/bin/python -m pytest benchmarks/test_latency.py --benchmark-group-by=param:name

Each model gets one group; compare the medians inside a group (pytest-benchmark prints them side
by side). Not part of `make test`: speed is measured here, never asserted in unit tests.
"""

from __future__ import annotations

import pytest

THREADS = 2
MODELS = ["mlp", "bert_tiny", "mobilenet_v2"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """name -> (onnx path, artifact path, inputs), compiled once per module."""
    import forgeml
    from forgeml.zoo import example_inputs, export_zoo_model

    out = {}
    d = tmp_path_factory.mktemp("bench")
    for name in MODELS:
        onnx_path = export_zoo_model(name, d / f"{name}.onnx")
        forgeml.compile_model(onnx_path, d / f"{name}.fml", use_tuning_db=False)
        out[name] = (onnx_path, d / f"{name}.fml", example_inputs(name))
    return out


@pytest.mark.parametrize("name", MODELS)
def test_forgeml(benchmark, built, name):
    import forgeml

    _, artifact, feeds = built[name]
    session = forgeml.load(artifact, threads=THREADS)
    benchmark(session.run, feeds)


@pytest.mark.parametrize("name", MODELS)
def test_onnxruntime(benchmark, built, name):
    from forgeml.compiler.verify import onnxruntime_session

    onnx_path, _, feeds = built[name]
    session = onnxruntime_session(onnx_path, threads=THREADS)
    benchmark(session.run, None, feeds)
