"""Stem convolutions on tensor cores: a first convolution over an RGB image (3 channels, a 7x7 window)
becomes an im2col gather and a 1x1 convolution, so that its GEMM reads a plain matrix.

As an implicit GEMM, ResNet-18's stem (M = 32 x 112 x 112 outputs per channel at batch 32, N = 64,
K = 3 x 7 x 7 = 147) spends its time gathering A, not multiplying: each element of a 128 x 64 A tile
is found through divisions by 49, 7, 112 and a stride-2, padded window. It took 375 us on an H200 in
fp16 (the next-slowest convolution of the network, 142 us, does four times the multiply-adds);
cuDNN's TF32 kernel takes 188 us.

    conv2d(x, w: [O, C, KH, KW])  ->  cols[b, c*KH*KW + ky*KW + kx, y, x] (K padded to a multiple of 32)
                                  ->  conv2d(cols, w: [O, K, 1, 1])

The 1x1 convolution keeps the model's NCHW output, so FuseOps merges the epilogue (bias, ReLU) into
its kernel as before; K is padded with zero taps and zero weights to whole tensor-core steps.
Only fp16 NCHW/OIHW convolutions with at most 4 input channels, a window larger than 1x1, 64+ output
channels and constant weights are rewritten (the convolutions that go on tensor cores).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from forgeml.compiler.gpu_splitk import PlainConv, plain_conv2d, rewrite_pass

MAX_CHANNELS = 4
MIN_OUT_CHANNELS = 64  # gpu.tensor_core_gemm's smallest extent
K_STEP = 32  # two 16-wide tensor-core fragments


def _stem_cols(data, kernel: tuple[int, int], strides: tuple[int, int], padding: tuple[int, int, int, int],
               out_hw: tuple[int, int], k_padded: int):
    """cols[b, k, y, x] = data[b, c, y*sh + ky - top, x*sw + kx - left] for k = c*KH*KW + ky*KW + kx (the
    K order of an OIHW weight reshaped to [O, K]); 0 in the padding and for k past C*KH*KW."""
    from tvm import te, tirx

    _, channels, height, width = (int(d) for d in data.shape)
    (kh, kw), (sh, sw), (top, left, _, _), (oh, ow) = kernel, strides, padding, out_hw
    k_real = channels * kh * kw

    def col(b, k, y, x):
        c, r = k // (kh * kw), k % (kh * kw)
        iy = y * sh + r // kw - top
        ix = x * sw + r % kw - left
        inside = tirx.all(k < k_real, iy >= 0, iy < height, ix >= 0, ix < width)
        value = data[b, tirx.min(c, channels - 1), tirx.max(iy, 0), tirx.max(ix, 0)]
        return tirx.if_then_else(inside, value, tirx.const(0, data.dtype))

    return te.compute((int(data.shape[0]), k_padded, oh, ow), col, name="stem_cols")


@relax.expr_functor.mutator
class _StemRewriter(relax.PyExprMutator):
    def visit_call_(self, call):  # noqa: N802 (TVM's visitor naming)
        call = self.visit_expr_post_order(call)
        conv = plain_conv2d(call, self.lookup_binding)
        rewritten = None if conv is None else self._rewrite(conv)
        return call if rewritten is None else rewritten

    def _rewrite(self, conv: PlainConv):
        cout, channels, kh, kw = conv.weight.shape
        if str(conv.weight.dtype) != "float16" or channels > MAX_CHANNELS or kh * kw == 1 or cout < MIN_OUT_CHANNELS:
            return None
        k_real = channels * kh * kw
        k_padded = -(-k_real // K_STEP) * K_STEP
        cols = self.builder_.emit_te(_stem_cols, conv.x, (int(kh), int(kw)), conv.strides, conv.padding,
                                     conv.out_shape[2:], k_padded, primfunc_name_hint="stem_cols")
        w_cols = np.zeros((cout, k_padded, 1, 1), dtype=conv.weight.dtype)
        w_cols[:, :k_real, 0, 0] = conv.weight.reshape(cout, k_real)
        return relax.op.nn.conv2d(cols, relax.const(w_cols), out_dtype=conv.out_dtype)


def stem_convolutions() -> tvm.transform.Pass:
    """Rewrite fp16 stem convolutions into im2col + a 1x1 convolution (see the module docstring)."""
    return rewrite_pass("ForgemlStemIm2col", _StemRewriter)
