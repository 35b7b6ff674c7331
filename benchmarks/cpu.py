"""CPU speed, side by side: forgeml untuned (rule-based schedules), forgeml tuned, ONNX Runtime and
PyTorch eager, on each zoo model, same inputs and thread count, alternating in one run. Each engine runs
in a process of its own (forgeml.bench.worker, as `forgeml bench`): a TVM session pins its process to
core 0, which would squeeze any engine timed after it in the same process.

    python benchmarks/cpu.py --threads 2 --tune-minutes 20            # full run (tuning persists)
    python benchmarks/cpu.py --models mlp,bert_tiny --tune-minutes 0  # untuned only
    python benchmarks/cpu.py --models resnet18,mobilenet_v2 --tune-minutes 20 --kernels 2  # issue 19's check

After the timing, the models whose forgeml build is slowest against ONNX Runtime (`--kernels N`, default 2)
are profiled per kernel (forgeml.bench.kernels): forgeml's kernels beside ONNX Runtime's ops, for the
untuned artifact and, with tuning, the tuned one.

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
        meta[label] = {"compile_s": round(time.perf_counter() - start, 1), "tuning": manifest.tuning,
                       "verification": manifest.verification}
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


def _verified(verification: dict) -> str:
    """The tuned artifact's compile-time check against ONNX Runtime, in words."""
    if verification.get("skipped"):
        return f"Verification skipped: {verification['skipped']}."
    if "max_abs_error" in verification:
        return f"Verified against ONNX Runtime: max abs error {verification['max_abs_error']:.2g}."
    return "Not verified."


def _ratio(cases: list, model: str, label: str) -> float | None:
    by_label = {c.name.split(": ", 1)[1]: c for c in cases if c.model == model}
    if label not in by_label or "onnxruntime" not in by_label:
        return None
    return by_label[label].stats.p50_ms / by_label["onnxruntime"].stats.p50_ms


def kernel_sections(cases: list, models: list[str], count: int, threads: int, workdir: Path) -> list[str]:
    """Per-kernel tables (markdown) of the `count` models with the highest untuned ratio; each forgeml
    artifact timed (untuned, tuned) beside ONNX Runtime."""
    from forgeml.bench.kernels import method, profile_pair, section
    from forgeml.zoo import example_inputs

    ranked = sorted((m for m in models if _ratio(cases, m, "forgeml untuned") is not None),
                    key=lambda m: -(_ratio(cases, m, "forgeml untuned") or 0.0))
    lines: list[str] = []
    for model in ranked[:count]:
        for label, artifact in (("untuned", workdir / f"{model}.fml"), ("tuned", workdir / f"{model}.tuned.fml")):
            if not artifact.exists():
                continue
            print(f"[{model}] kernel profiles ({label})", file=sys.stderr, flush=True)
            ratio = next((_ratio(cases, model, c.name.split(": ", 1)[1]) for c in cases
                          if c.model == model and c.name.split(": ", 1)[1].startswith(f"forgeml {label}")), None)
            try:
                kernels = profile_pair(artifact, workdir / f"{model}.onnx", threads,
                                       feeds=example_inputs(model, seed=0))
            except Exception as err:  # noqa: BLE001 (the timing stands without the profile)
                lines += [f"### {model}, forgeml {label}: kernel profile failed: {err}", ""]
                continue
            lines += section(f"{model}, forgeml {label} ({ratio:.2f}x ONNX Runtime)", kernels)
    if lines:
        lines = ["## Where the time goes: the slowest models per kernel", "", method(threads, 10), ""] + lines
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mlp,resnet18,mobilenet_v2,bert_tiny")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tune-minutes", type=float, default=0.0)
    parser.add_argument("--repeat", type=int, default=100)
    parser.add_argument("--out", default=str(RESULTS / "cpu"))
    parser.add_argument("--kernels", type=int, default=2, metavar="N",
                        help="per-kernel tables for the N models slowest against ONNX Runtime (0: none)")
    args = parser.parse_args()
    from forgeml.bench.harness import Report, machine_info
    from forgeml.bench.report import markdown_table

    cases = []
    models = args.models.split(",")
    with tempfile.TemporaryDirectory(prefix="forgeml-cpu-bench-") as tmp:
        for name in models:
            cases += bench_model(name, args.threads, args.tune_minutes, args.repeat, Path(tmp))
        kernels = kernel_sections(cases, models, args.kernels, args.threads, Path(tmp)) if args.kernels else []
    report = Report(machine=machine_info(), settings={"threads": args.threads, "repeat": args.repeat,
                                                      "warmup": 10, "block": 10, "tune_minutes": args.tune_minutes,
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
        "Ratios (below 1 is faster than ONNX Runtime): p50 / ONNX Runtime p50, and paired: the median over the "
        "alternation rounds of (block median / ONNX Runtime's block median in the same round), which cancels "
        "the machine's slow speed drifts (forgeml.bench.harness.paired_ratio).",
        "",
        f"Command: `python benchmarks/cpu.py --threads {args.threads} --tune-minutes {args.tune_minutes:g}"
        f" --models {args.models} --kernels {args.kernels}`",
        "",
        markdown_table(report, ["case", "p50 ms", "p90 ms", "min ms", "p50 vs ref", "paired vs ref"]),
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
                        f"{case.extra['warm_recompile']['seconds']:.1f} s. {_verified(case.extra['verification'])}")
    text += ["", *kernels] if kernels else []
    out.with_suffix(".md").write_text("\n".join(text) + "\n")
    print("\n".join(text))
    print(json.dumps({c.name: round(c.stats.p50_ms, 3) for c in cases}), file=sys.stderr)


if __name__ == "__main__":
    main()
