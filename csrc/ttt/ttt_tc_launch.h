// Launch of a tensor-core TTT kernel with thread block clusters (ttt_fwd_tc.cu, ttt_bwd_tc.cu):
// `ctas` CTAs in clusters of `cluster` along x, opt-in dynamic shared memory.
#pragma once
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

namespace allmem::ttt::cuda {

// The kernel's attributes for `smem_bytes` of dynamic shared memory and clusters of `cluster`
// (above 8, the portable maximum, a non-portable size: sm_90 allows 16).
template <typename Params>
void set_cluster_attributes(void (*kernel)(Params), int smem_bytes, int cluster) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
  if (cluster > 8) C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
}

// A launch configuration of `ctas` CTAs in clusters of `cluster` along x; `attr` must outlive it.
inline cudaLaunchConfig_t cluster_config(cudaLaunchAttribute& attr, int64_t ctas, int threads, int smem_bytes,
                                         int cluster, cudaStream_t stream) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(static_cast<unsigned>(ctas));
  cfg.blockDim = dim3(static_cast<unsigned>(threads));
  cfg.dynamicSmemBytes = static_cast<size_t>(smem_bytes);
  cfg.stream = stream;
  attr = cudaLaunchAttribute{};
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = static_cast<unsigned>(cluster);
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  return cfg;
}

template <typename Params>
void launch_clusters(void (*kernel)(Params), const Params& p, int64_t ctas, int threads, int smem_bytes, int cluster,
                     cudaStream_t stream) {
  set_cluster_attributes(kernel, smem_bytes, cluster);
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t cfg = cluster_config(attr, ctas, threads, smem_bytes, cluster, stream);
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, p));
}

// How many clusters of `cluster` CTAs of the kernel the current device runs at once
// (cudaOccupancyMaxActiveClusters); 0 where it cannot run one (the query's error is cleared).
template <typename Params>
int max_active_clusters(void (*kernel)(Params), int threads, int smem_bytes, int cluster) {
  set_cluster_attributes(kernel, smem_bytes, cluster);
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t cfg = cluster_config(attr, cluster, threads, smem_bytes, cluster, nullptr);
  int n = 0;
  if (cudaOccupancyMaxActiveClusters(&n, kernel, &cfg) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

}  // namespace allmem::ttt::cuda
