"""Models nobody here wrote, the way a user brings them: Hugging Face transformers architectures built from
their configs (random weights, nothing downloaded), exported with `forgeml export` (token ids as int64),
compiled at the default level and verified against ONNX Runtime by `forgeml compile` itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]

FACTORIES = '''
import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model, SwinConfig, SwinModel, ViTConfig, ViTModel


def _seeded(model_class, config):
    torch.manual_seed(0)
    return model_class(config)


def bert():
    return _seeded(BertModel, BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, vocab_size=100, max_position_embeddings=64))


def gpt2():
    return _seeded(GPT2Model, GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64,
                                         eos_token_id=0, bos_token_id=0))


def vit():
    return _seeded(ViTModel, ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=128, image_size=32, patch_size=8))


def swin():
    return _seeded(SwinModel, SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                                         window_size=4))
'''

CASES = {
    "bert": ("input_ids=1,16:int64", ["last_hidden_state", "pooler_output"]),
    "gpt2": ("input_ids=1,16:int64", ["last_hidden_state"]),  # the key/value cache object is left out
    "vit": ("pixel_values=1,3,32,32", ["last_hidden_state", "pooler_output"]),
    "swin": ("pixel_values=1,3,32,32", ["last_hidden_state", "pooler_output"]),
}


def forgeml(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    path = os.pathsep.join(filter(None, [str(REPO), str(tmp), os.environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "forgeml.cli", *args], capture_output=True, text=True, cwd=tmp,
                          env={**os.environ, "PYTHONPATH": path}, timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_transformers_model_exports_compiles_and_verifies_from_the_cli(name, tmp_path):
    (tmp_path / "hfmodels.py").write_text(FACTORIES)
    shape, outputs = CASES[name]
    exported = forgeml(tmp_path, "export", f"hfmodels:{name}", "--input-shape", shape, "-o", f"{name}.onnx")
    assert exported.returncode == 0, exported.stderr
    compiled = forgeml(tmp_path, "compile", f"{name}.onnx", "-o", f"{name}.fml")
    assert compiled.returncode == 0, compiled.stderr
    info = forgeml(tmp_path, "inspect", f"{name}.fml", "--json")
    assert info.returncode == 0, info.stderr
    manifest = json.loads(info.stdout)
    assert manifest["compile_options"]["opt_level"] == "O2"
    assert manifest["verification"]["passed"] and manifest["verification"]["max_rel_error"] < 1e-3
    assert [o["name"] for o in manifest["outputs"]] == outputs
    if name in ("bert", "gpt2"):
        assert manifest["inputs"][0]["dtype"] == "int64"
