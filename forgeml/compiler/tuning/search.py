"""MetaSchedule tuning that is never wasted.

- One persistent database per target in the user cache ($FORGEML_CACHE, default ~/.cache/forgeml),
  shared by every model: a workload (a fused kernel, matched structurally) tuned once is never tuned
  again, whatever model it appears in.
- Every measured candidate is committed as it is measured, so Ctrl-C loses nothing: the next run
  resumes from what is in the database.
- A fast builder (TVM_NOTES: the default one re-imports tensor intrinsics in every worker and makes
  no progress on 2 cores).
- The rule-based schedule is measured with the same runner, and a tuned schedule is used only where
  it beats the rules.
- CPU and CUDA targets alike. Candidates are measured here when this machine can run them (the
  target's CPU, or a CUDA GPU); otherwise `batch.py` writes them out for a machine that has only
  forgeml's runtime (`python -m forgeml.runtime.measure`) and imports what it measured.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import tvm
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from forgeml.compiler.cpu.winograd import is_winograd
from forgeml.compiler.tensor_intrinsics import register_tensor_intrinsics
from forgeml.compiler.tuning.database import (
    database_dir,
    open_database,
    read_rule_latencies,
    save_rule_latencies,
    tuning_target,
)

TuneProgress = Callable[[dict[str, Any]], None]


def quiet_logs() -> None:
    """MetaSchedule prints a task table per trial batch; forgeml shows its own progress instead."""
    import logging

    for name in ("tvm.s_tir.meta_schedule", "tvm.meta_schedule"):
        logging.getLogger(name).setLevel(logging.WARNING)


def check_tunable(target: tvm.target.Target) -> None:
    """CPU targets must say how many cores the device has: MetaSchedule's CPU rules need it."""
    if target.kind.name == "llvm" and "num-cores" not in target.attrs:
        from forgeml.errors import InvalidInput

        raise InvalidInput("tuning needs the device's core count, which this target does not give: use a preset "
                           'with one (x86-64, rpi4, rpi5) or a target JSON with "num-cores"')


def device_of(target: tvm.target.Target) -> str:
    """Where the target's kernels run: "cuda" or "cpu" (MetaSchedule's device type names)."""
    return "cuda" if target.kind.name == "cuda" else "cpu"


def fast_build(mod: tvm.IRModule, target: tvm.target.Target, _params: Any) -> Any:
    """MetaSchedule's default build without importing tvm.s_tir.tensor_intrin (30-60 s per worker)."""
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm.driver.build(mod, target=target)


def export_kernel(module: Any, cuda_arch: str | None = None, cross_compiler: str | None = None) -> str:
    """A built candidate as a shared library that forgeml's runtime loads without the compiler (CUDA
    kernels prebuilt into a fatbin, as in artifacts); returns its path in a fresh temporary directory."""
    import tempfile

    fcompile = None
    if cross_compiler:
        from tvm.support import cc

        fcompile = cc.cross_compiler(cross_compiler)
    path = os.path.join(tempfile.mkdtemp(prefix="forgeml-kernel-"), "kernel.so")
    if cuda_arch:
        from forgeml.compiler.cuda.fatbin import export_cuda_library

        export_cuda_library(module, path, cuda_arch, fcompile=fcompile)
    else:
        module.export_library(path, fcompile=fcompile)
    return path


def builder(target: tvm.target.Target, cross_compiler: str | None = None) -> ms.builder.Builder:
    """The fast builder, exporting libraries the runtime alone can load (see `export_kernel`)."""
    import functools

    arch = str(target.attrs["arch"]) if target.kind.name == "cuda" else None
    return ms.builder.LocalBuilder(
        f_build=fast_build, f_export=functools.partial(export_kernel, cuda_arch=arch, cross_compiler=cross_compiler),
        max_workers=os.cpu_count() or 1, timeout_sec=120 if arch else 60)


def cannot_measure_here(target: tvm.target.Target) -> str | None:
    """Why this machine cannot time the target's kernels itself, or None when it can."""
    if device_of(target) == "cuda":
        from forgeml.targets.host import has_cuda_gpu

        if not has_cuda_gpu():
            return "there is no CUDA GPU on this machine"
    return None


@dataclass
class Budget:
    minutes: float | None = None
    trials: int | None = None

    @property
    def empty(self) -> bool:
        return not self.minutes and not self.trials


@dataclass
class TuningSummary:
    database: str
    tasks: int = 0
    tasks_from_cache: int = 0
    tasks_tuned: int = 0
    trials: int = 0
    seconds: float = 0.0
    budget: dict[str, Any] = field(default_factory=dict)
    tuned_kernels_used: int = 0  # kernels where the tuned schedule beat the rules
    rule_kernels_kept: int = 0
    interrupted: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@derived_object
class _Progress(ms.measure_callback.PyMeasureCallback):
    """Counts trials and tracks the best latency for the progress bar. (The time budget is checked
    between groups of kernels: terminating tasks from here breaks TVM's task scheduler.)"""

    def __init__(self, deadline: float | None, report: TuneProgress | None, total_trials: int):
        super().__init__()
        self.deadline, self.report, self.total = deadline, report, total_trials
        self.trials, self.best_ms, self.start = 0, float("inf"), time.monotonic()

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
        self.trials += len(runner_results)
        for result in runner_results:
            if result.run_secs:
                secs = sum(float(s) for s in result.run_secs) / len(result.run_secs)
                self.best_ms = min(self.best_ms, secs * 1e3)
        if self.report:
            left = None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
            self.report({"trials": self.trials, "total": self.total, "best_ms": self.best_ms,
                         "seconds_left": left, "elapsed": time.monotonic() - self.start})


def _has_record(db: ms.database.Database, task: Any, target: tvm.target.Target) -> bool:
    mod = task.dispatched[0]
    return db.has_workload(mod) and bool(db.get_top_k(db.commit_workload(mod), 1))


def _builder_runner(target: tvm.target.Target) -> tuple[ms.builder.Builder, ms.runner.Runner]:
    runner = ms.runner.LocalRunner(
        evaluator_config=ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=40, enable_cpu_cache_flush=False),
        timeout_sec=30,
    )
    return builder(target), runner


def space_generator(target: tvm.target.Target) -> ms.space_generator.SpaceGenerator | str:
    """MetaSchedule's design space for the target. CUDA (sm_70+): TVM's tensor-core rules, except that
    the wmma accumulators are staged in static shared memory: TVM 0.27 merges the fp32 staging buffer
    into the fp16 dynamic shared memory of the operands, and every such candidate failed to build
    ("tvm_access_ptr element type must match the source buffer", the same fix as cuda/wmma.py)."""
    if target.kind.name != "cuda":
        return "post-order-apply"
    register_tensor_intrinsics()
    arch = str(target.attrs.get("arch", "sm_50"))
    if not arch.startswith("sm_") or int(arch[3:5]) < 70:  # no tensor cores (sm_XY, maybe "sm_90a")
        return ms.space_generator.PostOrderApply(sch_rules="cuda", postprocs="cuda", mutator_probs="cuda")
    groups = [{"init": f"wmma_fill_16x16x16_{acc}",
               "load_a": "wmma_load_16x16x16_f16_a_shared_dyn",
               "load_b": f"wmma_load_16x16x16_f16_b{trans}_shared_dyn",
               "compute": f"wmma_sync_16x16x16_f16f16{acc}{trans}",
               "store": f"wmma_store_16x16x16_{acc}_shared"}
              for acc in ("f32", "f16") for trans in ("", "_trans")]
    tensor_cores = ms.schedule_rule.MultiLevelTilingTensorCore(
        intrin_groups=groups, structure="SSSRRSRS", tile_binds=["blockIdx.y", "blockIdx.x", "threadIdx.y"],
        max_innermost_factor=4, vector_load_lens=[1, 2, 3, 4, 8, 16],
        reuse_read=ms.schedule_rule.ReuseType(req="must", levels=[4], scope="shared.dyn"),
        reuse_write=ms.schedule_rule.ReuseType(req="must", levels=[2], scope="shared"),
        use_software_pipeline=False)
    custom, *rest = ms.schedule_rule.ScheduleRule.create("cuda")
    return ms.space_generator.PostOrderApply(sch_rules=[custom, tensor_cores, *rest],
                                             postprocs="cuda-tensorcore", mutator_probs="cuda-tensorcore")


def _search_strategy(population: int = 128) -> ms.search_strategy.EvolutionarySearch:
    """A smaller evolutionary search than TVM's default (population 512): on a 2-core machine the
    default spends minutes between trial batches. A round picks at most `population` candidates."""
    return ms.search_strategy.EvolutionarySearch(population_size=population, init_min_unmeasured=16,
                                                 genetic_num_iters=2)


def extract(mod: tvm.IRModule, target: tvm.target.Target) -> list[Any]:
    """Tunable kernels of a fused module (weights bound as constants). Winograd kernels (cpu/winograd.py)
    are not: MetaSchedule's design space generation raised on their five stages (ReverseComputeAt:
    "TensorRegion pattern match failed") and ended the whole search; they keep the rule's schedule."""
    tasks = ms.relax_integration.extract_tasks(mod, tuning_target(target))
    return [t for t in tasks if not is_winograd(t.task_name)]


_TRIALS_PER_TASK = 32  # a first pass over every kernel before any kernel gets more


_GROUP = 4  # kernels tuned together; the time budget is checked between groups


_TRIALS_PER_ITER = 16  # candidates measured per search round: the smallest step a group can take


_SECONDS_PER_TRIAL_GUESS = 1.5  # before any trial is measured (2-core EPYC: 1.2-2.5 s per trial)


def flops(task: Any) -> float:
    """Floating-point operations of a kernel times its uses in the model (0 where TVM cannot tell)."""
    from tvm.s_tir.analysis import estimate_tir_flops

    try:
        return float(estimate_tir_flops(task.dispatched[0])) * task.weight
    except Exception:  # some kernels (reshape, gather) have no FLOP estimate
        return 0.0


def pending_tasks(tasks: list[Any], db: ms.database.Database, target: tvm.target.Target,
                  refine: bool = False) -> list[Any]:
    """The kernels to tune, heaviest first: those without a record (all of them with `refine`)."""
    pending = tasks if refine else [t for t in tasks if not _has_record(db, t, target)]
    return sorted(pending, key=flops, reverse=True)


def by_rule_time(tasks: list[Any], target: tvm.target.Target) -> list[Any]:
    """The kernels to tune in order of the time the rules' schedules take in the model (measured latency
    x uses), heaviest first: where an untuned build spends its time, not where the FLOPs are (a
    depthwise convolution does few FLOPs and can take longer than a 1x1 one with ten times more). The
    latencies are the ones `winning_database` compares with, measured once and cached. Kernels whose
    rule schedule could not be measured come first (tuning is all they have); where nothing can be
    measured here, the FLOPs order stands."""
    if cannot_measure_here(target) or not tasks:
        return tasks
    cached = read_rule_latencies(target)
    scheduled = [rule_schedule(t.dispatched[0], target) for t in tasks]
    keys = [schedule_key(s) for s in scheduled]
    missing = [i for i, key in enumerate(keys) if key not in cached]
    if missing:
        latencies = _measure_rule_latencies([scheduled[i] for i in missing], target)
        measured = {keys[i]: secs for i, secs in zip(missing, latencies)}
        save_rule_latencies(target, measured)
        cached.update(measured)

    def cost(i: int) -> float:
        secs = cached.get(keys[i])
        return float("inf") if secs is None else secs * float(tasks[i].weight)

    return [tasks[i] for i in sorted(range(len(tasks)), key=cost, reverse=True)]


def tune(mod: tvm.IRModule, target: tvm.target.Target, budget: Budget,
         progress: TuneProgress | None = None, refine: bool = False) -> TuningSummary:
    """Tune the kernels of `mod` not already in the target's database (all of them with `refine`:
    the search then starts from the records), within `budget`, measuring on this machine.

    Kernels go heaviest first (the rules' measured time x uses: `by_rule_time`), a few at a time.
    Before each group the time left is turned into a trial count at the rate measured so far, so the
    budget holds to within the error of that estimate (TVM's task scheduler cannot be stopped mid-group).
    """
    from forgeml.errors import InvalidInput

    start = time.monotonic()
    quiet_logs()
    target = tuning_target(target)
    if not budget.empty:
        check_tunable(target)
    db = open_database(target)
    tasks = extract(mod, target)
    pending = [] if budget.empty else pending_tasks(tasks, db, target, refine)
    if pending and (why := cannot_measure_here(target)):
        raise InvalidInput(f"cannot tune for '{target.kind.name}' here: {why}. Write the candidates out for a "
                           "machine that can run them: `forgeml tune MODEL --measure-elsewhere DIR`")
    pending = by_rule_time(pending, target)
    search_start = time.monotonic()  # the rules' timing is not search: winning_database would time them anyway
    cached = sum(1 for t in tasks if _has_record(db, t, target))
    summary = TuningSummary(database=str(database_dir(target)), tasks=len(tasks), tasks_from_cache=cached,
                            budget={"minutes": budget.minutes, "trials": budget.trials})
    deadline = search_start + budget.minutes * 60 if budget.minutes else None
    planned = budget.trials or len(pending) * _TRIALS_PER_TASK
    callback = _Progress(deadline, progress, planned)
    work_dir = database_dir(target) / "logs"
    try:
        for i in range(0, len(pending), _GROUP):
            group = pending[i:i + _GROUP]
            trials = min(planned - callback.trials, len(group) * _TRIALS_PER_TASK)
            if deadline is not None:
                now = time.monotonic()
                rate = (now - search_start) / callback.trials if callback.trials else _SECONDS_PER_TRIAL_GUESS
                trials = min(trials, int((deadline - now) / rate) // _TRIALS_PER_ITER * _TRIALS_PER_ITER)
            if trials <= 0:  # trial budget spent, or not one search round fits in the time left
                break
            register_tensor_intrinsics()
            contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                group, work_dir=str(work_dir), space=space_generator(target),
                num_threads=os.cpu_count() or 1, strategy=_search_strategy())
            builder_, runner = _builder_runner(target)
            ms.tune.tune_tasks(
                tasks=contexts, task_weights=weights, work_dir=str(work_dir),
                max_trials_global=trials, num_trials_per_iter=_TRIALS_PER_ITER,
                builder=builder_, runner=runner, database=db,
                measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"), callback],
            )
            summary.tasks_tuned += len(group)
    except KeyboardInterrupt:
        summary.interrupted = True  # every measured record is already in the database
    summary.trials = callback.trials
    summary.seconds = round(time.monotonic() - start, 2)
    return summary


def rule_schedule(kernel: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """A kernel scheduled by forgeml's rules, as the untuned pipeline schedules it (into a copy: dlight's
    ApplyDefaultSchedule rewrites the module it is given, and `kernel` is also a database workload)."""
    kernel = tvm.IRModule(dict(kernel.functions_items()), attrs=kernel.attrs)
    with target:
        if target.kind.name == "cuda":
            from tvm.s_tir import dlight as dl

            from forgeml.compiler.cuda.pipeline import default_rules

            return dl.ApplyDefaultSchedule(*default_rules())(kernel)
        from forgeml.compiler.cpu.rules import apply_cpu_schedules

        return apply_cpu_schedules(kernel, target)


def rule_variants(kernel: tvm.IRModule, target: tvm.target.Target) -> list[tuple[str, Any]]:
    """forgeml's own parametrized schedules of `kernel`, named, for tuning batches to time beside
    MetaSchedule's candidates: the tensor-core tilings of fp16 GEMMs on CUDA, wmma
    (`wmma.wmma_variants`) and, on sm_80+, mma.sync with cp.async (`mma.mma_variants`); none
    for other kernels and targets."""
    if target.kind.name != "cuda":
        return []
    from forgeml.compiler.cuda.mma import mma_variants
    from forgeml.compiler.cuda.tensor_cores import tensor_core_gemm
    from forgeml.compiler.cuda.wmma import wmma_variants

    func = kernel["main"]
    found = tensor_core_gemm(func, target)
    if found is None:
        return []
    register_tensor_intrinsics()
    with target:
        variants = [(f"wmma {tiles.name}", sch) for tiles, sch in wmma_variants(func, target, found[1], found[2])]
        return variants + [(tiles.name, sch) for tiles, sch in mma_variants(func, target, found[1])]


def rule_key(kernel: tvm.IRModule, target: tvm.target.Target) -> str:
    """The key of a kernel's rule-schedule latency in `rule_latency.json` (see `schedule_key`)."""
    return schedule_key(rule_schedule(kernel, target))


def schedule_key(scheduled: tvm.IRModule) -> str:
    """The structural hash of a kernel as the rules schedule it, so a cached rule latency stays valid
    exactly as long as the schedule it timed (a change to the rules' code that leaves a kernel's
    schedule alone keeps its latency)."""
    import tvm_ffi

    return f"s{tvm_ffi.structural_hash(scheduled)}"


def _measure_rule_latencies(scheduled: list[tvm.IRModule], target: tvm.target.Target) -> list[float | None]:
    """Seconds per call of each rule-scheduled kernel, measured like tuning candidates (one batch)."""
    if not scheduled:
        return []
    builder_, runner = _builder_runner(target)
    built = builder_.build([ms.builder.BuilderInput(m, target) for m in scheduled])
    inputs, where = [], []
    for i, (mod, result) in enumerate(zip(scheduled, built)):
        if not result.error_msg:
            args = ms.arg_info.ArgInfo.from_entry_func(mod, remove_preproc=True)
            inputs.append(ms.runner.RunnerInput(result.artifact_path, device_of(target), args))
            where.append(i)
    latencies: list[float | None] = [None] * len(scheduled)
    for i, future in zip(where, runner.run(inputs)):
        result = future.result()
        if not result.error_msg and result.run_secs:
            latencies[i] = sum(float(s) for s in result.run_secs) / len(result.run_secs)
    return latencies


def winning_database(mod: tvm.IRModule, target: tvm.target.Target,
                     summary: TuningSummary | None = None) -> ms.database.MemoryDatabase:
    """A database holding only the tuned records that beat the rule-based schedule of the same kernel.

    Rule latencies are measured once per kernel and cached beside the tuning database (measured here,
    or imported with a measurement batch). Where this machine cannot measure a missing one, the rules
    are kept: a tuned schedule is used only where it is known to be faster.
    """
    target = tuning_target(target)
    db = open_database(target)
    cached = read_rule_latencies(target)
    candidates = []  # (kernel, best tuned record, tuned seconds, rule-scheduled kernel, cache key)
    for task in extract(mod, target):
        kernel = task.dispatched[0]
        if not db.has_workload(kernel):
            continue
        top = db.get_top_k(db.commit_workload(kernel), 1)
        if top and top[0].run_secs:
            tuned = sum(float(s) for s in top[0].run_secs) / len(top[0].run_secs)
            scheduled = rule_schedule(kernel, target)
            candidates.append((kernel, top[0], tuned, scheduled, schedule_key(scheduled)))
    unmeasured = [c for c in candidates if c[4] not in cached]
    if unmeasured and not cannot_measure_here(target):
        latencies = _measure_rule_latencies([c[3] for c in unmeasured], target)
        measured = {key: secs for (*_, key), secs in zip(unmeasured, latencies)}
        save_rule_latencies(target, measured)
        cached.update(measured)
    winners = ms.database.MemoryDatabase()
    for kernel, record, tuned, _, key in candidates:
        if key in cached and (cached[key] is None or tuned < cached[key]):
            winners.commit_tuning_record(ms.database.TuningRecord(
                record.trace, winners.commit_workload(kernel), record.run_secs, target, record.args_info))
            if summary:
                summary.tuned_kernels_used += 1
        elif summary:
            summary.rule_kernels_kept += 1
    return winners
