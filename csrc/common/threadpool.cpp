// Thread pool implementation: core discovery from sysfs, pinning, the fan-out barrier and the
// serial task queue (see threadpool.h for the threading model).
#include "common/threadpool.h"

#include <dirent.h>
#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <set>
#include <stdexcept>
#include <string>
#include <tuple>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace ktrans {
namespace {

int read_int(const std::string& path, int fallback) {
  std::ifstream f(path);
  int v;
  return (f >> v) ? v : fallback;
}

// NUMA node of a CPU: the nodeN entry in its sysfs directory (absent on non-NUMA kernels).
int cpu_node(int cpu) {
  std::string dir = "/sys/devices/system/cpu/cpu" + std::to_string(cpu);
  DIR* d = opendir(dir.c_str());
  if (!d) return 0;
  int node = 0;
  while (dirent* e = readdir(d)) {
    if (std::strncmp(e->d_name, "node", 4) == 0 && e->d_name[4] >= '0' && e->d_name[4] <= '9') {
      node = std::atoi(e->d_name + 4);
      break;
    }
  }
  closedir(d);
  return node;
}

inline void cpu_relax() {
#if defined(__x86_64__)
  _mm_pause();
#endif
}

using Clock = std::chrono::steady_clock;

// Runs a task; what it threw, or null.
std::exception_ptr run_caught(const std::function<void()>& task) {
  try {
    task();
  } catch (...) {
    return std::current_exception();
  }
  return nullptr;
}

// Logical CPUs this process may run on.
int allowed_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) != 0) return 1;
  return std::max(1, CPU_COUNT(&set));
}

}  // namespace

std::vector<CoreInfo> physical_cores() {
  cpu_set_t set;
  CPU_ZERO(&set);
  std::vector<int> cpus;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    for (int c = 0; c < CPU_SETSIZE; ++c)
      if (CPU_ISSET(c, &set)) cpus.push_back(c);
  }
  if (cpus.empty()) cpus.push_back(0);
  // (node, package, core) -> first CPU seen: one entry per physical core.
  std::map<std::tuple<int, int, int>, int> cores;
  for (int c : cpus) {
    std::string t = "/sys/devices/system/cpu/cpu" + std::to_string(c) + "/topology/";
    int pkg = read_int(t + "physical_package_id", 0);
    int core = read_int(t + "core_id", c);
    cores.emplace(std::make_tuple(cpu_node(c), pkg, core), c);
  }
  std::vector<CoreInfo> out;
  for (auto& [key, cpu] : cores) out.push_back({cpu, std::get<0>(key)});
  return out;
}

ThreadPool::ThreadPool(int nthreads, int ngroups, bool pin, int spin_us)
    : n_(nthreads), spin_us_(spin_us), pin_(pin), shares_cores_(nthreads >= allowed_cpus()) {
  if (nthreads < 1) throw std::invalid_argument("thread pool needs at least 1 thread, got " + std::to_string(nthreads));
  if (const char* v = std::getenv("KTRANS_POOL_INLINE")) inline_ok_ = std::strcmp(v, "0") != 0;
  if (spin_us < 0) throw std::invalid_argument("thread pool spin must be >= 0 microseconds, got " + std::to_string(spin_us));
  if (ngroups < 0 || ngroups > nthreads)
    throw std::invalid_argument("thread groups must be in [0, " + std::to_string(nthreads) + "], got " +
                                std::to_string(ngroups));
  std::vector<CoreInfo> cores = physical_cores();
  thread_group_.resize(n_);
  for (int i = 0; i < n_; ++i) cpus_.push_back(cores[i % cores.size()].cpu);
  if (ngroups > 0) {  // forced layout: equal contiguous groups, memory not bound to a node
    for (int g = 0; g <= ngroups; ++g) group_begin_.push_back(g * n_ / ngroups);
    group_node_.assign(ngroups, -1);
  } else {  // real layout: consecutive threads on the same node form a group
    for (int i = 0; i < n_; ++i) {
      int node = cores[i % cores.size()].node;
      if (i == 0 || node != group_node_.back()) {
        group_begin_.push_back(i);
        group_node_.push_back(node);
      }
    }
    group_begin_.push_back(n_);
    if (static_cast<int>(cores.size()) < n_) std::fill(group_node_.begin(), group_node_.end(), -1);
  }
  for (int g = 0; g + 1 < static_cast<int>(group_begin_.size()); ++g)
    for (int i = group_begin_[g]; i < group_begin_[g + 1]; ++i) thread_group_[i] = g;
  threads_.emplace_back([this] { queue_loop(); });
  for (int i = 1; i < n_; ++i) threads_.emplace_back([this, i] { worker_loop(i); });
  // NOTE: pinned from here, not by each thread as it starts: when the constructor returns every
  // thread is on its core, whether or not it has run yet (a fan-out's indices go to whichever
  // thread claims them first, so a first task does not prove that every thread started).
  for (int i = 0; i < n_; ++i) pin_thread(i);
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lk(q_mu_);
    stop_ = true;
  }
  q_cv_.notify_all();
  threads_[0].join();  // the queue thread drains its queue, then stops the workers (below)
  for (size_t i = 1; i < threads_.size(); ++i) threads_[i].join();
}

void ThreadPool::pin_thread(int ith) {
  if (!pin_) return;
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpus_[ith], &set);
  pthread_setaffinity_np(threads_[ith].native_handle(), sizeof(set), &set);
}

// One step of an idle spin. When the pool's threads hold every CPU of the process, every 64th
// step yields: a thread that has become runnable on this core (the Python thread woken by a
// finished task, torch's launch thread) runs at once instead of after the spin.
void ThreadPool::idle_pause(int i) const {
  cpu_relax();
  if (shares_cores_ && (i & 63) == 63) sched_yield();
}

// Spin on the generation counter for spin_us, then sleep until it moves.
void ThreadPool::wait_for_generation(uint64_t seen) {
  auto deadline = Clock::now() + std::chrono::microseconds(spin_us_);
  for (int i = 0;; ++i) {
    if (generation_.load(std::memory_order_acquire) != seen) return;
    idle_pause(i);
    if ((i & 255) == 255 && Clock::now() > deadline) break;
  }
  sleepers_.fetch_add(1);
  {
    std::unique_lock<std::mutex> lk(wake_mu_);
    wake_cv_.wait(lk, [&] { return generation_.load() != seen; });
  }
  sleepers_.fetch_sub(1);
}

void ThreadPool::worker_loop(int ith) {
  uint64_t seen = 0;
  for (;;) {
    wait_for_generation(seen);
    seen = generation_.load(std::memory_order_acquire);
    // NOTE: job_ is written before the generation it belongs to is published; if it has been
    // replaced since (this fan-out already ended), claim(seen) fails and the stale pointer is
    // never called.
    const Job* job = job_.load(std::memory_order_acquire);
    if (!job) return;  // null job with a new generation = shut down
    for (int i; (i = claim(seen)) >= 0;) {
      try {
        (*job)(i, n_);
      } catch (...) {
        std::lock_guard<std::mutex> lk(job_error_mu_);
        if (!job_error_) job_error_ = std::current_exception();
      }
      done_.fetch_add(1, std::memory_order_acq_rel);
    }
  }
}

void ThreadPool::parallel(const Job& job) {
  if (n_ == 1) {
    job(0, 1);
    return;
  }
  // NOTE: the job's indices 1..n-1 are claimed (claim_: generation in the high bits, next index
  // in the low 16), not assigned: a worker runs the index it claims, and thread 0, once done
  // with index 0, claims and runs whatever no worker has taken yet. So a worker that is late (a
  // shared machine gave its core to another process, or it is still waking) delays the fan-out
  // by at most the index it is running, not by a scheduler time slice; the join waits for the
  // indices to finish (done_), never for a worker to show up.
  const uint64_t gen = generation_.load(std::memory_order_relaxed) + 1;
  job_.store(&job, std::memory_order_relaxed);
  done_.store(0, std::memory_order_relaxed);
  claim_.store(gen << 16 | 1, std::memory_order_relaxed);
  generation_.store(gen, std::memory_order_seq_cst);
  // NOTE: the lock/unlock pair orders this wake-up after a sleeper's re-check of the generation.
  if (sleepers_.load(std::memory_order_seq_cst) > 0) {
    { std::lock_guard<std::mutex> lk(wake_mu_); }
    wake_cv_.notify_all();
  }
  std::exception_ptr own;
  for (int ith = 0; ith >= 0; ith = claim(gen)) {
    try {
      job(ith, n_);
    } catch (...) {
      if (!own) own = std::current_exception();
    }
    done_.fetch_add(1, std::memory_order_acq_rel);
  }
  while (done_.load(std::memory_order_acquire) != n_) cpu_relax();
  std::exception_ptr err = own;
  {
    std::lock_guard<std::mutex> lk(job_error_mu_);
    if (!err) err = job_error_;
    job_error_ = nullptr;
  }
  if (err) std::rethrow_exception(err);
}

int ThreadPool::claim(uint64_t gen) {
  uint64_t v = claim_.load(std::memory_order_acquire);
  for (;;) {
    if ((v >> 16) != gen || static_cast<int>(v & 0xffff) >= n_) return -1;  // another fan-out, or all taken
    if (claim_.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel, std::memory_order_acquire))
      return static_cast<int>(v & 0xffff);
  }
}

void ThreadPool::queue_loop() {
  for (;;) {
    // Spin a while for the next task: a decode step submits one per layer, a few hundred
    // microseconds apart, and a futex wake-up would add to every one of them.
    auto deadline = Clock::now() + std::chrono::microseconds(spin_us_);
    for (int i = 0; queued_.load(std::memory_order_acquire) == 0; ++i) {
      idle_pause(i);
      if ((i & 255) == 255 && Clock::now() > deadline) break;
    }
    std::function<void()> task;
    {
      std::unique_lock<std::mutex> lk(q_mu_);
      q_cv_.wait(lk, [&] { return (stop_ || !queue_.empty()) && !inline_running_; });
      if (queue_.empty()) break;  // stop_ and drained
      task = std::move(queue_.front());
      queue_.pop_front();
      queued_.fetch_sub(1, std::memory_order_relaxed);
    }
    const std::exception_ptr err = run_caught(task);
    {
      std::lock_guard<std::mutex> lk(q_mu_);
      if (err && !task_error_) task_error_ = err;
      // NOTE: a closure may hold the last reference to this pool (through a layer); destroying
      // it here would run the pool's destructor on its own queue thread. Callers free it.
      finished_.push_back(std::move(task));
      completed_.fetch_add(1, std::memory_order_release);
    }
    done_cv_.notify_all();
  }
  job_.store(nullptr);  // release the workers
  generation_.fetch_add(1);
  { std::lock_guard<std::mutex> lk(wake_mu_); }
  wake_cv_.notify_all();
}

uint64_t ThreadPool::submit(std::function<void()> task) {
  uint64_t ticket;
  std::vector<std::function<void()>> finished;
  {
    std::lock_guard<std::mutex> lk(q_mu_);
    queue_.push_back(std::move(task));
    queued_.fetch_add(1, std::memory_order_release);
    ticket = ++submitted_;
    finished.swap(finished_);
  }
  q_cv_.notify_one();
  return ticket;
}

void ThreadPool::sync(uint64_t ticket, int spin_us) {
  // Short spin first: a decode-sized MoE layer finishes in well under a millisecond. Not when
  // the pool holds every CPU: the caller would then spin on a core one of the pool's threads
  // needs, and slow the whole fan-out down to that thread's share of it.
  if (!shares_cores_) {
    auto deadline = Clock::now() + std::chrono::microseconds(spin_us < 0 ? spin_us_ : spin_us);
    while (completed_.load(std::memory_order_acquire) < ticket && Clock::now() < deadline) cpu_relax();
  }
  std::vector<std::function<void()>> finished;  // destroyed here, on the caller's thread
  std::exception_ptr err;
  {
    std::unique_lock<std::mutex> lk(q_mu_);
    done_cv_.wait(lk, [&] { return completed_.load() >= ticket; });
    finished.swap(finished_);
    err = task_error_;
    task_error_ = nullptr;
  }
  if (err) std::rethrow_exception(err);
}

void ThreadPool::run(std::function<void()> task) {
  if (!run_inline(task)) sync(submit(std::move(task)));
}

bool ThreadPool::run_inline(const std::function<void()>& task) {
  // NOTE: not when the pool's threads hold every CPU: the caller could then share a worker's core
  // while thread 0's stays idle, and moving it onto thread 0's core for the call (two affinity
  // changes) measured 10-14 us per empty 2-thread fan-out against 5-6 us handed off.
  if (!inline_ok_ || shares_cores_) return false;
  {
    std::lock_guard<std::mutex> lk(q_mu_);
    if (inline_running_ || stop_ || !queue_.empty() || completed_.load() != submitted_) return false;
    inline_running_ = true;
  }
  const std::exception_ptr err = run_caught(task);
  {
    std::lock_guard<std::mutex> lk(q_mu_);
    inline_running_ = false;
  }
  q_cv_.notify_one();  // a task submitted meanwhile waited for this one
  if (err) std::rethrow_exception(err);
  return true;
}

void ThreadPool::sync_all() {
  uint64_t ticket;
  {
    std::lock_guard<std::mutex> lk(q_mu_);
    ticket = submitted_;
  }
  sync(ticket);
}

}  // namespace ktrans
