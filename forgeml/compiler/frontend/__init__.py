"""Model in: ONNX load, checks and op report (onnx_model.py), constant folding before import
(normalize.py), import to Relax (relax_import.py), and PyTorch -> ONNX export (torch_export.py)."""
