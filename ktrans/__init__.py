"""ktrans: run huge Mixture-of-Experts LLMs on one GPU plus a CPU with lots of RAM.

Routed experts run on the CPU in ktrans's own C++ kernels (AVX2 / AVX-512 / AMX, chosen at run
time); attention, the KV cache, gates and shared experts run on the GPU. YAML rules decide which
module of a HuggingFace `transformers` model runs where, with which kernel.
"""

__version__ = "0.1.0"
