// The hardware side of the Hopper (sm_90a) SWA kernels: every PTX instruction they issue
// (mbarrier, TMA, named barriers, setmaxnreg, wgmma and its fences), dynamic shared memory, and the
// host calls that reach the driver (tensor-map encoding, the sm_90a-code check, the launch). The
// layout and scheduling logic above it (swa_sm90_utils.cuh, swa_fwd_sm90.cuh, swa_bwd_sm90.cuh)
// uses only these names, so tests/swa_sm90_emu can put a CPU stand-in for this one file under it
// and run the kernels unchanged. Anonymous namespace: each kernel translation unit gets its own
// copy (and its own kSm90aBuilt symbol to ask about).
#pragma once
#include <cuda.h>  // CUtensorMap and cuTensorMapEncodeTiled's types (the function is fetched at run time)

#include <cute/arch/mma_sm90_gmma.hpp>  // wgmma.mma_async wrappers (raw PTX, no CuTe layouts)
#include <type_traits>
#include <utility>

#include "swa/swa_kernel_utils.cuh"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define ALLMEM_SWA_SM90A_DEVICE 1
#endif

// Declares the CTA's dynamic shared memory as `unsigned char name[]`. A macro, not a function
// returning the pointer: through a function ptxas lost track of the array being shared memory and
// the forward's register allocation changed (spills in the backward).
#define ALLMEM_SWA_DYNAMIC_SMEM(name) extern __shared__ unsigned char name[]

namespace allmem::swa::cuda {
namespace {

// Not const: a const __device__ variable could be folded away, and the host reads it by symbol.
__device__ int kSm90aBuilt =
#ifdef ALLMEM_SWA_SM90A_DEVICE
    1;
#else
    0;
#endif

#ifdef ALLMEM_SWA_SM90A_DEVICE
// ---------------------------------------------------------------------------------------------
// mbarrier, TMA, named barriers, setmaxnreg (PTX ISA 8.0, sm_90)
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ bool mbar_try_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done)
      : "r"(bar), "r"(parity)
      : "memory");
  return done != 0;
}
__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;\n" : "=l"(t));
  return t;
}
// Waits until the phase with the given parity has completed. A fresh barrier counts as having
// completed the phase before phase 0, so waiting for parity 1 on it returns at once (the producer's
// first pass over the empty barriers).
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  while (!mbar_try_wait(bar, parity)) {
  }
}
// The producer's waits: one that lasts kHangTimeoutNs means a broken pipeline (a TMA that never
// lands, a lost arrival), so it traps and the launch fails with an error instead of hanging the GPU
// session (legitimate waits are microseconds, even under compute-sanitizer far below this). Only
// the producer checks: in the consumers the timer code cost registers and made ptxas serialize
// the wgmmas. The producer waits for the consumers' last release before it exits, so a consumer
// stuck on a load also ends in this trap.
constexpr uint64_t kHangTimeoutNs = 20ull * 1000 * 1000 * 1000;
__device__ __forceinline__ void mbar_wait_or_trap(uint32_t bar, uint32_t parity) {
  if (mbar_try_wait(bar, parity)) return;
  const uint64_t t0 = global_timer_ns();
  while (!mbar_try_wait(bar, parity)) {
    if (global_timer_ns() - t0 > kHangTimeoutNs) __trap();
  }
}
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1, int c2,
                                            int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, %6}], "
      "[%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}
__device__ __forceinline__ void tma_prefetch_desc(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
// Arrives on named barrier `id` (of `threads` threads) without waiting.
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

__device__ __forceinline__ void fence_mbarrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
// Orders this thread's generic-proxy shared-memory writes before later async-proxy reads (a
// wgmma reading a tile the threads wrote with st.shared).
__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// Cross-CTA hand-off (the sink-block split of the dK/dV kernels): a gpu-scope fence, an integer
// atomic add that returns the old value, and an L2 load that does not trust this SM's L1.
__device__ __forceinline__ void threadfence_gpu() { __threadfence(); }
__device__ __forceinline__ int atomic_add_global(int* p, int v) { return atomicAdd(p, v); }
__device__ __forceinline__ float4 load_global_cg(const float4* p) { return __ldcg(p); }
// p[0] += a, p[1] += b in global memory, one vector reduction (sm_90), relaxed, gpu scope.
__device__ __forceinline__ void red_add_v2(float* p, float a, float b) {
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(p), "f"(a), "f"(b) : "memory");
}

// ---------------------------------------------------------------------------------------------
// wgmma
namespace gmma = cute::SM90::GMMA;
// wgmma m64nNk16, fp32 accumulators. SS: A and B both from shared memory, both K-major (the
// contraction dim contiguous: Q K^T, K Q^T, dO V^T, V dO^T). RS: A from registers (an accumulator
// rounded to 16 bits, see acc layout below), B from shared memory MN-major (a [k rows][n] tile
// read "transposed": P V, P^T dO, dS K, dS^T Q).
template <typename T, int N>
using GmmaSS = std::conditional_t<
    std::is_same_v<T, __nv_bfloat16>,
    std::conditional_t<N == 128, gmma::MMA_64x128x16_F32BF16BF16_SS<gmma::Major::K, gmma::Major::K>,
                       gmma::MMA_64x64x16_F32BF16BF16_SS<gmma::Major::K, gmma::Major::K>>,
    std::conditional_t<N == 128, gmma::MMA_64x128x16_F32F16F16_SS<gmma::Major::K, gmma::Major::K>,
                       gmma::MMA_64x64x16_F32F16F16_SS<gmma::Major::K, gmma::Major::K>>>;
template <typename T, int N>
using GmmaRS = std::conditional_t<
    std::is_same_v<T, __nv_bfloat16>,
    std::conditional_t<N == 128, gmma::MMA_64x128x16_F32BF16BF16_RS<gmma::Major::K, gmma::Major::MN>,
                       gmma::MMA_64x64x16_F32BF16BF16_RS<gmma::Major::K, gmma::Major::MN>>,
    std::conditional_t<N == 128, gmma::MMA_64x128x16_F32F16F16_RS<gmma::Major::K, gmma::Major::MN>,
                       gmma::MMA_64x64x16_F32F16F16_RS<gmma::Major::K, gmma::Major::MN>>>;

// SS with both operands MN-major: dQ = dS K from dS^T stored [keys][queries] (A read transposed)
// and the resident K tile (B, as in the RS products). N = D / 2: each consumer warpgroup takes
// half of the head dim.
template <typename T, int N>
using GmmaSSmn = std::conditional_t<
    std::is_same_v<T, __nv_bfloat16>,
    std::conditional_t<N == 64, gmma::MMA_64x64x16_F32BF16BF16_SS<gmma::Major::MN, gmma::Major::MN>,
                       gmma::MMA_64x32x16_F32BF16BF16_SS<gmma::Major::MN, gmma::Major::MN>>,
    std::conditional_t<N == 64, gmma::MMA_64x64x16_F32F16F16_SS<gmma::Major::MN, gmma::Major::MN>,
                       gmma::MMA_64x32x16_F32F16F16_SS<gmma::Major::MN, gmma::Major::MN>>>;

template <class Op, int N, size_t... I>
__device__ __forceinline__ void gmma_ss(uint64_t da, uint64_t db, float (&d)[N], gmma::ScaleOut scale_d,
                                        std::index_sequence<I...>) {
  Op::fma(da, db, d[I]..., scale_d);
}
template <class Op, int N, size_t... I>
__device__ __forceinline__ void gmma_rs(const uint32_t (&a)[4], uint64_t db, float (&d)[N], std::index_sequence<I...>) {
  Op::fma(a[0], a[1], a[2], a[3], db, d[I]..., gmma::ScaleOut::One);
}

__device__ __forceinline__ void fence_operand(float& r) { cute::warpgroup_fence_operand(r); }
__device__ __forceinline__ void fence_operand(uint32_t& r) { cute::warpgroup_fence_operand(r); }
__device__ __forceinline__ void warpgroup_arrive() { cute::warpgroup_arrive(); }  // wgmma.fence
__device__ __forceinline__ void warpgroup_commit() { cute::warpgroup_commit_batch(); }
template <int kPending>
__device__ __forceinline__ void warpgroup_wait() {
  cute::warpgroup_wait<kPending>();
}
#endif  // ALLMEM_SWA_SM90A_DEVICE

// ---------------------------------------------------------------------------------------------
// Host side
using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                   const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                   CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

EncodeTiledFn encode_tiled_fn() {
  static const EncodeTiledFn fn = []() -> EncodeTiledFn {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();
      return nullptr;
    }
    return reinterpret_cast<EncodeTiledFn>(f);
  }();
  return fn;
}

// Whether the cubin the driver loaded for the current device has the kernel bodies (sm_90a).
bool sm90a_built_for_current_device() {
  static int cached[64];  // 0 unknown, 1 yes, 2 no
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) {
    (void)cudaGetLastError();
    return false;
  }
  if (cached[dev] == 0) {
    int built = 0;
    const bool ok = cudaMemcpyFromSymbol(&built, kSm90aBuilt, sizeof(int)) == cudaSuccess;
    if (!ok) (void)cudaGetLastError();
    cached[dev] = ok && built == 1 ? 1 : 2;
  }
  return cached[dev] == 1;
}


// Launches a kernel with `smem` bytes of dynamic shared memory (opting in above 48 KB).
template <class Params>
void launch_sm90(void (*kernel)(Params), dim3 grid, int threads, size_t smem, cudaStream_t stream,
                 const Params& params) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  kernel<<<grid, threads, smem, stream>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace allmem::swa::cuda
