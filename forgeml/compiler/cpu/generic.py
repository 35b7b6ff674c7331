"""GenericRule, for every kernel the other rules decline: inline injective stages, parallelize leading
spatial loops, vectorize the innermost one (reductions keep a parallel spatial nest)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from tvm import s_tir, tirx
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.sym import detect_linear_equation  # tvm.arith in older TVMs; 0.27 has no tvm.arith

from forgeml.compiler.cpu.common import (
    PAR_MIN,
    CPUFacts,
    as_int,
    child_blocks,
    cpu_of,
    inline_injective,
    iter_kinds,
    loop_extents,
    parallelize,
    trivial_binding,
)
from forgeml.compiler.cpu.rows import _row_schedule

logger = logging.getLogger(__name__)
SYMBOLIC_EXTENT = 1009  # stands for a symbolic loop extent: large, and prime (no vector width divides it)


def _strided_inner(block, n_s: int) -> bool:
    """Whether some read steps over its innermost dimension by more than one element per output column."""
    var = block.iter_vars[n_s - 1].var
    for rd in block.reads:
        if not rd.region:
            continue
        coef = detect_linear_equation(rd.region[-1].min, [var])
        if len(coef) == 2 and as_int(coef[0]) not in (0, 1):
            return True
    return False


def _schedule_block_generic(sch: s_tir.Schedule, block_rv, cpu: CPUFacts) -> None:
    block = sch.get(block_rv)
    loops = sch.get_loops(block_rv)
    if not loops:
        return
    kinds = iter_kinds(block)
    if not trivial_binding(sch, block_rv):
        # unknown structure: parallelize the outermost loop only
        if as_int(sch.get(loops[0]).extent) not in (None, 1):
            sch.parallel(loops[0])
        return
    # a symbolic extent (dynamic shapes) counts as a large one no vector width divides: such loops are
    # parallelized, never split into vectors (a predicated vector loop)
    exts = [SYMBOLIC_EXTENT if e is None else e for e in loop_extents(sch, loops)]
    lanes = cpu.fit(exts[-1])
    if all(k == "S" for k in kinds):
        total = 1
        for e in exts:
            total *= e
        if exts[-1] % lanes == 0 or len(loops) == 1:
            head, inner = loops[:-1], loops[-1]
        elif exts[-1] >= lanes:
            # rows that no vector width divides (a padded 58-wide row): the rows in parallel, each row one
            # serial loop that LLVM vectorizes; fusing the row into the parallel loop cost a div/mod and a
            # bounds test per element (single thread, Zen 4: a 64x56x56 pad 1.03 -> 0.023 ms, 64x112x112
            # 3.26 -> 0.08 ms; vectorizing the whole row in TIR measured the same)
            if total >= PAR_MIN and len(loops) > 1:
                parallelize(sch, loops[:-1])
            return
        else:
            # short innermost row: vectorize over the flattened nest instead
            head, inner = [], sch.fuse(*loops)
        iext = as_int(sch.get(inner).extent)
        iext = SYMBOLIC_EXTENT if iext is None else iext
        lanes = cpu.fit(iext)
        if iext % lanes == 0 and iext > lanes:
            outer, vec = sch.split(inner, [None, lanes])
            head = head + [outer]
            sch.vectorize(vec)
        elif iext <= 2 * lanes and iext > 1:
            sch.vectorize(inner)
        else:
            head = head + [inner]
        if total >= PAR_MIN and head:
            parallelize(sch, head)
        return
    # reduction: spatial loops must lead
    n_s = 0
    while n_s < len(kinds) and kinds[n_s] == "S":
        n_s += 1
    lanes = cpu.fit(exts[n_s - 1]) if n_s else cpu.lanes
    if any(k != "R" for k in kinds[n_s:]):
        return
    s_loops, r_loops = loops[:n_s], loops[n_s:]
    r_total = 1
    for e in exts[n_s:]:
        r_total *= e
    s_total = 1
    for e in exts[:n_s]:
        s_total *= e
    if n_s > 1 and r_total <= 64 and _strided_inner(block, n_s):
        # strided windows (a 3x3/2 max pool): a vector of outputs would gather its inputs; rows in parallel,
        # each output's window reduced in place instead (single thread, Zen 4: resnet18's pool 1.03 -> 0.33 ms)
        if s_total * r_total >= PAR_MIN:
            parallelize(sch, s_loops[:-1])
        sch.decompose_reduction(block_rv, r_loops[0])
        return
    if n_s and exts[n_s - 1] % lanes == 0 and r_total <= 64 and exts[n_s - 1] >= lanes:
        # small window reductions (pooling): the reduction goes outside a vector of outputs
        outer, vec = sch.split(s_loops[-1], [None, lanes])
        sch.reorder(outer, *r_loops, vec)
        head = list(s_loops[:-1]) + [outer]
        if s_total * r_total >= PAR_MIN:
            parallelize(sch, head)
        sch.vectorize(vec)
        init = sch.decompose_reduction(block_rv, r_loops[0])
        init_loops = sch.get_loops(init)
        sch.vectorize(init_loops[-1])
        return
    if n_s and r_total >= 256 and _contiguous_reduction(block, len(kinds) - 1):
        _schedule_long_reduction(sch, block_rv, s_loops, r_loops, r_total, s_total, cpu)
        return
    if n_s and s_total > 1 and s_total * r_total >= PAR_MIN:
        parallelize(sch, s_loops)


def _contiguous_reduction(block, last: int) -> bool:
    """Whether every read steps by one element along its innermost dimension with the last reduction var."""
    var = block.iter_vars[last].var
    for rd in block.reads:
        if not rd.region:
            return False
        coef = detect_linear_equation(rd.region[-1].min, [var])
        if len(coef) != 2 or as_int(coef[0]) != 1:
            return False
    return bool(block.reads)


def _schedule_long_reduction(sch: s_tir.Schedule, block_rv, s_loops, r_loops, r_total: int, s_total: int,
                             cpu: CPUFacts) -> None:
    """A long reduction over contiguous memory (global average pooling: a 112x112 plane per channel) as
    vector partial sums: the reduction loops fused and split by a vector width, rfactor'ed into a vector
    of accumulators, then summed. Serial scalar sums were a chain of dependent adds (EfficientNet-B0's
    squeeze-excitation means, 32x112x112: 0.33 ms, 1 thread, Zen 4)."""
    width = next((w for w in (cpu.lanes, 8, 4, 2) if r_total % w == 0), 0)
    if width < 2:
        if s_total > 1 and s_total * r_total >= PAR_MIN:
            parallelize(sch, s_loops)
        return
    fused = sch.fuse(*r_loops) if len(r_loops) > 1 else r_loops[0]
    _, inner = sch.split(fused, [None, width])
    rf = sch.rfactor(inner, factor_axis=len(s_loops))
    rf_loops = sch.get_loops(rf)
    sch.vectorize(rf_loops[-1])
    if s_total > 1 and s_total * r_total >= PAR_MIN:
        parallelize(sch, rf_loops[:len(s_loops)])
    sch.decompose_reduction(rf, rf_loops[len(s_loops)])


@dataclass
class GenericRule(ScheduleRule):
    """Inline injective stages; row-fused reductions (softmax, norms); else parallel + vectorize each block."""

    def apply(self, func, target, tunable):
        if not isinstance(func, tirx.PrimFunc):
            return None
        cpu = cpu_of(target)
        try:
            sch = _row_schedule(func, cpu)
            if sch is not None:
                return sch
        except Exception as err:  # noqa: BLE001 - fall back to block-by-block
            logger.debug("generic: row schedule failed: %s", err)
        sch = s_tir.Schedule(func)
        inline_injective(sch)
        for block_rv in child_blocks(sch):
            try:
                _schedule_block_generic(sch, block_rv, cpu)
            except Exception as err:  # noqa: BLE001 - a block we cannot schedule stays serial
                logger.debug("generic: block left as is: %s", err)
        return sch
