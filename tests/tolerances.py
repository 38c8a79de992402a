"""Named numeric tolerances for every test, in one place.

NMSE = ||out - ref||^2 / ||ref||^2. Values are upper bounds measured against float64/torch
references with margin; a format or kernel that needs a looser bound must say why here.
"""

# Exact conversions (bf16/fp16 rounding, dequantization against gguf's numpy code).
EXACT = 0.0

# float32 kernels vs a float64/float32 torch reference (different summation order).
F32_RTOL = 1e-5
F32_ATOL = 1e-6

# --- Quant formats (Q) -------------------------------------------------------------------------
# Quantization error, NMSE of dequantize(quantize(x)) vs x on x ~ N(0, 1) (blocks of 128 rows x
# 1024). Measured (docs/quant.md): f16 4.4e-8, bf16 2.8e-6, q8_0 2.9e-5, q4_0 7.4e-3,
# q5_0 1.8e-3, q4_k 5.2e-3, q5_k 1.3e-3, q6_k 3.2e-4, q3_k 2.3e-2, q2_k 9.0e-2, iq4_xs 5.9e-3,
# mxfp4 1.3e-2 (power-of-two block scales and 15 E2M1 levels: coarser than q4_0's fp16 scale);
# bounds add ~30%.
QUANT_NMSE = {
    "f32": 0.0,
    "f16": 6e-8,
    "bf16": 4e-6,
    "q8_0": 4e-5,
    "q4_0": 9.5e-3,
    "q5_0": 2.4e-3,
    "q4_k": 6.8e-3,
    "q5_k": 1.7e-3,
    "q6_k": 4.2e-4,
    "q3_k": 3.0e-2,
    "q2_k": 0.115,
    "iq4_xs": 7.7e-3,
    "mxfp4": 1.75e-2,
}
# vec_dot (weights as stored, activations quantized to q8_0 / q8_K) vs a float64 dot of the
# dequantized weights with the original float activations: the activation rounding alone
# (8 bits per block of 32 or 256) gives NMSE median 2.8e-5 (q8_0 activations, max 9.7e-5 over
# 200 draws of the smallest test case: one block, 24 rows x 2) and 4.8e-5 (q8_K, max 1.4e-4);
# bounds are ~4x those maxima. f32 / f16 / bf16 weights dot f32 activations: float32 sums only.
VEC_DOT_NMSE = {
    "f32": 1e-10,
    "f16": 1e-10,
    "bf16": 1e-10,
    "q8_0": 4e-4,
    "q4_0": 4e-4,
    "q5_0": 4e-4,
    "q4_k": 6e-4,
    "q5_k": 6e-4,
    "q6_k": 6e-4,
    "q2_k": 6e-4,
    "q3_k": 6e-4,
    "iq4_xs": 6e-4,
    "mxfp4": 4e-4,
}
# An ISA variant vs the generic reference: same integer sums, different float summation order.
VEC_DOT_ISA_NMSE = 1e-10

# --- model operators and fidelity (O) ---
# Whole-model logits of ktrans (paged KV, packed batches, absorbed MLA decode) vs transformers on
# the same f32 weights: same math, different summation order and attention formulation.
FIDELITY_F32_RTOL = 1e-4
FIDELITY_F32_ATOL = 1e-4
# The same as an NMSE of a whole sequence's logits (f32 on the CPU: measured 1.3e-13..2.6e-13).
FIDELITY_F32_NMSE = 1e-8
# Whole-model logits with bf16 weights, activations and KV cache vs transformers in f32 (tiny
# random models, 2-3 layers): transformers' own bf16 model measures 1e-4..1e-3 NMSE here, with
# rare 1e-2 outliers where a near-tie in MoE routing flips; ours must stay under the larger of
# BF16_LOGITS_NMSE and BF16_VS_HF_BF16 x transformers' own bf16 error on the same tokens.
BF16_LOGITS_NMSE = 2e-3
BF16_VS_HF_BF16 = 3.0
# A near-tie in MoE routing can flip an expert choice under bf16 rounding or activation
# quantization. tests/routing.py forces such flips back to the reference's experts (so the bounds
# above hold on every token) and accepts a flip only as a genuine near-tie: the least change of
# the reference's router logits that could produce it (flip_gap) must be within how far our
# router logits actually were from the reference's at that token. That distance is itself
# bounded: bf16 runs of the tiny models measure up to 0.097 (router logits ~N(0, 1.2)); with the
# reference's routing forced, it does not grow along the sequence.
ROUTING_LOGIT_DRIFT = 0.25
# ... unless transformers' own bf16 model on the same weights and tokens drifts as far: the tiny
# Gated DeltaNet models (Qwen3-Next, Qwen3.5-MoE) amplify bf16 rounding through their recurrent
# layers, so both runs' router logits move together (measured over 8 seeds on the CPU: ours /
# transformers-bf16 0.3534 / 0.3533, 0.3841 / 0.3838, 0.2453 / 0.2564; across every architecture
# the ratio ours / transformers-bf16 stayed within 0.65-1.6). A run's drift is therefore held to
# max(ROUTING_LOGIT_DRIFT, ROUTING_DRIFT_VS_HF_BF16 x transformers-bf16's drift).
ROUTING_DRIFT_VS_HF_BF16 = 2.0
# Whole-model logits with quantized/bf16 GGUF experts in the CPU kernels (activations quantized
# to q8_K/q8_0 or rounded to bf16 for the dot products) vs transformers on the dequantized
# weights; tiny models measure 5e-6..2e-4.
QUANT_LOGITS_NMSE = 1e-3
# Gemma 3 normalises each attention and MLP output again before the residual add (post-attention
# and post-feedforward RMSNorms), so every sublayer's activation-quantization error enters the
# residual at the residual's scale instead of the sublayer's: the all-CPU kernels vs the
# dequantized f32 placement measure 6.8e-4..1.35e-3 over 9 seeds (other archs 5e-5..1.5e-4).
QUANT_LOGITS_NMSE_POST_NORM = 3e-3
# Qwen3-Next / Qwen3.5-MoE: the Gated DeltaNet L2-normalises q and k and RMS-normalises each value
# head's output, so the activation quantization of its input projections (q8_K/q8_0 in the CPU
# kernels) reaches the logits amplified: the all-CPU kernels vs the dequantized f32 placement
# measure 3.2e-4..4.0e-3 over 8 seeds of each arch (the same models with the DeltaNet's
# projections dequantized: 1.2e-4..1.6e-4, as the other archs).
QUANT_LOGITS_NMSE_DELTANET = 8e-3
# Two quantized paths whose greedy tokens differ at a position: the reference's lead of its token
# over ours must be within this many times the RMS of the two rows' difference, i.e. a top-2
# near-tie that the row's typical activation-rounding noise turns over (seen: lead 0.0147 at an
# RMS difference of 0.011, 1.3x), not an error concentrated on those two logits.
QUANT_TOKEN_TIE_RMS = 3.0

# --- Packed AMX / AVX-512 formats (A) ---
# packed_gemm vs float64 x @ W_unpacked.T (the weights the packed form stands for), so only the
# kernel's own error counts. bf16: f32 accumulation only. int8 / int4: activations are quantized
# per row to int8 (measured NMSE 2e-5..6e-5 on Gaussian data; bound with margin for small K).
PACKED_GEMM_NMSE = {"bf16": 1e-10, "int8": 3e-4, "int4": 3e-4}
# An ISA variant vs the generic reference: identical integer sums (int8/int4) or f32 summation
# order (bf16). The AMX int4 kernel instead multiplies bf16 x by weights expanded to bf16 (no
# activation quantization), so it is held to the torch bound above rather than to this one.
PACKED_ISA_NMSE = 1e-10
# Weight quantization of the packers, NMSE of unpack(pack(W)) vs W on W ~ N(0, 1): measured
# bf16 2.8e-6, int8 (per channel, K = 256) 4.9e-5, int4 (group 32, bf16 scales) 7.0e-3.
PACKED_WEIGHT_NMSE = {"bf16": 4e-6, "int8": 1e-4, "int4": 9e-3}

# --- CPU MoE experts (M) ---
# C++ MoE layer vs a dense torch reference on the dequantized weights (E=8, H=I=256, k=3).
# Float formats: only f32 summation order, plus bf16 rounding of the output for bf16 inputs
# (measured ~3e-6). Block formats: the activations (x, and h before down) are quantized to
# 8 bits per block as llama.cpp does (measured 1.3e-4..1.6e-4 for q*_0, 2.5e-4..4e-4 K-quants;
# against gguf-py's dequantization in float64 with weights ~ N(0, 0.01), 12 draws of T = 1 and 19:
# q*_0 up to 2.1e-4, K-quants and iq4_xs (q8_K activations) up to 6.6e-4).
MOE_NMSE = {
    "f32": 1e-5, "f16": 1e-5, "bf16": 1e-5,
    "q8_0": 6e-4, "q4_0": 6e-4, "q5_0": 6e-4,
    "q4_k": 1.5e-3, "q5_k": 1.5e-3, "q6_k": 1.5e-3, "q2_k": 1.5e-3, "q3_k": 1.5e-3, "iq4_xs": 1.5e-3,
    "mxfp4": 6e-4,
}
# The GPU part of hybrid_experts (torch._grouped_mm in bf16: f32 expert weights rounded to bf16,
# the gate/up product and the activation rounded to bf16 before the down product) vs the f32 CPU
# reference: measured median 2.6e-5, max 5.9e-5 over 36 draws (qwen3_moe tiny, T = 1, 8, 200,
# the same function run on the CPU in bf16).
GROUPED_BF16_NMSE = 2e-4
# forward_native (ktrans's dequantization, f32 torch) vs plain float64 torch on gguf-py's
# dequantization of the same bytes: identical weights, only f32 rounding of the sums (measured
# up to 1.3e-13 for every format).
MOE_REFERENCE_NMSE = 1e-10
# Same weights, different thread counts / NUMA layouts / chunking: summation order only.
MOE_LAYOUT_NMSE = 1e-10
# One output row of the gguf MoE at another ISA level vs the generic kernels: one q8 step of h
# (a float-order rounding flip before the down projection) measures up to 5e-6 on a row.
MOE_ISA_ROW_NMSE = 1e-4
# Same, on the gguf GEMM path: h is rounded to bf16 after the f32 sums, so a different summation
# order (AMX tiles vs AVX-512 for small chunks, split NUMA slices) flips some h values by one
# bf16 ulp (measured 5e-10..1.1e-9 on AVX2, up to 2.5e-8 on AMX where small chunks take AVX-512).
MOE_GEMM_LAYOUT_NMSE = 2e-7
# Packed amx_* backends vs the reference on the source weights: x and h rounded to bf16
# (measured ~6e-6, 1.5e-5 from q4_k sources), int8 per-channel weights (~6e-4), int4 with
# group-32 scales (~3e-2, per-weight 4-bit rounding on Gaussian weights).
MOE_PACKED_NMSE = {"amx_bf16": 5e-5, "amx_int8": 1.5e-3, "amx_int4": 6e-2}

# --- Engine and CLIs (E) ---
# ktrans's greedy token vs transformers' logits at the same position (teacher forcing): the token
# must be transformers' argmax up to a near-tie, i.e. within this much of the top logit. f32
# weights run through different kernels and summation orders, so logits differ by up to
# FIDELITY_F32_ATOL each side; random tiny models do produce top-2 gaps that small.
GREEDY_TIE_ATOL = 2e-4
# llama.cpp (tests/models/test_llamacpp_peer.py) vs ktrans on the same GGUF file: log-prob of
# each greedy token; a differing greedy token must be a near-tie of ours (log-prob gap below TIE);
# the comparison ends at the first step where one of our routers' k-th and next scores (with
# group-limited routing also the last chosen group's score and the next group's) are closer than
# ROUTER_TIE (llama.cpp may choose the other expert there: seen in f32 at a gap of 1e-4).
# f32: both compute in f32 (llama.cpp's KV cache set to f32): measured up to 4.3e-4 on tiny
# gpt-oss. mxfp4 files (q8_0 outside the experts): both quantize activations to 8 bits for the
# dots, with their own rounding of what goes in: measured up to 0.065 (qwen2, all q8_0); a wrong
# block layout moves them by O(1).
LLAMA_CPP_LOGPROB_ATOL = {"f32": 3e-3, "mxfp4": 0.12}
LLAMA_CPP_TIE = {"f32": 3e-3, "mxfp4": 0.12}
LLAMA_CPP_ROUTER_TIE = {"f32": 1e-3, "mxfp4": 1e-3}
