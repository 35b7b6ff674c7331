# This file holds a copy of GeneralReduction.apply from Apache TVM 0.27
# (python/tvm/s_tir/dlight/gpu/general_reduction.py), licensed to the Apache Software Foundation under
# the Apache License, Version 2.0 (http://www.apache.org/licenses/LICENSE-2.0), with one change: the
# threads per row (`len_tx`) follow the row length. Compare with that file when upgrading TVM.
"""Row reductions (softmax, layer norm) with one warp per short row.

dlight's GeneralReduction gives every row one block of 256 threads on CUDA. BERT's rows are 128
long (softmax over 128 keys, layer norm over 128 features), so half the threads idle and each of the
row's reductions (max, sum; mean, variance) goes through shared memory and barriers. On an H200 at
batch 32, BERT-tiny's two softmax kernels took 22.8 us each, PyTorch's 5. Rows of at most
`MAX_WARP_ROW` elements get 32 threads: each thread walks row / 32 elements and the reductions are
warp shuffles.
"""

# ruff: noqa: E501
from __future__ import annotations

import tvm_ffi
from tvm import s_tir, sym, tirx
from tvm.s_tir.dlight.analysis import get_root_block, normalize_prim_func
from tvm.s_tir.dlight.base import try_inline_contiguous_spatial
from tvm.s_tir.dlight.gpu.base import GPUScheduleRule
from tvm.target import Target

MAX_WARP_ROW = 512


def row_length(block_info) -> int:
    """Elements reduced per row by a normalized block (its trailing reduction iterators), 0 if symbolic."""
    length = 1
    for it in reversed(block_info.iters):
        if it.kind != "R":
            break
        if not isinstance(it.dom, int):  # IterInfo.dom is an int when static
            return 0
        length *= it.dom
    return length


class WarpRowReduction(GPUScheduleRule):
    """dlight's GeneralReduction (softmax, layer norm, RMS norm) with a warp per row of at most
    MAX_WARP_ROW elements."""

    def apply(  # pylint: disable=too-many-locals
        self,
        func: tirx.PrimFunc,
        target: Target,
        _: bool,
    ) -> None | s_tir.Schedule | list[s_tir.Schedule]:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None

        if target.kind.name != "cuda":
            return None
        unroll_depth = 256

        sch = s_tir.Schedule(func)
        block_infos = normalize_prim_func(sch)
        block_infos = try_inline_contiguous_spatial(sch, block_infos)
        if block_infos is None or len(block_infos) == 0:
            return None
        # forgeml: one warp per row for short rows (a warp-shuffle reduction, no shared memory or
        # barriers), dlight's 256 threads otherwise
        len_tx = 32 if 0 < row_length(block_infos[0]) <= MAX_WARP_ROW else 256

        dom_kind = block_infos[0].dom_kind()
        num_leading_s = len(dom_kind) - len(dom_kind.lstrip("S"))
        num_trailing_r = len(dom_kind) - len(dom_kind.rstrip("R"))

        # Align the number of block iters of the last block.
        num_last_block_iter = len(block_infos[-1].dom_kind())
        if num_last_block_iter < len(dom_kind):
            # If the last block is a scalar value, there is nothing left to
            # tile/parallelise, and  `iters` is an empty tuple.
            # Add a unit thread loop so the final write happens inside a valid
            # GPU thread environment.
            if num_last_block_iter == 0:
                # Allocation planning can move a reduction buffer inside its
                # producer kernel when all surrounding loops are trivial. Give
                # buffers private to that kernel an explicit local scope, while
                # preserving global scope for buffers accessed by another block.
                blocks = [sch.get(info.block_rv) for info in block_infos]
                alloc_buffers = list(sch.get(get_root_block(sch)).alloc_buffers)
                analyzer = sym.Analyzer()
                for block_index, (info, block) in enumerate(zip(block_infos[:-1], blocks[:-1])):
                    loops = sch.get_loops(info.block_rv)
                    if not all(analyzer.can_prove_equal(sch.get(loop).extent, 1) for loop in loops):
                        continue

                    other_block_buffers = [
                        region.source
                        for other_index, other_block in enumerate(blocks)
                        if other_index != block_index
                        for region in (*other_block.reads, *other_block.writes)
                    ]
                    for buffer_index, write in enumerate(block.writes):
                        buffer = write.source
                        is_allocated = any(buffer.same_as(other) for other in alloc_buffers)
                        is_cross_block = any(buffer.same_as(other) for other in other_block_buffers)
                        if buffer.scope() == "global" and is_allocated and not is_cross_block:
                            sch.set_scope(block_infos[block_index].block_rv, buffer_index, "local")

                # Put every block (both the running reductions and the final
                # scalar write) inside a trivial GPU thread. The very first block
                # gets a `blockIdx.x` wrapper so that kernels still have a unique
                # block scope.
                for i, info in enumerate(block_infos):
                    loop_rv = sch.add_unit_loop(info.block_rv)
                    if i == 0:
                        sch.bind(loop_rv, "blockIdx.x")
                    else:
                        sch.bind(loop_rv, "threadIdx.x")

                return sch

            def f_layout_mapping(*iters):
                analyzer = sym.Analyzer()
                # Try to match the iters of last block to the iters of the first block.
                # For matched positions, use the iter from the input `iters`.
                # For unmatched positions, use a new iter which is constant 0.
                num_matched = 0
                target_layout_iters = []
                for block_iter in block_infos[0].iters:
                    if num_matched < len(iters) and analyzer.can_prove_equal(
                        block_iter.dom, block_infos[-1].iters[num_matched].dom
                    ):
                        target_layout_iters.append(iters[num_matched])
                        num_matched += 1
                    else:
                        target_layout_iters.append(tirx.const(0, iters[0].ty))

                # If all the iters of the last block can match, return the new layout.
                if num_matched == len(iters):
                    return target_layout_iters
                # Otherwise, fallback to appending zeros in the beginning.
                return [tirx.const(0, iters[0].ty)] * (len(dom_kind) - num_last_block_iter) + list(
                    iters
                )

            index_map = tirx.IndexMap.from_func(f_layout_mapping, ndim=num_last_block_iter)
            sch.transform_block_layout(block_infos[-1].block_rv, index_map)

        try:
            # TODO: fix num_leading_s = 0 case
            assert num_trailing_r > 0
            for block in block_infos[1:-1]:
                assert block.dom_kind() == dom_kind
            assert block_infos[-1].is_injective()
            assert len(block_infos[-1].dom_kind()) <= len(dom_kind)
        except AssertionError:
            return None

        if "R" not in block_infos[-1].dom_kind():
            # The final block is a spatial block.
            # It is possible that the loop order of the last block is not the same as
            # previous blocks.
            # Thus we reorder spatial loops to align with reduction loops for followup schedule.
            # We first collect all the buffers written by reduction blocks,
            # then in the final block, any index of those buffers are spatial.
            reduced_buffers = []
            for block_info in block_infos[:-1]:
                for buffer_write in sch.get(block_info.block_rv).writes:
                    reduced_buffers.append(buffer_write.source)

            spatial_block = sch.get(block_infos[-1].block_rv)
            spatial_loops = set()
            block_var_to_loop_var = {}
            loops = sch.get_loops(block_infos[-1].block_rv)
            for block_iter, loop_rv in zip(spatial_block.iter_vars, loops):
                block_var_to_loop_var[block_iter.var] = sch.get(loop_rv).loop_var

            def _visit_expr(e: tirx.Var):
                if e in block_var_to_loop_var:
                    spatial_loops.add(block_var_to_loop_var[e])

            for buffer_read in spatial_block.reads:
                buffer = buffer_read.source
                if buffer in reduced_buffers:
                    for read_range in buffer_read.region:
                        tvm_ffi.structural_walk(
                            read_range.min, (tirx.Var, _visit_expr), order="post"
                        )
                        tvm_ffi.structural_walk(
                            read_range.extent, (tirx.Var, _visit_expr), order="post"
                        )

            s_loops = []
            other_loops = []
            for loop_rv in loops:
                loop = sch.get(loop_rv)
                if loop.loop_var in spatial_loops or loop.extent == 1:
                    s_loops.append(loop_rv)
                else:
                    other_loops.append(loop_rv)
            sch.reorder(*s_loops, *other_loops)

        loops = sch.get_loops(block_infos[-1].block_rv)
        bx = sch.fuse(*loops[:num_leading_s])
        r_loop, tx = sch.split(loops[-1], [None, len_tx])
        sch.reorder(tx, r_loop)
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
        sch.annotate(r_loop, ann_key="pragma_auto_unroll_max_step", ann_val=unroll_depth)
        sch.annotate(r_loop, ann_key="pragma_unroll_explicit", ann_val=1)

        for block in reversed(block_infos[:-1]):
            block = block.block_rv
            for i, _ in enumerate(sch.get(block).writes):
                sch.set_scope(block, buffer_index=i, storage_scope="shared")
            sch.compute_at(block, bx, preserve_unit_loops=True)
            r_loop = sch.fuse(*sch.get_loops(block)[-num_trailing_r:])
            r_loop, tx = sch.split(r_loop, [None, len_tx])
            sch.reorder(tx, r_loop)
            sch.bind(tx, "threadIdx.x")
            sch.annotate(r_loop, ann_key="pragma_auto_unroll_max_step", ann_val=unroll_depth)
            sch.annotate(r_loop, ann_key="pragma_unroll_explicit", ann_val=1)

        # TODO: It's just a workaround to avoid unroll spatial loops, because of the bug of
        # the pass lower-thread-allreduce. We should fix it in the future.
        # sch.annotate(bx, ann_key="pragma_auto_unroll_max_step", ann_val=unroll_depth)
        # sch.annotate(bx, ann_key="pragma_unroll_explicit", ann_val=1)
        return sch
