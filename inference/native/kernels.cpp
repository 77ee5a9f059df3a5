// The native decode kernels, built at install time (inference/native/build.py): every decode
// step whose layers hold GGUF blocks (the base model's own Q4_1 and Q8_0 weights, the default),
// every step of an int8 engine (INFERENCE_QUANTIZE=int8), and the steps of several sequences at
// once on fp32 weights.
//
// Decoding reads every weight once per token for a handful of rows, so it is bound by memory:
// 4-bit blocks (about a sixth of fp32's bytes), int8 weights, or fp32 weights, always with fp32
// activations, and a matrix-vector product that keeps both cores' loads in flight (torch's int8
// kernel reaches half the bandwidth here and rounds activations to bf16; its fp32 product
// repacks the weights for more than two rows). The small per-layer operations (norm, rotary +
// cache write + attention, SiLU) are one function each instead of dozens of torch operations,
// whose dispatch cost more than the arithmetic, and decode_layers runs all layers of a step in
// one call from Python.
//
// Every row is computed on its own, in the same order whatever the other rows are: a
// sequence's numbers do not depend on what it is batched with (seeded sampling).
//
// x86-64 gets AVX-512 or AVX2 code chosen at run time, so one build runs on any x86-64 CPU;
// other CPUs get plain loops.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <functional>
#include <mutex>
#include <thread>
#include <cmath>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#define GENAPI_X86 1
// Small loops compiled for each instruction set, the best chosen when the module loads.
#define GENAPI_CLONES __attribute__((target_clones("avx512f", "avx2,fma", "default")))
#else
#define GENAPI_CLONES
#endif

namespace {

constexpr int kRowsPerPass = 4;      // input rows sharing one read of a weight row
constexpr int kOutputsPerPass = 4;   // weight rows read side by side (independent sums)
constexpr int kPrefetchRows = 4;     // how far ahead the next weight rows are requested

// How a projection's weights are stored. The block formats are the GGUF's own: a block of 32
// weights along the input, with fp16 scales that are stored here as float (exact).
//   f32:  float [out, in]
//   i8:   int8 [out, in] and one scale per output (the int8 drafts): w = scale[o] * q
//   q8_0: int8 [out, in] and one scale per block, [out, in / 32]: w = d * q
//   q4_1: uint8 [out, in / 2], byte j of a block holding weight j (low nibble) and weight
//         j + 16 (high nibble), and (d, m) per block, [out, in / 32, 2]: w = d * q + m
// A block weight is expanded to its float value in registers before it is multiplied: d * q
// is exact in float (an fp16 times a 4- or 8-bit integer), so the expanded value is the same
// float that dequantising the block gives (gguf-py's d * q + m), bit for bit.
enum class Fmt { f32, i8, q8_0, q4_1 };

struct Weights {
  const void* data;
  const float* scale;  // none for f32
  int64_t in;
};

template <Fmt F>
constexpr int64_t kBytesPer64 = F == Fmt::f32 ? 256 : F == Fmt::q4_1 ? 32 : 64;  // bytes of 64 weights

template <Fmt F>
inline const char* address(const Weights& w, int64_t o, int64_t i) {
  return static_cast<const char*>(w.data) + (o * w.in + i) * kBytesPer64<F> / 64;
}

// y[m, o] = sum_i w[o, i] * x[m, i] (+ residual[m, o]) for o in [o0, o1).
using LinearKernel = void (*)(const Weights&, const float*, const float*, float*, int64_t, int64_t, int64_t);

template <Fmt F>
inline float finish(float sum, const Weights& w, int64_t o) {
  if constexpr (F == Fmt::i8)
    return sum * w.scale[o];
  else
    return sum;
}

// The weight w[o, i] as a float (without the per-output scale of i8).
template <Fmt F>
inline float weight_at(const Weights& w, int64_t o, int64_t i) {
  const int64_t at = o * w.in + i;
  if constexpr (F == Fmt::f32) return static_cast<const float*>(w.data)[at];
  if constexpr (F == Fmt::i8) return static_cast<const int8_t*>(w.data)[at];
  if constexpr (F == Fmt::q8_0) return w.scale[at / 32] * static_cast<const int8_t*>(w.data)[at];
  const uint8_t byte = static_cast<const uint8_t*>(w.data)[(at & ~int64_t{31}) / 2 + (at & 15)];
  const float q = (at & 16) ? byte >> 4 : byte & 15;
  return std::fma(w.scale[at / 32 * 2], q, w.scale[at / 32 * 2 + 1]);
}

template <Fmt F, int M>
void linear_rows_scalar(const Weights& w, const float* x, const float* residual, float* y, int64_t out, int64_t o0,
                        int64_t o1) {
  const int64_t in = w.in;
  for (int64_t o = o0; o < o1; ++o) {
    for (int m = 0; m < M; ++m) {
      const float* xm = x + m * in;
      float sum = 0.f;
      for (int64_t i = 0; i < in; ++i) sum += weight_at<F>(w, o, i) * xm[i];
      float value = finish<F>(sum, w, o);
      y[m * out + o] = residual ? residual[m * out + o] + value : value;
    }
  }
}

#ifdef GENAPI_X86
// The 16 weights w[o, i..i+16) as floats (i a multiple of 16).
template <Fmt F>
__attribute__((target("avx512f,avx512bw"))) inline __m512 load16(const Weights& w, int64_t o, int64_t i) {
  const char* p = address<F>(w, o, i);
  if constexpr (F == Fmt::f32) return _mm512_loadu_ps(reinterpret_cast<const float*>(p));
  const int64_t block = (o * w.in + i) / 32;
  if constexpr (F == Fmt::i8 || F == Fmt::q8_0) {
    __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
    return F == Fmt::i8 ? q : _mm512_mul_ps(_mm512_set1_ps(w.scale[block]), q);
  } else {
    // The block's 16 bytes; this half of its weights is their low or high nibbles.
    const char* bytes = static_cast<const char*>(w.data) + block * 16;
    __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
    q = (i & 16) ? _mm512_srli_epi32(q, 4) : _mm512_and_si512(q, _mm512_set1_epi32(15));
    return _mm512_fmadd_ps(_mm512_set1_ps(w.scale[2 * block]), _mm512_cvtepi32_ps(q),
                           _mm512_set1_ps(w.scale[2 * block + 1]));
  }
}

template <Fmt F, int M>
__attribute__((target("avx512f,avx512bw"))) void linear_rows_avx512(const Weights& w, const float* x,
                                                                     const float* residual, float* y, int64_t out,
                                                                     int64_t o0, int64_t o1) {
  constexpr int R = kOutputsPerPass;
  const int64_t in = w.in;
  int64_t o = o0;
  for (; o + R <= o1; o += R) {
    __m512 acc[R][M];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
    for (int64_t i = 0; i < in; i += 16) {
      __m512 xv[M];
      for (int m = 0; m < M; ++m) xv[m] = _mm512_loadu_ps(x + m * in + i);
      for (int r = 0; r < R; ++r) {
        _mm_prefetch(address<F>(w, o + r + kPrefetchRows, i), _MM_HINT_T0);
        __m512 wv = load16<F>(w, o + r, i);
        for (int m = 0; m < M; ++m) acc[r][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][m]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) {
        float value = finish<F>(_mm512_reduce_add_ps(acc[r][m]), w, o + r);
        y[m * out + o + r] = residual ? residual[m * out + o + r] + value : value;
      }
  }
  for (; o < o1; ++o) {  // the last outputs, one at a time: the same sums, in the same order
    __m512 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t i = 0; i < in; i += 16) {
      __m512 wv = load16<F>(w, o, i);
      for (int m = 0; m < M; ++m) acc[m] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * in + i), acc[m]);
    }
    for (int m = 0; m < M; ++m) {
      float value = finish<F>(_mm512_reduce_add_ps(acc[m]), w, o);
      y[m * out + o] = residual ? residual[m * out + o] + value : value;
    }
  }
}

__attribute__((target("avx2,fma"))) inline float sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The 8 weights w[o, i..i+8) as floats (i a multiple of 8).
template <Fmt F>
__attribute__((target("avx2,fma"))) inline __m256 load8(const Weights& w, int64_t o, int64_t i) {
  const char* p = address<F>(w, o, i);
  if constexpr (F == Fmt::f32) return _mm256_loadu_ps(reinterpret_cast<const float*>(p));
  const int64_t block = (o * w.in + i) / 32;
  if constexpr (F == Fmt::i8 || F == Fmt::q8_0) {
    __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
    return F == Fmt::i8 ? q : _mm256_mul_ps(_mm256_set1_ps(w.scale[block]), q);
  } else {
    // Weights 0-7 and 16-23 of a block are bytes 0-7, 8-15 and 24-31 bytes 8-15 (low, high nibbles).
    const char* bytes = static_cast<const char*>(w.data) + block * 16 + (i & 8);
    __m256i q = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes)));
    q = (i & 16) ? _mm256_srli_epi32(q, 4) : _mm256_and_si256(q, _mm256_set1_epi32(15));
    return _mm256_fmadd_ps(_mm256_set1_ps(w.scale[2 * block]), _mm256_cvtepi32_ps(q),
                           _mm256_set1_ps(w.scale[2 * block + 1]));
  }
}

template <Fmt F, int M>
__attribute__((target("avx2,fma"))) void linear_rows_avx2(const Weights& w, const float* x, const float* residual,
                                                           float* y, int64_t out, int64_t o0, int64_t o1) {
  constexpr int R = kOutputsPerPass;
  const int64_t in = w.in;
  int64_t o = o0;
  for (; o + R <= o1; o += R) {
    __m256 acc[R][M];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_ps();
    for (int64_t i = 0; i < in; i += 8) {
      __m256 xv[M];
      for (int m = 0; m < M; ++m) xv[m] = _mm256_loadu_ps(x + m * in + i);
      for (int r = 0; r < R; ++r) {
        _mm_prefetch(address<F>(w, o + r + kPrefetchRows, i), _MM_HINT_T0);
        __m256 wv = load8<F>(w, o + r, i);
        for (int m = 0; m < M; ++m) acc[r][m] = _mm256_fmadd_ps(wv, xv[m], acc[r][m]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) {
        float value = finish<F>(sum8(acc[r][m]), w, o + r);
        y[m * out + o + r] = residual ? residual[m * out + o + r] + value : value;
      }
  }
  for (; o < o1; ++o) {
    __m256 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t i = 0; i < in; i += 8) {
      __m256 wv = load8<F>(w, o, i);
      for (int m = 0; m < M; ++m) acc[m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * in + i), acc[m]);
    }
    for (int m = 0; m < M; ++m) {
      float value = finish<F>(sum8(acc[m]), w, o);
      y[m * out + o] = residual ? residual[m * out + o] + value : value;
    }
  }
}

// The block formats, a block of 32 weights at a time: its bytes read and widened once, its two
// halves expanded (w = d * q + m) and multiplied into sums of their own, so that a lone row
// still keeps 8 independent chains of multiply-adds in flight. R weight rows and M input rows
// per pass, as many as the registers hold. The order of every row's sums is the same in every
// variant: a row's numbers do not depend on the rows beside it.
constexpr int kBlockPrefetchRows = 16;  // a block row is 4-5x shorter than an fp32 one: ask further ahead

template <int M>
constexpr int kBlockOutputs = M <= 2 ? 4 : (M <= 4 ? 2 : 1);

template <Fmt F>
__attribute__((target("avx512f,avx512bw"))) inline void block_expand16x2(const Weights& w, int64_t block, __m512* lo,
                                                                          __m512* hi) {
  if constexpr (F == Fmt::q4_1) {
    const __m512i q = _mm512_cvtepu8_epi32(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint8_t*>(w.data) + block * 16)));
    const __m512 d = _mm512_set1_ps(w.scale[2 * block]), m = _mm512_set1_ps(w.scale[2 * block + 1]);
    // The block's 16 levels d * k + m (the same fma as expanding each weight, so the same floats),
    // looked up by nibble: one multiply-add per block instead of one per 16 weights, and no
    // int-to-float conversion (22% more blocks per second on a large projection, measured here).
    const __m512 levels = _mm512_fmadd_ps(d, _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), m);
    *lo = _mm512_permutexvar_ps(q, levels);  // the low nibble indexes (the permute reads 4 bits)
    *hi = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), levels);
  } else {  // q8_0
    const int8_t* q = static_cast<const int8_t*>(w.data) + block * 32;
    const __m512 d = _mm512_set1_ps(w.scale[block]);
    *lo = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)))));
    *hi = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16)))));
  }
}

// R weight rows from o, M input rows.
template <Fmt F, int M, int R>
__attribute__((target("avx512f,avx512bw"))) void block_pass_avx512(const Weights& w, const float* x, const float* residual,
                                                        float* y, int64_t out, int64_t o) {
  const int64_t in = w.in, blocks = in / 32;
  __m512 lo[R][M], hi[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) lo[r][m] = hi[r][m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    for (int r = 0; r < R; ++r) {
      if (b % (64 / kBytesPer64<F> * 2) == 0)  // once per 64-byte line
        _mm_prefetch(address<F>(w, o + r + kBlockPrefetchRows, b * 32), _MM_HINT_T0);
      __m512 wlo, whi;
      block_expand16x2<F>(w, (o + r) * blocks + b, &wlo, &whi);
      for (int m = 0; m < M; ++m) {
        lo[r][m] = _mm512_fmadd_ps(wlo, _mm512_loadu_ps(x + m * in + b * 32), lo[r][m]);
        hi[r][m] = _mm512_fmadd_ps(whi, _mm512_loadu_ps(x + m * in + b * 32 + 16), hi[r][m]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) {
      const float value = _mm512_reduce_add_ps(_mm512_add_ps(lo[r][m], hi[r][m]));
      y[m * out + o + r] = residual ? residual[m * out + o + r] + value : value;
    }
}

template <Fmt F, int M>
__attribute__((target("avx512f,avx512bw"))) void block_rows_avx512(const Weights& w, const float* x, const float* residual, float* y,
                                                        int64_t out, int64_t o0, int64_t o1) {
  constexpr int R = kBlockOutputs<M>;
  int64_t o = o0;
  for (; o + R <= o1; o += R) block_pass_avx512<F, M, R>(w, x, residual, y, out, o);
  for (; o < o1; ++o) block_pass_avx512<F, M, 1>(w, x, residual, y, out, o);  // the same sums, one output at a time
}

template <Fmt F>
__attribute__((target("avx2,fma"))) inline void block_expand8x4(const Weights& w, int64_t block, __m256* part) {
  if constexpr (F == Fmt::q4_1) {
    const uint8_t* bytes = static_cast<const uint8_t*>(w.data) + block * 16;
    const __m256i a = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes)));
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + 8)));
    const __m256i low = _mm256_set1_epi32(15);
    const __m256 d = _mm256_set1_ps(w.scale[2 * block]), m = _mm256_set1_ps(w.scale[2 * block + 1]);
    part[0] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_and_si256(a, low)), m);
    part[1] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_and_si256(b, low)), m);
    part[2] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_srli_epi32(a, 4)), m);
    part[3] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)), m);
  } else {  // q8_0
    const int8_t* q = static_cast<const int8_t*>(w.data) + block * 32;
    const __m256 d = _mm256_set1_ps(w.scale[block]);
    for (int k = 0; k < 4; ++k)
      part[k] = _mm256_mul_ps(
          d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * k)))));
  }
}

// R weight rows from o, M input rows.
template <Fmt F, int M, int R>
__attribute__((target("avx2,fma"))) void block_pass_avx2(const Weights& w, const float* x, const float* residual,
                                                        float* y, int64_t out, int64_t o) {
  const int64_t in = w.in, blocks = in / 32;
  __m256 lo[R][M], hi[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) lo[r][m] = hi[r][m] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    for (int r = 0; r < R; ++r) {
      if (b % (64 / kBytesPer64<F> * 2) == 0)  // once per 64-byte line
        _mm_prefetch(address<F>(w, o + r + kBlockPrefetchRows, b * 32), _MM_HINT_T0);
      __m256 part[4];
      block_expand8x4<F>(w, (o + r) * blocks + b, part);
      for (int m = 0; m < M; ++m) {
        const float* xm = x + m * in + b * 32;
        lo[r][m] = _mm256_fmadd_ps(part[0], _mm256_loadu_ps(xm), lo[r][m]);
        hi[r][m] = _mm256_fmadd_ps(part[2], _mm256_loadu_ps(xm + 16), hi[r][m]);
        lo[r][m] = _mm256_fmadd_ps(part[1], _mm256_loadu_ps(xm + 8), lo[r][m]);
        hi[r][m] = _mm256_fmadd_ps(part[3], _mm256_loadu_ps(xm + 24), hi[r][m]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) {
      const float value = sum8(_mm256_add_ps(lo[r][m], hi[r][m]));
      y[m * out + o + r] = residual ? residual[m * out + o + r] + value : value;
    }
}

template <Fmt F, int M>
__attribute__((target("avx2,fma"))) void block_rows_avx2(const Weights& w, const float* x, const float* residual, float* y,
                                                        int64_t out, int64_t o0, int64_t o1) {
  constexpr int R = kBlockOutputs<M>;
  int64_t o = o0;
  for (; o + R <= o1; o += R) block_pass_avx2<F, M, R>(w, x, residual, y, out, o);
  for (; o < o1; ++o) block_pass_avx2<F, M, 1>(w, x, residual, y, out, o);  // the same sums, one output at a time
}
#endif

// The kernels' own threads. torch's at::parallel_for (OpenMP here) wakes its sleeping threads
// for every parallel region when it is called from a thread other than the process's first one,
// as the engine's scheduler thread is: about 45 us per region, measured here, and a decode step
// has 150 regions (7 ms of a 15 ms step). These threads instead spin briefly between regions
// (a step's regions follow each other within microseconds), then sleep until the next task, so
// an idle engine costs no CPU. One task at a time: a second caller meanwhile (another engine's
// thread) runs its task on its own thread rather than waiting.
class Pool {
 public:
  // Calls body(begin, end) over [0, total) split into one contiguous part per thread (parts a
  // multiple of grain), at most at::get_num_threads() threads, the caller one of them.
  void run(int64_t total, int64_t grain, const std::function<void(int64_t, int64_t)>& body) {
    const int threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), (total + grain - 1) / grain));
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (threads <= 1 || !busy.owns_lock()) return body(0, total);
    grow(threads - 1);
    const int64_t align = std::min<int64_t>(grain, 4);
    const int64_t part = ((total + threads - 1) / threads + align - 1) / align * align;
    body_ = &body;
    total_ = total;
    part_ = part;
    // Every worker takes part in every task (those past the last part do nothing), so that none
    // can read one task's fields while the next one is written.
    pending_.store(static_cast<int>(workers_.size()), std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_release);
    generation_.notify_all();
    body(0, std::min(total, part));
    while (pending_.load(std::memory_order_acquire) != 0) pause();
  }

  ~Pool() {
    stop_.store(true);
    generation_.fetch_add(1);
    generation_.notify_all();
    for (auto& t : workers_) t.join();
  }

 private:
  static void pause() {
#if defined(__x86_64__)
    _mm_pause();
#endif
  }

  void grow(int helpers) {
    while (static_cast<int>(workers_.size()) < helpers) {
      const int index = static_cast<int>(workers_.size()) + 1;  // the caller takes part 0
      const uint64_t seen = generation_.load();  // before the task that grew the pool: it waits for that one
      workers_.emplace_back([this, index, seen] { work(index, seen); });
    }
  }

  void work(int index, uint64_t seen) {
    while (true) {
      // Spin about 100 us for the next region, then sleep until one comes.
      for (int spin = 0; spin < 20000 && generation_.load(std::memory_order_acquire) == seen; ++spin) pause();
      generation_.wait(seen, std::memory_order_acquire);
      seen = generation_.load(std::memory_order_acquire);
      if (stop_.load()) return;
      const int64_t begin = std::min(total_, index * part_), end = std::min(total_, begin + part_);
      if (begin < end) (*body_)(begin, end);
      pending_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  std::mutex busy_;
  std::vector<std::thread> workers_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  std::atomic<bool> stop_{false};
  const std::function<void(int64_t, int64_t)>* body_ = nullptr;
  int64_t total_ = 0, part_ = 0;
};

Pool& pool() {
  static Pool* instance = new Pool();  // never destroyed: its threads outlive static destruction order
  return *instance;
}

template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& body) {
  const std::function<void(int64_t, int64_t)> shifted = [&](int64_t b, int64_t e) { body(begin + b, begin + e); };
  pool().run(end - begin, grain, shifted);
}

enum class Isa { scalar, avx2, avx512 };

Isa isa_detect() {
#ifdef GENAPI_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return Isa::avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
#endif
  return Isa::scalar;
}

const Isa kIsa = isa_detect();

template <Fmt F, int M>
LinearKernel linear_kernel(int64_t in) {
#ifdef GENAPI_X86
  constexpr bool blocked = F == Fmt::q4_1 || F == Fmt::q8_0;
  if constexpr (blocked) {
    if (kIsa == Isa::avx512) return block_rows_avx512<F, M>;
    if (kIsa == Isa::avx2) return block_rows_avx2<F, M>;
  } else {
    if (kIsa == Isa::avx512 && in % 16 == 0) return linear_rows_avx512<F, M>;
    if (kIsa == Isa::avx2 && in % 8 == 0) return linear_rows_avx2<F, M>;
  }
#endif
  return linear_rows_scalar<F, M>;
}

// Input rows per pass: the block formats expand each block once for up to 8 rows.
template <Fmt F>
constexpr int kPassRows = F == Fmt::q4_1 || F == Fmt::q8_0 ? 8 : kRowsPerPass;

template <Fmt F>
LinearKernel linear_kernel_for(int rows, int64_t in) {
  if constexpr (kPassRows<F> == 8) {
    switch (rows) {
      case 1: return linear_kernel<F, 1>(in);
      case 2: return linear_kernel<F, 2>(in);
      case 3: return linear_kernel<F, 3>(in);
      case 4: return linear_kernel<F, 4>(in);
      case 5: return linear_kernel<F, 5>(in);
      case 6: return linear_kernel<F, 6>(in);
      case 7: return linear_kernel<F, 7>(in);
      default: return linear_kernel<F, 8>(in);
    }
  }
  switch (rows) {
    case 1: return linear_kernel<F, 1>(in);
    case 2: return linear_kernel<F, 2>(in);
    case 3: return linear_kernel<F, 3>(in);
    default: return linear_kernel<F, 4>(in);
  }
}

// Row o of the weights as floats, with the expansion the products use.
#ifdef GENAPI_X86
template <Fmt F>
__attribute__((target("avx512f,avx512bw"))) void expand_row_avx512(const Weights& w, int64_t o, float* out) {
  for (int64_t i = 0; i < w.in; i += 16) _mm512_storeu_ps(out + i, load16<F>(w, o, i));
}

template <Fmt F>
__attribute__((target("avx2,fma"))) void expand_row_avx2(const Weights& w, int64_t o, float* out) {
  for (int64_t i = 0; i < w.in; i += 8) _mm256_storeu_ps(out + i, load8<F>(w, o, i));
}
#endif

template <Fmt F>
void expand_row(const Weights& w, int64_t o, float* out) {
#ifdef GENAPI_X86
  if (kIsa == Isa::avx512) return expand_row_avx512<F>(w, o, out);
  if (kIsa == Isa::avx2) return expand_row_avx2<F>(w, o, out);
#endif
  for (int64_t i = 0; i < w.in; ++i) out[i] = weight_at<F>(w, o, i);
}

void check_rows(const torch::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous() && t.scalar_type() == torch::kFloat32, name,
              " must be a contiguous 2-d float32 tensor");
  TORCH_CHECK(dim < 0 || t.size(1) == dim, name, " has ", t.size(1), " columns, expected ", dim);
}

// y = x @ w^T (+ residual), over the threads. The threads split the outputs; each reads its
// weight rows once for all input rows, in passes of up to kRowsPerPass rows while the weight
// rows are still in L1 (L2 for the widest).
template <Fmt F>
torch::Tensor linear(const torch::Tensor& x, const Weights& w, int64_t out, const c10::optional<torch::Tensor>& residual) {
  const int64_t in = w.in;
  check_rows(x, "x", in);
  const int64_t rows = x.size(0);
  const float* res = nullptr;
  if (residual.has_value()) {
    check_rows(*residual, "residual", out);
    TORCH_CHECK(residual->size(0) == rows, "residual must have the rows of x");
    res = residual->data_ptr<float>();
  }
  auto y = torch::empty({rows, out}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // 8 rows while their inputs fit in L1 beside the weights (in <= 768), else 4.
  const int pass = kPassRows<F> == 8 && in > 768 ? 4 : kPassRows<F>;
  const LinearKernel full = linear_kernel_for<F>(pass, in);
  const LinearKernel last = linear_kernel_for<F>(static_cast<int>(rows % pass), in);
  parallel_for(0, out, 64, [&](int64_t o0, int64_t o1) {
    for (int64_t step = o0; step < o1; step += 16) {
      const int64_t stop = std::min(o1, step + 16);
      for (int64_t m = 0; m < rows; m += pass) {
        const LinearKernel kernel = m + pass <= rows ? full : last;
        kernel(w, xp + m * in, res ? res + m * out : nullptr, yp + m * out, out, step, stop);
      }
    }
  });
  return y;
}

// The format of a block-quantised projection (q8_0: int8 weights, q4_1: uint8 nibbles) after
// checking its shapes; ``in`` is the input width.
Fmt block_format(const torch::Tensor& w, const torch::Tensor& scale, int64_t* in) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "w must be a contiguous 2-d tensor");
  TORCH_CHECK(scale.is_contiguous() && scale.scalar_type() == torch::kFloat32, "scale must be contiguous float32");
  if (w.scalar_type() == torch::kUInt8) {
    *in = w.size(1) * 2;
    TORCH_CHECK(*in % 32 == 0 && scale.numel() == w.size(0) * (*in / 32) * 2,
                "q4_1: w [out, in / 2] uint8 with in a multiple of 32 and scale [out, in / 32, 2] (d, m)");
    return Fmt::q4_1;
  }
  TORCH_CHECK(w.scalar_type() == torch::kInt8, "w must be int8 (q8_0) or uint8 (q4_1)");
  *in = w.size(1);
  TORCH_CHECK(*in % 32 == 0 && scale.numel() == w.size(0) * (*in / 32),
              "q8_0: w [out, in] int8 with in a multiple of 32 and scale [out, in / 32]");
  return Fmt::q8_0;
}

}  // namespace

// x [M, in] float32 @ (w [out, in] int8 * scale [out])^T (+ residual [M, out]).
torch::Tensor int8_linear(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scale,
                          const c10::optional<torch::Tensor>& residual) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.scalar_type() == torch::kInt8, "w must be contiguous int8");
  TORCH_CHECK(scale.is_contiguous() && scale.scalar_type() == torch::kFloat32 && scale.numel() == w.size(0),
              "scale must be float32 with one value per output");
  return linear<Fmt::i8>(x, Weights{w.data_ptr(), scale.data_ptr<float>(), w.size(1)}, w.size(0), residual);
}

// x [M, in] float32 @ w [out, in] float32^T (+ residual [M, out]): the fp32 decode step of
// several rows, where torch's matrix product repacks the weights on every call and runs at a
// third of the memory's speed (measured here: 55 ms against 22 ms for a step's products at 8 rows).
torch::Tensor f32_linear(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& residual) {
  check_rows(w, "w", -1);
  return linear<Fmt::f32>(x, Weights{w.data_ptr(), nullptr, w.size(1)}, w.size(0), residual);
}

// x [M, in] float32 @ w^T (+ residual [M, out]) with w in GGUF blocks (see Fmt): q4_1 (uint8
// nibbles [out, in / 2], scale [out, in / 32, 2]) or q8_0 (int8 [out, in], scale [out, in / 32]).
// A quarter (q8_0) or about a sixth (q4_1) of fp32's bytes per token, with the same weights.
torch::Tensor block_linear(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scale,
                           const c10::optional<torch::Tensor>& residual) {
  int64_t in = 0;
  const Weights weights{w.data_ptr(), scale.data_ptr<float>(), 0};
  const Fmt format = block_format(w, scale, &in);
  const Weights sized{weights.data, weights.scale, in};
  return format == Fmt::q4_1 ? linear<Fmt::q4_1>(x, sized, w.size(0), residual)
                             : linear<Fmt::q8_0>(x, sized, w.size(0), residual);
}

// The float weights [out, in] of a block-quantised projection: the values the kernels expand
// in registers (for a prompt's many rows, torch's product on these beats expanding per row).
torch::Tensor block_dequantize(const torch::Tensor& w, const torch::Tensor& scale) {
  int64_t in = 0;
  const Fmt format = block_format(w, scale, &in);
  const Weights weights{w.data_ptr(), scale.data_ptr<float>(), in};
  auto result = torch::empty({w.size(0), in}, scale.options());
  float* out = result.data_ptr<float>();
  parallel_for(0, w.size(0), 16, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o)
      if (format == Fmt::q4_1)
        expand_row<Fmt::q4_1>(weights, o, out + o * in);
      else
        expand_row<Fmt::q8_0>(weights, o, out + o * in);
  });
  return result;
}

// The levels q of a block's 32 weights x for scale d and minimum m (q = round((x - m) / d)),
// and whether each is in [lowest, highest] and expands (d * q + m) to exactly its weight.
static GENAPI_CLONES bool block_levels(const float* x, float d, float m, float lowest, float highest, float* level) {
  const float inverse = d > 0.f ? 1.f / d : 0.f;  // a wrong rounding here only fails the check
  int bad = 0;
#pragma omp simd reduction(| : bad)
  for (int j = 0; j < 32; ++j) {
    const float q = std::nearbyint((x[j] - m) * inverse);
    level[j] = q;
    bad |= (q < lowest) | (q > highest) | (std::fma(d, q, m) != x[j]);
  }
  return !bad;
}

// Lossless packing: fp32 weights [out, in] that are the dequantised values of GGUF blocks
// (the base model's are: prepare_base_model dequantises the shipped Q4_1/Q8_0 file) back into
// those blocks, for block_linear. Returns (values, scale, exact): exact is false when some
// block's weights are not d * q (+ m) for an fp16 d (and m) and integers q in range, and the
// tensor must then stay fp32. Each block is checked by expanding it as the kernels do.
std::tuple<torch::Tensor, torch::Tensor, bool> block_pack(const torch::Tensor& weight, const std::string& format) {
  check_rows(weight, "weight", -1);
  TORCH_CHECK(format == "q4_1" || format == "q8_0", "format must be q4_1 or q8_0, not ", format);
  const bool q4 = format == "q4_1";
  const int64_t out = weight.size(0), in = weight.size(1);
  TORCH_CHECK(in % 32 == 0, "weight has ", in, " columns, not a multiple of 32");
  const int64_t blocks = in / 32;
  auto values = q4 ? torch::empty({out, in / 2}, torch::kUInt8) : torch::empty({out, in}, torch::kInt8);
  auto scale = q4 ? torch::empty({out, blocks, 2}, torch::kFloat32) : torch::empty({out, blocks}, torch::kFloat32);
  const float* w = weight.data_ptr<float>();
  float* s = scale.data_ptr<float>();
  std::atomic<bool> exact{true};
  const auto fp16 = [](float v) { return static_cast<float>(c10::Half(v)); };
  parallel_for(0, out * blocks, 256, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1 && exact.load(std::memory_order_relaxed); ++b) {
      const float* x = w + b * 32;
      float low = x[0], high = x[0], magnitude = 0.f;
      for (int j = 0; j < 32; ++j) {
        low = std::min(low, x[j]);
        high = std::max(high, x[j]);
        magnitude = std::max(magnitude, std::fabs(x[j]));
      }
      // Quantising put the smallest weight at q = 0 and the largest at 15 (Q4_1), or the
      // largest magnitude at +-127 (Q8_0): d and m follow, up to the rounding of that weight.
      const float m = q4 ? low : 0.f;
      const float d = q4 ? fp16((high - low) / 15.f) : fp16(magnitude / 127.f);
      float level[32];
      bool ok = std::isfinite(d) && fp16(m) == m && block_levels(x, d, m, q4 ? 0.f : -127.f, q4 ? 15.f : 127.f, level);
      if (!ok) {
        exact.store(false, std::memory_order_relaxed);
        break;
      }
      uint8_t q[32];
      for (int j = 0; j < 32; ++j) q[j] = static_cast<uint8_t>(static_cast<int>(level[j]));
      if (q4) {
        uint8_t* bytes = values.data_ptr<uint8_t>() + b * 16;
        for (int j = 0; j < 16; ++j) bytes[j] = static_cast<uint8_t>(q[j] | (q[j + 16] << 4));
        s[2 * b] = d;
        s[2 * b + 1] = m;
      } else {
        std::memcpy(values.data_ptr<int8_t>() + b * 32, q, 32);
        s[b] = d;
      }
    }
  });
  return {values, scale, exact.load()};
}

// e^x in float32 for any x (clamped to [-87, 88]), written so that a `#pragma omp simd` loop
// vectorises it: e^x = 2^k e^r with r = x - k ln 2 in [-ln 2 / 2, ln 2 / 2] and e^r from
// Cephes' degree-6 polynomial. SiLU on it is as accurate as torch's (tests/inference/test_native.py)
// and, with no torch operations to dispatch, took a decode step's SiLU from 12 us a layer to 2.
static inline float exp_float(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float k = std::nearbyint(x * 1.44269504088896341f);
  float r = std::fma(k, -0.693359375f, x);  // ln 2 in two parts: k * the first is exact
  r = std::fma(k, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = std::fma(p, r, 1.3981999507e-3f);
  p = std::fma(p, r, 8.3334519073e-3f);
  p = std::fma(p, r, 4.1665795894e-2f);
  p = std::fma(p, r, 1.6666665459e-1f);
  p = std::fma(p, r, 5.0000001201e-1f);
  p = std::fma(p, r * r, r) + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;  // 2^k, k in [-126, 127]
  float power;
  std::memcpy(&power, &bits, sizeof power);
  return p * power;
}

// out = silu(gate) * up = gate / (1 + e^-gate) * up, as torch's SiLU computes it.
static GENAPI_CLONES void silu_mul_row(const float* gate, const float* up, float* out, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] = gate[j] / (1.0f + exp_float(-gate[j])) * up[j];
}

// transformers' LlamaRMSNorm: weight * (x * rsqrt(mean(x^2) + eps)), in float32.
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  check_rows(x, "x", weight.numel());
  TORCH_CHECK(weight.is_contiguous() && weight.scalar_type() == torch::kFloat32, "weight must be float32");
  const int64_t rows = x.size(0), dim = x.size(1);
  auto y = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = xp + r * dim;
    float sum = 0.f;
    for (int64_t i = 0; i < dim; ++i) sum += xr[i] * xr[i];
    const float inv = 1.f / std::sqrt(sum / static_cast<float>(dim) + static_cast<float>(eps));
    for (int64_t i = 0; i < dim; ++i) yp[r * dim + i] = wp[i] * (xr[i] * inv);
  }
  return y;
}

// [M, 2F] (gate | up) -> [M, F]: silu(gate) * up.
torch::Tensor silu_mul(const torch::Tensor& gate_up) {
  check_rows(gate_up, "gate_up", -1);
  const int64_t rows = gate_up.size(0), width = gate_up.size(1) / 2;
  auto y = torch::empty({rows, width}, gate_up.options());
  const float* in = gate_up.data_ptr<float>();
  float* out = y.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) silu_mul_row(in + r * 2 * width, in + r * 2 * width + width, out + r * width, width);
  return y;
}

// transformers' rotary embedding (rotate-half layout) of one head.
static GENAPI_CLONES void rotate(const float* in, const float* c, const float* s, float* out, int64_t head_dim) {
  const int64_t half = head_dim / 2;
#pragma omp simd
  for (int64_t j = 0; j < half; ++j) {
    out[j] = in[j] * c[j] + (-in[j + half]) * s[j];
    out[j + half] = in[j + half] * c[j + half] + in[j] * s[j + half];
  }
}

// One query head of one row: rotate the query, attend over positions 0..pos of its key/value
// head's cache (the new key and value already stored), write the head's output.
static GENAPI_CLONES void attend_head(const float* query_in, const float* c, const float* s, const float* key_cache,
                                      const float* value_cache, float* out, int64_t pos, int64_t head_dim,
                                      float scale, float* query, float* scores) {
  rotate(query_in, c, s, query, head_dim);
  float best = -INFINITY;
  for (int64_t t = 0; t <= pos; ++t) {
    const float* k = key_cache + t * head_dim;
    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < head_dim; ++j) dot += query[j] * k[j];
    scores[t] = dot * scale;
    best = std::max(best, scores[t]);
  }
  float total = 0.f;
#pragma omp simd reduction(+ : total)
  for (int64_t t = 0; t <= pos; ++t) {
    scores[t] = exp_float(scores[t] - best);
    total += scores[t];
  }
  std::fill(out, out + head_dim, 0.f);
  for (int64_t t = 0; t <= pos; ++t) {
    const float p = scores[t] / total;
    const float* v = value_cache + t * head_dim;
#pragma omp simd
    for (int64_t j = 0; j < head_dim; ++j) out[j] += p * v[j];
  }
}

// One token per row b, in cache slot slots[b] (default: b) at positions[b]: rotary embedding of
// its query and key (cos/sin [B, head_dim], transformers' rotate-half layout), its key and value
// written into the cache (keys/values [slots, kv_heads, tokens, head_dim]), then attention of
// each query head over positions 0..positions[b] of its slot's key/value head. Several rows may
// share a slot at consecutive positions (a sequence's drafts, checked at once): every row's key
// and value is written before any row attends, so each sees those before it, as in a prompt.
// Returns [B, heads * head_dim].
torch::Tensor decode_attention(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                               torch::Tensor keys, torch::Tensor values, const torch::Tensor& positions,
                               int64_t heads, int64_t kv_heads, double scale,
                               const c10::optional<torch::Tensor>& slots) {
  const int64_t batch = qkv.size(0), head_dim = keys.size(3), tokens = keys.size(2);
  check_rows(qkv, "qkv", (heads + 2 * kv_heads) * head_dim);
  check_rows(cos, "cos", head_dim);
  check_rows(sin, "sin", head_dim);
  TORCH_CHECK(keys.is_contiguous() && values.is_contiguous() && keys.sizes() == values.sizes() &&
                  keys.scalar_type() == torch::kFloat32 && keys.size(1) == kv_heads,
              "keys and values must be float32 caches [slots, kv_heads, tokens, head_dim]");
  TORCH_CHECK(positions.scalar_type() == torch::kInt64 && positions.numel() == batch, "one position per row");
  TORCH_CHECK(heads % kv_heads == 0 && head_dim % 2 == 0, "heads must group evenly over kv_heads");
  auto result = torch::empty({batch, heads * head_dim}, qkv.options());
  const float* qkvp = qkv.data_ptr<float>();
  const float* cosp = cos.data_ptr<float>();
  const float* sinp = sin.data_ptr<float>();
  const int64_t* posp = positions.data_ptr<int64_t>();
  float* kp = keys.data_ptr<float>();
  float* vp = values.data_ptr<float>();
  float* outp = result.data_ptr<float>();
  const int64_t width = (heads + 2 * kv_heads) * head_dim;
  for (int64_t b = 0; b < batch; ++b)
    TORCH_CHECK(posp[b] >= 0 && posp[b] < tokens, "position ", posp[b], " is outside the cache");
  std::vector<int64_t> slot(batch);
  if (slots.has_value()) {
    TORCH_CHECK(slots->scalar_type() == torch::kInt64 && slots->is_contiguous() && slots->numel() == batch,
                "one slot per row");
    std::copy(slots->data_ptr<int64_t>(), slots->data_ptr<int64_t>() + batch, slot.begin());
  } else {
    for (int64_t b = 0; b < batch; ++b) slot[b] = b;
  }
  for (int64_t b = 0; b < batch; ++b)
    TORCH_CHECK(slot[b] >= 0 && slot[b] < keys.size(0), "slot ", slot[b], " is outside the cache");

  // The new keys and values first (small), then every query head on its own: heads, not
  // key/value heads, spread evenly over the threads.
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t kvh = 0; kvh < kv_heads; ++kvh) {
      const float* row = qkvp + b * width;
      const int64_t cache = ((slot[b] * kv_heads + kvh) * tokens + posp[b]) * head_dim;
      rotate(row + (heads + kvh) * head_dim, cosp + b * head_dim, sinp + b * head_dim, kp + cache, head_dim);
      const float* value = row + (heads + kv_heads + kvh) * head_dim;
      std::copy(value, value + head_dim, vp + cache);
    }
  const int64_t group = heads / kv_heads;
  parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> query(head_dim), scores(tokens);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / heads, h = task % heads;
      const int64_t cache = ((slot[b] * kv_heads + h / group) * tokens) * head_dim;
      attend_head(qkvp + b * width + h * head_dim, cosp + b * head_dim, sinp + b * head_dim, kp + cache, vp + cache,
                  outp + (b * heads + h) * head_dim, posp[b], head_dim, static_cast<float>(scale), query.data(),
                  scores.data());
    }
  });
  return result;
}

namespace {

// A LoRA delta on some rows of a projection: (A [r, in], B [out, r], rows; none: every row).
using Delta = std::tuple<torch::Tensor, torch::Tensor, c10::optional<torch::Tensor>>;

// One projection of a layer: x @ w^T (w fp32, int8 with one scale per output, or GGUF blocks; an empty
// bias or scale is none) (+ residual), plus each adapter's delta on its rows, in the order and
// with the torch operations of the engine's Python projection (inference/engine.py).
torch::Tensor project(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scale,
                      const torch::Tensor& bias, const c10::optional<torch::Tensor>& residual,
                      const std::vector<Delta>& deltas) {
  const bool biased = bias.numel() > 0;
  const c10::optional<torch::Tensor> fused = biased ? c10::nullopt : residual;
  torch::Tensor y;
  if (w.scalar_type() == torch::kFloat32)
    y = f32_linear(x, w, fused);
  else if (w.scalar_type() == torch::kInt8 && scale.numel() == w.size(0))  // one scale per output
    y = int8_linear(x, w, scale, fused);
  else  // one scale per block of 32 (q8_0), or (d, m) per block (q4_1)
    y = block_linear(x, w, scale, fused);
  if (biased) {
    y = y + bias;
    if (residual.has_value()) y = *residual + y;
  }
  torch::Tensor input = x;
  for (const auto& [a, b, rows] : deltas) {
    input = input.to(a.scalar_type());
    y = y.to(a.scalar_type());
    if (rows.has_value())
      y = y.index_add(0, *rows, at::matmul(at::matmul(input.index_select(0, *rows), a.t()), b.t()));
    else
      y = y + at::matmul(at::matmul(input, a.t()), b.t());
  }
  return y;
}

}  // namespace

// Every layer of one decode step, in one call: the Python loop over 30 layers cost a quarter of
// an int8 step in dispatch. hidden [rows, D] (embedded tokens) in, the last layer's output out.
// layers[i]: input norm, then (weight, scale, bias) of q|k|v, the norm after attention... as
// listed below; deltas[i][group] the LoRA deltas of layer i's groups q|k|v, o, gate|up, down
// (deltas empty: none). keys/values [layers, slots, kv_heads, tokens, head_dim]; the rest as for
// decode_attention.
torch::Tensor decode_layers(torch::Tensor hidden, const std::vector<std::vector<torch::Tensor>>& layers,
                            const std::vector<std::vector<std::vector<Delta>>>& deltas, const torch::Tensor& keys,
                            const torch::Tensor& values, const torch::Tensor& cos, const torch::Tensor& sin,
                            const torch::Tensor& positions, const c10::optional<torch::Tensor>& slots, int64_t heads,
                            int64_t kv_heads, double scale, double eps) {
  TORCH_CHECK(deltas.empty() || deltas.size() == layers.size(), "deltas: one list per layer, or none");
  TORCH_CHECK(keys.dim() == 5 && keys.size(0) == static_cast<int64_t>(layers.size()), "one cache per layer");
  const std::vector<Delta> none;
  for (size_t i = 0; i < layers.size(); ++i) {
    const auto& l = layers[i];
    TORCH_CHECK(l.size() == 14, "layer ", i, ": 14 tensors expected, got ", l.size());
    const auto delta = [&](int group) -> const std::vector<Delta>& { return deltas.empty() ? none : deltas[i][group]; };
    // input_norm, qkv (w, scale, bias), o (w, scale, bias), post_norm, gate_up (...), down (...)
    torch::Tensor x = rms_norm(hidden, l[0], eps);
    torch::Tensor qkv = project(x, l[1], l[2], l[3], c10::nullopt, delta(0));
    torch::Tensor attended = decode_attention(qkv, cos, sin, keys.select(0, i), values.select(0, i), positions, heads,
                                              kv_heads, scale, slots);
    hidden = project(attended, l[4], l[5], l[6], hidden, delta(1));
    x = rms_norm(hidden, l[7], eps);
    torch::Tensor gate_up = project(x, l[8], l[9], l[10], c10::nullopt, delta(2));
    hidden = project(silu_mul(gate_up), l[11], l[12], l[13], hidden, delta(3));
  }
  return hidden;
}

std::string isa() {
  switch (kIsa) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "scalar";
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The GIL is released while a kernel runs, as torch's own operations do: web threads keep
  // serving (tokenising, streaming) while the engine's thread computes.
  using release = py::call_guard<py::gil_scoped_release>;
  m.def("int8_linear", &int8_linear, "x @ (int8 w * scale)^T (+ residual)", py::arg("x"), py::arg("w"),
        py::arg("scale"), py::arg("residual") = py::none(), release());
  m.def("f32_linear", &f32_linear, "x @ w^T (+ residual)", py::arg("x"), py::arg("w"),
        py::arg("residual") = py::none(), release());
  m.def("block_linear", &block_linear, "x @ w^T (+ residual), w in GGUF blocks (q4_1 or q8_0)", py::arg("x"),
        py::arg("w"), py::arg("scale"), py::arg("residual") = py::none(), release());
  m.def("block_dequantize", &block_dequantize, "the float weights of GGUF blocks (q4_1 or q8_0)", release());
  m.def("block_pack", &block_pack, "fp32 weights back into the GGUF blocks they were dequantised from",
        py::arg("weight"), py::arg("format"), release());
  m.def("rms_norm", &rms_norm, "Llama RMSNorm", release());
  m.def("silu_mul", &silu_mul, "silu(gate) * up", release());
  m.def("decode_attention", &decode_attention, "rotary, cache write and attention for one token per row",
        py::arg("qkv"), py::arg("cos"), py::arg("sin"), py::arg("keys"), py::arg("values"), py::arg("positions"),
        py::arg("heads"), py::arg("kv_heads"), py::arg("scale"), py::arg("slots") = py::none(), release());
  m.def("decode_layers", &decode_layers, "every layer of one decode step", release());
  m.def("isa", &isa, "the instruction set the kernels use");
}
