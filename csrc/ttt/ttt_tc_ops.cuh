// The few warp- and cluster-level primitives of the tensor-core TTT forward (ttt_fwd_tc.cuh),
// behind small functions so the kernel's logic can also run on the CPU: tests/ttt_cuda_emu/ has a
// header of the same path that implements them with std::threads and barriers (that copy must keep
// these signatures and the PTX fragment layouts described here).
//
// Fragment layouts (PTX ISA, mma.m16n8k16 with .bf16/.f16 operands, g = lane / 4, c = lane % 4):
//   A (16 x 16, row-major view): a0 = A[g][2c, 2c+1], a1 = A[g+8][2c, 2c+1], a2 = A[g][2c+8, 2c+9],
//     a3 = A[g+8][2c+8, 2c+9], two 16-bit values per register, the lower column in the low half.
//   B (16 x 8): b0 = B[2c, 2c+1][g], b1 = B[2c+8, 2c+9][g].
//   C/D (16 x 8, float): d0, d1 = D[g][2c, 2c+1], d2, d3 = D[g+8][2c, 2c+1].
// ldmatrix .x4: lanes 8q..8q+7 give the row addresses of 8 x 8 matrix q (16 bytes per row); lane l
// receives register q = M_q[l / 4][2(l % 4), 2(l % 4) + 1], or with .trans M_q[2(l % 4)][l / 4] and
// M_q[2(l % 4) + 1][l / 4].
#pragma once
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cute/arch/mma_sm90_gmma.hpp>  // wgmma.mma_async wrappers (raw PTX, no CuTe layouts)
#include <type_traits>
#include <utility>

namespace allmem::ttt::cuda::tc {

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <>
__device__ __forceinline__ float to_float<__half>(__half x) {
  return __half2float(x);
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}

// Two floats as one register of two 16-bit values, x in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float x, float y) {
  const T lo = from_float<T>(x), hi = from_float<T>(y);
  return static_cast<uint32_t>(reinterpret_cast<const uint16_t&>(lo)) |
         (static_cast<uint32_t>(reinterpret_cast<const uint16_t&>(hi)) << 16);
}

// The kernel's dynamic shared memory (16-byte aligned).
__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char tc_dynamic_smem[];
  return tc_dynamic_smem;
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared without a register round trip (cp.async.cg, L2 only); valid == false
// writes 16 zero bytes and reads nothing (src-size 0; src must still be a global address).
__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem_dst)), "l"(gmem_src),
               "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most kPending of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(row)));
}

__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(row)));
}

// ldmatrix .x2: lanes 0..15 give the row addresses of matrices 0 and 1 (the other lanes' are
// ignored); lane l receives register q of matrix q as for .x4.
__device__ __forceinline__ void ldsm_x2(uint32_t (&r)[2], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(smem_u32(row)));
}

__device__ __forceinline__ void ldsm_x2_t(uint32_t (&r)[2], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_u32(row)));
}

// d += A B for one m16n8k16 tile, float accumulation.
template <typename T>
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Thread block cluster (sm_90): rank of this CTA, a full barrier with release/acquire semantics
// at cluster scope (orders shared, distributed shared and global memory for the whole cluster),
// and the address of the same shared-memory object in another CTA of the cluster.
__device__ __forceinline__ int cluster_rank() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return static_cast<int>(cooperative_groups::this_cluster().block_rank());
#else
  return 0;
#endif
}

__device__ __forceinline__ void cluster_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cooperative_groups::this_cluster().sync();
#else
  __syncthreads();
#endif
}

template <typename X>
__device__ __forceinline__ X* cluster_peer(X* p, int rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return cooperative_groups::this_cluster().map_shared_rank(p, static_cast<unsigned>(rank));
#else
  (void)rank;
  return p;
#endif
}

__device__ __forceinline__ float fast_exp(float x) { return __expf(x); }

// A barrier of the kP CTAs of one job without clusters (ttt_chain_tc.cuh, ttt_fwd_tc.cuh kGx; sm_80+:
// the CTAs are co-resident because the host launches them cooperatively): every CTA adds 1 to the job's counter
// (zeroed before the launch) and waits until it reaches `target` (kP times the number of barriers
// passed so far, this one included). Global writes of every thread of an arriving CTA before the
// barrier are visible to every thread of the others after it (CTA barrier, then a release add and
// relaxed polls at gpu scope by thread 0 closed by one acq_rel fence (an acquire pattern: an acquire
// load in the loop would invalidate the SM's L1 at every poll, under the co-resident CTAs of other
// jobs), then a CTA barrier); read peers' data with ld_cg, which skips the SM's L1 (not coherent with
// other SMs' writes). A wait longer than kXctaTimeoutNs (the peers do at most one chunk's work
// between barriers: well under a millisecond, or a second under compute-sanitizer) means they are
// not running, which a cooperative launch rules out; it traps rather than hang the device: a sticky
// error that ends the process's CUDA context (every later CUDA call fails), reported at the next
// synchronization.
constexpr long long kXctaTimeoutNs = 20'000'000'000LL;
__device__ __forceinline__ void xcta_barrier(unsigned* count, unsigned target) {
  __syncthreads();
  if (threadIdx.x == 0) {
#if defined(__CUDA_ARCH__)
    // No __threadfence() first: the release add is cumulative over what the CTA barrier ordered
    // before it (review, thirteenth session: the fence added a MEMBAR.SC.GPU and an L1 invalidation).
    asm volatile("red.release.gpu.global.add.u32 [%0], 1;\n" ::"l"(count) : "memory");
    unsigned seen = 0;
    long long start = -1, now = 0;
    while (true) {
      asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];\n" : "=r"(seen) : "l"(count) : "memory");
      if (seen >= target) break;
      asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
      if (start < 0) start = now;
      if (now - start > kXctaTimeoutNs) __trap();
    }
    asm volatile("fence.acq_rel.gpu;\n" ::: "memory");
#else
    (void)count;
    (void)target;
#endif
  }
  __syncthreads();
}
__device__ __forceinline__ float ld_cg(const float* p) { return __ldcg(p); }
__device__ __forceinline__ float4 ld_cg4(const float* p) { return __ldcg(reinterpret_cast<const float4*>(p)); }

// ---- wgmma (sm_90a; ALLMEM_TTT_TC_WGMMA, ttt_fwd_tc.cuh's kWg kernels) --------------------------
// Operands in 128-byte-swizzled shared memory (rows of 64 16-bit values, 1024-byte atoms of 8
// rows; the layout and descriptor conventions of csrc/swa/swa_sm90_utils.cuh, checked there against
// CuTe's make_gmma_desc and on an H100): descriptor fields start >> 4, LBO >> 4 (bits 16-29),
// SBO >> 4 (bits 32-45), layout type 1 (SWIZZLE_128B).
__device__ __forceinline__ uint64_t wg_desc(uint32_t addr, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>((lbo_bytes >> 4) & 0x3FFF) << 16) |
         (static_cast<uint64_t>((sbo_bytes >> 4) & 0x3FFF) << 32) | (1ull << 62);
}

namespace wg_detail {
namespace gmma = cute::SM90::GMMA;
constexpr gmma::Major major(bool mn) { return mn ? gmma::Major::MN : gmma::Major::K; }
// The SS wgmma of T operands, m64nNk16 (N = 16, 32 or 64), with each operand's major-ness.
template <typename T, int N, gmma::Major A, gmma::Major B>
using OpSS = std::conditional_t<
    std::is_same_v<T, __nv_bfloat16>,
    std::conditional_t<N == 16, gmma::MMA_64x16x16_F32BF16BF16_SS<A, B>,
                       std::conditional_t<N == 32, gmma::MMA_64x32x16_F32BF16BF16_SS<A, B>,
                                          gmma::MMA_64x64x16_F32BF16BF16_SS<A, B>>>,
    std::conditional_t<N == 16, gmma::MMA_64x16x16_F32F16F16_SS<A, B>,
                       std::conditional_t<N == 32, gmma::MMA_64x32x16_F32F16F16_SS<A, B>,
                                          gmma::MMA_64x64x16_F32F16F16_SS<A, B>>>>;
template <class O, size_t... I>
__device__ __forceinline__ void fma(uint64_t da, uint64_t db, float* d, bool accumulate, std::index_sequence<I...>) {
  O::fma(da, db, d[I]..., accumulate ? gmma::ScaleOut::One : gmma::ScaleOut::Zero);
}
template <typename T>
using OpRS = std::conditional_t<std::is_same_v<T, __nv_bfloat16>,
                                gmma::MMA_64x64x16_F32BF16BF16_RS<gmma::Major::K, gmma::Major::K>,
                                gmma::MMA_64x64x16_F32F16F16_RS<gmma::Major::K, gmma::Major::K>>;
template <class O, size_t... I>
__device__ __forceinline__ void fma_rs(const uint32_t (&a)[4], uint64_t db, float* d, bool accumulate,
                                       std::index_sequence<I...>) {
  O::fma(a[0], a[1], a[2], a[3], db, d[I]..., accumulate ? gmma::ScaleOut::One : gmma::ScaleOut::Zero);
}
}  // namespace wg_detail

// d (=|+=) A B for one m64nNk16 step of the warpgroup (all 128 threads call it), both operands
// from shared memory through descriptors; kAmn / kBmn: the operand is MN-major (else K-major).
// d: this thread's N / 2 accumulators in the m16n8 C layout of its warp's 16 rows, n8 block j in
// d[j]. Issued, not waited for (wg_commit, wg_wait).
template <typename T, int N, bool kAmn, bool kBmn>
__device__ __forceinline__ void wg_mma(uint64_t da, uint64_t db, float (&d)[N / 8][4], bool accumulate) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  static_assert(N == 16 || N == 32 || N == 64, "m64n16, n32 or n64");
  using wg_detail::major;
  wg_detail::fma<wg_detail::OpSS<T, N, major(kAmn), major(kBmn)>>(da, db, &d[0][0], accumulate,
                                                                  std::make_index_sequence<N / 2>{});
#else
  (void)da, (void)db, (void)d, (void)accumulate;
  __trap();  // sm_90a code only (the dispatcher checks ttt_fwd_wg_available)
#endif
}
// d (=|+=) A B for one m64n64k16 step, A from the warpgroup's registers (each warp its 16 rows, the
// m16n8k16 A fragment layout), B K-major from shared memory.
template <typename T>
__device__ __forceinline__ void wg_mma_rs(const uint32_t (&a)[4], uint64_t db, float (&d)[8][4], bool accumulate) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  wg_detail::fma_rs<wg_detail::OpRS<T>>(a, db, &d[0][0], accumulate, std::make_index_sequence<32>{});
#else
  (void)a, (void)db, (void)d, (void)accumulate;
  __trap();
#endif
}
// A fragment registers pinned like the accumulators (wg_fence_regs).
__device__ __forceinline__ void wg_fence_a(uint32_t (&a)[4]) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#pragma unroll
  for (int j = 0; j < 4; ++j) asm volatile("" : "+r"(a[j])::"memory");
#else
  (void)a;
#endif
}
// wgmma.fence before the warpgroup's first wgmma that touches registers written since.
__device__ __forceinline__ void wg_fence() {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wg_commit() {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
// Waits until at most kPending of the warpgroup's committed wgmma groups are in flight.
template <int kPending>
__device__ __forceinline__ void wg_wait() {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
#endif
}
// Pins accumulator registers in program order around wgmma issue and wait (the compiler must not
// move their other uses across), as CuTe's warpgroup_fence_operand.
template <int kN>
__device__ __forceinline__ void wg_fence_regs(float (&d)[kN][4]) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#pragma unroll
  for (int i = 0; i < kN; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) asm volatile("" : "+f"(d[i][j])::"memory");
  }
#else
  (void)d;
#endif
}
// Generic-proxy writes of shared memory made visible to the async proxy that wgmma reads through:
// the writers fence before the barrier. This form (no state space: every one, a gpu-scope MEMBAR in
// the SASS) for the distributed stores into peers' shared memory (publish); the CTA's own tiles
// (stores, cp.async) take fence_proxy_async_shared (a CTA-scope MEMBAR, as the SWA kernels).
__device__ __forceinline__ void fence_proxy_async() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.proxy.async;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void fence_proxy_async_shared() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// Profiling clocks (ALLMEM_TTT_TC_PHASES): the SM's cycle counter and the global nanosecond timer.
__device__ __forceinline__ long long sm_clock() { return clock64(); }
__device__ __forceinline__ long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return static_cast<long long>(t);
}

}  // namespace allmem::ttt::cuda::tc
