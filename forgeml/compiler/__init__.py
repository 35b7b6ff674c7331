"""forgeml's compiler: ONNX -> Relax -> scheduled kernels -> artifact."""
