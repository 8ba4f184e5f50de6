// The llama_kernels operators: their schemas and CPU implementations, in one file, the only
// one that parses torch/library.h (cpu_tensor.h says why). Each is defined in its kernel file.

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <string>
#include <tuple>

at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales);
std::string isa();
bool int8_dot_products();
at::Tensor w8a8_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                   int64_t K);
at::Tensor w4a8_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& sz,
                   int64_t K, int64_t G);
std::tuple<at::Tensor, at::Tensor> w4a8_pack(const at::Tensor& packed16, const at::Tensor& sz16,
                                             int64_t n, int64_t group_size);
at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& sz,
                   int64_t group_size, int64_t n_out);
at::Tensor int4_dequantize(const at::Tensor& packed, const at::Tensor& sz, int64_t group_size,
                           int64_t start, int64_t end, bool bf16);
std::tuple<at::Tensor, at::Tensor> int4_pack(const at::Tensor& saved, const at::Tensor& scales,
                                             const at::Tensor& zeros);
std::tuple<at::Tensor, at::Tensor, at::Tensor> int4_quantize(const at::Tensor& w,
                                                             int64_t group_size);
at::Tensor float_mm(const at::Tensor& x, const at::Tensor& weight);
at::Tensor bf16_mm(const at::Tensor& x, const at::Tensor& weight);
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& starts, const at::Tensor& ends, double scale);

TORCH_LIBRARY(llama_kernels, m) {
  m.def("int8_mm(Tensor x, Tensor weight, Tensor scales) -> Tensor");
  m.def("w8a8_mm(Tensor x, Tensor packed, Tensor scales, int K) -> Tensor");
  m.def("w4a8_mm(Tensor x, Tensor packed, Tensor sz, int K, int group_size) -> Tensor");
  m.def("w4a8_pack(Tensor packed16, Tensor sz16, int n, int group_size) -> (Tensor, Tensor)");
  m.def("int4_mm(Tensor x, Tensor packed, Tensor sz, int group_size, int n_out) -> Tensor");
  m.def("int4_dequantize(Tensor packed, Tensor sz, int group_size, int start, int end, "
        "bool bf16) -> Tensor");
  m.def("int4_pack(Tensor saved, Tensor scales, Tensor zeros) -> (Tensor, Tensor)");
  m.def("int4_quantize(Tensor w, int group_size) -> (Tensor, Tensor, Tensor)");
  m.def("float_mm(Tensor x, Tensor weight) -> Tensor");
  m.def("bf16_mm(Tensor x, Tensor weight) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor starts, Tensor ends, "
        "float scale) -> Tensor");
  m.def("isa() -> str", &isa);
  m.def("int8_dot_products() -> bool", &int8_dot_products);
}

TORCH_LIBRARY_IMPL(llama_kernels, CPU, m) {
  m.impl("int8_mm", &int8_mm);
  m.impl("w8a8_mm", &w8a8_mm);
  m.impl("w4a8_mm", &w4a8_mm);
  m.impl("w4a8_pack", &w4a8_pack);
  m.impl("int4_mm", &int4_mm);
  m.impl("int4_dequantize", &int4_dequantize);
  m.impl("int4_pack", &int4_pack);
  m.impl("int4_quantize", &int4_quantize);
  m.impl("float_mm", &float_mm);
  m.impl("bf16_mm", &bf16_mm);
  m.impl("decode_attention", &decode_attention);
}
