// The native decode kernels, built on first use by inference/native/__init__.py: every step of
// an int8 engine (INFERENCE_QUANTIZE=int8), and the steps of several sequences at once on fp32.
//
// Decoding reads every weight once per token for a handful of rows, so it is bound by
// memory: int8 weights with one fp32 scale per output channel (or fp32 weights), fp32
// activations, and a matrix-vector product that keeps both cores' loads in flight (torch's
// int8 kernel reaches half the bandwidth here and rounds activations to bf16; its fp32 product
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

#include <cmath>
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

// y[m, o] = scale[o] * sum_i w[o, i] * x[m, i] (+ residual[m, o]) for o in [o0, o1), with W int8
// (one scale per output) or float (no scale).
template <typename W>
using LinearKernel = void (*)(const W*, const float*, const float*, const float*, float*, int64_t, int64_t,
                              int64_t, int64_t);

template <typename W>
inline float finish(float sum, const float* scale, int64_t o) {
  if constexpr (std::is_same_v<W, int8_t>)
    return sum * scale[o];
  else
    return sum;
}

template <typename W, int M>
void linear_rows_scalar(const W* w, const float* scale, const float* x, const float* residual, float* y,
                        int64_t in, int64_t out, int64_t o0, int64_t o1) {
  for (int64_t o = o0; o < o1; ++o) {
    const W* wo = w + o * in;
    for (int m = 0; m < M; ++m) {
      const float* xm = x + m * in;
      float sum = 0.f;
      for (int64_t i = 0; i < in; ++i) sum += static_cast<float>(wo[i]) * xm[i];
      float value = finish<W>(sum, scale, o);
      y[m * out + o] = residual ? residual[m * out + o] + value : value;
    }
  }
}

#ifdef GENAPI_X86
// 16 weights as floats.
template <typename W>
__attribute__((target("avx512f,avx512bw"))) inline __m512 load16(const W* w) {
  if constexpr (std::is_same_v<W, int8_t>)
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))));
  else
    return _mm512_loadu_ps(w);
}

template <typename W, int M>
__attribute__((target("avx512f,avx512bw"))) void linear_rows_avx512(const W* w, const float* scale, const float* x,
                                                                     const float* residual, float* y, int64_t in,
                                                                     int64_t out, int64_t o0, int64_t o1) {
  constexpr int R = kOutputsPerPass;
  int64_t o = o0;
  for (; o + R <= o1; o += R) {
    __m512 acc[R][M];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
    for (int64_t i = 0; i < in; i += 16) {
      __m512 xv[M];
      for (int m = 0; m < M; ++m) xv[m] = _mm512_loadu_ps(x + m * in + i);
      for (int r = 0; r < R; ++r) {
        const W* row = w + (o + r) * in + i;
        _mm_prefetch(reinterpret_cast<const char*>(row + kPrefetchRows * in), _MM_HINT_T0);
        __m512 wv = load16(row);
        for (int m = 0; m < M; ++m) acc[r][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][m]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) {
        float value = finish<W>(_mm512_reduce_add_ps(acc[r][m]), scale, o + r);
        y[m * out + o + r] = residual ? residual[m * out + o + r] + value : value;
      }
  }
  for (; o < o1; ++o) {  // the last outputs, one at a time: the same sums, in the same order
    __m512 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t i = 0; i < in; i += 16) {
      __m512 wv = load16(w + o * in + i);
      for (int m = 0; m < M; ++m) acc[m] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * in + i), acc[m]);
    }
    for (int m = 0; m < M; ++m) {
      float value = finish<W>(_mm512_reduce_add_ps(acc[m]), scale, o);
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

// 8 weights as floats.
template <typename W>
__attribute__((target("avx2,fma"))) inline __m256 load8(const W* w) {
  if constexpr (std::is_same_v<W, int8_t>)
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w))));
  else
    return _mm256_loadu_ps(w);
}

template <typename W, int M>
__attribute__((target("avx2,fma"))) void linear_rows_avx2(const W* w, const float* scale, const float* x,
                                                           const float* residual, float* y, int64_t in, int64_t out,
                                                           int64_t o0, int64_t o1) {
  constexpr int R = kOutputsPerPass;
  int64_t o = o0;
  for (; o + R <= o1; o += R) {
    __m256 acc[R][M];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_ps();
    for (int64_t i = 0; i < in; i += 8) {
      __m256 xv[M];
      for (int m = 0; m < M; ++m) xv[m] = _mm256_loadu_ps(x + m * in + i);
      for (int r = 0; r < R; ++r) {
        const W* row = w + (o + r) * in + i;
        _mm_prefetch(reinterpret_cast<const char*>(row + kPrefetchRows * in), _MM_HINT_T0);
        __m256 wv = load8(row);
        for (int m = 0; m < M; ++m) acc[r][m] = _mm256_fmadd_ps(wv, xv[m], acc[r][m]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) {
        float value = finish<W>(sum8(acc[r][m]), scale, o + r);
        y[m * out + o + r] = residual ? residual[m * out + o + r] + value : value;
      }
  }
  for (; o < o1; ++o) {
    __m256 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t i = 0; i < in; i += 8) {
      __m256 wv = load8(w + o * in + i);
      for (int m = 0; m < M; ++m) acc[m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * in + i), acc[m]);
    }
    for (int m = 0; m < M; ++m) {
      float value = finish<W>(sum8(acc[m]), scale, o);
      y[m * out + o] = residual ? residual[m * out + o] + value : value;
    }
  }
}
#endif

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

template <typename W, int M>
LinearKernel<W> linear_kernel(int64_t in) {
#ifdef GENAPI_X86
  if (kIsa == Isa::avx512 && in % 16 == 0) return linear_rows_avx512<W, M>;
  if (kIsa == Isa::avx2 && in % 8 == 0) return linear_rows_avx2<W, M>;
#endif
  return linear_rows_scalar<W, M>;
}

template <typename W>
LinearKernel<W> linear_kernel_for(int rows, int64_t in) {
  switch (rows) {
    case 1: return linear_kernel<W, 1>(in);
    case 2: return linear_kernel<W, 2>(in);
    case 3: return linear_kernel<W, 3>(in);
    default: return linear_kernel<W, 4>(in);
  }
}

void check_rows(const torch::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous() && t.scalar_type() == torch::kFloat32, name,
              " must be a contiguous 2-d float32 tensor");
  TORCH_CHECK(dim < 0 || t.size(1) == dim, name, " has ", t.size(1), " columns, expected ", dim);
}

// y = x @ (w * scale)^T (+ residual), over the threads. The threads split the outputs; each
// reads its weight rows once for all input rows, in passes of up to kRowsPerPass rows while the
// weight rows are still in L1 (L2 for the widest).
template <typename W>
torch::Tensor linear(const torch::Tensor& x, const W* wp, const float* sp, int64_t out, int64_t in,
                     const c10::optional<torch::Tensor>& residual) {
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
  const LinearKernel<W> full = linear_kernel_for<W>(kRowsPerPass, in);
  const LinearKernel<W> last = linear_kernel_for<W>(static_cast<int>(rows % kRowsPerPass), in);
  at::parallel_for(0, out, 64, [&](int64_t o0, int64_t o1) {
    for (int64_t step = o0; step < o1; step += 16) {
      const int64_t stop = std::min(o1, step + 16);
      for (int64_t m = 0; m < rows; m += kRowsPerPass) {
        const LinearKernel<W> kernel = m + kRowsPerPass <= rows ? full : last;
        kernel(wp, sp, xp + m * in, res ? res + m * out : nullptr, yp + m * out, in, out, step, stop);
      }
    }
  });
  return y;
}

}  // namespace

// x [M, in] float32 @ (w [out, in] int8 * scale [out])^T (+ residual [M, out]).
torch::Tensor int8_linear(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scale,
                          const c10::optional<torch::Tensor>& residual) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.scalar_type() == torch::kInt8, "w must be contiguous int8");
  TORCH_CHECK(scale.is_contiguous() && scale.scalar_type() == torch::kFloat32 && scale.numel() == w.size(0),
              "scale must be float32 with one value per output");
  return linear(x, w.data_ptr<int8_t>(), scale.data_ptr<float>(), w.size(0), w.size(1), residual);
}

// x [M, in] float32 @ w [out, in] float32^T (+ residual [M, out]): the fp32 decode step of
// several rows, where torch's matrix product repacks the weights on every call and runs at a
// third of the memory's speed (measured here: 55 ms against 22 ms for a step's products at 8 rows).
torch::Tensor f32_linear(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& residual) {
  check_rows(w, "w", -1);
  return linear(x, w.data_ptr<float>(), static_cast<const float*>(nullptr), w.size(0), w.size(1), residual);
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

// [M, 2F] (gate | up) -> [M, F]: silu(gate) * up, with torch's vectorised SiLU.
torch::Tensor silu_mul(const torch::Tensor& gate_up) {
  check_rows(gate_up, "gate_up", -1);
  const int64_t width = gate_up.size(1) / 2;
  return at::silu(gate_up.narrow(1, 0, width)).mul_(gate_up.narrow(1, width, width));
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
  for (int64_t t = 0; t <= pos; ++t) total += (scores[t] = std::exp(scores[t] - best));
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
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
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

// One projection of a layer: x @ w^T (w int8 with one scale per output, or fp32; an empty
// bias or scale is none) (+ residual), plus each adapter's delta on its rows, in the order and
// with the torch operations of the engine's Python projection (inference/engine.py).
torch::Tensor project(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scale,
                      const torch::Tensor& bias, const c10::optional<torch::Tensor>& residual,
                      const std::vector<Delta>& deltas) {
  const bool biased = bias.numel() > 0;
  const c10::optional<torch::Tensor> fused = biased ? c10::nullopt : residual;
  torch::Tensor y = w.scalar_type() == torch::kInt8 ? int8_linear(x, w, scale, fused) : f32_linear(x, w, fused);
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
  m.def("rms_norm", &rms_norm, "Llama RMSNorm", release());
  m.def("silu_mul", &silu_mul, "silu(gate) * up", release());
  m.def("decode_attention", &decode_attention, "rotary, cache write and attention for one token per row",
        py::arg("qkv"), py::arg("cos"), py::arg("sin"), py::arg("keys"), py::arg("values"), py::arg("positions"),
        py::arg("heads"), py::arg("kv_heads"), py::arg("scale"), py::arg("slots") = py::none(), release());
  m.def("decode_layers", &decode_layers, "every layer of one decode step", release());
  m.def("isa", &isa, "the instruction set the kernels use");
}
