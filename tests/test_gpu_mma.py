"""The mma.sync tensor-core schedule (`mma.py`): CUDA source only (no nvcc, no GPU); its outputs
are checked on a GPU by the tuning batches that time it."""

from __future__ import annotations

import pytest
import tvm
from test_gpu_passes import CUDA, _conv_module, _nhwc

from forgeml.compiler.cuda import options as cuda_options
from forgeml.compiler.cuda import pipeline as cuda_pipeline
from forgeml.compiler.cuda import tensor_cores
from forgeml.compiler.cuda.mma import MmaTiles, mma_matmul, mma_variants, rule_tiles


def _tensor_core_kernel(layout: str = "NCHW", cin: int = 64, cout: int = 64) -> tvm.tirx.PrimFunc:
    """The fused fp16 3x3 convolution (+ bias + ReLU) of a small CNN as the GPU pipeline hands it to
    the schedule rules."""
    mod = _conv_module(32, cin, cout, 32, 1)  # 256+ tiles: not split along K (gpu_splitk)
    mod = cuda_options.with_precision(_nhwc(mod) if layout == "NHWC" else mod, "fp16")
    target = tvm.target.Target(CUDA)
    with target:
        mod = tvm.transform.Sequential(cuda_pipeline.graph_passes("fp16") + cuda_pipeline.lower_passes())(mod)
    return next(f for _, f in mod.functions_items()
                if isinstance(f, tvm.tirx.PrimFunc) and tensor_cores.tensor_core_gemm(f, target))


def _cuda_source(sch, target: tvm.target.Target) -> str:
    mod = tvm.IRModule({"main": sch.mod["main"].with_attr("global_symbol", "main")})
    with target:
        lib = tvm.compile(mod, target=target)
    return next(m.inspect_source() for m in lib.mod.imports if m.kind == "cuda")


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_mma_schedule_lowers_to_an_async_ldmatrix_mma_pipeline(layout):
    """The convolution as CUTLASS-style GEMM: cp.async copies into swizzled shared memory, ldmatrix,
    mma.sync m16n8k16 with fp32 accumulators, the bias and ReLU fused into the store."""
    target = tvm.target.Target(CUDA)
    sch = mma_matmul(_tensor_core_kernel(layout), target, MmaTiles(frags_n=2, vector=8 if layout == "NHWC" else 4))
    assert sch is not None
    source = _cuda_source(sch, target)
    for instruction in ("cp.async", "ldmatrix", "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"):
        assert instruction in source, instruction


def test_mma_variants_copy_16_bytes_where_k_is_contiguous():
    """NHWC convolutions read K (taps x channels) contiguously: 16-byte copies; NCHW ones gather K
    across planes, which TVM's codegen can assemble only 8 bytes at a time."""
    target = tvm.target.Target(CUDA)
    nhwc = mma_variants(_tensor_core_kernel("NHWC"), target, n=64)
    nchw = mma_variants(_tensor_core_kernel("NCHW"), target, n=64)
    # N = 64: 128 x 64 and 64 x 64 tiles, K steps of 32 and 64, C out along N or M
    assert len(nhwc) == len(nchw) == 8
    assert {tiles.vector for tiles, _ in nhwc} == {8} and {tiles.vector for tiles, _ in nchw} == {4}
    assert "mma 128x64x64 (4 warps, 3 stages, 16-byte copies, C by rows)" in {t.name for t, _ in nhwc}
    wide = mma_variants(_tensor_core_kernel("NHWC", 128, 256), target, n=256)
    assert {t.block[:2] for t, _ in wide} == {(128, 128), (128, 64), (64, 64)}
    assert mma_variants(_tensor_core_kernel("NHWC"), tvm.target.Target({**CUDA, "arch": "sm_75"}), n=64) == []
    # 99 KB of shared memory per block on sm_86: no 128 x 128 tile (128 KB with its fp32 C tile)
    sm86 = tvm.target.Target({**CUDA, "arch": "sm_86"})
    assert {t.block[:2] for t, _ in mma_variants(_tensor_core_kernel("NHWC", 128, 256), sm86, n=256)} == \
        {(128, 64), (64, 64)}


@pytest.mark.parametrize("layout,vector,c_rows_first", [("NCHW", 4, True), ("NHWC", 8, False)])
def test_rule_tiles_copy_out_along_the_output_rows(layout, vector, c_rows_first):
    """`--tensor-core-schedule mma` untuned: an NCHW output is contiguous along M (pixels), so C leaves
    shared memory along M; an NHWC one along N (channels)."""
    target = tvm.target.Target(CUDA)
    tiles = rule_tiles(_tensor_core_kernel(layout), target, 64, layout)
    assert (tiles.block, tiles.vector, tiles.c_rows_first) == ((128, 64, 32), vector, c_rows_first)
