"""Stem convolutions on tensor cores: a first convolution over an RGB image (3 channels, a 7x7 window)
becomes an im2col gather and a GEMM, so that the GEMM reads a plain matrix.

As an implicit GEMM, ResNet-18's stem (M = 32 x 112 x 112 outputs per channel at batch 32, N = 64,
K = 3 x 7 x 7 = 147) spends its time gathering A, not multiplying: each element of a 128 x 64 A tile
is found through divisions by 49, 7, 112 and a stride-2, padded window. It took 375 us on an H200 in
fp16 (the next-slowest convolution of the network, 142 us, does four times the multiply-adds);
cuDNN's TF32 kernel takes 188 us.

    conv2d(x, w: [O, C, KH, KW])  ->  cols[b, y, x, c*KH*KW + ky*KW + kx] (K padded to a multiple of 32)
                                  ->  out[b, o, y, x] = sum_k cols[b, y, x, k] * w[o, k]

K runs along the last axis of cols, so the GEMM's tile loads are contiguous 8-byte vectors (a 1x1
convolution over NCHW cols would gather them 25 KB apart). The GEMM writes the model's NCHW output
itself, so FuseOps merges the epilogue (bias, ReLU) into its kernel as before; K is padded with zero
taps and zero weights to whole tensor-core steps.
Only fp16 convolutions (NCHW/OIHW, or NHWC/OHWI under `--conv-layout NHWC`) with at most 4 input
channels, a window larger than 1x1, 64+ output channels and constant weights are rewritten (the
convolutions that go on tensor cores).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from forgeml.compiler.cuda.splitk import TENSOR_CORE_MIN_EXTENT, PlainConv, conv_rewrite_pass

MAX_CHANNELS = 4
K_STEP = 32  # two 16-wide tensor-core fragments


def _stem_cols(data, conv: PlainConv, k_padded: int):
    """cols[b, y, x, k] = the input at (b, c, y*sh + ky - top, x*sw + kx - left), in K order of the weight
    reshaped to [O, K] (OIHW: k = c*KH*KW + ky*KW + kx; OHWI: k = (ky*KW + kx)*C + c); 0 in the padding
    and for k past C*KH*KW."""
    from tvm import te, tirx

    channels, (kh, kw), (sh, sw), (oh, ow) = conv.channels, conv.kernel, conv.strides, conv.out_hw
    top, left = conv.padding[:2]
    height, width = conv.x_shape[1:3] if conv.layout == "NHWC" else conv.x_shape[2:4]
    k_real = channels * kh * kw

    def col(b, y, x, k):
        if conv.layout == "NHWC":
            c, r = k % channels, k // channels
        else:
            c, r = k // (kh * kw), k % (kh * kw)
        iy = y * sh + r // kw - top
        ix = x * sw + r % kw - left
        inside = tirx.all(k < k_real, iy >= 0, iy < height, ix >= 0, ix < width)
        c, iy, ix = tirx.min(c, channels - 1), tirx.max(iy, 0), tirx.max(ix, 0)
        value = data[b, iy, ix, c] if conv.layout == "NHWC" else data[b, c, iy, ix]
        return tirx.if_then_else(inside, value, tirx.const(0, data.dtype))

    return te.compute((conv.batch, oh, ow, k_padded), col, name="stem_cols")


def _stem_gemm(cols, weight, out_dtype: str, layout: str):
    """out[b, o, y, x] (NHWC: out[b, y, x, o]) = sum over k of cols[b, y, x, k] * weight[o, k],
    accumulated in `out_dtype`."""
    from tvm import te

    batch, oh, ow, k_padded = (int(d) for d in cols.shape)
    cout = int(weight.shape[0])
    k = te.reduce_axis((0, k_padded), "k")

    def dot(b, o, y, x):
        return te.sum(cols[b, y, x, k].astype(out_dtype) * weight[o, k].astype(out_dtype), axis=k)

    if layout == "NHWC":
        return te.compute((batch, oh, ow, cout), lambda b, y, x, o: dot(b, o, y, x), name="stem_gemm")
    return te.compute((batch, cout, oh, ow), dot, name="stem_gemm")


def _stem(builder: relax.BlockBuilder, conv: PlainConv):
    (kh, kw), channels, cout = conv.kernel, conv.channels, conv.cout
    if str(conv.weight.dtype) != "float16" or channels > MAX_CHANNELS or kh * kw == 1 or cout < TENSOR_CORE_MIN_EXTENT:
        return None
    k_real = channels * kh * kw
    k_padded = -(-k_real // K_STEP) * K_STEP
    cols = builder.emit_te(lambda data: _stem_cols(data, conv, k_padded), conv.x, primfunc_name_hint="stem_cols")
    w_cols = np.zeros((cout, k_padded), dtype=conv.weight.dtype)
    w_cols[:, :k_real] = conv.weight.reshape(cout, k_real)  # OIHW or OHWI: the K order of cols
    return builder.call_te(_stem_gemm, cols, relax.const(w_cols), conv.out_dtype, conv.layout,
                           primfunc_name_hint="stem_gemm")


def schedule_stem_cols(func, pixels_per_thread: int = 4, warps: int = 4, bind_threads: bool = True):
    """A schedule for a `stem_cols` gather (with the input's cast/transpose inlined into it), or None
    for any other kernel: a warp writes one pixel's K row (32 consecutive columns per store, coalesced),
    each thread K columns 32 apart for `pixels_per_thread` pixels, all unrolled.

    Every column's source is found through divisions by the window's sizes and every pixel's through
    divisions by the image's; dlight's Fallback computes all of them for each element (one element per
    thread) and ResNet-18's stem cols took 300 us at batch 32 on an H200, integer-bound (128 MB
    written). Unrolled, each division is computed once per thread and shared by the elements that
    need it. `bind_threads=False` leaves the loops unbound (the same order, runnable on a CPU)."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    names = [sch.get(b).name_hint for b in blocks]
    if names.count("stem_cols") != 1 or names[-1] != "stem_cols":
        return None
    try:
        for block in blocks[:-1]:  # the input's cast, transpose, normalization
            sch.compute_inline(block)
    except RuntimeError:  # tvm.s_tir.ScheduleError: a producer that cannot be inlined (Fallback takes it)
        return None
    block = sch.get_sblock("stem_cols")
    *spatial, k = sch.get_loops(block)
    pixel = sch.fuse(*spatial)
    k_outer, lane = sch.split(k, [None, 32])
    block_x, warp, inner = sch.split(pixel, [None, warps, pixels_per_thread])
    sch.reorder(block_x, warp, lane, k_outer, inner)
    if bind_threads:
        sch.bind(block_x, "blockIdx.x")
        sch.bind(warp, "threadIdx.y")
        sch.bind(lane, "threadIdx.x")
    sch.unroll(k_outer)
    sch.unroll(inner)
    return sch


def stem_cols_rule():
    """The dlight rule that schedules stem_cols gathers with `schedule_stem_cols`."""
    from tvm import tirx
    from tvm.s_tir.dlight.gpu.base import GPUScheduleRule

    class StemCols(GPUScheduleRule):
        def apply(self, func, target, tunable):
            if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
                return None
            return schedule_stem_cols(func)

    return StemCols()


def stem_convolutions() -> tvm.transform.Pass:
    """Rewrite fp16 stem convolutions into im2col + a GEMM (see the module docstring)."""
    return conv_rewrite_pass("ForgemlStemIm2col", lambda: _stem)
