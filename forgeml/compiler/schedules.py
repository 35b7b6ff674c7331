"""Rule-based CPU schedules for TVM Relax PrimFuncs (no tuning).

`apply_cpu_schedules(mod, target)` runs after the `zero` pipeline (legalize + FuseOps + FuseTIR) and
gives every PrimFunc a schedule:

- `Conv2DRule`: NCHW conv2d (groups == 1, or groups with >= one vector of output channels per group),
  output channels vectorized, a register tile of output columns, weights prepacked at compile time.
- `DepthwiseConvRule`: NCHW depthwise conv2d; the padded input is rewritten channel-blocked ([C/8, H, W, 8])
  so every tap is one contiguous vector load, any stride.
- `MatmulRule`: dense / matmul / batch matmul (`C[..., i, j] += A[..., i, k] * B[..., k, j]`, B optionally
  transposed); a register micro tile of rows x vectors, constant weights prepacked to [N/tw, K, tw].
- `GenericRule`: everything else: inline injective stages, parallelize leading spatial loops, vectorize
  the innermost one (reductions keep a parallel spatial nest).

Weight prepacking: the rules cache_read a layout-free (constant) buffer, transform_layout it and tag the
copy with `meta_schedule.layout_rewrite_preproc`; `SplitLayoutRewritePreproc` + `FoldConstant` after this
pass fold the repack into the constants.

A rule that cannot handle a function returns None (errors are caught), so the next rule gets it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import tvm
from tvm import relax, s_tir, tirx
from tvm.s_tir import dlight
from tvm.s_tir.dlight.base import ScheduleRule

logger = logging.getLogger(__name__)

_PREPROC = "meta_schedule.layout_rewrite_preproc"
_MAX_ACC = 12  # accumulator vectors in a register tile (16 ymm registers on x86)
_PAR_MIN = 16384  # elements below which a stage stays serial (a parallel launch costs more)
# multiply-adds below which a matmul stays serial: measured on a 2-core EPYC, a 512x512 GEMV (262k MACs)
# took 23.6 us on one thread and 27.4 us on two (the pool's wake-up costs more than the split saves)
_PAR_MIN_MACS = 1 << 19
_TUNE: dict = {}  # knobs for experiments (benchmarks/ops_cpu.py); empty means the defaults


# --------------------------------------------------------------------------------------------------
# Target facts
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _CPU:
    lanes: int  # f32 lanes of the vector tiles
    cores: int


_AVX2_CPUS = ("haswell", "broadwell", "skylake", "znver", "alderlake", "icelake", "cascadelake",
              "cooperlake", "tigerlake", "sapphirerapids", "rocketlake", "x86-64-v3", "x86-64-v4",
              "cannonlake", "raptorlake", "meteorlake", "emeraldrapids", "graniterapids")


def _cpu_of(target: tvm.target.Target) -> _CPU:
    attrs = target.attrs
    mcpu = str(attrs.get("mcpu", "") or "").lower()
    mattr = [str(a).lower() for a in (attrs.get("mattr", None) or [])]
    triple = str(attrs.get("mtriple", "") or "").lower()
    cores = int(attrs.get("num-cores", 0) or 0) or 1
    lanes = 4  # SSE / NEON: 128-bit
    if any(m in ("+avx2", "+avx512f") for m in mattr) or any(mcpu.startswith(c) for c in _AVX2_CPUS):
        lanes = 8  # AVX2 and AVX-512 alike: 8-lane tiles (16-lane ones measured slower)
    if triple.startswith(("aarch64", "arm64", "riscv")):
        lanes = 4
    return _CPU(lanes=lanes, cores=cores)


# --------------------------------------------------------------------------------------------------
# Small analysis helpers
# --------------------------------------------------------------------------------------------------


def _int(x) -> int | None:
    return int(x) if isinstance(x, tirx.IntImm) else None


def _vars_in(expr) -> set:
    return set(tirx.analysis.undefined_vars(expr))


def _region_vars(region) -> list[set]:
    """Variables used by each dimension of a buffer region (by its min)."""
    return [_vars_in(r.min) for r in region.region]


def _iter_kinds(block: tirx.SBlock) -> list[str]:
    kinds = []
    for iv in block.iter_vars:
        kinds.append({0: "S", 2: "R"}.get(int(iv.iter_type), "O"))
    return kinds


def _extents(sch: s_tir.Schedule, loops) -> list[int | None]:
    return [_int(sch.get(lp).extent) for lp in loops]


def _trivial_binding(sch: s_tir.Schedule, block_rv) -> bool:
    """Each block iter is bound to exactly one loop, in order."""
    block = sch.get(block_rv)
    loops = sch.get_loops(block_rv)
    realize = s_tir.dlight.analysis.common_analysis.get_sblockrealize(sch, block_rv)
    if len(loops) != len(block.iter_vars):
        return False
    for lp, val, iv in zip(loops, realize.iter_values, block.iter_vars):
        loop = sch.get(lp)
        if not (isinstance(val, tirx.Var) and val.same_as(loop.loop_var)):
            return False
        if _int(loop.extent) is None or _int(iv.dom.extent) != _int(loop.extent):
            return False
    return True


def _blocks(sch: s_tir.Schedule) -> list:
    """The blocks directly under the root block, in program order."""
    return list(sch.get_child_blocks(sch.get_sblock("root")))


def _is_spatial(sch: s_tir.Schedule, block_rv) -> bool:
    return all(k == "S" for k in _iter_kinds(sch.get(block_rv)))


def _layout_free(func: tirx.PrimFunc) -> set[int]:
    attr = func.attrs.get("layout_free_buffers", None) if func.attrs is not None else None
    return {int(i) for i in attr} if attr is not None else set()


def _param_index(func: tirx.PrimFunc, buf) -> int | None:
    for i, p in enumerate(func.params):
        if p.same_as(buf):
            return i
    return None


def _largest_divisor(n: int, limit: int) -> int:
    for d in range(min(n, limit), 0, -1):
        if n % d == 0:
            return d
    return 1


# --------------------------------------------------------------------------------------------------
# Loop-level helpers shared by the rules
# --------------------------------------------------------------------------------------------------


def _vectorize_inner(sch: s_tir.Schedule, loop, lanes: int, unroll_outer: bool = False) -> None:
    """Vectorize `loop` by `lanes` (or whole, if short); unroll the outer part when asked."""
    ext = _int(sch.get(loop).extent)
    if ext is None or ext == 1:
        return
    if ext % lanes == 0 and ext > lanes:
        outer, inner = sch.split(loop, [None, lanes])
        sch.vectorize(inner)
        if unroll_outer:
            sch.unroll(outer)
    elif ext <= 2 * lanes:
        sch.vectorize(loop)
    elif unroll_outer:
        sch.unroll(loop)


def _parallel(sch: s_tir.Schedule, loops, parallel: bool = True):
    """Fuse `loops` (all spatial, outermost first) and, when `parallel`, parallelize the fused loop;
    returns it."""
    loops = list(loops)
    if not loops:
        return None
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    if parallel and _int(sch.get(fused).extent) != 1:
        sch.parallel(fused)
    return fused


# --------------------------------------------------------------------------------------------------
# Generic rule
# --------------------------------------------------------------------------------------------------


def _schedule_block_generic(sch: s_tir.Schedule, block_rv, cpu: _CPU) -> None:
    block = sch.get(block_rv)
    loops = sch.get_loops(block_rv)
    if not loops:
        return
    kinds = _iter_kinds(block)
    if not _trivial_binding(sch, block_rv):
        # unknown structure: parallelize the outermost loop only
        if _int(sch.get(loops[0]).extent) not in (None, 1):
            sch.parallel(loops[0])
        return
    exts = _extents(sch, loops)
    if all(k == "S" for k in kinds):
        total = 1
        for e in exts:
            total *= e
        if exts[-1] % cpu.lanes == 0 or exts[-1] >= 4 * cpu.lanes or len(loops) == 1:
            head, inner = loops[:-1], loops[-1]
        else:
            # short innermost row: vectorize over the flattened nest instead
            head, inner = [], sch.fuse(*loops)
        iext = _int(sch.get(inner).extent)
        if iext % cpu.lanes == 0 and iext > cpu.lanes:
            outer, vec = sch.split(inner, [None, cpu.lanes])
            head = head + [outer]
            sch.vectorize(vec)
        elif iext <= 2 * cpu.lanes and iext > 1:
            sch.vectorize(inner)
        else:
            head = head + [inner]
        if total >= _PAR_MIN and head:
            _parallel(sch, head)
        return
    # reduction: spatial loops must lead
    n_s = 0
    while n_s < len(kinds) and kinds[n_s] == "S":
        n_s += 1
    if any(k != "R" for k in kinds[n_s:]):
        return
    s_loops, r_loops = loops[:n_s], loops[n_s:]
    r_total = 1
    for e in exts[n_s:]:
        r_total *= e
    s_total = 1
    for e in exts[:n_s]:
        s_total *= e
    if n_s and exts[n_s - 1] % cpu.lanes == 0 and r_total <= 64 and exts[n_s - 1] >= cpu.lanes:
        # small window reductions (pooling): the reduction goes outside a vector of outputs
        outer, vec = sch.split(s_loops[-1], [None, cpu.lanes])
        sch.reorder(outer, *r_loops, vec)
        head = list(s_loops[:-1]) + [outer]
        if s_total * r_total >= _PAR_MIN:
            _parallel(sch, head)
        sch.vectorize(vec)
        init = sch.decompose_reduction(block_rv, r_loops[0])
        init_loops = sch.get_loops(init)
        sch.vectorize(init_loops[-1])
        return
    if n_s and s_total > 1 and s_total * r_total >= _PAR_MIN:
        _parallel(sch, s_loops)


@dataclass
class GenericRule(ScheduleRule):
    """Inline injective stages; row-fused reductions (softmax, norms); else parallel + vectorize each block."""

    def apply(self, func, target, tunable):
        if not isinstance(func, tirx.PrimFunc):
            return None
        cpu = _cpu_of(target)
        try:
            sch = _row_schedule(func, cpu)
            if sch is not None:
                return sch
        except Exception as err:  # noqa: BLE001 - fall back to block-by-block
            logger.debug("generic: row schedule failed: %s", err)
        sch = s_tir.Schedule(func)
        _inline_injective(sch)
        for block_rv in _blocks(sch):
            try:
                _schedule_block_generic(sch, block_rv, cpu)
            except Exception as err:  # noqa: BLE001 - a block we cannot schedule stays serial
                logger.debug("generic: block left as is: %s", err)
        return sch


def _row_schedule(func, cpu: _CPU):
    """Softmax / layer-norm shaped functions: every stage computed per row, under one parallel row loop.

    Matches when the last block is spatial over (rows..., j) and every other block is either spatial
    over the same domain or a reduction over the last axis with the rows as its spatial domain.
    Row reductions are vectorized with rfactor when the row length is a multiple of the vector width.
    """
    sch = s_tir.Schedule(func)
    _inline_injective(sch)
    blocks = _blocks(sch)
    if len(blocks) < 2:
        return None
    last = blocks[-1]
    if not _is_spatial(sch, last) or not _trivial_binding(sch, last):
        return None
    dom = _extents(sch, sch.get_loops(last))
    if len(dom) < 2 or any(e is None for e in dom):
        return None
    rows, row_len = dom[:-1], dom[-1]
    reductions = []
    for b in blocks[:-1]:
        if not _trivial_binding(sch, b):
            return None
        kinds = _iter_kinds(sch.get(b))
        ext = _extents(sch, sch.get_loops(b))
        if all(k == "S" for k in kinds):
            if ext != dom:
                return None
        elif kinds == ["S"] * len(rows) + ["R"] and ext == rows + [row_len]:
            reductions.append(b)
        else:
            return None
    n_rows = 1
    for e in rows:
        n_rows *= e
    lanes = cpu.lanes
    rf_names = []
    if row_len % lanes == 0 and row_len >= 2 * lanes:
        # vectorized row reductions: lanes partial results, then a short scalar reduction
        for b in reductions:
            _, ki = sch.split(sch.get_loops(b)[-1], [None, lanes])
            rf = sch.rfactor(ki, 0)
            rf_names.append(sch.get(rf).name_hint)
    red_names = {sch.get(b).name_hint for b in reductions}
    blocks = _blocks(sch)
    last = blocks[-1]
    row_loops = sch.get_loops(last)[:-1]
    row = sch.fuse(*row_loops) if len(row_loops) > 1 else row_loops[0]
    for b in reversed(blocks[:-1]):
        sch.compute_at(b, row, preserve_unit_loops=True)
    if n_rows > 1 and n_rows * row_len >= _PAR_MIN:
        sch.parallel(row)
    for b in _blocks_under(sch, row):
        name = sch.get(b).name_hint
        loops = sch.get_loops(b)
        if name in rf_names:
            # loops under the row: (lane, 1.., chunk): put the lane loop innermost
            depth = _loop_depth(sch, b, row)
            lane, chunk = loops[depth], loops[-1]
            sch.reorder(chunk, lane)
            sch.vectorize(lane)
            init = sch.decompose_reduction(b, chunk)
            sch.vectorize(sch.get_loops(init)[-1])
        elif name not in red_names:
            _vectorize_inner(sch, loops[-1], lanes)
    return sch


def _blocks_under(sch: s_tir.Schedule, loop) -> list:
    return list(sch.get_child_blocks(loop))


def _expr_size(stmt) -> int:
    """Rough node count of a block body (how costly it is to recompute)."""
    return len(str(stmt))  // 12


def _inline_injective(sch: s_tir.Schedule, keep=()) -> None:
    """Inline spatial blocks into their consumers (or producers) where legal."""
    changed = True
    while changed:
        changed = False
        for block_rv in _blocks(sch):
            name = sch.get(block_rv).name_hint
            if name in keep or not _is_spatial(sch, block_rv):
                continue
            body = sch.get(block_rv).body
            copy = type(getattr(body, "value", None)).__name__ in ("BufferLoad", "TensorLoad")
            if len(sch.get_consumers(block_rv)) > 1 and not copy and _expr_size(body) > 40:
                continue  # e.g. exp feeding both a sum and a division: computing it twice costs more
            try:
                sch.compute_inline(block_rv)
                changed = True
                break
            except Exception:  # noqa: BLE001
                pass
        if changed:
            continue
        for block_rv in reversed(_blocks(sch)):
            name = sch.get(block_rv).name_hint
            if name in keep or not _is_spatial(sch, block_rv):
                continue
            producers = sch.get_producers(block_rv)
            if len(producers) != 1 or not _is_spatial(sch, producers[0]):
                continue
            if len(sch.get_consumers(producers[0])) != 1:
                # e.g. one output of a Split: TVM would still inline it and drop the buffer that the
                # other outputs read ("used before its definition" at build time)
                continue
            try:
                sch.reverse_compute_inline(block_rv)
                changed = True
                break
            except Exception:  # noqa: BLE001
                pass


# --------------------------------------------------------------------------------------------------
# Matmul rule
# --------------------------------------------------------------------------------------------------


@dataclass
class _MatmulInfo:
    block: object
    a_idx: int
    b_idx: int
    b_trans: bool  # B[..., j, k]
    batch: list[int]  # loop positions
    i: int | None
    j: int
    k: int


def _find_reduction_block(sch: s_tir.Schedule):
    """The single reduction block of a function whose other blocks are spatial (else None)."""
    red = [b for b in _blocks(sch) if not _is_spatial(sch, b)]
    if len(red) != 1:
        return None
    return red[0]


def _analyze_matmul(sch: s_tir.Schedule, block_rv) -> _MatmulInfo | None:
    block = sch.get(block_rv)
    kinds = _iter_kinds(block)
    if kinds.count("R") != 1 or "O" in kinds or kinds[-1] != "R" or len(block.reads) != 2:
        return None
    if len(block.writes) != 1 or not _trivial_binding(sch, block_rv):
        return None
    ivars = [iv.var for iv in block.iter_vars]
    k_var = ivars[-1]
    out = block.writes[0]
    out_vars = []
    for r in out.region:
        if not isinstance(r.min, tirx.Var) or _int(r.extent) != 1:
            return None
        out_vars.append(r.min)
    if len(out_vars) != len(ivars) - 1:
        return None
    j_var = out_vars[-1]
    a_idx = b_idx = None
    for n, rd in enumerate(block.reads):
        dims = _region_vars(rd)
        flat = set().union(*dims) if dims else set()
        # each dimension must be a single iter var or constant
        for r in rd.region:
            if not (isinstance(r.min, tirx.Var) or _int(r.min) is not None) or _int(r.extent) != 1:
                return None
        if k_var in flat and j_var not in flat:
            a_idx = n
        elif k_var in flat and j_var in flat:
            b_idx = n
    if a_idx is None or b_idx is None or a_idx == b_idx:
        return None
    a_vars = set().union(*_region_vars(block.reads[a_idx]))
    b_dims = block.reads[b_idx].region
    b_last = b_dims[-1].min
    if b_last.same_as(j_var):
        b_trans = False
    elif b_last.same_as(k_var) and len(b_dims) >= 2 and b_dims[-2].min.same_as(j_var):
        b_trans = True
    else:
        return None
    pos = {v: n for n, v in enumerate(ivars)}
    i_pos = None
    if len(out_vars) >= 2 and out_vars[-2] in a_vars:
        b_vars = set().union(*_region_vars(block.reads[b_idx]))
        if out_vars[-2] not in b_vars:
            i_pos = pos[out_vars[-2]]
    batch = [pos[v] for v in out_vars if pos[v] not in (i_pos, pos[j_var])]
    return _MatmulInfo(block_rv, a_idx, b_idx, b_trans, batch, i_pos, pos[j_var], len(ivars) - 1)


def _choose_gemm_tile(m: int, n: int, lanes: int) -> tuple[int, int]:
    """(rows, vectors) of the register tile: divides M and N, <= _MAX_ACC accumulators."""
    best, best_score = (1, 1), -1.0
    for nv in (3, 2, 4, 1, 5, 6):
        if n % (nv * lanes):
            continue
        mr = _largest_divisor(m, _MAX_ACC // nv)
        score = mr * nv / (mr + nv) + 0.01 * mr * nv
        if score > best_score:
            best, best_score = (mr, nv), score
    return best


def _pack_weight(sch, block_rv, read_idx: int, index_map) -> None:
    """cache_read + transform_layout a constant read buffer, tagged for compile-time folding."""
    cached = sch.cache_read(block_rv, read_idx, "global")
    sch.transform_layout(block_rv, ("read", read_idx), index_map, pad_value=None)
    sch.annotate(cached, _PREPROC, True)


def _inline_epilogue(sch: s_tir.Schedule, main_rv) -> tuple[list, list]:
    """Inline the spatial stages after the main block into one; returns (blocks after, blocks before)."""
    name = sch.get(main_rv).name_hint
    changed = True
    while changed:
        changed = False
        blocks = _blocks(sch)
        names = [sch.get(b).name_hint for b in blocks]
        after = blocks[names.index(name) + 1:]
        for b in after[:-1]:
            if not _is_spatial(sch, b):
                continue
            try:
                sch.compute_inline(b)
                changed = True
                break
            except Exception:  # noqa: BLE001
                pass
    blocks = _blocks(sch)
    names = [sch.get(b).name_hint for b in blocks]
    pos = names.index(name)
    return blocks[pos + 1:], blocks[:pos]


def _reduction_schedule(func, target):
    """(cpu, schedule, its main reduction block) for a PrimFunc with a reduction, else None."""
    if not isinstance(func, tirx.PrimFunc):
        return None
    sch = s_tir.Schedule(func)
    blk = _find_reduction_block(sch)
    return None if blk is None else (_cpu_of(target), sch, blk)


class MatmulRule(ScheduleRule):
    """Dense / matmul / batch matmul with a register micro tile."""

    def apply(self, func, target, tunable):
        start = _reduction_schedule(func, target)
        if start is None:
            return None
        cpu, sch, blk = start
        info = _analyze_matmul(sch, blk)
        if info is None:
            return None
        block = sch.get(blk)
        if block.writes[0].source.dtype != "float32":
            return None
        _inline_copy_producers(sch, blk)
        blk = sch.get_sblock(block.name_hint)
        after, before = _inline_epilogue(sch, blk)
        blk = sch.get_sblock(block.name_hint)
        if len(after) > 1 or before:
            return None
        exts = _extents(sch, sch.get_loops(blk))
        m = exts[info.i] if info.i is not None else 1
        n = exts[info.j]
        lanes = cpu.lanes
        parallel = math.prod(exts) >= _PAR_MIN_MACS
        if n % lanes and exts[info.k] % lanes == 0:
            return _dot_schedule(sch, blk, info, func, lanes, n, parallel)
        mr, nv = _choose_gemm_tile(m, n, lanes)
        tw = nv * lanes
        b_buf = sch.get(blk).reads[info.b_idx].source
        b_param = _param_index(func, b_buf)
        b_2d = len(b_buf.shape) == 2
        if b_param is not None and b_param in _layout_free(func) and b_2d and n % tw == 0:
            if info.b_trans:
                _pack_weight(sch, blk, info.b_idx, lambda jj, kk: (jj // tw, kk, jj % tw))
            else:
                _pack_weight(sch, blk, info.b_idx, lambda kk, jj: (jj // tw, kk, jj % tw))
        elif info.b_trans:
            return None  # activation B^T: a gather per vector; leave to the generic rule
        # the epilogue (if any) goes into the write-back of the local accumulator tile
        local = sch.cache_write(blk, 0, "local")
        if after:
            sch.reverse_compute_inline(after[0])
        loops = sch.get_loops(blk)
        batch = [loops[p] for p in info.batch]
        k_loop = loops[info.k]
        if info.i is not None:
            io, ii = sch.split(loops[info.i], [None, mr])
        else:
            io, ii = None, None
        jo, jv, jl = sch.split(loops[info.j], [None, nv, lanes])
        order = batch + [jo] + ([io] if io is not None else []) + [k_loop] + \
            ([ii] if ii is not None else []) + [jv, jl]
        sch.reorder(*order)
        outer = batch + [jo] + ([io] if io is not None else [])
        fused = _parallel(sch, outer, parallel)
        sch.reverse_compute_at(local, fused, preserve_unit_loops=True)
        if ii is not None:
            sch.unroll(ii)
        sch.unroll(jv)
        sch.vectorize(jl)
        init = sch.decompose_reduction(blk, k_loop)
        # init block: unroll rows/vectors, vectorize lanes
        iloops = sch.get_loops(init)[1:]
        sch.vectorize(iloops[-1])
        for lp in iloops[:-1]:
            sch.unroll(lp)
        wloops = sch.get_loops(local)[1:]
        _vectorize_inner(sch, wloops[-1], lanes, unroll_outer=True)
        for lp in wloops[:-1]:
            sch.unroll(lp)
        return sch


def _dot_schedule(sch: s_tir.Schedule, blk, info: _MatmulInfo, func, lanes: int, n: int, parallel: bool):
    """Matmul whose N is not a multiple of the vector width (a 10-class head): dot products along K.

    B is packed to [N, K] so each output is a vectorized dot product: `lanes` partial sums per output
    (rfactor over K's inner lanes), with the outputs of one row unrolled so their FMA chains overlap,
    then a short sum of the lanes. Avoids the predicated, partly scalar column tile.
    """
    b_buf = sch.get(blk).reads[info.b_idx].source
    if not info.b_trans:
        b_param = _param_index(func, b_buf)
        if b_param is None or b_param not in _layout_free(func) or len(b_buf.shape) != 2:
            return None
        _pack_weight(sch, blk, info.b_idx, lambda kk, jj: (jj, kk))
    loops = sch.get_loops(blk)
    n_out = len(loops) - 1
    _, kl = sch.split(loops[info.k], [None, lanes])
    rf = sch.rfactor(kl, n_out)  # partial sums [..., i, j, lane]
    loops = sch.get_loops(rf)
    batch = [loops[p] for p in info.batch]
    i_loop = [loops[info.i]] if info.i is not None else []
    j_loop, ko, kl = loops[info.j], loops[n_out], loops[n_out + 1]
    if n <= _MAX_ACC:
        sch.reorder(*batch, *i_loop, ko, j_loop, kl)
        sch.unroll(j_loop)
    else:
        sch.reorder(*batch, *i_loop, j_loop, ko, kl)
    sch.vectorize(kl)
    outer = batch + i_loop
    if parallel and outer:
        _parallel(sch, outer)
    init = sch.decompose_reduction(rf, ko)
    sch.vectorize(sch.get_loops(init)[-1])
    return sch


# --------------------------------------------------------------------------------------------------
# Convolution rules (NCHW)
# --------------------------------------------------------------------------------------------------


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


def _inline_copy_producers(sch: s_tir.Schedule, main_rv) -> None:
    """Inline spatial producers of the main block that are pure copies/reshapes (no padding branch)."""
    for prod in sch.get_producers(main_rv):
        block = sch.get(prod)
        if not _is_spatial(sch, prod):
            continue
        body = block.body
        value = getattr(body, "value", None)
        if type(value).__name__ in ("BufferLoad", "TensorLoad"):
            try:
                sch.compute_inline(prod)
            except Exception:  # noqa: BLE001
                pass


def _analyze_conv(sch: s_tir.Schedule, block_rv, func) -> _ConvInfo | None:
    block = sch.get(block_rv)
    if _iter_kinds(block) != ["S", "S", "S", "S", "R", "R", "R"] or len(block.reads) != 2:
        return None
    if len(block.writes) != 1 or not _trivial_binding(sch, block_rv):
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
    dims = _region_vars(block.reads[data_idx])
    if len(dims) != 4 or dims[0] != {nn} or rc not in dims[1] or dims[2] != {yy, ry} or dims[3] != {xx, rx}:
        return None
    exts = [_int(iv.dom.extent) for iv in block.iter_vars]
    oc, oh, ow, icg, kh, kw = exts[1], exts[2], exts[3], exts[4], exts[5], exts[6]
    grouped = ff in dims[1]
    depthwise = grouped and icg == 1
    data_buf = block.reads[data_idx].source
    oc_per_group = oc
    if grouped and not depthwise:
        groups = _int(data_buf.shape[1]) // icg
        oc_per_group = oc // groups
    flat_ok = (kh == 1 and kw == 1 and [_int(d) for d in data_buf.shape[2:]] == [oh, ow]
               and not grouped)
    return _ConvInfo(data_idx, w_idx, depthwise, grouped, oc, oc_per_group, oh, ow, kh, kw, flat_ok)


def _choose_conv_tile(ocg: int, width: int, lanes: int, max_fv: int = 4) -> tuple[int, int]:
    """(vectors of output channels, output columns) of the register tile."""
    best, best_score = (1, 1), -1.0
    for fv in range(1, max_fv + 1):
        if ocg % (fv * lanes):
            continue
        xt = _largest_divisor(width, _MAX_ACC // fv)
        score = fv * xt / (fv + xt) + 0.01 * fv * xt
        if score > best_score:
            best, best_score = (fv, xt), score
    return best


def _conv_tile_schedule(sch, blk, info: _ConvInfo, lanes: int, fv: int, after) -> None:
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
        if _TUNE.get("conv_channel_last_tile", True):
            sch.transform_layout(blk, ("write", 0), lambda n, f, y, x: (n, y, x, f))
        n, f, y, x, rc, ry, rx = sch.get_loops(blk)
    fo, fvl, fl = sch.split(f, [None, fv, lanes])
    if info.flat_ok:
        xt = _largest_divisor(info.oh * info.ow, _MAX_ACC // fv)
        po, pt = sch.split(p, [None, xt])
        sch.reorder(n, fo, po, rc, ry, rx, pt, fvl, fl)
        # parallel over (n, fo, po-outer); keep a serial chunk of pixel tiles per task
        n_tiles = info.oh * info.ow // xt
        chunk = _largest_divisor(n_tiles, 8)
        poo, poi = sch.split(po, [None, chunk])
        _parallel(sch, [n, fo, poo])
        at = poi
    else:
        xt = _largest_divisor(info.ow, _MAX_ACC // fv)
        xo, xtl = sch.split(x, [None, xt])
        sch.reorder(n, fo, y, xo, rc, ry, rx, xtl, fvl, fl)
        _parallel(sch, [n, fo, y])
        at = xo
        pt = xtl
    depth = _loop_depth(sch, blk, at)
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
    _tile_writeback(sch, sch.get_loops(local)[depth:], lanes)


def _loop_depth(sch, block_rv, loop) -> int:
    """Number of loops of `block_rv` down to and including `loop`."""
    target = sch.get(loop)
    for n, lp in enumerate(sch.get_loops(block_rv)):
        if sch.get(lp).same_as(target):
            return n + 1
    raise ValueError("loop does not enclose the block")


def _tile_writeback(sch, wloops, lanes: int) -> None:
    """Write-back of an NCHW register tile: loops (n, f, y, x) or (n, f, p) after the compute_at."""
    inner = wloops[-1]
    ext = _int(sch.get(inner).extent)
    if ext is not None and ext % lanes == 0:
        _vectorize_inner(sch, inner, lanes, unroll_outer=True)
    else:
        sch.unroll(inner)
    for lp in wloops[:-1]:
        e = _int(sch.get(lp).extent)
        if e is not None and e <= 64:
            sch.unroll(lp)


class Conv2DRule(ScheduleRule):
    """NCHW conv2d: vectorized output channels, a register tile of columns, packed weights."""

    def apply(self, func, target, tunable):
        start = _reduction_schedule(func, target)
        if start is None:
            return None
        cpu, sch, blk = start
        name = sch.get(blk).name_hint
        _inline_copy_producers(sch, blk)
        blk = sch.get_sblock(name)
        info = _analyze_conv(sch, blk, func)
        if info is None or info.depthwise:
            return None
        if sch.get(blk).writes[0].source.dtype != "float32":
            return None
        lanes = cpu.lanes
        width = info.oh * info.ow if info.flat_ok else info.ow
        fv, _ = _choose_conv_tile(info.oc_per_group, width, lanes)
        if info.oc_per_group % (fv * lanes):
            return None
        tw = fv * lanes
        w_buf = sch.get(blk).reads[info.w_idx].source
        w_param = _param_index(func, w_buf)
        if w_param is None or w_param not in _layout_free(func):
            return None  # runtime weights: not worth a repack per call
        # everything after the conv is an elementwise epilogue; before it, at most the padding stage
        after, before = _inline_epilogue(sch, blk)
        blk = sch.get_sblock(name)
        if len(after) > 1:
            return None
        _pack_weight(sch, blk, info.w_idx, lambda o, i, h, w: (o // tw, i, h, w, o % tw))
        _conv_tile_schedule(sch, blk, info, lanes, fv, after)
        for b in before:
            _schedule_block_generic(sch, b, cpu)
        return sch


class DepthwiseConvRule(ScheduleRule):
    """NCHW depthwise conv2d through a channel-blocked copy of the (padded) input."""

    def apply(self, func, target, tunable):
        start = _reduction_schedule(func, target)
        if start is None:
            return None
        cpu, sch, blk = start
        lanes = cpu.lanes
        name = sch.get(blk).name_hint
        info = _analyze_conv(sch, blk, func)
        if info is None or not info.depthwise or info.oc % lanes:
            return None
        block = sch.get(blk)
        if block.writes[0].source.dtype != "float32":
            return None
        data_buf = block.reads[info.data_idx].source
        if _int(data_buf.shape[1]) != info.oc:
            return None  # channel multiplier > 1
        w_param = _param_index(func, block.reads[info.w_idx].source)
        if w_param is None or w_param not in _layout_free(func):
            return None
        after, before = _inline_epilogue(sch, blk)
        blk = sch.get_sblock(name)
        if len(after) > 1:
            return None
        # the stage that produces the data: the padding block, or a fresh copy of the input
        producers = [b for b in sch.get_producers(blk) if sch.get(b).writes[0].source.same_as(data_buf)]
        if producers:
            pad = producers[0]
            if not _is_spatial(sch, pad) or not _trivial_binding(sch, pad):
                return None
        else:
            pad = sch.cache_read(blk, info.data_idx, "global")
        sch.transform_layout(pad, ("write", 0), lambda n, c, h, w: (n, c // lanes, h, w, c % lanes))
        sch.transform_block_layout(pad, lambda n, c, h, w: (n, c // lanes, h, w, c % lanes))
        _pack_weight(sch, blk, info.w_idx, lambda o, i, h, w: (o // lanes, i, h, w, o % lanes))
        # the blocked copy: parallel over (n, c-block, h), the 8 channels of a pixel in one vector
        ploops = sch.get_loops(pad)
        _parallel(sch, ploops[:3])
        sch.vectorize(ploops[-1])
        # the compute: a tile of xt columns x one vector of channels
        local = sch.cache_write(blk, 0, "local")
        if after:
            sch.reverse_compute_inline(after[0])
        sch.transform_layout(blk, ("write", 0), lambda n, f, y, x: (n, y, x, f))
        n, f, y, x, rc, ry, rx = sch.get_loops(blk)
        fo, fl = sch.split(f, [None, lanes])
        xt = _largest_divisor(info.ow, _MAX_ACC)
        xo, xtl = sch.split(x, [None, xt])
        sch.reorder(n, fo, y, xo, rc, ry, rx, xtl, fl)
        _parallel(sch, [n, fo, y])
        depth = _loop_depth(sch, blk, xo)
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
        _tile_writeback(sch, sch.get_loops(local)[depth:], lanes)
        for b in before:
            if not sch.get(b).same_as(sch.get(pad)):
                _schedule_block_generic(sch, b, cpu)
        return sch


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


class _Guarded(ScheduleRule):
    """Run a rule; any exception means 'not applicable'."""

    def __init__(self, rule: ScheduleRule):
        self.rule = rule

    def apply(self, func, target, tunable):
        try:
            return self.rule.apply(func, target, tunable)
        except Exception as err:  # noqa: BLE001
            logger.debug("%s declined: %s", type(self.rule).__name__, err)
            return None


def default_rules() -> list[ScheduleRule]:
    return [Conv2DRule(), DepthwiseConvRule(), MatmulRule(), GenericRule()]


def apply_cpu_schedules(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Give every PrimFunc in `mod` a CPU schedule (never raises on a function it cannot handle)."""
    if target.kind.name != "llvm":
        return mod
    try:
        mod = relax.transform.AttachAttrLayoutFreeBuffers()(mod)
    except Exception as err:  # noqa: BLE001
        logger.debug("AttachAttrLayoutFreeBuffers failed: %s", err)
    rules = [_Guarded(r) for r in default_rules()]
    with target:
        return dlight.ApplyDefaultSchedule(*rules)(mod)
