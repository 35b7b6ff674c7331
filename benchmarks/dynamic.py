"""Dynamic shapes (issue 21): one artifact for a range of shapes against artifacts compiled for exactly one.

bert_tiny exported with dynamic batch and sequence, compiled once for batch 1..8 and sequence 1..128;
resnet18 exported with a dynamic batch, compiled once for batch 1..16. Checks the issue's points against
ONNX Runtime and the refusals outside the ranges, then times the dynamic artifact against static artifacts
compiled for exactly that shape (and ONNX Runtime on the dynamic ONNX file), each engine in a worker
process of its own, alternating blocks (`forgeml.bench.harness.measure_in_workers`). Writes
benchmarks/results/dynamic.{json,md}.

    python benchmarks/dynamic.py [--threads 2] [--repeat 100] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"

# model -> (zoo name, input, dynamic axes, range given to --input-shape, points checked, refused shapes,
# shapes timed: dynamic vs a static artifact of exactly that shape)
CASES: dict[str, dict[str, Any]] = {
    "bert_tiny": {"input": "input_ids", "axes": (0, 1), "ranges": ((1, 8), (1, 128)),
                  "check": [(1, 1), (1, 128), (3, 77), (8, 128)], "refuse": [(9, 16), (1, 129)],
                  "time": [(1, 128), (8, 128), (3, 77)]},
    "resnet18": {"input": "x", "axes": (0,), "ranges": ((1, 16), 3, 224, 224),
                 "check": [(1, 3, 224, 224), (5, 3, 224, 224), (16, 3, 224, 224)], "refuse": [(17, 3, 224, 224)],
                 "time": [(1, 3, 224, 224), (16, 3, 224, 224), (5, 3, 224, 224)]},
}


def _dims(dims) -> str:
    return ",".join(f"{d[0]}..{d[1]}" if isinstance(d, tuple) else str(d) for d in dims)


def _feeds(name: str, spec: dict, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    from forgeml.zoo import BERT_VOCAB

    rng = np.random.default_rng(0)
    if name == "bert_tiny":
        return {spec["input"]: rng.integers(0, BERT_VOCAB, size=shape, dtype=np.int64)}
    return {spec["input"]: rng.standard_normal(shape).astype(np.float32)}


def export(name: str, spec: dict, workdir: Path) -> Path:
    """The zoo model exported to ONNX with the case's axes dynamic."""
    from forgeml.compiler.frontend.torch_export import export_module
    from forgeml.zoo import get_model, input_shapes

    model = get_model(name)
    axes = {spec["input"]: {a: f"{spec['input']}_dim{a}" for a in spec["axes"]}}
    return export_module(model.build(), input_shapes(name), workdir / f"{name}_dynamic.onnx",
                         input_dtypes={k: dt for k, (_, dt) in model.inputs.items()},
                         output_names=list(model.output_names), dynamic_axes=axes)


def compile_one(onnx_path: Path, out: Path, shape: str) -> tuple[Any, float]:
    from forgeml.compiler.build import CompileOptions, compile_model
    from forgeml.shapes import parse_input_shapes

    start = time.perf_counter()
    manifest = compile_model(onnx_path, out, CompileOptions(target="x86-64", input_shapes=parse_input_shapes(
        [shape]), use_tuning_db=False))
    return manifest, round(time.perf_counter() - start, 1)


def check(name: str, spec: dict, onnx_path: Path, artifact: Path) -> dict[str, Any]:
    """Max abs error against ONNX Runtime at each check point, and the one-line refusals."""
    import forgeml
    from forgeml.compiler.verify import compare, onnxruntime_session
    from forgeml.errors import ForgeError

    session, ort = forgeml.load(artifact), onnxruntime_session(onnx_path)
    out: dict[str, Any] = {"points": {}, "refused": {}}
    for shape in spec["check"]:
        feeds = _feeds(name, spec, shape)
        expected = dict(zip([o.name for o in ort.get_outputs()], ort.run(None, feeds)))
        out["points"][str(shape)] = compare(session.run(feeds), expected)[0]
    for shape in spec["refuse"]:
        try:
            session.run(_feeds(name, spec, shape))
            out["refused"][str(shape)] = "NOT REFUSED"
        except ForgeError as err:
            out["refused"][str(shape)] = str(err)
    return out


def run_case(name: str, spec: dict, workdir: Path, threads: int, repeat: int) -> dict[str, Any]:
    from forgeml.bench.harness import Stats, measure_in_workers

    row: dict[str, Any] = {"model": name, "range": f"{spec['input']}={_dims(spec['ranges'])}"}
    onnx_path = export(name, spec, workdir)
    print(f"[{name}] compiling the dynamic artifact ({row['range']})", file=sys.stderr, flush=True)
    dynamic = workdir / f"{name}_dynamic.fml"
    manifest, row["compile_s"] = compile_one(onnx_path, dynamic, row["range"])
    row["functions"] = manifest.functions
    row["verification_points"] = manifest.verification.get("points")
    row["artifact_mb"] = round(dynamic.stat().st_size / 1e6, 2)
    row["check"] = check(name, spec, onnx_path, dynamic)
    row["timings"] = []
    for shape in spec["time"]:
        static = workdir / f"{name}_{'x'.join(map(str, shape))}.fml"
        print(f"[{name}] compiling a static artifact for {shape}", file=sys.stderr, flush=True)
        _, static_s = compile_one(onnx_path, static, f"{spec['input']}={_dims(shape)}")
        engines = {"dynamic": ("forgeml", dynamic), "static": ("forgeml", static),
                   "onnxruntime": ("onnxruntime", onnx_path)}
        print(f"[{name}] timing {shape}", file=sys.stderr, flush=True)
        timed = measure_in_workers(engines, _feeds(name, spec, shape), threads, repeat=repeat)
        entry = {"shape": list(shape), "static_compile_s": static_s, "static_artifact_mb":
                 round(static.stat().st_size / 1e6, 2)}
        for label, (times, worker) in timed.items():
            entry[label] = {"stats": asdict(Stats.of(times)), "samples_ms": [t * 1e3 for t in times],
                            "worker": worker}
        entry["ratio_p50"] = entry["dynamic"]["stats"]["p50_ms"] / entry["static"]["stats"]["p50_ms"]
        row["timings"].append(entry)
    return row


def markdown(rows: list[dict[str, Any]], machine: dict[str, Any], args: argparse.Namespace) -> str:
    lines = ["# Dynamic shapes: one artifact for a range vs static artifacts for exactly one shape", "",
             f"Machine: {machine['cpu']} ({machine['arch']}, {machine['cores']} cores); the engines alternate in "
             f"blocks of 10, each in a worker process of its own. {args.threads} threads, {args.repeat} timed "
             f"calls each after 10 warm-up; x86-64, O2, untuned; load average {os.getloadavg()[0]:.1f} at the end. "
             f"`python benchmarks/dynamic.py --repeat {args.repeat}`.", "",
             "| model | shape | function run | dynamic p50 ms | static p50 ms | ratio | ONNX Runtime p50 ms |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        buckets = {tuple(f["dimensions"][k] for k in sorted(f["dimensions"])): f["name"]
                   for f in row["functions"] if f["dimensions"]}
        for t in row["timings"]:
            sizes = tuple(t["shape"][a] for a in CASES[row["model"]]["axes"])  # variables <input>_dim<axis>
            lines.append(f"| {row['model']} | {tuple(t['shape'])} | {buckets.get(sizes, 'main (symbolic)')} | "
                         f"{t['dynamic']['stats']['p50_ms']:.3f} | {t['static']['stats']['p50_ms']:.3f} | "
                         f"{t['ratio_p50']:.2f} | {t['onnxruntime']['stats']['p50_ms']:.3f} |")
    lines += ["", "Checks against ONNX Runtime (max abs error) and refusals:", ""]
    for row in rows:
        lines.append(f"- {row['model']} `{row['range']}` (compiled in {row['compile_s']} s, {row['artifact_mb']} MB, "
                     f"functions {', '.join(f['name'] for f in row['functions'])}): "
                     + ", ".join(f"{k}: {v:.2g}" for k, v in row["check"]["points"].items()))
        for shape, message in row["check"]["refused"].items():
            lines.append(f"  - {shape} refused: `{message}`")
        for f in row["functions"]:
            if f.get("memory"):
                lines.append(f"  - {f['name']}: {f['memory']['planned_bytes'] / 1e6:.2f} MB planned, "
                             f"{f['memory']['symbolic_storage']} storage of run-time size, "
                             f"{f['memory']['per_call_tensors']} tensor(s) allocated per call (outputs)")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=100)
    parser.add_argument("--workdir", type=Path, help="keep the ONNX files and artifacts here")
    parser.add_argument("--models", nargs="*", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    from forgeml.bench.harness import machine_info

    with tempfile.TemporaryDirectory(prefix="forgeml-dynamic-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        rows = [run_case(name, CASES[name], workdir, args.threads, args.repeat) for name in args.models]
    machine = machine_info()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "dynamic.json").write_text(json.dumps({"machine": machine, "threads": args.threads,
                                                      "repeat": args.repeat, "rows": rows}, indent=1))
    (RESULTS / "dynamic.md").write_text(markdown(rows, machine, args))
    print((RESULTS / "dynamic.md").read_text())


if __name__ == "__main__":
    main()
