"""Compare a built artifact with ONNX Runtime on seeded random inputs."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from forgeml.errors import InvalidInput
from forgeml.runtime.artifact import TensorSpec, open_artifact

DEFAULT_TOLERANCE = {"float32": 1e-3, "float16": 2e-2}


@dataclass(frozen=True)
class VerifyResult:
    """Largest differences between forgeml and ONNX Runtime over every output element.

    `max_rel_error` is relative to each output's largest magnitude, so values near zero do not
    inflate it; the check passes when it is at most `tolerance`.
    """

    passed: bool
    max_abs_error: float
    max_rel_error: float
    tolerance: float
    seed: int
    reference: str = "onnxruntime"
    skipped: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


def seeded_inputs(specs: list[TensorSpec] | tuple[TensorSpec, ...], seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic random inputs: normal floats; integers in [0, 10), or over the whole table for an
    input used as Gather indices (its `valid_range`)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(spec.shape).astype(dtype)
        elif dtype.kind in "iu":
            high = spec.valid_range[1] + 1 if spec.valid_range else 10
            feeds[spec.name] = rng.integers(0, high, size=spec.shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[spec.name] = rng.integers(0, 2, size=spec.shape).astype(dtype)
        else:
            raise ValueError(f"cannot make inputs of dtype {spec.dtype} for '{spec.name}'")
    return feeds


def onnxruntime_session(model_path: str | Path, threads: int | None = None):
    """An ONNX Runtime CPU session (the reference and the speed baseline)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


def onnxruntime_cuda_runner(model_path: str | Path, feeds: dict[str, np.ndarray]):
    """(run, outputs) for ONNX Runtime with the CUDA execution provider on device-resident inputs
    (io binding), or None when this onnxruntime has no CUDAExecutionProvider. `run()` returns once
    the GPU has finished; `outputs()` copies the last run's outputs to numpy, by name."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return None
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model_path), options, providers=["CUDAExecutionProvider"])
    if "CUDAExecutionProvider" not in session.get_providers():  # ORT falls back to the CPU silently
        raise RuntimeError("ONNX Runtime's CUDA provider did not load (missing CUDA or cuDNN libraries?); "
                           f"the session runs on {session.get_providers()}")
    binding = session.io_binding()
    for name, value in feeds.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
    for out in session.get_outputs():
        binding.bind_output(out.name, "cuda")

    def run() -> None:
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()

    def outputs() -> dict[str, np.ndarray]:
        return dict(zip([o.name for o in session.get_outputs()], binding.copy_outputs_to_cpu()))

    return run, outputs


def compare(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> tuple[float, float]:
    """(max absolute error, max error relative to each output's largest finite magnitude). Elements that
    are the same infinity or both NaN agree (attention scores hold -inf where keys are masked)."""
    max_abs = max_rel = 0.0
    for name, ref in expected.items():
        got = actual[name].astype(np.float64)
        ref64 = ref.astype(np.float64)
        if got.shape != ref64.shape:
            raise ValueError(f"output '{name}' has shape {got.shape}, ONNX Runtime gives {ref64.shape}")
        if got.size == 0:
            continue
        with np.errstate(invalid="ignore"):
            same = (got == ref64) | (np.isnan(got) & np.isnan(ref64))
            diff = float(np.max(np.where(same, 0.0, np.abs(got - ref64))))
        if not np.isfinite(diff):
            return float("inf"), float("inf")
        finite = np.abs(ref64[np.isfinite(ref64)])
        scale = max(float(np.max(finite)) if finite.size else 0.0, 1e-12)
        max_abs, max_rel = max(max_abs, diff), max(max_rel, diff / scale)
    return max_abs, max_rel


def verify_against_onnxruntime(session, model_path: str | Path, tolerance: float, seed: int = 0) -> VerifyResult:
    """Run `session` (a forgeml Session) and ONNX Runtime on the same seeded inputs."""
    feeds = seeded_inputs(session.inputs, seed)
    ort_session = onnxruntime_session(model_path)
    names = [o.name for o in ort_session.get_outputs()]
    expected = dict(zip(names, ort_session.run(names, feeds)))
    actual = session.run(feeds)
    max_abs, max_rel = compare(actual, expected)
    return VerifyResult(bool(max_rel <= tolerance), max_abs, max_rel, tolerance, seed)


def source_onnx(artifact: Path, onnx_path: str | Path | None) -> Path:
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
