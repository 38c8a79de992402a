"""ModelRunner: builds the model once and runs one packed ForwardBatch per engine step.

Build (meta → swap → load):
  weights (GGUF / safetensors) → config (HF directory, or single-file GGUF metadata)
  → transformers' model class on the meta device → rule plan (which operator, which device)
  → apply: operators swapped in, every tensor loaded where the plan put it
  → paged KV storage on the attention device, sized by cache_lens (and, for models with
    linear-attention layers, recurrent-state rows for the requests the engine runs at once:
    `reserve_states`).
Run: `execute(batch)` sets the forward context (batch + KV) and runs the packed model forward;
it returns float32 logits for the rows the scheduler asked for. On CUDA, decode-only steps
replay CUDA graphs (ktrans.engine.cuda_graphs) where the placement allows it.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
from pathlib import Path

import torch

from ktrans.config.arch import arch_from_config, build_meta_model, text_model_config
from ktrans.engine.batch import ForwardBatch, forward_context
from ktrans.errors import KtransError
from ktrans.kv_cache.storage import KVStorage
from ktrans.operators.model import forward_packed, module_placement

DEFAULT_PAGE_SIZE = 64
log = logging.getLogger("ktrans.engine")


def rules_dir() -> Path:
    """Where the shipped rule files are: inside the installed package, else the source tree."""
    pkg = Path(__file__).resolve().parent.parent
    for d in (pkg / "optimize_rules", pkg.parent / "optimize_rules"):
        if d.is_dir():
            return d
    raise KtransError(f"no optimize_rules directory next to the ktrans package ({pkg}); pass --optimize_config_path")


def default_rule_file(arch_name: str, device: str = "cuda") -> Path:
    """The shipped rule file for an architecture: with `--device cpu` its all-CPU variant
    (`<arch>-cpu.yaml`: dense weights and experts in the CPU kernels), else the default one
    (experts on the CPU, the rest on the GPU)."""
    if device == "cpu" and (rules_dir() / f"{arch_name}-cpu.yaml").is_file():
        return rules_dir() / f"{arch_name}-cpu.yaml"
    path = rules_dir() / f"{arch_name}.yaml"
    if not path.is_file():
        raise KtransError(f"no shipped rule file for architecture '{arch_name}' ({path}); pass --optimize_config_path")
    return path


def _load_config(weights, model_path):
    config = weights.config()
    if config is None and model_path and os.path.isdir(model_path):
        from transformers import AutoConfig

        config = text_model_config(AutoConfig.from_pretrained(model_path))
    if config is None:
        raise KtransError("the weights carry no model config; pass --model_path with the HF config.json directory")
    return config


def _load_tokenizer(weights, model_path):
    tok = weights.tokenizer()
    if tok is None and model_path and os.path.isdir(model_path):
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(model_path)
        except (OSError, ValueError):
            tok = None
    return tok


def _check_device(device: str) -> str:
    device = str(device).lower()
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise KtransError(f"--device '{device}': expected cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise KtransError(f"--device {device}: no CUDA GPU is visible to torch; "
                          f"use --device cpu to run everything on the CPU")
    return device


class ModelRunner:
    """One model, built from weights + rules, executing packed batches over a paged KV cache."""

    def __init__(self, *, model_path=None, gguf_path=None, optimize_config_path=None, device="cuda",
                 cpu_infer=None, cache_lens=4096, page_size=DEFAULT_PAGE_SIZE, trust_rules=False,
                 progress=True, dtype=None, cuda_graphs=True, fused_decode=True):
        from ktrans.fit.fit import check_plan_fits
        from ktrans.rules.apply import apply_plan
        from ktrans.rules.plan import plan_model
        from ktrans.rules.schema import load_rules
        from ktrans.weights.source import open_weights

        self.device = _check_device(device)
        if int(page_size) <= 0 or int(cache_lens) < int(page_size):
            raise KtransError(f"--cache_lens {cache_lens} must be at least one page ({page_size} tokens)")
        self.weights = open_weights(model_path, gguf_path)
        self.config = _load_config(self.weights, model_path)
        self.arch = arch_from_config(self.config)
        self._model_path = model_path
        self._tokenizer = None       # built on first use: a big vocabulary takes longer than the weights
        self.rule_file = str(optimize_config_path or default_rule_file(self.arch.name, self.device))
        rules = load_rules(self.rule_file, trust_rules=trust_rules)
        model = build_meta_model(self.config)
        plan = plan_model(model, rules, config=self.config, weights=self.weights,
                          default_device="cpu" if self.device == "cpu" else self.device,
                          device_map="cpu" if self.device == "cpu" else None, dtype=dtype)
        plan.entries = [_with_cpu_infer(e, cpu_infer) for e in plan.entries]
        # Refused here, before any weight is read, rather than by an out-of-memory mid-load.
        check_plan_fits(plan, cache_lens=int(cache_lens), page_size=int(page_size),
                        what=os.path.basename(str(gguf_path or model_path).rstrip("/")))
        self.plan = plan
        with self.weights.loading(enabled=progress):
            self.model = apply_plan(model, plan, self.weights).eval()
        self.rotary = self.model.model.rotary_emb
        self.page_size = int(page_size)
        self.num_pages = -(-int(cache_lens) // self.page_size)
        self.kv = self._make_kv()
        self.kv.reserve_states(1)    # (the engine reserves one slot per batch slot: reserve_states)
        self.graphs = self._make_graphs() if cuda_graphs and self.device.startswith("cuda") else None
        self.max_context = min(self.num_pages * self.page_size,
                               int(getattr(self.config, "max_position_embeddings", 1 << 30)))
        # Every part in the CPU kernels: decode-only steps run as one fused C++ call.
        self.cpu_step = None
        if fused_decode and self.device == "cpu":
            from ktrans.operators.cpu_decode import CpuDecodeStep

            self.cpu_step = CpuDecodeStep.build(self.model, self.kv, self.rotary)
        # All on the CPU: the CPU experts' pool keeps a thread on every core, and torch's OpenMP
        # threads, spinning between the many small ops of a decode step, fight it for the cores
        # (decode measured 1.7-4x slower with torch's default threads). Decode-only steps run
        # torch on one thread, prefill steps on all while torch does their large matmuls; with
        # every matmul in ktrans's kernels (cpu_step built) torch keeps one thread for every step
        # (prefill measured 4x faster so: 2 cores, qwen3_moe small, 512 tokens). OMP_NUM_THREADS
        # set by the user leaves torch's threads alone.
        self._torch_threads = torch.get_num_threads()
        self._prefill_threads = 1 if self.cpu_step is not None else self._torch_threads
        self._switch_threads = (self.device == "cpu" and self._torch_threads > 1
                                and "OMP_NUM_THREADS" not in os.environ)
        # NOTE: the model's many long-lived objects would otherwise be traversed by every cyclic
        # collection the per-step allocations trigger (measured 6 % of an all-CPU decode step).
        gc.freeze()

    @property
    def tokenizer(self):
        """transformers tokenizer from the weights (GGUF metadata) or --model_path, or None."""
        if self._tokenizer is None:
            self._tokenizer = _load_tokenizer(self.weights, self._model_path)
        return self._tokenizer

    def _make_kv(self) -> KVStorage:
        """KV pool: each layer's pages (or a linear-attention layer's state rows) on the device and
        in the dtype of that layer's attention, plus one scratch page that the page pool never hands
        out (CUDA-graph padding rows)."""
        attns = [getattr(layer, "self_attn", None) or _stateful(i, layer.linear_attn)
                 for i, layer in enumerate(self.model.model.layers)]
        devices = [module_placement(a)[0] for a in attns]
        dtypes = [getattr(a, "dtype", module_placement(a)[1]) for a in attns]
        return KVStorage.for_config(self.config, num_pages=self.num_pages + 1, page_size=self.page_size,
                                    dtype=dtypes[0], device=devices[0], layer_devices=devices,
                                    layer_dtypes=dtypes)

    def _make_graphs(self):
        from ktrans.engine.cuda_graphs import DecodeGraphs

        graphs = DecodeGraphs(self.model, self.rotary, self.kv, num_pages=self.num_pages, page_size=self.page_size)
        if not graphs.enabled:
            log.info("decode steps run eagerly (no CUDA graphs): %s", graphs.reason)
        return graphs

    def reserve_states(self, num_slots: int) -> int:
        """Recurrent-state rows for `num_slots` requests at once (kv_cache/state.py), in models with
        linear-attention layers; returns the slots held (0: the model has no such layer). Call it
        while no request runs."""
        if not self.kv.recurrent_layers:
            return 0
        rows = self.kv.num_state_rows
        self.kv.reserve_states(num_slots)
        if self.kv.num_state_rows != rows and self.graphs is not None:
            self.graphs.invalidate()           # they read the state tensors just replaced
        return (self.kv.num_state_rows - 1) // 2

    @torch.inference_mode()
    def execute(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits [len(batch.logits_indices), vocab] float32 for one engine step."""
        ids = batch.input_ids
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise KtransError(f"token ids must lie in [0, {self.config.vocab_size}) for this model, "
                              f"got {int(ids.min())}..{int(ids.max())}")
        if self.cpu_step is not None and self.cpu_step.handles(batch):
            return self.cpu_step(batch)
        if self._switch_threads:
            want = 1 if batch.num_tokens == batch.num_reqs else self._prefill_threads  # decode only: 1
            if torch.get_num_threads() != want:
                torch.set_num_threads(want)
        logits = None
        if self.graphs is not None and self.graphs.can_run(batch):
            batch.validate(self.page_size)
            logits = self.graphs.run(batch)
        if logits is None:
            with forward_context(batch, self.kv) as ctx:
                logits = forward_packed(self.model, self.rotary, ctx)
        if logits.is_cuda:
            _sleep_until_done(logits.device)
        return logits

    @torch.inference_mode()
    def warm_up(self) -> None:
        """On CUDA, run a prefill of each matmul tile class (> 64, 17-64 tokens) and a decode step
        over free KV pages, so that Triton compiles its kernels (and caches them on disk for later
        processes) and the batch-1 decode graph is captured before the first request, not during
        it. Call it only while no request holds pages."""
        if not self.device.startswith("cuda"):
            return
        pages = torch.arange(min(self.num_pages, -(-130 // self.page_size)), dtype=torch.int32)[None]
        scratch = torch.full((1, 2), self.kv.num_state_rows - 1)      # recurrent layers: the scratch row
        done = 0
        for n in (100, 28, 1):
            if done + n > pages.shape[1] * self.page_size:
                break
            self.execute(ForwardBatch(input_ids=torch.zeros(n, dtype=torch.long),
                                      positions=torch.arange(done, done + n), seq_ids=[0], num_computed=[done], num_new=[n], page_table=pages,
                                      logits_indices=torch.tensor([n - 1]), state_rows=scratch))
            done += n
        torch.cuda.synchronize()

    def close(self) -> None:
        if self._switch_threads:
            torch.set_num_threads(self._torch_threads)
        self.weights.close()


def _stateful(i: int, module: torch.nn.Module) -> torch.nn.Module:
    """A linear-attention layer's module, which must keep its state in the KV cache's state rows
    (transformers' own module would start every engine step from zero)."""
    from ktrans.operators.gated_deltanet import GatedDeltaNet

    if not isinstance(module, GatedDeltaNet):
        raise KtransError(f"model.layers.{i}.linear_attn is {type(module).__name__}, which keeps no recurrent state "
                          f"between engine steps; place it with a rule `replace: {{class: gated_deltanet}}`")
    return module


def _sleep_until_done(device: torch.device) -> None:
    """Wait for the step's GPU work with the thread asleep. NOTE: CUDA's default wait spins the
    calling thread, and during a step with CPU experts that spinning thread takes a core from the
    experts' pool (which keeps a thread on every core but one); a blocking-sync event makes the
    wait a sleep. The caller's next read of the logits then finds them ready."""
    done = torch.cuda.Event(blocking=True)
    done.record(torch.cuda.current_stream(device))
    done.synchronize()


def _with_cpu_infer(entry, cpu_infer):
    """--cpu_infer sets the thread count of every operator that takes `cpu_infer` (the CPU
    experts) unless its rule already chose one."""
    cls = entry.rule.op_class if entry.rule is not None else None
    if cpu_infer is None or cls is None or "cpu_infer" not in cls.accepted_kwargs() or "cpu_infer" in entry.kwargs:
        return entry
    return dataclasses.replace(entry, kwargs={**entry.kwargs, "cpu_infer": int(cpu_infer)})
