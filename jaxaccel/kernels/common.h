// Shared by jaxaccel's XLA FFI CPU kernels (built by build.py): the instruction set a build
// targets, and running work on XLA's intra-op pool.
#pragma once

// JAXACCEL_AVX512: AVX-512 F + BW (zmm code paths); JAXACCEL_VNNI: also AVX-512 VNNI. Both follow
// the compiler's target flags (build.py's ISAS). JAXACCEL_SIMDE_AVX512_VNNI (tests only): the
// AVX-512 VNNI code compiled for an AVX2 CPU with SIMDe's portable implementations of the
// AVX-512 intrinsics, so the wide paths are tested for equality on a CPU without them.
#if defined(JAXACCEL_SIMDE_AVX512_VNNI)
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#define JAXACCEL_AVX512 1
#define JAXACCEL_VNNI 1
#else
#include <immintrin.h>
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define JAXACCEL_AVX512 1
#else
#define JAXACCEL_AVX512 0
#endif
#if JAXACCEL_AVX512 && defined(__AVX512VNNI__)
#define JAXACCEL_VNNI 1
#else
#define JAXACCEL_VNNI 0
#endif
#endif

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

// Winograd tiles of `size` x `size` outputs (2: F(2x2, 3x3), 4: F(4x4, 3x3)): tile `tile` of a
// batch with a th x tw grid of tiles per image is image `img`, and its outputs start at row `row`,
// column `col`.
struct TileOrigin {
  int64_t img, row, col;
};

inline TileOrigin TileAt(int64_t tile, int64_t th, int64_t tw, int64_t size = 2) {
  const int64_t rem = tile % (th * tw);
  return {tile / (th * tw), size * (rem / tw), size * (rem % tw)};
}

}  // namespace jaxaccel
