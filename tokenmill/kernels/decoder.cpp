// The whole forward pass of a Llama-family model on the native kernels, as one call per step.
//
// At batch 1 a layer's work is ten kernel calls of 2-30 us each; driven from Python, each also paid for the
// interpreter, argument parsing and a tensor wrapper: a tenth to a quarter of a decode step on the AVX2
// machine (benchmarks/step_breakdown.py). Here the same calls are made from C++ with the GIL released: the
// same kernels (block_linear.cpp, fused.cpp, paged_decode.cpp) on the same tensors in the same order, so
// every row comes out bit for bit as LlamaModel's Python loop computes it (tests/models/test_native_decoder.py
// holds the two together).
//
// Weights are shared with the Python model (tensors held by reference, no copy); the KV caches are handed
// over once. Only what this covers is built: block-quantized or float linear layers, a dense or
// mixture-of-experts MLP, q/k norms and clamping (Qwen3, OLMoE), a KV cache in the model dtype, float16 or
// int8, every query row on the paged kernel; or Gemma 3's layer (Gemma3Model's loop: norms around attention and MLP,
// GELU-tanh, sliding layers with their own rope and window, KV groups with their own block tables). Anything
// else stays on the Python path.
#include <algorithm>
#include <chrono>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <utility>

namespace tm_decoder {

// y = x W^T (+ bias): a block-quantized matrix on the block kernel, or a float one on torch's linear.
struct Linear {
  bool block = false, q4 = false;
  torch::Tensor qs, d, m, w, bias;  // block: qs, d, m (empty for none); float: w
  int64_t n = 0;
  at::ScalarType out_dtype = at::kFloat;

  torch::Tensor operator()(const torch::Tensor& x) const {
    if (!block) return bias.defined() ? at::linear(x, w, bias) : at::linear(x, w);
    torch::Tensor y = run(x, qs, d, m, n, q4);
    if (out_dtype != at::kFloat) y = y.to(out_dtype);
    return bias.defined() ? y + bias : y;
  }
};

Linear block_linear_spec(torch::Tensor qs, torch::Tensor d, torch::Tensor m, int64_t n, bool q4,
                         std::optional<torch::Tensor> bias, torch::Tensor dtype_like) {
  Linear l;
  l.block = true, l.q4 = q4, l.qs = qs, l.d = d, l.m = m, l.n = n, l.out_dtype = dtype_like.scalar_type();
  if (bias) l.bias = *bias;
  return l;
}

Linear float_linear_spec(torch::Tensor w, std::optional<torch::Tensor> bias) {
  Linear l;
  l.w = w, l.n = w.size(0), l.out_dtype = w.scalar_type();
  if (bias) l.bias = *bias;
  return l;
}

// An MoE router's choice for each row of logits [T, E] (float32): softmax (exp in expert order, summed in that
// order), the top k (the larger probability first, on a tie the lower expert), renormalised to sum 1 where
// the model says. models/moe.py routes with this same function wherever the native kernels load, so the
// native decoder and the Python path choose and weight alike, bit for bit.
void route_rows(const float* logits, int64_t T, int64_t E, int64_t k, bool renormalize, float* weights,
                int64_t* experts) {
  std::vector<float> p(E);
  std::vector<char> taken(E);
  for (int64_t t = 0; t < T; ++t) {
    const float* l = logits + t * E;
    float mx = l[0], sum = 0.f;
    for (int64_t e = 1; e < E; ++e) mx = std::max(mx, l[e]);
    for (int64_t e = 0; e < E; ++e) sum += (p[e] = std::exp(l[e] - mx));
    for (int64_t e = 0; e < E; ++e) p[e] = p[e] / sum;
    std::fill(taken.begin(), taken.end(), 0);
    float* w = weights + t * k;
    int64_t* x = experts + t * k;
    for (int64_t j = 0; j < k; ++j) {
      int64_t best = -1;
      for (int64_t e = 0; e < E; ++e)
        if (!taken[e] && (best < 0 || p[e] > p[best])) best = e;
      taken[best] = 1, x[j] = best, w[j] = p[best];
    }
    if (renormalize) {
      float s = 0.f;
      for (int64_t j = 0; j < k; ++j) s += w[j];
      for (int64_t j = 0; j < k; ++j) w[j] = w[j] / s;
    }
  }
}

// logits [T, E] float32 -> (weights [T, k] float32, experts [T, k] int64), as route_rows computes them.
std::vector<torch::Tensor> moe_route(const torch::Tensor& logits_in, int64_t k, bool renormalize) {
  TORCH_CHECK(logits_in.dim() == 2 && logits_in.scalar_type() == at::kFloat, "router logits must be [T, E] float32");
  const auto logits = logits_in.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1);
  TORCH_CHECK(k >= 1 && k <= E, "top k must be within 1..", E, ", got ", k);
  auto weights = torch::empty({T, k}, logits.options());
  auto experts = torch::empty({T, k}, logits.options().dtype(at::kLong));
  route_rows(logits.data_ptr<float>(), T, E, k, renormalize, weights.data_ptr<float>(), experts.data_ptr<int64_t>());
  return {weights, experts};
}

// out = ((y_0 w_0) + y_1 w_1) + ...: rows y_r (pointers, each n long) weighted and added in order, each
// product rounded before its sum, as the Python path's `y * w` then `out + y` or index_add (0 + a is a): never
// one fused multiply-add.
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
void weighted_row_sum(const float* const* y, const float* w, int64_t k, int64_t n, float* out) {
  for (int64_t j = 0; j < n; ++j) {
    float acc = y[0][j] * w[0];
    for (int64_t r = 1; r < k; ++r) {
      const float term = y[r][j] * w[r];
      acc = acc + term;
    }
    out[j] = acc;
  }
}

// Matrices of one shape and format run in one call: x's rows in runs, run e (counts[e] rows) against
// matrix e. Empty when they cannot (a float matrix, a bias, formats or scale dtypes that differ).
struct LinearGroup {
  std::vector<torch::Tensor> qs, d, m;
  int64_t n = 0;
  bool q4 = false;
  at::ScalarType out_dtype = at::kFloat;

  static LinearGroup of(const std::vector<Linear>& ls) {
    LinearGroup g;
    const Linear& a = ls.front();
    for (const Linear& l : ls) {
      if (!l.block || l.bias.defined() || l.q4 != a.q4 || l.n != a.n || l.out_dtype != a.out_dtype ||
          l.d.scalar_type() != a.d.scalar_type() || l.qs.numel() != a.qs.numel())
        return {};
      g.qs.push_back(l.qs), g.d.push_back(l.d), g.m.push_back(l.m);
    }
    g.n = a.n, g.q4 = a.q4, g.out_dtype = a.out_dtype;
    return g;
  }
  bool empty() const { return qs.empty(); }

  torch::Tensor operator()(const torch::Tensor& x, const std::vector<int64_t>& counts) const {
    torch::Tensor y = run_many(x, counts, qs, d, m, n, q4);
    return out_dtype != at::kFloat ? y.to(out_dtype) : y;
  }
};

// A step's (token, expert) pairs p = token * k + j sorted by expert, stably (the order of argsort(stable=True)):
// counts[e] pairs chose expert e; pair p sits at slot[p] of the sorted order, which holds token rows[slot].
struct SortedPairs {
  std::vector<int64_t> counts, slot;
  torch::Tensor rows;  // int64 [P]

  SortedPairs(const int64_t* experts, int64_t P, int64_t k, int64_t E) : counts(E, 0), slot(P) {
    std::vector<int64_t> next(E, 0);
    for (int64_t p = 0; p < P; ++p) counts[experts[p]] += 1;
    for (int64_t e = 1; e < E; ++e) next[e] = next[e - 1] + counts[e - 1];
    rows = torch::empty({P}, torch::dtype(at::kLong));
    int64_t* r = rows.data_ptr<int64_t>();
    for (int64_t p = 0; p < P; ++p) {
      slot[p] = next[experts[p]]++;
      r[slot[p]] = p / k;
    }
  }
};

// A mixture-of-experts MLP, computed as models/moe.py's MoEBlock computes it: the router's logits in float32,
// softmax and top k on moe_route (renormalised where the model says), then the step's (token, expert) pairs
// sorted by expert, each chosen expert run once on its tokens and added in ascending expert order; one token
// skips the sort. An optional shared expert gated by a sigmoid.
// Block-quantized experts run grouped: every chosen expert's gate_up in one kernel call, and every down in
// another (the same rows through the same kernels as one call per expert gives, bit for bit), their outputs
// added into each token's row in ascending expert order.
struct MoE {
  torch::Tensor router;  // [experts, hidden], the model dtype
  std::vector<Linear> gate_up, down;
  int64_t top_k = 1;
  bool renormalize = false;
  bool shared = false;
  Linear shared_gate_up, shared_down;
  torch::Tensor shared_gate;  // [1, hidden]
  std::vector<int64_t> tokens;  // tokens each expert ran (the expert load)
  LinearGroup gate_up_all, down_all;  // empty: the experts run one call each

  torch::Tensor operator()(const torch::Tensor& h) {
    const torch::Tensor logits = at::linear(h, router).to(at::kFloat).contiguous();
    const bool grouped_ok = !gate_up_all.empty() && !down_all.empty();
    torch::Tensor out;
    if (h.scalar_type() == at::kFloat && grouped_ok) {
      out = grouped_f32(h, logits);
    } else {
      auto routed = moe_route(logits, top_k, renormalize);
      out = experts_of(h, routed[0].to(h.scalar_type()), routed[1], grouped_ok);
    }
    if (!shared) return out;
    torch::Tensor s = shared_down(silu_mul(shared_gate_up(h)));
    return out + at::sigmoid(at::linear(h, shared_gate)) * s;
  }

  // float32 tokens on grouped experts: the routing, the counting sort, the two grouped calls and each token's
  // weighted sum, without a tensor op between. The same sums as the general path: a token's experts added in
  // ascending order (its pairs' order after the stable sort).
  torch::Tensor grouped_f32(const torch::Tensor& h, const torch::Tensor& logits) {
    const int64_t T = h.size(0), n = h.size(1), P = T * top_k, E = static_cast<int64_t>(tokens.size());
    std::vector<float> w(P);
    std::vector<int64_t> ex(P);
    route_rows(logits.data_ptr<float>(), T, E, top_k, renormalize, w.data(), ex.data());
    const SortedPairs sorted(ex.data(), P, top_k, E);
    const std::vector<int64_t>& slot = sorted.slot;
    for (int64_t e = 0; e < E; ++e) tokens[e] += sorted.counts[e];
    const torch::Tensor x = T == 1 ? h.expand({P, n}) : h.index_select(0, sorted.rows);
    const torch::Tensor y = down_all(silu_mul(gate_up_all(x, sorted.counts)), sorted.counts).contiguous();
    torch::Tensor out = torch::empty_like(h);
    const float* yp = y.data_ptr<float>();
    float* op = out.data_ptr<float>();
    at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
      std::vector<std::pair<int64_t, float>> pairs(top_k);  // (sorted slot, weight) of a token, ascending
      std::vector<const float*> ys(top_k);
      std::vector<float> ws(top_k);
      for (int64_t t = t0; t < t1; ++t) {
        for (int64_t j = 0; j < top_k; ++j) pairs[j] = {slot[t * top_k + j], w[t * top_k + j]};
        std::sort(pairs.begin(), pairs.end());
        for (int64_t j = 0; j < top_k; ++j) ys[j] = yp + pairs[j].first * n, ws[j] = pairs[j].second;
        weighted_row_sum(ys.data(), ws.data(), top_k, n, op + t * n);
      }
    });
    return out;
  }

  torch::Tensor experts_of(const torch::Tensor& h, const torch::Tensor& weights, const torch::Tensor& experts,
                           bool grouped_ok) {
    torch::Tensor out;
    if (grouped_ok) {
      out = grouped(h, weights, experts);
    } else if (h.size(0) == 1) {
      std::vector<std::pair<int64_t, double>> chosen;
      const auto e = experts.contiguous();
      const auto w = weights.to(at::kDouble).contiguous();
      for (int64_t j = 0; j < top_k; ++j) chosen.emplace_back(e.data_ptr<int64_t>()[j], w.data_ptr<double>()[j]);
      std::sort(chosen.begin(), chosen.end());
      for (const auto& [x, wt] : chosen) {
        tokens[x] += 1;
        torch::Tensor y = down[x](silu_mul(gate_up[x](h))) * wt;
        out = out.defined() ? out + y : y;
      }
    } else {
      const torch::Tensor flat = experts.reshape(-1);
      const torch::Tensor order = at::argsort(flat, /*stable=*/true);
      const torch::Tensor counts = at::bincount(flat, {}, static_cast<int64_t>(gate_up.size())).contiguous();
      const torch::Tensor rows = at::floor_divide(order, top_k);
      const torch::Tensor pair_weights = weights.reshape(-1).index_select(0, order).unsqueeze(1);
      out = at::zeros_like(h);
      int64_t start = 0;
      const int64_t* n_of = counts.data_ptr<int64_t>();
      for (size_t x = 0; x < gate_up.size(); ++x) {
        const int64_t n = n_of[x];
        if (n == 0) continue;
        tokens[x] += n;
        const torch::Tensor sel = rows.slice(0, start, start + n);
        torch::Tensor y = down[x](silu_mul(gate_up[x](h.index_select(0, sel))));
        out.index_add_(0, sel, y * pair_weights.slice(0, start, start + n));
        start += n;
      }
    }
    return out;
  }

  // The pairs sorted by expert (a stable counting sort: the order of argsort(stable=True)), every expert's
  // rows in one call per matrix, then one index_add. For one token, 0 + a + b is the a + b of the Python path.
  torch::Tensor grouped(const torch::Tensor& h, const torch::Tensor& weights, const torch::Tensor& experts) {
    const int64_t T = h.size(0), P = T * top_k, E = static_cast<int64_t>(tokens.size());
    const auto flat = experts.reshape(-1).contiguous();
    const SortedPairs sorted(flat.data_ptr<int64_t>(), P, top_k, E);
    torch::Tensor order = torch::empty({P}, flat.options());  // the pair at each slot
    int64_t* o = order.data_ptr<int64_t>();
    for (int64_t p = 0; p < P; ++p) o[sorted.slot[p]] = p;
    for (int64_t e = 0; e < E; ++e) tokens[e] += sorted.counts[e];
    const torch::Tensor x = T == 1 ? h.expand({P, h.size(1)}) : h.index_select(0, sorted.rows);
    const torch::Tensor y = down_all(silu_mul(gate_up_all(x, sorted.counts)), sorted.counts);
    torch::Tensor out = at::zeros_like(h);
    out.index_add_(0, sorted.rows, y * weights.reshape(-1).index_select(0, order).unsqueeze(1));
    return out;
  }
};

// Qwen3's per-head / OLMoE's whole-projection RMSNorm on q and k, then OLMoE's clamp of q, k, v: as
// LlamaModel._norm_clip_qkv computes them.
struct QKNorm {
  torch::Tensor q, k;  // undefined: no norm (a clamp only)
  bool per_head = false;
  std::optional<double> clip;
  int64_t q_size = 0, kv_size = 0, head_dim = 0;

  torch::Tensor operator()(const torch::Tensor& qkv, double eps) const {
    const auto parts = qkv.split_with_sizes({q_size, kv_size, kv_size}, -1);
    torch::Tensor q = parts[0], k = parts[1];
    if (this->q.defined()) {
      const int64_t T = qkv.size(0);
      if (per_head) {
        q = rms_norm(q.reshape({-1, head_dim}), this->q, eps).reshape({T, -1});
        k = rms_norm(k.reshape({-1, head_dim}), this->k, eps).reshape({T, -1});
      } else {
        q = rms_norm(q.contiguous(), this->q, eps);
        k = rms_norm(k.contiguous(), this->k, eps);
      }
    }
    torch::Tensor out = at::cat({q, k, parts[2]}, -1);
    if (clip) out.clamp_(-*clip, *clip);
    return out;
  }
};

struct Layer {
  Linear qkv, o, gate_up, down;
  torch::Tensor in_norm, post_norm;
  std::optional<MoE> moe;  // set: the MLP is a mixture of experts (gate_up, down unused)
  std::optional<QKNorm> qk;  // set: q/k norms and/or a clamp between the qkv projection and rotary
};

// Gemma 3's layer: every norm weight is (1 + w) already, in the model dtype.
struct GemmaLayer {
  Linear qkv, o, gate_up, down;
  torch::Tensor in_norm, post_attn_norm, pre_mlp_norm, post_mlp_norm, q_norm, k_norm;
  int64_t window = 0;  // 0: full attention; else a sliding window, with the local rope
  int64_t group = 0;  // its KV group: which slots / block tables / lengths it reads
};

// Lap times by kind of work, or nothing when not profiling.
class Clock {
 public:
  explicit Clock(std::map<std::string, double>* into) : into_(into), t_(std::chrono::steady_clock::now()) {}
  void lap(const char* what) {
    if (into_ == nullptr) return;
    const auto now = std::chrono::steady_clock::now();
    (*into_)[what] += std::chrono::duration<double>(now - t_).count();
    t_ = now;
  }

 private:
  std::map<std::string, double>* into_;
  std::chrono::steady_clock::time_point t_;
};

class Decoder {
 public:
  Decoder(int64_t num_heads, int64_t num_kv_heads, double eps, double scale, torch::Tensor embed,
          torch::Tensor final_norm, torch::Tensor cos, torch::Tensor sin, Linear head)
      : H_(num_heads), Hkv_(num_kv_heads), eps_(eps), scale_(scale), embed_(embed), norm_(final_norm), cos_(cos),
        sin_(sin), head_(head) {}

  void add_layer(Linear qkv, Linear o, Linear gate_up, Linear down, torch::Tensor in_norm, torch::Tensor post_norm) {
    layers_.push_back({qkv, o, gate_up, down, in_norm, post_norm, std::nullopt, std::nullopt});
  }

  // The last added layer's q/k norms (None: none) and clamp (None: none).
  void set_qk_norm(std::optional<torch::Tensor> q_norm, std::optional<torch::Tensor> k_norm, bool per_head,
                   std::optional<double> clip, int64_t q_size, int64_t kv_size, int64_t head_dim) {
    TORCH_CHECK(!layers_.empty(), "add the layer first");
    QKNorm n;
    if (q_norm && k_norm) n.q = *q_norm, n.k = *k_norm;
    n.per_head = per_head, n.clip = clip, n.q_size = q_size, n.kv_size = kv_size, n.head_dim = head_dim;
    layers_.back().qk = n;
  }

  // A layer whose MLP is a mixture of experts; shared_* are None without a shared expert.
  void add_moe_layer(Linear qkv, Linear o, torch::Tensor in_norm, torch::Tensor post_norm, torch::Tensor router,
                     std::vector<Linear> gate_up, std::vector<Linear> down, int64_t top_k, bool renormalize,
                     std::optional<Linear> shared_gate_up, std::optional<Linear> shared_down,
                     std::optional<torch::Tensor> shared_gate) {
    TORCH_CHECK(gate_up.size() == down.size() && gate_up.size() == static_cast<size_t>(router.size(0)),
                "one gate_up and one down per expert, as many as the router's rows");
    MoE moe;
    moe.router = router, moe.gate_up = std::move(gate_up), moe.down = std::move(down), moe.top_k = top_k;
    moe.renormalize = renormalize, moe.tokens.assign(moe.gate_up.size(), 0);
    moe.gate_up_all = LinearGroup::of(moe.gate_up), moe.down_all = LinearGroup::of(moe.down);
    if (shared_gate_up && shared_down && shared_gate) {
      moe.shared = true, moe.shared_gate_up = *shared_gate_up, moe.shared_down = *shared_down;
      moe.shared_gate = *shared_gate;
    }
    layers_.push_back({qkv, o, Linear{}, Linear{}, in_norm, post_norm, std::move(moe), std::nullopt});
  }

  // Gemma 3: the embedding scale (a 0-dim tensor in the model dtype), the sliding layers' rope tables, head size.
  void set_gemma(torch::Tensor embed_scale, torch::Tensor local_cos, torch::Tensor local_sin, int64_t head_dim) {
    embed_scale_ = embed_scale, local_cos_ = local_cos, local_sin_ = local_sin, head_dim_ = head_dim;
  }

  void add_gemma_layer(Linear qkv, Linear o, Linear gate_up, Linear down, torch::Tensor in_norm,
                       torch::Tensor post_attn_norm, torch::Tensor pre_mlp_norm, torch::Tensor post_mlp_norm,
                       torch::Tensor q_norm, torch::Tensor k_norm, int64_t window, int64_t group) {
    TORCH_CHECK(embed_scale_.defined() && layers_.empty(), "set_gemma first, and no Llama layers");
    gemma_.push_back({qkv, o, gate_up, down, in_norm, post_attn_norm, pre_mlp_norm, post_mlp_norm, q_norm, k_norm,
                      window, group});
  }

  // Tokens each expert ran on this decoder, by layer index ({} for a dense model).
  std::map<int64_t, std::vector<int64_t>> expert_tokens() const {
    std::map<int64_t, std::vector<int64_t>> out;
    for (size_t i = 0; i < layers_.size(); ++i)
      if (layers_[i].moe) out[static_cast<int64_t>(i)] = layers_[i].moe->tokens;
    return out;
  }

  void set_kv_caches(std::vector<std::vector<torch::Tensor>> caches) {
    TORCH_CHECK(caches.size() == num_layers(), "one (K, V) cache per layer expected");
    for (const auto& c : caches)
      TORCH_CHECK(c.size() == 2 || c.size() == 4, "a (K, V) or int8 (K, V, K scales, V scales) cache per layer expected");
    caches_ = std::move(caches);
  }

  // ids, positions [T]; per KV group, slots [T], block table [T, max_blocks] and KV length [T] of every row
  // (each row attends to its sequence up to its own position); logits_rows: the rows whose logits are wanted.
  // interrupt, when given, is asked before each layer of the first half; if it says so, None comes back (the
  // layers run so far wrote K/V for these positions only, which the step that redoes them overwrites).
  std::optional<torch::Tensor> forward(const torch::Tensor& ids, const torch::Tensor& positions,
                                       const std::vector<torch::Tensor>& group_slots,
                                       const std::vector<torch::Tensor>& group_tables,
                                       const std::vector<torch::Tensor>& group_lens, const torch::Tensor& logits_rows,
                                       const std::optional<std::function<bool()>>& interrupt) {
    TORCH_CHECK(caches_.size() == num_layers(), "set_kv_caches first");
    TORCH_CHECK(!group_slots.empty() && group_slots.size() == group_tables.size() &&
                group_slots.size() == group_lens.size(), "slots, tables and lengths for every KV group");
    pybind11::gil_scoped_release no_gil;  // interrupt() takes it back for its own call
    if (!gemma_.empty()) return forward_gemma(ids, positions, group_slots, group_tables, group_lens, logits_rows,
                                              interrupt);
    const torch::Tensor& slots = group_slots[0];
    const torch::Tensor& block_table = group_tables[0];
    const torch::Tensor& kv_lens = group_lens[0];
    const int64_t T = ids.size(0);
    const int64_t stop_checks = interrupt ? static_cast<int64_t>(layers_.size()) / 2 : 0;
    Clock clock(profile_ ? &times_ : nullptr);
    torch::Tensor residual = embed_.index_select(0, ids);
    torch::Tensor h = rms_norm(residual, layers_[0].in_norm, eps_);
    torch::Tensor delta;
    for (size_t i = 0; i < layers_.size(); ++i) {
      Layer& L = layers_[i];
      if (static_cast<int64_t>(i) < stop_checks && (*interrupt)()) return std::nullopt;
      if (delta.defined()) h = add_rms_norm_(delta, residual, L.in_norm, eps_);
      const torch::Tensor& kc = caches_[i][0];
      const torch::Tensor& vc = caches_[i][1];
      clock.lap("elementwise");
      torch::Tensor qkv = L.qkv(h);
      clock.lap("linear");
      if (L.qk) qkv = (*L.qk)(qkv, eps_);
      const bool int8 = caches_[i].size() == 4;
      const std::optional<torch::Tensor> ks = int8 ? std::optional(caches_[i][2]) : std::nullopt;
      const std::optional<torch::Tensor> vs = int8 ? std::optional(caches_[i][3]) : std::nullopt;
      torch::Tensor q = rope_qkv_write(qkv, positions, cos_, sin_, kc, vc, slots, H_, Hkv_, ks, vs);
      clock.lap("elementwise");
      torch::Tensor attn = (int8 ? paged_decode_int8(q, kc, vc, *ks, *vs, block_table, kv_lens, scale_, 0)
                                 : paged_decode(q, kc, vc, block_table, kv_lens, scale_, 0)).reshape({T, -1});
      clock.lap("attention");
      torch::Tensor o = L.o(attn);
      clock.lap("linear");
      h = add_rms_norm_(o, residual, L.post_norm, eps_);
      clock.lap("elementwise");
      if (L.moe) {
        delta = (*L.moe)(h);
        clock.lap("experts");
        continue;
      }
      torch::Tensor gu = L.gate_up(h);
      clock.lap("linear");
      torch::Tensor act = silu_mul(gu);
      clock.lap("elementwise");
      delta = L.down(act);
      clock.lap("linear");
    }
    torch::Tensor x = residual + delta;
    x = rms_norm(x.index_select(0, logits_rows).contiguous(), norm_, eps_);
    clock.lap("elementwise");
    torch::Tensor logits = head_(x).to(at::kFloat);
    clock.lap("lm_head");
    return logits;
  }

  // Gemma3Model.forward's loop on the fused kernels, op for op.
  std::optional<torch::Tensor> forward_gemma(const torch::Tensor& ids, const torch::Tensor& positions,
                                             const std::vector<torch::Tensor>& slots,
                                             const std::vector<torch::Tensor>& tables,
                                             const std::vector<torch::Tensor>& lens, const torch::Tensor& logits_rows,
                                             const std::optional<std::function<bool()>>& interrupt) {
    const int64_t T = ids.size(0), d = head_dim_;
    const int64_t q_size = H_ * d, kv_size = Hkv_ * d;
    const int64_t stop_checks = interrupt ? static_cast<int64_t>(gemma_.size()) / 2 : 0;
    Clock clock(profile_ ? &times_ : nullptr);
    torch::Tensor residual = embed_.index_select(0, ids) * embed_scale_;
    for (size_t i = 0; i < gemma_.size(); ++i) {
      GemmaLayer& L = gemma_[i];
      if (static_cast<int64_t>(i) < stop_checks && (*interrupt)()) return std::nullopt;
      TORCH_CHECK(L.group < static_cast<int64_t>(slots.size()), "no block tables for KV group ", L.group);
      const torch::Tensor& kc = caches_[i][0];
      const torch::Tensor& vc = caches_[i][1];
      torch::Tensor h = rms_norm(residual, L.in_norm, eps_);
      clock.lap("elementwise");
      torch::Tensor qkv = L.qkv(h);
      clock.lap("linear");
      const auto parts = qkv.split_with_sizes({q_size, kv_size, kv_size}, -1);
      torch::Tensor q = rms_norm(parts[0].reshape({-1, d}).contiguous(), L.q_norm, eps_).reshape({T, -1});
      torch::Tensor k = rms_norm(parts[1].reshape({-1, d}).contiguous(), L.k_norm, eps_).reshape({T, -1});
      qkv = at::cat({q, k, parts[2]}, -1);
      const bool int8 = caches_[i].size() == 4;
      const std::optional<torch::Tensor> ks = int8 ? std::optional(caches_[i][2]) : std::nullopt;
      const std::optional<torch::Tensor> vs = int8 ? std::optional(caches_[i][3]) : std::nullopt;
      const bool local = L.window > 0;
      q = rope_qkv_write(qkv, positions, local ? local_cos_ : cos_, local ? local_sin_ : sin_, kc, vc, slots[L.group],
                         H_, Hkv_, ks, vs);
      clock.lap("elementwise");
      const torch::Tensor& table = tables[L.group];
      const torch::Tensor& kv_lens = lens[L.group];
      torch::Tensor attn = (int8 ? paged_decode_int8(q, kc, vc, *ks, *vs, table, kv_lens, scale_, L.window)
                                 : paged_decode(q, kc, vc, table, kv_lens, scale_, L.window)).reshape({T, -1});
      clock.lap("attention");
      torch::Tensor o = L.o(attn);
      clock.lap("linear");
      residual = residual + rms_norm(o, L.post_attn_norm, eps_);
      h = rms_norm(residual, L.pre_mlp_norm, eps_);
      clock.lap("elementwise");
      const auto gate_up = L.gate_up(h).chunk(2, -1);
      clock.lap("linear");
      torch::Tensor act = at::gelu(gate_up[0], "tanh") * gate_up[1];
      clock.lap("elementwise");
      torch::Tensor down = L.down(act);
      clock.lap("linear");
      residual = residual + rms_norm(down, L.post_mlp_norm, eps_);
      clock.lap("elementwise");
    }
    torch::Tensor x = rms_norm(residual.index_select(0, logits_rows).contiguous(), norm_, eps_);
    clock.lap("elementwise");
    torch::Tensor logits = head_(x).to(at::kFloat);
    clock.lap("lm_head");
    return logits;
  }

  // Seconds spent per kind of work since the last call, when profiling is on (a lap costs ~20 ns).
  std::map<std::string, double> take_profile() { return std::exchange(times_, {}); }
  void set_profiling(bool on) { profile_ = on; }

 private:
  int64_t H_, Hkv_;
  double eps_, scale_;
  torch::Tensor embed_, norm_, cos_, sin_;
  Linear head_;
  std::vector<Layer> layers_;
  std::vector<GemmaLayer> gemma_;  // a Gemma 3 model's layers instead of layers_
  torch::Tensor embed_scale_, local_cos_, local_sin_;
  int64_t head_dim_ = 0;
  std::vector<std::vector<torch::Tensor>> caches_;

  size_t num_layers() const { return gemma_.empty() ? layers_.size() : gemma_.size(); }
  bool profile_ = false;
  std::map<std::string, double> times_;
};

}  // namespace tm_decoder
