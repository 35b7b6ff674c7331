"""Exceptions users see. The CLI turns each into one line and an exit code."""

from __future__ import annotations


class ForgeError(Exception):
    """Base of every error forgeml reports to users."""

    exit_code = 1


class InvalidInput(ForgeError):
    """A file, option or tensor handed in by the user is wrong (exit 2)."""

    exit_code = 2


class UnsupportedOperator(InvalidInput):
    """The model uses operators the compiler cannot lower (exit 2)."""

    def __init__(self, unsupported: dict[str, list[str]]):
        self.unsupported = unsupported
        parts = []
        for op, nodes in sorted(unsupported.items()):
            shown = ", ".join(nodes[:3]) + (", ..." if len(nodes) > 3 else "")
            parts.append(f"{op} x{len(nodes)} ({shown})")
        super().__init__(f"unsupported operators: {'; '.join(parts)}")


class ArtifactError(InvalidInput):
    """An artifact is missing, damaged, tampered with, or not for this runtime (exit 2)."""


class UntrustedArtifact(ArtifactError):
    """Trusted keys were given, and the artifact is unsigned, signed by another key, or its signature does
    not match (exit 2). Raised before any of its native code is loaded."""


class ToolchainMissing(ForgeError):
    """A cross compiler or emulator the target needs is not installed (exit 2)."""

    exit_code = 2


class BaselineUnavailable(ForgeError):
    """A benchmark baseline cannot run here: its ONNX Runtime provider or converter is missing (exit 2)."""

    exit_code = 2


class VerificationFailed(ForgeError):
    """The compiled model's outputs differ from ONNX Runtime beyond tolerance (exit 3)."""

    exit_code = 3


class CompileFailed(ForgeError):
    """TVM failed to optimize or generate code for a model forgeml accepted: names the stage, the kernel
    where known, and TVM's reason (exit 2)."""

    exit_code = 2


class RunFailed(ForgeError):
    """A loaded model failed while running (a kernel's runtime check, an unconvertible output) (exit 1)."""


def last_line(err: BaseException) -> str:
    """A foreign exception's reason in one line: its type and the last non-empty line of its message (TVM
    puts its traceback first), at most 400 characters."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[-1] if lines else 'no message'}"[:400]
