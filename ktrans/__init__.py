"""ktrans: run huge Mixture-of-Experts LLMs on one GPU plus a CPU with lots of RAM.

Routed experts run on the CPU in ktrans's own C++ kernels (AVX2 / AVX-512 / AMX, chosen at run
time); attention, the KV cache, gates and shared experts run on the GPU. YAML rules decide which
module of a HuggingFace `transformers` model runs where, with which kernel.
"""

import os as _os

__version__ = "0.1.0"

# NOTE: ktrans's CPU experts run on their own pinned thread pool, alternating with torch's CPU
# ops. OpenMP's default active wait keeps torch's idle threads spinning on the very cores the pool
# needs (measured on a 2-core machine: 7x slower decode). Passive waiting must be chosen before
# torch loads its OpenMP runtime, so it is set here, unless the user set it.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
