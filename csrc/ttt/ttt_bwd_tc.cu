// Launch code of the tensor-core TTT backward (the kernel and its design: ttt_bwd_tc.cuh). Built
// for every CUDA arch; the cluster kernels' bodies exist only for sm_90+ (thread block clusters), so
// the dispatcher (ttt_api_cuda.cpp) takes those only on such devices; the kernel without clusters
// (kGx) and the read backward run on sm_80+.
#include <c10/cuda/CUDAException.h>

#include "ttt/ttt_bwd_tc.cuh"
#include "ttt/ttt_cuda.h"
#include "ttt/ttt_tc_launch.h"

namespace allmem::ttt::cuda {
namespace {

template <typename T, int P>
void launch_tc(const BwdParams& p, cudaStream_t stream) {
  using Tr = tc::BwdTcTraitsP<P>;
  launch_clusters(tc::ttt_bwd_tc_kernel<T, P>, p, p.n_seqs * p.heads * Tr::kP, Tr::kThreads, Tr::kSmemBytes, Tr::kP,
                  stream);
}

template <typename T, int P>
int active_clusters() {
  using Tr = tc::BwdTcTraitsP<P>;
  return max_active_clusters(tc::ttt_bwd_tc_kernel<T, P>, Tr::kThreads, Tr::kSmemBytes, Tr::kP);
}

// The backward without clusters (kGx: 8 CTAs per job).
using BwdGxTraits = tc::BwdTcTraitsP<8, true>;
static_assert(BwdGxTraits::kPart == kBwdGxPartFloats, "ttt_cuda.h's size of a partial block");

template <typename T>
int64_t bwd_gx_jobs() {
  return cooperative_jobs(tc::ttt_bwd_tc_kernel<T, 8, true>, BwdGxTraits::kThreads, BwdGxTraits::kSmemBytes,
                          BwdGxTraits::kP);
}

template <typename T>
void launch_read_bwd(const ReadBwdParams& p, cudaStream_t stream) {
  using Tr = tc::ReadBwdTcTraits;
  auto kernel = tc::ttt_read_bwd_tc_kernel<T>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes));
  const dim3 grid(static_cast<unsigned>(p.n_work), static_cast<unsigned>(p.heads));
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void launch_ttt_read_bwd_tc(const ReadBwdParams& p, cudaStream_t stream) {
  if (p.n_work == 0 || p.heads == 0) return;
  if (p.dtype == InDType::kBFloat16) return launch_read_bwd<__nv_bfloat16>(p, stream);
  if (p.dtype == InDType::kFloat16) return launch_read_bwd<__half>(p, stream);
  TORCH_CHECK(false, "allmem: launch_ttt_read_bwd_tc: bfloat16 or float16 inputs only (the caller checks)");
}

void launch_ttt_bwd_tc(const BwdParams& p, cudaStream_t stream, int cluster) {
  TORCH_CHECK(cluster == 8 || cluster == 16, "allmem: launch_ttt_bwd_tc: clusters of 8 or 16 CTAs, got ", cluster);
  const bool c16 = cluster == 16;
  if (p.dtype == InDType::kBFloat16) {
    return c16 ? launch_tc<__nv_bfloat16, 16>(p, stream) : launch_tc<__nv_bfloat16, 8>(p, stream);
  }
  if (p.dtype == InDType::kFloat16) return c16 ? launch_tc<__half, 16>(p, stream) : launch_tc<__half, 8>(p, stream);
  TORCH_CHECK(false, "allmem: launch_ttt_bwd_tc: bfloat16 or float16 inputs only (the caller checks)");
}

void launch_ttt_bwd_tc_gx(const BwdParams& p, cudaStream_t stream, int64_t wave) {
  TORCH_CHECK(p.skip_read && p.dw_read != nullptr, "allmem: launch_ttt_bwd_tc_gx: split mode only (the reads' "
              "backward first)");
  TORCH_CHECK(p.xpub != nullptr, "allmem: launch_ttt_bwd_tc_gx: no publish buffer");
  auto go = [&](auto kernel) {
    launch_cooperative_waves(kernel, p, p.n_seqs * p.heads, wave, BwdGxTraits::kThreads, BwdGxTraits::kSmemBytes,
                             BwdGxTraits::kP, stream, "launch_ttt_bwd_tc_gx");
  };
  if (p.dtype == InDType::kBFloat16) return go(tc::ttt_bwd_tc_kernel<__nv_bfloat16, 8, true>);
  if (p.dtype == InDType::kFloat16) return go(tc::ttt_bwd_tc_kernel<__half, 8, true>);
  TORCH_CHECK(false, "allmem: launch_ttt_bwd_tc_gx: bfloat16 or float16 inputs only (the caller checks)");
}

int64_t ttt_bwd_tc_gx_jobs(InDType dt) {
  return dt == InDType::kBFloat16 ? bwd_gx_jobs<__nv_bfloat16>() : bwd_gx_jobs<__half>();
}

int ttt_bwd_tc_active_clusters(InDType dt, int cluster) {
  TORCH_CHECK(cluster == 8 || cluster == 16, "allmem: ttt_bwd_tc_active_clusters: 8 or 16 CTAs, got ", cluster);
  const bool c16 = cluster == 16;
  if (dt == InDType::kBFloat16) return c16 ? active_clusters<__nv_bfloat16, 16>() : active_clusters<__nv_bfloat16, 8>();
  return c16 ? active_clusters<__half, 16>() : active_clusters<__half, 8>();
}

}  // namespace allmem::ttt::cuda
