"""The standard ONNX `Attention` (ai.onnx opset 23-25) as plain Relax (matmul, softmax, where).

TVM 0.27's importer maps every `Attention` node to its com.microsoft converter (which needs
`num_heads`). converters.py merges `StandardAttention` into forgeml's converter map for each import:
nodes that carry `num_heads` (com.microsoft) still go to TVM's converter, the rest are lowered here
following the ONNX spec. What this converter cannot lower exactly is refused with an
`UnsupportedOperator` naming the node and the attribute or input.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np

from forgeml.errors import UnsupportedOperator

_FLOAT_TYPES = {1: "float32", 10: "float16", 11: "float64", 16: "bfloat16"}  # softmax_precision values
_NEG_INF = float("-inf")


def _node_label() -> str:
    """The ONNX node being converted (name, else first output), read from the importer's frame."""
    frame = sys._getframe()
    while frame is not None:
        node = frame.f_locals.get("node") if frame.f_code.co_name in ("_construct_nodes",
                                                                         "_convert_subgraph") else None
        if node is not None and hasattr(node, "op_type"):
            return node.name or (node.output[0] if node.output else "?")
        frame = frame.f_back
    return "?"


def _refuse(what: str) -> UnsupportedOperator:
    """One UnsupportedOperator for this Attention node, saying which attribute or input is the reason."""
    err = UnsupportedOperator({"Attention": [_node_label()]})
    err.args = (f"{err.args[0]}: {what}",)
    return err


def _static_shape(x: Any, name: str) -> list[int]:
    """x's shape as ints, or a refusal naming the input."""
    from tvm import tirx

    values = getattr(x.ty.shape, "values", None)
    if values is None or not all(isinstance(d, tirx.IntImm) for d in values):
        raise _refuse(f"input {name} has a dynamic shape ({x.ty.shape}); only static shapes are supported")
    return [int(d) for d in values]


def _to_heads(bb, x, shape: list[int], heads: int, name: str):
    """[B, S, heads * D] -> [B, heads, S, D]."""
    from tvm import relax

    if heads <= 0 or shape[2] % heads:
        raise _refuse(f"{name} hidden size {shape[2]} is not divisible by its number of heads ({heads})")
    x = bb.normalize(relax.op.reshape(x, (shape[0], shape[1], heads, shape[2] // heads)))
    return bb.normalize(relax.op.permute_dims(x, [0, 2, 1, 3]))


def _allowed_by_position(q_len: int, kv_len: int, offset: int, causal: bool, left: int, right: int):
    """Bool [q, kv]: key j may be attended by query i under causal/window rules (offset-aligned)."""
    diff = np.arange(q_len).reshape(q_len, 1) + offset - np.arange(kv_len).reshape(1, kv_len)
    allowed = np.ones((q_len, kv_len), dtype=bool)
    if causal:
        allowed &= diff >= 0
    if left >= 0:
        allowed &= diff <= left
    if right >= 0:
        allowed &= diff >= -right
    return allowed


def _allowed_per_batch(bb, nonpad, q_len: int, kv_len: int, causal: bool, left: int, right: int):
    """Bool [B, 1, q, kv] for an external cache: the causal/window frontier at offset nonpad[b] - q_len,
    and keys at or past nonpad[b] masked out as padding."""
    from tvm import relax

    nonpad = bb.normalize(relax.op.astype(nonpad, "int64"))
    nonpad = bb.normalize(relax.op.reshape(nonpad, (-1, 1, 1, 1)))
    j = relax.const(np.arange(kv_len, dtype=np.int64).reshape(1, 1, 1, kv_len), "int64")
    allowed = bb.normalize(relax.op.less(j, nonpad))
    pos = relax.op.add(relax.const(np.arange(q_len, dtype=np.int64).reshape(1, 1, q_len, 1) - q_len, "int64"), nonpad)
    diff = bb.normalize(relax.op.subtract(pos, j))
    rules = ([relax.op.greater_equal(diff, relax.const(0, "int64"))] if causal else []) + (
        [relax.op.less_equal(diff, relax.const(left, "int64"))] if left >= 0 else []) + (
        [relax.op.greater_equal(diff, relax.const(-right, "int64"))] if right >= 0 else [])
    for rule in rules:
        allowed = bb.normalize(relax.op.logical_and(allowed, rule))
    return allowed


def _mask_bias(bb, mask, kv_len: int, dtype: str):
    """attn_mask as an additive bias of `dtype`, its last axis padded to kv_len (False / -inf)."""
    from tvm import relax

    shape = _static_shape(mask, "attn_mask")
    if shape[-1] > kv_len:
        raise _refuse(f"attn_mask's last dimension {shape[-1]} exceeds the total key length {kv_len}")
    is_bool = str(mask.ty.dtype) == "bool"
    if is_bool:
        mask = bb.normalize(relax.op.where(mask, relax.const(0.0, dtype), relax.const(_NEG_INF, dtype)))
    elif str(mask.ty.dtype) != dtype:
        mask = bb.normalize(relax.op.astype(mask, dtype))
    if shape[-1] < kv_len:
        pad_shape = relax.ShapeExpr(shape[:-1] + [kv_len - shape[-1]])
        pad = bb.normalize(relax.op.broadcast_to(relax.const(_NEG_INF, dtype), pad_shape))
        mask = bb.normalize(relax.op.concat([mask, pad], axis=-1))
    return mask


def _additive(bb, allowed, dtype: str):
    """0 where allowed, -inf elsewhere (a bool Relax expression)."""
    from tvm import relax

    return bb.normalize(relax.op.where(allowed, relax.const(0.0, dtype), relax.const(_NEG_INF, dtype)))


def convert_attention(bb, inputs, attr: dict, opset: int):
    """ONNX Attention (opset 23-25) -> Relax: Y, present_key, present_value, qk_matmul_output."""
    from tvm import relax

    q, k, v = inputs[0], inputs[1], inputs[2]
    mask, past_k, past_v, nonpad = (inputs[i] if len(inputs) > i else None for i in (3, 4, 5, 6))
    if q is None or k is None or v is None:
        raise _refuse("Q, K and V are all required")
    dtype = str(q.ty.dtype)
    if dtype not in _FLOAT_TYPES.values():
        raise _refuse(f"Q has dtype {dtype}; only float types are supported")
    q_shape, k_shape, v_shape = (_static_shape(x, n) for x, n in ((q, "Q"), (k, "K"), (v, "V")))
    rank = len(q_shape)
    if rank not in (3, 4) or len(k_shape) != rank or len(v_shape) != rank:
        raise _refuse(f"Q, K, V have ranks {len(q_shape)}, {len(k_shape)}, {len(v_shape)}; need all 3 or all 4")
    if (past_k is None) != (past_v is None):
        raise _refuse("past_key and past_value must be given together")
    if nonpad is not None and past_k is not None:
        raise _refuse("nonpad_kv_seqlen cannot be combined with past_key/past_value")
    mode = int(attr.get("qk_matmul_output_mode", 0))
    if mode not in (0, 1, 2, 3):
        raise _refuse(f"qk_matmul_output_mode={mode} (must be 0, 1, 2 or 3)")
    precision = attr.get("softmax_precision")
    if precision is not None and int(precision) not in _FLOAT_TYPES:
        raise _refuse(f"softmax_precision={precision} is not a float type (1, 10, 11 or 16)")
    left, right = int(attr.get("left_window_size", -1)), int(attr.get("right_window_size", -1))
    if left < -1 or right < -1:
        raise _refuse(f"left_window_size={left}, right_window_size={right} (each must be -1 or >= 0)")
    causal = bool(attr.get("is_causal", 0))
    softcap = float(attr.get("softcap", 0.0))

    if rank == 3:
        if "q_num_heads" not in attr or "kv_num_heads" not in attr:
            raise _refuse("3D Q/K/V need the q_num_heads and kv_num_heads attributes")
        q_heads, kv_heads = int(attr["q_num_heads"]), int(attr["kv_num_heads"])
        q = _to_heads(bb, q, q_shape, q_heads, "Q")
        k = _to_heads(bb, k, k_shape, kv_heads, "K")
        v = _to_heads(bb, v, v_shape, kv_heads, "V")
    else:
        if opset >= 25 and ("q_num_heads" in attr or "kv_num_heads" in attr):
            raise _refuse("q_num_heads/kv_num_heads must not be given with 4D Q/K/V")
        q_heads, kv_heads = q_shape[1], k_shape[1]
    q4 = _static_shape(q, "Q")
    batch, q_len, head_size = q4[0], q4[2], q4[3]
    if kv_heads <= 0 or q_heads % kv_heads or _static_shape(v, "V")[1] != kv_heads:
        raise _refuse(f"q_num_heads={q_heads} is not a multiple of kv_num_heads={kv_heads} "
                      f"(or K and V head counts differ)")

    if past_k is not None:
        k = bb.normalize(relax.op.concat([past_k, k], axis=2))
        v = bb.normalize(relax.op.concat([past_v, v], axis=2))
        past_len = _static_shape(past_k, "past_key")[2]
    else:
        past_len = 0
    present_k, present_v = k, v
    kv_len = _static_shape(k, "K")[2]
    out_dtype = dtype
    if dtype in ("float16", "bfloat16"):  # computed in float32, rounded once at the end (fp16 arithmetic
        # throughout drifts 2+ ulps from ONNX Runtime and the ONNX reference)
        q, k, v = (bb.normalize(relax.op.astype(x, "float32")) for x in (q, k, v))
        dtype = "float32"

    scale = float(attr["scale"]) if "scale" in attr else 1.0 / math.sqrt(head_size)
    root = relax.const(math.sqrt(scale), dtype)
    if q_heads != kv_heads:  # grouped-query: query head h reads key/value head h // (q_heads / kv_heads)
        k = bb.normalize(relax.op.repeat(k, q_heads // kv_heads, axis=1))
        v = bb.normalize(relax.op.repeat(v, q_heads // kv_heads, axis=1))
    k_t = bb.normalize(relax.op.permute_dims(bb.normalize(relax.op.multiply(k, root)), [0, 1, 3, 2]))
    qk = bb.normalize(relax.op.matmul(bb.normalize(relax.op.multiply(q, root)), k_t))
    capped = qk
    if softcap > 0:
        cap = relax.const(softcap, dtype)
        capped = bb.normalize(relax.op.tanh(bb.normalize(relax.op.divide(qk, cap))))
        capped = bb.normalize(relax.op.multiply(capped, cap))

    # additive bias: attn_mask (padded), then the causal / window / padding frontier as 0 / -inf
    bias = _mask_bias(bb, mask, kv_len, dtype) if mask is not None else None
    rows_masked = None  # a bool [..., q, 1]: rows that attend no key (None: there are none)
    if nonpad is not None:
        _static_shape(nonpad, "nonpad_kv_seqlen")
        frontier = _additive(bb, _allowed_per_batch(bb, nonpad, q_len, kv_len, causal, left, right), dtype)
    elif causal or left >= 0 or right >= 0:
        allowed = _allowed_by_position(q_len, kv_len, past_len, causal, left, right)
        frontier = relax.const(np.where(allowed, 0.0, -np.inf).astype(np.float32))
        frontier = bb.normalize(relax.op.astype(frontier, dtype)) if dtype != "float32" else frontier
        if mask is None and not allowed.any(axis=-1).all():
            rows_masked = relax.const(~allowed.any(axis=-1, keepdims=True))
    else:
        frontier = None
    if frontier is not None:
        bias = frontier if bias is None else bb.normalize(relax.op.add(bias, frontier))
    scores = capped if bias is None else bb.normalize(relax.op.add(capped, bias))
    if mask is not None or nonpad is not None:
        # a row whose bias is -inf everywhere attends nothing: its probabilities (and Y) are 0, not NaN.
        # (not max(bias) == -inf: TVM's max reduction starts from the lowest finite value, not -inf)
        open_keys = bb.normalize(relax.op.not_equal(bias, relax.const(_NEG_INF, dtype)))
        open_keys = bb.normalize(relax.op.max(bb.normalize(relax.op.astype(open_keys, "int32")), axis=-1,
                                              keepdims=True))
        rows_masked = bb.normalize(relax.op.equal(open_keys, relax.const(0, "int32")))

    soft_dtype = _FLOAT_TYPES[int(precision)] if precision is not None else dtype
    probs = scores if soft_dtype == dtype else bb.normalize(relax.op.astype(scores, soft_dtype))
    probs = bb.normalize(relax.op.nn.softmax(probs, axis=-1))
    if rows_masked is not None:
        probs = bb.normalize(relax.op.where(rows_masked, relax.const(0.0, soft_dtype), probs))
    if soft_dtype != dtype:
        probs = bb.normalize(relax.op.astype(probs, dtype))
    y = bb.normalize(relax.op.matmul(probs, v))
    if rank == 3:
        y = bb.normalize(relax.op.permute_dims(y, [0, 2, 1, 3]))
        y = bb.normalize(relax.op.reshape(y, (batch, q_len, -1)))

    num_outputs = int(attr.get("tvm_custom", {}).get("num_outputs", 1))
    if out_dtype != dtype:
        y = bb.normalize(relax.op.astype(y, out_dtype))
    if num_outputs == 1:
        return y
    qk_out = (qk, capped, scores, probs)[mode]
    if out_dtype != dtype:
        qk_out = bb.normalize(relax.op.astype(qk_out, out_dtype))
    return relax.Tuple([y, present_k, present_v, qk_out][:num_outputs])


class StandardAttention:
    """TVM converter class for `Attention`: ai.onnx opset 23+ here, com.microsoft (num_heads) to TVM."""

    @classmethod
    def get_converter(cls, opset: int):
        """The function TVM's importer calls for this node at the model's ai.onnx opset."""

        def convert(bb, inputs, attr, params):
            if "num_heads" in attr or opset < 23:
                from tvm.relax.frontend.onnx.onnx_frontend import Attention

                return Attention.get_converter(opset)(bb, inputs, attr, params)
            return convert_attention(bb, inputs, attr, opset)

        return convert


FORGEML_CONVERTERS: dict[str, Any] = {"Attention": StandardAttention}
