// Region (mmap + mbind + MADV_HUGEPAGE) and the grow-only scratch buffers of the MoE layer.
#include "moe/moe_buffers.h"

#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <new>
#include <stdexcept>
#include <string>

namespace ktrans {
namespace {

constexpr int kMpolBind = 2;  // MPOL_BIND from <linux/mempolicy.h>

void bind_to_node(void* p, size_t n, int node) {
#ifdef SYS_mbind
  if (node < 0 || node >= 64) return;
  unsigned long mask = 1ul << node;
  // NOTE: best effort: a kernel without NUMA support refuses, and the pages stay where first touched.
  syscall(SYS_mbind, p, n, kMpolBind, &mask, sizeof(mask) * 8, 0);
#else
  (void)p; (void)n; (void)node;
#endif
}

}  // namespace

Region::Region(size_t bytes, int node) : n_(bytes) {
  if (bytes == 0) return;
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
  madvise(p, bytes, MADV_HUGEPAGE);
  bind_to_node(p, bytes, node);
  p_ = static_cast<uint8_t*>(p);
}

Region::~Region() {
  if (p_) munmap(p_, n_);
}

Region& Region::operator=(Region&& o) noexcept {
  if (this != &o) {
    if (p_) munmap(p_, n_);
    p_ = o.p_;
    n_ = o.n_;
    o.p_ = nullptr;
    o.n_ = 0;
  }
  return *this;
}

uint8_t* MoeBuffers::get(int slot, size_t bytes) {
  if (slot >= static_cast<int>(regions_.size())) regions_.resize(slot + 1);
  Region& r = regions_[slot];
  if (r.size() < bytes) r = Region(bytes + bytes / 4, -1);  // 25% headroom against regrowth
  return r.data();
}

int64_t MoeBuffers::bytes() const {
  int64_t n = 0;
  for (const Region& r : regions_) n += static_cast<int64_t>(r.size());
  return n;
}

}  // namespace ktrans
