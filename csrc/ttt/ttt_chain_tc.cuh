// The sequential chain of the TTT memory's forward, split by hidden units (d = h = D in {64, 128},
// bf16/fp16, sm_90): the update-only half of split mode (the reads run in parallel afterwards,
// ttt_read_tc.cuh), for heads too large for the token-split cluster kernel (ttt_fwd_tc.cuh).
//
// One cluster of kP = 8 CTAs per (sequence, head) (at D = 128 also 16: twice the SMs per chain for
// small batches, ALLMEM_TTT_TC_CLUSTER); CTA r owns the hidden units U = [r kU, (r + 1) kU), kU = D / kP: rows U of W_gate and W_up, columns U of W_down, and their
// momenta (float32, in shared memory). Every CTA walks all tokens of every chunk (k, v from L2):
//   a = K Wg[U]^T, b = K Wu[U]^T, e = V Wd[:, U]   (64-token tiles, 4 warps x 16 tokens, mma.sync)
//   per-token factors Xg, Xu, Sd for the units U      (registers -> 16-bit tiles)
//   -Gg[U]^T = K^T Xg, -Gu[U]^T = K^T Xu, -Gd[:, U] = V^T Sd   (float accumulators in registers)
// so the gradient of each owned unit is complete inside its CTA: no partial sums cross the cluster.
// The one cluster exchange per chunk is the row norms of W_down (its rows are split over the CTAs):
// partial sums of squares, summed over the 8 CTAs in rank order (deterministic; every CTA gets the
// same scales), double-buffered so one cluster barrier per chunk suffices. mu's chunk mean is
// computed by every CTA in the same order.
// Same segments, checkpoints, final state and chunk buffer as ttt_fwd_tc.cuh; o is not written.
//
// S > 1 (d = 128; ALLMEM_TTT_TC_CHAIN_PARTS): the job's CTAs are P unit groups x S token parts; the
// CTA of part t walks only the chunk's tiles t, t + S, ..., so its -G and momentum sum are partial:
// after the tiles one more barrier, and every CTA of a unit group adds the S parts' partials in part
// order (so all S hold the same weights; part 0 writes the state). See kOffGsum, kXchgFloats.
//
// kGx (any sm_80+ device; the CTAs of a job need not share a cluster): the row-norm partials go
// through global memory (FwdParams::xchg) and the one barrier per chunk is a counter in global memory
// (xcta_barrier); the host launches the jobs cooperatively, in waves of jobs that are co-resident
// (launch_ttt_chain_tc), buffers and counters indexed by the job's place in its wave. The sums run in the same rank order, so the results are bitwise the cluster
// kernel's. -G then lies over the prefetch buffers (free between chunks): 143 KB at d = 128 instead
// of 167 KB, within an A100's 163 KB.
#pragma once
#include <cstdint>

#include "ttt/ttt_cuda.h"
#include "ttt/ttt_fwd_tc.cuh"
#include "ttt/ttt_tc_ops.cuh"

namespace allmem::ttt::cuda::tc {

template <int D, bool kGx = false, int P = 8, int S = 1>
struct ChainTcTraits {
  static constexpr int kD = D;
  static constexpr int kUG = P;      // unit groups: CTAs that split the hidden units
  static constexpr int kS = S;       // token parts: CTAs of one unit group that split a chunk's tiles
  static constexpr int kP = P * S;   // CTAs per job (rank r: unit group r % P, token part r / P)
  static constexpr int kU = D / kUG;  // hidden units owned by one CTA
  static_assert(kU >= 8 && kU % 8 == 0, "whole n8 blocks of owned units");
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kTile = 64;
  static constexpr int kLd = D + 8;    // 16-bit token rows and W_gate/W_up rows
  static constexpr int kLdU = kU + 8;  // 16-bit rows of W_down[:, U] and of the factor tiles
  static constexpr int kMB = D / 64;   // 16-row blocks of the gradient products per warp
  static constexpr int kNB = kU / 8;   // n8 blocks of the owned units
  static constexpr int kPendWidth = 2 * D + 4;
  static constexpr int kOwnElems = 3 * kU * D;
  // Shared memory, bytes.
  static constexpr int kOffK = 0;                                  // [64][kLd] k
  static constexpr int kOffV = kOffK + kTile * kLd * 2;            // [64][kLd] v
  static constexpr int kOffWg = kOffV + kTile * kLd * 2;           // [kU][kLd] W_gate[U] operand
  static constexpr int kOffWu = kOffWg + kU * kLd * 2;             // [kU][kLd] W_up[U] operand
  static constexpr int kOffWd = kOffWu + kU * kLd * 2;             // [D][kLdU] W_down[:, U] operand
  static constexpr int kOffX = kOffWd + D * kLdU * 2;              // [3][64][kLdU] Xg, Xu, Sd
  static constexpr int kOffEta = kOffX + 3 * kTile * kLdU * 2;     // [64][4] rates
  static constexpr int kOffW = kOffEta + kTile * 4 * 4;            // float W: Wg[U] [kU][D], Wu[U], Wd[:, U] [D][kU]
  static constexpr int kOffM = kOffW + kOwnElems * 4;              // float M, same layout
  static constexpr int kOffTarget = kOffM + (kGx ? 1 : 2) * kOwnElems * 4;  // [2 kU + D] row-norm targets
  static constexpr int kOffScale = kOffTarget + (2 * kU + D) * 4;  // [2 kU + D] normalization scales
  static constexpr int kOffNorm = kOffScale + (2 * kU + D) * 4;    // [2][D] partial W_down row sums of squares
  static constexpr int kOffRed = kOffNorm + 2 * D * 4;             // [8]
  static constexpr int kOffK2 = kOffRed + 8 * 4;                   // [64][kLd] k, v of the next tile
  static constexpr int kOffV2 = kOffK2 + kTile * kLd * 2;          //   (cp.async prefetch)
  static constexpr int kSmemBytes = kOffV2 + kTile * kLd * 2;
  // float -G: GgT, GuT [D][kU], Gd [D][kU], after M; kGx: over K2, V2 (written after a chunk's last
  // tile, read before the next chunk's first prefetch).
  static constexpr int kOffG = kGx ? kOffK2 : kOffM + kOwnElems * 4;
  static_assert(!kGx || kOwnElems * 4 <= 2 * kTile * kLd * 2, "-G fits over the prefetch buffers");
  // S > 1: the sum of the S token parts' -G (float, sG's layout) over the prefetch buffers, which
  // are free between a chunk's last tile and the next chunk's first prefetch. kGx: the partials
  // themselves go through global memory (below), so this is sG's place too.
  static constexpr int kOffGsum = kOffK2;
  static_assert(S == 1 || kOwnElems * 4 <= 2 * kTile * kLd * 2, "the summed -G fits over the prefetch buffers");
  static_assert(S == 1 || S == 2 || S == 4, "1, 2 or 4 token parts");
  // kGx: floats of FwdParams::xchg per job slot of a wave: the row-norm partials [2][kP][D] and,
  // S > 1, every CTA's -G partial and its tiles' momentum sum ([kP][kOwnElems + 8]: the sum padded
  // to 8 floats, so every block starts on a 32-byte sector).
  static constexpr int kPartStride = kOwnElems + 8;
  static_assert((2 * kP * D) % 8 == 0 && kPartStride % 8 == 0, "32-byte blocks");
  static constexpr int kXchgFloats = 2 * kP * D + (S > 1 ? kP * kPartStride : 0);
  static_assert(kSmemBytes <= 227 * 1024, "must fit the opt-in shared memory of sm_90");
  static_assert(kOffWg % 16 == 0 && kOffWd % 16 == 0 && kOffX % 16 == 0 && kOffEta % 16 == 0 && kOffW % 16 == 0 &&
                    kOffK2 % 16 == 0 && kOffV2 % 16 == 0,
                "16-byte aligned regions");
};

// acc += A x W[n0 : n0 + 8, :]^T over k-step kk, W a 16-bit row-major tile with row stride ld.
template <typename T>
__device__ __forceinline__ void mma_n8_wt_ld(float (&acc)[4], const uint32_t (&a)[4], const T* w, int ld, int n0,
                                             int kk, int lane) {
  uint32_t b[2];
  ldsm_x2(b, w + (n0 + lane % 8) * ld + kk * 16 + ((lane / 8) % 2) * 8);
  mma<T>(acc, a, b[0], b[1]);
}

// acc += A x W[:, n0 : n0 + 8] over k-step kk, W a 16-bit row-major tile with row stride ld.
template <typename T>
__device__ __forceinline__ void mma_n8_w_ld(float (&acc)[4], const uint32_t (&a)[4], const T* w, int ld, int n0,
                                            int kk, int lane) {
  uint32_t b[2];
  ldsm_x2_t(b, w + (kk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * ld + n0);
  mma<T>(acc, a, b[0], b[1]);
}

// The weight-gradient products of a chain split by hidden units, over one 64-token tile:
// acc[0] += K^T X0, acc[1] += K^T X1, acc[2] += V^T X2, each [D][kU] (row c of K's / V's columns,
// owned unit); K, V the tile's 16-bit rows [64][D + 8], X the three 16-bit factor tiles
// [3][64][kU + 8]. Warp w (of 4): rows c in [w D/4, (w + 1) D/4), D/64 blocks of 16. Per k-step the
// factor fragments of every n8 block are loaded once for all row blocks (each accumulator still sums
// its k-steps in order).
template <typename T, int D, int kU>
__device__ __forceinline__ void units_grad_products(float (&acc)[3][D / 64][kU / 8][4], const T* sK, const T* sV,
                                                    const T* sX, int warp, int lane) {
  constexpr int kTile = 64, kLd = D + 8, kLdU = kU + 8, kMB = D / 64, kNB = kU / 8;
#pragma unroll
  for (int kk = 0; kk < kTile / 16; ++kk) {
    uint32_t bx[3][kNB][2];
#pragma unroll
    for (int m = 0; m < 3; ++m)
#pragma unroll
      for (int nb = 0; nb < kNB; ++nb)
        ldsm_x2_t(bx[m][nb], sX + m * kTile * kLdU + (kk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * kLdU + nb * 8);
#pragma unroll
    for (int mb = 0; mb < kMB; ++mb) {
      const int m0 = warp * (D / 4) + mb * 16;
      uint32_t aK[4], aV[4];
      const int q4 = lane / 8, i8 = lane % 8;
      ldsm_x4_t(aK, sK + (kk * 16 + i8 + (q4 / 2) * 8) * kLd + m0 + (q4 % 2) * 8);
      ldsm_x4_t(aV, sV + (kk * 16 + i8 + (q4 / 2) * 8) * kLd + m0 + (q4 % 2) * 8);
#pragma unroll
      for (int nb = 0; nb < kNB; ++nb) {
        mma<T>(acc[0][mb][nb], aK, bx[0][nb][0], bx[0][nb][1]);
        mma<T>(acc[1][mb][nb], aK, bx[1][nb][0], bx[1][nb][1]);
        mma<T>(acc[2][mb][nb], aV, bx[2][nb][0], bx[2][nb][1]);
      }
    }
  }
}

// units_grad_products' accumulators to dst: matrix m at dst + m D kU, [D][kU] (c, unit).
template <int D, int kU>
__device__ __forceinline__ void store_units_grads(float* dst, const float (&acc)[3][D / 64][kU / 8][4], int warp,
                                                  int lane) {
  const int g = lane / 4, c2 = 2 * (lane % 4);
#pragma unroll
  for (int m = 0; m < 3; ++m)
#pragma unroll
    for (int mb = 0; mb < D / 64; ++mb)
#pragma unroll
      for (int nb = 0; nb < kU / 8; ++nb)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int c = warp * (D / 4) + mb * 16 + g + 8 * half, u = nb * 8 + c2;
          dst[m * D * kU + c * kU + u] = acc[m][mb][nb][2 * half];
          dst[m * D * kU + c * kU + u + 1] = acc[m][mb][nb][2 * half + 1];
        }
}

template <typename T, int D, bool kGx = false, int P = 8, int S = 1>
__global__ void __launch_bounds__(ChainTcTraits<D, kGx, P, S>::kThreads, 1) ttt_chain_tc_kernel(const FwdParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  if constexpr (!kGx) {
    __trap();  // launched with kP-CTA clusters, which need sm_90 (the dispatcher checks)
    return;
  }
#endif
  using Tr = ChainTcTraits<D, kGx, P, S>;
  constexpr int kP = Tr::kP, kUG = Tr::kUG, kU = Tr::kU, kT = Tr::kThreads, kTile = Tr::kTile, kLd = Tr::kLd;
  constexpr int kLdU = Tr::kLdU, kMB = Tr::kMB, kNB = Tr::kNB, PW = Tr::kPendWidth, kOE = Tr::kOwnElems;
  constexpr int64_t HD = int64_t{D} * D;
  unsigned char* smem = dynamic_smem();
  T* sK = reinterpret_cast<T*>(smem + Tr::kOffK);
  T* sV = reinterpret_cast<T*>(smem + Tr::kOffV);
  T* sWg = reinterpret_cast<T*>(smem + Tr::kOffWg);
  T* sWu = reinterpret_cast<T*>(smem + Tr::kOffWu);
  T* sWd = reinterpret_cast<T*>(smem + Tr::kOffWd);
  T* sX = reinterpret_cast<T*>(smem + Tr::kOffX);
  float* sEta = reinterpret_cast<float*>(smem + Tr::kOffEta);
  float* sW = reinterpret_cast<float*>(smem + Tr::kOffW);
  float* sM = reinterpret_cast<float*>(smem + Tr::kOffM);
  float* sG = reinterpret_cast<float*>(smem + Tr::kOffG);
  float* sTarget = reinterpret_cast<float*>(smem + Tr::kOffTarget);
  float* sScale = reinterpret_cast<float*>(smem + Tr::kOffScale);
  float* sNorm = reinterpret_cast<float*>(smem + Tr::kOffNorm);
  float* sRed = reinterpret_cast<float*>(smem + Tr::kOffRed);
  T* sK2 = reinterpret_cast<T*>(smem + Tr::kOffK2);
  T* sV2 = reinterpret_cast<T*>(smem + Tr::kOffV2);
  float* sGsum = reinterpret_cast<float*>(smem + Tr::kOffGsum);  // S > 1: the summed -G

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  JobCtas<kP, kGx> ctas;
  const int rank = ctas.rank;
  const int ug = S == 1 ? rank : rank % kUG, tp = S == 1 ? 0 : rank / kUG;  // unit group, token part
  const int64_t wslot = ctas.wslot;
  const int64_t job = p.job0 + wslot;  // job0: this wave's first job (kGx), else 0
  const int64_t H = p.heads, C = p.chunk, N = p.n_seqs;
  const int64_t n = job / H, hh = job % H;
  const int64_t start = p.seq[n], len = p.seq[N + n], p0 = p.seq[2 * N + n];
  int64_t slot = p.seq[3 * N + n];
  const int u0 = ug * kU;  // first owned hidden unit
  const int64_t pstride = H * PW;
  const float* pend0 = p.pend_in + (n * C * H + hh) * PW;  // row t at pend0 + t * pstride
  float* pend = p.pend_out + (n * C * H + hh) * PW;
  auto tok = [&](int64_t token) { return token * H + hh; };
  // Owned element e <-> offset in the full matrix: e < 2 kU D: rows U of W_gate / W_up ([kU][D]);
  // else W_down[:, U] stored [D][kU] (element (c, i) is W_down[c, u0 + i]).
  auto full_off = [&](int e) -> int64_t {
    if (e < 2 * kU * D) {
      const int m = e / (kU * D), i = (e / D) % kU, c = e % D;
      return int64_t{m} * HD + int64_t{u0 + i} * D + c;
    }
    const int f = e - 2 * kU * D, c = f / kU, i = f % kU;
    return 2 * HD + int64_t{c} * D + u0 + i;
  };
  // Row-norm targets: rows U of the gate and up params, every row of the down param.
  auto row_norm = [&](const float* row) {
    float ss = 0.f;
    for (int c = lane; c < D; c += 32) ss += row[c] * row[c];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
    return sqrtf(ss);
  };
  for (int r = warp; r < 2 * kU + D; r += Tr::kWarps) {
    const float* row = r < kU ? p.w_gate + hh * HD + int64_t{u0 + r} * D
                       : r < 2 * kU ? p.w_up + hh * HD + int64_t{u0 + r - kU} * D
                                    : p.w_down + hh * HD + int64_t{r - 2 * kU} * D;
    const float x = row_norm(row);
    if (lane == 0) sTarget[r] = x;
  }
  {
    const float* src = p.fast_in + (n * H + hh) * 6 * HD;
    for (int e = tid; e < kOE; e += kT) {
      sW[e] = src[full_off(e)];
      sM[e] = src[3 * HD + full_off(e)];
    }
  }
  __syncthreads();

  int parity = 0;
  // The job's row-norm partials of this parity: kGx [2][kP][D] floats in global memory (this CTA's
  // row `rank`), else this CTA's sNorm (peers read it through the cluster).
  float* const xjob = kGx ? p.xchg + wslot * int64_t{Tr::kXchgFloats} : nullptr;
  // kGx, S > 1: CTA r's -G partial (sG's layout) and, after it, its tiles' momentum sum.
  auto xpart = [&](int r) { return xjob + 2 * kP * D + r * int64_t{Tr::kPartStride}; };
  // sScale = target / (||row|| + eps) for the owned gate/up rows and every down row of the
  // float weights sW (down rows: partial sums over the unit groups in rank order, read from the CTAs
  // of this token part: every token part holds the same weights). One cluster barrier.
  auto scales = [&]() {
    float* part = kGx ? xjob + (parity * kP + rank) * D : sNorm + parity * D;
    for (int c = tid; c < D; c += kT) {
      float ss = 0.f;
      for (int i = 0; i < kU; ++i) {
        const float x = sW[2 * kU * D + c * kU + i];
        ss += x * x;
      }
      part[c] = ss;
    }
    for (int r = warp; r < 2 * kU; r += Tr::kWarps) {
      const float* row = sW + r * D;
      float ss = 0.f;
      for (int c = lane; c < D; c += 32) ss += row[c] * row[c];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
      if (lane == 0) sScale[r] = sTarget[r] / (sqrtf(ss) + kTcNormEps);
    }
    ctas.barrier(p.xcount);
    for (int c = tid; c < D; c += kT) {
      float ss = 0.f;
      for (int peer = tp * kUG; peer < (tp + 1) * kUG; ++peer) {
        ss += kGx ? ld_cg(xjob + (parity * kP + peer) * D + c) : cluster_peer(part, peer)[c];
      }
      sScale[2 * kU + c] = sTarget[2 * kU + c] / (sqrtf(ss) + kTcNormEps);
    }
    parity ^= 1;
    __syncthreads();
  };

  // The 16-bit operands of the owned weights, scaled by sScale (normalize) or as they are.
  auto operands = [&](bool scaled) {
    for (int e = tid; e < kOE; e += kT) {
      float x = sW[e];
      if (e < 2 * kU * D) {
        const int r = e / D, c = e % D;
        if (scaled) x *= sScale[r];
        (r < kU ? sWg + r * kLd : sWu + (r - kU) * kLd)[c] = from_float<T>(x);
      } else {
        const int f = e - 2 * kU * D, c = f / kU, i = f % kU;
        if (scaled) x *= sScale[2 * kU + c];
        sWd[c * kLdU + i] = from_float<T>(x);
      }
    }
    __syncthreads();
  };

  auto write_state = [&](float* dst) {  // token part 0's CTAs (the others hold the same values)
    if (tp != 0) return;
    for (int e = tid; e < kOE; e += kT) {
      dst[full_off(e)] = sW[e];
      dst[3 * HD + full_off(e)] = sM[e];
    }
  };

  if constexpr (!kGx) cluster_sync();  // every CTA of the cluster runs before any reads of its shared memory
  if (!p.lact_order) scales();
  operands(!p.lact_order);

  // The update of the chunk whose row t is pend0 row t (t < pb) or token first + t - pb.
  auto chunk_update = [&](int64_t pb, int64_t first) {
    const int row0 = warp * 16, g = lane / 4, c2 = 2 * (lane % 4);
    float acc[3][kMB][kNB][4] = {};
    float mu_part = 0.f;
    const int64_t n_tiles = (C + kTile - 1) / kTile;
    // k, v one tile ahead by cp.async into alternating buffers (as ttt_fwd_tc.cuh's update): one
    // committed group per tile, wait_group 1 retires the current one; the other buffer was last
    // read by the previous tile, which ended with a barrier.
    T* const sK1 = sK;
    T* const sV1 = sV;
    auto stage_kv = [&](int64_t ti, int buf) {
      const int64_t t0 = ti * kTile;
      const int nt = static_cast<int>(C - t0 < kTile ? C - t0 : kTile);
      stage_chunk_kv<T, D, true>(p.k, p.v, pend0, pstride, H, hh, first, pb, t0, nt, buf ? sK2 : sK1,
                                 buf ? sV2 : sV1);
    };
    // The rates and momenta of a tile (rows of the buffer as float32, tokens as raw 16-bit values,
    // converted when stored so the loads stay in flight under the products) one tile ahead in
    // registers: element e = tid + j * kT of the tile's [kTile][4] block.
    constexpr int kEtaPer = kTile * 4 / kT;
    static_assert(kEtaPer * kT == kTile * 4, "rate elements split evenly over the threads");
    float eta_pend[kEtaPer];
    T eta_tok[kEtaPer];
    auto load_rates = [&](int64_t ti) {
      const int64_t t0 = ti * kTile;
#pragma unroll
      for (int j = 0; j < kEtaPer; ++j) {
        const int e = tid + j * kT, t = e / 4, m = e % 4;
        const int64_t ct = t0 + t;
        eta_pend[j] = 0.f;
        eta_tok[j] = from_float<T>(0.f);
        if (ct < C) {
          if (ct < pb) {
            eta_pend[j] = pend0[ct * pstride + 2 * D + m];
          } else {
            const int64_t row = tok(first + ct - pb);
            eta_tok[j] = m < 3 ? load_tok<T>(p.eta, row * 3 + m) : load_tok<T>(p.mu, row);
          }
        }
      }
    };
    // S > 1: this CTA takes the tiles tp, tp + S, ... (possibly none).
    if (tp < n_tiles) stage_kv(tp, 0);
    cp_async_commit();
    load_rates(tp);
    int buf = 0;
    for (int64_t ti = tp; ti < n_tiles; ti += S, buf ^= 1) {
      const int64_t t0 = ti * kTile;
      T* const sK = buf ? sK2 : sK1;  // this tile's k, v (shadowing the first buffers)
      T* const sV = buf ? sV2 : sV1;
      // sEta was last read by the previous tile, which ended with a barrier. Rows past the chunk
      // end are zero (rates included), so they add nothing.
#pragma unroll
      for (int j = 0; j < kEtaPer; ++j) {
        const int e = tid + j * kT;
        sEta[e] = t0 + e / 4 < pb ? eta_pend[j] : to_float(eta_tok[j]);
      }
      if (ti + S < n_tiles) {
        stage_kv(ti + S, buf ^ 1);
        load_rates(ti + S);
      }
      cp_async_commit();
      cp_async_wait<1>();
      __syncthreads();
      static_assert(kTile == 64, "warp 0 sums a tile's momenta two per lane");
      if (warp == 0) {  // this tile's momenta (zero past the chunk end), summed by warp 0 in a fixed order
        float s = sEta[lane * 4 + 3] + sEta[(lane + 32) * 4 + 3];
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
        mu_part += s;  // identical in every lane of warp 0; thread 0's is published
      }
      // Per-token factors for the owned units, warp w: tokens [16w, 16w + 16); every n8 block of
      // units per k-step (the k, v fragments loaded once for all of them).
      float ga[kNB][4] = {}, gb[kNB][4] = {}, ge[kNB][4] = {};
#pragma unroll 2
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t ak[4], av[4];
        ldsm_x4(ak, sK + (row0 + lane % 16) * kLd + kk * 16 + (lane / 16) * 8);
        ldsm_x4(av, sV + (row0 + lane % 16) * kLd + kk * 16 + (lane / 16) * 8);
#pragma unroll
        for (int nb = 0; nb < kNB; ++nb) {
          mma_n8_wt_ld(ga[nb], ak, sWg, kLd, nb * 8, kk, lane);  // a = K Wg[U]^T
          mma_n8_wt_ld(gb[nb], ak, sWu, kLd, nb * 8, kk, lane);  // b = K Wu[U]^T
          mma_n8_w_ld(ge[nb], av, sWd, kLdU, nb * 8, kk, lane);  // e = V Wd[:, U]
        }
      }
#pragma unroll
      for (int nb = 0; nb < kNB; ++nb) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int t = row0 + g + 8 * half, u = nb * 8 + c2;
          const float eg = sEta[t * 4 + 0], eu = sEta[t * 4 + 1], ed = sEta[t * 4 + 2];
          float xg[2], xu[2], sd[2];
#pragma unroll
          for (int q = 0; q < 2; ++q) {
            const float x = ga[nb][2 * half + q], y = gb[nb][2 * half + q], z = ge[nb][2 * half + q];
            const float sg = tc_sigmoid(x), silu = x * sg, d1 = sg * (1.f + x * (1.f - sg));
            xg[q] = eg * z * y * d1;
            xu[q] = eu * z * silu;
            sd[q] = ed * silu * y;
          }
          store_pair(sX + t * kLdU + u, xg[0], xg[1]);
          store_pair(sX + kTile * kLdU + t * kLdU + u, xu[0], xu[1]);
          store_pair(sX + 2 * kTile * kLdU + t * kLdU + u, sd[0], sd[1]);
        }
      }
      __syncthreads();
      // -GgT[c, U] += K^T Xg, -GuT[c, U] += K^T Xu, -Gd[c, U] += V^T Sd.
      units_grad_products<T, D, kU>(acc, sK, sV, sX, warp, lane);
      __syncthreads();  // sK, sV, sX, sEta are reused by the next tile
    }
    // -G to shared memory (kGx with S > 1: to this CTA's block of xchg): matrix m, [D][kU] (c, unit).
    float* const gpart = kGx && S > 1 ? xpart(rank) : sG;
    store_units_grads<D, kU>(gpart, acc, warp, lane);
    if (tid == 0) {
      sRed[0] = mu_part;
      if constexpr (kGx && S > 1) gpart[kOE] = mu_part;
    }
    // S > 1: every token part's -G partials and momentum sums, summed in part order (0, 1, ...) by
    // each CTA of the unit group into sGsum / sRed[1] (so all of them hold the same weights). The
    // peers' sG / sRed[0] (or xchg blocks) are read before the barrier in scales() below and next
    // written after it (the next chunk's tiles).
    const float* gsum = sG;
    if constexpr (S > 1) {
      ctas.barrier(p.xcount);
      auto src = [&](int j) -> const float* { return kGx ? xpart(ug + j * kUG) : cluster_peer(sG, ug + j * kUG); };
      for (int e = tid * 4; e < kOE; e += kT * 4) {
        float4 x = kGx ? ld_cg4(src(0) + e) : *reinterpret_cast<const float4*>(src(0) + e);
#pragma unroll
        for (int j = 1; j < S; ++j) {
          const float4 y = kGx ? ld_cg4(src(j) + e) : *reinterpret_cast<const float4*>(src(j) + e);
          x.x += y.x;
          x.y += y.y;
          x.z += y.z;
          x.w += y.w;
        }
        *reinterpret_cast<float4*>(sGsum + e) = x;
      }
      if (tid == 0) {
        float m = kGx ? ld_cg(src(0) + kOE) : cluster_peer(sRed, ug)[0];
        for (int j = 1; j < S; ++j) m += kGx ? ld_cg(src(j) + kOE) : cluster_peer(sRed, ug + j * kUG)[0];
        sRed[1] = m;
      }
      gsum = sGsum;
    }
    __syncthreads();
    const float mu_j = sRed[S > 1 ? 1 : 0] / static_cast<float>(C);
    // M = mu_j M - G, W = W_hat + M (W_hat = normalize(W) unless LaCT order).
    for (int e = tid; e < kOE; e += kT) {
      float neg_g, s;
      if (e < 2 * kU * D) {
        const int m = e / (kU * D), i = (e / D) % kU, c = e % D;
        neg_g = gsum[m * D * kU + c * kU + i];
        s = sScale[m * kU + i];
      } else {
        const int f = e - 2 * kU * D;
        neg_g = gsum[2 * D * kU + f];
        s = sScale[2 * kU + f / kU];
      }
      const float w_hat = p.lact_order ? sW[e] : sW[e] * s;
      const float mom = mu_j * sM[e] + neg_g;
      sM[e] = mom;
      sW[e] = w_hat + mom;
    }
    __syncthreads();
    scales();  // of the new W: LaCT normalizes it now; otherwise the next chunk's W_hat
    if (p.lact_order) {
      for (int e = tid; e < kOE; e += kT) sW[e] *= e < 2 * kU * D ? sScale[e / D] : sScale[2 * kU + (e - 2 * kU * D) / kU];
      __syncthreads();
    }
    operands(!p.lact_order);
  };

  int64_t fill = p0, pos = 0, pb_last = p0, first_last = start;
  while (true) {
    const int64_t pb = fill;
    const int64_t seg = (len - pos < C - fill) ? len - pos : C - fill;
    const int64_t first = start + pos;
    write_state(p.ckpt + (slot * H + hh) * 6 * HD);
    ++slot;
    fill = pb + seg;
    pb_last = pb;
    first_last = first;
    if (fill == C) chunk_update(pb, first);
    pos += seg;
    if (fill < C) break;
    fill = 0;
  }
  // The returned chunk buffer: rows of the trailing partial chunk (kept initial rows, then this
  // call's tokens), zero past it; rows dealt over the cluster.
  for (int64_t t = rank; t < C; t += kP) {
    for (int c = tid; c < PW; c += kT) {
      float x = 0.f;
      if (t < pb_last) {
        x = pend0[t * pstride + c];
      } else if (t < fill) {
        x = pending_elem<T, D>(p.k, p.v, p.eta, p.mu, tok(first_last + t - pb_last), c);
      }
      pend[t * pstride + c] = x;
    }
  }
  write_state(p.fast_out + (n * H + hh) * 6 * HD);
  if constexpr (!kGx) cluster_sync();  // no CTA exits while a peer may still read its row-norm partials
}

}  // namespace allmem::ttt::cuda::tc
