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


def test_operator_weight_of_wrong_shape_is_named():
    from ktrans.operators.attention_gqa import GQAAttention
    from tests.operators.hf_tiny import StateDictSource, tiny_hf_model

    config, model = tiny_hf_model("qwen2")
    state = dict(model.state_dict())
    state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, config.hidden_size)
    op = GQAAttention(key="model.layers.0.self_attn", orig_module=model.model.layers[0].self_attn,
                      config=config, device="cpu")
    with pytest.raises(KtransError, match=r"k_proj.weight' has shape \[3, 64\]"):
        op.load_weights(StateDictSource(state))


def test_token_id_outside_vocab_is_a_ktrans_error(tiny_model):
    from ktrans.engine.batch import ForwardBatch

    out = tiny_model("qwen2", "f32")
    runner = ModelRunner(model_path=str(out), gguf_path=str(out / "model.gguf"), device="cpu",
                         cache_lens=64, page_size=16, progress=False)
    vocab = runner.config.vocab_size
    batch = ForwardBatch(input_ids=torch.tensor([1, vocab]), positions=torch.arange(2), seq_ids=[0],
                         num_computed=[0], num_new=[2], page_table=torch.tensor([[0]], dtype=torch.int32),
                         logits_indices=torch.tensor([1]))
    with pytest.raises(KtransError, match=f"token ids must lie in \\[0, {vocab}\\)"):
        runner.execute(batch)


@pytest.mark.parametrize("arch,cut", [("qwen3_next", "blk.2.ssm_a"), ("qwen3_next", "blk.0.attn_gate.weight"),
                                      ("qwen3_5_moe", "blk.0.ssm_conv1d.weight"),
                                      ("qwen3_5_moe", "blk.2.ssm_alpha.weight")])
def test_gguf_missing_a_deltanet_tensor_is_named(tiny_model, tmp_path, arch, cut):
    """A Qwen3-Next / Qwen3.5 file without one of a linear-attention layer's tensors: one error
    naming the parameter and the GGUF tensor it needs."""
    import gguf
    import numpy as np

    from tests.unit.gguf_testutil import write_gguf

    out = tiny_model(arch, "f32")
    r = gguf.GGUFReader(str(out / "model.gguf"))
    keep = {t.name: np.asarray(t.data).reshape(tuple(int(d) for d in reversed(t.shape))) for t in r.tensors
            if t.name != cut}
    assert len(keep) == len(r.tensors) - 1
    a = r.fields["general.architecture"].contents()
    path = write_gguf(tmp_path / "cut.gguf", keep, arch=a, metadata={f"{a}.block_count": 4})
    with pytest.raises(KtransError, match=rf"cut.gguf: parameter 'model\.layers\.\d\.linear_attn\.\w+(\.weight)?' "
                                          rf"needs GGUF tensor\(s\) {cut.replace('.', chr(92) + '.')}, which the file"):
        ModelRunner(model_path=str(out), gguf_path=str(path), device="cpu", cache_lens=64, page_size=16,
                    progress=False)


def test_linear_attention_left_to_transformers_is_refused(tiny_model, tmp_path):
    """transformers' own Gated DeltaNet module starts every call from zero state: a rule file that
    keeps it is refused, naming the layer and the operator to use."""
    out = tiny_model("qwen3_next", "f32")
    rules = tmp_path / "rules.yaml"
    rules.write_text("- match: {name: '\\.self_attn$'}\n  replace: {class: gqa_attention}\n  recursive: false\n")
    with pytest.raises(KtransError, match=r"model.layers.0.linear_attn is Qwen3NextGatedDeltaNet, which keeps no "
                                          r"recurrent state between engine steps; .*\{class: gated_deltanet\}"):
        ModelRunner(model_path=str(out), gguf_path=str(out / "model.gguf"), device="cpu",
                    optimize_config_path=str(rules), cache_lens=64, page_size=16, progress=False)
