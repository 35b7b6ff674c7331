"""Per-kernel time, for benchmark reports: where a run's time goes in forgeml (each kernel the Relax VM
calls, timed around the call) and in ONNX Runtime (its profiler's per-node times), summed over the calls
of one kernel (forgeml: one compiled function; ONNX Runtime: one op type on one input shape).

Each profile runs in a fresh interpreter of its own, started with the parent's first CPU affinity, as
the timing workers are (`python -m forgeml.bench.kernels ...`), so that no engine's thread pool or
profiler disturbs another. Times are per run, averaged over `runs` runs after 3 warm-up runs; forgeml's
include the Python callback around each call (a few microseconds), ONNX Runtime's are its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from forgeml.errors import ForgeError, InvalidInput

WARMUP = 3
VM_BUILTINS = "(VM builtins: allocation, shape checks)"


def method(threads: int, runs: int) -> str:
    """How the per-kernel tables were made, and how far their times can be read, for a report."""
    return (f"Each engine in a process of its own, {threads} threads, {runs} runs after {WARMUP} warm-up: forgeml's "
            "kernels (each compiled function, all its calls; timed around each call the VM makes) beside ONNX "
            "Runtime's ops (its profiler, grouped by op type and first input shape). Shares, more than absolute "
            "times, compare across engines: the instruments add time. forgeml's Python callback costs a few "
            "microseconds per call, most of the VM builtins' line (MobileNetV2's whole `main` spends ~0.07 ms "
            "outside its kernels); ONNX Runtime's profiler adds more at 2 threads than at 1 (MobileNetV2, Zen 4: "
            "its node times sum to 4.7 ms for a 3.9 ms run at 2 threads, 7.5 ms for 7.4 ms at 1).")


@dataclass(frozen=True)
class KernelTime:
    """One kernel's share of a run."""

    name: str  # forgeml: the compiled function (its fused ops); ONNX Runtime: op type [input shape]
    calls: int  # calls per run
    ms: float  # milliseconds per run, all calls together


def profile(engine: str, model: str | Path, feeds: dict[str, np.ndarray], threads: int, runs: int = 10,
            timeout_s: float = 600.0) -> list[KernelTime]:
    """Kernels of one engine (`forgeml` artifact or `onnxruntime` model) on `feeds`, slowest first,
    profiled in a process of its own."""
    from forgeml.bench.worker import start_affinity

    if engine not in ("forgeml", "onnxruntime"):
        raise InvalidInput(f"unknown engine '{engine}' for a kernel profile; known: forgeml, onnxruntime")
    with tempfile.TemporaryDirectory(prefix="forgeml-kernels-") as tmp:
        inputs, result = Path(tmp) / "inputs.npz", Path(tmp) / "kernels.json"
        np.savez(inputs, **feeds)
        package_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, TVM_NUM_THREADS=str(threads),
                   PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
        cmd = [sys.executable, "-m", "forgeml.bench.kernels", engine, str(model), str(inputs), str(threads),
               str(runs), str(result)]
        mask = start_affinity()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s,
                              preexec_fn=(lambda: os.sched_setaffinity(0, mask)) if mask else None)
        if done.returncode != 0 or not result.exists():
            last = [ln for ln in (done.stderr or "").splitlines() if ln.strip()]
            raise ForgeError(f"the {engine} kernel profile failed ({done.returncode}): "
                             f"{last[-1] if last else 'no output'}")
        return [KernelTime(**row) for row in json.loads(result.read_text())]


def _sorted(totals: dict[str, list[float]], runs: int) -> list[KernelTime]:
    rows = [KernelTime(name, int(round(calls / runs)), seconds * 1e3 / runs)
            for name, (calls, seconds) in totals.items()]
    return sorted(rows, key=lambda r: -r.ms)


def _forgeml_kernels(path: str, feeds: dict[str, np.ndarray], runs: int) -> list[KernelTime]:
    """The artifact's library in a Relax VM with an instrument that times every call it makes."""
    import tvm
    from tvm import relax

    from forgeml.runtime.artifact import open_artifact

    artifact = open_artifact(path)
    artifact.verify_checksums()
    with tempfile.TemporaryDirectory(prefix="forgeml-kernels-lib-") as tmp:
        library = Path(tmp) / "model.so"
        library.write_bytes(artifact.read_member(artifact.manifest.library))
        vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), tvm.cpu())
    names = [spec.name for spec in artifact.manifest.inputs]
    missing = [n for n in names if n not in feeds]
    if missing:
        raise InvalidInput(f"no input '{missing[0]}' for {path}")
    args = [tvm.runtime.tensor(np.ascontiguousarray(feeds[n])) for n in names]
    args += [tvm.runtime.tensor(np.ascontiguousarray(w)) for w in artifact.read_weights()]
    main = vm["main"]
    for _ in range(WARMUP):
        main(*args)
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    started: dict[str, float] = {}
    clock = time.perf_counter

    def instrument(_func: Any, symbol: str, before: bool, _ret: Any, *_args: Any) -> int:
        if symbol.startswith("vm.builtin."):
            symbol = VM_BUILTINS
        if before:
            started[symbol] = clock()
        else:
            total = totals[symbol]
            total[0] += 1
            total[1] += clock() - started.pop(symbol)
        return 0  # VMInstrumentReturnKind.kNoOp

    vm.set_instrument(instrument)
    for _ in range(runs):
        main(*args)
    return _sorted(totals, runs)


def _ort_kernels(path: str, feeds: dict[str, np.ndarray], threads: int, runs: int) -> list[KernelTime]:
    """ONNX Runtime's own profiler; node events inside the last `runs` runs (not the warm-up ones)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="forgeml-ort-profile-") as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        for _ in range(WARMUP + runs):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    model_runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")[-runs:]
    start = model_runs[0][0] if model_runs else 0
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for event in events:
        if event.get("cat") != "Node" or not str(event.get("name", "")).endswith("_kernel_time"):
            continue
        if event["ts"] < start:
            continue
        op = event.get("args", {}).get("op_name", "?")
        shapes = event.get("args", {}).get("input_type_shape", [])
        first = next(iter(shapes[0].values()), None) if shapes else None
        key = f"{op} {first}" if first is not None else op
        total = totals[key]
        total[0] += 1
        total[1] += event["dur"] * 1e-6
    return _sorted(totals, max(1, len(model_runs)))


def table(forgeml: list[KernelTime], ort: list[KernelTime], top: int = 10) -> list[str]:
    """Markdown: the `top` kernels of forgeml beside ONNX Runtime's top ops, with each one's share."""
    f_total = sum(r.ms for r in forgeml) or 1.0
    o_total = sum(r.ms for r in ort) or 1.0
    lines = ["| # | forgeml kernel | calls | ms | share | ONNX Runtime op [first input shape] | calls | ms | share |",
             "|---|---|---|---|---|---|---|---|---|"]
    for n in range(min(top, max(len(forgeml), len(ort)))):
        left = (f"`{forgeml[n].name}` | {forgeml[n].calls} | {forgeml[n].ms:.2f} | {100 * forgeml[n].ms / f_total:.0f}%"
                if n < len(forgeml) else " | | | ")
        right = (f"{ort[n].name} | {ort[n].calls} | {ort[n].ms:.2f} | {100 * ort[n].ms / o_total:.0f}%"
                 if n < len(ort) else " | | | ")
        lines.append(f"| {n + 1} | {left} | {right} |")
    lines.append(f"| | all kernels | | {f_total:.2f} | 100% | all ops | | {o_total:.2f} | 100% |")
    return lines


def profile_pair(artifact: str | Path, onnx_path: str | Path, threads: int, runs: int = 10,
                 feeds: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Both engines' kernels on `feeds` (default: the artifact's seeded inputs), for a report's JSON."""
    if feeds is None:
        from forgeml.compiler.verify import seeded_inputs
        from forgeml.runtime.artifact import open_artifact

        feeds = seeded_inputs(open_artifact(artifact).manifest.inputs, seed=0)
    return {"runs": runs, "threads": threads,
            "forgeml": [asdict(r) for r in profile("forgeml", artifact, feeds, threads, runs)],
            "onnxruntime": [asdict(r) for r in profile("onnxruntime", onnx_path, feeds, threads, runs)]}


def section(title: str, kernels: dict[str, Any], top: int = 10) -> list[str]:
    """A report's markdown for one model's `profile_pair`: a heading and the table."""
    forgeml = [KernelTime(**r) for r in kernels["forgeml"]]
    ort = [KernelTime(**r) for r in kernels["onnxruntime"]]
    return [f"### {title}", "", *table(forgeml, ort, top), ""]


def main(argv: list[str]) -> None:
    """Subprocess entry point: ENGINE MODEL INPUTS.npz THREADS RUNS OUT.json."""
    engine, model, inputs, threads, runs, out = argv
    with np.load(inputs) as data:
        feeds = {k: data[k] for k in data.files}
    if engine == "forgeml":
        rows = _forgeml_kernels(model, feeds, int(runs))
    else:
        rows = _ort_kernels(model, feeds, int(threads), int(runs))
    Path(out).write_text(json.dumps([asdict(r) for r in rows]))


if __name__ == "__main__":
    main(sys.argv[1:])
