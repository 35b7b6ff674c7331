"""The CPU pipelines: the shared graph passes, then forgeml's rule-based schedules (O2) or TVM's naive
loops (O0), and the schedules' packed weight layouts folded into the constants."""

from __future__ import annotations

import tvm
from tvm import relax

from forgeml.compiler.cpu.blocked import blocked_edges
from forgeml.compiler.cpu.rules import apply_cpu_schedules, split_layout_rewrite_preproc
from forgeml.compiler.cpu.winograd import winograd_convs
from forgeml.compiler.graph import graph_passes


def fold_prepacked_weights() -> tvm.transform.Pass:
    """Move the schedules' weight repacking out of the kernels and fold it into the constants."""
    return tvm.transform.Sequential([
        split_layout_rewrite_preproc,
        relax.transform.FoldConstant(),
        relax.transform.DeadCodeElimination(),
    ])


def cpu_o0(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """No schedules: TVM's naive loops. For debugging the compiler, not for speed."""
    with target:
        return tvm.transform.Sequential(graph_passes())(mod)


def cpu_o2(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Fused graph plus forgeml's rule-based schedules with packed weight layouts."""
    with target:
        mod = blocked_edges(tvm.transform.Sequential(graph_passes([winograd_convs(target)]))(mod), target)
        mod = apply_cpu_schedules(mod, target)
        return fold_prepacked_weights()(mod)


def tuning_input(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """The fused module whose kernels MetaSchedule tunes (weights marked layout-free for prepacking)."""
    with target:
        mod = blocked_edges(tvm.transform.Sequential(graph_passes([winograd_convs(target)]))(mod), target)
        return relax.transform.AttachAttrLayoutFreeBuffers()(mod)


def schedule_rest(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """The rules on every kernel the tuning database did not schedule, then the packed weights folded."""
    with target:
        mod = apply_cpu_schedules(mod, target)
        return fold_prepacked_weights()(mod)


PIPELINES = {"O0": cpu_o0, "O2": cpu_o2}
