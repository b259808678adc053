// The chunk-parallel read of the split tensor-core forward (d = h = 64, bf16/fp16): once the
// cluster forward (ttt_fwd_tc.cuh with skip_read) has written the state at every segment start,
// the reads of all segments are independent. One CTA of 4 warps per (segment, head) converts the
// segment's weights from the float32 checkpoint to 16-bit operands (the same rounding as the fused
// kernel's) and reads the segment's tokens 64 at a time with the fused kernel's read_tile_tc, so
// o is bitwise the fused kernel's. Not a cluster kernel: any sm_80+ device could run it.
#pragma once
#include <cstdint>

#include "ttt/ttt_cuda.h"
#include "ttt/ttt_fwd_tc.cuh"
#include "ttt/ttt_tc_ops.cuh"

namespace allmem::ttt::cuda::tc {

template <int D = 64>
struct ReadTcTraits {
  static constexpr int kThreads = FwdTcTraits::kThreads;
  static constexpr int kTileElems = D * (D + 8);          // one 16-bit [D][D + 8] tile (64 rows for q)
  static constexpr int kOffW = 0;                         // [3][D][D + 8] gate, up, down
  static constexpr int kOffQ = 3 * kTileElems * 2;        // [64][D + 8] q tile
  static constexpr int kOffQ2 = kOffQ + 64 * (D + 8) * 2;  // [64][D + 8] the next q tile (cp.async)
  static constexpr int kSmemBytes = kOffQ2 + 64 * (D + 8) * 2;
};

// The three D x D float32 weights at w (gate, up, down, row-major, contiguous) as 16-bit operand
// tiles sW [3][D][D + 8]; every thread of the CTA calls it (the caller syncs).
template <typename T, int kD = 64>
__device__ __forceinline__ void load_weights_tc(const float* w, T* sW) {
  constexpr int kT = FwdTcTraits::kThreads;
  constexpr int kLd = kD + 8, kTE = kD * kLd;
  constexpr int64_t HD = int64_t{kD} * kD;
  for (int e = threadIdx.x; e < 3 * kD * (kD / 4); e += kT) {
    const int m = e / (kD * (kD / 4)), r = (e / (kD / 4)) % kD, c = (e % (kD / 4)) * 4;
    const float4 x = *reinterpret_cast<const float4*>(w + m * HD + r * kD + c);
    uint2 v;
    v.x = pack2<T>(x.x, x.y);
    v.y = pack2<T>(x.z, x.w);
    *reinterpret_cast<uint2*>(sW + m * kTE + r * kLd + c) = v;
  }
}

template <typename T, int D = 64>
__global__ void __launch_bounds__(ReadTcTraits<D>::kThreads) ttt_read_tc_kernel(const ReadParams p) {
  constexpr int kTile = FwdTcTraits::kTile;
  constexpr int64_t HD = int64_t{D} * D;
  unsigned char* smem = dynamic_smem();
  T* sW = reinterpret_cast<T*>(smem + ReadTcTraits<D>::kOffW);
  T* sQ = reinterpret_cast<T*>(smem + ReadTcTraits<D>::kOffQ);
  const int64_t item = blockIdx.x, hh = blockIdx.y, H = p.heads;
  const int64_t first = p.work[3 * item], len = p.work[3 * item + 1], slot = p.work[3 * item + 2];
  load_weights_tc<T, D>(p.ckpt + (slot * H + hh) * 6 * HD, sW);  // gate, up, down (then the momenta)
  __syncthreads();
  // q tiles one ahead by cp.async into alternating buffers (read_tile_tc ends with a barrier).
  T* sQ2 = reinterpret_cast<T*>(smem + ReadTcTraits<D>::kOffQ2);
  auto stage = [&](int64_t t0, int buf) {
    const int nt = static_cast<int>(len - t0 < kTile ? len - t0 : kTile);
    for (int e = threadIdx.x; e < kTile * (D / 8); e += ReadTcTraits<D>::kThreads) {
      const int t = e / (D / 8), c = (e % (D / 8)) * 8;
      const int64_t off = t < nt ? ((first + t0 + t) * H + hh) * D + c : 0;  // rows past the end: zeros
      cp_async16((buf ? sQ2 : sQ) + t * (D + 8) + c, static_cast<const T*>(p.q) + off, t < nt);
    }
  };
  prefetched_tiles(len, stage, [&](int64_t t0, int nt, int buf) {
    read_tile_tc<T, D, true>(p.q, p.o, p.residual, H, hh, first + t0, nt, buf ? sQ2 : sQ, sW);
  });
}

// ---- The same read on wgmma (ALLMEM_TTT_TC_WGMMA=1 with split mode; d = h = 64; sm_90a) -------
// One warpgroup per (segment, head): the weights and q tiles in 128-byte-swizzled rows
// (FwdTcTraitsP<., ., true>::el); per 64-token tile a = Q Wg^T and b = Q Wu^T as m64n64k16 SS
// (both K-major), s = silu(a) * b packed from the accumulators into A fragments (as read_tile_tc
// packs them), o = s Wd^T as m64n64k16 RS (Wd K-major: its rows are o's columns). Same operands
// and rounding points as read_tile_tc; the float sums may differ in order (within the tests'
// bounds, not bitwise).
struct ReadWgTraits {
  static constexpr int kThreads = 128;
  static constexpr int kTE = 64 * 64;             // one swizzled [64][64] 16-bit tile
  static constexpr int kOffW = 0;                 // [3] gate, up, down
  static constexpr int kOffQ = 3 * kTE * 2;       // q tile
  static constexpr int kOffQ2 = kOffQ + kTE * 2;  // the next q tile (cp.async)
  static constexpr int kSmemBytes = kOffQ2 + kTE * 2 + 1024;  // + alignment slack
};

template <typename T>
__global__ void __launch_bounds__(ReadWgTraits::kThreads) ttt_read_wg_kernel(const ReadParams p) {
  using Sw = FwdTcTraitsP<8, 4, true>;  // the swizzled tile layout
  constexpr int kTile = 64, D = 64, kT = ReadWgTraits::kThreads, kTE = ReadWgTraits::kTE;
  constexpr int64_t HD = int64_t{D} * D;
  unsigned char* smem = dynamic_smem();
  smem += (1024u - smem_u32(smem) % 1024u) % 1024u;  // swizzle atoms: 1024-aligned
  T* sW = reinterpret_cast<T*>(smem + ReadWgTraits::kOffW);
  T* sQ1 = reinterpret_cast<T*>(smem + ReadWgTraits::kOffQ);
  T* sQ2 = reinterpret_cast<T*>(smem + ReadWgTraits::kOffQ2);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, c2 = 2 * (lane % 4);
  const int64_t item = blockIdx.x, hh = blockIdx.y, H = p.heads;
  const int64_t first = p.work[3 * item], len = p.work[3 * item + 1], slot = p.work[3 * item + 2];
  {  // gate, up, down of the checkpoint (then the momenta), rounded to T
    const float* w = p.ckpt + (slot * H + hh) * 6 * HD;
    for (int e = tid; e < 3 * D * (D / 4); e += kT) {
      const int m = e / (D * (D / 4)), r = (e / (D / 4)) % D, c = (e % (D / 4)) * 4;
      const float4 x = *reinterpret_cast<const float4*>(w + m * HD + r * D + c);
      uint2 v;
      v.x = pack2<T>(x.x, x.y);
      v.y = pack2<T>(x.z, x.w);
      *reinterpret_cast<uint2*>(sW + m * kTE + Sw::el(r, c)) = v;
    }
  }
  auto stage = [&](int64_t t0, int buf) {
    const int nt = static_cast<int>(len - t0 < kTile ? len - t0 : kTile);
    for (int e = tid; e < kTile * (D / 8); e += kT) {
      const int t = e / (D / 8), c = (e % (D / 8)) * 8;
      const int64_t off = t < nt ? ((first + t0 + t) * H + hh) * D + c : 0;  // rows past the end: zeros
      cp_async16((buf ? sQ2 : sQ1) + Sw::el(t, c), static_cast<const T*>(p.q) + off, t < nt);
    }
  };
  const uint32_t wg = smem_u32(sW), wu = smem_u32(sW + kTE), wd = smem_u32(sW + 2 * kTE);
  // The proxy fence also covers the weights (written before the first tile's).
  prefetched_tiles<true>(len, stage, [&](int64_t t0, int nt, int buf) {
    const T* sQ = buf ? sQ2 : sQ1;
    const uint32_t q = smem_u32(sQ);
    float a[8][4], b[8][4];
    wg_fence_regs(a);
    wg_fence_regs(b);
    wg_fence();
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) {
      const uint64_t dq = wg_desc(q + ks * 32, 16, 1024);
      wg_mma<T, 64, false, false>(dq, wg_desc(wg + ks * 32, 16, 1024), a, ks > 0);
      wg_mma<T, 64, false, false>(dq, wg_desc(wu + ks * 32, 16, 1024), b, ks > 0);
    }
    wg_commit();
    wg_wait<0>();
    wg_fence_regs(a);
    wg_fence_regs(b);
    uint32_t sf[4][4];  // silu(a) * b as A fragments of the down product, one per 16 hidden units
#pragma unroll
    for (int kb = 0; kb < 4; ++kb) {
      float sv[2][4];
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float x = a[2 * kb + j][e];
          sv[j][e] = x * tc_sigmoid(x) * b[2 * kb + j][e];
        }
      sf[kb][0] = pack2<T>(sv[0][0], sv[0][1]);
      sf[kb][1] = pack2<T>(sv[0][2], sv[0][3]);
      sf[kb][2] = pack2<T>(sv[1][0], sv[1][1]);
      sf[kb][3] = pack2<T>(sv[1][2], sv[1][3]);
    }
    float o[8][4];
    wg_fence_regs(o);
#pragma unroll
    for (int kb = 0; kb < 4; ++kb) wg_fence_a(sf[kb]);
    wg_fence();
#pragma unroll
    for (int kb = 0; kb < 4; ++kb) wg_mma_rs<T>(sf[kb], wg_desc(wd + kb * 32, 16, 1024), o, kb > 0);
    wg_commit();
    wg_wait<0>();
    wg_fence_regs(o);
#pragma unroll
    for (int nb = 0; nb < 8; ++nb) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int t = warp * 16 + g + 8 * half, c = nb * 8 + c2;
        if (t >= nt) continue;
        float o0 = o[nb][2 * half], o1 = o[nb][2 * half + 1];
        if (p.residual) {
          o0 += to_float(sQ[Sw::el(t, c)]);
          o1 += to_float(sQ[Sw::el(t, c + 1)]);
        }
        store_pair(static_cast<T*>(p.o) + ((first + t0 + t) * H + hh) * D + c, o0, o1);
      }
    }
    __syncthreads();  // this q buffer is the one the next stage writes
  });
}

}  // namespace allmem::ttt::cuda::tc
