"""Target presets: plain data the compiler reads (see registry.py).

The names are imported on first use, so the runtime's host-CPU check (`forgeml.targets.host`) does not
pay for the registry at load time.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PRESETS", "TargetSpec", "resolve_target"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from forgeml.targets import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'forgeml.targets' has no attribute '{name}'")
