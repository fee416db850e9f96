// Shared between the host launcher (csrc/rope_attention.cpp) and the device code (kernels/rope_attention.cu).
// Plain C++ only: no CUDA syntax, no torch.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace flashdino {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
enum class RopeMode : int { kNone = 0, kDinoV3 = 1, kVggt = 2 };

// One memory-bound pass between the fused qkv layout [B, N, 3*h*d] (strides stride_b / stride_n in
// elements, last dim contiguous) and three contiguous head-major tensors [B, h, N, d].
//   forward : reads qkv, optional per-head LayerNorm of q and k, RoPE, writes q, k, v.
//   backward: reads dq, dk, dv, rotates dq and dk by -angle, writes dqkv (norm not included).
struct RopeAttentionQkvParams {
  const void* qkv_in = nullptr;  // forward input  [B, N, 3hd]
  void* qkv_out = nullptr;       // backward output [B, N, 3hd]
  const void* heads_in[3] = {nullptr, nullptr, nullptr};  // backward inputs dq, dk, dv [B, h, N, d]
  void* heads_out[3] = {nullptr, nullptr, nullptr};       // forward outputs q, k, v [B, h, N, d]
  int64_t batch = 0, tokens = 0;
  int64_t stride_b = 0, stride_n = 0;  // of the qkv-layout tensor, in elements
  int heads = 0, head_dim = 0;
  DType dtype = DType::kFloat32;
  RopeMode mode = RopeMode::kNone;
  int height = 0, width = 0, n_prefix = 0;
  // dinov3: periods [d/4] (angle = 2*pi*coord / period); vggt: inverse frequencies [d/4]
  // (angle = (pos + 1) * inv_freq, rounded to the token dtype before cos/sin). fp32.
  const float* freqs = nullptr;
  float denom_h = 1.f, denom_w = 1.f;  // dinov3 coordinate normalisation: coord = 2*(i+0.5)/denom - 1
  // Forward only: optional LayerNorm over d of q and k (weight/bias fp32 [d]; bias may be null).
  const float* q_weight = nullptr;
  const float* q_bias = nullptr;
  const float* k_weight = nullptr;
  const float* k_bias = nullptr;
  float eps = 1e-5f;
  // Round the LayerNorm output and the vggt angles / cos / sin to the token dtype, as the
  // reference does without autocast. False: keep them fp32 (the reference under autocast with
  // qk-norm, whose norm returns fp32 tokens).
  bool round_mid = true;
  bool backward = false;
};

// Checks nothing (the host launcher validates); returns the launch error, if any.
cudaError_t launch_rope_attention_qkv(const RopeAttentionQkvParams& p, cudaStream_t stream);

}  // namespace flashdino
