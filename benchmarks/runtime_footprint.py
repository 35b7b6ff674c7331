"""Cold start and memory: forgeml's runtime vs ONNX Runtime, fresh processes, alternating.

For each zoo model (default: mlp, resnet18) and each engine, start a fresh Python process that
imports the runtime, loads the model, and runs it once on seeded inputs. Measured per process:
wall time from process start to first output, and peak RSS (the child's VmHWM). Medians over
--runs processes (>= 5), engines alternating. Writes benchmarks/results/runtime_footprint.{md,json}.

    python benchmarks/runtime_footprint.py --runs 7
"""

from __future__ import annotations

import argparse
import compileall
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

CHILD = {
    "forgeml": """
import sys, numpy as np, forgeml
s = forgeml.load(sys.argv[1], threads=int(sys.argv[3]))
rng = np.random.default_rng(0)
feeds = {t.name: (rng.standard_normal(t.shape) if t.dtype.startswith("float") else rng.integers(0, 10, t.shape)
                  ).astype(t.dtype) for t in s.inputs}
s.run(feeds)
print("first output", flush=True)
print([l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")][0], flush=True)
""",
    "onnxruntime": """
import sys, numpy as np, onnxruntime as ort
o = ort.SessionOptions(); o.intra_op_num_threads = int(sys.argv[3]); o.inter_op_num_threads = 1
s = ort.InferenceSession(sys.argv[2], o, providers=["CPUExecutionProvider"])
rng = np.random.default_rng(0)
types = {"tensor(float)": "float32", "tensor(int64)": "int64"}
feeds = {i.name: (rng.standard_normal(i.shape) if types[i.type] == "float32" else rng.integers(0, 10, i.shape)
                  ).astype(types[i.type]) for i in s.get_inputs()}
s.run(None, feeds)
print("first output", flush=True)
print([l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")][0], flush=True)
""",
}


def one_process(engine: str, artifact: Path, onnx_path: Path, threads: int) -> tuple[float, float]:
    """(seconds from spawn to first output, peak RSS in MB) of one fresh process."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD[engine], str(artifact), str(onnx_path), str(threads)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    elapsed = time.perf_counter() - start
    peak_kb = proc.stdout.readline().strip()
    if proc.wait() != 0 or "first output" not in line:
        raise RuntimeError(f"{engine} child failed: {proc.stderr.read()}")
    # VmHWM, not wait4's ru_maxrss: the latter keeps the forking parent's RSS from before exec.
    return elapsed, int(peak_kb) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mlp,resnet18")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import forgeml
    from forgeml.bench.harness import machine_info
    from forgeml.zoo import export_zoo_model

    # Byte-compile forgeml as `pip install` does for both engines' packages: an editable checkout under
    # PYTHONDONTWRITEBYTECODE=1 would otherwise recompile the runtime's sources at every start.
    compileall.compile_dir(Path(forgeml.__file__).parent, quiet=1)

    rows, raw = [], {}
    with tempfile.TemporaryDirectory(prefix="forgeml-footprint-") as tmp:
        for name in args.models.split(","):
            onnx_path = export_zoo_model(name, Path(tmp) / f"{name}.onnx")
            artifact = Path(tmp) / f"{name}.fml"
            forgeml.compile_model(onnx_path, artifact)
            samples = {e: {"start_s": [], "rss_mb": []} for e in CHILD}
            for _ in range(max(args.runs, 5)):
                for engine in CHILD:  # alternate engines
                    t, rss = one_process(engine, artifact, onnx_path, args.threads)
                    samples[engine]["start_s"].append(t)
                    samples[engine]["rss_mb"].append(rss)
            raw[name] = samples
            med = {e: (statistics.median(s["start_s"]), statistics.median(s["rss_mb"])) for e, s in samples.items()}
            rows.append((name, med["forgeml"], med["onnxruntime"], artifact.stat().st_size / 1e6,
                         onnx_path.stat().st_size / 1e6))
            print(f"{name}: forgeml {med['forgeml'][0] * 1e3:.0f} ms {med['forgeml'][1]:.0f} MB | "
                  f"onnxruntime {med['onnxruntime'][0] * 1e3:.0f} ms {med['onnxruntime'][1]:.0f} MB", flush=True)
    machine = machine_info()
    lines = [
        "# Runtime footprint: process start to first output, and peak RSS",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, Python {machine['python']}; "
        f"{args.threads} threads; median of {max(args.runs, 5)} fresh processes per engine, alternating.",
        f"Command: `python benchmarks/runtime_footprint.py --runs {args.runs} --threads {args.threads}`",
        "",
        "| model | forgeml start->first output | ONNX Runtime | ratio | forgeml peak RSS | ONNX Runtime | ratio |"
        " .fml MB | .onnx MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, (ft, fr), (ot, orss), fml_mb, onnx_mb in rows:
        lines.append(f"| {name} | {ft * 1e3:.0f} ms | {ot * 1e3:.0f} ms | {ft / ot:.2f}x | {fr:.0f} MB | {orss:.0f} MB "
                     f"| {fr / orss:.2f}x | {fml_mb:.2f} | {onnx_mb:.2f} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "runtime_footprint.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "runtime_footprint.json").write_text(json.dumps({"machine": machine, "runs": raw}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
