"""The `forgeml` command line: each command is a thin shell over a library call."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import click
from rich.console import Console

from forgeml.errors import ForgeError, InvalidInput

console = Console(stderr=True)
out = Console(width=None if sys.stdout.isatty() else 160)  # wide tables in logs and pipes


def _parse_shapes(items: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for item in items:
        name, sep, dims = item.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = tuple(int(d) for d in dims.split(","))
        except ValueError:
            raise InvalidInput(f"--input-shape '{item}' is not NAME=D1,D2,... (e.g. x=1,3,224,224)") from None
        if any(d <= 0 for d in shapes[name]):
            raise InvalidInput(f"--input-shape '{item}': dimensions must be positive")
    return shapes


def _atomic_save_npz(path: Path, arrays: dict) -> None:
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
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
              help="Fix an input's shape (needed for symbolic dimensions). Repeatable.")
@click.option("-O", "--opt-level", default="O2", show_default=True, type=click.Choice(["O0", "O2"]),
              help="O2: forgeml's CPU schedules; O0: TVM's naive loops (debugging).")
@click.option("--no-verify", is_flag=True, help="Skip the comparison with ONNX Runtime.")
@click.option("--tolerance", type=float, help="Max error relative to the output's scale [default: 1e-3 fp32].")
def compile_cmd(model: Path, target: str, output: Path | None, input_shapes: tuple[str, ...], opt_level: str,
                no_verify: bool, tolerance: float | None) -> None:
    """Compile an ONNX MODEL into a verified .fml artifact."""
    from forgeml.compiler.build import CompileOptions, compile_model

    options = CompileOptions(target=target, input_shapes=_parse_shapes(input_shapes), opt_level=opt_level,
                             verify=not no_verify, tolerance=tolerance)
    output = output or model.with_suffix(".fml")
    with console.status("compiling") as status:
        manifest = compile_model(model, output, options, progress=lambda msg: status.update(msg))
    v = manifest.verification
    size = output.stat().st_size / 1e6
    secs = sum(manifest.compile_options.get("seconds", {}).values())
    console.print(f"[green]wrote[/] {output} ({size:.2f} MB, {manifest.target['name']}, {secs:.1f} s)")
    if v.get("skipped"):
        console.print(f"[yellow]not verified:[/] {v['skipped']}")
    else:
        console.print(f"[green]verified[/] against ONNX Runtime: max abs error {v['max_abs_error']:.3g}, "
                      f"max rel error {v['max_rel_error']:.3g} (tolerance {v['tolerance']:g})")


@cli.command("run")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("-i", "--input", "inputs", multiple=True, metavar="NAME=FILE.npy", help="An input tensor. Repeatable.")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Write outputs to this .npz file.")
@click.option("--threads", type=int, help="CPU threads [default: all cores].")
def run_cmd(artifact: Path, inputs: tuple[str, ...], output: Path | None, threads: int | None) -> None:
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
    session = forgeml.load(artifact, threads=threads)
    results = session.run(feeds)
    if output:
        _atomic_save_npz(output, results)
        console.print(f"[green]wrote[/] {output}: " + ", ".join(f"{k} {list(v.shape)}" for k, v in results.items()))
    else:
        for name, value in results.items():
            out.print(f"{name}: {value.dtype}{list(value.shape)}\n{value}")


@cli.command("bench")
@click.argument("artifacts", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--baseline", default="onnxruntime", show_default=True, type=click.Choice(["onnxruntime", "none"]))
@click.option("--onnx", "onnx_path", type=click.Path(path_type=Path),
              help="ONNX model for the baseline [default: the one recorded at compile time].")
@click.option("--threads", default=2, show_default=True, type=int, help="Threads for every engine.")
@click.option("--warmup", default=10, show_default=True, type=int)
@click.option("--repeat", default=100, show_default=True, type=int, help="Timed runs per engine.")
@click.option("--no-memory", is_flag=True, help="Skip the peak-RSS subprocess measurement.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the full report (raw samples).")
def bench_cmd(artifacts: tuple[Path, ...], baseline: str, onnx_path: Path | None, threads: int, warmup: int,
              repeat: int, no_memory: bool, json_path: Path | None) -> None:
    """Benchmark ARTIFACTS side by side with ONNX Runtime (alternating, same inputs and threads)."""
    from rich.progress import Progress

    from forgeml.bench.report import print_table
    from forgeml.bench.run import run_benchmark

    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("benchmarking", total=None)
        report = run_benchmark(list(artifacts), baseline=baseline, threads=threads, warmup=warmup,
                               repeat=repeat, onnx_path=onnx_path, memory=not no_memory,
                               progress=lambda done, total: bar.update(task, completed=done, total=total))
    print_table(report, out)
    if json_path:
        report.save(json_path)
        console.print(f"[green]wrote[/] {json_path}")


@cli.command("inspect")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the raw manifest.")
def inspect_cmd(artifact: Path, as_json: bool) -> None:
    """Show an ARTIFACT's manifest: target, inputs, outputs, verification, versions."""
    from forgeml.runtime.artifact import open_artifact

    af = open_artifact(artifact)
    m = af.manifest
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
    ]
    for line in lines:
        out.print(line, highlight=False)


@cli.command("targets")
def targets_cmd() -> None:
    """List target presets, with what each needs installed."""
    from rich.table import Table

    from forgeml.targets import PRESETS
    from forgeml.targets.host import detect_host

    host = detect_host()
    table = Table(title=f"host: {host.model} ({host.arch}, {host.cores} cores, mcpu {host.llvm_mcpu})")
    for col in ("name", "description", "arch", "device", "TVM target", "needs"):
        table.add_column(col)
    for spec in PRESETS.values():
        missing = spec.missing_tools()
        needs = ("missing: apt-get install " + " ".join(missing)) if missing else (" ".join(spec.needs) or "-")
        table.add_row(spec.name, spec.description, spec.arch, spec.device, json.dumps(spec.tvm_target()), needs)
    out.print(table)


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
    from forgeml.compiler import export

    shapes = export.parse_input_shapes(list(input_shapes))
    axes: dict[str, dict[int, str]] = {}
    for item in dynamic_axes:
        name, sep, axis = item.partition("=")
        if not sep or not axis.isdigit():
            raise InvalidInput(f"--dynamic-axis '{item}' is not NAME=AXIS")
        axes.setdefault(name, {})[int(axis)] = f"{name}_dim{axis}"
    with console.status(f"exporting {source}"):
        if source.endswith(".pt2"):
            export.export_pt2(source, output, input_shapes=shapes or None, opset=opset, dynamic_axes=axes or None)
        else:
            export.export_callable(source, shapes, output, opset=opset, dynamic_axes=axes or None)
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
