// Decode attention straight from the paged KV cache: one query token per sequence.
// Reads each KV row once (no gathered copy), online softmax in float32, OpenMP over
// (sequence, kv head). Query heads that share a KV head are handled together, so GQA
// costs no extra reads.
// The cache holds the model dtype (kv_t = scalar_t, no scales), float16 beside a float32 model (half the
// bytes to read; widened exactly on load), or int8 with one float32
// scale per token per KV head (ks/vs [blocks, bs, Hkv]): a score is scale_k * dot(q, k_int8) and a
// token's probability is multiplied by scale_v before it weights v_int8, so nothing is dequantized
// into a buffer.
// A sliding window (window > 0) limits a row of KV length len to its last `window` tokens, positions
// len - window .. len - 1 (Hugging Face's sliding_window: keys closer than `window` to the query).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

template <typename T>
static inline float to_f(T x) { return static_cast<float>(x); }

static inline int64_t first_key(int64_t len, int64_t window) { return window > 0 ? std::max<int64_t>(0, len - window) : 0; }

template <typename scalar_t, typename kv_t>
static void decode_kernel(const scalar_t* q, const kv_t* kc, const kv_t* vc, const float* ks, const float* vs,
                          const int64_t* tables, const int64_t* lens, scalar_t* out, int64_t B, int64_t H,
                          int64_t Hkv, int64_t D, int64_t bs, int64_t max_blocks, float scale, int64_t window) {
  const int64_t G = H / Hkv;
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), m(G), l(G), s(G * bs), kv(D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hkv, h = task % Hkv;
      const int64_t len = lens[b], first = first_key(len, window);
      for (int64_t g = 0; g < G; ++g) {
        const scalar_t* qp = q + (b * H + h * G + g) * D;
        for (int64_t d = 0; d < D; ++d) qf[g * D + d] = to_f(qp[d]) * scale;
        m[g] = -std::numeric_limits<float>::infinity();
        l[g] = 0.f;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      const int64_t nblk = (len + bs - 1) / bs;
      for (int64_t blk = first / bs; blk < nblk; ++blk) {
        const int64_t block = tables[b * max_blocks + blk];
        const int64_t n = std::min(bs, len - blk * bs);
        const int64_t t0 = std::max<int64_t>(0, first - blk * bs);  // tokens before the window
        // Scores of this block's tokens for every query head of the group.
        for (int64_t t = t0; t < n; ++t) {
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
          for (int64_t t = t0; t < n; ++t) bmax = std::max(bmax, s[g * bs + t]);
          const float corr = std::exp(m[g] - bmax);
          l[g] *= corr;
          float* ag = acc.data() + g * D;
          for (int64_t d = 0; d < D; ++d) ag[d] *= corr;
          for (int64_t t = t0; t < n; ++t) {
            const float p = std::exp(s[g * bs + t] - bmax);
            s[g * bs + t] = p;
            l[g] += p;
          }
          m[g] = bmax;
        }
        for (int64_t t = t0; t < n; ++t) {
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


#if defined(__AVX512F__) || defined(__AVX2__)
#include "simd.h"

// A row of the next block (and its scale) towards L2, asked for from inside the loop over this block's tokens:
// one row per token computed, so the memory system sees a steady trickle of requests the compute hides. A
// sequence's blocks lie anywhere in the pool, so the hardware prefetcher cannot run ahead across them. (The
// whole next block asked for at once, ~200 lines in a burst, was mostly lost: batch-64 float16 attention on the
// Zen 4 runs 1.5x faster this way; benchmarks/attention_ab.py, BENCHMARKS.md.) A hint: changes no result.
template <int D, typename kv_t>
static inline void prefetch_row(const kv_t* row, const float* scale) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t o = 0; o < D * static_cast<int64_t>(sizeof(kv_t)); o += 64) _mm_prefetch(p + o, _MM_HINT_T1);
  if (scale != nullptr) _mm_prefetch(reinterpret_cast<const char*>(scale), _MM_HINT_T1);
}

// Scores of one block's n tokens for NG query heads that share a KV head: qv holds the heads' query vectors
// (V each), s their score rows (stride bs); K row t of the block is kc + (row0 + t * Hkv) * D. Each key row is
// loaded (and, from int8, widened) once for the NG heads. Per head and token the arithmetic is the same
// whatever NG is: two partial sums (even and odd vectors, halving the chain of dependent FMAs), added, summed
// across lanes, times the token's scale.
// next: the row index of the same KV head's token 0 in the block after this one (-1: none, or another call
// asks for it); that block's rows are prefetched one per token, all bs of them however many this block has.
template <int V, int NG, typename kv_t>
static inline void scores(const vf* qv, float* s, int64_t bs, const kv_t* kc, const float* ks, int64_t row0,
                          int64_t Hkv, int64_t n, int64_t next) {
  constexpr int64_t D = V * W;
  vf q[NG][V];
  for (int g = 0; g < NG; ++g)
    for (int v = 0; v < V; ++v) q[g][v] = qv[g * V + v];
  for (int64_t t = 0; t < n; ++t) {
    const int64_t row = row0 + t * Hkv;
    const kv_t* kp = kc + row * D;
    if (next >= 0) prefetch_row<D>(kc + (next + t * Hkv) * D, ks ? ks + next + t * Hkv : nullptr);
    vf k[V];
    for (int v = 0; v < V; ++v) k[v] = vload(kp + W * v);
    const float scale = ks ? ks[row] : 1.f;
    for (int g = 0; g < NG; ++g) {
      vf dot0 = vmul(q[g][0], k[0]), dot1 = vmul(q[g][1], k[1]);
      for (int v = 2; v < V; v += 2) {
        dot0 = vfma(q[g][v], k[v], dot0);
        dot1 = vfma(q[g][v + 1], k[v + 1], dot1);
      }
      s[g * bs + t] = vsum(vadd(dot0, dot1)) * scale;
    }
  }
  if (next >= 0)
    for (int64_t t = std::max<int64_t>(n, 0); t < bs; ++t)
      prefetch_row<D>(kc + (next + t * Hkv) * D, ks ? ks + next + t * Hkv : nullptr);
}

// acc (V per head) += p * v over one block's n tokens in token order, for NG query heads sharing a KV head,
// each value row loaded once for them.
template <int V, int NG, typename kv_t>
static inline void values(vf* acc, const float* s, int64_t bs, const kv_t* vc, const float* vs, int64_t row0,
                          int64_t Hkv, int64_t n, int64_t next) {
  constexpr int64_t D = V * W;
  vf a[NG][V];
  for (int g = 0; g < NG; ++g)
    for (int v = 0; v < V; ++v) a[g][v] = acc[g * V + v];
  for (int64_t t = 0; t < n; ++t) {
    const int64_t row = row0 + t * Hkv;
    const kv_t* vp = vc + row * D;
    if (next >= 0) prefetch_row<D>(vc + (next + t * Hkv) * D, vs ? vs + next + t * Hkv : nullptr);
    vf x[V];
    for (int v = 0; v < V; ++v) x[v] = vload(vp + W * v);
    const float scale = vs ? vs[row] : 1.f;
    for (int g = 0; g < NG; ++g) {
      const vf p = vset1(s[g * bs + t] * scale);
      for (int v = 0; v < V; ++v) a[g][v] = vfma(p, x[v], a[g][v]);
    }
  }
  for (int g = 0; g < NG; ++g)
    for (int v = 0; v < V; ++v) acc[g * V + v] = a[g][v];
  if (next >= 0)
    for (int64_t t = std::max<int64_t>(n, 0); t < bs; ++t)
      prefetch_row<D>(vc + (next + t * Hkv) * D, vs ? vs + next + t * Hkv : nullptr);
}

// Calls f(first head, std::integral_constant<int, k>) over the query heads [qa, qb) that share a KV head, k at a
// time: as many as the registers hold beside the loaded row (32 vectors with AVX-512, 16 with AVX2).
template <int V, typename F>
static inline void by_heads(int64_t qa, int64_t qb, F&& f) {
#if defined(__AVX512F__)
  constexpr int64_t regs = 32;
#else
  constexpr int64_t regs = 16;
#endif
  constexpr int64_t most = std::max<int64_t>(1, std::min<int64_t>(4, (regs - V) / V));
  for (int64_t g = qa; g < qb;) {
    const int64_t k = std::min(qb - g, most);
    switch (k) {
      case 4: f(g, std::integral_constant<int, 4>{}); break;
      case 3: f(g, std::integral_constant<int, 3>{}); break;
      case 2: f(g, std::integral_constant<int, 2>{}); break;
      default: f(g, std::integral_constant<int, 1>{}); break;
    }
    g += k;
  }
}

// SIMD path for head sizes that are a multiple of W (64, 128 and Gemma's 256 cover the supported models).
// Per block of tokens: scores for every query head of the group, one max/exp pass, then the
// probability-weighted V rows accumulated in registers.
// Consecutive rows with the same block table (a prompt chunk's positions, a verified draft) run as one task
// of up to R rows, so each K/V row is loaded once for all of them. Every row still runs exactly the
// instructions it would run alone (its own length, the same order over tokens and heads), so its result
// does not depend on the rows it was grouped with.
template <typename scalar_t, typename kv_t, int D>
static void decode_simd(const scalar_t* q, const kv_t* kc, const kv_t* vc, const float* ks, const float* vs,
                        const int64_t* tables, const int64_t* lens, scalar_t* out, int64_t B, int64_t H,
                        int64_t Hkv, int64_t bs, int64_t max_blocks, float scale, int64_t window) {
  constexpr int V = D / W;
  constexpr int64_t R = 8;
  const int64_t G = H / Hkv;
  std::vector<int64_t> run_start;
  for (int64_t b = 0; b < B;) {
    int64_t e = b + 1;
    while (e < B && e - b < R &&
           std::memcmp(tables + b * max_blocks, tables + e * max_blocks, sizeof(int64_t) * max_blocks) == 0)
      ++e;
    run_start.push_back(b);
    b = e;
  }
  const int64_t runs = static_cast<int64_t>(run_start.size());
  run_start.push_back(B);
  // One task per run reads each of its KV rows (all heads, contiguous) once; with fewer runs than threads,
  // split the heads across tasks instead. (Splitting further, by query head, was measured no faster: each
  // KV head is then read once per query head.)
  const int64_t splits = runs >= 2 * at::get_num_threads() ? 1 : Hkv;
  const int64_t q_per = H / splits;
  at::parallel_for(0, runs * splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<vf> qv(R * H * V), acc(R * H * V);
    std::vector<float> m(R * H), l(R * H), s(R * H * bs), tmp(D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t run = task / splits, q0 = (task % splits) * q_per, q1 = q0 + q_per;  // query heads
      const int64_t h0 = q0 / G, h1 = (q1 - 1) / G + 1;  // and the KV heads they read
      const int64_t b0 = run_start[run], nr = run_start[run + 1] - b0;
      int64_t max_len = 0, min_first = std::numeric_limits<int64_t>::max();
      for (int64_t r = 0; r < nr; ++r) {
        max_len = std::max(max_len, lens[b0 + r]);
        min_first = std::min(min_first, first_key(lens[b0 + r], window));
        for (int64_t qh = q0; qh < q1; ++qh) {
          const int64_t i = r * H + qh;
          const scalar_t* qp = q + ((b0 + r) * H + qh) * D;
          for (int d = 0; d < D; ++d) tmp[d] = static_cast<float>(qp[d]) * scale;
          for (int v = 0; v < V; ++v) {
            qv[i * V + v] = vload(tmp.data() + W * v);
            acc[i * V + v] = vzero();
          }
          m[i] = -std::numeric_limits<float>::infinity();
          l[i] = 0.f;
        }
      }
      const int64_t* table = tables + b0 * max_blocks;
      const int64_t nblk = (max_len + bs - 1) / bs;
      for (int64_t blk = min_first / bs; blk < nblk; ++blk) {
        const int64_t block = table[blk];
        const int64_t next_block = blk + 1 < nblk ? table[blk + 1] : -1;
        auto tokens_of = [&](int64_t r) { return std::min(bs, lens[b0 + r] - blk * bs); };  // <= 0: none
        // the row's tokens of this block before its window, skipped (>= tokens_of: none left)
        auto skipped_of = [&](int64_t r) { return std::max<int64_t>(0, first_key(lens[b0 + r], window) - blk * bs); };
        // Scores: the query vectors of a KV head's query heads held in registers against the block's keys,
        // each key row loaded (and, from int8, widened) once for all of them.
        for (int64_t h = h0; h < h1; ++h) {
          const int64_t qa = std::max(h * G, q0), qb = std::min((h + 1) * G, q1);
          for (int64_t r = 0; r < nr; ++r) {
            const int64_t t0 = skipped_of(r);
            // the next block's rows of head h, asked for once: by the first row of the run and its first heads
            const int64_t next = next_block >= 0 && r == 0 ? next_block * bs * Hkv + h : -1;
            by_heads<V>(qa, qb, [&](int64_t qh, auto ng) {
              scores<V, decltype(ng)::value>(qv.data() + (r * H + qh) * V, s.data() + (r * H + qh) * bs + t0, bs,
                                             kc, ks, (block * bs + t0) * Hkv + h, Hkv, tokens_of(r) - t0,
                                             qh == qa ? next : -1);
            });
          }
        }
        for (int64_t r = 0; r < nr; ++r) {
          const int64_t t0 = skipped_of(r), n = tokens_of(r) - t0;  // the row's tokens of this block
          if (n <= 0) continue;
          for (int64_t qh = q0; qh < q1; ++qh) {
            const int64_t i = r * H + qh;
            float* sq = s.data() + i * bs + t0;
            float bmax = m[i];  // a max is exact in any order: vectorized
            int64_t t = 0;
            if (n >= W) {
              vf mv = vload(sq);
              for (t = W; t + W <= n; t += W) mv = vmax(mv, vload(sq + t));
              bmax = std::max(bmax, vhmax(mv));
            }
            for (; t < n; ++t) bmax = std::max(bmax, sq[t]);
            const float corr = std::exp(m[i] - bmax);
            l[i] *= corr;
            const vf c = vset1(corr);
            for (int v = 0; v < V; ++v) acc[i * V + v] = vmul(acc[i * V + v], c);
            const vf mx = vset1(bmax);
            vf sum = vzero();
            int64_t t0 = 0;
            for (; t0 + W <= n; t0 += W) {
              const vf e = vexp(vsub(vload(sq + t0), mx));
              vstore(sq + t0, e);
              sum = vadd(sum, e);
            }
            float tail = 0.f;
            for (; t0 < n; ++t0) tail += (sq[t0] = std::exp(sq[t0] - bmax));
            l[i] += vsum(sum) + tail;
            m[i] = bmax;
          }
        }
        // Values: the accumulators of a KV head's query heads in registers over the block's tokens, in token
        // order, each value row loaded once for all of them.
        for (int64_t h = h0; h < h1; ++h) {
          const int64_t qa = std::max(h * G, q0), qb = std::min((h + 1) * G, q1);
          for (int64_t r = 0; r < nr; ++r) {
            const int64_t t0 = skipped_of(r);
            const int64_t next = next_block >= 0 && r == 0 ? next_block * bs * Hkv + h : -1;
            by_heads<V>(qa, qb, [&](int64_t qh, auto ng) {
              values<V, decltype(ng)::value>(acc.data() + (r * H + qh) * V, s.data() + (r * H + qh) * bs + t0, bs,
                                             vc, vs, (block * bs + t0) * Hkv + h, Hkv, tokens_of(r) - t0,
                                             qh == qa ? next : -1);
            });
          }
        }
      }
      for (int64_t r = 0; r < nr; ++r) {
        for (int64_t qh = q0; qh < q1; ++qh) {
          const int64_t i = r * H + qh;
          scalar_t* op = out + ((b0 + r) * H + qh) * D;
          const vf inv = vset1(l[i] > 0.f ? 1.f / l[i] : 0.f);
          for (int v = 0; v < V; ++v) vstore(tmp.data() + W * v, vmul(acc[i * V + v], inv));
          for (int d = 0; d < D; ++d) op[d] = static_cast<scalar_t>(tmp[d]);
        }
      }
    }
  });
}

template <typename scalar_t, typename kv_t>
static bool try_fast(const scalar_t* q, const kv_t* kc, const kv_t* vc, const float* ks, const float* vs,
                     const int64_t* tables, const int64_t* lens, scalar_t* out, int64_t B, int64_t H, int64_t Hkv,
                     int64_t D, int64_t bs, int64_t max_blocks, float scale, int64_t window) {
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>) {
    if (D == 64) {
      decode_simd<scalar_t, kv_t, 64>(q, kc, vc, ks, vs, tables, lens, out, B, H, Hkv, bs, max_blocks, scale, window);
      return true;
    }
    if (D == 128) {
      decode_simd<scalar_t, kv_t, 128>(q, kc, vc, ks, vs, tables, lens, out, B, H, Hkv, bs, max_blocks, scale, window);
      return true;
    }
    if (D == 256) {  // Gemma 3
      decode_simd<scalar_t, kv_t, 256>(q, kc, vc, ks, vs, tables, lens, out, B, H, Hkv, bs, max_blocks, scale, window);
      return true;
    }
  }
  return false;
}
#else
template <typename scalar_t, typename kv_t>
static bool try_fast(const scalar_t*, const kv_t*, const kv_t*, const float*, const float*, const int64_t*,
                     const int64_t*, scalar_t*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, float, int64_t) {
  return false;
}
#endif

// Shared driver: kv_t is scalar_t (plain cache), c10::Half (float16 cache, float32 q) or int8_t (with scales).
template <typename scalar_t, typename kv_t>
static void run_decode(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                       const float* ks, const float* vs, const torch::Tensor& tables, const torch::Tensor& lens,
                       torch::Tensor& out, double scale, int64_t window) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t bs = k_cache.size(1), Hkv = k_cache.size(2);
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const kv_t* kp = k_cache.data_ptr<kv_t>();
  const kv_t* vp = v_cache.data_ptr<kv_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  if (try_fast<scalar_t, kv_t>(qp, kp, vp, ks, vs, tp, lp, op, B, H, Hkv, D, bs, tables.size(1),
                               static_cast<float>(scale), window))
    return;
  decode_kernel<scalar_t, kv_t>(qp, kp, vp, ks, vs, tp, lp, op, B, H, Hkv, D, bs, tables.size(1),
                                static_cast<float>(scale), window);
}

static void check_shapes(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4, "q [B,H,D], cache [blocks,bs,Hkv,D]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "KV caches must be contiguous");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0 && k_cache.size(3) == q.size(2), "head shapes do not match");
}

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor block_tables, torch::Tensor ctx_lens, double scale, int64_t window) {
  const bool half_cache = q.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kHalf;
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() || half_cache,
              "the cache must hold q's dtype (or float16 beside float32 q)");
  TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type(), "K and V caches' dtypes differ");
  check_shapes(q, k_cache, v_cache);
  q = q.contiguous();
  auto tables = block_tables.to(torch::kLong).contiguous();
  auto lens = ctx_lens.to(torch::kLong).contiguous();
  auto out = torch::empty_like(q);
  if (half_cache) {
    run_decode<float, c10::Half>(q, k_cache, v_cache, nullptr, nullptr, tables, lens, out, scale, window);
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode", [&] {
    run_decode<scalar_t, scalar_t>(q, k_cache, v_cache, nullptr, nullptr, tables, lens, out, scale, window);
  });
  return out;
}

torch::Tensor paged_decode_int8(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor k_scale,
                                torch::Tensor v_scale, torch::Tensor block_tables, torch::Tensor ctx_lens,
                                double scale, int64_t window) {
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
                                 tables, lens, out, scale, window);
  });
  return out;
}
