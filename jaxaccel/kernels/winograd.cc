// Winograd F(2x2, 3x3) float32 convolution for XLA:CPU on AVX2 + FMA or AVX-512: XLA FFI custom calls
// (see winograd.py). Three handlers: JaxaccelWinogradConv (y), JaxaccelWinogradConvPool
// (y's 2x2 max-pool and each window's first-maximum position) and JaxaccelWinogradFilterGrad
// (the transformed kernel's gradient; see the "filter gradient" section).
//
// y = conv(x, g): 3x3 kernel, stride 1, one row/column of zero padding on each side ("SAME"),
// NHWC. Each 2x2 block of outputs (a tile) is computed from its 4x4 input window d as
//   Y = A^T [ sum_c (B^T d_c B) * U_c ] A,   U_c = G g_c G^T  (16 numbers per (c, k) pair),
// i.e. 16 independent matmuls V[xi] (tiles x C) @ U[xi] (C x K), one per position xi of the
// 4x4 transformed tile: 16 multiplies per 2x2 outputs instead of 36 (2.25x fewer).
// U arrives transformed and packed by the caller ([16][K/16][C][16]); the kernel transforms
// input tiles into a per-thread buffer (no transformed input in memory), runs the 16 matmuls
// with a 6 x 16 FMA register tile (two ymm, or one zmm per row in an AVX-512 build: the same
// FMAs in the same order per output, so the same floats), and transforms their results
// straight into y. Chunks of tiles are split over XLA's intra-op thread pool.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using jaxaccel::Parallel;
using jaxaccel::TileAt;

namespace {

constexpr int64_t kMR = 6;   // tiles per register tile
constexpr int64_t kNR = 16;  // output channels per register tile (two ymm or one zmm)

struct Geometry {
  int64_t n, h, w, c, k;  // input NHWC and output channels (output is n x h x w x k)
  int64_t th, tw;         // tiles per image: ceil(h / 2), ceil(w / 2)
  int64_t tiles() const { return n * th * tw; }
};

// Tiles per chunk: the transformed inputs of a chunk (16 x T x C floats) stay in L2, and there are
// enough chunks (4 per thread) to keep the threads evenly busy.
int64_t ChunkTiles(int64_t c, int64_t tiles, int64_t threads) {
  const int64_t cache_panels = std::max<int64_t>(1, std::min<int64_t>(16, 512 / c));
  const int64_t even_panels = std::max<int64_t>(1, (tiles + 4 * threads * kMR - 1) / (4 * threads * kMR));
  return std::min(cache_panels, even_panels) * kMR;
}

// V[xi][t][c0:c0+8] = (B^T d B)[xi] for tile `tile` of the chunk, d its 4x4 window (zero outside).
void TransformInput(const float* x, const Geometry& g, int64_t tile, float* v, int64_t t, int64_t stride) {
  const auto [img, out_row, out_col] = TileAt(tile, g.th, g.tw);
  const int64_t r0 = out_row - 1, q0 = out_col - 1;  // the window starts one before: "SAME" padding
  const float* base = x + img * g.h * g.w * g.c;
  const bool interior = r0 >= 0 && q0 >= 0 && r0 + 4 <= g.h && q0 + 4 <= g.w;
  for (int64_t c0 = 0; c0 < g.c; c0 += 8) {
    __m256 d[4][4];
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) {
        const int64_t r = r0 + i, q = q0 + j;
        d[i][j] = (interior || (r >= 0 && r < g.h && q >= 0 && q < g.w))
                      ? _mm256_loadu_ps(base + (r * g.w + q) * g.c + c0)
                      : _mm256_setzero_ps();
      }
    __m256 s[4][4];  // B^T d: combine rows
    for (int j = 0; j < 4; ++j) {
      s[0][j] = _mm256_sub_ps(d[0][j], d[2][j]);
      s[1][j] = _mm256_add_ps(d[1][j], d[2][j]);
      s[2][j] = _mm256_sub_ps(d[2][j], d[1][j]);
      s[3][j] = _mm256_sub_ps(d[1][j], d[3][j]);
    }
    for (int i = 0; i < 4; ++i) {  // (B^T d) B: combine columns
      float* dst = v + (i * 4) * stride + t * g.c + c0;
      _mm256_storeu_ps(dst, _mm256_sub_ps(s[i][0], s[i][2]));
      _mm256_storeu_ps(dst + stride, _mm256_add_ps(s[i][1], s[i][2]));
      _mm256_storeu_ps(dst + 2 * stride, _mm256_sub_ps(s[i][2], s[i][1]));
      _mm256_storeu_ps(dst + 3 * stride, _mm256_sub_ps(s[i][1], s[i][3]));
    }
  }
}

// m[r][0:16] = sum_c v[r * c_len + c] * u[c][0:16] for R tiles r (a 6 x 16 register tile at most).
template <int R>
inline void Tile(const float* v, const float* u, int64_t c_len, float* m) {
#if JAXACCEL_AVX512
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t c = 0; c < c_len; ++c) {
    const __m512 u0 = _mm512_loadu_ps(u + c * kNR);
    for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(v[r * c_len + c]), u0, acc[r]);
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(m + r * kNR, acc[r]);
#else
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t c = 0; c < c_len; ++c) {
    const __m256 u0 = _mm256_loadu_ps(u + c * kNR), u1 = _mm256_loadu_ps(u + c * kNR + 8);
    for (int r = 0; r < R; ++r) {
      const __m256 a = _mm256_broadcast_ss(v + r * c_len + c);
      acc[r][0] = _mm256_fmadd_ps(a, u0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(a, u1, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(m + r * kNR, acc[r][0]);
    _mm256_storeu_ps(m + r * kNR + 8, acc[r][1]);
  }
#endif
}

// The 2x2 outputs A^T M A of tile t, channels [half * 8, half * 8 + 8) of a 16-channel block, as
// y[row * 2 + col]; M[xi] = m[xi][t][0:16], the chunk's matmul results.
inline void OutputTile(const float* m, int64_t t_len, int64_t t, int half, __m256 y[4]) {
  __m256 s[2][4];  // A^T M: combine rows
  for (int j = 0; j < 4; ++j) {
    const float* p = m + (j * t_len + t) * kNR + half * 8;
    const int64_t st = 4 * t_len * kNR;  // next row of the 4x4 (xi + 4)
    const __m256 m0 = _mm256_loadu_ps(p), m1 = _mm256_loadu_ps(p + st), m2 = _mm256_loadu_ps(p + 2 * st),
                 m3 = _mm256_loadu_ps(p + 3 * st);
    s[0][j] = _mm256_add_ps(_mm256_add_ps(m0, m1), m2);
    s[1][j] = _mm256_sub_ps(_mm256_sub_ps(m1, m2), m3);
  }
  for (int i = 0; i < 2; ++i) {  // (A^T M) A: combine columns
    y[2 * i] = _mm256_add_ps(_mm256_add_ps(s[i][0], s[i][1]), s[i][2]);
    y[2 * i + 1] = _mm256_sub_ps(_mm256_sub_ps(s[i][1], s[i][2]), s[i][3]);
  }
}

// y[tile's 2x2 block][k0:k0+16] = A^T M A for each tile of the chunk (clipped at odd edges).
void TransformOutput(const float* m, int64_t t_len, const Geometry& g, int64_t first_tile, int64_t k0, float* y) {
  for (int64_t t = 0; t < t_len; ++t) {
    const auto [img, r0, q0] = TileAt(first_tile + t, g.th, g.tw);
    for (int half = 0; half < 2; ++half) {
      __m256 out[4];
      OutputTile(m, t_len, t, half, out);
      for (int i = 0; i < 2 && r0 + i < g.h; ++i) {
        float* dst = y + ((img * g.h + r0 + i) * g.w + q0) * g.k + k0 + half * 8;
        _mm256_storeu_ps(dst, out[2 * i]);
        if (q0 + 1 < g.w) _mm256_storeu_ps(dst + g.k, out[2 * i + 1]);
      }
    }
  }
}

// The same with the 2x2 max-pool fused (h, w even: a tile is one pool window): writes each window's
// maximum to `pooled` (n x h/2 x w/2 x k) and the row-major index (0-3) of its first maximum to
// `first`, which is all the pool's gradient needs.
void TransformOutputPooled(const float* m, int64_t t_len, const Geometry& g, int64_t first_tile, int64_t k0,
                           float* pooled, int8_t* first) {
  for (int64_t t = 0; t < t_len; ++t) {
    const int64_t out = (first_tile + t) * g.k + k0;  // tile index = pooled position (n, i, j)
    for (int half = 0; half < 2; ++half) {
      __m256 y[4];
      OutputTile(m, t_len, t, half, y);
      __m256 best = y[0], arg = _mm256_setzero_ps();
      for (int q = 1; q < 4; ++q) {  // strictly greater: ties keep the earlier position
        const __m256 gt = _mm256_cmp_ps(y[q], best, _CMP_GT_OQ);
        best = _mm256_blendv_ps(best, y[q], gt);
        arg = _mm256_blendv_ps(arg, _mm256_set1_ps(static_cast<float>(q)), gt);
      }
      _mm256_storeu_ps(pooled + out + half * 8, best);
      alignas(32) int32_t idx[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(idx), _mm256_cvtps_epi32(arg));
      for (int l = 0; l < 8; ++l) first[out + half * 8 + l] = static_cast<int8_t>(idx[l]);
    }
  }
}

// Worker: takes chunks of tiles until none is left; writes y, or (with `first_max`) the pooled y and
// the first-maximum indices.
void RunChunks(const float* x, const float* u, const Geometry& g, int64_t chunk, float* y, int8_t* first_max,
               std::atomic<int64_t>* next) {
  const int64_t stride = chunk * g.c;  // floats per xi in the transformed-input buffer
  std::vector<float> v(16 * stride), m(16 * chunk * kNR);
  const int64_t chunks = (g.tiles() + chunk - 1) / chunk;
  for (int64_t ci = next->fetch_add(1); ci < chunks; ci = next->fetch_add(1)) {
    const int64_t first = ci * chunk, t_len = std::min(chunk, g.tiles() - first);
    for (int64_t t = 0; t < t_len; ++t) TransformInput(x, g, first + t, v.data(), t, stride);
    for (int64_t kb = 0; kb < g.k / kNR; ++kb) {
      for (int xi = 0; xi < 16; ++xi) {
        const float* uk = u + (xi * (g.k / kNR) + kb) * g.c * kNR;
        const float* vx = v.data() + xi * stride;
        float* mx = m.data() + xi * t_len * kNR;
        int64_t t = 0;
        for (; t + kMR <= t_len; t += kMR) Tile<kMR>(vx + t * g.c, uk, g.c, mx + t * kNR);
        for (; t < t_len; ++t) Tile<1>(vx + t * g.c, uk, g.c, mx + t * kNR);
      }
      if (first_max != nullptr)
        TransformOutputPooled(m.data(), t_len, g, first, kb * kNR, y, first_max);
      else
        TransformOutput(m.data(), t_len, g, first, kb * kNR, y);
    }
  }
}

// ---------------------------------------------------------------------------- filter gradient
// The forward is linear in U, so dL/dU[xi] = sum over tiles V[xi]^T (A dY A^T)[xi]: 16 matmuls
// (C x tiles) @ (tiles x K) of transformed input tiles and transformed output-gradient tiles;
// the caller maps dU to the 3x3 kernel's gradient (G^T dU G). Each thread accumulates its own
// dU over its chunks of tiles; the partial sums are added at the end.

// dm[xi][t][k0:k0+8] = (A dY A^T)[xi] for tile `tile`: A (4x2) spreads its 2x2 block of dY (zero outside).
void TransformOutputGrad(const float* dy, const Geometry& g, int64_t tile, float* dm, int64_t t, int64_t stride) {
  const auto [img, r0, q0] = TileAt(tile, g.th, g.tw);
  const float* base = dy + img * g.h * g.w * g.k;
  const __m256 zero = _mm256_setzero_ps();
  for (int64_t k0 = 0; k0 < g.k; k0 += 8) {
    __m256 d[2][2];
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j)
        d[i][j] = (r0 + i < g.h && q0 + j < g.w) ? _mm256_loadu_ps(base + ((r0 + i) * g.w + q0 + j) * g.k + k0)
                                                 : zero;
    __m256 s[4][2];  // A dY: rows (d0, d0 + d1, d0 - d1, -d1)
    for (int j = 0; j < 2; ++j) {
      s[0][j] = d[0][j];
      s[1][j] = _mm256_add_ps(d[0][j], d[1][j]);
      s[2][j] = _mm256_sub_ps(d[0][j], d[1][j]);
      s[3][j] = _mm256_sub_ps(zero, d[1][j]);
    }
    for (int a = 0; a < 4; ++a) {  // (A dY) A^T: the same on columns
      float* dst = dm + (a * 4) * stride + t * g.k + k0;
      _mm256_storeu_ps(dst, s[a][0]);
      _mm256_storeu_ps(dst + stride, _mm256_add_ps(s[a][0], s[a][1]));
      _mm256_storeu_ps(dst + 2 * stride, _mm256_sub_ps(s[a][0], s[a][1]));
      _mm256_storeu_ps(dst + 3 * stride, _mm256_sub_ps(zero, s[a][1]));
    }
  }
}

// du[r][0:16] (rows r of C, stride k_len) += sum_t v[t * c_len + r] * dm[t * k_len + 0:16].
template <int R>
inline void TileGrad(const float* v, int64_t c_len, const float* dm, int64_t k_len, int64_t t_len, float* du) {
#if JAXACCEL_AVX512
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_loadu_ps(du + r * k_len);
  for (int64_t t = 0; t < t_len; ++t) {
    const __m512 d0 = _mm512_loadu_ps(dm + t * k_len);
    for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(v[t * c_len + r]), d0, acc[r]);
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(du + r * k_len, acc[r]);
#else
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) {
    acc[r][0] = _mm256_loadu_ps(du + r * k_len);
    acc[r][1] = _mm256_loadu_ps(du + r * k_len + 8);
  }
  for (int64_t t = 0; t < t_len; ++t) {
    const __m256 d0 = _mm256_loadu_ps(dm + t * k_len), d1 = _mm256_loadu_ps(dm + t * k_len + 8);
    for (int r = 0; r < R; ++r) {
      const __m256 a = _mm256_broadcast_ss(v + t * c_len + r);
      acc[r][0] = _mm256_fmadd_ps(a, d0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(a, d1, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(du + r * k_len, acc[r][0]);
    _mm256_storeu_ps(du + r * k_len + 8, acc[r][1]);
  }
#endif
}

void TileGradRows(int rows, const float* v, int64_t c_len, const float* dm, int64_t k_len, int64_t t_len, float* du) {
  switch (rows) {
    case 6: return TileGrad<6>(v, c_len, dm, k_len, t_len, du);
    case 5: return TileGrad<5>(v, c_len, dm, k_len, t_len, du);
    case 4: return TileGrad<4>(v, c_len, dm, k_len, t_len, du);
    case 3: return TileGrad<3>(v, c_len, dm, k_len, t_len, du);
    case 2: return TileGrad<2>(v, c_len, dm, k_len, t_len, du);
    default: return TileGrad<1>(v, c_len, dm, k_len, t_len, du);
  }
}

// Adds the dU of chunks [c_begin, c_end) of tiles, in order, into `du` (16 x C x K).
void RunFilterGradSlice(const float* x, const float* dy, const Geometry& g, int64_t chunk, int64_t c_begin,
                        int64_t c_end, float* du) {
  const int64_t vs = chunk * g.c, ms = chunk * g.k;  // floats per xi in the two tile buffers
  std::vector<float> v(16 * vs), dm(16 * ms);
  for (int64_t ci = c_begin; ci < c_end; ++ci) {
    const int64_t first = ci * chunk, t_len = std::min(chunk, g.tiles() - first);
    for (int64_t t = 0; t < t_len; ++t) {
      TransformInput(x, g, first + t, v.data(), t, vs);
      TransformOutputGrad(dy, g, first + t, dm.data(), t, ms);
    }
    for (int xi = 0; xi < 16; ++xi) {
      const float* vx = v.data() + xi * vs;
      const float* mx = dm.data() + xi * ms;
      float* ux = du + xi * g.c * g.k;
      for (int64_t k0 = 0; k0 < g.k; k0 += kNR)
        for (int64_t c0 = 0; c0 < g.c; c0 += kMR)
          TileGradRows(static_cast<int>(std::min(kMR, g.c - c0)), vx + c0, g.c, mx + k0, g.k, t_len,
                       ux + c0 * g.k + k0);
    }
  }
}

// Checks x [n, h, w, c] and u [16, k/16, c, 16]; fills `g`. An empty message means fine.
const char* ConvGeometry(ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::F32>& u, Geometry* g) {
  const auto xd = x.dimensions();
  const auto ud = u.dimensions();
  if (xd.size() != 4 || ud.size() != 4) return "winograd conv: x must be NHWC, u [16, K/16, C, 16]";
  *g = Geometry{xd[0], xd[1], xd[2], xd[3], ud[1] * kNR, (xd[1] + 1) / 2, (xd[2] + 1) / 2};
  if (ud[0] != 16 || ud[2] != g->c || ud[3] != kNR) return "winograd conv: u must be [16, K/16, C, 16]";
  if (g->c % 8 != 0) return "winograd conv: input channels must be a multiple of 8";
  return "";
}

void RunConv(ffi::ThreadPool& pool, const float* x, const float* u, const Geometry& g, float* y, int8_t* first_max) {
  const int64_t chunk = ChunkTiles(g.c, g.tiles(), std::max<int64_t>(1, pool.num_threads()));
  const int64_t chunks = (g.tiles() + chunk - 1) / chunk;
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), chunks));
  std::atomic<int64_t> next{0};
  Parallel(pool, threads, [&] { RunChunks(x, u, g, chunk, y, first_max, &next); });
}

ffi::Error WinogradConvImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> u,
                            ffi::ResultBuffer<ffi::F32> y) {
  Geometry g;
  const char* error = ConvGeometry(x, u, &g);
  if (*error) return ffi::Error::InvalidArgument(error);
  RunConv(pool, x.typed_data(), u.typed_data(), g, y->typed_data(), nullptr);
  return ffi::Error::Success();
}

ffi::Error WinogradConvPoolImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> u,
                                ffi::ResultBuffer<ffi::F32> pooled, ffi::ResultBuffer<ffi::S8> first) {
  Geometry g;
  const char* error = ConvGeometry(x, u, &g);
  if (*error) return ffi::Error::InvalidArgument(error);
  if (g.h % 2 != 0 || g.w % 2 != 0) return ffi::Error::InvalidArgument("winograd conv+pool: h and w must be even");
  RunConv(pool, x.typed_data(), u.typed_data(), g, pooled->typed_data(), first->typed_data());
  return ffi::Error::Success();
}

ffi::Error WinogradFilterGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                                  ffi::ResultBuffer<ffi::F32> du) {
  const auto xd = x.dimensions();
  const auto yd = dy.dimensions();
  if (xd.size() != 4 || yd.size() != 4 || yd[0] != xd[0] || yd[1] != xd[1] || yd[2] != xd[2])
    return ffi::Error::InvalidArgument("winograd filter grad: x and dy must be NHWC of the same N, H, W");
  Geometry g{xd[0], xd[1], xd[2], xd[3], yd[3], (xd[1] + 1) / 2, (xd[2] + 1) / 2};
  if (g.c % 8 != 0 || g.k % kNR != 0)
    return ffi::Error::InvalidArgument("winograd filter grad: channels must be multiples of 8 (x) and 16 (dy)");
  // Deterministic: the tiles are cut into kSlices fixed slices (by shape alone), each summed in
  // order into its own partial dU by whichever thread takes it, and the partials are added in
  // slice order, so the result does not depend on thread timing (training runs reproduce).
  constexpr int64_t kSlices = 4;
  const int64_t size = 16 * g.c * g.k;
  const int64_t chunk = std::max<int64_t>(kMR, std::min<int64_t>(48, (g.tiles() + 2 * kSlices - 1) / (2 * kSlices)));
  const int64_t chunks = (g.tiles() + chunk - 1) / chunk;
  const int64_t slices = std::min(kSlices, chunks);
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), slices));
  std::vector<std::vector<float>> partial(slices);
  std::atomic<int64_t> next{0};
  const float* xp = x.typed_data();
  const float* dyp = dy.typed_data();
  Parallel(pool, threads, [&] {
    for (int64_t i = next.fetch_add(1); i < slices; i = next.fetch_add(1)) {
      partial[i].assign(size, 0.0f);
      RunFilterGradSlice(xp, dyp, g, chunk, i * chunks / slices, (i + 1) * chunks / slices, partial[i].data());
    }
  });
  float* out = du->typed_data();
  std::memset(out, 0, size * sizeof(float));
  for (const std::vector<float>& p : partial) {  // every slice is filled: the caller takes any left
    int64_t i = 0;
    for (; i + 8 <= size; i += 8)
      _mm256_storeu_ps(out + i, _mm256_add_ps(_mm256_loadu_ps(out + i), _mm256_loadu_ps(p.data() + i)));
    for (; i < size; ++i) out[i] += p[i];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxaccelWinogradConv, WinogradConvImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxaccelWinogradFilterGrad, WinogradFilterGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxaccelWinogradConvPool, WinogradConvPoolImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S8>>());
