// What jaxcascade's CPU kernels share: the target's vectors (simd.h) and a task runner on XLA's thread pool.
#ifndef JAXCASCADE_KERNELS_PARALLEL_H_
#define JAXCASCADE_KERNELS_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jaxcascade {

// Tasks handed out from a shared counter to the pool's threads and the calling one (which so never waits
// on a pool thread that has not started). Which thread runs a task never changes what it computes.
struct Work {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t tasks = 0;
  std::mutex mutex;
  std::condition_variable finished;
};

template <typename Task>
void run_tasks(ffi::ThreadPool& pool, int64_t tasks, Task task) {
  if (tasks <= 0) return;
  auto work = std::make_shared<Work>();
  work->tasks = tasks;
  // `task` may refer to the caller's frame: a worker calls it only while tasks are left, i.e. before
  // this function returns; a worker the pool starts later finds none and only touches `work`.
  auto worker = [work, task] {
    for (;;) {
      const int64_t index = work->next.fetch_add(1);
      if (index >= work->tasks) return;
      task(index);
      if (work->done.fetch_add(1) + 1 == work->tasks) {
        std::lock_guard<std::mutex> lock(work->mutex);
        work->finished.notify_all();
      }
    }
  };
  const int64_t helpers = std::min<int64_t>(std::max<int64_t>(1, pool.num_threads()), tasks - 1);
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([worker] { worker(); });
  worker();
  std::unique_lock<std::mutex> lock(work->mutex);
  work->finished.wait(lock, [&] { return work->done.load() == work->tasks; });
}

// `rows` independent rows in a few chunks per thread (rows of unequal cost balance without much contention);
// rows(first, last) computes [first, last).
template <typename Rows>
void run_row_chunks(ffi::ThreadPool& pool, int64_t rows, Rows compute) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t chunk = std::max<int64_t>(1, rows / (4 * (threads + 1)));
  run_tasks(pool, (rows + chunk - 1) / chunk, [compute, rows, chunk](int64_t task) {
    compute(task * chunk, std::min(rows, (task + 1) * chunk));
  });
}

}  // namespace jaxcascade

#endif  // JAXCASCADE_KERNELS_PARALLEL_H_
