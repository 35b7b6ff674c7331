"""Correctness of forgeml's CPU schedule rules: small ONNX models vs ONNX Runtime.

Each model is built with onnx.helper and random weights, compiled through the O2 pipeline (graph passes,
`apply_cpu_schedules`, weight prepack folding, weights lifted to parameters) and compared with ONNX
Runtime. Where it matters, the test also checks which rule scheduled the function, so a rule that silently
stops matching (and leaves the work to the slow generic fallback) fails here.
"""

from __future__ import annotations

import os
import platform

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
tvm = pytest.importorskip("tvm")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from tvm import relax  # noqa: E402

from forgeml.compiler import graph, pipeline  # noqa: E402
from forgeml.compiler.cpu import common as cpu_common  # noqa: E402
from forgeml.compiler.cpu import rules as cpu_rules  # noqa: E402
from forgeml.targets.host import detect_host  # noqa: E402

RTOL = ATOL = 1e-4


def _target(mcpu: str | None = None) -> tvm.target.Target:
    """The host's target; `mcpu` (or FORGEML_TEST_MCPU, e.g. haswell on an AVX-512 host) picks another x86 cpu."""
    host = detect_host()
    mcpu = mcpu or os.environ.get("FORGEML_TEST_MCPU") or host.llvm_mcpu
    t = {"kind": "llvm", "mcpu": mcpu, "num-cores": max(1, min(host.cores, 2))}
    if host.arch == "x86_64":
        t["mtriple"] = "x86_64-linux-gnu"
    return tvm.target.Target(t)


def _model(nodes, inputs, outputs, weights, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "t", inputs, outputs,
                              [numpy_helper.from_array(np.asarray(w), n) for n, w in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _f(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def _import(model):
    from tvm.relax.frontend.onnx import from_onnx

    mod = from_onnx(model, keep_params_in_input=True)
    mod, params = relax.frontend.detach_params(mod)
    if params and "main" in params:
        values = params["main"]
        fparams = mod["main"].params
        binds = dict(zip(fparams[len(fparams) - len(values):], values))
        mod = relax.transform.BindParams("main", binds)(mod)
    return mod


def _rules_used(model) -> dict[str, str]:
    """PrimFunc name -> the first rule that accepts it (after the graph passes)."""
    target = _target()
    with target:
        mod = tvm.transform.Sequential(graph.graph_passes())(_import(model))
        mod = relax.transform.AttachAttrLayoutFreeBuffers()(mod)
        used = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tvm.tirx.PrimFunc):
                continue
            for rule in cpu_rules.default_rules():
                try:
                    sch = rule.apply(func, target, False)
                except Exception:  # noqa: BLE001 - the pass guards rules the same way
                    sch = None
                if sch is not None:
                    used[gv.name_hint] = type(rule).__name__
                    break
    return used


def _run(model, feeds: dict[str, np.ndarray], target=None) -> list[np.ndarray]:
    target = target or _target()
    mod = pipeline.get_pipeline("O2")(_import(model), target)
    for gv, func in mod.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc):
            assert func.attrs is not None and "tirx.is_scheduled" in func.attrs, gv.name_hint
    mod, weights = graph.lift_weights(mod)
    ex = tvm.compile(mod, target=target)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    args = [tvm.runtime.tensor(v) for v in feeds.values()] + [tvm.runtime.tensor(w) for w in weights]
    out = vm["main"](*args)
    outs = [out] if hasattr(out, "numpy") else list(out)
    return [o.numpy() for o in outs]


def _check(model, feeds, rtol=RTOL, atol=ATOL, target=None):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = sess.run(None, feeds)
    got = _run(model, feeds, target)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)


def _rng(seed=0):
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------------------------------
# convolutions
# --------------------------------------------------------------------------------------------------


def _conv_model(n, c, h, w, oc, k, stride=1, pad=0, groups=1, bias=True, relu=True, residual=False,
                seed=0):
    rng = _rng(seed)
    weights = {"W": (rng.standard_normal((oc, c // groups, k, k)) * 0.2).astype("float32")}
    inputs = ["x", "W"]
    if bias:
        weights["B"] = rng.standard_normal(oc).astype("float32")
        inputs.append("B")
    nodes = [helper.make_node("Conv", inputs, ["c"], kernel_shape=[k, k], strides=[stride, stride],
                              pads=[pad] * 4, group=groups)]
    last = "c"
    oh = (h + 2 * pad - k) // stride + 1
    ow = (w + 2 * pad - k) // stride + 1
    graph_inputs = [_f("x", (n, c, h, w))]
    if residual:
        nodes.append(helper.make_node("Add", [last, "r"], ["s"]))
        graph_inputs.append(_f("r", (n, oc, oh, ow)))
        last = "s"
    if relu:
        nodes.append(helper.make_node("Relu", [last], ["y"]))
    else:
        nodes.append(helper.make_node("Identity", [last], ["y"]))
    model = _model(nodes, graph_inputs, [_f("y", (n, oc, oh, ow))], weights)
    feeds = {"x": rng.standard_normal((n, c, h, w)).astype("float32")}
    if residual:
        feeds["r"] = rng.standard_normal((n, oc, oh, ow)).astype("float32")
    return model, feeds


@pytest.mark.parametrize(
    "c,h,w,oc,k,stride,pad,residual",
    [
        (16, 14, 14, 32, 3, 1, 1, False),  # 3x3 same padding, bias + relu
        (8, 15, 15, 16, 3, 2, 1, False),  # stride 2, odd input
        (32, 7, 7, 64, 1, 1, 0, True),  # 1x1 as GEMM, residual add epilogue
        (96, 7, 7, 160, 1, 1, 0, True),  # 5 channel blocks x 7 pixel tiles: one tile per task (balance)
        (16, 9, 10, 24, 1, 2, 0, False),  # 1x1 stride 2
        (3, 20, 20, 16, 7, 2, 3, False),  # stem-like 7x7/2, 3 input channels
        (5, 9, 9, 12, 3, 1, 1, False),  # channels that fit no vector: fallback
    ],
)
def test_conv(c, h, w, oc, k, stride, pad, residual):
    model, feeds = _conv_model(1, c, h, w, oc, k, stride, pad, residual=residual)
    if oc % 8 == 0:
        assert set(_rules_used(model).values()) >= {"Conv2DRule"}
    _check(model, feeds)


def test_balanced_chunk_splits_work_evenly_over_the_cores():
    from forgeml.compiler.cpu.common import balance, balanced_chunk

    assert balanced_chunk(7, 5, 2, 8) == 1  # 5 tasks are 3 + 2 on two cores; 35 are 18 + 17
    assert balanced_chunk(8, 1, 2, 8) == 4  # the largest chunk that keeps both cores busy
    assert balanced_chunk(28, 1, 2, 8) == 7  # 4 tasks: even, and the largest chunk up to 8
    assert balanced_chunk(49, 2, 1, 8) == 7  # one core: any count balances, so the largest chunk
    assert balance(5, 2) == pytest.approx(5 / 6) and balance(35, 2) == pytest.approx(35 / 36)


@pytest.mark.parametrize("c,h,stride", [(32, 14, 1), (16, 15, 2), (24, 7, 1), (96, 28, 2),
                                        (8, 3, 1)])  # too few tasks: the blocked copy stays a stage of its own
def test_depthwise_conv(c, h, stride):
    model, feeds = _conv_model(1, c, h, h, c, 3, stride, 1, groups=c)
    assert "DepthwiseConvRule" in set(_rules_used(model).values())
    _check(model, feeds)


@pytest.mark.parametrize("c,h,oc,stride,relu6,shared", [
    (16, 14, 96, 2, True, False),  # MobileNetV2's expansion -> stride-2 depthwise -> projection
    (8, 9, 24, 1, False, False),  # 24 channels: 8-lane blocks on AVX-512 too
    (16, 8, 32, 1, True, True),  # the expansion's output also feeds a residual add: that edge stays NCHW
])
def test_channel_blocked_edges(c, h, oc, stride, relu6, shared):
    """Tensors with one reader between convs travel channel-blocked (cpu/blocked.py): expansion ->
    depthwise -> projection, each kernel keeping its fast rule, the result equal to ONNX Runtime's."""
    from forgeml.compiler.cpu.blocked import blocked_edges

    rng = _rng(5)
    weights = {"W1": (rng.standard_normal((oc, c, 1, 1)) * 0.3).astype("float32"),
               "B1": rng.standard_normal(oc).astype("float32"),
               "W2": (rng.standard_normal((oc, 1, 3, 3)) * 0.3).astype("float32"),
               "B2": rng.standard_normal(oc).astype("float32"),
               "W3": (rng.standard_normal((c, oc, 1, 1)) * 0.3).astype("float32"),
               "B3": rng.standard_normal(c).astype("float32"),
               "lo": np.array(0.0, "float32"), "hi": np.array(6.0, "float32")}
    act = (lambda i, o: helper.make_node("Clip", [i, "lo", "hi"], [o])) if relu6 else \
        (lambda i, o: helper.make_node("Relu", [i], [o]))
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["e"], kernel_shape=[1, 1]), act("e", "a"),
             helper.make_node("Conv", ["a", "W2", "B2"], ["d"], kernel_shape=[3, 3], pads=[1] * 4,
                              strides=[stride] * 2, group=oc), act("d", "b"),
             helper.make_node("Conv", ["b", "W3", "B3"], ["p"], kernel_shape=[1, 1])]
    out = (h + 2 - 3) // stride + 1
    outputs = [_f("p", (1, c, out, out))]
    if shared:  # a second reader of the expansion's output
        nodes.append(helper.make_node("ReduceMean", ["a"], ["m"], keepdims=1))
        outputs.append(_f("m", (1, 1, 1, 1)))
    model = _model(nodes, [_f("x", (1, c, h, h))], outputs, weights)
    feeds = {"x": rng.standard_normal((1, c, h, h)).astype("float32")}
    target = _target()
    with target:
        mod = blocked_edges(tvm.transform.Sequential(graph.graph_passes())(_import(model)), target)
        mod = relax.transform.AttachAttrLayoutFreeBuffers()(mod)
    kernels = {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    blocked = sorted(name for name in kernels if "_blocked_" in name)
    assert len(blocked) == (2 if shared else 3), sorted(kernels)
    with target:
        for name in blocked:  # each end keeps its fast rule
            used = next(type(r).__name__ for r in cpu_rules.default_rules() if r.apply(kernels[name], target, False))
            assert used in ("Conv2DRule", "DepthwiseConvRule"), (name, used)
    _check(model, feeds)


def test_channel_blocked_padded_conv_edge():
    """ResNet's conv -> ReLU -> padded 3x3 conv: the second conv's padding stage reads and writes blocks."""
    from forgeml.compiler.cpu.blocked import blocked_edges

    rng = _rng(6)
    weights = {"W1": (rng.standard_normal((32, 16, 3, 3)) * 0.2).astype("float32"),
               "B1": rng.standard_normal(32).astype("float32"),
               "W2": (rng.standard_normal((32, 32, 3, 3)) * 0.2).astype("float32"),
               "B2": rng.standard_normal(32).astype("float32")}
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["c"], kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Relu", ["c"], ["a"]),
             helper.make_node("Conv", ["a", "W2", "B2"], ["d"], kernel_shape=[3, 3], pads=[1] * 4, strides=[2, 2]),
             helper.make_node("Relu", ["d"], ["y"])]
    model = _model(nodes, [_f("x", (1, 16, 12, 12))], [_f("y", (1, 32, 6, 6))], weights)
    target = _target()
    with target:
        mod = blocked_edges(tvm.transform.Sequential(graph.graph_passes())(_import(model)), target)
        mod = relax.transform.AttachAttrLayoutFreeBuffers()(mod)
        blocked = [f for gv, f in mod.functions_items() if "_blocked_" in gv.name_hint]
        assert len(blocked) == 2
        assert all(cpu_rules.Conv2DRule().apply(f, target, False) is not None for f in blocked)
    _check(model, {"x": rng.standard_normal((1, 16, 12, 12)).astype("float32")})


@pytest.mark.parametrize("pool,pads,stride", [("MaxPool", 1, 2), ("MaxPool", 0, 2), ("AveragePool", 1, 1)])
def test_channel_blocked_pool_after_conv(pool, pads, stride):
    """ResNet's stem: conv -> ReLU -> 3x3 pool. The pool takes the conv's output channel-blocked and runs a
    vector of channels per window tap (cpu/pool.py)."""
    from forgeml.compiler.cpu.blocked import blocked_edges
    from forgeml.compiler.cpu.pool import BlockedPoolRule

    rng = _rng(7)
    weights = {"W": (rng.standard_normal((32, 3, 3, 3)) * 0.3).astype("float32"),
               "B": rng.standard_normal(32).astype("float32")}
    out = (15 + 2 * pads - 3) // stride + 1
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Relu", ["c"], ["a"]),
             helper.make_node(pool, ["a"], ["y"], kernel_shape=[3, 3], strides=[stride] * 2, pads=[pads] * 4)]
    model = _model(nodes, [_f("x", (1, 3, 15, 15))], [_f("y", (1, 32, out, out))], weights)
    target = _target()
    with target:
        mod = blocked_edges(tvm.transform.Sequential(graph.graph_passes())(_import(model)), target)
        pools = [f for gv, f in mod.functions_items() if "pool" in gv.name_hint and "_blocked_in" in gv.name_hint]
        assert len(pools) == 1
        assert BlockedPoolRule().apply(pools[0], target, False) is not None
    _check(model, {"x": rng.standard_normal((1, 3, 15, 15)).astype("float32")})


def test_grouped_conv():
    model, feeds = _conv_model(1, 32, 10, 10, 32, 3, 1, 1, groups=2)
    _check(model, feeds)


def _conv_bn_relu6_model(rng, c: int = 8, oc: int = 16):
    """Conv 3x3 -> BatchNormalization -> Clip(0, 6): MobileNet's block, input (1, c, 12, 12)."""
    weights = {
        "W": (rng.standard_normal((oc, c, 3, 3)) * 0.2).astype("float32"),
        "s": rng.uniform(0.5, 1.5, oc).astype("float32"), "b": rng.standard_normal(oc).astype("float32"),
        "m": rng.standard_normal(oc).astype("float32") * 0.1, "v": rng.uniform(0.5, 1.5, oc).astype("float32"),
        "lo": np.array(0.0, "float32"), "hi": np.array(6.0, "float32"),
    }
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["bn"]),
             helper.make_node("Clip", ["bn", "lo", "hi"], ["y"])]
    return _model(nodes, [_f("x", (1, c, 12, 12))], [_f("y", (1, oc, 12, 12))], weights)


def test_conv_batchnorm_relu6_folds():
    rng = _rng(3)
    model = _conv_bn_relu6_model(rng)
    assert "Conv2DRule" in set(_rules_used(model).values())
    _check(model, {"x": rng.standard_normal((1, 8, 12, 12)).astype("float32")})


def test_numpy_constant_folding_matches_tvm_folding():
    """forgeml folds batch norm and Clip constants in numpy (TVM's FoldConstant compiles a kernel per
    op: 40 s of a MobileNetV2 compile); the result must equal TVM's own folding, constants included."""
    mod = _import(_conv_bn_relu6_model(_rng(4)))
    fold = relax.transform.FoldConstant
    with _target():
        tvm_only = tvm.transform.Sequential([fold(), relax.transform.FoldBatchnormToConv2D(), fold()])(mod)
        with_numpy = tvm.transform.Sequential(graph.graph_passes()[:5])(mod)
    tvm.ir.assert_structural_equal(tvm_only["main"], with_numpy["main"], map_free_vars=True)


# --------------------------------------------------------------------------------------------------
# dense / matmul
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m,k,n", [(4, 64, 10), (1, 512, 1000), (3, 257, 48), (128, 128, 128), (5, 33, 7),
                                   (1, 512, 10), (2, 64, 20)])
def test_dense(m, k, n):
    rng = _rng(1)
    weights = {"W": (rng.standard_normal((k, n)) / np.sqrt(k)).astype("float32"),
               "B": rng.standard_normal(n).astype("float32")}
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "B"], ["y"])]
    model = _model(nodes, [_f("x", (m, k))], [_f("y", (m, n))], weights)
    if n % 8 == 0 or k % 8 == 0:  # N % 8 != 0 takes the dot-product schedule
        assert "MatmulRule" in set(_rules_used(model).values())
    _check(model, {"x": rng.standard_normal((m, k)).astype("float32")})


@pytest.mark.parametrize("n", [24, 10])
def test_gemm_transposed_weight(n):
    rng = _rng(2)
    weights = {"W": (rng.standard_normal((n, 40)) * 0.2).astype("float32"),
               "B": rng.standard_normal(n).astype("float32")}
    nodes = [helper.make_node("Gemm", ["x", "W", "B"], ["y"], transB=1)]
    model = _model(nodes, [_f("x", (6, 40))], [_f("y", (6, n))], weights)
    assert "MatmulRule" in set(_rules_used(model).values())
    _check(model, {"x": rng.standard_normal((6, 40)).astype("float32")})


def test_batch_matmul_activations():
    rng = _rng(4)
    nodes = [helper.make_node("MatMul", ["a", "b"], ["y"])]
    model = _model(nodes, [_f("a", (2, 4, 33, 16)), _f("b", (2, 4, 16, 24))], [_f("y", (2, 4, 33, 24))], {})
    assert "MatmulRule" in set(_rules_used(model).values())
    _check(model, {"a": rng.standard_normal((2, 4, 33, 16)).astype("float32"),
                   "b": rng.standard_normal((2, 4, 16, 24)).astype("float32")})


def test_dense_gelu_epilogue_3d():
    rng = _rng(5)
    weights = {"W": (rng.standard_normal((32, 64)) * 0.2).astype("float32"),
               "B": rng.standard_normal(64).astype("float32"), "half": np.array(0.5, "float32"),
               "one": np.array(1.0, "float32"), "rs2": np.array(1 / np.sqrt(2), "float32")}
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h0"]), helper.make_node("Add", ["h0", "B"], ["h"]),
             helper.make_node("Mul", ["h", "rs2"], ["t0"]), helper.make_node("Erf", ["t0"], ["t1"]),
             helper.make_node("Add", ["t1", "one"], ["t2"]), helper.make_node("Mul", ["h", "t2"], ["t3"]),
             helper.make_node("Mul", ["t3", "half"], ["y"])]
    model = _model(nodes, [_f("x", (1, 16, 32))], [_f("y", (1, 16, 64))], weights)
    _check(model, {"x": rng.standard_normal((1, 16, 32)).astype("float32")}, rtol=1e-3, atol=1e-3)


def _mcpus():
    """AVX2's 8 lanes everywhere on x86, AVX-512's 16 where the host runs it."""
    if platform.machine() != "x86_64":
        return [None]
    return ["haswell", pytest.param("znver4", marks=pytest.mark.skipif(
        not ({"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= detect_host().features),
        reason="needs an AVX-512 host"))]


@pytest.mark.parametrize("mcpu", _mcpus())
@pytest.mark.parametrize("tokens,dim,scale", [(197, 64, True), (37, 16, False), (21, 8, True)])
def test_attention_odd_token_count(mcpu, tokens, dim, scale):
    """ViT's attention over 197 tokens (a prime: no register tile divides the rows, no vector the score
    columns): both batch matmuls stay on MatmulRule, with and without an epilogue, and match ONNX Runtime."""
    rng = _rng(12)
    heads = 2
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["q", "kt"], ["s0"])]
    weights = {}
    if scale:
        weights["c"] = np.array(0.125, "float32")
        nodes.append(helper.make_node("Mul", ["s0", "c"], ["s"]))
    else:
        nodes.append(helper.make_node("Identity", ["s0"], ["s"]))
    nodes += [helper.make_node("Softmax", ["s"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "v"], ["y"])]
    shape = (1, heads, tokens, dim)
    outputs = [_f("y", shape), _f("s", (1, heads, tokens, tokens))]
    model = _model(nodes, [_f("q", shape), _f("k", shape), _f("v", shape)], outputs, weights)
    used = _rules_used(model)
    matmuls = [rule for name, rule in used.items() if "matmul" in name]
    assert len(matmuls) == 2 and set(matmuls) == {"MatmulRule"}, used
    feeds = {n: rng.standard_normal(shape).astype("float32") for n in ("q", "k", "v")}
    _check(model, feeds, target=_target(mcpu), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("mcpu", _mcpus())
@pytest.mark.parametrize("m,k,n", [(197, 64, 96), (37, 48, 48), (13, 32, 128)])
def test_dense_odd_row_count(mcpu, m, k, n):
    """Dense layers over a prime number of tokens: whole register tiles and a partial one, the epilogue
    (bias, residual) in the write-back of both."""
    rng = _rng(13)
    weights = {"W": (rng.standard_normal((k, n)) / np.sqrt(k)).astype("float32"),
               "B": rng.standard_normal(n).astype("float32")}
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h0"]), helper.make_node("Add", ["h0", "B"], ["h"]),
             helper.make_node("Add", ["h", "r"], ["y"])]
    model = _model(nodes, [_f("x", (1, m, k)), _f("r", (1, m, n))], [_f("y", (1, m, n))], weights)
    assert "MatmulRule" in set(_rules_used(model).values())
    _check(model, {"x": rng.standard_normal((1, m, k)).astype("float32"),
                   "r": rng.standard_normal((1, m, n)).astype("float32")}, target=_target(mcpu))


# --------------------------------------------------------------------------------------------------
# everything else: softmax, layernorm, pooling, elementwise
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 4, 16, 128), (3, 10)])
def test_softmax(shape):
    rng = _rng(6)
    model = _model([helper.make_node("Softmax", ["x"], ["y"], axis=-1)], [_f("x", shape)], [_f("y", shape)], {})
    _check(model, {"x": (rng.standard_normal(shape) * 3).astype("float32")}, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 128, 128), (2, 7, 20)])
def test_layernorm(shape):
    rng = _rng(7)
    h = shape[-1]
    weights = {"g": rng.uniform(0.5, 1.5, h).astype("float32"), "b": rng.standard_normal(h).astype("float32")}
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1, epsilon=1e-5)]
    model = _model(nodes, [_f("x", shape)], [_f("y", shape)], weights)
    _check(model, {"x": rng.standard_normal(shape).astype("float32")})


def test_pooling():
    rng = _rng(8)
    nodes = [helper.make_node("MaxPool", ["x"], ["m"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("AveragePool", ["m"], ["a"], kernel_shape=[2, 2], strides=[1, 1]),
             helper.make_node("GlobalAveragePool", ["a"], ["y"])]
    model = _model(nodes, [_f("x", (1, 16, 33, 33))], [_f("y", (1, 16, 1, 1))], {})
    _check(model, {"x": rng.standard_normal((1, 16, 33, 33)).astype("float32")})


def test_maxpool_output():
    rng = _rng(9)
    nodes = [helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])]
    model = _model(nodes, [_f("x", (1, 24, 32, 32))], [_f("y", (1, 24, 16, 16))], {})
    _check(model, {"x": rng.standard_normal((1, 24, 32, 32)).astype("float32")})


def test_elementwise_and_transpose():
    rng = _rng(10)
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1, 3]),
             helper.make_node("Sigmoid", ["t"], ["s"]), helper.make_node("Mul", ["t", "s"], ["y"])]
    model = _model(nodes, [_f("x", (1, 4, 50, 12))], [_f("y", (1, 50, 4, 12))], {})
    _check(model, {"x": rng.standard_normal((1, 4, 50, 12)).astype("float32")})


def test_target_lanes():
    def facts(**t):
        return cpu_common.cpu_of(tvm.target.Target({"kind": "llvm", **t}))

    avx2 = facts(mcpu="haswell")
    assert (avx2.lanes, avx2.min_lanes, avx2.max_acc) == (8, 0, cpu_common.MAX_ACC)
    for mcpu in ("skylake-avx512", "znver4", "icelake-server", "sapphirerapids"):
        avx512 = facts(mtriple="x86_64-linux-gnu", mcpu=mcpu)
        assert (avx512.lanes, avx512.min_lanes, avx512.max_acc) == (16, 8, cpu_common.MAX_ACC_AVX512), mcpu
    assert facts(mcpu="x86-64", mattr=["+avx2", "+fma", "+avx512f"]).lanes == 16
    assert facts(mcpu="skylake-avx512", mattr=["-avx512f"]).lanes == 8
    assert facts(mcpu="znver3").lanes == 8 and facts(mcpu="alderlake").lanes == 8
    assert facts(mtriple="aarch64-linux-gnu", mcpu="cortex-a72").lanes == 4
    # 16 lanes where the extent allows, else 8 (never below min_lanes)
    avx512 = facts(mcpu="znver4")
    assert [avx512.fit(n) for n in (64, 24, 56, 7)] == [16, 8, 8, 16]
    assert [avx2.fit(n) for n in (64, 24, 12)] == [8, 8, 8]


_AVX512_HOST = {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= detect_host().features


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86 only")
@pytest.mark.parametrize("mcpu", ["haswell", pytest.param("znver4", marks=pytest.mark.skipif(
    not _AVX512_HOST, reason="needs an AVX-512 host"))])
@pytest.mark.parametrize("case", ["conv64", "conv24", "conv48_7x7", "dw32", "dw24", "dense48", "dense24",
                                  "pool58", "softmax40"])
def test_vector_widths(mcpu, case):
    """Each rule at AVX2's 8 lanes and at AVX-512's 16 (8 where 16 does not divide), both checked here."""
    rng = _rng(11)
    target = _target(mcpu)
    if case.startswith("conv"):
        oc, hw, k = {"conv64": (64, 14, 3), "conv24": (24, 12, 3), "conv48_7x7": (48, 7, 3)}[case]
        model, feeds = _conv_model(1, 16, hw, hw, oc, k, 1, 1, residual=True)
    elif case.startswith("dw"):
        c = int(case[2:])
        model, feeds = _conv_model(1, c, 15, 15, c, 3, 2, 1, groups=c)
    elif case.startswith("dense"):
        n = int(case[5:])
        w = (rng.standard_normal((40, n)) * 0.2).astype("float32")
        nodes = [helper.make_node("MatMul", ["x", "W"], ["y"])]
        model = _model(nodes, [_f("x", (6, 40))], [_f("y", (6, n))], {"W": w})
        feeds = {"x": rng.standard_normal((6, 40)).astype("float32")}
    elif case == "pool58":
        nodes = [helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1])]
        model = _model(nodes, [_f("x", (1, 16, 58, 58))], [_f("y", (1, 16, 58, 58))], {})
        feeds = {"x": rng.standard_normal((1, 16, 58, 58)).astype("float32")}
    else:
        nodes = [helper.make_node("Softmax", ["x"], ["y"], axis=-1)]
        model = _model(nodes, [_f("x", (3, 40))], [_f("y", (3, 40))], {})
        feeds = {"x": rng.standard_normal((3, 40)).astype("float32")}
    _check(model, feeds, target=target)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86 only: checks the generated vector code")
def test_every_function_scheduled_for_cnn():
    model, _ = _conv_model(1, 16, 8, 8, 16, 3, 1, 1)
    mod = pipeline.get_pipeline("O2")(_import(model), _target())
    names = [gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert names and all("tirx.is_scheduled" in mod[n].attrs for n in names)


@pytest.mark.parametrize("producer", ["matmul", "silu"])
def test_split_of_transposed_qkv(producer):
    """The timm ViT/DeiT attention input: qkv reshaped, permuted and split into q, k, v in one fused
    kernel. Reverse-inlining one split output into the shared transpose dropped the buffer the other two
    read (build failed: "T_transpose_intermediate is used before its definition"). "silu" puts a costly
    elementwise body in that kernel, so the transpose stays a stage of its own with three consumers."""
    rng = _rng(11)
    weights = {"shape": np.array([1, 17, 3, 4, 16], "int64"), "sizes": np.array([1, 1, 1], "int64")}
    if producer == "matmul":
        weights["w"] = rng.standard_normal((64, 192)).astype("float32") * 0.1
        nodes, x_shape = [helper.make_node("MatMul", ["x", "w"], ["a"])], (1, 17, 64)
    else:
        nodes = [helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Mul", ["x", "s"], ["a"])]
        x_shape = (1, 17, 192)
    nodes += [helper.make_node("Reshape", ["a", "shape"], ["r"]),
              helper.make_node("Transpose", ["r"], ["t"], perm=[2, 0, 3, 1, 4]),
              helper.make_node("Split", ["t", "sizes"], ["q", "k", "v"], axis=0)]
    model = _model(nodes, [_f("x", x_shape)], [_f(n, (1, 1, 4, 17, 16)) for n in "qkv"], weights)
    _check(model, {"x": rng.standard_normal(x_shape).astype("float32")})


# --------------------------------------------------------------------------------------------------
# convolution padding folded into the Conv (frontend/conv_padding.py), then compiled
# --------------------------------------------------------------------------------------------------


def _check_normalized(model, feeds, target=None):
    """`model` normalized as compile_model does (padding folded into Convs), compiled, vs ORT on the original."""
    from forgeml.compiler.frontend.normalize import normalize

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = sess.run(None, feeds)
    folded, record = normalize(model)
    got = _run(folded, feeds, target)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL)
    return folded, record


def _padded_conv_model(c, h, oc, k, stride, pads, groups=1, auto_pad=None, pad_value=0.0, seed=0):
    """Pad(pads on H, W as top, left, bottom, right) -> Conv -> Clip(0, 6), or a Conv with `auto_pad`
    when pads is None."""
    rng = _rng(seed)
    weights = {"W": (rng.standard_normal((oc, c // groups, k, k)) * 0.3).astype("float32"),
               "B": rng.standard_normal(oc).astype("float32"), "lo": np.array(0.0, "float32"),
               "hi": np.array(6.0, "float32")}
    nodes = []
    x, hp, wp = "x", h, h
    if pads is not None:
        top, left, bottom, right = pads
        weights["P"] = np.array([0, 0, top, left, 0, 0, bottom, right], "int64")
        weights["V"] = np.array(pad_value, "float32")
        nodes.append(helper.make_node("Pad", ["x", "P", "V"], ["xp"]))
        x, hp, wp = "xp", h + top + bottom, h + left + right
    conv_attrs = {"kernel_shape": [k, k], "strides": [stride, stride], "group": groups}
    if auto_pad:
        conv_attrs["auto_pad"] = auto_pad
        oh = ow = -(-h // stride)
    else:
        oh, ow = (hp - k) // stride + 1, (wp - k) // stride + 1
    nodes += [helper.make_node("Conv", [x, "W", "B"], ["c"], **conv_attrs),
              helper.make_node("Clip", ["c", "lo", "hi"], ["y"])]
    model = _model(nodes, [_f("x", (1, c, h, h))], [_f("y", (1, oc, oh, ow))], weights)
    return model, {"x": rng.standard_normal((1, c, h, h)).astype("float32")}


@pytest.mark.parametrize("c,h,oc,k,stride,pads,groups", [
    (32, 14, 32, 3, 2, (0, 0, 1, 1), 32),  # MobileNetV2's TF-"same" stride-2 depthwise: pad bottom/right
    (24, 11, 24, 5, 2, (1, 1, 2, 2), 24),  # EfficientNet's ZeroPad2d before a 5x5/2 depthwise
    (16, 9, 32, 1, 1, (0, 0, 0, 0), 1),  # zero-width Pad before a 1x1 conv
    (8, 10, 16, 3, 1, (1, 1, 1, 1), 1),  # a dense 3x3 conv
])
def test_zero_pad_folds_into_conv(c, h, oc, k, stride, pads, groups):
    model, feeds = _padded_conv_model(c, h, oc, k, stride, pads, groups)
    folded, record = _check_normalized(model, feeds)
    assert record.conv_pads_folded == 1
    assert [n.op_type for n in folded.graph.node if n.op_type != "Constant"] == ["Conv", "Clip"]


@pytest.mark.parametrize("c,h,oc,k,stride,groups,auto_pad", [
    (16, 14, 16, 3, 2, 16, "SAME_UPPER"),  # EfficientNet's depthwise convs (torch padding="same")
    (16, 15, 16, 5, 2, 16, "SAME_LOWER"),
    (8, 7, 24, 1, 1, 1, "SAME_UPPER"),  # a 1x1: no padding at all
])
def test_same_auto_pad_made_explicit(c, h, oc, k, stride, groups, auto_pad):
    model, feeds = _padded_conv_model(c, h, oc, k, stride, None, groups, auto_pad=auto_pad)
    folded, record = _check_normalized(model, feeds)
    assert record.conv_pads_folded == 1
    conv = next(n for n in folded.graph.node if n.op_type == "Conv")
    assert "auto_pad" not in {a.name for a in conv.attribute}


def test_pad_kept_where_folding_would_change_results():
    """A Pad of ones is not a Conv's zero padding: it stays, and the result is still right."""
    model, feeds = _padded_conv_model(8, 9, 8, 3, 2, (0, 0, 1, 1), 8, pad_value=1.0)
    folded, record = _check_normalized(model, feeds)
    assert record.conv_pads_folded == 0
    assert "Pad" in [n.op_type for n in folded.graph.node]


# --------------------------------------------------------------------------------------------------
# squeeze-excitation: a long global average pool, a sigmoid gate per channel broadcast over the pixels
# --------------------------------------------------------------------------------------------------


def _squeeze_excitation_model(c: int, hw: int, squeezed: int, seed: int = 12):
    """EfficientNet's block: x * sigmoid(conv1x1(silu(conv1x1(GlobalAveragePool(x)))))."""
    rng = _rng(seed)
    weights = {"W1": (rng.standard_normal((squeezed, c, 1, 1)) * 0.3).astype("float32"),
               "B1": rng.standard_normal(squeezed).astype("float32"),
               "W2": (rng.standard_normal((c, squeezed, 1, 1)) * 0.3).astype("float32"),
               "B2": rng.standard_normal(c).astype("float32")}
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["p"]),
             helper.make_node("Conv", ["p", "W1", "B1"], ["s1"], kernel_shape=[1, 1]),
             helper.make_node("Sigmoid", ["s1"], ["g1"]), helper.make_node("Mul", ["s1", "g1"], ["a1"]),
             helper.make_node("Conv", ["a1", "W2", "B2"], ["s2"], kernel_shape=[1, 1]),
             helper.make_node("Sigmoid", ["s2"], ["g2"]), helper.make_node("Mul", ["x", "g2"], ["y"])]
    model = _model(nodes, [_f("x", (1, c, hw, hw))], [_f("y", (1, c, hw, hw))], weights)
    return model, {"x": rng.standard_normal((1, c, hw, hw)).astype("float32")}


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86 only")
@pytest.mark.parametrize("mcpu", ["haswell", pytest.param("znver4", marks=pytest.mark.skipif(
    not _AVX512_HOST, reason="needs an AVX-512 host"))])
@pytest.mark.parametrize("c,hw,squeezed", [(32, 32, 8), (48, 14, 4), (24, 7, 6), (16, 17, 4)])
def test_squeeze_excitation(mcpu, c, hw, squeezed):
    """Pools of 1024, 196, 49 and 289 pixels: vector partial sums of 16, 4, none (too short) and none (no
    width divides 289); the gate once per channel."""
    model, feeds = _squeeze_excitation_model(c, hw, squeezed)
    _check(model, feeds, target=_target(mcpu))


@pytest.mark.parametrize("shape", [(1, 8, 64, 64), (2, 3, 40, 40)])
def test_long_reduce_mean(shape):
    """ReduceMean over the last two axes (rfactor'ed into vector partial sums) and ReduceMax (the same)."""
    rng = _rng(13)
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[2, 3], keepdims=0),
             helper.make_node("ReduceMax", ["x"], ["n"], axes=[2, 3], keepdims=0)]
    model = _model(nodes, [_f("x", shape)], [_f("m", shape[:2]), _f("n", shape[:2])], {}, opset=17)
    _check(model, {"x": rng.standard_normal(shape).astype("float32")})


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86 only")
@pytest.mark.parametrize("mcpu", ["haswell", pytest.param("znver4", marks=pytest.mark.skipif(
    not _AVX512_HOST, reason="needs an AVX-512 host"))])
@pytest.mark.parametrize("c,hw,oc,residual", [(16, 28, 24, True), (8, 32, 12, False), (24, 30, 144, False)])
def test_conv1x1_pixel_tile(mcpu, c, hw, oc, residual):
    """1x1 convs on planes of >= 784 pixels vectorize along the pixels (rows of output channels in the
    tile; 12 channels fit no channel vector at all); 900 pixels, which no vector width divides, keep the
    channel-vectorized tile."""
    model, feeds = _conv_model(1, c, hw, hw, oc, 1, residual=residual)
    assert "Conv2DRule" in set(_rules_used(model).values())
    _check(model, feeds, target=_target(mcpu))


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86 only")
@pytest.mark.parametrize("mcpu", ["haswell", pytest.param("znver4", marks=pytest.mark.skipif(
    not _AVX512_HOST, reason="needs an AVX-512 host"))])
@pytest.mark.parametrize("c,hw,oc,k,stride,groups", [(24, 7, 48, 1, 1, 1), (32, 14, 32, 5, 1, 32),
                                                      (48, 9, 48, 3, 2, 48)])
def test_conv_silu_epilogue(mcpu, c, hw, oc, k, stride, groups):
    """Conv -> x * sigmoid(x) (EfficientNet's SiLU): the fast sigmoid in the tile's write-back, the
    channels vectorized and the stores scattered into NCHW."""
    rng = _rng(14)
    weights = {"W": (rng.standard_normal((oc, c // groups, k, k)) * 0.3).astype("float32"),
               "B": rng.standard_normal(oc).astype("float32")}
    pad = k // 2
    out = (hw + 2 * pad - k) // stride + 1
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], kernel_shape=[k, k], pads=[pad] * 4,
                              strides=[stride, stride], group=groups),
             helper.make_node("Sigmoid", ["c"], ["s"]), helper.make_node("Mul", ["c", "s"], ["y"])]
    model = _model(nodes, [_f("x", (1, c, hw, hw))], [_f("y", (1, oc, out, out))], weights)
    rule = "DepthwiseConvRule" if groups > 1 else "Conv2DRule"
    assert rule in set(_rules_used(model).values())
    _check(model, {"x": rng.standard_normal((1, c, hw, hw)).astype("float32")}, target=_target(mcpu))


# --------------------------------------------------------------------------------------------------
# real architectures: HF MobileNetV2 (TF-"same" Pads, ReLU6) and EfficientNet (SAME auto_pad, SiLU,
# squeeze-excitation), tiny configs, through compile_model with its verification against ONNX Runtime
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet"])
def test_hf_mobile_convnets_compile_and_verify(name, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from forgeml import compile_model
    from forgeml.compiler.frontend.torch_export import export_module

    torch.manual_seed(0)
    if name == "mobilenet_v2":
        model = transformers.MobileNetV2Model(transformers.MobileNetV2Config(depth_multiplier=0.35, image_size=64))
    else:
        model = transformers.EfficientNetModel(transformers.EfficientNetConfig(
            width_coefficient=0.25, depth_coefficient=0.25, image_size=64, hidden_dim=320))
    for layer in model.modules():  # weights that keep the activations away from denormals (real_models.py)
        if isinstance(layer, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")

    class Last(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x).last_hidden_state

    onnx_path = export_module(Last(model.eval()), {"pixel_values": (1, 3, 64, 64)}, tmp_path / "m.onnx")
    manifest = compile_model(onnx_path, tmp_path / "m.fml", target="x86-64", opt_level="O2", verify=True,
                             use_tuning_db=False)
    assert manifest.verification["passed"], manifest.verification
    assert manifest.compile_options["normalize"]["conv_pads_folded"] > 0


@pytest.mark.parametrize("exponent", [2.0, 3.0, 4.0, 2.5])
def test_power_of_small_integer_becomes_products(exponent):
    """GPT-2's GELU: x + 0.044715 * x ** 3 under tanh. TVM called powf per element (no vector code); a
    constant exponent of 2 to 4 is computed as products, as ONNX Runtime's Pow does; others stay pow."""
    rng = _rng(4)
    nodes = [helper.make_node("Pow", ["x", "e"], ["p"]), helper.make_node("Mul", ["p", "c"], ["m"]),
             helper.make_node("Add", ["x", "m"], ["a"]), helper.make_node("Tanh", ["a"], ["y"])]
    weights = {"e": np.array(exponent, "float32"), "c": np.array(0.044715, "float32")}
    model = _model(nodes, [_f("x", (2, 8, 96))], [_f("y", (2, 8, 96))], weights)
    x = (rng.standard_normal((2, 8, 96)) * 2).astype("float32")
    if exponent == 2.5:
        x = np.abs(x)
    mod = pipeline.get_pipeline("O2")(_import(model), _target())
    text = "".join(f.script() for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc))
    assert ("T.pow" in text) == (exponent == 2.5)
    _check(model, {"x": x})
