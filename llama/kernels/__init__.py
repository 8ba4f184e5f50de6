"""Native CPU kernels, compiled for the machine at first use and cached (cpu_kernels.py is the
loader and the Python face of each operator): int8 products (cpu_kernels.cpp, which also
registers the operators), int4 products (cpu_int4.cpp), float32
and bfloat16-weight products (cpu_dense.cpp), and a decode step's attention
(cpu_attention.cpp). Where no compiler is found, callers fall back to torch's kernels.

Imports nothing of llama.
"""
