"""kt-kernel 0.7.2 as the peer of bench/moe.py: builds its MoE layers from the same expert bytes
and times them the same way (submit + sync per layer call, routing new every call).

Driven through its raw API (MOEConfig -> <Class>(cfg) -> load_weights_task -> forward_task), as
described in the project's kt-kernel notes. Its extension links no torch, so it runs in the same
process as ktrans; KT_KERNEL_CPU_VARIANT picks its build (amx, avx512_*, avx2).
"""

from __future__ import annotations

import torch

# ktrans format -> (kt-kernel method label, class in the AMX build, class in AVX2-only builds)
PEERS = {
    "amx_int8": ("AMXINT8", "AMXInt8_MOE", None),
    "amx_int4": ("AMXINT4", "AMXInt4_MOE", None),
    "amx_bf16": ("BF16", "AMXBF16_MOE", "AVX2BF16_MOE"),
    "q4_k": ("LLAMAFILE Q4_K", "MOE", "MOE"),
}
GGML_TYPES = {"q4_k": 12, "q6_k": 14, "q8_0": 8, "bf16": 30}


def available() -> str | None:
    """The kt-kernel build variant in use, or None when kt-kernel is not installed."""
    try:
        import kt_kernel
    except ImportError:
        return None
    return kt_kernel.__cpu_variant__


class Peer:
    """kt-kernel's CPUInfer plus the layers of one format."""

    def __init__(self, threads: int):
        from kt_kernel import kt_kernel_ext as kt

        self.kt = kt
        wc = kt.WorkerPoolConfig()
        wc.subpool_count = 1
        wc.subpool_numa_map = [0]
        wc.subpool_thread_count = [threads]
        self.cpu = kt.CPUInfer(wc)
        self.layers: list = []
        self.keep: list = []

    def class_for(self, fmt: str):
        import kt_kernel

        label, amx_cls, avx2_cls = PEERS[fmt]
        name = amx_cls if kt_kernel.__cpu_variant__ == "amx" or fmt == "q4_k" else avx2_cls
        return label, (getattr(self.kt.moe, name) if name else None)

    def build(self, fmt: str, E: int, k: int, H: int, I: int, n_layers: int, max_len: int, src: dict) -> str:
        """src: 'bf16' -> (gate, up, down) bf16 tensors [E, I, H] / [E, H, I]; 'q4_k' -> uint8 blocks."""
        label, cls = self.class_for(fmt)
        if cls is None:
            raise RuntimeError(f"kt-kernel {label} needs its AMX build")
        p2l = torch.arange(E, dtype=torch.int64)
        self.keep.append(p2l)
        for layer in range(n_layers):
            cfg = self.kt.moe.MOEConfig(E, k, H, I, 0)
            cfg.layer_idx, cfg.pool, cfg.max_len = layer, self.cpu.backend_, max_len
            tensors = src[fmt]
            cfg.gate_proj, cfg.up_proj, cfg.down_proj = (t.data_ptr() for t in tensors)
            if fmt == "q4_k":
                cfg.gate_type = cfg.up_type = GGML_TYPES["q4_k"]
                cfg.down_type = GGML_TYPES["q4_k"]
                cfg.hidden_type = GGML_TYPES["bf16"]
                cfg.m_block, cfg.group_min_len, cfg.group_max_len = 32, 10, 1024
            moe = cls(cfg)
            self.cpu.submit(moe.load_weights_task(p2l.data_ptr()))
            self.cpu.sync()
            self.layers.append(moe)
            if fmt == "q4_k":
                self.keep.append(tensors)                   # the GGUF class reads the blocks in place
        return label

    def call(self, i: int, T: int, k: int, ids, w, x, out, qlen_t) -> None:
        """One layer call: submit + sync (ids int64 [T, k], w f32 [T, k], x/out bf16 [T, H])."""
        moe = self.layers[i % len(self.layers)]
        self.cpu.submit(moe.forward_task(qlen_t.data_ptr(), k, ids.data_ptr(), w.data_ptr(), x.data_ptr(),
                                         out.data_ptr(), False))
        self.cpu.sync()

    def free(self) -> None:
        self.layers.clear()
        self.keep.clear()
