"""`forgeml bundle`: a self-contained deploy folder for one artifact.

The folder holds the artifact, forgeml's runtime (pure Python), tvm_ffi (Python files and its
native core) and the TVM runtime library for the artifact's architecture, and a `run.py` example.
On the device it needs python3 and numpy only: `python3 run.py`.
"""

from __future__ import annotations

import importlib.util
import platform
import shutil
import sys
from pathlib import Path

from forgeml.errors import InvalidInput
from forgeml.runtime.artifact import open_artifact

_FORGEML_RUNTIME = ["__init__.py", "version.py", "process.py", "errors.py",
                    "runtime/__init__.py", "runtime/artifact.py", "runtime/schema.py", "runtime/trust.py",
                    "runtime/native.py", "runtime/session.py",
                    # tuning batches are measured on the device with the bundle alone
                    "runtime/measure.py", "runtime/device.py",
                    # host CPU detection (stdlib only): the session refuses artifacts needing absent features
                    "targets/__init__.py", "targets/registry.py", "targets/host.py"]
# tvm_ffi pieces the runtime never uses at import or call time: headers, sources, build helpers.
_FFI_SKIP = {"3rdparty", "include", "src", "share", "stub", "cython", "testing", "CMakeLists.txt",
             "__pycache__", "core.pyi", "config.py"}

RUN_PY = '''"""Run the bundled model on seeded inputs: python3 run.py [--threads N]"""
import sys
import time
from pathlib import Path

here = Path(__file__).resolve().parent
sys.path.insert(0, str(here / "site"))

import numpy as np  # noqa: E402

import forgeml  # noqa: E402

threads = int(sys.argv[sys.argv.index("--threads") + 1]) if "--threads" in sys.argv else None
start = time.perf_counter()
session = forgeml.load(here / "{artifact}", threads=threads)
rng = np.random.default_rng(0)
feeds = {{}}
for spec in session.inputs:
    kind = np.dtype(spec.dtype).kind
    shape = list(spec.shape)
    for dim in spec.dynamic:  # a dimension that varies: its largest size
        shape[dim.axis] = dim.max
    feeds[spec.name] = (rng.standard_normal(shape) if kind == "f" else rng.integers(0, 10, shape)
                        ).astype(spec.dtype)
outputs = session.run(feeds)
print(f"load + first run: {{(time.perf_counter() - start) * 1e3:.1f}} ms")
for name, value in outputs.items():
    print(f"{{name}}: {{value.dtype}}{{list(value.shape)}} sum={{float(value.astype(np.float64).sum()):.6g}}")
'''


def _copy_tree(src: Path, dst: Path, skip: set[str]) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.name in skip:
            continue
        if item.is_dir():
            _copy_tree(item, dst / item.name, skip)
        else:
            shutil.copy2(item, dst / item.name)


def _host_packages() -> tuple[Path, Path, Path]:
    """(tvm_ffi package dir, typing_extensions.py, TVM lib dir) of this Python installation."""
    ffi = importlib.util.find_spec("tvm_ffi")
    typing_ext = importlib.util.find_spec("typing_extensions")
    tvm = importlib.util.find_spec("tvm")
    if not (ffi and ffi.origin and typing_ext and typing_ext.origin and tvm and tvm.submodule_search_locations):
        raise InvalidInput("bundling needs apache-tvm, apache-tvm-ffi and typing_extensions installed here")
    return Path(ffi.origin).parent, Path(typing_ext.origin), Path(tvm.submodule_search_locations[0]) / "lib"


def runtime_packages(arch: str) -> tuple[Path, Path, Path]:
    """Where to take the runtime pieces for `arch`: this installation, or the cached wheels for it."""
    if arch == platform.machine():
        return _host_packages()
    from forgeml.targets import wheels

    return wheels.runtime_packages(arch)


def bundle(artifact: str | Path, out_dir: str | Path) -> dict[str, float]:
    """Write the deploy folder; returns sizes in MB (total, runtime, artifact)."""
    artifact, out_dir = Path(artifact), Path(out_dir)
    manifest = open_artifact(artifact).manifest
    arch = manifest.target.get("arch", platform.machine())
    device = manifest.target.get("device", "cpu")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InvalidInput(f"bundle output {out_dir} exists and is not an empty directory")
    ffi_dir, typing_ext, tvm_lib = runtime_packages(arch)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        site = tmp / "site"
        pkg = Path(__file__).resolve().parent
        for rel in _FORGEML_RUNTIME:
            (site / "forgeml" / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(pkg / rel, site / "forgeml" / rel)
        lib_dir = site / "forgeml" / "runtime" / "lib"  # native.py looks here first
        lib_dir.mkdir(parents=True)
        for name in ["libtvm_runtime.so"] + (["libtvm_runtime_cuda.so"] if device == "cuda" else []):
            shutil.copy2(tvm_lib / name, lib_dir / name)
        _copy_tree(ffi_dir, site / "tvm_ffi", _FFI_SKIP)
        shutil.copy2(typing_ext, site / "typing_extensions.py")
        shutil.copy2(artifact, tmp / artifact.name)
        (tmp / "run.py").write_text(RUN_PY.format(artifact=artifact.name))
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    total = sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file()) / 1e6
    art = artifact.stat().st_size / 1e6
    return {"total_mb": total, "runtime_mb": total - art, "artifact_mb": art}


if __name__ == "__main__":  # pragma: no cover
    print(bundle(sys.argv[1], sys.argv[2]))
