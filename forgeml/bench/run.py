"""`forgeml bench`: measure artifacts side by side with ONNX Runtime on the same inputs and threads."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

from forgeml.bench.harness import (
    CaseResult,
    Report,
    Stats,
    machine_info,
    measure_alternating,
    peak_rss_subprocess,
)
from forgeml.errors import InvalidInput
from forgeml.runtime.artifact import open_artifact


def run_benchmark(artifacts: list[str | Path], baseline: str | None = "onnxruntime", threads: int = 2,
                  warmup: int = 10, repeat: int = 100, onnx_path: str | Path | None = None, memory: bool = True,
                  progress: Callable[[int, int], None] | None = None, emulate: bool = False, rpc: str | None = None,
                  tracker: str | None = None, device_key: str | None = None, offsite_budget_s: float = 60.0) -> Report:
    """Benchmark each artifact and, for each distinct source model, the baseline, alternating.

    Artifacts for this machine run here; with `emulate`, those for another architecture also run under
    qemu; with `rpc`/`tracker`, those the device can run also run there (timed on the device). The
    baseline always runs here. Off-site cases are measured after the local ones, about
    `offsite_budget_s` each."""
    import platform

    import forgeml
    from forgeml.compiler.verify import onnxruntime_session, seeded_inputs, source_onnx

    remote = remote_info = None
    if rpc or tracker:
        from forgeml.targets import rpc as rpc_device

        remote = rpc_device.connect(rpc, tracker, device_key)
        remote_info = rpc_device.remote_info(remote)  # None for a stock TVM server: send it everything
    runners, cases_meta, feeds_by_model, offsite, ort_by_model = {}, {}, {}, [], {}
    for path in map(Path, artifacts):
        manifest = open_artifact(path).manifest
        arch = manifest.target.get("arch")
        model_key = manifest.source.get("sha256", str(path))
        feeds = feeds_by_model.setdefault(model_key, seeded_inputs(manifest.inputs, seed=0))
        if remote is not None and (remote_info is None or remote_info.get("arch") == arch):
            offsite.append(("rpc", path, model_key))
        if arch != platform.machine():
            if emulate:
                offsite.append(("emulate", path, model_key))
            elif not any(p == path for _, p, _ in offsite):
                raise InvalidInput(f"{path} is built for {arch} and this machine is {platform.machine()}: add "
                                   f"--emulate, or --rpc/--tracker to run it on such a device")
        else:
            from forgeml.runtime.device import bench_runner

            session = forgeml.load(path, threads=threads)
            name = f"forgeml {path.name} ({manifest.target.get('name')})"
            runners[name], device_extra = bench_runner(session, feeds)  # GPU: device-resident, synchronized
            cases_meta[name] = dict(engine="forgeml", model=model_key, path=path, feeds=feeds,
                                    artifact_mb=path.stat().st_size / 1e6, device_extra=device_extra)
        if baseline == "onnxruntime" and f"onnxruntime:{model_key}" not in cases_meta:
            source = source_onnx(path, onnx_path)
            ort = ort_by_model[model_key] = onnxruntime_session(source, threads=threads)
            ort_name = f"onnxruntime {source.name}"
            runners[ort_name] = (lambda s=ort, f=feeds: s.run(None, f))
            if manifest.target.get("device") == "cuda":  # GPU artifact: ONNX Runtime's CUDA provider if present
                from forgeml.compiler.verify import onnxruntime_cuda_runner

                try:
                    cuda = onnxruntime_cuda_runner(source, feeds)
                except RuntimeError as e:  # the provider did not load: keep the CPU baseline, say so
                    warnings.warn(f"baseline on the CPU: {e}", stacklevel=1)
                    cuda = None
                if cuda is not None:
                    del runners[ort_name]
                    ort_name = f"onnxruntime-cuda {source.name}"
                    runners[ort_name] = cuda[0]
            cases_meta[ort_name] = cases_meta[f"onnxruntime:{model_key}"] = dict(
                engine="onnxruntime", model=model_key, path=source, feeds=feeds,
                artifact_mb=source.stat().st_size / 1e6)
        elif baseline not in (None, "none", "onnxruntime"):
            raise InvalidInput(f"unknown baseline '{baseline}'; known: onnxruntime, none")

    samples = measure_alternating(runners, warmup=warmup, repeat=repeat, progress=progress)
    cases = []
    for name, times in samples.items():
        meta = cases_meta[name]
        rss = peak_rss_subprocess(meta["engine"], meta["path"], meta["feeds"], threads) if memory else {}
        cases.append(CaseResult(
            name=name, engine=meta["engine"], model=meta["model"], stats=Stats.of(times),
            samples_ms=[t * 1e3 for t in times], peak_rss_mb=rss.get("peak_rss_mb"), artifact_mb=meta["artifact_mb"],
            extra={"reference": meta["engine"] == "onnxruntime", "path": str(meta["path"]),
                   "load_to_first_output_s": rss.get("load_to_first_output_s"), **meta.get("device_extra", {})},
        ))
    for placement, path, model_key in offsite:  # timed on the emulated or RPC device; checked against ORT
        feeds, ort = feeds_by_model[model_key], ort_by_model.get(model_key)
        expected = dict(zip([o.name for o in ort.get_outputs()], ort.run(None, feeds))) if ort else None
        if placement == "emulate":
            from forgeml.targets.emulate import emulated_case

            cases.append(emulated_case(path, feeds, model_key, threads, warmup, repeat, expected, offsite_budget_s))
        else:
            cases.append(rpc_device.remote_case(remote, remote_info, rpc or f"{tracker}/{device_key}", path, feeds,
                                                model_key, threads, warmup, repeat, expected, offsite_budget_s))
    settings = {"threads": threads, "warmup": warmup, "repeat": repeat, "block": 10, "inputs": "seeded normal, seed 0"}
    if offsite:
        settings["offsite"] = (f"emulated/RPC cases are timed on their device after the local ones, runs cut to "
                               f"about {offsite_budget_s:g} s each")
    return Report(machine=machine_info(), settings=settings, cases=cases)
