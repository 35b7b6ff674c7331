"""CUDA code generation: the pipeline (pipeline.py: graph passes, dlight's rules and forgeml's, in order),
its rules (tensor_cores.py with wmma.py and mma.py, short_reduction.py, rows.py), its graph rewrites
(splitk.py, stem.py), the build options it reads (options.py) and the fatbin export (fatbin.py)."""
