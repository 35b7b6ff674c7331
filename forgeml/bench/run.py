"""`forgeml bench`: measure artifacts side by side with ONNX Runtime on the same inputs and threads."""

from __future__ import annotations

import hashlib
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


def _source_onnx(artifact: Path, onnx_path: str | Path | None) -> Path:
    """The ONNX model an artifact was compiled from: --onnx, else the path recorded at compile time."""
    manifest = open_artifact(artifact).manifest
    if onnx_path is not None:
        path = Path(onnx_path)
        if not path.is_file():
            raise InvalidInput(f"ONNX model not found: {path}")
        return path
    recorded = manifest.source.get("path")
    if recorded and Path(recorded).is_file():
        if hashlib.sha256(Path(recorded).read_bytes()).hexdigest() == manifest.source.get("sha256"):
            return Path(recorded)
    raise InvalidInput(f"the ONNX model {artifact} was compiled from is not where it was "
                       f"({recorded or 'unknown'}) or has changed; give it with --onnx m.onnx")


def run_benchmark(artifacts: list[str | Path], baseline: str | None = "onnxruntime", threads: int = 2,
                  warmup: int = 10, repeat: int = 100, onnx_path: str | Path | None = None, memory: bool = True,
                  progress: Callable[[int, int], None] | None = None) -> Report:
    """Benchmark each artifact and, for each distinct source model, the baseline, alternating."""
    import forgeml
    from forgeml.compiler.verify import onnxruntime_session, seeded_inputs

    runners, cases_meta, feeds_by_model = {}, {}, {}
    for path in map(Path, artifacts):
        session = forgeml.load(path, threads=threads)
        model_key = session.manifest.source.get("sha256", str(path))
        feeds = feeds_by_model.setdefault(model_key, seeded_inputs(session.inputs, seed=0))
        name = f"forgeml {path.name} ({session.manifest.target.get('name')})"
        runners[name] = (lambda s=session, f=feeds: s.run(f))
        cases_meta[name] = dict(engine="forgeml", model=model_key, path=path, feeds=feeds,
                                artifact_mb=path.stat().st_size / 1e6)
        if baseline == "onnxruntime" and f"onnxruntime:{model_key}" not in cases_meta:
            source = _source_onnx(path, onnx_path)
            ort = onnxruntime_session(source, threads=threads)
            ort_name = f"onnxruntime {source.name}"
            runners[ort_name] = (lambda s=ort, f=feeds: s.run(None, f))
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
                   "load_to_first_output_s": rss.get("load_to_first_output_s")},
        ))
    settings = {"threads": threads, "warmup": warmup, "repeat": repeat, "block": 10, "inputs": "seeded normal, seed 0"}
    return Report(machine=machine_info(), settings=settings, cases=cases)
