// Stream-ordered CPU work without linking CUDA: `cudaLaunchHostFunc` is resolved at run time from
// the CUDA runtime that the process (torch) already loaded, so the extension loads and runs on a
// machine with no GPU and no CUDA libraries at all.
//
// A stream-ordered task is two host functions on the stream: `start` submits the task to the
// pool and returns at once (the GPU goes on with work queued after it, e.g. shared experts), and
// `wait` blocks the stream until the task is done (so the GPU op that reads its output is
// ordered after it). Both are capturable in a CUDA graph; replaying the graph re-runs the task
// with the same buffers.
//
// The memop hand-off does the same without host functions (no trip through CUDA's callback
// thread): `arm` queues a pool job that spins until the GPU's start flag is set, the GPU sets it
// with a stream write (cuStreamWriteValue32) where the host function would run, and waits for
// the job's done flag with a stream wait (cuStreamWaitValue32), then clears it. The two flags
// live in pinned (device-mapped) host memory the caller owns. Stream writes and waits are
// captured in CUDA graphs like kernels; a captured task is armed again before every replay.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "common/threadpool.h"

namespace ktrans {

// True when a loaded CUDA runtime exposes cudaLaunchHostFunc.
bool cuda_host_available();
// Why cuda_host_available() is false (for error messages); empty when it is true.
std::string cuda_host_unavailable_reason();
// True when the loaded CUDA driver exposes the stream memory operations of the memop hand-off.
bool cuda_memops_available();
std::string cuda_memops_unavailable_reason();

// One reusable stream-ordered task. Must outlive every launch (and every graph that captured it).
class StreamTask {
 public:
  StreamTask(ThreadPool* pool, std::function<void()> fn) : pool_(pool), fn_(std::move(fn)) {}
  // Enqueue start (submit to the pool) on `stream` (a cudaStream_t as an integer; 0 = legacy).
  void launch_start(uintptr_t stream);
  // Enqueue wait (block the stream until the task finished) on `stream`.
  void launch_wait(uintptr_t stream);
  // First error raised by a stream-ordered run (host functions cannot throw); cleared on read.
  std::string take_error();

  // -- memop hand-off --
  // The two uint32 flags [start, done] (pinned host memory, device-mapped; both 0 when set).
  void set_flags(uint32_t* flags) { flags_ = flags; }
  // Queue the pool job of one run: wait for start, clear it, run, set done.
  void arm();
  // Enqueue the start flag's write on `stream`.
  void launch_start_memop(uintptr_t stream);
  // Enqueue the wait for the done flag, then its clearing, on `stream`.
  void launch_wait_memop(uintptr_t stream);

 private:
  static void start_cb(void* self);
  static void wait_cb(void* self);
  ThreadPool* pool_;
  std::function<void()> fn_;
  uint64_t ticket_ = 0;
  std::string error_;
  uint32_t* flags_ = nullptr;
};

}  // namespace ktrans
