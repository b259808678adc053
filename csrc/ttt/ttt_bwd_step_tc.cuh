// One completed chunk's update backward on the tensor cores, for a batch of chains (d = h = D in
// {64, 128}, bf16/fp16 operands, float32 state, sm_90 clusters): the sequential step of the
// composite backward's walk (ttt_bwd_composite.cpp), which otherwise runs it as about a dozen
// batched ATen launches per chunk (launch- and latency-bound at small batches, float32 GEMMs).
// Parameters and outputs: BwdStepParams (ttt_cuda.h).
//
// One cluster of kP = 8 CTAs per chain, split by hidden units like the forward's chain
// (ttt_chain_tc.cuh): CTA r owns the units U = [r kU, (r + 1) kU): rows U of W_gate and W_up,
// columns U of W_down, and the same slices of the momenta and of the gradients dW, dM. Per chunk:
//  1. the weights the update's gradient was taken at, Wx (normalize(W), or W in LaCT order, where
//     Z = W + M_next was normalized: dZ from the incoming dW first), and D = dM + dW (or dM + dZ):
//     their owned slices as 16-bit operand tiles and into the stacked wk / wv; dM <- mu D. The
//     row norms of W_down (rows split over the CTAs) are partial sums exchanged through
//     distributed shared memory (summed in rank order: every CTA gets the same scales).
//  2. every 64-token tile of the chunk (k, v by cp.async one tile ahead), warp w its 16 tokens:
//     a = K Wg[U]^T, b = K Wu[U]^T, pg = K Dg[U]^T, pu = K Du[U]^T, e = V Wd[:, U], ps = V Dd[:, U]
//     (mma.sync), the per-token terms of the update's backward for the units U (f1, f2 out to
//     global memory, their rate-gradient sums per CTA), then dWx_g[U]^T += K^T da,
//     dWx_u[U]^T += K^T db, dWx_d[:, U] += V^T de in float registers across the tiles.
//  3. the normalization's backward of dWx + dW at W (default order; the W_down rows' dot products
//     exchanged like the norms) or dW = dZ + dWx (LaCT order), plus the read's gradient; the
//     momentum's gradient <D, M> / C (partials exchanged) into every row of dmu.
// No partial sums of the weight gradients cross the cluster: each unit's is complete in its CTA.
// dk = f1 wk and dv = f2 wv^T sum over all hidden units: the caller's batched products.
#pragma once
#include <cstdint>

#include "ttt/ttt_chain_tc.cuh"
#include "ttt/ttt_cuda.h"
#include "ttt/ttt_fwd_tc.cuh"
#include "ttt/ttt_tc_ops.cuh"

namespace allmem::ttt::cuda::tc {

template <int D>
struct BwdStepTraits {
  static constexpr int kD = D;
  static constexpr int kP = 8;          // CTAs per chain (a cluster)
  static constexpr int kU = D / kP;     // hidden units owned by one CTA
  static_assert(kU % 8 == 0, "whole n8 blocks of owned units");
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kTile = 64;
  static constexpr int kLd = D + 8;     // 16-bit token rows and gate/up rows
  static constexpr int kLdU = kU + 8;   // 16-bit rows of the W_down[:, U] tiles and the factor tiles
  static constexpr int kMB = D / 64;    // 16-row blocks of the gradient products per warp
  static constexpr int kNB = kU / 8;    // n8 blocks of the owned units
  static constexpr int kOwnElems = 3 * kU * D;
  static constexpr int kRows = 2 * kU + D;  // owned gate rows, owned up rows, every down row
  // Shared memory, bytes.
  static constexpr int kTileBytes = kTile * kLd * 2;
  static constexpr int kOffK = 0;                                   // [64][kLd] k (two buffers)
  static constexpr int kOffV = kOffK + kTileBytes;                  // [64][kLd] v
  static constexpr int kOffK2 = kOffV + kTileBytes;                 // the next tile's k, v
  static constexpr int kOffV2 = kOffK2 + kTileBytes;
  static constexpr int kOffWg = kOffV2 + kTileBytes;                // [kU][kLd] Wx_gate[U]
  static constexpr int kOffWu = kOffWg + kU * kLd * 2;              // [kU][kLd] Wx_up[U]
  static constexpr int kOffDg = kOffWu + kU * kLd * 2;              // [kU][kLd] D_gate[U]
  static constexpr int kOffDu = kOffDg + kU * kLd * 2;              // [kU][kLd] D_up[U]
  static constexpr int kOffWd = kOffDu + kU * kLd * 2;              // [D][kLdU] Wx_down[:, U]
  static constexpr int kOffDd = kOffWd + D * kLdU * 2;              // [D][kLdU] D_down[:, U]
  static constexpr int kOffX = kOffDd + D * kLdU * 2;               // [3][64][kLdU] da, db, de
  static constexpr int kOffEta = kOffX + 3 * kTile * kLdU * 2;      // [64][4] rates
  static constexpr int kOffG = kOffEta + kTile * 4 * 4;             // float [3][D][kU] dWx (c, unit)
  static constexpr int kOffTarget = kOffG + kOwnElems * 4;          // [kRows] row-norm targets
  static constexpr int kOffScale = kOffTarget + kRows * 4;          // [kRows] target / (||x|| + eps)
  static constexpr int kOffCoef = kOffScale + kRows * 4;            // [kRows] LaCT: dZ's second coefficient
  static constexpr int kOffRho = kOffCoef + kRows * 4;              // [kRows] ||x|| of the rows
  static constexpr int kOffX1 = kOffRho + kRows * 4;               // [2][D] partials: sum of squares, <dW, Z>
  static constexpr int kOffX2 = kOffX1 + 2 * D * 4;                 // [D + 4] partials: <g, W> of down rows, <D, M>
  static constexpr int kOffRed = kOffX2 + (D + 4) * 4;              // [8]
  static constexpr int kSmemBytes = kOffRed + 8 * 4;
  static_assert(kSmemBytes <= 227 * 1024, "must fit the opt-in shared memory of sm_90");
  static_assert(kOffWg % 16 == 0 && kOffWd % 16 == 0 && kOffX % 16 == 0 && kOffEta % 16 == 0 && kOffG % 16 == 0 &&
                    kOffK2 % 16 == 0 && kOffTarget % 16 == 0,
                "16-byte aligned regions");
};

template <typename T, int D>
__global__ void __launch_bounds__(BwdStepTraits<D>::kThreads, 1) ttt_bwd_step_tc_kernel(const BwdStepParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap();  // launched with 8-CTA clusters, which need sm_90 (the dispatcher checks)
  return;
#else
  using Tr = BwdStepTraits<D>;
  constexpr int kP = Tr::kP, kU = Tr::kU, kT = Tr::kThreads, kTile = Tr::kTile, kLd = Tr::kLd, kLdU = Tr::kLdU;
  constexpr int kMB = Tr::kMB, kNB = Tr::kNB, kOE = Tr::kOwnElems, kRows = Tr::kRows;
  constexpr int64_t HD = int64_t{D} * D;
  unsigned char* smem = dynamic_smem();
  T* const sK1 = reinterpret_cast<T*>(smem + Tr::kOffK);
  T* const sV1 = reinterpret_cast<T*>(smem + Tr::kOffV);
  T* const sK2 = reinterpret_cast<T*>(smem + Tr::kOffK2);
  T* const sV2 = reinterpret_cast<T*>(smem + Tr::kOffV2);
  T* sWg = reinterpret_cast<T*>(smem + Tr::kOffWg);
  T* sWu = reinterpret_cast<T*>(smem + Tr::kOffWu);
  T* sDg = reinterpret_cast<T*>(smem + Tr::kOffDg);
  T* sDu = reinterpret_cast<T*>(smem + Tr::kOffDu);
  T* sWd = reinterpret_cast<T*>(smem + Tr::kOffWd);
  T* sDd = reinterpret_cast<T*>(smem + Tr::kOffDd);
  T* sX = reinterpret_cast<T*>(smem + Tr::kOffX);
  float* sEta = reinterpret_cast<float*>(smem + Tr::kOffEta);
  float* sG = reinterpret_cast<float*>(smem + Tr::kOffG);
  float* sTarget = reinterpret_cast<float*>(smem + Tr::kOffTarget);
  float* sScale = reinterpret_cast<float*>(smem + Tr::kOffScale);
  float* sCoef = reinterpret_cast<float*>(smem + Tr::kOffCoef);
  float* sRho = reinterpret_cast<float*>(smem + Tr::kOffRho);
  float* sX1 = reinterpret_cast<float*>(smem + Tr::kOffX1);
  float* sX2 = reinterpret_cast<float*>(smem + Tr::kOffX2);
  float* sRed = reinterpret_cast<float*>(smem + Tr::kOffRed);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int rank = cluster_rank();
  const int64_t ch = blockIdx.x / kP;  // the chain
  const int64_t C = p.chunk;
  const int u0 = rank * kU;
  const bool lact = p.lact_order;
  const float* const W = p.w + ch * p.w_stride;  // [3][HD], then M [3][HD]
  const float* const Mx = W + 3 * HD;
  const float* const Mn = lact ? p.m_next + ch * p.w_stride : nullptr;
  float* const dW = p.dw + ch * 3 * HD;
  float* const dM = p.dm + ch * 3 * HD;
  const float* const dWr = p.dw_read != nullptr ? p.dw_read + ch * 3 * HD : nullptr;
  float* const dTg = p.d_targets + ch * 3 * D;
  const T* const K = static_cast<const T*>(p.k) + ch * C * D;
  const T* const V = static_cast<const T*>(p.v) + ch * C * D;
  const float* const eta = p.eta + ch * C * 3;
  T* const F1 = static_cast<T*>(p.f1) + ch * C * 4 * D;
  T* const F2 = static_cast<T*>(p.f2) + ch * C * 2 * D;
  T* const WK = static_cast<T*>(p.wk) + ch * 4 * HD;
  T* const WV = static_cast<T*>(p.wv) + ch * 2 * HD;
  float* const detaP = p.deta_part + (ch * kP + rank) * C * 3;
  const float mu_j = p.mu[ch];

  // Owned element e <-> offset in the full [3][D*D] matrices: e < 2 kU D: rows U of W_gate / W_up
  // ([kU][D] each); else W_down[:, U] stored [D][kU] (element (c, i) is W_down[c, u0 + i]).
  auto full_off = [&](int e) -> int64_t {
    if (e < 2 * kU * D) {
      const int m = e / (kU * D), i = (e / D) % kU, c = e % D;
      return int64_t{m} * HD + int64_t{u0 + i} * D + c;
    }
    const int f = e - 2 * kU * D, c = f / kU, i = f % kU;
    return 2 * HD + int64_t{c} * D + u0 + i;
  };
  // The owned row of element e: [0, kU) gate, [kU, 2 kU) up, 2 kU + c down row c.
  auto row_of = [&](int e) { return e < 2 * kU * D ? e / D : 2 * kU + (e - 2 * kU * D) / kU; };
  // The row-norm target index (in [3D]) of owned row r.
  auto target_index = [&](int r) { return r < kU ? u0 + r : r < 2 * kU ? D + u0 + r - kU : 2 * D + r - 2 * kU; };
  // The matrix that Wx / D are normalized or taken from: Z = W + M_next in LaCT order, else W.
  auto xval = [&](int64_t off) { return lact ? W[off] + Mn[off] : W[off]; };
  // A fixed-order CTA sum of one value per thread (every thread gets it).
  auto cta_sum = [&](float x) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
    __syncthreads();  // sRed is free
    if (lane == 0) sRed[warp] = x;
    __syncthreads();
    return sRed[0] + sRed[1] + sRed[2] + sRed[3];
  };

  for (int r = tid; r < kRows; r += kT) sTarget[r] = p.targets[ch * 3 * D + target_index(r)];
  cluster_sync();  // every CTA of the cluster runs before any reads of its shared memory

  // 1. Norms of the rows of X (and, LaCT, their dot products with the incoming dW): gate/up rows
  // whole in this CTA (a warp per row), down rows as partial sums over the owned columns.
  for (int r = warp; r < 2 * kU; r += Tr::kWarps) {
    float ss = 0.f, gw = 0.f;
    for (int c = lane; c < D; c += 32) {
      const int64_t off = full_off(r * D + c);
      const float x = xval(off);
      ss += x * x;
      if (lact) gw += dW[off] * x;
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      ss += __shfl_xor_sync(0xffffffffu, ss, off);
      gw += __shfl_xor_sync(0xffffffffu, gw, off);
    }
    if (lane == 0) {
      const RowNormBwd nb = row_norm_bwd_tc(sTarget[r], sqrtf(ss), gw);
      sRho[r] = sqrtf(ss);
      sScale[r] = nb.scale;
      if (lact) {
        sCoef[r] = nb.coef;
        dTg[target_index(r)] += nb.dtarget;
      }
    }
  }
  for (int c = tid; c < D; c += kT) {
    float ss = 0.f, gw = 0.f;
    for (int i = 0; i < kU; ++i) {
      const int64_t off = full_off(2 * kU * D + c * kU + i);
      const float x = xval(off);
      ss += x * x;
      if (lact) gw += dW[off] * x;
    }
    sX1[c] = ss;
    sX1[D + c] = gw;
  }
  cluster_sync();
  for (int c = tid; c < D; c += kT) {
    float ss = 0.f, gw = 0.f;
    for (int peer = 0; peer < kP; ++peer) {
      const float* x1 = cluster_peer(sX1, peer);
      ss += x1[c];
      gw += x1[D + c];
    }
    const int r = 2 * kU + c;
    const RowNormBwd nb = row_norm_bwd_tc(sTarget[r], sqrtf(ss), gw);
    sRho[r] = sqrtf(ss);
    sScale[r] = nb.scale;
    if (lact) {
      sCoef[r] = nb.coef;
      if (rank == 0) dTg[2 * D + c] += nb.dtarget;
    }
  }
  __syncthreads();

  // Wx and D of the owned elements as 16-bit operands (shared memory and the stacked wk / wv),
  // dM <- mu D, and this CTA's share of <D, M>.
  float dot_dm = 0.f;
  for (int e = tid; e < kOE; e += kT) {
    const int64_t off = full_off(e);
    const int r = row_of(e);
    const float w = W[off], dw = dW[off];
    float wx, dv;
    if (lact) {
      const float z = w + Mn[off];
      wx = w;
      dv = dM[off] + (dw * sScale[r] + z * sCoef[r]);  // dM + dZ
    } else {
      wx = w * sScale[r];
      dv = dM[off] + dw;
    }
    dot_dm += dv * Mx[off];
    dM[off] = mu_j * dv;
    const T wx16 = from_float<T>(wx), dv16 = from_float<T>(dv);
    if (e < 2 * kU * D) {
      const int i = r % kU, c = e % D;
      const bool up = r >= kU;
      (up ? sWu : sWg)[i * kLd + c] = wx16;
      (up ? sDu : sDg)[i * kLd + c] = dv16;
      const int64_t row = (up ? D : 0) + u0 + i;  // wk rows: Wg, Wu, Dg, Du
      WK[row * D + c] = wx16;
      WK[(2 * D + row) * D + c] = dv16;
    } else {
      const int f = e - 2 * kU * D, c = f / kU, i = f % kU;
      sWd[c * kLdU + i] = wx16;
      sDd[c * kLdU + i] = dv16;
      WV[int64_t{c} * 2 * D + u0 + i] = wx16;  // wv row c: Wd | Dd
      WV[int64_t{c} * 2 * D + D + u0 + i] = dv16;
    }
  }
  const float dmu_part = cta_sum(dot_dm);  // ends with a barrier: the operand tiles are written

  // 2. The chunk's tiles.
  const int row0 = warp * 16, g = lane / 4, c2 = 2 * (lane % 4);
  float acc[3][kMB][kNB][4] = {};
  const int64_t n_tiles = (C + kTile - 1) / kTile;
  auto stage_kv = [&](int64_t ti, int buf) {
    const int64_t t0 = ti * kTile;
    T* const dk = buf ? sK2 : sK1;
    T* const dv = buf ? sV2 : sV1;
    constexpr int kChunks = D / 8;  // 16-byte pieces per row
    for (int e = tid; e < kTile * kChunks; e += kT) {
      const int t = e / kChunks, c = (e % kChunks) * 8;
      const bool in = t0 + t < C;
      const int64_t src = (in ? t0 + t : 0) * D + c;
      cp_async16(dk + t * kLd + c, K + src, in);
      cp_async16(dv + t * kLd + c, V + src, in);
    }
  };
  stage_kv(0, 0);
  cp_async_commit();
  int buf = 0;
  for (int64_t ti = 0; ti < n_tiles; ++ti, buf ^= 1) {
    const int64_t t0 = ti * kTile;
    const int nt = static_cast<int>(C - t0 < kTile ? C - t0 : kTile);
    const T* const sK = buf ? sK2 : sK1;
    const T* const sV = buf ? sV2 : sV1;
    // sEta and the other buffer were last read by the previous tile, which ended with a barrier.
    // Rows past the chunk end are zero (k, v and rates), so they add nothing.
    for (int e = tid; e < kTile * 4; e += kT) {
      const int t = e / 4, m = e % 4;
      sEta[e] = m < 3 && t < nt ? eta[(t0 + t) * 3 + m] : 0.f;
    }
    if (ti + 1 < n_tiles) stage_kv(ti + 1, buf ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    float pa[kNB][4] = {}, pb[kNB][4] = {}, pg[kNB][4] = {}, pu[kNB][4] = {}, pe[kNB][4] = {}, ps[kNB][4] = {};
#pragma unroll 2
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t ak[4], av[4];
      ldsm_x4(ak, sK + (row0 + lane % 16) * kLd + kk * 16 + (lane / 16) * 8);
      ldsm_x4(av, sV + (row0 + lane % 16) * kLd + kk * 16 + (lane / 16) * 8);
#pragma unroll
      for (int nb = 0; nb < kNB; ++nb) {
        mma_n8_wt_ld(pa[nb], ak, sWg, kLd, nb * 8, kk, lane);  // a = K Wg[U]^T
        mma_n8_wt_ld(pb[nb], ak, sWu, kLd, nb * 8, kk, lane);  // b = K Wu[U]^T
        mma_n8_wt_ld(pg[nb], ak, sDg, kLd, nb * 8, kk, lane);  // pg = K Dg[U]^T
        mma_n8_wt_ld(pu[nb], ak, sDu, kLd, nb * 8, kk, lane);  // pu = K Du[U]^T
        mma_n8_w_ld(pe[nb], av, sWd, kLdU, nb * 8, kk, lane);  // e = V Wd[:, U]
        mma_n8_w_ld(ps[nb], av, sDd, kLdU, nb * 8, kk, lane);  // ps = V Dd[:, U]
      }
    }
    // The per-token terms (the composite's update_terms), rows t = row0 + g (+ 8), units
    // nb * 8 + c2 (+ 1).
    float sum_g[2] = {0.f, 0.f}, sum_u[2] = {0.f, 0.f}, sum_d[2] = {0.f, 0.f};
#pragma unroll
    for (int nb = 0; nb < kNB; ++nb) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int t = row0 + g + 8 * half, u = nb * 8 + c2;
        const float eg = sEta[t * 4 + 0], eu = sEta[t * 4 + 1], ed = sEta[t * 4 + 2];
        float f[6][2];
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          const int k = 2 * half + q;
          const UpdateTerms t6 =
              update_terms_tc(pa[nb][k], pb[nb][k], pe[nb][k], pg[nb][k], pu[nb][k], ps[nb][k], eg, eu, ed);
          sum_g[half] += t6.tg;
          sum_u[half] += t6.tu;
          sum_d[half] += t6.td;
          f[0][q] = t6.da;
          f[1][q] = t6.db;
          f[2][q] = t6.fg;  // eta_g x_g
          f[3][q] = t6.fu;  // eta_u x_u
          f[4][q] = t6.de;
          f[5][q] = t6.fs;  // eta_d s
        }
        store_pair(sX + t * kLdU + u, f[0][0], f[0][1]);
        store_pair(sX + kTile * kLdU + t * kLdU + u, f[1][0], f[1][1]);
        store_pair(sX + 2 * kTile * kLdU + t * kLdU + u, f[4][0], f[4][1]);
        if (t < nt) {
          T* const r1 = F1 + (t0 + t) * 4 * D + u0 + u;
          T* const r2 = F2 + (t0 + t) * 2 * D + u0 + u;
#pragma unroll
          for (int m = 0; m < 4; ++m) store_pair(r1 + m * D, f[m][0], f[m][1]);
          store_pair(r2, f[4][0], f[4][1]);
          store_pair(r2 + D, f[5][0], f[5][1]);
        }
      }
    }
    // The rate gradients summed over this CTA's units (the quad's lanes hold the rest of a row).
#pragma unroll
    for (int half = 0; half < 2; ++half) {
#pragma unroll
      for (int off = 1; off < 4; off <<= 1) {
        sum_g[half] += __shfl_xor_sync(0xffffffffu, sum_g[half], off);
        sum_u[half] += __shfl_xor_sync(0xffffffffu, sum_u[half], off);
        sum_d[half] += __shfl_xor_sync(0xffffffffu, sum_d[half], off);
      }
      const int t = row0 + g + 8 * half;
      if (lane % 4 == 0 && t < nt) {
        float* dst = detaP + (t0 + t) * 3;
        dst[0] = sum_g[half];
        dst[1] = sum_u[half];
        dst[2] = sum_d[half];
      }
    }
    __syncthreads();
    // dWx_g[U]^T += K^T da, dWx_u[U]^T += K^T db, dWx_d[:, U] += V^T de (the forward chain's
    // gradient products).
    units_grad_products<T, D, kU>(acc, sK, sV, sX, warp, lane);
    __syncthreads();  // sK, sV, sX, sEta are reused by the next tile
  }

  // 3. dWx to shared memory: matrix m, [D][kU] (c, unit).
  store_units_grads<D, kU>(sG, acc, warp, lane);
  __syncthreads();
  // dWx of owned element e (sG holds gate/up transposed).
  auto gx = [&](int e) {
    if (e < 2 * kU * D) {
      const int m = e / (kU * D), i = (e / D) % kU, c = e % D;
      return sG[m * D * kU + c * kU + i];
    }
    return sG[e];  // W_down[:, U] is [D][kU] in both
  };
  auto finish = [&](int e, float x) {  // the gradient wrt the W before the chunk, plus the read's
    const int64_t off = full_off(e);
    dW[off] = dWr != nullptr ? x + dWr[off] : x;
  };
  if (lact) {  // dW = dZ + dWx
    for (int e = tid; e < kOE; e += kT) {
      const int64_t off = full_off(e);
      const int r = row_of(e);
      const float dz = dW[off] * sScale[r] + (W[off] + Mn[off]) * sCoef[r];
      finish(e, dz + gx(e));
    }
    if (tid == 0) sX2[D] = dmu_part;
  } else {  // the normalization's backward of g = dWx + dW at W
    for (int r = warp; r < 2 * kU; r += Tr::kWarps) {
      float gw = 0.f;
      for (int c = lane; c < D; c += 32) {
        const int64_t off = full_off(r * D + c);
        gw += (gx(r * D + c) + dW[off]) * W[off];
      }
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) gw += __shfl_xor_sync(0xffffffffu, gw, off);
      const RowNormBwd nb = row_norm_bwd_tc(sTarget[r], sRho[r], gw);  // W's norm from step 1
      if (lane == 0) dTg[target_index(r)] += nb.dtarget;
      for (int c = lane; c < D; c += 32) {
        const int e = r * D + c;
        const int64_t off = full_off(e);
        finish(e, (gx(e) + dW[off]) * nb.scale + W[off] * nb.coef);
      }
    }
    for (int c = tid; c < D; c += kT) {  // down rows: partial <g, W> over the owned columns
      float gw = 0.f;
      for (int i = 0; i < kU; ++i) {
        const int e = 2 * kU * D + c * kU + i;
        const int64_t off = full_off(e);
        gw += (gx(e) + dW[off]) * W[off];
      }
      sX2[c] = gw;
    }
    if (tid == 0) sX2[D] = dmu_part;
  }
  cluster_sync();
  if (!lact) {
    for (int c = tid; c < D; c += kT) {
      float gw = 0.f;
      for (int peer = 0; peer < kP; ++peer) gw += cluster_peer(sX2, peer)[c];
      const RowNormBwd nb = row_norm_bwd_tc(sTarget[2 * kU + c], sRho[2 * kU + c], gw);  // W's norm from step 1
      if (rank == 0) dTg[2 * D + c] += nb.dtarget;
      for (int i = 0; i < kU; ++i) {
        const int e = 2 * kU * D + c * kU + i;
        const int64_t off = full_off(e);
        finish(e, (gx(e) + dW[off]) * nb.scale + W[off] * nb.coef);
      }
    }
  }
  {
    float tot = 0.f;
    for (int peer = 0; peer < kP; ++peer) tot += cluster_peer(sX2, peer)[D];
    const float dmu_row = tot / static_cast<float>(C);
    for (int64_t t = rank * kT + tid; t < C; t += kP * kT) p.dmu[ch * C + t] = dmu_row;
  }
  cluster_sync();  // no CTA exits while a peer may still read its partials
#endif
}

}  // namespace allmem::ttt::cuda::tc
