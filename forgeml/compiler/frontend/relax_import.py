"""ONNX -> Relax: TVM's importer with the weights bound as constants, and the specs of the imported
model's outputs."""

from __future__ import annotations

from typing import Any

from forgeml.errors import InvalidInput
from forgeml.runtime.artifact import TensorSpec


def import_onnx(loaded) -> Any:
    """ONNX -> Relax with weights bound as constants."""
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    shapes = {spec.name: list(spec.shape) for spec in loaded.inputs}
    dtypes = {spec.name: spec.dtype for spec in loaded.inputs}
    try:
        mod = from_onnx(loaded.model, shape_dict=shapes, dtype_dict=dtypes, keep_params_in_input=True)
    except Exception as e:
        message = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise InvalidInput(f"{loaded.path.name}: the TVM ONNX importer failed: {message}") from None
    mod, params = relax.frontend.detach_params(mod)
    func = mod["main"]
    num_input = int(func.attrs["num_input"]) if func.attrs and "num_input" in func.attrs else len(loaded.inputs)
    names = [p.name for p in func.params[num_input:]]
    if params.get("main"):
        mod = relax.transform.BindParams("main", dict(zip(names, params["main"])))(mod)
    return mod


def output_specs(mod, names: list[str]) -> list[TensorSpec]:
    ret = mod["main"].ret_ty
    fields = list(ret.fields) if hasattr(ret, "fields") else [ret]
    specs = []
    for name, ty in zip(names, fields):
        specs.append(TensorSpec(name, tuple(int(s) for s in ty.shape), str(ty.dtype)))
    return specs
