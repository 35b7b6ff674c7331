"""The `forgeml` command line: each command is a thin shell over a library call."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click
from rich.console import Console

from forgeml.errors import ForgeError, InvalidInput
from forgeml.shapes import InputShapes, parse_input_shapes

console = Console(stderr=True)
out = Console(width=None if sys.stdout.isatty() else 160)  # wide tables in logs and pipes


def _parse_shapes(items: tuple[str, ...]) -> InputShapes:
    return parse_input_shapes(items)


def _atomic_save_npz(path: Path, arrays: dict) -> None:
    import numpy as np

    from forgeml.runtime.artifact import create_beside

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = create_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="forgeml")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Compile trained models into fast, verified artifacts; run and benchmark them.

    \b
    forgeml zoo export resnet18 -o resnet18.onnx
    forgeml compile resnet18.onnx -t x86-64 -o resnet18.fml
    forgeml bench resnet18.fml --baseline onnxruntime --threads 2
    """
    ctx.obj = {"debug": debug}


@cli.command("compile")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-t", "--target", default="x86-64", show_default=True,
              help="Target preset (see `forgeml targets`) or a TVM target dict as JSON.")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Artifact path [default: MODEL with .fml].")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=D1,D2,...",
              help="An input's shape: a size pins a dimension, a range A..B lets it vary at run time "
                   "(e.g. input_ids=1..8,1..128). Needed for symbolic dimensions. Repeatable.")
@click.option("-O", "--opt-level", default="O2", show_default=True, type=click.Choice(["O0", "O2"]),
              help="O2: forgeml's rule-based schedules (CPU, GPU: dlight + forgeml's); O0: naive loops (debug).")
@click.option("--no-verify", is_flag=True, help="Skip the comparison with ONNX Runtime.")
@click.option("--tolerance", type=float,
              help="Max error relative to the output's scale [default: 1e-3 fp32, 2e-2 fp16].")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "fp16"]),
              help="fp16: mixed precision on GPU targets (fp16 compute, fp32 accumulation; float32 inputs/outputs).")
@click.option("--conv-layout", default="auto", show_default=True, type=click.Choice(["auto", "NCHW", "NHWC"]),
              help="GPU targets: the convolutions' data layout (NHWC: contiguous channel loads for the "
                   "tensor-core kernels; the model's inputs and outputs keep their layout). auto: NHWC "
                   "with --precision fp16, else NCHW.")
@click.option("--tensor-core-schedule", default="wmma", show_default=True, type=click.Choice(["wmma", "mma"]),
              help="GPU targets, fp16: how GEMMs and convolutions use tensor cores (mma: ldmatrix + mma.sync "
                   "with a cp.async pipeline, sm_80+; slower than wmma on whole networks on an H200, "
                   "faster on some kernels, which tuning picks).")
@click.option("--cuda-graph/--no-cuda-graph", default=None,
              help="GPU targets: replay each call's kernel launches as one CUDA graph (fewer launches) "
                   "[default: on for GPU targets].")
@click.option("--tune-minutes", type=float, help="Tune with MetaSchedule for up to this long first (results persist).")
@click.option("--tune-trials", type=int, help="Tuning budget in trials (with or without --tune-minutes).")
@click.option("--no-tuning-db", is_flag=True, help="Ignore tuning records; rule-based schedules only.")
@click.option("--sign-key", type=click.Path(path_type=Path), metavar="PRIVATE.pem",
              help="Sign the artifact with this ed25519 key (`forgeml keygen`).")
@click.option("--signer", metavar="NAME", help="With --sign-key: the name the signature records [default: user@host].")
@click.option("--buckets", default="ends", show_default=True, type=click.Choice(["ends", "none"]),
              help="With ranges in --input-shape: static-shape functions beside the symbolic one, run when the "
                   "inputs match them exactly (ends: each dimension at its minimum and maximum).")
@click.option("--winograd/--no-winograd", default=True, show_default=True,
              help="x86 CPU targets: 3x3 stride-1 convolutions by Winograd F(4x4)/F(2x2), about 2x faster "
                   "(transformed weights: up to 2x larger artifacts; a NaN or inf input spreads over its "
                   "output tile).")
def compile_cmd(model: Path, target: str, output: Path | None, input_shapes: tuple[str, ...], opt_level: str,
                no_verify: bool, tolerance: float | None, tune_minutes: float | None, tune_trials: int | None,
                no_tuning_db: bool, precision: str, conv_layout: str, tensor_core_schedule: str,
                cuda_graph: bool | None, sign_key: Path | None, signer: str | None, buckets: str,
                winograd: bool) -> None:
    """Compile an ONNX MODEL into a verified .fml artifact."""
    from forgeml.compiler.build import CompileOptions, compile_model

    options = CompileOptions(target=target, input_shapes=_parse_shapes(input_shapes), opt_level=opt_level,
                             verify=not no_verify, tolerance=tolerance, tune_minutes=tune_minutes,
                             tune_trials=tune_trials, use_tuning_db=not no_tuning_db, precision=precision,
                             conv_layout=conv_layout, tensor_core_schedule=tensor_core_schedule,
                             cuda_graph=cuda_graph, sign_key=sign_key, signer=signer, buckets=buckets,
                             winograd=winograd)
    output = output or model.with_suffix(".fml")
    with TuningProgress() as tuning_bar, console.status("compiling") as status:
        manifest = compile_model(model, output, options, progress=lambda msg: status.update(msg),
                                 tune_progress=tuning_bar.update)
    v = manifest.verification
    size = output.stat().st_size / 1e6
    secs = sum(manifest.compile_options.get("seconds", {}).values())
    console.print(f"[green]wrote[/] {output} ({size:.2f} MB, {manifest.target['name']}, {secs:.1f} s)"
                  + (f", signed by {manifest.signature['signer']}" if manifest.signature else ""))
    if manifest.tuning:
        _print_tuning(manifest.tuning)
    if v.get("skipped"):
        console.print(f"[yellow]not verified:[/] {v['skipped']}")
    else:
        console.print(f"[green]verified[/] against ONNX Runtime: max abs error {v['max_abs_error']:.3g}, "
                      f"max rel error {v['max_rel_error']:.3g} (tolerance {v['tolerance']:g})")


class TuningProgress:
    """A progress bar for tuning: trials done, best kernel latency so far, time left."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.bar = Progress(TextColumn("tuning"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[detail]}"), console=console, transient=True)
        self.task = None

    def __enter__(self) -> TuningProgress:
        return self

    def __exit__(self, *exc) -> None:
        if self.task is not None:
            self.bar.stop()

    def update(self, info: dict) -> None:
        if self.task is None:
            self.bar.start()
            self.task = self.bar.add_task("tuning", total=info["total"], detail="")
        left = info.get("seconds_left")
        detail = f"best kernel {info['best_ms'] * 1e3:.1f} us" + (f", {left / 60:.1f} min left" if left else "")
        self.bar.update(self.task, completed=min(info["trials"], info["total"]), detail=detail)


def _print_tuning(t: dict) -> None:
    console.print(f"tuning: {t['tasks']} kernels, {t['tasks_from_cache']} already in the database, "
                  f"{t['trials']} trials this run in {t['seconds']:.0f} s; tuned schedule used for "
                  f"{t['tuned_kernels_used']}, rules kept for {t['rule_kernels_kept']} (faster)"
                  + (" [interrupted: progress kept]" if t.get("interrupted") else ""))
    console.print(f"  database: {t['database']}")


@cli.command("tune")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-t", "--target", default="x86-64", show_default=True, help="Target preset (CPU or CUDA).")
@click.option("--minutes", type=float, help="Time budget.")
@click.option("--trials", type=int, help="Trial budget (with or without --minutes); with --measure-elsewhere, "
                                         "how many MetaSchedule candidates to write (CUDA fp16 GEMMs also get "
                                         "forgeml's tensor-core tilings; 0: those alone).")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=D1,D2,...",
              help="Fix an input's shape (needed for symbolic dimensions). Repeatable.")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "fp16"]),
              help="GPU targets: tune the kernels of this precision (as `forgeml compile --precision`).")
@click.option("--conv-layout", default="auto", show_default=True, type=click.Choice(["auto", "NCHW", "NHWC"]),
              help="GPU targets: tune the kernels of this convolution layout (as `forgeml compile --conv-layout`).")
@click.option("--refine", is_flag=True, help="Also search kernels that already have records, starting from them.")
@click.option("--measure-elsewhere", "measure_dir", type=click.Path(path_type=Path), metavar="DIR",
              help="Measure nothing here: write candidates to DIR for `python -m forgeml.runtime.measure DIR` "
                   "on a machine that runs the target's kernels (no compiler needed there), then "
                   "`forgeml tune-import DIR`.")
def tune_cmd(model: Path, target: str, minutes: float | None, trials: int | None, input_shapes: tuple[str, ...],
             precision: str, conv_layout: str, refine: bool, measure_dir: Path | None) -> None:
    """Tune MODEL's kernels into the target's persistent database ($FORGEML_CACHE, default
    ~/.cache/forgeml). Kernels already tuned (by any model) are skipped; Ctrl-C keeps progress.
    Later `forgeml compile` runs for this target use the records automatically."""
    from forgeml.compiler.build import tune_model

    with TuningProgress() as bar, console.status("tuning") as status:
        summary = tune_model(model, target, minutes=minutes, trials=trials, input_shapes=_parse_shapes(input_shapes),
                             progress=bar.update, precision=precision, conv_layout=conv_layout, refine=refine,
                             measure_elsewhere=measure_dir,
                             say=lambda msg: status.update(msg))
    if measure_dir is not None:
        s = summary
        console.print(f"[green]wrote[/] {s.directory}: {s.candidates} candidates ({s.variants} of them forgeml's "
                      f"tilings) for {s.kernels_in_batch} of {s.kernels} kernels, {s.rule_candidates} rule-based "
                      "schedules to compare "
                      f"({s.megabytes:.1f} MB, {s.seconds:.0f} s" + (f", {s.build_errors} failed to build" if
                                                                   s.build_errors else "") + ")")
        if s.first_build_error:
            console.print(f"[yellow]first build error:[/] {s.first_build_error}")
        console.print(f"next, where the kernels run: python -m forgeml.runtime.measure {s.directory}\n"
                      f"then here: forgeml tune-import {s.directory}")
        return
    console.print(f"tuning: {summary.tasks} kernels, {summary.tasks_from_cache} already tuned, "
                  f"{summary.trials} trials in {summary.seconds:.0f} s"
                  + (" [interrupted: progress kept]" if summary.interrupted else ""))
    console.print(f"database: {summary.database}")


@cli.command("tune-import")
@click.argument("batch_dir", type=click.Path(path_type=Path))
def tune_import_cmd(batch_dir: Path) -> None:
    """Commit a measured batch (`forgeml tune --measure-elsewhere DIR`, then `python -m
    forgeml.runtime.measure DIR` where the kernels run) to the target's tuning database."""
    from rich.table import Table

    from forgeml.compiler.build import import_measurements

    summary = import_measurements(batch_dir)
    table = Table("kernel", "rules (us)", "best tuned (us)", "speedup", "best schedule",
                  title=f"measured on {summary.device}")
    for k in summary.kernels:
        rules, best, speedup = k["rules_us"], k["best_us"], k["speedup"]
        table.add_row(k["kernel"], "-" if rules is None else f"{rules:g}", "-" if best is None else f"{best:g}",
                      "-" if speedup is None else f"{speedup:.2f}x", k["best_source"] or "-")
    console.print(table)
    console.print(f"[green]imported[/] {summary.records} tuned records ({summary.failed} candidates failed there, "
                  f"{summary.wrong} left out for outputs off the rule schedule's), {summary.rule_latencies} rule "
                  f"latencies into {summary.database}")


@cli.command("measure")
@click.argument("batch_dir", type=click.Path(path_type=Path))
@click.option("--timeout", type=float, default=60.0, show_default=True, help="Seconds one candidate may take.")
def measure_cmd(batch_dir: Path, timeout: float) -> None:
    """Time a tuning batch's kernels on this machine (the same as `python -m forgeml.runtime.measure`,
    which needs only forgeml's runtime); resumes an interrupted run."""
    from rich.progress import Progress

    from forgeml.runtime.measure import measure_batch

    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("measuring", total=None)
        doc = measure_batch(batch_dir, timeout, lambda n, total: bar.update(task, completed=n, total=total))
    failed = sum(1 for r in doc["results"].values() if "error" in r)
    console.print(f"[green]measured[/] {len(doc['results'])} candidates on {doc['device']['name']} ({failed} failed): "
                  f"{batch_dir / 'results.json'}")


@cli.command("run")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("-i", "--input", "inputs", multiple=True, metavar="NAME=FILE.npy", help="An input tensor. Repeatable.")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Write outputs to this .npz file.")
@click.option("--threads", type=int, help="CPU threads [default: all cores].")
@click.option("--trusted-key", "trusted_keys", multiple=True, type=click.Path(path_type=Path), metavar="PUBLIC.pem",
              help="Run the artifact only if this key signed it (`forgeml keygen`'s public.pem). Repeatable.")
def run_cmd(artifact: Path, inputs: tuple[str, ...], output: Path | None, threads: int | None,
            trusted_keys: tuple[Path, ...]) -> None:
    """Run an ARTIFACT on inputs given as .npy files."""
    import numpy as np

    import forgeml

    feeds = {}
    for item in inputs:
        name, sep, file = item.partition("=")
        if not sep or not name or not file:
            raise InvalidInput(f"--input '{item}' is not NAME=FILE.npy")
        try:
            feeds[name] = np.load(file, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise InvalidInput(f"--input {name}: cannot read {file} as .npy ({e})") from None
    if output:
        for source in [artifact, *(item.partition("=")[2] for item in inputs)]:
            if output.resolve() == Path(source).resolve() or (
                    Path(source).exists() and output.exists() and os.path.samefile(source, output)):
                raise InvalidInput(f"-o {output} is {source}, which this run reads; give another name such as "
                                   "outputs.npz")
    session = forgeml.load(artifact, threads=threads, trusted_keys=list(trusted_keys) or None)
    results = session.run(feeds)
    if output:
        arrays = _npz_arrays(results)
        _atomic_save_npz(output, arrays)
        console.print(f"[green]wrote[/] {output}: " + ", ".join(f"{k} {list(v.shape)}" for k, v in arrays.items()))
    else:
        for name, value in results.items():
            if isinstance(value, list):  # a sequence output
                out.print(f"{name}: sequence of {len(value)} tensors")
                for i, item in enumerate(value):
                    out.print(f"{name}[{i}]: {item.dtype}{list(item.shape)}\n{item}")
            else:
                out.print(f"{name}: {value.dtype}{list(value.shape)}\n{value}")


def _npz_arrays(results: dict) -> dict:
    """Outputs as .npz entries: a sequence output `seq` as `seq_0`, `seq_1`, ...; refused where such a
    name is also another output's."""
    arrays = {name: value for name, value in results.items() if not isinstance(value, list)}
    for name, value in results.items():
        if isinstance(value, list):
            for i, item in enumerate(value):
                if f"{name}_{i}" in arrays:
                    raise InvalidInput(f"cannot write sequence output '{name}' to .npz: its element {i} would be "
                                       f"'{name}_{i}', which is another output's name; run without -o")
                arrays[f"{name}_{i}"] = item
    return arrays


@cli.command("bench")
@click.argument("artifacts", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--baseline", "baselines", multiple=True, default=["onnxruntime"], show_default=True,
              type=click.Choice(["onnxruntime", "onnxruntime-tf32-off", "onnxruntime-fp16", "onnxruntime-trt-fp16",
                                 "none"]),
              help="Repeatable. onnxruntime: the model as given (fp32; TF32 on CUDA); -tf32-off: CUDA fp32 without "
                   "TF32; -fp16: an fp16 copy of the model (CUDA, or the CPU without it); -trt-fp16: TensorRT "
                   "fp16 (engine build time reported apart). Ratios only between rows of equal precision.")
@click.option("--onnx", "onnx_path", type=click.Path(path_type=Path),
              help="ONNX model for the baseline [default: the one recorded at compile time].")
@click.option("--threads", default=2, show_default=True, type=int, help="Threads for every engine.")
@click.option("--warmup", default=10, show_default=True, type=int)
@click.option("--repeat", default=100, show_default=True, type=int, help="Timed runs per engine.")
@click.option("--no-memory", is_flag=True, help="Skip the peak-RSS subprocess measurement.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the full report (raw samples).")
@click.option("--emulate", is_flag=True, help="Also run artifacts for other architectures here, under qemu.")
@click.option("--rpc", metavar="HOST:PORT", help="Also run them on this TVM RPC device (`forgeml device serve`).")
@click.option("--tracker", metavar="HOST:PORT", help="Also run them on a device from this TVM RPC tracker.")
@click.option("--device-key", metavar="KEY", help="With --tracker: the device's key.")
@click.option("--rpc-token-file", type=click.Path(path_type=Path),
              help="File holding the device server's token (default: $FORGEML_RPC_TOKEN).")
@click.option("--offsite-seconds", default=60.0, show_default=True, type=float,
              help="Emulated/RPC cases: cut --repeat to about this long.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=D1,D2,...",
              help="Shape to time for an input with dynamic dimensions (inside its compiled ranges) "
                   "[default: the upper bounds]. Repeatable.")
def bench_cmd(artifacts: tuple[Path, ...], baselines: tuple[str, ...], onnx_path: Path | None, threads: int,
              warmup: int, repeat: int, no_memory: bool, json_path: Path | None, emulate: bool, rpc: str | None,
              tracker: str | None, device_key: str | None, rpc_token_file: Path | None,
              offsite_seconds: float, input_shapes: tuple[str, ...]) -> None:
    """Benchmark ARTIFACTS side by side with ONNX Runtime (alternating, same inputs and threads).

    Artifacts for another architecture run emulated (--emulate) or on a device (--rpc, --tracker);
    ONNX Runtime on this machine stays the reference.
    """
    from rich.progress import Progress

    from forgeml.bench.report import print_table
    from forgeml.bench.run import run_benchmark
    from forgeml.targets.rpc_server import read_token_file

    token = read_token_file(rpc_token_file) if rpc_token_file else None

    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("benchmarking", total=None)
        report = run_benchmark(list(artifacts), baseline=list(baselines), threads=threads, warmup=warmup,
                               repeat=repeat, onnx_path=onnx_path, memory=not no_memory,
                               progress=lambda done, total: bar.update(task, completed=done, total=total),
                               emulate=emulate, rpc=rpc, tracker=tracker, device_key=device_key,
                               offsite_budget_s=offsite_seconds, rpc_token=token,
                               input_shapes=_parse_shapes(input_shapes))
    print_table(report, out)
    if json_path:
        report.save(json_path)
        console.print(f"[green]wrote[/] {json_path}")


@cli.command("inspect")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the raw manifest.")
@click.option("--trusted-key", "trusted_keys", multiple=True, type=click.Path(path_type=Path), metavar="PUBLIC.pem",
              help="Also check the signature (and every member's checksum) against these keys. Repeatable.")
def inspect_cmd(artifact: Path, as_json: bool, trusted_keys: tuple[Path, ...]) -> None:
    """Show an ARTIFACT's manifest: target, inputs, outputs, verification, versions, signer."""
    from forgeml.runtime.artifact import open_artifact

    af = open_artifact(artifact)
    m = af.manifest
    if trusted_keys:
        from forgeml.runtime.trust import check_signature

        check_signature(af.data, list(trusted_keys), str(artifact))
        af.verify_checksums()
    if as_json:
        out.print_json(json.dumps(m.to_json()))
        return
    v = m.verification
    lines = [
        f"[bold]{artifact}[/] (format {m.format_version}, {artifact.stat().st_size / 1e6:.2f} MB)",
        f"target       {m.target.get('name')} ({m.target.get('arch')}, {m.target.get('device')}): "
        f"{json.dumps(m.target.get('target'))}",
        f"source       {m.source.get('file')} sha256 {str(m.source.get('sha256'))[:16]}... "
        f"opset {m.source.get('opset')}",
        *[f"input        {t.describe()}" for t in m.inputs],
        *[f"output       {t.describe()}" for t in m.outputs],
        f"weights      {len(m.weights)} tensors, {sum(w.nbytes for w in m.weights) / 1e6:.2f} MB",
        "verification " + (f"skipped: {v['skipped']}" if v.get("skipped") else
                           f"{'passed' if v.get('passed') else 'FAILED'} vs {v.get('reference')}: max abs "
                           f"{v.get('max_abs_error', float('nan')):.3g}, "
                           f"max rel {v.get('max_rel_error', float('nan')):.3g}"
                           f" (tolerance {v.get('tolerance')})"),
        f"options      {json.dumps(m.compile_options)}",
        f"tuning       {json.dumps(m.tuning) if m.tuning else 'none (rule-based schedules)'}",
        f"versions     {', '.join(f'{k} {v}' for k, v in m.versions.items())}",
        *[f"member       {name} sha256 {digest[:16]}..." for name, digest in m.members.items()],
        f"digest       {m.digest} (manifest, members' checksums inside)",
        "signature    " + (f"ed25519 by {m.signature['signer']}, key {m.signature['key_id'][:23]}... "
                           + ("(checked: a trusted key signed it)" if trusted_keys else "(not checked: --trusted-key)")
                           if m.signature else "none (unsigned)"),
    ]
    for line in lines:
        out.print(line, highlight=False)


@cli.command("keygen")
@click.argument("directory", type=click.Path(path_type=Path))
def keygen_cmd(directory: Path) -> None:
    """Make an ed25519 key pair in DIRECTORY: private.pem (sign with it; keep it private) and public.pem
    (give it to those who load your artifacts)."""
    from forgeml.runtime.trust import generate_keys

    private, public, key_id = generate_keys(directory)
    console.print(f"[green]wrote[/] {private} (keep it private) and {public} (key {key_id[:23]}...)")
    out.print(f"sign:  forgeml compile MODEL --sign-key {private}   or   forgeml sign ARTIFACT --key {private}\n"
              f"check: forgeml run ARTIFACT --trusted-key {public}", highlight=False)


@cli.command("sign")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--key", required=True, type=click.Path(path_type=Path), metavar="PRIVATE.pem",
              help="The ed25519 private key (`forgeml keygen`).")
@click.option("--signer", metavar="NAME", help="The name the signature records [default: user@host].")
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Write the signed artifact here [default: in place].")
def sign_cmd(artifact: Path, key: Path, signer: str | None, output: Path | None) -> None:
    """Sign an ARTIFACT (its members are verified first; an earlier signature is replaced)."""
    from forgeml.runtime.trust import load_signing_key, sign_artifact

    manifest = sign_artifact(artifact, load_signing_key(key, signer), output)
    console.print(f"[green]signed[/] {output or artifact} as {manifest.signature['signer']} "
                  f"(key {manifest.signature['key_id'][:23]}...)")


@cli.command("targets")
def targets_cmd() -> None:
    """List target presets, with what each needs installed."""
    from rich.table import Table

    from forgeml.targets import PRESETS
    from forgeml.targets.host import detect_host

    host = detect_host()
    table = Table(title=f"host: {host.model} ({host.arch}, {host.cores} cores, mcpu {host.llvm_mcpu})")
    from forgeml.targets.emulate import runs_here

    for col in ("name", "description", "arch", "device", "TVM target", "needs", "runs from here"):
        table.add_column(col)
    for spec in PRESETS.values():
        missing = spec.missing_tools()
        needs = ("missing: apt-get install " + " ".join(missing)) if missing else (" ".join(spec.needs) or "-")
        table.add_row(spec.name, spec.description, spec.arch, spec.device, json.dumps(spec.tvm_target()), needs,
                      runs_here(spec))
    out.print(table)


@cli.command("verify")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--emulate", is_flag=True, help="Run an artifact for another architecture under qemu (aarch64).")
@click.option("--onnx", "onnx_path", type=click.Path(path_type=Path),
              help="The source ONNX model [default: the one recorded at compile time].")
@click.option("--tolerance", type=float, help="Max error relative to the output's scale [default: the artifact's].")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the random inputs.")
def verify_cmd(artifact: Path, emulate: bool, onnx_path: Path | None, tolerance: float | None, seed: int) -> None:
    """Run ARTIFACT (natively, or emulated) and ONNX Runtime on the same seeded inputs; exit 3 if they differ."""
    from forgeml.errors import VerificationFailed
    from forgeml.targets.emulate import verify_artifact

    with console.status("verifying") as status:
        result = verify_artifact(artifact, onnx_path, emulate=emulate, tolerance=tolerance, seed=seed,
                                 progress=lambda msg: status.update(msg))
    summary = (f"max abs error {result.max_abs_error:.3g}, max rel error {result.max_rel_error:.3g} "
               f"(tolerance {result.tolerance:g})")
    if not result.passed:
        raise VerificationFailed(f"{artifact}: outputs differ from ONNX Runtime: {summary}")
    out.print(f"verified {artifact} against ONNX Runtime{' (emulated)' if emulate else ''}: {summary}",
              highlight=False)


@cli.group("device")
def device_group() -> None:
    """Serve this machine (or an emulated one) as a TVM RPC device for `forgeml bench --rpc`."""


@device_group.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: all).")
@click.option("--port", default=9090, show_default=True, type=int)
@click.option("--port-end", type=int, help="Take the first free port in [--port, --port-end).")
@click.option("--tracker", metavar="HOST:PORT", help="Register with this TVM RPC tracker.")
@click.option("--key", default="", help="Device key for the tracker (what `bench --device-key` asks for).")
@click.option("--emulate", "emulate_arch", metavar="ARCH", help="Serve an emulated device instead (aarch64).")
@click.option("--token-file", type=click.Path(path_type=Path),
              help="File holding the token every client must give (or $FORGEML_RPC_TOKEN); required beyond "
                   "loopback.")
@click.option("--idle-timeout", default=300.0, show_default=True, type=float,
              help="Close a session whose client is silent this many seconds.")
def device_serve(host: str, port: int, port_end: int | None, tracker: str | None, key: str,
                 emulate_arch: str | None, token_file: Path | None, idle_timeout: float) -> None:
    """Serve TVM RPC sessions (runtime library only) until interrupted. Clients that give the token
    upload and run native code as this user: the token keeps others out, it does not sandbox."""
    from forgeml.targets.rpc_server import read_token_file, server_token

    token = server_token(host, read_token_file(token_file) if token_file else None)
    if emulate_arch:
        import signal

        from forgeml.targets.rpc import EmulatedServer

        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the `with` ends the emulated server too
        with EmulatedServer(emulate_arch, host, port, port_end, tracker, key, output=sys.stdout,
                            progress=lambda msg: console.print(msg), token=token,
                            idle_timeout_s=idle_timeout) as server:
            out.print(server.log[-1], highlight=False)
            server.wait()
        return
    from forgeml.targets.rpc import serve

    serve(host, port, port_end, tracker, key, token=token, idle_timeout_s=idle_timeout,
          announce=lambda msg: out.print(msg, highlight=False))


@cli.group("zoo")
def zoo_group() -> None:
    """Built-in models (torch architectures, seeded weights; nothing is downloaded)."""


@zoo_group.command("list")
def zoo_list() -> None:
    """List the built-in models and their inputs."""
    from forgeml.zoo import ZOO

    for model in ZOO.values():
        shapes = ", ".join(f"{n}: {dt}[{','.join(map(str, s))}]" for n, (s, dt) in model.inputs.items())
        out.print(f"[bold]{model.name:<14}[/] {model.description}  ({shapes})", highlight=False)


@zoo_group.command("export")
@click.argument("name")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="ONNX path [default: NAME.onnx].")
@click.option("--opset", default=17, show_default=True, type=int)
@click.option("--batch", type=int, help="Batch size (dimension 0 of every input).")
def zoo_export(name: str, output: Path | None, opset: int, batch: int | None) -> None:
    """Export built-in model NAME to ONNX."""
    from forgeml.zoo import export_zoo_model

    output = output or Path(f"{name}.onnx")
    with console.status(f"exporting {name}"):
        export_zoo_model(name, output, opset=opset, batch=batch)
    console.print(f"[green]wrote[/] {output} ({output.stat().st_size / 1e6:.2f} MB)")


@cli.command("export")
@click.argument("source")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=D1,D2,...[:DTYPE]",
              help="Input name and shape (dtype float32 unless given). Repeatable.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="ONNX path to write.")
@click.option("--opset", default=17, show_default=True, type=int)
@click.option("--dynamic-axis", "dynamic_axes", multiple=True, metavar="NAME=AXIS",
              help="Mark an input axis dynamic (e.g. x=0 for the batch). Repeatable.")
def export_cmd(source: str, input_shapes: tuple[str, ...], output: Path, opset: int,
               dynamic_axes: tuple[str, ...]) -> None:
    """Export a PyTorch model to ONNX. SOURCE is `package.module:factory` (returns an nn.Module)
    or a saved torch.export program (`.pt2`)."""
    from forgeml.compiler.frontend import torch_export as export

    shapes, dtypes = export.parse_input_specs(list(input_shapes))  # ids=1,128:int64 keeps its dtype
    axes: dict[str, dict[int, str]] = {}
    for item in dynamic_axes:
        name, sep, axis = item.partition("=")
        if not sep or not axis.isdigit():
            raise InvalidInput(f"--dynamic-axis '{item}' is not NAME=AXIS")
        axes.setdefault(name, {})[int(axis)] = f"{name}_dim{axis}"
    with console.status(f"exporting {source}"):
        if source.endswith(".pt2"):
            export.export_pt2(source, output, input_shapes=shapes or None, opset=opset, dynamic_axes=axes or None,
                              input_dtypes=dtypes or None)
        else:
            export.export_callable(source, shapes, output, opset=opset, dynamic_axes=axes or None,
                                   input_dtypes=dtypes or None)
    console.print(f"[green]wrote[/] {output} ({output.stat().st_size / 1e6:.2f} MB)")


@cli.command("bundle")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Deploy folder to create.")
def bundle_cmd(artifact: Path, output: Path) -> None:
    """Make a self-contained deploy folder for ARTIFACT (needs only python3 + numpy on the device)."""
    from forgeml.bundle import bundle

    sizes = bundle(artifact, output)
    console.print(f"[green]wrote[/] {output}: {sizes['total_mb']:.1f} MB (runtime {sizes['runtime_mb']:.1f} MB, "
                  f"artifact {sizes['artifact_mb']:.1f} MB); on the device: cd {output.name} && python3 run.py")


def main(argv: list[str] | None = None) -> int:
    """Entry point: one-line errors with exit codes (2 bad input, 3 verification failed, 1 internal)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        cli.main(args=argv, prog_name="forgeml", standalone_mode=False)
        return 0
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Abort:
        console.print("aborted")
        return 130
    except ForgeError as e:
        if debug:
            raise
        console.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        return e.exit_code
    except KeyboardInterrupt:
        console.print("interrupted; nothing was written at the output path")
        return 130
    except Exception as e:  # a bug in forgeml or TVM: say so in one line
        if debug:
            raise
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        console.print(f"[red]internal error:[/] {type(e).__name__}: {first_line} (--debug shows the traceback)",
                      highlight=False, soft_wrap=True)
        return 1


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
