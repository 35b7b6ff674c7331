"""Tests that need the cross toolchains (`make toolchains`): skipped with the reason where they are
missing, so that `make test` passes on a fresh machine; CI sets FORGEML_REQUIRE_TOOLCHAINS=1 (after
`make toolchains`) and a missing tool fails there instead of skipping."""

from __future__ import annotations

import os
import shutil

import pytest

REQUIRE_ENV = "FORGEML_REQUIRE_TOOLCHAINS"
CROSS_COMPILERS = ("aarch64-linux-gnu-g++", "riscv64-linux-gnu-g++")
QEMU = ("qemu-aarch64",)


def missing_tools(*tools: str) -> list[str]:
    """The tools among `tools` not on PATH."""
    return [t for t in tools if shutil.which(t) is None]


def skip_or_fail(reason: str) -> None:
    """Skip with `reason`, or fail where the toolchains are required (CI)."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1)")
    pytest.skip(reason)


def require_tools(*tools: str) -> None:
    """Skip (fail in CI) unless every tool is on PATH."""
    missing = missing_tools(*tools)
    if missing:
        skip_or_fail(f"cross toolchain missing ({', '.join(missing)}): run `make toolchains`")
