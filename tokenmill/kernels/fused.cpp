// Fused element-wise ops of a decoder layer: each replaces five to fifteen small aten ops (and their
// dispatch, ~2-5 us each) with one pass over the rows, parallel over tokens.
//   rms_norm:        y = x * rsqrt(mean(x^2) + eps) * w
//   add_rms_norm_:   residual += x (in place); y = rms_norm(residual)
//   rope_qkv_write:  q, k rotated (Hugging Face's rotate_half layout), k and v written into their KV slots
//                    (rounded on write into a float16 cache, quantized into an int8 one), rotated q returned:
//                    the qkv output is read once
//                    and no k/v copy is made
//   silu_mul:        y = silu(gate) * up over [gate | up] rows
//   apply_token_bitmask_: structured output's masks on the logits (not a layer op; it lives with them)
// Everything is computed in float32 (the row sum of squares too), so results match the eager float32
// formulas within rounding, not bit for bit: only the block-quantized fast path uses them.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <limits>
#include <optional>
#include <vector>
#if defined(__AVX512F__) || defined(__AVX2__)
#include "simd.h"
#endif

namespace {

template <typename T>
inline float f(T v) { return static_cast<float>(v); }

template <typename T>
void norm_row(const T* x, const T* w, T* y, int64_t H, float eps) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < H; ++i) ss += f(x[i]) * f(x[i]);
  const float r = 1.f / std::sqrt(ss / static_cast<float>(H) + eps);
  for (int64_t i = 0; i < H; ++i) y[i] = static_cast<T>(f(x[i]) * r * f(w[i]));
}

void check_rows(const torch::Tensor& x, const torch::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be contiguous [T, H]");
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(1) && w.scalar_type() == x.scalar_type(), "weight must be [H] in x's dtype");
}

}  // namespace

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  check_rows(x, w);
  auto y = torch::empty_like(x);
  const int64_t T = x.size(0), H = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rms_norm", [&] {
    const scalar_t *xp = x.data_ptr<scalar_t>(), *wp = w.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, T, 16, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) norm_row(xp + t * H, wp, yp + t * H, H, static_cast<float>(eps));
    });
  });
  return y;
}

torch::Tensor add_rms_norm_(torch::Tensor x, torch::Tensor residual, torch::Tensor w, double eps) {
  check_rows(x, w);
  TORCH_CHECK(residual.sizes() == x.sizes() && residual.is_contiguous() && residual.scalar_type() == x.scalar_type(),
              "residual must be like x");
  auto y = torch::empty_like(x);
  const int64_t T = x.size(0), H = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "add_rms_norm_", [&] {
    const scalar_t *xp = x.data_ptr<scalar_t>(), *wp = w.data_ptr<scalar_t>();
    scalar_t *rp = residual.data_ptr<scalar_t>(), *yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, T, 16, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        scalar_t* r = rp + t * H;
        for (int64_t i = 0; i < H; ++i) r[i] = static_cast<scalar_t>(f(r[i]) + f(xp[t * H + i]));
        norm_row(r, wp, yp + t * H, H, static_cast<float>(eps));
      }
    });
  });
  return y;
}

// One K or V row of a head into an int8 cache: s = max|x| / 127 (at least 1e-12), q = round-half-even(x / s)
// clamped to +-127; the formula of tokenmill/quant/kv.py's quantize_kv, bit for bit.
inline void quantize_kv_row(const float* x, int8_t* q, float* scale, int64_t D) {
  float amax = 0.f;
  for (int64_t i = 0; i < D; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float s = std::max(amax / 127.f, 1e-12f);
  for (int64_t i = 0; i < D; ++i) q[i] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, std::nearbyint(x[i] / s))));
  *scale = s;
}

// Into a float16 cache: round to nearest even, saturating at float16's largest finite value (an overflow
// would be an infinity, and a NaN in every score that reads it); NaN stays NaN. torch's clamp then .half().
inline c10::Half to_half_saturated(float x) {
  constexpr float most = 65504.f;
  return c10::Half(x > most ? most : (x < -most ? -most : x));
}

// qkv [T, (H + 2 Hkv) D]; cos/sin [max_pos, D] float32 (sin's first half negated, as RotaryEmbedding keeps
// them); caches [blocks, bs, Hkv, D] in qkv's dtype, float16 beside float32 qkv, or int8 with k_scale /
// v_scale [blocks, bs, Hkv] float32 (quantized on write); slots [T] -> q [T, H, D].
torch::Tensor rope_qkv_write(torch::Tensor qkv, torch::Tensor positions, torch::Tensor cos, torch::Tensor sin,
                             torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots, int64_t H,
                             int64_t Hkv, std::optional<torch::Tensor> k_scale, std::optional<torch::Tensor> v_scale) {
  const bool int8 = k_scale.has_value();
  const bool half_cache = !int8 && qkv.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kHalf;
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous(), "qkv must be contiguous [T, (H + 2 Hkv) D]");
  const auto cache_dtype = int8 ? at::kChar : (half_cache ? at::kHalf : qkv.scalar_type());
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.scalar_type() == cache_dtype &&
              v_cache.scalar_type() == cache_dtype,
              "caches must be contiguous, in qkv's dtype, float16 beside float32, or int8 with scales");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
              sin.is_contiguous(), "rope tables must be contiguous float32");
  const int64_t T = qkv.size(0), D = k_cache.size(3);
  TORCH_CHECK(qkv.size(1) == (H + 2 * Hkv) * D && k_cache.size(2) == Hkv && cos.size(1) == D, "shapes do not match");
  if (int8)
    TORCH_CHECK(v_scale.has_value() && k_scale->scalar_type() == at::kFloat && v_scale->scalar_type() == at::kFloat &&
                k_scale->is_contiguous() && v_scale->is_contiguous() &&
                k_scale->numel() == k_cache.numel() / D && v_scale->numel() == k_scale->numel(),
                "an int8 cache needs float32 scales, one per token per KV head");
  const auto pos = positions.to(at::kLong).contiguous();
  const auto sl = slots.to(at::kLong).contiguous();
  const int64_t* pp = pos.data_ptr<int64_t>();
  const int64_t* sp = sl.data_ptr<int64_t>();
  const int64_t max_pos = cos.size(0), nslots = k_cache.size(0) * k_cache.size(1);
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(pp[t] >= 0 && pp[t] < max_pos && sp[t] >= 0 && sp[t] < nslots, "position or slot out of range");
  auto q = torch::empty({T, H, D}, qkv.options());
  const int64_t half = D / 2;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, qkv.scalar_type(), "rope_qkv_write", [&] {
    const scalar_t* in = qkv.data_ptr<scalar_t>();
    scalar_t* qp = q.data_ptr<scalar_t>();
    const float *cp = cos.data_ptr<float>(), *snp = sin.data_ptr<float>();
    at::parallel_for(0, T, 4, [&](int64_t b, int64_t e) {
      std::vector<scalar_t> k_row(D);
      std::vector<float> row_f(D);
      for (int64_t t = b; t < e; ++t) {
        const scalar_t* row = in + t * (H + 2 * Hkv) * D;
        const float* c = cp + pp[t] * D;
        const float* s = snp + pp[t] * D;
        auto rotate = [&](const scalar_t* x, scalar_t* y) {
          for (int64_t i = 0; i < D; ++i) {
            const float sw = f(x[i < half ? i + half : i - half]);
            const float a = f(x[i]) * f(static_cast<scalar_t>(c[i]));
            y[i] = static_cast<scalar_t>(a + sw * f(static_cast<scalar_t>(s[i])));
          }
        };
        for (int64_t h = 0; h < H; ++h) rotate(row + h * D, qp + (t * H + h) * D);
        const scalar_t* v = row + (H + Hkv) * D;
        if (half_cache) {  // rotated in the model dtype (float32) as the eager path does, then rounded
          c10::Half* kd = k_cache.data_ptr<c10::Half>() + sp[t] * Hkv * D;
          c10::Half* vd = v_cache.data_ptr<c10::Half>() + sp[t] * Hkv * D;
          for (int64_t h = 0; h < Hkv; ++h) {
            rotate(row + (H + h) * D, k_row.data());
            for (int64_t i = 0; i < D; ++i) kd[h * D + i] = to_half_saturated(f(k_row[i]));
          }
          for (int64_t i = 0; i < Hkv * D; ++i) vd[i] = to_half_saturated(f(v[i]));
          continue;
        }
        if (!int8) {
          scalar_t* kd = k_cache.data_ptr<scalar_t>() + sp[t] * Hkv * D;
          scalar_t* vd = v_cache.data_ptr<scalar_t>() + sp[t] * Hkv * D;
          for (int64_t h = 0; h < Hkv; ++h) rotate(row + (H + h) * D, kd + h * D);
          for (int64_t i = 0; i < Hkv * D; ++i) vd[i] = v[i];
          continue;
        }
        int8_t* kd = k_cache.data_ptr<int8_t>() + sp[t] * Hkv * D;
        int8_t* vd = v_cache.data_ptr<int8_t>() + sp[t] * Hkv * D;
        float* ks = k_scale->data_ptr<float>() + sp[t] * Hkv;
        float* vs = v_scale->data_ptr<float>() + sp[t] * Hkv;
        for (int64_t h = 0; h < Hkv; ++h) {
          rotate(row + (H + h) * D, k_row.data());  // rounded to the model dtype first, as the eager path does
          for (int64_t i = 0; i < D; ++i) row_f[i] = f(k_row[i]);
          quantize_kv_row(row_f.data(), kd + h * D, ks + h, D);
          for (int64_t i = 0; i < D; ++i) row_f[i] = f(v[h * D + i]);
          quantize_kv_row(row_f.data(), vd + h * D, vs + h, D);
        }
      }
    });
  });
  return q;
}

// silu(g) * u over n float32s: g / (1 + exp(-g)) * u, W at a time with the polynomial exp (~1e-7 relative).
void silu_mul_f32(const float* g, const float* u, float* o, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
  const vf one = vset1(1.f), big = vset1(88.f);
  for (; i + W <= n; i += W) {
    const vf x = vload(g + i);
    const vf e = vexp(vmin(vsub(vzero(), x), big));
    vstore(o + i, vmul(vdiv(x, vadd(one, e)), vload(u + i)));
  }
#endif
  for (; i < n; ++i) o[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
}

torch::Tensor silu_mul(torch::Tensor gu) {
  TORCH_CHECK(gu.dim() == 2 && gu.is_contiguous() && gu.size(1) % 2 == 0, "gate_up must be contiguous [T, 2 I]");
  const int64_t T = gu.size(0), I = gu.size(1) / 2;
  auto y = torch::empty({T, I}, gu.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, gu.scalar_type(), "silu_mul", [&] {
    const scalar_t* in = gu.data_ptr<scalar_t>();
    scalar_t* out = y.data_ptr<scalar_t>();
    at::parallel_for(0, T, 4, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const scalar_t* g = in + t * 2 * I;
        const scalar_t* u = g + I;
        scalar_t* o = out + t * I;
        if constexpr (std::is_same_v<scalar_t, float>) {  // (the casts only make other types compile)
          silu_mul_f32(reinterpret_cast<const float*>(g), reinterpret_cast<const float*>(u), reinterpret_cast<float*>(o), I);
          continue;
        }
        for (int64_t i = 0; i < I; ++i) {
          const float x = f(g[i]);
          o[i] = static_cast<scalar_t>(x / (1.f + std::exp(-x)) * f(u[i]));
        }
      }
    });
  });
  return y;
}

// Structured output's token masks: logits[rows[i], j] = -inf unless bit j % 32 of mask[i, j / 32] is set
// (llguidance's layout); columns past the mask (a padded LM head) too. A mask is mostly whole words of ones
// (inside a string) or zeros (at a structural position): those skip the per-bit loop.
void apply_token_bitmask_(torch::Tensor logits, const torch::Tensor& mask, const torch::Tensor& rows) {
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1 && logits.scalar_type() == torch::kFloat,
              "logits must be float32 [N, V] with contiguous rows");
  TORCH_CHECK(mask.dim() == 2 && mask.is_contiguous() && mask.scalar_type() == torch::kInt, "mask must be int32 [R, W]");
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == torch::kLong && rows.size(0) == mask.size(0),
              "rows must be int64 [R]");
  const int64_t R = mask.size(0), W = mask.size(1), N = logits.size(0), V = logits.size(1), ld = logits.stride(0);
  const int64_t* rp = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < R; ++i) TORCH_CHECK(rp[i] >= 0 && rp[i] < N, "row ", rp[i], " out of range");
  float* L = logits.data_ptr<float>();
  const uint32_t* M = reinterpret_cast<const uint32_t*>(mask.data_ptr<int32_t>());
  const float ninf = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, R, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      float* row = L + rp[i] * ld;
      const uint32_t* m = M + i * W;
      for (int64_t w = 0; w < W && w * 32 < V; ++w) {
        const uint32_t bits = m[w];
        if (bits == 0xFFFFFFFFu) continue;
        const int64_t base = w * 32, n = std::min<int64_t>(32, V - base);
        if (bits == 0) {
          for (int64_t k = 0; k < n; ++k) row[base + k] = ninf;
          continue;
        }
        for (int64_t k = 0; k < n; ++k) row[base + k] = ((bits >> k) & 1u) ? row[base + k] : ninf;  // a blend
      }
      for (int64_t j = W * 32; j < V; ++j) row[j] = ninf;
    }
  });
}
