# This file holds a copy of MatmulTensorization.apply from Apache TVM 0.27
# (python/tvm/s_tir/dlight/gpu/matmul.py), licensed to the Apache Software Foundation under the Apache
# License, Version 2.0 (http://www.apache.org/licenses/LICENSE-2.0), with two changes: the tiling is a
# parameter (`WmmaTiles`), and A can be loaded with threads along M. Compare with that file when
# upgrading TVM.
"""Tensor-core (wmma) GEMM schedule with a configurable tiling: 128 x 64 tiles for 64-wide GEMMs, and
a grid of tilings (`wmma_variants`) that tuning batches time on the GPU beside the rule's choice.

dlight's tile is 128 x 128 (4 warps along M and 4 along N, each 2 x 2 fragments of 16 x 16): a GEMM
with N = 64 (ResNet's 64-channel convolutions) is padded to 128 and does twice its work. On an H200
at batch 32 in fp16, each of ResNet-18's layer1 convolutions (N = 64) took 169 us with 128 x 128
tiles and 143 us with 128 x 64 tiles.
"""

# ruff: noqa: E722
from __future__ import annotations

from typing import NamedTuple

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import get_root_block
from tvm.s_tir.dlight.gpu.matmul import (
    auto_inline_consumer_chain,
    auto_inline_producers,
    get_index_map,
    get_reduction_blocks,
)
from tvm.target import Target


class WmmaTiles(NamedTuple):
    """A tensor-core GEMM tiling: a thread block of warps_m x warps_n warps, each computing frags_m x
    frags_n fragments of 16 x 16, stepping K by k_frags x 16. dlight's is the default (128 x 128 x 64,
    16 warps); `a_rows_first` loads A with consecutive threads along M instead of K (coalesced reads
    of an NCHW convolution's input, whose K runs over channels and kernel taps)."""

    warps_m: int = 4
    frags_m: int = 2
    warps_n: int = 4
    frags_n: int = 2
    k_frags: int = 4
    a_rows_first: bool = False

    @property
    def name(self) -> str:
        order = ", A by rows" if self.a_rows_first else ""
        return (f"{16 * self.warps_m * self.frags_m}x{16 * self.warps_n * self.frags_n}x{16 * self.k_frags} "
                f"({self.warps_m * self.warps_n} warps{order})")


# (warps_m, frags_m, warps_n, frags_n): 128 x 64 tiles for N = 64 (the rule's), dlight's 128 x 128,
# and tilings with fewer warps and more fragments each (more reuse of each fragment loaded from
# shared memory). No 256 x 64: its 64 KB fp32 staging goes to dynamic shared memory, where TVM 0.27
# merges it with the fp16 operands and then fails ("tvm_access_ptr element type must match").
VARIANT_TILES = [(4, 2, 4, 1), (2, 4, 2, 2), (4, 2, 2, 2), (2, 2, 2, 2), (4, 2, 1, 4),
                 (4, 2, 4, 2), (2, 4, 2, 4), (2, 4, 4, 2)]


def wmma_variants(func: tirx.PrimFunc, target: Target, n: int, k: int) -> list[tuple[WmmaTiles, s_tir.Schedule]]:
    """The GEMM `func` (N and K extents `n`, `k`) scheduled with each tiling of VARIANT_TILES no wider
    than N needs, with both A load orders, K steps of 64 (and of 32 where K is no multiple of 64:
    less padding), for tuning: which is fastest depends on the GEMM and the GPU."""
    out = []
    for warps_m, frags_m, warps_n, frags_n in VARIANT_TILES:
        if 16 * warps_n * frags_n > max(64, n):
            continue
        for k_frags in (4, 2) if k % 64 else (4,):
            for a_rows_first in (False, True):
                tiles = WmmaTiles(warps_m, frags_m, warps_n, frags_n, k_frags, a_rows_first)
                sch = wmma_matmul(func, target, tiles)
                if sch is not None:
                    out.append((tiles, sch))
    return out


DLIGHT_TILES = WmmaTiles()


def wmma_matmul(func: tirx.PrimFunc, target: Target, tiles: WmmaTiles = DLIGHT_TILES) -> s_tir.Schedule | None:
    """dlight's MatmulTensorization with the tiling as a parameter (`WmmaTiles`); dlight's 128 x 128
    tile pads a 64-wide GEMM to twice its work."""
    from tvm.s_tir.tensor_intrin.cuda import (  # pylint: disable=import-outside-toplevel
        get_wmma_intrin_group,
    )

    if not isinstance(func, tirx.PrimFunc):
        return None
    sch = s_tir.Schedule(func)
    root_block = get_root_block(sch)
    blocks = sch.get_child_blocks(root_block)

    if "dlight.do_not_tensorize" in func.attrs.keys():
        return None

    reduction_blocks = get_reduction_blocks(sch, blocks)
    if reduction_blocks is None:
        return None

    # Start Schedule
    # Step 0. Get schedule config.
    # NOTE: we can analyze the config by the hardware spec in the future

    # tensor core intrinsic size
    micro_size_x = 16
    micro_size_y = 16
    micro_size_k = 16

    warp_size = 32
    vector_size = 4

    i_factors, j_factors, k_factors = (
        [None, 1, tiles.warps_m, tiles.frags_m],
        [1, None, tiles.warps_n, tiles.frags_n],
        [None, tiles.k_frags],
    )

    num_ty = i_factors[2] * j_factors[2]
    x_pad_factor = i_factors[2] * i_factors[3]
    y_pad_factor = j_factors[2] * j_factors[3]
    k_pad_factor = k_factors[1]

    # Step 1. Normalize generic matmul to C[S, I, J] += A[S, I, K] * B[S, J, K]
    # Reindex first and than analyze the index map
    main_block = reduction_blocks[0]
    reindex_a = sch.reindex(main_block, ("read", 0))
    reindex_b = sch.reindex(main_block, ("read", 1))
    reindex_c = sch.reindex(main_block, ("write", 0))

    index_maps = get_index_map(sch.get(main_block))
    assert index_maps is not None
    matmul_index_map, a_index_map, b_index_map, c_index_map = index_maps

    sch.transform_layout(reindex_a, ("write", 0), a_index_map)
    sch.transform_layout(reindex_b, ("write", 0), b_index_map)
    sch.transform_layout(reindex_c, ("read", 0), c_index_map)
    sch.transform_block_layout(main_block, matmul_index_map)

    # Step 2. Padding for dynamic shape kernels
    sch.pad_einsum(
        main_block,
        [
            1,
            micro_size_x * x_pad_factor,
            micro_size_y * y_pad_factor,
            micro_size_k * k_pad_factor,
        ],
    )

    # Step 3. Schedule matmul to use tensor core
    block = main_block

    batch, i, j, k = sch.get_loops(block)

    # inner loops for tensor core computation
    i, i_inner = sch.split(i, factors=[None, micro_size_x])
    j, j_inner = sch.split(j, factors=[None, micro_size_y])
    k, k_inner = sch.split(k, factors=[None, micro_size_k])

    sch.reorder(i, j, k, i_inner, j_inner, k_inner)

    block_inner = block
    block_outer = sch.blockize(i_inner)

    i0, i1, i2, i3 = sch.split(i, factors=i_factors)
    j0, j1, j2, j3 = sch.split(j, factors=j_factors)
    k0, k1 = sch.split(k, k_factors)
    sch.annotate(k0, "software_pipeline_order", [0, 3, 1, 4, 5, 2, 6])
    sch.annotate(k0, "software_pipeline_stage", [0, 0, 0, 0, 0, 1, 1])
    sch.annotate(k1, "software_pipeline_order", [0, 1, 2])
    sch.annotate(k1, "software_pipeline_stage", [0, 0, 1])

    sch.reorder(i0, j0, i1, j1, j2, i2, k0, k1, i3, j3)

    block_idx = sch.fuse(i0, j0)
    block_idy = sch.fuse(i1, j1)
    thread_idy = sch.fuse(j2, i2)
    sch.bind(batch, "blockIdx.z")
    sch.bind(block_idx, "blockIdx.x")
    sch.bind(block_idy, "blockIdx.y")
    sch.bind(thread_idy, "threadIdx.y")

    def fetch_to_shared(block, idx, ndim, rows_first=False):
        block_read = sch.cache_read(block, idx, "shared.dyn")
        sch.compute_at(block_read, k0)
        loops = sch.get_loops(block_read)[-ndim:]
        if rows_first:  # forgeml: consecutive threads along the rows
            sch.reorder(*loops[::-1])
            loops = loops[::-1]
        fused = sch.fuse(*loops)

        _, f_1, f_2, f_3 = sch.split(fused, factors=[None, num_ty, warp_size, vector_size])

        sch.bind(f_2, "threadIdx.x")
        sch.bind(f_1, "threadIdx.y")
        sch.vectorize(f_3)

        sch.storage_align(block_read, 0, axis=-2, factor=16, offset=8)
        sch.annotate(block_read, "tirx.manifest_shared_memory_local_stage", 1)
        sch.annotate(block_read, "double_buffer_scope", 0)
        return block_read

    a_g2s = fetch_to_shared(block_outer, 0, 2, tiles.a_rows_first)
    b_g2s = fetch_to_shared(block_outer, 1, 2)

    auto_inline_producers(sch, a_g2s)
    auto_inline_producers(sch, b_g2s)

    # create read cache to load matrix from shared memory to wmma fragments
    A_mat = sch.cache_read(block_outer, 0, "wmma.matrix_a")
    B_mat = sch.cache_read(block_outer, 1, "wmma.matrix_b")
    sch.compute_at(A_mat, k1)
    sch.compute_at(B_mat, k1)

    # create write cache to store matrix from wmma fragments to shared memory and global memory
    # forgeml: a 128 x 64 fp32 staging tile is small enough for TVM's storage rewrite to place it in
    # the fp16 operand buffers' dynamic shared memory, which its access_ptr lowering then rejects
    # (float16 vs float32); static shared memory (32 KB of the 48 KB) is never shared with them.
    tile_bytes = 4 * 256 * tiles.warps_m * tiles.frags_m * tiles.warps_n * tiles.frags_n
    store_scope = "shared" if tile_bytes <= 48 * 1024 else "shared.dyn"
    accumulator_shared_to_global = sch.cache_write(block_outer, 0, store_scope)
    sch.storage_align(accumulator_shared_to_global, 0, -2, 16, 4)

    store = sch.cache_write(block_outer, 0, "wmma.accumulator")
    sch.reverse_compute_at(store, thread_idy)
    sch.reverse_compute_at(accumulator_shared_to_global, thread_idy)

    # split the store loop to match hardware intrinsic pattern
    i, j = sch.get_loops(store)[-2:]
    i0, i1 = sch.split(i, factors=[None, 16])
    j0, j1 = sch.split(j, factors=[None, 16])
    sch.reorder(i0, j0, i1, j1)

    block_init_c = sch.decompose_reduction(block_outer, k0)
    block_init_c_inner = sch.get_child_blocks(block_init_c)[0]

    # Tensorization by hardware intrinsics
    def intrinsics(out_dtype: str) -> dict:
        return get_wmma_intrin_group(load_scope="shared.dyn", store_scope=store_scope, in_dtype="float16",
                                     out_dtype=out_dtype, trans_b=True)

    def tensorize_load(block, intrin: str) -> None:
        """16 x 16 fragment loads: split the last two loops by 16, unroll the outer ones."""
        i, j = sch.get_loops(block)[-2:]
        i0, i1 = sch.split(i, factors=[None, 16])
        j0, j1 = sch.split(j, factors=[None, 16])
        sch.reorder(i0, j0, i1, j1)
        sch.unroll(i0)
        sch.unroll(j0)
        sch.tensorize(i1, intrin)

    loads = intrinsics("float32")  # the fp16 operand loads are the same in both groups
    try:
        tensorize_load(A_mat, loads["load_a"])
        tensorize_load(B_mat, loads["load_b"])
    except:  # pylint: disable=bare-except
        return None

    def tensorize_init_store_compute(group: dict) -> None:
        sch.tensorize(sch.get_loops(block_init_c_inner)[-2], group["init"])
        sch.tensorize(sch.get_loops(store)[-2], group["store"])
        sch.tensorize(sch.get_loops(block_inner)[-3], group["compute"])

    # the init, store and compute blocks with fp32 accumulators, else fp16 ones
    try:
        tensorize_init_store_compute(loads)
    except:  # pylint: disable=bare-except
        try:
            tensorize_init_store_compute(intrinsics("float16"))
        except:  # pylint: disable=bare-except
            return None
    auto_inline_consumer_chain(sch, accumulator_shared_to_global)

    fused = sch.fuse(*sch.get_loops(accumulator_shared_to_global)[-2:])
    _, f1, f2 = sch.split(fused, factors=[None, warp_size, vector_size])
    sch.bind(f1, "threadIdx.x")
    sch.vectorize(f2)

    return sch
