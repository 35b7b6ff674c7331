"""`onnx.backend.base.Backend` over forgeml, so the official ONNX conformance runner can drive it.

    import onnx.backend.test
    from forgeml.onnx_backend import ForgemlBackend
    globals().update(onnx.backend.test.BackendTest(ForgemlBackend, __name__).include("test_relu").test_cases)

`prepare` writes the model to a private temporary directory, compiles it with `forgeml.compile_model`
(target x86-64, O2, verified against ONNX Runtime: what a user gets by default), loads the artifact and
returns a rep whose `run(inputs)` binds the inputs by the graph's input order (initializers excluded)
and returns the outputs in the graph's output order. Errors are forgeml's own (`forgeml.errors`);
anything else that escapes is a forgeml bug the conformance report lists.

Importing this module imports onnx, never TVM: the compiler loads on the first `prepare`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx.backend.base import Backend, BackendRep

from forgeml.errors import InvalidInput


def graph_input_names(model: onnx.ModelProto) -> list[str]:
    """The inputs a caller feeds, in graph order: graph inputs that are not also initializers (IR < 4
    exporters list every weight as an input too)."""
    weights = {init.name for init in model.graph.initializer}
    return [value.name for value in model.graph.input if value.name not in weights]


class ForgemlBackendRep(BackendRep):
    """A compiled model: `run(inputs)` takes a sequence (graph input order) or a name -> array mapping
    and returns the outputs as a list in the graph's output order (a sequence output as a list of
    arrays, as ONNX Runtime gives it)."""

    def __init__(self, session: Any, input_names: list[str], output_names: list[str],
                 workdir: tempfile.TemporaryDirectory) -> None:
        self.session = session
        self.input_names = input_names
        self.output_names = output_names
        self._workdir = workdir  # holds the artifact the session maps its weights from

    def run(self, inputs: Any, **kwargs: Any) -> list[np.ndarray]:
        """Run on `inputs` (a sequence bound by position, a mapping by name, or one array)."""
        feeds = self._feeds(inputs)
        outputs = self.session.run(feeds)
        return [outputs[name] for name in self.output_names]

    def _feeds(self, inputs: Any) -> dict[str, np.ndarray]:
        if isinstance(inputs, Mapping):
            return {name: np.asarray(value) for name, value in inputs.items()}
        if isinstance(inputs, np.ndarray) or not isinstance(inputs, Sequence):
            inputs = [inputs]
        if len(inputs) != len(self.input_names):
            raise InvalidInput(f"the model takes {len(self.input_names)} inputs "
                               f"({', '.join(self.input_names)}), {len(inputs)} were given")
        feeds = {}
        for name, value in zip(self.input_names, inputs):
            if isinstance(value, np.generic):  # the node cases hand over 0-d inputs as numpy scalars
                value = np.asarray(value)
            if not isinstance(value, np.ndarray):
                raise InvalidInput(f"input '{name}' is a {type(value).__name__}; forgeml takes tensors only "
                                   "(no sequences, maps or optionals)")
            feeds[name] = value
        return feeds


class ForgemlBackend(Backend):
    """ONNX backend over forgeml on this machine's CPU. Class attributes are the compile options every
    `prepare` uses; keyword arguments to `prepare` that CompileOptions knows override them (the runner's
    own, such as rtol/atol, are ignored).

    O2 is the default because it is what users get. On the whole suite (2,024 cases, without verification,
    2-core EPYC) O0 passes 764 and O2 756: O2's schedule rules raise on ScatterElements/MaxUnpool (8) and
    vectorized cosh/sinh (2), O0 returns NonMaxSuppression results wrong (10) where O2 fails to build, and
    the two disagree on out-of-range bit shifts (2). benchmarks/results/onnx_conformance.md has the rest.
    """

    target: str = "x86-64"
    opt_level: str = "O2"
    verify: bool = True

    @classmethod
    def prepare(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs: Any) -> ForgemlBackendRep:
        """Compile `model` for the CPU and load it."""
        import forgeml
        from forgeml.compiler.build import CompileOptions

        if not cls.supports_device(device):
            raise InvalidInput(f"forgeml's ONNX backend runs on the CPU, not on '{device}'")
        known = set(CompileOptions.__dataclass_fields__) - {"target"}
        options = {"opt_level": cls.opt_level, "verify": cls.verify}
        options.update({k: v for k, v in kwargs.items() if k in known})
        workdir = tempfile.TemporaryDirectory(prefix="forgeml-onnx-backend-")
        path = Path(workdir.name)
        onnx.save_model(model, str(path / "model.onnx"))
        forgeml.compile_model(path / "model.onnx", path / "model.fml", target=cls.target, **options)
        session = forgeml.load(path / "model.fml")
        return ForgemlBackendRep(session, graph_input_names(model), [o.name for o in model.graph.output], workdir)

    @classmethod
    def supports_device(cls, device: str) -> bool:
        """CPU only (forgeml's CUDA targets are not wired into this backend)."""
        return str(device).upper() == "CPU"


prepare = ForgemlBackend.prepare
run_model = ForgemlBackend.run_model
supports_device = ForgemlBackend.supports_device
