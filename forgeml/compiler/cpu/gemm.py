"""MatmulRule: dense / matmul / batch matmul (`C[..., i, j] += A[..., i, k] * B[..., k, j]`, B optionally
transposed); a register micro tile of rows x vectors, constant weights prepacked to [N/tw, K, tw]."""

from __future__ import annotations

import math
from dataclasses import dataclass

from tvm import s_tir, tirx
from tvm.s_tir.dlight.base import ScheduleRule

from forgeml.compiler.cpu import common


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


def _analyze_matmul(sch: s_tir.Schedule, block_rv) -> _MatmulInfo | None:
    block = sch.get(block_rv)
    kinds = common.iter_kinds(block)
    if kinds.count("R") != 1 or "O" in kinds or kinds[-1] != "R" or len(block.reads) != 2:
        return None
    if len(block.writes) != 1 or not common.trivial_binding(sch, block_rv):
        return None
    ivars = [iv.var for iv in block.iter_vars]
    k_var = ivars[-1]
    out = block.writes[0]
    out_vars = []
    for r in out.region:
        if not isinstance(r.min, tirx.Var) or common.as_int(r.extent) != 1:
            return None
        out_vars.append(r.min)
    if len(out_vars) != len(ivars) - 1:
        return None
    j_var = out_vars[-1]
    a_idx = b_idx = None
    for n, rd in enumerate(block.reads):
        dims = common.region_vars(rd)
        flat = set().union(*dims) if dims else set()
        # each dimension must be a single iter var or constant
        for r in rd.region:
            if not (isinstance(r.min, tirx.Var) or common.as_int(r.min) is not None) or common.as_int(r.extent) != 1:
                return None
        if k_var in flat and j_var not in flat:
            a_idx = n
        elif k_var in flat and j_var in flat:
            b_idx = n
    if a_idx is None or b_idx is None or a_idx == b_idx:
        return None
    a_vars = set().union(*common.region_vars(block.reads[a_idx]))
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
        b_vars = set().union(*common.region_vars(block.reads[b_idx]))
        if out_vars[-2] not in b_vars:
            i_pos = pos[out_vars[-2]]
    batch = [pos[v] for v in out_vars if pos[v] not in (i_pos, pos[j_var])]
    return _MatmulInfo(block_rv, a_idx, b_idx, b_trans, batch, i_pos, pos[j_var], len(ivars) - 1)


_SYMBOLIC_ROWS = 720  # stands for a symbolic row count when choosing a tile: every row count up to 6 divides it


def _choose_gemm_tile(m: int, n: int, lanes: int, max_acc: int = common.MAX_ACC) -> tuple[int, int]:
    """(rows, vectors) of the register tile: divides M and N, <= max_acc accumulators."""
    nv, mr = common.choose_register_tile(_VECTOR_COUNTS, n, m, lanes, max_acc)
    return mr, nv


class MatmulRule(ScheduleRule):
    """Dense / matmul / batch matmul with a register micro tile."""

    def apply(self, func, target, tunable):
        start = common.reduction_schedule(func, target)
        if start is None:
            return None
        cpu, sch, blk = start
        info = _analyze_matmul(sch, blk)
        if info is None:
            return None
        block = sch.get(blk)
        if block.writes[0].source.dtype != "float32":
            return None
        common.inline_copy_producers(sch, blk)
        blk = sch.get_sblock(block.name_hint)
        after, before = common.inline_epilogue(sch, blk)
        blk = sch.get_sblock(block.name_hint)
        if len(after) > 1 or before:
            return None
        exts = common.loop_extents(sch, sch.get_loops(blk))
        m = exts[info.i] if info.i is not None else 1
        n = exts[info.j]
        depth = exts[info.k]
        if n is None and (depth is None or depth % cpu.fit(depth)):
            return None  # symbolic columns and depth (dynamic shapes): the generic rule
        lanes = cpu.fit(n)
        # symbolic extents (dynamic shapes): parallel; symbolic rows tiled as if many (a predicated tail),
        # symbolic columns as dot products along a static depth (attention's Q K^T)
        parallel = None in exts or math.prod(exts) >= common.PAR_MIN_MACS
        m = _SYMBOLIC_ROWS if m is None else m
        if n is None:
            return _dot_schedule(sch, blk, info, func, cpu.fit(depth), _SYMBOLIC_ROWS, parallel, cpu.max_acc)
        if n % lanes and depth is not None and depth % cpu.fit(depth) == 0:
            dot = _dot_schedule(sch, blk, info, func, cpu.fit(depth), n, parallel, cpu.max_acc)
            if dot is not None or info.b_trans:
                return dot
        padded = n % lanes != 0
        if padded:
            # activation B with columns no vector divides (attention scores over 197 tokens): B copied
            # into whole vectors, zero-padded, and C computed over them; the epilogue drops the padding
            if info.b_trans or n < lanes:
                return None
            blk, after = _pad_columns(sch, blk, info, exts, lanes)
            n = common.as_int(sch.get(sch.get_loops(blk)[info.j]).extent)
        mr, nv = _choose_gemm_tile(m, n, lanes, cpu.max_acc)
        # extents few tiles divide (197 rows, a prime; 13 vectors of columns): the best tile as if every
        # extent divided, and a partial tile at the end; its bounds test is on whole unrolled rows and
        # vectors, never inside a vector, and costs little (attention x V, 12 heads of 197x197 by 197x64,
        # one thread on Zen 4: 6x4 tiles and a partial one 0.52 ms, 192 tokens with whole tiles 0.53 ms,
        # the 1x4 tiles that divide 197 1.13 ms)
        nv_any, mr_any = common.choose_register_tile(_VECTOR_COUNTS, _ANY * lanes, _ANY, lanes, cpu.max_acc)
        if info.i is None:
            mr_any = 1
        if (m >= mr_any and n >= nv_any * lanes and mr_any * nv_any >= 2 * mr * nv):
            mr, nv = mr_any, nv_any
        tw = nv * lanes
        b_buf = sch.get(blk).reads[info.b_idx].source
        b_param = common.param_index(func, b_buf)
        b_2d = len(b_buf.shape) == 2
        if b_param is not None and b_param in common.layout_free(func) and b_2d and n % tw == 0:
            if info.b_trans:
                common.pack_weight(sch, blk, info.b_idx, lambda jj, kk: (jj // tw, kk, jj % tw))
            else:
                common.pack_weight(sch, blk, info.b_idx, lambda kk, jj: (jj // tw, kk, jj % tw))
        elif info.b_trans:
            return None  # activation B^T: a gather per vector; leave to the generic rule
        # the epilogue (if any) goes into the write-back of the local accumulator tile
        local = sch.cache_write(blk, 0, "local")
        # padded C: the epilogue covers fewer columns than the write-back, and is computed per tile after
        # it (reverse_compute_inline would take the write-back's padded extent and write out of bounds)
        late = after[0] if after and padded else None
        if after and not padded:
            sch.reverse_compute_inline(after[0])
        loops = sch.get_loops(blk)
        batch = [loops[p] for p in info.batch]
        k_loop = loops[info.k]
        if info.i is not None:
            io, ii = sch.split(loops[info.i], [None, mr])
        else:
            io, ii = None, None
        jo, jv, jl = sch.split(loops[info.j], [None, nv, lanes])
        rows = [io] if io is not None else []
        if late is None:
            outer, inner = batch + [jo] + rows, []
        else:  # the column tiles innermost, so that the epilogue runs over whole rows (no column test)
            outer, inner = batch + rows, [jo]
            if not outer:
                return None
        sch.reorder(*outer, *inner, k_loop, *([ii] if ii is not None else []), jv, jl)
        fused = common.parallelize(sch, outer, parallel)
        sch.reverse_compute_at(local, inner[-1] if inner else fused, preserve_unit_loops=True)
        if late is not None:
            sch.reverse_compute_at(late, fused, preserve_unit_loops=True)
        depth = 1 + len(inner)  # loops above the tile: the fused one, and the column tiles when innermost
        if ii is not None:
            sch.unroll(ii)
        sch.unroll(jv)
        sch.vectorize(jl)
        init = sch.decompose_reduction(blk, k_loop)
        # init block: unroll rows/vectors, vectorize lanes
        iloops = sch.get_loops(init)[depth:]
        sch.vectorize(iloops[-1])
        for lp in iloops[:-1]:
            sch.unroll(lp)
        wloops = sch.get_loops(local)[depth:]
        common.vectorize_inner(sch, wloops[-1], lanes, unroll_outer=True)
        for lp in wloops[:-1]:
            sch.unroll(lp)
        return sch


_VECTOR_COUNTS = (3, 2, 4, 1, 5, 6)  # vectors per register tile, preferred first on a tie
_ANY = 720720  # an extent every count up to 16 divides: the register tile as if the extents had every divisor


def _pad_columns(sch: s_tir.Schedule, blk, info: _MatmulInfo, exts: list, lanes: int):
    """Pad the matmul's column axis to whole vectors (`pad_einsum`): B gets a zero-padded copy (a stage of
    its own, rows in parallel) and C a padded buffer that the epilogue reads. Returns the matmul
    block and the blocks after it."""
    name = sch.get(blk).name_hint
    padding = [1] * len(exts)
    padding[info.j] = lanes
    sch.pad_einsum(blk, padding)
    blk = sch.get_sblock(name)
    (copy,) = sch.get_consumers(blk)
    last = sch.get(common.child_blocks(sch)[-1]).name_hint
    if sch.get(copy).name_hint.endswith("_pad") and sch.get(copy).name_hint != last:
        sch.compute_inline(copy)  # the unpadded C only fed the epilogue: it reads the padded one
    for prod in sch.get_producers(blk):
        if sch.get(prod).name_hint.endswith("_pad"):
            ploops = sch.get_loops(prod)
            common.parallelize(sch, ploops[:-1], True)
    names = [sch.get(b).name_hint for b in common.child_blocks(sch)]
    after = common.child_blocks(sch)[names.index(name) + 1:]
    return blk, after


def _dot_schedule(sch: s_tir.Schedule, blk, info: _MatmulInfo, func, lanes: int, n: int, parallel: bool,
                  max_acc: int = common.MAX_ACC):
    """Matmul whose N is not a multiple of the vector width (a 10-class head): dot products along K.

    B is packed to [N, K] so each output is a vectorized dot product: `lanes` partial sums per output
    (rfactor over K's inner lanes), with the outputs of one row unrolled so their FMA chains overlap,
    then a short sum of the lanes. Avoids the predicated, partly scalar column tile.
    """
    b_buf = sch.get(blk).reads[info.b_idx].source
    if not info.b_trans:
        b_param = common.param_index(func, b_buf)
        if b_param is None or b_param not in common.layout_free(func) or len(b_buf.shape) != 2:
            return None
        common.pack_weight(sch, blk, info.b_idx, lambda kk, jj: (jj, kk))
    loops = sch.get_loops(blk)
    n_out = len(loops) - 1
    _, kl = sch.split(loops[info.k], [None, lanes])
    rf = sch.rfactor(kl, n_out)  # partial sums [..., i, j, lane]
    loops = sch.get_loops(rf)
    batch = [loops[p] for p in info.batch]
    i_loop = [loops[info.i]] if info.i is not None else []
    j_loop, ko, kl = loops[info.j], loops[n_out], loops[n_out + 1]
    if n <= max_acc:
        sch.reorder(*batch, *i_loop, ko, j_loop, kl)
        sch.unroll(j_loop)
    else:
        sch.reorder(*batch, *i_loop, j_loop, ko, kl)
    sch.vectorize(kl)
    outer = batch + i_loop
    if parallel and outer:
        common.parallelize(sch, outer)
    init = sch.decompose_reduction(rf, ko)
    sch.vectorize(sch.get_loops(init)[-1])
    return sch

