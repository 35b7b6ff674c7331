"""forgeml.runtime never changes the calling thread's CPU affinity (TVM's pool binds the caller to core 0).

Each case runs in a subprocess: the pytest process's own affinity, and its TVM thread pool, stay clean.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import _model, save
from onnx import TensorProto, helper

import forgeml
from forgeml.runtime import native

_ROWS, _FEATURES = 64, 256  # 4M multiply-adds: big enough for the compiled MatMul to use the thread pool

_SCRIPT = """
import json, os, sys, threading
import numpy as np
import forgeml
from forgeml.runtime import native

path, threads, restrict = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
if restrict is not None:
    os.sched_setaffinity(0, restrict)
report = {"before": sorted(os.sched_getaffinity(0))}
w = np.load(path + ".w.npy")
x = np.random.default_rng(0).standard_normal((64, w.shape[0])).astype("float32")


def load_and_run(where):
    session = forgeml.load(path, threads=threads)
    y = session.run({"x": x})["y"]
    report[where + "_error"] = float(np.abs(y - np.maximum(x @ w, 0)).max())
    report[where + "_threads"] = native.load_runtime().get_global_func("runtime.NumThreads")()
    report[where] = sorted(os.sched_getaffinity(0))
    return session


session = load_and_run("main")
seen = {}
later = threading.Thread(target=lambda: seen.update(mask=sorted(os.sched_getaffinity(0))))
later.start(); later.join()
report["created_after_run"] = seen["mask"]
other = threading.Thread(target=lambda: load_and_run("other_thread"))  # its own TVM pool
other.start(); other.join()
first_run = {}
def run_only():
    first_run["before"] = sorted(os.sched_getaffinity(0))
    session.run({"x": x})
    first_run["after"] = sorted(os.sched_getaffinity(0))
    first_run["threads"] = native.load_runtime().get_global_func("runtime.NumThreads")()
runner = threading.Thread(target=run_only)  # runs a session loaded elsewhere: its pool starts here
runner.start(); runner.join()
report["first_run_in_thread"] = first_run
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def compiled_matmul_relu(tmp_path_factory) -> Path:
    """y = relu(x @ W), x [64, 256], W [256, 256], compiled for x86-64; W saved beside it as .w.npy."""
    w = np.random.default_rng(1).standard_normal((_FEATURES, _FEATURES)).astype("float32") * 0.1
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [_ROWS, _FEATURES])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [_ROWS, _FEATURES])], {"W": w})
    d = tmp_path_factory.mktemp("affinity")
    artifact = d / "matmul_relu.fml"
    forgeml.compile_model(save(model, d / "matmul_relu.onnx"), artifact, target="x86-64")
    np.save(f"{artifact}.w.npy", w)
    return artifact


def _run(artifact: Path, threads: int | None, restrict: list[int] | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS", "TVM_BIND_THREADS")}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(artifact), json.dumps(threads), json.dumps(restrict)],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


@pytest.mark.parametrize("threads", [2, None], ids=["threads=2", "default"])
def test_caller_affinity_unchanged_after_load_and_run(compiled_matmul_relu, threads):
    report = _run(compiled_matmul_relu, threads)
    full = report["before"]
    assert report["main"] == full and report["main_error"] < 1e-3
    assert report["created_after_run"] == full  # a thread created afterwards gets the caller's mask
    assert report["other_thread"] == full and report["other_thread_error"] < 1e-3
    first = report["first_run_in_thread"]
    assert first["before"] == first["after"] == full
    expected = threads if threads is not None else len(full)  # the pool has the threads asked for
    assert report["main_threads"] == report["other_thread_threads"] == first["threads"] == expected


@pytest.mark.skipif(len(_cores()) < 2, reason="needs two cores to restrict the caller to one")
@pytest.mark.parametrize("threads", [2, None], ids=["threads=2", "default"])
def test_caller_restricted_to_one_core_stays_restricted(compiled_matmul_relu, threads):
    core = _cores()[-1]  # not core 0, where TVM binds the caller by default
    report = _run(compiled_matmul_relu, threads, restrict=[core])
    assert report["before"] == report["main"] == report["created_after_run"] == [core]
    assert report["other_thread"] == [core] and report["first_run_in_thread"]["after"] == [core]
    assert report["main_error"] < 1e-3
    assert report["main_threads"] == (threads or 1)  # default: one thread per core the caller may use


_IDLE_SCRIPT = """
import ctypes, json, sys, time
import numpy as np
import forgeml

path = sys.argv[1]
w = np.load(path + ".w.npy")
x = np.random.default_rng(0).standard_normal((64, w.shape[0])).astype("float32")
session = forgeml.load(path, threads=2)
session.run({"x": x})
cpu = time.process_time()  # every thread of the process: after the run only the pool's worker can burn
time.sleep(0.6)
idle = time.process_time() - cpu
libc = ctypes.CDLL(None)
start = time.perf_counter()
for _ in range(20000):
    libc.sched_yield()
per_yield = (time.perf_counter() - start) / 20000  # with ctypes' own overhead: an upper bound
print(json.dumps({"idle_cpu_s": idle, "tvm_default_spin_s": 300000 * per_yield}))
"""


@pytest.mark.parametrize("spin", [None, "300000"], ids=["forgeml", "tvm-default"])
def test_idle_pool_stops_spinning_soon_after_a_run(compiled_matmul_relu, spin):
    """TVM's idle worker calls sched_yield 300000 times before it sleeps (~150 ms of a core on a 2-vCPU VM)
    after every run; forgeml lowers that to 10000 unless $TVM_THREAD_POOL_SPIN_COUNT says otherwise."""
    env = {k: v for k, v in os.environ.items() if k != native.SPIN_ENV}
    if spin:
        env[native.SPIN_ENV] = spin  # the user's setting wins
    proc = subprocess.run([sys.executable, "-c", _IDLE_SCRIPT, str(compiled_matmul_relu)],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    if spin:
        assert report["idle_cpu_s"] > 0.1 * report["tvm_default_spin_s"]  # the measurement sees the spin
    else:
        assert report["idle_cpu_s"] < 0.3 * report["tvm_default_spin_s"]
