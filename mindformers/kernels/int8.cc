// Weight-only int8 linear layers for MindSpore's ops.Custom(func_type="aot"): y = x W^T with x fp32 and W int8
// [N, K] plus scales (mindformers.quantization.formats: `block32` = an fp16 scale per 32 weights of a row, `channel`
// = an fp32 scale per row). The weights are widened to fp32 in registers (or in a small cache-resident panel) and
// multiplied with fp32 activations; nothing else is rounded.
//
// Few rows (decode): each weight row is read once for all rows of x, widened and scaled in registers, and dotted
// with every row of x; the output features are split over the cores. Many rows (prefill): a panel of kPanel output
// features x kDepth inputs is widened, scaled and transposed into fp32 once, then multiplied with every row of x by
// a register-tiled kernel, so the widening is paid once per panel and the panel stays in L1.
//
// Written with GCC vector types, so one source serves every ISA: 16 lanes with AVX-512, 8 with AVX, 4 otherwise
// (SSE or NEON); the AVX-512 build also packs panels with an in-register transpose.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"

#if defined(__SSE4_1__) || defined(__AVX2__)
#include <immintrin.h>
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
    const int64_t count = rows * Blocks();
    const uint16_t *src = half + n * Blocks();
#pragma omp simd
    for (int64_t i = 0; i < count; i++) out[i] = HalfToFloat(src[i]);
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
  if (m_rows <= kFewRows) {
    FewRows(x, m_rows, w, y);
  } else {
    ManyRows(x, m_rows, w, y);
  }
  return 0;
}
