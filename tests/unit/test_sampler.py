"""Sampler against transformers' own logits processors, plus greedy, seeds and the empirical
distribution of draws."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ktrans.engine.request import Request, SamplingParams
from ktrans.engine.sampler import Sampler, apply_penalties, filter_logits, make_generator
from ktrans.errors import KtransError
from tests.seeds import py_rng


def _request(params, prompt, output=()):
    r = Request("r", list(prompt), params.validate())
    r.output_token_ids = list(output)
    r.generator = make_generator(params)
    return r


def _hf_filter(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    x = row[None]
    warpers = [TemperatureLogitsWarper(p.temperature)]
    if p.top_k > 0:
        warpers.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        warpers.append(TopPLogitsWarper(p.top_p))
    if p.min_p > 0:
        warpers.append(MinPLogitsWarper(p.min_p))
    for w in warpers:
        x = w(None, x)
    return x[0]


@pytest.mark.parametrize("V,scale", [(257, 3.0), (1000, 1.0), (5000, 8.0), (5000, 0.1)])
def test_filters_match_transformers(V, scale):
    # 5000 x 8: peaked, top-p found among the best 1024 candidates; 5000 x 0.1: flat, full sort.
    rng = py_rng()
    params = [SamplingParams(temperature=rng.uniform(0.2, 2.0), top_k=rng.choice([0, 1, 5, 40, 2000]),
                             top_p=rng.choice([1.0, 0.9, 0.5, 0.05]), min_p=rng.choice([0.0, 0.05, 0.3]))
              for _ in range(12)]
    logits = torch.randn(len(params), V) * scale
    ours = filter_logits(logits, params)
    for i, p in enumerate(params):
        ref = _hf_filter(logits[i], p)
        assert torch.equal(torch.isinf(ours[i]), torch.isinf(ref)), p
        keep = ~torch.isinf(ref)
        torch.testing.assert_close(ours[i][keep], ref[keep])


def test_penalties_match_references():
    V = 300
    prompt = torch.randint(0, V, (40,)).tolist()
    output = torch.randint(0, V, (25,)).tolist()
    p = SamplingParams(repetition_penalty=1.3, presence_penalty=0.7, frequency_penalty=-0.4)
    logits = torch.randn(2, V) * 2
    plain = _request(SamplingParams(), prompt, output)
    ours = apply_penalties(logits, [plain, _request(p, prompt, output)])
    assert torch.equal(ours[0], logits[0])                      # no penalties: untouched
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([prompt + output]), logits[1:2].clone())[0]
    counts = torch.bincount(torch.tensor(output), minlength=V).float()
    # OpenAI's definition: mu -= c * frequency_penalty + (c > 0) * presence_penalty
    ref = ref - counts * p.frequency_penalty - (counts > 0).float() * p.presence_penalty
    torch.testing.assert_close(ours[1], ref)


def test_greedy_is_argmax_after_penalties():
    V = 64
    logits = torch.randn(3, V)
    logits[:, 7] = 10.0
    logits[:, 9] = 9.0
    greedy = SamplingParams(temperature=0)
    penalised = SamplingParams(temperature=0, repetition_penalty=2.0)
    reqs = [_request(greedy, [1, 2]), _request(penalised, [7]), _request(penalised, [3])]
    assert Sampler()(logits, reqs) == [7, 9, 7]


def test_seed_reproduces_and_draws_stay_in_the_kept_set():
    V = 100
    logits = torch.randn(1, V) * 2
    p = SamplingParams(temperature=0.8, top_k=5, seed=1234)
    draws = [[Sampler()(logits, [r])[0] for _ in range(50)] for r in (_request(p, [1]), _request(p, [1]))]
    assert draws[0] == draws[1]
    assert set(draws[0]) <= set(logits[0].topk(5).indices.tolist())
    other = _request(SamplingParams(temperature=0.8, top_k=5, seed=99), [1])
    assert [Sampler()(logits, [other])[0] for _ in range(50)] != draws[0]


def test_draw_frequencies_follow_the_distribution():
    V, N = 6, 4000
    logits = torch.randn(1, V)
    p = SamplingParams(temperature=0.7, seed=None)
    req = _request(p, [0])
    counts = torch.zeros(V)
    sampler = Sampler()
    for _ in range(N):
        counts[sampler(logits, [req])[0]] += 1
    probs = (logits[0] / 0.7).softmax(-1)
    sigma = (probs * (1 - probs) / N).sqrt()
    assert ((counts / N - probs).abs() <= 5 * sigma + 1e-3).all(), (counts / N, probs)


@pytest.mark.gpu
def test_cuda_logits_filter_and_draw_like_cpu():
    V = 5000
    params = [SamplingParams(temperature=0.7, top_k=50, top_p=0.9, min_p=0.02, seed=7),
              SamplingParams(temperature=0, repetition_penalty=1.2), SamplingParams(temperature=1.3, seed=3)]
    logits = torch.randn(len(params), V) * 3
    ref = filter_logits(logits, params)
    got = filter_logits(logits.cuda(), params).cpu()
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    torch.testing.assert_close(got[~torch.isinf(ref)], ref[~torch.isinf(ref)])
    on = {}
    for dev in ("cpu", "cuda"):
        reqs = [_request(p, [1, 2, 3]) for p in params]
        on[dev] = [Sampler()(logits.to(dev), reqs) for _ in range(20)]
    assert on["cpu"] == on["cuda"]                              # the draw itself runs on the CPU


@pytest.mark.parametrize("field,value", [("temperature", -1.0), ("top_p", 0.0), ("top_k", -2),
                                         ("min_p", 1.5), ("repetition_penalty", 0.0),
                                         ("presence_penalty", 3.0), ("max_new_tokens", 0),
                                         ("stop", ["ok", ""]), ("seed", 1.5),
                                         ("temperature", math.nan)])
def test_validate_names_the_parameter(field, value):
    with pytest.raises(KtransError, match=field):
        SamplingParams(**{field: value}).validate()
