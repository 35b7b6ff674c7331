"""Dynamic shapes: static-shape buckets beside the symbolic `main`, in one module, and their weights.

A model compiled with ranges (`--input-shape ids=1..8,1..128`) gets a symbolic `main` (any shape in the
ranges, memory planned from the upper bounds) and, per bucket, a function imported with every dimension
pinned (`main_1x128`), which forgeml's rules schedule as they schedule a static model: on a 2-core EPYC
under load, bert_tiny's symbolic main ran 30-50x slower than the static build (the rules need static
extents; the generic rule keeps symbolic loops serial), the buckets as fast as a static artifact. The
runtime calls a bucket when the input shapes match it exactly, else `main` (never padding). All functions
share one library and one copy of each weight.
"""

from __future__ import annotations

import dataclasses
import hashlib
from itertools import product

import numpy as np

from forgeml.errors import InvalidInput
from forgeml.shapes import concrete_shapes

BUCKET_POLICIES = ("ends", "none")
_CORNERS_UP_TO = 2  # variables: all combinations of the ends (4 buckets for batch x sequence); more: min, max


def bucket_points(ranges: dict[str, tuple[int, int]], policy: str = "ends") -> list[dict[str, int]]:
    """The dimension values that get a static function. "ends": each variable at its minimum or maximum
    (every combination up to two variables, else all-minimum and all-maximum); "none": no buckets."""
    if policy not in BUCKET_POLICIES:
        raise InvalidInput(f"unknown bucket policy '{policy}'; known: {', '.join(BUCKET_POLICIES)}")
    if policy == "none" or not ranges:
        return []
    names = sorted(ranges)
    if len(names) <= _CORNERS_UP_TO:
        points = [dict(zip(names, values)) for values in product(*(sorted(set(ranges[n])) for n in names))]
    else:
        points = [{n: ranges[n][0] for n in names}, {n: ranges[n][1] for n in names}]
    return [p for i, p in enumerate(points) if p not in points[:i]]


def function_name(point: dict[str, int]) -> str:
    """`main_8x128`: the bucket's sizes in the variables' sorted order."""
    return "main_" + "x".join(str(point[k]) for k in sorted(point))


def add_buckets(mod, loaded, points: list[dict[str, int]], say) -> object:
    """`mod` (the symbolic import) with one function per bucket point, each imported from the ONNX model
    with its inputs pinned to that point's shapes (the same load, normalization and import as a static
    compile, so the rules see the graph they see there)."""
    from tvm import relax

    from forgeml.compiler.frontend import onnx_model, relax_import
    from forgeml.compiler.frontend.normalize import normalize

    for point in points:
        name = function_name(point)
        say(f"importing bucket {name}")
        static = onnx_model.load_onnx(loaded.path, concrete_shapes(loaded.inputs, point))
        static = dataclasses.replace(static, model=normalize(static.model)[0])
        func = relax_import.import_onnx(static)["main"]
        mod[name] = func.with_attr("global_symbol", name)
        if not isinstance(mod[name], relax.Function):
            raise InvalidInput(f"bucket {name} did not import as a Relax function")
    return mod


def lift_functions(mod, names: list[str]):
    """Each function's large constants lifted into trailing parameters (graph.lift_weights), with equal
    tensors stored once: (module, unique weights, function name -> indices of its weights)."""
    from forgeml.compiler import graph

    unique: list[np.ndarray] = []
    index: dict[tuple, int] = {}
    table: dict[str, list[int]] = {}
    for name in names:
        mod, values = graph.lift_weights(mod, name)
        table[name] = []
        for value in values:
            key = (value.dtype.str, value.shape, hashlib.sha256(np.ascontiguousarray(value).tobytes()).digest())
            if key not in index:
                index[key] = len(unique)
                unique.append(value)
            table[name].append(index[key])
    return mod, unique, table


def dispatch_table(points: list[dict[str, int]], table: dict[str, list[int] | dict]) -> list[dict]:
    """The manifest's `functions`: the symbolic main (dimensions null: any size in range) and each bucket
    with its dimension values, each with the indices of its weights in weights.bin (and its memory plan
    where `table` gives one)."""
    rows = []
    for name, dimensions in [("main", None), *((function_name(p), p) for p in points)]:
        entry = table[name] if isinstance(table[name], dict) else {"weights": table[name]}
        rows.append({"name": name, "dimensions": dimensions, **{k: v for k, v in entry.items() if v is not None}})
    return rows


def memory_plan(mod, target) -> dict[str, dict[str, int]]:
    """Function -> what TVM's static memory planning made of it: `planned_bytes` (storage allocated once
    per size, from the dimension variables' upper bounds where shapes are symbolic), `symbolic_storage`
    (storage whose size is known only at run time: 0 when the bounds planned everything) and
    `per_call_tensors` (tensors allocated at each call: the outputs). Runs relax's CPU lowering up to
    StaticPlanBlockMemory on a copy of the lifted module."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as lowering

    with target, tvm.transform.PassContext(opt_level=3):
        passes = [*lowering.library_dispatch_passes(target), *lowering.legalize_passes(target),
                  *lowering.dataflow_lower_passes(target), relax.transform.StaticPlanBlockMemory()]
        lowered = tvm.transform.Sequential(passes)(mod)
    storage, tensor = tvm.ir.Op.get("relax.memory.alloc_storage"), tvm.ir.Op.get("relax.builtin.alloc_tensor")
    plan = {}
    for gv, func in lowered.functions_items():
        if not isinstance(func, relax.Function):
            continue
        row = {"planned_bytes": 0, "symbolic_storage": 0, "per_call_tensors": 0}

        def visit(expr, row=row):
            if isinstance(expr, relax.Call) and expr.op.same_as(storage):
                sizes = expr.args[0].values
                if all(isinstance(v, tvm.tirx.IntImm) for v in sizes):
                    row["planned_bytes"] += int(np.prod([int(v) for v in sizes]))
                else:
                    row["symbolic_storage"] += 1
            elif isinstance(expr, relax.Call) and expr.op.same_as(tensor):
                row["per_call_tensors"] += 1

        relax.analysis.post_order_visit(func.body, visit)
        plan[gv.name_hint] = row
    return plan
