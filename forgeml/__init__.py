"""forgeml: compile trained models into fast, small, verified deployments.

    import forgeml
    forgeml.compile_model("m.onnx", "m.fml", target="x86-64")
    outputs = forgeml.load("m.fml").run({"x": array})
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from forgeml.process import START_AFFINITY as START_AFFINITY  # captured at first import, before any TVM pool
from forgeml.version import __version__

if TYPE_CHECKING:
    from forgeml.runtime.artifact import Manifest
    from forgeml.runtime.session import Session


def load(path: str | Path, threads: int | None = None, trusted_keys: list[str | Path] | None = None) -> Session:
    """Load a .fml artifact with the TVM runtime only (no compiler, no onnx, no torch). With `trusted_keys`
    (public key files, `forgeml keygen`'s public.pem), refuse it unless one of them signed it."""
    from forgeml.runtime.session import load as _load

    return _load(path, threads=threads, trusted_keys=trusted_keys)


def compile_model(model: str | Path, output: str | Path, target: str = "x86-64", **options: Any) -> Manifest:
    """Compile an ONNX file into a verified .fml artifact; options as in CompileOptions."""
    from forgeml.compiler.build import CompileOptions
    from forgeml.compiler.build import compile_model as _compile

    return _compile(model, output, CompileOptions(target=target, **options))


def list_targets() -> list[str]:
    """Names of the target presets."""
    from forgeml.targets import PRESETS

    return list(PRESETS)


__all__ = ["__version__", "compile_model", "list_targets", "load"]
