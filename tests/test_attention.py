"""The standard ONNX Attention (opset 23/24): small models compiled by forgeml (verified against ONNX
Runtime at compile time on random inputs) and run on chosen inputs, compared with ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import forgeml
from forgeml.errors import UnsupportedOperator

_NP_TO_ONNX = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16, np.bool_: TensorProto.BOOL,
               np.int64: TensorProto.INT64}


def _attention_model(inputs: dict[str, np.ndarray], outputs: list[str], opset: int = 23,
                     constants: tuple[str, ...] = (), **attrs) -> onnx.ModelProto:
    """One Attention node over the given inputs (in ONNX input order; '' skips an optional input); those
    named in `constants` are initializers instead of graph inputs."""
    order = ["Q", "K", "V", "attn_mask", "past_key", "past_value", "nonpad_kv_seqlen"]
    names = [n if n in inputs else "" for n in order]
    while names[-1] == "":
        names.pop()
    node = helper.make_node("Attention", names, outputs, name="attn", **attrs)
    graph = helper.make_graph(
        [node], "attention",
        [helper.make_tensor_value_info(n, _NP_TO_ONNX[inputs[n].dtype.type], inputs[n].shape)
         for n in names if n and n not in constants],
        [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in outputs if o],
        [onnx.numpy_helper.from_array(inputs[n], n) for n in constants])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    return model


def _compile_and_compare(tmp_path: Path, model: onnx.ModelProto, feeds: dict[str, np.ndarray],
                         atol: float = 1e-5) -> dict[str, np.ndarray]:
    """Compile with forgeml (verification on), run on `feeds`, assert every output matches ONNX Runtime."""
    onnx.save(model, tmp_path / "attention.onnx")
    forgeml.compile_model(tmp_path / "attention.onnx", tmp_path / "attention.fml", target="x86-64")
    got = forgeml.load(tmp_path / "attention.fml").run(feeds)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    expected = dict(zip(names, session.run(names, feeds)))
    for name, want in expected.items():
        assert got[name].shape == want.shape, name
        assert got[name].dtype == want.dtype, name
        np.testing.assert_allclose(got[name].astype(np.float64), want.astype(np.float64), rtol=1e-4, atol=atol,
                                   err_msg=name)
    return got


def _normal(rng: np.random.Generator, *shape: int, dtype=np.float32) -> np.ndarray:
    return rng.standard_normal(shape).astype(dtype)


def test_3d_inputs_with_head_attributes_and_float_mask(tmp_path):
    """[B, S, hidden] inputs split into heads by q_num_heads / kv_num_heads, a float mask added to the
    scores, a custom scale; Y comes back as [B, S, heads * v_head_size]."""
    rng = np.random.default_rng(0)
    feeds = {"Q": _normal(rng, 2, 4, 16), "K": _normal(rng, 2, 6, 16), "V": _normal(rng, 2, 6, 24),
             "attn_mask": _normal(rng, 4, 6)}
    model = _attention_model(feeds, ["Y"], q_num_heads=2, kv_num_heads=2, scale=0.3)
    got = _compile_and_compare(tmp_path, model, feeds)
    assert got["Y"].shape == (2, 4, 24)


def test_4d_causal_with_softcap(tmp_path):
    """4D inputs, is_causal (query i sees keys 0..i) and softcap."""
    rng = np.random.default_rng(1)
    feeds = {"Q": _normal(rng, 1, 3, 5, 8), "K": _normal(rng, 1, 3, 5, 8), "V": _normal(rng, 1, 3, 5, 8)}
    _compile_and_compare(tmp_path, _attention_model(feeds, ["Y"], is_causal=1, softcap=2.0), feeds)


def test_bool_mask_with_a_fully_masked_row_gives_zeros(tmp_path):
    """A bool mask (True attends); a query row with no key allowed gives a zero output row and zero
    probabilities (qk_matmul_output_mode 3), not NaN."""
    rng = np.random.default_rng(2)
    mask = rng.integers(0, 2, (2, 1, 4, 6)).astype(bool)
    mask[1, 0, 2] = False
    feeds = {"Q": _normal(rng, 2, 2, 4, 8), "K": _normal(rng, 2, 2, 6, 8), "V": _normal(rng, 2, 2, 6, 8),
             "attn_mask": mask}
    model = _attention_model(feeds, ["Y", "", "", "probs"], qk_matmul_output_mode=3)
    got = _compile_and_compare(tmp_path, model, feeds)
    assert not np.isnan(got["Y"]).any()
    assert np.all(got["Y"][1, :, 2] == 0) and np.all(got["probs"][1, :, 2] == 0)


def test_grouped_query_attention_3d_causal(tmp_path):
    """GQA: 6 query heads over 2 key/value heads (query head h reads kv head h // 3)."""
    rng = np.random.default_rng(3)
    feeds = {"Q": _normal(rng, 2, 5, 6 * 4), "K": _normal(rng, 2, 5, 2 * 4), "V": _normal(rng, 2, 5, 2 * 4)}
    model = _attention_model(feeds, ["Y"], q_num_heads=6, kv_num_heads=2, is_causal=1)
    _compile_and_compare(tmp_path, model, feeds)


@pytest.mark.parametrize("mode", [0, 1, 2, 3])
def test_past_key_value_give_present_and_qk_output(tmp_path, mode):
    """past_key/past_value are concatenated before K/V along the sequence (present_key/present_value),
    causal is offset by the past length, and qk_matmul_output is the raw, softcapped, masked or
    softmaxed scores by mode."""
    rng = np.random.default_rng(4)
    feeds = {"Q": _normal(rng, 1, 2, 3, 8), "K": _normal(rng, 1, 2, 3, 8), "V": _normal(rng, 1, 2, 3, 8),
             "attn_mask": _normal(rng, 3, 7), "past_key": _normal(rng, 1, 2, 4, 8),
             "past_value": _normal(rng, 1, 2, 4, 8)}
    feeds["attn_mask"][1, 2] = -np.inf  # mode 2 scores hold -inf there: verification takes equal infinities
    model = _attention_model(feeds, ["Y", "present_key", "present_value", "qk"], constants=("attn_mask",),
                             softcap=3.0, qk_matmul_output_mode=mode)
    del feeds["attn_mask"]
    got = _compile_and_compare(tmp_path, model, feeds)
    np.testing.assert_array_equal(got["present_key"], np.concatenate([feeds["past_key"], feeds["K"]], axis=2))
    assert got["qk"].shape == (1, 2, 3, 7)


def test_nonpad_kv_seqlen_external_cache_opset24(tmp_path):
    """Opset 24's nonpad_kv_seqlen: keys at or past each batch's length are padding, and causal is
    bottom-right aligned to that length."""
    rng = np.random.default_rng(5)
    feeds = {"Q": _normal(rng, 2, 4, 2, 8), "K": _normal(rng, 2, 2, 6, 8), "V": _normal(rng, 2, 2, 6, 8),
             "nonpad_kv_seqlen": np.array([3, 6], dtype=np.int64)}
    _compile_and_compare(tmp_path, _attention_model(feeds, ["Y"], opset=24, is_causal=1), feeds)


def test_float16_inputs(tmp_path):
    """fp16 in and out (computed in float32, rounded once)."""
    rng = np.random.default_rng(6)
    feeds = {"Q": _normal(rng, 1, 2, 4, 8, dtype=np.float16), "K": _normal(rng, 1, 2, 4, 8, dtype=np.float16),
             "V": _normal(rng, 1, 2, 4, 8, dtype=np.float16)}
    _compile_and_compare(tmp_path, _attention_model(feeds, ["Y"], is_causal=1), feeds, atol=2e-3)


def test_heads_that_do_not_group_are_refused_naming_node_and_attribute(tmp_path):
    """3 query heads over 2 key/value heads cannot be grouped: one UnsupportedOperator naming the node
    and the attributes, not a wrong answer."""
    rng = np.random.default_rng(7)
    feeds = {"Q": _normal(rng, 1, 4, 12), "K": _normal(rng, 1, 4, 8), "V": _normal(rng, 1, 4, 8)}
    onnx.save(_attention_model(feeds, ["Y"], q_num_heads=3, kv_num_heads=2), tmp_path / "attention.onnx")
    with pytest.raises(UnsupportedOperator, match=r"Attention x1 \(attn\): q_num_heads=3 is not a multiple of "
                                                  r"kv_num_heads=2"):
        forgeml.compile_model(tmp_path / "attention.onnx", tmp_path / "attention.fml")


def test_com_microsoft_attention_still_goes_to_tvms_converter():
    """Inside forgeml's converter map, a com.microsoft Attention (num_heads, packed QKV weight) still
    imports through TVM's own converter and matches ONNX Runtime."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from forgeml.compiler.frontend.converters import forgeml_converters

    rng = np.random.default_rng(8)
    x, w, b = _normal(rng, 2, 4, 8), _normal(rng, 8, 24), _normal(rng, 24)
    node = helper.make_node("Attention", ["x", "w", "b"], ["y"], domain="com.microsoft", num_heads=2)
    graph = helper.make_graph(
        [node], "ms", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 8])],
        [onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23),
                                                    helper.make_opsetid("com.microsoft", 1)])
    with forgeml_converters():
        mod = from_onnx(model)
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x))
    got = got[0] if not hasattr(got, "numpy") else got
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-5)
