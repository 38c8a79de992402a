"""Named numeric tolerances for every test, in one place.

NMSE = ||out - ref||^2 / ||ref||^2. Values are upper bounds measured against float64/torch
references with margin; a format or kernel that needs a looser bound must say why here.
"""

# Exact conversions (bf16/fp16 rounding, dequantization against gguf's numpy code).
EXACT = 0.0

# float32 kernels vs a float64/float32 torch reference (different summation order).
F32_RTOL = 1e-5
F32_ATOL = 1e-6
