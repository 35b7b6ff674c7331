"""Normalize an ONNX model before TVM's importer sees it: fold its constant subgraphs.

Exporters leave shape arithmetic in the graph (Shape -> Gather -> Concat -> ConstantOfShape -> Expand
...) that TVM's Relax importer cannot always follow: the transformers models (BERT, GPT-2, RoBERTa,
DistilBERT with an attention mask, torch's TorchScript exporter) stop at a ConstantOfShape whose
output is a scalar ("broadcast_to expects the input shape to have the number of ndim at least as the
input tensor's"). Once every input shape is fixed, all of that computes to constants.

The folding is onnxscript's constant folder (`fold_constants`, from the optimizer torch's own exporter
uses), with ConstantOfShape allowed to fold (onnxscript keeps it by default, to keep files small, and
without it none of the four imports); then dead nodes are dropped. One rewrite besides: convolution
padding goes into the Conv's own `pads` (`conv_padding.py`: SAME auto_pad made explicit, zero Pads in
front of Convs folded in). Nothing else is rewritten: no fusions, no renaming, the graph's inputs and
outputs stay as they were, and a model with nothing to fold comes back as the same object.

Chosen over onnxscript's whole `optimize` (with the same ConstantOfShape hook) and ONNX Runtime's
basic-level offline optimizer (measured on the four transformers models above, with mask, [1, 16], and
on the zoo). All three make the four import, compile at O2 and verify with the same max abs error vs ORT
on the original (4.8e-7, DistilBERT 7.2e-7; folded BERT-base [1, 128]: 6.9e-6), and all three are
deterministic. But `optimize` and ORT also fuse: BatchNorm into Conv (ResNet-18 69 -> 49 nodes,
MobileNet-V2 222 -> 100; forgeml's exporter keeps BatchNorm on purpose), ORT turns MatMul+Add into Gemm
behind Reshapes, and both change bert_tiny; the folder alone leaves every zoo model untouched
(byte-identical). Nodes, BERT/GPT-2/RoBERTa/DistilBERT: fold 180->118, 198->152, 189->128, 160->114;
optimize ->88, 94, 96, 85; ORT ->90, 98, 100, 89. Time on BERT-base: fold 1.2 s, optimize 3.1 s, ORT 6.8
s (it writes the model out to a file and reads it back).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import onnx

_ONNX_DOMAINS = ("", "ai.onnx")
_LOGGERS = ("onnxscript", "onnx_ir")


@dataclass(frozen=True)
class NormalizeRecord:
    """What `normalize` did: computing (non-Constant) nodes folded into constants or dropped as dead (counted
    after expansion), node counts before and after, the tool, why the model was kept as it was if folding
    failed, the nodes expanded into ONNX function bodies and the Constant nodes rewritten."""

    folded_nodes: int
    nodes_before: int
    nodes_after: int
    tool: str
    seconds: float
    skipped: str | None = None
    expanded: dict[str, int] | None = None  # op type -> nodes replaced by their ONNX function bodies
    constants_rewritten: int = 0  # Constant nodes put in the `value` form (legalize.py)
    conv_pads_folded: int = 0  # Convs given their padding as `pads` (conv_padding.py)

    def to_json(self) -> dict:
        return asdict(self)


def _tool() -> str:
    import onnxscript

    return f"onnxscript {onnxscript.__version__}"


def _fold_constant_of_shape(node) -> bool | None:
    """onnxscript's should_fold hook: fold ConstantOfShape too; default rules for the rest."""
    return True if node.op_type == "ConstantOfShape" and node.domain in _ONNX_DOMAINS else None


def _computing_nodes(model: onnx.ModelProto) -> int:
    return sum(1 for n in model.graph.node if not (n.op_type == "Constant" and n.domain in _ONNX_DOMAINS))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence onnxscript's warnings (e.g. "Evaluation failed" where onnx's reference op cannot
    evaluate a node: that node is simply left in the graph)."""
    loggers = [logging.getLogger(name) for name in _LOGGERS]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _fold(model: onnx.ModelProto, input_size_limit: int, output_size_limit: int) -> onnx.ModelProto:
    """`model` with its constant subgraphs folded and dead nodes removed (`model` itself if none)."""
    import onnx_ir as ir
    from onnx_ir.passes.common import RemoveUnusedNodesPass
    from onnxscript.optimizer import fold_constants

    graph = ir.serde.deserialize_model(model)
    with _quiet():
        result = fold_constants(graph, onnx_shape_inference=True, input_size_limit=input_size_limit,
                                output_size_limit=output_size_limit, should_fold=_fold_constant_of_shape)
        if not result.modified:
            return model
        RemoveUnusedNodesPass()(graph)
        folded = ir.serde.serialize_model(graph)
    # onnxscript's rewrites may write nodes of a later opset than the model's (ConcatFromSequence with
    # new_axis became Unsqueeze with an axes input in an opset-12 model, which the importer then read
    # as Unsqueeze-11 without axes): a folded model the checker refuses is not used
    onnx.checker.check_model(folded)
    return folded


def normalize(model: onnx.ModelProto, input_size_limit: int = 8192,
              output_size_limit: int = 512 * 512) -> tuple[onnx.ModelProto, NormalizeRecord]:
    """Expand the ONNX functions the importer lacks and put Constants in the `value` form (legalize.py),
    then fold `model`'s constant subgraphs (fix its input shapes first) and give convolutions their
    padding as `pads` (conv_padding.py: a separate pad kernel cost a copy and the conv its rule);
    returns the new model and a record. `model` itself is left as it was, and returned as is when nothing
    folds or folding fails (the record says why: the importer may still take the model as it is).

    `input_size_limit`/`output_size_limit` (elements) bound what is folded, as in onnxscript: larger
    weights are not fed through folding, larger results are not stored."""
    from forgeml.compiler.frontend import conv_padding, legalize, onnx_model

    clock = time.perf_counter()
    skipped = None
    legal, expanded, constants = legalize.legalize(model, onnx_model.supported_ops())
    try:
        result = _fold(legal, input_size_limit, output_size_limit)
        if result is not legal:
            constants += legalize.constants_to_value_form(result)
    except Exception as e:  # a bug in the folder must not stop a model the importer may take as is
        result = legal
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        skipped = f"{type(e).__name__}: {message}" if message else type(e).__name__
    result, pads_folded = conv_padding.fold_conv_padding(result)
    record = NormalizeRecord(_computing_nodes(legal) - _computing_nodes(result), len(model.graph.node),
                             len(result.graph.node), _tool(), round(time.perf_counter() - clock, 3), skipped,
                             expanded or None, constants, pads_folded)
    return result, record
