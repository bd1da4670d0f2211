// Fused fp32 CPU kernels for MindSpore's ops.Custom(func_type="aot").
// Signature of every entry point: params = inputs then outputs; shapes[i] has ndims[i] dims.
// Rows are the product of all but the last dimension; large inputs are split over rows between the threads of
// common.h. Column sums (dweight, dbias) are accumulated per fixed block of rows and the blocks are added in order, so
// results do not depend on the number of threads or their timing.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>
#include <vector>

#include "common.h"

namespace {
using mindformers_kernels::Numel;
using mindformers_kernels::ParallelFor;
constexpr float kA = 1.5957691216057308f;   // 2 * sqrt(2 / pi)
constexpr float kB = 0.0713548162726f;      // 2 * sqrt(2 / pi) * 0.044715
constexpr int64_t kBlockRows = 64;

// e^r for |r| <= ln(2) / 2: Cephes' expf polynomial. T is float or a vector of floats.
template <typename T>
inline T ExpNearZero(T r) {
  T p = 1.9875691500e-4f * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * r * r + r + 1.f;
}

// exp(x) = 2^n e^r with n = round(x / ln 2) and r = x - n ln 2 (ln 2 in two parts); x is clamped to [-87, 88]
// (-ffast-math assumes no infinities). Inline, so loops calling it vectorise without a call per vector into the
// vector libm.
inline float Exp(float x) {
  x = std::fmin(std::fmax(x, -87.f), 88.f);
  const float n = std::nearbyint(x * 1.44269504f);
  const int32_t two_n_bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &two_n_bits, sizeof two_n);
  return ExpNearZero(x - n * 0.693359375f + n * 2.12194440e-4f) * two_n;
}

// sigmoid(x (a + b x^2))
inline float GeluGate(float v) { return 1.f / (1.f + Exp(-v * (kA + kB * v * v))); }

// d/dv of v * GeluGate(v)
inline float GeluSlope(float v) {
  const float s = GeluGate(v);
  return s + v * s * (1.f - s) * (kA + 3.f * kB * v * v);
}


// out[j] = the sum over blocks of partial[block * cols + j], added in block order: per-block column sums filled by
// any thread give the same result.
void SumBlocks(const std::vector<float> &partial, int64_t cols, float *out) {
  std::memset(out, 0, cols * sizeof(float));
  for (size_t first = 0; first < partial.size(); first += cols) {
    const float *block = partial.data() + first;
#pragma omp simd
    for (int64_t j = 0; j < cols; j++) out[j] += block[j];
  }
}

// Row-wise work that also sums values per column over all rows (weight and bias gradients): fn(r, sums) handles row
// r and adds into sums[k][0..cols) for each k < kSums. Rows go in fixed blocks of kBlockRows, each block with partial
// sums of its own, added into out[k] in block order.
template <size_t kSums, typename Fn>
void RowsWithColumnSums(int64_t rows, int64_t cols, std::array<float *, kSums> out, Fn fn) {
  const int64_t blocks = (rows + kBlockRows - 1) / kBlockRows;
  std::array<std::vector<float>, kSums> partial;
  for (auto &p : partial) p.assign(blocks * cols, 0.f);
  ParallelFor(blocks, kBlockRows * cols, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; blk++) {
      std::array<float *, kSums> sums;
      for (size_t k = 0; k < kSums; k++) sums[k] = partial[k].data() + blk * cols;
      const int64_t last = std::min(rows, (blk + 1) * kBlockRows);
      for (int64_t r = blk * kBlockRows; r < last; r++) fn(r, sums);
    }
  });
  for (size_t k = 0; k < kSums; k++) SumBlocks(partial[k], cols, out[k]);
}
}  // namespace

// y = x * sigmoid(x * (a + b x^2))  (tanh-approximate GELU)
extern "C" int GeluForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                           void *stream, void *extra) {
  const float *x = static_cast<const float *>(params[0]);
  float *y = static_cast<float *>(params[1]);
  const int64_t n = Numel(ndims[0], shapes[0]);
  ParallelFor(n, 1, [=](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; i++) {
      const float v = x[i];
      y[i] = v * GeluGate(v);
    }
  });
  return 0;
}

// dx = dy * (s + x s (1 - s) (a + 3 b x^2)),  s = sigmoid(x (a + b x^2))
extern "C" int GeluBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                            void *stream, void *extra) {
  const float *x = static_cast<const float *>(params[0]);
  const float *dy = static_cast<const float *>(params[1]);
  float *dx = static_cast<float *>(params[2]);
  const int64_t n = Numel(ndims[0], shapes[0]);
  ParallelFor(n, 1, [=](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; i++) {
      dx[i] = dy[i] * GeluSlope(x[i]);
    }
  });
  return 0;
}

// y = gelu(x + bias) for x [rows, C], bias [C]. Inputs: x, bias. Output: y.
extern "C" int BiasGeluForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                               void *stream, void *extra) {
  const float *x = static_cast<const float *>(params[0]);
  const float *bias = static_cast<const float *>(params[1]);
  float *y = static_cast<float *>(params[2]);
  const int64_t cols = shapes[1][0];
  const int64_t rows = Numel(ndims[0], shapes[0]) / cols;
  ParallelFor(rows, cols, [=](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; r++) {
      const float *xr = x + r * cols;
      float *yr = y + r * cols;
#pragma omp simd
      for (int64_t j = 0; j < cols; j++) {
        const float v = xr[j] + bias[j];
        yr[j] = v * GeluGate(v);
      }
    }
  });
  return 0;
}

// Inputs: x [rows, C], bias [C], dy [rows, C]. Outputs: dx [rows, C] (the gradient of x, and of x + bias), dbias [C]
// (BiasGeluInputBackward, for a frozen bias: dx only).
template <bool kBiasGrad>
int BiasGeluBackwardOf(void **params, int *ndims, int64_t **shapes) {
  const float *x = static_cast<const float *>(params[0]);
  const float *bias = static_cast<const float *>(params[1]);
  const float *dy = static_cast<const float *>(params[2]);
  float *dx = static_cast<float *>(params[3]);
  const int64_t cols = shapes[1][0];
  const int64_t rows = Numel(ndims[0], shapes[0]) / cols;
  auto row = [&](int64_t r, float *pb) {
    const float *xr = x + r * cols;
    const float *dyr = dy + r * cols;
    float *dxr = dx + r * cols;
#pragma omp simd
    for (int64_t j = 0; j < cols; j++) dxr[j] = dyr[j] * GeluSlope(xr[j] + bias[j]);
    if constexpr (kBiasGrad) {
#pragma omp simd
      for (int64_t j = 0; j < cols; j++) pb[j] += dxr[j];
    }
  };
  if constexpr (kBiasGrad) {
    RowsWithColumnSums<1>(rows, cols, {static_cast<float *>(params[4])},
                          [&](int64_t r, const std::array<float *, 1> &sums) { row(r, sums[0]); });
  } else {
    ParallelFor(rows, cols, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; r++) row(r, nullptr);
    });
  }
  return 0;
}

extern "C" int BiasGeluBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                void *stream, void *extra) {
  return BiasGeluBackwardOf<true>(params, ndims, shapes);
}

extern "C" int BiasGeluInputBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                     void *stream, void *extra) {
  return BiasGeluBackwardOf<false>(params, ndims, shapes);
}

// y = x + bias + residual for x, residual [rows, C] and bias [C] (a layer's output joining the residual stream).
// Inputs: x, bias, residual. Output: y.
extern "C" int BiasResidualAdd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                               void *stream, void *extra) {
  const float *x = static_cast<const float *>(params[0]);
  const float *bias = static_cast<const float *>(params[1]);
  const float *residual = static_cast<const float *>(params[2]);
  float *y = static_cast<float *>(params[3]);
  const int64_t cols = shapes[1][0];
  const int64_t rows = Numel(ndims[0], shapes[0]) / cols;
  ParallelFor(rows, cols, [=](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; r++) {
#pragma omp simd
      for (int64_t j = 0; j < cols; j++) y[r * cols + j] = x[r * cols + j] + bias[j] + residual[r * cols + j];
    }
  });
  return 0;
}

namespace {
// LayerNorm (kCentered) or RMSNorm over the last axis: y = (x - mean) * rstd * w (+ b), rstd = 1 / sqrt(mean((x -
// mean)^2) + eps), mean = 0 for RMSNorm. Writes mean (LayerNorm only) and rstd per row.
template <bool kCentered>
void NormForward(const float *x, const float *w, const float *b, float eps, float *y, float *mean_out,
                 float *rstd_out, int64_t rows, int64_t h) {
  ParallelFor(rows, h, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; r++) {
      const float *xr = x + r * h;
      float *yr = y + r * h;
      float mean = 0.f;
      if constexpr (kCentered) {
        double sum = 0.0;
        for (int64_t j = 0; j < h; j++) sum += xr[j];
        mean = static_cast<float>(sum / h);
        mean_out[r] = mean;
      }
      double sq = 0.0;
      for (int64_t j = 0; j < h; j++) {
        const float d = xr[j] - mean;
        sq += static_cast<double>(d) * d;
      }
      const float rstd = 1.f / std::sqrt(static_cast<float>(sq / h) + eps);
      if constexpr (kCentered) {
#pragma omp simd
        for (int64_t j = 0; j < h; j++) yr[j] = (xr[j] - mean) * rstd * w[j] + b[j];
      } else {
#pragma omp simd
        for (int64_t j = 0; j < h; j++) yr[j] = (xr[j] * rstd) * w[j];
      }
      rstd_out[r] = rstd;
    }
  });
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * weight, xhat = (x - mean) * rstd (RMSNorm: without
// mean(g) and mean); row r adds dy * xhat into sums[0] and (LayerNorm) dy into sums[1]. Not inlined: the frozen path
// (kParamGrads false) runs this same code, its sums into a scratch row nobody reads, so dx has the bits of the
// trainable path, which are those of the kernel before the frozen path existed (-ffast-math lets the compiler round a
// reshaped loop differently, and a full training run then takes another trajectory).
template <bool kCentered>
__attribute__((noinline)) void NormBackwardRow(const float *x, const float *dy, const float *w, const float *mean,
                                               const float *rstd, float *dx,
                                               const std::array<float *, kCentered ? 2 : 1> &sums, int64_t r,
                                               int64_t h) {
  float *pw = sums[0];
  const float *xr = x + r * h;
  const float *dyr = dy + r * h;
  float *dxr = dx + r * h;
  const float mu = kCentered ? mean[r] : 0.f, rs = rstd[r];
  float sum_g = 0.f, sum_gx = 0.f;
#pragma omp simd reduction(+ : sum_g, sum_gx)
  for (int64_t j = 0; j < h; j++) {
    const float xhat = (xr[j] - mu) * rs;
    const float g = dyr[j] * w[j];
    sum_g += g;
    sum_gx += g * xhat;
    pw[j] += dyr[j] * xhat;
    if constexpr (kCentered) sums[1][j] += dyr[j];
  }
  const float mean_g = kCentered ? sum_g / h : 0.f, mean_gx = sum_gx / h;
#pragma omp simd
  for (int64_t j = 0; j < h; j++) {
    const float xhat = (xr[j] - mu) * rs;
    dxr[j] = rs * (dyr[j] * w[j] - mean_g - xhat * mean_gx);
  }
}

// NormBackwardRow over every row; with kParamGrads, dweight = the sum over rows of dy * xhat and dbias (LayerNorm)
// of dy into dparams. Without (frozen weight and bias), only dx: no column sums over rows.
template <bool kCentered, bool kParamGrads>
void NormBackward(const float *x, const float *dy, const float *w, const float *mean, const float *rstd, float *dx,
                  std::array<float *, kCentered ? 2 : 1> dparams, int64_t rows, int64_t h) {
  using Sums = std::array<float *, kCentered ? 2 : 1>;
  if constexpr (kParamGrads) {
    RowsWithColumnSums(rows, h, dparams, [&](int64_t r, const Sums &sums) {
      NormBackwardRow<kCentered>(x, dy, w, mean, rstd, dx, sums, r, h);
    });
  } else {
    ParallelFor(rows, h, [&](int64_t begin, int64_t end) {
      std::vector<float> scratch(std::tuple_size<Sums>::value * h, 0.f);
      Sums sums;
      for (size_t k = 0; k < sums.size(); k++) sums[k] = scratch.data() + k * h;
      for (int64_t r = begin; r < end; r++) NormBackwardRow<kCentered>(x, dy, w, mean, rstd, dx, sums, r, h);
    });
  }
}
}  // namespace

// LayerNorm over the last axis. Inputs: x [rows, h], weight [h], bias [h], eps [1].
// Outputs: y [rows, h], mean [rows], rstd [rows].
extern "C" int LayerNormForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                void *stream, void *extra) {
  const int64_t h = shapes[0][ndims[0] - 1];
  NormForward<true>(static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
                    static_cast<const float *>(params[2]), *static_cast<const float *>(params[3]),
                    static_cast<float *>(params[4]), static_cast<float *>(params[5]), static_cast<float *>(params[6]),
                    Numel(ndims[0], shapes[0]) / h, h);
  return 0;
}

// Inputs: x [rows, h], dy [rows, h], weight [h], mean [rows], rstd [rows].
// Outputs: dx [rows, h], dweight [h], dbias [h] (LayerNormInputBackward, for a frozen weight and bias: dx only).
template <bool kParamGrads>
int LayerNormBackwardOf(void **params, int *ndims, int64_t **shapes) {
  const int64_t h = shapes[0][ndims[0] - 1];
  NormBackward<true, kParamGrads>(static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
                                  static_cast<const float *>(params[2]), static_cast<const float *>(params[3]),
                                  static_cast<const float *>(params[4]), static_cast<float *>(params[5]),
                                  {kParamGrads ? static_cast<float *>(params[6]) : nullptr,
                                   kParamGrads ? static_cast<float *>(params[7]) : nullptr},
                                  Numel(ndims[0], shapes[0]) / h, h);
  return 0;
}

extern "C" int LayerNormBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                 void *stream, void *extra) {
  return LayerNormBackwardOf<true>(params, ndims, shapes);
}

extern "C" int LayerNormInputBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                      void *stream, void *extra) {
  return LayerNormBackwardOf<false>(params, ndims, shapes);
}

// RMSNorm over the last axis, y = (x * rstd) * w. Inputs: x [rows, h], weight [h], eps [1].
// Outputs: y [rows, h], rstd [rows].
extern "C" int RmsNormForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                              void *stream, void *extra) {
  const int64_t h = shapes[0][ndims[0] - 1];
  NormForward<false>(static_cast<const float *>(params[0]), static_cast<const float *>(params[1]), nullptr,
                     *static_cast<const float *>(params[2]), static_cast<float *>(params[3]), nullptr,
                     static_cast<float *>(params[4]), Numel(ndims[0], shapes[0]) / h, h);
  return 0;
}

// Inputs: x [rows, h], dy [rows, h], weight [h], rstd [rows]. Outputs: dx [rows, h], dweight [h]
// (RmsNormInputBackward, for a frozen weight: dx only).
template <bool kParamGrads>
int RmsNormBackwardOf(void **params, int *ndims, int64_t **shapes) {
  const int64_t h = shapes[0][ndims[0] - 1];
  NormBackward<false, kParamGrads>(static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
                                   static_cast<const float *>(params[2]), nullptr,
                                   static_cast<const float *>(params[3]), static_cast<float *>(params[4]),
                                   {kParamGrads ? static_cast<float *>(params[5]) : nullptr},
                                   Numel(ndims[0], shapes[0]) / h, h);
  return 0;
}

extern "C" int RmsNormBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                               void *stream, void *extra) {
  return RmsNormBackwardOf<true>(params, ndims, shapes);
}

extern "C" int RmsNormInputBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                    void *stream, void *extra) {
  return RmsNormBackwardOf<false>(params, ndims, shapes);
}

extern "C" int CausalSoftmaxForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                    void *stream, void *extra) {
  const float *x = static_cast<const float *>(params[0]);
  float *p = static_cast<float *>(params[1]);
  const int64_t s = shapes[0][ndims[0] - 1];
  const int64_t rows = Numel(ndims[0], shapes[0]) / s;
  ParallelFor(rows, s, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; r++) {
      const int64_t q = r % s;
      const float *xr = x + r * s;
      float *pr = p + r * s;
      float mx = xr[0];
      for (int64_t j = 1; j <= q; j++) mx = std::fmax(mx, xr[j]);
      float sum = 0.f;
      for (int64_t j = 0; j <= q; j++) {
        const float e = Exp(xr[j] - mx);
        pr[j] = e;
        sum += e;
      }
      const float inv = 1.f / sum;
#pragma omp simd
      for (int64_t j = 0; j <= q; j++) pr[j] *= inv;
      for (int64_t j = q + 1; j < s; j++) pr[j] = 0.f;
    }
  });
  return 0;
}

// Inputs: probs [..., S, S], dprobs. Output: dscores = probs * (dprobs - sum_j(dprobs * probs)).
extern "C" int CausalSoftmaxBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                     void *stream, void *extra) {
  const float *p = static_cast<const float *>(params[0]);
  const float *dp = static_cast<const float *>(params[1]);
  float *dx = static_cast<float *>(params[2]);
  const int64_t s = shapes[0][ndims[0] - 1];
  const int64_t rows = Numel(ndims[0], shapes[0]) / s;
  ParallelFor(rows, s, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; r++) {
      const int64_t q = r % s;
      const float *pr = p + r * s;
      const float *dpr = dp + r * s;
      float *dxr = dx + r * s;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t j = 0; j <= q; j++) dot += pr[j] * dpr[j];
#pragma omp simd
      for (int64_t j = 0; j <= q; j++) dxr[j] = pr[j] * (dpr[j] - dot);
      for (int64_t j = q + 1; j < s; j++) dxr[j] = 0.f;
    }
  });
  return 0;
}

namespace {
// Each row's cache row and write position from indices [batch, kv_heads, 1, 3] (cache row, head, position; the
// heads of a row agree); false when one is outside a cache of `cache_rows` rows of `length` positions.
bool RowPositions(const int32_t *indices, int64_t batch, int64_t kv_heads, int64_t cache_rows, int64_t length,
                  std::vector<int64_t> *rows, std::vector<int64_t> *positions) {
  rows->resize(batch);
  positions->resize(batch);
  for (int64_t b = 0; b < batch; b++) {
    const int64_t row = indices[b * kv_heads * 3], position = indices[b * kv_heads * 3 + 2];
    if (row < 0 || row >= cache_rows || position < 0 || position >= length) return false;
    (*rows)[b] = row;
    (*positions)[b] = position;
  }
  return true;
}

// A KV cache element stored in IEEE half precision (its bits). Conversions round to nearest even and are exact
// the other way, so the scalar and the AVX-512 code store and read the same values.
struct Half {
  uint16_t bits;
};

inline float Widen(float x) { return x; }

inline float Widen(Half h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t exponent = (h.bits >> 10) & 0x1fu, mantissa = h.bits & 0x3ffu;
  uint32_t bits;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float
    float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    std::memcpy(&bits, &magnitude, sizeof(bits));
  } else if (exponent == 31) {
    bits = 0x7f800000u | (mantissa << 13);
  } else {
    bits = ((exponent + 112) << 23) | (mantissa << 13);
  }
  bits |= sign;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

template <typename Cache>
inline Cache Narrow(float x);

template <>
inline float Narrow<float>(float x) {
  return x;
}

template <>
inline Half Narrow<Half>(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  bits &= 0x7fffffffu;
  auto round = [](uint32_t kept, uint32_t rest, uint32_t halfway) {  // to nearest, ties to even
    return kept + (rest > halfway || (rest == halfway && (kept & 1u)));
  };
  uint32_t out;
  if (bits > 0x7f800000u) {
    out = 0x7e00u;  // NaN
  } else if (bits >= 0x47800000u) {
    out = 0x7c00u;  // >= 2^16 (or infinity): overflows to infinity
  } else if (bits >= 0x38800000u) {  // normal half; a carry out of the mantissa moves the exponent up (to inf at most)
    const uint32_t rebased = bits - (112u << 23);
    out = round(rebased >> 13, rebased & 0x1fffu, 0x1000u);
  } else if (bits >= 0x33000000u) {  // subnormal half: units of 2^-24
    const uint32_t mantissa = (bits & 0x7fffffu) | 0x800000u, shift = 126 - (bits >> 23);
    out = round(mantissa >> shift, mantissa & ((1u << shift) - 1), 1u << (shift - 1));
  } else {
    out = 0;  // below half of the smallest subnormal
  }
  return Half{static_cast<uint16_t>(sign | out)};
}

#if defined(__AVX512F__)
inline __m512 Widen16(const float *x) { return _mm512_loadu_ps(x); }
inline __m512 Widen16(const Half *x) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(x)));
}
#endif

// dot(q, k) over dim values, k widened to fp32.
template <typename Cache>
inline float CacheDot(const float *q, const Cache *k, int64_t dim) {
  float dot = 0.f;
  int64_t d = 0;
#if defined(__AVX512F__)
  if (!std::is_same<Cache, float>::value) {
    __m512 acc = _mm512_setzero_ps();
    for (; d + 16 <= dim; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), Widen16(k + d), acc);
    dot = _mm512_reduce_add_ps(acc);
  }
#endif
#pragma omp simd reduction(+ : dot)
  for (int64_t e = d; e < dim; e++) dot += q[e] * Widen(k[e]);
  return dot;
}

// out += p * v over dim values, v widened to fp32.
template <typename Cache>
inline void CacheAxpy(float p, const Cache *v, float *out, int64_t dim) {
  int64_t d = 0;
#if defined(__AVX512F__)
  if (!std::is_same<Cache, float>::value) {
    const __m512 scale = _mm512_set1_ps(p);
    for (; d + 16 <= dim; d += 16)
      _mm512_storeu_ps(out + d, _mm512_fmadd_ps(scale, Widen16(v + d), _mm512_loadu_ps(out + d)));
  }
#endif
#pragma omp simd
  for (int64_t e = d; e < dim; e++) out[e] += p * Widen(v[e]);
}

template <typename Cache>
inline void CacheStore(const float *x, Cache *out, int64_t dim) {
  int64_t d = 0;
#if defined(__AVX512F__)
  if (std::is_same<Cache, Half>::value) {
    for (; d + 16 <= dim; d += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i *>(out + d),
                          _mm512_cvtps_ph(_mm512_loadu_ps(x + d), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
#endif
  for (; d < dim; d++) out[d] = Narrow<Cache>(x[d]);
}

// One decode step of attention over an in-place KV cache of `Cache` elements (float, or Half: converted to and from
// fp32 in registers), for `batch` rows of `q_heads` query heads and `kv_heads` cached heads of `dim` values.
// query(b, h), key(b, g), value(b, g) point at the new fp32 vectors (query already scaled); context(b, h) at the fp32
// output. Caches are [cache rows, kv_heads, length, dim]; mask [batch, length] additive. Writes row b's key/value at
// position positions[b] of cache row rows[b], then (every row written) attends over that cache row's positions
// 0..positions[b] only; query head h reads kv head h / (q_heads / kv_heads). Several rows may share a cache row
// (consecutive tokens of one sequence, positions increasing): each sees the keys the earlier ones wrote.
template <typename Cache, typename Query, typename Key, typename Value, typename Context>
void DecodeAttend(int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t dim, int64_t length,
                  const int64_t *rows, const int64_t *positions, Cache *key_cache, Cache *value_cache, const float *mask, Query query,
                  Key key, Value value, Context context) {
  int64_t longest = 0;
  for (int64_t b = 0; b < batch; b++) {
    for (int64_t g = 0; g < kv_heads; g++) {
      const int64_t slot = ((rows[b] * kv_heads + g) * length + positions[b]) * dim;
      CacheStore(key(b, g), key_cache + slot, dim);
      CacheStore(value(b, g), value_cache + slot, dim);
    }
    longest = std::max(longest, positions[b] + 1);
  }
  const int64_t group = q_heads / kv_heads;
  ParallelFor(batch * q_heads, 2 * longest * dim, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(longest);
    for (int64_t row = begin; row < end; row++) {
      const int64_t b = row / q_heads, h = row % q_heads, kv_row = rows[b] * kv_heads + h / group;
      const int64_t span = positions[b] + 1;
      const float *qr = query(b, h);
      const Cache *keys = key_cache + kv_row * length * dim;
      const Cache *values = value_cache + kv_row * length * dim;
      const float *mr = mask + b * length;
      float mx = -3.0e38f;  // not -INFINITY: -ffast-math assumes no infinities
      for (int64_t j = 0; j < span; j++) {
        scores[j] = CacheDot(qr, keys + j * dim, dim) + mr[j];
        mx = std::fmax(mx, scores[j]);
      }
      float sum = 0.f;
      for (int64_t j = 0; j < span; j++) {
        scores[j] = Exp(scores[j] - mx);
        sum += scores[j];
      }
      float *orow = context(b, h);
      std::memset(orow, 0, dim * sizeof(float));
      for (int64_t j = 0; j < span; j++) CacheAxpy(scores[j] / sum, values + j * dim, orow, dim);
    }
  });
}

// Inputs: query [B, Hq, 1, D] (already scaled), key and value [B, Hkv, 1, D], key_cache and value_cache
// [S, Hkv, L, D] of `Cache` elements, mask [B, 1, 1, L] additive, indices [B, Hkv, 1, 3] int32: (cache row s_b, head,
// write position P_b) (rows may differ: each attends over cache row s_b's positions 0..P_b). Output: context
// [B, Hq, 1, D].
// The caches' memory is their Parameters': writing into it is the intended side effect.
template <typename Cache>
int DecodeAttentionOf(void **params, int64_t **shapes) {
  const float *q = static_cast<const float *>(params[0]);
  const float *k = static_cast<const float *>(params[1]);
  const float *v = static_cast<const float *>(params[2]);
  float *out = static_cast<float *>(params[7]);
  const int64_t batch = shapes[0][0], q_heads = shapes[0][1], dim = shapes[0][3];
  const int64_t kv_heads = shapes[3][1], length = shapes[3][2];
  std::vector<int64_t> rows, positions;
  if (q_heads % kv_heads ||
      !RowPositions(static_cast<const int32_t *>(params[6]), batch, kv_heads, shapes[3][0], length, &rows, &positions))
    return 1;
  DecodeAttend(batch, q_heads, kv_heads, dim, length, rows.data(), positions.data(), static_cast<Cache *>(params[3]),
               static_cast<Cache *>(params[4]), static_cast<const float *>(params[5]),
               [&](int64_t b, int64_t h) { return q + (b * q_heads + h) * dim; },
               [&](int64_t b, int64_t g) { return k + (b * kv_heads + g) * dim; },
               [&](int64_t b, int64_t g) { return v + (b * kv_heads + g) * dim; },
               [&](int64_t b, int64_t h) { return out + (b * q_heads + h) * dim; });
  return 0;
}

// The same on a packed projection: qkv [B, (Hq + 2 Hkv) D] laid out q | k | v with heads contiguous (unscaled),
// key_cache, value_cache, mask, indices as above, scale [1]. Output: context [B, Hq D] (heads merged).
template <typename Cache>
int DecodeAttentionPackedOf(void **params, int64_t **shapes) {
  const float *qkv = static_cast<const float *>(params[0]);
  float *out = static_cast<float *>(params[6]);
  const int64_t batch = shapes[0][0], width = shapes[0][1];
  const int64_t kv_heads = shapes[1][1], length = shapes[1][2], dim = shapes[1][3];
  const int64_t q_heads = width / dim - 2 * kv_heads;
  const float scale = *static_cast<const float *>(params[5]);
  std::vector<int64_t> rows, positions;
  if (q_heads <= 0 || q_heads % kv_heads ||
      !RowPositions(static_cast<const int32_t *>(params[4]), batch, kv_heads, shapes[1][0], length, &rows, &positions))
    return 1;
  std::vector<float> query(batch * q_heads * dim);
  for (int64_t b = 0; b < batch; b++) {
    for (int64_t i = 0; i < q_heads * dim; i++) query[b * q_heads * dim + i] = qkv[b * width + i] * scale;
  }
  const float *keys = qkv + q_heads * dim, *values = keys + kv_heads * dim;
  DecodeAttend(batch, q_heads, kv_heads, dim, length, rows.data(), positions.data(), static_cast<Cache *>(params[1]),
               static_cast<Cache *>(params[2]), static_cast<const float *>(params[3]),
               [&](int64_t b, int64_t h) { return query.data() + (b * q_heads + h) * dim; },
               [&](int64_t b, int64_t g) { return keys + b * width + g * dim; },
               [&](int64_t b, int64_t g) { return values + b * width + g * dim; },
               [&](int64_t b, int64_t h) { return out + (b * q_heads + h) * dim; });
  return 0;
}
}  // namespace

// Entry points: fp32 caches, and fp16 caches (suffix F16) read and written by the same fp32 computation.
extern "C" int DecodeAttention(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                               void *stream, void *extra) {
  return DecodeAttentionOf<float>(params, shapes);
}

extern "C" int DecodeAttentionF16(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                  void *stream, void *extra) {
  return DecodeAttentionOf<Half>(params, shapes);
}

extern "C" int DecodeAttentionPacked(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                     void *stream, void *extra) {
  return DecodeAttentionPackedOf<float>(params, shapes);
}

extern "C" int DecodeAttentionPackedF16(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                        void *stream, void *extra) {
  return DecodeAttentionPackedOf<Half>(params, shapes);
}

// Column sums (the gradient of a bias add). Input: dy [rows, C]. Output: [C].
// Each thread owns a range of columns and adds the rows in order, so the result does not depend on threading.
extern "C" int ColumnSum(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                         void *stream, void *extra) {
  const float *dy = static_cast<const float *>(params[0]);
  float *out = static_cast<float *>(params[1]);
  const int64_t cols = shapes[0][ndims[0] - 1];
  const int64_t rows = Numel(ndims[0], shapes[0]) / cols;
  constexpr int64_t kColumnBlock = 256;
  const int64_t col_blocks = (cols + kColumnBlock - 1) / kColumnBlock;
  ParallelFor(col_blocks, rows * kColumnBlock, [&](int64_t begin, int64_t end) {
    const int64_t first = begin * kColumnBlock, last = std::min(cols, end * kColumnBlock);
    std::memset(out + first, 0, (last - first) * sizeof(float));
    for (int64_t r = 0; r < rows; r++) {
      const float *row = dy + r * cols;
#pragma omp simd
      for (int64_t j = first; j < last; j++) out[j] += row[j];
    }
  });
  return 0;
}

// Log-probabilities of chosen classes. Inputs: logits [N, V], index [N] int32 (in [0, V)). Outputs:
// picked [N] = logits[r, index[r]] - lse[r], lse [N] = log(sum_j exp(logits[r, j])).
extern "C" int TokenLogProbsForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                    void *stream, void *extra) {
  const float *logits = static_cast<const float *>(params[0]);
  const int32_t *index = static_cast<const int32_t *>(params[1]);
  float *picked = static_cast<float *>(params[2]);
  float *lse = static_cast<float *>(params[3]);
  const int64_t vocab = shapes[0][ndims[0] - 1];
  const int64_t rows = Numel(ndims[0], shapes[0]) / vocab;
  ParallelFor(rows, 2 * vocab, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; r++) {
      const float *x = logits + r * vocab;
      float mx = x[0];
#pragma omp simd reduction(max : mx)
      for (int64_t j = 0; j < vocab; j++) mx = std::fmax(mx, x[j]);
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < vocab; j++) sum += Exp(x[j] - mx);
      lse[r] = mx + std::log(sum);
      picked[r] = x[index[r]] - lse[r];
    }
  });
  return 0;
}

// Inputs: logits [N, V], index [N] int32, lse [N], dpicked [N]. Output: dlogits [N, V] =
// dpicked[r] * (onehot(index[r]) - softmax(logits[r])).
extern "C" int TokenLogProbsBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                     void *stream, void *extra) {
  const float *logits = static_cast<const float *>(params[0]);
  const int32_t *index = static_cast<const int32_t *>(params[1]);
  const float *lse = static_cast<const float *>(params[2]);
  const float *dpicked = static_cast<const float *>(params[3]);
  float *dlogits = static_cast<float *>(params[4]);
  const int64_t vocab = shapes[0][ndims[0] - 1];
  const int64_t rows = Numel(ndims[0], shapes[0]) / vocab;
  ParallelFor(rows, 2 * vocab, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; r++) {
      const float *x = logits + r * vocab;
      float *dx = dlogits + r * vocab;
      const float scale = -dpicked[r], shift = lse[r];
#pragma omp simd
      for (int64_t j = 0; j < vocab; j++) dx[j] = scale * Exp(x[j] - shift);
      dx[index[r]] += dpicked[r];
    }
  });
  return 0;
}

namespace {
// A list of fp32 tensors (params[first + i], i < count) cut into chunks of at most kChunk elements, so that work on
// tensors of very different sizes spreads evenly over the pool.
struct Chunk {
  int64_t tensor, begin, end;
};

std::vector<Chunk> Chunks(int64_t count, int first, int *ndims, int64_t **shapes) {
  constexpr int64_t kChunk = 1 << 15;
  std::vector<Chunk> chunks;
  for (int64_t t = 0; t < count; t++) {
    const int64_t n = Numel(ndims[first + t], shapes[first + t]);
    for (int64_t begin = 0; begin < n; begin += kChunk) chunks.push_back({t, begin, std::min(n, begin + kChunk)});
  }
  return chunks;
}
}  // namespace

// Sum of squares of each of N tensors. Inputs: N fp32 tensors. Output: [N]. Accumulated in double per chunk and the
// chunks added in order, so the result does not depend on threading.
extern "C" int SumOfSquares(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                            void *stream, void *extra) {
  const int64_t count = nparam - 1;
  float *out = static_cast<float *>(params[count]);
  const std::vector<Chunk> chunks = Chunks(count, 0, ndims, shapes);
  std::vector<double> partial(chunks.size());
  ParallelFor(static_cast<int64_t>(chunks.size()), 1 << 15, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; c++) {
      const float *x = static_cast<const float *>(params[chunks[c].tensor]);
      double sum = 0.0;
#pragma omp simd reduction(+ : sum)
      for (int64_t i = chunks[c].begin; i < chunks[c].end; i++) sum += static_cast<double>(x[i]) * x[i];
      partial[c] = sum;
    }
  });
  std::vector<double> totals(count, 0.0);
  for (size_t c = 0; c < chunks.size(); c++) totals[chunks[c].tensor] += partial[c];
  for (int64_t t = 0; t < count; t++) out[t] = static_cast<float>(totals[t]);
  return 0;
}

// AdamW on N fp32 parameters in place, one pass over each element:
//   m = b1 m + w1 g;  v = b2 v + w2 g^2;  p = p (1 - lr wd_i) - step_size m / (sqrt(v) + eps)
// Inputs: hyper [7] = (lr, step_size, eps, b1, b2, w1, w2), weight_decay [N], then N params, N first moments, N
// second moments, N gradients. Output: done [1] = 1 (for ordering only). The parameters' and moments' memory is their
// Parameters': writing into it is the intended side effect.
extern "C" int AdamWUpdate(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                           void *stream, void *extra) {
  const int64_t count = (nparam - 3) / 4;
  const float *hyper = static_cast<const float *>(params[0]);
  const float *weight_decay = static_cast<const float *>(params[1]);
  const float lr = hyper[0], step_size = hyper[1], eps = hyper[2];
  const float b1 = hyper[3], b2 = hyper[4], w1 = hyper[5], w2 = hyper[6];
  const std::vector<Chunk> chunks = Chunks(count, 2, ndims, shapes);
  ParallelFor(static_cast<int64_t>(chunks.size()), 1 << 16, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; c++) {
      const int64_t t = chunks[c].tensor;
      float *p = static_cast<float *>(params[2 + t]);
      float *m = static_cast<float *>(params[2 + count + t]);
      float *v = static_cast<float *>(params[2 + 2 * count + t]);
      const float *g = static_cast<const float *>(params[2 + 3 * count + t]);
      const float decay = 1.f - lr * weight_decay[t];
#pragma omp simd
      for (int64_t i = chunks[c].begin; i < chunks[c].end; i++) {
        const float mi = b1 * m[i] + w1 * g[i];
        const float vi = b2 * v[i] + w2 * g[i] * g[i];
        m[i] = mi;
        v[i] = vi;
        p[i] = p[i] * decay - step_size * mi / (std::sqrt(vi) + eps);
      }
    }
  });
  *static_cast<float *>(params[nparam - 1]) = 1.f;
  return 0;
}

namespace {
// y[m, first:last] = x[m] . w[n] (+ bias[n]) for every row m of x [m_rows, k_dim] and n in [first, last), w
// [n_dim, k_dim]. Tiles of 4 weight rows, each read once from memory for all rows of x (decode has few rows, so the
// weights' memory traffic is the cost). While a tile is computed, the tile kPrefetchTiles tiles ahead is prefetched
// into L2, so the weights stream from memory while the arithmetic runs; with more than one block of rows of x (a tile
// computed once per block of 4 or 8 rows) each block prefetches its share of that tile's rows, so the requests are
// spread over the tile's whole computation rather than issued in a burst during the first block.
constexpr int64_t kPrefetchTiles = 4;
#if defined(__AVX512F__)
// [sum of a's lanes, of b's, of c's, of d's]. Each vector's lanes are added in the same order whatever its position
// and the other three, so a feature's result does not depend on the features computed beside it.
inline __m128 SumLanes4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  const __m512d abd = _mm512_castps_pd(ab), cdd = _mm512_castps_pd(cd);
  const __m512 s = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(abd, cdd)),
                                 _mm512_castpd_ps(_mm512_unpackhi_pd(abd, cdd)));  // each 128 bits: a b c d
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(s),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// out[i][j] = x row i . w row j for MR rows of x (stride k_dim) and NR weight rows (out[i][NR..4) = 0), 16 lanes at
// a time with the tail masked: each weight vector is loaded once for all MR rows. Every dot product adds its terms
// in the same order whatever MR and NR are, so a row's result does not depend on the rows decoded beside it.
// `prefetch`: `prefetch_rows` weight rows of stride k_dim to bring into L2, a line per row per step.
template <int MR, int NR>
inline void DotTile(const float *x, const float *w, int64_t k_dim, float (*out)[4], const float *prefetch,
                    int prefetch_rows) {
  __m512 acc[MR][4];
  for (int i = 0; i < MR; i++)
    for (int j = 0; j < 4; j++) acc[i][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= k_dim; k += 16) {
    for (int j = 0; j < prefetch_rows; j++) _mm_prefetch(prefetch + j * k_dim + k, _MM_HINT_T1);
    __m512 wv[NR];
    for (int j = 0; j < NR; j++) wv[j] = _mm512_loadu_ps(w + j * k_dim + k);
    for (int i = 0; i < MR; i++) {
      const __m512 xv = _mm512_loadu_ps(x + i * k_dim + k);
      for (int j = 0; j < NR; j++) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  if (k < k_dim) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (k_dim - k)) - 1);
    __m512 wv[NR];
    for (int j = 0; j < NR; j++) wv[j] = _mm512_maskz_loadu_ps(mask, w + j * k_dim + k);
    for (int i = 0; i < MR; i++) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + i * k_dim + k);
      for (int j = 0; j < NR; j++) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR; i++) _mm_storeu_ps(out[i], SumLanes4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]));
}

template <int NR>
inline void DotTileRows(int mr, const float *x, const float *w, int64_t k_dim, float (*out)[4],
                        const float *prefetch, int prefetch_rows) {
  switch (mr) {
    case 1: DotTile<1, NR>(x, w, k_dim, out, prefetch, prefetch_rows); break;
    case 2: DotTile<2, NR>(x, w, k_dim, out, prefetch, prefetch_rows); break;
    case 3: DotTile<3, NR>(x, w, k_dim, out, prefetch, prefetch_rows); break;
    default: DotTile<4, NR>(x, w, k_dim, out, prefetch, prefetch_rows); break;
  }
}

// The same contract for 8 rows of x and NR <= 4 weight rows, as two passes of 8 rows x 2 weight rows (16
// accumulators each): each weight vector is loaded once for the 8 rows rather than once per 4 (15-25% faster at 8
// rows on a Zen 4). Only while the 8 rows of x stay in L1 (k_dim <= kEightRowsDepth: beyond it two blocks of 4 rows
// are faster); the products are the same bits as DotTile's. The passes share the prefetch rows.
constexpr int64_t kEightRowsDepth = 512;

template <int NR>
inline void DotTileEightRows(const float *x, const float *w, int64_t k_dim, float (*out)[4], const float *prefetch,
                             int prefetch_rows) {
  const int first_prefetch = (prefetch_rows + 1) / 2;
  DotTile<8, NR < 2 ? NR : 2>(x, w, k_dim, out, prefetch, first_prefetch);
  if constexpr (NR > 2) {
    float high[8][4];
    DotTile<8, NR - 2>(x, w + 2 * k_dim, k_dim, high, prefetch + first_prefetch * k_dim,
                       prefetch_rows - first_prefetch);
    for (int i = 0; i < 8; i++) out[i][2] = high[i][0], out[i][3] = high[i][1];
  }
}
#else
// The portable tile: the same contract as the AVX-512 one.
inline void DotTilePortable(int mr, int nr, const float *x, const float *w, int64_t k_dim, float (*out)[4],
                            const float *prefetch, int prefetch_rows) {
  for (int64_t k = 0; k < k_dim; k += 64 / sizeof(float)) {
    for (int j = 0; j < prefetch_rows; j++) __builtin_prefetch(prefetch + j * k_dim + k, 0, 2);
  }
  for (int i = 0; i < mr; i++) {
    const float *xr = x + i * k_dim;
    if (nr == 4) {
      const float *w0 = w, *w1 = w0 + k_dim, *w2 = w1 + k_dim, *w3 = w2 + k_dim;
      float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
      for (int64_t k = 0; k < k_dim; k++) {
        a0 += xr[k] * w0[k];
        a1 += xr[k] * w1[k];
        a2 += xr[k] * w2[k];
        a3 += xr[k] * w3[k];
      }
      out[i][0] = a0, out[i][1] = a1, out[i][2] = a2, out[i][3] = a3;
      continue;
    }
    for (int j = 0; j < nr; j++) {
      const float *wr = w + j * k_dim;
      float a = 0.f;
#pragma omp simd reduction(+ : a)
      for (int64_t k = 0; k < k_dim; k++) a += xr[k] * wr[k];
      out[i][j] = a;
    }
  }
}
#endif

// y[m, n] = x[m] . w[n] (+ bias[n]) (+ residual[m, n]) for all m_rows rows and the output features [first, last),
// in tiles of up to 4 rows (8 with DotTileEightRows) x 4 features.
void LinearRows(const float *x, const float *w, const float *bias, const float *residual, float *y, int64_t m_rows,
                int64_t k_dim, int64_t n_dim, int64_t first, int64_t last) {
  float tile[8][4];
#if defined(__AVX512F__)
  const int64_t eight_rows = k_dim <= kEightRowsDepth ? m_rows / 8 * 8 : 0;  // rows taken in blocks of 8
#else
  const int64_t eight_rows = 0;
#endif
  const int64_t blocks = eight_rows / 8 + (m_rows - eight_rows + 3) / 4;
  const int share = static_cast<int>((4 + blocks - 1) / blocks);  // weight rows each block prefetches
  for (int64_t n = first; n < last; n += 4) {
    const int nr = static_cast<int>(std::min<int64_t>(4, last - n));
    const int64_t ahead = n + 4 * kPrefetchTiles;
    for (int64_t m = 0, block = 0; m < m_rows; m += m < eight_rows ? 8 : 4, block++) {
      const int mr = static_cast<int>(m < eight_rows ? 8 : std::min<int64_t>(4, m_rows - m));
      const float *xm = x + m * k_dim, *wn = w + n * k_dim;
      // this block's share of the tile ahead (a full tile only)
      const int64_t own = std::min(ahead + block * share, ahead + 4);
      const int prefetch_rows = ahead + 4 <= last ? static_cast<int>(std::min<int64_t>(share, ahead + 4 - own)) : 0;
      const float *prefetch = w + std::min(own, n_dim - 1) * k_dim;
#if defined(__AVX512F__)
      if (mr == 8) {
        switch (nr) {
          case 1: DotTileEightRows<1>(xm, wn, k_dim, tile, prefetch, prefetch_rows); break;
          case 2: DotTileEightRows<2>(xm, wn, k_dim, tile, prefetch, prefetch_rows); break;
          case 3: DotTileEightRows<3>(xm, wn, k_dim, tile, prefetch, prefetch_rows); break;
          default: DotTileEightRows<4>(xm, wn, k_dim, tile, prefetch, prefetch_rows); break;
        }
      } else {
        switch (nr) {
          case 1: DotTileRows<1>(mr, xm, wn, k_dim, tile, prefetch, prefetch_rows); break;
          case 2: DotTileRows<2>(mr, xm, wn, k_dim, tile, prefetch, prefetch_rows); break;
          case 3: DotTileRows<3>(mr, xm, wn, k_dim, tile, prefetch, prefetch_rows); break;
          default: DotTileRows<4>(mr, xm, wn, k_dim, tile, prefetch, prefetch_rows); break;
        }
      }
#else
      DotTilePortable(mr, nr, xm, wn, k_dim, tile, prefetch, prefetch_rows);
#endif
      for (int i = 0; i < mr; i++) {
        float *yr = y + (m + i) * n_dim + n;
        for (int j = 0; j < nr; j++) {
          yr[j] = tile[i][j] + (bias ? bias[n + j] : 0.f) + (residual ? residual[(m + i) * n_dim + n + j] : 0.f);
        }
      }
    }
  }
}
}  // namespace

namespace {
int LinearFewRows(const float *x, const float *w, const float *bias, const float *residual, float *y, int *ndims,
                  int64_t **shapes) {
  const int64_t k_dim = shapes[0][ndims[0] - 1], m_rows = Numel(ndims[0], shapes[0]) / k_dim;
  const int64_t n_dim = shapes[1][0];
  if (shapes[1][1] != k_dim) return 1;
  // MindSpore's tensors start 16 bytes past a 64-byte line, where every vector load of x would straddle two lines
  // (at batch 8, a third of the time): the tiles read an aligned copy of x.
  std::vector<float> copy;
  if (reinterpret_cast<uintptr_t>(x) % 64 != 0) {
    copy.resize(m_rows * k_dim + 64 / sizeof(float));
    float *aligned = copy.data() + (64 - reinterpret_cast<uintptr_t>(copy.data()) % 64) % 64 / sizeof(float);
    std::memcpy(aligned, x, m_rows * k_dim * sizeof(float));
    x = aligned;
  }
  constexpr int64_t kFeatureBlock = 64;
  const int64_t blocks = (n_dim + kFeatureBlock - 1) / kFeatureBlock;
  ParallelFor(blocks, kFeatureBlock * k_dim * m_rows, [&](int64_t begin, int64_t end) {
    LinearRows(x, w, bias, residual, y, m_rows, k_dim, n_dim, begin * kFeatureBlock,
               std::min(n_dim, end * kFeatureBlock));
  });
  return 0;
}
}  // namespace

// A linear layer on few rows (decode steps), split over the pool by blocks of output features.
// Inputs: x [M, K], weight [N, K], and optionally bias [N]. Output: y [M, N] = x weight^T (+ bias).
extern "C" int LinearFewRows(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                             void *stream, void *extra) {
  const float *bias = nparam == 4 ? static_cast<const float *>(params[2]) : nullptr;
  return LinearFewRows(static_cast<const float *>(params[0]), static_cast<const float *>(params[1]), bias, nullptr,
                       static_cast<float *>(params[nparam - 1]), ndims, shapes);
}

// The same plus a residual: inputs x [M, K], weight [N, K], bias [N], residual [M, N]; output
// y = residual + x weight^T + bias.
extern "C" int LinearFewRowsResidual(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                     void *stream, void *extra) {
  return LinearFewRows(static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
                       static_cast<const float *>(params[2]), static_cast<const float *>(params[3]),
                       static_cast<float *>(params[4]), ndims, shapes);
}

// Rows to heads: x [B, S, G * H * D] (G groups of H heads, e.g. q | k | v) -> G outputs [B, H, S, D], output g
// multiplied by scales[g], after adding bias [G * H * D] when it is given. Inputs: x, scales [G], bias (optional);
// outputs: the G tensors.
extern "C" int RowsToHeads(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                           void *stream, void *extra) {
  const float *x = static_cast<const float *>(params[0]);
  const float *scales = static_cast<const float *>(params[1]);
  const bool has_bias = ndims[2] == 1;  // the outputs are 4-D
  const float *bias = has_bias ? static_cast<const float *>(params[2]) : nullptr;
  const int first = has_bias ? 3 : 2;
  const int64_t groups = nparam - first;
  const int64_t batch = shapes[first][0], heads = shapes[first][1], seq = shapes[first][2], dim = shapes[first][3];
  const int64_t width = groups * heads * dim;
  if (shapes[0][0] != batch || shapes[0][1] != seq || shapes[0][2] != width) return 1;
  ParallelFor(batch * seq, width, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; row++) {
      const int64_t b = row / seq, s = row % seq;
      for (int64_t g = 0; g < groups; g++) {
        float *out = static_cast<float *>(params[first + g]);
        const float scale = scales[g];
        for (int64_t h = 0; h < heads; h++) {
          const int64_t column = (g * heads + h) * dim;
          const float *src = x + row * width + column;
          float *dst = out + ((b * heads + h) * seq + s) * dim;
          if (bias) {
#pragma omp simd
            for (int64_t d = 0; d < dim; d++) dst[d] = (src[d] + bias[column + d]) * scale;
          } else {
#pragma omp simd
            for (int64_t d = 0; d < dim; d++) dst[d] = src[d] * scale;
          }
        }
      }
    }
  });
  return 0;
}

// Heads to rows, the inverse: G inputs [B, H, S, D] and scales [G] -> y [B, S, G * H * D], group g multiplied by
// scales[g].
extern "C" int HeadsToRows(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                           void *stream, void *extra) {
  const int64_t groups = nparam - 2;
  const float *scales = static_cast<const float *>(params[groups]);
  float *y = static_cast<float *>(params[groups + 1]);
  const int64_t batch = shapes[0][0], heads = shapes[0][1], seq = shapes[0][2], dim = shapes[0][3];
  const int64_t width = groups * heads * dim;
  ParallelFor(batch * seq, width, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; row++) {
      const int64_t b = row / seq, s = row % seq;
      for (int64_t g = 0; g < groups; g++) {
        const float *in = static_cast<const float *>(params[g]);
        const float scale = scales[g];
        for (int64_t h = 0; h < heads; h++) {
          const float *src = in + ((b * heads + h) * seq + s) * dim;
          float *dst = y + row * width + (g * heads + h) * dim;
#pragma omp simd
          for (int64_t d = 0; d < dim; d++) dst[d] = src[d] * scale;
        }
      }
    }
  });
  return 0;
}


// ---------------------------------------------------------------------------------------------------------------
// Causal attention for training: softmax(q k^T, row i sees keys 0..i) v per head, forward and backward, without a
// [S, S] matrix in memory: blocks of kQueryBlock query rows take their scores against the keys they see, and the
// backward recomputes the probabilities from the forward's per-row logsumexp. All products are one register-tiled
// kernel that skips the masked half tile by tile. One task per (batch, head) in the forward and per (batch, kv head)
// in the backward, so every sum runs in a fixed order on one thread. Heads whose length or dim are not multiples of
// kLanes are first copied into zero-padded scratch.
// ---------------------------------------------------------------------------------------------------------------
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {
// A register tile is kTileRows x (kMaxVecs vectors of kLanes floats); kLanes is a multiple of kTileRows.
using mindformers_kernels::kLanes;
using mindformers_kernels::Lanes;
using mindformers_kernels::LoadLanes;
#if defined(__AVX512F__)
constexpr int64_t kTileRows = 8, kMaxVecs = 3;
#elif defined(__AVX__)
constexpr int64_t kTileRows = 4, kMaxVecs = 2;
#else
constexpr int64_t kTileRows = 4, kMaxVecs = 4;
#endif
constexpr int64_t kDepthBlock = 128;  // product depth per pass, so a tile's right-hand panel stays in L1
constexpr int64_t kQueryBlock = 64;

typedef int32_t IntLanes __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline int64_t RoundUp(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

#if defined(__AVX512F__)
using mindformers_kernels::Transpose16x16;
#endif

// Tile<vecs> for 1 <= vecs <= kVecs.
template <int64_t kVecs>
void TileOf(int64_t vecs, const float *a, int64_t a_row, int64_t a_col, const float *b, int64_t ldb, int64_t depth,
            float *c, int64_t ldc, bool add) {
  if constexpr (kVecs > 1) {
    if (vecs < kVecs) return TileOf<kVecs - 1>(vecs, a, a_row, a_col, b, ldb, depth, c, ldc, add);
  }
  mindformers_kernels::Tile<kTileRows, kVecs>(a, a_row, a_col, b, ldb, depth, c, ldc, add);
}

// Where a product meets the causal mask of the query rows first..: kColumnKeys, c's columns are keys and its rows
// the queries first + r; kDepthKeys, the depth index is the key and rows are the queries first + r; kRowKeys, rows
// are keys and the depth index the queries first + k.
enum class Causal { kColumnKeys, kDepthKeys, kRowKeys };

// c [rows, cols] = (or += when add) a [rows, depth] b [depth, cols]: element (r, k) of a at a[r a_row + k a_col]
// (so a may be a transposed view), b and c row-major with leading dimensions ldb, ldc; rows a multiple of kTileRows,
// cols of kLanes. Tiles skip the work on (key > query) pairs as far as their shape allows: those entries of a must
// be zero, and those of c may be left unwritten (kColumnKeys).
void Product(const float *a, int64_t a_row, int64_t a_col, const float *b, int64_t ldb, float *c, int64_t ldc,
             int64_t rows, int64_t depth, int64_t cols, bool add, Causal causal, int64_t first) {
  for (int64_t k = 0; k < depth; k += kDepthBlock) {
    for (int64_t j = 0; j < cols; j += kMaxVecs * kLanes) {
      for (int64_t i = 0; i < rows; i += kTileRows) {
        const int64_t queries_end = first + i + kTileRows;  // past the last query of a tile whose rows are queries
        int64_t from = k, to = std::min(depth, k + kDepthBlock), cols_end = std::min(cols, j + kMaxVecs * kLanes);
        if (causal == Causal::kColumnKeys) cols_end = std::min(cols_end, RoundUp(queries_end, kLanes));
        if (causal == Causal::kDepthKeys) to = std::min(to, queries_end);
        if (causal == Causal::kRowKeys) from = std::max(from, i - first);
        if (cols_end <= j) continue;
        TileOf<kMaxVecs>((cols_end - j) / kLanes, a + i * a_row + from * a_col, a_row, a_col, b + from * ldb + j, ldb,
                         std::max<int64_t>(0, to - from), c + i * ldc + j, ldc, add || k > 0);
      }
    }
  }
}

// exp(x) per lane for x in [-80, 0] (clamped to it), as `Exp`.
inline Lanes ExpLanes(Lanes x) {
  const Lanes low = Lanes{} - 80.f, zero = Lanes{};
  x = x < low ? low : x;
  x = x > zero ? zero : x;
  const IntLanes n = __builtin_convertvector(x * 1.44269504f - 0.5f, IntLanes);  // round(x / ln 2), as x <= 0
  const Lanes nf = __builtin_convertvector(n, Lanes);
  const IntLanes two_n_bits = (n + 127) << 23;
  Lanes two_n;
  std::memcpy(&two_n, &two_n_bits, sizeof two_n);
  return ExpNearZero(x - nf * 0.693359375f + nf * 2.12194440e-4f) * two_n;
}

// x[j] = exp(x[j] - shift) for j < keys (where x[j] <= shift), 0 for keys <= j < end (a multiple of kLanes; x finite
// there); returns the sum.
float ExpRow(float *x, float shift, int64_t keys, int64_t end) {
  IntLanes lane;
  for (int i = 0; i < kLanes; i++) lane[i] = i;
  Lanes total = {};
  for (int64_t j = 0; j < end; j += kLanes) {
    const Lanes e = ExpLanes(LoadLanes(x + j) - shift);
    const Lanes kept = lane < static_cast<int32_t>(keys - j) ? e : Lanes{};
    std::memcpy(x + j, &kept, sizeof kept);
    total += kept;
  }
  float sum = 0.f;
  for (int i = 0; i < kLanes; i++) sum += total[i];
  return sum;
}

// One head's [seq, dim] matrices as the products need them: rows a multiple of kLanes (`rows`), row length `width` a
// multiple of kLanes. When seq and dim are not, they live in zero-padded scratch. Buffers with a column per key (k^T,
// v^T, score blocks) have rows of `stride` floats: an odd number of 64-byte lines, so that walking down a column
// does not keep hitting the same L1 sets.
struct HeadLayout {
  int64_t seq, dim, rows, width, stride;
  bool padded;

  HeadLayout(int64_t seq, int64_t dim)
      : seq(seq), dim(dim), rows(RoundUp(seq, kLanes)), width(RoundUp(dim, kLanes)),
        stride(RoundUp(seq, 32) + 16), padded(rows != seq || width != dim) {}

  int64_t Size() const { return rows * width; }

  // src [seq, dim] as [rows, width]: src itself, or a padded copy in scratch.
  const float *Rows(const float *src, float *scratch) const {
    if (!padded) return src;
    for (int64_t i = 0; i < rows; i++) {
      float *row = scratch + i * width;
      const int64_t copied = i < seq ? dim : 0;
      if (copied) std::memcpy(row, src + i * dim, dim * sizeof(float));
      std::memset(row + copied, 0, (width - copied) * sizeof(float));
    }
    return scratch;
  }

  // dst [width, stride] = src [seq, dim]^T, zero-padded.
  void Transpose(const float *src, float *dst) const {
    for (int64_t d = 0; d < width; d++) std::memset(dst + d * stride + seq, 0, (stride - seq) * sizeof(float));
    std::memset(dst + dim * stride, 0, (width - dim) * stride * sizeof(float));
    int64_t block_rows = 0, block_dims = 0;  // the part done in 16 x 16 blocks
#if defined(__AVX512F__)
    block_rows = seq / 16 * 16;
    block_dims = dim / 16 * 16;
    for (int64_t i = 0; i < block_rows; i += 16) {
      for (int64_t d = 0; d < block_dims; d += 16) Transpose16x16(src + i * dim + d, dim, dst + d * stride + i, stride);
    }
#endif
    for (int64_t i = 0; i < seq; i++) {
      for (int64_t d = i < block_rows ? block_dims : 0; d < dim; d++) dst[d * stride + i] = src[i * dim + d];
    }
  }

  // Where to write a [rows, width] result for dst [seq, dim]: dst itself, or scratch to `Unpack` from.
  float *Output(float *dst, float *scratch) const { return padded ? scratch : dst; }

  void Unpack(const float *scratch, float *dst) const {
    if (!padded) return;
    for (int64_t i = 0; i < seq; i++) std::memcpy(dst + i * dim, scratch + i * width, dim * sizeof(float));
  }
};

// Query rows first..first + count; products run on tile_rows (count rounded up to kTileRows) against keys 0..cols
// (the block's last row rounded up to kLanes).
struct QueryBlock {
  int64_t first, count, tile_rows, cols;

  QueryBlock(const HeadLayout &head, int64_t first)
      : first(first), count(std::min(kQueryBlock, head.seq - first)), tile_rows(RoundUp(count, kTileRows)),
        cols(RoundUp(first + count, kLanes)) {}

  // keys row i of the block sees (none for padding rows)
  int64_t Keys(int64_t i) const { return i < count ? first + i + 1 : 0; }

  // past the keys whose scores Product(Causal::kColumnKeys) writes for row i, all that the other causal products
  // may read of it: up to the last query of its row tile, in whole vectors
  int64_t KeysEnd(int64_t i) const {
    return std::min(cols, RoundUp(first + i / kTileRows * kTileRows + kTileRows, kLanes));
  }
};
}  // namespace

// Inputs: query [B, H, S, D] (already scaled), key and value [B, Hkv, S, D] (query head h reads kv head
// h / (H / Hkv)). Outputs: context [B, H, S, D], lse [B, H, S] (each query row's logsumexp of its scores, for the
// backward).
extern "C" int CausalAttentionForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                      void *stream, void *extra) {
  const float *q = static_cast<const float *>(params[0]);
  const float *k = static_cast<const float *>(params[1]);
  const float *v = static_cast<const float *>(params[2]);
  float *out = static_cast<float *>(params[3]);
  float *lse = static_cast<float *>(params[4]);
  const int64_t batch = shapes[0][0], heads = shapes[0][1], seq = shapes[0][2], dim = shapes[0][3];
  const int64_t kv_heads = shapes[1][1];
  if (heads % kv_heads || shapes[1][2] != seq || shapes[1][3] != dim) return 1;
  const HeadLayout head(seq, dim);
  const int64_t group = heads / kv_heads, size = seq * dim;
  ParallelFor(batch * heads, seq * size, [&](int64_t begin, int64_t end) {
    std::vector<float> query_pad(head.padded ? head.Size() : 0), values_pad(query_pad.size());
    std::vector<float> keys_t(head.width * head.stride), probs(kQueryBlock * head.stride);
    std::vector<float> context(kQueryBlock * head.width), inv_sum(kQueryBlock);
    const float *values = nullptr;
    for (int64_t task = begin, packed_kv = -1; task < end; task++) {
      const int64_t kv = task / heads * kv_heads + task % heads / group;
      if (kv != packed_kv) {
        head.Transpose(k + kv * size, keys_t.data());
        values = head.Rows(v + kv * size, values_pad.data());
        packed_kv = kv;
      }
      const float *query = head.Rows(q + task * size, query_pad.data());
      for (int64_t first = 0; first < seq; first += kQueryBlock) {
        const QueryBlock blk(head, first);
        Product(query + first * head.width, head.width, 1, keys_t.data(), head.stride, probs.data(), head.stride,
                blk.tile_rows, head.width, blk.cols, false, Causal::kColumnKeys, first);
        for (int64_t i = 0; i < blk.tile_rows; i++) {  // unnormalised: the context rows are scaled instead
          float *row = probs.data() + i * head.stride;
          const int64_t keys = blk.Keys(i);
          float mx = -3.0e38f;  // not -INFINITY: -ffast-math assumes no infinities
          for (int64_t j = 0; j < keys; j++) mx = std::fmax(mx, row[j]);
          const float sum = ExpRow(row, mx, keys, blk.KeysEnd(i));
          if (keys) {
            inv_sum[i] = 1.f / sum;
            lse[task * seq + first + i] = mx + std::log(sum);
          }
        }
        Product(probs.data(), head.stride, 1, values, head.width, context.data(), head.width, blk.tile_rows,
                blk.cols, head.width, false, Causal::kDepthKeys, first);
        for (int64_t i = 0; i < blk.count; i++) {
          float *dst = out + task * size + (first + i) * dim;
#pragma omp simd
          for (int64_t d = 0; d < dim; d++) dst[d] = context[i * head.width + d] * inv_sum[i];
        }
      }
    }
  });
  return 0;
}

// Inputs: query, key, value, lse as in CausalAttentionForward, dcontext [B, H, S, D].
// Outputs: dquery [B, H, S, D], dkey and dvalue [B, Hkv, S, D] (summed over each kv head's query heads, in order).
// With P the probabilities, dP = dcontext v^T and dS = P (dP - rowsum(P * dP)) (rowsum(P * dP) is the usual
// rowsum(dcontext * context), from the rows at hand): dquery = dS k, dkey = dS^T query, dvalue = P^T dcontext.
extern "C" int CausalAttentionBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                       void *stream, void *extra) {
  const float *q = static_cast<const float *>(params[0]);
  const float *k = static_cast<const float *>(params[1]);
  const float *v = static_cast<const float *>(params[2]);
  const float *lse = static_cast<const float *>(params[3]);
  const float *dout = static_cast<const float *>(params[4]);
  float *dq = static_cast<float *>(params[5]);
  float *dk = static_cast<float *>(params[6]);
  float *dv = static_cast<float *>(params[7]);
  const int64_t batch = shapes[0][0], heads = shapes[0][1], seq = shapes[0][2], dim = shapes[0][3];
  const int64_t kv_heads = shapes[1][1];
  if (heads % kv_heads || shapes[1][2] != seq || shapes[1][3] != dim) return 1;
  const HeadLayout head(seq, dim);
  const int64_t group = heads / kv_heads, size = seq * dim, width = head.width, stride = head.stride;
  ParallelFor(batch * kv_heads, 2 * group * seq * size, [&](int64_t begin, int64_t end) {
    const size_t pad = head.padded ? head.Size() : 0;
    std::vector<float> query_pad(pad), dcontext_pad(pad), keys_pad(pad), dquery_pad(pad), dkeys_pad(pad),
        dvalues_pad(pad), keys_t(width * stride), values_t(width * stride);
    std::vector<float> probs(kQueryBlock * stride), dscores(kQueryBlock * stride);
    for (int64_t kv = begin; kv < end; kv++) {
      const float *keys = head.Rows(k + kv * size, keys_pad.data());
      head.Transpose(k + kv * size, keys_t.data());
      head.Transpose(v + kv * size, values_t.data());
      float *dkeys = head.Output(dk + kv * size, dkeys_pad.data());
      float *dvalues = head.Output(dv + kv * size, dvalues_pad.data());
      std::fill(dkeys, dkeys + head.Size(), 0.f);
      std::fill(dvalues, dvalues + head.Size(), 0.f);
      for (int64_t h = kv / kv_heads * heads + kv % kv_heads * group, last = h + group; h < last; h++) {
        const float *query = head.Rows(q + h * size, query_pad.data());
        const float *dcontext = head.Rows(dout + h * size, dcontext_pad.data());
        float *dquery = head.Output(dq + h * size, dquery_pad.data());
        for (int64_t first = 0; first < seq; first += kQueryBlock) {
          const QueryBlock blk(head, first);
          const float *query_blk = query + first * width, *dcontext_blk = dcontext + first * width;
          Product(query_blk, width, 1, keys_t.data(), stride, probs.data(), stride, blk.tile_rows, width, blk.cols,
                  false, Causal::kColumnKeys, first);
          Product(dcontext_blk, width, 1, values_t.data(), stride, dscores.data(), stride, blk.tile_rows, width,
                  blk.cols, false, Causal::kColumnKeys, first);
          for (int64_t i = 0; i < blk.tile_rows; i++) {
            float *p = probs.data() + i * stride, *ds = dscores.data() + i * stride;
            const int64_t keys_seen = blk.Keys(i), keys_end = blk.KeysEnd(i), row = h * seq + first + i;
            ExpRow(p, keys_seen ? lse[row] : 0.f, keys_seen, keys_end);
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t j = 0; j < keys_end; j++) dot += p[j] * ds[j];
#pragma omp simd
            for (int64_t j = 0; j < keys_end; j++) ds[j] = p[j] * (ds[j] - dot);
          }
          Product(dscores.data(), stride, 1, keys, width, dquery + first * width, width, blk.tile_rows, blk.cols,
                  width, false, Causal::kDepthKeys, first);
          Product(probs.data(), 1, stride, dcontext_blk, width, dvalues, width, blk.cols, blk.tile_rows, width, true,
                  Causal::kRowKeys, first);
          Product(dscores.data(), 1, stride, query_blk, width, dkeys, width, blk.cols, blk.tile_rows, width, true,
                  Causal::kRowKeys, first);
        }
        head.Unpack(dquery, dq + h * size);
      }
      head.Unpack(dkeys, dk + kv * size);
      head.Unpack(dvalues, dv + kv * size);
    }
  });
  return 0;
}

// SwiGLU's gate: h = (gate * sigmoid(gate)) * up. Inputs: gate [n], up [n]. Output: h [n].
extern "C" int SwiGluForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                             void *stream, void *extra) {
  const float *g = static_cast<const float *>(params[0]);
  const float *u = static_cast<const float *>(params[1]);
  float *out = static_cast<float *>(params[2]);
  const int64_t n = Numel(ndims[0], shapes[0]);
  ParallelFor(n, 1, [=](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; i++) {
      const float v = g[i];
      out[i] = (v * (1.f / (1.f + Exp(-v)))) * u[i];
    }
  });
  return 0;
}

// Inputs: gate, up, dh [n]. Outputs: dgate, dup [n].
// s = sigmoid(gate): dup = dh * gate * s;  dgate = dh * up * s * (1 + gate * (1 - s))
extern "C" int SwiGluBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                              void *stream, void *extra) {
  const float *g = static_cast<const float *>(params[0]);
  const float *u = static_cast<const float *>(params[1]);
  const float *dh = static_cast<const float *>(params[2]);
  float *dg = static_cast<float *>(params[3]);
  float *du = static_cast<float *>(params[4]);
  const int64_t n = Numel(ndims[0], shapes[0]);
  ParallelFor(n, 1, [=](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; i++) {
      const float v = g[i];
      const float s = 1.f / (1.f + Exp(-v));
      du[i] = dh[i] * (v * s);
      dg[i] = dh[i] * u[i] * s * (1.f + v * (1.f - s));
    }
  });
  return 0;
}

// Rotary embedding, y = x * cos + rotate(x) * sin with rotate(x)[i] = sign[i] * x[partner[i]] (partner an
// involution: lane pairs swap, pass-through lanes map to themselves with sign 0).
// Inputs: x [B, S, H, D], cos [Bc, S, 1, D] (Bc = 1 or B), sin (as cos), partner [D] int32, sign [D]. Output y.
// Backward (inverse = true): the same inputs with dy for x, output dx[k] = dy[k] cos[k] + sign[p] sin[p] dy[p], p =
// partner[k].
// The heads variants take a further input scale [1] and multiply by it, and their [B, S, H, D] side (the forward's
// input, the backward's output) faces a [B, H, S, D] side (the layout attention reads): one pass instead of the
// rotary kernel, a Transpose and a Mul.
namespace {
int Rotary(void **params, int *ndims, int64_t **shapes, bool inverse, bool heads_layout) {
  const float *x = static_cast<const float *>(params[0]);
  const float *cos = static_cast<const float *>(params[1]);
  const float *sin = static_cast<const float *>(params[2]);
  const int32_t *partner = static_cast<const int32_t *>(params[3]);
  const float *sign = static_cast<const float *>(params[4]);
  const float scale = heads_layout ? *static_cast<const float *>(params[5]) : 1.f;
  float *y = static_cast<float *>(params[heads_layout ? 6 : 5]);
  const bool heads_in = heads_layout && inverse, heads_out = heads_layout && !inverse;
  const int64_t batch = shapes[0][0], dim = shapes[0][3];
  const int64_t seq = shapes[0][heads_in ? 2 : 1], heads = shapes[0][heads_in ? 1 : 2];
  const int64_t table_batch = shapes[1][0];
  ParallelFor(batch * seq, heads * dim, [&](int64_t begin, int64_t end) {
    std::vector<float> coefficients(3 * dim);
    float *cs = coefficients.data(), *ss = cs + dim, *swapped = ss + dim;
    for (int64_t bs = begin; bs < end; bs++) {
      const int64_t b = bs / seq, s = bs % seq;
      const int64_t table_row = (table_batch == 1 ? s : bs) * dim;
      const float *c = cos + table_row, *sn = sin + table_row;
      for (int64_t i = 0; i < dim; i++) {
        const int64_t k = inverse ? partner[i] : i;
        cs[i] = c[i] * scale;
        ss[i] = sign[k] * sn[k] * scale;
      }
      for (int64_t h = 0; h < heads; h++) {
        const int64_t rows_at = (bs * heads + h) * dim, heads_at = ((b * heads + h) * seq + s) * dim;
        const float *xr = x + (heads_in ? heads_at : rows_at);
        float *yr = y + (heads_out ? heads_at : rows_at);
        for (int64_t i = 0; i < dim; i++) swapped[i] = xr[partner[i]];
#pragma omp simd
        for (int64_t i = 0; i < dim; i++) yr[i] = xr[i] * cs[i] + ss[i] * swapped[i];
      }
    }
  });
  return 0;
}
}  // namespace

extern "C" int RotaryForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                             void *stream, void *extra) {
  return Rotary(params, ndims, shapes, false, false);
}

extern "C" int RotaryBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                              void *stream, void *extra) {
  return Rotary(params, ndims, shapes, true, false);
}

extern "C" int RotaryHeadsForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                  void *stream, void *extra) {
  return Rotary(params, ndims, shapes, false, true);
}

extern "C" int RotaryHeadsBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                   void *stream, void *extra) {
  return Rotary(params, ndims, shapes, true, true);
}

namespace {
// m [rows, cols] (row-major) transposed, as a new [cols, rows] array.
std::vector<float> Transposed(const float *m, int64_t rows, int64_t cols) {
  std::vector<float> t(rows * cols);
  for (int64_t r = 0; r < rows; r++)
    for (int64_t c = 0; c < cols; c++) t[c * rows + r] = m[r * cols + c];
  return t;
}
}  // namespace

// LoRA's update on a Linear's output: out = y + h b^T with h = scale * x a^T (rank r), one pass over the rows; h is
// kept for the backward. Inputs: x [M, K], y [M, N], a [r, K], b [N, r], scale [1]. Outputs: out [M, N], h [M, r].
extern "C" int LoraForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                           void *stream, void *extra) {
  const float *x = static_cast<const float *>(params[0]);
  const float *y = static_cast<const float *>(params[1]);
  const float *a = static_cast<const float *>(params[2]);
  const float *b = static_cast<const float *>(params[3]);
  const float scale = *static_cast<const float *>(params[4]);
  float *out = static_cast<float *>(params[5]);
  float *h = static_cast<float *>(params[6]);
  const int64_t rank = shapes[2][0], in = shapes[2][1], features = shapes[3][0];
  const int64_t rows = Numel(ndims[0], shapes[0]) / in;
  const std::vector<float> bt = Transposed(b, features, rank);
  ParallelFor(rows, rank * (in + features), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; m++) {
      const float *xr = x + m * in, *yr = y + m * features;
      float *hr = h + m * rank, *outr = out + m * features;
      for (int64_t j = 0; j < rank; j++) {
        const float *aj = a + j * in;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t k = 0; k < in; k++) dot += xr[k] * aj[k];
        hr[j] = scale * dot;
      }
      std::memcpy(outr, yr, features * sizeof(float));
      for (int64_t j = 0; j < rank; j++) {
        const float hj = hr[j], *btj = bt.data() + j * features;
#pragma omp simd
        for (int64_t n = 0; n < features; n++) outr[n] += hj * btj[n];
      }
    }
  });
  return 0;
}

// The input side of LoraForward's backward: g = scale * dout b [M, r] and dx = g a [M, K] (the factors' gradients,
// db = dout^T h and da = g^T x, are matrix products the caller runs). Inputs: dout [M, N], a [r, K], b [N, r],
// scale [1]. Outputs: dx [M, K], g [M, r].
extern "C" int LoraInputBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                 void *stream, void *extra) {
  const float *dout = static_cast<const float *>(params[0]);
  const float *a = static_cast<const float *>(params[1]);
  const float *b = static_cast<const float *>(params[2]);
  const float scale = *static_cast<const float *>(params[3]);
  float *dx = static_cast<float *>(params[4]);
  float *g = static_cast<float *>(params[5]);
  const int64_t rank = shapes[1][0], in = shapes[1][1], features = shapes[2][0];
  const int64_t rows = Numel(ndims[0], shapes[0]) / features;
  const std::vector<float> bt = Transposed(b, features, rank);
  ParallelFor(rows, rank * (in + features), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; m++) {
      const float *dr = dout + m * features;
      float *gr = g + m * rank, *dxr = dx + m * in;
      for (int64_t j = 0; j < rank; j++) {
        const float *btj = bt.data() + j * features;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t n = 0; n < features; n++) dot += dr[n] * btj[n];
        gr[j] = scale * dot;
      }
      std::memset(dxr, 0, in * sizeof(float));
      for (int64_t j = 0; j < rank; j++) {
        const float gj = gr[j], *aj = a + j * in;
#pragma omp simd
        for (int64_t k = 0; k < in; k++) dxr[k] += gj * aj[k];
      }
    }
  });
  return 0;
}
