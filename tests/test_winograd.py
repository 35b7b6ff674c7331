"""Winograd convolutions (compiler/cpu/winograd.py): which convs take them, and their outputs against ONNX
Runtime's (tiles that do not divide the output, batches, asymmetric padding, residual epilogues, AVX2 and
AVX-512 register tiles); compile-time verification records the non-finite probe as unsettled."""

from __future__ import annotations

import platform

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
tvm = pytest.importorskip("tvm")

from onnx import helper  # noqa: E402

from forgeml.compiler import graph, pipeline  # noqa: E402
from forgeml.compiler.cpu import common as cpu_common  # noqa: E402
from forgeml.compiler.cpu import winograd  # noqa: E402
from forgeml.compiler.verify import WINOGRAD  # noqa: E402
from forgeml.targets.host import detect_host  # noqa: E402
from tests.test_schedules import _check, _conv_model, _f, _import, _model, _rng, _target  # noqa: E402

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64", reason="Winograd kernels are x86 only")


def _kernels(model, target) -> dict[str, tvm.tirx.PrimFunc]:
    mod = pipeline.get_pipeline("O2")(_import(model), target)
    return {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}


def _scheduled_by_rule(func) -> bool:
    """The Winograd rule's schedule: matrix products parallel with a vectorized register tile."""
    text = func.script()
    return "T.parallel" in text and "T.vectorized" in text and "wino_m_init" in text


def _asymmetric_model(c, h, w, oc, pads):
    rng = _rng(3)
    weights = {"W": (rng.standard_normal((oc, c, 3, 3)) * 0.2).astype("float32"),
               "B": rng.standard_normal(oc).astype("float32")}
    oh, ow = h + pads[0] + pads[2] - 2, w + pads[1] + pads[3] - 2
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], kernel_shape=[3, 3], pads=pads),
             helper.make_node("Relu", ["c"], ["y"])]
    model = _model(nodes, [_f("x", (1, c, h, w))], [_f("y", (1, oc, oh, ow))], weights)
    return model, {"x": rng.standard_normal((1, c, h, w)).astype("float32")}


@pytest.mark.parametrize("mcpu", [None, "haswell"])  # the host's ISA, and AVX2 tiles (16 registers)
@pytest.mark.parametrize("n,c,h,w,oc,residual", [
    (1, 32, 14, 14, 32, False),  # F(4x4), tiles divide the output
    (1, 32, 13, 13, 64, True),  # F(4x4), partial last tiles, residual add in the epilogue
    (2, 16, 7, 9, 32, False),  # F(2x2), a batch of 2, odd width
])
def test_winograd_conv_matches_onnxruntime(mcpu, n, c, h, w, oc, residual):
    if mcpu == "haswell" and "avx2" not in detect_host().features:
        pytest.skip("host without AVX2")
    target = _target(mcpu)
    model, feeds = _conv_model(n, c, h, w, oc, 3, 1, 1, residual=residual)
    kernels = _kernels(model, target)
    wino = [f for name, f in kernels.items() if "winograd" in name]
    assert len(wino) == 1 and _scheduled_by_rule(wino[0]), list(kernels)
    assert not any("conv2d" in name and "winograd" not in name for name in kernels)  # epilogue fused in
    _check(model, feeds, target=target)


def test_winograd_asymmetric_padding():
    model, feeds = _asymmetric_model(16, 12, 10, 32, [0, 1, 2, 1])
    assert any("winograd" in name for name in _kernels(model, _target()))
    _check(model, feeds)


@pytest.mark.parametrize("case", ["stride2", "grouped", "few_channels", "tiny_map", "5x5"])
def test_convs_winograd_leaves_direct(case):
    args = {"stride2": (1, 32, 14, 14, 32, 3, 2, 1), "grouped": (1, 32, 14, 14, 32, 3, 1, 1),
            "few_channels": (1, 8, 14, 14, 32, 3, 1, 1), "tiny_map": (1, 32, 3, 3, 32, 3, 1, 1),
            "5x5": (1, 32, 14, 14, 32, 5, 1, 2)}[case]
    model, _ = _conv_model(*args, groups=2 if case == "grouped" else 1)
    assert not any("winograd" in name for name in _kernels(model, _target()))


def test_winograd_off_by_environment(monkeypatch):
    model, _ = _conv_model(1, 32, 14, 14, 32, 3, 1, 1)
    monkeypatch.setenv("FORGEML_WINOGRAD", "0")
    assert not any("winograd" in name for name in _kernels(model, _target()))


def test_winograd_not_for_arm_targets():
    target = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72"})
    assert not winograd.enabled(target)
    assert winograd.enabled(_target())


@pytest.mark.parametrize("m", [2, 4])
def test_transformed_weights_give_the_convolution(m):
    """U = G g G^T with the input and output transforms reproduce a 3x3 correlation on one tile (numpy)."""
    a_mat, b_mat, g_mat = winograd.matrices(m)
    rng = _rng(1)
    g, d = rng.standard_normal((3, 3)), rng.standard_normal((m + 2, m + 2))
    y = a_mat.T @ ((g_mat @ g @ g_mat.T) * (b_mat.T @ d @ b_mat)) @ a_mat
    direct = np.array([[np.sum(d[i:i + 3, j:j + 3] * g) for j in range(m)] for i in range(m)])
    np.testing.assert_allclose(y, direct, rtol=1e-9, atol=1e-9)
    cpu = cpu_common.cpu_of(_target())
    p = winograd.plan(1, 16, 2 * cpu.lanes, 14, 14, cpu)
    u = winograd.weights(rng.standard_normal((2 * cpu.lanes, 16, 3, 3)).astype("float32"), p)
    assert u.shape == (p.alpha, p.alpha, 1, 16, p.kt) and u.dtype == np.float32


def test_compiled_artifact_records_winograd(tmp_path):
    import forgeml

    model, _ = _conv_model(1, 32, 14, 14, 32, 3, 1, 1, relu=False)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    manifest = forgeml.compile_model(path, tmp_path / "m.fml", target="x86-64")
    assert manifest.compile_options["winograd_kernels"] == 1
    assert manifest.verification["passed"] and manifest.verification["max_rel_error"] < 1e-4
    probe = manifest.verification["nonfinite"]
    assert WINOGRAD in probe["unsettled"] and not probe["enforced"]
    direct = forgeml.compile_model(path, tmp_path / "d.fml", target="x86-64", winograd=False)  # --no-winograd
    assert "winograd_kernels" not in direct.compile_options and direct.compile_options["winograd"] is False
    assert direct.verification["nonfinite"]["enforced"]


def test_graph_passes_unchanged_without_the_device_pass():
    """The shared graph passes hold no Winograd rewrite (CUDA and O0 use them as they are)."""
    model, _ = _conv_model(1, 32, 14, 14, 32, 3, 1, 1)
    with _target():
        mod = tvm.transform.Sequential(graph.graph_passes())(_import(model))
    assert not any("winograd" in gv.name_hint for gv in mod.get_global_vars())


def test_tuning_leaves_winograd_kernels_to_the_rule():
    """MetaSchedule's design space generation raised on Winograd kernels and ended the whole search."""
    pytest.importorskip("xgboost")
    from forgeml.compiler.tuning import search

    model, _ = _conv_model(1, 32, 14, 14, 32, 3, 1, 1)
    target = _target()
    mod = pipeline.tuning_input(_import(model), target)
    assert any("winograd" in gv.name_hint for gv in mod.get_global_vars())
    assert not any("winograd" in t.task_name for t in search.extract(mod, target))


def _between_guard_pages(shape: tuple[int, ...], at_end: bool) -> np.ndarray:
    """A float32 array starting right after an unreadable page (or ending right before one): a kernel that
    reads outside its input faults here instead of reading a neighbour's memory."""
    import ctypes
    import mmap

    nbytes, page = int(np.prod(shape)) * 4, mmap.PAGESIZE
    span = -(-nbytes // page) * page
    region = mmap.mmap(-1, span + 2 * page)
    raw = np.frombuffer(region, dtype=np.uint8)
    libc = ctypes.CDLL(None)
    for start in (raw.ctypes.data, raw.ctypes.data + page + span):
        assert libc.mprotect(ctypes.c_void_p(start), ctypes.c_size_t(page), 0) == 0  # PROT_NONE
    first = page + (span - nbytes if at_end else 0)
    return raw[first:first + nbytes].view(np.float32).reshape(shape)


@pytest.mark.parametrize("at_end", [False, True])
def test_winograd_reads_nothing_outside_its_input(at_end):
    """The padding reads nothing beyond the input (a select of a clamped load did: TVM dropped the clamp)."""
    from tvm import relax

    model, feeds = _conv_model(1, 32, 14, 14, 32, 3, 1, 1)  # 32 x 14 x 14 floats: a multiple of 64 bytes
    target = _target()
    mod, weights = graph.lift_weights(pipeline.get_pipeline("O2")(_import(model), target))
    vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
    x = _between_guard_pages(feeds["x"].shape, at_end)
    x[...] = feeds["x"]
    got = vm["main"](tvm.runtime.from_dlpack(x), *[tvm.runtime.tensor(w) for w in weights]).numpy()
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
