"""Reload leak: many load -> run -> drop -> gc.collect() cycles of one model in one fresh process.

Issue 20: a server that reloads models grew without bound (mlp: RSS +40% and 2,500 mappings of
deleted forgeml-*.so copies after 500 cycles; ResNet-18 +215 kB a cycle; vm.max_map_count reached
after ~13,000 reloads). Measured here in a fresh child per engine: RSS (VmRSS) and the number of
memory mappings (/proc/self/maps lines; those of forgeml's library copies counted apart) after
--warmup cycles and after all of them; growth between the two, in percent. With --onnxruntime the
same cycles of an InferenceSession run in another child, for scale. Writes
benchmarks/results/reload_leak.{md,json}.

    python benchmarks/reload_leak.py --model resnet18 --cycles 500
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

CHILD = """
import gc, json, sys, time
import numpy as np

engine, artifact, onnx_path, cycles, warmup = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])

def snapshot():
    maps = open("/proc/self/maps").read().splitlines()
    rss = int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmRSS")))
    return {"rss_kb": rss, "mappings": len(maps), "library_mappings": sum("/forgeml-" in l for l in maps)}

if engine == "forgeml":
    import forgeml
    def cycle():
        s = forgeml.load(artifact, threads=1)
        s.run({t.name: np.zeros(t.shape, t.dtype) for t in s.inputs})
else:
    import onnxruntime as ort
    options = ort.SessionOptions(); options.intra_op_num_threads = 1; options.inter_op_num_threads = 1
    types = {"tensor(float)": "float32", "tensor(int64)": "int64"}
    def cycle():
        s = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
        s.run(None, {i.name: np.zeros(i.shape, types[i.type]) for i in s.get_inputs()})

trace = []
start = time.perf_counter()
for i in range(cycles):
    cycle()
    gc.collect()
    if i + 1 == warmup or (i + 1) % 50 == 0 or i + 1 == cycles:
        trace.append({"cycle": i + 1, **snapshot()})
print(json.dumps({"trace": trace, "seconds": time.perf_counter() - start}))
"""


def measure(engine: str, artifact: Path, onnx_path: Path, cycles: int, warmup: int) -> dict:
    """One fresh child running `cycles` cycles; its trace, and growth from cycle `warmup` to the end."""
    proc = subprocess.run([sys.executable, "-c", CHILD, engine, str(artifact), str(onnx_path), str(cycles),
                           str(warmup)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{engine} child failed ({proc.returncode}): {proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    first, last = result["trace"][0], result["trace"][-1]
    result["growth_pct"] = {k: 100.0 * (last[k] - first[k]) / first[k] for k in ("rss_kb", "mappings")}
    result["rss_kb_per_cycle"] = (last["rss_kb"] - first["rss_kb"]) / max(last["cycle"] - first["cycle"], 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18", help="zoo model")
    parser.add_argument("--cycles", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=10, help="growth is measured from this cycle on")
    parser.add_argument("--onnxruntime", action="store_true", help="also run the cycles with ONNX Runtime")
    args = parser.parse_args()
    import forgeml
    from forgeml.bench.harness import machine_info
    from forgeml.zoo import export_zoo_model

    engines = ["forgeml", *(["onnxruntime"] if args.onnxruntime else [])]
    with tempfile.TemporaryDirectory(prefix="forgeml-reload-") as tmp:
        onnx_path = export_zoo_model(args.model, Path(tmp) / f"{args.model}.onnx")
        artifact = Path(tmp) / f"{args.model}.fml"
        forgeml.compile_model(onnx_path, artifact)
        results = {e: measure(e, artifact, onnx_path, args.cycles, args.warmup) for e in engines}
    machine = machine_info()
    command = (f"python benchmarks/reload_leak.py --model {args.model} --cycles {args.cycles} --warmup {args.warmup}"
               + (" --onnxruntime" if args.onnxruntime else ""))
    lines = [
        f"# Reload leak: {args.cycles} load/run/drop cycles of {args.model} in one process",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, Python {machine['python']}; 1 thread; "
        f"growth from cycle {args.warmup} to {args.cycles}. Command: `{command}`",
        "",
        "| engine | RSS at warm-up | RSS at end | RSS growth | per cycle | mappings at warm-up | at end | growth "
        "| forgeml library mappings at end | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for engine, r in results.items():
        first, last = r["trace"][0], r["trace"][-1]
        lines.append(f"| {engine} | {first['rss_kb'] / 1024:.1f} MB | {last['rss_kb'] / 1024:.1f} MB "
                     f"| {r['growth_pct']['rss_kb']:+.2f}% | {r['rss_kb_per_cycle']:+.1f} kB | {first['mappings']} "
                     f"| {last['mappings']} | {r['growth_pct']['mappings']:+.2f}% | {last['library_mappings']} "
                     f"| {r['seconds']:.0f} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "reload_leak.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "reload_leak.json").write_text(json.dumps({"machine": machine, "command": command, "model": args.model,
                                                          "results": results}, indent=2))
    print("\n".join(lines))
    worst = max(max(results["forgeml"]["growth_pct"].values()), 0.0)
    print(f"forgeml: largest growth {worst:.2f}% ({'under' if worst < 5 else 'NOT under'} 5%)")
    if worst >= 5:
        sys.exit(1)

if __name__ == "__main__":
    main()
