// Host side of the fused qkv split + qk-norm + 2D RoPE kernel: argument checks, device / stream
// handling, GIL release, and CUDA errors turned into Python exceptions. No device code here (see
// kernels/rope_attention.cu) and no libtorch: tensors arrive as integer data pointers + sizes/strides.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include <cuda_runtime_api.h>

#include "rope_attention.h"

namespace py = pybind11;

namespace flashdino {
namespace {

template <typename T>
T* as_ptr(std::uintptr_t value) {
  return reinterpret_cast<T*>(value);
}

void check(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("flashdino._C.rope_attention_qkv: " + what);
}

void fill_common(RopeAttentionQkvParams& p, int dtype, int64_t batch, int64_t tokens, int64_t stride_b, int64_t stride_n,
                 int heads, int head_dim, int mode, int height, int width, int n_prefix, std::uintptr_t freqs,
                 double denom_h, double denom_w) {
  check(dtype >= 0 && dtype <= 2, "dtype must be 0 (float32), 1 (float16) or 2 (bfloat16)");
  check(mode >= 0 && mode <= 2, "mode must be 0 (none), 1 (dinov3) or 2 (vggt)");
  check(batch >= 0 && tokens >= 0, "negative batch or token count");
  check(heads > 0, "heads must be positive");
  check(head_dim > 0 && head_dim % 8 == 0 && head_dim <= 256,
        "head_dim must be a multiple of 8 in [8, 256], got " + std::to_string(head_dim));
  check(stride_b >= 0 && stride_n >= 0, "negative strides are not supported");
  p.dtype = static_cast<DType>(dtype);
  p.mode = static_cast<RopeMode>(mode);
  p.batch = batch;
  p.tokens = tokens;
  p.stride_b = stride_b;
  p.stride_n = stride_n;
  p.heads = heads;
  p.head_dim = head_dim;
  if (p.mode != RopeMode::kNone) {
    check(height > 0 && width > 0 && n_prefix >= 0, "RoPE needs a positive grid and n_prefix >= 0");
    const int64_t per_frame = n_prefix + static_cast<int64_t>(height) * width;
    check(tokens % per_frame == 0, "tokens (" + std::to_string(tokens) + ") is not a multiple of n_prefix + H*W (" +
                                       std::to_string(per_frame) + ")");
    check(freqs != 0, "RoPE needs the frequency / period table (freqs)");
    check(denom_h > 0 && denom_w > 0, "coordinate denominators must be positive");
  }
  p.height = height;
  p.width = width;
  p.n_prefix = n_prefix;
  p.freqs = as_ptr<const float>(freqs);
  p.denom_h = static_cast<float>(denom_h);
  p.denom_w = static_cast<float>(denom_w);
}

void launch(const RopeAttentionQkvParams& p, int device, std::uintptr_t stream) {
  cudaError_t err = cudaSuccess;
  {
    py::gil_scoped_release nogil;
    int previous = -1;
    err = cudaGetDevice(&previous);
    if (err == cudaSuccess && previous != device) err = cudaSetDevice(device);
    if (err == cudaSuccess) {
      err = launch_rope_attention_qkv(p, reinterpret_cast<cudaStream_t>(stream));
      if (previous >= 0 && previous != device) {
        const cudaError_t restore = cudaSetDevice(previous);
        if (err == cudaSuccess) err = restore;
      }
    }
  }
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("flashdino._C.rope_attention_qkv: CUDA error ") + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
  }
}

void rope_attention_qkv_forward(std::uintptr_t qkv, std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, int dtype,
                      int64_t batch, int64_t tokens, int64_t stride_b, int64_t stride_n, int heads, int head_dim,
                      int mode, int height, int width, int n_prefix, std::uintptr_t freqs, double denom_h,
                      double denom_w, std::uintptr_t q_weight, std::uintptr_t q_bias, std::uintptr_t k_weight,
                      std::uintptr_t k_bias, double eps, bool round_mid, int device, std::uintptr_t stream) {
  RopeAttentionQkvParams p;
  fill_common(p, dtype, batch, tokens, stride_b, stride_n, heads, head_dim, mode, height, width, n_prefix, freqs,
              denom_h, denom_w);
  check(batch * tokens == 0 || (qkv && q && k && v), "null data pointer");
  check(q_bias == 0 || q_weight != 0, "q_bias without q_weight");
  check(k_bias == 0 || k_weight != 0, "k_bias without k_weight");
  p.qkv_in = as_ptr<const void>(qkv);
  p.heads_out[0] = as_ptr<void>(q);
  p.heads_out[1] = as_ptr<void>(k);
  p.heads_out[2] = as_ptr<void>(v);
  p.q_weight = as_ptr<const float>(q_weight);
  p.q_bias = as_ptr<const float>(q_bias);
  p.k_weight = as_ptr<const float>(k_weight);
  p.k_bias = as_ptr<const float>(k_bias);
  p.eps = static_cast<float>(eps);
  p.round_mid = round_mid;
  p.backward = false;
  launch(p, device, stream);
}

void rope_attention_qkv_backward(std::uintptr_t dq, std::uintptr_t dk, std::uintptr_t dv, std::uintptr_t dqkv, int dtype,
                       int64_t batch, int64_t tokens, int64_t stride_b, int64_t stride_n, int heads, int head_dim,
                       int mode, int height, int width, int n_prefix, std::uintptr_t freqs, double denom_h,
                       double denom_w, bool round_mid, int device, std::uintptr_t stream) {
  RopeAttentionQkvParams p;
  fill_common(p, dtype, batch, tokens, stride_b, stride_n, heads, head_dim, mode, height, width, n_prefix, freqs,
              denom_h, denom_w);
  check(batch * tokens == 0 || (dq && dk && dv && dqkv), "null data pointer");
  p.heads_in[0] = as_ptr<const void>(dq);
  p.heads_in[1] = as_ptr<const void>(dk);
  p.heads_in[2] = as_ptr<const void>(dv);
  p.qkv_out = as_ptr<void>(dqkv);
  p.round_mid = round_mid;
  p.backward = true;
  launch(p, device, stream);
}

}  // namespace

void register_rope_attention_qkv(py::module_& m) {
  m.def("rope_attention_qkv_forward", &rope_attention_qkv_forward,
        "qkv [B,N,3hd] -> q, k, v [B,h,N,d]: optional qk LayerNorm, 2D RoPE (mode 0 none, 1 dinov3, 2 vggt)",
        py::arg("qkv"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("dtype"), py::arg("batch"),
        py::arg("tokens"), py::arg("stride_b"), py::arg("stride_n"), py::arg("heads"), py::arg("head_dim"),
        py::arg("mode"), py::arg("height"), py::arg("width"), py::arg("n_prefix"), py::arg("freqs"),
        py::arg("denom_h"), py::arg("denom_w"), py::arg("q_weight"), py::arg("q_bias"), py::arg("k_weight"),
        py::arg("k_bias"), py::arg("eps"), py::arg("round_mid"), py::arg("device"), py::arg("stream"));
  m.def("rope_attention_qkv_backward", &rope_attention_qkv_backward,
        "dq, dk, dv [B,h,N,d] -> dqkv [B,N,3hd]: inverse rotation of dq and dk, copy of dv (no norm)",
        py::arg("dq"), py::arg("dk"), py::arg("dv"), py::arg("dqkv"), py::arg("dtype"), py::arg("batch"),
        py::arg("tokens"), py::arg("stride_b"), py::arg("stride_n"), py::arg("heads"), py::arg("head_dim"),
        py::arg("mode"), py::arg("height"), py::arg("width"), py::arg("n_prefix"), py::arg("freqs"),
        py::arg("denom_h"), py::arg("denom_w"), py::arg("round_mid"), py::arg("device"), py::arg("stream"));
}

}  // namespace flashdino
