// moefy: batch-1 MoE FFN decode on CPU, one fused kernel per layer.
//
// For one token x and the active neuron ranges of a layer (shared block + chosen experts),
//   y = sum_j scale(j) * act(<G_j, x>) * <U_j, x> * D_j
// where G_j, U_j are rows of gate/up ([d_ffn, hidden], row-major) and D_j is row j of the
// down projection stored transposed ([d_ffn, hidden], row-major; moefy's CPU layout).  Every
// weight is read once, in contiguous rows; arithmetic in fp32 whatever the storage dtype.
// Work is split over torch's own intra-op threads (at::parallel_for), so it shares torch's
// OpenMP team instead of competing with it: the active neurons are cut into one chunk per
// thread, each chunk sums into its own fp32 accumulator, and the accumulators are added at the end.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstring>
#include <algorithm>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define MOEFY_AVX2 1
#endif

namespace {

enum Act : int64_t { SILU = 0, GELU_TANH = 1, GELU_ERF = 2, RELU = 3 };

inline float activate(float g, int64_t act) {
  switch (act) {
    case SILU: return g / (1.0f + std::exp(-g));
    case GELU_TANH: {
      const float k = 0.7978845608028654f;  // sqrt(2/pi)
      return 0.5f * g * (1.0f + std::tanh(k * (g + 0.044715f * g * g * g)));
    }
    case GELU_ERF: return 0.5f * g * (1.0f + std::erf(g * 0.7071067811865476f));
    default: return g > 0.0f ? g : 0.0f;
  }
}

inline float to_float(float v) { return v; }
inline float to_float(c10::BFloat16 v) { return static_cast<float>(v); }
inline float to_float(c10::Half v) { return static_cast<float>(v); }

#ifdef MOEFY_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
#endif

// <a, x> and <b, x> for two weight rows of length n (x in fp32)
template <typename T>
inline void dot2(const T* a, const T* b, const float* x, int64_t n, float& ra, float& rb) {
  int64_t i = 0;
  float sa = 0.0f, sb = 0.0f;
#ifdef MOEFY_AVX2
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
    a0 = _mm256_fmadd_ps(load8(a + i), x0, a0);
    a1 = _mm256_fmadd_ps(load8(a + i + 8), x1, a1);
    b0 = _mm256_fmadd_ps(load8(b + i), x0, b0);
    b1 = _mm256_fmadd_ps(load8(b + i + 8), x1, b1);
  }
  sa = hsum(_mm256_add_ps(a0, a1));
  sb = hsum(_mm256_add_ps(b0, b1));
#endif
  for (; i < n; ++i) {
    sa += to_float(a[i]) * x[i];
    sb += to_float(b[i]) * x[i];
  }
  ra = sa;
  rb = sb;
}

// y[0:n] += h * w[0:n]
template <typename T>
inline void axpy(float h, const T* w, float* y, int64_t n) {
  int64_t i = 0;
#ifdef MOEFY_AVX2
  __m256 hv = _mm256_set1_ps(h);
  for (; i + 16 <= n; i += 16) {
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(hv, load8(w + i), _mm256_loadu_ps(y + i)));
    _mm256_storeu_ps(y + i + 8, _mm256_fmadd_ps(hv, load8(w + i + 8), _mm256_loadu_ps(y + i + 8)));
  }
#endif
  for (; i < n; ++i) y[i] += h * to_float(w[i]);
}

template <typename T>
void run(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& up, const at::Tensor& down_t,
         const std::vector<int64_t>& starts, const std::vector<int64_t>& ends, const std::vector<float>& scales,
         int64_t act, at::Tensor& acc) {
  const int64_t hidden = x.size(0);
  const T* g = gate.data_ptr<T>();
  const T* u = up.data_ptr<T>();
  const T* d = down_t.data_ptr<T>();
  const int64_t ldg = gate.stride(0), ldu = up.stride(0), ldd = down_t.stride(0);
  std::vector<float> xf(hidden);
  const T* xp = x.data_ptr<T>();
  for (int64_t i = 0; i < hidden; ++i) xf[i] = to_float(xp[i]);
  // flatten the ranges: position p in [0, total) -> neuron
  std::vector<int64_t> prefix(starts.size() + 1, 0);
  for (size_t r = 0; r < starts.size(); ++r) prefix[r + 1] = prefix[r] + (ends[r] - starts[r]);
  const int64_t total = prefix.back();
  // chunk c of the positions sums into acc[c]: one chunk per thread, and no two chunks share a
  // row whatever thread runs them (thread ids are not relied on)
  const int64_t chunks = acc.size(0);
  float* accp = acc.data_ptr<float>();
  const int64_t per = std::max<int64_t>(1, (total + chunks - 1) / chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t cbegin, int64_t cend) {
    for (int64_t c = cbegin; c < cend; ++c) {
      const int64_t begin = c * per, end = std::min(total, begin + per);
      if (begin >= end) continue;
      float* y = accp + c * hidden;
      size_t r = std::upper_bound(prefix.begin(), prefix.end(), begin) - prefix.begin() - 1;
      for (int64_t p = begin; p < end; ++p) {
        while (p >= prefix[r + 1]) ++r;
        const int64_t j = starts[r] + (p - prefix[r]);
        float gv, uv;
        dot2(g + j * ldg, u + j * ldu, xf.data(), hidden, gv, uv);
        const float h = activate(gv, act) * uv * scales[r];
        axpy(h, d + j * ldd, y, hidden);
      }
    }
  });
}

template <typename T>
inline float round_to(float v) { return static_cast<float>(static_cast<T>(v)); }

// Router logits (rounded to T, as nn.Linear in T gives them) and the top-k experts, by the rule of
// moefy.hf.modeling_moefy.topk_experts: larger logit first, the lower index among equal logits.
// Only mask gating (every weight 1) is routed here; weighted gatings have one definition, in
// modeling_moefy, and reach the kernel as scales of moe_decode.
template <typename T>
void route(const at::Tensor& x, const at::Tensor& router, int64_t k, std::vector<int64_t>& experts) {
  const int64_t hidden = x.size(0), n_experts = router.size(0);
  const T* xp = x.data_ptr<T>();
  const T* rp = router.data_ptr<T>();
  const int64_t ldr = router.stride(0);
  std::vector<float> xf(hidden), logits(n_experts);
  for (int64_t i = 0; i < hidden; ++i) xf[i] = to_float(xp[i]);
  const int64_t pairs = (n_experts + 1) / 2;  // two experts per dot2 (the last one twice when E is odd)
  at::parallel_for(0, pairs, 8, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      const int64_t e = 2 * q, f = std::min(e + 1, n_experts - 1);
      float a, b;
      dot2(rp + e * ldr, rp + f * ldr, xf.data(), hidden, a, b);
      logits[e] = round_to<T>(a);
      logits[f] = round_to<T>(b);
    }
  });
  std::vector<bool> taken(n_experts, false);
  experts.assign(k, 0);
  for (int64_t j = 0; j < k; ++j) {
    int64_t best = -1;
    for (int64_t e = 0; e < n_experts; ++e)
      if (!taken[e] && (best < 0 || logits[e] > logits[best])) best = e;  // strict: ties keep the lower index
    taken[best] = true;
    experts[j] = best;
  }
}

void check_weights(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& up, const at::Tensor& down_t) {
  TORCH_CHECK(x.dim() == 1 && x.is_contiguous(), "x must be a contiguous vector");
  TORCH_CHECK(gate.dim() == 2 && up.dim() == 2 && down_t.dim() == 2, "weights must be matrices");
  auto unit_inner = [](const at::Tensor& t) { return t.stride(1) == 1 || t.size(1) == 1; };
  TORCH_CHECK(unit_inner(gate) && unit_inner(up) && unit_inner(down_t), "weights need unit inner stride");
  TORCH_CHECK(gate.size(1) == x.size(0) && up.size(1) == x.size(0) && down_t.size(1) == x.size(0), "hidden size mismatch");
  TORCH_CHECK(gate.scalar_type() == x.scalar_type() && up.scalar_type() == x.scalar_type() &&
              down_t.scalar_type() == x.scalar_type(), "weights and x must share a dtype");
}

at::Tensor ffn(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& up, const at::Tensor& down_t,
               const std::vector<int64_t>& starts, const std::vector<int64_t>& ends, const std::vector<float>& scl,
               int64_t act) {
  TORCH_CHECK(act >= 0 && act <= 3, "unknown activation code");
  TORCH_CHECK(starts.size() == ends.size() && starts.size() == scl.size(), "ranges and scales differ in length");
  const int64_t rows = std::min({gate.size(0), up.size(0), down_t.size(0)});
  for (size_t r = 0; r < starts.size(); ++r)
    TORCH_CHECK(0 <= starts[r] && starts[r] <= ends[r] && ends[r] <= rows, "neuron range out of bounds");
  at::Tensor acc = at::zeros({at::get_num_threads(), x.size(0)}, x.options().dtype(at::kFloat));
  switch (x.scalar_type()) {
    case at::kFloat: run<float>(x, gate, up, down_t, starts, ends, scl, act, acc); break;
    case at::kBFloat16: run<c10::BFloat16>(x, gate, up, down_t, starts, ends, scl, act, acc); break;
    case at::kHalf: run<c10::Half>(x, gate, up, down_t, starts, ends, scl, act, acc); break;
    default: TORCH_CHECK(false, "moe_decode: unsupported dtype ", x.scalar_type());
  }
  return acc.sum(0);
}

}  // namespace

// x: [hidden]; gate, up, down_t: [d_ffn, hidden] with unit inner stride, all of x's dtype;
// neurons starts[r]:ends[r] are active with weight scales[r]; returns fp32 [hidden].
at::Tensor moe_decode(at::Tensor x, at::Tensor gate, at::Tensor up, at::Tensor down_t, std::vector<int64_t> starts,
                      std::vector<int64_t> ends, std::vector<double> scales, int64_t act) {
  check_weights(x, gate, up, down_t);
  std::vector<float> scl(scales.begin(), scales.end());
  pybind11::gil_scoped_release release;
  return ffn(x, gate, up, down_t, starts, ends, scl, act);
}

// The whole batch-1 MoE FFN with top-k mask routing in one call: router [E, hidden] (x's dtype);
// expert e owns neurons offsets[e]:offsets[e+1]; neurons 0:n_shared are always active.
at::Tensor moe_decode_topk(at::Tensor x, at::Tensor router, at::Tensor gate, at::Tensor up, at::Tensor down_t,
                           std::vector<int64_t> offsets, int64_t n_shared, int64_t k, int64_t act) {
  check_weights(x, gate, up, down_t);
  TORCH_CHECK(router.dim() == 2 && router.size(1) == x.size(0) && (router.stride(1) == 1 || router.size(1) == 1) &&
              router.scalar_type() == x.scalar_type(), "router must be [experts, hidden] in x's dtype");
  const int64_t n_experts = router.size(0);
  TORCH_CHECK(static_cast<int64_t>(offsets.size()) == n_experts + 1, "need experts + 1 offsets");
  TORCH_CHECK(1 <= k && k <= n_experts, "top_k must be in 1..experts");
  pybind11::gil_scoped_release release;
  std::vector<int64_t> experts;
  switch (x.scalar_type()) {
    case at::kFloat: route<float>(x, router, k, experts); break;
    case at::kBFloat16: route<c10::BFloat16>(x, router, k, experts); break;
    case at::kHalf: route<c10::Half>(x, router, k, experts); break;
    default: TORCH_CHECK(false, "moe_decode_topk: unsupported dtype ", x.scalar_type());
  }
  std::vector<int64_t> starts, ends;
  std::vector<float> scl;
  if (n_shared > 0) {
    starts.push_back(0);
    ends.push_back(n_shared);
    scl.push_back(1.0f);
  }
  for (int64_t j = 0; j < k; ++j) {
    starts.push_back(offsets[experts[j]]);
    ends.push_back(offsets[experts[j] + 1]);
    scl.push_back(1.0f);
  }
  return ffn(x, gate, up, down_t, starts, ends, scl, act);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("moe_decode", &moe_decode, "batch-1 MoE FFN decode over given neuron ranges (CPU)");
  m.def("moe_decode_topk", &moe_decode_topk, "batch-1 MoE FFN decode with top-k mask routing (CPU)");
}
