"""Pooling windows over channel-blocked data.

`BlockedPoolRule`: a max or average pool (`out[n, c, y, x] = reduce over (ry, rx) of in[n, c, y*s + ry - p,
x*s + rx - p]`) whose input a conv hands it channel-blocked ([N, C/L, H, W, L], blocked.py): one vector of
L channels per window tap, the window unrolled and accumulated in a register, the rows in parallel. In NCHW
the generic rule ran every tap as a scalar with its bounds test (ResNet's 3x3/2 max pool after the stem,
per-kernel profile: 0.32 ms -> 0.26 ms, ONNX Runtime's 0.16 ms on its blocked layout; 2 threads, Zen 4).
"""

from __future__ import annotations

from tvm import s_tir
from tvm.s_tir.dlight.base import ScheduleRule

from forgeml.compiler.cpu import common


def pool_reads_blocked(sch: s_tir.Schedule, block_rv, buf=None) -> bool:
    """Whether `block_rv` is a pooling window over (n, c, y, x) reading `buf` (any buffer when None) per
    channel: iterators (n, c, y, x, ry, rx), one read whose channel index is the output's channel (as
    c // L and c % L once blocked), one 4-D write."""
    block = sch.get(block_rv)
    if common.iter_kinds(block) != ["S", "S", "S", "S", "R", "R"] or len(block.writes) != 1:
        return False
    nn, cc, yy, xx, ry, rx = (iv.var for iv in block.iter_vars)
    out = block.writes[0].region
    if len(out) != 4 or not all(r.min.same_as(v) for r, v in zip(out, (nn, cc, yy, xx))):
        return False
    inputs = [r for r in block.reads if not r.source.same_as(block.writes[0].source)]
    if len(inputs) != 1 or (buf is not None and not inputs[0].source.same_as(buf)):
        return False
    dims = common.channel_dims(inputs[0], cc)
    return len(dims) == 4 and dims[0] <= {nn} and dims[1] == {cc} and dims[2] == {yy, ry} and dims[3] == {xx, rx}


class BlockedPoolRule(ScheduleRule):
    """Pooling over channel-blocked input: a vector of channels per tap, window in registers."""

    def apply(self, func, target, tunable):
        start = common.reduction_schedule(func, target)
        if start is None:
            return None
        cpu, sch, blk = start
        if not common.trivial_binding(sch, blk) or not pool_reads_blocked(sch, blk):
            return None
        block = sch.get(blk)
        data = next(r.source for r in block.reads if not r.source.same_as(block.writes[0].source))
        if len(data.shape) != 5:
            return None
        lanes = common.as_int(data.shape[4])
        channels = common.as_int(block.iter_vars[1].dom.extent)
        if lanes is None or channels is None or channels % lanes or block.writes[0].source.dtype != "float32":
            return None
        name = block.name_hint
        after, before = common.inline_epilogue(sch, blk)
        blk = sch.get_sblock(name)
        if len(before) > 1 or len(after) > 1:
            return None
        local = sch.cache_write(blk, 0, "local")
        if after:
            sch.reverse_compute_inline(after[0])
        n, c, y, x, ry, rx = sch.get_loops(blk)
        co, ci = sch.split(c, [None, lanes])
        height = common.as_int(sch.get(y).extent)
        rows = common.rows_per_task(height, channels // lanes, cpu.cores, 8) or 1
        yo, yi = sch.split(y, [None, rows])
        sch.reorder(n, co, yo, yi, x, ry, rx, ci)
        outer = common.parallelize(sch, [n, co, yo])
        depth = common.loop_depth(sch, blk, x)
        sch.reverse_compute_at(local, x, preserve_unit_loops=True)
        sch.vectorize(ci)
        sch.unroll(ry)
        sch.unroll(rx)
        init = sch.decompose_reduction(blk, ry)
        sch.vectorize(sch.get_loops(init)[-1])
        wloops = sch.get_loops(local)[depth:]
        sch.vectorize(wloops[1])  # (n, c, y, x) of one output pixel: the channels
        for pad in before:  # the padding stage, blocked like its input: the rows a task reads, in its loop
            sch.compute_at(pad, outer, preserve_unit_loops=True)
            sch.vectorize(sch.get_loops(pad)[-1])
        return sch
