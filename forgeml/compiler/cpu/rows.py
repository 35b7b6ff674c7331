"""Row-wise kernels (softmax, layer norm, reductions over the last axis): rows in parallel, each row's
stages vectorized."""

from __future__ import annotations

from tvm import s_tir

from forgeml.compiler.cpu.common import (
    PAR_MIN,
    CPUFacts,
    blocks_under,
    child_blocks,
    inline_injective,
    is_spatial,
    iter_kinds,
    loop_depth,
    loop_extents,
    trivial_binding,
    vectorize_inner,
)


def _row_schedule(func, cpu: CPUFacts):
    """Softmax / layer-norm shaped functions: every stage computed per row, under one parallel row loop.

    Matches when the last block is spatial over (rows..., j) and every other block is either spatial
    over the same domain or a reduction over the last axis with the rows as its spatial domain.
    Row reductions are vectorized with rfactor when the row length is a multiple of the vector width.
    """
    sch = s_tir.Schedule(func)
    inline_injective(sch)
    blocks = child_blocks(sch)
    if len(blocks) < 2:
        return None
    last = blocks[-1]
    if not is_spatial(sch, last) or not trivial_binding(sch, last):
        return None
    dom = loop_extents(sch, sch.get_loops(last))
    if len(dom) < 2 or dom[-1] is None:  # symbolic rows (dynamic shapes) are fine, a symbolic row is not
        return None
    rows, row_len = dom[:-1], dom[-1]
    reductions = []
    for b in blocks[:-1]:
        if not trivial_binding(sch, b):
            return None
        kinds = iter_kinds(sch.get(b))
        ext = loop_extents(sch, sch.get_loops(b))
        if all(k == "S" for k in kinds):
            if ext != dom:
                return None
        elif kinds == ["S"] * len(rows) + ["R"] and ext == rows + [row_len]:
            reductions.append(b)
        else:
            return None
    n_rows = 1
    for e in rows:
        n_rows *= PAR_MIN if e is None else e  # a symbolic row count: parallel
    lanes = cpu.fit(row_len)
    rf_names = []
    if row_len % lanes == 0 and row_len >= 2 * lanes:
        # vectorized row reductions: lanes partial results, then a short scalar reduction
        for b in reductions:
            _, ki = sch.split(sch.get_loops(b)[-1], [None, lanes])
            rf = sch.rfactor(ki, 0)
            rf_names.append(sch.get(rf).name_hint)
    red_names = {sch.get(b).name_hint for b in reductions}
    blocks = child_blocks(sch)
    last = blocks[-1]
    row_loops = sch.get_loops(last)[:-1]
    row = sch.fuse(*row_loops) if len(row_loops) > 1 else row_loops[0]
    for b in reversed(blocks[:-1]):
        sch.compute_at(b, row, preserve_unit_loops=True)
    if n_rows > 1 and n_rows * row_len >= PAR_MIN:
        sch.parallel(row)
    for b in blocks_under(sch, row):
        name = sch.get(b).name_hint
        loops = sch.get_loops(b)
        if name in rf_names:
            # loops under the row: (lane, 1.., chunk): put the lane loop innermost
            depth = loop_depth(sch, b, row)
            lane, chunk = loops[depth], loops[-1]
            sch.reorder(chunk, lane)
            sch.vectorize(lane)
            init = sch.decompose_reduction(b, chunk)
            sch.vectorize(sch.get_loops(init)[-1])
        elif name not in red_names:
            vectorize_inner(sch, loops[-1], lanes)
    return sch
