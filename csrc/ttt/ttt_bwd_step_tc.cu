// Launch code of the tensor-core step of the composite backward (one completed chunk's update
// backward for a batch of chains; the kernel and its design: ttt_bwd_step_tc.cuh): one 8-CTA
// cluster per chain, d = h in {64, 128}, bf16/fp16. The kernel bodies exist only for sm_90+ (the
// caller, composite_step_tc_cuda in ttt_api_cuda.cpp, checks the device).
#include <c10/cuda/CUDAException.h>

#include "ttt/ttt_bwd_step_tc.cuh"
#include "ttt/ttt_cuda.h"
#include "ttt/ttt_tc_launch.h"

namespace allmem::ttt::cuda {
namespace {

template <typename T, int D>
void launch_step(const BwdStepParams& p, cudaStream_t stream) {
  using Tr = tc::BwdStepTraits<D>;
  launch_clusters(tc::ttt_bwd_step_tc_kernel<T, D>, p, p.chains * Tr::kP, Tr::kThreads, Tr::kSmemBytes, Tr::kP,
                  stream);
}

}  // namespace

void launch_bwd_step_tc(const BwdStepParams& p, int d, cudaStream_t stream) {
  if (p.chains == 0) return;
  const bool bf16 = p.dtype == InDType::kBFloat16;
  if (d == 64) {
    bf16 ? launch_step<__nv_bfloat16, 64>(p, stream) : launch_step<__half, 64>(p, stream);
  } else {
    bf16 ? launch_step<__nv_bfloat16, 128>(p, stream) : launch_step<__half, 128>(p, stream);
  }
}

}  // namespace allmem::ttt::cuda
