"""CPU (LLVM) code generation: rule-based schedules, one module per kind of kernel, and the CPU pipelines.

rules.py applies them in order: conv.py (convolutions), gemm.py (dense, matmul), generic.py (everything
else, with rows.py for row-wise kernels); common.py holds what they share; pipeline.py the O0/O2 passes.
"""
