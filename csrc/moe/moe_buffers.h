// Memory for the MoE layer: 64-byte aligned, huge-page advised allocations that can be bound to a
// NUMA node (mbind via the raw syscall, so no libnuma dependency), and grow-only scratch buffers
// that a forward call reuses, shared by every MoE layer of one thread pool.
#pragma once
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

namespace ktrans {

// An mmap'd region; node >= 0 binds its pages to that NUMA node (best effort).
class Region {
 public:
  Region() = default;
  Region(size_t bytes, int node);
  ~Region();
  Region(Region&& o) noexcept : p_(o.p_), n_(o.n_) { o.p_ = nullptr; o.n_ = 0; }
  Region& operator=(Region&& o) noexcept;
  Region(const Region&) = delete;
  uint8_t* data() const { return p_; }
  size_t size() const { return n_; }

 private:
  uint8_t* p_ = nullptr;
  size_t n_ = 0;
};

class ThreadPool;

// Named scratch buffers of the forward pass; each grows to the largest size asked and is reused.
// A pointer from get() stays valid until the next get() of the same slot.
class MoeBuffers {
 public:
  // Pointer to buffer `slot` with room for at least `bytes`.
  uint8_t* get(int slot, size_t bytes);
  // Total bytes held; safe to read while a forward runs.
  int64_t bytes() const { return bytes_.load(std::memory_order_relaxed); }

 private:
  std::vector<Region> regions_;
  std::atomic<int64_t> bytes_{0};
};

// The scratch shared by every MoE layer on `pool` (created on first use, freed with the last
// layer holding it).
// NOTE: sharing is safe because a layer only touches its scratch inside MoeLayer::forward, and
// forward only runs inside a task of its pool: tasks run one at a time on the pool's thread 0
// (ThreadPool::submit/run/StreamTask all go through the one queue), so two layers of one pool
// never use the scratch at the same time. Every forward chunk fetches its pointers afresh with
// get(), so a buffer regrown by another layer in between is never read through a stale pointer.
std::shared_ptr<MoeBuffers> moe_scratch_for(const ThreadPool* pool);
// Bytes of that scratch, 0 when no layer on `pool` holds one.
int64_t moe_scratch_bytes(const ThreadPool* pool);

}  // namespace ktrans
