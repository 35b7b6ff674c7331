"""Target presets: plain data the compiler reads (see registry.py)."""

from forgeml.targets.registry import PRESETS, TargetSpec, resolve_target

__all__ = ["PRESETS", "TargetSpec", "resolve_target"]
