// Launch code of the tensor-core TTT forward (the kernel and its design: ttt_fwd_tc.cuh) and of
// the chunk-parallel read of its split mode (ttt_read_tc.cuh). Built
// for every CUDA arch; the cluster kernels' bodies exist only for sm_90+ (thread block clusters), so
// the dispatcher (ttt_api_cuda.cpp) takes those only on such devices; the token-split forward
// without clusters and the mma.sync read run on sm_80+. The hidden-unit chain: ttt_chain_tc.cu.
#include <c10/cuda/CUDAException.h>

#include <map>
#include <mutex>

#include "ttt/ttt_cuda.h"
#include "ttt/ttt_tc_launch.h"
#include "ttt/ttt_fwd_tc.cuh"
#include "ttt/ttt_read_tc.cuh"

namespace allmem::ttt::cuda {
namespace {

// 1 in the sm_90a code of this file (the wgmma chain needs it), 0 in other targets' code; the host
// reads the value the device's code has. Not const: a const __device__ variable could be folded away.
__device__ int kTttSm90aBuilt =
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    1;
#else
    0;
#endif

template <typename T, int P, int W, bool G>
void launch_tc(const FwdParams& p, cudaStream_t stream) {
  using Tr = tc::FwdTcTraitsP<P, W, G>;
  launch_clusters(tc::ttt_fwd_tc_kernel<T, P, W, G>, p, p.n_seqs * p.heads * Tr::kP, Tr::kThreads, Tr::kSmemBytes,
                  Tr::kP, stream);
}

// The token-split forward of one shape: 8 or 16 CTAs per cluster x 4 or 8 warps (G: on wgmma).
template <typename T, bool G>
void launch_shape(const FwdParams& p, cudaStream_t stream, int cluster, int warps) {
  if (cluster == 16) return warps == 8 ? launch_tc<T, 16, 8, G>(p, stream) : launch_tc<T, 16, 4, G>(p, stream);
  return warps == 8 ? launch_tc<T, 8, 8, G>(p, stream) : launch_tc<T, 8, 4, G>(p, stream);
}

// The kernel that will run (G: the wgmma one, with its own shared-memory size).
template <typename T, int P, int W, bool G>
int active_clusters() {
  using Tr = tc::FwdTcTraitsP<P, W, G>;
  return max_active_clusters(tc::ttt_fwd_tc_kernel<T, P, W, G>, Tr::kThreads, Tr::kSmemBytes, Tr::kP);
}

template <typename T, bool G>
int active_clusters_of(int cluster, int warps) {
  if (cluster == 16) return warps == 8 ? active_clusters<T, 16, 8, G>() : active_clusters<T, 16, 4, G>();
  return warps == 8 ? active_clusters<T, 8, 8, G>() : active_clusters<T, 8, 4, G>();
}

template <typename T, int D>
void launch_read(const ReadParams& p, cudaStream_t stream) {
  using Tr = tc::ReadTcTraits<D>;
  auto kernel = tc::ttt_read_tc_kernel<T, D>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes));
  const dim3 grid(static_cast<unsigned>(p.n_work), static_cast<unsigned>(p.heads));
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The token-split forward without clusters (kGx: 8 CTAs, 4 warps, mma.sync).
using FwdGxTraits = tc::FwdTcTraitsP<8, 4, false, true>;
static_assert(FwdGxTraits::kPart == kFwdGxPartFloats, "ttt_cuda.h's size of a partial block");

template <typename T>
int64_t fwd_gx_jobs() {
  return cooperative_jobs(tc::ttt_fwd_tc_kernel<T, 8, 4, false, true>, FwdGxTraits::kThreads, FwdGxTraits::kSmemBytes,
                          FwdGxTraits::kP);
}

}  // namespace

template <typename T>
void launch_read_wg(const ReadParams& p, cudaStream_t stream) {
  auto kernel = tc::ttt_read_wg_kernel<T>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, tc::ReadWgTraits::kSmemBytes));
  const dim3 grid(static_cast<unsigned>(p.n_work), static_cast<unsigned>(p.heads));
  kernel<<<grid, tc::ReadWgTraits::kThreads, tc::ReadWgTraits::kSmemBytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_ttt_read_tc(const ReadParams& p, cudaStream_t stream) {
  if (p.n_work == 0 || p.heads == 0) return;
  TORCH_CHECK(p.d == 64 || p.d == 128, "allmem: launch_ttt_read_tc: d = 64 or 128, got ", p.d);
  const bool d64 = p.d == 64;
  if (p.wgmma) {
    TORCH_CHECK(d64, "allmem: launch_ttt_read_tc: the wgmma read is d = 64's");
    if (p.dtype == InDType::kBFloat16) return launch_read_wg<__nv_bfloat16>(p, stream);
    if (p.dtype == InDType::kFloat16) return launch_read_wg<__half>(p, stream);
  }
  if (p.dtype == InDType::kBFloat16) {
    return d64 ? launch_read<__nv_bfloat16, 64>(p, stream) : launch_read<__nv_bfloat16, 128>(p, stream);
  }
  if (p.dtype == InDType::kFloat16) return d64 ? launch_read<__half, 64>(p, stream) : launch_read<__half, 128>(p, stream);
  TORCH_CHECK(false, "allmem: launch_ttt_read_tc: bfloat16 or float16 inputs only (the caller checks)");
}

void launch_ttt_fwd_tc_gx(const FwdParams& p, cudaStream_t stream, int64_t wave) {
  TORCH_CHECK(p.xpub != nullptr, "allmem: launch_ttt_fwd_tc_gx: no publish buffer");
  auto go = [&](auto kernel) {
    launch_cooperative_waves(kernel, p, p.n_seqs * p.heads, wave, FwdGxTraits::kThreads, FwdGxTraits::kSmemBytes,
                             FwdGxTraits::kP, stream, "launch_ttt_fwd_tc_gx");
  };
  if (p.dtype == InDType::kBFloat16) return go(tc::ttt_fwd_tc_kernel<__nv_bfloat16, 8, 4, false, true>);
  if (p.dtype == InDType::kFloat16) return go(tc::ttt_fwd_tc_kernel<__half, 8, 4, false, true>);
  TORCH_CHECK(false, "allmem: launch_ttt_fwd_tc_gx: bfloat16 or float16 inputs only (the caller checks)");
}

int64_t ttt_fwd_tc_gx_jobs(InDType dt) {
  return dt == InDType::kBFloat16 ? fwd_gx_jobs<__nv_bfloat16>() : fwd_gx_jobs<__half>();
}

// Asked once per device (the symbol copy is synchronous: every call would wait for the device's
// queued work, review).
bool ttt_fwd_wg_available() {
  static std::mutex mu;
  static std::map<int, bool> cache;
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  std::lock_guard<std::mutex> lock(mu);
  const auto it = cache.find(dev);
  if (it != cache.end()) return it->second;
  int built = 0;
  bool ok = cudaMemcpyFromSymbol(&built, kTttSm90aBuilt, sizeof(int)) == cudaSuccess;
  if (!ok) (void)cudaGetLastError();
  ok = ok && built == 1;
  cache.emplace(dev, ok);
  return ok;
}

void launch_ttt_fwd_tc(const FwdParams& p, cudaStream_t stream, int cluster, int warps, bool wgmma) {
  TORCH_CHECK(cluster == 8 || cluster == 16, "allmem: launch_ttt_fwd_tc: clusters of 8 or 16 CTAs, got ", cluster);
  TORCH_CHECK(warps == 4 || warps == 8, "allmem: launch_ttt_fwd_tc: 4 or 8 warps per CTA, got ", warps);
  TORCH_CHECK(!wgmma || p.skip_read, "allmem: launch_ttt_fwd_tc: the wgmma chain is split mode's");
  if (p.dtype == InDType::kBFloat16) {
    return wgmma ? launch_shape<__nv_bfloat16, true>(p, stream, cluster, warps)
                 : launch_shape<__nv_bfloat16, false>(p, stream, cluster, warps);
  }
  if (p.dtype == InDType::kFloat16) {
    return wgmma ? launch_shape<__half, true>(p, stream, cluster, warps)
                 : launch_shape<__half, false>(p, stream, cluster, warps);
  }
  TORCH_CHECK(false, "allmem: launch_ttt_fwd_tc: bfloat16 or float16 inputs only (the caller checks)");
}

int ttt_fwd_tc_active_clusters(InDType dt, int cluster, int warps, bool wgmma) {
  TORCH_CHECK(cluster == 8 || cluster == 16, "allmem: ttt_fwd_tc_active_clusters: 8 or 16 CTAs, got ", cluster);
  TORCH_CHECK(warps == 4 || warps == 8, "allmem: ttt_fwd_tc_active_clusters: 4 or 8 warps, got ", warps);
  if (dt == InDType::kBFloat16) {
    return wgmma ? active_clusters_of<__nv_bfloat16, true>(cluster, warps)
                 : active_clusters_of<__nv_bfloat16, false>(cluster, warps);
  }
  return wgmma ? active_clusters_of<__half, true>(cluster, warps) : active_clusters_of<__half, false>(cluster, warps);
}

}  // namespace allmem::ttt::cuda
