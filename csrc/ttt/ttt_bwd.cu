// CUDA backward of the TTT memory, the hand-derived backward of the CPU op (ttt_cpu.cpp,
// ttt_chunk.h) step for step: per (sequence, head), segments in reverse from the forward's
// checkpoints; a completed chunk runs the backward of its update (momentum, closed-form gradient,
// row normalization), then the segment's read backward adds its weight gradient. The weights a
// LaCT-order normalization saw are W + M_next (the next checkpoint's momentum), so nothing is
// recomputed. SIMT, deterministic (fixed-order reductions, no atomics). Tiles: ttt_traits.cuh.
#include <c10/cuda/CUDAException.h>

#include "ttt/ttt_cuda.h"
#include "ttt/ttt_kernel_utils.cuh"
#include "ttt/ttt_traits.cuh"

namespace allmem::ttt::cuda {
namespace {

// In place on g: the gradient wrt w of w * target / (||w|| + eps), rows along the last dim, from
// the gradient g wrt its output (ttt_chunk.h row_normalize_backward); adds to dtarget.
template <int R, int K, int kWarps>
__device__ void row_normalize_backward(const float* w, const float* target, float* g, float* dtarget) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int r = warp; r < R; r += kWarps) {
    float ss = 0.f, gw = 0.f;
    for (int c = lane; c < K; c += 32) {
      const float x = w[r * K + c];
      ss += x * x;
      gw += g[r * K + c] * x;
    }
    ss = warp_sum(ss);
    gw = warp_sum(gw);
    const float rho = sqrtf(ss), denom = rho + kNormEps;
    if (lane == 0) dtarget[r] += gw / denom;
    const float rho_safe = rho > 0.f ? rho : 1.f;
    const float coef = -target[r] * gw / (denom * denom * rho_safe), scale = target[r] / denom;
    for (int c = lane; c < K; c += 32) g[r * K + c] = g[r * K + c] * scale + w[r * K + c] * coef;
  }
}

template <int D, int Hd>
__global__ void __launch_bounds__(BwdTraits<D, Hd>::kThreads, 1) ttt_bwd_kernel(const BwdParams p) {
  using Tr = BwdTraits<D, Hd>;
  constexpr int kT = Tr::kThreads, kTile = Tr::kTile, kW = Tr::kWarps;
  constexpr int kLdD = Tr::kLdD, kLdH = Tr::kLdH, PW = Tr::kPendWidth;
  constexpr int64_t HD = Tr::kMat;
  extern __shared__ float4 smem4[];
  float* smem = reinterpret_cast<float*>(smem4);
  float* X1 = smem + Tr::kOffX;  // q, or the chunk's k
  float* X2 = X1 + kTile * kLdD;  // grad_o, or the chunk's v
  float* X3 = X2 + kTile * kLdD;  // dq, or dk
  float* X4 = X3 + kTile * kLdD;  // dv
  float* A = smem + Tr::kOffH;
  float* B = A + kTile * kLdH;
  float* E = B + kTile * kLdH;
  float* PS = E + kTile * kLdH;
  float* PU = PS + kTile * kLdH;
  float* PG = PU + kTile * kLdH;
  float* ETA = smem + Tr::kOffEta;
  float* TG = smem + Tr::kOffTarget;
  float* DTG = smem + Tr::kOffDTarget;
  float* RED = smem + Tr::kOffRed;

  const int tid = threadIdx.x;
  const int64_t H = p.heads, C = p.chunk, N = p.n_seqs;
  const int64_t n = blockIdx.x / H, hh = blockIdx.x % H;
  const int64_t start = p.seq[n], len = p.seq[N + n], p0 = p.seq[2 * N + n], slot0 = p.seq[3 * N + n];
  const int64_t n_segs = (p0 + len) / C + 1;

  float* dWg = p.d_fast + (n * H + hh) * 6 * HD;  // dWg, dWu, dWd, dMg, dMu, dMd
  float* dWu = dWg + HD;
  float* dWd = dWg + 2 * HD;
  float* dM = dWg + 3 * HD;
  float* S = p.scratch + (n * H + hh) * 3 * HD;
  const int64_t pstride = H * PW;
  const float* pend = p.pend_in + (n * C * H + hh) * PW;  // row t at pend + t * pstride
  const float* gpend = p.grad_pend + (n * C * H + hh) * PW;
  float* dpend = p.d_pend + (n * C * H + hh) * PW;

  row_norms<Hd, D, kW>(p.w_gate + hh * HD, TG);
  row_norms<Hd, D, kW>(p.w_up + hh * HD, TG + Hd);
  row_norms<D, Hd, kW>(p.w_down + hh * HD, TG + 2 * Hd);
  for (int i = tid; i < 2 * Hd + D; i += kT) DTG[i] = 0.f;
  __syncthreads();

  auto tok = [&](int64_t token) { return token * H + hh; };

  for (int64_t i = n_segs - 1; i >= 0; --i) {
    const int64_t pb = i == 0 ? p0 : 0;
    const int64_t pos = i == 0 ? 0 : C - p0 + (i - 1) * C;
    const int64_t seg = (len - pos < C - pb) ? len - pos : C - pb;
    const int64_t first = start + pos;
    const float* W = p.ckpt + ((slot0 + i) * H + hh) * 6 * HD;  // (W, M) at the segment start
    const float* M = W + 3 * HD;
    // Chunk row t: the initial pending row t (t < pb) or token first + t - pb.
    auto chunk_in = [&](int64_t t, int c) -> float {  // c in the pending row layout k | v | eta | mu
      if (t < pb) return pend[t * pstride + c];
      const int64_t row = tok(first + t - pb);
      if (c < D) return load_in(p.k, row * D + c, p.dtype);
      if (c < 2 * D) return load_in(p.v, row * D + c - D, p.dtype);
      if (c < 2 * D + 3) return load_in(p.eta, row * 3 + c - 2 * D, p.dtype);
      return load_in(p.mu, row, p.dtype);
    };
    auto chunk_grad_out = [&](int64_t t, int c, float x) {
      if (t < pb) {
        dpend[t * pstride + c] = x;
        return;
      }
      const int64_t row = tok(first + t - pb);
      if (c < D) {
        p.dk[row * D + c] = x;
      } else if (c < 2 * D) {
        p.dv[row * D + c - D] = x;
      } else if (c < 2 * D + 3) {
        p.deta[row * 3 + c - 2 * D] = x;
      } else {
        p.dmu[row] = x;
      }
    };

    if (i + 1 < n_segs) {  // a completed chunk: backward of its update
      const float* Mn = p.ckpt + ((slot0 + i + 1) * H + hh) * 6 * HD + 3 * HD;  // M after the update
      float part = 0.f;
      for (int64_t t = tid; t < C; t += kT) part += chunk_in(t, 2 * D + 3);
      const float mu_j = block_sum<kW>(part, RED) / static_cast<float>(C);
      const float* Wx;  // the weights the gradient was taken at
      if (!p.lact_order) {
        for (int64_t e = tid; e < 3 * HD; e += kT) S[e] = W[e];
        __syncthreads();
        row_normalize<Hd, D, kW>(S, TG);
        row_normalize<Hd, D, kW>(S + HD, TG + Hd);
        row_normalize<D, Hd, kW>(S + 2 * HD, TG + 2 * Hd);
        for (int64_t e = tid; e < 3 * HD; e += kT) dM[e] += dWg[e];  // dM_new = dM + dW
        Wx = S;
      } else {
        for (int64_t e = tid; e < 3 * HD; e += kT) S[e] = W[e] + Mn[e];  // Z, the normalized input
        __syncthreads();
        row_normalize_backward<Hd, D, kW>(S, TG, dWg, DTG);  // dW <- dZ
        row_normalize_backward<Hd, D, kW>(S + HD, TG + Hd, dWu, DTG + Hd);
        row_normalize_backward<D, Hd, kW>(S + 2 * HD, TG + 2 * Hd, dWd, DTG + 2 * Hd);
        __syncthreads();
        for (int64_t e = tid; e < 3 * HD; e += kT) dM[e] += dWg[e];  // dM_new = dM + dZ
        Wx = W;
      }
      __syncthreads();
      float dot = 0.f;
      for (int64_t e = tid; e < 3 * HD; e += kT) dot += dM[e] * M[e];
      const float dmu_row = block_sum<kW>(dot, RED) / static_cast<float>(C);  // each token gets 1/C
      const float* Wxg = Wx;
      const float* Wxu = Wx + HD;
      const float* Wxd = Wx + 2 * HD;
      const float* Pg = dM;  // dM_new = -dL/dG
      const float* Pu = dM + HD;
      const float* Pd = dM + 2 * HD;
      for (int64_t t0 = 0; t0 < C; t0 += kTile) {
        const int nt = static_cast<int>(C - t0 < kTile ? C - t0 : kTile);
        for (int e = tid; e < kTile * D; e += kT) {
          const int t = e / D, c = e % D;
          X1[t * kLdD + c] = t < nt ? chunk_in(t0 + t, c) : 0.f;
          X2[t * kLdD + c] = t < nt ? chunk_in(t0 + t, D + c) : 0.f;
        }
        for (int e = tid; e < kTile * 3; e += kT) {
          const int t = e / 3, m = e % 3;
          ETA[t * 4 + m] = t < nt ? chunk_in(t0 + t, 2 * D + m) : 0.f;
        }
        __syncthreads();
        tile_x_wt<Hd, D, kTile, kT>(X1, kLdD, Wxg, A, kLdH);  // a = K Wg^T
        tile_x_wt<Hd, D, kTile, kT>(X1, kLdD, Wxu, B, kLdH);  // b = K Wu^T
        tile_x_w<Hd, D, kTile, kT>(X2, kLdD, Wxd, E, kLdH);   // e = V Wd
        tile_x_w<Hd, D, kTile, kT>(X2, kLdD, Pd, PS, kLdH);   // -ps = V dMn_d
        tile_x_wt<Hd, D, kTile, kT>(X1, kLdD, Pu, PU, kLdH);  // -pu = K dMn_u^T
        tile_x_wt<Hd, D, kTile, kT>(X1, kLdD, Pg, PG, kLdH);  // -pg = K dMn_g^T
        __syncthreads();
        // ttt_chunk.h update_grad_backward, one warp per token (its rate gradients are row sums).
        for (int t = tid / 32; t < kTile; t += kW) {
          const float eg = ETA[t * 4 + 0], eu = ETA[t * 4 + 1], ed = ETA[t * 4 + 2];
          float sum_g = 0.f, sum_u = 0.f, sum_d = 0.f;
          for (int r = tid % 32; r < Hd; r += 32) {
            const int j = t * kLdH + r;
            const float x = A[j], y = B[j], z = E[j];
            const float sg = sigmoidf(x), om = 1.f - sg;
            const float silu = x * sg, d1 = sg * (1.f + x * om), d2 = sg * om * (2.f + x * (1.f - 2.f * sg));
            const float s = silu * y, xu = z * silu, xg = z * y * d1;
            const float ps = -PS[j], pu = -PU[j], pg = -PG[j];
            const float rd = ps * ed, ru = pu * eu, rg = pg * eg;
            sum_g += pg * xg;
            sum_u += pu * xu;
            sum_d += ps * s;
            E[j] = -(ru * silu + rg * y * d1);                      // de
            A[j] = -(rd * y * d1 + ru * z * d1 + rg * z * y * d2);  // da
            B[j] = -(rd * silu + rg * z * d1);                      // db
            PS[j] = s * ed;
            PU[j] = xu * eu;
            PG[j] = xg * eg;
          }
          sum_g = warp_sum(sum_g);
          sum_u = warp_sum(sum_u);
          sum_d = warp_sum(sum_d);
          if (tid % 32 == 0 && t < nt) {
            chunk_grad_out(t0 + t, 2 * D + 0, -sum_g);
            chunk_grad_out(t0 + t, 2 * D + 1, -sum_u);
            chunk_grad_out(t0 + t, 2 * D + 2, -sum_d);
            chunk_grad_out(t0 + t, 2 * D + 3, dmu_row);
          }
        }
        __syncthreads();
        // dk = da Wg + db Wu + (eta_u x_u) dMn_u + (eta_g x_g) dMn_g
        tile_x_w<D, Hd, kTile, kT>(A, kLdH, Wxg, X3, kLdD);
        tile_x_w<D, Hd, kTile, kT, true>(B, kLdH, Wxu, X3, kLdD);
        tile_x_w<D, Hd, kTile, kT, true>(PU, kLdH, Pu, X3, kLdD);
        tile_x_w<D, Hd, kTile, kT, true>(PG, kLdH, Pg, X3, kLdD);
        // dv = de Wd^T + (eta_d s) dMn_d^T
        tile_x_wt<D, Hd, kTile, kT>(E, kLdH, Wxd, X4, kLdD);
        tile_x_wt<D, Hd, kTile, kT, true>(PS, kLdH, Pd, X4, kLdD);
        // dW_G: dWg += da^T K, dWu += db^T K, dWd += V^T de
        add_yt_x<Hd, D, kTile, kT>(dWg, A, kLdH, X1, kLdD);
        add_yt_x<Hd, D, kTile, kT>(dWu, B, kLdH, X1, kLdD);
        add_yt_x<D, Hd, kTile, kT>(dWd, X2, kLdD, E, kLdH);
        __syncthreads();
        for (int e = tid; e < nt * D; e += kT) {
          const int t = e / D, c = e % D;
          chunk_grad_out(t0 + t, c, X3[t * kLdD + c]);
          chunk_grad_out(t0 + t, D + c, X4[t * kLdD + c]);
        }
        __syncthreads();
      }
      if (!p.lact_order) {
        row_normalize_backward<Hd, D, kW>(W, TG, dWg, DTG);
        row_normalize_backward<Hd, D, kW>(W + HD, TG + Hd, dWu, DTG + Hd);
        row_normalize_backward<D, Hd, kW>(W + 2 * HD, TG + 2 * Hd, dWd, DTG + 2 * Hd);
      }
      for (int64_t e = tid; e < 3 * HD; e += kT) dM[e] *= mu_j;
      __syncthreads();
    } else {  // the trailing partial chunk only lands in the state: its gradient is grad_pending's
      for (int64_t e = tid; e < (pb + seg) * PW; e += kT) {
        const int64_t t = e / PW;
        const int c = static_cast<int>(e % PW);
        chunk_grad_out(t, c, gpend[t * pstride + c]);
      }
    }

    // Read backward: ds = dO Wd, da = ds b silu'(a), db = ds silu(a);
    // dWd += dO^T s, dWg += da^T Q, dWu += db^T Q, dq = da Wg + db Wu [+ dO].
    for (int64_t t0 = 0; t0 < seg; t0 += kTile) {
      const int nt = static_cast<int>(seg - t0 < kTile ? seg - t0 : kTile);
      for (int e = tid; e < kTile * D; e += kT) {
        const int t = e / D, c = e % D;
        const int64_t row = tok(first + t0 + t) * D + c;
        X1[t * kLdD + c] = t < nt ? load_in(p.q, row, p.dtype) : 0.f;
        X2[t * kLdD + c] = t < nt ? load_in(p.grad_o, row, p.dtype) : 0.f;
      }
      __syncthreads();
      tile_x_wt<Hd, D, kTile, kT>(X1, kLdD, W, A, kLdH);
      tile_x_wt<Hd, D, kTile, kT>(X1, kLdD, W + HD, B, kLdH);
      tile_x_w<Hd, D, kTile, kT>(X2, kLdD, W + 2 * HD, E, kLdH);
      __syncthreads();
      for (int e = tid; e < kTile * Hd; e += kT) {
        const int j = (e / Hd) * kLdH + e % Hd;
        const float x = A[j], y = B[j], g = E[j];
        const float sg = sigmoidf(x), silu = x * sg, d1 = sg * (1.f + x * (1.f - sg));
        A[j] = silu * y;   // s
        B[j] = g * silu;   // db
        E[j] = g * y * d1;  // da
      }
      __syncthreads();
      add_yt_x<D, Hd, kTile, kT>(dWd, X2, kLdD, A, kLdH);
      add_yt_x<Hd, D, kTile, kT>(dWg, E, kLdH, X1, kLdD);
      add_yt_x<Hd, D, kTile, kT>(dWu, B, kLdH, X1, kLdD);
      tile_x_w<D, Hd, kTile, kT>(E, kLdH, W, X3, kLdD);
      tile_x_w<D, Hd, kTile, kT, true>(B, kLdH, W + HD, X3, kLdD);
      __syncthreads();
      for (int e = tid; e < nt * D; e += kT) {
        const int t = e / D, c = e % D;
        p.dq[tok(first + t0 + t) * D + c] = X3[t * kLdD + c] + (p.residual ? X2[t * kLdD + c] : 0.f);
      }
      __syncthreads();
    }
  }
  for (int e = tid; e < 2 * Hd + D; e += kT) p.d_targets[(n * H + hh) * (2 * Hd + D) + e] = DTG[e];
}

template <int D, int Hd>
void launch(const BwdParams& p, cudaStream_t stream) {
  using Tr = BwdTraits<D, Hd>;
  auto kernel = ttt_bwd_kernel<D, Hd>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes));
  const dim3 grid(static_cast<unsigned>(p.n_seqs * p.heads));
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void launch_ttt_bwd(const BwdParams& p, int d, int h, cudaStream_t stream) {
  if (d == 64 && h == 64) return launch<64, 64>(p, stream);
  if (d == 64 && h == 128) return launch<64, 128>(p, stream);
  if (d == 128 && h == 64) return launch<128, 64>(p, stream);
  if (d == 128 && h == 128) return launch<128, 128>(p, stream);
  TORCH_CHECK(false, "allmem: launch_ttt_bwd: unsupported d = ", d, ", h = ", h,
              " (the caller checks d, h in {64, 128})");
}

}  // namespace allmem::ttt::cuda
