"""GPU graph rewrites and rule choices that need neither nvcc nor a GPU: split-K convolutions
(checked numerically on the CPU) and which dlight rule takes which GEMM."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from forgeml.compiler.cuda import mma, tensor_cores
from forgeml.compiler.cuda import options as cuda_options
from forgeml.compiler.cuda import pipeline as cuda_pipeline
from forgeml.compiler.cuda.splitk import sm_count, split_factor, split_k_convolutions, tensor_core_splits
from forgeml.compiler.cuda.stem import schedule_stem_cols, stem_convolutions

CUDA = {"kind": "cuda", "arch": "sm_90", "host": {"kind": "llvm"}}


def _conv_module(batch: int, cin: int, cout: int, hw: int, stride: int, kernel: int = 3, pad: int = 1,
                 dtype: str = "float32", out_dtype: str = "") -> tvm.IRModule:
    rng = np.random.default_rng(0)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((batch, cin, hw, hw), dtype))
    w = relax.const((rng.standard_normal((cout, cin, kernel, kernel)) * 0.05).astype(dtype))
    b = relax.const(rng.standard_normal((1, cout, 1, 1)).astype(out_dtype or dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, w, strides=stride, padding=pad, out_dtype=out_dtype or None))
            out = bb.emit_output(relax.op.nn.relu(relax.op.add(y, b)))
        bb.emit_func_output(out)
    return bb.get()


def _nhwc(mod: tvm.IRModule) -> tvm.IRModule:
    """`mod` with its convolutions in NHWC/OHWI, as `forgeml compile --conv-layout NHWC` converts them."""
    convert = relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "OHWI"]})
    return relax.transform.FoldConstant()(convert(mod))


def _run_cpu(mod: tvm.IRModule, x: np.ndarray) -> np.ndarray:
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def test_split_factor_fills_the_gpu_only_where_needed():
    assert split_factor(49, 512, 4608) == 16  # ResNet-18 layer4 at batch 1: 16 tiles -> 256 blocks
    assert split_factor(3136, 64, 576) == 4
    assert split_factor(100352, 64, 576) == 1  # batch 32: thousands of tiles already
    assert split_factor(49, 512, 256) == 1  # short K: nothing to split
    assert split_factor(12544, 64, 147) == 1
    assert split_factor(1568, 512, 4608) == 1  # layer4 at batch 32


@pytest.mark.parametrize("shape", [(1, 128, 128, 7, 1), (1, 64, 128, 14, 2), (2, 64, 64, 8, 1)])
def test_split_k_convolution_matches_the_convolution(shape):
    batch, cin, cout, hw, stride = shape
    mod = _conv_module(batch, cin, cout, hw, stride)
    rewritten = split_k_convolutions()(mod)
    assert "R.matmul" in rewritten.script() and "R.nn.conv2d" not in rewritten.script()
    x = np.random.default_rng(1).standard_normal((batch, cin, hw, hw)).astype("float32")
    expected, got = _run_cpu(mod, x), _run_cpu(rewritten, x)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_split_k_fp16_convolution_accumulates_in_fp32():
    """After ToMixedPrecision a convolution reads fp16 and writes fp32: the slices' matmul does too."""
    mod = _conv_module(1, 128, 128, 7, 1, dtype="float16", out_dtype="float32")
    rewritten = split_k_convolutions()(mod)
    assert 'out_dtype="float32"' in rewritten.script() and "R.nn.conv2d" not in rewritten.script()
    x = np.random.default_rng(1).standard_normal((1, 128, 7, 7)).astype("float16")
    expected, got = _run_cpu(mod, x), _run_cpu(rewritten, x)
    assert got.dtype == expected.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())


def _dense_module(m: int, k: int, n: int) -> tvm.IRModule:
    rng = np.random.default_rng(0)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((m, k), "float32"))
    w = relax.const((rng.standard_normal((n, k)) * 0.05).astype("float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, relax.op.permute_dims(w)))
            out = bb.emit_output(relax.op.add(y, relax.const(rng.standard_normal(n).astype("float32"))))
        bb.emit_func_output(out)
    return relax.transform.FoldConstant()(bb.get())  # the transposed weights become one constant


def test_split_k_dense_layer_with_few_tiles():
    """ResNet's classifier at batch 32 ([32, 512] x [512, 1000]: 16 tiles) splits K in 4; at batch 1
    it stays a GEMV (dlight's Reduction rule splits K itself)."""
    mod = _dense_module(32, 512, 1000)
    rewritten = split_k_convolutions()(mod)
    assert "R.Tensor((4, 32, 1000)" in rewritten.script() and "split_sum" in rewritten.script()
    x = np.random.default_rng(1).standard_normal((32, 512)).astype("float32")
    expected, got = _run_cpu(mod, x), _run_cpu(rewritten, x)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    assert "split_sum" not in split_k_convolutions()(_dense_module(1, 512, 1000)).script()
    assert "split_sum" not in split_k_convolutions()(_dense_module(256, 512, 1000)).script()  # 128 tiles


def test_split_k_leaves_busy_convolutions_alone():
    mod = _conv_module(8, 64, 64, 56, 1)  # 8 x 56 x 56 outputs per channel: plenty of tiles
    assert "R.nn.conv2d" in split_k_convolutions()(mod).script()


def test_tensor_core_splits_only_where_waves_run_mostly_empty():
    # ResNet-18 at batch 32 on 132 SMs: layer4 (52 tiles of 128 x 128) splits in two, the rest fill the GPU
    assert tensor_core_splits(1568, 512, 4608, 512, sms=132) == 2
    assert tensor_core_splits(1568, 512, 2304, 256, sms=132) == 2
    assert tensor_core_splits(6272, 256, 2304, 256, sms=132) == 1  # 98 tiles: halving K buys no wave
    assert tensor_core_splits(100352, 64, 576, 64, sms=132) == 1
    assert tensor_core_splits(1568, 512, 4608, 512, sms=16) == 4  # a Jetson Orin's 16 SMs
    assert tensor_core_splits(1568, 512, 4608, 3, sms=132) == 1  # channels that do not divide
    assert tensor_core_splits(1568, 512, 384, 512, sms=132) == 1  # K slices would be under 256
    assert sm_count(tvm.target.Target(CUDA)) == 132
    assert sm_count(tvm.target.Target({"kind": "cuda", "arch": "sm_87"})) == 16


@pytest.mark.parametrize("hw,stride,layout", [(16, 1, "NCHW"), (32, 2, "NCHW"), (32, 2, "NHWC")])
def test_split_k_tensor_core_convolution_matches_the_convolution(hw, stride, layout):
    """fp16 convolutions with few tensor-core tiles split along channels, without im2col."""
    mod = _conv_module(4, 64, 256, hw, stride, dtype="float16", out_dtype="float32")
    if layout == "NHWC":
        mod = _nhwc(mod)
        assert 'data_layout="NHWC"' in mod.script()
    rewritten = split_k_convolutions(sms=132)(mod)
    script = rewritten.script()
    assert "conv2d_split" in script and "R.nn.conv2d" not in script and "R.matmul" not in script
    x = np.random.default_rng(1).standard_normal((4, 64, hw, hw)).astype("float16")
    expected, got = _run_cpu(mod, x), _run_cpu(rewritten, x)
    assert got.dtype == expected.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_split_tensor_core_convolution_keeps_tensor_cores_and_fuses_the_sum(layout):
    """ResNet-18's layer4 at batch 32 in fp16: the split convolution is still a tensor-core GEMM (its
    slices are the GEMM's batch), and the partial sum shares a kernel with the bias and ReLU."""
    mod = cuda_options.with_precision(_conv_module(32, 512, 512, 7, 1), "fp16")
    target = tvm.target.Target(CUDA)
    with target:
        mod = tvm.transform.Sequential(cuda_pipeline.graph_passes("fp16", layout) + cuda_pipeline.lower_passes())(mod)
    summary = cuda_pipeline.schedule_summary(mod, target)
    assert summary.get("conv2d_split") == "TensorCoreMatmul", summary
    assert any(name.startswith("fused_split_sum") and "relu" in name for name in summary), summary
    assert not any("conv2d" in name and name != "conv2d_split" for name in summary), summary
    # NHWC slices reduce over (ky, kx, channel): K runs along the channels, so the operands copy in
    # 16-byte vectors (with channels outermost they were gathers: 139 vs 49 us per layer4 call, H200)
    split = next(f for gv, f in mod.functions_items() if gv.name_hint == "conv2d_split")
    assert mma.copy_vector(split, target) == (8 if layout == "NHWC" else 4)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_stem_convolution_becomes_im2col_and_a_gemm(layout):
    """An fp16 7x7 stride-2 RGB stem: a gather with K padded to 160 (last) and a GEMM, same outputs."""
    mod = _conv_module(2, 3, 64, 32, 2, kernel=7, pad=3, dtype="float16", out_dtype="float32")
    mod = _nhwc(mod) if layout == "NHWC" else mod
    rewritten = stem_convolutions()(mod)
    script = rewritten.script()
    assert "stem_cols" in script and "R.Tensor((2, 16, 16, 160)" in script and "R.nn.conv2d" not in script
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype("float16")
    expected, got = _run_cpu(mod, x), _run_cpu(rewritten, x)
    assert got.dtype == expected.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    # fp32 builds, and convolutions over more channels, keep their implicit GEMM
    assert "stem_cols" not in stem_convolutions()(_conv_module(2, 3, 64, 32, 2, kernel=7, pad=3)).script()
    assert "stem_cols" not in stem_convolutions()(_conv_module(2, 16, 64, 32, 1, dtype="float16")).script()


def test_stem_convolution_goes_on_tensor_cores():
    mod = cuda_options.with_precision(_conv_module(8, 3, 64, 224, 2, kernel=7, pad=3), "fp16")
    target = tvm.target.Target(CUDA)
    with target:
        mod = tvm.transform.Sequential(cuda_pipeline.graph_passes("fp16") + cuda_pipeline.lower_passes())(mod)
    summary = cuda_pipeline.schedule_summary(mod, target)
    gemms = {name: rule for name, rule in summary.items() if "stem_gemm" in name}
    assert list(gemms.values()) == ["TensorCoreMatmul"] and summary.get("fused_cast_stem_cols") == "StemCols", summary
    assert not any("conv2d" in name for name in summary), summary
    conv = next(f for gv, f in mod.functions_items() if gv.name_hint in gemms)
    assert tensor_cores.tensor_core_gemm(conv, target) == (8 * 112 * 112, 64, 160)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_stem_cols_schedule_keeps_the_values(layout):
    """StemCols' loop order (pixels split across warps and unrolled, K in 32-wide lanes, the input's cast
    and transpose inlined) gathers the same columns as the plain kernel, on the CPU without the thread
    bindings; with them, each warp writes 32 consecutive columns."""
    mod = cuda_options.with_precision(_conv_module(2, 3, 64, 30, 2, kernel=7, pad=3), "fp16")
    mod = _nhwc(mod) if layout == "NHWC" else mod
    target = tvm.target.Target(CUDA)
    with target:
        mod = tvm.transform.Sequential(cuda_pipeline.graph_passes("fp16", layout) + cuda_pipeline.lower_passes())(mod)
    name, func = next((gv.name_hint, f) for gv, f in mod.functions_items() if "stem_cols" in gv.name_hint)
    plain = tvm.compile(func.with_attr("global_symbol", name), target="llvm")
    unbound = tvm.compile(schedule_stem_cols(func, bind_threads=False).mod["main"].with_attr("global_symbol", name),
                          target="llvm")
    x = np.random.default_rng(0).standard_normal((2, 3, 30, 30)).astype("float32")
    out_shape = [int(d) for d in func.params[-1].shape]
    expected, got = (tvm.runtime.tensor(np.zeros(out_shape, "float16")) for _ in range(2))
    plain[name](tvm.runtime.tensor(x), expected)
    unbound[name](tvm.runtime.tensor(x), got)
    assert np.abs(expected.numpy()).max() > 0 and out_shape[-1] == 160
    np.testing.assert_array_equal(got.numpy(), expected.numpy())
    bound = schedule_stem_cols(func).mod["main"].script()
    assert 'T.thread_binding(T.int64(32), thread="threadIdx.x")' in bound, bound


def test_fp16_64_channel_convolution_uses_tensor_cores():
    """dlight's Matmul rule wants every GEMM extent above 64; forgeml's takes N = 64 too."""
    mod = cuda_options.with_precision(_conv_module(32, 64, 64, 56, 1), "fp16")
    target = tvm.target.Target(CUDA)
    with target:
        mod = tvm.transform.Sequential(cuda_pipeline.graph_passes("fp16") + cuda_pipeline.lower_passes())(mod)
    summary = cuda_pipeline.schedule_summary(mod, target)
    convs = {name: rule for name, rule in summary.items() if "conv2d" in name}
    assert convs and set(convs.values()) == {"TensorCoreMatmul"}, summary


def _rows_module(rows: int, n: int) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((rows, n), "float32"))
    gamma, beta = relax.const(np.ones(n, "float32")), relax.const(np.zeros(n, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            s = bb.emit(relax.op.nn.softmax(x, axis=-1))
            out = bb.emit_output(relax.op.nn.layer_norm(s, gamma, beta, axes=[-1]))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("n,threads", [(128, 32), (1024, 256)])
def test_short_rows_reduce_in_one_warp(n, threads):
    """Softmax and layer norm over BERT's 128-long rows: one warp per row (shuffles), where dlight's
    GeneralReduction used 256 threads; long rows keep dlight's 256."""
    import re

    target = tvm.target.Target(CUDA)
    mod = _rows_module(256, n)
    with target:
        mod = tvm.transform.Sequential(cuda_pipeline.graph_passes("fp32") + cuda_pipeline.lower_passes())(mod)
    assert set(cuda_pipeline.schedule_summary(mod, target).values()) == {"WarpRowReduction"}
    lib = tvm.compile(cuda_pipeline.schedule_rest(mod, target), target=target)
    source = next(m.inspect_source() for host in lib.mod.imports for m in host.imports if m.kind == "cuda")
    bounds = dict((name, int(t)) for t, name in re.findall(r"__launch_bounds__\((\d+)\) (\w+)\(", source))
    assert bounds == {"softmax_kernel": threads, "layer_norm_kernel": threads}, bounds
    assert "__shfl_down_sync" in source
