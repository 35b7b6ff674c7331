"""Tensor-core GEMM schedule on ldmatrix + mma.sync with a cp.async pipeline (sm_80+).

dlight's wmma schedule (`wmma.py`) loads operands synchronously and tops out near 70 TFLOP/s on an
H200 (ResNet-18's layer2/3 convolutions at batch 32 in fp16); cuDNN reaches about twice that on the
same convolutions. This schedule is the structure of CUTLASS's Ampere GEMMs, written with TVM's
public schedule primitives and tensor intrinsics:

- a thread block computes a (16 warps_m frags_m) x (16 warps_n frags_n) tile of C; each warp
  frags_m x frags_n fragments of 16 x 16 with `mma.sync.m16n8k16` (fp16 in, fp32 accumulators);
- A and B tiles of 16 k_frags columns go to dynamic shared memory with `cp.async` copies (16
  bytes where K is contiguous in memory, 8 where it is a gather: `copy_vector`),
  `stages` K steps in flight (TVM's software pipeline), swizzled (`permuted_layout`) so that the
  `ldmatrix` loads into registers are free of bank conflicts;
- C goes through shared memory to global memory with the epilogue (bias, residual, ReLU, cast)
  inlined into that copy, as in the wmma schedule.

It is opt-in (`forgeml compile --tensor-core-schedule mma`, `rule_tiles`): on an H200 its outputs
verified but whole networks ran slower than on wmma (ResNet-18 b32 fp16 2.50 vs 1.57 ms in NHWC),
while some kernels ran faster (layer1, the stem GEMM). So it is mostly a grid of tilings for tuning
batches (`mma_variants`), where each is timed, and its outputs checked against the rule schedule's,
on the GPU before a record can be kept. TVM's default TIR pipeline
lowers it (the software pipeline's async stage becomes `cp.async`); the kernel function must have a
global symbol, as every kernel of a model has (without one, lowering leaves the warp-scope buffers
behind and CUDA codegen fails with "BufferType does not have a corresponding C Type").
"""

from __future__ import annotations

from typing import NamedTuple

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import get_root_block
from tvm.s_tir.dlight.gpu.matmul import (
    auto_inline_consumer_chain,
    auto_inline_producers,
    check_sm_version,
    get_in_out_dtypes,
    get_index_map,
    get_reduction_blocks,
)
from tvm.target import Target

MIN_SM = 80  # cp.async and mma.sync.m16n8k16
WARP_SIZE = 32
VECTOR = 8  # fp16 elements per 16-byte copy


class MmaTiles(NamedTuple):
    """An mma.sync GEMM tiling: warps_m x warps_n warps, each frags_m x frags_n fragments of 16 x 16,
    K steps of 16 k_frags, the copies `stages` K steps ahead of the multiply-adds (stages + 1 shared
    buffers per operand)."""

    warps_m: int = 2
    warps_n: int = 2
    frags_m: int = 4
    frags_n: int = 4
    k_frags: int = 2
    stages: int = 3
    vector: int = VECTOR  # operand elements per copy: 4 where K is not contiguous (NCHW convolutions)
    c_rows_first: bool = False  # C copied out with consecutive threads along M (NCHW outputs)

    @property
    def block(self) -> tuple[int, int, int]:
        return 16 * self.warps_m * self.frags_m, 16 * self.warps_n * self.frags_n, 16 * self.k_frags

    @property
    def name(self) -> str:
        m, n, k = self.block
        order = ", C by rows" if self.c_rows_first else ""
        return (f"mma {m}x{n}x{k} ({self.warps_m * self.warps_n} warps, {self.stages} stages, "
                f"{2 * self.vector}-byte copies{order})")

    def shared_bytes(self) -> int:
        """Dynamic shared memory at most: the operands' pipeline buffers plus the fp32 C tile."""
        m, n, k = self.block
        return 2 * (m + n) * k * (self.stages + 1) + 4 * m * n


# 128 x 128 (CUTLASS's default Ampere tile: 4 warps of 64 x 64), 128 x 64 for 64-wide GEMMs, 64 x 64
# for GEMMs with few tiles; K steps of 32 and 64, three in flight.
VARIANT_TILES = [(2, 2, 4, 4), (2, 2, 4, 2), (2, 2, 2, 2)]
VARIANT_K_FRAGS = [2, 4]
VARIANT_STAGES = 3
SHARED_KB = {80: 163, 86: 99, 87: 163, 89: 99, 90: 227}  # dynamic shared memory a block may use


def supports(target: Target) -> bool:
    """Whether the target has cp.async and mma.sync.m16n8k16 (sm_80+)."""
    return target.kind.name == "cuda" and check_sm_version(str(target.attrs.get("arch", ""))) >= MIN_SM


def mma_variants(func: tirx.PrimFunc, target: Target, n: int) -> list[tuple[MmaTiles, s_tir.Schedule]]:
    """`func` (an fp16 GEMM with N extent `n`) scheduled with each tiling of VARIANT_TILES no wider
    than N needs, K steps of 32 and 64, C copied out along N and along M, for tuning batches (8-12
    schedules); none before sm_80. The operand copies are 16 bytes where the kernel's K is contiguous
    in memory, else 8 (`copy_vector`)."""
    if not supports(target):
        return []
    vector = copy_vector(func, target)
    limit = shared_limit(target)
    out = []
    for warps_m, warps_n, frags_m, frags_n in VARIANT_TILES:
        if 16 * warps_n * frags_n > max(64, n):
            continue
        for k_frags in VARIANT_K_FRAGS:
            for c_rows_first in (False, True):
                tiles = MmaTiles(warps_m, warps_n, frags_m, frags_n, k_frags, VARIANT_STAGES, vector, c_rows_first)
                if tiles.shared_bytes() > limit:
                    continue
                sch = mma_matmul(func, target, tiles)
                if sch is not None:
                    out.append((tiles, sch))
    return out


def shared_limit(target: Target) -> int:
    """Bytes of dynamic shared memory a thread block may use on the target's GPU."""
    return 1024 * SHARED_KB.get(check_sm_version(str(target.attrs["arch"])), 99)


def rule_tiles(func: tirx.PrimFunc, target: Target, n: int, conv_layout: str) -> MmaTiles:
    """The untuned tiling (`forgeml compile --tensor-core-schedule mma`): 128 x 128 (128 x 64 where N
    is at most 64, or where 128 x 128 might not fit the GPU's shared memory), K steps of 32, 3
    stages; 16-byte copies where K is contiguous; C copied out along M where the output is an NCHW
    image (M runs along its rows), along N otherwise."""
    output = func.params[-1]  # a buffer (TVM 0.27 params are buffer-typed Vars); the last is the output
    tiles = MmaTiles(frags_n=2 if n <= 64 else 4, vector=copy_vector(func, target),
                     c_rows_first=conv_layout == "NCHW" and len(output.shape) >= 4)
    return tiles if tiles.shared_bytes() <= shared_limit(target) else tiles._replace(frags_n=2)


def copy_vector(func: tirx.PrimFunc, target: Target) -> int:
    """8 (16-byte copies) where TVM can prove both operands contiguous along K, else 4: TVM 0.27's
    CUDA codegen cannot assemble an 8-wide fp16 vector from a gather ("PrintVecElemStore"), which
    is what an NCHW convolution's operands are (K runs over channels x taps). Found by generating
    the CUDA source of one 16-byte schedule (no nvcc)."""
    sch = mma_matmul(func, target, MmaTiles(frags_n=2))
    if sch is None:
        return 4
    try:
        with target:
            tvm.compile(tvm.IRModule({"main": sch.mod["main"].with_attr("global_symbol", "main")}), target=target)
    except RuntimeError:  # tvm.error.InternalError
        return 4
    return VECTOR


DEFAULT_TILES = MmaTiles()


def mma_matmul(func: tirx.PrimFunc, target: Target, tiles: MmaTiles = DEFAULT_TILES) -> s_tir.Schedule | None:
    """`func`, a GEMM or implicit-GEMM convolution with fp16 operands and fp32 (or fp16) accumulation,
    on mma.sync tensor cores with `tiles`; None where the kernel is not such a GEMM."""
    from forgeml.compiler.tensor_intrinsics import register_tensor_intrinsics

    register_tensor_intrinsics()  # before importing tensor_intrin.cuda: 1-2 s instead of 80
    from tvm.s_tir.tensor_intrin.cuda import get_mma_intrin_group, shared_16x16_to_ldmatrix_32x8_layout

    if not isinstance(func, tirx.PrimFunc) or "dlight.do_not_tensorize" in func.attrs.keys():
        return None
    sch = s_tir.Schedule(func)
    reduction_blocks = get_reduction_blocks(sch, sch.get_child_blocks(get_root_block(sch)))
    if reduction_blocks is None:
        return None
    main = reduction_blocks[0]
    in_dtype, out_dtype = (str(t) for t in get_in_out_dtypes(sch.get(main)))
    if in_dtype != "float16" or out_dtype not in ("float16", "float32"):
        return None
    block_m, block_n, block_k = tiles.block

    # C[S, I, J] += A[S, I, K] * B[S, J, K], each extent padded to the block tile
    reindex_a = sch.reindex(main, ("read", 0))
    reindex_b = sch.reindex(main, ("read", 1))
    reindex_c = sch.reindex(main, ("write", 0))
    index_maps = get_index_map(sch.get(main))
    if index_maps is None:
        return None
    matmul_map, a_map, b_map, c_map = index_maps
    sch.transform_layout(reindex_a, ("write", 0), a_map)
    sch.transform_layout(reindex_b, ("write", 0), b_map)
    sch.transform_layout(reindex_c, ("read", 0), c_map)
    sch.transform_block_layout(main, matmul_map)
    sch.pad_einsum(main, [1, block_m, block_n, block_k])

    # blocks over (batch, M tiles, N tiles); warps over the tile; 16 x 16 x 16 fragments inside
    batch, i, j, k = sch.get_loops(main)
    i, i_frag = sch.split(i, [None, 16])
    j, j_frag = sch.split(j, [None, 16])
    k, k_frag = sch.split(k, [None, 16])
    sch.reorder(i, j, k, i_frag, j_frag, k_frag)
    fragment = main
    tile = sch.blockize(i_frag)
    i_block, i_warp, i_inner = sch.split(i, [None, tiles.warps_m, tiles.frags_m])
    j_block, j_warp, j_inner = sch.split(j, [None, tiles.warps_n, tiles.frags_n])
    k_step, k_inner = sch.split(k, [None, tiles.k_frags])
    sch.reorder(i_block, j_block, i_warp, j_warp, k_step, k_inner, i_inner, j_inner)
    block_idx = sch.fuse(batch, i_block, j_block)
    sch.bind(block_idx, "blockIdx.x")
    sch.bind(i_warp, "threadIdx.z")
    sch.bind(j_warp, "threadIdx.y")

    def bind_copy(block, vector: int, rows_first: bool = False) -> None:
        """The copy's tile spread over all threads of the block, `vector` elements per thread, along
        the tile's rows (M) or its columns."""
        loops = sch.get_loops(block)[-2:]
        if rows_first:
            sch.reorder(loops[1], loops[0])
            loops = loops[::-1]
        fused = sch.fuse(*loops)
        _, tz, ty, tx, vec = sch.split(fused, [None, tiles.warps_m, tiles.warps_n, WARP_SIZE, vector])
        sch.bind(tz, "threadIdx.z")
        sch.bind(ty, "threadIdx.y")
        sch.bind(tx, "threadIdx.x")
        sch.vectorize(vec)

    def to_ldmatrix_layout(b, x, y):
        return (b, x // 16, y // 16, *shared_16x16_to_ldmatrix_32x8_layout(x % 16, y % 16))

    def fetch(operand: int, vector: int):
        """Global -> shared (`vector` elements per copy, swizzled) per K step; shared -> registers
        (ldmatrix) per 16-wide K slice. Returns the register block."""
        shared = sch.cache_read(tile, operand, "shared.dyn")
        sch.compute_at(shared, k_step)
        auto_inline_producers(sch, shared)  # a convolution's im2col gather reads straight from its input
        bind_copy(shared, vector)
        sch.annotate(shared, "permuted_layout", 1)
        regs = sch.cache_read(tile, operand, "warp")
        sch.compute_at(regs, k_inner)
        rows, cols = sch.get_loops(regs)[-2:]
        rows_outer, rows_inner = sch.split(rows, [None, 16])
        cols_outer, cols_inner = sch.split(cols, [None, 16])
        sch.reorder(rows_outer, cols_outer, rows_inner, cols_inner)
        sch.transform_layout(regs, ("write", 0), to_ldmatrix_layout)
        sch.annotate(sch.blockize(sch.get_loops(regs)[-2]), "permuted_layout", 1)
        return regs

    a_regs = fetch(0, tiles.vector)
    b_regs = fetch(1, tiles.vector)

    # C: registers -> shared (fp32) -> global, with the epilogue inlined into the last copy
    c_shared = sch.cache_write(tile, 0, "shared.dyn")
    sch.reverse_compute_at(c_shared, block_idx)
    auto_inline_consumer_chain(sch, c_shared)
    bind_copy(c_shared, 4, tiles.c_rows_first)
    c_regs = sch.cache_write(tile, 0, "warp")
    rows, cols = sch.get_loops(c_regs)[-2:]
    rows_warp, rows_frag, rows_inner = sch.split(rows, [tiles.warps_m, None, 16])
    cols_warp, cols_frag, cols_inner = sch.split(cols, [tiles.warps_n, None, 16])
    sch.reorder(rows_warp, cols_warp, rows_frag, cols_frag, rows_inner, cols_inner)
    sch.bind(rows_warp, "threadIdx.z")
    sch.bind(cols_warp, "threadIdx.y")
    sch.transform_layout(c_regs, ("read", 0), to_ldmatrix_layout)

    init = sch.decompose_reduction(tile, k_step)
    group = get_mma_intrin_group(load_scope="shared.dyn", store_scope="shared.dyn", in_dtype="float16",
                                 out_dtype=out_dtype, trans_a=False, trans_b=True, not_use_mma_store_intrinic=True)
    try:
        sch.tensorize(sch.get_loops(sch.get_child_blocks(init)[0])[-2], group["init"])
        sch.tensorize(sch.get_loops(a_regs)[-2], group["load_a"])
        sch.tensorize(sch.get_loops(b_regs)[-2], group["load_b"])
        sch.tensorize(sch.get_loops(fragment)[-3], group["compute"])
        sch.tensorize(sch.get_loops(c_regs)[-2], group["store"])
    except RuntimeError:  # ScheduleError: a GEMM whose normalized form the intrinsics do not match
        return None
    # the shared-memory copies of step k run `stages` steps ahead of the multiply-adds, asynchronously
    sch.annotate(k_step, "software_pipeline_stage", [0, 0, tiles.stages])
    sch.annotate(k_step, "software_pipeline_order", [0, 1, 2])
    sch.annotate(k_step, "software_pipeline_async_stages", [0])
    return sch
