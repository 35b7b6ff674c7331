"""Per-kernel GPU time of forgeml artifacts (and PyTorch eager, cuDNN, for the same model), from
CUPTI through torch.profiler: which kernels a model's time goes to. Runs on the GPU machine after
`gpu.py unpack`; needs torch there (the profiler sees every CUDA kernel in the process, TVM's too).

    python benchmarks/gpu.py unpack --bundle .profbundle --work /tmp/prof
    python benchmarks/gpu_profile.py --work /tmp/prof --out $OUT/profile.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TVM_FFI_DISABLE_TORCH_C_DLPACK", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))


def kernel_times(run, runs: int = 5) -> list[dict]:
    """[{kernel, calls per run, us per run}], heaviest first, from `runs` profiled calls."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        run()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            run()
    rows = []
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if device_us <= 0 or event.key.startswith(("cudaDeviceSynchronize", "cudaStream", "Memcpy", "Memset")):
            continue
        rows.append({"kernel": event.key[:90], "calls": event.count / runs, "us": round(device_us / runs, 1)})
    torch.cuda.synchronize()
    return sorted(rows, key=lambda r: -r["us"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="gpu.py unpack's folder (plan.json, artifacts)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", help="comma-separated zoo models to profile (default: every case)")
    args = parser.parse_args()
    from gpu import _load_first, _torch_case, bench_inputs

    import forgeml
    from forgeml.runtime.device import DeviceRunner

    if (args.work / "lib").exists():
        os.environ["FORGEML_TVM_LIB"] = str(args.work / "lib")
    plan = json.loads((args.work / "plan.json").read_text())
    artifact = {v: args.work / "artifacts" / Path(a["path"]).name for c in plan["cases"]
                for v, a in [(f"{c['id']} {k}", a) for k, a in c["artifacts"].items()]}
    _load_first(next(iter(artifact.values())))
    report = {}
    wanted = set(args.models.split(",")) if args.models else None
    for case in plan["cases"]:
        if wanted and case["model"] not in wanted:
            continue
        feeds = bench_inputs(case["model"], case["batch"])
        for variant in case["artifacts"]:
            runner = DeviceRunner(forgeml.load(artifact[f"{case['id']} {variant}"]), feeds)
            report[f"{case['id']} forgeml {variant}"] = kernel_times(runner)
        run, _ = _torch_case(case["model"], feeds, "fp32")
        report[f"{case['id']} pytorch fp32"] = kernel_times(run)
        for name in [k for k in report if k.startswith(case["id"])]:
            rows = report[name]
            print(f"\n{name}: {sum(r['us'] for r in rows):.0f} us of kernels per run, {len(rows)} kernels")
            for r in rows[:14]:
                print(f"  {r['us']:9.1f} us  x{r['calls']:.0f}  {r['kernel']}")
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
