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
// over once. Only what this covers is built: block-quantized or float linear layers, a KV cache in the model
// dtype or int8, every query row on the paged kernel. Anything else stays on the Python path.
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

struct Layer {
  Linear qkv, o, gate_up, down;
  torch::Tensor in_norm, post_norm;
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
    layers_.push_back({qkv, o, gate_up, down, in_norm, post_norm});
  }

  void set_kv_caches(std::vector<std::vector<torch::Tensor>> caches) {
    TORCH_CHECK(caches.size() == layers_.size(), "one (K, V) cache per layer expected");
    for (const auto& c : caches)
      TORCH_CHECK(c.size() == 2 || c.size() == 4, "a (K, V) or int8 (K, V, K scales, V scales) cache per layer expected");
    caches_ = std::move(caches);
  }

  // ids, positions, slots [T]; block table [T, max_blocks] and KV length [T] of every row (each row attends
  // to its sequence up to its own position); logits_rows: the rows whose logits are wanted. interrupt, when
  // given, is asked before each layer of the first half; if it says so, None comes back (the layers run so
  // far wrote K/V for these positions only, which the step that redoes them overwrites).
  std::optional<torch::Tensor> forward(const torch::Tensor& ids, const torch::Tensor& positions,
                                       const torch::Tensor& slots, const torch::Tensor& block_table,
                                       const torch::Tensor& kv_lens, const torch::Tensor& logits_rows,
                                       const std::optional<std::function<bool()>>& interrupt) {
    TORCH_CHECK(caches_.size() == layers_.size(), "set_kv_caches first");
    pybind11::gil_scoped_release no_gil;  // interrupt() takes it back for its own call
    const int64_t T = ids.size(0);
    const int64_t stop_checks = interrupt ? static_cast<int64_t>(layers_.size()) / 2 : 0;
    Clock clock(profile_ ? &times_ : nullptr);
    torch::Tensor residual = embed_.index_select(0, ids);
    torch::Tensor h = rms_norm(residual, layers_[0].in_norm, eps_);
    torch::Tensor delta;
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer& L = layers_[i];
      if (static_cast<int64_t>(i) < stop_checks && (*interrupt)()) return std::nullopt;
      if (delta.defined()) h = add_rms_norm_(delta, residual, L.in_norm, eps_);
      const torch::Tensor& kc = caches_[i][0];
      const torch::Tensor& vc = caches_[i][1];
      clock.lap("elementwise");
      torch::Tensor qkv = L.qkv(h);
      clock.lap("linear");
      const bool int8 = caches_[i].size() == 4;
      const std::optional<torch::Tensor> ks = int8 ? std::optional(caches_[i][2]) : std::nullopt;
      const std::optional<torch::Tensor> vs = int8 ? std::optional(caches_[i][3]) : std::nullopt;
      torch::Tensor q = rope_qkv_write(qkv, positions, cos_, sin_, kc, vc, slots, H_, Hkv_, ks, vs);
      clock.lap("elementwise");
      torch::Tensor attn = (int8 ? paged_decode_int8(q, kc, vc, *ks, *vs, block_table, kv_lens, scale_)
                                 : paged_decode(q, kc, vc, block_table, kv_lens, scale_)).reshape({T, -1});
      clock.lap("attention");
      torch::Tensor o = L.o(attn);
      clock.lap("linear");
      h = add_rms_norm_(o, residual, L.post_norm, eps_);
      clock.lap("elementwise");
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

  // Seconds spent per kind of work since the last call, when profiling is on (a lap costs ~20 ns).
  std::map<std::string, double> take_profile() { return std::exchange(times_, {}); }
  void set_profiling(bool on) { profile_ = on; }

 private:
  int64_t H_, Hkv_;
  double eps_, scale_;
  torch::Tensor embed_, norm_, cos_, sin_;
  Linear head_;
  std::vector<Layer> layers_;
  std::vector<std::vector<torch::Tensor>> caches_;
  bool profile_ = false;
  std::map<std::string, double> times_;
};

}  // namespace tm_decoder
