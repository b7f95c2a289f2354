// Linear layers over blocks of 32 weights with activations quantized to int8 per block of 32 (W4A8, W8A8).
//
// Weights (rows N, input columns K, K a multiple of 32), one block = 32 consecutive inputs of one row:
//   q4: qs uint8 [N, K/2], blocks in pairs: byte j of pair (b, b + 1) holds weight j of block b in its low
//       nibble and weight j of block b + 1 in its high nibble, so one 32-byte load and two masks give both
//       blocks' weights in input order; an odd last block keeps GGUF's order (byte j: weights j and j + 16).
//       The values are the shipped ones (tokenmill/quant/block.py repacks them); w = d * q + m, q in 0..15.
//   q8: qs int8 [N, K]; w = d * q.
//   d, m [N, K/32], float32 or float16: GGUF ships float16 scales, and keeping them so reads a fifth fewer
//       bytes per q4 row (scales are a third of the quants' bytes in float32); float16 -> float32 is exact.
// Activations x [M, K] float32 are quantized once per call: per block, xd = max|x| / 127 and
// xq = round-to-nearest-even(x / xd) in [-127, 127]; xs = xd * sum(xq) carries the block's sum for q4's m term.
// Then y[m, n] = sum over blocks b of d[n,b] * xd[m,b] * dot(q[n,b], xq[m,b]) (+ m[n,b] * xs[m,b]) with the
// integer dot exact in int32: only the activations' rounding and float summation order differ from a dense
// float matmul. The output rows are split across threads; each weight row is read once per call and reused
// from L1 for every activation row.
//
// Built per ISA (tokenmill/kernels/build.py): AVX2 uses maddubs + madd; with AVX512-VNNI (or AVX-VNNI) one
// dpbusd does both; without AVX2 a scalar loop runs.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t QK = 32;

// A weight row's float16 scales widened to float once, into a buffer the row's tiles then read from L1.
inline void widen(const uint16_t* h, float* f, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(f + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
#endif
  for (; i < n; ++i) f[i] = static_cast<float>(c10::Half(h[i], c10::Half::from_bits()));
}
constexpr int MR = 4;  // activation rows handled together for one weight row

// ---- activation quantization ------------------------------------------------------------------------
void quantize_block(const float* x, int8_t* q, float* d_out, float* s_out) {
  float amax = 0.f;
  for (int64_t i = 0; i < QK; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float d = amax / 127.f;
  const float id = d > 0.f ? 1.f / d : 0.f;
  int32_t sum = 0;
  for (int64_t i = 0; i < QK; ++i) {
    const int32_t v = static_cast<int32_t>(std::nearbyint(x[i] * id));
    q[i] = static_cast<int8_t>(v);
    sum += v;
  }
  *d_out = d;
  *s_out = d * static_cast<float>(sum);
}

void quantize_rows(const float* x, int64_t M, int64_t K, int8_t* xq, float* xd, float* xs) {
  const int64_t nb = K / QK;
  at::parallel_for(0, M * nb, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) quantize_block(x + i * QK, xq + i * QK, xd + i, xs + i);
  });
}

// ---- integer dot of one block ------------------------------------------------------------------------
#if defined(__AVX2__)
inline __m256i expand_q4(const uint8_t* p) {  // 16 bytes -> 32 x u8: weights 0..15 (low), then 16..31 (high)
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256i both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
  return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

// u8 (weights 0..15, or |w| of q8) times s8 activations, summed in fours -> 8 x int32.
inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
  // Pair sums stay within int16: q4's are at most 2 * 15 * 127 and q8's 2 * 128 * 127.
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// One weight row n against MR_ activation rows (a compile-time count, so the accumulators stay in registers).
template <bool Q4, int MR_>
void row_tile(const uint8_t* wq, const float* wd, const float* wm, const int8_t* xq, const float* xd,
              const float* xs, int64_t K, float* out, int64_t ldo) {
  const int64_t nb = K / QK;
#if defined(__AVX2__)
  // Two accumulators per activation row, even and odd blocks, so consecutive blocks' FMAs do not wait on
  // each other (at one row, a single chain is bound by FMA latency). Every tile width uses the same split,
  // so a row's sum is the same in any batch.
  __m256 acc[2][MR_];
  for (int r = 0; r < MR_; ++r) acc[0][r] = acc[1][r] = _mm256_setzero_ps();
  // w: block b's 32 weights as u8; wsign: q8's signs, moved onto the activations.
  auto block = [&](__m256i w, __m256i wsign, int64_t b) {
    const __m256 db = _mm256_set1_ps(wd[b]);
    __m256* a = acc[b & 1];
    for (int r = 0; r < MR_; ++r) {
      __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * K + b * QK));
      if constexpr (!Q4) x = _mm256_sign_epi8(x, wsign);
      const __m256 p = _mm256_cvtepi32_ps(dot_u8s8(w, x));
      a[r] = _mm256_fmadd_ps(p, _mm256_mul_ps(db, _mm256_broadcast_ss(xd + r * nb + b)), a[r]);
    }
  };
  if constexpr (Q4) {
    const __m256i low = _mm256_set1_epi8(0x0F);
    int64_t b = 0;
    for (; b + 1 < nb; b += 2) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq + b * (QK / 2)));
      block(_mm256_and_si256(raw, low), low, b);
      block(_mm256_and_si256(_mm256_srli_epi16(raw, 4), low), low, b + 1);
    }
    if (b < nb) block(expand_q4(wq + b * (QK / 2)), low, b);
  } else {
    for (int64_t b = 0; b < nb; ++b) {
      const __m256i wsign = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq + b * QK));
      block(_mm256_sign_epi8(wsign, wsign), wsign, b);  // |w|
    }
  }
  for (int r = 0; r < MR_; ++r) {
    __m256 sum = _mm256_add_ps(acc[0][r], acc[1][r]);
    if (wm != nullptr) {  // the offsets' term, sum over blocks of m * xs, eight blocks at a time
      const float* xr = xs + r * nb;
      int64_t b = 0;
      for (; b + 8 <= nb; b += 8) sum = _mm256_fmadd_ps(_mm256_loadu_ps(wm + b), _mm256_loadu_ps(xr + b), sum);
      float tail = 0.f;
      for (; b < nb; ++b) tail += wm[b] * xr[b];
      out[r * ldo] = hsum(sum) + tail;
    } else {
      out[r * ldo] = hsum(sum);
    }
  }
#else
  for (int r = 0; r < MR_; ++r) {
    float y = 0.f;
    for (int64_t b = 0; b < nb; ++b) {
      const int8_t* x = xq + r * K + b * QK;
      int32_t dot = 0;
      if constexpr (Q4) {
        if (b + 1 < nb || nb % 2 == 0) {  // a pair: this block's nibble of each of the pair's 32 bytes
          const uint8_t* p = wq + (b & ~int64_t(1)) * (QK / 2);
          const int shift = (b & 1) ? 4 : 0;
          for (int64_t j = 0; j < QK; ++j) dot += ((p[j] >> shift) & 0x0F) * x[j];
        } else {  // an odd last block, in GGUF order
          const uint8_t* p = wq + b * (QK / 2);
          for (int64_t j = 0; j < QK / 2; ++j) dot += (p[j] & 0x0F) * x[j] + (p[j] >> 4) * x[j + QK / 2];
        }
      } else {
        const int8_t* p = reinterpret_cast<const int8_t*>(wq) + b * QK;
        for (int64_t j = 0; j < QK; ++j) dot += p[j] * x[j];
      }
      y += wd[b] * xd[r * nb + b] * static_cast<float>(dot);
      if (wm != nullptr) y += wm[b] * xs[r * nb + b];
    }
    out[r * ldo] = y;
  }
#endif
}

template <bool Q4, typename S>
void gemm(const uint8_t* wq, const S* wd, const S* wm, const int8_t* xq, const float* xd, const float* xs,
          int64_t M, int64_t N, int64_t K, float* out) {
  const int64_t nb = K / QK;
  const int64_t row_bytes = Q4 ? K / 2 : K;
  // Enough rows per task that a thread's share is a long run of contiguous weights.
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> dbuf, mbuf;
    if constexpr (!std::is_same_v<S, float>) dbuf.resize(nb), mbuf.resize(nb);
    for (int64_t n = begin; n < end; ++n) {
      const uint8_t* w = wq + n * row_bytes;
      const float* d;
      const float* off = nullptr;
      if constexpr (std::is_same_v<S, float>) {
        d = wd + n * nb;
        if (wm != nullptr) off = wm + n * nb;
      } else {
        widen(wd + n * nb, dbuf.data(), nb);
        d = dbuf.data();
        if (wm != nullptr) widen(wm + n * nb, mbuf.data(), nb), off = mbuf.data();
      }
      int64_t m0 = 0;
      for (; m0 + MR <= M; m0 += MR)
        row_tile<Q4, MR>(w, d, off, xq + m0 * K, xd + m0 * nb, xs + m0 * nb, K, out + m0 * N + n, N);
      switch (M - m0) {
        case 3: row_tile<Q4, 3>(w, d, off, xq + m0 * K, xd + m0 * nb, xs + m0 * nb, K, out + m0 * N + n, N); break;
        case 2: row_tile<Q4, 2>(w, d, off, xq + m0 * K, xd + m0 * nb, xs + m0 * nb, K, out + m0 * N + n, N); break;
        case 1: row_tile<Q4, 1>(w, d, off, xq + m0 * K, xd + m0 * nb, xs + m0 * nb, K, out + m0 * N + n, N); break;
        default: break;
      }
    }
  });
}

void check_weights(const torch::Tensor& qs, const torch::Tensor& d, int64_t K, bool q4) {
  TORCH_CHECK(K % QK == 0, "input columns must be a multiple of 32, got ", K);
  TORCH_CHECK(qs.is_contiguous() && d.is_contiguous(), "weights must be contiguous");
  TORCH_CHECK(qs.scalar_type() == (q4 ? at::kByte : at::kChar), q4 ? "q4 values must be uint8" : "q8 values must be int8");
  TORCH_CHECK(qs.size(1) == (q4 ? K / 2 : K), "weight columns do not match the input");
  TORCH_CHECK((d.scalar_type() == at::kFloat || d.scalar_type() == at::kHalf) && d.size(0) == qs.size(0) &&
              d.size(1) == K / QK, "scales must be float32 or float16 [N, K/32]");
}

// m: per-block offsets like d (same dtype), or an empty tensor for none (q8 only).
torch::Tensor run(const torch::Tensor& x_in, const torch::Tensor& qs, const torch::Tensor& d, const torch::Tensor& m,
                  bool q4) {
  TORCH_CHECK(x_in.dim() == 2, "x must be [M, K]");
  const int64_t M = x_in.size(0), K = x_in.size(1), N = qs.size(0);
  check_weights(qs, d, K, q4);
  const bool has_m = m.numel() > 0;
  TORCH_CHECK(has_m || !q4, "q4 needs its offsets m");
  if (has_m) TORCH_CHECK(m.sizes() == d.sizes() && m.scalar_type() == d.scalar_type() && m.is_contiguous(),
                         "offsets must be like the scales (shape and dtype)");
  const auto x = x_in.to(at::kFloat).contiguous();
  auto out = torch::empty({M, N}, x.options());
  if (M == 0) return out;
  std::vector<int8_t> xq(M * K);
  std::vector<float> xd(M * K / QK), xs(M * K / QK);
  quantize_rows(x.data_ptr<float>(), M, K, xq.data(), xd.data(), xs.data());
  const auto* w = reinterpret_cast<const uint8_t*>(qs.data_ptr());
  auto go = [&](auto* dp, auto* mp) {
    if (q4)
      gemm<true>(w, dp, mp, xq.data(), xd.data(), xs.data(), M, N, K, out.data_ptr<float>());
    else
      gemm<false>(w, dp, mp, xq.data(), xd.data(), xs.data(), M, N, K, out.data_ptr<float>());
  };
  if (d.scalar_type() == at::kHalf) {
    const auto* dp = reinterpret_cast<const uint16_t*>(d.data_ptr());
    go(dp, has_m ? reinterpret_cast<const uint16_t*>(m.data_ptr()) : static_cast<const uint16_t*>(nullptr));
  } else {
    go(d.data_ptr<float>(), has_m ? m.data_ptr<float>() : static_cast<const float*>(nullptr));
  }
  return out;
}

}  // namespace

torch::Tensor q4_linear(torch::Tensor x, torch::Tensor qs, torch::Tensor d, torch::Tensor m) {
  return run(x, qs, d, m, true);
}

torch::Tensor q8_linear(torch::Tensor x, torch::Tensor qs, torch::Tensor d, torch::Tensor m) {
  return run(x, qs, d, m, false);
}

// The activation quantizer alone, for tests: x [M, K] -> (xq int8 [M, K], xd [M, K/32], xs [M, K/32]).
std::vector<torch::Tensor> quantize_activations(torch::Tensor x_in) {
  const auto x = x_in.to(at::kFloat).contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % QK == 0, "columns must be a multiple of 32");
  auto xq = torch::empty({M, K}, x.options().dtype(at::kChar));
  auto xd = torch::empty({M, K / QK}, x.options());
  auto xs = torch::empty({M, K / QK}, x.options());
  quantize_rows(x.data_ptr<float>(), M, K, xq.data_ptr<int8_t>(), xd.data_ptr<float>(), xs.data_ptr<float>());
  return {xq, xd, xs};
}

std::string isa() {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return "avx512-vnni";
#elif defined(__AVXVNNI__)
  return "avx-vnni";
#elif defined(__AVX2__)
  return "avx2";
#else
  return "scalar";
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("q4_linear", &q4_linear, "x [M,K] float -> [M,N] float32 over q4 blocks (w = d*q + m), int8 activations");
  mod.def("q8_linear", &q8_linear, "x [M,K] float -> [M,N] float32 over q8 blocks (w = d*q (+ m), m may be empty), int8 activations");
  mod.def("quantize_activations", &quantize_activations, "x -> (int8 values, scales, scale * sums) per block of 32");
  mod.def("isa", &isa, "the instruction set this build's dot products use");
}
