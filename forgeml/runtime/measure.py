"""Time a tuning batch's kernels where they run: `python -m forgeml.runtime.measure DIR`.

The measuring side of `forgeml tune --measure-elsewhere` (see forgeml/compiler/tuning/batch.py): it
needs numpy and forgeml's runtime only (tvm_ffi + libtvm_runtime, no compiler), so it runs on a GPU
server or an edge device that cannot build anything. Each candidate library is loaded and timed with
TVM's in-runtime timer (CUDA events on a GPU) on arguments filled once (floats random, integers zero:
always a valid index). Every kernel's rule-based schedule runs first and its outputs are kept as
the kernel's reference: a tuned candidate whose outputs differ from them (`max_rel_error` over
`tolerance`) is wrong, whatever its speed, and is never committed. Results go to DIR/results.json
after every candidate, so an interrupted run resumes where it stopped. Candidates run in a worker
process: one that crashes it (an illegal memory access poisons a CUDA context for good) is recorded
as failed and a fresh worker takes the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from forgeml.errors import ArtifactError, InvalidInput

BATCH_FORMAT = 1  # of batch.json and results.json (compiler/tuning/batch.py writes and reads the same)
BATCH_FILE = "batch.json"
RESULTS_FILE = "results.json"
REFERENCE_DIR = "references"  # the rule schedules' outputs while measuring
_NUMBER, _REPEAT, _MIN_REPEAT_MS = 3, 3, 40  # as MetaSchedule's runner: >= 40 ms per sample


def read_batch(batch_dir: Path) -> dict[str, Any]:
    path = batch_dir / BATCH_FILE
    try:
        batch = json.loads(path.read_text())
    except FileNotFoundError:
        raise InvalidInput(f"{batch_dir}: no batch.json (write one with `forgeml tune MODEL --measure-elsewhere "
                           f"{batch_dir}`)") from None
    except (OSError, ValueError) as e:
        raise InvalidInput(f"{path}: unreadable ({e})") from None
    if batch.get("format") != BATCH_FORMAT:
        raise InvalidInput(f"{path}: batch format {batch.get('format')}, this forgeml reads {BATCH_FORMAT}")
    if batch.get("arch") and batch["arch"] != platform.machine():
        raise InvalidInput(f"{path}: the kernels are for {batch['arch']}, this machine is {platform.machine()}")
    return batch


def _device_name(device: str) -> str:
    if device == "cuda":
        from forgeml.runtime.device import gpu_info

        return gpu_info().get("name", "CUDA GPU")
    from forgeml.targets.host import detect_host

    return detect_host().model


def _time_one(ffi: Any, batch_dir: Path, candidate: dict[str, Any], device: str,
              cache: dict[str, Any]) -> dict[str, Any]:
    """One candidate library's `main`: seconds per call (`run_secs`, _REPEAT samples) and, for a
    tuned candidate, how far its outputs are from the rule schedule's on the same inputs
    (`max_rel_error`; the rule schedule's outputs are saved as the kernel's reference)."""
    import numpy as np

    from forgeml.runtime.device import evaluate
    from forgeml.runtime.session import _copy_to_host

    module = ffi.load_module(str(batch_dir / candidate["library"]))
    # batches written before outputs were listed: CUDA ones only, whose output is the last parameter
    comparable = candidate.get("comparable", device != "cpu")
    outputs = candidate.get("outputs", [len(candidate["args"]) - 1]) if comparable else []
    args = _arguments(ffi, candidate["args"], outputs, device, cache)
    result: dict[str, Any] = {"run_secs": evaluate(ffi, module, "main", device, tuple(args), _NUMBER, _REPEAT,
                                                   _MIN_REPEAT_MS)}
    if not comparable:
        return result
    got = [_copy_to_host(ffi, args[i]) for i in outputs]
    reference = _reference_path(batch_dir, candidate["kernel"])
    if candidate["kind"] == "rules":
        _save_reference(reference, got)
    elif reference.exists():
        if cache.get("reference") != reference:
            with np.load(reference) as saved:
                cache["expected"] = [saved[f"out{i}"] for i in range(len(saved.files))]
            cache["reference"] = reference
        result["max_rel_error"] = max_relative_error(got, cache["expected"])
    return result


def _arguments(ffi: Any, specs: list[dict[str, Any]], outputs: list[int], device: str,
               cache: dict[str, Any]) -> list[Any]:
    """The kernel's arguments on the device, filled once per kernel (the candidates of a kernel run in
    a row): floats random, integers zero (always a valid index), the same for every candidate. The
    outputs are overwritten before each candidate with NaN (integers: their maximum), so that one
    that leaves any element unwritten cannot pass on its predecessor's values."""
    import numpy as np

    from forgeml.runtime.session import _aligned, _copy_to_device

    key = json.dumps([specs, outputs])
    if cache.get("key") != key:
        rng = np.random.default_rng(0)
        hosts, tensors = [], []
        for arg in specs:
            dtype, shape = np.dtype(arg["dtype"]), tuple(arg["shape"])
            host = _aligned(rng.uniform(-1, 1, shape).astype(dtype) if dtype.kind == "f" else np.zeros(shape, dtype))
            tensor = ffi.from_dlpack(host)  # compiled kernels assume 64-byte aligned buffers
            hosts.append(host)
            tensors.append(tensor if device == "cpu" else _copy_to_device(ffi, tensor, ffi.device(device, 0)))
        poison = {i: _aligned(np.full(hosts[i].shape, np.nan if hosts[i].dtype.kind == "f" else
                                      np.iinfo(hosts[i].dtype).max, hosts[i].dtype)) for i in outputs}
        cache.clear()
        cache.update(key=key, hosts=hosts, tensors=tensors, poison=poison)
    copy = ffi.get_global_func("runtime.TVMTensorCopyFromTo")
    for i, values in cache["poison"].items():
        if device == "cpu":
            np.copyto(cache["hosts"][i], values)
        else:
            copy(ffi.from_dlpack(values), cache["tensors"][i])
    return cache["tensors"]


def tolerance(candidate: dict[str, Any]) -> float:
    """The largest `max_rel_error` a candidate may have: fp32 accumulation in another order moves a
    few float32 ulps, or one float16 ulp (~1e-3) of an output rounded to half precision."""
    half = any(a["dtype"] in ("float16", "bfloat16") for a in candidate["args"])
    return 1e-2 if half else 1e-4


def wrong_output(candidate: dict[str, Any], result: dict[str, Any]) -> bool:
    """Whether a measured candidate's outputs are off its kernel's rule-schedule outputs."""
    return result.get("max_rel_error", 0.0) > tolerance(candidate)


def _reference_path(batch_dir: Path, kernel: str) -> Path:
    return batch_dir / REFERENCE_DIR / f"{kernel}.npz"


def _save_reference(path: Path, outputs: list[Any]) -> None:
    import numpy as np

    path.parent.mkdir(exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, **{f"out{i}": out for i, out in enumerate(outputs)})
    os.replace(tmp, path)


def max_relative_error(outputs: list[Any], expected: list[Any]) -> float:
    """max |output - expected| over every element, relative to max |expected| (inf where the shapes
    differ or a candidate's value is NaN or infinite and the reference's is not)."""
    import numpy as np

    worst = 0.0
    for out, ref in zip(outputs, expected, strict=True):
        if out.shape != ref.shape:
            return float("inf")
        wide = np.float64 if out.dtype == np.float64 or out.dtype.kind != "f" else np.float32
        a, b = out.astype(wide), ref.astype(wide)
        same = (a == b) | (np.isnan(a) & np.isnan(b))  # equal infinities and NaN where the rules have NaN
        with np.errstate(invalid="ignore"):  # inf - inf
            diff = np.where(same, 0.0, np.abs(a - b))
        if not np.all(np.isfinite(diff)):
            return float("inf")
        finite = np.abs(b[np.isfinite(b)])
        scale = max(float(finite.max()) if finite.size else 0.0, 1e-30)
        worst = max(worst, float(diff.max(initial=0.0)) / scale)
    return worst


def _worker(batch_dir: Path, ids: list[str]) -> None:
    """Time the given candidates, one JSON line each on stdout."""
    from forgeml.runtime.native import load_runtime

    batch = read_batch(batch_dir)
    ffi = load_runtime(batch["device"])
    by_id = {c["id"]: c for c in batch["candidates"]}
    cache: dict[str, Any] = {}  # the current kernel's arguments and reference outputs
    for cid in ids:
        try:
            line = {"id": cid, **_time_one(ffi, batch_dir, by_id[cid], batch["device"], cache)}
        except Exception as e:  # noqa: BLE001 (a candidate that fails is a result, not the end)
            message = str(e).strip().splitlines()
            line = {"id": cid, "error": message[-1][:300] if message else type(e).__name__}
        print(json.dumps(line), flush=True)
        if "error" in line and batch["device"] != "cpu":
            # a failed kernel can leave the CUDA context unusable (errors are sticky): the rest
            # get a fresh process
            print(json.dumps({"restart": True}), flush=True)
            return


def measure_batch(batch_dir: str | Path, timeout_s: float = 60.0,
                  progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Time every candidate of the batch not yet in DIR/results.json; returns the results document."""
    batch_dir = Path(batch_dir)
    batch = read_batch(batch_dir)
    from forgeml.runtime.session import _DEVICE_TYPES

    if batch["device"] not in _DEVICE_TYPES:
        raise InvalidInput(f"{batch_dir}: unknown device '{batch['device']}'")
    if batch["device"] == "cuda":
        from forgeml.targets.host import has_cuda_gpu

        if not has_cuda_gpu():
            raise InvalidInput(f"{batch_dir}: its kernels run on a CUDA GPU, and this machine has none")
    from forgeml.runtime.native import load_runtime

    load_runtime(batch["device"])  # a missing tvm_ffi or runtime library: one error, not one per candidate
    results_path = batch_dir / RESULTS_FILE
    doc = json.loads(results_path.read_text()) if results_path.exists() else {}
    if doc.get("format") != BATCH_FORMAT:
        doc = {"format": BATCH_FORMAT, "results": {}}
    doc["device"] = {"kind": batch["device"], "name": _device_name(batch["device"]), "machine": platform.node()}
    done = doc["results"]
    # rule schedules first: their outputs are the references the tuned candidates are checked against
    ordered = sorted(batch["candidates"], key=lambda c: c["kind"] != "rules")
    todo = [c["id"] for c in ordered if c["id"] not in done]
    total = len(batch["candidates"])
    while todo:
        todo = _run_worker(batch_dir, todo, done, timeout_s, lambda: _save(results_path, doc, progress, total))
    _save(results_path, doc, progress, total)
    shutil.rmtree(batch_dir / REFERENCE_DIR, ignore_errors=True)
    return doc


def _run_worker(batch_dir: Path, todo: list[str], done: dict[str, Any], timeout_s: float,
                saved: Callable[[], None]) -> list[str]:
    """Run one worker over `todo`; returns what is left when it dies (its current candidate marked failed)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # FORGEML_MEASURE_PYTHON: how to start this Python (an emulated device: "qemu-aarch64 -L ROOT python3")
    python = shlex.split(os.environ.get("FORGEML_MEASURE_PYTHON", "")) or [sys.executable]
    errors = tempfile.TemporaryFile("w+")  # a pipe nobody reads until the end could fill and block the worker
    proc = subprocess.Popen([*python, "-m", "forgeml.runtime.measure", "--worker", str(batch_dir), *todo],
                            stdout=subprocess.PIPE, stderr=errors, text=True, env=env)
    left, hung = list(todo), False
    try:
        while left:
            ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
            hung = not ready
            line = proc.stdout.readline() if ready else ""
            if not line:
                break
            result = json.loads(line)
            if result.get("restart"):
                return left
            cid = result.pop("id")
            done[cid] = result
            left.remove(cid)
            saved()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        errors.seek(0)
        stderr = errors.read().strip().splitlines()
        errors.close()
    if left:  # the worker died or hung on left[0]
        why = f"took over {timeout_s:g} s" if hung else f"crashed the measuring process (exit {proc.returncode})"
        detail = "" if hung or not stderr else f": {stderr[-1][:200]}"
        done[left[0]] = {"error": f"{why}{detail}"}
        saved()
        return left[1:]
    return []


def _save(path: Path, doc: dict[str, Any], progress: Callable[[int, int], None] | None, total: int) -> None:
    doc["time"] = time.strftime("%Y-%m-%d %H:%M:%S")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)
    if progress:
        progress(len(doc["results"]), total)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m forgeml.runtime.measure",
                                     description="Time a forgeml tuning batch's kernels on this machine "
                                                 "(writes DIR/results.json; resumes an interrupted run).")
    parser.add_argument("dir", type=Path, help="the directory `forgeml tune --measure-elsewhere` wrote")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds one candidate may take [60]")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("ids", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.dir, args.ids)
        return 0

    def report(n: int, total: int) -> None:
        print(f"\rmeasured {n}/{total}", end="", file=sys.stderr, flush=True)

    try:
        doc = measure_batch(args.dir, args.timeout, report)
    except (InvalidInput, ArtifactError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"error: measuring needs numpy and apache-tvm-ffi ({e})", file=sys.stderr)
        return 2
    results = doc["results"]
    failed = sum(1 for r in results.values() if "error" in r)
    batch = read_batch(args.dir)
    wrong = sum(1 for c in batch["candidates"] if c["id"] in results and wrong_output(c, results[c["id"]]))
    print(f"\n{len(results)} candidates measured on {doc['device']['name']} ({failed} failed, {wrong} with "
          f"outputs off the rule schedule's): {args.dir / 'results.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
