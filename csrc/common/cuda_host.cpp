// Run-time lookup of cudaLaunchHostFunc in the already-loaded CUDA runtime, and the two host
// callbacks of a stream-ordered task (see cuda_host.h).
#include "common/cuda_host.h"

#include <dlfcn.h>
#include <link.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <mutex>

namespace ktrans {
namespace {

using HostFn = void (*)(void*);
using LaunchHostFunc = int (*)(void* stream, HostFn fn, void* user);

// Path of a loaded shared object whose file name contains "libcudart", or "".
int find_cudart(dl_phdr_info* info, size_t, void* out) {
  const char* name = info->dlpi_name;
  if (name && std::strstr(name, "libcudart")) {
    *static_cast<std::string*>(out) = name;
    return 1;
  }
  return 0;
}

struct Resolved {
  LaunchHostFunc fn = nullptr;
  std::string why;
};

Resolved resolve() {
  Resolved out;
  void* sym = dlsym(RTLD_DEFAULT, "cudaLaunchHostFunc");
  if (!sym) {
    std::string path;
    dl_iterate_phdr(find_cudart, &path);
    if (path.empty()) {
      out.why = "no CUDA runtime (libcudart) is loaded in this process";
      return out;
    }
    void* h = dlopen(path.c_str(), RTLD_LAZY | RTLD_NOLOAD);
    if (h) sym = dlsym(h, "cudaLaunchHostFunc");
    if (!sym) {
      out.why = "cudaLaunchHostFunc not found in " + path;
      return out;
    }
  }
  out.fn = reinterpret_cast<LaunchHostFunc>(sym);
  return out;
}

// NOTE: a failure is not cached: torch loads libcudart lazily, at its first CUDA call, which may
// come after our first probe.
Resolved resolved() {
  static std::atomic<LaunchHostFunc> cached{nullptr};
  Resolved r;
  r.fn = cached.load();
  if (!r.fn) {
    r = resolve();
    if (r.fn) cached.store(r.fn);
  }
  return r;
}

LaunchHostFunc launch_fn() {
  Resolved r = resolved();
  if (!r.fn) throw std::runtime_error("stream-ordered submit needs CUDA: " + r.why);
  return r.fn;
}

// Stream memory operations of the driver API (libcuda, loaded by the CUDA runtime).
using StreamValue32 = int (*)(void* stream, unsigned long long addr, uint32_t value, unsigned int flags);
constexpr unsigned int kWaitValueEq = 0x1;        // CU_STREAM_WAIT_VALUE_EQ
constexpr unsigned int kWriteValueDefault = 0x0;  // CU_STREAM_WRITE_VALUE_DEFAULT: after a memory barrier

struct MemOps {
  StreamValue32 write = nullptr, wait = nullptr;
  std::string why;
};

MemOps resolve_memops() {
  MemOps out;
  void* h = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_NOLOAD);
  if (!h) {
    out.why = "no CUDA driver (libcuda.so.1) is loaded in this process";
    return out;
  }
  out.write = reinterpret_cast<StreamValue32>(dlsym(h, "cuStreamWriteValue32_v2"));
  out.wait = reinterpret_cast<StreamValue32>(dlsym(h, "cuStreamWaitValue32_v2"));
  if (!out.write || !out.wait) {
    out.write = out.wait = nullptr;
    out.why = "cuStreamWriteValue32_v2 / cuStreamWaitValue32_v2 not found in libcuda.so.1";
  }
  return out;
}

// NOTE: as for the runtime above, a failure is not cached (the driver loads with the runtime).
MemOps memops() {
  static std::mutex mu;
  static MemOps cached;
  std::lock_guard<std::mutex> lk(mu);
  if (!cached.write) cached = resolve_memops();
  return cached;
}

void check_memop(int rc, const char* what) {
  if (rc != 0) throw std::runtime_error(std::string(what) + " failed with CUDA error " + std::to_string(rc));
}

}  // namespace

bool cuda_memops_available() { return memops().write != nullptr; }
std::string cuda_memops_unavailable_reason() { return memops().why; }

bool cuda_host_available() { return resolved().fn != nullptr; }
std::string cuda_host_unavailable_reason() { return resolved().why; }

void StreamTask::start_cb(void* self) {
  auto* t = static_cast<StreamTask*>(self);
  t->ticket_ = t->pool_->submit(t->fn_);
}

// NOTE: the wait runs on CUDA's callback thread, and the stream (the whole GPU step) stands still
// until it returns. By default it spins as long as the pool's own idle threads do (KTRANS_SPIN_US),
// then sleeps; KTRANS_STREAM_SPIN_US sets its own spin (microseconds), e.g. long enough to cover
// a decode-sized task instead of paying a futex wake-up per layer, where a core is free for it.
int stream_wait_spin_us() {
  static const int us = [] {
    const char* v = std::getenv("KTRANS_STREAM_SPIN_US");
    if (!v || !*v) return -1;
    char* end = nullptr;
    long n = std::strtol(v, &end, 10);
    return (end && *end == 0 && n >= 0 && n <= 10000000) ? static_cast<int>(n) : -1;
  }();
  return us;
}

void StreamTask::wait_cb(void* self) {
  auto* t = static_cast<StreamTask*>(self);
  try {
    t->pool_->sync(t->ticket_, stream_wait_spin_us());
  } catch (const std::exception& e) {
    if (t->error_.empty()) t->error_ = e.what();
  }
}

void StreamTask::launch_start(uintptr_t stream) {
  int rc = launch_fn()(reinterpret_cast<void*>(stream), &StreamTask::start_cb, this);
  if (rc != 0) throw std::runtime_error("cudaLaunchHostFunc failed with CUDA error " + std::to_string(rc));
}

void StreamTask::launch_wait(uintptr_t stream) {
  int rc = launch_fn()(reinterpret_cast<void*>(stream), &StreamTask::wait_cb, this);
  if (rc != 0) throw std::runtime_error("cudaLaunchHostFunc failed with CUDA error " + std::to_string(rc));
}

// NOTE: a job whose start never comes (a graph replay that failed after arming) gives up after
// this long, records the error and sets done, so neither the pool nor the stream hangs for ever.
constexpr auto kArmTimeout = std::chrono::seconds(60);

void StreamTask::arm() {
  if (!flags_) throw std::runtime_error("StreamTask.arm: set_flags first");
  uint32_t* flags = flags_;
  // The flags are plain memory the GPU writes and reads over PCIe: accessed with atomic builtins.
  ticket_ = pool_->submit([this, flags] {
    auto t0 = std::chrono::steady_clock::now();
    int spins = 0;
    while (__atomic_load_n(&flags[0], __ATOMIC_ACQUIRE) != 1) {
      if (++spins < 4096) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
        continue;
      }
      spins = 0;
      if (std::chrono::steady_clock::now() - t0 > kArmTimeout) {
        if (error_.empty()) error_ = "stream-ordered MoE: the GPU never reached this task's start (60 s)";
        __atomic_store_n(&flags[1], 1u, __ATOMIC_RELEASE);
        return;
      }
    }
    __atomic_store_n(&flags[0], 0u, __ATOMIC_RELAXED);
    try {
      fn_();
    } catch (const std::exception& e) {
      if (error_.empty()) error_ = e.what();
    }
    __atomic_store_n(&flags[1], 1u, __ATOMIC_RELEASE);
  });
}

void StreamTask::launch_start_memop(uintptr_t stream) {
  MemOps m = memops();
  if (!m.write) throw std::runtime_error("memop hand-off needs CUDA stream memory operations: " + m.why);
  check_memop(m.write(reinterpret_cast<void*>(stream), reinterpret_cast<uintptr_t>(&flags_[0]), 1,
                      kWriteValueDefault), "cuStreamWriteValue32");
}

void StreamTask::launch_wait_memop(uintptr_t stream) {
  MemOps m = memops();
  if (!m.wait) throw std::runtime_error("memop hand-off needs CUDA stream memory operations: " + m.why);
  check_memop(m.wait(reinterpret_cast<void*>(stream), reinterpret_cast<uintptr_t>(&flags_[1]), 1, kWaitValueEq),
              "cuStreamWaitValue32");
  check_memop(m.write(reinterpret_cast<void*>(stream), reinterpret_cast<uintptr_t>(&flags_[1]), 0,
                      kWriteValueDefault), "cuStreamWriteValue32");
}

std::string StreamTask::take_error() {
  std::string e;
  e.swap(error_);
  return e;
}

}  // namespace ktrans
