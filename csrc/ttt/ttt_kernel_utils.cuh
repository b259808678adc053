// Device helpers shared by the TTT CUDA kernels (ttt_fwd.cu, ttt_bwd.cu): dtype loads/stores,
// deterministic reductions, row norms, and the SIMT tile products of one CTA. Tile products keep
// the thread -> output mapping fixed for a given R, so products into the same tile can be chained
// (kAccumulate) without a barrier between them.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "ttt/ttt_cuda.h"

namespace allmem::ttt::cuda {

constexpr float kNormEps = 1e-5f;  // SPEC.md: added to the current row norm

__device__ __forceinline__ float load_in(const void* p, int64_t i, InDType dt) {
  switch (dt) {
    case InDType::kBFloat16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case InDType::kFloat16:
      return __half2float(static_cast<const __half*>(p)[i]);
    default:
      return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void store_out(void* p, int64_t i, float x, InDType dt) {
  switch (dt) {
    case InDType::kBFloat16:
      static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(x);
      break;
    case InDType::kFloat16:
      static_cast<__half*>(p)[i] = __float2half_rn(x);
      break;
    default:
      static_cast<float*>(p)[i] = x;
  }
}

__device__ __forceinline__ float sigmoidf(float x) { return 1.f / (1.f + __expf(-x)); }

// Column c of a chunk-buffer row (k | v | eta (3) | mu, width 2d + 4) for the token at packed row
// `row` of the [T, H, x] inputs.
__device__ __forceinline__ float pending_column(const void* k, const void* v, const void* eta, const void* mu,
                                                int64_t row, int c, int d, InDType dt) {
  if (c < d) return load_in(k, row * d + c, dt);
  if (c < 2 * d) return load_in(v, row * d + c - d, dt);
  if (c < 2 * d + 3) return load_in(eta, row * 3 + c - 2 * d, dt);
  return load_in(mu, row, dt);
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// Sum over the CTA in a fixed order; every thread gets the total. `red` holds >= kWarps + 1 floats.
template <int kWarps>
__device__ float block_sum(float x, float* red) {
  x = warp_sum(x);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) red[warp] = x;
  __syncthreads();
  if (threadIdx.x == 0) {
    float t = 0.f;
    for (int w = 0; w < kWarps; ++w) t += red[w];
    red[kWarps] = t;
  }
  __syncthreads();
  const float total = red[kWarps];
  __syncthreads();  // red is reused by the next call
  return total;
}

// L2 norms of the R rows (length K) of a row-major matrix: one warp per row.
template <int R, int K, int kWarps>
__device__ void row_norms(const float* w, float* out) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int r = warp; r < R; r += kWarps) {
    float ss = 0.f;
    for (int c = lane; c < K; c += 32) ss += w[r * K + c] * w[r * K + c];
    ss = warp_sum(ss);
    if (lane == 0) out[r] = sqrtf(ss);
  }
}

// In place: w[r, :] *= target[r] / (||w[r, :]|| + eps). Each warp reads and writes only its
// own rows, so no barrier is needed inside; the caller syncs before the next use of w.
template <int R, int K, int kWarps>
__device__ void row_normalize(float* w, const float* target) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int r = warp; r < R; r += kWarps) {
    float ss = 0.f;
    for (int c = lane; c < K; c += 32) ss += w[r * K + c] * w[r * K + c];
    ss = warp_sum(ss);
    const float scale = target[r] / (sqrtf(ss) + kNormEps);
    for (int c = lane; c < K; c += 32) w[r * K + c] *= scale;
  }
}

// out[t, r] = sum_c x[t, c] * w[r, c] for the kTile rows of the shared tile x [kTile, ldx] and
// the row-major global matrix w [R, K]; out is a shared tile [kTile, ldo] (kAccumulate: out +=). Thread (g, r) keeps
// kPer token rows of column r in registers, so each weight is read once per tile.
template <int R, int K, int kTile, int kThreads, bool kAccumulate = false>
__device__ void tile_x_wt(const float* __restrict__ x, int ldx, const float* w, float* __restrict__ out, int ldo) {
  constexpr int kGroups = kThreads / R;
  constexpr int kPer = kTile / kGroups;
  static_assert(kThreads % R == 0 && kTile % kGroups == 0 && K % 4 == 0, "tile mapping");
  const int r = threadIdx.x % R, g = threadIdx.x / R;
  float acc[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) acc[i] = 0.f;
  const float* wr = w + int64_t{r} * K;
  const float* xg = x + g * kPer * ldx;
#pragma unroll 2
  for (int c = 0; c < K; c += 4) {
    const float4 w4 = *reinterpret_cast<const float4*>(wr + c);
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const float4 x4 = *reinterpret_cast<const float4*>(xg + i * ldx + c);
      acc[i] += x4.x * w4.x + x4.y * w4.y + x4.z * w4.z + x4.w * w4.w;
    }
  }
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    float& o = out[(g * kPer + i) * ldo + r];
    o = kAccumulate ? o + acc[i] : acc[i];
  }
}

// out[t, r] = sum_c x[t, c] * w[c, r] for the row-major global matrix w [K, R] (coalesced in r).
template <int R, int K, int kTile, int kThreads, bool kAccumulate = false>
__device__ void tile_x_w(const float* __restrict__ x, int ldx, const float* w, float* __restrict__ out, int ldo) {
  constexpr int kGroups = kThreads / R;
  constexpr int kPer = kTile / kGroups;
  static_assert(kThreads % R == 0 && kTile % kGroups == 0, "tile mapping");
  const int r = threadIdx.x % R, g = threadIdx.x / R;
  float acc[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) acc[i] = 0.f;
  const float* xg = x + g * kPer * ldx;
#pragma unroll 4
  for (int c = 0; c < K; ++c) {
    const float wc = w[int64_t{c} * R + r];
#pragma unroll
    for (int i = 0; i < kPer; ++i) acc[i] += xg[i * ldx + c] * wc;
  }
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    float& o = out[(g * kPer + i) * ldo + r];
    o = kAccumulate ? o + acc[i] : acc[i];
  }
}

// m[r, c] += sum_t y[t, r] * x[t, c] over the kTile rows of the shared tiles y [kTile, ldy] and
// x [kTile, ldx]; m is a row-major global [R, K] matrix, each element owned by one thread.
template <int R, int K, int kTile, int kThreads>
__device__ void add_yt_x(float* m, const float* __restrict__ y, int ldy, const float* __restrict__ x, int ldx) {
  for (int e = threadIdx.x; e < R * K; e += kThreads) {
    const int r = e / K, c = e % K;
    float acc = 0.f;
#pragma unroll 8
    for (int t = 0; t < kTile; ++t) acc += y[t * ldy + r] * x[t * ldx + c];
    m[e] += acc;
  }
}

}  // namespace allmem::ttt::cuda
