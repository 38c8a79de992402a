"""`linear` operator vs torch.nn.Linear on the same weights (with and without bias), and the
errors and byte plan it reports."""

from __future__ import annotations

import pytest
import torch

from ktrans.errors import KtransError
from ktrans.operators.linear import Linear, resolve_dtype
from tests.operators.hf_tiny import StateDictSource
from tests.tolerances import F32_ATOL, F32_RTOL


@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_torch(bias):
    ref = torch.nn.Linear(48, 40, bias=bias)
    source = StateDictSource({f"model.x.{k}": v for k, v in ref.state_dict().items()})
    with torch.device("meta"):
        meta = torch.nn.Linear(48, 40, bias=bias)
    op = Linear(key="model.x", orig_module=meta, config=None, device="cpu")
    op.load_weights(source)
    x = torch.randn(7, 48)
    with torch.no_grad():
        want = ref(x)
    torch.testing.assert_close(op(x), want, rtol=F32_RTOL, atol=F32_ATOL)
    torch.testing.assert_close(op.forward_native(x), want, rtol=F32_RTOL, atol=F32_ATOL)
    planned = Linear.planned_bytes(key="model.x", orig_module=meta, config=None, device="cpu",
                                   kwargs={"dtype": "bf16"}, weights=source)
    assert planned == {"cpu": 2 * (48 * 40 + (40 if bias else 0))}


def test_linear_rejects_other_modules_and_dtypes():
    with pytest.raises(KtransError, match="replaces torch.nn.Linear"):
        Linear(key="model.norm", orig_module=torch.nn.LayerNorm(4), config=None, device="cpu")
    with pytest.raises(KtransError, match="dtype 'int3'"):
        resolve_dtype("int3", torch.device("cpu"))
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.bfloat16
