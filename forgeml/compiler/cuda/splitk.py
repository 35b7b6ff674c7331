"""Split-K convolutions for GPUs: a convolution with few output tiles and a long reduction is split
along K (its input channels) into S partial convolutions and a sum, so that it fills the GPU.

dlight's Matmul rule gives each 32 x 64 output tile one thread block that walks all of K alone. At
batch 1, ResNet-18's layer4 3x3 convolutions (M = 7*7 = 49 outputs per channel, N = 512 channels,
K = 512*9 = 4608) are 16 blocks on an H200's 132 SMs: 479 us each, where cuDNN takes about 10.
Splitting K into S slices gives S times the blocks; the partial sums add up in the next kernel,
which FuseOps merges with the convolution's epilogue (bias, residual add, ReLU).

    conv2d(x, w)  ->  im2col(x): [S, M, K/S]  @  w: [S, K/S, N]  ->  sum over S  ->  NCHW

fp16 convolutions that go on tensor cores (`tensor_core_splits`) are split without im2col: one
convolution over S channel slices writes S fp32 partial outputs, read back by an elementwise sum that
FuseOps merges with the epilogue. Their 128 x 128 tiles are fewer still (ResNet-18's layer4 at batch
32: 52 tiles for 132 SMs), and an im2col copy of their large inputs costs more than it saves.

Only convolutions with groups = 1, dilation 1 and constant weights are rewritten: NCHW/OIHW ones by
the im2col path (which re-lays the weights out in numpy, once, at compile time), NCHW/OIHW and
NHWC/OHWI ones by the tensor-core path (`forgeml compile --conv-layout NHWC` runs it after the
layout conversion).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import tvm
from tvm import relax

from forgeml.compiler.graph import constant_array

TILE_M, TILE_N = 32, 64  # dlight Matmul's CUDA output tile (block 8x16 threads, 4x4 each)
TARGET_BLOCKS = 256  # about two blocks per SM on an H100/H200 (132 SMs)
MIN_K_SLICE = 128  # shorter slices spend more on the partial sums than they save
MIN_K = 512
TENSOR_CORE_MIN_EXTENT = 64  # tensor_cores.tensor_core_gemm: the smallest M, N and K that go on tensor cores

# Tensor-core (wmma) convolutions, `tensor_core_splits`: dlight's 128 x 128 tile runs 512 threads of
# 120 registers, so one block per SM (128 x 64 tiles for N = 64: 256 threads, two).
WMMA_TILE_M = 128
MIN_TC_K_SLICE = 256
MAX_TC_SPLITS = 8
# Measured on an H200 at batch 32 in fp16 (ResNet-18's convolutions on dlight's wmma schedule): a wave
# of blocks takes about 0.048 us per unit of K, and fp32 partial sums move at about 3 MB/us.
WAVE_US_PER_K = 0.048
PARTIAL_BYTES_PER_US = 3.0e6
MIN_TC_GAIN = 0.10  # split only for a modelled gain above this share of the convolution's time
SM_COUNTS = {"sm_90": 132, "sm_80": 108, "sm_87": 16, "sm_89": 128, "sm_86": 82, "sm_75": 40, "sm_72": 8}
DEFAULT_SMS = 132


def split_factor(m: int, n: int, k: int) -> int:
    """How many K slices for an M x N x K GEMM: a power of two, 1 when it already fills the GPU.

    Counted in FMA tiles for fp16 builds too. Splitting by tensor-core tiles (128 x 128) was measured
    at batch 32 in fp16 on an H200: ResNet-18's layer4 GEMMs went 235 -> 132 us, but the im2col
    copies (29-58 MB each) cost more than that saved (kernels 2.86 -> 2.96 ms in all)."""
    tiles = math.ceil(m / TILE_M) * math.ceil(n / TILE_N)
    if k < MIN_K or tiles >= TARGET_BLOCKS // 2:
        return 1
    splits = 1
    while tiles * splits < TARGET_BLOCKS and k % (splits * 2) == 0 and k // (splits * 2) >= MIN_K_SLICE:
        splits *= 2
    return splits


def tensor_core_splits(m: int, n: int, k: int, channels: int, sms: int = DEFAULT_SMS) -> int:
    """How many channel slices for a tensor-core convolution (an M x N x K implicit GEMM over `channels`
    input channels) on a GPU with `sms` SMs: 1, or the power of two that minimizes the modelled time.

    Time of S slices = waves of S x tiles blocks, each walking K / S, plus writing and reading the S fp32
    partials (`WAVE_US_PER_K`, `PARTIAL_BYTES_PER_US`). At batch 32 on an H200, ResNet-18's layer4
    convolutions (52 tiles, K = 4608) take 234 us each unsplit; split in 2 the model gives ~115 us."""
    tile_n, per_sm = (64, 2) if n <= 64 else (128, 1)
    tiles = math.ceil(m / WMMA_TILE_M) * math.ceil(n / tile_n)
    slots = sms * per_sm

    def cost(splits: int) -> float:
        conv = math.ceil(tiles * splits / slots) * (k / splits) * WAVE_US_PER_K
        return conv + (2 * 4 * splits * m * n / PARTIAL_BYTES_PER_US if splits > 1 else 0.0)

    best = 1
    splits = 2
    while splits <= MAX_TC_SPLITS and channels % splits == 0 and k // splits >= MIN_TC_K_SLICE:
        if cost(splits) < cost(best):
            best = splits
        splits *= 2
    return best if cost(best) < (1 - MIN_TC_GAIN) * cost(1) else 1


def _split_conv(data, weight, splits: int, conv: PlainConv):
    """partial[s, b, o, y, x] (NHWC: partial[s, b, y, x, o]) = the convolution over input channels
    s*C/S .. (s+1)*C/S - 1 (an implicit GEMM per slice, S as its batch axis: dlight's tensor-core rule
    schedules it as one)."""
    from tvm import te, topi

    (kh, kw), (oh, ow), (sh, sw) = conv.kernel, conv.out_hw, conv.strides
    top, left, bottom, right = conv.padding
    part = conv.channels // splits
    rc, ry, rx = te.reduce_axis((0, part), "rc"), te.reduce_axis((0, kh), "ry"), te.reduce_axis((0, kw), "rx")

    def product(b, o, y, x, s):
        c, iy, ix = s * part + rc, y * sh + ry, x * sw + rx
        if conv.layout == "NHWC":
            a, w = padded[b, iy, ix, c], weight[o, ry, rx, c]
        else:
            a, w = padded[b, c, iy, ix], weight[o, c, ry, rx]
        return a.astype(conv.out_dtype) * w.astype(conv.out_dtype)

    if conv.layout == "NHWC":  # K ordered (ry, rx, rc): contiguous along the channels, as topi's NHWC conv2d
        padded = topi.nn.pad(data, [0, top, left, 0], [0, bottom, right, 0], name="pad_temp")
        return te.compute((splits, conv.batch, oh, ow, conv.cout),
                          lambda s, b, y, x, o: te.sum(product(b, o, y, x, s), axis=[ry, rx, rc]), name="conv2d_split")
    padded = topi.nn.pad(data, [0, 0, top, left], [0, 0, bottom, right], name="pad_temp")
    return te.compute((splits, conv.batch, conv.cout, oh, ow),
                      lambda s, b, o, y, x: te.sum(product(b, o, y, x, s), axis=[rc, ry, rx]), name="conv2d_split")


def _sum_slices(partial):
    """partial[0] + ... + partial[S-1] as one elementwise expression: FuseOps merges an elementwise op
    with the epilogue that follows (bias, residual, ReLU, cast), where it leaves a reduction apart."""
    from tvm import te

    splits = int(partial.shape[0])

    def add(*index):
        total = partial[(0, *index)]
        for s in range(1, splits):
            total = total + partial[(s, *index)]
        return total

    return te.compute(tuple(partial.shape[1:]), add, name="split_sum")


def _im2col(data, splits: int, kernel: tuple[int, int], strides: tuple[int, int],
            padding: tuple[int, int, int, int], out_hw: tuple[int, int]):
    """cols[s, b*OH*OW + y*OW + x, j] = data[b, c, y*sh + ky - top, x*sw + kx - left] (0 in the padding),
    where c*kh*kw + ky*kw + kx = s*K/S + j: the K order of an OIHW weight reshaped to [O, K].
    One gather with int32 index arithmetic (the pad/slice/stack ops it replaces compiled to int64
    divisions: ~225 GB/s on an H200, 32-37 us per layer1 call where this takes 8-9)."""
    from tvm import te, tirx

    batch, channels, height, width = (int(d) for d in data.shape)
    (kh, kw), (sh, sw), (top, left, _, _), (oh, ow) = kernel, strides, padding, out_hw
    k_slice = channels * kh * kw // splits

    def col(s, i, j):
        kk = s * k_slice + j
        c, r = kk // (kh * kw), kk % (kh * kw)
        b, p = i // (oh * ow), i % (oh * ow)
        y = (p // ow) * sh + r // kw - top
        x = (p % ow) * sw + r % kw - left
        inside = tirx.all(y >= 0, y < height, x >= 0, x < width)
        return tirx.if_then_else(inside, data[b, c, tirx.max(y, 0), tirx.max(x, 0)], tirx.const(0, data.dtype))

    return te.compute((splits, batch * oh * ow, k_slice), col, name="im2col")


def _static_shape(expr) -> tuple[int, ...] | None:
    """The static shape of a Relax expression's tensor type, else None."""
    shape = getattr(expr.ty, "shape", None)
    try:
        return tuple(int(d) for d in shape) if shape is not None else None
    except TypeError:
        return None


KERNEL_LAYOUTS = {"NCHW": "OIHW", "NHWC": "OHWI"}


class PlainConv(NamedTuple):
    """A conv2d that the GPU rewrites take: NCHW/OIHW or NHWC/OHWI, groups 1, dilation 1, constant
    weights, static shapes."""

    x: relax.Expr
    weight: np.ndarray  # OIHW or OHWI, as `layout` says
    x_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    strides: tuple[int, int]
    padding: tuple[int, int, int, int]
    out_dtype: str  # the convolution's accumulation dtype (fp16 builds: float32)
    layout: str = "NCHW"

    @property
    def batch(self) -> int:
        return self.x_shape[0]

    @property
    def channels(self) -> int:
        return self.x_shape[3] if self.layout == "NHWC" else self.x_shape[1]

    @property
    def cout(self) -> int:
        return int(self.weight.shape[0])

    @property
    def kernel(self) -> tuple[int, int]:
        kh, kw = self.weight.shape[1:3] if self.layout == "NHWC" else self.weight.shape[2:4]
        return int(kh), int(kw)

    @property
    def out_hw(self) -> tuple[int, int]:
        return tuple(self.out_shape[1:3] if self.layout == "NHWC" else self.out_shape[2:4])

    @property
    def gemm(self) -> tuple[int, int, int]:
        """(M, N, K) of the convolution as an implicit GEMM."""
        (kh, kw), (oh, ow) = self.kernel, self.out_hw
        return self.batch * oh * ow, self.cout, self.channels * kh * kw


def plain_conv2d(call, lookup_binding) -> PlainConv | None:
    """`call` as a PlainConv, or None for any other call."""
    if not isinstance(call.op, tvm.ir.Op) or call.op.name != "relax.nn.conv2d":
        return None
    attrs = call.attrs
    layout = str(attrs.data_layout)
    if (KERNEL_LAYOUTS.get(layout) != attrs.kernel_layout or attrs.out_layout != layout
            or int(attrs.groups) != 1 or any(int(d) != 1 for d in attrs.dilation)):
        return None
    x, w_expr = call.args
    weight = constant_array(w_expr, lookup_binding)
    x_shape, out_shape = _static_shape(x), _static_shape(call)
    if weight is None or x_shape is None or out_shape is None or weight.ndim != 4:
        return None
    if str(weight.dtype) != str(x.ty.dtype):
        return None
    return PlainConv(x, weight, x_shape, out_shape, tuple(int(s) for s in attrs.strides),
                     tuple(int(p) for p in attrs.padding), _accumulation_dtype(call), layout)


def _accumulation_dtype(call) -> str:
    """The dtype a conv2d or matmul call accumulates in: its out_dtype, else its input's."""
    out_dtype = str(call.attrs.out_dtype)
    return str(call.args[0].ty.dtype) if out_dtype in ("", "None", "void") else out_dtype


class PlainDense(NamedTuple):
    """A matmul of a static [M, K] input by constant [K, N] weights (a dense layer after FoldConstant)."""

    x: relax.Expr
    weight: np.ndarray
    out_dtype: str

    @property
    def gemm(self) -> tuple[int, int, int]:
        k, n = self.weight.shape
        return int(self.x.ty.shape[0]), int(n), int(k)


def plain_dense(call, lookup_binding) -> PlainDense | None:
    """`call` as a PlainDense, or None for any other call."""
    if not isinstance(call.op, tvm.ir.Op) or call.op.name != "relax.matmul":
        return None
    x, w_expr = call.args
    weight = constant_array(w_expr, lookup_binding)
    x_shape = _static_shape(x)
    if weight is None or weight.ndim != 2 or x_shape is None or len(x_shape) != 2:
        return None
    if str(weight.dtype) != str(x.ty.dtype):
        return None
    return PlainDense(x, weight, _accumulation_dtype(call))


@relax.expr_functor.mutator
class _ConvRewriter(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, rewrite, rewrite_dense):
        super().__init__(mod)
        self.rewrite, self.rewrite_dense = rewrite, rewrite_dense

    def visit_call_(self, call):  # noqa: N802 (TVM's visitor naming)
        call = self.visit_expr_post_order(call)
        conv = plain_conv2d(call, self.lookup_binding)
        if conv is not None:
            rewritten = self.rewrite(self.builder_, conv)
        else:
            dense = plain_dense(call, self.lookup_binding) if self.rewrite_dense else None
            rewritten = None if dense is None else self.rewrite_dense(self.builder_, dense)
        return call if rewritten is None else rewritten


def conv_rewrite_pass(name: str, make_rewrite, make_dense_rewrite=None) -> tvm.transform.Pass:
    """A module pass that replaces each PlainConv of every Relax function with `rewrite(builder, conv)`
    where that returns an expression (None keeps the convolution), and each PlainDense likewise with
    `dense_rewrite(builder, dense)`; `make_rewrite()` and `make_dense_rewrite()` give them when the pass
    runs (under the current target)."""

    @tvm.transform.module_pass(opt_level=0, name=name)
    def run(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        rewriter = _ConvRewriter(mod, make_rewrite(), make_dense_rewrite() if make_dense_rewrite else None)
        for gv, func in list(mod.functions_items()):
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        return rewriter.builder_.get()

    return run


def _split_k(builder: relax.BlockBuilder, conv: PlainConv, sms: int, im2col: bool, tensor_cores: bool):
    m, cout, k = conv.gemm
    splits = split_factor(m, cout, k)
    if splits == 1:
        if tensor_cores and str(conv.weight.dtype) == "float16" and min(m, cout, k) >= TENSOR_CORE_MIN_EXTENT:
            return _split_tensor_core(builder, conv, tensor_core_splits(m, cout, k, conv.channels, sms))
        return None
    if not im2col or conv.layout != "NCHW":
        return None
    batch, (kh, kw), (oh, ow) = conv.batch, conv.kernel, conv.out_hw
    cols = builder.emit_te(_im2col, conv.x, splits, (kh, kw), conv.strides, conv.padding, (oh, ow),
                           primfunc_name_hint="im2col")  # [S, M, K/S]
    w_slices = np.ascontiguousarray(conv.weight.reshape(cout, splits, k // splits).transpose(1, 2, 0))
    partial = builder.emit(relax.op.matmul(cols, relax.const(w_slices), out_dtype=conv.out_dtype))  # [S, M, N]
    total = builder.emit(relax.op.sum(partial, axis=[0]))  # [M, N]
    total = builder.emit(relax.op.reshape(total, (batch, oh, ow, cout)))
    return relax.op.permute_dims(total, [0, 3, 1, 2])


def _split_dense(builder: relax.BlockBuilder, dense: PlainDense):
    """A dense layer with few FMA tiles (ResNet's classifier at batch 32: [32, 512] x [512, 1000], 16
    tiles) as S matmuls over K slices and an elementwise sum: x [M, K] -> [S, M, K/S]."""
    m, n, k = dense.gemm
    splits = split_factor(m, n, k)
    if m < TILE_M or splits == 1:  # fewer rows go to dlight's GEMV rules, which split K themselves
        return None
    xs = builder.emit(relax.op.permute_dims(relax.op.reshape(dense.x, (m, splits, k // splits)), [1, 0, 2]))
    ws = relax.const(np.ascontiguousarray(dense.weight.reshape(splits, k // splits, n)))
    partial = builder.emit(relax.op.matmul(xs, ws, out_dtype=dense.out_dtype))  # [S, M, N]
    return builder.call_te(_sum_slices, partial, primfunc_name_hint="split_sum")


def _split_tensor_core(builder: relax.BlockBuilder, conv: PlainConv, splits: int):
    if splits == 1:
        return None
    partial = builder.emit_te(lambda data, weight: _split_conv(data, weight, splits, conv),
                              conv.x, relax.const(conv.weight), primfunc_name_hint="conv2d_split")
    return builder.call_te(_sum_slices, partial, primfunc_name_hint="split_sum")


def sm_count(target: tvm.target.Target | None) -> int:
    """Streaming multiprocessors of the GPU a CUDA target names by its arch (`SM_COUNTS`: the largest
    part of each generation that forgeml targets; DEFAULT_SMS, an H100's, when unknown)."""
    arch = str(target.attrs.get("arch", "")) if target is not None and target.kind.name == "cuda" else ""
    return SM_COUNTS.get(arch, DEFAULT_SMS)


def split_k_convolutions(sms: int | None = None, im2col: bool = True, tensor_cores: bool = True) -> tvm.transform.Pass:
    """Rewrite the convolutions that would leave the GPU mostly idle (see the module docstring), for a
    GPU with `sms` SMs (default: the current target's, `sm_count`): through im2col (NCHW only; dense
    layers with few tiles too, `_split_dense`), along channels on tensor cores (fp16), or both."""

    def make_rewrite():
        gpu_sms = sms or sm_count(tvm.target.Target.current(allow_none=True))
        return lambda builder, conv: _split_k(builder, conv, gpu_sms, im2col, tensor_cores)

    return conv_rewrite_pass("ForgemlSplitK", make_rewrite, (lambda: _split_dense) if im2col else None)
