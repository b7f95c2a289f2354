// Linear layers over blocks of 32 weights with activations quantized to int8 per block of 32 (W4A8, W8A8).
//
// Weights (rows N, input columns K, K a multiple of 32), one block = 32 consecutive inputs of one row, rows in
// groups of GR (8 on AVX2, 16 with AVX-512: one row per 32-bit lane of the build's vector; N padded with zero
// rows to a multiple of GR), interleaved so that one vector lane is one row:
//   q4: qs uint8 [N/GR, K/32, 16 GR], where byte 4 GR u + 4r + i of (group g, block b) holds weight 8u + i of
//       row GR g + r's block b in its low nibble and weight 8u + 4 + i in its high nibble.
//       d, m [N/GR, K/32, GR] likewise (one row per lane). w = d * q + m, q in 0..15, the shipped values
//       (tokenmill/quant/block.py repacks GGUF's Q4_0/Q4_1 into this order without requantizing).
//   q8: qs int8 [N/GR, K/32, 32 GR], where byte 4 GR u + 4r + i of (group g, block b) holds weight 4u + i of
//       row GR g + r's block b; d (and optional m) [N/GR, K/32, GR]; w = d * q (+ m).
//   Scales are float32 or float16: GGUF ships float16 scales, and float16 -> float32 is exact.
// Activations x [M, K] float32 are quantized once per call: per block, xd = max|x| / 127 and
// xq = round-to-nearest-even(x / xd) in [-127, 127]; xs = xd * sum(xq) carries the block's sum for the m term.
// Then y[m, n] = sum over blocks b of d[n,b] * xd[m,b] * dot(q[n,b], xq[m,b]) (+ m[n,b] * xs[m,b]) with the
// integer dot exact in int32: only the activations' rounding and float summation order differ from a dense
// float matmul. An activation row's result never depends on the other rows of the call (the same
// instructions run for it at any M), so a position computes the same in any batch.
//
// Why the interleave: with one row per lane, a block's GR row dots come out of one vector with no
// horizontal sums, an activation's 4-byte group is broadcast once for GR rows, and GR rows' scales are one
// load: about half the instructions per weight of a row-at-a-time dot, which is what batch 1 is bound by.
//
// Built per ISA (tokenmill/kernels/cpu.py): AVX2 uses maddubs (+ madd), or dpbusd with AVX-VNNI; AVX-512 VNNI
// runs 16-row groups on 512-bit vectors; without AVX2 a scalar loop runs. Each row's integer dots and float
// fmas are the same in every build, so a row's result does not depend on the ISA either.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t QK = 32;
// Rows per interleaved group (q4 and q8): one row per 32-bit lane of the build's integer vector; and the
// activation rows run together against one group's weights, held in registers once for all of them. With
// AVX-512's 32 registers 8 rows fit beside the weights: each weight block is unpacked once per 8 rows, and a
// call of 8 rows (an expert's share of a batch) reads its weights in one pass, streaming from memory while
// it computes, instead of a pass from memory and another from cache.
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
constexpr int64_t GR = 16;
constexpr int MR = 8;
#else
constexpr int64_t GR = 8;
constexpr int MR = 4;
#endif
// Weights are read once per call, in order: software prefetch this far ahead. At batch 1 a layer's calls are
// short (a thread's share of a 960-row matrix is ~170 KB), and the hardware prefetcher would spend part of
// each one finding the stream: measured on the AVX2 machine, 4 KB ahead made the 30 layers' calls ~15 % faster.
constexpr int64_t PREFETCH_BYTES = 4096;

template <typename T>
inline void prefetch(const T* p) { __builtin_prefetch(p, 0, 3); }  // a hint: never faults, even past the end

inline float half_to_float(uint16_t h) { return static_cast<float>(c10::Half(h, c10::Half::from_bits())); }
inline float scalar(float v) { return v; }
inline float scalar(uint16_t h) { return half_to_float(h); }

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

#if defined(__AVX2__)
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

// Four activation bytes broadcast to every 32-bit lane, read straight from the activations: copying a block
// to the stack first and broadcasting from there stalls on store-to-load forwarding (a 32-byte store read
// back 4 bytes at a time), which cost the batched kernels about half their speed.
inline __m256i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}
inline __m256 load8(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// u8 x s8 in fours, added to 8 x int32.
inline __m256i dot4_acc(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// ---- AVX-512 VNNI: the same per-row arithmetic on groups of 16 rows -------------------------------------
// One 512-bit vector holds 16 rows' 4-byte groups; the integer dots are exact and each row's float
// accumulation runs the same fmas in the same order as the 8-lane AVX2 code, so a row's result is the
// same bit for bit whichever build computed it.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512i bcast4_512(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

template <int MR_, typename S>
void q4_group(const uint8_t* wq, const S* wd, const S* wm, const int8_t* xq, const float* xd, const float* xs,
              int64_t K, float* out, int64_t ldo, int64_t valid) {
  const int64_t nb = K / QK;
  alignas(64) float res[MR_][GR];
  __m512 acc[MR_], accm[MR_];
  for (int r = 0; r < MR_; ++r) acc[r] = accm[r] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* wb = wq + b * GR * 16;
    for (int64_t line = 0; line < GR * 16; line += 64) prefetch(wb + PREFETCH_BYTES + line);
    constexpr int64_t ahead = PREFETCH_BYTES / (GR * 16);  // blocks
    prefetch(wd + (b + ahead) * GR);
    if (wm != nullptr) prefetch(wm + (b + ahead) * GR);
    __m512i w[8];  // w[2u]: weights 8u..8u+3 of each row, w[2u + 1]: 8u+4..8u+7
    for (int u = 0; u < 4; ++u) {
      const __m512i raw = _mm512_loadu_si512(wb + 64 * u);
      w[2 * u] = _mm512_and_si512(raw, low);
      w[2 * u + 1] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);
    }
    const __m512 d = load16(wd + b * GR);
    const __m512 m = wm != nullptr ? load16(wm + b * GR) : _mm512_setzero_ps();
    for (int r = 0; r < MR_; ++r) {
      const int8_t* x = xq + r * K + b * QK;
      __m512i s = _mm512_setzero_si512();
      for (int t = 0; t < 8; ++t) s = _mm512_dpbusd_epi32(s, w[t], bcast4_512(x + 4 * t));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(d, _mm512_set1_ps(xd[r * nb + b])), acc[r]);
      if (wm != nullptr) accm[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(xs[r * nb + b]), accm[r]);
    }
  }
  for (int r = 0; r < MR_; ++r) _mm512_store_ps(res[r], _mm512_add_ps(acc[r], accm[r]));
  for (int r = 0; r < MR_; ++r) std::memcpy(out + r * ldo, res[r], sizeof(float) * valid);
}

// dpbusd multiplies unsigned by signed bytes, and AVX-512 has no byte sign-flip: the activations go in as
// x + 128 (unsigned) and 128 * sum(w), one more dpbusd per weight vector shared by every activation row,
// comes off again. Both sums are exact in int32, so the dot is the same integer as AVX2's.
template <int MR_, typename S>
void q8_group(const int8_t* wq, const S* wd, const S* wm, const int8_t* xq, const float* xd, const float* xs,
              int64_t K, float* out, int64_t ldo, int64_t valid) {
  const int64_t nb = K / QK;
  alignas(64) float res[MR_][GR];
  __m512 acc[MR_], accm[MR_];
  for (int r = 0; r < MR_; ++r) acc[r] = accm[r] = _mm512_setzero_ps();
  const __m512i bias = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t b = 0; b < nb; ++b) {
    const int8_t* wb = wq + b * GR * QK;
    for (int64_t line = 0; line < GR * QK; line += 64) prefetch(wb + PREFETCH_BYTES + line);
    constexpr int64_t ahead = PREFETCH_BYTES / (GR * QK);  // blocks
    prefetch(wd + (b + ahead) * GR);
    if (wm != nullptr) prefetch(wm + (b + ahead) * GR);
    __m512i w[8];  // w[u]: weights 4u..4u+3 of each row
    __m512i wsum = _mm512_setzero_si512();
    for (int u = 0; u < 8; ++u) {
      w[u] = _mm512_loadu_si512(wb + 64 * u);
      wsum = _mm512_dpbusd_epi32(wsum, bias, w[u]);
    }
    const __m512 d = load16(wd + b * GR);
    const __m512 m = wm != nullptr ? load16(wm + b * GR) : _mm512_setzero_ps();
    for (int r = 0; r < MR_; ++r) {
      const int8_t* x = xq + r * K + b * QK;
      __m512i s = _mm512_setzero_si512();
      for (int u = 0; u < 8; ++u) s = _mm512_dpbusd_epi32(s, _mm512_xor_si512(bcast4_512(x + 4 * u), bias), w[u]);
      s = _mm512_sub_epi32(s, wsum);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(d, _mm512_set1_ps(xd[r * nb + b])), acc[r]);
      if (wm != nullptr) accm[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(xs[r * nb + b]), accm[r]);
    }
  }
  for (int r = 0; r < MR_; ++r) _mm512_store_ps(res[r], _mm512_add_ps(acc[r], accm[r]));
  for (int r = 0; r < MR_; ++r) std::memcpy(out + r * ldo, res[r], sizeof(float) * valid);
}
#else
// ---- q4: one group of GR interleaved rows against MR_ activation rows -----------------------------------
template <int MR_, typename S>
void q4_group(const uint8_t* wq, const S* wd, const S* wm, const int8_t* xq, const float* xd, const float* xs,
              int64_t K, float* out, int64_t ldo, int64_t valid) {
  const int64_t nb = K / QK;
  float res[MR_][GR];
#if defined(__AVX2__)
  __m256 acc[MR_], accm[MR_];
  for (int r = 0; r < MR_; ++r) acc[r] = accm[r] = _mm256_setzero_ps();
  const __m256i low = _mm256_set1_epi8(0x0F);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* wb = wq + b * GR * 16;
    prefetch(wb + PREFETCH_BYTES);
    prefetch(wb + PREFETCH_BYTES + 64);
    constexpr int64_t ahead = PREFETCH_BYTES / (GR * 16);  // blocks
    prefetch(wd + (b + ahead) * GR);
    if (wm != nullptr) prefetch(wm + (b + ahead) * GR);
    __m256i w[8];  // w[2u]: weights 8u..8u+3 of each row, w[2u + 1]: 8u+4..8u+7
    for (int u = 0; u < 4; ++u) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 32 * u));
      w[2 * u] = _mm256_and_si256(raw, low);
      w[2 * u + 1] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
    }
    const __m256 d = load8(wd + b * GR);
    const __m256 m = wm != nullptr ? load8(wm + b * GR) : _mm256_setzero_ps();
    for (int r = 0; r < MR_; ++r) {
      const int8_t* x = xq + r * K + b * QK;
#if (defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__)
      __m256i s = _mm256_setzero_si256();
      for (int t = 0; t < 8; ++t) s = dot4_acc(s, w[t], bcast4(x + 4 * t));
#else
      // maddubs pairs stay within int16 (2 * 15 * 127), and so do eight of them added (30480 < 32767):
      // one madd per block instead of one per four weights.
      __m256i s16 = _mm256_maddubs_epi16(w[0], bcast4(x));
      for (int t = 1; t < 8; ++t) s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(w[t], bcast4(x + 4 * t)));
      const __m256i s = _mm256_madd_epi16(s16, _mm256_set1_epi16(1));
#endif
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(d, _mm256_set1_ps(xd[r * nb + b])), acc[r]);
      if (wm != nullptr) accm[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(xs[r * nb + b]), accm[r]);
    }
  }
  for (int r = 0; r < MR_; ++r) _mm256_storeu_ps(res[r], _mm256_add_ps(acc[r], accm[r]));
#else
  for (int r = 0; r < MR_; ++r) {
    for (int64_t lane = 0; lane < GR; ++lane) {
      float y = 0.f, ym = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* wb = wq + b * GR * 16;
        const int8_t* x = xq + r * K + b * QK;
        int32_t dot = 0;
        for (int u = 0; u < 4; ++u) {
          for (int i = 0; i < 4; ++i) {
            const uint8_t byte = wb[32 * u + 4 * lane + i];
            dot += (byte & 0x0F) * x[8 * u + i] + (byte >> 4) * x[8 * u + 4 + i];
          }
        }
        y += static_cast<float>(dot) * (scalar(wd[b * GR + lane]) * xd[r * nb + b]);
        if (wm != nullptr) ym += scalar(wm[b * GR + lane]) * xs[r * nb + b];
      }
      res[r][lane] = y + ym;
    }
  }
#endif
  for (int r = 0; r < MR_; ++r) std::memcpy(out + r * ldo, res[r], sizeof(float) * valid);
}

// ---- q8: one group of GR interleaved rows against MR_ activation rows -----------------------------------
// Signs moved onto the activations so maddubs sees |w| as u8: a pair's sum stays within int16 (2 * 128 * 127),
// but two pairs' would not, so each four-weight dot is widened to int32 at once (madd).
template <int MR_, typename S>
void q8_group(const int8_t* wq, const S* wd, const S* wm, const int8_t* xq, const float* xd, const float* xs,
              int64_t K, float* out, int64_t ldo, int64_t valid) {
  const int64_t nb = K / QK;
  float res[MR_][GR];
#if defined(__AVX2__)
  __m256 acc[MR_], accm[MR_];
  for (int r = 0; r < MR_; ++r) acc[r] = accm[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const int8_t* wb = wq + b * GR * QK;
    for (int64_t line = 0; line < GR * QK; line += 64) prefetch(wb + PREFETCH_BYTES + line);
    constexpr int64_t ahead = PREFETCH_BYTES / (GR * QK);  // blocks
    prefetch(wd + (b + ahead) * GR);
    if (wm != nullptr) prefetch(wm + (b + ahead) * GR);
    __m256i w[8], wabs[8];  // w[u]: weights 4u..4u+3 of each row
    for (int u = 0; u < 8; ++u) {
      w[u] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 32 * u));
      wabs[u] = _mm256_sign_epi8(w[u], w[u]);
    }
    const __m256 d = load8(wd + b * GR);
    const __m256 m = wm != nullptr ? load8(wm + b * GR) : _mm256_setzero_ps();
    for (int r = 0; r < MR_; ++r) {
      const int8_t* x = xq + r * K + b * QK;
      __m256i s = _mm256_setzero_si256();
      for (int u = 0; u < 8; ++u) s = dot4_acc(s, wabs[u], _mm256_sign_epi8(bcast4(x + 4 * u), w[u]));
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(d, _mm256_set1_ps(xd[r * nb + b])), acc[r]);
      if (wm != nullptr) accm[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(xs[r * nb + b]), accm[r]);
    }
  }
  for (int r = 0; r < MR_; ++r) _mm256_storeu_ps(res[r], _mm256_add_ps(acc[r], accm[r]));
#else
  for (int r = 0; r < MR_; ++r) {
    for (int64_t lane = 0; lane < GR; ++lane) {
      float y = 0.f, ym = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        const int8_t* wb = wq + b * GR * QK;
        const int8_t* x = xq + r * K + b * QK;
        int32_t dot = 0;
        for (int u = 0; u < 8; ++u)
          for (int i = 0; i < 4; ++i) dot += wb[32 * u + 4 * lane + i] * x[4 * u + i];
        y += static_cast<float>(dot) * (scalar(wd[b * GR + lane]) * xd[r * nb + b]);
        if (wm != nullptr) ym += scalar(wm[b * GR + lane]) * xs[r * nb + b];
      }
      res[r][lane] = y + ym;
    }
  }
#endif
  for (int r = 0; r < MR_; ++r) std::memcpy(out + r * ldo, res[r], sizeof(float) * valid);
}

#endif  // AVX-512 VNNI

// f(integral_constant<int, rows>) for 1 <= rows <= R: the remainder of a call's rows, with a kernel sized for it.
template <int R, typename F>
inline void with_rows(int64_t rows, F&& f) {
  if constexpr (R >= 1) {
    if (rows == R) return f(std::integral_constant<int, R>{});
    with_rows<R - 1>(rows, std::forward<F>(f));
  }
}

// One matrix's weights as the kernels read them (m null: none, q8 only).
template <typename S>
struct Weights {
  const void* qs;
  const S* d;
  const S* m;
};

// Group g of a matrix (GR rows) against M activation rows, MR at a time: the same instructions for a row
// whatever the others are. Q8: q8 (int8 values) or q4 (packed nibbles).
template <bool Q8, typename S>
void run_group(const Weights<S>& wt, int64_t g, const int8_t* xq, const float* xd, const float* xs, int64_t M,
               int64_t N, int64_t K, float* out) {
  using W = std::conditional_t<Q8, int8_t, uint8_t>;
  const int64_t nb = K / QK, group_bytes = nb * GR * (Q8 ? QK : QK / 2);
  const W* w = static_cast<const W*>(wt.qs) + g * group_bytes;
  const S* d = wt.d + g * nb * GR;
  const S* off = wt.m != nullptr ? wt.m + g * nb * GR : nullptr;
  const int64_t valid = std::min(GR, N - g * GR);
  auto group = [&](auto mr, int64_t m0) {
    constexpr int R = decltype(mr)::value;
    if constexpr (Q8)
      q8_group<R>(w, d, off, xq + m0 * K, xd + m0 * nb, xs + m0 * nb, K, out + m0 * N + g * GR, N, valid);
    else
      q4_group<R>(w, d, off, xq + m0 * K, xd + m0 * nb, xs + m0 * nb, K, out + m0 * N + g * GR, N, valid);
  };
  int64_t m0 = 0;
  for (; m0 + MR <= M; m0 += MR) group(std::integral_constant<int, MR>{}, m0);
  if (m0 < M) with_rows<MR - 1>(M - m0, [&](auto mr) { group(mr, m0); });
}

// Matrix e against rows [start[e], start[e] + counts[e]) of the activations (counts[e] == 0: not run), every
// matrix N x K, all in one parallel region. The work items, (matrix, group of GR rows), are split across the
// threads by cost (its rows, plus one for reading its weights), so one call with many matrices of few rows
// each (an MoE layer's experts over a step's tokens) pays one fork and keeps both threads busy.
template <bool Q8, typename S>
void gemm(const std::vector<Weights<S>>& mats, const std::vector<int64_t>& counts, const int8_t* xq,
          const float* xd, const float* xs, int64_t N, int64_t K, float* out) {
  const int64_t nb = K / QK, groups = (N + GR - 1) / GR, E = static_cast<int64_t>(mats.size());
  std::vector<int64_t> start(E + 1, 0), cost(E + 1, 0);  // rows before matrix e; cost of the items before it
  for (int64_t e = 0; e < E; ++e) {
    start[e + 1] = start[e] + counts[e];
    cost[e + 1] = cost[e] + (counts[e] > 0 ? groups * (counts[e] + 1) : 0);
  }
  auto run_items = [&](int64_t lo, int64_t hi) {  // items whose cost-weighted position falls in [lo, hi)
    for (int64_t e = 0; e < E; ++e) {
      if (counts[e] == 0 || cost[e + 1] <= lo || cost[e] >= hi) continue;
      const int64_t per = counts[e] + 1, r0 = start[e];
      // group g sits at cost[e] + g * per; take the groups starting inside [lo, hi)
      const int64_t g0 = std::max<int64_t>(0, (lo - cost[e] + per - 1) / per);
      const int64_t g1 = std::min(groups, (hi - cost[e] + per - 1) / per);
      for (int64_t g = g0; g < g1; ++g)
        run_group<Q8>(mats[e], g, xq + r0 * K, xd + r0 * nb, xs + r0 * nb, counts[e], N, K, out + r0 * N);
    }
  };
  if (E == 1) {  // one matrix: split its groups evenly (two at least per task)
    at::parallel_for(0, groups, 2, [&](int64_t b, int64_t e) { run_items(b * (counts[0] + 1), e * (counts[0] + 1)); });
    return;
  }
  const int64_t total = cost[E], threads = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(1, total / 2));
  at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) run_items(total * t / threads, total * (t + 1) / threads);
  });
}

void check_weights(const torch::Tensor& qs, const torch::Tensor& d, const torch::Tensor& m, int64_t N, int64_t K,
                   bool q4, at::ScalarType scales) {
  const int64_t nb = K / QK, rows = (N + GR - 1) / GR * GR;
  TORCH_CHECK(qs.is_contiguous() && d.is_contiguous(), "weights must be contiguous");
  TORCH_CHECK(qs.scalar_type() == (q4 ? at::kByte : at::kChar), q4 ? "q4 values must be uint8" : "q8 values must be int8");
  TORCH_CHECK(qs.numel() == rows * (q4 ? K / 2 : K), "weight values do not match the input and output sizes");
  TORCH_CHECK((d.scalar_type() == at::kFloat || d.scalar_type() == at::kHalf) && d.numel() == rows * nb,
              "scales must be float32 or float16, one per block");
  TORCH_CHECK(d.scalar_type() == scales, "every matrix of a call has scales of one dtype");
  const bool has_m = m.numel() > 0;
  TORCH_CHECK(has_m || !q4, "q4 needs its offsets m");
  if (has_m) TORCH_CHECK(m.sizes() == d.sizes() && m.scalar_type() == d.scalar_type() && m.is_contiguous(),
                         "offsets must be like the scales (shape and dtype)");
}

// x [M, K] against matrices (qs[e], d[e], m[e]), each N x K: rows [start_e, start_e + counts[e]) against matrix
// e, where start_e is the rows of the matrices before it. m: per-block offsets like d (same shape and dtype),
// or an empty tensor for none (q8 only). N: the output count (q4's groups may hold zero rows of padding).
torch::Tensor run_many(const torch::Tensor& x_in, const std::vector<int64_t>& counts, const std::vector<torch::Tensor>& qs,
                       const std::vector<torch::Tensor>& d, const std::vector<torch::Tensor>& m, int64_t N, bool q4) {
  TORCH_CHECK(x_in.dim() == 2, "x must be [M, K]");
  const int64_t M = x_in.size(0), K = x_in.size(1), E = static_cast<int64_t>(counts.size());
  TORCH_CHECK(K % QK == 0, "input columns must be a multiple of 32, got ", K);
  TORCH_CHECK(E > 0 && static_cast<int64_t>(qs.size()) == E && static_cast<int64_t>(d.size()) == E &&
              static_cast<int64_t>(m.size()) == E, "one (qs, d, m) per count");
  int64_t rows = 0, first = -1;  // first: a matrix with rows (one without is never read, its tensors unchecked)
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK(counts[e] >= 0, "row counts must not be negative");
    rows += counts[e];
    if (counts[e] == 0) continue;
    if (first < 0) first = e;
    check_weights(qs[e], d[e], m[e], N, K, q4, d[first].scalar_type());
  }
  TORCH_CHECK(rows == M, "the counts add up to ", rows, " rows, x has ", M);
  const int64_t nb = K / QK;
  const auto x = x_in.to(at::kFloat).contiguous();
  auto out = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  std::vector<int8_t> xq(M * K);
  std::vector<float> xd(M * nb), xs(M * nb);
  quantize_rows(x.data_ptr<float>(), M, K, xq.data(), xd.data(), xs.data());
  auto go = [&](auto tag) {
    using S = decltype(tag);
    std::vector<Weights<S>> mats(E);
    for (int64_t e = 0; e < E; ++e) {
      if (counts[e] == 0) continue;
      mats[e] = {qs[e].data_ptr(), reinterpret_cast<const S*>(d[e].data_ptr()),
                 m[e].numel() > 0 ? reinterpret_cast<const S*>(m[e].data_ptr()) : nullptr};
    }
    if (q4)
      gemm<false, S>(mats, counts, xq.data(), xd.data(), xs.data(), N, K, out.data_ptr<float>());
    else
      gemm<true, S>(mats, counts, xq.data(), xd.data(), xs.data(), N, K, out.data_ptr<float>());
  };
  if (d[first].scalar_type() == at::kHalf)
    go(uint16_t{});
  else
    go(float{});
  return out;
}

torch::Tensor run(const torch::Tensor& x, const torch::Tensor& qs, const torch::Tensor& d, const torch::Tensor& m,
                  int64_t N, bool q4) {
  TORCH_CHECK(x.dim() == 2, "x must be [M, K]");
  return run_many(x, {x.size(0)}, {qs}, {d}, {m}, N, q4);
}

}  // namespace

torch::Tensor q4_linear(torch::Tensor x, torch::Tensor qs, torch::Tensor d, torch::Tensor m, int64_t n) {
  return run(x, qs, d, m, n, true);
}

torch::Tensor q8_linear(torch::Tensor x, torch::Tensor qs, torch::Tensor d, torch::Tensor m, int64_t n) {
  return run(x, qs, d, m, n, false);
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

// Several matrices in one call: x's rows in runs, run e (counts[e] rows) against matrix e (one MoE layer's
// experts over the step's rows sorted by expert).
torch::Tensor q4_linear_many(torch::Tensor x, std::vector<int64_t> counts, std::vector<torch::Tensor> qs,
                             std::vector<torch::Tensor> d, std::vector<torch::Tensor> m, int64_t n) {
  return run_many(x, counts, qs, d, m, n, true);
}

torch::Tensor q8_linear_many(torch::Tensor x, std::vector<int64_t> counts, std::vector<torch::Tensor> qs,
                             std::vector<torch::Tensor> d, std::vector<torch::Tensor> m, int64_t n) {
  return run_many(x, counts, qs, d, m, n, false);
}

int64_t group_rows() { return GR; }

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
