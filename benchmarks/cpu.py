"""CPU speed, side by side: forgeml untuned (rule-based schedules), forgeml tuned, ONNX Runtime and
PyTorch eager, on each zoo model, same inputs and thread count, alternating in one run.

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


def _torch_runner(name: str, threads: int, feeds: dict):
    import torch

    from forgeml.zoo import get_model

    torch.set_num_threads(threads)
    module = get_model(name).build().eval()
    args = [torch.from_numpy(feeds[k]) for k in get_model(name).inputs]

    def run():
        with torch.inference_mode():
            return module(*args)

    return run


def bench_model(name: str, threads: int, tune_minutes: float, repeat: int, workdir: Path) -> list:
    import forgeml
    from forgeml.bench.harness import CaseResult, Stats, measure_alternating
    from forgeml.compiler.build import CompileOptions, compile_model
    from forgeml.compiler.verify import onnxruntime_session
    from forgeml.zoo import example_inputs, export_zoo_model

    onnx_path = export_zoo_model(name, workdir / f"{name}.onnx")
    feeds = example_inputs(name, seed=0)
    runners, meta = {}, {}
    start = time.perf_counter()
    compile_model(onnx_path, workdir / f"{name}.fml", CompileOptions(use_tuning_db=False))
    meta["forgeml untuned"] = {"compile_s": round(time.perf_counter() - start, 1)}
    session = forgeml.load(workdir / f"{name}.fml", threads=threads)
    runners["forgeml untuned"] = lambda: session.run(feeds)
    if tune_minutes > 0:
        start = time.perf_counter()
        manifest = compile_model(onnx_path, workdir / f"{name}.tuned.fml", CompileOptions(tune_minutes=tune_minutes))
        tuned = forgeml.load(workdir / f"{name}.tuned.fml", threads=threads)
        label = f"forgeml tuned ({tune_minutes:g} min budget)"
        runners[label] = lambda: tuned.run(feeds)
        meta[label] = {"compile_s": round(time.perf_counter() - start, 1), "tuning": manifest.tuning}
        # a plain compile afterwards (no budget: it consults the warm database), as a user's next build
        start = time.perf_counter()
        warm = compile_model(onnx_path, workdir / f"{name}.warm.fml", CompileOptions())
        meta[label]["warm_recompile"] = {"seconds": round(time.perf_counter() - start, 1),
                                         "trials": warm.tuning.get("trials", 0)}
    ort = onnxruntime_session(onnx_path, threads=threads)
    runners["onnxruntime"] = lambda: ort.run(None, feeds)
    runners["pytorch eager"] = _torch_runner(name, threads, feeds)
    print(f"[{name}] measuring {', '.join(runners)}", file=sys.stderr, flush=True)
    samples = measure_alternating(runners, warmup=10, repeat=repeat)
    cases = []
    for label, times in samples.items():
        engine = label.split()[0]
        cases.append(CaseResult(name=f"{name}: {label}", engine=engine, model=name, stats=Stats.of(times),
                                samples_ms=[t * 1e3 for t in times],
                                extra={"reference": label == "onnxruntime", **meta.get(label, {})}))
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
                                                      "warmup": 10, "tune_minutes": args.tune_minutes},
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
        "warm-up, alternating in blocks of 10 on the same seeded inputs. Ratio: p50 / ONNX Runtime p50 "
        "(below 1 is faster than ONNX Runtime).",
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
