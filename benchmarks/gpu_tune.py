"""MetaSchedule tuning of zoo models on a GPU machine that has no TVM compiler (this project's lent GPUs).

    python benchmarks/gpu_tune.py write --out .gputune --models resnet18 --batches 32 --precisions fp16 --trials 400
    # device call, carry .gputune/tune.tar.xz:  bash benchmarks/gpu_tune_device.sh
    python benchmarks/gpu_tune.py import --out .gputune --results <the call's files_at>/gputune

`write` exports each zoo model (build/gpu/onnx is reused when present), writes one measurement batch
per case with `forgeml tune --measure-elsewhere` (candidates from MetaSchedule's evolutionary search,
seeded by the tuning database, plus forgeml's tensor-core tilings of each fp16 GEMM not tuned
before, plus each kernel's rule-based schedule), and the runtime pieces a bare GPU machine needs:
the TVM runtime libraries (xz) and the cp312 apache-tvm-ffi wheel (copied from --wheels).
Everything is tarred with xz so that it fits one device call (64 MiB). `--trials 0` writes the
tilings alone; `--conv-layouts NCHW` tunes the kernels of `forgeml compile --conv-layout NCHW` (the
default, auto, those of the compiler's default layout: NHWC in fp16).
The device script measures each batch with `python -m forgeml.runtime.measure` (numpy + forgeml's
runtime; several packs in one call: PACKS="A/tune.tar.xz B/tune.tar.xz") and returns
<pack>/<case>.results.json; `import` commits them to the target's tuning database, where the next
`forgeml compile` (and `benchmarks/gpu.py prepare`) for that target finds them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu import _case_id, _copy_runtime  # noqa: E402  (the GPU benchmark's runtime packing)


def _say(msg: str) -> None:
    print(f"[gpu-tune {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def write(out: Path, models: list[str], batches: list[int], precisions: list[str], trials: int, target: str,
          wheels: Path, onnx_dir: Path, refine: bool, conv_layouts: list[str]) -> list[str]:
    from forgeml.compiler.build import tune_model
    from forgeml.zoo import export_zoo_model

    if out.exists():
        shutil.rmtree(out)
    staging = out / "staging"
    (staging / "batches").mkdir(parents=True)
    onnx_dir.mkdir(parents=True, exist_ok=True)
    cases = []
    for model in models:
        for batch in batches:
            onnx_path = onnx_dir / f"{_case_id(model, batch)}.onnx"
            if not onnx_path.exists():
                _say(f"exporting {onnx_path.name}")
                export_zoo_model(model, onnx_path, batch=batch)
            for precision, layout in itertools.product(precisions, conv_layouts):
                case = f"{_case_id(model, batch)}_{precision}" + ("" if layout == "auto" else f"_{layout.lower()}")
                _say(f"writing the batch for {case} ({trials} candidates, {target})")
                summary = tune_model(onnx_path, target, trials=trials, precision=precision, refine=refine,
                                     measure_elsewhere=staging / "batches" / case, say=_say, conv_layout=layout)
                _say(f"{case}: {summary.candidates} candidates for {summary.kernels_in_batch}/{summary.kernels} "
                     f"kernels, {summary.rule_candidates} rule schedules, {summary.build_errors} build errors, "
                     f"{summary.megabytes} MB, {summary.seconds:.0f} s"
                     + (f"; first build error: {summary.first_build_error}" if summary.first_build_error else ""))
                cases.append(case)
    _copy_runtime(staging)
    (staging / "wheels").mkdir()
    for wheel in sorted(wheels.glob("apache_tvm_ffi-*cp312*.whl")):
        shutil.copy(wheel, staging / "wheels" / wheel.name)
    if not any((staging / "wheels").iterdir()):
        _say(f"warning: no cp312 apache_tvm_ffi wheel in {wheels}: the device must have tvm_ffi already")
    (staging / "cases.json").write_text(json.dumps(cases))
    with tarfile.open(out / "tune.tar.xz", "w:xz") as tar:
        tar.add(staging, arcname="gputune")
    size = (out / "tune.tar.xz").stat().st_size / 2**20
    _say(f"{out / 'tune.tar.xz'}: {size:.1f} MiB for {len(cases)} batches" + ("  [over 64 MiB: lower --trials]"
                                                                             if size > 63 else ""))
    return cases


def import_results(out: Path, results: Path) -> None:
    from forgeml.compiler.build import import_measurements

    staging = out / "staging"
    for case in json.loads((staging / "cases.json").read_text()):
        measured = results / f"{case}.results.json"
        if not measured.exists():
            _say(f"{case}: no {measured.name} in {results}; skipped")
            continue
        batch_dir = staging / "batches" / case
        shutil.copy(measured, batch_dir / "results.json")
        summary = import_measurements(batch_dir)
        _say(f"{case}: {summary.records} records ({summary.failed} failed, {summary.wrong} with wrong outputs) "
             f"from {summary.device} into {summary.database}")
        for k in summary.kernels:
            speedup = "-" if k["speedup"] is None else f"{k['speedup']:.2f}x"
            print(f"  {k['kernel']:<50} rules {k['rules_us']} us, best tuned {k['best_us']} us ({speedup}, "
                  f"{k['best_source']})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="write measurement batches and the runtime pieces, tarred")
    w.add_argument("--out", type=Path, default=ROOT / ".gputune")
    w.add_argument("--models", nargs="+", default=["resnet18"])
    w.add_argument("--batches", nargs="+", type=int, default=[32])
    w.add_argument("--precisions", nargs="+", default=["fp16"], choices=["fp32", "fp16"])
    w.add_argument("--trials", type=int, default=400, help="candidates per batch")
    w.add_argument("--target", default="cuda-sm90")
    w.add_argument("--refine", action="store_true", help="search kernels that have records too")
    w.add_argument("--conv-layouts", nargs="+", default=["auto"], choices=["auto", "NCHW", "NHWC"])
    w.add_argument("--wheels", type=Path, default=ROOT / ".gpubundle" / "wheels")
    w.add_argument("--onnx-dir", type=Path, default=ROOT / "build" / "gpu" / "onnx")
    i = sub.add_parser("import", help="commit the device's results.json files to the tuning database")
    i.add_argument("--out", type=Path, default=ROOT / ".gputune")
    i.add_argument("--results", type=Path, required=True, help="the directory holding <case>.results.json")
    args = parser.parse_args()
    if args.command == "write":
        write(args.out, args.models, args.batches, args.precisions, args.trials, args.target, args.wheels,
              args.onnx_dir, args.refine, args.conv_layouts)
    else:
        import_results(args.out, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
