"""Per-kernel profile of an ONNX model compiled by forgeml for this CPU, beside ONNX Runtime's per-op profile.

    python benchmarks/profile_cpu.py model.onnx                  # top 25 kernels of each engine
    python benchmarks/profile_cpu.py model.onnx --top 40 --runs 30 --threads 2
    python benchmarks/profile_cpu.py model.onnx --json prof.json # every kernel, for before/after diffs

The model is compiled as `forgeml compile -t x86-64` does (untuned, no verification) into a temporary
artifact; then forgeml.bench.kernels profiles each engine in a process of its own on the same seeded
inputs (forgeml: the VM's instrument hook around each kernel call; ONNX Runtime: its own profiler, grouped
by op type and first input shape), as `benchmarks/cpu.py --kernels` and `real_models.py --kernels` do.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("onnx", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--target", default="x86-64")
    ap.add_argument("--json", type=Path, default=None, help="write every kernel's row here")
    args = ap.parse_args(argv)

    import forgeml
    from forgeml.bench.kernels import profile_pair, section

    with tempfile.TemporaryDirectory(prefix="forgeml-profile-") as tmp:
        artifact = Path(tmp) / "model.fml"
        forgeml.compile_model(args.onnx, artifact, target=args.target, verify=False)
        kernels = profile_pair(artifact, args.onnx, args.threads, args.runs)
    totals = {engine: sum(row["ms"] for row in kernels[engine]) for engine in ("forgeml", "onnxruntime")}
    print(f"load {os.getloadavg()[0]:.1f}; {args.threads} threads, {args.runs} runs; sum of kernels: forgeml "
          f"{totals['forgeml']:.3f} ms, ONNX Runtime {totals['onnxruntime']:.3f} ms\n")
    print("\n".join(section(args.onnx.name, kernels, args.top)))
    if args.json:
        args.json.write_text(json.dumps(kernels, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
