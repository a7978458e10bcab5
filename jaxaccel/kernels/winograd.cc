// Winograd F(4x4, 3x3) float32 convolution for XLA:CPU on AVX2 + FMA or AVX-512: XLA FFI custom calls
// (see winograd.py). Handlers: JaxaccelWinogradConv (y), JaxaccelWinogradConvPool (y's 2x2
// max-pool and each window's first-maximum position), JaxaccelWinogradFilterGrad (the transformed
// kernel's gradient; see the "filter gradient" section), and the two gradients of conv + pool from
// the pooled gradient, which read it unpooled instead of having it written out (`Unpooled`):
// JaxaccelWinogradConvUnpool (the input gradient) and JaxaccelWinogradFilterGradUnpool.
//
// y = conv(x, g): 3x3 kernel, stride 1, one row/column of zero padding on each side ("SAME"),
// NHWC. Each 4x4 block of outputs (a tile) is computed from its 6x6 input window d as
//   Y = A^T [ sum_c (B^T d_c B) * U_c ] A,   U_c = G g_c G^T  (36 numbers per (c, k) pair),
// i.e. 36 independent matmuls V[xi] (tiles x C) @ U[xi] (C x K), one per position xi of the
// 6x6 transformed tile: 36 multiplies per 16 outputs instead of 144 (4x fewer; F(2x2, 3x3)
// saves 2.25x). B, G and A are winograd.py's BT4, G4 and AT4, spelled out here as sums.
// U arrives transformed and packed by the caller ([36][K/16][C][16]); the kernel transforms
// input tiles into a per-thread buffer (no transformed input in memory), runs the 36 matmuls
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
constexpr int kXi = 36;      // forward: F(4x4, 3x3), 6x6 transformed tiles

struct Geometry {
  int64_t n, h, w, c, k;  // input NHWC and output channels (output is n x h x w x k)
  int64_t th, tw;         // tiles per image: ceil(h / size), ceil(w / size) for size x size tiles
  int64_t tiles() const { return n * th * tw; }
};

// Forward tiles per chunk: the transformed inputs of a chunk (36 x T x C floats) and its matmul
// results (36 x T x 16) stay in L2, and there are enough chunks (4 per thread) to keep the threads
// evenly busy.
int64_t ChunkTiles(int64_t c, int64_t tiles, int64_t threads) {
  const int64_t cache_panels = std::max<int64_t>(1, std::min<int64_t>(8, 224 / c));
  const int64_t even_panels = std::max<int64_t>(1, (tiles + 4 * threads * kMR - 1) / (4 * threads * kMR));
  return std::min(cache_panels, even_panels) * kMR;
}

// B^T of F(4x4, 3x3) applied to d0..d5 (one row or column of a 6x6 window), with explicit FMAs:
// (4d0 - 5d2 + d4, -4d1 - 4d2 + d3 + d4, 4d1 - 4d2 - d3 + d4, -2d1 - d2 + 2d3 + d4,
//  2d1 - d2 - 2d3 + d4, 4d1 - 5d3 + d5).
inline void InputRows(const __m256 d[6], __m256 r[6]) {
  const __m256 four = _mm256_set1_ps(4.0f), five = _mm256_set1_ps(5.0f), two = _mm256_set1_ps(2.0f);
  const __m256 a = _mm256_fnmadd_ps(four, d[2], d[4]), b = _mm256_fnmadd_ps(four, d[1], d[3]);
  const __m256 c = _mm256_sub_ps(d[4], d[2]), e = _mm256_mul_ps(two, _mm256_sub_ps(d[3], d[1]));
  r[0] = _mm256_fmadd_ps(four, d[0], _mm256_fnmadd_ps(five, d[2], d[4]));
  r[1] = _mm256_add_ps(a, b);
  r[2] = _mm256_sub_ps(a, b);
  r[3] = _mm256_add_ps(c, e);
  r[4] = _mm256_sub_ps(c, e);
  r[5] = _mm256_fmadd_ps(four, d[1], _mm256_fnmadd_ps(five, d[3], d[5]));
}

// Unpooling (`route` given): the gradient of a 2x2 max-pool's input, never written out. Position
// (r, q) of an h x w x c map is the pooled gradient p[r/2][q/2] where `route`[r/2][q/2] (each
// window's first maximum, row-major 0-3) names it, and +0 elsewhere (pooled maps: h/2 x w/2 x c).
// These are the exact values of models.conv_impls' _route_to_first.
inline __m256 Unpooled(const float* pooled, const int8_t* route, int64_t pw, int64_t c, int64_t img_ph, int64_t r,
                       int64_t q, int64_t c0) {
  const int64_t at = ((img_ph + (r >> 1)) * pw + (q >> 1)) * c + c0;
  const __m256i first = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(route + at)));
  const __m256i here = _mm256_set1_epi32(static_cast<int>(2 * (r & 1) + (q & 1)));
  return _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(first, here)), _mm256_loadu_ps(pooled + at));
}

// V[xi][t][c0:c0+8] = (B^T d B)[xi] for tile `tile` of the chunk, d its 6x6 window (zero outside);
// with `route`, x is pooled and d is read unpooled (`Unpooled`).
void TransformInput(const float* x, const int8_t* route, const Geometry& g, int64_t tile, float* v, int64_t t,
                    int64_t stride) {
  const auto [img, out_row, out_col] = TileAt(tile, g.th, g.tw, 4);
  const int64_t r0 = out_row - 1, q0 = out_col - 1;  // the window starts one before: "SAME" padding
  const float* base = x + img * g.h * g.w * g.c;
  const bool interior = r0 >= 0 && q0 >= 0 && r0 + 6 <= g.h && q0 + 6 <= g.w;
  for (int64_t c0 = 0; c0 < g.c; c0 += 8) {
    __m256 s[6][6];  // B^T d: combine rows (s[i][j]: row i of the result, column j of d)
    for (int j = 0; j < 6; ++j) {
      __m256 d[6];
      const int64_t q = q0 + j;
      for (int i = 0; i < 6; ++i) {
        const int64_t r = r0 + i;
        if (!interior && (r < 0 || r >= g.h || q < 0 || q >= g.w))
          d[i] = _mm256_setzero_ps();
        else if (route != nullptr)
          d[i] = Unpooled(x, route, g.w / 2, g.c, img * (g.h / 2), r, q, c0);
        else
          d[i] = _mm256_loadu_ps(base + (r * g.w + q) * g.c + c0);
      }
      __m256 col[6];
      InputRows(d, col);
      for (int i = 0; i < 6; ++i) s[i][j] = col[i];
    }
    for (int i = 0; i < 6; ++i) {  // (B^T d) B: combine columns
      __m256 out[6];
      InputRows(s[i], out);
      float* dst = v + (i * 6) * stride + t * g.c + c0;
      for (int j = 0; j < 6; ++j) _mm256_storeu_ps(dst + j * stride, out[j]);
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

// A^T of F(4x4, 3x3) applied to m0..m5: (m0 + m1 + m2 + m3 + m4, m1 - m2 + 2(m3 - m4),
// m1 + m2 + 4(m3 + m4), m1 - m2 + 8(m3 - m4) + m5).
inline void OutputRows(const __m256 m[6], __m256 y[4]) {
  const __m256 p = _mm256_add_ps(m[1], m[2]), q = _mm256_sub_ps(m[1], m[2]);
  const __m256 s = _mm256_add_ps(m[3], m[4]), d = _mm256_sub_ps(m[3], m[4]);
  y[0] = _mm256_add_ps(_mm256_add_ps(m[0], p), s);
  y[1] = _mm256_fmadd_ps(_mm256_set1_ps(2.0f), d, q);
  y[2] = _mm256_fmadd_ps(_mm256_set1_ps(4.0f), s, p);
  y[3] = _mm256_add_ps(_mm256_fmadd_ps(_mm256_set1_ps(8.0f), d, q), m[5]);
}

// The 4x4 outputs A^T M A of tile t, channels [half * 8, half * 8 + 8) of a 16-channel block, as
// y[row * 4 + col]; M[xi] = m[xi][t][0:16], the chunk's matmul results.
inline void OutputTile(const float* m, int64_t t_len, int64_t t, int half, __m256 y[16]) {
  __m256 s[4][6];  // A^T M: combine rows
  const int64_t st = t_len * kNR;  // next xi
  for (int j = 0; j < 6; ++j) {
    __m256 col[6], out[4];
    for (int i = 0; i < 6; ++i) col[i] = _mm256_loadu_ps(m + (i * 6 + j) * st + t * kNR + half * 8);
    OutputRows(col, out);
    for (int i = 0; i < 4; ++i) s[i][j] = out[i];
  }
  for (int i = 0; i < 4; ++i) OutputRows(s[i], y + 4 * i);  // (A^T M) A: combine columns
}

// y[tile's 4x4 block][k0:k0+16] = A^T M A for each tile of the chunk (clipped at the edges).
void TransformOutput(const float* m, int64_t t_len, const Geometry& g, int64_t first_tile, int64_t k0, float* y) {
  for (int64_t t = 0; t < t_len; ++t) {
    const auto [img, r0, q0] = TileAt(first_tile + t, g.th, g.tw, 4);
    for (int half = 0; half < 2; ++half) {
      __m256 out[16];
      OutputTile(m, t_len, t, half, out);
      for (int i = 0; i < 4 && r0 + i < g.h; ++i) {
        float* dst = y + ((img * g.h + r0 + i) * g.w + q0) * g.k + k0 + half * 8;
        for (int j = 0; j < 4 && q0 + j < g.w; ++j) _mm256_storeu_ps(dst + j * g.k, out[4 * i + j]);
      }
    }
  }
}

// The same with the 2x2 max-pool fused (h, w even: a tile holds up to 2x2 pool windows): writes
// each window's maximum to `pooled` (n x h/2 x w/2 x k) and the row-major index (0-3) of its first
// maximum to `first`, which is all the pool's gradient needs.
void TransformOutputPooled(const float* m, int64_t t_len, const Geometry& g, int64_t first_tile, int64_t k0,
                           float* pooled, int8_t* first) {
  const int64_t ph = g.h / 2, pw = g.w / 2;
  for (int64_t t = 0; t < t_len; ++t) {
    const auto [img, r0, q0] = TileAt(first_tile + t, g.th, g.tw, 4);
    for (int half = 0; half < 2; ++half) {
      __m256 y[16];
      OutputTile(m, t_len, t, half, y);
      for (int a = 0; a < 2 && r0 / 2 + a < ph; ++a)
        for (int b = 0; b < 2 && q0 / 2 + b < pw; ++b) {
          const __m256* win[4] = {&y[8 * a + 2 * b], &y[8 * a + 2 * b + 1], &y[8 * a + 2 * b + 4],
                                  &y[8 * a + 2 * b + 5]};
          __m256 best = *win[0], arg = _mm256_setzero_ps();
          for (int q = 1; q < 4; ++q) {  // strictly greater: ties keep the earlier position
            const __m256 gt = _mm256_cmp_ps(*win[q], best, _CMP_GT_OQ);
            best = _mm256_blendv_ps(best, *win[q], gt);
            arg = _mm256_blendv_ps(arg, _mm256_set1_ps(static_cast<float>(q)), gt);
          }
          const int64_t out = ((img * ph + r0 / 2 + a) * pw + q0 / 2 + b) * g.k + k0 + half * 8;
          _mm256_storeu_ps(pooled + out, best);
          alignas(32) int32_t idx[8];
          _mm256_store_si256(reinterpret_cast<__m256i*>(idx), _mm256_cvtps_epi32(arg));
          for (int l = 0; l < 8; ++l) first[out + l] = static_cast<int8_t>(idx[l]);
        }
    }
  }
}

// Worker: takes chunks of tiles until none is left; writes y, or (with `first_max`) the pooled y and
// the first-maximum indices. With `route`, x is a pooled map read unpooled (TransformInput).
void RunChunks(const float* x, const int8_t* route, const float* u, const Geometry& g, int64_t chunk, float* y,
               int8_t* first_max, std::atomic<int64_t>* next) {
  const int64_t stride = chunk * g.c;  // floats per xi in the transformed-input buffer
  std::vector<float> v(kXi * stride), m(kXi * chunk * kNR);
  const int64_t chunks = (g.tiles() + chunk - 1) / chunk;
  for (int64_t ci = next->fetch_add(1); ci < chunks; ci = next->fetch_add(1)) {
    const int64_t first = ci * chunk, t_len = std::min(chunk, g.tiles() - first);
    for (int64_t t = 0; t < t_len; ++t) TransformInput(x, route, g, first + t, v.data(), t, stride);
    for (int64_t kb = 0; kb < g.k / kNR; ++kb) {
      for (int xi = 0; xi < kXi; ++xi) {
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
// The forward is linear in U, so dL/dU[xi] = sum over tiles V[xi]^T (A dY A^T)[xi]: 36 matmuls
// (C x tiles) @ (tiles x K) of transformed input tiles and transformed output-gradient tiles
// (F(4x4, 3x3), as the forward); the caller maps dU to the 3x3 kernel's gradient (G^T dU G).
// Each thread accumulates its own dU over its chunks of tiles; the partial sums are added at the end.

// A of F(4x4, 3x3) (6x4) applied to y0..y3: (y0, y0 + y1 + y2 + y3, y0 - y1 + y2 - y3,
// y0 + 2y1 + 4y2 + 8y3, y0 - 2y1 + 4y2 - 8y3, y3).
inline void GradRows(const __m256 y[4], __m256 o[6]) {
  const __m256 e = _mm256_add_ps(y[0], y[2]), f = _mm256_add_ps(y[1], y[3]);
  const __m256 g = _mm256_fmadd_ps(_mm256_set1_ps(4.0f), y[2], y[0]);
  const __m256 h = _mm256_mul_ps(_mm256_set1_ps(2.0f), _mm256_fmadd_ps(_mm256_set1_ps(4.0f), y[3], y[1]));
  o[0] = y[0];
  o[1] = _mm256_add_ps(e, f);
  o[2] = _mm256_sub_ps(e, f);
  o[3] = _mm256_add_ps(g, h);
  o[4] = _mm256_sub_ps(g, h);
  o[5] = y[3];
}

// dm[xi][t][k0:k0+8] = (A dY A^T)[xi] for tile `tile`: A (6x4) spreads its 4x4 block of dY (zero
// outside); with `route`, dy is pooled and read unpooled (`Unpooled`).
void TransformOutputGrad(const float* dy, const int8_t* route, const Geometry& g, int64_t tile, float* dm, int64_t t,
                         int64_t stride) {
  const auto [img, r0, q0] = TileAt(tile, g.th, g.tw, 4);
  const float* base = dy + img * g.h * g.w * g.k;
  for (int64_t k0 = 0; k0 < g.k; k0 += 8) {
    __m256 s[6][4];  // A dY: combine rows (s[a][j]: row a of the result, column j of dY)
    for (int j = 0; j < 4; ++j) {
      __m256 d[4], col[6];
      for (int i = 0; i < 4; ++i)
        d[i] = (r0 + i >= g.h || q0 + j >= g.w) ? _mm256_setzero_ps()
               : route != nullptr ? Unpooled(dy, route, g.w / 2, g.k, img * (g.h / 2), r0 + i, q0 + j, k0)
                                  : _mm256_loadu_ps(base + ((r0 + i) * g.w + q0 + j) * g.k + k0);
      GradRows(d, col);
      for (int a = 0; a < 6; ++a) s[a][j] = col[a];
    }
    for (int a = 0; a < 6; ++a) {  // (A dY) A^T: the same on columns
      __m256 out[6];
      GradRows(s[a], out);
      float* dst = dm + (a * 6) * stride + t * g.k + k0;
      for (int b = 0; b < 6; ++b) _mm256_storeu_ps(dst + b * stride, out[b]);
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

// Adds the dU of chunks [c_begin, c_end) of tiles, in order, into `du` (36 x C x K).
void RunFilterGradSlice(const float* x, const float* dy, const int8_t* route, const Geometry& g, int64_t chunk,
                        int64_t c_begin, int64_t c_end, float* du) {
  // Floats per xi in the two tile buffers, plus one cache line: the transforms store to all 36 xi
  // at once, and strides of a multiple of 4 KiB would put those stores in one L1 cache set.
  const int64_t vs = chunk * g.c + 16, ms = chunk * g.k + 16;
  std::vector<float> v(kXi * vs), dm(kXi * ms);
  for (int64_t ci = c_begin; ci < c_end; ++ci) {
    const int64_t first = ci * chunk, t_len = std::min(chunk, g.tiles() - first);
    for (int64_t t = 0; t < t_len; ++t) {
      TransformInput(x, nullptr, g, first + t, v.data(), t, vs);
      TransformOutputGrad(dy, route, g, first + t, dm.data(), t, ms);
    }
    for (int xi = 0; xi < kXi; ++xi) {
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

// Checks x [n, h, w, c] and u [36, k/16, c, 16]; fills `g` (4x4 tiles). An empty message means fine.
const char* ConvGeometry(ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::F32>& u, Geometry* g) {
  const auto xd = x.dimensions();
  const auto ud = u.dimensions();
  if (xd.size() != 4 || ud.size() != 4) return "winograd conv: x must be NHWC, u [36, K/16, C, 16]";
  *g = Geometry{xd[0], xd[1], xd[2], xd[3], ud[1] * kNR, (xd[1] + 3) / 4, (xd[2] + 3) / 4};
  if (ud[0] != kXi || ud[2] != g->c || ud[3] != kNR) return "winograd conv: u must be [36, K/16, C, 16]";
  if (g->c % 8 != 0) return "winograd conv: input channels must be a multiple of 8";
  return "";
}

void RunConv(ffi::ThreadPool& pool, const float* x, const int8_t* route, const float* u, const Geometry& g, float* y,
             int8_t* first_max) {
  const int64_t chunk = ChunkTiles(g.c, g.tiles(), std::max<int64_t>(1, pool.num_threads()));
  const int64_t chunks = (g.tiles() + chunk - 1) / chunk;
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), chunks));
  std::atomic<int64_t> next{0};
  Parallel(pool, threads, [&] { RunChunks(x, route, u, g, chunk, y, first_max, &next); });
}

ffi::Error WinogradConvImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> u,
                            ffi::ResultBuffer<ffi::F32> y) {
  Geometry g;
  const char* error = ConvGeometry(x, u, &g);
  if (*error) return ffi::Error::InvalidArgument(error);
  RunConv(pool, x.typed_data(), nullptr, u.typed_data(), g, y->typed_data(), nullptr);
  return ffi::Error::Success();
}

ffi::Error WinogradConvPoolImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> u,
                                ffi::ResultBuffer<ffi::F32> pooled, ffi::ResultBuffer<ffi::S8> first) {
  Geometry g;
  const char* error = ConvGeometry(x, u, &g);
  if (*error) return ffi::Error::InvalidArgument(error);
  if (g.h % 2 != 0 || g.w % 2 != 0) return ffi::Error::InvalidArgument("winograd conv+pool: h and w must be even");
  RunConv(pool, x.typed_data(), nullptr, u.typed_data(), g, pooled->typed_data(), first->typed_data());
  return ffi::Error::Success();
}

// Whether `route` (int8) has `pooled`'s shape, the 2x2 max-pool of an n x h x w map (h, w even).
bool RouteFits(ffi::Buffer<ffi::F32>& pooled, ffi::Buffer<ffi::S8>& route) {
  const auto pd = pooled.dimensions();
  const auto rd = route.dimensions();
  return pd.size() == 4 && rd.size() == 4 && pd[0] == rd[0] && pd[1] == rd[1] && pd[2] == rd[2] && pd[3] == rd[3];
}

// y = conv(unpool(p, route), g): the input gradient of a conv + 2x2 max-pool from the pooled
// gradient p and the pool's first-maximum positions, without writing the unpooled gradient.
ffi::Error WinogradConvUnpoolImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> p, ffi::Buffer<ffi::S8> route,
                                  ffi::Buffer<ffi::F32> u, ffi::ResultBuffer<ffi::F32> y) {
  if (!RouteFits(p, route)) return ffi::Error::InvalidArgument("winograd unpool conv: route must be p's shape");
  Geometry g;
  const char* error = ConvGeometry(p, u, &g);
  if (*error) return ffi::Error::InvalidArgument(error);
  g.h *= 2;
  g.w *= 2;
  g.th = (g.h + 3) / 4;
  g.tw = (g.w + 3) / 4;
  RunConv(pool, p.typed_data(), route.typed_data(), u.typed_data(), g, y->typed_data(), nullptr);
  return ffi::Error::Success();
}

// dU of conv(x, g) given dy, or (with `route`) given the pooled gradient dy of its 2x2 max-pool.
ffi::Error FilterGrad(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::F32>& dy, const int8_t* route,
                      ffi::ResultBuffer<ffi::F32>& du) {
  const auto xd = x.dimensions();
  const auto yd = dy.dimensions();
  const int64_t scale = route != nullptr ? 2 : 1;
  if (xd.size() != 4 || yd.size() != 4 || yd[0] != xd[0] || yd[1] * scale != xd[1] || yd[2] * scale != xd[2])
    return ffi::Error::InvalidArgument(route != nullptr ? "winograd unpool filter grad: dy must be x's 2x2 max-pool"
                                                        : "winograd filter grad: x and dy must be NHWC of the same N, H, W");
  Geometry g{xd[0], xd[1], xd[2], xd[3], yd[3], (xd[1] + 3) / 4, (xd[2] + 3) / 4};
  if (g.c % 8 != 0 || g.k % kNR != 0)
    return ffi::Error::InvalidArgument("winograd filter grad: channels must be multiples of 8 (x) and 16 (dy)");
  // Deterministic: the tiles are cut into kSlices fixed slices (by shape alone), each summed in
  // order into its own partial dU by whichever thread takes it, and the partials are added in
  // slice order, so the result does not depend on thread timing (training runs reproduce).
  constexpr int64_t kSlices = 4;
  const int64_t size = kXi * g.c * g.k;
  const int64_t chunk = std::max<int64_t>(kMR, std::min<int64_t>(24, (g.tiles() + 2 * kSlices - 1) / (2 * kSlices)));
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
      RunFilterGradSlice(xp, dyp, route, g, chunk, i * chunks / slices, (i + 1) * chunks / slices, partial[i].data());
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

ffi::Error WinogradFilterGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                                  ffi::ResultBuffer<ffi::F32> du) {
  return FilterGrad(pool, x, dy, nullptr, du);
}

ffi::Error WinogradFilterGradUnpoolImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> p,
                                        ffi::Buffer<ffi::S8> route, ffi::ResultBuffer<ffi::F32> du) {
  if (!RouteFits(p, route))
    return ffi::Error::InvalidArgument("winograd unpool filter grad: route must be the pooled gradient's shape");
  if (x.dimensions().size() == 4 && (x.dimensions()[1] % 2 != 0 || x.dimensions()[2] % 2 != 0))
    return ffi::Error::InvalidArgument("winograd unpool filter grad: h and w must be even");
  return FilterGrad(pool, x, p, route.typed_data(), du);
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxaccelWinogradConvUnpool, WinogradConvUnpoolImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxaccelWinogradFilterGradUnpool, WinogradFilterGradUnpoolImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
