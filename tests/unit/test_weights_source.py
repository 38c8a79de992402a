"""WeightSource basics: raw_to_torch for every plain stored type (never aliasing a view), the
threaded copy, open_weights' choice and errors, the progress bar and summary line."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from rich.console import Console

from gguf_testutil import write_gguf
from ktrans.errors import KtransError
from ktrans.weights import open_weights
from ktrans.weights.progress import LoadProgress, human_bytes
from ktrans.weights.source import RawTensor, copy_bytes, raw_to_torch
from tests.seeds import np_rng


@pytest.mark.parametrize("dtype,qtype", [(torch.float32, "f32"), (torch.float16, "f16"), (torch.bfloat16, "bf16"),
                                         (torch.float8_e4m3fn, "f8_e4m3")])
def test_raw_to_torch_plain_types(dtype, qtype):
    x = torch.randn(3, 5, 8).to(dtype)
    view = x.reshape(-1).view(torch.uint8).numpy()          # shares memory with x
    t = raw_to_torch(RawTensor(qtype, (3, 5, 8), view))
    assert t.dtype == dtype and t.shape == x.shape and torch.equal(t.view(torch.uint8), x.view(torch.uint8))
    t.view(torch.uint8).zero_()                              # the result is a copy, never the view
    assert x.view(torch.uint8).any()
    owned = view.copy()                                      # an owned array is taken over
    assert np.shares_memory(raw_to_torch(RawTensor(qtype, (3, 5, 8), owned)).view(torch.uint8).numpy(), owned)
    with pytest.raises(KtransError, match=r"layer 1: f32 data has 4 bytes, expected 8 for shape \[2\]"):
        raw_to_torch(RawTensor("f32", (2,), np.zeros(4, np.uint8)), where="layer 1")


def test_copy_bytes_threaded():
    src = np_rng().integers(0, 255, (80 << 20) + 123, dtype=np.uint8)  # several 32 MiB chunks
    out = copy_bytes(src)
    assert out.flags.owndata and not np.shares_memory(out, src) and np.array_equal(out, src)


def test_open_weights_choice_and_errors(tmp_path):
    with pytest.raises(KtransError, match="no weights given"):
        open_weights(None, None)
    with pytest.raises(KtransError, match="does not exist"):
        open_weights(str(tmp_path / "absent"), None)
    write_gguf(tmp_path / "m.gguf", {"token_embd.weight": np.zeros((4, 32))}, metadata={"qwen2.block_count": 1})
    with pytest.raises(KtransError, match="is not a directory"):
        open_weights(str(tmp_path / "m.gguf"), str(tmp_path / "m.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(KtransError, match="holds no .safetensors files"):
        open_weights(str(tmp_path / "empty"), None)


def test_progress_bar_and_summary():
    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=True)
    with LoadProgress(total_bytes=3000, console=console, show_after_s=0.0) as p:
        p.record(1000, "cpu")
        p.record(2000, "cuda:0")
        assert p._bar is not None                           # shown once the threshold has passed
    text = out.getvalue()
    assert "loaded 2 tensors, 3.0 KB in" in text and "CPU RAM 1.0 KB, cuda:0 2.0 KB" in text
    assert [human_bytes(n) for n in (999, 1500, 2.5e9, 7e12)] == ["999 B", "1.5 KB", "2.5 GB", "7.0 TB"]
    quiet = io.StringIO()
    with LoadProgress(console=Console(file=quiet)) as p:    # fast load: no bar, just the summary
        p.record(10)
    assert p._bar is None and quiet.getvalue().startswith("loaded 1 tensors, 10 B")
