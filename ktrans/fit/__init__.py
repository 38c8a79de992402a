"""Fit a model to the machine: measure the machine once, then decide where each part goes.

    probe.py        `ktrans probe`: the machine's facts and measured rates (profile.py caches them)
    model_bytes.py  what each part of a model costs on each device, from the rule planner
    placement.py    the decision, a pure function of (model bytes, profile): GPU layers, KV cache,
                    hot or whole-layer experts in spare VRAM, the refusal with numbers
    numa.py         replicate or split the CPU experts across NUMA nodes
    prefill.py      from which chunk size streaming experts to the GPU beats the CPU
    rulegen.py      the decision as an ordinary rule file
    fit.py          the steps together (fit_rules) and the check every load goes through
    counts.py       expert activation counts (serving, calibrate.py's built-in text)
    load.py         --fit for the commands that load a model and for `rules explain --fit`
"""
