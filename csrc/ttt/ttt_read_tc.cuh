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

}  // namespace allmem::ttt::cuda::tc
