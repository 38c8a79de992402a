"""`ktrans probe --experts MODEL`: run a model over a built-in text and save how often its router
chose each expert (ktrans.fit.counts), so that --fit can put the most used ones on the GPU before
any serving has been counted.

The text mixes the kinds of input a chat model sees (prose, dialogue, code, arithmetic, a list,
another language): routers specialise by token kind, and one genre alone would favour its own
experts. It is a starting point; counts gathered while serving are added to the same file.
"""

from __future__ import annotations

import os

CALIBRATION_TEXT = """\
The river had frozen early that year, and the children of the valley skated from the mill to the
old stone bridge before the sun was fully up. Their grandmother watched from the window, counting
them twice, as she always did, because one of them was forever wandering off toward the reeds.

User: Can you explain why the sky is blue?
Assistant: Sunlight contains every colour. Air molecules scatter short wavelengths, such as blue,
much more strongly than long ones, such as red, so blue light reaches your eyes from every part of
the sky. At sunset the light crosses more air, the blue is scattered away, and reds remain.

def merge_sorted(a: list[int], b: list[int]) -> list[int]:
    \"\"\"Merge two sorted lists in linear time.\"\"\"
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        if a[i] <= b[j]:
            out.append(a[i]); i += 1
        else:
            out.append(b[j]); j += 1
    return out + a[i:] + b[j:]

SELECT customer_id, SUM(amount) AS total FROM orders WHERE created_at >= '2024-01-01'
GROUP BY customer_id HAVING SUM(amount) > 1000 ORDER BY total DESC LIMIT 10;

Problem: a train leaves at 09:40 and travels 276 km at an average of 92 km/h. When does it arrive?
Solution: 276 / 92 = 3 hours, so it arrives at 12:40. Check: 92 * 3 = 276. If it stops twice for
7 minutes each, it arrives at 12:54. The integral of 2x from 0 to 3 is 9, and sqrt(144) = 12.

Shopping list: 2 kg flour, 12 eggs, butter, sea salt, dark chocolate (70%), vanilla, oranges.
1. Preheat the oven to 180 °C. 2. Whisk the eggs with the sugar until pale. 3. Fold in the flour.

机器学习是人工智能的一个分支，它使计算机能够从数据中学习，而无需进行明确的编程。
Les modèles de langage prédisent le mot suivant à partir du contexte; ils apprennent la grammaire,
des faits et un peu de raisonnement à partir de très grandes quantités de texte.

In 1869 Dmitri Mendeleev arranged the known elements by atomic weight and left gaps for elements
not yet discovered; gallium, scandium and germanium later filled them with the predicted properties.
<think>The user wants a summary. First list the main points, then check the dates, then answer.</think>
{"name": "get_weather", "arguments": {"city": "Lisbon", "unit": "celsius", "days": 3}}
"""


def model_flags(model: str, model_path: str | None) -> tuple[str | None, str | None]:
    """(model_path, gguf_path) for MODEL: an HF directory without GGUF files is a model_path."""
    from ktrans.errors import UsageError

    if not os.path.exists(model):
        raise UsageError(f"--experts {model}: no such file or directory")
    if os.path.isdir(model) and not any(f.endswith(".gguf") for f in os.listdir(model)):
        return model, None
    return model_path, model


def calibrate_experts(model: str, *, model_path: str | None = None, device: str = "auto", say=print,
                      max_new_tokens: int = 8) -> dict[int, list[int]]:
    """Run MODEL over CALIBRATION_TEXT (greedy, a few tokens generated) and add the expert counts
    to its count file; returns the counts of this run."""
    from ktrans.cli.generate import run_request
    from ktrans.cli.model_args import resolve_device
    from ktrans.engine import LLMEngine
    from ktrans.engine.request import SamplingParams
    from ktrans.errors import KtransError
    from ktrans.fit import counts

    mpath, gpath = model_flags(model, model_path)
    device = resolve_device(device)
    kw = dict(model_path=mpath, gguf_path=gpath, device=device, cache_lens=4096, progress=False)
    if device.startswith("cuda"):
        from ktrans.fit.load import fit_for_load

        kw["optimize_config_path"] = str(fit_for_load(model_path=mpath, gguf_path=gpath, device=device,
                                                      cache_lens=4096, page_size=64, chunk_size=512,
                                                      gpu_memory=None, say=say).path)
    engine = LLMEngine.from_args(chunk_size=512, **kw)
    if engine.tokenizer is None:
        raise KtransError(f"{model}: the model has no tokenizer to encode the calibration text")
    ids = engine.tokenizer.encode(CALIBRATION_TEXT)[: engine.max_context - max_new_tokens - 1]
    counts.collect(engine.runner.model)                   # drop what the warm-up counted
    run_request(engine, ids, SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens), request_id="calibrate")
    got = counts.collect(engine.runner.model)
    engine.runner.close()
    if not got:
        raise KtransError(f"{model}: no MoE layer counted anything (a dense model has no experts to place)")
    mid = counts.model_id(mpath, gpath)
    path = counts.save(mid, got, "calibration")
    say(f"Expert counts of {len(ids)} calibration tokens in {len(got)} MoE layers added to {path}")
    return got
