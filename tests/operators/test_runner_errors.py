"""ModelRunner refuses bad set-ups with one clear KtransError naming the problem."""

from __future__ import annotations

import pytest
import torch

from ktrans.engine.model_runner import ModelRunner
from ktrans.errors import KtransError


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_says_use_device_cpu(tiny_model):
    out = tiny_model("qwen2", "f32")
    with pytest.raises(KtransError, match="--device cpu"):
        ModelRunner(model_path=str(out), gguf_path=str(out / "model.gguf"), device="cuda", progress=False)


def test_bad_device_and_cache_size(tiny_model):
    out = tiny_model("qwen2", "f32")
    with pytest.raises(KtransError, match="expected cpu, cuda or cuda:N"):
        ModelRunner(model_path=str(out), device="tpu", progress=False)
    with pytest.raises(KtransError, match="at least one page"):
        ModelRunner(model_path=str(out), device="cpu", cache_lens=8, page_size=64, progress=False)


def test_missing_weights_named(tmp_path):
    with pytest.raises(KtransError, match="does not exist"):
        ModelRunner(model_path=str(tmp_path / "nope"), device="cpu", progress=False)
