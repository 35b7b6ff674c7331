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
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
import types
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import tvm
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

TuneProgress = Callable[[dict[str, Any]], None]


def quiet_logs() -> None:
    """MetaSchedule prints a task table per trial batch; forgeml shows its own progress instead."""
    import logging

    for name in ("tvm.s_tir.meta_schedule", "tvm.meta_schedule"):
        logging.getLogger(name).setLevel(logging.WARNING)


def cache_dir() -> Path:
    return Path(os.environ.get("FORGEML_CACHE", "~/.cache/forgeml")).expanduser()


def target_key(target: tvm.target.Target) -> str:
    """A readable, stable key for a target: kind-mcpu-cores-hash."""
    config = {k: str(v) for k, v in sorted(dict(target.export()).items())}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]
    mcpu = str(target.attrs.get("mcpu", target.attrs.get("arch", "generic")))
    cores = target.attrs.get("num-cores", "")
    return f"{target.kind.name}-{mcpu}{f'-{cores}c' if cores else ''}-{digest}"


def database_dir(target: tvm.target.Target) -> Path:
    return cache_dir() / "tuning" / target_key(target)


def open_database(target: tvm.target.Target) -> ms.database.JSONDatabase:
    path = database_dir(target)
    path.mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(path_workload=str(path / "workloads.json"),
                                    path_tuning_record=str(path / "records.json"), allow_missing=True)


def has_records(target: tvm.target.Target) -> bool:
    """Whether this target's database holds any tuning record (then compiles consult it)."""
    records = database_dir(target) / "records.json"
    return records.is_file() and records.stat().st_size > 0


def fast_build(mod: tvm.IRModule, target: tvm.target.Target, _params: Any) -> Any:
    """MetaSchedule's default build without importing tvm.s_tir.tensor_intrin (30-60 s per worker)."""
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm.driver.build(mod, target=target)


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


def _builder_runner() -> tuple[ms.builder.Builder, ms.runner.Runner]:
    builder = ms.builder.LocalBuilder(f_build=fast_build, max_workers=os.cpu_count() or 1, timeout_sec=60)
    runner = ms.runner.LocalRunner(
        evaluator_config=ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=40, enable_cpu_cache_flush=False),
        timeout_sec=30,
    )
    return builder, runner


@contextlib.contextmanager
def _without_tensor_intrinsics(target: tvm.target.Target):
    """TuneContext imports tvm.s_tir.tensor_intrin, which parses hundreds of TVMScript functions
    (minutes of CPU on 2 cores, more with torch loaded). CPU targets without VNNI/AMX use none of
    them, so a placeholder module stands in while tuning contexts are made."""
    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules or target.kind.name != "llvm":
        yield
        return
    sys.modules[name] = types.ModuleType(name)
    try:
        yield
    finally:
        del sys.modules[name]


def _search_strategy() -> ms.search_strategy.EvolutionarySearch:
    """A smaller evolutionary search than TVM's default (population 512): on a 2-core machine the
    default spends minutes between trial batches."""
    return ms.search_strategy.EvolutionarySearch(population_size=128, init_min_unmeasured=16, genetic_num_iters=2)


def extract(mod: tvm.IRModule, target: tvm.target.Target) -> list[Any]:
    """Tunable kernels of a fused module (weights bound as constants)."""
    return ms.relax_integration.extract_tasks(mod, target)


_TRIALS_PER_TASK = 32  # a first pass over every kernel before any kernel gets more
_GROUP = 4  # kernels tuned together; the time budget is checked between groups
_TRIALS_PER_ITER = 16  # candidates measured per search round: the smallest step a group can take
_SECONDS_PER_TRIAL_GUESS = 1.5  # before any trial is measured (2-core EPYC: 1.2-2.5 s per trial)


def _flops(task: Any) -> float:
    from tvm.s_tir.analysis import estimate_tir_flops

    try:
        return float(estimate_tir_flops(task.dispatched[0])) * task.weight
    except Exception:  # some kernels (reshape, gather) have no FLOP estimate
        return 0.0


def tune(mod: tvm.IRModule, target: tvm.target.Target, budget: Budget,
         progress: TuneProgress | None = None) -> TuningSummary:
    """Tune the kernels of `mod` not already in the target's database, within `budget`.

    Kernels go heaviest first (FLOPs x uses), a few at a time. Before each group the time left is
    turned into a trial count at the rate measured so far, so the budget holds to within the error of
    that estimate (TVM's task scheduler cannot be stopped mid-group).
    """
    start = time.monotonic()
    quiet_logs()
    db = open_database(target)
    tasks = extract(mod, target)
    pending = [] if budget.empty else [t for t in tasks if not _has_record(db, t, target)]
    cached = sum(1 for t in tasks if _has_record(db, t, target)) if budget.empty else len(tasks) - len(pending)
    summary = TuningSummary(database=str(database_dir(target)), tasks=len(tasks), tasks_from_cache=cached,
                            budget={"minutes": budget.minutes, "trials": budget.trials})
    pending.sort(key=_flops, reverse=True)
    deadline = start + budget.minutes * 60 if budget.minutes else None
    planned = budget.trials or len(pending) * _TRIALS_PER_TASK
    callback = _Progress(deadline, progress, planned)
    work_dir = database_dir(target) / "logs"
    try:
        for i in range(0, len(pending), _GROUP):
            group = pending[i:i + _GROUP]
            trials = min(planned - callback.trials, len(group) * _TRIALS_PER_TASK)
            if deadline is not None:
                now = time.monotonic()
                rate = (now - start) / callback.trials if callback.trials else _SECONDS_PER_TRIAL_GUESS
                trials = min(trials, int((deadline - now) / rate) // _TRIALS_PER_ITER * _TRIALS_PER_ITER)
            if trials <= 0:  # trial budget spent, or not one search round fits in the time left
                break
            with _without_tensor_intrinsics(target):
                contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                    group, work_dir=str(work_dir), num_threads=os.cpu_count() or 1, strategy=_search_strategy())
            builder, runner = _builder_runner()
            ms.tune.tune_tasks(
                tasks=contexts, task_weights=weights, work_dir=str(work_dir),
                max_trials_global=trials, num_trials_per_iter=_TRIALS_PER_ITER,
                builder=builder, runner=runner, database=db,
                measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"), callback],
            )
            summary.tasks_tuned += len(group)
    except KeyboardInterrupt:
        summary.interrupted = True  # every measured record is already in the database
    summary.trials = callback.trials
    summary.seconds = round(time.monotonic() - start, 2)
    return summary


# -- choosing between tuned and rule-based schedules -------------------------------------------------

def _rules_file(target: tvm.target.Target) -> Path:
    return database_dir(target) / "rule_latency.json"


def _measure_rule_latencies(kernels: list[tvm.IRModule], target: tvm.target.Target) -> list[float | None]:
    """Seconds per call of each kernel's rule-based schedule, measured like tuning candidates (one batch)."""
    from forgeml.compiler.schedules import apply_cpu_schedules

    if not kernels:
        return []
    with target:
        scheduled = [apply_cpu_schedules(k, target) for k in kernels]
    builder, runner = _builder_runner()
    built = builder.build([ms.builder.BuilderInput(m, target) for m in scheduled])
    inputs, where = [], []
    for i, (mod, result) in enumerate(zip(scheduled, built)):
        if not result.error_msg:
            args = ms.arg_info.ArgInfo.from_entry_func(mod, remove_preproc=True)
            inputs.append(ms.runner.RunnerInput(result.artifact_path, "cpu", args))
            where.append(i)
    latencies: list[float | None] = [None] * len(kernels)
    for i, future in zip(where, runner.run(inputs)):
        result = future.result()
        if not result.error_msg and result.run_secs:
            latencies[i] = sum(float(s) for s in result.run_secs) / len(result.run_secs)
    return latencies


def winning_database(mod: tvm.IRModule, target: tvm.target.Target, summary: TuningSummary | None = None,
                     rules_version: str = "") -> ms.database.MemoryDatabase:
    """A database holding only the tuned records that beat the rule-based schedule of the same kernel.

    Rule latencies are measured once per kernel and cached beside the tuning database.
    """
    db = open_database(target)
    rules_path = _rules_file(target)
    cached = json.loads(rules_path.read_text()) if rules_path.exists() else {}
    candidates = []  # (kernel, best tuned record, tuned seconds, cache key)
    for task in extract(mod, target):
        kernel = task.dispatched[0]
        if not db.has_workload(kernel):
            continue
        top = db.get_top_k(db.commit_workload(kernel), 1)
        if top and top[0].run_secs:
            tuned = sum(float(s) for s in top[0].run_secs) / len(top[0].run_secs)
            candidates.append((kernel, top[0], tuned, f"{rules_version}:{_shash(kernel)}"))
    unmeasured = [c for c in candidates if c[3] not in cached]
    for (_, _, _, key), secs in zip(unmeasured, _measure_rule_latencies([c[0] for c in unmeasured], target)):
        cached[key] = secs
    winners = ms.database.MemoryDatabase()
    for kernel, record, tuned, key in candidates:
        rule = cached[key]
        if rule is None or tuned < rule:
            winners.commit_tuning_record(ms.database.TuningRecord(
                record.trace, winners.commit_workload(kernel), record.run_secs, target, record.args_info))
            if summary:
                summary.tuned_kernels_used += 1
        elif summary:
            summary.rule_kernels_kept += 1
    if unmeasured:
        tmp = rules_path.with_name(rules_path.name + ".tmp")
        tmp.write_text(json.dumps(cached, indent=1))
        os.replace(tmp, rules_path)
    return winners


def _shash(mod: tvm.IRModule) -> int:
    import tvm_ffi

    return tvm_ffi.structural_hash(mod)
