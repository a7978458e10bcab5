// Shared by jaxaccel's XLA FFI CPU kernels (built by build.py): running work on XLA's intra-op pool.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace jaxaccel {

// Bookkeeping for Parallel: how many pool copies are running, and whether new ones may start.
struct Join {
  std::mutex mu;
  std::condition_variable cv;
  int active = 0;
  bool closed = false;
};

// Runs `work()` on the caller and on up to n - 1 pool threads; returns when every started copy is done.
// Copies that start after the caller has finished do nothing (so none touches freed buffers); `work`
// must therefore take its items from a shared counter, so that the caller alone can do all of them.
template <typename F>
void Parallel(xla::ffi::ThreadPool& pool, int64_t n, F work) {
  auto join = std::make_shared<Join>();
  auto shared_work = std::make_shared<F>(std::move(work));
  for (int64_t t = 1; t < n; ++t) {
    pool.Schedule([join, shared_work]() {
      {
        std::lock_guard<std::mutex> lock(join->mu);
        if (join->closed) return;
        ++join->active;
      }
      (*shared_work)();
      std::lock_guard<std::mutex> lock(join->mu);
      if (--join->active == 0) join->cv.notify_all();
    });
  }
  (*shared_work)();
  std::unique_lock<std::mutex> lock(join->mu);
  join->closed = true;
  join->cv.wait(lock, [&] { return join->active == 0; });
}

// Winograd F(2x2, 3x3) tiles: tile `tile` of a batch with a th x tw grid of tiles per image is
// image `img`, and its 2x2 outputs start at row `row`, column `col`.
struct TileOrigin {
  int64_t img, row, col;
};

inline TileOrigin TileAt(int64_t tile, int64_t th, int64_t tw) {
  const int64_t rem = tile % (th * tw);
  return {tile / (th * tw), 2 * (rem / tw), 2 * (rem % tw)};
}

}  // namespace jaxaccel
