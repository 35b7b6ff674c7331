"""Run artifacts built for another architecture on this machine, under QEMU user-mode emulation.

An emulated device is a private directory under $FORGEML_CACHE (default ~/.cache/forgeml), built
once per architecture and TVM version:

    sysroot/   Debian's Python and the C/C++ libraries it needs, from `apt-get download` + `dpkg -x`
    site/      aarch64 wheels: numpy, ml_dtypes, typing_extensions, apache-tvm-ffi, and from the
               apache-tvm wheel only its Python files and libtvm_runtime.so (not the 240 MB compiler)

Artifacts run there with forgeml's own lean runtime (a copy of forgeml/runtime on PYTHONPATH,
FORGEML_TVM_LIB pointing at the emulated libtvm_runtime.so): the same code a real device runs.
Never `apt-get install python3:arm64` to get an emulated Python: it removes the host's python3.

Only standard-library imports at module level: this module is also copied into emulated devices.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forgeml.errors import ForgeError, InvalidInput, ToolchainMissing

Progress = Callable[[str], None]

_PY = "3.11"  # Debian 12's python3.11: the wheels below are cp311
# Debian packages that make a Python 3.11 able to import numpy and tvm_ffi (measured: 55 MB).
_DEBS = ("python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "libc6", "libgcc-s1",
         "libstdc++6", "gcc-12-base", "zlib1g", "libexpat1", "libssl3", "libffi8", "libbz2-1.0", "liblzma5",
         "libcrypt1", "libuuid1")
_PINNED = {"apache-tvm": "0.27.0.post1", "apache-tvm-ffi": "0.1.14.post1"}  # when not installed here
_WHEELS = ("numpy>=1.24,<3", "ml_dtypes", "typing_extensions")
# apache-tvm members an emulated device never needs: the compiler, CUDA, headers, sources.
_TVM_SKIP = ("tvm/3rdparty/", "tvm/src/", "tvm/include/", "tvm/cmake/", "tvm/web/", "tvm/lib64/",
             "tvm/licenses/")
_TVM_LIBS = ("tvm/lib/libtvm_runtime.so",)
# forgeml files an emulated device gets: the lean runtime and the device-side RPC server.
_FORGEML_FILES = ("__init__.py", "version.py", "process.py", "errors.py", "runtime/*.py", "targets/*.py")


@dataclass(frozen=True)
class Emulator:
    arch: str  # platform.machine() of the emulated device
    qemu: str  # the qemu-user binary
    deb_arch: str  # Debian's name for the architecture
    wheel_platform: str  # pip's --platform for its wheels


EMULATORS: dict[str, Emulator] = {
    "aarch64": Emulator("aarch64", "qemu-aarch64", "arm64", "manylinux_2_28_aarch64"),
}

_CANNOT_EMULATE = {
    "riscv64": "riscv64 artifacts cannot be run emulated: apache-tvm publishes no riscv64 TVM runtime "
               "(no riscv64 wheels of apache-tvm, apache-tvm-ffi or numpy), and building libtvm_runtime needs "
               "TVM's C++ sources; run it on a riscv64 device with a TVM runtime built from source",
}


def runs_here(spec) -> str:
    """Where an artifact for TargetSpec `spec` can run and be verified from this machine (`forgeml targets`)."""
    from forgeml.targets.host import detect_host

    host = detect_host()
    if spec.arch == host.arch:
        lacking = [f for f in spec.cpu_features() if host.features and f not in host.features]
        if lacking:
            return f"no: this CPU lacks {', '.join(lacking)}"
        if spec.device == "cuda" and not Path("/dev/nvidia0").exists():
            return "no CUDA GPU here"
        return "natively"
    if spec.device == "cuda":
        return "on the device itself (its GPU)"
    if spec.arch in _CANNOT_EMULATE:
        return f"on a device only (bench --rpc): no {spec.arch} TVM runtime to emulate"
    if spec.arch in EMULATORS:
        qemu = EMULATORS[spec.arch].qemu
        return "emulated (verify/bench --emulate)" + ("" if shutil.which(qemu) else
                                                      "; missing: apt-get install qemu-user")
    return "on a device only (bench --rpc)"


def cache_root() -> Path:
    return Path(os.environ.get("FORGEML_CACHE") or "~/.cache/forgeml").expanduser()


def emulator_for(arch: str) -> Emulator:
    """The emulator for `arch`, or a one-line error saying why there is none."""
    if arch in _CANNOT_EMULATE:
        raise ToolchainMissing(_CANNOT_EMULATE[arch])
    if arch not in EMULATORS:
        raise InvalidInput(f"cannot emulate {arch} artifacts; emulated architectures: {', '.join(EMULATORS)}")
    emulator = EMULATORS[arch]
    if not shutil.which(emulator.qemu):
        raise ToolchainMissing(f"{emulator.qemu} not found: apt-get install qemu-user  (or: make toolchains)")
    return emulator


def _tvm_versions() -> dict[str, str]:
    """The TVM versions the device runtime must have: this machine's (the compiler's), else the pins."""
    from importlib import metadata

    versions = {}
    for dist, pinned in _PINNED.items():
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = pinned
    return versions


@dataclass(frozen=True)
class EmulatedDevice:
    """A built emulated device: run Python on it with `command` and `environ`."""

    emulator: Emulator
    root: Path

    @property
    def sysroot(self) -> Path:
        return self.root / "sysroot"

    @property
    def site(self) -> Path:
        return self.root / "site"

    @property
    def tvm_lib(self) -> Path:
        return self.site / "tvm" / "lib"

    def command(self, *args: str) -> list[str]:
        python = self.sysroot / "usr" / "bin" / f"python{_PY}"
        return [self.emulator.qemu, "-L", str(self.sysroot), str(python), *args]

    def environ(self, forgeml_path: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The host's environment less Python and loader settings, plus the device's paths."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PYTHON", "LD_", "QEMU_", "TVM_", "FORGEML_TVM"))}
        env.update(PYTHONPATH=f"{forgeml_path}{os.pathsep}{self.site}", PYTHONNOUSERSITE="1",
                   PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1", FORGEML_TVM_LIB=str(self.tvm_lib))
        env.update(extra or {})
        return env


def prepare(arch: str = "aarch64", progress: Progress | None = None) -> EmulatedDevice:
    """The emulated device for `arch`, built on first use (about a minute) and cached."""
    emulator = emulator_for(arch)
    versions = _tvm_versions()
    name = f"{arch}-py{_PY}-tvm{versions['apache-tvm']}-ffi{versions['apache-tvm-ffi']}"
    root = cache_root() / "emulate" / name
    if (root / "device.json").is_file():
        return EmulatedDevice(emulator, root)
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; the others then find it built
        if not (root / "device.json").is_file():
            _build(emulator, versions, root, progress or (lambda _msg: None))
    return EmulatedDevice(emulator, root)


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip() and "WARNING" not in ln]
        raise ToolchainMissing(f"{what} failed: {lines[-1] if lines else f'exit {proc.returncode}'}")
    return proc.stdout


def _build(emulator: Emulator, versions: dict[str, str], root: Path, say: Progress) -> None:
    for tool, package in (("apt-get", "apt"), ("dpkg", "dpkg")):
        if not shutil.which(tool):
            raise ToolchainMissing(f"building the {emulator.arch} sysroot needs Debian's {tool} ({package})")
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        sysroot, site, downloads = tmp / "sysroot", tmp / "site", tmp / "downloads"
        for d in (sysroot, site, downloads):
            d.mkdir()
        say(f"downloading the {emulator.arch} Python sysroot (Debian packages)")
        probe = subprocess.run(["apt-cache", "show", f"libc6:{emulator.deb_arch}"], capture_output=True)
        if probe.returncode != 0 or not probe.stdout.strip():
            raise ToolchainMissing(
                f"apt knows no {emulator.deb_arch} packages: dpkg --add-architecture {emulator.deb_arch} && "
                "apt-get update  (or: make toolchains)")
        _run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root",
              *[f"{p}:{emulator.deb_arch}" for p in _DEBS]], "apt-get download", cwd=downloads)
        for deb in sorted(downloads.glob("*.deb")):
            _run(["dpkg", "-x", str(deb), str(sysroot)], f"dpkg -x {deb.name}")
            deb.unlink()

        say(f"downloading {emulator.arch} wheels (apache-tvm {versions['apache-tvm']} runtime, "
            f"apache-tvm-ffi {versions['apache-tvm-ffi']}, numpy)")
        _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
              "--platform", emulator.wheel_platform, "--python-version", _PY.replace(".", ""),
              "--implementation", "cp", "-d", str(downloads),
              f"apache-tvm=={versions['apache-tvm']}", f"apache-tvm-ffi=={versions['apache-tvm-ffi']}", *_WHEELS],
             "pip download")
        for wheel in sorted(downloads.glob("*.whl")):
            with zipfile.ZipFile(wheel) as zf:
                if wheel.name.startswith("apache_tvm-"):
                    zf.extractall(site, [m for m in zf.namelist() if m.startswith("tvm/")
                                         and not m.startswith(_TVM_SKIP)
                                         and (not m.startswith("tvm/lib/") or m in _TVM_LIBS)])
                else:
                    zf.extractall(site)
            wheel.unlink()
        if not (site / _TVM_LIBS[0]).is_file():
            raise ToolchainMissing(f"the {emulator.arch} apache-tvm wheel has no {_TVM_LIBS[0]}")

        if sys.version_info[:2] == tuple(map(int, _PY.split("."))):
            # Byte-compile here (seconds), not on every emulated start (each import of numpy would
            # recompile under qemu): same magic number, hash-checked .pyc files.
            say("byte-compiling the emulated Python's standard library and site")
            import compileall
            import py_compile

            for d in (sysroot / "usr" / "lib" / f"python{_PY}", site):
                compileall.compile_dir(d, quiet=2, workers=0,
                                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
        downloads.rmdir()
        (tmp / "device.json").write_text(json.dumps(
            {"arch": emulator.arch, "python": _PY, "debs": list(_DEBS), **versions,
             "built": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2))
        shutil.rmtree(root, ignore_errors=True)  # a half-built leftover without device.json
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def copy_forgeml(dest: Path) -> Path:
    """Copy forgeml's device-side files (lean runtime, errors, targets) to dest/forgeml; returns dest."""
    package = Path(__file__).resolve().parent.parent
    for pattern in _FORGEML_FILES:
        for src in package.glob(pattern):
            target = dest / "forgeml" / src.relative_to(package)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)
    return dest


# Runs inside the emulated device with the lean runtime only: load, run once, time, report as JSON.
_DRIVER = """
import json, platform, sys, time
t0 = time.perf_counter()
import numpy as np
import forgeml
from forgeml.errors import ForgeError
artifact, inputs, outputs, threads, warmup, repeat, budget = sys.argv[1:8]
threads, warmup, repeat, budget = int(threads), int(warmup), int(repeat), float(budget)
try:
    session = forgeml.load(artifact, threads=threads or None)
except ForgeError as e:
    print(json.dumps({"error": str(e), "exit_code": e.exit_code})); sys.exit(0)
data = np.load(inputs)
feeds = {k: data[k] for k in data.files}
t1 = time.perf_counter()
result = session.run(feeds)
first_call = time.perf_counter() - t1
first_output = time.perf_counter() - t0
np.savez(outputs, **result)
warm = min(warmup, int(0.2 * budget / max(first_call, 1e-6)))
runs = min(repeat, max(min(3, repeat), int(budget / max(first_call, 1e-6))))
for _ in range(warm):
    session.run(feeds)
samples = []
for _ in range(runs):
    t = time.perf_counter()
    session.run(feeds)
    samples.append(time.perf_counter() - t)
print(json.dumps({"samples_s": samples, "warmup": warm, "load_to_first_output_s": first_output,
                  "process_peak_rss_mb": [int(l.split()[1]) for l in open("/proc/self/status")
                                          if l.startswith("VmHWM:")][0] / 1024,
                  "machine": platform.machine()}))
"""


def run_emulated(artifact: str | Path, feeds: dict[str, Any], threads: int = 0, warmup: int = 0, repeat: int = 0,
                 budget_s: float = 60.0, timeout_s: float = 1800, progress: Progress | None = None,
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run an artifact on its emulated device: (outputs, timing report). `repeat` timed runs after
    `warmup`, cut down so that the timed runs take about `budget_s` (emulation is 5-60x slower)."""
    import numpy as np

    from forgeml.runtime.artifact import open_artifact

    artifact = Path(artifact).resolve()
    arch = open_artifact(artifact).manifest.target.get("arch", "")
    device = prepare(arch, progress)
    with tempfile.TemporaryDirectory(prefix="forgeml-emulate-") as tmp:
        tmp_path = Path(tmp)
        copy_forgeml(tmp_path / "py")
        (tmp_path / "driver.py").write_text(_DRIVER)
        np.savez(tmp_path / "inputs.npz", **feeds)
        cmd = device.command(str(tmp_path / "driver.py"), str(artifact), str(tmp_path / "inputs.npz"),
                             str(tmp_path / "outputs.npz"), str(threads), str(warmup), str(repeat), str(budget_s))
        if progress:
            progress(f"running {artifact.name} under {device.emulator.qemu}")
        try:
            proc = subprocess.run(cmd, env=device.environ(tmp_path / "py"), capture_output=True, text=True,
                                  timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise ForgeError(f"{artifact.name} under {device.emulator.qemu} took over {timeout_s:g} s") from None
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
            raise ForgeError(f"{artifact.name} failed under {device.emulator.qemu} (exit {proc.returncode}): "
                             f"{err[-1] if err else 'no output'}")
        report = json.loads(lines[-1])
        if "error" in report:
            raise (InvalidInput if report.get("exit_code") == 2 else ForgeError)(report["error"])
        with np.load(tmp_path / "outputs.npz") as data:
            outputs = {k: data[k] for k in data.files}
    report["emulator"] = device.emulator.qemu
    return outputs, report


def verify_artifact(artifact: str | Path, onnx_path: str | Path | None = None, emulate: bool = False,
                    tolerance: float | None = None, seed: int = 0, progress: Progress | None = None):
    """Run an artifact (natively, or emulated for another architecture) and ONNX Runtime on the host on
    the same seeded inputs; returns a VerifyResult (passed or not: the caller decides what to do)."""
    from forgeml.compiler.verify import (
        DEFAULT_TOLERANCE,
        VerifyResult,
        compare,
        onnxruntime_session,
        seeded_inputs,
        source_onnx,
    )
    from forgeml.runtime.artifact import open_artifact

    artifact = Path(artifact)
    manifest = open_artifact(artifact).manifest
    arch = manifest.target.get("arch", platform.machine())
    source = source_onnx(artifact, onnx_path)
    if tolerance is None:
        tolerance = manifest.verification.get("tolerance") or DEFAULT_TOLERANCE.get(
            manifest.outputs[0].dtype if manifest.outputs else "float32", DEFAULT_TOLERANCE["float32"])
    if arch == platform.machine() and any(spec.dynamic for spec in manifest.inputs):
        from forgeml.compiler.verify import verify_range
        from forgeml.runtime.session import load

        return verify_range(load(artifact), source, float(tolerance), seed)  # min, between, max, each bucket
    from forgeml.shapes import concrete_shapes, dimension_variables

    largest = concrete_shapes(manifest.inputs, {k: hi for k, (_, hi) in dimension_variables(manifest.inputs).items()})
    feeds = seeded_inputs([spec._replace(shape=largest[spec.name]) for spec in manifest.inputs], seed)
    if arch == platform.machine():
        from forgeml.runtime.session import load

        actual = load(artifact).run(feeds)
    elif emulate:
        actual, _ = run_emulated(artifact, feeds, progress=progress)
    else:
        raise InvalidInput(f"{artifact} is built for {arch} and this machine is {platform.machine()}; "
                           "add --emulate to run it under qemu, or verify it on such a device")
    ort = onnxruntime_session(source)
    names = [o.name for o in ort.get_outputs()]
    expected = dict(zip(names, ort.run(names, feeds)))
    max_abs, max_rel = compare(actual, expected)
    return VerifyResult(bool(max_rel <= tolerance), max_abs, max_rel, float(tolerance), seed)


def emulated_case(path: Path, feeds: dict[str, Any], model_key: str, threads: int, warmup: int, repeat: int,
                  expected: dict[str, Any] | None = None, budget_s: float = 60.0, progress: Progress | None = None):
    """A benchmark CaseResult for an artifact run on its emulated device (timed inside the emulator)."""
    from forgeml.bench.harness import CaseResult, Stats
    from forgeml.compiler.verify import compare
    from forgeml.runtime.artifact import open_artifact

    outputs, report = run_emulated(path, feeds, threads=threads, warmup=warmup, repeat=repeat, budget_s=budget_s,
                                   progress=progress)
    target = open_artifact(path).manifest.target
    samples = report["samples_s"]
    extra = {"reference": False, "path": str(path), "placement": "emulated", "emulator": report["emulator"],
             "device_arch": report["machine"], "runs": len(samples), "warmup": report["warmup"],
             "load_to_first_output_s": report["load_to_first_output_s"],
             "emulator_peak_rss_mb": report["process_peak_rss_mb"]}
    if expected is not None:
        extra["max_abs_error"], extra["max_rel_error"] = compare(outputs, expected)
    return CaseResult(
        name=f"forgeml {path.name} ({target.get('name')}, emulated)", engine="forgeml",
        model=model_key, stats=Stats.of(samples), samples_ms=[t * 1e3 for t in samples], peak_rss_mb=None,
        artifact_mb=path.stat().st_size / 1e6, extra=extra)
