// Tensor-core forward of the TTT memory for d = h = 64 (AllMem's default head), sm_90: one thread
// block cluster of kP CTAs per (sequence, head) splits every chunk's tokens, so the B * H
// sequential chains use kP SMs each instead of one.
//
// Same walk, outputs and checkpoints as the SIMT forward (ttt_fwd.cu) and the CPU op: the
// sequence is cut into segments that each fill the current chunk; at every segment start (W, M)
// goes to the checkpoints, the segment's tokens are read with W, and a completed chunk runs the
// update (row normalization, closed-form gradient with per-token rates, chunk momentum).
//
// Work split, per chunk:
//   * Token tiles (kTile = 64 tokens) are dealt round-robin: chunk tile i belongs to CTA i % kP,
//     for the read, the chunk-buffer rows and the update alike (so the rows a CTA writes to the
//     chunk buffer are the rows it reads back: no global-memory traffic between CTAs).
//   * Each CTA holds the three weights in shared memory as 16-bit tensor-core operands, twice:
//     as they are (the read uses them) and row-normalized (the gradient is taken there; the same
//     copy in LaCT order). Per tile, each of 4 warps owns 16 tokens: a = K Wg^T, b = K Wu^T,
//     e = V Wd with mma.sync (float accumulation), the per-token factors in registers, then the
//     warps own 16 rows of each weight gradient and accumulate X^T K / V^T S over the tile's
//     tokens. Partial gradients stay in registers across the CTA's tiles.
//   * Reduction: every CTA stores its float32 partial gradients in shared memory; after a cluster
//     barrier CTA r sums rows [r * kOwn, (r + 1) * kOwn) of each matrix over the kP CTAs in rank
//     order through distributed shared memory (deterministic: fixed order, no atomics), applies
//     momentum and normalization to those rows in float32 (it owns them: the float32 state is
//     split by rows across the cluster, so row norms are local), and writes the new 16-bit rows
//     into every CTA of the cluster. A second cluster barrier ends the chunk.
// Precision: the state, every accumulation and reduction are float32; the operands of the
// matmuls are the input dtype (bf16 or fp16), as are the per-token factors fed to the gradient
// products. Layout and fragment conventions: ttt_tc_ops.cuh.
#pragma once
#include <cstdint>

#include "ttt/ttt_cuda.h"
#include "ttt/ttt_tc_ops.cuh"

namespace allmem::ttt::cuda::tc {

// P: CTAs per cluster, 8 (the portable maximum, the default) or 16 (a non-portable cluster on
// sm_90: twice the SMs per chain for the B * H <= 8 case; ALLMEM_TTT_TC_CLUSTER, ttt_api_cuda.cpp).
// W: warps per CTA, 4 (the default) or 8 (ALLMEM_TTT_TC_WARPS=8: two warp groups split each tile's
// hidden units and gradient columns, so two warps per SM sub-partition hide each other's latency).
// G: the chain's products on wgmma (sm_90a; ALLMEM_TTT_TC_WGMMA=1, split mode only: no reads, so
// no raw weight copy): every 16-bit tile in 128-byte-swizzled rows from a 1024-byte-aligned base.
// X: without clusters (sm_80+; ALLMEM_TTT_TC_CHAIN=tokens-global): the partial gradients go straight
// from registers to global memory (no sG: 51 KB less, 133 KB in all, within an A100's 163 KB).
template <int P, int W = 4, bool G = false, bool X = false>
struct FwdTcTraitsP {
  static constexpr int kD = 64;  // d = h = 64
  static constexpr int kP = P;
  static constexpr bool kWg = G;
  static constexpr int kWarps = W;
  static constexpr int kGroups = W / 4;  // warp groups: each covers the tile's 64 tokens (16 per warp)
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kTile = 64;          // tokens per tile: 16 per warp
  // 16-bit row stride: 144-byte rows keep ldmatrix conflict-free; G: 128-byte swizzled rows
  static constexpr int kLd = G ? kD : kD + 8;
  static constexpr int kLdG = kD + 4;       // float row stride of the partial gradients
  static constexpr int kOwn = kD / kP;      // rows of each matrix owned by one CTA
  static constexpr int kMat = kD * kD;      // elements of one fast-weight matrix
  static constexpr int kPendWidth = 2 * kD + 4;
  static constexpr int kTileElems = kTile * kLd;  // one 16-bit [64, 64] tile (weights too: 64 rows)
  // Shared memory, bytes.
  static constexpr int kOffWr = 0;                              // [3][64][kLd] weights as they are
  static constexpr int kOffWn = G ? 0 : kOffWr + 3 * kTileElems * 2;  // [3][64][kLd] normalized (G: alone)
  static constexpr int kOffK = kOffWn + 3 * kTileElems * 2;     // [64][kLd] k (read: q)
  static constexpr int kOffV = kOffK + kTileElems * 2;          // [64][kLd] v
  static constexpr int kOffX = kOffV + kTileElems * 2;          // [3][64][kLd] Xg, Xu, Sd factors
  static constexpr int kOffG = kOffX + 3 * kTileElems * 2;      // [3][64][kLdG] float partial -G
  static constexpr int kOffEta = kOffG + (X ? 0 : 3 * kD * kLdG * 4);  // [64][4] eta_g, eta_u, eta_d, mu
  static constexpr int kOffOwnW = kOffEta + kTile * 4 * 4;      // [3][kOwn][64] float W rows owned
  static constexpr int kOffOwnM = kOffOwnW + 3 * kOwn * kD * 4; // [3][kOwn][64] float M rows owned
  static constexpr int kOffTarget = kOffOwnM + 3 * kOwn * kD * 4;  // [3][kOwn] row-norm targets
  static constexpr int kOffScale = kOffTarget + 3 * kOwn * 4;      // [3][kOwn] normalization scales
  static constexpr int kOffRed = kOffScale + 3 * kOwn * 4;         // [4] mu partial sum
  // [64][kLd] k, v of the next tile (G: on a 1024-byte boundary)
  static constexpr int kOffK2 = G ? (kOffRed + 16 + 1023) / 1024 * 1024 : kOffRed + 16;
  static constexpr int kOffV2 = kOffK2 + kTileElems * 2;        //   (the update's cp.async prefetch)
  static constexpr int kOffClock = kOffV2 + kTileElems * 2;    // [kPhaseSlots] int64 phase clocks
  static constexpr int kSmemBytes = kOffClock + kPhaseSlots * 8 + (G ? 1024 : 0);  // G: + alignment slack
  static_assert(kSmemBytes <= 227 * 1024, "must fit the opt-in shared memory of sm_90");
  static_assert(kOffWn % 16 == 0 && kOffK % 16 == 0 && kOffX % 16 == 0 && kOffG % 16 == 0 &&
                    kOffEta % 16 == 0 && kOffOwnW % 16 == 0 && kOffTarget % 16 == 0 && kOffRed % 16 == 0 &&
                    kOffK2 % 16 == 0 && kOffV2 % 16 == 0 && kOffClock % 16 == 0,
                "16-byte aligned regions");
  static_assert(kD % kP == 0 && kOwn * kP == kD, "rows split evenly over the cluster");
  static_assert(kP == 8 || kP == 16, "clusters of 8 or 16 CTAs");
  static_assert(W == 4 || W == 8, "4 or 8 warps");
  static_assert(!(G && X), "the wgmma chain runs on clusters only");
  // X: floats per CTA of a job's reduction buffer in global memory: -G [3][64][64], mu's sum, pad
  // to 8 floats, so every CTA's block starts on a 32-byte sector.
  static constexpr int kPart = 3 * kMat + 8;
  static_assert(kPart % 8 == 0, "32-byte blocks");
  static_assert(!G || (kOffK2 % 1024 == 0 && kOffV2 % 1024 == 0 && kOffX % 1024 == 0),
                "wgmma: 1024-byte-aligned tiles");
  // Element (row, col) of a 16-bit [rows][64] tile: padded rows, or (G) the 128-byte swizzle
  // (16-byte chunk col / 8 of row r stored at chunk (col / 8) ^ (r % 8)).
  static constexpr int el(int row, int col) {
    if constexpr (G) {
      return row * kD + ((((col >> 3) ^ row) & 7) << 3) + (col & 7);
    } else {
      return row * kLd + col;
    }
  }
};
using FwdTcTraits = FwdTcTraitsP<8>;

constexpr float kTcNormEps = 1e-5f;  // SPEC.md: added to the current row norm

// The sum over the kP CTAs of the cluster, in rank order (deterministic), of the four floats at `p`
// (16-byte aligned) in each CTA's shared memory: one 16-byte distributed-shared-memory load per
// peer instead of four. Component-wise the same additions as a scalar loop over the peers.
template <int kP>
__device__ __forceinline__ float4 cluster_sum4(float* p) {
  float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 8  // at most 8 loads in flight (16 peers: registers)
  for (int peer = 0; peer < kP; ++peer) {
    const float4 x = *reinterpret_cast<const float4*>(cluster_peer(p, peer));
    s.x += x.x;
    s.y += x.y;
    s.z += x.z;
    s.w += x.w;
  }
  return s;
}

// The same sum over kP blocks `stride` floats apart in global memory (the kernels without clusters),
// read past L1.
template <int kP>
__device__ __forceinline__ float4 global_sum4(const float* p, int64_t stride) {
  float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 4  // at most 4 loads in flight (sm_80: registers)
  for (int peer = 0; peer < kP; ++peer) {
    const float4 x = ld_cg4(p + peer * stride);
    s.x += x.x;
    s.y += x.y;
    s.z += x.z;
    s.w += x.w;
  }
  return s;
}

// The kP CTAs of one (sequence, head) job: a cluster (rank in it; barrier: cluster_sync) or, kGx,
// CTAs without one (blockIdx.x = the job's slot in its cooperative wave * kP + rank; barrier:
// xcta_barrier on the slot's counter, the slot also indexing the job's exchange buffers).
template <int kP, bool kGx>
struct JobCtas {
  int rank;
  int64_t wslot;
  unsigned gen = 0;  // kGx: barriers passed
  __device__ __forceinline__ JobCtas()
      : rank(kGx ? static_cast<int>(blockIdx.x % kP) : cluster_rank()), wslot(blockIdx.x / kP) {}
  __device__ __forceinline__ void barrier(unsigned* xcount) {
    if constexpr (kGx) {
      xcta_barrier(xcount + wslot * kXcountStride, ++gen * kP);
    } else {
      cluster_sync();
    }
  }
};

__device__ __forceinline__ float tc_sigmoid(float x) { return 1.f / (1.f + fast_exp(-x)); }

// The row normalization's backward (ttt_chunk.h row_normalize_backward) for a row of norm rho,
// target `target` and <g, w> = gw: the gradient wrt w is g * scale + w * coef, the target's gw / (rho
// + eps). A zero row has gw = 0; rho is guarded only against 0 / 0.
struct RowNormBwd {
  float scale, coef, dtarget;
};
__device__ __forceinline__ RowNormBwd row_norm_bwd_tc(float target, float rho, float gw) {
  const float denom = rho + kTcNormEps;
  return {target / denom, -target * gw / (denom * denom * (rho > 0.f ? rho : 1.f)), gw / denom};
}

// The per-token terms of the update gradient's backward at one (token, hidden unit), as the
// composite's update_terms (ttt_bwd_composite.cpp) writes them: from a, b, e (x, y, z), the
// products with D = dL/dM_new (pg = k . Dg, pu = k . Du, ps = v . Dd) and the token's rates, the
// factors da, db, de of the weight and token gradients, the rate-weighted eta_g x_g, eta_u x_u,
// eta_d s, and the unit's terms of the three rate gradients.
struct UpdateTerms {
  float da, db, de, fg, fu, fs, tg, tu, td;
};
__device__ __forceinline__ UpdateTerms update_terms_tc(float x, float y, float z, float pg, float pu, float ps, float eg,
                                                       float eu, float ed) {
  const float sg = tc_sigmoid(x), om = 1.f - sg;
  const float silu = x * sg, d1 = sg * (1.f + x * om), d2 = sg * om * (2.f + x * (1.f - 2.f * sg));
  const float s = silu * y, xu = z * silu, xg = z * y * d1;
  const float rd = ps * ed, ru = pu * eu, rg = pg * eg;
  return {rd * y * d1 + ru * z * d1 + rg * z * y * d2,
          rd * silu + rg * z * d1,
          ru * silu + rg * y * d1,
          xg * eg,
          xu * eu,
          s * ed,
          pg * xg,
          pu * xu,
          ps * s};
}

// A fragments of the 16 rows [row0, row0 + 16) x kK columns of a 16-bit tile (row stride kLd),
// one per k-step.
template <typename T, int kLd = FwdTcTraits::kLd, int kK = 64>
__device__ __forceinline__ void load_a_rows(uint32_t (&a)[kK / 16][4], const T* tile, int row0, int lane) {
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) ldsm_x4(a[kk], tile + (row0 + lane % 16) * kLd + kk * 16 + (lane / 16) * 8);
}

// acc[j] += A x W[n0 + 8j : n0 + 8j + 8, :]^T for j = 0, 1: W is a 16-bit [N, K] row-major tile
// (row stride kLd; W^T is the B operand in "col" form), A the 16 x K fragments of load_a_rows.
template <typename T, int kLd = FwdTcTraits::kLd>
__device__ __forceinline__ void mma_step_wt(float (&acc)[2][4], const uint32_t (&a)[4], const T* w, int n0, int kk,
                                            int lane) {
  uint32_t b[4];
  ldsm_x4(b, w + (n0 + lane % 8 + (lane / 16) * 8) * kLd + kk * 16 + ((lane / 8) % 2) * 8);
  mma<T>(acc[0], a, b[0], b[1]);
  mma<T>(acc[1], a, b[2], b[3]);
}

template <typename T, int kLd = FwdTcTraits::kLd, int kK = 64>
__device__ __forceinline__ void mma_a_wt(float (&acc)[2][4], const uint32_t (&a)[kK / 16][4], const T* w, int n0,
                                         int lane) {
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) mma_step_wt<T, kLd>(acc, a[kk], w, n0, kk, lane);
}

// acc[j] += A x W[:, n0 + 8j : n0 + 8j + 8] over k-step kk: W is a 16-bit [64, N] row-major tile.
template <typename T>
__device__ __forceinline__ void mma_step_w(float (&acc)[2][4], const uint32_t (&a)[4], const T* w, int n0, int kk,
                                           int lane) {
  constexpr int kLd = FwdTcTraits::kLd;
  uint32_t b[4];
  ldsm_x4_t(b, w + (kk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * kLd + n0 + (lane / 16) * 8);
  mma<T>(acc[0], a, b[0], b[1]);
  mma<T>(acc[1], a, b[2], b[3]);
}

// acc[16 rows m0.., 64 cols] += Y[:, m0 : m0 + 16]^T X over the 64 token rows of the 16-bit
// tiles Y [64, 64] and X [64, 64] (both token-major): the weight-gradient products.
// kNb < 4: only the columns [16 nb0, 16 (nb0 + kNb)), acc[j] for column block 16 nb0 + 8 j.
template <typename T, int kNb = 4>
__device__ __forceinline__ void mma_yt_x(float (&acc)[2 * kNb][4], const T* y, int m0, const T* x, int lane,
                                         int nb0 = 0) {
  constexpr int kLd = FwdTcTraits::kLd;
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    uint32_t a[4];
    const int q = lane / 8, i = lane % 8;
    ldsm_x4_t(a, y + (kk * 16 + i + (q / 2) * 8) * kLd + m0 + (q % 2) * 8);
#pragma unroll
    for (int nb = 0; nb < kNb; ++nb) {
      uint32_t b[4];
      ldsm_x4_t(b, x + (kk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * kLd + (nb0 + nb) * 16 + (lane / 16) * 8);
      mma<T>(acc[2 * nb], a, b[0], b[1]);
      mma<T>(acc[2 * nb + 1], a, b[2], b[3]);
    }
  }
}

// For the warp's 16 token rows [row0, row0 + 16) and hidden units [16 hb, 16 hb + 16):
// ga = X1 Wg^T, gb = X1 Wu^T, ge = X2 Wd, with w3 = [Wg | Wu | Wd] 16-bit tiles ([3][64][kLd]) and
// X1, X2 token-major 16-bit tiles. The update's (k, v) and the read backward's (q, dO) products.
template <typename T>
__device__ __forceinline__ void mma_abe(float (&ga)[2][4], float (&gb)[2][4], float (&ge)[2][4], const T* x1,
                                        const T* x2, const T* w3, int hb, int row0, int lane) {
  constexpr int kLd = FwdTcTraits::kLd, kTE = FwdTcTraits::kTileElems;
  // A fragments are reloaded per k-step (ldmatrix is cheap; the callers keep many accumulators).
#pragma unroll 2
  for (int kk = 0; kk < 4; ++kk) {
    uint32_t a1[4], a2[4];
    ldsm_x4(a1, x1 + (row0 + lane % 16) * kLd + kk * 16 + (lane / 16) * 8);
    ldsm_x4(a2, x2 + (row0 + lane % 16) * kLd + kk * 16 + (lane / 16) * 8);
    mma_step_wt(ga, a1, w3, hb * 16, kk, lane);
    mma_step_wt(gb, a1, w3 + kTE, hb * 16, kk, lane);
    mma_step_w(ge, a2, w3 + 2 * kTE, hb * 16, kk, lane);
  }
}

// Row-norm targets of the rows [own0, own0 + kOwn) of each parameter matrix of head hh (one warp
// per row): target[m * kOwn + i] = ||param_m[own0 + i]||.
template <int kOwn = FwdTcTraits::kOwn, int kWarps = FwdTcTraits::kWarps>
__device__ __forceinline__ void owned_targets(const float* w_gate, const float* w_up, const float* w_down,
                                              int64_t hh, int own0, float* target) {
  constexpr int kD = FwdTcTraits::kD;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int r = warp; r < 3 * kOwn; r += kWarps) {
    const float* param = r < kOwn ? w_gate : r < 2 * kOwn ? w_up : w_down;
    const float* row = param + hh * kD * kD + int64_t{own0 + r % kOwn} * kD;
    float ss = 0.f;
    for (int c = lane; c < kD; c += 32) ss += row[c] * row[c];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
    if (lane == 0) target[r] = sqrtf(ss);
  }
}

template <typename T>
__device__ __forceinline__ void store_pair(T* p, float x, float y) {
  *reinterpret_cast<uint32_t*>(p) = pack2<T>(x, y);
}

template <typename T>
__device__ __forceinline__ T load_tok(const void* p, int64_t i) {
  return static_cast<const T*>(p)[i];
}

// Element c of token row `row`'s chunk-buffer row (k | v | eta | mu, D = d = h) as float32.
template <typename T, int D>
__device__ __forceinline__ float pending_elem(const void* k, const void* v, const void* eta, const void* mu,
                                              int64_t row, int c) {
  if (c < D) return to_float(load_tok<T>(k, row * D + c));
  if (c < 2 * D) return to_float(load_tok<T>(v, row * D + c - D));
  if (c < 2 * D + 3) return to_float(load_tok<T>(eta, row * 3 + c - 2 * D));
  return to_float(load_tok<T>(mu, row));
}

// Stages rows [t0, t0 + nt) of a chunk whose row t is the initial pending row t (t < pb, float32,
// rounded to T) or token first + t - pb of head hh: k, v into the 16-bit tiles sK, sV (row stride
// D + 8); rows past nt are zero. kAsync: the token rows by cp.async (the caller commits and waits),
// the others by plain stores. Every thread of the CTA calls it.
template <typename T, int D, bool kAsync = false, int kT = FwdTcTraits::kThreads, bool kSw = false>
__device__ __forceinline__ void stage_chunk_kv(const void* k, const void* v, const float* pend0, int64_t pstride,
                                               int64_t H, int64_t hh, int64_t first, int64_t pb, int64_t t0, int nt,
                                               T* sK, T* sV) {
  constexpr int kTile = FwdTcTraits::kTile;
  static_assert(!kSw || D == 64, "swizzled tiles: 64 columns");
  // Element (t, c) of a tile: padded rows of D + 8, or 128-byte swizzled rows (FwdTcTraitsP<., ., true>).
  auto el = [](int t, int c) { return kSw ? FwdTcTraitsP<8, 4, true>::el(t, c) : t * (D + 8) + c; };
  auto row_of = [&](int64_t ct) { return (first + ct - pb) * H + hh; };
  for (int e = threadIdx.x; e < kTile * (D / 8); e += kT) {
    const int t = e / (D / 8), c = (e % (D / 8)) * 8;
    const int64_t ct = t0 + t;
    if (t < nt && ct >= pb) {
      const int64_t off = row_of(ct) * D + c;
      if constexpr (kAsync) {
        cp_async16(sK + el(t, c), static_cast<const T*>(k) + off, true);
        cp_async16(sV + el(t, c), static_cast<const T*>(v) + off, true);
      } else {
        *reinterpret_cast<uint4*>(sK + el(t, c)) = *reinterpret_cast<const uint4*>(static_cast<const T*>(k) + off);
        *reinterpret_cast<uint4*>(sV + el(t, c)) = *reinterpret_cast<const uint4*>(static_cast<const T*>(v) + off);
      }
    } else {
      const float* r = pend0 + ct * pstride;
#pragma unroll
      for (int q = 0; q < 8; q += 2) {
        const bool in = t < nt;
        store_pair(sK + el(t, c + q), in ? r[c + q] : 0.f, in ? r[c + q + 1] : 0.f);
        store_pair(sV + el(t, c + q), in ? r[D + c + q] : 0.f, in ? r[D + c + q + 1] : 0.f);
      }
    }
  }
}

// Walks the tiles of a segment of `len` tokens, 64 at a time, with each tile's copies issued one
// tile ahead: stage(t0, buf) issues the cp.async copies of the tile at t0 into buffer buf (0 or
// 1); body(t0, nt, buf) runs once that tile is in shared memory and visible to the whole CTA, and
// must end with a barrier after its last read of the buffer (the next stage call writes it). One
// committed group per tile, so wait_group 1 retires the current one. Every thread calls it.
// kProxyFence: the tile is read by wgmma (the async proxy): each thread fences its copies first.
template <bool kProxyFence = false, class Stage, class Body>
__device__ __forceinline__ void prefetched_tiles(int64_t len, Stage&& stage, Body&& body) {
  constexpr int kTile = FwdTcTraits::kTile;
  if (len > 0) {
    stage(int64_t{0}, 0);
    cp_async_commit();
  }
  int buf = 0;
  for (int64_t t0 = 0; t0 < len; t0 += kTile, buf ^= 1) {
    if (t0 + kTile < len) stage(t0 + kTile, buf ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    if constexpr (kProxyFence) fence_proxy_async_shared();
    __syncthreads();
    body(t0, static_cast<int>(len - t0 < kTile ? len - t0 : kTile), buf);
  }
}

// The same rows' eta and mu into sEta [64][4] (zero past nt).
template <typename T>
__device__ __forceinline__ void stage_chunk_eta(const void* eta, const void* mu, const float* pend0, int64_t pstride,
                                                int64_t H, int64_t hh, int64_t first, int64_t pb, int64_t t0, int nt,
                                                int d, float* sEta) {
  constexpr int kT = FwdTcTraits::kThreads, kTile = FwdTcTraits::kTile;
  auto row_of = [&](int64_t ct) { return (first + ct - pb) * H + hh; };
  for (int e = threadIdx.x; e < kTile * 4; e += kT) {
    const int t = e / 4, m = e % 4;
    const int64_t ct = t0 + t;
    float r = 0.f;
    if (t < nt) {
      if (ct < pb) {
        r = pend0[ct * pstride + 2 * d + m];
      } else {
        r = m < 3 ? to_float(load_tok<T>(eta, row_of(ct) * 3 + m)) : to_float(load_tok<T>(mu, row_of(ct)));
      }
    }
    sEta[e] = r;
  }
}

// Read of the 16-bit tokens [first, first + nt) of head hh (row stride H * D, d = h = D): o = Wd
// (silu(Wg q) * (Wu q)) [+ q] with the 16-bit weights sW ([3][D][D + 8]: gate, up, down) of the
// CTA's shared memory; sQ is a [64][D + 8] staging tile (kStaged: already holding the tile, made
// visible by the caller's barrier). Every thread of the CTA (kWarps warps) calls it; with 8 warps
// the second group of 4 computes the other half of o's columns (both compute silu(a) * b whole).
template <typename T, int D = 64, bool kStaged = false, int kWarps = 4>
__device__ __forceinline__ void read_tile_tc(const void* q, void* out, bool residual, int64_t H, int64_t hh,
                                             int64_t first, int nt, T* sQ, const T* sW) {
  constexpr int kT = kWarps * 32, kTile = FwdTcTraits::kTile;
  constexpr int kLd = D + 8, kTE = D * kLd, kB = D / 16, kGroups = kWarps / 4;
  static_assert(kB % kGroups == 0, "o's column blocks split evenly over the warp groups");
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  auto tok = [&](int64_t token) { return token * H + hh; };
  if constexpr (!kStaged) {
    for (int e = tid; e < kTile * (D / 8); e += kT) {
      const int t = e / (D / 8), c = (e % (D / 8)) * 8;
      uint4 x = make_uint4(0u, 0u, 0u, 0u);
      if (t < nt) x = *reinterpret_cast<const uint4*>(static_cast<const T*>(q) + tok(first + t) * D + c);
      *reinterpret_cast<uint4*>(sQ + t * kLd + c) = x;
    }
    __syncthreads();
  }
  const int row0 = (warp % 4) * 16, db0 = (warp / 4) * (kB / kGroups);
  uint32_t aq[kB][4];
  load_a_rows<T, kLd, D>(aq, sQ, row0, lane);
  uint32_t sf[kB][4];  // silu(a) * b as A fragments of the down product, one per 16 hidden units
#pragma unroll
  for (int hb = 0; hb < kB; ++hb) {
    float ga[2][4] = {}, gb[2][4] = {};
    mma_a_wt<T, kLd, D>(ga, aq, sW, hb * 16, lane);
    mma_a_wt<T, kLd, D>(gb, aq, sW + kTE, hb * 16, lane);
    float s[2][4];
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] = ga[j][e] * tc_sigmoid(ga[j][e]) * gb[j][e];
    sf[hb][0] = pack2<T>(s[0][0], s[0][1]);
    sf[hb][1] = pack2<T>(s[0][2], s[0][3]);
    sf[hb][2] = pack2<T>(s[1][0], s[1][1]);
    sf[hb][3] = pack2<T>(s[1][2], s[1][3]);
  }
  const int g = lane / 4, c2 = 2 * (lane % 4);
#pragma unroll
  for (int db = db0; db < db0 + kB / kGroups; ++db) {
    float o[2][4] = {};
    mma_a_wt<T, kLd, D>(o, sf, sW + 2 * kTE, db * 16, lane);  // Wd [d, h] row-major: Wd^T is the B operand
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int t = row0 + g + 8 * half, c = db * 16 + j * 8 + c2;
        if (t >= nt) continue;
        float o0 = o[j][2 * half], o1 = o[j][2 * half + 1];
        if (residual) {
          o0 += to_float(sQ[t * kLd + c]);
          o1 += to_float(sQ[t * kLd + c + 1]);
        }
        store_pair(static_cast<T*>(out) + tok(first + t) * D + c, o0, o1);
      }
    }
  }
  __syncthreads();  // sQ is reused
}

// The wgmma forms of mma_abe and mma_yt_x for the kWg kernels (one warpgroup of 4 warps; every
// 16-bit tile [64][64] in 128-byte-swizzled rows, 1024-byte aligned; descriptor conventions of
// csrc/swa/swa_sm90_utils.cuh). The accumulators come out in the mma.sync code's layout (warp w:
// rows [16 w, 16 w + 16), n8 block j in acc[j]), so the code around them is shared.
//
// ga = K Wg[U]^T, gb = K Wu[U]^T, ge = V Wd[:, U] for the hidden units U = [16 hb, 16 hb + 16):
// m64n16k16 over d in 4 steps. K, V and Wg, Wu are K-major (d contiguous: a k-step is 32 bytes
// into the line; 8-row groups 1024 bytes apart); Wd [d][h] is B MN-major (the 16 units are 32
// bytes into each line, a k-step is two 8-line atoms: 2048 bytes).
template <typename T>
__device__ __forceinline__ void wg_abe(float (&ga)[2][4], float (&gb)[2][4], float (&ge)[2][4], const T* sK,
                                       const T* sV, const T* w3, int hb) {
  constexpr int kTE = 64 * 64;
  const uint32_t k = smem_u32(sK), v = smem_u32(sV), wg = smem_u32(w3), wu = smem_u32(w3 + kTE),
                 wd = smem_u32(w3 + 2 * kTE);
  wg_fence_regs(ga);
  wg_fence_regs(gb);
  wg_fence_regs(ge);
  wg_fence();
#pragma unroll
  for (int ks = 0; ks < 4; ++ks) {
    const uint64_t dk = wg_desc(k + ks * 32, 16, 1024), dv = wg_desc(v + ks * 32, 16, 1024);
    wg_mma<T, 16, false, false>(dk, wg_desc(wg + hb * 2048 + ks * 32, 16, 1024), ga, ks > 0);
    wg_mma<T, 16, false, false>(dk, wg_desc(wu + hb * 2048 + ks * 32, 16, 1024), gb, ks > 0);
    wg_mma<T, 16, false, true>(dv, wg_desc(wd + ks * 2048 + hb * 32, 64 * 128, 1024), ge, ks > 0);
  }
  wg_commit();
  wg_wait<0>();
  wg_fence_regs(ga);
  wg_fence_regs(gb);
  wg_fence_regs(ge);
}

// acc_g += Xg^T K, acc_u += Xu^T K, acc_d += V^T Sd over the tile's 64 tokens (m64nNk16 in 4
// steps of two 8-line atoms, 2048 bytes): every operand MN-major (rows are the tokens, the
// contraction dim); x3 = [Xg | Xu | Sd] tiles. N = 64, or (8 warps: two warpgroups) the N columns
// [n0, n0 + N) of each gradient: B starts 2 n0 bytes into its lines.
template <typename T, int N = 64>
__device__ __forceinline__ void wg_grads(float (&acc_g)[N / 8][4], float (&acc_u)[N / 8][4], float (&acc_d)[N / 8][4],
                                         const T* x3, const T* sK, const T* sV, int n0 = 0) {
  constexpr int kTE = 64 * 64;
  const uint32_t xg = smem_u32(x3), xu = smem_u32(x3 + kTE), sd = smem_u32(x3 + 2 * kTE) + 2 * n0,
                 k = smem_u32(sK), kn = k + 2 * n0, v = smem_u32(sV);
  wg_fence_regs(acc_g);
  wg_fence_regs(acc_u);
  wg_fence_regs(acc_d);
  wg_fence();
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    const uint32_t o = kk * 2048;
    const uint64_t dk = wg_desc(kn + o, 64 * 128, 1024);
    wg_mma<T, N, true, true>(wg_desc(xg + o, 64 * 128, 1024), dk, acc_g, true);
    wg_mma<T, N, true, true>(wg_desc(xu + o, 64 * 128, 1024), dk, acc_u, true);
    wg_mma<T, N, true, true>(wg_desc(v + o, 64 * 128, 1024), wg_desc(sd + o, 64 * 128, 1024), acc_d, true);
  }
  wg_commit();
  wg_wait<0>();
  wg_fence_regs(acc_g);
  wg_fence_regs(acc_u);
  wg_fence_regs(acc_d);
}

// The kernel's body (ttt_fwd_tc_kernel below). kGx: without clusters (sm_80+): the owners publish
// their rows to global memory (p.xpub) and every CTA pulls all of them in by cp.async; the partial
// gradients and mu's partial sums go to global memory (p.xchg) and the owners sum them in rank order
// (bitwise the cluster kernel's results); each cluster barrier is a barrier on the job's global
// counter (xcta_barrier). The host launches the jobs cooperatively in waves; buffers and counters
// are indexed by the job's place in its wave.
template <typename T, int kCtas, int kW, bool kWg, bool kGx>
__device__ __forceinline__ void fwd_tc_body(const FwdParams& p) {
  using Tr = FwdTcTraitsP<kCtas, kW, kWg, kGx>;
  constexpr int kD = Tr::kD, kP = Tr::kP, kT = Tr::kThreads, kTile = Tr::kTile;
  constexpr int kLdG = Tr::kLdG, kOwn = Tr::kOwn, PW = Tr::kPendWidth, kTE = Tr::kTileElems;
  constexpr int64_t HD = Tr::kMat;
  unsigned char* smem_tc = dynamic_smem();
  if constexpr (kWg) smem_tc += (1024u - smem_u32(smem_tc) % 1024u) % 1024u;  // swizzle atoms: 1024-aligned
  T* sWr = reinterpret_cast<T*>(smem_tc + Tr::kOffWr);
  T* sWn = reinterpret_cast<T*>(smem_tc + Tr::kOffWn);
  T* sK = reinterpret_cast<T*>(smem_tc + Tr::kOffK);
  T* sV = reinterpret_cast<T*>(smem_tc + Tr::kOffV);
  T* sX = reinterpret_cast<T*>(smem_tc + Tr::kOffX);
  float* sG = reinterpret_cast<float*>(smem_tc + Tr::kOffG);
  float* sEta = reinterpret_cast<float*>(smem_tc + Tr::kOffEta);
  float* sOwnW = reinterpret_cast<float*>(smem_tc + Tr::kOffOwnW);
  float* sOwnM = reinterpret_cast<float*>(smem_tc + Tr::kOffOwnM);
  float* sTarget = reinterpret_cast<float*>(smem_tc + Tr::kOffTarget);
  float* sScale = reinterpret_cast<float*>(smem_tc + Tr::kOffScale);
  float* sRed = reinterpret_cast<float*>(smem_tc + Tr::kOffRed);
  T* sK2 = reinterpret_cast<T*>(smem_tc + Tr::kOffK2);
  T* sV2 = reinterpret_cast<T*>(smem_tc + Tr::kOffV2);
  long long* sClock = reinterpret_cast<long long*>(smem_tc + Tr::kOffClock);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  // Profiling (p.phase_clock set): thread 0 of the grid's first CTA adds the cycles since its last
  // mark to slot `ph`; the last mark is kept in slot kPhaseSlots - 1. No registers held across.
  auto timed = [&]() { return p.phase_clock != nullptr && blockIdx.x == 0 && tid == 0; };
  auto mark = [&](int ph) {
    if (timed()) {
      const long long now = sm_clock();
      sClock[ph] += now - sClock[kPhaseSlots - 1];
      sClock[kPhaseSlots - 1] = now;
    }
  };
  if (timed()) {
    for (int i = 0; i < kPhaseSlots; ++i) sClock[i] = 0;
    sClock[kPhaseNs] = global_ns();
    sClock[kPhaseSlots - 1] = sClock[kPhaseCycles] = sm_clock();
  }
  JobCtas<kP, kGx> ctas;
  const int rank = ctas.rank;
  const int64_t wslot = ctas.wslot;
  const int64_t job = p.job0 + wslot;  // job0: this wave's first job (kGx), else 0
  const int64_t H = p.heads, C = p.chunk, N = p.n_seqs;
  auto barrier = [&]() { ctas.barrier(p.xcount); };
  // kGx: the partial block of CTA r of this job (kPart floats).
  auto xpart = [&](int r) { return p.xchg + (wslot * kP + r) * int64_t{Tr::kPart}; };
  const int64_t n = job / H, hh = job % H;
  const int64_t start = p.seq[n], len = p.seq[N + n], p0 = p.seq[2 * N + n];
  int64_t slot = p.seq[3 * N + n];
  const int own0 = rank * kOwn;  // first owned row of each matrix
  const int64_t n_tiles = (C + kTile - 1) / kTile;
  const int64_t pstride = H * PW;
  float* pend = p.pend_out + (n * C * H + hh) * PW;  // this head's chunk buffer: row t at pend + t * pstride
  const float* pend0 = p.pend_in + (n * C * H + hh) * PW;
  auto tok = [&](int64_t token) { return token * H + hh; };
  // Element (m, i, c) of the owned rows <-> offset of the full [h, d] / [d, h] matrix m.
  auto full_off = [&](int m, int i, int c) { return int64_t{m} * HD + int64_t{own0 + i} * kD + c; };

  // Owned rows of the state and their row-norm targets.
  {
    const float* src = p.fast_in + (n * H + hh) * 6 * HD;
    for (int e = tid; e < 3 * kOwn * kD; e += kT) {
      const int m = e / (kOwn * kD), i = (e / kD) % kOwn, c = e % kD;
      sOwnW[e] = src[full_off(m, i, c)];
      sOwnM[e] = src[3 * HD + full_off(m, i, c)];
    }
    owned_targets<kOwn, kW>(p.w_gate, p.w_up, p.w_down, hh, own0, sTarget);
  }
  __syncthreads();

  // sScale[r] = target / (||owned row r|| + eps) of the owned float rows `w` (one warp per row).
  auto owned_scales = [&](const float* w) {
    for (int r = warp; r < 3 * kOwn; r += Tr::kWarps) {
      float ss = 0.f;
      for (int c = lane; c < kD; c += 32) ss += w[r * kD + c] * w[r * kD + c];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
      if (lane == 0) sScale[r] = sTarget[r] / (sqrtf(ss) + kTcNormEps);
    }
  };

  // Writes the owned rows of W (as they are, and normalized unless LaCT order) as 16-bit operands
  // into every CTA of the cluster. Non-LaCT: also leaves the scales of W in sScale for the update.
  auto publish = [&]() {
    if (!p.lact_order) {
      owned_scales(sOwnW);
      __syncthreads();
    }
    for (int e = tid; e < 3 * kOwn * (kD / 4); e += kT) {
      const int r = e / (kD / 4), c = (e % (kD / 4)) * 4, m = r / kOwn, i = r % kOwn;
      const float* w = sOwnW + r * kD + c;
      const float s = p.lact_order ? 1.f : sScale[r];
      uint2 raw, nrm;
      raw.x = pack2<T>(w[0], w[1]);
      raw.y = pack2<T>(w[2], w[3]);
      nrm.x = pack2<T>(w[0] * s, w[1] * s);
      nrm.y = pack2<T>(w[2] * s, w[3] * s);
      if constexpr (kGx) {  // [as they are / normalized][m][row][c] of this job's slot
        T* pub = static_cast<T*>(p.xpub) + wslot * 6 * HD;
        const int64_t at = m * HD + int64_t{own0 + i} * kD + c;
        *reinterpret_cast<uint2*>(pub + at) = raw;
        *reinterpret_cast<uint2*>(pub + 3 * HD + at) = nrm;
      } else {
        const int off = m * kTE + Tr::el(own0 + i, c);
        for (int peer = 0; peer < kP; ++peer) {
          if constexpr (!kWg) *reinterpret_cast<uint2*>(cluster_peer(sWr + off, peer)) = raw;
          *reinterpret_cast<uint2*>(cluster_peer(sWn + off, peer)) = nrm;
        }
      }
    }
    if constexpr (kWg) fence_proxy_async();  // wgmma reads the rows through the async proxy
  };
  // After publish() and a barrier: this CTA's operand tiles from every owner's published rows
  // (kGx; cp.async reads L2, where the owners' writes are). Ends with a barrier.
  auto pull = [&]() {
    if constexpr (kGx) {
      const T* pub = static_cast<const T*>(p.xpub) + wslot * 6 * HD;
      for (int e = tid; e < 6 * kD * (kD / 8); e += kT) {
        const int r = e / (kD / 8), c = (e % (kD / 8)) * 8;  // r: [as they are / normalized][m][row]
        const int m = (r / kD) % 3, row = r % kD;
        cp_async16((r < 3 * kD ? sWr : sWn) + m * kTE + Tr::el(row, c), pub + int64_t{r} * kD + c, true);
      }
      cp_async_commit();
      cp_async_wait<0>();
      __syncthreads();
    } else if constexpr (kWg) {
      fence_proxy_async_shared();  // reader side too (the writers fenced before the cluster barrier)
    }
  };

  // Chunk-buffer rows [lo, hi) that fall in this CTA's tiles, as (first, last) pieces.
  auto for_my_rows = [&](int64_t lo, int64_t hi, auto&& body) {
    for (int64_t i = rank; i < n_tiles; i += kP) {
      const int64_t a = i * kTile > lo ? i * kTile : lo;
      const int64_t b = (i + 1) * kTile < hi ? (i + 1) * kTile : hi;
      if (a < b) body(a, b);
    }
  };

  // Rows of the initial chunk buffer this call keeps.
  for_my_rows(0, p0, [&](int64_t a, int64_t b) {
    for (int64_t e = tid; e < (b - a) * PW; e += kT) {
      const int64_t t = a + e / PW, c = e % PW;
      pend[t * pstride + c] = pend0[t * pstride + c];
    }
  });
  if constexpr (!kGx) cluster_sync();  // every CTA of the cluster runs before any writes into its shared memory
  publish();
  barrier();
  pull();
  mark(kPhasePrologue);

  // Read of the tokens [first + t0, first + t0 + nt): o = Wd (silu(Wg q) * (Wu q)) [+ q].
  auto read_tile = [&](int64_t first, int64_t t0, int nt) {
    if constexpr (!kWg) read_tile_tc<T, kD, false, kW>(p.q, p.o, p.residual, H, hh, first + t0, nt, sK, sWr);
  };

  // The update of one complete chunk: rows come from this call's tokens (direct) or the buffer.
  auto chunk_update = [&](bool direct, int64_t first) {
    // Warp w: token rows / gradient rows [16 (w % 4), +16); warp group w / 4 of kGroups: the
    // hidden-unit blocks (factors) and gradient column blocks [kNb wg, kNb (wg + 1)) of 16.
    constexpr int kNb = 4 / Tr::kGroups;
    float acc_g[2 * kNb][4] = {}, acc_u[2 * kNb][4] = {}, acc_d[2 * kNb][4] = {};
    float mu_part = 0.f;  // thread 0: this CTA's tokens, in order
    const int row0 = (warp % 4) * 16, nb0 = (warp / 4) * kNb, g = lane / 4, c2 = 2 * (lane % 4);
    // This call's k, v tiles (direct chunks) arrive by cp.async one tile ahead, alternating between
    // (sK, sV) and (sK2, sV2): the next tile's load runs under this tile's products. Every thread
    // commits one group per tile (empty past the last), so wait_group 1 retires the current one.
    T* const sK1 = sK;
    T* const sV1 = sV;
    auto tile_k = [&](int buf) { return buf ? sK2 : sK1; };  // selects, not an indexed array (no stack)
    auto tile_v = [&](int buf) { return buf ? sV2 : sV1; };
    auto prefetch = [&](int64_t ti, int buf) {  // a direct chunk: every row a token (no pending rows)
      const int64_t t0 = ti * kTile;
      const int nt = static_cast<int>(C - t0 < kTile ? C - t0 : kTile);
      stage_chunk_kv<T, kD, true, kT, kWg>(p.k, p.v, pend0, pstride, H, hh, first, 0, t0, nt, tile_k(buf),
                                           tile_v(buf));
    };
    // The rates and momenta of a direct chunk's tiles (6-byte rows: no cp.async) are loaded one
    // tile ahead into registers, as raw 16-bit values (converted when stored, so the loads stay in
    // flight under the products): element e = tid + j * kT of the tile's [kTile][4] block.
    constexpr int kEtaPer = kTile * 4 / kT;
    static_assert(kEtaPer * kT == kTile * 4, "rate elements split evenly over the threads");
    T eta_next[kEtaPer];
    auto load_rates = [&](int64_t ti) {
      const int64_t t0 = ti * kTile;
#pragma unroll
      for (int j = 0; j < kEtaPer; ++j) {
        const int e = tid + j * kT, t = e / 4, m = e % 4;
        eta_next[j] = from_float<T>(0.f);
        if (t0 + t < C) {
          const int64_t row = tok(first + t0 + t);
          eta_next[j] = m < 3 ? load_tok<T>(p.eta, row * 3 + m) : load_tok<T>(p.mu, row);
        }
      }
    };
    if (direct && rank < n_tiles) {
      prefetch(rank, 0);
      cp_async_commit();
      load_rates(rank);
    }
    int buf = 0;
    for (int64_t ti = rank; ti < n_tiles; ti += kP, buf ^= 1) {
      const int64_t t0 = ti * kTile;
      const int nt = static_cast<int>(C - t0 < kTile ? C - t0 : kTile);
      T* const sK = tile_k(buf);  // this tile's k, v (shadowing the first buffers)
      T* const sV = tile_v(buf);
      // Rows past the chunk end are zero (rates included), so they add nothing.
      if (direct) {
        // sEta and the other k, v buffer were last read by the previous tile, which ended with a
        // barrier.
#pragma unroll
        for (int j = 0; j < kEtaPer; ++j) sEta[tid + j * kT] = to_float(eta_next[j]);
        if (ti + kP < n_tiles) {
          prefetch(ti + kP, buf ^ 1);
          load_rates(ti + kP);
        }
        cp_async_commit();
        cp_async_wait<1>();  // this tile's k, v (the next tile's stay in flight)
      } else {
        for (int e = tid; e < kTile * (kD / 4); e += kT) {
          const int t = e / (kD / 4), c = (e % (kD / 4)) * 4;
          float4 xk = make_float4(0.f, 0.f, 0.f, 0.f), xv = xk;
          if (t < nt) {
            const float* r = pend + (t0 + t) * pstride;
            xk = *reinterpret_cast<const float4*>(r + c);
            xv = *reinterpret_cast<const float4*>(r + kD + c);
          }
          store_pair(sK + Tr::el(t, c), xk.x, xk.y);
          store_pair(sK + Tr::el(t, c + 2), xk.z, xk.w);
          store_pair(sV + Tr::el(t, c), xv.x, xv.y);
          store_pair(sV + Tr::el(t, c + 2), xv.z, xv.w);
        }
        for (int e = tid; e < kTile * 4; e += kT) {
          const int t = e / 4, m = e % 4;
          // Buffered rates and momenta are rounded like this call's (the CPU op and the SIMT
          // kernel keep them float32: same values, since they came from 16-bit inputs).
          sEta[e] = t < nt ? pend[(t0 + t) * pstride + 2 * kD + m] : 0.f;
        }
      }
      if constexpr (kWg) fence_proxy_async_shared();  // k, v (cp.async or stores) -> the wgmmas' async proxy
      __syncthreads();
      static_assert(kTile == 64, "warp 0 sums a tile's momenta two per lane");
      mark(kPhaseStage);
      if (timed()) ++sClock[kPhaseTiles];
      if (warp == 0) {  // this tile's momenta (zero past nt), summed by warp 0 in a fixed order
        float s = sEta[lane * 4 + 3] + sEta[(lane + 32) * 4 + 3];
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
        mu_part += s;  // identical in every lane of warp 0; thread 0's is published
      }
      // Per-token factors of the (negated) gradient: Xg = eta_g e b silu'(a), Xu = eta_u e
      // silu(a), Sd = eta_d silu(a) b, with a = K Wg^T, b = K Wu^T, e = V Wd at the normalized W.
      {
#pragma unroll 1
        for (int hb = nb0; hb < nb0 + kNb; ++hb) {
          float ga[2][4] = {}, gb[2][4] = {}, ge[2][4] = {};
          if constexpr (kWg) {
            wg_abe(ga, gb, ge, sK, sV, sWn, hb);
          } else {
            mma_abe(ga, gb, ge, sK, sV, sWn, hb, row0, lane);  // a = K Wg^T, b = K Wu^T, e = V Wd
          }
#pragma unroll
          for (int j = 0; j < 2; ++j) {
#pragma unroll
            for (int half = 0; half < 2; ++half) {
              const int t = row0 + g + 8 * half, c = hb * 16 + j * 8 + c2;
              const float eg = sEta[t * 4 + 0], eu = sEta[t * 4 + 1], ed = sEta[t * 4 + 2];
              float xg[2], xu[2], sd[2];
#pragma unroll
              for (int q = 0; q < 2; ++q) {
                const float x = ga[j][2 * half + q], y = gb[j][2 * half + q], z = ge[j][2 * half + q];
                const float sg = tc_sigmoid(x), silu = x * sg, d1 = sg * (1.f + x * (1.f - sg));
                xg[q] = eg * z * y * d1;
                xu[q] = eu * z * silu;
                sd[q] = ed * silu * y;
              }
              store_pair(sX + Tr::el(t, c), xg[0], xg[1]);
              store_pair(sX + kTE + Tr::el(t, c), xu[0], xu[1]);
              store_pair(sX + 2 * kTE + Tr::el(t, c), sd[0], sd[1]);
            }
          }
        }
      }
      if constexpr (kWg) fence_proxy_async_shared();  // the factor tiles -> the wgmmas' async proxy
      __syncthreads();
      mark(kPhaseFactors);
      // -G partials: warp w owns rows [16 (w % 4), +16) and column blocks [nb0, nb0 + kNb) of each matrix.
      if constexpr (kWg) {  // warpgroup w / 4: gradient columns [16 nb0, 16 (nb0 + kNb))
        wg_grads<T, 16 * kNb>(acc_g, acc_u, acc_d, sX, sK, sV, 16 * nb0);
      } else {
        mma_yt_x<T, kNb>(acc_g, sX, row0, sK, lane, nb0);            // -Gg = Xg^T K
        mma_yt_x<T, kNb>(acc_u, sX + kTE, row0, sK, lane, nb0);      // -Gu = Xu^T K
        mma_yt_x<T, kNb>(acc_d, sV, row0, sX + 2 * kTE, lane, nb0);  // -Gd = V^T Sd
      }
      __syncthreads();  // sK, sV, sX, sEta are reused by the next tile
      mark(kPhaseGrads);
    }
    // Partials to shared memory for the cluster reduction.
    auto stash = [&](const float(&acc)[2 * kNb][4], int m) {
#pragma unroll
      for (int j = 0; j < 2 * kNb; ++j) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int row = row0 + g + 8 * half, col = nb0 * 16 + j * 8 + c2;
          float* dst = kGx ? xpart(rank) + m * HD + row * kD + col : sG + m * kD * kLdG + row * kLdG + col;
          dst[0] = acc[j][2 * half];
          dst[1] = acc[j][2 * half + 1];
        }
      }
    };
    stash(acc_g, 0);
    stash(acc_u, 1);
    stash(acc_d, 2);
    if (tid == 0) {
      if constexpr (kGx) {
        xpart(rank)[3 * HD] = mu_part;
      } else {
        sRed[0] = mu_part;
      }
    }
    barrier();
    mark(kPhaseReduceWait);
    // Owned rows: M = mu_j M - G, W = W_hat + M (W_hat = normalize(W) unless LaCT order), summing
    // the kP partials in rank order.
    float mu_sum = 0.f;
    for (int peer = 0; peer < kP; ++peer) mu_sum += kGx ? ld_cg(xpart(peer) + 3 * HD) : *cluster_peer(sRed, peer);
    const float mu_j = mu_sum / static_cast<float>(C);
    // Four consecutive columns of one owned row per step (kD % 4 == 0, 16-byte aligned rows).
    for (int e = 4 * tid; e < 3 * kOwn * kD; e += 4 * kT) {
      const int r = e / kD, m = r / kOwn, i = r % kOwn, c = e % kD;
      const float4 neg_g = kGx ? global_sum4<kP>(xpart(0) + m * HD + (own0 + i) * kD + c, Tr::kPart)
                               : cluster_sum4<kP>(sG + m * kD * kLdG + (own0 + i) * kLdG + c);
      float4 w = *reinterpret_cast<const float4*>(sOwnW + e), mo = *reinterpret_cast<const float4*>(sOwnM + e);
      const float sc = p.lact_order ? 0.f : sScale[r];  // LaCT order: no scale here
      auto step = [&](float& wv, float& mv, float g) {
        const float w_hat = p.lact_order ? wv : wv * sc;
        mv = mu_j * mv + g;
        wv = w_hat + mv;
      };
      step(w.x, mo.x, neg_g.x);
      step(w.y, mo.y, neg_g.y);
      step(w.z, mo.z, neg_g.z);
      step(w.w, mo.w, neg_g.w);
      *reinterpret_cast<float4*>(sOwnM + e) = mo;
      *reinterpret_cast<float4*>(sOwnW + e) = w;
    }
    __syncthreads();
    if (p.lact_order) {
      owned_scales(sOwnW);
      __syncthreads();
      for (int e = tid; e < 3 * kOwn * kD; e += kT) sOwnW[e] *= sScale[e / kD];
      __syncthreads();
    }
    mark(kPhaseReduce);
    publish();
    barrier();
    pull();
    mark(kPhasePublish);
    if (timed()) ++sClock[kPhaseChunks];
  };

  auto write_state = [&](float* dst) {
    for (int e = tid; e < 3 * kOwn * kD; e += kT) {
      const int m = e / (kOwn * kD), i = (e / kD) % kOwn, c = e % kD;
      dst[full_off(m, i, c)] = sOwnW[e];
      dst[3 * HD + full_off(m, i, c)] = sOwnM[e];
    }
  };

  int64_t fill = p0, pos = 0;
  while (true) {
    const int64_t pb = fill;
    const int64_t seg = (len - pos < C - fill) ? len - pos : C - fill;
    const int64_t first = start + pos;
    write_state(p.ckpt + (slot * H + hh) * 6 * HD);
    ++slot;
    mark(kPhaseSegment);
    for (int64_t ti = rank; !kWg && !p.skip_read && ti * kTile < seg; ti += kP) {  // kWg: split mode only
      const int64_t t0 = ti * kTile;
      read_tile(first, t0, static_cast<int>(seg - t0 < kTile ? seg - t0 : kTile));
    }
    mark(kPhaseRead);
    fill = pb + seg;
    const bool direct = pb == 0 && fill == C;
    if (!direct && seg > 0) {
      for_my_rows(pb, fill, [&](int64_t a, int64_t b) {
        for (int64_t e = tid; e < (b - a) * PW; e += kT) {
          const int64_t t = a + e / PW;
          const int c = static_cast<int>(e % PW);
          pend[t * pstride + c] = pending_elem<T, kD>(p.k, p.v, p.eta, p.mu, tok(first + t - pb), c);
        }
      });
    }
    __syncthreads();  // this CTA's buffer rows are written before it reads them back
    mark(kPhaseSegment);
    if (fill == C) chunk_update(direct, first);
    pos += seg;
    if (fill < C) break;
    fill = 0;
  }
  // Rows past the partial chunk are zero in the returned buffer (as on the CPU).
  for_my_rows(fill, C, [&](int64_t a, int64_t b) {
    for (int64_t e = tid; e < (b - a) * PW; e += kT) pend[(a + e / PW) * pstride + e % PW] = 0.f;
  });
  write_state(p.fast_out + (n * H + hh) * 6 * HD);
  mark(kPhaseEpilogue);
  if (timed()) {
    sClock[kPhaseCycles] = sm_clock() - sClock[kPhaseCycles];
    sClock[kPhaseNs] = global_ns() - sClock[kPhaseNs];
    for (int i = 0; i < kPhaseSlots - 1; ++i) p.phase_clock[i] = sClock[i];
  }
}

template <typename T, int kCtas = 8, int kW = 4, bool kWg = false, bool kGx = false>
__global__ void __launch_bounds__(kW * 32, 1) ttt_fwd_tc_kernel(const FwdParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  if constexpr (kGx) {
    fwd_tc_body<T, kCtas, kW, kWg, kGx>(p);
  } else {
    __trap();  // launched with kP-CTA clusters, which need sm_90 (the dispatcher checks)
  }
#else
  fwd_tc_body<T, kCtas, kW, kWg, kGx>(p);
#endif
}

}  // namespace allmem::ttt::cuda::tc
