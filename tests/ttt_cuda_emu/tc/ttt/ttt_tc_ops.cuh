// CPU stand-in for csrc/ttt/ttt_tc_ops.cuh (same path, found first on the include path of
// tests/test_ttt_tc_emu.py), so csrc/ttt/ttt_fwd_tc.cuh compiles with g++ and runs on std::threads:
// a cluster of kP CTAs runs at once (kP * 128 threads), __syncthreads is a per-CTA barrier,
// cluster_sync a cluster-wide one, warp collectives (ldmatrix, mma.sync, shuffles) exchange
// through a per-warp buffer between two warp barriers. ldmatrix and mma follow the PTX ISA's
// fragment layouts written out in csrc/ttt/ttt_tc_ops.cuh; the products are float sums of the
// exact 16-bit operands. Says nothing about the GPU memory model or speed.
#pragma once
#include <chrono>
#include <vector>

#include "shim_tc.h"

namespace allmem::ttt::cuda::tc {

template <typename T>
inline float to_float(T x) {
  return emu::to_float(x);
}
template <typename T>
inline T from_float(float x) {
  return emu::from_float<T>(x);
}
template <typename T>
inline uint32_t pack2(float x, float y) {
  return uint32_t(from_float<T>(x).b) | (uint32_t(from_float<T>(y).b) << 16);
}

inline unsigned char* dynamic_smem() { return emu::ctx().smem[emu::ctx().cta]; }

template <int kN>
inline void ldsm(uint32_t (&r)[kN], const void* row, bool trans) {
  auto& w = emu::warp_ex();
  const int lane = emu::lane();
  w.ptr[lane] = row;
  emu::warp_sync();
  const int g = lane / 4, c = lane % 4;
  for (int q = 0; q < kN; ++q) {
    uint16_t lo, hi;
    if (!trans) {
      const uint16_t* rowp = static_cast<const uint16_t*>(w.ptr[8 * q + g]);
      lo = rowp[2 * c];
      hi = rowp[2 * c + 1];
    } else {
      lo = static_cast<const uint16_t*>(w.ptr[8 * q + 2 * c])[g];
      hi = static_cast<const uint16_t*>(w.ptr[8 * q + 2 * c + 1])[g];
    }
    r[q] = uint32_t(lo) | (uint32_t(hi) << 16);
  }
  emu::warp_sync();
}
inline void ldsm_x4(uint32_t (&r)[4], const void* row) { ldsm(r, row, false); }
inline void ldsm_x4_t(uint32_t (&r)[4], const void* row) { ldsm(r, row, true); }
// .x2: only lanes 0..15 give addresses; the others' are garbage here, as they may be on the GPU.
inline void ldsm_x2(uint32_t (&r)[2], const void* row) {
  ldsm(r, emu::lane() < 16 ? row : reinterpret_cast<const void*>(uintptr_t{8}), false);
}
inline void ldsm_x2_t(uint32_t (&r)[2], const void* row) {
  ldsm(r, emu::lane() < 16 ? row : reinterpret_cast<const void*>(uintptr_t{8}), true);
}

template <typename T>
inline void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  auto& w = emu::warp_ex();
  const int lane = emu::lane();
  for (int i = 0; i < 4; ++i) w.reg[lane][i] = a[i];
  w.reg[lane][4] = b0;
  w.reg[lane][5] = b1;
  emu::warp_sync();
  auto half = [](uint32_t r, int hi) { return emu::to_float(T{static_cast<uint16_t>(hi ? r >> 16 : r & 0xffffu)}); };
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, c = l % 4;
    const uint32_t* rg = w.reg[l];
    for (int h = 0; h < 2; ++h) {
      A[g][2 * c + h] = half(rg[0], h);
      A[g + 8][2 * c + h] = half(rg[1], h);
      A[g][2 * c + 8 + h] = half(rg[2], h);
      A[g + 8][2 * c + 8 + h] = half(rg[3], h);
      B[2 * c + h][g] = half(rg[4], h);
      B[2 * c + 8 + h][g] = half(rg[5], h);
    }
  }
  emu::warp_sync();
  const int g = lane / 4, c = lane % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e / 2), col = 2 * c + e % 2;
    float s = 0.f;
    for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
    d[e] += s;
  }
}

// cp.async: each thread's copies are queued and done only when a wait retires their group (the
// latest moment the PTX memory model allows), so a read of the destination before the wait sees
// the old bytes (NaN-filled shared memory) and fails the test.
struct PendingCopy {
  void* dst;
  const void* src;
  bool valid;
};
inline thread_local std::vector<PendingCopy> cp_open;
inline thread_local std::vector<std::vector<PendingCopy>> cp_groups;
inline void cp_async16(void* dst, const void* src, bool valid) { cp_open.push_back({dst, src, valid}); }
inline void cp_async_commit() {
  cp_groups.push_back(std::move(cp_open));
  cp_open.clear();
}
template <int kPending>
inline void cp_async_wait() {
  while (cp_groups.size() > static_cast<size_t>(kPending)) {
    for (const PendingCopy& c : cp_groups.front()) {
      if (c.valid) {
        std::memcpy(c.dst, c.src, 16);
      } else {
        std::memset(c.dst, 0, 16);
      }
    }
    cp_groups.erase(cp_groups.begin());
  }
}

inline int cluster_rank() { return emu::ctx().cta; }
inline void cluster_sync() { emu::ctx().cluster_bar->arrive_and_wait(); }
template <typename X>
inline X* cluster_peer(X* p, int rank) {
  auto& cx = emu::ctx();
  const auto off = reinterpret_cast<const unsigned char*>(p) - cx.smem[cx.cta];
  return reinterpret_cast<X*>(cx.smem[rank] + off);
}
inline float fast_exp(float x) { return std::exp(x); }
// The profiling clocks: both the steady clock's nanoseconds here.
inline long long sm_clock() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
inline long long global_ns() { return sm_clock(); }

}  // namespace allmem::ttt::cuda::tc
