// int8 convolution / matmul for XLA:CPU: an XLA FFI custom call (see int8.py), built for the
// widest of AVX2, AVX-512 (F + BW + VL) or AVX-512 VNNI the CPU has (build.py's ISAS).
//
// out[m, n] (int32) = sum_k A[m, k] * W[k, n], A = im2col rows of an 8-bit NHWC input (uint8 or
// int8 codes) gathered on the fly (implicit GEMM: no patch matrix in memory), W = an int8
// (K, N) kernel. Exact integer arithmetic on every ISA.
//
// The multiply-add ("Dot" below), by ISA:
// - AVX2 / AVX-512: without VNNI, the int8 instruction vpmaddubsw adds two u8 x s8 products into
//   a *saturating* int16, which overflows for 8-bit activation codes in [0, 255]. vpmaddwd
//   multiplies int16 pairs into exact int32 sums (16 MACs per ymm instruction, 32 per zmm):
//   operands are widened to int16 while packing ("pairs").
// - AVX-512 VNNI: vpdpbusd multiplies u8 x s8 quads and adds them to int32 without saturation
//   (64 MACs per instruction), so codes stay 8-bit ("quads"): uint8 codes as they are, int8
//   codes shifted by +128 (x ^ 0x80), the shift's 128 * sum_k W[k, n] taken off by starting the
//   accumulators at -128 * sum_k W[k, n]. The Winograd path's int16 operands use vpdpwssd.
//
// Layout: W is packed once per call into panels of 16 output channels x K (k groups of 2 or 4
// interleaved); output rows are gathered and converted in panels of 6 (4 with the fused 2x2
// max-pool: one pooled position), and a 6 x 16 (4 x 16) register tile runs over K. A group is
// 4 bytes either way (one int32 broadcast). Chunks of panels are split over XLA's intra-op
// thread pool.
//
// JaxaccelInt8Winograd: 3x3 stride-1 convs as exact integer Winograd F(2x2, 3x3) with the same
// register tile on int16 pairs (see the "Winograd, exact" section).
//
// The ISA macros (JAXACCEL_AVX512, JAXACCEL_VNNI) and the intrinsics come from common.h.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using jaxaccel::Parallel;
using jaxaccel::TileAt;

namespace {

constexpr int64_t kMR = 6;   // rows per register tile
constexpr int64_t kNR = 16;  // output channels per register tile (two ymm or one zmm of int32)

// The direct conv's operands: int16 pairs (vpmaddwd) or, with VNNI, 8-bit quads (vpdpbusd).
constexpr bool kQuads = JAXACCEL_VNNI;
constexpr int64_t kGroup = kQuads ? 4 : 2;                      // k values per 4-byte group
using Code = std::conditional_t<kQuads, uint8_t, int16_t>;     // a packed activation
using WCode = std::conditional_t<kQuads, int8_t, int16_t>;     // a packed weight

struct ConvGeometry {
  int64_t batch, h, w, c;   // padded input (VALID conv)
  int64_t kh, kw, sh, sw;   // kernel window and strides
  int64_t ho, wo, cout;
  int64_t k() const { return kh * kw * c; }
  int64_t groups() const { return (k() + kGroup - 1) / kGroup; }  // k groups (pairs or quads)
  int64_t m() const { return batch * ho * wo; }
};

// W (K, N) int8 (or int16) -> panels [N/16][K/G][16][G] of `Out` (G values per group), zero-padded
// in N and K.
template <int64_t G, typename Out, typename W>
std::vector<Out> PackWeights(const W* w, int64_t k, int64_t n) {
  const int64_t groups = (k + G - 1) / G, nb = (n + kNR - 1) / kNR;
  std::vector<Out> out(nb * groups * kNR * G, 0);
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t p = 0; p < groups; ++p)
      for (int64_t j = 0; j < kNR; ++j) {
        const int64_t col = b * kNR + j;
        if (col >= n) continue;
        Out* dst = &out[((b * groups + p) * kNR + j) * G];
        for (int64_t e = 0; e < G; ++e) dst[e] = (G * p + e < k) ? static_cast<Out>(w[(G * p + e) * n + col]) : 0;
      }
  return out;
}

// The register tiles' starting values per output channel (zero-padded to whole 16-channel
// blocks): -128 * sum_k W[k, n] for int8 codes shifted to uint8 (quads), else 0.
template <typename T>
std::vector<int32_t> AccumulatorStart(const int8_t* w, int64_t k, int64_t n) {
  std::vector<int32_t> out((n + kNR - 1) / kNR * kNR, 0);
  if (kQuads && std::is_same_v<T, int8_t>)
    for (int64_t r = 0; r < k; ++r)
      for (int64_t col = 0; col < n; ++col) out[col] -= 128 * w[r * n + col];
  return out;
}

// 8-bit codes -> packed activations, 16 at a time: int16 (uint8 zero-extended, int8
// sign-extended) for pairs; uint8 (int8 shifted by +128) for quads.
template <typename T>
inline void Convert(const T* src, Code* dst, int64_t len) {
  int64_t i = 0;
  for (; i + 16 <= len; i += 16) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    if constexpr (kQuads) {
      const __m128i u = std::is_same_v<T, uint8_t> ? v : _mm_xor_si128(v, _mm_set1_epi8(static_cast<char>(0x80)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), u);
    } else {
      const __m256i w = std::is_same_v<T, uint8_t> ? _mm256_cvtepu8_epi16(v) : _mm256_cvtepi8_epi16(v);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), w);
    }
  }
  for (; i < len; ++i) dst[i] = (kQuads && std::is_same_v<T, int8_t>) ? static_cast<Code>(src[i] ^ 0x80) : static_cast<Code>(src[i]);
}

// One im2col row (output position n, oh, ow) converted, zero-padded to whole groups.
template <typename T>
inline void PackRow(const T* x, const ConvGeometry& g, int64_t n, int64_t oh, int64_t ow, Code* dst) {
  for (int64_t i = 0; i < g.kh; ++i) {
    const T* row = x + ((n * g.h + oh * g.sh + i) * g.w + ow * g.sw) * g.c;
    if (g.sw == 1) {  // the kw windows of one input row are contiguous
      Convert(row, dst + i * g.kw * g.c, g.kw * g.c);
    } else {
      for (int64_t j = 0; j < g.kw; ++j) Convert(row + j * g.c, dst + (i * g.kw + j) * g.c, g.c);
    }
  }
  for (int64_t k = g.k(); k < kGroup * g.groups(); ++k) dst[k] = 0;  // padded weights are 0 too
}

// acc[MR][16] = start[16] + panel (MR rows of `groups` 4-byte groups) @ weight block
// (groups x 16 channels x 4 bytes). Quads: u8 x s8 groups of 4 (VNNI only); else int16 pairs.
template <int MR, bool Quads>
inline void Tile(const void* panel, const void* wblock, int64_t groups, const int32_t* start, int32_t* acc) {
  const int32_t* a[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) a[r] = static_cast<const int32_t*>(panel) + r * groups;
#if JAXACCEL_AVX512
  __m512i c[MR];
  const __m512i c0 = _mm512_loadu_si512(start);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) c[r] = c0;
  const __m512i* wp = static_cast<const __m512i*>(wblock);
  for (int64_t p = 0; p < groups; ++p) {
    const __m512i b = _mm512_loadu_si512(wp + p);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512i ar = _mm512_set1_epi32(a[r][p]);  // one group of row r, to every channel
#if JAXACCEL_VNNI
      c[r] = Quads ? _mm512_dpbusd_epi32(c[r], ar, b) : _mm512_dpwssd_epi32(c[r], ar, b);
#else
      static_assert(!Quads, "quads need VNNI");
      c[r] = _mm512_add_epi32(c[r], _mm512_madd_epi16(ar, b));
#endif
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) _mm512_storeu_si512(acc + r * kNR, c[r]);
#else
  static_assert(!Quads, "quads need VNNI");
  __m256i c[MR][2];
  const __m256i s0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(start));
  const __m256i s1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(start) + 1);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) c[r][0] = s0, c[r][1] = s1;
  const __m256i* wp = static_cast<const __m256i*>(wblock);
  for (int64_t p = 0; p < groups; ++p) {
    const __m256i b0 = _mm256_loadu_si256(wp + 2 * p), b1 = _mm256_loadu_si256(wp + 2 * p + 1);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m256i ar = _mm256_set1_epi32(a[r][p]);  // two int16 codes: k = 2p, 2p + 1
      c[r][0] = _mm256_add_epi32(c[r][0], _mm256_madd_epi16(ar, b0));
      c[r][1] = _mm256_add_epi32(c[r][1], _mm256_madd_epi16(ar, b1));
    }
  }
  __m256i* out = reinterpret_cast<__m256i*>(acc);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    _mm256_storeu_si256(out + 2 * r, c[r][0]);
    _mm256_storeu_si256(out + 2 * r + 1, c[r][1]);
  }
#endif
}

constexpr int64_t kChunk = 16;  // panels per work item

// Work items are chunks of kChunk panels: all of a chunk's rows are gathered first, then each
// 16-channel weight block (L1-resident) multiplies every panel of the chunk (L2-resident).

// Plain conv: panels of kMR consecutive output rows.
template <typename T>
void RunPanels(const T* x, const WCode* wpacked, const int32_t* start, const ConvGeometry& g, int32_t* out,
               std::atomic<int64_t>* next) {
  const int64_t groups = g.groups(), row = kGroup * groups, nb = (g.cout + kNR - 1) / kNR, m = g.m();
  const int64_t stride = kMR * row;
  const int64_t num_panels = (m + kMR - 1) / kMR;
  std::vector<Code> panels(kChunk * stride);
  alignas(64) int32_t acc[kMR * kNR];
  for (int64_t chunk = next->fetch_add(1); chunk * kChunk < num_panels; chunk = next->fetch_add(1)) {
    const int64_t m_begin = chunk * kChunk * kMR, m_end = std::min(m, m_begin + kChunk * kMR);
    const int64_t count = (m_end - m_begin + kMR - 1) / kMR;
    int64_t ow = m_begin % g.wo, oh = (m_begin / g.wo) % g.ho, n = m_begin / (g.wo * g.ho);
    for (int64_t r = 0; r < count * kMR; ++r) {
      Code* dst = panels.data() + r * row;
      if (m_begin + r >= m_end) {
        std::memset(dst, 0, row * sizeof(Code));
        continue;
      }
      PackRow(x, g, n, oh, ow, dst);
      if (++ow == g.wo) {
        ow = 0;
        if (++oh == g.ho) oh = 0, ++n;
      }
    }
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t c0 = b * kNR, cols = std::min(kNR, g.cout - c0);
      for (int64_t i = 0; i < count; ++i) {
        Tile<kMR, kQuads>(panels.data() + i * stride, wpacked + b * row * kNR, groups, start + c0, acc);
        const int64_t m0 = m_begin + i * kMR, rows = std::min(kMR, m_end - m0);
        for (int64_t r = 0; r < rows; ++r)
          std::memcpy(out + (m0 + r) * g.cout + c0, acc + r * kNR, cols * sizeof(int32_t));
      }
    }
  }
}

// Conv + 2x2 max-pool (stride 2, VALID): one panel = the 4 conv rows of one pooled position,
// reduced with a max before the store (so only the pooled int32 values reach memory).
template <typename T>
void RunPooledPanels(const T* x, const WCode* wpacked, const int32_t* start, const ConvGeometry& g, int32_t* out,
                     std::atomic<int64_t>* next) {
  const int64_t groups = g.groups(), row = kGroup * groups, nb = (g.cout + kNR - 1) / kNR, stride = 4 * row;
  const int64_t hp = g.ho / 2, wp = g.wo / 2, num = g.batch * hp * wp;
  std::vector<Code> panels(kChunk * stride);
  alignas(64) int32_t acc[4 * kNR];
  alignas(32) int32_t best[kNR];
  for (int64_t chunk = next->fetch_add(1); chunk * kChunk < num; chunk = next->fetch_add(1)) {
    const int64_t p_begin = chunk * kChunk, count = std::min(num, p_begin + kChunk) - p_begin;
    int64_t pj = p_begin % wp, pi = (p_begin / wp) % hp, n = p_begin / (wp * hp);
    for (int64_t i = 0; i < count; ++i) {
      for (int q = 0; q < 4; ++q)
        PackRow(x, g, n, 2 * pi + q / 2, 2 * pj + q % 2, panels.data() + i * stride + q * row);
      if (++pj == wp) {
        pj = 0;
        if (++pi == hp) pi = 0, ++n;
      }
    }
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t c0 = b * kNR, cols = std::min(kNR, g.cout - c0);
      for (int64_t i = 0; i < count; ++i) {
        Tile<4, kQuads>(panels.data() + i * stride, wpacked + b * row * kNR, groups, start + c0, acc);
        const __m256i* a = reinterpret_cast<const __m256i*>(acc);
        for (int h = 0; h < 2; ++h) {
          const __m256i v = _mm256_max_epi32(_mm256_max_epi32(_mm256_load_si256(a + h), _mm256_load_si256(a + 2 + h)),
                                             _mm256_max_epi32(_mm256_load_si256(a + 4 + h), _mm256_load_si256(a + 6 + h)));
          _mm256_store_si256(reinterpret_cast<__m256i*>(best) + h, v);
        }
        std::memcpy(out + (p_begin + i) * g.cout + c0, best, cols * sizeof(int32_t));
      }
    }
  }
}

ffi::Error Int8ConvImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::S8> w,
                        ffi::ResultBuffer<ffi::S32> out, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                        int64_t max_pool) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 4 || wd.size() != 2) return ffi::Error::InvalidArgument("int8 conv: x must be NHWC, w (K, N)");
  ConvGeometry g{xd[0], xd[1], xd[2], xd[3], kh, kw, sh, sw, 0, 0, wd[1]};
  if (g.k() != wd[0]) return ffi::Error::InvalidArgument("int8 conv: w rows != kh * kw * C");
  if (g.h < kh || g.w < kw) return ffi::Error::InvalidArgument("int8 conv: window larger than the input");
  g.ho = (g.h - kh) / sh + 1;
  g.wo = (g.w - kw) / sw + 1;
  if (max_pool != 1 && max_pool != 2) return ffi::Error::InvalidArgument("int8 conv: max_pool must be 1 or 2");
  const std::vector<WCode> wpacked = PackWeights<kGroup, WCode>(w.typed_data(), g.k(), g.cout);
  const int64_t rows = max_pool == 2 ? g.batch * (g.ho / 2) * (g.wo / 2) * 4 : g.m();
  const int64_t chunks = (rows + kChunk * kMR - 1) / (kChunk * kMR);
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), chunks));
  std::atomic<int64_t> next{0};
  int32_t* o = out->typed_data();
  auto run = [&](auto xp) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(xp)>>;
    const std::vector<int32_t> start = AccumulatorStart<T>(w.typed_data(), g.k(), g.cout);
    if (max_pool == 2)
      Parallel(pool, threads, [&, xp] { RunPooledPanels(xp, wpacked.data(), start.data(), g, o, &next); });
    else
      Parallel(pool, threads, [&, xp] { RunPanels(xp, wpacked.data(), start.data(), g, o, &next); });
  };
  if (x.element_type() == ffi::DataType::U8) {
    run(static_cast<const uint8_t*>(x.untyped_data()));
  } else if (x.element_type() == ffi::DataType::S8) {
    run(static_cast<const int8_t*>(x.untyped_data()));
  } else {
    return ffi::Error::InvalidArgument("int8 conv: x must be uint8 or int8");
  }
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------- Winograd, exact
// 3x3 stride-1 VALID convs as Winograd F(2x2, 3x3) in integers: with U4 = (2G) g (2G)^T (an
// integer, 4 x G g G^T) each 2x2 output tile is Y = (A^T [sum_c (B^T d_c B) * U4_c] A) / 4, exactly.
// B^T d B of 8-bit codes needs at most 11 bits (|.| <= 4 * 255), U4 at most 12 (|.| <= 9 * 128),
// so both are int16 and the 16 products per tile go through vpmaddwd like the direct conv's;
// 9 * 1020 * 1152 * C < 2^31 for C <= 192 (the caller checks). 16 multiplies per 2x2 outputs
// instead of 36.

struct WinoGeometry {
  int64_t n, h, w, c, k;  // padded input (VALID), output channels
  int64_t ho, wo;         // conv output size
  int64_t th, tw;         // tile grid (the pooled grid when pooling)
  bool pool;
  int64_t tiles() const { return n * th * tw; }
};

// V[xi][t][c] (int16, row stride c2 = C rounded up to pairs) = (B^T d B)[xi] of tile `tile`.
template <typename T>
void WinoInput(const T* x, const WinoGeometry& g, int64_t tile, int16_t* v, int64_t t, int64_t stride) {
  const auto [img, r0, q0] = TileAt(tile, g.th, g.tw);
  const T* base = x + img * g.h * g.w * g.c;
  for (int64_t c0 = 0; c0 < g.c; c0 += 16) {
    __m256i d[4][4];
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) {
        if (r0 + i < g.h && q0 + j < g.w) {
          const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(base + ((r0 + i) * g.w + q0 + j) * g.c + c0));
          d[i][j] = std::is_same_v<T, uint8_t> ? _mm256_cvtepu8_epi16(b) : _mm256_cvtepi8_epi16(b);
        } else {
          d[i][j] = _mm256_setzero_si256();  // only feeds outputs beyond the image, never stored
        }
      }
    __m256i s[4][4];
    for (int j = 0; j < 4; ++j) {
      s[0][j] = _mm256_sub_epi16(d[0][j], d[2][j]);
      s[1][j] = _mm256_add_epi16(d[1][j], d[2][j]);
      s[2][j] = _mm256_sub_epi16(d[2][j], d[1][j]);
      s[3][j] = _mm256_sub_epi16(d[1][j], d[3][j]);
    }
    for (int i = 0; i < 4; ++i) {
      int16_t* dst = v + (i * 4) * stride + t * g.c + c0;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_sub_epi16(s[i][0], s[i][2]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + stride), _mm256_add_epi16(s[i][1], s[i][2]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 2 * stride), _mm256_sub_epi16(s[i][2], s[i][1]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 3 * stride), _mm256_sub_epi16(s[i][1], s[i][3]));
    }
  }
}

// out[tile][k0:k0+16] = (A^T M A) / 4 (or its 2x2 max when pooling), M[xi] = m[xi][t][0:16] (int32).
void WinoOutput(const int32_t* m, int64_t t_len, const WinoGeometry& g, int64_t first_tile, int64_t k0, int32_t* out) {
  for (int64_t t = 0; t < t_len; ++t) {
    const int64_t tile = first_tile + t;
    const auto [img, r0, q0] = TileAt(tile, g.th, g.tw);
    for (int half = 0; half < 2; ++half) {
      __m256i s[2][4];
      for (int j = 0; j < 4; ++j) {
        const int32_t* p = m + (j * t_len + t) * kNR + half * 8;
        const int64_t st = 4 * t_len * kNR;
        const __m256i m0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
        const __m256i m1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + st));
        const __m256i m2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 2 * st));
        const __m256i m3 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 3 * st));
        s[0][j] = _mm256_add_epi32(_mm256_add_epi32(m0, m1), m2);
        s[1][j] = _mm256_sub_epi32(_mm256_sub_epi32(m1, m2), m3);
      }
      __m256i y[2][2];
      for (int i = 0; i < 2; ++i) {
        y[i][0] = _mm256_srai_epi32(_mm256_add_epi32(_mm256_add_epi32(s[i][0], s[i][1]), s[i][2]), 2);
        y[i][1] = _mm256_srai_epi32(_mm256_sub_epi32(_mm256_sub_epi32(s[i][1], s[i][2]), s[i][3]), 2);
      }
      if (g.pool) {
        const __m256i best = _mm256_max_epi32(_mm256_max_epi32(y[0][0], y[0][1]), _mm256_max_epi32(y[1][0], y[1][1]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + tile * g.k + k0 + half * 8), best);
        continue;
      }
      for (int i = 0; i < 2 && r0 + i < g.ho; ++i)
        for (int j = 0; j < 2 && q0 + j < g.wo; ++j)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + ((img * g.ho + r0 + i) * g.wo + q0 + j) * g.k + k0 + half * 8),
                              y[i][j]);
    }
  }
}

template <typename T>
void RunWinoChunks(const T* x, const int16_t* upacked, const WinoGeometry& g, int64_t chunk, int32_t* out,
                   std::atomic<int64_t>* next) {
  const int64_t k2 = g.c / 2, stride = chunk * g.c, nb = g.k / kNR;
  alignas(64) static constexpr int32_t kZero[kNR] = {};
  std::vector<int16_t> v(16 * stride, 0);  // rows past a last partial chunk stay 0
  std::vector<int32_t> m(16 * chunk * kNR);
  alignas(64) int32_t acc[kMR * kNR];
  const int64_t chunks = (g.tiles() + chunk - 1) / chunk;
  for (int64_t ci = next->fetch_add(1); ci < chunks; ci = next->fetch_add(1)) {
    const int64_t first = ci * chunk, t_len = std::min(chunk, g.tiles() - first);
    for (int64_t t = 0; t < t_len; ++t) WinoInput(x, g, first + t, v.data(), t, stride);
    for (int64_t kb = 0; kb < nb; ++kb) {
      for (int xi = 0; xi < 16; ++xi) {
        const int16_t* ux = upacked + (xi * nb + kb) * k2 * kNR * 2;
        int32_t* mx = m.data() + xi * t_len * kNR;
        for (int64_t t = 0; t < t_len; t += kMR) {
          Tile<kMR, false>(v.data() + xi * stride + t * g.c, ux, k2, kZero, acc);
          std::memcpy(mx + t * kNR, acc, std::min(kMR, t_len - t) * kNR * sizeof(int32_t));
        }
      }
      WinoOutput(m.data(), t_len, g, first, kb * kNR, out);
    }
  }
}

ffi::Error Int8WinogradImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::S16> u4,
                            ffi::ResultBuffer<ffi::S32> out, int64_t max_pool) {
  const auto xd = x.dimensions();
  const auto ud = u4.dimensions();
  if (xd.size() != 4 || ud.size() != 3 || ud[0] != 16 || ud[1] != xd[3])
    return ffi::Error::InvalidArgument("int8 winograd: x must be NHWC, u4 [16, C, K]");
  if (xd[1] < 3 || xd[2] < 3) return ffi::Error::InvalidArgument("int8 winograd: input smaller than 3x3");
  WinoGeometry g{xd[0], xd[1], xd[2], xd[3], ud[2], xd[1] - 2, xd[2] - 2, 0, 0, max_pool == 2};
  if (g.c % 16 != 0 || g.k % kNR != 0 || g.c > 192)
    return ffi::Error::InvalidArgument("int8 winograd: channels must be multiples of 16, input channels <= 192");
  if (max_pool != 1 && max_pool != 2) return ffi::Error::InvalidArgument("int8 winograd: max_pool must be 1 or 2");
  g.th = g.pool ? g.ho / 2 : (g.ho + 1) / 2;
  g.tw = g.pool ? g.wo / 2 : (g.wo + 1) / 2;
  // U4 [16][C][K] -> per xi the direct conv's packed panels [K/16][C/2][16][2].
  std::vector<int16_t> upacked;
  upacked.reserve(16 * g.c * g.k);
  for (int xi = 0; xi < 16; ++xi) {
    const std::vector<int16_t> one = PackWeights<2, int16_t>(u4.typed_data() + xi * g.c * g.k, g.c, g.k);
    upacked.insert(upacked.end(), one.begin(), one.end());
  }
  const int64_t workers = std::max<int64_t>(1, pool.num_threads());
  const int64_t panels = std::max<int64_t>(1, std::min<int64_t>(16, (g.tiles() + 4 * workers * kMR - 1) / (4 * workers * kMR)));
  const int64_t chunk = panels * kMR;
  const int64_t chunks = (g.tiles() + chunk - 1) / chunk;
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(workers, chunks));
  std::atomic<int64_t> next{0};
  int32_t* o = out->typed_data();
  if (g.tiles() == 0) return ffi::Error::Success();
  if (x.element_type() == ffi::DataType::U8) {
    const uint8_t* xp = static_cast<const uint8_t*>(x.untyped_data());
    Parallel(pool, threads, [&] { RunWinoChunks(xp, upacked.data(), g, chunk, o, &next); });
  } else if (x.element_type() == ffi::DataType::S8) {
    const int8_t* xp = static_cast<const int8_t*>(x.untyped_data());
    Parallel(pool, threads, [&] { RunWinoChunks(xp, upacked.data(), g, chunk, o, &next); });
  } else {
    return ffi::Error::InvalidArgument("int8 winograd: x must be uint8 or int8");
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxaccelInt8Conv, Int8ConvImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("kh")
                                  .Attr<int64_t>("kw")
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("max_pool"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxaccelInt8Winograd, Int8WinogradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S16>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("max_pool"));
