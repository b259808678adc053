// Tensor-core backward of the TTT memory for d = h = 64, sm_90: the step-for-step backward of
// ttt_bwd.cu (the hand-derived backward of the CPU op, ttt_chunk.h) on the cluster layout of the
// tensor-core forward (ttt_fwd_tc.cuh): one cluster of kP CTAs per (sequence, head) walks the
// segments in reverse from the forward's checkpoints.
//
// Per segment i (reverse), two phases, each a pass over the segment's token tiles (tile i of a
// chunk belongs to CTA i % kP) followed by a cluster reduction of the weight-gradient partials:
//   * update phase (a completed chunk): the float32 gradient state (dW, dM) is split by rows over
//     the cluster, as the forward splits (W, M); each CTA prepares its rows (normalization of W or
//     the LaCT-order row-normalization backward, dM += dW) and publishes the weights the gradient
//     was taken at (Wx) and P = dM as 16-bit operands into every CTA. Per tile each warp owns 16
//     tokens: six products (a, b, e at Wx; V Pd, K Pu^T, K Pg^T) by mma.sync, the elementwise
//     second-order terms in registers (rate gradients are row sums: quad shuffles), six 16-bit
//     factor tiles to shared memory, then dk (4 products) and dv (2) from the warp's own rows and
//     the three dW partials (da^T K, db^T K, V^T de) accumulated in float32 shared memory.
//   * read phase: the raw W of the checkpoint is published; per tile a, b at q, g = dO Wd; dq
//     (2 products + residual); partials dO^T s, da^T q, db^T q.
//   After each phase's cluster barrier CTA r sums rows [8r, 8r + 8) of the partials over the kP
//   CTAs in rank order through distributed shared memory (deterministic, no atomics) and adds
//   them to the rows of dW it owns; row-local steps (normalization backward, dM *= mu) follow.
// Without clusters (kGx; sm_80+, split mode only, ALLMEM_TTT_TC_CHAIN=global or tokens-global):
// the same steps with the cluster's exchanges through global memory, as the forward's kGx kernels:
// the owners write their 16-bit rows to p.xpub and every CTA pulls all of them by cp.async; the
// dW partials live in the CTA's block of p.xchg (row-major, read-modified-written per tile: no
// shared-memory sG) with its shares of mu's sum and dmu's dot product; the owners sum the blocks in
// rank order (ld.global.cg); each cluster barrier is the job's global counter (xcta_barrier). No k, v
// prefetch buffers either (157 KB of shared memory, which an A100's 163 KB fits): a tile's dk, dv
// products (factors and weights only) run after its dW partials, under the next tile's k, v load.
// Same products, each summed in the same order, so every output is bitwise the split-mode cluster
// kernel's.
// Precision: as the forward. The state, accumulations and reductions are float32; the matmul
// operands (k, v, q, dO, Wx, W, P and the per-token factors) are the input dtype, as a bf16
// autocast PyTorch backward rounds them.
#pragma once
#include <cstdint>

#include "ttt/ttt_cuda.h"
#include "ttt/ttt_fwd_tc.cuh"
#include "ttt/ttt_read_tc.cuh"
#include "ttt/ttt_tc_ops.cuh"

namespace allmem::ttt::cuda::tc {

// P: CTAs per cluster, 8 (portable, the default) or 16 (ALLMEM_TTT_TC_CLUSTER, as the forward).
// X: without clusters (kGx: no sG, no prefetch buffers; 8 CTAs).
template <int P = 8, bool X = false>
struct BwdTcTraitsP {
  static constexpr bool kGx = X;
  static constexpr int kD = 64;
  static constexpr int kP = P;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kTile = 64;
  static constexpr int kLd = FwdTcTraits::kLd;
  static constexpr int kLdG = kD + 4;
  static constexpr int kOwn = kD / kP;
  static constexpr int kMat = kD * kD;
  static constexpr int kPendWidth = 2 * kD + 4;
  static constexpr int kTileElems = kTile * kLd;
  static constexpr int kOwnElems = 3 * kOwn * kD;  // owned rows of the three matrices
  // Shared memory, bytes.
  static constexpr int kOffW = 0;                                // [6][64][kLd] Wx (or W) | P
  static constexpr int kOffA = kOffW + 6 * kTileElems * 2;       // [64][kLd] k or q
  static constexpr int kOffB = kOffA + kTileElems * 2;           // [64][kLd] v or dO
  static constexpr int kOffF = kOffB + kTileElems * 2;           // [6][64][kLd] per-token factors
  static constexpr int kOffG = kOffF + 6 * kTileElems * 2;       // [3][64][kLdG] float dW partials
  static constexpr int kOffEta = kOffG + (X ? 0 : 3 * kD * kLdG * 4);  // [64][4] eta_g, eta_u, eta_d
  static constexpr int kOffOwnW = kOffEta + kTile * 4 * 4;       // owned float rows: W (checkpoint)
  static constexpr int kOffOwnM = kOffOwnW + kOwnElems * 4;      //   M (checkpoint)
  static constexpr int kOffOwnX = kOffOwnM + kOwnElems * 4;      //   Wx (or Z = W + M_next)
  static constexpr int kOffOwnDW = kOffOwnX + kOwnElems * 4;     //   dW
  static constexpr int kOffOwnDM = kOffOwnDW + kOwnElems * 4;    //   dM
  static constexpr int kOffTarget = kOffOwnDM + kOwnElems * 4;   // [3 kOwn] row-norm targets
  static constexpr int kOffDTarget = kOffTarget + 3 * kOwn * 4;  // [3 kOwn] their gradients
  static constexpr int kOffRed = kOffDTarget + 3 * kOwn * 4;     // [8] partial sums
  static constexpr int kOffA2 = kOffRed + 8 * 4;                 // [64][kLd] k, v of the next tile
  static constexpr int kOffB2 = kOffA2 + (X ? 0 : kTileElems * 2);  //   (the update backward's prefetch)
  static constexpr int kSmemBytes = kOffB2 + (X ? 0 : kTileElems * 2);
  // kGx: a CTA's block of p.xchg: the dW partials [3][64][64], then its mu and dot shares, padded
  // to 8 floats (every block starts on a 32-byte sector).
  static constexpr int kPart = 3 * kMat + 8;
  static_assert(kPart % 8 == 0, "32-byte blocks");
  static_assert(kSmemBytes <= 227 * 1024, "must fit the opt-in shared memory of sm_90");
  static_assert(!X || (kSmemBytes <= 163 * 1024 && P == 8), "without clusters: 8 CTAs, an A100's 163 KB");
  static_assert(kOffA % 16 == 0 && kOffF % 16 == 0 && kOffG % 16 == 0 && kOffEta % 16 == 0 &&
                    kOffOwnW % 16 == 0 && kOffTarget % 16 == 0 && kOffRed % 16 == 0 && kOffA2 % 16 == 0 &&
                    kOffB2 % 16 == 0,
                "16-byte aligned regions");
  static_assert(kP == 8 || kP == 16, "clusters of 8 or 16 CTAs");
};
using BwdTcTraits = BwdTcTraitsP<8>;

// acc += A x W[n0 : n0 + 8, :]^T over k-step kk (one n8 block of mma_step_wt).
template <typename T>
__device__ __forceinline__ void mma_n8_wt(float (&acc)[4], const uint32_t (&a)[4], const T* w, int n0, int kk,
                                          int lane) {
  constexpr int kLd = BwdTcTraits::kLd;
  uint32_t b[2];
  ldsm_x2(b, w + (n0 + lane % 8) * kLd + kk * 16 + ((lane / 8) % 2) * 8);
  mma<T>(acc, a, b[0], b[1]);
}

// acc += A x W[:, n0 : n0 + 8] over k-step kk (one n8 block of mma_step_w).
template <typename T>
__device__ __forceinline__ void mma_n8_w(float (&acc)[4], const uint32_t (&a)[4], const T* w, int n0, int kk,
                                         int lane) {
  constexpr int kLd = BwdTcTraits::kLd;
  uint32_t b[2];
  ldsm_x2_t(b, w + (kk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * kLd + n0);
  mma<T>(acc, a, b[0], b[1]);
}

// Rows [row0, row0 + 16) of the float32 [64][64] weight-gradient partial at `g` (rows `ld` floats
// apart: sG in shared memory, or kGx the CTA's own block in global memory) += Y^T X over a 64-token
// tile (the warp's rows; read and written with the fragment layout, 8-byte pairs).
template <typename T>
__device__ __forceinline__ void add_partial_tc(float* g, int ld, const T* y, const T* x, int row0, int lane) {
  const int gr = lane / 4, c2 = 2 * (lane % 4);
  float acc[8][4];
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const float2 s = *reinterpret_cast<const float2*>(g + (row0 + gr + 8 * half) * ld + j * 8 + c2);
      acc[j][2 * half] = s.x;
      acc[j][2 * half + 1] = s.y;
    }
  mma_yt_x(acc, y, row0, x, lane);
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      *reinterpret_cast<float2*>(g + (row0 + gr + 8 * half) * ld + j * 8 + c2) =
          make_float2(acc[j][2 * half], acc[j][2 * half + 1]);
    }
}

// Read backward of the 16-bit tokens [first, first + nt) of head hh with the 16-bit weights sW
// ([3][64][kLd]): g = dO Wd, da = g b silu'(a), db = g silu(a), s = silu(a) b; writes
// dq = da Wg + db Wu [+ dO] (float32) and adds dO^T s, da^T Q, db^T Q to the partials sG (gate,
// up, down). sA, sB: q and dO staging tiles (kStaged: already holding the tile, made visible by
// the caller's barrier); sF: three factor tiles. Every thread of the CTA calls it.
template <typename T, bool kStaged = false>
__device__ __forceinline__ void read_bwd_tile_tc(const void* q, const void* grad_o, float* dq, bool residual,
                                                 int64_t H, int64_t hh, int64_t first, int nt, T* sA, T* sB, T* sF,
                                                 const T* sW, float* sG) {
  constexpr int kD = BwdTcTraits::kD, kT = BwdTcTraits::kThreads, kTile = BwdTcTraits::kTile;
  constexpr int kLd = BwdTcTraits::kLd, kTE = BwdTcTraits::kTileElems;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, row0 = warp * 16;
  const int g = lane / 4, c2 = 2 * (lane % 4);
  auto tok = [&](int64_t token) { return token * H + hh; };
  if constexpr (!kStaged) {
    for (int e = tid; e < kTile * (kD / 8); e += kT) {
      const int t = e / (kD / 8), c = (e % (kD / 8)) * 8;
      uint4 a = make_uint4(0u, 0u, 0u, 0u), b = a;
      if (t < nt) {
        const int64_t off = tok(first + t) * kD + c;
        a = *reinterpret_cast<const uint4*>(static_cast<const T*>(q) + off);
        b = *reinterpret_cast<const uint4*>(static_cast<const T*>(grad_o) + off);
      }
      *reinterpret_cast<uint4*>(sA + t * kLd + c) = a;
      *reinterpret_cast<uint4*>(sB + t * kLd + c) = b;
    }
    __syncthreads();
  }
#pragma unroll 1
  for (int hb = 0; hb < 4; ++hb) {
    float ga[2][4] = {}, gb[2][4] = {}, ge[2][4] = {};
    mma_abe(ga, gb, ge, sA, sB, sW, hb, row0, lane);  // a = Q Wg^T, b = Q Wu^T, g = dO Wd
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int t = row0 + g + 8 * half, c = hb * 16 + j * 8 + c2;
        float f[3][2];
#pragma unroll
        for (int qq = 0; qq < 2; ++qq) {
          const int k = 2 * half + qq;
          const float x = ga[j][k], y = gb[j][k], gr = ge[j][k];
          const float sg = tc_sigmoid(x), silu = x * sg, d1 = sg * (1.f + x * (1.f - sg));
          f[0][qq] = gr * y * d1;  // da
          f[1][qq] = gr * silu;    // db
          f[2][qq] = silu * y;     // s
        }
#pragma unroll
        for (int m = 0; m < 3; ++m) store_pair(sF + m * kTE + t * kLd + c, f[m][0], f[m][1]);
      }
    }
  }
  __syncwarp();
#pragma unroll 1
  for (int db = 0; db < 4; ++db) {
    float aq[2][4] = {};
#pragma unroll 1
    for (int kk = 0; kk < 4; ++kk) {
      uint32_t a[4];
      const int aoff = (row0 + lane % 16) * kLd + kk * 16 + (lane / 16) * 8;
      ldsm_x4(a, sF + aoff);
      mma_step_w(aq, a, sW, db * 16, kk, lane);
      ldsm_x4(a, sF + kTE + aoff);
      mma_step_w(aq, a, sW + kTE, db * 16, kk, lane);
    }
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int t = row0 + g + 8 * half, c = db * 16 + j * 8 + c2;
        if (t >= nt) continue;
        float d0 = aq[j][2 * half], d1 = aq[j][2 * half + 1];
        if (residual) {
          d0 += to_float(sB[t * kLd + c]);
          d1 += to_float(sB[t * kLd + c + 1]);
        }
        float* out = dq + tok(first + t) * kD + c;
        out[0] = d0;
        out[1] = d1;
      }
    }
  }
  __syncthreads();
  constexpr int kLdG = BwdTcTraits::kLdG, kGE = kD * kLdG;
  add_partial_tc(sG, kLdG, sF, sA, row0, lane);                      // dWg += da^T Q
  add_partial_tc(sG + kGE, kLdG, sF + kTE, sA, row0, lane);          // dWu += db^T Q
  add_partial_tc(sG + 2 * kGE, kLdG, sB, sF + 2 * kTE, row0, lane);  // dWd += dO^T s
  __syncthreads();
}

// The kernel's body (ttt_bwd_tc_kernel below); kGx: without clusters (the header comment).
template <typename T, int kCtas, bool kGx>
__device__ __forceinline__ void bwd_tc_body(const BwdParams& p) {
  using Tr = BwdTcTraitsP<kCtas, kGx>;
  constexpr int kD = Tr::kD, kP = Tr::kP, kT = Tr::kThreads, kTile = Tr::kTile, kLd = Tr::kLd;
  constexpr int kLdG = Tr::kLdG, kOwn = Tr::kOwn, PW = Tr::kPendWidth, kTE = Tr::kTileElems;
  constexpr int kOE = Tr::kOwnElems;
  constexpr int64_t HD = Tr::kMat;
  unsigned char* smem_tc = dynamic_smem();
  T* sW = reinterpret_cast<T*>(smem_tc + Tr::kOffW);
  T* sA = reinterpret_cast<T*>(smem_tc + Tr::kOffA);
  T* sB = reinterpret_cast<T*>(smem_tc + Tr::kOffB);
  T* sF = reinterpret_cast<T*>(smem_tc + Tr::kOffF);
  float* sG = reinterpret_cast<float*>(smem_tc + Tr::kOffG);
  float* sEta = reinterpret_cast<float*>(smem_tc + Tr::kOffEta);
  float* oW = reinterpret_cast<float*>(smem_tc + Tr::kOffOwnW);
  float* oM = reinterpret_cast<float*>(smem_tc + Tr::kOffOwnM);
  float* oX = reinterpret_cast<float*>(smem_tc + Tr::kOffOwnX);
  float* oDW = reinterpret_cast<float*>(smem_tc + Tr::kOffOwnDW);
  float* oDM = reinterpret_cast<float*>(smem_tc + Tr::kOffOwnDM);
  float* sTarget = reinterpret_cast<float*>(smem_tc + Tr::kOffTarget);
  float* sDTarget = reinterpret_cast<float*>(smem_tc + Tr::kOffDTarget);
  float* sRed = reinterpret_cast<float*>(smem_tc + Tr::kOffRed);
  T* sA2 = reinterpret_cast<T*>(smem_tc + Tr::kOffA2);
  T* sB2 = reinterpret_cast<T*>(smem_tc + Tr::kOffB2);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  JobCtas<kP, kGx> ctas;
  const int rank = ctas.rank;
  const int64_t wslot = ctas.wslot;
  const int64_t job = p.job0 + wslot;  // job0: this wave's first job (kGx), else 0
  const int64_t H = p.heads, C = p.chunk, N = p.n_seqs;
  auto barrier = [&]() { ctas.barrier(p.xcount); };
  // kGx: the block of CTA r of this job (Tr::kPart floats): dW partials [3][64][64], mu, dot.
  auto xpart = [&](int r) { return p.xchg + (wslot * kP + r) * int64_t{Tr::kPart}; };
  const int64_t n = job / H, hh = job % H;
  const int64_t start = p.seq[n], len = p.seq[N + n], p0 = p.seq[2 * N + n], slot0 = p.seq[3 * N + n];
  const int64_t n_segs = (p0 + len) / C + 1;
  const int own0 = rank * kOwn;
  const int64_t pstride = H * PW;
  const float* pend = p.pend_in + (n * C * H + hh) * PW;  // row t at pend + t * pstride
  const float* gpend = p.grad_pend + (n * C * H + hh) * PW;
  float* dpend = p.d_pend + (n * C * H + hh) * PW;
  auto tok = [&](int64_t token) { return token * H + hh; };
  // Owned element e = (m, i, c) <-> offset in the full [64, 64] matrix m.
  auto full_off = [&](int e) {
    const int m = e / (kOwn * kD), i = (e / kD) % kOwn, c = e % kD;
    return int64_t{m} * HD + int64_t{own0 + i} * kD + c;
  };
  const int row0 = warp * 16, g = lane / 4, c2 = 2 * (lane % 4);

  // Owned rows of the incoming gradient state, the row-norm targets (the params' row norms).
  {
    const float* src = p.d_fast + (n * H + hh) * 6 * HD;
    for (int e = tid; e < kOE; e += kT) {
      oDW[e] = src[full_off(e)];
      oDM[e] = src[3 * HD + full_off(e)];
    }
    owned_targets<kOwn>(p.w_gate, p.w_up, p.w_down, hh, own0, sTarget);
    for (int r = tid; r < 3 * kOwn; r += kT) sDTarget[r] = 0.f;
  }
  if constexpr (kGx) {
    __syncthreads();
  } else {
    cluster_sync();  // every CTA of the cluster runs before any writes into its shared memory
  }

  // Fixed-order CTA sum of one value per thread; thread 0 stores it to sRed[slot].
  auto cta_sum_to = [&](float x, int slot) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
    if (lane == 0) sRed[4 + warp] = x;
    __syncthreads();
    if (tid == 0) {
      const float s = sRed[4] + sRed[5] + sRed[6] + sRed[7];
      if constexpr (kGx) {
        xpart(rank)[3 * HD + slot] = s;
      } else {
        sRed[slot] = s;
      }
    }
    __syncthreads();
  };

  // In place on the owned rows of g: the gradient wrt w of w * target / (||w|| + eps) from the
  // gradient g wrt its output; adds to the target gradients (ttt_bwd.cu row_normalize_backward).
  auto own_row_normalize_backward = [&](const float* w, float* gr) {
    for (int r = warp; r < 3 * kOwn; r += Tr::kWarps) {
      float ss = 0.f, gw = 0.f;
      for (int c = lane; c < kD; c += 32) {
        ss += w[r * kD + c] * w[r * kD + c];
        gw += gr[r * kD + c] * w[r * kD + c];
      }
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
        ss += __shfl_xor_sync(0xffffffffu, ss, off);
        gw += __shfl_xor_sync(0xffffffffu, gw, off);
      }
      const RowNormBwd nb = row_norm_bwd_tc(sTarget[r], sqrtf(ss), gw);
      if (lane == 0) sDTarget[r] += nb.dtarget;
      for (int c = lane; c < kD; c += 32) gr[r * kD + c] = gr[r * kD + c] * nb.scale + w[r * kD + c] * nb.coef;
    }
  };

  // Writes the owned float rows `src` as 16-bit rows of slots [slot, slot + 3) in every CTA (kGx:
  // into the job's rows [6][64][64] in global memory, which pull() brings in).
  auto publish = [&](const float* src, int slot) {
    for (int e = tid; e < 3 * kOwn * (kD / 4); e += kT) {
      const int r = e / (kD / 4), c = (e % (kD / 4)) * 4, m = r / kOwn, i = r % kOwn;
      const float* w = src + r * kD + c;
      uint2 x;
      x.x = pack2<T>(w[0], w[1]);
      x.y = pack2<T>(w[2], w[3]);
      if constexpr (kGx) {
        T* pub = static_cast<T*>(p.xpub) + wslot * 6 * HD;
        *reinterpret_cast<uint2*>(pub + (slot + m) * HD + int64_t{own0 + i} * kD + c) = x;
      } else {
        const int off = (slot + m) * kTE + (own0 + i) * kLd + c;
#pragma unroll 4  // 16 peers: registers
        for (int peer = 0; peer < kP; ++peer) *reinterpret_cast<uint2*>(cluster_peer(sW + off, peer)) = x;
      }
    }
  };
  // kGx, after publish() and a barrier: the six 16-bit tiles from every owner's published rows
  // (cp.async reads L2, where the owners' writes are). Ends with a barrier.
  auto pull = [&]() {
    const T* pub = static_cast<const T*>(p.xpub) + wslot * 6 * HD;
    for (int e = tid; e < 6 * kD * (kD / 8); e += kT) {
      const int r = e / (kD / 8), c = (e % (kD / 8)) * 8;  // r: [slot][row]
      cp_async16(sW + (r / kD) * kTE + (r % kD) * kLd + c, pub + int64_t{r} * kD + c, true);
    }
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
  };

  // Owned rows of dW += the sum over the cluster of the partials (rank order). After a cluster
  // barrier; the partials are not rewritten before the next one.
  auto reduce_partials = [&]() {
    for (int e = 4 * tid; e < kOE; e += 4 * kT) {  // four columns of one owned row per step
      const int r = e / kD, m = r / kOwn, i = r % kOwn, c = e % kD;
      const float4 s = kGx ? global_sum4<kP>(xpart(0) + m * HD + (own0 + i) * kD + c, Tr::kPart)
                           : cluster_sum4<kP>(sG + m * kD * kLdG + (own0 + i) * kLdG + c);
      float4 dw = *reinterpret_cast<const float4*>(oDW + e);
      dw.x += s.x;
      dw.y += s.y;
      dw.z += s.z;
      dw.w += s.w;
      *reinterpret_cast<float4*>(oDW + e) = dw;
    }
    __syncthreads();
  };

  auto zero_partials = [&]() {
    if constexpr (kGx) {
      float4* g = reinterpret_cast<float4*>(xpart(rank));
      for (int e = tid; e < 3 * kD * kD / 4; e += kT) g[e] = make_float4(0.f, 0.f, 0.f, 0.f);
    } else {
      for (int e = tid; e < 3 * kD * kLdG; e += kT) sG[e] = 0.f;
    }
  };

  auto add_partial = [&](int m, const T* y, const T* x) {
    if constexpr (kGx) {
      add_partial_tc(xpart(rank) + m * HD, kD, y, x, row0, lane);
    } else {
      add_partial_tc(sG + m * kD * kLdG, kLdG, y, x, row0, lane);
    }
  };

  for (int64_t i = n_segs - 1; i >= 0; --i) {
    const int64_t pb = i == 0 ? p0 : 0;
    const int64_t pos = i == 0 ? 0 : C - p0 + (i - 1) * C;
    const int64_t seg = (len - pos < C - pb) ? len - pos : C - pb;
    const int64_t first = start + pos;
    const float* ck = p.ckpt + ((slot0 + i) * H + hh) * 6 * HD;  // (W, M) at the segment start
    for (int e = tid; e < kOE; e += kT) {
      oW[e] = ck[full_off(e)];
      oM[e] = ck[3 * HD + full_off(e)];
    }
    __syncthreads();

    if (i + 1 < n_segs) {  // a completed chunk: backward of its update
      const float* Mn = p.ckpt + ((slot0 + i + 1) * H + hh) * 6 * HD + 3 * HD;  // M after the update
      const int64_t n_tiles = (C + kTile - 1) / kTile;
      // Chunk row t: the initial pending row t (t < pb) or token first + t - pb.
      auto chunk_row = [&](int64_t t) { return tok(first + t - pb); };
      // This CTA's share of the chunk's mu sum.
      float part = 0.f;
      for (int64_t ti = rank; ti < n_tiles; ti += kP) {
        for (int64_t t = ti * kTile + tid; t < (ti + 1) * kTile && t < C; t += kT) {
          part += t < pb ? pend[t * pstride + 2 * kD + 3] : to_float(load_tok<T>(p.mu, chunk_row(t)));
        }
      }
      cta_sum_to(part, 0);
      if (!p.lact_order) {  // Wx = normalize(W); dM_new = dM + dW
        for (int r = warp; r < 3 * kOwn; r += Tr::kWarps) {
          float ss = 0.f;
          for (int c = lane; c < kD; c += 32) ss += oW[r * kD + c] * oW[r * kD + c];
#pragma unroll
          for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
          const float scale = sTarget[r] / (sqrtf(ss) + kTcNormEps);
          for (int c = lane; c < kD; c += 32) oX[r * kD + c] = oW[r * kD + c] * scale;
        }
        for (int e = tid; e < kOE; e += kT) oDM[e] += oDW[e];
      } else {  // Z = W + M_next was normalized: dW <- dZ; dM_new = dM + dZ; Wx = W
        for (int e = tid; e < kOE; e += kT) oX[e] = oW[e] + Mn[full_off(e)];
        __syncthreads();
        own_row_normalize_backward(oX, oDW);
        __syncthreads();
        for (int e = tid; e < kOE; e += kT) {
          oDM[e] += oDW[e];
          oX[e] = oW[e];
        }
      }
      __syncthreads();
      float dot = 0.f;
      for (int e = tid; e < kOE; e += kT) dot += oDM[e] * oM[e];
      cta_sum_to(dot, 1);
      publish(oX, 0);
      publish(oDM, 3);
      barrier();
      if constexpr (kGx) pull();
      float mu_sum = 0.f, dot_sum = 0.f;
      for (int peer = 0; peer < kP; ++peer) {
        mu_sum += kGx ? ld_cg(xpart(peer) + 3 * HD) : cluster_peer(sRed, peer)[0];
        dot_sum += kGx ? ld_cg(xpart(peer) + 3 * HD + 1) : cluster_peer(sRed, peer)[1];
      }
      const float mu_j = mu_sum / static_cast<float>(C), dmu_row = dot_sum / static_cast<float>(C);
      zero_partials();
      __syncthreads();

      const T* Wg = sW;
      const T* Wu = sW + kTE;
      const T* Wd = sW + 2 * kTE;
      const T* Pg = sW + 3 * kTE;
      const T* Pu = sW + 4 * kTE;
      const T* Pd = sW + 5 * kTE;
      // The k, v tiles come one tile ahead (cp.async for this call's tokens) into alternating
      // buffers (sA, sB) / (sA2, sB2); one committed group per tile, so wait_group 1 retires the
      // current tile's. The other buffer was last read by the previous tile (ended by a barrier).
      // kGx (no second buffer): the next tile is staged after this one's last barrier instead (an
      // empty group in the prefetch's place keeps the count).
      T* const sA1 = sA;
      T* const sB1 = sB;
      auto tile_a = [&](int buf) { return buf && !kGx ? sA2 : sA1; };
      auto tile_b = [&](int buf) { return buf && !kGx ? sB2 : sB1; };
      auto stage_kv = [&](int64_t ti, int buf) {
        const int64_t t0 = ti * kTile;
        const int nt = static_cast<int>(C - t0 < kTile ? C - t0 : kTile);
        stage_chunk_kv<T, kD, true>(p.k, p.v, pend, pstride, H, hh, first, pb, t0, nt, tile_a(buf), tile_b(buf));
      };
      if (rank < n_tiles) {
        stage_kv(rank, 0);
        cp_async_commit();
      }
      int buf = 0;
      for (int64_t ti = rank; ti < n_tiles; ti += kP, buf ^= 1) {
        const int64_t t0 = ti * kTile;
        const int nt = static_cast<int>(C - t0 < kTile ? C - t0 : kTile);
        T* const sA = tile_a(buf);  // this tile's k, v (shadowing the first buffers)
        T* const sB = tile_b(buf);
        if (!kGx && ti + kP < n_tiles) stage_kv(ti + kP, buf ^ 1);
        cp_async_commit();
        stage_chunk_eta<T>(p.eta, p.mu, pend, pstride, H, hh, first, pb, t0, nt, kD, sEta);
        cp_async_wait<1>();
        __syncthreads();
        // Per-token terms (ttt_bwd.cu, update_grad_backward), warp w: tokens [16w, 16w + 16).
        float sum_g[2] = {0.f, 0.f}, sum_u[2] = {0.f, 0.f}, sum_d[2] = {0.f, 0.f};
        // Eight hidden units at a time (n8 blocks): the six products' accumulators fit the
        // registers next to the rest.
#pragma unroll 1
        for (int cb = 0; cb < 8; ++cb) {
          float ga[4] = {}, gb[4] = {}, ge[4] = {}, gs[4] = {}, gu[4] = {}, gg[4] = {};
#pragma unroll 1
          for (int kk = 0; kk < 4; ++kk) {
            uint32_t ak[4], av[4];
            ldsm_x4(ak, sA + (row0 + lane % 16) * kLd + kk * 16 + (lane / 16) * 8);
            ldsm_x4(av, sB + (row0 + lane % 16) * kLd + kk * 16 + (lane / 16) * 8);
            mma_n8_wt(ga, ak, Wg, cb * 8, kk, lane);  // a = K Wg^T
            mma_n8_wt(gb, ak, Wu, cb * 8, kk, lane);  // b = K Wu^T
            mma_n8_w(ge, av, Wd, cb * 8, kk, lane);   // e = V Wd
            mma_n8_w(gs, av, Pd, cb * 8, kk, lane);   // -ps = V Pd
            mma_n8_wt(gu, ak, Pu, cb * 8, kk, lane);  // -pu = K Pu^T
            mma_n8_wt(gg, ak, Pg, cb * 8, kk, lane);  // -pg = K Pg^T
          }
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const int t = row0 + g + 8 * half, c = cb * 8 + c2;
            const float eg = sEta[t * 4 + 0], eu = sEta[t * 4 + 1], ed = sEta[t * 4 + 2];
            float f[6][2];
#pragma unroll
            for (int q = 0; q < 2; ++q) {
              const int k = 2 * half + q;
              const UpdateTerms u = update_terms_tc(ga[k], gb[k], ge[k], -gg[k], -gu[k], -gs[k], eg, eu, ed);
              sum_g[half] += u.tg;
              sum_u[half] += u.tu;
              sum_d[half] += u.td;
              f[0][q] = -u.da;
              f[1][q] = -u.db;
              f[2][q] = -u.de;
              f[3][q] = u.fs;  // eta_d s
              f[4][q] = u.fu;  // eta_u x_u
              f[5][q] = u.fg;  // eta_g x_g
            }
#pragma unroll
            for (int m = 0; m < 6; ++m) store_pair(sF + m * kTE + t * kLd + c, f[m][0], f[m][1]);
          }
        }
        // Rate gradients (row sums over the quad's lanes), the momentum gradient.
#pragma unroll
        for (int half = 0; half < 2; ++half) {
#pragma unroll
          for (int off = 1; off < 4; off <<= 1) {
            sum_g[half] += __shfl_xor_sync(0xffffffffu, sum_g[half], off);
            sum_u[half] += __shfl_xor_sync(0xffffffffu, sum_u[half], off);
            sum_d[half] += __shfl_xor_sync(0xffffffffu, sum_d[half], off);
          }
          const int t = row0 + g + 8 * half;
          const int64_t ct = t0 + t;
          if (lane % 4 == 0 && t < nt) {
            float* dst = ct < pb ? dpend + ct * pstride + 2 * kD : p.deta + chunk_row(ct) * 3;
            dst[0] = -sum_g[half];
            dst[1] = -sum_u[half];
            dst[2] = -sum_d[half];
            if (ct < pb) dst[3] = dmu_row;
            else p.dmu[chunk_row(ct)] = dmu_row;
          }
        }
        // dk = da Wg + db Wu + (eta_u x_u) Pu + (eta_g x_g) Pg; dv = de Wd^T + (eta_d s) Pd^T, from
        // the warp's own factor rows and the weights (not k, v).
        auto dk_dv = [&]() {
#pragma unroll 1
          for (int db = 0; db < 4; ++db) {
            float ak[2][4] = {}, av[2][4] = {};
#pragma unroll 1
            for (int kk = 0; kk < 4; ++kk) {
              uint32_t a[4];
              const int aoff = (row0 + lane % 16) * kLd + kk * 16 + (lane / 16) * 8;
              ldsm_x4(a, sF + aoff);
              mma_step_w(ak, a, Wg, db * 16, kk, lane);
              ldsm_x4(a, sF + kTE + aoff);
              mma_step_w(ak, a, Wu, db * 16, kk, lane);
              ldsm_x4(a, sF + 4 * kTE + aoff);
              mma_step_w(ak, a, Pu, db * 16, kk, lane);
              ldsm_x4(a, sF + 5 * kTE + aoff);
              mma_step_w(ak, a, Pg, db * 16, kk, lane);
              ldsm_x4(a, sF + 2 * kTE + aoff);
              mma_step_wt(av, a, Wd, db * 16, kk, lane);
              ldsm_x4(a, sF + 3 * kTE + aoff);
              mma_step_wt(av, a, Pd, db * 16, kk, lane);
            }
#pragma unroll
            for (int j = 0; j < 2; ++j) {
#pragma unroll
              for (int half = 0; half < 2; ++half) {
                const int t = row0 + g + 8 * half, c = db * 16 + j * 8 + c2;
                const int64_t ct = t0 + t;
                if (t >= nt) continue;
                float* dk = ct < pb ? dpend + ct * pstride + c : p.dk + chunk_row(ct) * kD + c;
                float* dv = ct < pb ? dpend + ct * pstride + kD + c : p.dv + chunk_row(ct) * kD + c;
                dk[0] = ak[j][2 * half];
                dk[1] = ak[j][2 * half + 1];
                dv[0] = av[j][2 * half];
                dv[1] = av[j][2 * half + 1];
              }
            }
          }
        };
        if constexpr (!kGx) {
          __syncwarp();  // the warp's factor rows are in shared memory
          dk_dv();
        }
        __syncthreads();  // every warp's factor rows are in shared memory
        add_partial(0, sF, sA);            // dWg += da^T K
        add_partial(1, sF + kTE, sA);      // dWu += db^T K
        add_partial(2, sB, sF + 2 * kTE);  // dWd += V^T de
        __syncthreads();  // sA, sB, sF, sEta are reused
        if constexpr (kGx) {  // the next tile's k, v load under dk, dv (which read sF until the next barrier)
          if (ti + kP < n_tiles) {
            stage_kv(ti + kP, 0);
            cp_async_commit();
          }
          dk_dv();
        }
      }
      barrier();
      reduce_partials();
      if (!p.lact_order) own_row_normalize_backward(oW, oDW);
      __syncthreads();
      for (int e = tid; e < kOE; e += kT) oDM[e] *= mu_j;
    } else {  // the trailing partial chunk only lands in the state: its gradient is grad_pending's
      for (int64_t ti = rank; ti * kTile < pb + seg; ti += kP) {
        const int64_t a = ti * kTile, b = (ti + 1) * kTile < pb + seg ? (ti + 1) * kTile : pb + seg;
        for (int64_t e = tid; e < (b - a) * PW; e += kT) {
          const int64_t t = a + e / PW;
          const int c = static_cast<int>(e % PW);
          const float x = gpend[t * pstride + c];
          if (t < pb) {
            dpend[t * pstride + c] = x;
            continue;
          }
          const int64_t row = tok(first + t - pb);
          if (c < kD) {
            p.dk[row * kD + c] = x;
          } else if (c < 2 * kD) {
            p.dv[row * kD + c - kD] = x;
          } else if (c < 2 * kD + 3) {
            p.deta[row * 3 + c - 2 * kD] = x;
          } else {
            p.dmu[row] = x;
          }
        }
      }
    }

    // Read backward: g = dO Wd, da = g b silu'(a), db = g silu(a), s = silu(a) b;
    // dWd += dO^T s, dWg += da^T Q, dWu += db^T Q, dq = da Wg + db Wu [+ dO].
    __syncthreads();
    if (kGx || p.skip_read) {  // split mode (kGx: always): the read's gradients were computed in parallel
      if (seg > 0) {
        const float* dr = p.dw_read + ((slot0 + i) * H + hh) * 3 * HD;
        for (int e = tid; e < kOE; e += kT) oDW[e] += dr[full_off(e)];
      }
      __syncthreads();
      continue;
    }
    publish(oW, 0);
    cluster_sync();
    zero_partials();
    __syncthreads();
    for (int64_t ti = rank; ti * kTile < seg; ti += kP) {
      const int64_t t0 = ti * kTile;
      read_bwd_tile_tc<T>(p.q, p.grad_o, p.dq, p.residual, H, hh, first + t0,
                          static_cast<int>(seg - t0 < kTile ? seg - t0 : kTile), sA, sB, sF, sW, sG);
    }
    cluster_sync();
    reduce_partials();
  }

  {
    float* dst = p.d_fast + (n * H + hh) * 6 * HD;
    for (int e = tid; e < kOE; e += kT) {
      dst[full_off(e)] = oDW[e];
      dst[3 * HD + full_off(e)] = oDM[e];
    }
    for (int r = tid; r < 3 * kOwn; r += kT) {
      p.d_targets[(n * H + hh) * (3 * kD) + (r / kOwn) * kD + own0 + r % kOwn] = sDTarget[r];
    }
  }
  // No CTA may exit while a peer can still read its shared memory (the last reduction).
  if constexpr (!kGx) cluster_sync();
}

template <typename T, int kCtas = 8, bool kGx = false>
__global__ void __launch_bounds__(BwdTcTraits::kThreads, 1) ttt_bwd_tc_kernel(const BwdParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  if constexpr (kGx) {
    bwd_tc_body<T, kCtas, kGx>(p);
  } else {
    __trap();  // launched with kP-CTA clusters, which need sm_90 (the dispatcher checks)
  }
#else
  bwd_tc_body<T, kCtas, kGx>(p);
#endif
}

struct ReadBwdTcTraits {
  static constexpr int kThreads = BwdTcTraits::kThreads;
  static constexpr int kTileElems = BwdTcTraits::kTileElems;
  static constexpr int kOffW = 0;                             // [3][64][kLd] gate, up, down
  static constexpr int kOffA = 3 * kTileElems * 2;            // q tile
  static constexpr int kOffB = kOffA + kTileElems * 2;        // dO tile
  static constexpr int kOffF = kOffB + kTileElems * 2;        // [3] factor tiles
  static constexpr int kOffG = kOffF + 3 * kTileElems * 2;    // [3][64][kLdG] float weight gradients
  static constexpr int kOffA2 = kOffG + 3 * BwdTcTraits::kD * BwdTcTraits::kLdG * 4;  // next q tile
  static constexpr int kOffB2 = kOffA2 + kTileElems * 2;                                // next dO tile
  static constexpr int kSmemBytes = kOffB2 + kTileElems * 2;
  static_assert(kSmemBytes <= 227 * 1024, "must fit the opt-in shared memory of sm_90");
};

// The chunk-parallel read backward of split mode: one CTA per (segment, head) walks the segment's
// tiles with the chain kernel's read_bwd_tile_tc (dq straight out), sums the read's weight
// gradients over the segment in float32 shared memory and writes them to dw_read[slot].
template <typename T>
__global__ void __launch_bounds__(ReadBwdTcTraits::kThreads, 1) ttt_read_bwd_tc_kernel(const ReadBwdParams p) {
  using Tr = ReadBwdTcTraits;
  constexpr int kD = BwdTcTraits::kD, kTile = BwdTcTraits::kTile, kLdG = BwdTcTraits::kLdG;
  constexpr int kT = Tr::kThreads;
  constexpr int64_t HD = BwdTcTraits::kMat;
  unsigned char* smem = dynamic_smem();
  T* sW = reinterpret_cast<T*>(smem + Tr::kOffW);
  T* sA = reinterpret_cast<T*>(smem + Tr::kOffA);
  T* sB = reinterpret_cast<T*>(smem + Tr::kOffB);
  T* sF = reinterpret_cast<T*>(smem + Tr::kOffF);
  float* sG = reinterpret_cast<float*>(smem + Tr::kOffG);
  const int64_t item = blockIdx.x, hh = blockIdx.y, H = p.heads;
  const int64_t first = p.work[3 * item], len = p.work[3 * item + 1], slot = p.work[3 * item + 2];
  load_weights_tc(p.ckpt + (slot * H + hh) * 6 * HD, sW);
  for (int e = threadIdx.x; e < 3 * kD * kLdG; e += kT) sG[e] = 0.f;
  __syncthreads();
  // q, dO tiles one ahead by cp.async into alternating buffers (read_bwd_tile_tc ends with a barrier).
  T* sA2 = reinterpret_cast<T*>(smem + Tr::kOffA2);
  T* sB2 = reinterpret_cast<T*>(smem + Tr::kOffB2);
  auto stage = [&](int64_t t0, int buf) {
    const int nt = static_cast<int>(len - t0 < kTile ? len - t0 : kTile);
    for (int e = threadIdx.x; e < kTile * (kD / 8); e += kT) {
      const int t = e / (kD / 8), c = (e % (kD / 8)) * 8;
      const int64_t off = t < nt ? ((first + t0 + t) * H + hh) * kD + c : 0;  // rows past the end: zeros
      cp_async16((buf ? sA2 : sA) + t * BwdTcTraits::kLd + c, static_cast<const T*>(p.q) + off, t < nt);
      cp_async16((buf ? sB2 : sB) + t * BwdTcTraits::kLd + c, static_cast<const T*>(p.grad_o) + off, t < nt);
    }
  };
  prefetched_tiles(len, stage, [&](int64_t t0, int nt, int buf) {
    read_bwd_tile_tc<T, true>(p.q, p.grad_o, p.dq, p.residual, H, hh, first + t0, nt, buf ? sA2 : sA,
                              buf ? sB2 : sB, sF, sW, sG);
  });
  float* dst = p.dw_read + (slot * H + hh) * 3 * HD;
  for (int e = threadIdx.x; e < 3 * kD * kD; e += kT) {
    const int m = e / (kD * kD), r = (e / kD) % kD, c = e % kD;
    dst[e] = sG[m * kD * kLdG + r * kLdG + c];
  }
}

}  // namespace allmem::ttt::cuda::tc
