// Decode attention straight from the paged KV cache: one query token per sequence.
// Reads each KV row once (no gathered copy), online softmax in float32, OpenMP over
// (sequence, kv head). Query heads that share a KV head are handled together, so GQA
// costs no extra reads.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <limits>
#include <vector>

template <typename T>
static inline float to_f(T x) { return static_cast<float>(x); }

template <typename scalar_t>
static void decode_kernel(const scalar_t* q, const scalar_t* kc, const scalar_t* vc, const int64_t* tables,
                          const int64_t* lens, scalar_t* out, int64_t B, int64_t H, int64_t Hkv, int64_t D,
                          int64_t bs, int64_t max_blocks, float scale) {
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
          const scalar_t* kp = kc + ((block * bs + t) * Hkv + h) * D;
          for (int64_t d = 0; d < D; ++d) kv[d] = to_f(kp[d]);
          for (int64_t g = 0; g < G; ++g) {
            const float* qg = qf.data() + g * D;
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < D; ++d) dot += qg[d] * kv[d];
            s[g * bs + t] = dot;
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
          const scalar_t* vp = vc + ((block * bs + t) * Hkv + h) * D;
          for (int64_t d = 0; d < D; ++d) kv[d] = to_f(vp[d]);
          for (int64_t g = 0; g < G; ++g) {
            const float p = s[g * bs + t];
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

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor block_tables, torch::Tensor ctx_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4, "q [B,H,D], cache [blocks,bs,Hkv,D]");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type(), "q and cache dtypes differ");
  q = q.contiguous();
  auto tables = block_tables.to(torch::kLong).contiguous();
  auto lens = ctx_lens.to(torch::kLong).contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t bs = k_cache.size(1), Hkv = k_cache.size(2);
  TORCH_CHECK(H % Hkv == 0 && k_cache.size(3) == D, "head shapes do not match");
  auto out = torch::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode", [&] {
    decode_kernel<scalar_t>(q.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
                            tables.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), B, H,
                            Hkv, D, bs, tables.size(1), static_cast<float>(scale));
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "decode attention over a paged KV cache");
}
