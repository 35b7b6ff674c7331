"""The ONNX backend conformance suite, case by case, for forgeml, raw TVM and ONNX Runtime.

Cases: the node tests `onnx.backend.test.case.node.collect_testcases()` builds (model and reference
data in memory) and the model tests under onnx/backend/test/data/{pytorch-converted,pytorch-operator,
simple} (model.onnx plus test_data_set_*/{input,output}_N.pb), both from the installed onnx package.
Outputs are compared by the official runner's `assert_similar_outputs` (shape, dtype, allclose with the
case's rtol/atol: 1e-3/1e-7 unless the case says otherwise).

Every case runs in a worker subprocess (a pool of `--jobs` workers, restarted after a crash, a
timeout or every 200 cases), and is classified as pass / wrong / error (a forgeml error, `ForgeError`)
/ exception (any other Python exception: its type, message and the code that raised it) / crash /
timeout. Engines:
  forgeml      forgeml.onnx_backend.ForgemlBackend: compile_model (x86-64, --opt-level, verified), load, run
  forgeml-noverify  the same without compile-time verification against ONNX Runtime on random inputs
  tvm          raw TVM: relax.frontend.onnx.from_onnx(keep_params_in_input=False), tvm.compile(llvm),
               relax.VirtualMachine
  onnxruntime  ONNX Runtime 1 thread (the reference implementation most users compare with)

    python benchmarks/onnx_conformance.py --engines forgeml,tvm --jobs 2
    python benchmarks/onnx_conformance.py --sample 10 --out /tmp/conf   # every 10th case
    python benchmarks/onnx_conformance.py --report-only                # re-render the .md from the .json

Writes benchmarks/results/onnx_conformance.{md,json} (or --out PREFIX.{md,json}).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import re
import sys
import time
import traceback
import warnings
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "onnx_conformance"
MODEL_KINDS = ("pytorch-converted", "pytorch-operator", "simple")
ENGINES = ("forgeml", "forgeml-noverify", "tvm", "onnxruntime")
STATUSES = ("pass", "wrong", "error", "exception", "crash", "timeout")
RECYCLE_AFTER = 200  # cases per worker before a fresh one (loaded libraries and TVM caches pile up)
WORKER_ENV = {"TVM_NUM_THREADS": "1", "TVM_BIND_THREADS": "0", "OMP_NUM_THREADS": "1"}


@dataclass
class Case:
    """One conformance case: node cases carry their model and data, model cases their directory."""

    name: str
    kind: str  # "node" or one of MODEL_KINDS
    op: str  # the operator under test ("Softmax", "Softmax (expanded)", "[pytorch-converted]")
    rtol: float
    atol: float
    model_dir: str | None = None
    model: bytes | None = None
    data_sets: list | None = None


@dataclass
class Result:
    """What one engine did with one case."""

    status: str
    seconds: float
    phase: str = ""  # load / prepare / run / compare: where it stopped
    error_type: str = ""  # ForgeError subclass or exception class
    message: str = ""
    where: str = ""  # innermost forgeml frame (file:line function), else the innermost frame


# ---------------------------------------------------------------------------------------------- cases

def _node_op(model: Any) -> str:
    ops = [n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}" for n in model.graph.node]
    real = [op for op in ops if op != "Constant"] or ops
    return real[0] if real else "?"


def _normalize(value: Any) -> Any:
    """A node case's input or output as the official runner hands it over: TensorProto (the cases
    keep types numpy lacks, such as float8 and int4, as protos) -> array; sequences, optionals as given."""
    import onnx

    if isinstance(value, onnx.TensorProto):
        return onnx.numpy_helper.to_array(value)
    return value


def collect_cases() -> list[Case]:
    """Every case of the suite, node cases first, each group sorted by name."""
    from onnx.backend.test.case.node import collect_testcases
    from onnx.backend.test.loader import load_model_tests

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        node = sorted(collect_testcases(), key=lambda t: t.name)
    single = {t.name: _node_op(t.model) for t in node if "_expanded" not in t.name}
    cases = []
    for t in node:
        if "_expanded" in t.name:
            base = t.name.split("_expanded")[0]
            op = f"{single.get(base, _node_op(t.model))} (expanded)"
        else:
            op = single[t.name]
        data = [([_normalize(x) for x in ins], [_normalize(x) for x in outs]) for ins, outs in t.data_sets]
        cases.append(Case(t.name, "node", op, t.rtol, t.atol, model=t.model.SerializeToString(), data_sets=data))
    for kind in MODEL_KINDS:
        for t in sorted(load_model_tests(kind=kind), key=lambda t: t.name):
            cases.append(Case(t.name, kind, f"[{kind}]", t.rtol, t.atol, model_dir=t.model_dir))
    return cases


def _read_value(path: Path, type_proto: Any) -> Any:
    import onnx
    from onnx import numpy_helper

    data = path.read_bytes()
    if type_proto.HasField("sequence_type"):
        seq = onnx.SequenceProto()
        seq.ParseFromString(data)
        return numpy_helper.to_list(seq)
    if type_proto.HasField("optional_type"):
        opt = onnx.OptionalProto()
        opt.ParseFromString(data)
        return numpy_helper.to_optional(opt)
    tensor = onnx.TensorProto()
    tensor.ParseFromString(data)
    return numpy_helper.to_array(tensor)


def load_case(case: Case) -> tuple[Any, list]:
    """(ModelProto, [(inputs, expected outputs)]), read the way onnx's BackendTest runner reads them."""
    import onnx

    if case.model is not None:
        return onnx.load_from_string(case.model), case.data_sets or []
    model = onnx.load(os.path.join(case.model_dir, "model.onnx"))
    data_sets = []
    for data_dir in sorted(Path(case.model_dir).glob("test_data_set*")):
        n_in, n_out = len(list(data_dir.glob("input_*.pb"))), len(list(data_dir.glob("output_*.pb")))
        inputs = [_read_value(data_dir / f"input_{i}.pb", model.graph.input[i].type) for i in range(n_in)]
        outputs = [_read_value(data_dir / f"output_{i}.pb", model.graph.output[i].type) for i in range(n_out)]
        data_sets.append((inputs, outputs))
    return model, data_sets


# -------------------------------------------------------------------------------------------- engines

def prepare_forgeml(model: Any, opt_level: str, verify: bool = True) -> Callable[[list], list]:
    from forgeml.onnx_backend import ForgemlBackend

    rep = ForgemlBackend.prepare(model, "CPU", opt_level=opt_level, verify=verify)
    return rep.run


def prepare_forgeml_noverify(model: Any, opt_level: str) -> Callable[[list], list]:
    return prepare_forgeml(model, opt_level, verify=False)


def _tvm_value(value: Any) -> Any:
    if hasattr(value, "numpy"):
        return value.numpy()
    if isinstance(value, (tuple, list)) or type(value).__name__ in ("Array", "Shape", "ShapeTuple"):
        items = list(value)
        if type(value).__name__ in ("Shape", "ShapeTuple") or all(isinstance(v, int) for v in items):
            return np.asarray(items, dtype=np.int64)
        return [_tvm_value(v) for v in items]
    return np.asarray(value)


def prepare_tvm(model: Any, opt_level: str) -> Callable[[list], list]:
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    mod = from_onnx(model, keep_params_in_input=False)
    executable = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"}))
    vm = relax.VirtualMachine(executable, tvm.cpu())
    n_outputs = len(model.graph.output)

    def run(inputs: list) -> list:
        result = vm["main"](*[tvm.runtime.tensor(np.asarray(x, order="C")) for x in inputs])
        if n_outputs == 1:
            return [_tvm_value(result)]
        return [_tvm_value(v) for v in result]

    return run


def prepare_onnxruntime(model: Any, opt_level: str) -> Callable[[list], list]:
    import onnxruntime as ort

    from forgeml.onnx_backend import graph_input_names

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 4
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = graph_input_names(model)
    # numpy scalars as 0-d arrays, as onnxruntime.backend does (InferenceSession.run refuses them)
    return lambda inputs: session.run(None, {n: np.asarray(x) if isinstance(x, np.generic) else x
                                             for n, x in zip(names, inputs)})


PREPARE = {"forgeml": prepare_forgeml, "forgeml-noverify": prepare_forgeml_noverify, "tvm": prepare_tvm,
           "onnxruntime": prepare_onnxruntime}


# ------------------------------------------------------------------------------------- one case, in a worker

def _where(tb: Any) -> str:
    """The innermost forgeml frame of a traceback (else the innermost frame), as path:line function."""
    frames = traceback.extract_tb(tb)
    ours = [f for f in frames if f"{os.sep}forgeml{os.sep}" in f.filename]
    frame = (ours or frames or [None])[-1]
    if frame is None:
        return ""
    path = frame.filename
    for marker in (f"{os.sep}forgeml{os.sep}", "site-packages" + os.sep):
        if marker in path:
            path = ("forgeml/" if marker.startswith(os.sep) else "") + path.split(marker, 1)[1]
            break
    return f"{path}:{frame.lineno} {frame.name}"


def _message(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    text = lines[-1] if len(lines) > 1 and ("Traceback" in lines[0] or lines[0].startswith("File")) else lines[0]
    return text[:400]


def run_case(engine: str, case: Case, opt_level: str) -> Result:
    """Prepare, run and compare one case; every failure becomes a classified Result."""
    from onnx.backend.test.runner import Runner

    from forgeml.errors import ForgeError

    start = time.perf_counter()
    phase = "load"
    try:
        model, data_sets = load_case(case)
        phase = "prepare"
        run = PREPARE[engine](model, opt_level)
        for inputs, expected in data_sets:
            phase = "run"
            outputs = list(run(inputs))
            phase = "compare"
            try:
                with np.errstate(all="ignore"):
                    Runner.assert_similar_outputs(expected, outputs, rtol=case.rtol, atol=case.atol)
            except (AssertionError, TypeError, ValueError) as e:
                return Result("wrong", time.perf_counter() - start, phase, type(e).__name__, _compact(str(e)))
        return Result("pass", time.perf_counter() - start, phase)
    except Exception as e:  # the point: classify whatever the engine raises
        status = "error" if isinstance(e, ForgeError) else "exception"
        kind = type(e).__name__ if status == "error" or type(e).__module__ == "builtins" else \
            f"{type(e).__module__}.{type(e).__name__}"
        return Result(status, time.perf_counter() - start, phase, kind, _message(e), _where(e.__traceback__))


def _compact(text: str) -> str:
    """An assertion message on one line: its header and summary lines, without the arrays it prints."""
    skip = re.compile(r"^(x:|y:|\[|\d|-\d|nan[],]|-?inf[],]|array\(|\.\.\.)|\], dtype=|^\s*$")
    keep = [ln.strip() for ln in text.strip().splitlines() if not skip.search(ln.strip())]
    return " | ".join(keep)[:400]


def _worker(conn: Connection, opt_level: str) -> None:
    sys.path.insert(0, str(ROOT))
    warnings.simplefilter("ignore")
    while True:
        task = conn.recv()
        if task is None:
            return
        engine, case = task
        conn.send(asdict(run_case(engine, case, opt_level)))


# ------------------------------------------------------------------------------------- the pool

@dataclass
class _Slot:
    process: Any = None
    conn: Connection | None = None
    task: tuple[str, Case] | None = None
    deadline: float = 0.0
    started: float = 0.0
    done: int = 0


def run_all(tasks: Iterable[tuple[str, Case]], jobs: int, timeout: float, opt_level: str,
            on_result: Callable[[str, Case, Result], None]) -> None:
    """Run (engine, case) tasks on `jobs` worker processes; a crashed or timed-out worker is replaced."""
    os.environ.update(WORKER_ENV)
    ctx = mp.get_context("spawn")
    pending = deque(tasks)
    slots = [_Slot() for _ in range(jobs)]

    def stop(slot: _Slot, kill: bool) -> None:
        if slot.process is not None:
            if kill:
                slot.process.kill()
            else:
                slot.conn.send(None)
            slot.process.join(10)
        slot.process = slot.conn = None
        slot.done = 0

    def start(slot: _Slot) -> None:
        parent, child = ctx.Pipe()
        slot.process = ctx.Process(target=_worker, args=(child, opt_level), daemon=True)
        slot.process.start()
        child.close()
        slot.conn = parent

    def finish(slot: _Slot, result: Result) -> None:
        engine, case = slot.task
        slot.task = None
        slot.done += 1
        on_result(engine, case, result)

    while pending or any(s.task for s in slots):
        for slot in slots:
            if slot.task is None and pending:
                if slot.process is not None and slot.done >= RECYCLE_AFTER:
                    stop(slot, kill=False)
                if slot.process is None:
                    start(slot)
                slot.task = pending.popleft()
                slot.started = time.monotonic()
                slot.deadline = slot.started + timeout
                slot.conn.send(slot.task)
        busy = [s for s in slots if s.task]
        now = time.monotonic()
        wait([s.conn for s in busy] + [s.process.sentinel for s in busy],
             timeout=max(0.0, min(s.deadline for s in busy) - now))
        for slot in busy:
            elapsed = time.monotonic() - slot.started
            if slot.conn.poll():
                try:
                    finish(slot, Result(**slot.conn.recv()))
                    continue
                except (EOFError, OSError):
                    pass
            if not slot.process.is_alive():
                code = slot.process.exitcode
                how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
                stop(slot, kill=True)
                finish(slot, Result("crash", elapsed, "", "crash", f"worker died ({how})"))
            elif time.monotonic() > slot.deadline:
                stop(slot, kill=True)
                finish(slot, Result("timeout", elapsed, "", "timeout", f"no result after {timeout:g} s"))
    for slot in slots:
        stop(slot, kill=False)


# ------------------------------------------------------------------------------------- the report

def family(result: dict) -> str:
    """A failure's family: its type and its message with numbers blanked out."""
    message = re.sub(r"0x[0-9a-f]+", "0x…", result.get("message", ""))
    message = re.sub(r"(?<![A-Za-z_\d])\d+(\.\d+)?(e[-+]?\d+)?(?![A-Za-z_\d])", "N", message)
    return f"{result.get('error_type', '')}: {message[:200]}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _names(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(n.removeprefix("test_") for n in names[:limit])
    return shown + (f", ... (+{len(names) - limit})" if len(names) > limit else "")


def _totals(doc: dict) -> list[str]:
    lines = ["| engine | cases | pass | wrong | error (ForgeError) | exception | crash | timeout | pass % | seconds |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for engine, results in doc["results"].items():
        counts = Counter(r["status"] for r in results.values())
        n = len(results)
        seconds = sum(r["seconds"] for r in results.values())
        lines.append(f"| {engine} | {n} | " + " | ".join(str(counts[s]) for s in STATUSES)
                     + f" | {100 * counts['pass'] / max(n, 1):.1f} | {seconds:.0f} |")
    return lines


def _families(results: dict[str, dict], names: Iterable[str], cases: dict) -> list[str]:
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for name in names:
        r = results[name]
        groups[(r["status"], family(r))].append(name)
    lines = ["| cases | status | family (type: message) | raised at | ops | cases |",
             "| ---: | --- | --- | --- | --- | --- |"]
    for (status, fam), members in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        where = Counter(results[m]["where"] for m in members).most_common(1)[0][0]
        ops = Counter(cases[m]["op"] for m in members)
        op_text = ", ".join(f"{op} {k}" if k > 1 else op for op, k in ops.most_common(6))
        op_text += ", ..." if len(ops) > 6 else ""
        lines.append(f"| {len(members)} | {status} | {_cell(fam)} | {_cell(where)} | {_cell(op_text)} "
                     f"| {_names(members)} |")
    return lines


def _raise_sites(results: dict[str, dict], names: list[str], tvm: dict[str, dict]) -> list[str]:
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for name in names:
        groups[(results[name]["error_type"], results[name]["where"])].append(name)
    lines = ["| cases | raw TVM passes | exception | raised at | most common message |",
             "| ---: | ---: | --- | --- | --- |"]
    for (kind, where), members in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        message = Counter(family(results[m]).split(": ", 1)[1][:150] for m in members).most_common(1)[0][0]
        passing = sum(tvm.get(m, {}).get("status") == "pass" for m in members)
        lines.append(f"| {len(members)} | {passing} | {kind} | {_cell(where)} | {_cell(message)} |")
    return lines


def _per_op(doc: dict) -> list[str]:
    engines = list(doc["results"])
    by_op: dict[str, list[str]] = defaultdict(list)
    for name, case in doc["cases"].items():
        by_op[case["op"]].append(name)
    header = "| op | cases | " + " | ".join(f"{e} pass/wrong/fail" for e in engines) + " |"
    lines = [header, "| --- | ---: | " + " | ".join("---" for _ in engines) + " |"]
    for op in sorted(by_op, key=str.lower):
        cells = []
        for engine in engines:
            statuses = [doc["results"][engine][n]["status"] for n in by_op[op] if n in doc["results"][engine]]
            c = Counter(statuses)
            cells.append(f"{c['pass']}/{c['wrong']}/{len(statuses) - c['pass'] - c['wrong']}")
        lines.append(f"| {_cell(op)} | {len(by_op[op])} | " + " | ".join(cells) + " |")
    return lines


def _silently_wrong(engine: str, results: dict, cases: dict) -> list[str]:
    wrong = sorted(n for n, r in results[engine].items() if r["status"] == "wrong")
    out = [f"## Silently wrong: {engine} ({len(wrong)})", "",
           "Returned outputs that differ from the case's reference" + (
               " (after passing verification against ONNX Runtime on random inputs)." if engine == "forgeml" else "."),
           "", "| case | op | raw TVM | ONNX Runtime | mismatch |", "| --- | --- | --- | --- | --- |"]
    for n in wrong:
        other = [results[e][n]["status"] if n in results.get(e, {}) else "-" for e in ("tvm", "onnxruntime")]
        mismatch = _cell(results[engine][n]["message"][:300])
        out.append(f"| {n} | {_cell(cases[n]['op'])} | {other[0]} | {other[1]} | {mismatch} |")
    return out + [""]


def _verification(results: dict, cases: dict) -> list[str]:
    """What compile-time verification (random inputs, compared with ONNX Runtime) does to the outcome."""
    fml, raw = results.get("forgeml"), results.get("forgeml-noverify")
    if fml is None or raw is None:
        return []
    both = [n for n in fml if n in raw]
    moves = Counter((raw[n]["status"], fml[n]["status"]) for n in both if raw[n]["status"] != fml[n]["status"])
    out = ["## What verification changes", "",
           "forgeml-noverify -> forgeml (verified) for the cases whose status differs:", "",
           "| without verification | with | cases |", "| --- | --- | ---: |"]
    out += [f"| {a} | {b} | {k} |" for (a, b), k in moves.most_common()]
    rejected = [n for n in both if raw[n]["status"] == "pass" and fml[n]["status"] != "pass"]
    caught = [n for n in both if raw[n]["status"] == "wrong" and fml[n]["status"] != "wrong"]
    out += ["", f"Correct cases that verification rejects ({len(rejected)}), by what it raised:", "",
            *_families(fml, rejected, cases), "",
            f"Wrong results that verification stops ({len(caught)}): {_names(sorted(caught), 40)}", ""]
    return out


def render(doc: dict) -> str:
    """The Markdown report of a results document."""
    meta, cases, results = doc["meta"], doc["cases"], doc["results"]
    out = ["# ONNX backend conformance", "",
           f"`{meta['command']}` on {meta['machine']} ({meta['date']}); onnx {meta['versions'].get('onnx')}, "
           f"onnxruntime {meta['versions'].get('onnxruntime')}, tvm {meta['versions'].get('tvm')}; forgeml at "
           f"{meta['opt_level']}, "
           f"per-case timeout {meta['timeout']:g} s, {meta['jobs']} workers.",
           f"Cases: {meta['selection']}. Comparison: the official runner's `assert_similar_outputs` "
           "(shape, dtype, allclose rtol 1e-3 / atol 1e-7 unless a case sets its own).", "",
           "Statuses: *wrong* = ran and returned outputs that differ (silently wrong); *error* = a forgeml "
           "error (`ForgeError`); *exception* = any other Python exception; *crash* = the worker process "
           "died; *timeout* = no result in time.", "", "## Totals", "", *_totals(doc), ""]
    fml, tvm = results.get("forgeml"), results.get("tvm")
    if fml is not None:
        failed = [n for n, r in fml.items() if r["status"] != "pass"]
        out += ["## forgeml failure families", "", "Every case forgeml does not pass, grouped by type and message "
                "(numbers blanked); *raised at* is the innermost forgeml frame (else the innermost frame).", "",
                *_families(fml, failed, cases), ""]
        if tvm is not None:
            regress = [n for n in failed if n in tvm and tvm[n]["status"] == "pass"]
            out += [f"## Cases raw TVM passes and forgeml fails ({len(regress)})", "",
                    *_families(fml, regress, cases), ""]
        raised = [n for n in failed if fml[n]["status"] == "exception"]
        out += [f"## Python exceptions in forgeml ({len(raised)})", "",
                "Not `ForgeError`s: each is a forgeml bug (a crash of the library rather than a message). "
                "By exception type and raising forgeml frame:", "", *_raise_sites(fml, raised, tvm or {}), "",
                "| case | op | phase | exception | message | raised at |", "| --- | --- | --- | --- | --- | --- |"]
        for n in sorted(raised, key=lambda n: (fml[n]["error_type"], fml[n]["where"], n)):
            r = fml[n]
            out.append(f"| {n} | {_cell(cases[n]['op'])} | {r['phase']} | {r['error_type']} | "
                       f"{_cell(r['message'][:200])} | {_cell(r['where'])} |")
        out += [""] + _verification(results, cases)
    for engine in ("forgeml", "forgeml-noverify"):
        if engine in results:
            out += _silently_wrong(engine, results, cases)
    out += ["## Per operator", "", "pass/wrong/fail per engine (fail = error, exception, crash or timeout); "
            "`(expanded)` rows are the function-expanded variants, `[kind]` rows the model tests.", "",
            *_per_op(doc), ""]
    return "\n".join(out)


# ------------------------------------------------------------------------------------- main

def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name, dist in (("onnx", "onnx"), ("onnxruntime", "onnxruntime"), ("tvm", "apache-tvm")):
        try:
            found[name] = version(dist)
        except PackageNotFoundError:
            found[name] = "?"
    return found


def _machine() -> str:
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return f"{model}, {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default="forgeml,tvm", help=f"comma-separated, of {', '.join(ENGINES)}")
    parser.add_argument("--sample", type=int, default=1, help="run every Nth case (1: all)")
    parser.add_argument("--filter", default="", help="only cases whose name contains this substring")
    parser.add_argument("--cases", type=Path, help="only the cases named in this file, one a line (with --resume: "
                        "re-run them by deleting their results from OUT.json first)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per case and engine")
    parser.add_argument("--opt-level", default="O2", help="forgeml's optimization level (O0, O2)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="writes OUT.json and OUT.md")
    parser.add_argument("--resume", action="store_true", help="keep the results already in OUT.json")
    parser.add_argument("--report-only", action="store_true", help="re-render OUT.md from OUT.json")
    args = parser.parse_args(argv)
    json_path, md_path = args.out.with_suffix(".json"), args.out.with_suffix(".md")
    if args.report_only:
        md_path.write_text(render(json.loads(json_path.read_text())))
        print(f"wrote {md_path}")
        return 0
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if unknown := [e for e in engines if e not in ENGINES]:
        parser.error(f"unknown engine {unknown[0]}; known: {', '.join(ENGINES)}")
    cases = [c for c in collect_cases() if args.filter in c.name][::max(args.sample, 1)]
    only = set(args.cases.read_text().split()) if args.cases else None
    selection = f"{len(cases)} of the suite" + (f", every {args.sample}th" if args.sample > 1 else "") + \
        (f", names containing '{args.filter}'" if args.filter else "")
    doc = {"meta": {"command": "python benchmarks/onnx_conformance.py " + " ".join(argv or sys.argv[1:]),
                    "machine": _machine(), "date": time.strftime("%Y-%m-%d"), "versions": _versions(),
                    "opt_level": args.opt_level, "timeout": args.timeout,
                    "jobs": args.jobs, "selection": selection},
           "cases": {c.name: {"kind": c.kind, "op": c.op} for c in cases},
           "results": {e: {} for e in engines}}
    if args.resume and json_path.exists():
        old = json.loads(json_path.read_text())
        doc["results"] = {e: {n: r for n, r in old["results"].get(e, {}).items() if n in doc["cases"]}
                          for e in sorted(set(old["results"]) | set(engines), key=ENGINES.index)}
        doc["meta"]["command"] = f"{old['meta']['command']}`, then `{doc['meta']['command']}"
    tasks = [(e, c) for c in cases for e in engines if c.name not in doc["results"][e]
             and (only is None or c.name in only)]
    json_path.parent.mkdir(parents=True, exist_ok=True)
    clock, done = time.monotonic(), [0]

    def save() -> None:
        json_path.write_text(json.dumps(doc, separators=(",", ":")))

    def on_result(engine: str, case: Case, result: Result) -> None:
        doc["results"][engine][case.name] = {**asdict(result), "seconds": round(result.seconds, 3)}
        done[0] += 1
        if done[0] % 50 == 0 or done[0] == len(tasks):
            counts = {e: Counter(r["status"] for r in doc["results"][e].values()) for e in engines}
            summary = "; ".join(f"{e} " + " ".join(f"{s}={c[s]}" for s in STATUSES if c[s]) for e, c in counts.items())
            print(f"[{done[0]}/{len(tasks)} {time.monotonic() - clock:.0f}s] {summary}", file=sys.stderr, flush=True)
            save()

    print(f"{len(cases)} cases x {engines}: {len(tasks)} runs on {args.jobs} workers", file=sys.stderr)
    run_all(tasks, args.jobs, args.timeout, args.opt_level, on_result)
    save()
    md_path.write_text(render(doc))
    print("\n".join(_totals(doc)))
    print(f"wrote {md_path} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
