"""CPU speed, side by side: forgeml untuned (rule-based schedules), forgeml tuned, ONNX Runtime and
PyTorch eager, on each zoo model, same inputs and thread count, alternating in one run. Each engine runs
in a process of its own (forgeml.bench.worker, as `forgeml bench`): a TVM session pins its process to
core 0, which would squeeze any engine timed after it in the same process.

    python benchmarks/cpu.py --threads 2 --tune-minutes 20            # full run (tuning persists)
    python benchmarks/cpu.py --models mlp,bert_tiny --tune-minutes 0  # untuned only

Writes benchmarks/results/cpu.md and cpu.json (raw samples). Tuning uses the persistent database
($FORGEML_CACHE), so a rerun reuses earlier tuning; the minutes column says what this run spent.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def bench_model(name: str, threads: int, tune_minutes: float, repeat: int, workdir: Path) -> list:

    from forgeml.bench.harness import CaseResult, Stats, measure_in_workers
    from forgeml.compiler.build import CompileOptions, compile_model
    from forgeml.zoo import example_inputs, export_zoo_model

    onnx_path = export_zoo_model(name, workdir / f"{name}.onnx")
    feeds = example_inputs(name, seed=0)
    engines = {}  # label -> (engine, model)
    meta = {}
    start = time.perf_counter()
    compile_model(onnx_path, workdir / f"{name}.fml", CompileOptions(use_tuning_db=False))
    meta["forgeml untuned"] = {"compile_s": round(time.perf_counter() - start, 1)}
    engines["forgeml untuned"] = ("forgeml", workdir / f"{name}.fml")
    if tune_minutes > 0:
        start = time.perf_counter()
        manifest = compile_model(onnx_path, workdir / f"{name}.tuned.fml", CompileOptions(tune_minutes=tune_minutes))
        label = f"forgeml tuned ({tune_minutes:g} min budget)"
        engines[label] = ("forgeml", workdir / f"{name}.tuned.fml")
        meta[label] = {"compile_s": round(time.perf_counter() - start, 1), "tuning": manifest.tuning}
        # a plain compile afterwards (no budget: it consults the warm database), as a user's next build
        start = time.perf_counter()
        warm = compile_model(onnx_path, workdir / f"{name}.warm.fml", CompileOptions())
        meta[label]["warm_recompile"] = {"seconds": round(time.perf_counter() - start, 1),
                                         "trials": warm.tuning.get("trials", 0)}
    engines["onnxruntime"] = ("onnxruntime", onnx_path)
    engines["pytorch eager"] = ("pytorch-zoo", name)
    print(f"[{name}] measuring {', '.join(engines)}, a worker process each", file=sys.stderr, flush=True)
    cases = []
    for label, (times, worker) in measure_in_workers(engines, feeds, threads, repeat=repeat).items():
        engine = label.split()[0]
        cases.append(CaseResult(name=f"{name}: {label}", engine=engine, model=name, stats=Stats.of(times),
                                samples_ms=[t * 1e3 for t in times],
                                extra={"reference": label == "onnxruntime", "worker": worker, **meta.get(label, {})}))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mlp,resnet18,mobilenet_v2,bert_tiny")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tune-minutes", type=float, default=0.0)
    parser.add_argument("--repeat", type=int, default=100)
    parser.add_argument("--out", default=str(RESULTS / "cpu"))
    args = parser.parse_args()
    from forgeml.bench.harness import Report, machine_info
    from forgeml.bench.report import markdown_table

    cases = []
    with tempfile.TemporaryDirectory(prefix="forgeml-cpu-bench-") as tmp:
        for name in args.models.split(","):
            cases += bench_model(name, args.threads, args.tune_minutes, args.repeat, Path(tmp))
    report = Report(machine=machine_info(), settings={"threads": args.threads, "repeat": args.repeat,
                                                      "warmup": 10, "tune_minutes": args.tune_minutes,
                                                      "isolation": "process per engine, alternating blocks of 10"},
                    cases=cases)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report.save(out.with_suffix(".json"))
    m = report.machine
    text = [
        "# CPU latency: forgeml vs ONNX Runtime vs PyTorch eager",
        "",
        f"Machine: {m['cpu']} ({m['arch']}, {m['cores']} cores, {', '.join(m['vector_features'])}); "
        f"Python {m['python']}. {args.threads} threads for every engine; {args.repeat} runs each after 10 "
        "warm-up, alternating in blocks of 10 on the same seeded inputs, each engine in a process of its own. "
        "Ratio: p50 / ONNX Runtime p50 (below 1 is faster than ONNX Runtime).",
        "",
        f"Command: `python benchmarks/cpu.py --threads {args.threads} --tune-minutes {args.tune_minutes:g}"
        f" --models {args.models}`",
        "",
        markdown_table(report, ["case", "p50 ms", "p90 ms", "min ms", "p50 vs ref"]),
        "",
    ]
    for case in cases:
        if case.extra.get("tuning"):
            t = case.extra["tuning"]
            text.append(f"- {case.name}: {t['tasks']} kernels ({t['tasks_from_cache']} from the database), "
                        f"{t['trials']} trials in {t['seconds'] / 60:.1f} min; tuned schedules used for "
                        f"{t['tuned_kernels_used']} kernels, rules kept for {t['rule_kernels_kept']}; "
                        f"compile with tuning {case.extra['compile_s'] / 60:.1f} min. Next plain `forgeml compile`, "
                        f"database warm: {case.extra['warm_recompile']['trials']} trials, "
                        f"{case.extra['warm_recompile']['seconds']:.1f} s.")
    out.with_suffix(".md").write_text("\n".join(text) + "\n")
    print("\n".join(text))
    print(json.dumps({c.name: round(c.stats.p50_ms, 3) for c in cases}), file=sys.stderr)


if __name__ == "__main__":
    main()
