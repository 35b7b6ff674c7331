"""The model zoo and torch -> ONNX export, checked against torch through ONNX Runtime."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from forgeml.compiler.frontend.torch_export import (
    export_callable,
    export_module,
    export_pt2,
    load_callable,
    parse_input_shapes,
    parse_input_specs,
)
from forgeml.errors import InvalidInput
from forgeml.zoo import BERT_VOCAB, ZOO, example_inputs, export_zoo_model

CNNS = ("resnet18", "mobilenet_v2")


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    """Export each zoo model at most once per module: name -> path."""
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = export_zoo_model(name, tmp_path_factory.mktemp("zoo") / f"{name}.onnx")
        return cache[name]

    return get


@pytest.fixture
def isolated_sys_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """load_callable puts the working directory on sys.path; undo that after the test."""
    monkeypatch.setattr(sys, "path", list(sys.path))


def run_ort(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def run_torch(module: torch.nn.Module, feeds: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return module(*(torch.from_numpy(v) for v in feeds.values())).numpy()


def write_package(root: Path, source: str) -> str:
    """A fresh importable package under root holding models.py; returns its name."""
    name = f"userpkg_{uuid.uuid4().hex[:8]}"
    (root / name).mkdir()
    (root / name / "__init__.py").write_text("")
    (root / name / "models.py").write_text(textwrap.dedent(source))
    return name


# --------------------------------------------------------------------------- zoo


def test_zoo_lists_the_four_models_with_typed_inputs():
    assert list(ZOO) == ["mlp", "resnet18", "mobilenet_v2", "bert_tiny"]
    assert ZOO["mlp"].inputs == {"x": ((1, 256), "float32")}
    assert ZOO["resnet18"].inputs == {"x": ((1, 3, 224, 224), "float32")}
    assert ZOO["bert_tiny"].inputs == {"input_ids": ((1, 128), "int64")}
    assert ZOO["bert_tiny"].output_names == ("last_hidden_state",)


def test_importing_the_zoo_does_not_import_torch():
    code = "import sys, forgeml.zoo; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_unknown_zoo_model_names_the_known_ones(tmp_path: Path):
    with pytest.raises(InvalidInput, match=r"unknown zoo model 'vgg'; known: mlp, resnet18, mobilenet_v2"):
        export_zoo_model("vgg", tmp_path / "vgg.onnx")


def test_example_inputs_are_valid_and_seeded():
    from forgeml.zoo import models

    ids = example_inputs("bert_tiny", batch=2)["input_ids"]
    assert ids.shape == (2, 128) and ids.dtype == np.int64
    assert 0 <= ids.min() and ids.max() < BERT_VOCAB == models.BERT_VOCAB
    x = example_inputs("resnet18", seed=3)["x"]
    assert x.shape == (1, 3, 224, 224) and x.dtype == np.float32
    np.testing.assert_array_equal(x, example_inputs("resnet18", seed=3)["x"])


def test_zoo_builds_are_deterministic():
    a, b = ZOO["bert_tiny"].build(), ZOO["bert_tiny"].build()
    assert not a.training
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_mlp_export_is_byte_identical(tmp_path: Path):
    first = export_zoo_model("mlp", tmp_path / "a.onnx").read_bytes()
    assert first == export_zoo_model("mlp", tmp_path / "b.onnx").read_bytes()


@pytest.mark.parametrize(
    "name", ["mlp", "bert_tiny", *(pytest.param(n, marks=pytest.mark.slow) for n in CNNS)]
)
def test_zoo_export_matches_torch(name: str, exported):
    path = exported(name)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == list(ZOO[name].inputs)  # weights are initializers
    assert [o.name for o in model.graph.output] == list(ZOO[name].output_names)
    feeds = example_inputs(name, seed=1)
    np.testing.assert_allclose(run_ort(path, feeds)[0], run_torch(ZOO[name].build(), feeds), atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", CNNS)
def test_cnn_exports_keep_batchnorm_for_the_compiler(name: str, exported):
    ops = {n.op_type for n in onnx.load(str(exported(name))).graph.node}
    assert "BatchNormalization" in ops


@pytest.mark.parametrize("name", ["mlp", "bert_tiny"])
def test_zoo_export_imports_into_tvm(name: str, exported):
    from tvm.relax.frontend.onnx import from_onnx

    mod = from_onnx(onnx.load(str(exported(name))), keep_params_in_input=True)
    assert "main" in [gv.name_hint for gv in mod.functions]


def test_batch_override_sets_dim_zero(tmp_path: Path):
    path = export_zoo_model("bert_tiny", tmp_path / "b.onnx", batch=3)
    (out,) = run_ort(path, example_inputs("bert_tiny", batch=3))
    assert out.shape == (3, 128, 128)


# --------------------------------------------------------------------------- export_module


def test_dynamic_axes_allow_other_batch_sizes(tmp_path: Path):
    module = TinyNet()
    path = export_module(module, {"x": (1, 8)}, tmp_path / "t.onnx", dynamic_axes={"x": {0: "batch"}})
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    np.testing.assert_allclose(run_ort(path, {"x": x})[0], run_torch(module, {"x": x}), atol=1e-5)


def test_dynamo_exporter_is_available(tmp_path: Path):
    module = TinyNet().eval()
    path = export_module(module, {"x": (2, 8)}, tmp_path / "t.onnx", dynamo=True, output_names=["y"])
    x = np.ones((2, 8), np.float32)
    np.testing.assert_allclose(run_ort(path, {"x": x})[0], run_torch(module, {"x": x}), atol=1e-5)


def test_failed_export_leaves_nothing_at_the_path(tmp_path: Path):
    with pytest.raises(InvalidInput, match=r"TinyNet failed on inputs x=\[1, 3\]"):
        export_module(TinyNet(), {"x": (1, 3)}, tmp_path / "t.onnx")
    assert list(tmp_path.iterdir()) == []


def test_unsupported_opset_is_refused_before_exporting(tmp_path: Path):
    with pytest.raises(InvalidInput, match="opset 25 is not supported by the torchscript exporter"):
        export_module(TinyNet(), {"x": (1, 8)}, tmp_path / "t.onnx", opset=25)


def test_wrong_number_of_output_names_is_refused(tmp_path: Path):
    with pytest.raises(InvalidInput, match="returns 1 output"):
        export_module(TinyNet(), {"x": (1, 8)}, tmp_path / "t.onnx", output_names=["a", "b"])


# --------------------------------------------------------------------------- user callables and .pt2


def test_export_callable_from_a_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_sys_path):
    pkg = write_package(tmp_path, """
        import torch

        def make_model():
            torch.manual_seed(1)
            return torch.nn.Sequential(torch.nn.Linear(6, 3), torch.nn.Tanh())
    """)
    monkeypatch.chdir(tmp_path)
    path = export_callable(f"{pkg}.models:make_model", {"x": (2, 6)}, tmp_path / "out" / "m.onnx")
    x = np.random.default_rng(0).standard_normal((2, 6)).astype(np.float32)
    expected = run_torch(load_callable(f"{pkg}.models:make_model"), {"x": x})
    np.testing.assert_allclose(run_ort(path, {"x": x})[0], expected, atol=1e-5)


def test_export_pt2_round_trip(tmp_path: Path):
    module = TinyNet().eval()
    torch.export.save(torch.export.export(module, (torch.zeros(3, 8),)), tmp_path / "m.pt2")
    path = export_pt2(tmp_path / "m.pt2", tmp_path / "m.onnx")
    assert [i.name for i in onnx.load(str(path)).graph.input] == ["x"]
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    np.testing.assert_allclose(run_ort(path, {"x": x})[0], run_torch(module, {"x": x}), atol=1e-5)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("no_colon_here", "bad model spec 'no_colon_here'"),
        ("a:b:c", "bad model spec 'a:b:c'"),
        ("forgeml_no_such_module:make", "cannot import module 'forgeml_no_such_module'"),
        ("forgeml.errors:make_model", "module 'forgeml.errors' has no attribute 'make_model'"),
        ("forgeml.errors:InvalidInput", r"'forgeml.errors:InvalidInput' returned InvalidInput, not a torch"),
    ],
)
def test_bad_callable_specs_are_named(spec: str, match: str, isolated_sys_path):
    with pytest.raises(InvalidInput, match=match):
        load_callable(spec)


def test_broken_user_module_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_sys_path):
    pkg = write_package(tmp_path, "import forgeml_missing_dependency\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidInput, match=f"cannot import module '{pkg}.models'.*forgeml_missing_dependency"):
        load_callable(f"{pkg}.models:make_model")


def test_missing_pt2_file_is_named(tmp_path: Path):
    with pytest.raises(InvalidInput, match="no such file: '.*nope.pt2'"):
        export_pt2(tmp_path / "nope.pt2", tmp_path / "m.onnx")


def test_truncated_pt2_file_is_named(tmp_path: Path):
    torch.export.save(torch.export.export(TinyNet(), (torch.zeros(1, 8),)), tmp_path / "m.pt2")
    data = (tmp_path / "m.pt2").read_bytes()
    (tmp_path / "cut.pt2").write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidInput, match="cannot load torch.export program '.*cut.pt2'"):
        export_pt2(tmp_path / "cut.pt2", tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


# --------------------------------------------------------------------------- CLI input specs


def test_parse_input_shapes_and_dtypes():
    assert parse_input_shapes(["x=1,3,224,224", "y=7"]) == {"x": (1, 3, 224, 224), "y": (7,)}
    assert parse_input_specs(["ids=1,128:int64", "m=1,128"]) == (
        {"ids": (1, 128), "m": (1, 128)}, {"ids": "int64"})


@pytest.mark.parametrize("item", ["x", "=1,2", "x=", "x=1,,2", "x=1,a", "x=0,3", "x=1,2:float7"])
def test_malformed_input_specs_are_refused(item: str):
    with pytest.raises(InvalidInput, match=f"input spec '{item}'"):
        parse_input_shapes([item])
