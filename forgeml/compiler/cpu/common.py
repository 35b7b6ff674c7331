"""What every CPU rule shares: the target's vector width and cores, TIR block and loop helpers,
weight prepacking, epilogue inlining."""

from __future__ import annotations

from dataclasses import dataclass

import tvm
import tvm_ffi
from tvm import s_tir, tirx

PREPROC = "meta_schedule.layout_rewrite_preproc"


MAX_ACC = 12  # accumulator vectors in a register tile (16 ymm registers on x86)


PAR_MIN = 16384  # elements below which a stage stays serial (a parallel launch costs more)


# multiply-adds below which a matmul stays serial: measured on a 2-core EPYC, a 512x512 GEMV (262k MACs)
# took 23.6 us on one thread and 27.4 us on two (the pool's wake-up costs more than the split saves)
PAR_MIN_MACS = 1 << 19


TUNE: dict = {}  # knobs for experiments (benchmarks/ops_cpu.py); empty means the defaults


@dataclass(frozen=True)
class CPUFacts:
    lanes: int  # f32 lanes of the widest vector tiles
    cores: int
    max_acc: int = MAX_ACC  # accumulator vectors a register tile may hold
    min_lanes: int = 0  # narrower vectors a rule may fall back to when `lanes` does not divide (0: none)

    def fit(self, n: int | None) -> int:
        """The widest vector (f32 lanes, down to `min_lanes`) that divides an extent of n; `lanes` when none
        does (the rules then decline or vectorize partly, as with one width)."""
        if n is None:
            return self.lanes
        lanes = self.lanes
        while n % lanes and self.min_lanes and lanes // 2 >= self.min_lanes:
            lanes //= 2
        return lanes if n % lanes == 0 else self.lanes


AVX2_CPUS = ("haswell", "broadwell", "skylake", "znver", "alderlake", "icelake", "cascadelake",
              "cooperlake", "tigerlake", "sapphirerapids", "rocketlake", "x86-64-v3", "x86-64-v4",
              "cannonlake", "raptorlake", "meteorlake", "emeraldrapids", "graniterapids")


# LLVM cpus with AVX-512F (and VL): 32 vector registers, 512-bit vectors
AVX512_CPUS = ("skylake-avx512", "cascadelake", "cooperlake", "cannonlake", "icelake", "tigerlake", "rocketlake",
               "sapphirerapids", "emeraldrapids", "graniterapids", "diamondrapids", "znver4", "znver5", "x86-64-v4",
               "knl", "knm")

# accumulator vectors of a register tile with 32 vector registers (AVX-512): the rest hold the tile's
# weight vectors and a broadcast input
MAX_ACC_AVX512 = 24


def has_avx512(target: tvm.target.Target) -> bool:
    attrs = target.attrs
    mcpu = str(attrs.get("mcpu", "") or "").lower()
    mattr = [str(a).lower() for a in (attrs.get("mattr", None) or [])]
    triple = str(attrs.get("mtriple", "") or "").lower()
    if triple and not triple.startswith(("x86_64", "i686", "i386")):
        return False
    if "-avx512f" in mattr or "-evex512" in mattr:
        return False
    return "+avx512f" in mattr or any(mcpu.startswith(c) for c in AVX512_CPUS)


def cpu_of(target: tvm.target.Target) -> CPUFacts:
    attrs = target.attrs
    mcpu = str(attrs.get("mcpu", "") or "").lower()
    mattr = [str(a).lower() for a in (attrs.get("mattr", None) or [])]
    triple = str(attrs.get("mtriple", "") or "").lower()
    cores = int(attrs.get("num-cores", 0) or 0) or 1
    lanes, max_acc, min_lanes = 4, MAX_ACC, 0  # SSE / NEON: 128-bit
    if any(m in ("+avx2", "+avx512f") for m in mattr) or any(mcpu.startswith(c) for c in AVX2_CPUS):
        lanes = 8  # AVX2: 8 lanes, 16 ymm registers
    if has_avx512(target):
        # AVX-512: 16-lane tiles where the channels divide, 8-lane ones (VL) where only 8 divide; both
        # with the 32-register file's larger tiles
        lanes, min_lanes, max_acc = 16, 8, MAX_ACC_AVX512
    if triple.startswith(("aarch64", "arm64", "riscv")):
        lanes, max_acc, min_lanes = 4, MAX_ACC, 0
    lanes = int(TUNE.get("lanes", lanes))
    max_acc = int(TUNE.get("max_acc", max_acc))
    min_lanes = int(TUNE.get("min_lanes", min_lanes))
    return CPUFacts(lanes=lanes, cores=cores, max_acc=max_acc, min_lanes=min_lanes)


def as_int(x) -> int | None:
    return int(x) if isinstance(x, tirx.IntImm) else None


def vars_in(expr) -> set:
    return set(tirx.analysis.undefined_vars(expr))


def region_vars(region) -> list[set]:
    """Variables used by each dimension of a buffer region (by its min)."""
    return [vars_in(r.min) for r in region.region]


def channel_blocked(lanes: int):
    """Index map NCHW -> channel-blocked [N, C/L, H, W, L] (the depthwise rule's copy, blocked.py's tensors)."""
    return lambda n, c, h, w: (n, c // lanes, h, w, c % lanes)


def channel_dims(region, channel) -> list[set]:
    """`region_vars` of a read of NCHW data, with a read of channel-blocked data ([N, C/L, H, W, L], channel
    c at (c // L, c % L); the block index a constant 0 where C == L) folded back to its four NCHW dims."""
    dims = region_vars(region)
    if len(dims) == 5 and dims[4] == {channel} and dims[1] <= {channel}:
        return [dims[0], {channel}, dims[2], dims[3]]
    return dims


def iter_kinds(block: tirx.SBlock) -> list[str]:
    kinds = []
    for iv in block.iter_vars:
        kinds.append({0: "S", 2: "R"}.get(int(iv.iter_type), "O"))
    return kinds


def loop_extents(sch: s_tir.Schedule, loops) -> list[int | None]:
    return [as_int(sch.get(lp).extent) for lp in loops]


def trivial_binding(sch: s_tir.Schedule, block_rv) -> bool:
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
        if as_int(loop.extent) is None:  # symbolic (dynamic shapes): the same expression on both sides
            if not tvm_ffi.structural_equal(loop.extent, iv.dom.extent):
                return False
        elif as_int(iv.dom.extent) != as_int(loop.extent):
            return False
    return True


def child_blocks(sch: s_tir.Schedule) -> list:
    """The blocks directly under the root block, in program order."""
    return list(sch.get_child_blocks(sch.get_sblock("root")))


def is_spatial(sch: s_tir.Schedule, block_rv) -> bool:
    return all(k == "S" for k in iter_kinds(sch.get(block_rv)))


def layout_free(func: tirx.PrimFunc) -> set[int]:
    attr = func.attrs.get("layout_free_buffers", None) if func.attrs is not None else None
    return {int(i) for i in attr} if attr is not None else set()


def param_index(func: tirx.PrimFunc, buf) -> int | None:
    for i, p in enumerate(func.params):
        if p.same_as(buf):
            return i
    return None


def largest_divisor(n: int, limit: int) -> int:
    for d in range(min(n, limit), 0, -1):
        if n % d == 0:
            return d
    return 1


def balance(tasks: int, cores: int) -> float:
    """Share of the cores' time that `tasks` equal parallel tasks keep busy (1.0: every core the same)."""
    return tasks / (cores * -(-tasks // cores))


def balanced_chunk(items: int, outer: int, cores: int, limit: int) -> int:
    """Items per task (a divisor of `items` up to `limit`) when outer x items/chunk tasks run on `cores`:
    the best-balanced choice, the largest chunk among equals. 7 tiles in one chunk on 5 channel blocks are
    5 tasks, 3 on one core and 2 on the other; in chunks of 1 they are 35."""
    chunks = [d for d in range(min(items, limit), 0, -1) if items % d == 0]
    return max(chunks, key=lambda d: (round(balance(outer * (items // d), cores), 2), d))


def rows_per_task(height: int, blocks: int, cores: int, limit: int) -> int:
    """Rows of a plane per parallel task, when `blocks` channel blocks x height/rows tasks run in parallel:
    the largest divisor of `height` up to `limit` that still leaves >= 4 tasks per core (0: none does)."""
    for rows in range(min(limit, height), 0, -1):
        if height % rows == 0 and blocks * (height // rows) >= 4 * cores:
            return rows
    return 0


def vectorize_inner(sch: s_tir.Schedule, loop, lanes: int, unroll_outer: bool = False) -> None:
    """Vectorize `loop` by `lanes` (or whole, if short); unroll the outer part when asked."""
    ext = as_int(sch.get(loop).extent)
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


def parallelize(sch: s_tir.Schedule, loops, parallel: bool = True):
    """Fuse `loops` (all spatial, outermost first) and, when `parallel`, parallelize the fused loop;
    returns it."""
    loops = list(loops)
    if not loops:
        return None
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    if parallel and as_int(sch.get(fused).extent) != 1:
        sch.parallel(fused)
    return fused


def blocks_under(sch: s_tir.Schedule, loop) -> list:
    return list(sch.get_child_blocks(loop))


def expr_size(stmt) -> int:
    """Rough node count of a block body (how costly it is to recompute)."""
    return len(str(stmt))  // 12


def inline_injective(sch: s_tir.Schedule, keep=()) -> None:
    """Inline spatial blocks into their consumers (or producers) where legal."""
    changed = True
    while changed:
        changed = False
        for block_rv in child_blocks(sch):
            name = sch.get(block_rv).name_hint
            if name in keep or not is_spatial(sch, block_rv):
                continue
            body = sch.get(block_rv).body
            copy = type(getattr(body, "value", None)).__name__ in ("BufferLoad", "TensorLoad")
            if len(sch.get_consumers(block_rv)) > 1 and not copy and expr_size(body) > 40:
                continue  # e.g. exp feeding both a sum and a division: computing it twice costs more
            if not copy and expr_size(body) > 40 and _broadcast_into(sch, block_rv):
                # a costly value per channel read by every pixel (squeeze-excitation's sigmoid gate): once
                # per channel, not once per pixel (EfficientNet-B0, 1152x7x7: 0.37 -> 0.03 ms, 1 thread)
                continue
            try:
                sch.compute_inline(block_rv)
                changed = True
                break
            except Exception:  # noqa: BLE001
                pass
        if changed:
            continue
        for block_rv in reversed(child_blocks(sch)):
            name = sch.get(block_rv).name_hint
            if name in keep or not is_spatial(sch, block_rv):
                continue
            producers = sch.get_producers(block_rv)
            if len(producers) != 1 or not is_spatial(sch, producers[0]):
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


def _elements(buf) -> int | None:
    total = 1
    for d in buf.shape:
        d = as_int(d)
        if d is None:
            return None
        total *= d
    return total


def _broadcast_into(sch: s_tir.Schedule, block_rv) -> bool:
    """Whether a consumer of the block writes at least 4x the elements the block writes (a broadcast)."""
    own = _elements(sch.get(block_rv).writes[0].source) if sch.get(block_rv).writes else None
    if own is None:
        return False
    for consumer in sch.get_consumers(block_rv):
        writes = sch.get(consumer).writes
        their = _elements(writes[0].source) if writes else None
        if their is not None and their >= 4 * own:
            return True
    return False


def find_reduction_block(sch: s_tir.Schedule):
    """The single reduction block of a function whose other blocks are spatial (else None)."""
    red = [b for b in child_blocks(sch) if not is_spatial(sch, b)]
    if len(red) != 1:
        return None
    return red[0]


def pack_weight(sch, block_rv, read_idx: int, index_map) -> None:
    """cache_read + transform_layout a constant read buffer, tagged for compile-time folding."""
    cached = sch.cache_read(block_rv, read_idx, "global")
    sch.transform_layout(block_rv, ("read", read_idx), index_map, pad_value=None)
    sch.annotate(cached, PREPROC, True)


def inline_epilogue(sch: s_tir.Schedule, main_rv) -> tuple[list, list]:
    """Inline the spatial stages after the main block into one; returns (blocks after, blocks before)."""
    name = sch.get(main_rv).name_hint
    changed = True
    while changed:
        changed = False
        blocks = child_blocks(sch)
        names = [sch.get(b).name_hint for b in blocks]
        after = blocks[names.index(name) + 1:]
        for b in after[:-1]:
            if not is_spatial(sch, b):
                continue
            try:
                sch.compute_inline(b)
                changed = True
                break
            except Exception:  # noqa: BLE001
                pass
    blocks = child_blocks(sch)
    names = [sch.get(b).name_hint for b in blocks]
    pos = names.index(name)
    return blocks[pos + 1:], blocks[:pos]


def reduction_schedule(func, target):
    """(cpu, schedule, its main reduction block) for a PrimFunc with a reduction, else None."""
    if not isinstance(func, tirx.PrimFunc):
        return None
    sch = s_tir.Schedule(func)
    blk = find_reduction_block(sch)
    return None if blk is None else (cpu_of(target), sch, blk)


def inline_copy_producers(sch: s_tir.Schedule, main_rv) -> None:
    """Inline spatial producers of the main block that are pure copies/reshapes (no padding branch)."""
    for prod in sch.get_producers(main_rv):
        block = sch.get(prod)
        if not is_spatial(sch, prod):
            continue
        body = block.body
        value = getattr(body, "value", None)
        if type(value).__name__ in ("BufferLoad", "TensorLoad"):
            try:
                sch.compute_inline(prod)
            except Exception:  # noqa: BLE001
                pass


def loop_depth(sch, block_rv, loop) -> int:
    """Number of loops of `block_rv` down to and including `loop`."""
    target = sch.get(loop)
    for n, lp in enumerate(sch.get_loops(block_rv)):
        if sch.get(lp).same_as(target):
            return n + 1
    raise ValueError("loop does not enclose the block")


def choose_register_tile(vector_counts, vector_extent: int, other_extent: int, lanes: int,
                         max_acc: int) -> tuple[int, int]:
    """(vectors, other) of a register tile of accumulators: `vectors * lanes` divides `vector_extent`,
    `other` divides `other_extent`, at most `max_acc` accumulators; the best ratio of FMAs to loads, the
    earlier candidate in `vector_counts` on a tie."""
    best, best_score = (1, 1), -1.0
    for v in vector_counts:
        if vector_extent % (v * lanes):
            continue
        o = largest_divisor(other_extent, max_acc // v)
        score = v * o / (v + o) + 0.01 * v * o
        if score > best_score:
            best, best_score = (v, o), score
    return best
