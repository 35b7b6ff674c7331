"""Built-in models for demos, tests and benchmarks: seeded torch architectures, exported to ONNX.

`ZOO` maps a name to a `ZooModel`; importing this package does not import torch (the builders do).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from forgeml.errors import InvalidInput

if TYPE_CHECKING:
    import torch

BERT_VOCAB = 1000  # keep equal to forgeml.zoo.models.BERT_VOCAB (checked by the tests)


@dataclass(frozen=True)
class ZooModel:
    """A named architecture, its builder and the inputs/outputs of its ONNX export."""

    name: str
    description: str
    build: Callable[[], torch.nn.Module]
    inputs: dict[str, tuple[tuple[int, ...], str]]  # name -> (shape, dtype)
    output_names: tuple[str, ...]


def _build_mlp() -> torch.nn.Module:
    from forgeml.zoo.models import build_mlp

    return build_mlp()


def _build_resnet18() -> torch.nn.Module:
    from forgeml.zoo.models import build_resnet18

    return build_resnet18()


def _build_mobilenet_v2() -> torch.nn.Module:
    from forgeml.zoo.models import build_mobilenet_v2

    return build_mobilenet_v2()


def _build_bert_tiny() -> torch.nn.Module:
    from forgeml.zoo.models import build_bert_tiny

    return build_bert_tiny()


_IMAGE = {"x": ((1, 3, 224, 224), "float32")}

ZOO: dict[str, ZooModel] = {
    m.name: m
    for m in (
        ZooModel("mlp", "3-layer MLP 256-512-512-10, ReLU", _build_mlp,
                 {"x": ((1, 256), "float32")}, ("y",)),
        ZooModel("resnet18", "ResNet-18, 224x224 RGB, 1000 classes", _build_resnet18, _IMAGE, ("logits",)),
        ZooModel("mobilenet_v2", "MobileNetV2 1.0, 224x224 RGB, 1000 classes", _build_mobilenet_v2,
                 _IMAGE, ("logits",)),
        ZooModel("bert_tiny", "BERT encoder: 2 layers, hidden 128, 4 heads, sequence 128",
                 _build_bert_tiny, {"input_ids": ((1, 128), "int64")}, ("last_hidden_state",)),
    )
}


def get_model(name: str) -> ZooModel:
    """The zoo entry called `name`; InvalidInput listing the known names otherwise."""
    if name not in ZOO:
        raise InvalidInput(f"unknown zoo model '{name}'; known: {', '.join(ZOO)}")
    return ZOO[name]


def input_shapes(name: str, batch: int | None = None) -> dict[str, tuple[int, ...]]:
    """Input shapes of a zoo model, dim 0 replaced by `batch` when given."""
    if batch is not None and batch < 1:
        raise InvalidInput(f"batch must be a positive integer, got {batch}")
    return {
        k: (shape if batch is None else (batch, *shape[1:]))
        for k, (shape, _) in get_model(name).inputs.items()
    }


def example_inputs(name: str, seed: int = 0, batch: int | None = None) -> dict[str, np.ndarray]:
    """Seeded valid inputs: standard normal floats; token ids drawn from the vocabulary."""
    model = get_model(name)
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for k, shape in input_shapes(name, batch).items():
        dtype = model.inputs[k][1]
        if np.issubdtype(np.dtype(dtype), np.integer):
            out[k] = rng.integers(0, BERT_VOCAB, size=shape, dtype=dtype)
        else:
            out[k] = rng.standard_normal(shape).astype(dtype)
    return out


def export_zoo_model(name: str, path: str | Path, opset: int = 17, batch: int | None = None) -> Path:
    """Build zoo model `name` and export it to ONNX at `path`; returns the path written."""
    from forgeml.compiler.frontend.torch_export import export_module

    model = get_model(name)
    return export_module(
        model.build(),
        input_shapes(name, batch),
        path,
        opset=opset,
        input_dtypes={k: dtype for k, (_, dtype) in model.inputs.items()},
        output_names=list(model.output_names),
    )
