// Fused fp32 CPU kernels for MindSpore's ops.Custom(func_type="aot").
// Signature of every entry point: params = inputs then outputs; shapes[i] has ndims[i] dims.
// Rows are the product of all but the last dimension; large inputs are split over rows between short-lived threads
// (one per usable core). Not OpenMP: its idle threads spin after every parallel region and starve MindSpore's own
// thread pool, which made small ops (decode steps) several times slower. Column sums (dweight, dbias) are
// accumulated per fixed block of rows and the blocks are added in order, so results do not depend on the number of
// threads or their timing.
#include <sched.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

namespace {
constexpr float kA = 1.5957691216057308f;   // 2 * sqrt(2 / pi)
constexpr float kB = 0.0713548162726f;      // 2 * sqrt(2 / pi) * 0.044715
constexpr int64_t kBlockRows = 64;

// sigmoid(x (a + b x^2)); the exponent is clamped because -ffast-math assumes no infinities
inline float GeluGate(float v) {
  const float z = std::fmin(std::fmax(-v * (kA + kB * v * v), -80.f), 80.f);
  return 1.f / (1.f + std::exp(z));
}

int UsableCores() {
  static const int cores = [] {
    cpu_set_t set;
    return sched_getaffinity(0, sizeof(set), &set) == 0 ? std::max(1, CPU_COUNT(&set)) : 1;
  }();
  return cores;
}

// Runs fn(begin, end) over [0, n) in contiguous chunks, one per core; inline when the work (n * cost elements)
// is too small to pay for starting threads.
template <typename Fn>
void ParallelFor(int64_t n, int64_t cost, Fn fn) {
  constexpr int64_t kMinWorkPerThread = 1 << 15;
  const int64_t threads = std::min<int64_t>({UsableCores(), n, std::max<int64_t>(1, n * cost / kMinWorkPerThread)});
  if (threads <= 1) {
    fn(int64_t{0}, n);
    return;
  }
  std::vector<std::thread> workers;
  const int64_t chunk = (n + threads - 1) / threads;
  for (int64_t t = 1; t < threads; t++) {
    const int64_t begin = std::min(n, t * chunk), end = std::min(n, (t + 1) * chunk);
    workers.emplace_back([=] { fn(begin, end); });
  }
  fn(int64_t{0}, std::min(n, chunk));
  for (auto &worker : workers) worker.join();
}

int64_t Numel(int ndim, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < ndim; i++) n *= shape[i];
  return n;
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
      const float v = x[i];
      const float s = GeluGate(v);
      dx[i] = dy[i] * (s + v * s * (1.f - s) * (kA + 3.f * kB * v * v));
    }
  });
  return 0;
}

// LayerNorm over the last axis. Inputs: x [rows, h], weight [h], bias [h], eps [1].
// Outputs: y [rows, h], mean [rows], rstd [rows].
extern "C" int LayerNormForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                void *stream, void *extra) {
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  const float *b = static_cast<const float *>(params[2]);
  const float eps = *static_cast<const float *>(params[3]);
  float *y = static_cast<float *>(params[4]);
  float *mean_out = static_cast<float *>(params[5]);
  float *rstd_out = static_cast<float *>(params[6]);
  const int64_t h = shapes[0][ndims[0] - 1];
  const int64_t rows = Numel(ndims[0], shapes[0]) / h;
  ParallelFor(rows, h, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; r++) {
      const float *xr = x + r * h;
      float *yr = y + r * h;
      double sum = 0.0;
      for (int64_t j = 0; j < h; j++) sum += xr[j];
      const float mean = static_cast<float>(sum / h);
      double sq = 0.0;
      for (int64_t j = 0; j < h; j++) {
        const float d = xr[j] - mean;
        sq += static_cast<double>(d) * d;
      }
      const float rstd = 1.f / std::sqrt(static_cast<float>(sq / h) + eps);
#pragma omp simd
      for (int64_t j = 0; j < h; j++) yr[j] = (xr[j] - mean) * rstd * w[j] + b[j];
      mean_out[r] = mean;
      rstd_out[r] = rstd;
    }
  });
  return 0;
}

// Inputs: x [rows, h], dy [rows, h], weight [h], mean [rows], rstd [rows].
// Outputs: dx [rows, h], dweight [h], dbias [h].
// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  g = dy * weight
extern "C" int LayerNormBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                 void *stream, void *extra) {
  const float *x = static_cast<const float *>(params[0]);
  const float *dy = static_cast<const float *>(params[1]);
  const float *w = static_cast<const float *>(params[2]);
  const float *mean = static_cast<const float *>(params[3]);
  const float *rstd = static_cast<const float *>(params[4]);
  float *dx = static_cast<float *>(params[5]);
  float *dw = static_cast<float *>(params[6]);
  float *db = static_cast<float *>(params[7]);
  const int64_t h = shapes[0][ndims[0] - 1];
  const int64_t rows = Numel(ndims[0], shapes[0]) / h;
  const int64_t blocks = (rows + kBlockRows - 1) / kBlockRows;
  std::vector<float> partial_w(blocks * h, 0.f), partial_b(blocks * h, 0.f);
  ParallelFor(blocks, kBlockRows * h, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; blk++) {
      float *pw = partial_w.data() + blk * h;
      float *pb = partial_b.data() + blk * h;
      const int64_t last = std::min(rows, (blk + 1) * kBlockRows);
      for (int64_t r = blk * kBlockRows; r < last; r++) {
        const float *xr = x + r * h;
        const float *dyr = dy + r * h;
        float *dxr = dx + r * h;
        const float mu = mean[r], rs = rstd[r];
        float sum_g = 0.f, sum_gx = 0.f;
#pragma omp simd reduction(+ : sum_g, sum_gx)
        for (int64_t j = 0; j < h; j++) {
          const float xhat = (xr[j] - mu) * rs;
          const float g = dyr[j] * w[j];
          sum_g += g;
          sum_gx += g * xhat;
          pw[j] += dyr[j] * xhat;
          pb[j] += dyr[j];
        }
        const float mean_g = sum_g / h, mean_gx = sum_gx / h;
#pragma omp simd
        for (int64_t j = 0; j < h; j++) {
          const float xhat = (xr[j] - mu) * rs;
          dxr[j] = rs * (dyr[j] * w[j] - mean_g - xhat * mean_gx);
        }
      }
    }
  });
  std::memset(dw, 0, h * sizeof(float));
  std::memset(db, 0, h * sizeof(float));
  for (int64_t blk = 0; blk < blocks; blk++) {
    const float *pw = partial_w.data() + blk * h;
    const float *pb = partial_b.data() + blk * h;
#pragma omp simd
    for (int64_t j = 0; j < h; j++) {
      dw[j] += pw[j];
      db[j] += pb[j];
    }
  }
  return 0;
}

// Causal softmax over the last axis of scores [..., S, S]: row q keeps columns 0..q, the rest get probability 0.
// Input: scores. Output: probs.
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
        const float e = std::exp(xr[j] - mx);
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

// One decode step of attention with an in-place KV cache.
// Inputs: query [B, Hq, 1, D] (already scaled), key and value [B, Hkv, 1, D], key_cache and value_cache
// [B, Hkv, L, D], mask [B, 1, 1, L] additive, indices [B, Hkv, 1, 3] int32 whose last entry is the write position P
// (the same for every row). Output: context [B, Hq, 1, D].
// Writes key/value at position P of the caches (their memory is the caches' Parameters: an intended side effect),
// then attends over positions 0..P only; query head h reads kv head h / (Hq / Hkv).
extern "C" int DecodeAttention(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                               void *stream, void *extra) {
  const float *q = static_cast<const float *>(params[0]);
  const float *k = static_cast<const float *>(params[1]);
  const float *v = static_cast<const float *>(params[2]);
  float *key_cache = static_cast<float *>(params[3]);
  float *value_cache = static_cast<float *>(params[4]);
  const float *mask = static_cast<const float *>(params[5]);
  const int32_t *indices = static_cast<const int32_t *>(params[6]);
  float *out = static_cast<float *>(params[7]);
  const int64_t batch = shapes[0][0], q_heads = shapes[0][1], dim = shapes[0][3];
  const int64_t kv_heads = shapes[3][1], length = shapes[3][2];
  const int64_t group = q_heads / kv_heads;
  const int64_t position = indices[2];
  if (position < 0 || position >= length || group * kv_heads != q_heads) return 1;
  for (int64_t row = 0; row < batch * kv_heads; row++) {
    std::memcpy(key_cache + (row * length + position) * dim, k + row * dim, dim * sizeof(float));
    std::memcpy(value_cache + (row * length + position) * dim, v + row * dim, dim * sizeof(float));
  }
  const int64_t span = position + 1;
  ParallelFor(batch * q_heads, 2 * span * dim, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(span);
    for (int64_t row = begin; row < end; row++) {
      const int64_t b = row / q_heads, kv_row = b * kv_heads + (row % q_heads) / group;
      const float *qr = q + row * dim;
      const float *keys = key_cache + kv_row * length * dim;
      const float *values = value_cache + kv_row * length * dim;
      const float *mr = mask + b * length;
      float mx = -3.0e38f;  // not -INFINITY: -ffast-math assumes no infinities
      for (int64_t j = 0; j < span; j++) {
        const float *kj = keys + j * dim;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < dim; d++) dot += qr[d] * kj[d];
        scores[j] = dot + mr[j];
        mx = std::fmax(mx, scores[j]);
      }
      float sum = 0.f;
      for (int64_t j = 0; j < span; j++) {
        scores[j] = std::exp(scores[j] - mx);
        sum += scores[j];
      }
      float *orow = out + row * dim;
      std::memset(orow, 0, dim * sizeof(float));
      for (int64_t j = 0; j < span; j++) {
        const float p = scores[j] / sum;
        const float *vj = values + j * dim;
#pragma omp simd
        for (int64_t d = 0; d < dim; d++) orow[d] += p * vj[d];
      }
    }
  });
  return 0;
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
