// The elementwise and row-wise steps of the composite TTT forward and backward (ttt_bwd_composite.cpp)
// as one launch each, on float32 rows: the per-token terms of the update's gradient and its backward,
// of the read and its backward, and the row normalization of the packed fast weights with its backward. Between them
// the composite runs batched matmuls (cuBLAS). The ATen versions in ttt_bwd_composite.cpp are the
// reference (tests/test_ttt_cuda_emu.py runs these kernels under the CPU emulation against them).
// Deterministic: every sum is one warp's shuffle tree in a fixed order, no atomics.
#include <c10/cuda/CUDAException.h>

#include "ttt/ttt_cuda.h"
#include "ttt/ttt_kernel_utils.cuh"

namespace allmem::ttt::cuda {
namespace {

constexpr int kTermsThreads = 256;
constexpr int kTermsWarps = kTermsThreads / 32;

// One warp per token row (rows [8 * block, 8 * block + 8)), lanes over the h hidden units.
__global__ void __launch_bounds__(kTermsThreads) update_terms_kernel(const UpdateTermsParams p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, h = p.h;
  const int64_t row = int64_t{blockIdx.x} * kTermsWarps + warp;
  if (row >= p.rows) return;  // the whole warp
  const float* p1 = p.p1 + row * 4 * h;
  const float* p2 = p.p2 + row * 2 * h;
  float* f1 = p.f1 + row * 4 * h;
  float* f2 = p.f2 + row * 2 * h;
  const float eg = p.eta[row * 3], eu = p.eta[row * 3 + 1], ed = p.eta[row * 3 + 2];
  float sg = 0.f, su = 0.f, sd = 0.f;
  for (int j = lane; j < h; j += 32) {
    const float a = p1[j], b = p1[h + j], pg = p1[2 * h + j], pu = p1[3 * h + j];
    const float e = p2[j], ps = p2[h + j];
    const float sig = sigmoidf(a), silu = a * sig;
    const float d1 = sig * (1.f + a * (1.f - sig));                  // silu'(a)
    const float d2 = sig * (1.f - sig) * (2.f + a * (1.f - 2.f * sig));  // silu''(a)
    const float s = silu * b, xu = e * silu, xg = e * b * d1;
    const float rd = ps * ed, ru = pu * eu, rg = pg * eg;
    sg += pg * xg;
    su += pu * xu;
    sd += ps * s;
    f1[j] = rd * b * d1 + ru * e * d1 + rg * e * b * d2;  // da
    f1[h + j] = rd * silu + rg * e * d1;                  // db
    f1[2 * h + j] = eg * xg;
    f1[3 * h + j] = eu * xu;
    f2[j] = ru * silu + rg * b * d1;  // de
    f2[h + j] = ed * s;
  }
  sg = warp_sum(sg);
  su = warp_sum(su);
  sd = warp_sum(sd);
  if (lane == 0) {
    p.deta[row * 3] = sg;
    p.deta[row * 3 + 1] = su;
    p.deta[row * 3 + 2] = sd;
  }
}

// Elementwise over [rows, h] (thread per element).
__global__ void __launch_bounds__(kTermsThreads) read_terms_kernel(const ReadTermsParams p) {
  const int64_t i = int64_t{blockIdx.x} * kTermsThreads + threadIdx.x;
  const int h = p.h;
  if (i >= p.rows * h) return;
  const int64_t row = i / h;
  const int j = static_cast<int>(i % h);
  const float a = p.ab[row * 2 * h + j], b = p.ab[row * 2 * h + h + j];
  const float sig = sigmoidf(a), silu = a * sig;
  p.s[i] = silu * b;
  if (p.ds == nullptr) return;
  const float ds = p.ds[i], d1 = sig * (1.f + a * (1.f - sig));
  p.f[row * 2 * h + j] = ds * b * d1;
  p.f[row * 2 * h + h + j] = ds * silu;
}

// Elementwise over [rows, h] (thread per element).
__global__ void __launch_bounds__(kTermsThreads) grad_terms_kernel(const GradTermsParams p) {
  const int64_t i = int64_t{blockIdx.x} * kTermsThreads + threadIdx.x;
  const int h = p.h;
  if (i >= p.rows * h) return;
  const int64_t row = i / h;
  const int j = static_cast<int>(i % h);
  const float a = p.ab[row * 2 * h + j], b = p.ab[row * 2 * h + h + j], e = p.e[i];
  const float sig = sigmoidf(a), silu = a * sig, d1 = sig * (1.f + a * (1.f - sig));
  p.fgu[row * 2 * h + j] = -p.eta[row * 3] * e * b * d1;
  p.fgu[row * 2 * h + h + j] = -p.eta[row * 3 + 1] * e * silu;
  p.fd[i] = -p.eta[row * 3 + 2] * silu * b;
}

// One warp per weight row: batch entry b, row r of its 2h + d rows (gate, up: length d; down: h).
__global__ void __launch_bounds__(kTermsThreads) row_norm_kernel(const RowNormParams p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, d = p.d, h = p.h;
  const int rows = 2 * h + d;
  const int64_t job = int64_t{blockIdx.x} * kTermsWarps + warp;
  if (job >= p.batch * rows) return;
  const int64_t b = job / rows;
  const int r = static_cast<int>(job % rows);
  const int len = r < 2 * h ? d : h;
  const int64_t off = r < 2 * h ? int64_t{r} * d : 2 * int64_t{h} * d + int64_t{r - 2 * h} * h;
  const float* w = p.w + b * p.w_batch_stride + off;
  float* out = p.out + b * 3 * int64_t{h} * d + off;
  const float target = p.target[b * rows + r];
  float ss = 0.f;
  for (int c = lane; c < len; c += 32) ss += w[c] * w[c];
  const float rho = sqrtf(warp_sum(ss)), denom = rho + kNormEps, scale = target / denom;
  if (p.g == nullptr) {
    for (int c = lane; c < len; c += 32) out[c] = w[c] * scale;
    return;
  }
  const float* g = p.g + b * 3 * int64_t{h} * d + off;
  const float* ga = p.g_add != nullptr ? p.g_add + b * 3 * int64_t{h} * d + off : nullptr;
  auto grad = [&](int c) { return ga != nullptr ? g[c] + ga[c] : g[c]; };
  float gw = 0.f;
  for (int c = lane; c < len; c += 32) gw += grad(c) * w[c];
  gw = warp_sum(gw);
  const float coef = -target * gw / (denom * denom * (rho > 0.f ? rho : 1.f));
  for (int c = lane; c < len; c += 32) out[c] = grad(c) * scale + w[c] * coef;
  if (lane == 0) p.dtarget[b * rows + r] += gw / denom;
}

// One warp per weight row, as row_norm_kernel.
__global__ void __launch_bounds__(kTermsThreads) prep_kernel(const PrepParams p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, d = p.d, h = p.h;
  const int rows = 2 * h + d;
  const int64_t job = int64_t{blockIdx.x} * kTermsWarps + warp;
  if (job >= p.batch * rows) return;
  const int64_t b = job / rows, hd = int64_t{h} * d;
  const int r = static_cast<int>(job % rows);
  const bool gu = r < 2 * h;
  const int len = gu ? d : h;
  const int64_t off = gu ? int64_t{r} * d : 2 * hd + int64_t{r - 2 * h} * h;
  const float* w = p.w + b * p.w_batch_stride + off;
  float scale = 1.f;
  if (p.target != nullptr) {
    float ss = 0.f;
    for (int c = lane; c < len; c += 32) ss += w[c] * w[c];
    scale = p.target[b * rows + r] / (sqrtf(warp_sum(ss)) + kNormEps);
  }
  const float* a = p.a + b * 3 * hd + off;
  const float* bb = p.b + b * 3 * hd + off;
  float* dsum = p.dsum + b * 3 * hd + off;
  // gate/up row r: wk rows r (weights) and 2h + r (D); down row r - 2h: wv columns [0, h) and [h, 2h)
  float* w_dst = gu ? p.wk + b * 4 * hd + int64_t{r} * d : p.wv + b * 2 * hd + int64_t{r - 2 * h} * 2 * h;
  float* d_dst = gu ? p.wk + b * 4 * hd + int64_t{2 * h + r} * d : w_dst + h;
  for (int c = lane; c < len; c += 32) {
    const float dv = a[c] + bb[c];
    w_dst[c] = w[c] * scale;
    d_dst[c] = dv;
    dsum[c] = dv;
  }
}

// Block per chain.
__global__ void __launch_bounds__(kTermsThreads) momentum_kernel(const MomentumParams p) {
  extern __shared__ float4 smem4[];
  float* red = reinterpret_cast<float*>(smem4);  // kTermsWarps + 1 floats
  const int64_t b = blockIdx.x;
  const float* D = p.dsum + b * p.n;
  const float* M = p.m + b * p.m_batch_stride;
  float part = 0.f;
  for (int64_t i = threadIdx.x; i < p.n; i += kTermsThreads) part += D[i] * M[i];
  const float g = block_sum<kTermsWarps>(part, red) / static_cast<float>(p.chunk);
  for (int64_t t = threadIdx.x; t < p.chunk; t += kTermsThreads) p.dmu_rows[b * p.chunk + t] = g;
  if (p.live != nullptr && !p.live[b]) return;
  const float mu = p.mu[b];
  for (int64_t i = threadIdx.x; i < p.n; i += kTermsThreads) p.dm[b * p.n + i] = D[i] * mu;
}

unsigned blocks_for(int64_t items, int per_block) { return static_cast<unsigned>((items + per_block - 1) / per_block); }

}  // namespace

void launch_update_terms(const UpdateTermsParams& p, cudaStream_t stream) {
  if (p.rows == 0) return;
  update_terms_kernel<<<blocks_for(p.rows, kTermsWarps), kTermsThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_prep(const PrepParams& p, cudaStream_t stream) {
  if (p.batch == 0) return;
  prep_kernel<<<blocks_for(p.batch * (2 * p.h + p.d), kTermsWarps), kTermsThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_momentum(const MomentumParams& p, cudaStream_t stream) {
  if (p.batch == 0) return;
  momentum_kernel<<<static_cast<unsigned>(p.batch), kTermsThreads, (kTermsWarps + 1) * sizeof(float), stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_read_terms(const ReadTermsParams& p, cudaStream_t stream) {
  if (p.rows == 0) return;
  read_terms_kernel<<<blocks_for(p.rows * p.h, kTermsThreads), kTermsThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_grad_terms(const GradTermsParams& p, cudaStream_t stream) {
  if (p.rows == 0) return;
  grad_terms_kernel<<<blocks_for(p.rows * p.h, kTermsThreads), kTermsThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_row_norm(const RowNormParams& p, cudaStream_t stream) {
  if (p.batch == 0) return;
  row_norm_kernel<<<blocks_for(p.batch * (2 * p.h + p.d), kTermsWarps), kTermsThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace allmem::ttt::cuda
