// Weight-only int8 linear layers for MindSpore's ops.Custom(func_type="aot"): y = x W^T with x fp32 and W int8
// [N, K] plus scales (mindformers.quantization.formats: `block32` = an fp16 scale per 32 weights of a row, `channel`
// = an fp32 scale per row). The weights are widened to fp32 in registers (or in a small cache-resident panel) and
// multiplied with fp32 activations; nothing else is rounded.
//
// Few rows (decode): each weight row is read once for all rows of x, widened and scaled in registers, and dotted
// with every row of x; the output features are split over the cores. Many rows (prefill): a panel of kPanel output
// features x kDepth inputs is widened, scaled and transposed into fp32 once, then multiplied with every row of x by
// a register-tiled kernel, so the widening is paid once per panel and the panel stays in L1. From 16 rows on, a CPU
// with AMX multiplies bf16 tiles instead (AmxRows: exact products, see there).
//
// Written with GCC vector types, so one source serves every ISA: 16 lanes with AVX-512, 8 with AVX, 4 otherwise
// (SSE or NEON); the AVX-512 build also packs panels with an in-register transpose.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"

#if defined(__SSE4_1__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__AMX_TILE__) && defined(__linux__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {
using mindformers_kernels::Numel;
using mindformers_kernels::ParallelFor;

using mindformers_kernels::kLanes;
using Vec = mindformers_kernels::Lanes;
#if defined(__AVX512F__)
constexpr int kRegisters = 32, kTileRows = 8, kTileVecs = 3;
#else
constexpr int kRegisters = 16, kTileRows = 4, kTileVecs = 2;
#endif
constexpr int64_t kBlock = 32;                     // block32's weights per scale
constexpr int64_t kPanel = kTileVecs * kLanes;     // output features per packed panel
constexpr int64_t kDepth = 128;                    // inputs per packed panel: kDepth x kPanel fp32 stays in L1
constexpr int64_t kFeatureBlock = 64;              // output features per task on few rows
constexpr int64_t kPrefetch = 1024;                // bytes ahead on each weight row (few rows): measured best
constexpr int64_t kFewRows = 16;                   // rows of x up to which the few-rows kernel runs (decode)

// kLanes int8 at p as floats. GCC's generic conversion of a byte vector goes element by element; these are the
// sign-extend and convert instructions.
inline Vec Widen(const int8_t *p) {
#if defined(__AVX512F__)
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p))));
#elif defined(__AVX2__)
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i *>(p))));
#elif defined(__SSE4_1__) && !defined(__AVX__)
  int32_t word;
  std::memcpy(&word, p, sizeof word);
  return _mm_cvtepi32_ps(_mm_cvtepi8_epi32(_mm_cvtsi32_si128(word)));
#else
  Vec v;
  for (int i = 0; i < kLanes; i++) v[i] = p[i];
  return v;
#endif
}

inline float Sum(Vec v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(v);
#else
  float s = 0.f;
  for (int i = 0; i < kLanes; i++) s += v[i];
  return s;
#endif
}

// IEEE half -> float, exact (subnormals included).
inline float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16, rest = h & 0x7fffu;
  uint32_t bits = (rest << 13) + ((127u - 15u) << 23);
  if (rest >= 0x7c00u) bits += (128u - 16u) << 23;  // inf / NaN: exponent all ones
  float f;
  std::memcpy(&f, &bits, sizeof f);
  if (rest < 0x400u) f = static_cast<float>(rest) * 5.9604644775390625e-8f;  // subnormal: mantissa * 2^-24
  std::memcpy(&bits, &f, sizeof f);
  bits |= sign;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// The weights and their scales as the kernels read them.
struct Weights {
  const int8_t *q;         // [n_dim, k_dim]
  const uint16_t *half;    // block32: fp16 scales [n_dim, k_dim / 32], else null
  const float *channel;    // channel: fp32 scales [n_dim], else null
  int64_t n_dim, k_dim;

  int64_t Blocks() const { return k_dim / kBlock; }

  // fp32 block scales of rows [n, n + rows) into out [rows][Blocks()] (block32 only)
  void BlockScales(int64_t n, int64_t rows, float *out) const {
    HalvesToFloats(half + n * Blocks(), rows * Blocks(), out);
  }

  static void HalvesToFloats(const uint16_t *src, int64_t count, float *out) {
    int64_t i = 0;
#if defined(__F16C__)
    for (; i + 8 <= count; i += 8) {  // vcvtph2ps: exact, subnormals included
      _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(src + i))));
    }
#endif
    for (; i < count; i++) out[i] = HalfToFloat(src[i]);
  }
};

// y[i, j] = x[i] . dequantized w[j] for i < kRows, j < kCols: rows x (ldx apart) against weight rows from n. Each
// weight vector is widened once and used for all kRows rows. `scales` [kCols][blocks] for block32, else null.
template <int kRows, int kCols>
void DotTile(const float *x, int64_t ldx, const Weights &w, int64_t n, const float *scales, float *y, int64_t ldy) {
  const int64_t k_dim = w.k_dim, blocks = w.Blocks();
  const int8_t *q = w.q + n * k_dim;
  Vec acc[kRows][kCols] = {};
  int64_t k = 0;
  for (; k + kLanes <= k_dim; k += kLanes) {
    if (k % 64 == 0) {  // kPrefetch bytes ahead on each row, past its end on the same row of the next tile
      const int64_t ahead = k + kPrefetch < k_dim ? k + kPrefetch : kCols * k_dim + k + kPrefetch - k_dim;
      for (int j = 0; j < kCols; j++) __builtin_prefetch(q + j * k_dim + ahead);
    }
    Vec wv[kCols];
    for (int j = 0; j < kCols; j++) {
      wv[j] = Widen(q + j * k_dim + k);
      if (scales) wv[j] *= scales[j * blocks + k / kBlock];
    }
    for (int i = 0; i < kRows; i++) {
      const Vec xv = mindformers_kernels::LoadLanes(x + i * ldx + k);
      for (int j = 0; j < kCols; j++) acc[i][j] += xv * wv[j];
    }
  }
  for (int i = 0; i < kRows; i++) {
    for (int j = 0; j < kCols; j++) {
      float s = Sum(acc[i][j]);
      for (int64_t t = k; t < k_dim; t++) s += x[i * ldx + t] * q[j * k_dim + t];  // channel: K % kLanes
      y[i * ldy + j] = w.channel ? s * w.channel[n + j] : s;
    }
  }
}

// Weight rows per DotTile for kRows rows of x: as many as the registers hold (accumulators, widened weights, x).
constexpr int ColsFor(int rows) {
  return std::max(1, std::min(8, (kRegisters - 2) / (rows + 1)));
}

// Rows [0, m_rows) (m_rows <= kRows) of x against weight rows [first, last).
template <int kRows>
void DotRows(const float *x, int64_t m_rows, const Weights &w, int64_t first, int64_t last, float *scales, float *y) {
  if (m_rows < kRows) {
    if constexpr (kRows > 1) DotRows<kRows - 1>(x, m_rows, w, first, last, scales, y);
    return;
  }
  constexpr int kCols = ColsFor(kRows);
  const int64_t k_dim = w.k_dim, n_dim = w.n_dim;
  int64_t n = first;
  for (; n + kCols <= last; n += kCols) {
    if (w.half) w.BlockScales(n, kCols, scales);
    DotTile<kRows, kCols>(x, k_dim, w, n, w.half ? scales : nullptr, y + n, n_dim);
  }
  for (; n < last; n++) {
    if (w.half) w.BlockScales(n, 1, scales);
    DotTile<kRows, 1>(x, k_dim, w, n, w.half ? scales : nullptr, y + n, n_dim);
  }
}

constexpr int kDotRows = 4;  // rows of x per pass over the weights on few rows

// Few rows: output features split over the cores in blocks; each block's weight rows are read once per kDotRows rows
// of x (once in all for m_rows <= kDotRows; later passes find them in L1/L2).
void FewRows(const float *x, int64_t m_rows, const Weights &w, float *y) {
  const int64_t blocks = (w.n_dim + kFeatureBlock - 1) / kFeatureBlock;
  ParallelFor(blocks, kFeatureBlock * w.k_dim * std::max<int64_t>(1, m_rows / 4), [&](int64_t begin, int64_t end) {
    std::vector<float> scales(8 * std::max<int64_t>(1, w.Blocks()));
    const int64_t first = begin * kFeatureBlock, last = std::min(w.n_dim, end * kFeatureBlock);
    for (int64_t m = 0; m < m_rows; m += kDotRows) {
      DotRows<kDotRows>(x + m * w.k_dim, std::min<int64_t>(kDotRows, m_rows - m), w, first, last, scales.data(),
                        y + m * w.n_dim);
    }
  });
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#define MINDFORMERS_INT8_AMX 1
// Rows of x from kAmxRows on, on AMX (Intel Sapphire Rapids and later): C [16 weight rows][16 rows of x] += A [16
// weight rows][32 inputs] B [32 inputs][16 rows of x] in bf16 with fp32 accumulation (TDPBF16PS). int8 weights are
// exact in bf16; each fp32 activation is split into three bf16 terms whose sum is the activation (8 + 8 + 8
// significant bits), so every product is the fp32 product and only the order of the sums differs from the fp32
// kernels. kAmxTiles weight tiles are in flight at once (independent accumulations hide the TDPBF16PS latency). For
// block32, C is flushed after every 32-input block and multiplied by the block's scale in fp32; for channel, once
// per chunk of inputs.
constexpr int64_t kAmxRows = 16;    // rows of x from which AMX is used (see quantization.md, "Speed")
constexpr int64_t kAmxTerms = 3;    // bf16 terms per activation
constexpr int64_t kAmxTiles = 3;    // weight tiles (16 rows each) per pass: tiles 0..2 C, 3..5 A, 6..7 B
constexpr int64_t kAmxSpan = 16 * kAmxTiles;
constexpr int64_t kAmxChunk = 512;  // inputs per pass when x is large, so that its packed chunk stays in L2

// Whether this process may use AMX tile data: the CPU has AMX-BF16 and Linux granted the permission.
bool AmxReady() {
  static const bool ready = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 22)) || !(d & (1u << 24))) return false;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureTileData = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureTileData) == 0;
  }();
  return ready;
}

// Palette 1, eight tiles of 16 rows x 64 bytes.
void ConfigureTiles() {
  alignas(64) uint8_t config[64] = {};
  config[0] = 1;
  for (int t = 0; t < 8; t++) {
    const uint16_t bytes = 64;
    std::memcpy(config + 16 + 2 * t, &bytes, sizeof bytes);
    config[48 + t] = 16;
  }
  _tile_loadconfig(config);
}

inline __m512 FromBf16(__m256bh h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(h)), 16));
}

// x rows [16 g, 16 g + 16) (zeros past m_rows) as B tiles: packed[term][k / 2][row][k % 2] in bf16 (pairs as 32-bit
// words), the terms summing to x.
void PackRows(const float *x, int64_t m_rows, int64_t k_dim, int64_t g, uint32_t *packed) {
  const int64_t pairs = k_dim / 2;
  for (int64_t r = 0; r < 16; r++) {
    const int64_t m = 16 * g + r;
    for (int64_t k = 0; k < k_dim; k += 16) {
      __m512 v = m < m_rows ? _mm512_loadu_ps(x + m * k_dim + k) : _mm512_setzero_ps();
      for (int64_t t = 0; t < kAmxTerms; t++) {
        const __m256bh h = _mm512_cvtneps_pbh(v);
        v = _mm512_sub_ps(v, FromBf16(h));
        alignas(32) uint32_t words[8];
        std::memcpy(words, &h, sizeof words);
        for (int64_t j = 0; j < 8; j++) packed[(t * pairs + k / 2 + j) * 16 + r] = words[j];
      }
    }
  }
}

// Weight rows [n, n + kAmxSpan) (zeros past the last), inputs [k0, k0 + depth), as A tiles in bf16:
// out[k / 32][row][32], and their block32 scales as fp32 scales[row][k / 32]. Row by row: one stream per row.
void PackWeights(const Weights &w, int64_t n, int64_t k0, int64_t depth, uint16_t *out, float *scales) {
  const int64_t rows = std::min(kAmxSpan, w.n_dim - n), blocks = depth / kBlock;
  for (int64_t r = 0; r < kAmxSpan; r++) {
    const int8_t *q = w.q + (n + r) * w.k_dim + k0;
    for (int64_t b = 0; b < blocks; b++) {
      const __m512bh v = r < rows ? _mm512_cvtne2ps_pbh(Widen(q + b * kBlock + 16), Widen(q + b * kBlock)) : __m512bh{};
      std::memcpy(out + (b * kAmxSpan + r) * 32, &v, sizeof v);
    }
    if (!w.half) continue;
    if (r < rows) {
      Weights::HalvesToFloats(w.half + (n + r) * w.Blocks() + k0 / kBlock, blocks, scales + r * blocks);
    } else {
      std::fill(scales + r * blocks, scales + (r + 1) * blocks, 0.f);
    }
  }
}

// y[16 g + r, n + j] (+)= acc[j][r] for the rows of x and weight rows that exist.
void StoreTile(const float *acc, int64_t g, int64_t m_rows, int64_t n, int64_t n_dim, bool add, float *y) {
  alignas(64) float turned[16][16];
  mindformers_kernels::Transpose16x16(acc, 16, &turned[0][0], 16);
  const int64_t cols = std::min<int64_t>(16, n_dim - n);
  for (int64_t r = 0; r < 16 && 16 * g + r < m_rows; r++) {
    float *out = y + (16 * g + r) * n_dim + n;
    for (int64_t j = 0; j < cols; j++) out[j] = add ? out[j] + turned[r][j] : turned[r][j];
  }
}

void AmxRows(const float *x, int64_t m_rows, const Weights &w, float *y) {
  const int64_t k_dim = w.k_dim, n_dim = w.n_dim, groups = (m_rows + 15) / 16;
  const int64_t spans = (n_dim + kAmxSpan - 1) / kAmxSpan, pairs = k_dim / 2, group_words = kAmxTerms * pairs * 16;
  thread_local std::vector<uint32_t> buffer;  // the caller's; workers reach it through `packed`
  buffer.resize(groups * group_words);
  uint32_t *packed = buffer.data();
  ParallelFor(groups, 16 * k_dim * 8, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; g++) PackRows(x, m_rows, k_dim, g, packed + g * group_words);
  });
  // one pass over all inputs when the packed rows fit in L2, else chunks of kAmxChunk inputs
  const int64_t chunk = groups * group_words * 4 <= (1 << 20) ? k_dim : kAmxChunk;
  ParallelFor(spans, kAmxSpan * k_dim * groups * 2, [&](int64_t begin, int64_t end) {
    ConfigureTiles();
    std::vector<uint16_t> weights(chunk * kAmxSpan);
    std::vector<float> scales(chunk / kBlock * kAmxSpan);
    alignas(64) float c[kAmxTiles][16][16], acc[kAmxTiles][16][16];
    for (int64_t k0 = 0; k0 < k_dim; k0 += chunk) {
      const int64_t depth = std::min(chunk, k_dim - k0), blocks = depth / kBlock;
      for (int64_t s = begin; s < end; s++) {
        const int64_t n = s * kAmxSpan;
        PackWeights(w, n, k0, depth, weights.data(), scales.data());
        for (int64_t g = 0; g < groups; g++) {
          const uint32_t *b_tiles = packed + g * group_words + k0 / 2 * 16;
          std::memset(acc, 0, sizeof acc);
          _tile_zero(0);
          _tile_zero(1);
          _tile_zero(2);
          for (int64_t b = 0; b < blocks; b++) {
            const uint16_t *a_tiles = weights.data() + b * kAmxSpan * 32;
            _tile_loadd(3, a_tiles, 64);
            _tile_loadd(4, a_tiles + 16 * 32, 64);
            _tile_loadd(5, a_tiles + 32 * 32, 64);
            // B of each term, alternating between tiles 6 and 7 (TDP operands must be immediates)
            _tile_loadd(6, b_tiles + b * 256, 64);
            _tile_dpbf16ps(0, 3, 6);
            _tile_dpbf16ps(1, 4, 6);
            _tile_dpbf16ps(2, 5, 6);
            _tile_loadd(7, b_tiles + pairs * 16 + b * 256, 64);
            _tile_dpbf16ps(0, 3, 7);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(2, 5, 7);
            _tile_loadd(6, b_tiles + 2 * pairs * 16 + b * 256, 64);
            _tile_dpbf16ps(0, 3, 6);
            _tile_dpbf16ps(1, 4, 6);
            _tile_dpbf16ps(2, 5, 6);
            if (w.half) {
              _tile_stored(0, &c[0][0][0], 64);
              _tile_stored(1, &c[1][0][0], 64);
              _tile_stored(2, &c[2][0][0], 64);
              _tile_zero(0);
              _tile_zero(1);
              _tile_zero(2);
              for (int64_t t = 0; t < kAmxTiles; t++) {
                for (int j = 0; j < 16; j++) {
                  const __m512 scale = _mm512_set1_ps(scales[(16 * t + j) * blocks + b]);
                  const __m512 sum = _mm512_fmadd_ps(_mm512_load_ps(c[t][j]), scale, _mm512_load_ps(acc[t][j]));
                  _mm512_store_ps(acc[t][j], sum);
                }
              }
            }
          }
          if (!w.half) {
            _tile_stored(0, &acc[0][0][0], 64);
            _tile_stored(1, &acc[1][0][0], 64);
            _tile_stored(2, &acc[2][0][0], 64);
            for (int64_t t = 0; t < kAmxTiles; t++) {
              for (int j = 0; j < 16; j++) {
                const float scale = n + 16 * t + j < n_dim ? w.channel[n + 16 * t + j] : 0.f;
                _mm512_store_ps(acc[t][j], _mm512_mul_ps(_mm512_load_ps(acc[t][j]), _mm512_set1_ps(scale)));
              }
            }
          }
          for (int64_t t = 0; t < kAmxTiles && n + 16 * t < n_dim; t++) {
            StoreTile(&acc[t][0][0], g, m_rows, n + 16 * t, n_dim, k0 > 0, y);
          }
        }
      }
    }
    _tile_release();
  });
}
#endif

// panel[k][j] = dequantized w[n + j][k0 + k] for k < depth, j < kPanel (0 past the last weight row): one block of
// the weight, widened, scaled and transposed.
void PackPanel(const Weights &w, int64_t n, int64_t k0, int64_t depth, float *panel) {
  const int64_t rows = std::min(kPanel, w.n_dim - n), k_dim = w.k_dim;
  auto scale = [&](int64_t j, int64_t k) {
    return w.half ? HalfToFloat(w.half[(n + j) * w.Blocks() + k / kBlock]) : w.channel[n + j];
  };
#if defined(__AVX512F__)
  if (depth % 16 == 0) {
    alignas(64) float tile[16][16];
    for (int64_t j0 = 0; j0 < kPanel; j0 += 16) {
      for (int64_t k = 0; k < depth; k += 16) {
        for (int64_t j = 0; j < 16; j++) {
          const Vec v = j0 + j < rows ? Widen(w.q + (n + j0 + j) * k_dim + k0 + k) * scale(j0 + j, k0 + k) : Vec{};
          std::memcpy(tile[j], &v, sizeof v);
        }
        mindformers_kernels::Transpose16x16(&tile[0][0], 16, panel + k * kPanel + j0, kPanel);
      }
    }
    return;
  }
#endif
  for (int64_t j = 0; j < kPanel; j++) {
    for (int64_t k = 0; k < depth; k++) {
      panel[k * kPanel + j] = j < rows ? w.q[(n + j) * k_dim + k0 + k] * scale(j, k0 + k) : 0.f;
    }
  }
}

template <int kRows>
void PanelRows(int rows, const float *x, int64_t ldx, const float *panel, int64_t depth, float *c, int64_t ldc,
               bool add) {
  if (rows < kRows) {
    if constexpr (kRows > 1) PanelRows<kRows - 1>(rows, x, ldx, panel, depth, c, ldc, add);
    return;
  }
  // c[i][0 : kPanel) (+)= sum_k x[i * ldx + k] panel[k][0 : kPanel) for the rows i of the tile, in registers
  mindformers_kernels::Tile<kRows, kTileVecs>(x, ldx, 1, panel, kPanel, depth, c, ldc, add);
}

// Many rows: panels of kPanel output features split over the cores; for each kDepth slice of the inputs the panel
// is packed once and multiplied with all rows of x, kTileRows at a time, into y (or a scratch tile for the last,
// partial panel).
void ManyRows(const float *x, int64_t m_rows, const Weights &w, float *y) {
  const int64_t panels = (w.n_dim + kPanel - 1) / kPanel, k_dim = w.k_dim, n_dim = w.n_dim;
  ParallelFor(panels, kPanel * k_dim * m_rows, [&](int64_t begin, int64_t end) {
    std::vector<float> panel(kDepth * kPanel);
    std::vector<float> edge;  // [m_rows, kPanel] for a partial panel
    for (int64_t p = begin; p < end; p++) {
      const int64_t n = p * kPanel, cols = std::min(kPanel, n_dim - n);
      float *c = y + n;
      int64_t ldc = n_dim;
      if (cols < kPanel) {
        edge.assign(m_rows * kPanel, 0.f);
        c = edge.data();
        ldc = kPanel;
      }
      for (int64_t k0 = 0; k0 < k_dim; k0 += kDepth) {
        const int64_t depth = std::min(kDepth, k_dim - k0);
        PackPanel(w, n, k0, depth, panel.data());
        for (int64_t m = 0; m < m_rows; m += kTileRows) {
          PanelRows<kTileRows>(static_cast<int>(std::min<int64_t>(kTileRows, m_rows - m)), x + m * k_dim + k0, k_dim,
                               panel.data(), depth, c + m * ldc, ldc, k0 > 0);
        }
      }
      if (cols < kPanel) {
        for (int64_t m = 0; m < m_rows; m++) std::memcpy(y + m * n_dim + n, c + m * kPanel, cols * sizeof(float));
      }
    }
  });
}
}  // namespace

// Floats per vector in this build (16 with AVX-512, 8 with AVX, else 4).
extern "C" int Int8Lanes() { return kLanes; }

// The bytes [p, p + bytes) summed (wrapping), split over the cores as the kernels split their weights: the plain
// read a decode step's weight streaming is measured against (benchmarks/int8.py `read`).
extern "C" int64_t Int8ReadBytes(const int8_t *p, int64_t bytes) {
  constexpr int64_t kPiece = 1 << 16;
  std::atomic<int64_t> total{0};
  ParallelFor((bytes + kPiece - 1) / kPiece, kPiece, [&](int64_t begin, int64_t end) {
    Vec acc[4] = {};  // four independent sums: one would be bound by the add's latency, not by memory
    int64_t sum = 0, i = begin * kPiece;
    const int64_t last = std::min(bytes, end * kPiece);
    for (; i + 4 * kLanes <= last; i += 4 * kLanes) {
      for (int j = 0; j < 4; j++) acc[j] += Widen(p + i + j * kLanes);
    }
    for (; i < last; i++) sum += p[i];
    total += sum + static_cast<int64_t>(Sum(acc[0] + acc[1]) + Sum(acc[2] + acc[3]));
  });
  return total.load();
}

// 1 when this build multiplies kAmxRows or more rows on AMX and this CPU and process allow it, else 0.
extern "C" int Int8UsesAmx() {
#if defined(MINDFORMERS_INT8_AMX)
  return AmxReady() ? 1 : 0;
#else
  return 0;
#endif
}

// y = x dequantize(weight)^T. Inputs: x [..., K] fp32, weight [N, K] int8, scale: [N, K / 32] fp16 (block32) or
// [N] fp32 (channel). Output: y [..., N] fp32. Returns 1 when the shapes do not fit together.
extern "C" int Int8Linear(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                          void *stream, void *extra) {
  if (nparam != 4 || ndims[1] != 2) return 1;
  const int64_t k_dim = shapes[0][ndims[0] - 1], n_dim = shapes[1][0];
  if (shapes[1][1] != k_dim || shapes[2][0] != n_dim) return 1;
  const bool block32 = ndims[2] == 2;
  if (block32 && (k_dim % kBlock || shapes[2][1] != k_dim / kBlock)) return 1;
  if (!block32 && ndims[2] != 1) return 1;
  const Weights w{static_cast<const int8_t *>(params[1]),
                  block32 ? static_cast<const uint16_t *>(params[2]) : nullptr,
                  block32 ? nullptr : static_cast<const float *>(params[2]), n_dim, k_dim};
  const float *x = static_cast<const float *>(params[0]);
  float *y = static_cast<float *>(params[3]);
  const int64_t m_rows = Numel(ndims[0], shapes[0]) / std::max<int64_t>(1, k_dim);
  if (m_rows == 0 || n_dim == 0) return 0;
  if (k_dim == 0) {
    std::memset(y, 0, m_rows * n_dim * sizeof(float));
    return 0;
  }
#if defined(MINDFORMERS_INT8_AMX)
  if (m_rows >= kAmxRows && k_dim % kBlock == 0 && AmxReady()) {
    AmxRows(x, m_rows, w, y);
    return 0;
  }
#endif
  if (m_rows <= kFewRows) {
    FewRows(x, m_rows, w, y);
  } else {
    ManyRows(x, m_rows, w, y);
  }
  return 0;
}
