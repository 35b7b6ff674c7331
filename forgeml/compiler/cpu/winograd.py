"""Winograd convolution for 3x3 stride-1 convolutions on x86 CPUs.

The direct conv rule (`conv.py`) runs ResNet's 3x3 convolutions at about the FMA units' peak, so only fewer
multiplications make them faster. Winograd F(m x m, 3 x 3) computes an m x m output tile from an
(m + 2)^2 input tile with (m + 2)^2 multiplications per channel pair instead of 9 m^2 (F(4x4): 4x fewer):

    V[e, nu, p, c] = (B^T d_p B)[e, nu]           input transform of tile p, channel c
    M[e, nu, p, k] = sum_c V[e, nu, p, c] U[e, nu, k, c]     (m + 2)^2 matrix products
    y_p[k]         = A^T M[:, :, p, k] A          output transform, then the conv's epilogue

with U = G g G^T, the transformed weights, computed here at compile time (numpy, float64) and stored
as the constant. `winograd_convs` rewrites eligible `relax.nn.conv2d` calls before legalization into a
call of a TE kernel marked out-elementwise-fusable, so FuseOps still fuses the bias, residual add and
activation after it; `WinogradRule` schedules the fused kernel.

Measured on a Zen 4 (AVX-512, 2 threads), each kernel alone (conv + bias + ReLU, ResNet-18's shapes):
64 ch 56x56 1.10 -> 0.53 ms, 128 ch 28x28 1.08 -> 0.37 ms, 256 ch 14x14 1.06 -> 0.41 ms (F(4x4));
512 ch 7x7 1.36 -> 0.68 ms (F(2x2): a 7x7 map wastes less in 2x2 tiles). Error against the direct
conv: about 6e-6 of the output's magnitude with F(4x4), 1e-6 with F(2x2).

Costs: the transformed weights are (m + 2)^2 / 9 times the weights' size (4x for F(4x4), 1.8x for
F(2x2)), so artifacts grow; and the transforms round differently from a direct conv (within the
verification tolerance by two orders of magnitude). Only x86 targets use it (measured there);
`forgeml compile --no-winograd` (or `FORGEML_WINOGRAD=0` in the environment) turns it off.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax, s_tir, te, tirx
from tvm.s_tir.dlight.base import ScheduleRule

from forgeml.compiler.cpu import common
from forgeml.compiler.graph import constant_array

OP_PATTERN_OUT_EWISE_FUSABLE = 4  # TVM's kOutEWiseFusable: FuseOps fuses the elementwise ops after it
KERNEL = "conv2d_winograd"  # the name of the kernels `winograd_convs` makes (FuseOps keeps it in the fused name)
BLOCKS = ("wino_t1", "wino_v", "wino_m", "wino_t2", "wino_out")
MIN_TILE = 4  # fewest tiles of a register tile row: below this the matrix products starve


_ALLOWED: ContextVar[bool] = ContextVar("forgeml_winograd", default=True)


@contextmanager
def allowed(on: bool) -> Iterator[None]:
    """Within the block, `winograd_convs` rewrites convolutions only when `on` (`forgeml compile --no-winograd`)."""
    token = _ALLOWED.set(on)
    try:
        yield
    finally:
        _ALLOWED.reset(token)


def is_winograd(kernel_name: str) -> bool:
    """Whether a (fused) kernel of that name computes a convolution by Winograd."""
    return KERNEL in kernel_name


def enabled(target: tvm.target.Target) -> bool:
    """Whether `target` takes Winograd convolutions: x86 only (measured there), unless turned off."""
    if not _ALLOWED.get() or os.environ.get("FORGEML_WINOGRAD", "1") == "0" or not common.TUNE.get("winograd", True):
        return False
    if target.kind.name != "llvm":
        return False
    triple = str(target.attrs.get("mtriple", "") or "").lower()
    return triple == "" or triple.startswith(("x86_64", "i686", "i386"))


def matrices(m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TVM's Cook-Toom matrices (A: (m+2) x m, B: (m+2) x (m+2), G: (m+2) x 3) for F(m x m, 3 x 3)."""
    from tvm.topi.nn import winograd_util

    return winograd_util._cook_toom_convolution(winograd_util._interpolation_points(m + 1), m, 3)


def _lincomb(coefs, terms):
    """sum(c * t) over the nonzero coefficients, without multiplying by 0 or +-1."""
    out = None
    for c, t in zip(coefs, terms, strict=True):
        c = float(c)
        if c == 0.0:
            continue
        if c == -1.0:
            out = -t if out is None else out - t
            continue
        term = t if c == 1.0 else t * tirx.const(c, "float32")
        out = term if out is None else out + term
    return out if out is not None else tirx.const(0.0, "float32")


def _select(index, exprs):
    """exprs[index] for a loop variable the schedule unrolls (the selects then fold away)."""
    out = exprs[-1]
    for i in range(len(exprs) - 2, -1, -1):
        out = tirx.Select(index == i, exprs[i], out)
    return out


@dataclass(frozen=True)
class Plan:
    """How one convolution runs as Winograd: output tile m, output channels per weight block kt."""

    m: int
    kt: int

    @property
    def alpha(self) -> int:
        return self.m + 2


def plan(n: int, c: int, k: int, oh: int, ow: int, cpu: common.CPUFacts) -> Plan | None:
    """The Winograd plan for a 3x3 stride-1 conv of n x c -> k channels with an oh x ow output, or None
    where the direct conv stays: F(4x4) on maps of 12 rows and columns or more, F(2x2) below (7x7: 2x2
    tiles waste less), none under 4x4 or with fewer than 16 input channels (the transforms then cost
    more than they save), or where too few tiles fill a register tile (`register_tiles`)."""
    if min(oh, ow) < 4 or c < 16:
        return None
    kt = 2 * cpu.lanes
    if k % kt:
        return None
    m = 4 if min(oh, ow) >= 12 else 2
    tiles = n * -(-oh // m) * -(-ow // m)
    if register_tiles(tiles, 2, cpu.max_acc) < MIN_TILE:
        return None
    return Plan(m, kt)


def register_tiles(tiles: int, vectors: int, max_acc: int) -> int:
    """Tiles in a register tile of the matrix products with `vectors` vectors of output channels: the largest
    divisor of the tile count that keeps the accumulators within `max_acc`."""
    return common.largest_divisor(tiles, max_acc // vectors)


def weights(w: np.ndarray, p: Plan) -> np.ndarray:
    """U = G g G^T of OIHW weights `w`, laid out [alpha, alpha, K/kt, C, kt] (float32, from float64)."""
    g_mat = matrices(p.m)[2]
    k, c = w.shape[:2]
    u = np.einsum("ar,kcrs,bs->abkc", g_mat, w.astype(np.float64), g_mat)
    u = u.reshape(p.alpha, p.alpha, k // p.kt, p.kt, c).transpose(0, 1, 2, 4, 3)
    return np.ascontiguousarray(u.astype(np.float32))


def compute(data: te.Tensor, u: te.Tensor, pads: tuple[int, int, int, int], out_shape, p: Plan) -> te.Tensor:
    """The Winograd convolution of NCHW `data` ([N, C, H, W]) with transformed weights `u`; `pads` (top,
    left, bottom, right) as the conv's; output [N, K, OH, OW]."""
    a_mat, b_mat, _ = matrices(p.m)
    m, a = p.m, p.alpha
    n_, c_, h_, w_ = (int(d) for d in data.shape)
    _, k_, oh, ow = out_shape
    top, left = pads[0], pads[1]
    nh, nw = -(-oh // m), -(-ow // m)
    tiles = n_ * nh * nw
    zero = tirx.const(0.0, "float32")

    def padded(n, c, y, x):
        """The input, zero outside it (and beyond the last tile). A guarded load (if_then_else), never a
        select of a clamped load: TVM's simplifier drops the clamp inside the select's true branch (the
        condition implies it), yet a select evaluates both branches, and the kernel read before the
        input's first row (a segfault where the page before it was unmapped)."""
        yy, xx = y - top, x - left
        inside = tirx.all(yy >= 0, yy < h_, xx >= 0, xx < w_)
        return tirx.if_then_else(inside, data[n, c, yy, xx], zero)

    def tile(t):
        return t // (nh * nw), t % (nh * nw) // nw, t % nw

    def t1(e, rb, t, c):
        n, th, tw = tile(t)
        rows = [padded(n, c, th * m + ra, tw * m + rb) for ra in range(a)]
        return _select(e, [_lincomb(b_mat[:, i], rows) for i in range(a)])

    t1_ = te.compute((a, a, tiles, c_), t1, name="wino_t1")
    v = te.compute((a, a, tiles, c_), lambda e, nu, t, c: _select(
        nu, [_lincomb(b_mat[:, i], [t1_[e, rb, t, c] for rb in range(a)]) for i in range(a)]), name="wino_v")
    rc = te.reduce_axis((0, c_), name="rc")
    mm = te.compute((a, a, tiles, k_), lambda e, nu, t, k: te.sum(
        v[e, nu, t, rc] * u[e, nu, k // p.kt, rc, k % p.kt], axis=rc), name="wino_m")
    t2 = te.compute((a, m, tiles, k_), lambda e, vw, t, k: _select(
        vw, [_lincomb(a_mat[:, i], [mm[e, nu, t, k] for nu in range(a)]) for i in range(m)]), name="wino_t2")

    def out(n, k, y, x):
        t = n * nh * nw + y // m * nw + x // m
        return _select(y % m, [_lincomb(a_mat[:, i], [t2[e, x % m, t, k] for e in range(a)]) for i in range(m)])

    return te.compute((n_, k_, oh, ow), out, name="wino_out")


def _static(ty) -> list[int] | None:
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    dims = ty.shape.values
    return [int(d) for d in dims] if all(isinstance(d, tirx.IntImm) for d in dims) else None


def _eligible(call: relax.Call, cpu: common.CPUFacts) -> tuple[Plan, list[int], np.ndarray] | None:
    """(plan, output shape, weights) for a conv2d call Winograd takes, else None."""
    data, weight = call.args
    attrs = call.attrs
    w = constant_array(weight)
    if w is None:
        return None
    if (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NCHW", "OIHW", "NCHW"):
        return None
    if int(attrs.groups) != 1 or [int(s) for s in attrs.strides] != [1, 1]:
        return None
    if [int(d) for d in attrs.dilation] != [1, 1]:
        return None
    shapes = _static(data.ty), _static(weight.ty), _static(call.ty)
    if any(s is None or len(s) != 4 for s in shapes):
        return None
    (n, c, _, _), (k, _, kh, kw), out = shapes
    if (kh, kw) != (3, 3) or any(str(x.ty.dtype) != "float32" for x in (data, weight, call)):
        return None
    p = plan(n, c, k, out[2], out[3], cpu)
    return None if p is None else (p, out, w)


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, cpu: common.CPUFacts):
        super().__init__(mod)
        self.mod_ = mod
        self.cpu = cpu
        self.conv = tvm.ir.Op.get("relax.nn.conv2d")

    def run(self) -> tvm.IRModule:
        for gv, func in self.mod_.functions_items():
            if isinstance(func, relax.Function):
                self.builder_.update_func(gv, self.visit_expr(func))
        return self.builder_.get()

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = self.visit_expr_post_order(call)
        if not call.op.same_as(self.conv):
            return call
        found = _eligible(call, self.cpu)
        if found is None:
            return call
        p, out, w = found
        pads = tuple(int(x) for x in call.attrs.padding)
        u = relax.const(weights(w, p), "float32")
        return self.builder_.call_te(
            lambda d, t: compute(d, t, pads, out, p), call.args[0], u, primfunc_name_hint=KERNEL,
            primfunc_attrs={"op_pattern": OP_PATTERN_OUT_EWISE_FUSABLE})


def winograd_convs(target: tvm.target.Target) -> tvm.transform.Pass:
    """Rewrite the 3x3 stride-1 convolutions with constant weights that `plan` takes into Winograd
    kernels (before legalization; a no-op where `enabled(target)` is false)."""

    @tvm.transform.module_pass(opt_level=0, name="ForgemlWinogradConvs")
    def transform(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if not enabled(target):
            return mod
        return _Rewriter(mod, common.cpu_of(target)).run()

    return transform


class WinogradRule(ScheduleRule):
    """The schedule of a kernel `compute` made, with the elementwise epilogue FuseOps put after it:
    - input transform: per (tile, vector of input channels), the padded input gathered and transformed in
      registers ([alpha, alpha, L]), written to V contiguously;
    - matrix products: parallel over (e, nu, block of kt output channels), a register tile of pt tiles x
      2 vectors of output channels, U's block (C x kt) kept in cache across the tiles;
    - output transform + epilogue: per (tile, vector of output channels), A^T M A in registers, the bias,
      residual and activation applied on whole vectors."""

    def apply(self, func, target, tunable):
        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        try:
            t1, v, mm, t2, out = (sch.get_sblock(name) for name in BLOCKS)
        except Exception:  # noqa: BLE001 (not a Winograd kernel)
            return None
        cpu = common.cpu_of(target)
        lanes = cpu.lanes
        if not sch.get(common.child_blocks(sch)[0]).same_as(sch.get(t1)):
            return None  # FuseOps put a producer before the kernel: not a shape this rule knows
        for consumer in _epilogue(sch):
            sch.reverse_compute_inline(consumer)
        k_total = common.as_int(sch.get(mm).iter_vars[3].dom.extent)
        kt = common.as_int(sch.get(mm).reads[1].source.shape[4])
        if k_total is None or kt is None or kt % lanes or k_total % lanes:
            return None
        tiles = common.as_int(sch.get(mm).iter_vars[2].dom.extent)
        _input_transform(sch, t1, v, lanes)
        _products(sch, mm, lanes, kt, register_tiles(tiles, kt // lanes, cpu.max_acc))
        _output_transform(sch, t2, out, lanes, common.as_int(sch.get(t2).iter_vars[1].dom.extent))
        return sch


def _epilogue(sch: s_tir.Schedule) -> list:
    """The blocks after the output transform, in order (FuseOps fused only elementwise ops there)."""
    blocks = common.child_blocks(sch)
    names = [sch.get(b).name_hint for b in blocks]
    return blocks[names.index("wino_out") + 1:]


def _input_transform(sch: s_tir.Schedule, t1, v, lanes: int) -> None:
    e, nu, t, c = sch.get_loops(v)
    cb, ci = sch.split(c, [None, lanes])
    sch.reorder(t, cb, e, nu, ci)
    outer = common.parallelize(sch, [t, cb])
    sch.unroll(e)
    sch.unroll(nu)
    sch.vectorize(ci)
    _in_registers(sch, t1, outer)


def _products(sch: s_tir.Schedule, mm, lanes: int, kt: int, pt: int) -> None:
    e, nu, t, k, rc = sch.get_loops(mm)
    kb, kf, kl = sch.split(k, [None, kt // lanes, lanes])
    to, ti = sch.split(t, [None, pt])
    sch.reorder(e, nu, kb, to, rc, ti, kf, kl)
    local = sch.cache_write(mm, 0, "local")
    common.parallelize(sch, [e, nu, kb])
    sch.reverse_compute_at(local, to)
    sch.unroll(ti)
    sch.unroll(kf)
    sch.vectorize(kl)
    init = sch.decompose_reduction(mm, rc)
    loops = sch.get_loops(init)
    sch.vectorize(loops[-1])
    sch.unroll(loops[-2])
    sch.unroll(loops[-3])
    loops = sch.get_loops(local)
    sch.vectorize(loops[-1])
    sch.unroll(loops[-2])


def _output_transform(sch: s_tir.Schedule, t2, out, lanes: int, m: int) -> None:
    n, k, y, x = sch.get_loops(out)
    th, vh = sch.split(y, [None, m])
    tw, vw = sch.split(x, [None, m])
    kb, kl = sch.split(k, [None, lanes])
    sch.reorder(n, th, tw, kb, vh, vw, kl)
    common.parallelize(sch, [n, th, tw])
    sch.unroll(vh)
    sch.unroll(vw)
    sch.vectorize(kl)
    _in_registers(sch, t2, kb)


def _in_registers(sch: s_tir.Schedule, half, loop) -> None:
    """A transform's first pass ([alpha, alpha or m, 1 tile, vector]) computed under `loop` into a local
    buffer: its two small axes unrolled, the vector axis vectorized, so LLVM keeps it in registers."""
    sch.compute_at(half, loop)
    sch.set_scope(half, 0, "local")
    loops = sch.get_loops(half)
    sch.unroll(loops[-3])
    sch.unroll(loops[-2])
    sch.vectorize(loops[-1])
