// Quad reductions over the 4 lanes that share an accumulator row (mma.sync m16n8 / wgmma m64nN
// layouts) and the end of an online softmax. Only __shfl_xor_sync beyond plain C++, so
// tests/swa_sm90_emu includes it as it is after its own shuffle.
#pragma once
#include <cmath>

#include "swa/swa_tile_math.cuh"

namespace allmem::swa::cuda {

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// End of an online softmax (log2 domain) for this thread's two rows of an m16n8 / m64nN
// accumulator: inv[r] = 1 / row sum (0 for a row with nothing visible), and the natural-log LSE of
// rows inside the sequence, written by one lane per quad (-inf for an empty row).
__device__ __forceinline__ void finish_rows(float (&inv)[2], const float (&row_sum)[2], const float (&row_max)[2],
                                            const int (&row_of)[2], float* lse, int len, int lane) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float total = quad_sum(row_sum[r]);
    inv[r] = total > 0.f ? 1.f / total : 0.f;
    if (lane % 4 == 0 && row_of[r] < len) {
      lse[row_of[r]] = total > 0.f ? (row_max[r] + log2f(total)) * kLn2 : -INFINITY;
    }
  }
}

}  // namespace allmem::swa::cuda
