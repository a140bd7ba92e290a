// Paged attention for the CPU where every query row attends on its own: row t reads the first lens[t] keys of its
// own page list pages[t] (a decode row, a draft row to verify, or a short prompt's token, all alike), and its
// arithmetic does not depend on the other rows, the batch or the number of threads. That is what makes greedy
// speculation lossless in float32 (a draft row gets the bits of the decode step it stands for) without one SDPA
// call per row, and lets a compiled graph take any number of rows.
//
// Per (row, KV head): each query head of the group scores its keys (AVX2 dot products, lanes summed in a fixed
// order), softmax with a vectorized exp, then the weighted sum of values; float32 throughout, the cache read as
// float32 or bfloat16.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <vector>

namespace {

inline float lane_sum(__m256 v) {  // the 8 lanes, always in this order
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// e^x, Cephes' single-precision method (x = n ln2 + r, a degree-5 polynomial for e^r): ~1 ulp; e^x <= -88.38 is 0
inline __m256 exp256(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-88.3762626647949f));
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x), _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {  // bf16 -> float32: the 16 bits on top
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

constexpr int64_t kMaxDim = 256;

template <typename C>
void attend_row(const float* q, const C* kc, const C* vc, const int64_t* pages, int64_t len, int64_t block_size,
                int64_t row_stride, int64_t g, int64_t D, float scale, float* out, std::vector<float>& s) {
  const int64_t padded = (len + 7) / 8 * 8;
  s.resize(padded);
  const int64_t nd = D / 8;
  for (int64_t hh = 0; hh < g; ++hh) {
    const float* qh = q + hh * D;
    __m256 qv[kMaxDim / 8];
    for (int64_t c = 0; c < nd; ++c) qv[c] = _mm256_mul_ps(load8(qh + c * 8), _mm256_set1_ps(scale));
    for (int64_t j = 0; j < len; ++j) {
      const C* k = kc + (pages[j / block_size] * block_size + j % block_size) * row_stride;
      __m256 acc = _mm256_mul_ps(qv[0], load8(k));
      for (int64_t c = 1; c < nd; ++c) acc = _mm256_fmadd_ps(qv[c], load8(k + c * 8), acc);
      s[j] = lane_sum(acc);
    }
    for (int64_t j = len; j < padded; ++j) s[j] = -1e30f;  // e^(-1e30 - max) is exactly 0
    __m256 mv = _mm256_set1_ps(-1e30f);
    for (int64_t j = 0; j < padded; j += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(s.data() + j));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mv), _mm256_extractf128_ps(mv, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    const __m256 mx = _mm256_set1_ps(_mm_cvtss_f32(_mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1))));
    __m256 sum = _mm256_setzero_ps();
    for (int64_t j = 0; j < padded; j += 8) {
      const __m256 p = exp256(_mm256_sub_ps(_mm256_loadu_ps(s.data() + j), mx));
      _mm256_storeu_ps(s.data() + j, p);
      sum = _mm256_add_ps(sum, p);
    }
    __m256 acc[kMaxDim / 8];
    for (int64_t c = 0; c < nd; ++c) acc[c] = _mm256_setzero_ps();
    for (int64_t j = 0; j < len; ++j) {
      const C* v = vc + (pages[j / block_size] * block_size + j % block_size) * row_stride;
      const __m256 p = _mm256_set1_ps(s[j]);
      for (int64_t c = 0; c < nd; ++c) acc[c] = _mm256_fmadd_ps(p, load8(v + c * 8), acc[c]);
    }
    const __m256 total = _mm256_set1_ps(lane_sum(sum));
    for (int64_t c = 0; c < nd; ++c) _mm256_storeu_ps(out + hh * D + c * 8, _mm256_div_ps(acc[c], total));
  }
}

// q [T, H, D] float32; k_cache, v_cache [blocks, block_size, Hkv, D] float32 or bfloat16; pages [T, P] int64 (row
// t's blocks); lens [T] int64 (keys row t sees, 1 <= lens[t] <= P * block_size). Query head h reads KV head
// h / (H / Hkv). Returns [T, H, D] float32.
torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor pages,
                              torch::Tensor lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == torch::kFloat, "q: [T, H, D] float32");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.is_contiguous() &&
              v_cache.is_contiguous() && k_cache.scalar_type() == v_cache.scalar_type(),
              "k_cache, v_cache: [blocks, block_size, Hkv, D], contiguous, one dtype");
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2), bs = k_cache.size(1), Hkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D && D % 8 == 0 && D <= kMaxDim && H % Hkv == 0, "head dims: q ", q.sizes(),
              ", cache ", k_cache.sizes());
  TORCH_CHECK(pages.dim() == 2 && pages.size(0) == T && pages.scalar_type() == torch::kLong, "pages: [T, P] int64");
  TORCH_CHECK(lens.dim() == 1 && lens.size(0) == T && lens.scalar_type() == torch::kLong, "lens: [T] int64");
  const auto qc = q.contiguous(), pc = pages.contiguous(), lc = lens.contiguous();
  const int64_t P = pc.size(1), g = H / Hkv, nblocks = k_cache.size(0);
  const int64_t* L = lc.data_ptr<int64_t>();
  const int64_t* PG = pc.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(L[t] >= 1 && L[t] <= P * bs, "row ", t, " sees ", L[t], " keys; its pages hold ", P * bs);
    for (int64_t p = 0; p < (L[t] + bs - 1) / bs; ++p)
      TORCH_CHECK(PG[t * P + p] >= 0 && PG[t * P + p] < nblocks, "row ", t, " page ", p, " is block ", PG[t * P + p]);
  }
  auto out = torch::empty({T, H, D}, torch::kFloat);
  const float* Q = qc.data_ptr<float>();
  float* O = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  auto run = [&](auto* kc, auto* vc) {
    at::parallel_for(0, T * Hkv, 1, [&](int64_t i0, int64_t i1) {
      std::vector<float> s;
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t t = i / Hkv, kvh = i % Hkv;
        attend_row(Q + (t * H + kvh * g) * D, kc + kvh * D, vc + kvh * D, PG + t * P, L[t], bs, Hkv * D, g, D, sc,
                   O + (t * H + kvh * g) * D, s);
      }
    });
  };
  if (k_cache.scalar_type() == torch::kFloat) {
    run(k_cache.data_ptr<float>(), v_cache.data_ptr<float>());
  } else {
    TORCH_CHECK(k_cache.scalar_type() == torch::kBFloat16, "cache: float32 or bfloat16");
    run(k_cache.data_ptr<at::BFloat16>(), v_cache.data_ptr<at::BFloat16>());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dspark_cpu, lib) {
  lib.def("paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor pages, Tensor lens, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(dspark_cpu, CPU, lib) { lib.impl("paged_attention", &paged_attention); }
