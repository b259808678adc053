// CPU stand-in for csrc/swa/swa_sm90_ptx.cuh (same include path, found first by
// tests/test_swa_sm90_emu.py), so the Hopper SWA kernels (swa_fwd_sm90.cuh, swa_bwd_sm90.cuh) and
// their host launchers compile with g++ and run on std::threads, one CTA (384 threads) at a time.
//
// What it models, after the PTX ISA:
//  * shared memory: one buffer per CTA, filled with 0xff bytes (NaN as floats and as 16-bit
//    values), addressed by 32-bit offsets; every access is bounds-checked;
//  * mbarriers: arrival count, transaction bytes, phase parity (try_wait.parity P succeeds once
//    the phase of parity P has completed; a fresh barrier counts the phase before 0 as complete);
//  * TMA (cp.async.bulk.tensor.4d with SWIZZLE_128B, zero fill out of bounds): the copy lands at
//    the latest moment the PTX memory model allows, when a thread waits on its mbarrier, so
//    reading a tile without waiting for it reads NaN (or the stage's previous tile), whatever the
//    timing of the threads;
//  * tensor-map encoding with the driver's checks (16-byte-aligned base and strides, box sizes,
//    inner box = 128 bytes under the 128-byte swizzle);
//  * wgmma m64nNk16, SS (both operands from shared memory through K-major descriptors) and RS (A
//    from the warpgroup's registers in the m16n8k16 A layout, B MN-major): descriptors decoded
//    field by field (start, LBO, SBO, layout type must be SWIZZLE_128B), the 128-byte swizzle
//    applied to the computed shared addresses (bits [4, 7) ^= bits [7, 10)), the result scattered
//    in the accumulator layout. The operands are read at the issue and again when a
//    wgmma.wait_group retires the group, and must not have changed in between (the hardware may
//    read them at any moment in that interval); the math runs at the wait, so a kernel that reads
//    an accumulator before the wait sees the stale value. Products are float sums of the exact
//    16-bit operands.
//  * named barriers, __syncthreads, __syncwarp and shuffles as std::barrier exchanges.
// Says nothing about speed, the GPU memory model beyond the above, or register limits (ptxas and
// the GPU tests do). Any protocol error (uninitialized barrier, too many arrivals, more TMA bytes
// than expected, a wait that never ends, an access out of bounds) prints a message and exits the
// process with status 3 (the tests run the emulator in a subprocess).
#pragma once
#include <math.h>

#include <atomic>
#include <barrier>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include <cuda.h>
#include <cuda_runtime.h>

#include "swa/swa_tile_math.cuh"

#define ALLMEM_SWA_SM90A_DEVICE 1
#define ALLMEM_SWA_DYNAMIC_SMEM(name) unsigned char* const name = ::emu::cta().dyn

namespace emu {

[[noreturn]] inline void fail(const char* what, long a = 0, long b = 0) {
  std::fprintf(stderr, "swa_sm90_emu: %s (%ld, %ld) [block %u,%u,%u thread %u]\n", what, a, b, blockIdx.x,
               blockIdx.y, blockIdx.z, threadIdx.x);
  std::fflush(stderr);
  std::_Exit(3);
}

// Our tensor map, stored in CUtensorMap's bytes by encode().
struct TMap {
  const unsigned char* ptr;
  uint64_t dims[4];
  uint64_t strides[4];  // bytes; strides[0] = element size
  uint32_t box[4];
};
static_assert(sizeof(TMap) <= sizeof(CUtensorMap));

struct Copy {
  uint32_t dst;
  TMap map;
  int c[4];
  int64_t bytes;
};
struct MBar {
  int count = 0, pending = 0;
  int64_t tx = 0;
  uint32_t phase = 0;  // completed phases
  std::vector<Copy> copies;
};
struct WgOp {
  bool rs = false, zero = false, fp16 = false;
  bool a_mn = false, b_mn = false;  // operand majorness (RS: B MN-major; SS: both K-major, or both MN-major)
  int n = 0;
  uint64_t da = 0, db = 0;
  float* acc[128];
  const uint32_t* a[128];
  std::vector<float> a_issue, b_issue;  // the operands as read at issue
};
struct Warpgroup {
  std::unique_ptr<std::barrier<>> bar;
  float* acc[128];
  const uint32_t* a[128];
  std::vector<WgOp> open;
  std::deque<std::vector<WgOp>> groups;
};
// A named barrier (bar.sync / bar.arrive): `count` arrivals complete a phase; waits are time-limited
// (a miscounted protocol deadlocks: reported instead of hanging).
inline int wait_limit_s() {
  // ALLMEM_EMU_WAIT_S: how long a wait may last before it counts as a hang (default 20 s).
  static const int limit_s = [] {
    const char* v = std::getenv("ALLMEM_EMU_WAIT_S");
    return v != nullptr && std::atoi(v) > 0 ? std::atoi(v) : 20;
  }();
  return limit_s;
}
struct NamedBarrier {
  std::mutex mu;
  std::condition_variable cv;
  int count = 0, arrived = 0;
  uint64_t generation = 0;
  uint64_t arrive() {
    std::lock_guard<std::mutex> lk(mu);
    const uint64_t gen = generation;
    if (++arrived == count) {
      arrived = 0;
      ++generation;
      cv.notify_all();
    }
    return gen;
  }
  void arrive_and_wait(int id) {
    const uint64_t gen = arrive();
    std::unique_lock<std::mutex> lk(mu);
    if (!cv.wait_for(lk, std::chrono::seconds(wait_limit_s()), [&] { return generation != gen; })) {
      fail("named barrier never completed (arrivals miscounted)", id, count);
    }
  }
};
struct Cta {
  unsigned char* mem = nullptr;  // shared address 0
  unsigned char* dyn = nullptr;  // the kernel's dynamic shared memory (16-byte aligned, as on a GPU)
  uint32_t size = 0;
  std::mutex mu;
  std::condition_variable cv;
  std::map<uint32_t, MBar> bars;
  std::unique_ptr<std::barrier<>> cta_bar, warp_bar[32];
  std::unique_ptr<NamedBarrier> named[16];
  float xchg[32][32];
  Warpgroup wg[8];
};
inline thread_local Cta* g_cta = nullptr;
inline Cta& cta() { return *g_cta; }

inline unsigned char* at(uint32_t addr, uint32_t bytes) {
  if (uint64_t{addr} + bytes > cta().size) fail("shared memory access out of bounds", addr, bytes);
  return cta().mem + addr;
}
inline uint32_t swizzle128(uint32_t addr) { return addr ^ (((addr >> 7) & 7u) << 4); }

inline float half_to_float(uint16_t h, bool fp16) {
  if (fp16) {
    _Float16 x;
    std::memcpy(&x, &h, 2);
    return static_cast<float>(x);
  }
  const uint32_t u = uint32_t{h} << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t float_to_half(float f, bool fp16) {
  if (fp16) {
    const _Float16 x = static_cast<_Float16>(f);
    uint16_t h;
    std::memcpy(&h, &x, 2);
    return h;
  }
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// ----------------------------------------------------------------------------- mbarrier + TMA
inline MBar& bar_locked(uint32_t addr) {
  auto it = cta().bars.find(addr);
  if (it == cta().bars.end()) fail("mbarrier used before mbarrier.init", addr);
  return it->second;
}
inline void do_copy(const Copy& c) {
  if (c.dst % 1024 != 0) fail("TMA destination not 1024-byte aligned (128-byte swizzle atoms)", c.dst);
  const TMap& m = c.map;
  const int elem = static_cast<int>(m.strides[0]);
  for (uint32_t y = 0; y < m.box[1]; ++y) {
    for (uint32_t x = 0; x < m.box[0]; ++x) {
      const int64_t g0 = int64_t{c.c[0]} + x, g1 = int64_t{c.c[1]} + y;
      const bool in = g0 >= 0 && g1 >= 0 && c.c[2] >= 0 && c.c[3] >= 0 && uint64_t(g0) < m.dims[0] &&
                      uint64_t(g1) < m.dims[1] && uint64_t(c.c[2]) < m.dims[2] && uint64_t(c.c[3]) < m.dims[3];
      uint16_t v = 0;
      if (in) {
        std::memcpy(&v, m.ptr + g0 * elem + g1 * m.strides[1] + c.c[2] * m.strides[2] + c.c[3] * m.strides[3], 2);
      }
      const uint32_t addr = swizzle128(c.dst + y * m.box[0] * elem + x * elem);
      std::memcpy(at(addr, 2), &v, 2);
    }
  }
}
// Completes the phase once every arrival is in and the transaction count is back to zero. TMA
// copies land only when a thread waits on the barrier (land_copies from wait): the latest moment
// the memory model allows, so a thread that reads a tile without waiting for it reads NaN, and a
// phase nobody waits for never completes (its next arrivals then exceed the count: an error).
inline void try_complete(MBar& b) {
  if (b.pending != 0) return;
  if (!b.copies.empty()) {  // every arrival is in: wake the waiters, who land the copies
    cta().cv.notify_all();
    return;
  }
  if (b.tx < 0) fail("TMA delivered more bytes than the barrier expected", long(b.tx));
  if (b.tx == 0) {
    ++b.phase;
    b.pending = b.count;
    cta().cv.notify_all();
  }
}
inline void land_copies(MBar& b) {
  if (b.pending != 0 || b.copies.empty()) return;
  for (const Copy& c : b.copies) {
    do_copy(c);
    b.tx -= c.bytes;
  }
  b.copies.clear();
  try_complete(b);
}
inline void arrive(uint32_t addr, int64_t tx) {
  std::lock_guard<std::mutex> lk(cta().mu);
  MBar& b = bar_locked(addr);
  b.tx += tx;
  if (--b.pending < 0) fail("more arrivals than the mbarrier's count", addr);
  try_complete(b);
}
inline void wait(uint32_t addr, uint32_t parity) {
  std::unique_lock<std::mutex> lk(cta().mu);
  MBar& b = bar_locked(addr);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(wait_limit_s());
  while (true) {
    land_copies(b);
    if ((b.phase & 1u) != parity) return;
    if (cta().cv.wait_until(lk, deadline) == std::cv_status::timeout) {
      land_copies(b);
      if ((b.phase & 1u) != parity) return;
      for (const auto& [a, m] : cta().bars) {
        std::fprintf(stderr, "swa_sm90_emu:   mbarrier %u: count %d pending %d tx %lld phase %u copies %zu\n", a,
                     m.count, m.pending, static_cast<long long>(m.tx), m.phase, m.copies.size());
      }
      fail("mbarrier wait never completed (lost arrival or TMA byte count mismatch)", addr, long(parity));
    }
  }
}

// ----------------------------------------------------------------------------- wgmma
inline Warpgroup& wg() { return cta().wg[threadIdx.x / 128]; }
inline void wg_sync() { wg().bar->arrive_and_wait(); }

struct Desc {
  uint32_t start, lbo, sbo;
};
inline Desc decode(uint64_t d) {
  if ((d >> 62) != 1) fail("wgmma descriptor layout type is not SWIZZLE_128B", long(d >> 62));
  if (((d >> 49) & 7) != 0) fail("wgmma descriptor base offset is not 0", long((d >> 49) & 7));
  return {static_cast<uint32_t>((d & 0x3FFF) << 4), static_cast<uint32_t>(((d >> 16) & 0x3FFF) << 4),
          static_cast<uint32_t>(((d >> 32) & 0x3FFF) << 4)};
}
inline float smem_elem(uint32_t addr, bool fp16) {
  uint16_t h;
  std::memcpy(&h, at(swizzle128(addr), 2), 2);
  return half_to_float(h, fp16);
}
// The operands of one wgmma, as float values: A [64][16], B [16][n].
inline void gather(const WgOp& op, std::vector<float>& A, std::vector<float>& B) {
  const int n = op.n;
  A.assign(64 * 16, 0.f);
  B.assign(16 * n, 0.f);
  const Desc db = decode(op.db);
  const Desc da = op.rs ? Desc{} : decode(op.da);
  for (int m = 0; m < 64; ++m) {
    for (int k = 0; k < 16; ++k) {
      if (!op.rs && op.a_mn) {  // MN-major: 64 m-values per 128-byte line, k lines, 8-line atoms SBO apart
        A[m * 16 + k] = smem_elem(da.start + (k / 8) * da.sbo + (k % 8) * 128 + (m / 64) * da.lbo + (m % 64) * 2,
                                  op.fp16);
      } else if (!op.rs) {  // K-major: 8-row groups SBO apart, rows 128 bytes apart, k contiguous
        A[m * 16 + k] = smem_elem(da.start + (m / 8) * da.sbo + (m % 8) * 128 + k * 2, op.fp16);
      } else {  // m16n8k16 A fragment of warp m / 16: a0 (g, k<8) a1 (g+8, k<8) a2 (g, k>=8) a3 (g+8, k>=8)
        const int w = m / 16, g = m % 8, hi = (m % 16) / 8, kc = k % 8;
        const int lane = 4 * g + kc / 2, reg = hi + 2 * (k / 8);
        const uint32_t r = op.a[32 * w + lane][reg];
        A[m * 16 + k] = half_to_float(static_cast<uint16_t>((kc % 2) ? r >> 16 : r & 0xffffu), op.fp16);
      }
    }
  }
  for (int k = 0; k < 16; ++k) {
    for (int j = 0; j < n; ++j) {
      const uint32_t addr = op.b_mn ? db.start + (k / 8) * db.sbo + (k % 8) * 128 + (j / 64) * db.lbo + (j % 64) * 2
                                  : db.start + (j / 8) * db.sbo + (j % 8) * 128 + k * 2;
      B[k * n + j] = smem_elem(addr, op.fp16);
    }
  }
}
// The hardware may read the operands at any moment between the issue and the wait that retires
// the wgmma: they are read at both ends here and must agree (bitwise), which catches a missing
// wait for the data before the issue (TMA lands late here) and a write to, or a release of, the
// operands before the wait. Then the product, scattered in the accumulator layout.
inline void execute(const WgOp& op) {
  const int n = op.n;
  std::vector<float> A, B;
  gather(op, A, B);
  const bool a_changed = std::memcmp(A.data(), op.a_issue.data(), A.size() * 4) != 0;
  const bool b_changed = std::memcmp(B.data(), op.b_issue.data(), B.size() * 4) != 0;
  if (a_changed || b_changed) {
    std::fprintf(stderr, "swa_sm90_emu: wgmma %s m64n%dk16 (A %s, B %s), descriptors a %#llx b %#llx\n",
                 op.rs ? "RS" : "SS", n, a_changed ? "changed" : "same", b_changed ? "changed" : "same",
                 static_cast<unsigned long long>(op.da), static_cast<unsigned long long>(op.db));
    fail("a wgmma operand changed between issue and wait (data not yet landed at issue, or overwritten before the wait)",
         long(op.rs), long(n));
  }
  for (int m = 0; m < 64; ++m) {
    for (int j = 0; j < n; ++j) {
      float s = 0.f;
      for (int k = 0; k < 16; ++k) s += A[m * 16 + k] * B[k * n + j];
      const int t = 32 * (m / 16) + 4 * (m % 8) + (j % 8) / 2;
      const int reg = 4 * (j / 8) + 2 * ((m % 16) / 8) + (j % 2);
      float& d = op.acc[t][reg];
      d = (op.zero ? 0.f : d) + s;
    }
  }
}
}  // namespace emu

namespace allmem::swa::cuda {
namespace {

// ----------------------------------------------------------------------------- basics
template <typename T>
struct ElemTraits {
  static constexpr bool kFp16 = std::is_same_v<T, __half>;
  static uint32_t pack(float lo, float hi) {
    return uint32_t{emu::float_to_half(lo, kFp16)} | (uint32_t{emu::float_to_half(hi, kFp16)} << 16);
  }
  static float to_float(T x) { return emu::half_to_float(x.b, kFp16); }
};
inline uint32_t smem_u32(const void* p) {
  const auto off = static_cast<const unsigned char*>(p) - emu::cta().mem;
  if (off < 0 || off > static_cast<std::ptrdiff_t>(emu::cta().size)) emu::fail("not a shared-memory pointer");
  return static_cast<uint32_t>(off);
}
inline void __syncthreads() { emu::cta().cta_bar->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::cta().warp_bar[threadIdx.x / 32]->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float x, int off) {
  float* row = emu::cta().xchg[threadIdx.x / 32];
  row[threadIdx.x % 32] = x;
  __syncwarp();
  const float r = row[(threadIdx.x % 32) ^ off];
  __syncwarp();
  return r;
}
}  // namespace
}  // namespace allmem::swa::cuda

#include "swa/swa_warp_math.cuh"  // quad_max, quad_sum, finish_rows: the real ones, on the shuffle above

namespace allmem::swa::cuda {
namespace {

// ----------------------------------------------------------------------------- PTX layer
inline void mbar_init(uint32_t bar, uint32_t count) {
  std::lock_guard<std::mutex> lk(emu::cta().mu);
  if (bar % 8 != 0) emu::fail("mbarrier not 8-byte aligned", bar);
  emu::at(bar, 8);
  emu::MBar b;
  b.count = b.pending = static_cast<int>(count);
  emu::cta().bars[bar] = b;
}
inline void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) { emu::arrive(bar, bytes); }
inline void mbar_arrive(uint32_t bar) { emu::arrive(bar, 0); }
inline bool mbar_try_wait(uint32_t bar, uint32_t parity) {
  std::lock_guard<std::mutex> lk(emu::cta().mu);
  emu::MBar& b = emu::bar_locked(bar);
  emu::land_copies(b);
  return (b.phase & 1u) != parity;
}
inline void mbar_wait(uint32_t bar, uint32_t parity) { emu::wait(bar, parity); }
inline void mbar_wait_or_trap(uint32_t bar, uint32_t parity) { emu::wait(bar, parity); }
inline void tma_load_4d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1, int c2, int c3) {
  emu::Copy c;
  c.dst = dst;
  std::memcpy(&c.map, map, sizeof(emu::TMap));
  c.c[0] = c0;
  c.c[1] = c1;
  c.c[2] = c2;
  c.c[3] = c3;
  c.bytes = int64_t{c.map.box[0]} * c.map.box[1] * c.map.box[2] * c.map.box[3] * int64_t(c.map.strides[0]);
  std::lock_guard<std::mutex> lk(emu::cta().mu);
  emu::MBar& b = emu::bar_locked(bar);
  b.copies.push_back(c);
  emu::cta().cv.notify_all();  // a waiter lands it (emu::land_copies)
}
inline void tma_prefetch_desc(const CUtensorMap*) {}
inline emu::NamedBarrier* named_barrier(int id, int threads) {
  if (id < 1 || id >= 16 || threads % 32 != 0) emu::fail("named barrier id / thread count", id, threads);
  std::lock_guard<std::mutex> lk(emu::cta().mu);
  auto& slot = emu::cta().named[id];
  if (!slot) {
    slot = std::make_unique<emu::NamedBarrier>();
    slot->count = threads;
  } else if (slot->count != threads) {
    emu::fail("named barrier used with two thread counts", id, threads);
  }
  return slot.get();
}
inline void named_barrier_sync(int id, int threads) { named_barrier(id, threads)->arrive_and_wait(id); }
inline void named_barrier_arrive(int id, int threads) { (void)named_barrier(id, threads)->arrive(); }
inline void fence_proxy_async_shared() {}
inline void threadfence_gpu() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline int atomic_add_global(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }
inline float4 load_global_cg(const float4* p) { return *p; }
inline void red_add_v2(float* p, float a, float b) {
  std::atomic_ref<float>(p[0]).fetch_add(a);
  std::atomic_ref<float>(p[1]).fetch_add(b);
}
template <int kRegs>
inline void setmaxnreg_dec() {}
template <int kRegs>
inline void setmaxnreg_inc() {}
inline void fence_mbarrier_init() {}

namespace gmma {
enum class ScaleOut { Zero, One };
}
template <typename T, int N, bool kRs, bool kAmn, bool kBmn>
struct GmmaOp {
  static constexpr int kN = N;
  static constexpr bool kRS = kRs, kAMN = kAmn, kBMN = kBmn, kFp16 = std::is_same_v<T, __half>;
};
template <typename T, int N>
using GmmaSS = GmmaOp<T, N, false, false, false>;
template <typename T, int N>
using GmmaRS = GmmaOp<T, N, true, false, true>;
template <typename T, int N>
using GmmaSSmn = GmmaOp<T, N, false, true, true>;

template <class Op, int N, size_t... I>
inline void gmma_ss(uint64_t da, uint64_t db, float (&d)[N], gmma::ScaleOut scale_d, std::index_sequence<I...>) {
  static_assert(!Op::kRS && N == Op::kN / 2, "accumulator size");
  emu::Warpgroup& g = emu::wg();
  const int t = threadIdx.x % 128;
  g.acc[t] = d;
  emu::wg_sync();
  if (t == 0) {
    emu::WgOp op;
    op.rs = false;
    op.a_mn = Op::kAMN;
    op.b_mn = Op::kBMN;
    op.zero = scale_d == gmma::ScaleOut::Zero;
    op.fp16 = Op::kFp16;
    op.n = Op::kN;
    op.da = da;
    op.db = db;
    std::memcpy(op.acc, g.acc, sizeof(op.acc));
    {
      std::lock_guard<std::mutex> lk(emu::cta().mu);  // shared memory reads vs TMA writes
      emu::gather(op, op.a_issue, op.b_issue);
    }
    g.open.push_back(op);
  }
  emu::wg_sync();
}
template <class Op, int N, size_t... I>
inline void gmma_rs(const uint32_t (&a)[4], uint64_t db, float (&d)[N], std::index_sequence<I...>) {
  static_assert(Op::kRS && N == Op::kN / 2, "accumulator size");
  emu::Warpgroup& g = emu::wg();
  const int t = threadIdx.x % 128;
  g.acc[t] = d;
  g.a[t] = a;
  emu::wg_sync();
  if (t == 0) {
    emu::WgOp op;
    op.rs = true;
    op.b_mn = true;
    op.fp16 = Op::kFp16;
    op.n = Op::kN;
    op.db = db;
    std::memcpy(op.acc, g.acc, sizeof(op.acc));
    std::memcpy(op.a, g.a, sizeof(op.a));
    {
      std::lock_guard<std::mutex> lk(emu::cta().mu);
      emu::gather(op, op.a_issue, op.b_issue);
    }
    g.open.push_back(op);
  }
  emu::wg_sync();
}
inline void fence_operand(float&) {}
inline void fence_operand(uint32_t&) {}
inline void warpgroup_arrive() {}
inline void warpgroup_commit() {
  emu::Warpgroup& g = emu::wg();
  emu::wg_sync();
  if (threadIdx.x % 128 == 0) {
    g.groups.push_back(std::move(g.open));
    g.open.clear();
  }
  emu::wg_sync();
}
template <int kPending>
inline void warpgroup_wait() {
  emu::Warpgroup& g = emu::wg();
  emu::wg_sync();
  if (threadIdx.x % 128 == 0) {
    if (!g.open.empty()) emu::fail("wgmma.wait_group with issued but uncommitted wgmmas");
    while (g.groups.size() > static_cast<size_t>(kPending)) {
      std::lock_guard<std::mutex> lk(emu::cta().mu);  // shared memory reads vs TMA writes
      for (const emu::WgOp& op : g.groups.front()) emu::execute(op);
      g.groups.pop_front();
    }
  }
  emu::wg_sync();
}

// ----------------------------------------------------------------------------- host side
using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                   const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                   CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
// cuTensorMapEncodeTiled's checks that matter here (CUDA driver API reference).
inline CUresult emu_encode(CUtensorMap* map, CUtensorMapDataType type, cuuint32_t rank, void* ptr,
                           const cuuint64_t* dims, const cuuint64_t* strides, const cuuint32_t* box,
                           const cuuint32_t* elem_strides, CUtensorMapInterleave, CUtensorMapSwizzle swizzle,
                           CUtensorMapL2promotion, CUtensorMapFloatOOBfill) {
  if (rank != 4 || reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return CUDA_ERROR_INVALID_VALUE;
  if (type != CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 && type != CU_TENSOR_MAP_DATA_TYPE_FLOAT16) return CUDA_ERROR_INVALID_VALUE;
  emu::TMap m{};
  m.ptr = static_cast<const unsigned char*>(ptr);
  m.strides[0] = 2;
  for (int i = 0; i < 4; ++i) {
    if (dims[i] == 0 || dims[i] > (uint64_t{1} << 32)) return CUDA_ERROR_INVALID_VALUE;
    if (box[i] == 0 || box[i] > 256 || elem_strides[i] != 1) return CUDA_ERROR_INVALID_VALUE;
    m.dims[i] = dims[i];
    m.box[i] = box[i];
  }
  for (int i = 0; i < 3; ++i) {
    if (strides[i] % 16 != 0 || strides[i] >= (uint64_t{1} << 40)) return CUDA_ERROR_INVALID_VALUE;
    m.strides[i + 1] = strides[i];
  }
  if (swizzle != CU_TENSOR_MAP_SWIZZLE_128B || box[0] * 2 != 128) return CUDA_ERROR_INVALID_VALUE;
  std::memset(map, 0, sizeof(CUtensorMap));
  std::memcpy(map, &m, sizeof(m));
  return CUDA_SUCCESS;
}
inline EncodeTiledFn encode_tiled_fn() { return emu_encode; }
inline bool sm90a_built_for_current_device() { return true; }

// Runs the grid one CTA at a time: `threads` std::threads, fresh NaN-filled shared memory.
template <class Params>
void launch_sm90(void (*kernel)(Params), dim3 grid, int threads, size_t smem, cudaStream_t, const Params& params) {
  if (threads % 128 != 0 || threads > 1024) emu::fail("block size", threads);
  if (smem > 227 * 1024) emu::fail("dynamic shared memory over 227 KB", long(smem));
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        emu::Cta c;
        std::vector<unsigned char> buf(smem + 16 + 1024, 0xff);
        c.mem = buf.data() + (1024 - reinterpret_cast<uintptr_t>(buf.data()) % 1024) % 1024;
        c.dyn = c.mem + 16;  // dynamic shared memory is only guaranteed 16-byte aligned
        c.size = static_cast<uint32_t>(16 + smem);
        c.cta_bar = std::make_unique<std::barrier<>>(threads);
        for (int w = 0; w < threads / 32; ++w) c.warp_bar[w] = std::make_unique<std::barrier<>>(32);
        for (int g = 0; g < threads / 128; ++g) c.wg[g].bar = std::make_unique<std::barrier<>>(128);
        std::vector<std::thread> ths;
        for (int t = 0; t < threads; ++t) {
          ths.emplace_back([&, t] {
            emu::g_cta = &c;
            threadIdx.x = t;
            blockIdx.x = x;
            blockIdx.y = y;
            blockIdx.z = z;
            gridDim = grid;
            blockDim = dim3(threads);
            kernel(params);
            // An exited thread no longer takes part in CTA-wide or warp barriers.
            c.cta_bar->arrive_and_drop();
            c.warp_bar[t / 32]->arrive_and_drop();
          });
        }
        for (auto& th : ths) th.join();
        for (auto& [addr, b] : c.bars) {
          if (!b.copies.empty()) emu::fail("TMA copies never landed (barrier arrivals missing)", addr);
        }
        for (int g = 0; g < threads / 128; ++g) {
          if (!c.wg[g].open.empty() || !c.wg[g].groups.empty()) emu::fail("wgmmas never waited for", g);
        }
      }
    }
  }
}

}  // namespace
}  // namespace allmem::swa::cuda
