// The one native module: every CPU kernel compiled as a single translation unit, so torch's headers are
// parsed once per build (they are most of a build's minute) and the decoder calls the kernels directly.
#include <torch/extension.h>
#include <pybind11/functional.h>
#include <pybind11/stl.h>

#include "block_linear.cpp"
#include "fused.cpp"
#include "paged_decode.cpp"
#include "decoder.cpp"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  // block_linear.cpp
  m.def("q4_linear", &q4_linear,
        "x [M,K] float, q4 groups of 8 interleaved rows (w = d*q + m), n outputs -> [M,n] float32, int8 activations");
  m.def("q8_linear", &q8_linear, "x [M,K] float, q8 groups of 8 interleaved rows (w = d*q (+ m), m may be empty), n outputs -> [M,n] float32, int8 activations");
  m.def("q4_linear_many", &q4_linear_many,
        "x [M,K], row counts, per matrix (qs, d, m): rows in runs, run e against matrix e, in one call -> [M,n]");
  m.def("q8_linear_many", &q8_linear_many,
        "x [M,K], row counts, per matrix (qs, d, m; m may be empty): rows in runs, run e against matrix e -> [M,n]");
  m.def("quantize_activations", &quantize_activations, "x -> (int8 values, scales, scale * sums) per block of 32");
  m.def("group_rows", &group_rows, "rows per interleaved weight group in this build (one per vector lane)");
  m.def("isa", &isa, "the instruction set this build's dot products use");
  // fused.cpp
  m.def("apply_token_bitmask_", &apply_token_bitmask_, "structured output: logits of tokens a mask forbids -> -inf");
  m.def("rms_norm", &rms_norm, "RMSNorm over rows");
  m.def("add_rms_norm_", &add_rms_norm_, "residual += x in place, then RMSNorm of the residual");
  m.def("rope_qkv_write", &rope_qkv_write, "rotary on q and k, k and v written to their cache slots; -> rotated q",
        py::arg("qkv"), py::arg("positions"), py::arg("cos"), py::arg("sin"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("slots"), py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("k_scale") = py::none(),
        py::arg("v_scale") = py::none());
  m.def("silu_mul", &silu_mul, "silu(gate) * up");
  // paged_decode.cpp
  m.def("paged_decode", &paged_decode, "decode attention over a paged KV cache (window > 0: a sliding window)",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"), py::arg("ctx_lens"),
        py::arg("scale"), py::arg("window") = 0);
  m.def("paged_decode_int8", &paged_decode_int8,
        "decode attention over an int8 paged KV cache with scales (window > 0: a sliding window)", py::arg("q"),
        py::arg("k_cache"), py::arg("v_cache"), py::arg("k_scale"), py::arg("v_scale"), py::arg("block_tables"),
        py::arg("ctx_lens"), py::arg("scale"), py::arg("window") = 0);
  // decoder.cpp
  using namespace tm_decoder;
  m.def("moe_route", &moe_route, "router logits [T,E] float32, k, renormalise -> (weights [T,k] float32, experts [T,k])");
  py::class_<Linear>(m, "Linear", py::module_local());
  m.def("block_linear_spec", &block_linear_spec, "a block-quantized matrix for the decoder (tensors shared)");
  m.def("float_linear_spec", &float_linear_spec, "a float matrix for the decoder (tensor shared)");
  py::class_<Decoder>(m, "Decoder", py::module_local())
      .def(py::init<int64_t, int64_t, double, double, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor,
                    Linear>())
      .def("add_layer", &Decoder::add_layer)
      .def("add_moe_layer", &Decoder::add_moe_layer, "a layer whose MLP is a mixture of experts")
      .def("set_qk_norm", &Decoder::set_qk_norm, "the last layer's q/k norms and clamp (Qwen3, OLMoE)")
      .def("set_gemma", &Decoder::set_gemma, "Gemma 3: embedding scale, the sliding layers' rope tables, head size")
      .def("add_gemma_layer", &Decoder::add_gemma_layer, "a Gemma 3 layer: its norms, window (0: full), KV group")
      .def("expert_tokens", &Decoder::expert_tokens, "tokens each expert ran, by MoE layer")
      .def("set_kv_caches", &Decoder::set_kv_caches)
      .def("forward", &Decoder::forward)
      .def("set_profiling", &Decoder::set_profiling, "time each kind of work inside forward")
      .def("take_profile", &Decoder::take_profile, "{kind: seconds} since the last take, and reset");
}
