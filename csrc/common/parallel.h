// Fork-join helper for long one-off jobs (quantizing or dequantizing whole tensors): runs
// fn(ith, nth) on nth threads, the caller being thread 0. Each call starts its own std::threads,
// so it is meant for calls that take milliseconds or more, not for per-token kernels (those use
// the MoE thread pool).
#pragma once
#include <sched.h>

#include <algorithm>
#include <cstdint>
#include <thread>
#include <utility>
#include <vector>

namespace ktrans {

// CPUs this process may run on (its affinity mask, e.g. a container's or taskset's share).
inline int available_cpus() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
}

// Number of threads to use: requested > 0 as given, else every CPU available to the process;
// never more than `max_useful` (so tiny inputs stay on the calling thread).
inline int resolve_threads(int requested, int64_t max_useful) {
  int n = requested > 0 ? requested : available_cpus();
  n = std::max(1, n);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n, max_useful)));
}

// [begin, end) of item range [0, n) owned by thread ith of nth (contiguous, sizes differ by <= 1).
inline std::pair<int64_t, int64_t> split_range(int64_t n, int ith, int nth) {
  const int64_t base = n / nth, extra = n % nth;
  const int64_t begin = ith * base + std::min<int64_t>(ith, extra);
  return {begin, begin + base + (ith < extra ? 1 : 0)};
}

template <class Fn>
void parallel_for(int nth, Fn&& fn) {
  if (nth <= 1) {
    fn(0, 1);
    return;
  }
  std::vector<std::thread> threads;
  threads.reserve(nth - 1);
  for (int ith = 1; ith < nth; ++ith) threads.emplace_back([&fn, ith, nth] { fn(ith, nth); });
  fn(0, nth);
  for (auto& t : threads) t.join();
}

}  // namespace ktrans
