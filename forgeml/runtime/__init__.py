"""forgeml's runtime: loads artifacts with numpy and the TVM runtime library only."""

from forgeml.runtime.artifact import Manifest, TensorSpec, open_artifact
from forgeml.runtime.session import Session, load

__all__ = ["Manifest", "Session", "TensorSpec", "load", "open_artifact"]
