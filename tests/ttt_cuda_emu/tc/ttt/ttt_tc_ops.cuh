// CPU stand-in for csrc/ttt/ttt_tc_ops.cuh (same path, found first on the include path of
// tests/test_ttt_tc_emu.py), so csrc/ttt/ttt_fwd_tc.cuh compiles with g++ and runs on std::threads:
// a cluster of kP CTAs runs at once (kP * 128 threads), __syncthreads is a per-CTA barrier,
// cluster_sync a cluster-wide one, warp collectives (ldmatrix, mma.sync, shuffles) exchange
// through a per-warp buffer between two warp barriers. ldmatrix and mma follow the PTX ISA's
// fragment layouts written out in csrc/ttt/ttt_tc_ops.cuh; the products are float sums of the
// exact 16-bit operands. Says nothing about the GPU memory model or speed.
#pragma once
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <type_traits>
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

// A kernel launched without clusters (emu::Ctx::cluster_bar null) must not use them.
inline void require_cluster(const char* what) {
  if (emu::ctx().cluster_bar == nullptr) {
    std::fprintf(stderr, "emulator: %s in a kernel launched without clusters\n", what);
    std::abort();
  }
}
inline int cluster_rank() {
  require_cluster("cluster_rank");
  return emu::ctx().cta;
}
inline void cluster_sync() {
  require_cluster("cluster_sync");
  emu::ctx().cluster_bar->arrive_and_wait();
}
template <typename X>
inline X* cluster_peer(X* p, int rank) {
  require_cluster("cluster_peer");
  auto& cx = emu::ctx();
  const auto off = reinterpret_cast<const unsigned char*>(p) - cx.smem[cx.cta];
  return reinterpret_cast<X*>(cx.smem[rank] + off);
}
inline float fast_exp(float x) { return std::exp(x); }

// The kGx chain's barrier of the job's CTAs through a global counter (thread 0 of each CTA adds and
// waits, as on the GPU; the CTA barriers around it order the other threads).
inline void xcta_barrier(unsigned* count, unsigned target) {
  __syncthreads();
  if (threadIdx.x == 0) {
    std::atomic_ref<unsigned> c(*count);
    c.fetch_add(1u, std::memory_order_acq_rel);
    while (c.load(std::memory_order_acquire) < target) std::this_thread::yield();
  }
  __syncthreads();
}
inline float ld_cg(const float* p) { return *p; }
inline float4 ld_cg4(const float* p) { return *reinterpret_cast<const float4*>(p); }

// Shared addresses are offsets from the CTA's dynamic shared memory (the kernels align tiles on
// them, as the hardware's swizzle is a function of the shared address).
inline uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(static_cast<const unsigned char*>(p) - emu::ctx().smem[emu::ctx().cta]);
}

// ---- wgmma m64nNk16, SS: both operands in 128-byte-swizzled shared memory through descriptors.
// Each thread computes its own accumulator entries (warp w of the warpgroup: rows 16 w + lane / 4
// (+ 8), n8 block j in d[j], the m16n8 C layout) from the descriptors, decoded field by field
// (start, LBO, SBO; layout type must be SWIZZLE_128B, base offset 0) with the swizzle applied to
// the computed addresses (bits [4, 7) ^= bits [7, 10)), as tests/swa_sm90_emu models it for the
// SWA kernels. The products are formed at the issue and again when a wait retires the group and
// must agree bitwise (an operand written between issue and wait, or not yet written at the issue,
// fails); the accumulator changes only at the retiring wait (reading it earlier sees the old value).
inline uint64_t wg_desc(uint32_t addr, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>((lbo_bytes >> 4) & 0x3FFF) << 16) |
         (static_cast<uint64_t>((sbo_bytes >> 4) & 0x3FFF) << 32) | (1ull << 62);
}
struct WgOp {
  uint64_t da, db;
  float* d;
  int n;
  bool amn, bmn, accumulate, fp16;
  std::vector<float> at_issue;
  bool rs = false;
  float a_rows[2][16] = {};  // RS: this thread's two rows of A (from its quad's registers)
};
inline thread_local std::vector<WgOp> wg_open;
inline thread_local std::vector<std::vector<WgOp>> wg_groups;
[[noreturn]] inline void wg_fail(const char* what, unsigned long long v) {
  std::fprintf(stderr, "ttt_tc_emu: %s (%#llx)\n", what, v);
  std::abort();
}
inline float wg_elem(uint32_t addr, bool fp16) {
  const uint32_t sw = addr ^ (((addr >> 7) & 7u) << 4);
  uint16_t h;
  std::memcpy(&h, emu::ctx().smem[emu::ctx().cta] + sw, 2);
  return fp16 ? emu::to_float(__half{h}) : emu::to_float(__nv_bfloat16{h});
}
inline std::vector<float> wg_products(const WgOp& op) {
  auto decode = [](uint64_t d, uint32_t& start, uint32_t& lbo, uint32_t& sbo) {
    if ((d >> 62) != 1) wg_fail("wgmma descriptor layout type is not SWIZZLE_128B", d);
    if (((d >> 49) & 7) != 0) wg_fail("wgmma descriptor base offset is not 0", d);
    start = static_cast<uint32_t>((d & 0x3FFF) << 4);
    lbo = static_cast<uint32_t>(((d >> 16) & 0x3FFF) << 4);
    sbo = static_cast<uint32_t>(((d >> 32) & 0x3FFF) << 4);
  };
  uint32_t sa = 0, la = 0, ba = 0, sb, lb, bb;
  if (!op.rs) decode(op.da, sa, la, ba);
  decode(op.db, sb, lb, bb);
  const int lane = static_cast<int>(threadIdx.x % 32), w = static_cast<int>(threadIdx.x / 32) % 4;
  std::vector<float> out(op.n / 2);
  for (int r = 0; r < op.n / 2; ++r) {
    const int m = 16 * w + lane / 4 + 8 * ((r % 4) / 2), j = 8 * (r / 4) + 2 * (lane % 4) + (r % 2);
    float s = 0.f;
    for (int k = 0; k < 16; ++k) {
      const uint32_t a = op.amn ? sa + (k / 8) * ba + (k % 8) * 128 + (m / 64) * la + (m % 64) * 2
                                : sa + (m / 8) * ba + (m % 8) * 128 + k * 2;
      const uint32_t b = op.bmn ? sb + (k / 8) * bb + (k % 8) * 128 + (j / 64) * lb + (j % 64) * 2
                                : sb + (j / 8) * bb + (j % 8) * 128 + k * 2;
      const float av = op.rs ? op.a_rows[(r % 4) / 2][k] : wg_elem(a, op.fp16);
      s += av * wg_elem(b, op.fp16);
    }
    out[r] = s;
  }
  return out;
}
template <typename T, int N, bool kAmn, bool kBmn>
inline void wg_mma(uint64_t da, uint64_t db, float (&d)[N / 8][4], bool accumulate) {
  WgOp op{da, db, &d[0][0], N, kAmn, kBmn, accumulate, std::is_same_v<T, __half>, {}};
  op.at_issue = wg_products(op);
  wg_open.push_back(std::move(op));
}
// RS: A from registers in the m16n8k16 A layout; the thread's two rows g, g + 8 are gathered from
// its quad (lanes 4g .. 4g + 3) at the issue (the hardware reads them then).
template <typename T>
inline void wg_mma_rs(const uint32_t (&a)[4], uint64_t db, float (&d)[8][4], bool accumulate) {
  auto& w = emu::warp_ex();
  const int lane = emu::lane();
  for (int i = 0; i < 4; ++i) w.reg[lane][i] = a[i];
  emu::warp_sync();
  WgOp op{0, db, &d[0][0], 64, false, false, accumulate, std::is_same_v<T, __half>, {}};
  op.rs = true;
  const int g = lane / 4;
  for (int c = 0; c < 4; ++c) {
    const uint32_t* rg = w.reg[4 * g + c];
    for (int h = 0; h < 2; ++h) {
      auto val = [&](uint32_t r) { return emu::to_float(T{static_cast<uint16_t>(h ? r >> 16 : r & 0xffffu)}); };
      op.a_rows[0][2 * c + h] = val(rg[0]);
      op.a_rows[1][2 * c + h] = val(rg[1]);
      op.a_rows[0][2 * c + 8 + h] = val(rg[2]);
      op.a_rows[1][2 * c + 8 + h] = val(rg[3]);
    }
  }
  emu::warp_sync();
  op.at_issue = wg_products(op);
  wg_open.push_back(std::move(op));
}
inline void wg_fence_a(uint32_t (&)[4]) {}
inline void wg_fence() {}
inline void wg_commit() {
  wg_groups.push_back(std::move(wg_open));
  wg_open.clear();
}
template <int kPending>
inline void wg_wait() {
  if (!wg_open.empty()) wg_fail("wgmma.wait_group with issued but uncommitted wgmmas", wg_open.size());
  while (wg_groups.size() > static_cast<size_t>(kPending)) {
    for (const WgOp& op : wg_groups.front()) {
      const std::vector<float> now = wg_products(op);
      if (std::memcmp(now.data(), op.at_issue.data(), now.size() * 4) != 0) {
        wg_fail("a wgmma operand changed between issue and wait", op.db);
      }
      for (int r = 0; r < op.n / 2; ++r) op.d[r] = (op.accumulate ? op.d[r] : 0.f) + now[r];
    }
    wg_groups.erase(wg_groups.begin());
  }
}
template <int kN>
inline void wg_fence_regs(float (&)[kN][4]) {}
inline void fence_proxy_async() {}
inline void fence_proxy_async_shared() {}
// The profiling clocks: both the steady clock's nanoseconds here.
inline long long sm_clock() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
inline long long global_ns() { return sm_clock(); }

}  // namespace allmem::ttt::cuda::tc
