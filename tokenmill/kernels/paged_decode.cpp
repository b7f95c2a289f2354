// Decode attention straight from the paged KV cache: one query token per sequence.
// Reads each KV row once (no gathered copy), online softmax in float32, OpenMP over
// (sequence, kv head). Query heads that share a KV head are handled together, so GQA
// costs no extra reads.
// The cache holds either the model dtype (kv_t = scalar_t, no scales) or int8 with one float32
// scale per token per KV head (ks/vs [blocks, bs, Hkv]): a score is scale_k * dot(q, k_int8) and a
// token's probability is multiplied by scale_v before it weights v_int8, so nothing is dequantized
// into a buffer.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

template <typename T>
static inline float to_f(T x) { return static_cast<float>(x); }

template <typename scalar_t, typename kv_t>
static void decode_kernel(const scalar_t* q, const kv_t* kc, const kv_t* vc, const float* ks, const float* vs,
                          const int64_t* tables, const int64_t* lens, scalar_t* out, int64_t B, int64_t H,
                          int64_t Hkv, int64_t D, int64_t bs, int64_t max_blocks, float scale) {
  const int64_t G = H / Hkv;
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), m(G), l(G), s(G * bs), kv(D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hkv, h = task % Hkv;
      const int64_t len = lens[b];
      for (int64_t g = 0; g < G; ++g) {
        const scalar_t* qp = q + (b * H + h * G + g) * D;
        for (int64_t d = 0; d < D; ++d) qf[g * D + d] = to_f(qp[d]) * scale;
        m[g] = -std::numeric_limits<float>::infinity();
        l[g] = 0.f;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      const int64_t nblk = (len + bs - 1) / bs;
      for (int64_t blk = 0; blk < nblk; ++blk) {
        const int64_t block = tables[b * max_blocks + blk];
        const int64_t n = std::min(bs, len - blk * bs);
        // Scores of this block's tokens for every query head of the group.
        for (int64_t t = 0; t < n; ++t) {
          const int64_t row = (block * bs + t) * Hkv + h;
          const kv_t* kp = kc + row * D;
          const float kscale = ks ? ks[row] : 1.f;
          for (int64_t d = 0; d < D; ++d) kv[d] = to_f(kp[d]);
          for (int64_t g = 0; g < G; ++g) {
            const float* qg = qf.data() + g * D;
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < D; ++d) dot += qg[d] * kv[d];
            s[g * bs + t] = dot * kscale;
          }
        }
        for (int64_t g = 0; g < G; ++g) {
          float bmax = m[g];
          for (int64_t t = 0; t < n; ++t) bmax = std::max(bmax, s[g * bs + t]);
          const float corr = std::exp(m[g] - bmax);
          l[g] *= corr;
          float* ag = acc.data() + g * D;
          for (int64_t d = 0; d < D; ++d) ag[d] *= corr;
          for (int64_t t = 0; t < n; ++t) {
            const float p = std::exp(s[g * bs + t] - bmax);
            s[g * bs + t] = p;
            l[g] += p;
          }
          m[g] = bmax;
        }
        for (int64_t t = 0; t < n; ++t) {
          const int64_t row = (block * bs + t) * Hkv + h;
          const kv_t* vp = vc + row * D;
          const float vscale = vs ? vs[row] : 1.f;
          for (int64_t d = 0; d < D; ++d) kv[d] = to_f(vp[d]);
          for (int64_t g = 0; g < G; ++g) {
            const float p = s[g * bs + t] * vscale;
            float* ag = acc.data() + g * D;
            for (int64_t d = 0; d < D; ++d) ag[d] += p * kv[d];
          }
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        scalar_t* op = out + (b * H + h * G + g) * D;
        const float inv = l[g] > 0.f ? 1.f / l[g] : 0.f;
        for (int64_t d = 0; d < D; ++d) op[d] = static_cast<scalar_t>(acc[g * D + d] * inv);
      }
    }
  });
}


#if defined(__AVX512F__)
#include <immintrin.h>

static inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load16(const c10::BFloat16* p) {
  // bfloat16 is the top half of a float32: widen and shift.
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
static inline __m512 load16(const int8_t* p) {
  // 16 int8 -> sign-extended int32 -> float.
  __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw));
}

// exp for 16 floats: 2^(x*log2 e) split into an integer power (scalef) and a degree-6 polynomial on
// [-ln2/2, ln2/2]; relative error ~1e-7, well under float32 attention's own rounding. -inf gives 0.
static inline __m512 exp16(__m512 x) {
  const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
  const __m512 ln2_hi = _mm512_set1_ps(0.693359375f), ln2_lo = _mm512_set1_ps(-2.12194440e-4f);
  x = _mm512_max_ps(x, _mm512_set1_ps(-88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, ln2_hi, x);
  r = _mm512_fnmadd_ps(n, ln2_lo, r);
  __m512 p = _mm512_set1_ps(1.3981999507e-3f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// AVX-512 path for head sizes that are a multiple of 16 (64 and 128 cover the supported models).
// Per block of tokens: scores for every query head of the group, one max/exp pass, then the
// probability-weighted V rows accumulated in registers.
template <typename scalar_t, typename kv_t, int D>
static void decode_avx512(const scalar_t* q, const kv_t* kc, const kv_t* vc, const float* ks, const float* vs,
                          const int64_t* tables, const int64_t* lens, scalar_t* out, int64_t B, int64_t H,
                          int64_t Hkv, int64_t bs, int64_t max_blocks, float scale) {
  constexpr int V = D / 16;
  const int64_t G = H / Hkv;
  // One task per sequence reads each of its KV rows (all heads, contiguous) exactly once; with fewer
  // sequences than threads, split the heads across tasks instead.
  const int64_t splits = B >= 2 * at::get_num_threads() ? 1 : Hkv;
  const int64_t heads_per = Hkv / splits;
  at::parallel_for(0, B * splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<__m512> qv(H * V), acc(H * V);
    std::vector<float> m(H), l(H), s(H * bs), tmp(D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / splits, h0 = (task % splits) * heads_per, h1 = h0 + heads_per;
      const int64_t len = lens[b];
      for (int64_t qh = h0 * G; qh < h1 * G; ++qh) {
        const scalar_t* qp = q + (b * H + qh) * D;
        for (int d = 0; d < D; ++d) tmp[d] = static_cast<float>(qp[d]) * scale;
        for (int v = 0; v < V; ++v) {
          qv[qh * V + v] = _mm512_loadu_ps(tmp.data() + 16 * v);
          acc[qh * V + v] = _mm512_setzero_ps();
        }
        m[qh] = -std::numeric_limits<float>::infinity();
        l[qh] = 0.f;
      }
      const int64_t nblk = (len + bs - 1) / bs;
      for (int64_t blk = 0; blk < nblk; ++blk) {
        const int64_t block = tables[b * max_blocks + blk];
        const int64_t n = std::min(bs, len - blk * bs);
        for (int64_t t = 0; t < n; ++t) {
          for (int64_t h = h0; h < h1; ++h) {
            const int64_t row = (block * bs + t) * Hkv + h;
            const kv_t* kp = kc + row * D;
            const float kscale = ks ? ks[row] : 1.f;
            __m512 k[V];
            for (int v = 0; v < V; ++v) k[v] = load16(kp + 16 * v);
            for (int64_t qh = h * G; qh < (h + 1) * G; ++qh) {
              __m512 dot = _mm512_mul_ps(qv[qh * V], k[0]);
              for (int v = 1; v < V; ++v) dot = _mm512_fmadd_ps(qv[qh * V + v], k[v], dot);
              s[qh * bs + t] = _mm512_reduce_add_ps(dot) * kscale;
            }
          }
        }
        for (int64_t qh = h0 * G; qh < h1 * G; ++qh) {
          float* sq = s.data() + qh * bs;
          float bmax = m[qh];
          for (int64_t t = 0; t < n; ++t) bmax = std::max(bmax, sq[t]);
          const float corr = std::exp(m[qh] - bmax);
          l[qh] *= corr;
          const __m512 c = _mm512_set1_ps(corr);
          for (int v = 0; v < V; ++v) acc[qh * V + v] = _mm512_mul_ps(acc[qh * V + v], c);
          const __m512 mx = _mm512_set1_ps(bmax);
          __m512 sum = _mm512_setzero_ps();
          for (int64_t t0 = 0; t0 < n; t0 += 16) {
            const __mmask16 mask = static_cast<__mmask16>(n - t0 >= 16 ? 0xFFFF : (1u << (n - t0)) - 1);
            const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, sq + t0), mx));
            _mm512_mask_storeu_ps(sq + t0, mask, e);
            sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(mask, e));
          }
          l[qh] += _mm512_reduce_add_ps(sum);
          m[qh] = bmax;
        }
        for (int64_t t = 0; t < n; ++t) {
          for (int64_t h = h0; h < h1; ++h) {
            const int64_t row = (block * bs + t) * Hkv + h;
            const kv_t* vp = vc + row * D;
            const float vscale = vs ? vs[row] : 1.f;
            __m512 vv[V];
            for (int v = 0; v < V; ++v) vv[v] = load16(vp + 16 * v);
            for (int64_t qh = h * G; qh < (h + 1) * G; ++qh) {
              const __m512 p = _mm512_set1_ps(s[qh * bs + t] * vscale);
              for (int v = 0; v < V; ++v) acc[qh * V + v] = _mm512_fmadd_ps(p, vv[v], acc[qh * V + v]);
            }
          }
        }
      }
      for (int64_t qh = h0 * G; qh < h1 * G; ++qh) {
        scalar_t* op = out + (b * H + qh) * D;
        const __m512 inv = _mm512_set1_ps(l[qh] > 0.f ? 1.f / l[qh] : 0.f);
        for (int v = 0; v < V; ++v) _mm512_storeu_ps(tmp.data() + 16 * v, _mm512_mul_ps(acc[qh * V + v], inv));
        for (int d = 0; d < D; ++d) op[d] = static_cast<scalar_t>(tmp[d]);
      }
    }
  });
}

template <typename scalar_t, typename kv_t>
static bool try_fast(const scalar_t* q, const kv_t* kc, const kv_t* vc, const float* ks, const float* vs,
                     const int64_t* tables, const int64_t* lens, scalar_t* out, int64_t B, int64_t H, int64_t Hkv,
                     int64_t D, int64_t bs, int64_t max_blocks, float scale) {
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>) {
    if (D == 64) {
      decode_avx512<scalar_t, kv_t, 64>(q, kc, vc, ks, vs, tables, lens, out, B, H, Hkv, bs, max_blocks, scale);
      return true;
    }
    if (D == 128) {
      decode_avx512<scalar_t, kv_t, 128>(q, kc, vc, ks, vs, tables, lens, out, B, H, Hkv, bs, max_blocks, scale);
      return true;
    }
  }
  return false;
}
#else
template <typename scalar_t, typename kv_t>
static bool try_fast(const scalar_t*, const kv_t*, const kv_t*, const float*, const float*, const int64_t*,
                     const int64_t*, scalar_t*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, float) {
  return false;
}
#endif

// Shared driver: kv_t is scalar_t (plain cache) or int8_t (with scales).
template <typename scalar_t, typename kv_t>
static void run_decode(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                       const float* ks, const float* vs, const torch::Tensor& tables, const torch::Tensor& lens,
                       torch::Tensor& out, double scale) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t bs = k_cache.size(1), Hkv = k_cache.size(2);
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const kv_t* kp = k_cache.data_ptr<kv_t>();
  const kv_t* vp = v_cache.data_ptr<kv_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  if (try_fast<scalar_t, kv_t>(qp, kp, vp, ks, vs, tp, lp, op, B, H, Hkv, D, bs, tables.size(1),
                               static_cast<float>(scale)))
    return;
  decode_kernel<scalar_t, kv_t>(qp, kp, vp, ks, vs, tp, lp, op, B, H, Hkv, D, bs, tables.size(1),
                                static_cast<float>(scale));
}

static void check_shapes(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4, "q [B,H,D], cache [blocks,bs,Hkv,D]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "KV caches must be contiguous");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0 && k_cache.size(3) == q.size(2), "head shapes do not match");
}

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor block_tables, torch::Tensor ctx_lens, double scale) {
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type(), "q and cache dtypes differ");
  check_shapes(q, k_cache, v_cache);
  q = q.contiguous();
  auto tables = block_tables.to(torch::kLong).contiguous();
  auto lens = ctx_lens.to(torch::kLong).contiguous();
  auto out = torch::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode", [&] {
    run_decode<scalar_t, scalar_t>(q, k_cache, v_cache, nullptr, nullptr, tables, lens, out, scale);
  });
  return out;
}

torch::Tensor paged_decode_int8(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor k_scale,
                                torch::Tensor v_scale, torch::Tensor block_tables, torch::Tensor ctx_lens,
                                double scale) {
  TORCH_CHECK(k_cache.scalar_type() == at::kChar && v_cache.scalar_type() == at::kChar, "int8 caches expected");
  TORCH_CHECK(k_scale.scalar_type() == at::kFloat && v_scale.scalar_type() == at::kFloat, "float32 scales expected");
  TORCH_CHECK(k_scale.is_contiguous() && v_scale.is_contiguous(), "scales must be contiguous");
  TORCH_CHECK(k_scale.numel() == k_cache.numel() / k_cache.size(3) && v_scale.numel() == k_scale.numel(),
              "one scale per token per KV head expected");
  check_shapes(q, k_cache, v_cache);
  q = q.contiguous();
  auto tables = block_tables.to(torch::kLong).contiguous();
  auto lens = ctx_lens.to(torch::kLong).contiguous();
  auto out = torch::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_int8", [&] {
    run_decode<scalar_t, int8_t>(q, k_cache, v_cache, k_scale.data_ptr<float>(), v_scale.data_ptr<float>(),
                                 tables, lens, out, scale);
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "decode attention over a paged KV cache");
  m.def("paged_decode_int8", &paged_decode_int8, "decode attention over an int8 paged KV cache with scales");
}
