// Hopper (sm_90a) SWA backward, key side: dK = scale * dS^T Q and dV = P^T dO over the GQA group
// (swa_bwd_sm90.cuh, kKeySide = true).
#include "swa/swa_bwd_sm90.cuh"

namespace allmem::swa::cuda {

bool launch_swa_bwd_dkdv_sm90(const BwdParams& p, int64_t total_rows, DType dtype, int head_dim,
                              cudaStream_t stream) {
  return launch_bwd_sm90<true>(p, total_rows, dtype, head_dim, stream);
}

SinkPlan swa_bwd_sm90_sink_plan(const AttnShape& s, int head_dim, int num_sms) {
  return sink_plan(s, head_dim, num_sms);
}

}  // namespace allmem::swa::cuda
