// The thread pool and helpers shared by the kernel sources (fused.cc, int8.cc): the pool, float vectors and a
// register-tiled product, a 16 x 16 transpose. Everything here has external
// linkage (inline), so all sources linked into one library share a single pool.
// Large inputs are split between a small pool of threads (one per usable core) that poll briefly, then sleep between
// jobs. Not OpenMP: its idle threads spin for milliseconds after every parallel region and starve MindSpore's own
// thread pool, which made small ops (decode steps) several times slower.
#ifndef MINDFORMERS_KERNELS_COMMON_H_
#define MINDFORMERS_KERNELS_COMMON_H_
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace mindformers_kernels {
inline int UsableCores() {
  static const int cores = [] {
    cpu_set_t set;
    return sched_getaffinity(0, sizeof(set), &set) == 0 ? std::max(1, CPU_COUNT(&set)) : 1;
  }();
  return cores;
}

// A persistent pool of (cores - 1) worker threads. After a job a worker polls for the next one for a short while
// (kernels of one graph step follow each other within microseconds, and waking a sleeping thread costs tens of them),
// then sleeps on a condition variable, so idle workers never compete with MindSpore's own threads for long.
// One job at a time; a caller that finds the pool busy (kernels launched concurrently by MindSpore) runs its job alone.
// A job's tasks are claimed one at a time by whoever is free (the caller and the workers that join it), so a worker
// that the OS has not scheduled (other threads on the cores: a server's event loop, its clients) delays the job by
// at most the task it holds, not by a fixed share of the job.
class Pool {
 public:
  static Pool &Get() {
    static Pool *pool = new Pool(UsableCores() - 1);  // never destroyed: workers live as long as the process
    return *pool;
  }

  int Workers() const { return static_cast<int>(workers_.size()); }

  // Runs task(t) once for each t in [0, tasks), on the caller and on the workers that join before the tasks run out;
  // returns when every task has ended. False when the pool is busy.
  bool TryRun(int64_t tasks, const std::function<void(int64_t)> &task) {
    std::unique_lock<std::mutex> running(run_, std::try_to_lock);
    if (!running.owns_lock()) return false;
    next_.store(0, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lock(mutex_);  // workers read a job's fields and join it under this lock
      task_ = &task;
      tasks_ = tasks;
      open_ = true;
      generation_.fetch_add(1, std::memory_order_release);
    }
    if (sleeping_.load(std::memory_order_acquire) > 0) wake_.notify_all();
    RunTasks(task, tasks);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      open_ = false;  // every task is taken: a worker that comes now must not touch this job
    }
    while (joined_.load(std::memory_order_acquire) != 0) Relax();  // the tasks workers still run
    return true;
  }

 private:
  static constexpr int kPollMicros = 50;

  explicit Pool(int workers) {
    for (int i = 1; i <= workers; i++) workers_.emplace_back([this, i] { Work(i); });
  }

  void RunTasks(const std::function<void(int64_t)> &task, int64_t tasks) {
    for (int64_t t = next_.fetch_add(1, std::memory_order_relaxed); t < tasks;
         t = next_.fetch_add(1, std::memory_order_relaxed)) {
      task(t);
    }
  }

  static void Relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }

  void Work(int64_t index) {
    uint64_t seen = 0;
    while (true) {
      const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(kPollMicros);
      for (int polls = 1; generation_.load(std::memory_order_relaxed) == seen; polls++) {
        if (polls % 64 == 0 && std::chrono::steady_clock::now() > until) break;
        Relax();
      }
      std::unique_lock<std::mutex> lock(mutex_);
      if (generation_.load(std::memory_order_relaxed) == seen) {
        sleeping_.fetch_add(1, std::memory_order_release);
        wake_.wait(lock, [&] { return generation_.load(std::memory_order_relaxed) != seen; });
        sleeping_.fetch_sub(1, std::memory_order_relaxed);
      }
      seen = generation_.load(std::memory_order_relaxed);
      if (!open_ || index >= tasks_) continue;
      joined_.fetch_add(1, std::memory_order_relaxed);
      const std::function<void(int64_t)> *task = task_;
      const int64_t tasks = tasks_;
      lock.unlock();
      RunTasks(*task, tasks);
      joined_.fetch_sub(1, std::memory_order_release);
    }
  }

  std::vector<std::thread> workers_;
  std::mutex run_, mutex_;
  std::condition_variable wake_;
  const std::function<void(int64_t)> *task_ = nullptr;
  int64_t tasks_ = 0;
  bool open_ = false;                 // the current job takes new workers (under mutex_)
  std::atomic<int64_t> next_{0};      // the next task of the current job to claim
  std::atomic<int64_t> joined_{0};    // workers running the current job's tasks
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> sleeping_{0};
};

// Runs fn(begin, end) over [0, n) in contiguous chunks, kChunksPerThread per core, claimed by whichever thread is
// free; inline when the work (n * cost elements) is too small to pay for waking workers, or when the pool is busy.
template <typename Fn>
void ParallelFor(int64_t n, int64_t cost, Fn fn) {
  constexpr int64_t kMinWorkPerThread = 1 << 14, kChunksPerThread = 4;
  const int64_t threads =
      std::min<int64_t>({Pool::Get().Workers() + 1, n, std::max<int64_t>(1, n * cost / kMinWorkPerThread)});
  if (threads <= 1) {
    fn(int64_t{0}, n);
    return;
  }
  const int64_t chunk = (n + threads * kChunksPerThread - 1) / (threads * kChunksPerThread);
  const int64_t chunks = (n + chunk - 1) / chunk;
  const std::function<void(int64_t)> task = [&](int64_t t) {
    const int64_t begin = std::min(n, t * chunk), end = std::min(n, (t + 1) * chunk);
    if (begin < end) fn(begin, end);
  };
  if (!Pool::Get().TryRun(chunks, task)) fn(int64_t{0}, n);
}

inline int64_t Numel(int ndim, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < ndim; i++) n *= shape[i];
  return n;
}

// Vectors of kLanes floats: 16 with AVX-512, 8 with AVX, else 4.
#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
#elif defined(__AVX__)
constexpr int64_t kLanes = 8;
#else
constexpr int64_t kLanes = 4;
#endif
typedef float Lanes __attribute__((vector_size(kLanes * sizeof(float))));

inline Lanes LoadLanes(const float *p) {
  Lanes v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// c[r, 0 : kVecs kLanes) = (c[r] when add) + sum_k a[r a_row + k a_col] b[k ldb + 0 : kVecs kLanes), r < kRows,
// accumulated in registers.
template <int64_t kRows, int64_t kVecs>
inline void Tile(const float *a, int64_t a_row, int64_t a_col, const float *b, int64_t ldb, int64_t depth, float *c,
                 int64_t ldc, bool add) {
  Lanes acc[kRows][kVecs];
  for (int64_t r = 0; r < kRows; r++) {
    for (int64_t v = 0; v < kVecs; v++) acc[r][v] = add ? LoadLanes(c + r * ldc + v * kLanes) : Lanes{};
  }
  for (int64_t k = 0; k < depth; k++) {
    Lanes bk[kVecs];
    for (int64_t v = 0; v < kVecs; v++) bk[v] = LoadLanes(b + k * ldb + v * kLanes);
    for (int64_t r = 0; r < kRows; r++) {
      const float ark = a[r * a_row + k * a_col];
      for (int64_t v = 0; v < kVecs; v++) acc[r][v] += ark * bk[v];
    }
  }
  for (int64_t r = 0; r < kRows; r++) {
    for (int64_t v = 0; v < kVecs; v++) std::memcpy(c + r * ldc + v * kLanes, &acc[r][v], sizeof(Lanes));
  }
}

#if defined(__AVX512F__)
// dst[c * ld_dst + r] = src[r * ld_src + c] for r, c < 16, in registers.
inline void Transpose16x16(const float *src, int64_t ld_src, float *dst, int64_t ld_dst) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_ps(src + i * ld_src);
  for (int i = 0; i < 16; i += 2) {  // t[i], t[i + 1]: rows i and i + 1 interleaved
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int m = 0; m < 16; m += 4) {  // r[m + c]: 128-bit lane L holds column 4 L + c of rows m..m + 3
    for (int h = 0; h < 2; h++) {
      const __m512d lo = _mm512_castps_pd(t[m + h]), hi = _mm512_castps_pd(t[m + h + 2]);
      r[m + 2 * h] = _mm512_castpd_ps(_mm512_unpacklo_pd(lo, hi));
      r[m + 2 * h + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(lo, hi));
    }
  }
  for (int c = 0; c < 4; c++) {  // column 4 L + c gathers lane L of r[c], r[4 + c], r[8 + c], r[12 + c]
    const __m512 v0 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x44), v1 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xee);
    const __m512 w0 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x44);
    const __m512 w1 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xee);
    _mm512_storeu_ps(dst + c * ld_dst, _mm512_shuffle_f32x4(v0, w0, 0x88));
    _mm512_storeu_ps(dst + (4 + c) * ld_dst, _mm512_shuffle_f32x4(v0, w0, 0xdd));
    _mm512_storeu_ps(dst + (8 + c) * ld_dst, _mm512_shuffle_f32x4(v1, w1, 0x88));
    _mm512_storeu_ps(dst + (12 + c) * ld_dst, _mm512_shuffle_f32x4(v1, w1, 0xdd));
  }
}
#endif
}  // namespace mindformers_kernels
#endif  // MINDFORMERS_KERNELS_COMMON_H_
