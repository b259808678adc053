// Launch of a tensor-core TTT kernel with thread block clusters (ttt_fwd_tc.cu, ttt_bwd_tc.cu):
// `ctas` CTAs in clusters of `cluster` along x, opt-in dynamic shared memory.
#pragma once
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

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

// The kernels without clusters (ttt_chain_tc.cuh, ttt_fwd_tc.cuh kGx): jobs of `ctas` CTAs each that
// wait for each other through global memory, so every CTA of a launch must be co-resident.
// How many such jobs of the kernel the current device runs at once; 0 where it cannot run one (too
// little shared memory; the error is cleared).
template <typename Params>
int64_t cooperative_jobs(void (*kernel)(Params), int threads, int smem_bytes, int ctas) {
  int per_sm = 0, dev = 0, sms = 0;
  C10_CUDA_CHECK(cudaPeekAtLastError());  // an earlier error is reported, not cleared below
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem_bytes) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return int64_t{per_sm} * sms / ctas;
}

// Cooperative launches (every CTA of a launch co-resident, or the launch fails) of `wave` jobs at a
// time (p.job0 the first), one after another on the stream; before each, the wave's job counters
// p.xcount[0, wave * kXcountStride) are zeroed (the buffers are indexed by a job's place in its wave).
template <typename Params>
void launch_cooperative_waves(void (*kernel)(Params), const Params& p, int64_t jobs, int64_t wave, int threads,
                              int smem_bytes, int ctas, cudaStream_t stream, const char* who) {
  const int64_t fit = cooperative_jobs(kernel, threads, smem_bytes, ctas);
  TORCH_CHECK(fit > 0, "allmem: ", who, ": this device cannot run the kernel without clusters (", smem_bytes,
              " bytes of shared memory per CTA)");
  TORCH_CHECK(wave >= 1 && wave <= fit, "allmem: ", who, ": waves of 1 to ", fit, " jobs on this device, got ", wave);
  TORCH_CHECK(p.xchg != nullptr && p.xcount != nullptr, "allmem: ", who, ": no exchange buffers");
  for (int64_t j0 = 0; j0 < jobs; j0 += wave) {
    Params w = p;
    w.job0 = j0;
    C10_CUDA_CHECK(cudaMemsetAsync(w.xcount, 0, static_cast<size_t>(wave) * kXcountStride * sizeof(unsigned), stream));
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = dim3(static_cast<unsigned>(std::min(wave, jobs - j0) * ctas));
    cfg.blockDim = dim3(static_cast<unsigned>(threads));
    cfg.dynamicSmemBytes = static_cast<size_t>(smem_bytes);
    cfg.stream = stream;
    cudaLaunchAttribute attr{};
    attr.id = cudaLaunchAttributeCooperative;
    attr.val.cooperative = 1;
    cfg.attrs = &attr;
    cfg.numAttrs = 1;
    C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, w));
  }
}

}  // namespace allmem::ttt::cuda
