"""One engine per process: the worker that `forgeml bench` and the CPU benchmark scripts time engines in.

TVM's thread pool pins the thread that first runs a session to core 0, and every thread or process
created afterwards inherits that: an ONNX Runtime session timed in the same process after a TVM run
gets its pool squeezed onto one core (resnet18 61 ms instead of 17 ms on 2 cores). forgeml's runtime
now restores the caller's affinity, but a benchmark must not depend on any engine's manners. So each
engine is loaded in a fresh interpreter of its own (`python -m forgeml.bench.worker`), started with the CPU
affinity the parent had when it imported forgeml (before any TVM pool could narrow it), and the
parent asks each worker in turn for a block of timed runs. Runs are timed inside the worker
(`time.perf_counter` around each call), so the pipe between the processes is never timed.

Protocol: one JSON object a line on the worker's stdin and on a private copy of its stdout (fd 1
itself goes to stderr, so what an engine prints cannot corrupt the replies).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

from forgeml.errors import ForgeError, InvalidInput

ENGINES = ("forgeml", "onnxruntime", "pytorch-zoo")


def start_affinity() -> list[int] | None:
    """The CPUs this process could use when forgeml was first imported (None where unsupported)."""
    from forgeml.process import START_AFFINITY

    return START_AFFINITY


class EngineWorker:
    """One engine (`forgeml` artifact, `onnxruntime` model, or `pytorch-zoo` model name) loaded in a fresh
    interpreter of its own, on `feeds`, with `threads` threads; `run(n)` returns n per-call times (s)."""

    def __init__(self, engine: str, model: str | Path, feeds: dict[str, np.ndarray], threads: int,
                 affinity: list[int] | None = None):
        if engine not in ENGINES:
            raise InvalidInput(f"unknown engine '{engine}'; known: {', '.join(ENGINES)}")
        self.engine, self.model = engine, str(model)
        self._tmp = tempfile.TemporaryDirectory(prefix="forgeml-worker-")
        inputs = Path(self._tmp.name) / "inputs.npz"
        np.savez(inputs, **feeds)
        self._stderr = open(Path(self._tmp.name) / "stderr.txt", "w+")  # noqa: SIM115 (closed in close())
        mask = start_affinity() if affinity is None else affinity
        package_root = str(Path(__file__).resolve().parents[2])  # this forgeml, not another one installed
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root,
                                                                       os.environ.get("PYTHONPATH")])))
        cmd = [sys.executable, "-m", "forgeml.bench.worker"]
        if mask:
            cmd += ["--affinity", ",".join(map(str, mask))]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                      env=env, text=True, bufsize=1)
        try:
            #: pid; affinity_inherited (the parent's), affinity_at_start (the mask it was started with, set
            #: before anything loads), affinity_after_first_run (TVM pins its caller to core 0 there); threads;
            #: load_s (load and first run); extra (what the engine adds: GPU facts for a CUDA artifact)
            self.info: dict[str, Any] = self._ask(cmd="load", engine=engine, model=self.model, inputs=str(inputs),
                                                  threads=threads)
        except BaseException:
            self.close()
            raise

    def run(self, n: int) -> list[float]:
        """Run the engine n times; seconds per call, timed in the worker."""
        return self._ask(cmd="run", n=n)["times"]

    def cpu_time(self, n: int) -> float:
        """Process CPU seconds per call over n calls (less disturbed by other processes than wall time)."""
        return self._ask(cmd="cpu", n=n)["seconds"]

    def _ask(self, **request: Any) -> dict[str, Any]:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        try:
            self._proc.stdin.write(json.dumps(request) + "\n")
            self._proc.stdin.flush()
            line = self._proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            code = self._proc.wait(timeout=30)
            self._stderr.seek(0)
            last = [ln for ln in self._stderr.read().splitlines() if ln.strip()]
            raise ForgeError(f"the {self.engine} bench worker exited ({code}): {last[-1] if last else 'no output'}")
        reply = json.loads(line)
        if "error" in reply:
            raise (InvalidInput if reply.get("invalid_input") else ForgeError)(reply["error"])
        return reply

    def close(self) -> None:
        """Stop the worker and remove its files."""
        if self._proc.poll() is None:
            try:
                self._proc.stdin.close()  # type: ignore[union-attr]
                self._proc.wait(timeout=30)
            except Exception:  # noqa: BLE001 (a worker that will not stop is killed)
                self._proc.kill()
                self._proc.wait()
        for stream in (self._proc.stdout, self._stderr):
            if stream is not None:
                stream.close()
        self._tmp.cleanup()

    def __enter__(self) -> EngineWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _load(engine: str, model: str, feeds: dict[str, np.ndarray], threads: int) -> tuple[Callable[[], Any], dict]:
    """The call to time for `engine` on `model`, and facts for the report."""
    if engine == "forgeml":
        from forgeml.runtime.device import bench_runner
        from forgeml.runtime.session import load

        return bench_runner(load(model, threads=threads), feeds)  # GPU: device-resident, synchronized
    if engine == "onnxruntime":
        from forgeml.compiler.verify import onnxruntime_session

        session = onnxruntime_session(model, threads=threads)
        return (lambda: session.run(None, feeds)), {}
    import torch  # pytorch-zoo: a zoo model by name, eager

    from forgeml.zoo import get_model

    torch.set_num_threads(threads)
    spec = get_model(model)
    module = spec.build().eval()
    args = [torch.from_numpy(feeds[k]) for k in spec.inputs]

    def run() -> Any:
        with torch.inference_mode():
            return module(*args)

    return run, {}


def _affinity() -> list[int] | None:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


def _serve(affinity: dict[str, list[int] | None], requests: IO[str], replies: IO[str]) -> None:
    run: Callable[[], Any] | None = None
    for line in requests:
        request = json.loads(line)
        try:
            if request["cmd"] == "load":
                with np.load(request["inputs"]) as data:
                    feeds = {k: data[k] for k in data.files}
                start = time.perf_counter()
                run, extra = _load(request["engine"], request["model"], feeds, int(request["threads"]))
                run()
                reply: dict[str, Any] = {
                    "pid": os.getpid(), **affinity, "affinity_after_first_run": _affinity(),
                    "threads": int(request["threads"]), "load_s": time.perf_counter() - start, "extra": extra}
            elif run is None:
                raise ForgeError("bench worker: 'load' first")
            elif request["cmd"] == "run":
                times = []
                for _ in range(int(request["n"])):
                    t = time.perf_counter()
                    run()
                    times.append(time.perf_counter() - t)
                reply = {"times": times}
            elif request["cmd"] == "cpu":
                n = int(request["n"])
                t = time.process_time()
                for _ in range(n):
                    run()
                reply = {"seconds": (time.process_time() - t) / n}
            else:
                raise ForgeError(f"bench worker: unknown command {request['cmd']!r}")
        except Exception as e:  # noqa: BLE001 (reported to the parent, which raises it there)
            reply = {"error": str(e) or type(e).__name__, "invalid_input": isinstance(e, InvalidInput)}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


def main(argv: list[str]) -> None:
    """Worker entry point: set the affinity first, then serve requests."""
    inherited = _affinity()
    if "--affinity" in argv:
        os.sched_setaffinity(0, [int(c) for c in argv[argv.index("--affinity") + 1].split(",")])
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # stray prints from the engines go to stderr
    _serve({"affinity_inherited": inherited, "affinity_at_start": _affinity()}, sys.stdin, replies)


if __name__ == "__main__":
    main(sys.argv[1:])
