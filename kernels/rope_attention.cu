// Fused qkv split + optional per-head LayerNorm (VGGT qk_norm) + 2D RoPE, one memory-bound pass.
//
// Forward : qkv [B, N, 3*h*d] (strided on B and N, last dim contiguous)  ->  q, k, v [B, h, N, d]
// Backward: dq, dk, dv [B, h, N, d]  ->  dqkv [B, N, 3*h*d]; dq and dk rotated by -angle (the
//           transpose of the rotation), dv copied. The LayerNorm backward is not done here (the
//           Python wrapper applies the analytic LayerNorm gradient to the result).
//
// Work split: one group of `tpr` threads (a power of two <= 32, aligned inside a warp) per
// (token, head); it handles the q, k and v rows of that head, so the cos/sin of a token are
// computed once for q and k. A row of d elements is seen as d/2 rotation pairs (j, j + off):
// off = d/2 for "dinov3" (rotate-half over d) and for no RoPE, off = d/4 for "vggt" (rotate-half
// inside each half). Each thread holds up to kMaxChunks chunks of VEC pairs in registers, loaded
// with 16-byte (or narrower) vector loads.
//
// Numerics (matching python/flashdino/ops/rope_attention/reference.py and grid.py):
//   dinov3: coord = 2 * ((i + 0.5) / denom) - 1, angle = (2*pi * coord) / period (IEEE division),
//           precise sincosf, rotation in fp32, one rounding to the token dtype.
//   vggt  : angle = (i + 1) * inv_freq rounded to the token dtype, cos/sin rounded to the token
//           dtype (as the reference tables), rotation in fp32, one rounding.
//   qk_norm: LayerNorm in fp32 (two-pass mean / variance, rsqrt), output rounded to the token dtype
//           before the rotation, as the reference (F.layer_norm returns the token dtype).
//   round_mid = false skips both intermediate roundings (reference under autocast: fp32 tokens).
// Prefix tokens (the first n_prefix of every frame of n_prefix + H*W tokens) are not rotated.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "rope_attention.h"

namespace flashdino {
namespace {

constexpr int kBlock = 128;
// Chunks of VEC pairs held per thread: d <= 256 gives at most 128 pairs, i.e. 128 / VEC chunks over
// at most 32 threads, so 4 / VEC chunks per thread (one from VEC = 4 up). Sized per VEC to keep the
// register count (and so the occupancy of this memory-bound kernel) reasonable.
template <int VEC>
constexpr int max_chunks() { return VEC >= 4 ? 1 : 4 / VEC; }
constexpr float kTwoPi = 6.283185307179586f;

template <typename T> __device__ __forceinline__ float to_f(T x);
template <> __device__ __forceinline__ float to_f<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename T> __device__ __forceinline__ float round_to(float x) { return to_f<T>(from_f<T>(x)); }
template <typename T> __device__ __forceinline__ float round_if(float x, bool round) { return round ? round_to<T>(x) : x; }

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

__device__ __forceinline__ float group_sum(float v, unsigned mask, int tpr) {
  for (int o = tpr >> 1; o > 0; o >>= 1) v += __shfl_xor_sync(mask, v, o, tpr);
  return v;
}

// First element of rotation pair `pair` (its partner is + off).
__device__ __forceinline__ int pair_first(int pair, int off) { return (pair / off) * 2 * off + pair % off; }

template <typename T, int VEC, bool BWD>
__global__ void __launch_bounds__(kBlock) rope_attention_qkv_kernel(const RopeAttentionQkvParams p, int tpr_log2) {
  const int tpr = 1 << tpr_log2;
  const int lane = threadIdx.x & (tpr - 1);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kBlock >> tpr_log2) + (threadIdx.x >> tpr_log2);
  const int h = p.heads;
  const int d = p.head_dim;
  if (row >= p.batch * p.tokens * h) return;  // whole groups leave together
  const unsigned warp_lane = threadIdx.x & 31u;
  const unsigned mask = tpr == 32 ? 0xffffffffu : (((1u << tpr) - 1u) << (warp_lane & ~static_cast<unsigned>(tpr - 1)));

  const int64_t token = row / h;
  const int head = static_cast<int>(row - token * h);
  const int64_t b = token / p.tokens;
  const int64_t n = token - b * p.tokens;
  const int off = p.mode == RopeMode::kVggt ? d / 4 : d / 2;
  const int n_chunks = (d / 2) / VEC;
  constexpr int kMaxChunks = max_chunks<VEC>();

  // ---- rotation angles of this token (shared by q and k) -------------------------------------
  bool rotate = false;
  float cs[kMaxChunks][VEC];
  float sn[kMaxChunks][VEC];
  if (p.mode != RopeMode::kNone) {
    const int64_t per_frame = p.n_prefix + static_cast<int64_t>(p.height) * p.width;
    const int64_t t = n % per_frame;
    if (t >= p.n_prefix) {
      rotate = true;
      const int64_t patch = t - p.n_prefix;
      const int y = static_cast<int>(patch / p.width);
      const int x = static_cast<int>(patch - static_cast<int64_t>(y) * p.width);
      const int quarter = d / 4;
      float cy = 0.f, cx = 0.f;
      if (p.mode == RopeMode::kDinoV3) {
        const float ny = (static_cast<float>(y) + 0.5f) / p.denom_h;
        const float nx = (static_cast<float>(x) + 0.5f) / p.denom_w;
        cy = kTwoPi * (2.0f * ny - 1.0f);
        cx = kTwoPi * (2.0f * nx - 1.0f);
      } else {
        cy = static_cast<float>(y + 1);
        cx = static_cast<float>(x + 1);
      }
#pragma unroll
      for (int c = 0; c < kMaxChunks; ++c) {
        const int chunk = lane + c * tpr;
        if (chunk < n_chunks) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            const int j = pair_first(chunk * VEC + e, off);
            float s, co;
            if (p.mode == RopeMode::kDinoV3) {
              // j < d/2; layout per head [Y (d/4), X (d/4)] tiled twice
              const bool is_y = j < quarter;
              const float ang = (is_y ? cy : cx) / __ldg(p.freqs + (is_y ? j : j - quarter));
              sincosf(ang, &s, &co);
            } else {
              // j in [0, d/4) (y half) or [d/2, 3d/4) (x half)
              const bool is_y = j < 2 * quarter;
              const float ang = round_if<T>((is_y ? cy : cx) * __ldg(p.freqs + (is_y ? j : j - 2 * quarter)), p.round_mid);
              sincosf(ang, &s, &co);
              s = round_if<T>(s, p.round_mid);
              co = round_if<T>(co, p.round_mid);
            }
            cs[c][e] = co;
            sn[c][e] = BWD ? -s : s;
          }
        }
      }
    }
  }

  const int64_t qkv_base = b * p.stride_b + n * p.stride_n;
  const int64_t head_base = ((b * h + head) * p.tokens + n) * static_cast<int64_t>(d);

#pragma unroll 1
  for (int which = 0; which < 3; ++which) {
    const int64_t qkv_off = qkv_base + static_cast<int64_t>(which * h + head) * d;
    const T* src;
    T* dst;
    if (BWD) {
      src = static_cast<const T*>(p.heads_in[which]) + head_base;
      dst = static_cast<T*>(p.qkv_out) + qkv_off;
    } else {
      src = static_cast<const T*>(p.qkv_in) + qkv_off;
      dst = static_cast<T*>(p.heads_out[which]) + head_base;
    }

    float a[kMaxChunks][VEC];
    float z[kMaxChunks][VEC];
#pragma unroll
    for (int c = 0; c < kMaxChunks; ++c) {
      const int chunk = lane + c * tpr;
      if (chunk < n_chunks) {
        const int j = pair_first(chunk * VEC, off);
        const Pack<T, VEC> pa = *reinterpret_cast<const Pack<T, VEC>*>(src + j);
        const Pack<T, VEC> pz = *reinterpret_cast<const Pack<T, VEC>*>(src + j + off);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          a[c][e] = to_f<T>(pa.v[e]);
          z[c][e] = to_f<T>(pz.v[e]);
        }
      }
    }

    if (!BWD && which < 2) {
      const float* weight = which == 0 ? p.q_weight : p.k_weight;
      const float* bias = which == 0 ? p.q_bias : p.k_bias;
      if (weight != nullptr) {
        float sum = 0.f;
#pragma unroll
        for (int c = 0; c < kMaxChunks; ++c) {
          if (lane + c * tpr < n_chunks) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) sum += a[c][e] + z[c][e];
          }
        }
        const float mean = group_sum(sum, mask, tpr) / d;
        float sq = 0.f;
#pragma unroll
        for (int c = 0; c < kMaxChunks; ++c) {
          if (lane + c * tpr < n_chunks) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
              const float da = a[c][e] - mean, dz = z[c][e] - mean;
              sq += da * da + dz * dz;
            }
          }
        }
        const float rstd = rsqrtf(group_sum(sq, mask, tpr) / d + p.eps);
#pragma unroll
        for (int c = 0; c < kMaxChunks; ++c) {
          const int chunk = lane + c * tpr;
          if (chunk < n_chunks) {
            const int j = pair_first(chunk * VEC, off);
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
              float ya = (a[c][e] - mean) * rstd * __ldg(weight + j + e);
              float yz = (z[c][e] - mean) * rstd * __ldg(weight + j + off + e);
              if (bias != nullptr) {
                ya += __ldg(bias + j + e);
                yz += __ldg(bias + j + off + e);
              }
              a[c][e] = round_if<T>(ya, p.round_mid);
              z[c][e] = round_if<T>(yz, p.round_mid);
            }
          }
        }
      }
    }

    if (rotate && which < 2) {
#pragma unroll
      for (int c = 0; c < kMaxChunks; ++c) {
        if (lane + c * tpr < n_chunks) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            const float x1 = a[c][e], x2 = z[c][e];
            a[c][e] = x1 * cs[c][e] - x2 * sn[c][e];
            z[c][e] = x2 * cs[c][e] + x1 * sn[c][e];
          }
        }
      }
    }

#pragma unroll
    for (int c = 0; c < kMaxChunks; ++c) {
      const int chunk = lane + c * tpr;
      if (chunk < n_chunks) {
        const int j = pair_first(chunk * VEC, off);
        Pack<T, VEC> pa, pz;
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          pa.v[e] = from_f<T>(a[c][e]);
          pz.v[e] = from_f<T>(z[c][e]);
        }
        *reinterpret_cast<Pack<T, VEC>*>(dst + j) = pa;
        *reinterpret_cast<Pack<T, VEC>*>(dst + j + off) = pz;
      }
    }
  }
}

bool aligned(const void* ptr, int bytes) { return (reinterpret_cast<uintptr_t>(ptr) % bytes) == 0; }

template <typename T, int VEC, bool BWD>
cudaError_t launch_typed(const RopeAttentionQkvParams& p, cudaStream_t stream) {
  const int n_chunks = (p.head_dim / 2) / VEC;
  int tpr_log2 = 0;
  while ((1 << tpr_log2) < n_chunks && tpr_log2 < 5) ++tpr_log2;
  if ((n_chunks + (1 << tpr_log2) - 1) >> tpr_log2 > max_chunks<VEC>()) return cudaErrorInvalidValue;  // d > 256
  const int64_t rows = p.batch * p.tokens * p.heads;
  const int64_t rows_per_block = kBlock >> tpr_log2;
  const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  rope_attention_qkv_kernel<T, VEC, BWD><<<static_cast<unsigned>(blocks), kBlock, 0, stream>>>(p, tpr_log2);
  return cudaGetLastError();
}

template <typename T, bool BWD>
cudaError_t launch_vec(const RopeAttentionQkvParams& p, cudaStream_t stream) {
  const int off = p.mode == RopeMode::kVggt ? p.head_dim / 4 : p.head_dim / 2;
  const void* ptrs[4];
  if (BWD) {
    ptrs[0] = p.qkv_out;
    for (int i = 0; i < 3; ++i) ptrs[i + 1] = p.heads_in[i];
  } else {
    ptrs[0] = p.qkv_in;
    for (int i = 0; i < 3; ++i) ptrs[i + 1] = p.heads_out[i];
  }
  int vec = 16 / static_cast<int>(sizeof(T));
  for (; vec > 1; vec /= 2) {
    bool ok = off % vec == 0 && p.stride_b % vec == 0 && p.stride_n % vec == 0;
    for (const void* ptr : ptrs) ok = ok && aligned(ptr, vec * static_cast<int>(sizeof(T)));
    if (ok) break;
  }
  switch (vec) {
    case 8:
      if constexpr (sizeof(T) <= 2) return launch_typed<T, 8, BWD>(p, stream);
      break;
    case 4: return launch_typed<T, 4, BWD>(p, stream);
    case 2: return launch_typed<T, 2, BWD>(p, stream);
    default: return launch_typed<T, 1, BWD>(p, stream);
  }
  return cudaErrorInvalidValue;
}

template <bool BWD>
cudaError_t launch_dtype(const RopeAttentionQkvParams& p, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat32: return launch_vec<float, BWD>(p, stream);
    case DType::kFloat16: return launch_vec<__half, BWD>(p, stream);
    case DType::kBFloat16: return launch_vec<__nv_bfloat16, BWD>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_rope_attention_qkv(const RopeAttentionQkvParams& p, cudaStream_t stream) {
  if (p.batch * p.tokens * p.heads == 0) return cudaSuccess;
  return p.backward ? launch_dtype<true>(p, stream) : launch_dtype<false>(p, stream);
}

}  // namespace flashdino
