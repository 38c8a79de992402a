#!/usr/bin/env bash
# One session on the accelerator machine (no package index there): set up ktrans from this
# tree, then run the steps named on the command line, each under its own time limit, logging
# everything under $OUT and printing a short summary last.
#
#   bash bench/accel.sh setup gputests e2e-v2 e2e-qwen3 peer-v2 ...
#
# Steps:
#   setup       unpack the carried wheels (.dev-carry, from ../shared/tools/device-wheels.sh) and
#               build the C++ extension (editable install, no dependencies fetched)
#   gputests    pytest -m gpu over tests/ (server tests excluded: their client needs packages
#               the machine lacks) plus the Triton kernel tests
#   e2e-v2      bench/e2e.py, deepseek-v2-lite q4_k_m: CUDA graphs on and off, batch 1 and 4
#   e2e-qwen3   the same for qwen3-30b-a3b
#   spin-v2     deepseek-v2-lite graph decode with the experts' threads spinning 1 ms between layers
#               (KTRANS_SPIN_US=1000) instead of the default 200 us q4_k_m
#   prof-v2     bench/profile_decode.py on deepseek-v2-lite (trace gzipped under $OUT)
#   prof-qwen3  the same for qwen3-30b-a3b
#   llama       build llama.cpp's CUDA peer from .dev-carry/llama.cpp-src.tgz into /tmp/llama, with
#               .dev-carry/llama-cpp.sh (here, first: `../shared/tools/llama-cpp.sh src .dev-carry;
#               cp ../shared/tools/llama-cpp.sh .dev-carry/`); takes minutes of device time
#   peer-v2     bench/e2e_llamacpp.py --device cuda: llama-bench (-ngl 99 --n-cpu-moe 99) beside
#               ktrans on the same deepseek-v2-lite file, same threads
#   peer-qwen3  the same for qwen3-30b-a3b
#   stream-v2   bench/stream_prefill.py on deepseek-v2-lite: one MoE layer at chunk sizes 128-8192
#               (CPU kernels vs experts streamed to the GPU, measured and profile crossover), and an
#               8K-token prefill in chunks of 512/2048/8192 both ways (run `ktrans probe` first
#               for the auto crossover: step probe)
#   stream-qwen3 the same for qwen3-30b-a3b
#   handoff     bench/handoff.py on deepseek-v2-lite: the stream-ordered GPU->CPU->GPU hand-off per
#               layer (graph replay minus CPU experts minus serial GPU work), default spins, then
#               KTRANS_STREAM_SPIN_US=2000, then KTRANS_SPIN_US=1000, then KTRANS_HANDOFF=memop
#   e2e-memop   bench/e2e.py on deepseek-v2-lite with KTRANS_HANDOFF=memop (graph decode, batch 1/4)
#   qmm         bench/gpu_qmm.py: the stored-GGUF GPU kernels (decode GEMV, prefill tiles) per format on
#               the v2-lite / qwen3 dense shapes, GB/s against the device copy rate and bf16 F.linear
#   probe       ktrans probe (the machine profile gpu_prefill: auto and --fit read)
#   llama-bg    start the llama step in the background, in its own process session, so that it
#               outlives this call on a warm machine; llama-wait waits for it (or builds in the
#               foreground when no build is running and none is there)
#   gen-v2      generate the deepseek-v2-lite q4_k_m model (gen-qwen3: qwen3-30b-a3b) ahead of the
#               steps that read it
#   llama-cpu   build llama.cpp CPU-only (no CUDA: its CUDA build aborts with no GPU visible) into
#               /tmp/llama-cpu, for the all-CPU peer rows
#   cpu-peer-qwen3  all-CPU ktrans beside llama.cpp's CPU-only build (llama-cpu), no GPU visible
#               (CUDA_VISIBLE_DEVICES=), qwen3-30b-a3b q4_k_m, 16 threads each (cpu-peer-v2: deepseek-v2-lite)
#   e2e-pf      deepseek-v2-lite graph decode (batch 1/4, 1024-token prompts) with the dot kernels'
#               software prefetch off (KTRANS_PREFETCH_AHEAD=0) and at its default, same call
#   moe16-pf    bench/moe.py qwen3 q4_k / q6_k at T 1, 4 with the prefetch off, 512 and the default
#   moe16       bench/moe.py on the qwen3 shape, q4_k / q6_k / amx_int8 at T 1, 4, 32, 512, beside
#               kt-kernel where its carried wheel imports (.dev-carry from device-wheels.sh --kt-kernel)
#   flashinfer  bench/attn_decode.py: ktrans's paged MLA decode kernel beside flashinfer's (from the sdist
#               carried as .dev-carry/flashinfer_python-*.tar.gz: `pip download --no-deps --no-build-isolation --no-binary :all:
#               flashinfer-python==0.2.14.post1 -d .dev-carry`; JIT-compiled with nvcc here on first use)
#   e2e-fit     deepseek-v2-lite with the rules `ktrans rules explain --fit` writes for this machine (after
#               probe), beside the shipped gpu-experts and default rule files, batch 1/4, 1024/4096 prompts
#   e2e-ab      deepseek-v2-lite graph decode at batch 1/4/8 and prefill at 1024/4096, the default
#               hand-off and KTRANS_HANDOFF=memop in the same call
# Environment: OUT (default /tmp/out), E2E_EXTRA (more bench/e2e.py flags), LLAMA (llama.cpp
# bin directory; default /tmp/llama/bin; LLAMA_CPU: the CPU-only build, /tmp/llama-cpu/bin), THREADS (CPU threads, default 15).
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
THREADS=${THREADS:-15}
LLAMA=${LLAMA:-/tmp/llama/bin}
LLAMA_CPU=${LLAMA_CPU:-/tmp/llama-cpu/bin}
ROOT=${MODEL_ROOT:-/tmp/bench-models}
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=16
summary() { echo "$*" | tee -a "$OUT/summary.txt"; }
# a warm machine keeps what an earlier call unpacked and built
[ -d /tmp/dev-site ] && export PYTHONPATH=/tmp/dev-site${PYTHONPATH:+:$PYTHONPATH}

step_setup() {
  # shellcheck disable=SC1091
  source .dev-carry/unpack.sh
  python3 -m pip install -q --no-build-isolation --no-deps --no-index -e . >"$OUT/build.log" 2>&1 \
    || { tail -40 "$OUT/build.log"; return 1; }
  python3 -m ktrans info | tee -a "$OUT/summary.txt"
  touch /tmp/ktrans-setup.done
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/summary.txt"
}

step_gputests() {
  python3 -m pytest -q -p no:cacheprovider -m gpu tests --ignore=tests/server -o addopts="-ra" \
    >"$OUT/gputests.log" 2>&1
  tail -25 "$OUT/gputests.log"
  summary "gputests: $(tail -1 "$OUT/gputests.log")"
}

e2e() {  # preset
  python3 bench/e2e.py --preset "$1" --quant q4_k_m --devices cuda --cuda-graphs both --model-root "$ROOT" \
    --prompt-lens 128,1024 --batch-sizes 1,4 --decode-tokens 32 --out "$OUT/e2e.jsonl" ${E2E_EXTRA:-} \
    2>"$OUT/e2e-$1.err" | tee -a "$OUT/e2e.txt"
  tail -5 "$OUT/e2e-$1.err"
}

peer() {  # preset: llama.cpp's CUDA build beside ktrans, hybrid placement, same file and threads
  python3 bench/e2e_llamacpp.py --device cuda --llama-bench "$LLAMA/llama-bench" --preset "$1" --quant q4_k_m \
    --model-root "$ROOT" -t "$THREADS" -p 1024 -n 64 -r 2 --rounds 1 --out "$OUT/peer.jsonl" \
    2>"$OUT/peer-$1.err" | tee -a "$OUT/peer.txt"
  tail -3 "$OUT/peer-$1.err"
}

for s in "$@"; do
  t0=$(date +%s)
  case "$s" in
    setup) step_setup || { summary "setup failed"; exit 1; };;
    setup-once) [ -f /tmp/ktrans-setup.done ] && summary "setup: warm machine, already built" \
        || step_setup || { summary "setup failed"; exit 1; };;
    llama-bg) [ -x "$LLAMA/llama-bench" ] || setsid nohup bash -c "bash .dev-carry/llama-cpp.sh build \
        .dev-carry/llama.cpp-src.tgz /tmp/llama cuda >/tmp/llama-build.log 2>&1; touch /tmp/llama-build.done" \
        >/dev/null 2>&1 < /dev/null &;;
    llama-wait)
      if [ ! -x "$LLAMA/llama-bench" ] && ! pgrep -f "llama-cpp.sh build" >/dev/null; then
        bash .dev-carry/llama-cpp.sh build .dev-carry/llama.cpp-src.tgz /tmp/llama cuda >/tmp/llama-build.log 2>&1
      fi
      while pgrep -f "llama-cpp.sh build" >/dev/null; do sleep 2; done
      cp /tmp/llama-build.log "$OUT/llama-build.log" 2>/dev/null
      [ -x "$LLAMA/llama-bench" ] && summary "llama.cpp: $("$LLAMA/llama-bench" --version 2>&1 | head -1)" \
        || { summary "llama.cpp build failed"; tail -20 /tmp/llama-build.log; };;
    gen-v2|gen-qwen3)
      p=$([ "$s" = gen-v2 ] && echo deepseek-v2-lite || echo qwen3-30b-a3b)
      python3 bench/e2e.py --preset "$p" --quant q4_k_m --model-root "$ROOT" --generate-only 2>&1 | tail -2;;
    cpu-peer-qwen3|cpu-peer-v2)
      p=$([ "$s" = cpu-peer-v2 ] && echo deepseek-v2-lite || echo qwen3-30b-a3b)
      CUDA_VISIBLE_DEVICES= python3 bench/e2e_llamacpp.py --llama-bench "$LLAMA_CPU/llama-bench" --preset "$p" \
        --quant q4_k_m --model-root "$ROOT" -t 16 -p 512 -n 64 -r 2 --rounds 1 --out "$OUT/cpu-peer.jsonl" \
        2>"$OUT/cpu-peer-$p.err" | tee -a "$OUT/peer.txt"
      tail -3 "$OUT/cpu-peer-$p.err";;
    flashinfer)
      fi_sdist=$(ls .dev-carry/flashinfer_python-*.tar.gz 2>/dev/null | head -1)
      if [ -n "$fi_sdist" ] && [ ! -d /tmp/fi/flashinfer ]; then
        mkdir -p /tmp/fi && tar xzf "$fi_sdist" -C /tmp/fi --strip-components=1
        # what the wheel build would place under flashinfer/data
        mkdir -p /tmp/fi/flashinfer/data && for d in include csrc tvm_binding; do ln -sfn "/tmp/fi/$d" "/tmp/fi/flashinfer/data/$d"; done
        for d in cutlass spdlog; do ln -sfn "/tmp/fi/3rdparty/$d" "/tmp/fi/flashinfer/data/$d"; done
      fi
      [ -d /tmp/fi/flashinfer ] && export PYTHONPATH=/tmp/fi:$PYTHONPATH
      TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 FLASHINFER_WORKSPACE_BASE=/tmp/fi-ws python3 bench/attn_decode.py \
        --out "$OUT/attn.jsonl" 2>"$OUT/attn.err" | tee -a "$OUT/attn.txt"; tail -5 "$OUT/attn.err";;
    e2e-fit)
      m="$ROOT/deepseek_v2-deepseek-v2-lite-q4_k_m"
      python3 -m ktrans rules explain --model_path "$m" --gguf_path "$m/model.gguf" --fit --cache_lens 16384 \
        >"$OUT/fit-explain.txt" 2>&1
      fitted=$(ls -t "${KTRANS_CACHE:-$HOME/.cache/ktrans}"/fitted-rules/*.yaml 2>/dev/null | head -1)
      tail -12 "$OUT/fit-explain.txt"; [ -n "$fitted" ] && cp "$fitted" "$OUT/fitted-v2.yaml"
      for r in "$fitted" optimize_rules/deepseek_v2-gpu-experts.yaml; do
        [ -n "$r" ] || continue
        python3 bench/e2e.py --preset deepseek-v2-lite --quant q4_k_m --devices cuda --model-root "$ROOT" --rules "$r" \
          --prompt-lens 1024,4096 --batch-sizes 1,4 --decode-tokens 32 --out "$OUT/e2e.jsonl" 2>>"$OUT/e2e-fit.err" \
          | sed "s|^|[$(basename "$r")] |" | tee -a "$OUT/e2e.txt"
      done; tail -3 "$OUT/e2e-fit.err";;
    e2e-ab)
      python3 bench/e2e.py --preset deepseek-v2-lite --quant q4_k_m --devices cuda --model-root "$ROOT" \
        --prompt-lens 1024,4096 --batch-sizes 1,4,8 --decode-tokens 32 --out "$OUT/e2e.jsonl" 2>>"$OUT/e2e-ab.err" \
        | tee -a "$OUT/e2e.txt"
      KTRANS_HANDOFF=memop python3 bench/e2e.py --preset deepseek-v2-lite --quant q4_k_m --devices cuda \
        --model-root "$ROOT" --prompt-lens 128 --batch-sizes 1,4,8 --decode-tokens 32 --out "$OUT/e2e.jsonl" \
        2>>"$OUT/e2e-ab.err" | sed "s/^/[KTRANS_HANDOFF=memop] /" | tee -a "$OUT/e2e.txt"
      tail -3 "$OUT/e2e-ab.err";;
    gputests) timeout 300 bash -c "$(declare -f step_gputests summary); OUT=$OUT step_gputests";;
    e2e-v2) e2e deepseek-v2-lite;;
    e2e-qwen3) e2e qwen3-30b-a3b;;
    e2e-memop) KTRANS_HANDOFF=memop python3 bench/e2e.py --preset deepseek-v2-lite --quant q4_k_m --devices cuda \
        --model-root "$ROOT" --prompt-lens 128 --batch-sizes 1,4 --decode-tokens 32 2>"$OUT/memop.err" \
        | sed 's/^/[KTRANS_HANDOFF=memop] /' | tee -a "$OUT/e2e.txt"; tail -3 "$OUT/memop.err";;
    dbg-rope) python3 .dev-carry/dbg_rope.py 2>&1 | tail -8 | tee -a "$OUT/summary.txt";;
    failed4) python3 -m pytest -q -p no:cacheprovider -o addopts="-ra" tests/kernels/test_rope.py \
        "tests/models/test_cuda_graphs.py::test_cuda_graph_decode_matches_eager" \
        "tests/models/test_fidelity.py::test_cuda_rules_close_to_transformers" \
        "tests/operators/test_devices.py::test_bf16_packed_forward_close_to_hf_f32" 2>&1 | tail -8 \
        | tee -a "$OUT/summary.txt";;
    streamspin)
      for sp in "" 2000; do
        for p in ${SPIN_PRESETS:-qwen3-30b-a3b deepseek-v2-lite}; do
          KTRANS_STREAM_SPIN_US=$sp python3 bench/e2e.py --preset $p --quant q4_k_m --devices cuda --model-root "$ROOT" \
            --prompt-lens 128 --batch-sizes 1,4 --decode-tokens 32 2>>"$OUT/spin.err" | grep -v "^model\|^host" \
            | sed "s/^/[KTRANS_STREAM_SPIN_US=${sp:-pool}] /" | tee -a "$OUT/e2e.txt"
        done
      done;;
    spin-v2) KTRANS_SPIN_US=1000 python3 bench/e2e.py --preset deepseek-v2-lite --quant q4_k_m --devices cuda \
        --model-root "$ROOT" --prompt-lens 128 --batch-sizes 1,4 --decode-tokens 32 2>"$OUT/spin.err" \
        | sed 's/^/[KTRANS_SPIN_US=1000] /' | tee -a "$OUT/e2e.txt";;
    prof-v2|prof-qwen3)
      p=$([ "$s" = prof-v2 ] && echo deepseek-v2-lite || echo qwen3-30b-a3b)
      python3 bench/profile_decode.py --preset "$p" --model-root "$ROOT" --trace "$OUT/trace-$p.json" \
        2>"$OUT/prof-$p.err" | tee -a "$OUT/prof.txt"
      tail -3 "$OUT/prof-$p.err"; gzip -f "$OUT/trace-$p.json";;
    llama-cpu) [ -x "$LLAMA_CPU/llama-bench" ] || bash .dev-carry/llama-cpp.sh build .dev-carry/llama.cpp-src.tgz \
        "$(dirname "$LLAMA_CPU")" >"$OUT/llama-cpu-build.log" 2>&1 || tail -20 "$OUT/llama-cpu-build.log";;
    e2e-pf)
      for pf in 0 ""; do
        KTRANS_PREFETCH_AHEAD=$pf python3 bench/e2e.py --preset deepseek-v2-lite --quant q4_k_m --devices cuda \
          --model-root "$ROOT" --prompt-lens 1024 --batch-sizes 1,4 --decode-tokens 32 --out "$OUT/e2e.jsonl" \
          2>>"$OUT/e2e-pf.err" | sed "s/^/[KTRANS_PREFETCH_AHEAD=${pf:-default}] /" | tee -a "$OUT/e2e.txt"
      done; tail -3 "$OUT/e2e-pf.err";;
    moe16-pf)
      for pf in 0 512 ""; do
        KTRANS_PREFETCH_AHEAD=$pf timeout 150 python3 bench/moe.py --shapes qwen3 --formats q4_k,q6_k --T 1,4 --no-peer \
          2>>"$OUT/moe.err" | grep "^qwen3" | sed "s/^/[KTRANS_PREFETCH_AHEAD=${pf:-default}] /" | tee -a "$OUT/moe.txt"
      done;;
    moe16) timeout 420 python3 bench/moe.py --shapes qwen3 --formats q4_k,q6_k,amx_int8 --T 1,4,32,512 \
        --json "$OUT/moe.json" 2>"$OUT/moe.err" | tee -a "$OUT/moe.txt"; tail -3 "$OUT/moe.err";;
    llama) bash .dev-carry/llama-cpp.sh build .dev-carry/llama.cpp-src.tgz /tmp/llama cuda >"$OUT/llama-build.log" 2>&1 \
        || tail -20 "$OUT/llama-build.log";;
    qmm) python3 bench/gpu_qmm.py --out "$OUT/qmm.jsonl" 2>"$OUT/qmm.err" | tee -a "$OUT/qmm.txt"; tail -3 "$OUT/qmm.err";;
    handoff)
      for env in "" "KTRANS_STREAM_SPIN_US=2000" "KTRANS_SPIN_US=1000" "KTRANS_HANDOFF=memop"; do
        env $env python3 bench/handoff.py --preset deepseek-v2-lite --model-root "$ROOT" --out "$OUT/handoff.jsonl" \
          2>>"$OUT/handoff.err" | tee -a "$OUT/handoff.txt"
      done;;
    probe) python3 -m ktrans probe 2>&1 | tail -15 | tee -a "$OUT/summary.txt";;
    stream-v2|stream-qwen3)
      p=$([ "$s" = stream-v2 ] && echo deepseek-v2-lite || echo qwen3-30b-a3b)
      python3 bench/stream_prefill.py --preset "$p" --model-root "$ROOT" --out "$OUT/stream.jsonl" \
        2>"$OUT/stream-$p.err" | tee -a "$OUT/stream.txt"
      tail -3 "$OUT/stream-$p.err";;
    peer-v2) peer deepseek-v2-lite;;
    peer-qwen3) peer qwen3-30b-a3b;;
    *) echo "accel.sh: unknown step $s" >&2; exit 2;;
  esac
  summary "step $s: $(( $(date +%s) - t0 )) s"
done
echo "== summary =="; cat "$OUT/summary.txt"; [ -f "$OUT/e2e.txt" ] && cat "$OUT/e2e.txt"; [ -f "$OUT/peer.txt" ] && cat "$OUT/peer.txt"; [ -f "$OUT/prof.txt" ] && cat "$OUT/prof.txt"; [ -f "$OUT/stream.txt" ] && cat "$OUT/stream.txt"; [ -f "$OUT/handoff.txt" ] && cat "$OUT/handoff.txt"; [ -f "$OUT/qmm.txt" ] && cat "$OUT/qmm.txt"; [ -f "$OUT/attn.txt" ] && cat "$OUT/attn.txt"; [ -f "$OUT/moe.txt" ] && cat "$OUT/moe.txt"
exit 0
