"""`forgeml bench`: measure artifacts side by side with ONNX Runtime on the same inputs and threads."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from forgeml.bench.baselines import (
    Baseline,
    BaselineUnavailable,
    artifact_precision,
    baseline_model,
    check_provider,
    get_baseline,
    gpu_runner,
    precision_of,
)
from forgeml.bench.harness import (
    BlockRunner,
    CaseResult,
    Report,
    Stats,
    in_process,
    machine_info,
    measure_blocks,
    peak_rss_subprocess,
)
from forgeml.bench.worker import EngineWorker
from forgeml.errors import InvalidInput
from forgeml.runtime.artifact import open_artifact

BLOCK = 10
WORKER_FACTS = ("pid", "affinity_inherited", "affinity_at_start", "affinity_after_first_run", "threads", "load_s")


def run_benchmark(artifacts: list[str | Path], baseline: str | list[str] | None = "onnxruntime", threads: int = 2,
                  warmup: int = 10, repeat: int = 100, onnx_path: str | Path | None = None, memory: bool = True,
                  progress: Callable[[int, int], None] | None = None, emulate: bool = False, rpc: str | None = None,
                  tracker: str | None = None, device_key: str | None = None, offsite_budget_s: float = 60.0,
                  rpc_token: str | None = None,
                  input_shapes: dict[str, tuple[int, ...]] | None = None) -> Report:
    """Benchmark each artifact and, for each distinct source model, the baselines, alternating.

    `baseline`: one name or several of forgeml.bench.baselines.BASELINES ("none" or None: no baseline).
    Every row records its precision (extra["precision"]); reports compare equal precisions only.

    Artifacts for this machine run here: each CPU engine in a worker process of its own
    (forgeml.bench.worker), started before this process loads any TVM runtime; CUDA rows run in this
    process as before (device-timed). With `emulate`, artifacts for another architecture also run under
    qemu; with `rpc`/`tracker`, those the device can run also run there (timed on the device). The
    baseline always runs here. Off-site cases are measured after the local ones, about
    `offsite_budget_s` each. `input_shapes` picks the shapes of inputs with dynamic dimensions (any shape
    inside the ranges they were compiled for; default: the upper bounds)."""
    import platform

    from forgeml.compiler.verify import seeded_inputs, source_onnx

    names = [baseline] if isinstance(baseline, str) or baseline is None else list(baseline)
    baselines = [get_baseline(n) for n in dict.fromkeys(names) if n not in (None, "none")]
    for b in baselines:
        check_provider(b)  # "provider not available" up front, before anything is loaded
    local, feeds_by_model, sources, every = [], {}, {}, []
    for path in map(Path, artifacts):  # plan: nothing is loaded yet
        manifest = open_artifact(path).manifest
        arch = manifest.target.get("arch")
        model_key = manifest.source.get("sha256", str(path))
        feeds = feeds_by_model.setdefault(model_key, seeded_inputs(
            bench_specs(manifest.inputs, input_shapes or {}, path), seed=0))
        cuda = manifest.target.get("device") == "cuda"
        if arch != platform.machine():
            if not (emulate or rpc or tracker):
                raise InvalidInput(f"{path} is built for {arch} and this machine is {platform.machine()}: add "
                                   f"--emulate, or --rpc/--tracker to run it on such a device")
        else:
            local.append(dict(name=f"forgeml {path.name} ({manifest.target.get('name')})", engine="forgeml",
                              model=model_key, path=path, feeds=feeds, cuda=cuda,
                              artifact_mb=path.stat().st_size / 1e6,
                              precision=artifact_precision(manifest.compile_options)))
        every.append((path, arch, model_key))
        if baselines and model_key not in sources:
            source = sources[model_key] = source_onnx(path, onnx_path)
            for b in baselines:
                if not cuda and b.provider != "cuda-or-cpu":
                    raise BaselineUnavailable(f"baseline {b.name} runs on the GPU: bench it beside a CUDA artifact")
                model = source if cuda else baseline_model(b, source)  # CUDA rows convert in _cuda_runner
                local.append(dict(name=f"{b.name} {source.name}", engine="onnxruntime", model=model_key, path=model,
                                  source=source, baseline=b, feeds=feeds, cuda=cuda,
                                  artifact_mb=model.stat().st_size / 1e6, precision=precision_of(b, False)))

    with ExitStack() as stack:
        engines: dict[str, BlockRunner] = {}
        for case in [c for c in local if not c["cuda"]]:  # CPU engines: a worker each, before any TVM here
            worker = stack.enter_context(EngineWorker(case["engine"], case["path"], case["feeds"], threads))
            engines[case["name"]], case["extra"] = worker.run, _worker_extra(worker)
        for case in [c for c in local if c["cuda"]]:  # CUDA rows: in this process, as before
            runner, case["extra"] = _cuda_runner(case, threads)  # may rename the case (onnxruntime-cuda...)
            engines[case["name"]] = runner
            if case["extra"].pop("cpu_fallback", False):  # ONNX Runtime without CUDA: a CPU worker after all
                case["path"] = baseline_model(case["baseline"], case["source"])
                worker = stack.enter_context(EngineWorker("onnxruntime", case["path"], case["feeds"], threads))
                engines[case["name"]], case["extra"] = worker.run, _worker_extra(worker)
                case["extra"]["provider"] = "CPUExecutionProvider (no CUDA provider here)"
                case["precision"] = precision_of(case["baseline"], False)
        remote = remote_info = None
        if rpc or tracker:  # after the workers started: this imports TVM here
            from forgeml.targets import rpc as rpc_device

            remote = rpc_device.connect(rpc, tracker, device_key, token=rpc_token)
            remote_info = rpc_device.remote_info(remote)  # None for a stock TVM server: send it everything
        offsite = []
        for path, arch, model_key in every:
            if remote is not None and (remote_info is None or remote_info.get("arch") == arch):
                offsite.append(("rpc", path, model_key))
            if arch != platform.machine():
                if emulate:
                    offsite.append(("emulate", path, model_key))
                elif not any(p == path for _, p, _ in offsite):
                    raise InvalidInput(f"{path} is built for {arch} and this machine is {platform.machine()}: add "
                                       f"--emulate, or --rpc/--tracker to run it on such a device")
        samples = measure_blocks(engines, warmup=warmup, repeat=repeat, block=BLOCK, progress=progress)
    if remote is not None and offsite:  # a fresh session: the first sat idle through the local timing, and
        remote = None                   # the device server closes sessions idle past its timeout
        remote = rpc_device.connect(rpc, tracker, device_key, token=rpc_token)
        remote_info = rpc_device.remote_info(remote) or remote_info

    cases = []
    for meta in local:
        name, times = meta["name"], samples[meta["name"]]
        rss = peak_rss_subprocess(meta["engine"], meta["path"], meta["feeds"], threads) if memory else {}
        cases.append(CaseResult(
            name=name, engine=meta["engine"], model=meta["model"], stats=Stats.of(times),
            samples_ms=[t * 1e3 for t in times], peak_rss_mb=rss.get("peak_rss_mb"), artifact_mb=meta["artifact_mb"],
            extra={"reference": meta["engine"] == "onnxruntime", "path": str(meta["path"]),
                   "precision": meta["precision"], "load_to_first_output_s": rss.get("load_to_first_output_s"),
                   **meta["extra"]},
        ))
    for placement, path, model_key in offsite:  # timed on the emulated or RPC device; checked against ORT
        feeds = feeds_by_model[model_key]
        expected = _expected(sources[model_key], feeds) if model_key in sources else None
        if placement == "emulate":
            from forgeml.targets.emulate import emulated_case

            case = emulated_case(path, feeds, model_key, threads, warmup, repeat, expected, offsite_budget_s)
        else:
            case = rpc_device.remote_case(remote, remote_info, rpc or f"{tracker}/{device_key}", path, feeds,
                                          model_key, threads, warmup, repeat, expected, offsite_budget_s)
        case.extra["isolation"] = f"{'emulated' if placement == 'emulate' else 'RPC'} device, after the local rows"
        case.extra["precision"] = artifact_precision(open_artifact(path).manifest.compile_options)
        cases.append(case)
    in_bench = any(c["cuda"] and c["extra"].get("isolation") != "worker process" for c in local)
    isolation = f"process per engine, alternating blocks of {BLOCK}"
    if in_bench:
        isolation = f"CPU engines: {isolation}; CUDA rows: in the bench process, alternating (device-timed)"
    if offsite:
        isolation += "; emulated/RPC rows: on their device, not alternated"
    settings = {"threads": threads, "warmup": warmup, "repeat": repeat, "block": BLOCK,
                "inputs": "seeded normal, seed 0", "isolation": isolation, "bench_pid": os.getpid(),
                "baselines": [b.name for b in baselines],
                "ratios": "p50 over the first baseline row of the same model and precision; none across precisions"}
    if offsite:
        settings["offsite"] = (f"emulated/RPC cases are timed on their device after the local ones, runs cut to "
                               f"about {offsite_budget_s:g} s each")
    return Report(machine=machine_info(), settings=settings, cases=cases)


def bench_specs(specs, shapes: dict[str, tuple], where: Path) -> list:
    """The artifact's input specs with the shapes to time: `shapes` where given (checked against the
    artifact: a dynamic dimension inside its range, a fixed one equal), else dynamic dimensions at the size
    given for their variable elsewhere, or at their upper bound."""
    from forgeml.shapes import format_dim

    unknown = sorted(set(shapes) - {spec.name for spec in specs})
    if unknown:
        raise InvalidInput(f"--input-shape names '{unknown[0]}', but {where.name}'s inputs are: "
                           f"{', '.join(spec.name for spec in specs)}")
    values: dict[str, int] = {}
    for spec in specs:
        shape = shapes.get(spec.name)
        if shape is None:
            continue
        dynamic = {dim.axis: dim for dim in spec.dynamic}
        if len(shape) != len(spec.shape) or any(isinstance(d, tuple) for d in shape):
            raise InvalidInput(f"--input-shape {spec.name}={','.join(map(format_dim, shape))}: give "
                               f"{len(spec.shape)} sizes, one per axis of {spec.describe()}")
        for axis, size in enumerate(shape):
            dim = dynamic.get(axis)
            if dim is None and size != spec.shape[axis]:
                raise InvalidInput(f"--input-shape {spec.name}: axis {axis} is fixed at {spec.shape[axis]} "
                                   f"in {where.name}")
            if dim is not None and not dim.min <= size <= dim.max:
                raise InvalidInput(f"--input-shape {spec.name}: axis {axis} ('{dim.variable}') is {size}, outside "
                                   f"the range {dim.min}..{dim.max} {where.name} was compiled for")
            if dim is not None:
                values.setdefault(dim.variable, size)
    out = []
    for spec in specs:
        shape = list(shapes.get(spec.name, spec.shape))
        for dim in spec.dynamic if spec.name not in shapes else ():
            shape[dim.axis] = values.get(dim.variable, dim.max)
        out.append(spec._replace(shape=tuple(shape)))
    return out


def _worker_extra(worker: EngineWorker) -> dict:
    """What the report says about a row timed in a worker: its pid, affinity and threads."""
    return {"isolation": "worker process", "worker": {k: worker.info[k] for k in WORKER_FACTS}}


def _cuda_runner(case: dict, threads: int) -> tuple[BlockRunner, dict]:
    """A CUDA row, timed in this process: a forgeml CUDA artifact (device-resident inputs, synchronized),
    or an ONNX Runtime GPU baseline ({"cpu_fallback": True} for a CUDA-or-CPU baseline when this
    onnxruntime has no working CUDA provider; the others raise BaselineUnavailable)."""
    extra = {"isolation": "bench process (CUDA, device-timed)"}
    if case["engine"] == "forgeml":
        import forgeml
        from forgeml.runtime.device import bench_runner

        run, device_extra = bench_runner(forgeml.load(case["path"], threads=threads), case["feeds"])
        return in_process(run), {**extra, **device_extra}
    baseline: Baseline = case["baseline"]
    try:
        gpu = gpu_runner(baseline, case["source"], case["feeds"])
    except BaselineUnavailable as e:
        if baseline.provider != "cuda-or-cpu":
            raise
        warnings.warn(f"baseline on the CPU: {e}", stacklevel=1)  # keep the CPU baseline, say so
        return in_process(lambda: None), {"cpu_fallback": True}
    if baseline.provider != "tensorrt":
        case["name"] = case["name"].replace("onnxruntime", "onnxruntime-cuda", 1)
    case["precision"] = precision_of(baseline, True)
    case["path"] = Path(gpu.extra["model"])
    return in_process(gpu.run), {**extra, **gpu.extra}


def _expected(source: Path, feeds: dict) -> dict:
    """ONNX Runtime's outputs by name (on the CPU, after the timing)."""
    from forgeml.compiler.verify import onnxruntime_session

    ort = onnxruntime_session(source)
    return dict(zip([o.name for o in ort.get_outputs()], ort.run(None, feeds)))
