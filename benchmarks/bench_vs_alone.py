"""Proves the instrument: ONNX Runtime's p50 inside `forgeml bench` against ONNX Runtime timed alone in a fresh
process (same model, seeded inputs and thread count), alternating rounds. They should agree within noise.

    python benchmarks/bench_vs_alone.py m.fml m.onnx --threads 2 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ALONE = """
import json, sys, time
import numpy as np
from forgeml.compiler.verify import onnxruntime_session, seeded_inputs
from forgeml.runtime.artifact import open_artifact
artifact, model, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
feeds = seeded_inputs(open_artifact(artifact).manifest.inputs, seed=0)
session = onnxruntime_session(model, threads=threads)
for _ in range(10):
    session.run(None, feeds)
times = []
while len(times) < 100:
    time.sleep(0.02)
    for _ in range(10):
        start = time.perf_counter(); session.run(None, feeds); times.append(time.perf_counter() - start)
print(json.dumps({"p50_ms": float(np.median(times)) * 1e3}))
"""


def alone(artifact: str, model: str, threads: int) -> float:
    out = subprocess.run([sys.executable, "-c", ALONE, artifact, model, str(threads)], capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["p50_ms"]


def in_bench(artifact: str, model: str, threads: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "bench.json"
        subprocess.run([sys.executable, "-m", "forgeml.cli", "bench", artifact, "--onnx", model, "--baseline",
                        "onnxruntime", "--threads", str(threads), "--no-memory", "--json", str(report)],
                       capture_output=True, text=True, check=True)
        cases = json.loads(report.read_text())["cases"]
    return next(c["stats"]["p50_ms"] for c in cases if c["name"].startswith("onnxruntime"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact")
    parser.add_argument("model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    pairs = [(alone(args.artifact, args.model, args.threads), in_bench(args.artifact, args.model, args.threads))
             for _ in range(args.rounds)]
    for i, (a, b) in enumerate(pairs):
        print(f"round {i + 1}: ONNX Runtime alone {a:.2f} ms, inside forgeml bench {b:.2f} ms ({b / a - 1:+.1%})")
    a, b = np.median([p[0] for p in pairs]), np.median([p[1] for p in pairs])
    print(f"median: alone {a:.2f} ms, in bench {b:.2f} ms ({b / a - 1:+.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
