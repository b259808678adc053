// Hopper (sm_90a) SWA backward, query side: dQ = scale * dS K (swa_bwd_sm90.cuh, kKeySide = false).
#include "swa/swa_bwd_sm90.cuh"

namespace allmem::swa::cuda {

bool launch_swa_bwd_dq_sm90(const BwdParams& p, int64_t total_rows, DType dtype, int head_dim, cudaStream_t stream) {
  return launch_bwd_sm90<false>(p, total_rows, dtype, head_dim, stream);
}

}  // namespace allmem::swa::cuda
