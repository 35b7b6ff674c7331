"""One zoo model across targets in one report: x86-64 native, aarch64 emulated (qemu), aarch64 over
TVM RPC (a server under qemu, found through a tracker), with ONNX Runtime on the host as the reference.

Needs `make toolchains`. Writes benchmarks/results/cross_targets.{md,json}.

    python benchmarks/cross_targets.py --model resnet18 --repeat 30 --offsite-seconds 120
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--offsite-seconds", type=float, default=120.0)
    args = parser.parse_args()

    from tvm.rpc.tracker import Tracker

    import forgeml
    from forgeml.bench.report import markdown_table
    from forgeml.bench.run import run_benchmark
    from forgeml.targets.rpc import EmulatedServer
    from forgeml.zoo import export_zoo_model

    with tempfile.TemporaryDirectory(prefix="forgeml-cross-") as tmp:
        onnx_path = Path(tmp) / f"{args.model}.onnx"
        export_zoo_model(args.model, onnx_path)
        artifacts = []
        for target in ("x86-64", "aarch64"):
            artifacts.append(Path(tmp) / f"{args.model}-{target}.fml")
            forgeml.compile_model(onnx_path, artifacts[-1], target=target)
        tracker = Tracker("127.0.0.1", port=_free_port(), port_end=65535, silent=True)
        address = f"127.0.0.1:{tracker.port}"
        try:
            with EmulatedServer("aarch64", port=_free_port(), tracker=address, key="qemu-aarch64"):
                start = time.perf_counter()
                report = run_benchmark(artifacts, threads=args.threads, repeat=args.repeat, emulate=True,
                                       tracker=address, device_key="qemu-aarch64",
                                       offsite_budget_s=args.offsite_seconds)
                seconds = time.perf_counter() - start
        finally:
            tracker.terminate()
    RESULTS.mkdir(exist_ok=True)
    report.save(RESULTS / "cross_targets.json")
    m = report.machine
    errors = "; ".join(f"{c.name}: max rel error {c.extra['max_rel_error']:.2g}" for c in report.cases
                       if "max_rel_error" in c.extra)
    text = "\n".join([
        f"# {args.model} across targets: native, emulated, over RPC",
        "",
        f"Host: {m['cpu']}, {m['cores']} cores, Python {m['python']}; {args.threads} threads. Emulated and RPC "
        f"rows run under qemu-aarch64 on this host (timings are qemu's, not a device's); RPC rows are timed "
        f"on the device by TVM's time_evaluator. Runs cut to about {args.offsite_seconds:g} s each. "
        f"Benchmark took {seconds:.0f} s.",
        f"Command: `python benchmarks/cross_targets.py --model {args.model} --repeat {args.repeat} "
        f"--offsite-seconds {args.offsite_seconds:g}`",
        "",
        markdown_table(report, ["case", "p50 ms", "p90 ms", "min ms", "runs/s", "size MB", "p50 vs ref"]),
        "",
        f"Outputs vs ONNX Runtime: {errors}.",
        "",
    ])
    (RESULTS / "cross_targets.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
