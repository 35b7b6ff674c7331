"""Which kernels go on tensor cores (fp16 GEMMs and convolutions as implicit GEMMs, sm_70+), and the rule
that schedules them: dlight's wmma schedule (`wmma.py`), or forgeml's mma.sync one (`mma.py`)."""

from __future__ import annotations

from forgeml.compiler.cuda.splitk import TENSOR_CORE_MIN_EXTENT


def gemm_extents(func) -> tuple[str, tuple[int, ...]] | None:
    """(input dtype, (M, N, K)) of a GEMM-shaped kernel (convolutions as implicit GEMMs) after dlight's
    normalization to C[S, I, J] += A[S, I, K] * B[S, J, K]; None for other kernels or symbolic shapes."""
    from tvm import s_tir, tirx
    from tvm.s_tir.dlight.analysis import get_root_block
    from tvm.s_tir.dlight.gpu.matmul import get_in_out_dtypes, get_index_map, get_reduction_blocks

    try:
        sch = s_tir.Schedule(func)
        blocks = get_reduction_blocks(sch, sch.get_child_blocks(get_root_block(sch)))
        if not blocks or not get_index_map(sch.get(blocks[0])):
            return None
        main = blocks[0]
        for buffer, index in (("read", 0), ("read", 1), ("write", 0)):
            sch.reindex(main, (buffer, index))
        matmul_map = get_index_map(sch.get(main))[0]
        sch.transform_block_layout(main, matmul_map)
        extents = [iv.dom.extent for iv in sch.get(main).iter_vars[1:]]
        if not all(isinstance(e, tirx.IntImm) for e in extents):
            return None
        return get_in_out_dtypes(sch.get(main))[0], tuple(int(e) for e in extents)
    except Exception:  # noqa: BLE001 (not a GEMM this analysis understands: leave it to the other rules)
        return None


def tensor_core_gemm(func, target, min_extent: int = TENSOR_CORE_MIN_EXTENT,
                     min_macs: int = 1 << 24) -> tuple[int, int, int] | None:
    """(M, N, K) of an fp16 GEMM or convolution that goes on tensor cores on `target` (sm_70+): every
    extent at least `min_extent` and `min_macs` multiply-adds or more; None for any other kernel.

    dlight's Matmul rule tensorizes only when every extent exceeds 64, so ResNet-18's 64-channel
    convolutions (N = 64) ran on FP32 FMA in fp16 builds: each layer1 convolution took 396 us at batch
    32 on an H200 (169 us on tensor cores); layer4's, with as many multiply-adds, 235 us on tensor
    cores. The wmma tiles are 128 x 128 x 64 (padded; 128 x 64 when N is 64), so small GEMMs (under
    `min_macs` multiply-adds) stay with Matmul.
    """
    from tvm.s_tir.dlight.gpu.matmul import check_sm_version

    if target.kind.name != "cuda" or check_sm_version(str(target.attrs.get("arch", ""))) < 70:
        return None
    found = gemm_extents(func)
    if found is None or str(found[0]) != "float16":
        return None
    m, n, k = found[1]
    if min(m, n, k) < min_extent or m * n * k < min_macs:
        return None
    return m, n, k


def tensor_core_rule(schedule: str = "wmma", conv_layout: str = "NCHW"):
    """fp16 GEMMs on tensor cores where `tensor_core_gemm` says so: dlight's wmma schedule, or with
    `schedule` "mma" on sm_80+, forgeml's mma.sync one (`mma.rule_tiles`)."""
    from tvm.s_tir.dlight.gpu.base import GPUScheduleRule
    from tvm.s_tir.dlight.gpu.matmul import MatmulTensorization

    from forgeml.compiler.cuda import mma

    class TensorCoreMatmul(GPUScheduleRule):
        def apply(self, func, target, tunable):
            if not self.is_target_available(target):
                return None
            found = tensor_core_gemm(func, target)
            if found is None:
                return None
            if schedule == "mma" and mma.supports(target):
                return mma.mma_matmul(func, target, mma.rule_tiles(func, target, found[1], conv_layout))
            if found[1] <= 64:  # dlight's 128-wide N tile would be half padding
                from forgeml.compiler.cuda.wmma import WmmaTiles, wmma_matmul

                return wmma_matmul(func, target, WmmaTiles(frags_n=1))
            return MatmulTensorization().apply(func, target, tunable)

    return TensorCoreMatmul()
