"""Mutations for tools/mutation_check.py: with KTRANS_MUTATION=<name> in the environment and this
folder on PYTHONPATH, every Python process (the pytest run and whatever it starts: the server
thread, local_chat, CLIs) gets one part of ktrans disabled as soon as its module is imported.
Without KTRANS_MUTATION nothing happens.

  abort         LLMEngine.abort does nothing (no request is ever stopped early, no pages freed)
  prefix_cache  PagePool.attach_prefix never reuses a cached page
  stop_strings  the detokenizer never finds a stop string
  routing_bias  DeepSeek-V3 routing ignores e_score_correction_bias
  state_commit  a recurrent-state slot is read and written in one row (no commit after a step)
"""

from __future__ import annotations

import importlib.abc
import os
import sys


def _abort(module):
    def abort(self, request_id):
        return None
    module.LLMEngine.abort = abort
    return abort


def _prefix_cache(module):
    def attach_prefix(self, owner, token_ids):
        return 0
    module.PagePool.attach_prefix = attach_prefix
    return attach_prefix


def _stop_strings(module):
    def _find_stop(self):
        return None
    module.IncrementalDetokenizer._find_stop = _find_stop
    return _find_stop


def _routing_bias(module):
    import torch

    original = module.route_deepseek_v3

    def route_deepseek_v3(logits, bias, **kwargs):
        return original(logits, torch.zeros_like(bias), **kwargs)
    module.route_deepseek_v3 = route_deepseek_v3
    return route_deepseek_v3


def _state_commit(module):
    def rows(self, owner):
        slot = self._slot[owner]
        return 2 * slot, 2 * slot
    module.StatePool.rows = rows
    return rows


# name -> what is disabled (for reports)
DESCRIPTIONS = {
    "abort": "LLMEngine.abort does nothing",
    "prefix_cache": "PagePool.attach_prefix never reuses a cached page",
    "stop_strings": "IncrementalDetokenizer never finds a stop string",
    "routing_bias": "DeepSeek-V3 routing ignores e_score_correction_bias",
    "state_commit": "recurrent states are updated in place, a failed step's partial update kept",
}
# name -> (module to patch, patch function)
MUTATIONS = {
    "abort": ("ktrans.engine.llm_engine", _abort),
    "prefix_cache": ("ktrans.kv_cache.page_pool", _prefix_cache),
    "stop_strings": ("ktrans.engine.detokenizer", _stop_strings),
    "routing_bias": ("ktrans.operators.moe_block", _routing_bias),
    "state_commit": ("ktrans.kv_cache.state", _state_commit),
}


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds `target` with the other finders and patches the module right after it executes."""

    def __init__(self, target: str, patch):
        self.target, self.patch = target, patch

    def find_spec(self, name, path, target=None):
        if name != self.target:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            self.patch(module).__ktrans_mutation__ = os.environ["KTRANS_MUTATION"]
        spec.loader.exec_module = exec_module
        return spec


def _install() -> None:
    name = os.environ.get("KTRANS_MUTATION")
    if not name:
        return
    if name not in MUTATIONS:
        raise SystemExit(f"KTRANS_MUTATION={name!r} is not one of {', '.join(MUTATIONS)}")
    target, patch = MUTATIONS[name]
    if target in sys.modules:
        patch(sys.modules[target]).__ktrans_mutation__ = name
    else:
        sys.meta_path.insert(0, _PatchOnImport(target, patch))


_install()
