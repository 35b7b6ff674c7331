"""Model in: ONNX load, checks and op report (onnx_model.py), import to Relax (relax_import.py), and
PyTorch -> ONNX export (torch_export.py)."""
