"""The registry: an optimization level's pipeline for a target's device, and the tuned O2 pipeline.

Each device's module (`cpu/pipeline.py`, `cuda/pipeline.py`) provides the same three things: `PIPELINES`
(level name -> `(mod, target) -> mod`), `tuning_input` (the fused module MetaSchedule tunes) and
`schedule_rest` (the device's rules on every kernel a tuning database did not schedule).
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import tvm
from tvm import relax

from forgeml.errors import InvalidInput

Pipeline = Callable[[tvm.IRModule, tvm.target.Target], tvm.IRModule]
LEVELS = ("O0", "O2")


def _device(target: tvm.target.Target) -> ModuleType:
    """The pipelines module of the target's device: CUDA for kind "cuda", the CPU's for every LLVM target."""
    if target.kind.name == "cuda":
        from forgeml.compiler.cuda import pipeline as device
    else:
        from forgeml.compiler.cpu import pipeline as device
    return device


def get_pipeline(name: str) -> Pipeline:
    """The level's pipeline; which device's it is follows from the target it is called with."""
    if name not in LEVELS:
        raise InvalidInput(f"unknown optimization level '{name}'; known: {', '.join(LEVELS)}")
    return lambda mod, target: _device(target).PIPELINES[name](mod, target)


def tuning_input(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """The fused module whose kernels MetaSchedule tunes (CPU: weights marked layout-free for prepacking)."""
    return _without_schedule_rule_annotations(_device(target).tuning_input(mod, target))


def _without_schedule_rule_annotations(mod: tvm.IRModule) -> tvm.IRModule:
    """Drop the `schedule_rule` block annotation legalization puts on some kernels (pooling: "meta_schedule.
    pool_max"). TVM registers no such rule for CPUs or CUDA, so MetaSchedule printed an "Unknown schedule
    rule" warning per pool kernel and then used its default rules, as it does without the annotation."""
    from tvm import s_tir

    for gv, func in list(mod.functions_items()):
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        sch = s_tir.Schedule(func)
        marked = [b for b in sch.get_child_blocks(sch.get_sblock("root"))
                  if "schedule_rule" in sch.get(b).annotations]
        for block in marked:
            sch.unannotate(block, "schedule_rule")
        if marked:
            mod[gv] = sch.mod["main"]
    return mod


def tuned_o2(mod: tvm.IRModule, target: tvm.target.Target, budget, progress=None):
    """O2 with the tuning database: tune kernels missing from it (within `budget`, possibly none),
    then use each tuned schedule only where it beats the rules. Returns (module, TuningSummary)."""
    from forgeml.compiler.tuning import database, search

    mod = tuning_input(mod, target)
    summary = search.tune(mod, target, budget, progress)
    winners = search.winning_database(mod, target, summary)
    with database.tuning_target(target), winners:
        mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
    return _device(target).schedule_rest(mod, target), summary
