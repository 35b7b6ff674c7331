"""Split-K convolutions for GPUs: a convolution with few output tiles and a long reduction becomes
im2col + a batched matmul over K slices + a sum, so that it fills the GPU.

dlight's Matmul rule gives each 32 x 64 output tile one thread block that walks all of K alone. At
batch 1, ResNet-18's layer4 3x3 convolutions (M = 7*7 = 49 outputs per channel, N = 512 channels,
K = 512*9 = 4608) are 16 blocks on an H200's 132 SMs: 479 us each, where cuDNN takes about 10.
Splitting K into S slices gives S times the blocks; the partial sums add up in the next kernel,
which FuseOps merges with the convolution's epilogue (bias, residual add, ReLU).

    conv2d(x, w)  ->  im2col(x): [S, M, K/S]  @  w: [S, K/S, N]  ->  sum over S  ->  NCHW

Only NCHW/OIHW convolutions with groups = 1, dilation 1 and constant weights are rewritten; the
weights are re-laid out in numpy, once, at compile time.
"""

from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import relax

from forgeml.compiler.pipeline import constant_array

TILE_M, TILE_N = 32, 64  # dlight Matmul's CUDA output tile (block 8x16 threads, 4x4 each)
TARGET_BLOCKS = 256  # about two blocks per SM on an H100/H200 (132 SMs)
MIN_K_SLICE = 128  # shorter slices spend more on the partial sums than they save
MIN_K = 512


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
    shape = getattr(expr.ty, "shape", None)
    try:
        return tuple(int(d) for d in shape) if shape is not None else None
    except TypeError:
        return None


@relax.expr_functor.mutator
class _SplitKRewriter(relax.PyExprMutator):
    def visit_call_(self, call):  # noqa: N802 (TVM's visitor naming)
        call = self.visit_expr_post_order(call)
        if not isinstance(call.op, tvm.ir.Op) or call.op.name != "relax.nn.conv2d":
            return call
        rewritten = self._rewrite(call)
        return call if rewritten is None else rewritten

    def _rewrite(self, call):
        attrs = call.attrs
        if (attrs.data_layout != "NCHW" or attrs.kernel_layout != "OIHW" or attrs.out_layout != "NCHW"
                or int(attrs.groups) != 1 or any(int(d) != 1 for d in attrs.dilation)):
            return None
        x, w_expr = call.args
        weight = constant_array(w_expr, self.lookup_binding)
        x_shape, out_shape = _static_shape(x), _static_shape(call)
        if weight is None or x_shape is None or out_shape is None or weight.ndim != 4:
            return None
        batch, channels, _, _ = x_shape
        cout, _, kh, kw = weight.shape
        _, _, oh, ow = out_shape
        m, k = batch * oh * ow, channels * kh * kw
        splits = split_factor(m, cout, k)
        if splits == 1:
            return None
        dtype = str(x.ty.dtype)
        out_dtype = str(attrs.out_dtype)
        out_dtype = dtype if out_dtype in ("", "None", "void") else out_dtype  # fp16 builds accumulate in fp32
        if str(weight.dtype) != dtype:
            return None
        emit = self.builder_.emit
        cols = self.builder_.emit_te(
            _im2col, x, splits, (kh, kw), tuple(int(s) for s in attrs.strides),
            tuple(int(p) for p in attrs.padding), (oh, ow), primfunc_name_hint="im2col")  # [S, M, K/S]
        w_slices = np.ascontiguousarray(weight.reshape(cout, splits, k // splits).transpose(1, 2, 0))
        partial = emit(relax.op.matmul(cols, relax.const(w_slices, dtype), out_dtype=out_dtype))  # [S, M, N]
        total = emit(relax.op.sum(partial, axis=[0]))  # [M, N]
        total = emit(relax.op.reshape(total, (batch, oh, ow, cout)))
        return relax.op.permute_dims(total, [0, 3, 1, 2])


def split_k_convolutions() -> tvm.transform.Pass:
    """Rewrite the convolutions that would leave the GPU mostly idle (see the module docstring)."""

    @tvm.transform.module_pass(opt_level=0, name="ForgemlSplitKConv2D")
    def rewrite(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        rewriter = _SplitKRewriter(mod)
        for gv, func in list(mod.functions_items()):
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        return rewriter.builder_.get()

    return rewrite
