"""Timing loop, statistics and memory for forgeml artifacts and their baselines.

Engines are measured alternating in blocks on the same inputs, so that every ratio compares runs
taken under the same conditions. CPU engines each run in a process of their own
(forgeml.bench.worker: a TVM session pins its process to core 0, which would squeeze any other engine
in that process); `measure_blocks` alternates between such workers. Peak memory (RSS) is measured per
engine in a fresh subprocess, after the timing.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

Runner = Callable[[], Any]
BlockRunner = Callable[[int], list[float]]  # runs an engine n times, returns the seconds of each call


@dataclass
class Stats:
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    min_ms: float
    p10_ms: float
    throughput_per_s: float

    @classmethod
    def of(cls, samples_s: list[float], batch: int = 1) -> Stats:
        ms = np.asarray(samples_s) * 1e3
        p10, p50, p90, p99 = np.percentile(ms, [10, 50, 90, 99])
        return cls(float(p50), float(p90), float(p99), float(ms.mean()), float(ms.std()), float(ms.min()),
                   float(p10), float(batch * 1e3 / p50) if p50 > 0 else float("inf"))


@dataclass
class CaseResult:
    """One engine on one model: its samples, statistics and memory."""

    name: str  # e.g. "forgeml resnet18.fml (x86-64)" or "onnxruntime"
    engine: str  # "forgeml" | "onnxruntime" | "torch"
    model: str
    stats: Stats
    samples_ms: list[float]
    peak_rss_mb: float | None = None
    artifact_mb: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    machine: dict[str, Any]
    settings: dict[str, Any]
    cases: list[CaseResult]

    def to_json(self) -> dict[str, Any]:
        return {"machine": self.machine, "settings": self.settings, "cases": [asdict(c) for c in self.cases]}

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2))
        os.replace(tmp, path)


def machine_info() -> dict[str, Any]:
    from forgeml.targets.host import detect_host

    host = detect_host()
    vec = sorted(f for f in host.features if f.startswith(("avx", "fma", "neon", "sve", "asimd")))
    return {"cpu": host.model, "arch": host.arch, "cores": host.cores, "vector_features": vec,
            "python": platform.python_version(), "platform": platform.platform()}


def in_process(run: Runner) -> BlockRunner:
    """A block runner timing `run` in this process."""

    def block(n: int) -> list[float]:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return times

    return block


def paired_ratio(samples: list[float], reference: list[float], block: int = 10) -> float | None:
    """Median over the alternation rounds of (this engine's block median / the reference's block median
    in the same round). The machine's speed drifts (a VM's neighbours, clocks); a drift slower than one
    round falls on both engines of that round and cancels here, where a ratio of whole-run p50s takes it
    in whenever it falls unevenly. Samples must be in the order `measure_blocks` took them."""
    rounds = min(len(samples), len(reference)) // block
    if rounds == 0:
        return None
    ratios = [np.median(samples[i * block:(i + 1) * block]) / np.median(reference[i * block:(i + 1) * block])
              for i in range(rounds)]
    return float(np.median(ratios))


def measure_blocks(engines: dict[str, BlockRunner], warmup: int = 10, repeat: int = 100, block: int = 10,
                   pause_s: float = 0.02, progress: Callable[[int, int], None] | None = None,
                   ) -> dict[str, list[float]]:
    """Time each engine `repeat` times, alternating between engines in blocks of `block` calls.

    A short pause between blocks lets the other engine's spinning thread pool go idle. Each round starts
    with the next engine (round k runs engines k, k+1, ... in turn), so that no engine always follows the
    same one, or always runs first after the round's start.
    """
    for run_block in engines.values():
        run_block(warmup)
    samples: dict[str, list[float]] = {name: [] for name in engines}
    names = list(engines)
    done, total, round_ = 0, repeat * len(engines), 0
    while any(len(s) < repeat for s in samples.values()):
        first = round_ % len(names)
        round_ += 1
        for name in names[first:] + names[:first]:
            run_block = engines[name]
            todo = min(block, repeat - len(samples[name]))
            if todo <= 0:
                continue
            time.sleep(pause_s)
            samples[name] += run_block(todo)
            done += todo
            if progress:
                progress(done, total)
    return samples


def measure_in_workers(engines: dict[str, tuple[str, str | Path]], feeds: dict[str, np.ndarray], threads: int,
                       warmup: int = 10, repeat: int = 100) -> dict[str, tuple[list[float], dict[str, Any]]]:
    """`measure_blocks` over labelled (engine, model) pairs, each loaded in a worker process of its own
    (forgeml.bench.worker): label -> (per-call seconds, the worker's pid, affinity at start and threads)."""
    from contextlib import ExitStack

    from forgeml.bench.worker import EngineWorker

    with ExitStack() as stack:
        workers = {label: stack.enter_context(EngineWorker(engine, model, feeds, threads))
                   for label, (engine, model) in engines.items()}
        samples = measure_blocks({label: w.run for label, w in workers.items()}, warmup=warmup, repeat=repeat)
    return {label: (times, {k: workers[label].info[k] for k in ("pid", "affinity_at_start", "threads")})
            for label, times in samples.items()}


def measure_alternating(runners: dict[str, Runner], warmup: int = 10, repeat: int = 100, block: int = 10,
                        pause_s: float = 0.02, progress: Callable[[int, int], None] | None = None,
                        ) -> dict[str, list[float]]:
    """`measure_blocks` for callables run in this process (GPU scripts; CPU engines use workers)."""
    return measure_blocks({name: in_process(run) for name, run in runners.items()}, warmup, repeat, block,
                          pause_s, progress)


_RSS_SCRIPT = """
import json, os, resource, sys, time
if sys.argv[6]:  # the CPUs the bench could use at its start, not what a TVM pool left it
    os.sched_setaffinity(0, [int(c) for c in sys.argv[6].split(",")])
import numpy as np
engine, model, threads, runs, inputs_path = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
data = np.load(inputs_path)
feeds = {k: data[k] for k in data.files}
start = time.perf_counter()
if engine == "forgeml":
    import forgeml
    session = forgeml.load(model, threads=threads)
    run = lambda: session.run(feeds)
else:
    import onnxruntime as ort
    opts = ort.SessionOptions(); opts.intra_op_num_threads = threads; opts.inter_op_num_threads = 1
    session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    run = lambda: session.run(None, feeds)
run()
first = time.perf_counter() - start
for _ in range(runs):
    run()
# VmHWM, not ru_maxrss: ru_maxrss keeps the peak of the parent that spawned us (390+ MB once it imported tvm)
hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")]
print(json.dumps({"peak_rss_mb": (hwm[0] if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024,
                  "load_to_first_output_s": first}))
"""


def peak_rss_subprocess(engine: str, model: str | Path, feeds: dict[str, np.ndarray], threads: int,
                        runs: int = 20) -> dict[str, float]:
    """Peak RSS (MB) of a fresh process that loads `model` with `engine` and runs it `runs` times."""
    import tempfile

    from forgeml.bench.worker import start_affinity

    mask = ",".join(map(str, start_affinity() or []))
    with tempfile.TemporaryDirectory(prefix="forgeml-rss-") as tmp:
        inputs_path = Path(tmp) / "inputs.npz"
        np.savez(inputs_path, **feeds)
        proc = subprocess.run(
            [sys.executable, "-c", _RSS_SCRIPT, engine, str(model), str(threads), str(runs), str(inputs_path), mask],
            capture_output=True, text=True, timeout=600,
        )
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])
