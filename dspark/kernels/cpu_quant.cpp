// Quantized matmuls for the CPU in llama.cpp's kernel class: int8 activations (each row quantized in blocks of
// 32, as ggml's Q8_1) times int4 weights in groups of 32 (w = q * d + m, ggml's Q4_1) or int8 weights in blocks of
// 32 (w = q * d, ggml's Q8_0), dot products in integers (AVX2 vpmaddubsw), one float scale per block.
//
// Weights are laid out in tiles of 8 output columns, so that one 32-byte vector holds 4 inputs of each of the 8
// columns and the block's integer sums come out per column in the 8 lanes of one vector (no horizontal sums);
// the activation's 4 bytes are broadcast across the lanes. Each (row, column) adds its blocks in the same order
// whatever the number of rows or threads, so a row's bits do not depend on its batch.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t kBlock = 32;

// x [M, K] float32 -> codes [M, K] int8, d [M, K/32] (x ~ code * d) and s [M, K/32] (d * the block's code sum)
void quantize_rows(const float* x, int64_t M, int64_t K, int8_t* codes, float* d, float* s) {
  const int64_t nb = K / kBlock;
  for (int64_t i = 0; i < M * nb; ++i) {
    const float* v = x + i * kBlock;
    float amax = 0.f;
    for (int j = 0; j < kBlock; ++j) amax = std::max(amax, std::fabs(v[j]));
    const float scale = amax / 127.f;
    const float inv = scale != 0.f ? 1.f / scale : 0.f;
    int sum = 0;
    for (int j = 0; j < kBlock; ++j) {
      const int c = static_cast<int>(std::nearbyint(v[j] * inv));
      codes[i * kBlock + j] = static_cast<int8_t>(c);
      sum += c;
    }
    d[i] = scale;
    s[i] = scale * static_cast<float>(sum);
  }
}

struct Rows {  // the quantized activations
  const int8_t* codes;
  const float *d, *s;
  int64_t K, nb;
};

// int4 tile: 128 bytes a block, vector p (0..3) byte 4c + j = column c's input 4p + j (low nibble) and 16 + 4p + j
// (high nibble); d, m [nb, 8]
template <int R>
void w4_tile(const uint8_t* w, const float* d, const float* m, const Rows& x, int64_t r, float* out, int64_t N) {
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 acc[R];
  for (int i = 0; i < R; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t b = 0; b < x.nb; ++b) {
    __m256i lo[4], hi[4];
    for (int p = 0; p < 4; ++p) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b * 128 + p * 32));
      lo[p] = _mm256_and_si256(v, low);
      hi[p] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
    }
    const __m256 dv = _mm256_loadu_ps(d + b * 8), mv = _mm256_loadu_ps(m + b * 8);
    for (int i = 0; i < R; ++i) {
      const int64_t xb = (r + i) * x.nb + b;
      int32_t x4[8];  // the block's 32 activation codes, 4 at a time
      std::memcpy(x4, x.codes + xb * kBlock, sizeof(x4));
      __m256i s = _mm256_setzero_si256();
      for (int p = 0; p < 4; ++p) {  // |s| <= 8 * 2 * 15 * 127 < 2^15: exact in int16
        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(lo[p], _mm256_set1_epi32(x4[p])));
        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(hi[p], _mm256_set1_epi32(x4[p + 4])));
      }
      const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(s, ones));
      acc[i] = _mm256_fmadd_ps(_mm256_mul_ps(dv, _mm256_set1_ps(x.d[xb])), dot, acc[i]);
      acc[i] = _mm256_fmadd_ps(mv, _mm256_set1_ps(x.s[xb]), acc[i]);
    }
  }
  for (int i = 0; i < R; ++i) _mm256_storeu_ps(out + (r + i) * N, acc[i]);
}

// int8 tile: 256 bytes a block, vector p (0..7) byte 4c + j = column c's input 4p + j; d [nb, 8]
template <int R>
void w8_tile(const int8_t* w, const float* d, const float*, const Rows& x, int64_t r, float* out, int64_t N) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[R];
  for (int i = 0; i < R; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t b = 0; b < x.nb; ++b) {
    __m256i mag[8], sgn[8];
    for (int p = 0; p < 8; ++p) {
      sgn[p] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b * 256 + p * 32));
      mag[p] = _mm256_abs_epi8(sgn[p]);
    }
    const __m256 dv = _mm256_loadu_ps(d + b * 8);
    for (int i = 0; i < R; ++i) {
      const int64_t xb = (r + i) * x.nb + b;
      int32_t x4[8];
      std::memcpy(x4, x.codes + xb * kBlock, sizeof(x4));
      __m256i s = _mm256_setzero_si256();
      for (int p = 0; p < 8; ++p) {  // |w| * (x with w's sign) = w * x; a pair <= 2 * 127 * 127 < 2^15
        const __m256i xs = _mm256_sign_epi8(_mm256_set1_epi32(x4[p]), sgn[p]);
        s = _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_maddubs_epi16(mag[p], xs), ones));
      }
      acc[i] = _mm256_fmadd_ps(_mm256_mul_ps(dv, _mm256_set1_ps(x.d[xb])), _mm256_cvtepi32_ps(s), acc[i]);
    }
  }
  for (int i = 0; i < R; ++i) _mm256_storeu_ps(out + (r + i) * N, acc[i]);
}

template <typename W, void (*Tile1)(const W*, const float*, const float*, const Rows&, int64_t, float*, int64_t),
          void (*Tile4)(const W*, const float*, const float*, const Rows&, int64_t, float*, int64_t)>
torch::Tensor tiled_mm(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& d,
                       const torch::Tensor* m, int64_t tile_bytes) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x: [M, K] float32");
  const int64_t M = x.size(0), K = x.size(1), T = w.size(0), N = T * 8, nb = K / kBlock;
  TORCH_CHECK(K % kBlock == 0 && w.dim() == 3 && w.size(1) == nb && w.size(2) == tile_bytes && w.is_contiguous(),
              "w: [N/8, K/32, ", tile_bytes, "] for x's K = ", K);
  TORCH_CHECK(d.sizes() == torch::IntArrayRef({T, nb, 8}) && d.scalar_type() == torch::kFloat && d.is_contiguous());
  if (m) TORCH_CHECK(m->sizes() == d.sizes() && m->scalar_type() == torch::kFloat && m->is_contiguous());
  // the quantized rows in the calling thread's buffers, kept between calls (121 calls a batch-1 step of the default model)
  thread_local std::vector<int8_t> codes;
  thread_local std::vector<float> xd, xs;
  codes.resize(M * K);
  xd.resize(M * nb);
  xs.resize(M * nb);
  quantize_rows(x.data_ptr<float>(), M, K, codes.data(), xd.data(), xs.data());
  const Rows rows{codes.data(), xd.data(), xs.data(), K, nb};
  auto out = torch::empty({M, N}, torch::kFloat);
  const W* W_ = reinterpret_cast<const W*>(w.data_ptr());
  const float *D = d.data_ptr<float>(), *Mn = m ? m->data_ptr<float>() : nullptr;
  float* O = out.data_ptr<float>();
  at::parallel_for(0, T, 4, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const W* wt = W_ + t * nb * tile_bytes;
      const float *dt = D + t * nb * 8, *mt = Mn ? Mn + t * nb * 8 : nullptr;
      int64_t r = 0;
      for (; r + 4 <= M; r += 4) Tile4(wt, dt, mt, rows, r, O + t * 8, N);
      for (; r < M; ++r) Tile1(wt, dt, mt, rows, r, O + t * 8, N);
    }
  });
  return out;
}

torch::Tensor w4a8_mm(torch::Tensor x, torch::Tensor w, torch::Tensor d, torch::Tensor m) {
  TORCH_CHECK(w.scalar_type() == torch::kByte, "w: uint8 (two int4 codes a byte)");
  return tiled_mm<uint8_t, w4_tile<1>, w4_tile<4>>(x, w, d, &m, 128);
}

torch::Tensor w8a8_mm(torch::Tensor x, torch::Tensor w, torch::Tensor d) {
  TORCH_CHECK(w.scalar_type() == torch::kChar, "w: int8");
  return tiled_mm<int8_t, w8_tile<1>, w8_tile<4>>(x, w, d, nullptr, 256);
}

}  // namespace

TORCH_LIBRARY(dspark_cpu, lib) {
  lib.def("w4a8_mm(Tensor x, Tensor w, Tensor d, Tensor m) -> Tensor");
  lib.def("w8a8_mm(Tensor x, Tensor w, Tensor d) -> Tensor");
}

TORCH_LIBRARY_IMPL(dspark_cpu, CPU, lib) {
  lib.impl("w4a8_mm", &w4a8_mm);
  lib.impl("w8a8_mm", &w8a8_mm);
}
