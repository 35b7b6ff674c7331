"""Constant folding before import (forgeml/compiler/frontend/normalize.py): small transformers models exported
with an attention mask import, compile and verify; models with nothing to fold pass through as is."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from conftest import cnn_model, mlp_model, save

from forgeml.compiler.build import CompileOptions, compile_model
from forgeml.compiler.frontend import onnx_model
from forgeml.compiler.frontend.normalize import normalize
from forgeml.compiler.frontend.relax_import import import_onnx
from forgeml.compiler.frontend.torch_export import export_module
from forgeml.errors import InvalidInput
from forgeml.runtime.artifact import open_artifact

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SEQ = 16


class _Encoder(torch.nn.Module):
    """A transformers model called with input ids and an attention mask; returns the hidden states."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _transformer(name: str) -> torch.nn.Module:
    """A small randomly initialised BERT, GPT-2, RoBERTa or DistilBERT (nothing is downloaded)."""
    t = transformers
    torch.manual_seed(0)
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 vocab_size=100, max_position_embeddings=64)
    if name == "bert":
        model = t.BertModel(t.BertConfig(**small))
    elif name == "roberta":
        model = t.RobertaModel(t.RobertaConfig(**small))
    elif name == "gpt2":
        model = t.GPT2Model(t.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64,
                                         bos_token_id=0, eos_token_id=0))
    else:
        model = t.DistilBertModel(t.DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, vocab_size=100,
                                                     max_position_embeddings=64))
    return _Encoder(model)


def _export(name: str, path: Path, dynamic: bool = False) -> Path:
    """The model exported by torch's TorchScript exporter (forgeml's default), int64 ids and mask [1, 16]."""
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}} if dynamic else None
    return export_module(_transformer(name), {"input_ids": (1, SEQ), "attention_mask": (1, SEQ)}, path,
                         input_dtypes={"input_ids": "int64", "attention_mask": "int64"}, dynamic_axes=axes)


@pytest.fixture(scope="module")
def bert_onnx(tmp_path_factory) -> Path:
    return _export("bert", tmp_path_factory.mktemp("bert") / "bert.onnx")


def test_tvm_importer_alone_fails_on_the_export(bert_onnx):
    """What normalize exists for: without folding, TVM's importer stops at ConstantOfShape."""
    with pytest.raises(InvalidInput, match=r"importer failed at node .*\(ConstantOfShape\): broadcast_to expects"):
        import_onnx(onnx_model.load_onnx(bert_onnx))


@pytest.mark.parametrize("name", ["bert", "gpt2", "roberta", "distilbert"])
def test_transformer_compiles_and_matches_onnxruntime(name, tmp_path):
    path = _export(name, tmp_path / f"{name}.onnx")
    manifest = compile_model(path, tmp_path / f"{name}.fml", CompileOptions(target="x86-64"))
    assert manifest.verification["passed"] is True and manifest.verification["skipped"] is None
    assert manifest.verification["max_abs_error"] < 1e-4
    record = manifest.compile_options["normalize"]
    assert record["tool"].startswith("onnxscript ") and record["skipped"] is None
    assert record["folded_nodes"] > 0 and record["nodes_after"] < record["nodes_before"]
    assert manifest.source["path"] == str(path.resolve())  # verified against the user's file
    assert open_artifact(tmp_path / f"{name}.fml").manifest.compile_options["normalize"] == record


def test_symbolic_dims_fold_once_pinned(tmp_path):
    """Dynamic batch and sequence: --input-shape pins them before folding, so the shape arithmetic
    folds too (GPT-2 otherwise fails with "Slice requires a statically known input rank")."""
    path = _export("gpt2", tmp_path / "gpt2_dyn.onnx", dynamic=True)
    shapes = {"input_ids": (1, SEQ), "attention_mask": (1, SEQ)}
    manifest = compile_model(path, tmp_path / "gpt2.fml", CompileOptions(input_shapes=shapes))
    assert manifest.verification["passed"] is True and manifest.verification["max_abs_error"] < 1e-4
    assert not any(n.op_type == "Shape" for n in normalize(onnx_model.load_onnx(path, shapes).model)[0].graph.node)


def test_deterministic_and_input_left_alone(bert_onnx):
    model = onnx_model.load_onnx(bert_onnx).model
    before = model.SerializeToString()
    first, record = normalize(model)
    assert model.SerializeToString() == before
    second, _ = normalize(onnx_model.load_onnx(bert_onnx).model)
    assert first.SerializeToString() == second.SerializeToString()
    assert not any(n.op_type == "ConstantOfShape" for n in first.graph.node)
    assert record.nodes_after == len(first.graph.node) and record.nodes_before == len(model.graph.node)
    assert [i.name for i in first.graph.input] == [i.name for i in model.graph.input]
    assert [o.name for o in first.graph.output] == [o.name for o in model.graph.output]
    onnx.checker.check_model(first)


@pytest.mark.parametrize("model", [mlp_model(), cnn_model()], ids=["mlp", "cnn"])
def test_nothing_to_fold_returns_the_model_itself(model, tmp_path):
    loaded = onnx_model.load_onnx(save(model, tmp_path / "m.onnx"))
    result, record = normalize(loaded.model)
    assert result is loaded.model
    assert record.folded_nodes == 0 and record.nodes_before == record.nodes_after == len(model.graph.node)
