// Launch of a tensor-core TTT kernel with thread block clusters (ttt_fwd_tc.cu, ttt_bwd_tc.cu):
// `ctas` CTAs in clusters of `cluster` along x, opt-in dynamic shared memory.
#pragma once
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

namespace allmem::ttt::cuda {

template <typename Params>
void launch_clusters(void (*kernel)(Params), const Params& p, int64_t ctas, int threads, int smem_bytes, int cluster,
                     cudaStream_t stream) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(static_cast<unsigned>(ctas));
  cfg.blockDim = dim3(static_cast<unsigned>(threads));
  cfg.dynamicSmemBytes = static_cast<size_t>(smem_bytes);
  cfg.stream = stream;
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = static_cast<unsigned>(cluster);
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, p));
}

}  // namespace allmem::ttt::cuda
