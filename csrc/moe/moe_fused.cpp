// The MoE forward of a small chunk (decode: T <= fused_max_tokens, default 8) in ONE fan-out of the pool, for
// both backends (moe.h has the phased structure this replaces). Inside it:
//   gate/up: items (active expert, block of I rows / columns) are claimed from one counter, as in
//            the phased forward. The thread that finishes an expert's LAST item prepares that
//            expert's h for down (gguf: quantized rows; amx_*: packed_prepare_acts) and sets its
//            ready flag (release). amx_*: the first thread to claim an item of an expert gathers
//            and prepares its x rows (state 0 -> 1 -> 2); others wait for state 2.
//   down:    each thread then runs down_thread on its own output rows, waiting (acquire) for each
//            expert's flag in turn, so the down products of early experts overlap the gate/up
//            products of late ones instead of waiting at a pool-wide barrier.
// NOTE (progress): a waiting thread only ever waits for work that a running thread has claimed
// (an item, an expert's x), never for an index of the fan-out that may not have started, so the
// pool's rule that thread 0 runs unclaimed indices after its own cannot deadlock it.
// The arithmetic is the phased forward's, item for item: results are bit-identical. That includes
// the layer's gating and expert biases (moe_gating.cpp): the shared pieces apply them (gate_up_item
// and gate_up_block_packed through gate_one / gate_rows, down_thread adds the down bias).
#include <immintrin.h>

#include <algorithm>
#include <thread>

#include "moe/moe.h"

namespace ktrans {
namespace {

constexpr int64_t kRowBlock = 32;  // gguf gate/up rows per item (moe_forward.cpp's)

// NOTE: yields now and then: on a machine shared with other processes the thread being waited
// for may have lost its core.
template <class Pred>
void spin_until(Pred&& ready) {
  for (int i = 1; !ready(); ++i) {
    _mm_pause();
    if (i % 1024 == 0) std::this_thread::yield();
  }
}

}  // namespace

bool MoeLayer::fused_ok(int64_t tc, bool gemm) const {
  // One thread group, no NUMA reduction, no gguf GEMM path, and few enough experts for the flags.
  return !gemm && ngroups() == 1 && nslices() == 1 && tc <= fused_max_tokens_ &&
         plan_.num_active() <= kFusedMaxExperts;
}

void MoeLayer::wait_ready(int64_t a) const {
  if (fused_) spin_until([&] { return ready_[a].load(std::memory_order_acquire) != 0; });
}

void MoeLayer::forward_fused(const MoeArgs& a, int64_t t0, int64_t tc) {
  const int64_t A = plan_.num_active(), I = shape_.I;
  const bool packed = backend_ != MoeBackend::gguf;
  // Items per expert: I-row blocks (gguf) or I-column blocks of col_block_ (amx_*).
  const int64_t step = packed ? col_block_ : kRowBlock, nitems = (I + step - 1) / step;
  for (int64_t i = 0; i < A; ++i) {
    items_done_[i].store(0, std::memory_order_relaxed);
    state_[i].store(0, std::memory_order_relaxed);
    ready_[i].store(0, std::memory_order_relaxed);
  }
  counters_[0].store(0, std::memory_order_relaxed);
  fused_ = true;
  pool_->parallel([&](int ith, int nth) {
    for (int64_t it; (it = counters_[0].fetch_add(1, std::memory_order_relaxed)) < A * nitems;) {
      const int64_t ai = it / nitems, r0 = it % nitems * step, r1 = std::min(r0 + step, I);
      if (packed) {
        int todo = 0;
        if (state_[ai].compare_exchange_strong(todo, 1, std::memory_order_acquire)) {
          gather_expert(a, t0, ai);
          state_[ai].store(2, std::memory_order_release);
        } else {
          spin_until([&] { return state_[ai].load(std::memory_order_acquire) == 2; });
        }
        gate_up_block_packed(0, ai, r0, r1, ith);
      } else {
        gate_up_item(0, ai, r0, r1, ith);
      }
      // NOTE: acq_rel: the last finisher sees every other item's h before preparing it.
      if (items_done_[ai].fetch_add(1, std::memory_order_acq_rel) + 1 < nitems) continue;
      if (packed)
        prepare_h_acts(packed_format(backend_), ai);
      else if (c_.hq)
        quantize_h(plan_.offset[ai], plan_.offset[ai + 1]);
      ready_[ai].store(1, std::memory_order_release);
    }
    down_thread(a, t0, tc, ith, nth);
  });
  fused_ = false;
}

}  // namespace ktrans
