// Region (mmap + mbind + MADV_HUGEPAGE), the grow-only scratch buffers of the MoE layer, and the
// process-wide registry that gives all layers of one thread pool the same scratch.
#include "moe/moe_buffers.h"

#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <map>
#include <mutex>
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
  if (r.size() < bytes) {
    bytes_.fetch_sub(static_cast<int64_t>(r.size()), std::memory_order_relaxed);
    r = Region(0, -1);  // free first: the old and new buffer never coexist
    r = Region(bytes + bytes / 4, -1);  // 25% headroom against regrowth
    bytes_.fetch_add(static_cast<int64_t>(r.size()), std::memory_order_relaxed);
  }
  return r.data();
}

namespace {

// Pool -> its scratch. NOTE: keys cannot be reused while an entry is alive: the scratch lives only
// as long as some layer holds it, and that layer holds a shared_ptr to the pool, so the pool's
// address is not freed (and handed to a new pool) before the entry has expired.
std::mutex g_scratch_mu;
std::map<const ThreadPool*, std::weak_ptr<MoeBuffers>> g_scratch;

}  // namespace

std::shared_ptr<MoeBuffers> moe_scratch_for(const ThreadPool* pool) {
  std::lock_guard<std::mutex> lock(g_scratch_mu);
  for (auto it = g_scratch.begin(); it != g_scratch.end();) it = it->second.expired() ? g_scratch.erase(it) : ++it;
  std::shared_ptr<MoeBuffers> s = g_scratch[pool].lock();
  if (!s) g_scratch[pool] = s = std::make_shared<MoeBuffers>();
  return s;
}

int64_t moe_scratch_bytes(const ThreadPool* pool) {
  std::lock_guard<std::mutex> lock(g_scratch_mu);
  auto it = g_scratch.find(pool);
  std::shared_ptr<MoeBuffers> s = it == g_scratch.end() ? nullptr : it->second.lock();
  return s ? s->bytes() : 0;
}

}  // namespace ktrans
