// Hopper (sm_90a) SWA backward in one kernel: dK, dV as swa_bwd_dkdv_sm90.cu, plus dQ / scale
// accumulated into a float32 buffer by vector atomics (swa_bwd_sm90.cuh, kDqAtomic = true):
// 5 matmuls per block pair instead of 7, not bitwise reproducible in dQ.
#include "swa/swa_bwd_sm90.cuh"

namespace allmem::swa::cuda {

bool launch_swa_bwd_dkdvq_sm90(const BwdParams& p, int64_t total_rows, DType dtype, int head_dim,
                               cudaStream_t stream) {
  return launch_bwd_sm90<true, true>(p, total_rows, dtype, head_dim, stream);
}

}  // namespace allmem::swa::cuda
