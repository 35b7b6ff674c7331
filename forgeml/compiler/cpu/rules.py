"""The CPU rules in order, and the pass that applies them (rule-based schedules, no tuning).

`apply_cpu_schedules(mod, target)` runs after the `zero` pipeline (legalize + FuseOps + FuseTIR) and
gives every PrimFunc a schedule:

- `Conv2DRule`: NCHW conv2d (groups == 1, or groups with >= one vector of output channels per group),
  output channels vectorized, a register tile of output columns, weights prepacked at compile time.
- `DepthwiseConvRule`: NCHW depthwise conv2d; the padded input is rewritten channel-blocked ([C/8, H, W, 8])
  so every tap is one contiguous vector load, any stride.
- `MatmulRule`: dense / matmul / batch matmul (`C[..., i, j] += A[..., i, k] * B[..., k, j]`, B optionally
  transposed); a register micro tile of rows x vectors, constant weights prepacked to [N/tw, K, tw].
- `GenericRule`: everything else: inline injective stages, parallelize leading spatial loops, vectorize
  the innermost one (reductions keep a parallel spatial nest).

Weight prepacking: the rules cache_read a layout-free (constant) buffer, transform_layout it and tag the
copy with `meta_schedule.layout_rewrite_preproc`; `SplitLayoutRewritePreproc` + `FoldConstant` after this
pass fold the repack into the constants.

A rule that cannot handle a function returns None (errors are caught), so the next rule gets it.
"""

from __future__ import annotations

import logging

import tvm
from tvm import relax
from tvm.s_tir import dlight
from tvm.s_tir.dlight.base import ScheduleRule

from forgeml.compiler.cpu.conv import Conv2DRule, DepthwiseConvRule
from forgeml.compiler.cpu.gemm import MatmulRule
from forgeml.compiler.cpu.generic import GenericRule

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
    return [Conv2DRule(), DepthwiseConvRule(), MatmulRule(), GenericRule()]


def apply_cpu_schedules(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Give every PrimFunc in `mod` a CPU schedule (never raises on a function it cannot handle)."""
    if target.kind.name != "llvm":
        return mod
    try:
        mod = relax.transform.AttachAttrLayoutFreeBuffers()(mod)
    except Exception as err:  # noqa: BLE001
        logger.debug("AttachAttrLayoutFreeBuffers failed: %s", err)
    rules = [_Guarded(r) for r in default_rules()]
    with target:
        return dlight.ApplyDefaultSchedule(*rules)(mod)
