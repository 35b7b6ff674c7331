"""Convolution rules.

- `Conv2DRule`: NCHW conv2d (groups == 1, or groups with >= one vector of output channels per group),
  output channels vectorized, a register tile of output columns, weights prepacked at compile time.
- `DepthwiseConvRule`: NCHW depthwise conv2d; the padded input is rewritten channel-blocked ([C/8, H, W, 8])
  so every tap is one contiguous vector load, any stride. The blocked copy is made per task (a chunk of
  output rows of one channel block) inside the compute's parallel loop, so it stays in cache: as a stage of
  its own it wrote and re-read a full copy of the input (MobileNetV2's 96 x 112 x 112: 4.8 MB each way),
  and the whole model ran 8-10% slower (2 threads, Zen 4)."""

from __future__ import annotations

from dataclasses import dataclass

from tvm import s_tir, tirx
from tvm.s_tir.dlight.base import ScheduleRule

from forgeml.compiler.cpu import common
from forgeml.compiler.cpu.generic import _schedule_block_generic


@dataclass
class _ConvInfo:
    data_idx: int
    w_idx: int
    depthwise: bool
    grouped: bool
    oc: int
    oc_per_group: int
    oh: int
    ow: int
    kh: int
    kw: int
    flat_ok: bool  # 1x1, stride 1, same spatial shape: (y, x) may be fused into one pixel axis
    icg: int = 0  # input channels per group (the reduction over channels)


def _analyze_conv(sch: s_tir.Schedule, block_rv, func) -> _ConvInfo | None:
    block = sch.get(block_rv)
    if common.iter_kinds(block) != ["S", "S", "S", "S", "R", "R", "R"] or len(block.reads) != 2:
        return None
    if len(block.writes) != 1 or not common.trivial_binding(sch, block_rv):
        return None
    nn, ff, yy, xx, rc, ry, rx = (iv.var for iv in block.iter_vars)
    out = block.writes[0].region
    if len(out) != 4 or not all(r.min.same_as(v) for r, v in zip(out, (nn, ff, yy, xx))):
        return None
    w_idx = data_idx = None
    for n, rd in enumerate(block.reads):
        mins = [r.min for r in rd.region]
        if len(mins) == 4 and all(isinstance(m, tirx.Var) for m in mins) and all(
                a.same_as(b) for a, b in zip(mins, [ff, rc, ry, rx])):
            w_idx = n
        else:
            data_idx = n
    if w_idx is None or data_idx is None:
        return None
    dims = common.channel_dims(block.reads[data_idx], rc)  # NCHW, or channel-blocked (blocked.py)
    if len(dims) != 4 or dims[0] != {nn} or rc not in dims[1] or dims[2] != {yy, ry} or dims[3] != {xx, rx}:
        return None
    exts = [common.as_int(iv.dom.extent) for iv in block.iter_vars]
    oc, oh, ow, icg, kh, kw = exts[1], exts[2], exts[3], exts[4], exts[5], exts[6]
    grouped = ff in dims[1]
    depthwise = grouped and icg == 1
    data_buf = block.reads[data_idx].source
    oc_per_group = oc
    if grouped and not depthwise:
        groups = common.as_int(data_buf.shape[1]) // icg
        oc_per_group = oc // groups
    flat_ok = (kh == 1 and kw == 1 and [common.as_int(d) for d in data_buf.shape[2:4]] == [oh, ow]
               and not grouped)
    return _ConvInfo(data_idx, w_idx, depthwise, grouped, oc, oc_per_group, oh, ow, kh, kw, flat_ok, icg)


def _choose_conv_tile(ocg: int, width: int, lanes: int, max_acc: int, max_fv: int = 4) -> tuple[int, int]:
    """(vectors of output channels, output columns) of the register tile."""
    return common.choose_register_tile(range(1, max_fv + 1), ocg, width, lanes, max_acc)


def _conv_tile_schedule(sch, blk, info: _ConvInfo, lanes: int, fv: int, after, max_acc: int, cores: int) -> None:
    """Tile n, f, y, x, rc, ry, rx into a register tile of fv vectors x xt columns."""
    local = sch.cache_write(blk, 0, "local")
    if after:
        sch.reverse_compute_inline(after[0])
    if info.flat_ok:
        # one pixel axis p = y * OW + x, in the block, its write-back and the local tile
        ow = info.ow
        sch.transform_layout(blk, ("write", 0), lambda n, f, y, x: (n, y * ow + x, f))
        sch.transform_block_layout(blk, lambda n, f, y, x, rc, ry, rx: (n, f, y * ow + x, rc, ry, rx))
        sch.transform_block_layout(local, lambda n, f, y, x: (n, f, y * ow + x))
        n, f, p, rc, ry, rx = sch.get_loops(blk)
    else:
        # channels innermost in the register tile: each accumulator is one contiguous vector
        if common.TUNE.get("conv_channel_last_tile", True):
            sch.transform_layout(blk, ("write", 0), lambda n, f, y, x: (n, y, x, f))
        n, f, y, x, rc, ry, rx = sch.get_loops(blk)
    fo, fvl, fl = sch.split(f, [None, fv, lanes])
    if info.flat_ok:
        xt = common.largest_divisor(info.oh * info.ow, max_acc // fv)
        po, pt = sch.split(p, [None, xt])
        sch.reorder(n, fo, po, rc, ry, rx, pt, fvl, fl)
        # parallel over (n, fo, po-outer); keep a serial chunk of pixel tiles per task
        n_tiles = info.oh * info.ow // xt
        blocks = common.as_int(sch.get(n).extent) * common.as_int(sch.get(fo).extent)
        chunk = common.balanced_chunk(n_tiles, blocks, cores, 8)
        poo, poi = sch.split(po, [None, chunk])
        common.parallelize(sch, [n, fo, poo])
        at = poi
    else:
        xt = common.largest_divisor(info.ow, max_acc // fv)
        xo, xtl = sch.split(x, [None, xt])
        sch.reorder(n, fo, y, xo, rc, ry, rx, xtl, fvl, fl)
        common.parallelize(sch, [n, fo, y])
        at = xo
        pt = xtl
    depth = common.loop_depth(sch, blk, at)
    sch.reverse_compute_at(local, at, preserve_unit_loops=True)
    sch.unroll(pt)
    sch.unroll(fvl)
    sch.vectorize(fl)
    if fv * xt <= 10 and info.kw <= 3:
        sch.unroll(rx)
    init = sch.decompose_reduction(blk, rc)
    iloops = sch.get_loops(init)
    sch.vectorize(iloops[-1])
    for lp in iloops[-3:-1]:
        sch.unroll(lp)
    wloops = sch.get_loops(local)[depth:]
    if common.TUNE.get("conv_writeback_channels", True):
        _channel_writeback(sch, wloops, lanes)
    else:
        _tile_writeback(sch, wloops, lanes)


def _channel_writeback(sch, wloops, lanes: int) -> None:
    """Write-back of a channel-vectorized register tile into NCHW, loops (n, f, y, x) or (n, f, p): the
    channels innermost and vectorized, so the epilogue (bias, clip, SiLU's exp) runs on whole vectors and
    only the stores scatter. With the pixels innermost, tiles whose width no vector divides (7 or 14
    columns) computed it one float at a time: EfficientNet-B0's SiLU expansions at 7x7 and 14x14."""
    f = wloops[1]
    rest = [lp for i, lp in enumerate(wloops) if i != 1]
    sch.reorder(*rest, f)
    fo, fl = sch.split(f, [None, lanes])
    sch.vectorize(fl)
    sch.unroll(fo)
    for lp in rest:
        e = common.as_int(sch.get(lp).extent)
        if e is not None and e <= 64:
            sch.unroll(lp)


def _pixel_tile(info: _ConvInfo, lanes: int, max_acc: int) -> tuple[int, int] | None:
    """(output channels, pixel vectors) of a register tile vectorized along the pixels of a 1x1 conv, or None
    where the channel-vectorized tile fits better: only where one plane is large (>= 784 pixels, a
    multiple of the vector), the input has few channels (<= 48: the expansions of inverted residuals;
    ResNet-50's 64->256 at 56x56 measured 1.44 -> 1.70 ms with pixel tiles, 512->128 at 28x28 1.04 ->
    1.52 ms: each tile streams every input channel of its pixels) and the output channels split into
    rows of the tile."""
    if not info.flat_ok or info.grouped or not common.TUNE.get("conv_pixel_tile", True):
        return None
    if info.icg > 48:
        return None
    pixels = info.oh * info.ow
    if pixels < 784 or pixels % lanes:
        return None
    best, best_score = None, -1.0
    for rows in (8, 6, 4, 3, 2):
        if info.oc % rows:
            continue
        vectors = common.largest_divisor(pixels // lanes, max_acc // rows)
        score = rows * vectors / (rows + vectors) + 0.01 * rows * vectors
        if score > best_score:
            best, best_score = (rows, vectors), score
    return best


def _conv_pixel_tile_schedule(sch, blk, info: _ConvInfo, lanes: int, rows: int, vectors: int, after) -> None:
    """A 1x1 conv as out[f, p] += w[f, c] * in[c, p] with the pixels p = y * OW + x vectorized: rows of
    output channels x vectors of pixels in registers, a broadcast weight per row, the input and the NCHW
    output both read and written as contiguous vectors (the channel-vectorized tile wrote NCHW back one
    float at a time: HF MobileNetV2's 16->96 expansion at 112x112, 1 thread, Zen 4: 0.96 ms, ORT 0.49)."""
    local = sch.cache_write(blk, 0, "local")
    if after:
        sch.reverse_compute_inline(after[0])
    ow = info.ow
    sch.transform_layout(blk, ("write", 0), lambda n, f, y, x: (n, f, y * ow + x))
    sch.transform_block_layout(blk, lambda n, f, y, x, rc, ry, rx: (n, f, y * ow + x, rc, ry, rx))
    sch.transform_block_layout(local, lambda n, f, y, x: (n, f, y * ow + x))
    n, f, p, rc, ry, rx = sch.get_loops(blk)
    fo, fr = sch.split(f, [None, rows])
    po, pv, pl = sch.split(p, [None, vectors, lanes])
    sch.reorder(n, fo, po, rc, ry, rx, fr, pv, pl)
    n_tiles = info.oh * info.ow // (vectors * lanes)
    poo, poi = sch.split(po, [None, common.largest_divisor(n_tiles, 4)])
    common.parallelize(sch, [n, fo, poo])
    depth = common.loop_depth(sch, blk, poi)
    sch.reverse_compute_at(local, poi, preserve_unit_loops=True)
    sch.unroll(fr)
    sch.unroll(pv)
    sch.vectorize(pl)
    init = sch.decompose_reduction(blk, rc)
    iloops = sch.get_loops(init)
    iv = sch.split(iloops[-1], [None, lanes])
    sch.vectorize(iv[-1])
    sch.unroll(iv[0])
    sch.unroll(iloops[-2])
    _tile_writeback(sch, sch.get_loops(local)[depth:], lanes)


def _tile_writeback(sch, wloops, lanes: int) -> None:
    """Write-back of an NCHW register tile: loops (n, f, y, x) or (n, f, p) after the compute_at."""
    inner = wloops[-1]
    ext = common.as_int(sch.get(inner).extent)
    if ext is not None and ext % lanes == 0:
        common.vectorize_inner(sch, inner, lanes, unroll_outer=True)
    else:
        sch.unroll(inner)
    for lp in wloops[:-1]:
        e = common.as_int(sch.get(lp).extent)
        if e is not None and e <= 64:
            sch.unroll(lp)


def conv_start(func, target, depthwise: bool):
    """(cpu, schedule, conv block, its name, conv facts) when `func` is a convolution of the kind asked for
    (a plain conv's copy producers inlined first), else None."""
    start = common.reduction_schedule(func, target)
    if start is None:
        return None
    cpu, sch, blk = start
    name = sch.get(blk).name_hint
    if not depthwise:
        common.inline_copy_producers(sch, blk)
        blk = sch.get_sblock(name)
    info = _analyze_conv(sch, blk, func)
    if info is None or info.depthwise != depthwise:
        return None
    return cpu, sch, blk, name, info


class Conv2DRule(ScheduleRule):
    """NCHW conv2d: vectorized output channels, a register tile of columns, packed weights."""

    def apply(self, func, target, tunable):
        start = conv_start(func, target, depthwise=False)
        if start is None:
            return None
        cpu, sch, blk, name, info = start
        if sch.get(blk).writes[0].source.dtype != "float32":
            return None
        pixel_lanes = cpu.fit(info.oh * info.ow)
        # channel-blocked data (blocked.py) holds whole vectors of channels: pixel tiles would scatter them
        blocked = len(func.params[-1].shape) == 5 or len(sch.get(blk).reads[info.data_idx].source.shape) == 5
        pixel_tile = None if blocked else _pixel_tile(info, pixel_lanes, cpu.max_acc)
        lanes = cpu.fit(info.oc_per_group)
        width = info.oh * info.ow if info.flat_ok else info.ow
        fv, _ = _choose_conv_tile(info.oc_per_group, width, lanes, cpu.max_acc)
        if pixel_tile is None and info.oc_per_group % (fv * lanes):
            return None
        tw = pixel_tile[0] if pixel_tile else fv * lanes
        w_buf = sch.get(blk).reads[info.w_idx].source
        w_param = common.param_index(func, w_buf)
        if w_param is None or w_param not in common.layout_free(func):
            return None  # runtime weights: not worth a repack per call
        # everything after the conv is an elementwise epilogue; before it, at most the padding stage
        after, before = common.inline_epilogue(sch, blk)
        blk = sch.get_sblock(name)
        if len(after) > 1:
            return None
        common.pack_weight(sch, blk, info.w_idx, lambda o, i, h, w: (o // tw, i, h, w, o % tw))
        if pixel_tile:
            _conv_pixel_tile_schedule(sch, blk, info, pixel_lanes, *pixel_tile, after)
        else:
            _conv_tile_schedule(sch, blk, info, lanes, fv, after, cpu.max_acc, cpu.cores)
        for b in before:
            _schedule_block_generic(sch, b, cpu)
        return sch


def _rows_per_copy(info: _ConvInfo, lanes: int, cores: int) -> int:
    """Output rows per task when the channel-blocked copy runs inside the compute's parallel loop (0: it
    is a stage of its own)."""
    return common.rows_per_task(info.oh, info.oc // lanes, cores, int(common.TUNE.get("dw_rows", 14)))


class DepthwiseConvRule(ScheduleRule):
    """NCHW depthwise conv2d through a channel-blocked copy of the (padded) input, made per task."""

    def apply(self, func, target, tunable):
        start = conv_start(func, target, depthwise=True)
        if start is None:
            return None
        cpu, sch, blk, name, info = start
        lanes = cpu.fit(info.oc)
        if info.oc % lanes:
            return None
        block = sch.get(blk)
        if block.writes[0].source.dtype != "float32":
            return None
        data_buf = block.reads[info.data_idx].source
        if common.as_int(data_buf.shape[1]) != info.oc:
            return None  # channel multiplier > 1
        w_param = common.param_index(func, block.reads[info.w_idx].source)
        if w_param is None or w_param not in common.layout_free(func):
            return None
        after, before = common.inline_epilogue(sch, blk)
        blk = sch.get_sblock(name)
        if len(after) > 1:
            return None
        # the stage that produces the data: the padding block, or a fresh copy of the input
        producers = [b for b in sch.get_producers(blk) if sch.get(b).writes[0].source.same_as(data_buf)]
        if producers:
            pad = producers[0]
            if not common.is_spatial(sch, pad) or not common.trivial_binding(sch, pad):
                return None
        else:
            pad = sch.cache_read(blk, info.data_idx, "global")
        sch.transform_layout(pad, ("write", 0), common.channel_blocked(lanes))
        sch.transform_block_layout(pad, common.channel_blocked(lanes))
        common.pack_weight(sch, blk, info.w_idx, lambda o, i, h, w: (o // lanes, i, h, w, o % lanes))
        # the compute: a tile of xt columns x one vector of channels
        local = sch.cache_write(blk, 0, "local")
        if after:
            sch.reverse_compute_inline(after[0])
        sch.transform_layout(blk, ("write", 0), lambda n, f, y, x: (n, y, x, f))
        n, f, y, x, rc, ry, rx = sch.get_loops(blk)
        fo, fl = sch.split(f, [None, lanes])
        xt = common.largest_divisor(info.ow, cpu.max_acc)
        xo, xtl = sch.split(x, [None, xt])
        rows = _rows_per_copy(info, lanes, cpu.cores)
        if rows:
            yo, yi = sch.split(y, [None, rows])
            sch.reorder(n, fo, yo, yi, xo, rc, ry, rx, xtl, fl)
            outer = common.parallelize(sch, [n, fo, yo])
            # the blocked copy of the input rows this chunk of output rows reads, inside the parallel loop
            sch.compute_at(pad, outer, preserve_unit_loops=True)
            ploops = sch.get_loops(pad)[1:]
            sch.vectorize(ploops[-1])
        else:
            sch.reorder(n, fo, y, xo, rc, ry, rx, xtl, fl)
            common.parallelize(sch, [n, fo, y])
            # the blocked copy: parallel over (n, c-block, h), the channels of a pixel in one vector
            ploops = sch.get_loops(pad)
            common.parallelize(sch, ploops[:3])
            sch.vectorize(ploops[-1])
        depth = common.loop_depth(sch, blk, xo)
        sch.reverse_compute_at(local, xo, preserve_unit_loops=True)
        sch.unroll(xtl)
        sch.vectorize(fl)
        if info.kh * info.kw <= 25:
            sch.unroll(ry)
            sch.unroll(rx)
        init = sch.decompose_reduction(blk, rc)
        iloops = sch.get_loops(init)
        sch.vectorize(iloops[-1])
        sch.unroll(iloops[-2])
        wloops = sch.get_loops(local)[depth:]
        if common.TUNE.get("conv_writeback_channels", True):
            _channel_writeback(sch, wloops, lanes)
        else:
            _tile_writeback(sch, wloops, lanes)
        for b in before:
            if not sch.get(b).same_as(sch.get(pad)):
                _schedule_block_generic(sch, b, cpu)
        return sch
