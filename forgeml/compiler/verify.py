"""Compare a built artifact with ONNX Runtime on seeded random inputs, and on the same inputs with NaN,
+inf and -inf written into every float input (the non-finite probe)."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from forgeml.errors import InvalidInput, RunFailed, VerificationFailed
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
    nonfinite: dict | None = None  # NonFiniteProbe.to_json(); None where no probe ran
    points: tuple[dict, ...] = ()  # dynamic shapes: one result per point of the range checked

    def to_json(self) -> dict:
        out = asdict(self)
        if not self.points:
            del out["points"]
        return out

    def failure(self) -> str:
        """Why the check failed, on one line."""
        probe = self.nonfinite or {}
        if self.max_rel_error <= self.tolerance and probe.get("mismatch") and probe.get("enforced", True):
            return f"outputs differ from ONNX Runtime on non-finite inputs: {probe['mismatch']}"
        return (f"outputs differ from ONNX Runtime: max abs error {self.max_abs_error:.3g}, max rel error "
                f"{self.max_rel_error:.3g} > tolerance {self.tolerance:g}")


# ops whose NaN/inf results differ between ONNX Runtime and forgeml in ways not settled yet (the conformance
# suite's probes, benchmarks/results/onnx_conformance.md): ONNX Runtime's own kernels disagree with each
# other (MaxPool skips a NaN unless dilated, GlobalMaxPool and ReduceMax keep or drop one by its position),
# or forgeml's lowering propagates NaN differently (LRN, InstanceNormalization, training BatchNormalization,
# GridSample, Hardmax, Attention, ConvTranspose's inserted zeros, Unique's NaN equality,
# DynamicQuantizeLinear's scale). A model holding one gets the probe recorded, not enforced.
UNSETTLED_OPS = frozenset({"Attention", "BatchNormalization", "ConvTranspose", "DynamicQuantizeLinear",
                           "GlobalMaxPool", "GridSample", "Hardmax", "InstanceNormalization", "LRN", "MaxPool",
                           "Unique"})

# Winograd convolutions (cpu/winograd.py) mix a whole input tile into each output tile: a NaN or infinity
# in the input reaches every output of the tiles it touches (ONNX Runtime: only its 3x3 neighbourhood)
WINOGRAD = "Conv (Winograd: a non-finite input spreads over its output tile)"


@dataclass(frozen=True)
class NonFiniteProbe:
    """The seeded inputs with NaN, +inf and -inf at flat positions 0, 1 and 2 of every float input (NaN
    first: ONNX Runtime's vectorized max reductions and pooling keep a NaN they meet first but may skip one
    met later). Passes when forgeml's float outputs have NaN and infinities exactly where ONNX Runtime's
    have them and their finite values are within the tolerance."""

    passed: bool
    inputs: list[str]
    mismatch: str | None = None
    skipped: str | None = None
    enforced: bool = True  # False: the model holds UNSETTLED_OPS; a mismatch is recorded, not a failure
    unsettled: list[str] | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def ok(self) -> bool:
        """Whether the probe lets verification pass."""
        return self.passed or not self.enforced


def seeded_inputs(specs: list[TensorSpec] | tuple[TensorSpec, ...], seed: int = 0,
                  nonzero: set[str] | frozenset[str] = frozenset(),
                  unit: set[str] | frozenset[str] = frozenset()) -> dict[str, np.ndarray]:
    """Deterministic random inputs: normal floats (any float dtype, bfloat16 and float8 included);
    integers (any width, int4/uint4/int2/uint2 too) in [0, 10), over the whole table for an input used
    as indices (its `valid_range`), and in [1, 10) for an input named in `nonzero` (an integer
    divisor); floats named in `unit` uniform in [0, 1] (thresholds), floats with a `valid_range` uniform
    in it; bools half true."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        dtype = np.dtype(spec.dtype)
        kind = _kind(dtype)
        if kind == "f" and spec.valid_range is not None:  # a Dropout ratio held to [0, 0]
            feeds[spec.name] = rng.uniform(*spec.valid_range, size=spec.shape).astype(dtype)
        elif kind == "f" and spec.name in unit:
            feeds[spec.name] = rng.uniform(0.0, 1.0, size=spec.shape).astype(dtype)
        elif kind == "f":
            feeds[spec.name] = rng.standard_normal(spec.shape).astype(dtype)
        elif kind in "iu":
            low = 1 if spec.name in nonzero else 0
            high = spec.valid_range[1] + 1 if spec.valid_range else 10
            high = min(high, _int_max(dtype) + 1)
            feeds[spec.name] = rng.integers(low, max(high, low + 1), size=spec.shape).astype(dtype)
        elif kind == "b":
            feeds[spec.name] = rng.integers(0, 2, size=spec.shape).astype(dtype)
        else:
            raise InvalidInput(f"cannot make inputs of dtype {spec.dtype} for '{spec.name}'")
    return feeds


def _kind(dtype: np.dtype) -> str:
    """numpy's kind letter, also for ml_dtypes' types (kind 'V'): 'f' for bfloat16/float8/float4, 'i'/'u'
    for int4/uint4/int2/uint2."""
    if dtype.kind != "V":
        return dtype.kind
    if dtype.name.startswith(("bfloat", "float")):
        return "f"
    if dtype.name.startswith("uint"):
        return "u"
    return "i" if dtype.name.startswith("int") else "V"


def _int_max(dtype: np.dtype) -> int:
    """The largest value of an integer dtype, ml_dtypes' narrow ones included."""
    try:
        return int(np.iinfo(dtype).max)
    except ValueError:
        import ml_dtypes

        return int(ml_dtypes.iinfo(dtype).max)


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


def flatten_sequences(outputs: dict[str, Any]) -> dict[str, np.ndarray]:
    """`outputs` with each sequence output (a list of arrays) replaced by its elements, `name[i]`."""
    flat: dict[str, np.ndarray] = {}
    for name, value in outputs.items():
        if isinstance(value, list):
            flat.update((f"{name}[{i}]", item) for i, item in enumerate(value))
        else:
            flat[name] = value
    return flat


def _check_lengths(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    """Raise VerificationFailed when a sequence output's length differs from ONNX Runtime's."""
    for name, ref in expected.items():
        got = actual[name]
        if isinstance(ref, list) and (not isinstance(got, list) or len(got) != len(ref)):
            length = len(got) if isinstance(got, list) else "not a sequence"
            raise VerificationFailed(f"output '{name}' is a sequence of {length} tensors, ONNX Runtime gives "
                                     f"{len(ref)} (no artifact written; --no-verify to write it anyway)")


def compare(actual: dict[str, Any], expected: dict[str, Any]) -> tuple[float, float]:
    """(max absolute error, max error relative to each output's largest finite magnitude); a sequence
    output element by element. NaN against NaN and an infinity against the same infinity are equal;
    NaN or inf against anything else is an infinite error. Raises VerificationFailed when an output's
    shape, or a sequence's length, differs."""
    _check_lengths(actual, expected)
    actual, expected = flatten_sequences(actual), flatten_sequences(expected)
    max_abs = max_rel = 0.0
    for name, ref in expected.items():
        got = np.asarray(actual[name]).astype(np.float64)
        ref64 = np.asarray(ref).astype(np.float64)
        if got.shape != ref64.shape:
            raise VerificationFailed(f"output '{name}' has shape {got.shape}, ONNX Runtime gives {ref64.shape} "
                                     "(no artifact written; --no-verify to write it anyway)")
        if got.size == 0:
            continue
        same = (got == ref64) | (np.isnan(got) & np.isnan(ref64))
        with np.errstate(invalid="ignore"):
            gaps = np.where(same, 0.0, np.abs(got - ref64))
        diff = float(np.max(gaps))
        if not np.isfinite(diff):
            return float("inf"), float("inf")
        finite = np.abs(ref64[np.isfinite(ref64)])
        scale = max(float(np.max(finite)) if finite.size else 0.0, 1e-12)
        max_abs, max_rel = max(max_abs, diff), max(max_rel, diff / scale)
    return max_abs, max_rel


def nonfinite_inputs(feeds: dict[str, np.ndarray], skip: set[str] | frozenset[str] = frozenset()
                     ) -> dict[str, np.ndarray]:
    """`feeds` with NaN, +inf, -inf written at flat positions 0, 1, 2 of each float input not in `skip`."""
    probe = {}
    for name, value in feeds.items():
        value = value.copy()
        if _kind(value.dtype) == "f" and name not in skip and value.size:
            flat = value.reshape(-1)
            for i, special in enumerate((np.nan, np.inf, -np.inf)[:flat.size]):
                flat[i] = special
        probe[name] = value
    return probe


def nonfinite_mismatch(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> str | None:
    """The first output whose NaN or infinities differ from ONNX Runtime's, described; None if none does."""
    actual, expected = flatten_sequences(actual), flatten_sequences(expected)
    for name, ref in expected.items():
        got, ref = np.asarray(actual[name]), np.asarray(ref)
        if _kind(ref.dtype) != "f" or got.shape != ref.shape:
            continue
        got64, ref64 = got.astype(np.float64), ref.astype(np.float64)
        for what, test in (("NaN", np.isnan), ("+inf", np.isposinf), ("-inf", np.isneginf)):
            differ = test(got64) != test(ref64)
            if differ.any():
                where = tuple(int(i) for i in np.argwhere(differ)[0])
                return (f"output '{name}': {what} at {int(test(ref64).sum())} positions in ONNX Runtime, "
                        f"{int(test(got64).sum())} in forgeml (first difference at {list(where)}: "
                        f"{got64[where]} vs {ref64[where]})")
    return None


def _probe(session, ort_session, feeds: dict[str, np.ndarray], keep: set[str] | frozenset[str],
           tolerance: float, unsettled: list[str]) -> NonFiniteProbe:
    probe = nonfinite_inputs(feeds, skip=keep)
    changed = sorted(n for n in probe if not np.array_equal(probe[n], feeds[n], equal_nan=True))
    if not changed:
        return NonFiniteProbe(True, [], skipped="no float inputs")
    names = [o.name for o in ort_session.get_outputs()]
    try:
        expected = dict(zip(names, ort_session.run(names, probe)))
    except Exception as err:  # noqa: BLE001 (onnxruntime raises its own pybind11 types)
        return NonFiniteProbe(True, changed, skipped=f"ONNX Runtime cannot run them: {_reason(err)}")
    try:
        actual = session.run(probe)
    except RunFailed as failure:  # e.g. Range with a NaN limit: no size to allocate
        return NonFiniteProbe(True, changed, skipped=f"forgeml rejects them: {str(failure).split(': ', 1)[-1][:200]}")
    # float outputs only: converting NaN or inf to an integer is undefined in ONNX (Cast to int32 gives
    # INT_MIN in ONNX Runtime, whatever the CPU's conversion gives in forgeml)
    expected = {name: value for name, value in flatten_sequences(expected).items()
                if _kind(np.asarray(value).dtype) == "f"}
    actual = flatten_sequences(actual)
    mismatch = nonfinite_mismatch(actual, expected)
    if mismatch is None:
        try:
            max_abs, max_rel = compare(actual, expected)
        except VerificationFailed as err:  # a data-dependent shape (Unique of NaNs)
            max_abs, max_rel, mismatch = float("inf"), float("inf"), str(err).split(" (no artifact")[0]
        if mismatch is None and max_rel > tolerance:
            mismatch = f"max abs error {max_abs:.3g}, max rel error {max_rel:.3g} > tolerance {tolerance:g}"
    return NonFiniteProbe(mismatch is None, changed, mismatch, enforced=not unsettled, unsettled=unsettled or None)


def _reason(err: Exception) -> str:
    """ONNX Runtime's error as one line: the status message without the source file prefix."""
    text = " ".join(str(err).split())
    for marker in ("Status Message: ", "NOT_IMPLEMENTED : ", "INVALID_ARGUMENT : ", "INVALID_GRAPH : ", "FAIL : "):
        if marker in text:
            text = text.split(marker, 1)[1]
            break
    if text.startswith("/") and " " in text:  # "/onnxruntime_src/...cc:42 void f() message"
        text = text.split(" ", 1)[1]
    return text[:300]


def verify_range(session, model_path: str | Path, tolerance: float, seed: int = 0) -> VerifyResult:
    """Verify a session at the minimum, a point between and the maximum of its inputs' dimension ranges
    (`shapes.check_points`), and at every static bucket's sizes, so that each function of the artifact
    runs; the result holds the worst errors and each point's own result (with the function that ran it).
    A model without dynamic dimensions is checked once, as `verify_against_onnxruntime` does."""
    from forgeml.shapes import check_points, concrete_shapes, dimension_variables

    variables = dimension_variables(session.inputs)
    if not variables:
        return verify_against_onnxruntime(session, model_path, tolerance, seed)
    buckets = {tuple(sorted(f["dimensions"].items())): f["name"] for f in session.manifest.functions or ()
               if f["dimensions"] is not None}
    points = check_points(variables)
    points += [dict(key) for key in buckets if dict(key) not in points]
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False)  # read and loaded once for every point
    try:
        reference = onnxruntime_session(model_path)
    except Exception:  # noqa: BLE001 (each point reports why ONNX Runtime cannot load it)
        reference = None
    results = []
    for values in points:
        result = verify_against_onnxruntime(session, model_path, tolerance, seed,
                                            concrete_shapes(session.inputs, values), graph, reference)
        function = buckets.get(tuple(sorted(values.items())), "main")
        results.append({"dimensions": values, "function": function} | result.to_json())
    checked = [r for r in results if r["skipped"] is None]
    failed = any(not r["passed"] for r in checked)
    skipped = None if failed else next((r["skipped"] for r in results if r["skipped"] is not None), None)
    worst = {k: max((r[k] for r in checked), default=float("nan")) for k in ("max_abs_error", "max_rel_error")}
    probe = next((r["nonfinite"] for r in checked if not r["passed"] and r.get("nonfinite")), None)
    return VerifyResult(not failed and skipped is None, worst["max_abs_error"], worst["max_rel_error"], tolerance,
                        seed, skipped=skipped, nonfinite=probe, points=tuple(results))


def verify_against_onnxruntime(session, model_path: str | Path, tolerance: float, seed: int = 0,
                               shapes: dict[str, tuple[int, ...]] | None = None, graph=None,
                               reference=None) -> VerifyResult:
    """Run `session` (a forgeml Session) and ONNX Runtime on the same seeded inputs, then on them with NaN
    and infinities in the float inputs (`NonFiniteProbe`; thresholds and convolution weights keep their
    values); both must agree. When ONNX Runtime
    cannot run the model (no kernel for an op at that opset or dtype, inputs or outputs its Python API
    cannot convert, seeded inputs it rejects) the result is skipped with its reason; forgeml's session
    still runs once on the inputs so that a failure of its own surfaces here, except where ONNX Runtime
    rejected the seeded inputs and forgeml rejects them at run time too (random axes, indices). `shapes`
    gives the inputs' shapes where they have dynamic dimensions; `graph` (the ONNX model without external
    data) and `reference` (its ONNX Runtime session) where the caller already has them."""
    import onnx

    from forgeml.compiler.frontend.onnx_model import convolution_weight_inputs, divisor_inputs, unit_interval_inputs

    def skipped(reason: str) -> VerifyResult:
        return VerifyResult(False, float("nan"), float("nan"), tolerance, seed, skipped=reason)

    if graph is None:
        graph = onnx.load(str(model_path), load_external_data=False)  # read once for both input roles
    unit = unit_interval_inputs(graph)
    specs = [spec._replace(shape=shapes[spec.name]) if shapes else spec for spec in session.inputs]
    feeds = seeded_inputs(specs, seed, nonzero=divisor_inputs(graph), unit=unit)
    try:
        ort_session = reference if reference is not None else onnxruntime_session(model_path)
    except Exception as err:  # noqa: BLE001 (onnxruntime raises its own pybind11 types)
        session.run(feeds)
        return skipped(f"ONNX Runtime cannot load the model: {_reason(err)}")
    names = [o.name for o in ort_session.get_outputs()]
    try:
        expected = dict(zip(names, ort_session.run(names, feeds)))
    except Exception as err:  # noqa: BLE001
        reason = f"ONNX Runtime cannot run the model on seeded inputs: {_reason(err)}"
        try:
            session.run(feeds)
        except RunFailed as failure:  # inputs invalid for the model (Squeeze axes naming a dimension
            # that is not 1, Unsqueeze axes out of range): forgeml's refusal of them is no fault of its own
            return skipped(f"{reason}; forgeml rejects them too: {str(failure).split(': ', 1)[-1][:200]}")
        return skipped(reason)
    actual = session.run(feeds)
    max_abs, max_rel = compare(actual, expected)
    unsettled = sorted({n.op_type for n in graph.graph.node if n.domain in ("", "ai.onnx")} & UNSETTLED_OPS)
    if (getattr(session, "manifest", None) and session.manifest.compile_options.get("winograd_kernels")):
        unsettled.append(WINOGRAD)
    held = {spec.name for spec in session.inputs if spec.valid_range is not None}  # e.g. a Dropout ratio
    probe = _probe(session, ort_session, feeds, unit | held | convolution_weight_inputs(graph), tolerance,
                   unsettled)
    return VerifyResult(bool(max_rel <= tolerance and probe.ok), max_abs, max_rel, tolerance, seed,
                        nonfinite=probe.to_json())


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
