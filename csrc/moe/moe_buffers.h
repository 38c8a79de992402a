// Memory for the MoE layer: 64-byte aligned, huge-page advised allocations that can be bound to a
// NUMA node (mbind via the raw syscall, so no libnuma dependency), and grow-only scratch buffers
// that a forward call reuses.
#pragma once
#include <cstddef>
#include <cstdint>
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

// Named scratch buffers of the forward pass; each grows to the largest size asked and is reused.
class MoeBuffers {
 public:
  // Pointer to buffer `slot` with room for at least `bytes`.
  uint8_t* get(int slot, size_t bytes);
  int64_t bytes() const;

 private:
  std::vector<Region> regions_;
};

}  // namespace ktrans
