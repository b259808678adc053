// Launch code of the tensor-core TTT backward (the kernel and its design: ttt_bwd_tc.cuh). Built
// for every CUDA arch; the kernel body exists only for sm_90+ (thread block clusters), so the
// dispatcher (ttt_api_cuda.cpp) takes this path only on such devices.
#include <c10/cuda/CUDAException.h>

#include "ttt/ttt_bwd_tc.cuh"
#include "ttt/ttt_cuda.h"
#include "ttt/ttt_tc_launch.h"

namespace allmem::ttt::cuda {
namespace {

template <typename T>
void launch_tc(const BwdParams& p, cudaStream_t stream) {
  using Tr = tc::BwdTcTraits;
  launch_clusters(tc::ttt_bwd_tc_kernel<T>, p, p.n_seqs * p.heads * Tr::kP, Tr::kThreads, Tr::kSmemBytes, Tr::kP,
                  stream);
}

}  // namespace

void launch_ttt_bwd_tc(const BwdParams& p, cudaStream_t stream) {
  if (p.dtype == InDType::kBFloat16) return launch_tc<__nv_bfloat16>(p, stream);
  if (p.dtype == InDType::kFloat16) return launch_tc<__half>(p, stream);
  TORCH_CHECK(false, "allmem: launch_ttt_bwd_tc: bfloat16 or float16 inputs only (the caller checks)");
}

}  // namespace allmem::ttt::cuda
