// The CPU engine's one owned thread pool: worker threads pinned to physical cores, work split
// explicitly as (ith, nth), and a serial task queue for asynchronous submit + sync.
//
// Thread 0 of the pool is the task-queue thread: it pops a submitted task and runs it, and the
// task fans out with parallel(), in which thread 0 takes part as ith = 0. So a pool of n threads
// keeps exactly n threads busy (no extra driver thread competing for a core), and the submitting
// (Python) thread sleeps in sync() with the GIL released. run() on an idle pool skips the queue:
// the caller runs the task itself in thread 0's place (see run()).
//
// Threads are grouped (NUMA nodes, or a forced layout for tests): group g holds threads
// [group_begin(g), group_begin(g+1)). Callers use group_of(ith) to read node-local data.
//
// Idle threads (the workers, and the queue thread waiting for a task) spin for `spin_us` before
// sleeping on a condition variable: short enough not to steal cores from torch for long, long
// enough to skip the futex wake-ups within one layer's phases and, with a larger value, between
// the layers of a decode step.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace ktrans {

// One CPU per physical core available to this process (first hyper-thread sibling), ordered by
// NUMA node then core, and the node of each.
struct CoreInfo {
  int cpu;
  int node;
};
std::vector<CoreInfo> physical_cores();

class ThreadPool {
 public:
  using Job = std::function<void(int ith, int nth)>;

  // nthreads >= 1. ngroups 0 = the real NUMA layout of the chosen cores; ngroups > 0 forces that
  // many equal groups (a two-node layout on a one-node machine, for tests). pin: bind each
  // thread to one physical core (wrapping round when there are more threads than cores).
  ThreadPool(int nthreads, int ngroups = 0, bool pin = true, int spin_us = 200);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return n_; }
  int num_groups() const { return static_cast<int>(group_begin_.size()) - 1; }
  int group_of(int ith) const { return thread_group_[ith]; }
  int group_begin(int g) const { return group_begin_[g]; }
  int group_size(int g) const { return group_begin_[g + 1] - group_begin_[g]; }
  // Node to bind group g's memory to, or -1 (forced layout / unknown).
  int group_node(int g) const { return group_node_[g]; }

  // Runs job(ith, n) for every ith in [0, n) and returns when all are done: thread 0 runs ith 0,
  // each worker claims one of the others as it wakes, and thread 0 runs those no worker has
  // claimed by the time it is done (so ith is not always the thread's own index: per-index
  // scratch is still used by one thread at a time). Only from inside a task (i.e. on thread 0);
  // this is what keeps the pool free of nested or concurrent fan-outs.
  void parallel(const Job& job);

  // Queues a task (run in order on thread 0); returns its ticket.
  uint64_t submit(std::function<void()> task);
  // Blocks until every task up to `ticket` has finished; rethrows the first error a task raised.
  // spin_us >= 0 overrides the pool's spin for this wait (a caller with a core to itself).
  void sync(uint64_t ticket, int spin_us = -1);
  // Blocks until the queue is empty.
  void sync_all();
  // Submit + sync, or, when the pool is idle (nothing queued or running) and leaves the caller a
  // core of its own, the task run on the calling thread in thread 0's place: a call then costs no
  // hand-off to the queue thread and back (two thread wake-ups; an empty one-thread fan-out
  // measured 0.2 us against 5-7 us, and ~400 us when the queue thread had lost its core).
  // Off with KTRANS_POOL_INLINE=0.
  void run(std::function<void()> task);

 private:
  // Runs task on the calling thread if the pool is idle; false (task not run) otherwise.
  bool run_inline(const std::function<void()>& task);
  void worker_loop(int ith);
  void queue_loop();
  void wait_for_generation(uint64_t seen);
  void idle_pause(int i) const;
  void pin_thread(int ith);

  int n_;
  int spin_us_;
  bool pin_;
  bool shares_cores_;  // n_ >= the CPUs this process may use: no core is left for the caller
  std::vector<int> cpus_;
  std::vector<int> thread_group_, group_begin_, group_node_;
  std::vector<std::thread> threads_;

  // Next unclaimed index of the fan-out of generation `gen` (-1: none left or another fan-out).
  int claim(uint64_t gen);

  // Fan-out state: a generation bump publishes job_ to the workers, whose indices are claimed
  // from claim_ (generation << 16 | next index) and counted in done_ when finished.
  std::atomic<const Job*> job_{nullptr};
  std::atomic<uint64_t> generation_{0};
  std::atomic<uint64_t> claim_{0};
  std::atomic<int> done_{0};
  std::atomic<int> sleepers_{0};
  std::mutex wake_mu_;
  std::condition_variable wake_cv_;
  std::exception_ptr job_error_;
  std::mutex job_error_mu_;

  // Task queue.
  std::mutex q_mu_;
  std::condition_variable q_cv_, done_cv_;
  std::deque<std::function<void()>> queue_;
  std::vector<std::function<void()>> finished_;  // run tasks, freed by the next submit/sync
  uint64_t submitted_ = 0;
  std::atomic<int64_t> queued_{0};  // tasks in queue_: the queue thread spins on it before sleeping
  std::atomic<uint64_t> completed_{0};
  std::exception_ptr task_error_;
  bool stop_ = false;
  bool inline_ok_ = true;         // KTRANS_POOL_INLINE unset or not "0"
  bool inline_running_ = false;   // a task runs on a caller's thread: the queue thread waits
};

}  // namespace ktrans
