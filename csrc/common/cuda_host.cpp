// Run-time lookup of cudaLaunchHostFunc in the already-loaded CUDA runtime, and the two host
// callbacks of a stream-ordered task (see cuda_host.h).
#include "common/cuda_host.h"

#include <dlfcn.h>
#include <link.h>

#include <cstdlib>
#include <cstring>
#include <atomic>
#include <stdexcept>

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

}  // namespace

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

std::string StreamTask::take_error() {
  std::string e;
  e.swap(error_);
  return e;
}

}  // namespace ktrans
