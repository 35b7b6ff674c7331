"""ONNX file -> verified .fml artifact: import, optimize, compile, package, verify."""

from __future__ import annotations

import dataclasses
import functools
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from forgeml.errors import CompileFailed, ForgeError, InvalidInput, ToolchainMissing, VerificationFailed, last_line
from forgeml.runtime.artifact import WEIGHTS, Manifest, create_beside, pack_weights, write_artifact
from forgeml.shapes import InputShapes
from forgeml.shapes import to_json as shapes_to_json
from forgeml.targets import TargetSpec, resolve_target
from forgeml.targets.host import has_cuda_gpu

Progress = Callable[[str], None]


@dataclass
class CompileOptions:
    target: str = "x86-64"
    input_shapes: InputShapes = field(default_factory=dict)  # a size pins a dimension; (low, high) lets it vary
    opt_level: str = "O2"
    verify: bool = True
    tolerance: float | None = None  # None: the default for the precision
    seed: int = 0
    tune_minutes: float | None = None  # MetaSchedule budget; None and no tune_trials: rules only
    tune_trials: int | None = None
    use_tuning_db: bool = True  # apply records already in the target's tuning database
    precision: str = "fp32"  # "fp16": mixed precision (fp16 compute, fp32 accumulation), cuda targets only
    conv_layout: str = "auto"  # "NHWC"/"NCHW": the convolutions' layout (cuda targets only); "auto": NHWC for
    # fp16 on GPU targets (ResNet-18 b32 on an H200: 1.57 vs 2.34 ms in NCHW), NCHW otherwise
    tensor_core_schedule: str = "wmma"  # "mma": fp16 GEMMs on mma.sync + cp.async (sm_80+, cuda/mma.py)
    cuda_graph: bool | None = None  # cuda targets: replay each call's static launches as one CUDA graph
    # (None: on for cuda targets; measured faster on every zoo model, benchmarks/results/gpu.md)
    sign_key: str | Path | None = None  # an ed25519 private key (`forgeml keygen`): the artifact is signed
    signer: str | None = None  # the name its signature records (None: user@host)
    buckets: str = "ends"  # dynamic shapes: static functions beside the symbolic one (compiler/dynamic.py)
    winograd: bool = True  # x86 CPU targets: 3x3 stride-1 convolutions by Winograd (compiler/cpu/winograd.py)


def _check_gpu_options(spec, precision: str, conv_layout: str, tensor_core_schedule: str = "wmma") -> None:
    if tensor_core_schedule != "wmma":
        import tvm

        from forgeml.compiler.cuda.mma import supports

        arch = str(spec.target.get("arch", ""))
        if not supports(tvm.target.Target(spec.tvm_target())):
            raise InvalidInput(f"--tensor-core-schedule {tensor_core_schedule} needs an sm_80+ GPU target "
                               f"(cuda-sm80, cuda-sm90, jetson-orin); '{spec.name}' is {arch or 'a CPU target'}")
        if precision != "fp16":
            raise InvalidInput(f"--tensor-core-schedule {tensor_core_schedule} schedules fp16 GEMMs: "
                               "add --precision fp16")
    if spec.device == "cuda":
        return
    if precision != "fp32":
        raise InvalidInput(f"--precision {precision} needs a GPU target (cuda, jetson-orin); "
                           f"'{spec.name}' runs on the CPU in fp32")
    if conv_layout not in ("NCHW", "auto"):
        raise InvalidInput(f"--conv-layout {conv_layout} needs a GPU target (cuda, jetson-orin); "
                           f"'{spec.name}' uses forgeml's CPU convolution layouts")


def resolve_conv_layout(spec, precision: str, conv_layout: str) -> str:
    """The convolution layout a build uses: `conv_layout` unless it is "auto", which means NHWC for fp16
    on GPU targets (tensor-core convolutions then read their operands along the channels) and NCHW
    everywhere else (fp32 GPU builds run no tensor cores; CPU builds use their own layouts)."""
    if conv_layout != "auto":
        return conv_layout
    return "NHWC" if spec.device == "cuda" and precision == "fp16" else "NCHW"


def tvm_target(spec: TargetSpec) -> Any:
    """The TVM target of `spec`, or an InvalidInput naming what TVM rejects (an unknown kind, an option
    of the wrong type) before any work starts."""
    import tvm

    try:
        return tvm.target.Target(spec.tvm_target())
    except (ValueError, TypeError, RuntimeError) as e:  # "Target creation from config dict failed: ..."
        raise InvalidInput(f"target '{spec.name}' is not a valid TVM target: {last_line(e)}") from None


def check_output_path(model_path: str | Path, output: Path) -> None:
    """Refuse, before any work, an output that would overwrite the model being compiled, that is a
    directory, or whose directory cannot be written (found after the whole compile until issue 20).
    Nothing is created: the nearest existing directory above the output is probed with a temp file."""
    if output.is_dir():
        raise InvalidInput(f"output path {output} is a directory; give a file name such as model.fml")
    model = Path(model_path)
    same = (output.exists() and model.exists() and os.path.samefile(model, output)) or \
        output.resolve() == model.resolve()
    if same:
        raise InvalidInput(f"output {output} is the model being compiled; give another name such as "
                           f"{model.with_suffix('.fml').name if model.suffix != '.fml' else 'model.fml'}")
    existing = output.parent.resolve()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InvalidInput(f"cannot write {output}: {existing} is a file, not a directory")
    try:
        fd, probe = create_beside(existing / output.name)
    except OSError as e:
        raise InvalidInput(f"cannot write {output}: {existing} is not writable ({e.strerror})") from None
    os.close(fd)
    probe.unlink()


def _with_gpu_options(mod: Any, spec, precision: str, conv_layout: str, tensor_core_schedule: str = "wmma") -> Any:
    """The module marked with the GPU pipeline's options (precision, convolution layout, tensor-core
    schedule)."""
    if spec.device != "cuda":
        return mod
    from forgeml.compiler.cuda.options import with_conv_layout, with_precision, with_tensor_core_schedule

    return with_tensor_core_schedule(with_conv_layout(with_precision(mod, precision), conv_layout),
                                     tensor_core_schedule)


def _versions() -> dict[str, str]:
    import onnx
    import tvm

    from forgeml.version import __version__

    return {"forgeml": __version__, "tvm": tvm.__version__, "onnx": onnx.__version__}


def _cross_compiler(spec: TargetSpec) -> str | None:
    """The cross compiler the target's host code needs on this machine (None: the native one); checked present."""
    if not spec.cross_compiler or platform.machine() == spec.arch:
        return None
    if not shutil.which(spec.cross_compiler):
        raise ToolchainMissing(
            f"target '{spec.name}' needs the cross compiler {spec.cross_compiler}: "
            f"apt-get install {' '.join(spec.needs)}  (or: make toolchains)"
        )
    return spec.cross_compiler


def _export_library(executable, spec: TargetSpec, out: Path) -> dict | None:
    """Link the library (CUDA targets: kernels prebuilt into a fatbin; returns its summary)."""
    fcompile = None
    if cross := _cross_compiler(spec):
        from tvm.support import cc

        fcompile = cc.cross_compiler(cross)
    if spec.device == "cuda":
        from forgeml.compiler.cuda.fatbin import export_cuda_library

        return export_cuda_library(executable.mod, out, str(spec.target.get("arch")), fcompile=fcompile)
    executable.export_library(str(out), fcompile=fcompile)
    return None


def _codegen(mod, target, cuda_graph: bool, functions: list[str] | None = None):
    """Relax build; with cuda_graph, RewriteCUDAGraph (in relax's build pipeline, off unless configured)
    captures the launches that touch only weights and planned buffers into a CUDA graph, replayed after
    the first call. With `functions` (dynamic shapes): one executable per function, each holding that
    function and its kernels only ({name: executable}): built in one module, the static buckets' kernels
    came out of LLVM with a third of the FMAs their identical TIR gets in a static build (resnet18's
    3x3 convs, Zen 4: 48 vs 144 in the micro-kernel; the bucket 2.3-2.9x slower than a static artifact)."""
    import tvm

    if functions:
        return {name: _codegen(_function_alone(mod, name), target, cuda_graph) for name in functions}
    if not cuda_graph:
        return tvm.compile(mod, target=target)
    current = tvm.transform.PassContext.current()
    with tvm.transform.PassContext(opt_level=current.opt_level, config={"relax.backend.use_cuda_graph": True}):
        return tvm.compile(mod, target=target)


def _function_alone(mod, name: str):
    """The module with only Relax function `name` and the functions it calls, transitively."""
    import tvm
    from tvm import relax

    keep: set[str] = set()
    todo = [name]

    def callees(expr) -> None:
        if isinstance(expr, relax.Call):
            todo.extend(a.name_hint for a in expr.args if isinstance(a, tvm.ir.GlobalVar))

    while todo:
        current = todo.pop()
        if current in keep:
            continue
        keep.add(current)
        if isinstance(mod[current], relax.Function):
            relax.analysis.post_order_visit(mod[current].body, callees)
    return tvm.IRModule({gv: func for gv, func in mod.functions_items() if gv.name_hint in keep},
                        attrs=mod.attrs, global_infos=mod.global_infos)


def _stage(what: str, run: Callable[[], Any]) -> Any:
    """run(), with a failure that is not already forgeml's reported as CompileFailed naming `what`."""
    try:
        return run()
    except ForgeError:
        raise
    except Exception as err:  # noqa: BLE001 (TVM raises InternalError, ValueError, AttributeError, ...)
        raise CompileFailed(f"{what} failed: {last_line(err)}") from err


def _failing_kernels(mod, target) -> dict[str, str]:
    """Kernel name -> reason, for each PrimFunc of `mod` whose code generation fails on its own."""
    import tvm

    failing = {}
    for gv, func in mod.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc):
            try:
                tvm.compile(tvm.IRModule({gv: func.with_attr("global_symbol", gv.name_hint)}), target=target)
            except Exception as err:  # noqa: BLE001
                failing[gv.name_hint] = last_line(err)
    return failing


def _optimize_and_generate(mod, target, run_pipeline, cuda_graph: bool, say: Progress,
                           functions: list[str] | None = None):
    """(executable, weights, function -> its weights' indices or None, number of Winograd kernels): the
    pipeline, weight lifting (of `main`, or of each of `functions` with equal weights stored once) and code
    generation. When code generation
    fails on kernels the CPU rules scheduled, those kernels are rebuilt with TVM's naive loops (the
    others keep their schedules); a failure that remains is a CompileFailed naming the kernels (their
    names carry the fused operators) and TVM's reason."""
    from forgeml.compiler import graph
    from forgeml.compiler.cpu.rules import unscheduled
    from forgeml.compiler.dynamic import lift_functions, memory_plan

    def build(skip: set[str]):
        with unscheduled(skip):
            optimized = _stage(f"optimizing for {target.kind.name}", lambda: run_pipeline(mod, target))
        if functions:
            lifted, weights, table = _stage("lifting the weights", lambda: lift_functions(optimized, functions))
            if target.kind.name == "llvm":  # the functions' memory plans, for the manifest
                plan = _stage("planning memory", lambda: memory_plan(lifted, target))
                table = {name: {"weights": table[name], "memory": plan.get(name)} for name in table}
        else:
            (lifted, weights), table = _stage("lifting the weights", lambda: graph.lift_weights(optimized)), None
        return lifted, weights, table, lambda: _codegen(lifted, target, cuda_graph, functions)

    lifted, weights, table, generate = build(set())
    try:
        return generate(), weights, table, _winograd_kernels(lifted)
    except Exception as err:  # noqa: BLE001
        first = err
    failing = _failing_kernels(lifted, target) if target.kind.name == "llvm" else {}
    if failing:
        say(f"generating code failed in {', '.join(failing)}; rebuilding them without schedules")
        lifted, weights, table, generate = build(set(failing))
        try:
            return generate(), weights, table, _winograd_kernels(lifted)
        except Exception as err:  # noqa: BLE001
            first = err
            failing = _failing_kernels(lifted, target) or failing
    where = f" in kernel {', '.join(sorted(failing))}" if failing else ""
    reason = next(iter(failing.values())) if failing else last_line(first)
    raise CompileFailed(f"generating code{where} failed: {reason}") from first


def _winograd_kernels(mod) -> int:
    """How many kernels of `mod` compute a convolution by Winograd (cpu/winograd.py)."""
    import tvm

    from forgeml.compiler.cpu.winograd import is_winograd

    return sum(isinstance(f, tvm.tirx.PrimFunc) and is_winograd(gv.name_hint) for gv, f in mod.functions_items())


def compile_model(model_path: str | Path, output: str | Path, options: CompileOptions | None = None,
                  progress: Progress | None = None, tune_progress: Callable[[dict], None] | None = None) -> Manifest:
    """Compile an ONNX model into a verified artifact at `output` (written atomically)."""

    from forgeml.compiler import dynamic, pipeline, verify
    from forgeml.compiler.cpu.winograd import allowed as winograd_allowed
    from forgeml.compiler.frontend import onnx_model, relax_import
    from forgeml.compiler.frontend.normalize import normalize

    options = options or CompileOptions()
    say = progress or (lambda _msg: None)
    output = Path(output)
    check_output_path(model_path, output)
    spec = resolve_target(options.target)
    target = tvm_target(spec)
    run_pipeline = pipeline.get_pipeline(options.opt_level)
    _check_gpu_options(spec, options.precision, options.conv_layout, options.tensor_core_schedule)
    conv_layout = resolve_conv_layout(spec, options.precision, options.conv_layout)
    if options.cuda_graph and spec.device != "cuda":
        raise InvalidInput(f"--cuda-graph needs a GPU target (cuda, jetson-orin); '{spec.name}' runs on the CPU")
    cuda_graph = spec.device == "cuda" and options.cuda_graph is not False
    signing_key = None
    if options.sign_key is not None:  # read before minutes of compiling, so a bad key fails at once
        from forgeml.runtime.trust import load_signing_key

        signing_key = load_signing_key(options.sign_key, options.signer)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    say("checking the ONNX model")
    loaded = onnx_model.load_onnx(model_path, options.input_shapes)
    folded, normalized = normalize(loaded.model)  # after --input-shape pinned the inputs: shapes fold
    loaded = dataclasses.replace(loaded, model=folded)
    say(f"importing into Relax ({len(loaded.model.graph.node)} nodes)")
    mod = relax_import.import_onnx(loaded)
    outputs = relax_import.output_specs(mod, loaded.outputs)
    points = dynamic.bucket_points(loaded.ranges, options.buckets)
    if points:
        mod = _stage("importing the static buckets", lambda: dynamic.add_buckets(mod, loaded, points, say))
    functions = ["main", *map(dynamic.function_name, points)] if loaded.ranges else None
    timings["import_s"] = time.perf_counter() - clock

    say(f"optimizing and scheduling for {spec.name} ({options.opt_level})")
    mod = _with_gpu_options(mod, spec, options.precision, conv_layout, options.tensor_core_schedule)
    tuning_summary = None
    if _uses_tuning(options, spec, target):
        from forgeml.compiler.tuning.search import Budget

        budget = Budget(options.tune_minutes, options.tune_trials)
        say("applying the tuning database" if budget.empty else "tuning (results persist in the tuning database)")
        with winograd_allowed(options.winograd):
            mod, tuning_summary = _stage("tuning", lambda: pipeline.tuned_o2(mod, target, budget, tune_progress))
        scheduled = mod
        run_pipeline = lambda _mod, _target: scheduled  # noqa: E731 (tuned: the pipeline already ran)
    timings["optimize_s"] = time.perf_counter() - clock - sum(timings.values())

    say("generating code")
    with winograd_allowed(options.winograd):
        executable, weights, table, winograd = _optimize_and_generate(mod, target, run_pipeline, cuda_graph, say,
                                                                      functions)
    executables = executable if isinstance(executable, dict) else {"main": executable}
    libraries: dict[str, bytes] = {}
    summaries: dict[str, dict | None] = {}
    with tempfile.TemporaryDirectory(prefix="forgeml-build-") as tmp:
        for name, one in executables.items():
            lib_path = Path(tmp) / library_member(name)
            summaries[name] = _stage("linking the library", functools.partial(_export_library, one, spec, lib_path))
            libraries[lib_path.name] = lib_path.read_bytes()
    kernels = summaries["main"]  # CUDA: main's fatbin summary (each bucket's library is linked the same way)
    timings["codegen_s"] = time.perf_counter() - clock - sum(timings.values())

    blob, entries = pack_weights([(f"w{i}", np.asarray(w)) for i, w in enumerate(weights)])
    manifest = Manifest(
        target=spec.to_json(),
        inputs=list(loaded.inputs),
        outputs=outputs,
        library="model.so",
        weights=entries,
        source={"file": loaded.path.name, "path": str(loaded.path.resolve()), "sha256": loaded.sha256,
                "format": "onnx",
                "opset": max((o.version for o in loaded.model.opset_import if o.domain in ("", "ai.onnx")),
                             default=0)},
        compile_options={"target": options.target, "opt_level": options.opt_level, "precision": options.precision,
                         "conv_layout": conv_layout, "tensor_core_schedule": options.tensor_core_schedule,
                         "cuda_graph": cuda_graph,
                         "input_shapes": shapes_to_json(options.input_shapes),
                         "normalize": normalized.to_json(), "winograd": options.winograd,
                         **({"winograd_kernels": winograd} if winograd else {})},
        versions=_versions(),
        tuning=tuning_summary.to_json() if tuning_summary else {},
        functions=([row | {"library": library_member(row["name"])} for row in dynamic.dispatch_table(points, table)]
                   if table else None),
    )
    files = {**libraries, WEIGHTS: blob}
    tolerance = options.tolerance if options.tolerance is not None else verify.DEFAULT_TOLERANCE[
        "float16" if options.precision == "fp16" else "float32"]
    result = _verify(manifest, files, output, loaded.path, spec, options, tolerance, say)
    manifest.verification = result.to_json()
    timings["verify_s"] = time.perf_counter() - clock - sum(timings.values())
    manifest.compile_options["seconds"] = {k: round(v, 3) for k, v in timings.items()}
    if kernels:
        manifest.compile_options["cuda_kernels"] = kernels
    if not result.passed and result.skipped is None:
        raise VerificationFailed(f"{result.failure()} (no artifact written; "
                                 "--no-verify to write it anyway, --tolerance to loosen)")
    write_artifact(output, manifest, files, signing_key=signing_key)
    return manifest


def library_member(function: str) -> str:
    """The artifact member holding a function's library: model.so for `main`, model_<name>.so else."""
    return "model.so" if function == "main" else f"model_{function}.so"


def _uses_tuning(options: CompileOptions, spec: TargetSpec, target) -> bool:
    """Tune when asked; otherwise consult the target's database when it has records."""
    if options.opt_level != "O2":
        if options.tune_minutes or options.tune_trials:
            raise InvalidInput(f"tuning needs -O O2 (tuned kernels replace its rules), not {options.opt_level}")
        return False
    if options.tune_minutes or options.tune_trials:
        return True
    from forgeml.compiler.tuning.database import has_records

    return options.use_tuning_db and has_records(target)


def tune_model(model_path: str | Path, target_name: str = "x86-64", minutes: float | None = None,
               trials: int | None = None, input_shapes: InputShapes | None = None,
               progress: Callable[[dict], None] | None = None, precision: str = "fp32", refine: bool = False,
               measure_elsewhere: str | Path | None = None, say: Progress | None = None, conv_layout: str = "auto"):
    """Tune a model's kernels into the target's persistent database (no artifact). Returns the summary.

    With `measure_elsewhere`, nothing is measured here: a batch of candidates (about `trials`) is
    written to that directory for `python -m forgeml.runtime.measure` on a machine that runs the
    target's kernels (tuning/batch.py); `import_measurements` brings the results back."""

    from forgeml.compiler import pipeline
    from forgeml.compiler.frontend import onnx_model, relax_import
    from forgeml.compiler.frontend.normalize import normalize
    from forgeml.compiler.tuning import search

    spec = resolve_target(target_name)
    target = tvm_target(spec)
    _check_gpu_options(spec, precision, conv_layout)
    conv_layout = resolve_conv_layout(spec, precision, conv_layout)
    if measure_elsewhere is not None and trials is None:
        raise InvalidInput("--measure-elsewhere needs --trials: how many candidates to write")
    if measure_elsewhere is None and not minutes and not trials:
        raise InvalidInput("give a tuning budget: --minutes and/or --trials")
    loaded = onnx_model.load_onnx(model_path, input_shapes or {})
    loaded = dataclasses.replace(loaded, model=normalize(loaded.model)[0])
    mod = relax_import.import_onnx(loaded)
    mod = pipeline.tuning_input(_with_gpu_options(mod, spec, precision, conv_layout), target)
    if measure_elsewhere is not None:
        from forgeml.compiler.tuning.batch import export_batch

        return export_batch(mod, target, measure_elsewhere, trials, refine=refine,
                            cross_compiler=_cross_compiler(spec), arch=spec.arch, progress=say)
    if spec.arch != platform.machine():
        raise InvalidInput(f"'{spec.name}' kernels run on {spec.arch}, this machine is {platform.machine()}: "
                           "tune with --measure-elsewhere DIR and measure the batch on the device")
    return search.tune(mod, target, search.Budget(minutes, trials), progress, refine=refine)


def import_measurements(batch_dir: str | Path):
    """Commit a measured batch (`tune_model(..., measure_elsewhere=DIR)`) to its target's tuning database."""
    from forgeml.compiler.tuning.batch import import_results

    return import_results(batch_dir)


def _verify(manifest: Manifest, files: dict[str, bytes], output: Path, model_path: Path, spec: TargetSpec,
            options: CompileOptions, tolerance: float, say: Progress):
    """Load the packaged artifact with the real runtime and compare it with ONNX Runtime."""
    from forgeml.compiler.verify import VerifyResult, verify_range
    from forgeml.runtime.session import Session

    def skipped(reason: str) -> VerifyResult:
        return VerifyResult(False, float("nan"), float("nan"), tolerance, options.seed, skipped=reason)

    if not options.verify:
        return skipped("--no-verify")
    if spec.arch != platform.machine():
        from forgeml.targets.emulate import EMULATORS

        how = ("use `forgeml verify --emulate`" if spec.arch in EMULATORS
               else f"run `forgeml verify` on a {spec.arch} device")
        return skipped(f"{spec.arch} artifact on a {platform.machine()} host; {how}")
    from forgeml.targets.host import detect_host

    lacking = [f for f in spec.cpu_features() if f not in detect_host().features] if detect_host().features else []
    if lacking:  # running it here would die of SIGILL
        return skipped(f"this CPU lacks {', '.join(lacking)}, which '{spec.name}' code uses; "
                       "run `forgeml verify` on a CPU that has them")
    if spec.device == "cuda" and not has_cuda_gpu():
        return skipped("no CUDA GPU on this machine")
    say("verifying against ONNX Runtime")
    remove_stale_scratch([(Path(tempfile.gettempdir()), f"{_SCRATCH}*"), (output.parent, f".{_SCRATCH}*")])
    with tempfile.TemporaryDirectory(prefix=f"{_SCRATCH}{os.getpid()}-") as tmp:
        candidate = write_artifact(Path(tmp) / output.name, manifest, files)
        return verify_range(Session(candidate), model_path, tolerance, options.seed)


_SCRATCH = "forgeml-verify-"  # + pid + "-" + random: the candidate artifact that verification loads
STALE_AFTER_S = 3600.0


def remove_stale_scratch(places: list[tuple[Path, str]]) -> list[Path]:
    """Remove verification scratch directories that a killed compile left (a `kill -9` during
    verification left a 47 MB directory beside the output that nothing removed): those matching a glob
    in each (folder, glob) pair, untouched for STALE_AFTER_S, whose process (the pid in the name; none in
    the hidden `.forgeml-verify-*` directories earlier versions made beside the output) is gone.
    Returns the removed paths."""
    removed = []
    now = time.time()
    for folder, pattern in places:
        for path in folder.glob(pattern):
            try:
                if not path.is_dir() or path.is_symlink() or now - path.stat().st_mtime < STALE_AFTER_S:
                    continue
            except OSError:
                continue
            pid = path.name.removeprefix(".").removeprefix(_SCRATCH).split("-")[0]
            if pid.isdigit() and _process_alive(int(pid)):
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, another user's
        return True
    return True
