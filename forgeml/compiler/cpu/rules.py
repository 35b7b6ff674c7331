"""The CPU rules in order, and the pass that applies them (rule-based schedules, no tuning).

`apply_cpu_schedules(mod, target)` runs after the `zero` pipeline (legalize + FuseOps + FuseTIR) and
gives every PrimFunc a schedule:

- `WinogradRule`: the Winograd kernels `winograd.winograd_convs` made of 3x3 stride-1 convs (x86): input
  transform, (m + 2)^2 matrix products with register tiles, output transform with the conv's epilogue.
- `Conv2DRule`: NCHW conv2d (groups == 1, or groups with >= one vector of output channels per group),
  output channels vectorized, a register tile of output columns, weights prepacked at compile time.
- `DepthwiseConvRule`: NCHW depthwise conv2d; the padded input is rewritten channel-blocked ([C/8, H, W, 8])
  so every tap is one contiguous vector load, any stride.
- `MatmulRule`: dense / matmul / batch matmul (`C[..., i, j] += A[..., i, k] * B[..., k, j]`, B optionally
  transposed); a register micro tile of rows x vectors, constant weights prepacked to [N/tw, K, tw].
- `BlockedPoolRule`: max/average pooling over channel-blocked input (from a conv, `blocked.py`): a vector
  of channels per window tap.
- `GenericRule`: everything else: inline injective stages, parallelize leading spatial loops, vectorize
  the innermost one (reductions keep a parallel spatial nest).

Weight prepacking: the rules cache_read a layout-free (constant) buffer, transform_layout it and tag the
copy with `meta_schedule.layout_rewrite_preproc`; `SplitLayoutRewritePreproc` + `FoldConstant` after this
pass fold the repack into the constants.

A rule that cannot handle a function returns None (errors are caught), so the next rule gets it. The
rules run one PrimFunc at a time: a function whose scheduling fails, whose schedule the weight-repack
split cannot take, or that `unscheduled(...)` names (build.py's fallback when code generation fails on
a scheduled kernel) keeps TVM's naive loops.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import tvm
from tvm import relax
from tvm.s_tir import dlight
from tvm.s_tir.dlight.base import ScheduleRule

from forgeml.compiler.cpu.conv import Conv2DRule, DepthwiseConvRule
from forgeml.compiler.cpu.gemm import MatmulRule
from forgeml.compiler.cpu.generic import GenericRule
from forgeml.compiler.cpu.pool import BlockedPoolRule
from forgeml.compiler.cpu.winograd import WinogradRule

logger = logging.getLogger(__name__)


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
    return [WinogradRule(), Conv2DRule(), DepthwiseConvRule(), MatmulRule(), BlockedPoolRule(), GenericRule()]


_UNSCHEDULED: ContextVar[frozenset[str]] = ContextVar("forgeml_cpu_unscheduled", default=frozenset())


@contextmanager
def unscheduled(names: Iterable[str]) -> Iterator[None]:
    """Within the block, `apply_cpu_schedules` leaves the PrimFuncs with these names unscheduled."""
    token = _UNSCHEDULED.set(frozenset(names))
    try:
        yield
    finally:
        _UNSCHEDULED.reset(token)


def _repacks_weights(func: tvm.tirx.PrimFunc) -> bool:
    """Whether a rule tagged a weight repack in `func` (a block annotated layout_rewrite_preproc)."""
    from tvm import s_tir

    try:
        sch = s_tir.Schedule(func)
        root = sch.get_sblock("root")
    except Exception:  # noqa: BLE001 (no root block: an opaque kernel, nothing tagged)
        return False
    return any("meta_schedule.layout_rewrite_preproc" in sch.get(block).annotations
               for block in sch.get_child_blocks(root))


@tvm.transform.module_pass(opt_level=0, name="ForgemlSplitLayoutRewritePreproc")
def split_layout_rewrite_preproc(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """TVM's SplitLayoutRewritePreproc over the PrimFuncs that repack weights only: it visits every
    PrimFunc and raised "There should be a compute block if there is only one subtree under the root"
    on kernels with none to split (TVM's ScatterElements, MaxUnpool)."""
    hidden = {gv: func for gv, func in mod.functions_items()
              if isinstance(func, tvm.tirx.PrimFunc) and not _repacks_weights(func)}
    rest = tvm.IRModule({gv: func for gv, func in mod.functions_items() if gv not in hidden},
                        attrs=mod.attrs, global_infos=mod.global_infos)
    out = relax.transform.SplitLayoutRewritePreproc()(rest)
    for gv, func in hidden.items():
        out[gv] = func
    return out


def _schedule_one(gv: tvm.ir.GlobalVar, func: tvm.tirx.PrimFunc, rules: list[ScheduleRule]) -> tvm.tirx.PrimFunc:
    """`func` scheduled by the first rule that applies; raises when scheduling or the later weight-repack
    split fails on it."""
    one = dlight.ApplyDefaultSchedule(*rules)(tvm.IRModule({gv: func}))
    scheduled = one[one.get_global_var(gv.name_hint)]
    if _repacks_weights(scheduled):
        relax.transform.SplitLayoutRewritePreproc()(tvm.IRModule({gv: scheduled}))
    return scheduled


def apply_cpu_schedules(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Give every PrimFunc in `mod` a CPU schedule (never raises on a function it cannot handle: that
    function keeps its naive loops)."""
    if target.kind.name != "llvm":
        return mod
    try:
        mod = relax.transform.AttachAttrLayoutFreeBuffers()(mod)
    except Exception as err:  # noqa: BLE001
        logger.debug("AttachAttrLayoutFreeBuffers failed: %s", err)
    rules = [_Guarded(r) for r in default_rules()]
    skip = _UNSCHEDULED.get()
    with target:
        for gv, func in list(mod.functions_items()):
            if not isinstance(func, tvm.tirx.PrimFunc):
                continue
            if gv.name_hint not in skip:
                try:
                    mod[gv] = _schedule_one(gv, func, rules)
                    continue
                except Exception as err:  # noqa: BLE001 (TVM raises InternalError, ValueError, ...)
                    logger.debug("%s keeps its naive loops: %s", gv.name_hint, err)
            if func.attrs is not None and "layout_free_buffers" in func.attrs:
                mod[gv] = func.without_attr("layout_free_buffers")
        return mod
