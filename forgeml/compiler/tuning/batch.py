"""Tuning for machines that cannot compile: candidates built here, timed there, records kept here.

A GPU server without the TVM compiler, a Jetson, an air-gapped box: MetaSchedule's own runners need
either the compiler on the device or a live RPC connection. A measurement batch needs neither:

1. `export_batch` (here, `forgeml tune MODEL --measure-elsewhere DIR`): MetaSchedule's evolutionary
   search proposes candidates for each kernel (seeded by the database's records and a cost model
   trained on them, so every round starts where the last one stopped), each is built into a shared
   library the runtime alone loads, plus each kernel's rule-based schedule for comparison.
2. `python -m forgeml.runtime.measure DIR` (there: numpy + forgeml's runtime) times every library
   with TVM's in-runtime timer and writes `results.json`.
3. `import_results` (here, `forgeml tune-import DIR`) commits the timed candidates to the target's
   persistent database and the rule latencies beside it; later compiles use whichever is faster.

DIR holds `batch.json` (what the measuring machine reads), `candidates.json` (the schedules, read
back on import), `kernels/*.so`, and, once measured, `results.json`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import tvm
from tvm.s_tir import meta_schedule as ms

from forgeml.compiler.tensor_intrinsics import register_tensor_intrinsics
from forgeml.compiler.tuning import database, search
from forgeml.errors import InvalidInput
from forgeml.runtime.measure import BATCH_FILE, BATCH_FORMAT, RESULTS_FILE, wrong_output

CANDIDATES_FILE = "candidates.json"
IMPORTED_FILE = "imported.json"
MIN_PER_KERNEL = 4  # fewer candidates than this per kernel teach the search nothing


@dataclass
class BatchSummary:
    directory: str
    kernels: int = 0  # kernels in the model
    kernels_in_batch: int = 0
    candidates: int = 0  # tuned candidates built (MetaSchedule's and forgeml's variants)
    variants: int = 0  # of which forgeml's own schedule variants (before building)
    rule_candidates: int = 0  # rule-based schedules built for comparison
    build_errors: int = 0
    first_build_error: str = ""
    megabytes: float = 0.0
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ImportSummary:
    database: str
    device: str = ""
    records: int = 0  # tuned candidates committed
    failed: int = 0  # candidates that did not run there
    wrong: int = 0  # candidates whose outputs differed from the rule schedule's (not committed)
    rule_latencies: int = 0
    # per kernel: name, rules_us, best_us, speedup, best_source (MetaSchedule or a forgeml variant's name)
    kernels: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _trace_key(trace: Any) -> str:
    """A schedule's identity: its trace with every sampling decision, postprocessing left out (as the
    database stores it), as JSON."""
    from tvm.s_tir.schedule import _ffi_api

    return json.dumps(_plain(_ffi_api.TraceAsJSON(trace, True)))


def _training_data(kernel: tvm.IRModule, db: ms.database.Database, limit: int = 256):
    """The database's measured schedules of `kernel` as (candidates, runner results), and their trace keys."""
    from tvm import s_tir

    if not db.has_workload(kernel):
        return [], [], set()
    candidates, results, seen = [], [], set()
    for record in db.get_top_k(db.commit_workload(kernel), limit):
        sch = s_tir.Schedule(kernel)
        record.trace.apply_to_schedule(sch, remove_postproc=False)
        candidates.append(ms.MeasureCandidate(sch, record.args_info))
        results.append(ms.runner.RunnerResult(run_secs=record.run_secs, error_msg=None))
        seen.add(_trace_key(record.trace))
    return candidates, results, seen


def _propose(task: Any, target: tvm.target.Target, db: ms.database.Database, count: int) -> list[Any]:
    """Up to `count` new candidates for one kernel from MetaSchedule's evolutionary search, its cost model
    first trained on the kernel's records (what earlier batches measured); none measured before."""
    kernel = task.dispatched[0]
    register_tensor_intrinsics()
    context = ms.TuneContext(mod=kernel, target=target, space_generator=search.space_generator(target),
                             search_strategy=search._search_strategy(max(128, 2 * count)), task_name=task.task_name,
                             num_threads=os.cpu_count() or 1)
    spaces = context.generate_design_space()
    cost_model = ms.cost_model.XGBModel(num_warmup_samples=0)
    measured, results, seen = _training_data(kernel, db)
    if measured:
        cost_model.update(context, measured, results)
    context.pre_tuning(max_trials=count, num_trials_per_iter=count, design_spaces=spaces, database=db,
                       cost_model=cost_model)
    proposed = context.generate_measure_candidates() or []
    context.post_tuning()
    fresh = []
    for candidate in proposed:
        key = _trace_key(candidate.sch.trace)
        if key not in seen:
            seen.add(key)
            fresh.append(candidate)
    return fresh


def _record_json(record: ms.database.TuningRecord) -> Any:
    """A record as JSON values, written as TVM's JSONDatabase writes it (TuningRecord.as_json fails on
    the index maps of layout rewrites; the database stores each as its JSON graph string)."""
    from tvm.s_tir.meta_schedule import _ffi_api

    return _plain(_ffi_api.TuningRecordAsJSON(record))


def _plain(value: Any) -> Any:
    """TVM containers and scalars as plain Python values for json.dumps."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, tvm.tirx.IndexMap):
        return tvm.ir.save_json(value)
    if hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in value.items()}
    if hasattr(value, "value"):  # IntImm, FloatImm
        return value.value
    return [_plain(v) for v in value]


def _args_json(args_info) -> list[dict[str, Any]]:
    return [{"dtype": str(a.dtype), "shape": [int(d) for d in a.shape]} for a in args_info]


def output_indices(kernel: tvm.IRModule) -> list[int]:
    """Positions of the kernel's parameters that it writes (its outputs), whose values the measuring
    machine compares between each candidate and the rule schedule."""
    from tvm import s_tir

    sch = s_tir.Schedule(kernel)
    written: list[Any] = []

    def walk(block_rv) -> None:
        for child in sch.get_child_blocks(block_rv):
            written.extend(region.source for region in sch.get(child).writes)
            walk(child)

    walk(sch.get_sblock("root"))
    func = sch.mod["main"]
    return [i for i, param in enumerate(func.params)
            if any(param.same_as(buffer) for buffer in written)]


def _comparable(args: list[dict[str, Any]], own_args: list[dict[str, Any]], scheduled: tvm.IRModule) -> bool:
    """Whether a schedule's outputs are comparable with the others': it takes the kernel's own arguments,
    in their own layouts (CPU schedules that pack weights, forgeml's or MetaSchedule's, take others)."""
    return args == own_args and "meta_schedule.layout_rewrite_preproc" not in scheduled.script(show_meta=False)


def _empty_dir(path: Path) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise InvalidInput(f"{path} already exists and is not an empty directory: give a new directory "
                           "(a batch is never written over another)")


def share_trials(kernels: list[Any], trials: int) -> list[int]:
    """Candidates per kernel (kernels heaviest first): MIN_PER_KERNEL each for as many kernels as
    `trials` covers, the rest in proportion to each one's FLOPs x uses (the big convolutions of a
    CNN get most; a reshape gets the minimum)."""
    if trials < MIN_PER_KERNEL:
        return [trials]
    covered = min(len(kernels), trials // MIN_PER_KERNEL)
    weights = [search.flops(k) for k in kernels[:covered]]
    total = sum(weights)
    spare = trials - covered * MIN_PER_KERNEL
    return [MIN_PER_KERNEL + (int(spare * w / total) if total else spare // covered) for w in weights]


def export_batch(mod: tvm.IRModule, target: tvm.target.Target, out_dir: str | Path, trials: int,
                 refine: bool = False, cross_compiler: str | None = None, arch: str = "x86_64",
                 progress=None) -> BatchSummary:
    """Write a measurement batch of about `trials` candidates for `mod`'s kernels to `out_dir`.

    Kernels without records (all kernels with `refine`) share the candidates in proportion to their
    FLOPs x uses (`share_trials`). Kernels without records also get forgeml's own schedule variants
    (`search.rule_variants`: tensor-core tilings on CUDA) on top; `trials` 0 writes those alone.
    The directory appears complete or not at all."""
    start = time.monotonic()
    say = progress or (lambda _msg: None)
    out_dir = Path(out_dir)
    _empty_dir(out_dir)
    if trials < 0 or (trials == 0 and target.kind.name != "cuda"):
        raise InvalidInput("--trials must be at least 1 (0, forgeml's tensor-core tilings alone, on CUDA targets)")
    search.quiet_logs()
    target = database.tuning_target(target)
    search.check_tunable(target)
    db = database.open_database(target)
    tasks = search.extract(mod, target)
    pending = search.pending_tasks(tasks, db, target, refine)
    summary = BatchSummary(directory=str(out_dir), kernels=len(tasks))
    if not pending:
        raise InvalidInput(f"every one of the {len(tasks)} kernels already has a tuning record for this target: "
                           "add --refine to search further from them")
    shares = share_trials(pending, trials) if trials else [0] * len(pending)
    pending = pending[:len(shares)]
    workloads: list[str] = []
    entries: list[dict[str, Any]] = []
    modules: list[tvm.IRModule] = []
    for i, task in enumerate(pending):
        say(f"searching kernel {i + 1}/{len(pending)}: {task.task_name}")
        kernel = task.dispatched[0]
        workloads.append(tvm.ir.save_json(kernel))
        outputs = output_indices(kernel)
        own_args = _args_json(ms.arg_info.ArgInfo.from_entry_func(kernel))

        searched = _propose(task, target, db, shares[i]) if shares[i] else []
        proposed = [("MetaSchedule", c.sch, c.args_info) for c in searched]
        if not search._has_record(db, task, target):  # the variants are measured once per kernel
            for name, sch in search.rule_variants(kernel, target):
                proposed.append((name, sch, ms.arg_info.ArgInfo.from_entry_func(sch.mod, remove_preproc=True)))
                summary.variants += 1
        for source, sch, args_info in proposed:
            record = ms.database.TuningRecord(sch.trace, ms.database.Workload(kernel), None, target, args_info)
            args = _args_json(args_info)
            entries.append({"kind": "tuned", "kernel": task.task_name, "workload": i, "record": _record_json(record),
                            "args": args, "outputs": outputs, "source": source,
                            "comparable": _comparable(args, own_args, sch.mod)})
            modules.append(sch.mod)
        # the rule schedule goes in every batch: its latency, and its outputs as the reference that
        # each candidate's are checked against where they are measured
        scheduled = search.rule_schedule(kernel, target)
        args = _args_json(ms.arg_info.ArgInfo.from_entry_func(scheduled, remove_preproc=True))
        entries.append({"kind": "rules", "kernel": task.task_name, "workload": i,
                        "rule_key": search.schedule_key(scheduled), "args": args, "outputs": outputs,
                        "comparable": _comparable(args, own_args, scheduled)})
        modules.append(scheduled)
    if not any(e["kind"] == "tuned" for e in entries):
        raise InvalidInput("no kernel of this model has forgeml tilings to time: give --trials 1 or more")
    summary.kernels_in_batch = len(pending)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        (tmp / "kernels").mkdir()
        built = _build(modules, target, cross_compiler, say)
        kept = []
        for n, (entry, (path, error)) in enumerate(zip(entries, built)):
            if error:
                summary.build_errors += 1
                lines = [ln for ln in error.strip().splitlines() if ln.strip()]
                summary.first_build_error = summary.first_build_error or (lines[-1][:300] if lines else "?")
                continue
            entry["id"] = f"c{n:05d}"
            entry["library"] = f"kernels/{entry['id']}.so"
            shutil.move(path, tmp / entry["library"])
            shutil.rmtree(os.path.dirname(path), ignore_errors=True)
            kept.append(entry)
        summary.candidates = sum(1 for e in kept if e["kind"] == "tuned")
        summary.rule_candidates = len(kept) - summary.candidates
        device = search.device_of(target)
        batch = {"format": BATCH_FORMAT, "device": device, "arch": arch, "target": str(target),
                 "candidates": [{k: e[k] for k in ("id", "kind", "kernel", "library", "args", "outputs", "comparable")}
                                for e in kept]}
        _write_json(tmp / CANDIDATES_FILE, {"format": BATCH_FORMAT, "target": json.loads(tvm.ir.save_json(target)),
                                            "workloads": workloads, "candidates": kept})
        _write_json(tmp / BATCH_FILE, batch)
        summary.megabytes = round(sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()) / 1e6, 2)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary.seconds = round(time.monotonic() - start, 1)
    return summary


def _build(modules: list[tvm.IRModule], target: tvm.target.Target, cross_compiler: str | None,
           say) -> list[tuple[str | None, str | None]]:
    """(library path, error) per module, built in parallel in chunks (for progress)."""
    builder = search.builder(target, cross_compiler)
    out: list[tuple[str | None, str | None]] = []
    chunk = 4 * (os.cpu_count() or 1)
    for i in range(0, len(modules), chunk):
        say(f"building candidates {i + 1}-{min(i + chunk, len(modules))} of {len(modules)}")
        results = builder.build([ms.builder.BuilderInput(m, target) for m in modules[i:i + chunk]])
        out += [(r.artifact_path, r.error_msg) for r in results]
    return out


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InvalidInput(f"{path.parent}: no {path.name}; {what}") from None
    except (OSError, ValueError) as e:
        raise InvalidInput(f"{path}: unreadable ({e})") from None


def import_results(batch_dir: str | Path) -> ImportSummary:
    """Commit a measured batch to its target's tuning database (once)."""
    batch_dir = Path(batch_dir)
    meta = _read_json(batch_dir / CANDIDATES_FILE, "not a forgeml measurement batch (forgeml tune --measure-elsewhere)")
    measured = _read_json(batch_dir / RESULTS_FILE,
                          f"measure it first where the kernels run: python -m forgeml.runtime.measure {batch_dir}")
    if meta.get("format") != BATCH_FORMAT or measured.get("format") != BATCH_FORMAT:
        raise InvalidInput(f"{batch_dir}: batch format {meta.get('format')}/{measured.get('format')}, "
                           f"this forgeml reads {BATCH_FORMAT}")
    if (batch_dir / IMPORTED_FILE).exists():
        when = _read_json(batch_dir / IMPORTED_FILE, "").get("time", "before")
        raise InvalidInput(f"{batch_dir} was already imported ({when}): its records are in the database")
    target = tvm.ir.load_json(json.dumps(meta["target"]))
    db = database.open_database(target)
    device = measured.get("device", {}).get("name", "")
    summary = ImportSummary(database=str(database.database_dir(target)), device=device)
    workloads = [db.commit_workload(tvm.ir.load_json(w)) for w in meta["workloads"]]
    results = measured.get("results", {})
    rule_latencies: dict[str, float | None] = {}
    best: dict[str, dict[str, Any]] = {}
    for entry in meta["candidates"]:
        result = results.get(entry["id"])
        if result is None:
            continue
        run_secs = result.get("run_secs")
        stats = best.setdefault(entry["kernel"], {"kernel": entry["kernel"], "rules_us": None, "best_us": None,
                                                  "best_source": None})
        if not run_secs:
            summary.failed += entry["kind"] == "tuned"
            if entry["kind"] == "rules":
                rule_latencies[_rule_key(entry, meta, target)] = None
            continue
        secs = sum(run_secs) / len(run_secs)
        if entry["kind"] == "rules":
            rule_latencies[_rule_key(entry, meta, target)] = secs
            stats["rules_us"] = round(secs * 1e6, 2)
            continue
        if wrong_output(entry, result):
            summary.wrong += 1
            continue
        workload = workloads[entry["workload"]]
        parsed = ms.database.TuningRecord.from_json(entry["record"], workload)
        record = ms.database.TuningRecord(parsed.trace, workload, [float(s) for s in run_secs], target,
                                          parsed.args_info)
        db.commit_tuning_record(record)
        summary.records += 1
        if stats["best_us"] is None or secs * 1e6 < stats["best_us"]:
            stats["best_us"] = round(secs * 1e6, 2)
            stats["best_source"] = entry.get("source", "MetaSchedule")
    if rule_latencies:
        database.save_rule_latencies(target, rule_latencies)
    summary.rule_latencies = len(rule_latencies)
    for stats in best.values():  # rules / best tuned: above 1, tuning found a faster schedule
        rules, tuned = stats["rules_us"], stats["best_us"]
        stats["speedup"] = round(rules / tuned, 2) if rules and tuned else None
    summary.kernels = list(best.values())
    _write_json(batch_dir / IMPORTED_FILE, {"time": time.strftime("%Y-%m-%d %H:%M:%S"), **summary.to_json()})
    return summary


def _rule_key(entry: dict[str, Any], meta: dict[str, Any], target: tvm.target.Target) -> str:
    """A rules entry's latency key. Batches written before keys named the scheduled kernel
    ("<rules source hash>:<kernel hash>") are keyed by the kernel's rule schedule today."""
    if ":" not in entry["rule_key"]:
        return entry["rule_key"]
    return search.rule_key(tvm.ir.load_json(meta["workloads"][entry["workload"]]), target)
