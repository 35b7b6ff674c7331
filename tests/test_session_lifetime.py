"""A session's lifetime: the file under it replaced, many sessions loaded and dropped, one library
shared, and ONNX Runtime's call shape (issue 20)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import _compile_once, _model, mlp_model, ort_run

import forgeml
from forgeml.errors import InvalidInput
from forgeml.runtime.artifact import open_artifact

REPO = Path(__file__).resolve().parents[1]


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter on this checkout (a crash there fails the test, not pytest)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def other_mlp(tmp_path_factory):
    """The mlp's shape with other weights: an artifact of the same size with other outputs."""
    return _compile_once(tmp_path_factory, "mlp_other", mlp_model(seed=1))


_REPLACE = """
import os, shutil, sys, numpy as np, forgeml
live, other, how = sys.argv[1:]
x = np.random.default_rng(0).standard_normal((4, 16)).astype("float32")
s = forgeml.load(live)
before = s.run({"x": x})["y"]
if how == "cp":  # what cp does to an existing file: the same inode, truncated, then written
    with open(other, "rb") as src, open(live, "wb") as dst:
        shutil.copyfileobj(src, dst)
else:  # mv: a new inode under the old name
    os.replace(other, live)
after = s.run({"x": x})["y"]
print("same" if np.array_equal(before, after) else "changed")
"""


@pytest.mark.parametrize("how", ["cp", "mv"])
@pytest.mark.parametrize("other", ["smaller", "same size"])
def test_replacing_the_file_under_a_live_session_changes_nothing(compiled_mlp, tmp_path, how, other):
    """`cp other.fml live.fml` under a live session killed the process with SIGBUS (its weights were a
    private mapping of the file, truncated under it); a same-size overwrite silently changed its outputs."""
    live = tmp_path / "live.fml"
    data = compiled_mlp[1].read_bytes()
    live.write_bytes(data)
    replacement = tmp_path / "other.fml"
    if other == "smaller":  # ends before the mlp's weights: reading them past the file's end is SIGBUS
        replacement.write_bytes(data[:1024])
    else:  # the same file with every weight negated (float32 sign bits flipped)
        start, size = open_artifact(live).offsets["weights.bin"]
        weights = np.frombuffer(data, np.uint32, size // 4, start) ^ np.uint32(0x80000000)
        replacement.write_bytes(data[:start] + weights.tobytes() + data[start + size:])
    proc = _python(_REPLACE, str(live), str(replacement), how)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout.strip() == "same"


_CYCLES = """
import gc, sys, numpy as np, forgeml

def mappings():
    lines = open("/proc/self/maps").read().splitlines()
    return len(lines), sum("/forgeml-" in line for line in lines)

x = np.zeros((4, 16), "float32")
counts = []
for i in range(int(sys.argv[2])):
    s = forgeml.load(sys.argv[1])
    s.run({"x": x})
    del s
    gc.collect()
    counts.append(mappings())
print(counts[1][0], counts[-1][0], counts[-1][1])
"""


def test_load_run_drop_cycles_leave_no_mappings(compiled_mlp):
    """Each load dlopened a new copy of the library that tvm_ffi kept for the whole process: 500 cycles
    of the mlp left 2,500 mappings of deleted forgeml-*.so files (vm.max_map_count ends a server that
    reloads models). Mapping counts are deterministic, unlike RSS or time."""
    proc = _python(_CYCLES, str(compiled_mlp[1]), "60")
    assert proc.returncode == 0, proc.stderr[-2000:]
    after_two, after_all, library_mappings = map(int, proc.stdout.split())
    assert library_mappings == 0
    assert after_all <= after_two + 2, (after_two, after_all)  # 60 cycles leaked 295 before


_SHARED = """
import gc, sys, numpy as np, forgeml

def library_mappings():
    return sum("/forgeml-" in line for line in open("/proc/self/maps"))

x = np.random.default_rng(0).standard_normal((4, 16)).astype("float32")
one = forgeml.load(sys.argv[1])
alone = library_mappings()
two = forgeml.load(sys.argv[1])
shared = library_mappings()
other = forgeml.load(sys.argv[2])
with_other = library_mappings()
expected = one.run({"x": x})["y"]
del one
gc.collect()
np.testing.assert_array_equal(two.run({"x": x})["y"], expected)
del two, other
gc.collect()
print(alone, shared, with_other, library_mappings())
"""


def test_sessions_of_one_library_share_it_and_unload_it_last(compiled_mlp, other_mlp):
    """A library is loaded once per process (keyed by its verified sha256) and unloaded when its last
    session goes; another artifact's library is its own."""
    proc = _python(_SHARED, str(compiled_mlp[1]), str(other_mlp[1]))
    assert proc.returncode == 0, proc.stderr[-2000:]
    alone, shared, with_other, left = map(int, proc.stdout.split())
    assert alone > 0 and shared == alone and with_other == 2 * alone and left == 0


@pytest.fixture(scope="module")
def two_outputs(tmp_path_factory):
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Relu", ["x"], ["pos"]), helper.make_node("Neg", ["x"], ["neg"])]
    spec = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3]) for n in ("pos", "neg")]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])], spec, {})
    return _compile_once(tmp_path_factory, "two_outputs", model)


def test_run_takes_onnxruntime_call_shape(two_outputs):
    """`run(None, feeds)` raised "TypeError: object of type 'NoneType' has no len()", though README
    promises InferenceSession's shape. ORT's shape returns lists; `run(feeds)` keeps returning a dict."""
    import onnxruntime as ort

    onnx_path, artifact = two_outputs
    session = forgeml.load(artifact)
    x = np.random.default_rng(1).standard_normal((2, 3)).astype("float32")
    reference = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for names in (None, ["neg"], ["neg", "pos"]):
        got, want = session.run(names, {"x": x}), reference.run(names, {"x": x})
        assert isinstance(got, list) and len(got) == len(want)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
    by_name = session.run({"x": x})
    assert isinstance(by_name, dict) and list(by_name) == ["pos", "neg"]
    np.testing.assert_array_equal(by_name["neg"], ort_run(onnx_path, {"x": x})["neg"])
    assert list(session.run({"x": x}, ["neg"])) == ["neg"]


def test_run_call_shape_errors_name_the_problem(two_outputs):
    session = forgeml.load(two_outputs[1])
    x = np.zeros((2, 3), "float32")
    with pytest.raises(InvalidInput, match="unknown output 'y'; the model's outputs are pos, neg"):
        session.run(["y"], {"x": x})
    with pytest.raises(InvalidInput, match="output names must be a list of strings, got str"):
        session.run("pos", {"x": x})
    with pytest.raises(InvalidInput, match=r"run takes \(feeds\)"):
        session.run(["pos"], [x])
    with pytest.raises(InvalidInput, match="missing input 'x'"):
        session.run(None, {})
