"""pytest-benchmark suite: forgeml and ONNX Runtime on the same zoo model, inputs and threads.

    .venv/bin/python -m pytest benchmarks/test_latency.py --benchmark-group-by=param:name

Each model gets one group; compare the medians inside a group (pytest-benchmark prints them side
by side). Not part of `make test`: speed is measured here, never asserted in unit tests.

Each engine runs in a worker process of its own (forgeml.bench.worker, as `forgeml bench`): a TVM
session pins its process to core 0, which would squeeze ONNX Runtime timed in the same process. The
worker runs blocks of 10 calls back to back, each timed inside the worker; each pytest-benchmark round
is one of those calls, read through its `timer` hook (WORKER_CLOCK), so the pipe is never timed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from forgeml.bench.worker import EngineWorker

THREADS = 2
MODELS = ["mlp", "bert_tiny", "mobilenet_v2"]
ROUNDS = 200
BLOCK = 10


class WorkerClock:
    """A pytest-benchmark timer that advances only by the run times the workers measured: a round's
    duration is then one engine call timed in its own process."""

    def __init__(self) -> None:
        self.elapsed = 0.0
        self.pending: list[float] = []  # times of calls the worker ran in its last block, not yet counted

    def __call__(self) -> float:
        return self.elapsed

    def __repr__(self) -> str:  # the timer's name in pytest-benchmark's JSON
        return "forgeml worker clock (per-call times measured in the worker)"

    def run_once(self, worker: EngineWorker) -> None:
        if not self.pending:
            self.pending = worker.run(BLOCK)
        self.elapsed += self.pending.pop(0)


WORKER_CLOCK = WorkerClock()


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, tuple[Path, Path, dict[str, np.ndarray]]]:
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


def _bench_in_worker(benchmark, engine: str, model: Path, feeds: dict[str, np.ndarray]) -> None:
    WORKER_CLOCK.pending = []
    with EngineWorker(engine, model, feeds, THREADS) as worker:
        benchmark.extra_info.update(isolation="worker process", worker_pid=worker.info["pid"],
                                    affinity_at_start=worker.info["affinity_at_start"], threads=THREADS)
        benchmark.pedantic(WORKER_CLOCK.run_once, args=(worker,), rounds=ROUNDS, warmup_rounds=10)


@pytest.mark.benchmark(timer=WORKER_CLOCK)
@pytest.mark.parametrize("name", MODELS)
def test_forgeml(benchmark, built, name):
    _, artifact, feeds = built[name]
    _bench_in_worker(benchmark, "forgeml", artifact, feeds)


@pytest.mark.benchmark(timer=WORKER_CLOCK)
@pytest.mark.parametrize("name", MODELS)
def test_onnxruntime(benchmark, built, name):
    onnx_path, _, feeds = built[name]
    _bench_in_worker(benchmark, "onnxruntime", onnx_path, feeds)
