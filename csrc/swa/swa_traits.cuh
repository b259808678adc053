// Tile shapes of the portable SWA kernels, one traits struct per kernel family. Every warp owns
// 16 rows (the mma.sync M) of the matrix whose rows it accumulates, so warps = rows / 16.
#pragma once
#include "swa/swa_kernel_utils.cuh"

namespace allmem::swa::cuda {

// Forward: a CTA owns kBlockM query rows of one head and walks the key blocks of its band.
// K and V have one shared-memory buffer each; the next K tile streams in during P V and the
// V tile during Q K^T.
template <int D>
struct FwdTraits {
  static constexpr int kHeadDim = D;
  static constexpr int kBlockM = 128;
  static constexpr int kBlockN = 64;
  static constexpr int kWarps = kBlockM / kMmaM;
  static constexpr int kThreads = kWarps * kWarpSize;
  static constexpr int kSmemElems = (kBlockM + 2 * kBlockN) * D;
  static constexpr size_t kSmemBytes = kSmemElems * sizeof(uint16_t);
};

// Backward dK/dV: a CTA owns kBlockN keys of one KV head (warps own key rows) and walks, for each
// query head of its GQA group, the query blocks that see those keys. Q, dO, lse and delta are
// double-buffered so the next query block loads during the current one's five matmuls.
template <int D>
struct BwdDkDvTraits {
  static constexpr int kHeadDim = D;
  static constexpr int kBlockN = 64;
  // Per thread: dK and dV accumulators (2 * D/2 floats) plus P^T and dS^T (2 * kBlockM/2): at
  // D = 128 a 64-query block would not fit 255 registers.
  static constexpr int kBlockM = D <= 64 ? 64 : 32;
  static constexpr int kWarps = kBlockN / kMmaM;
  static constexpr int kThreads = kWarps * kWarpSize;
  static constexpr int kStages = 2;
  static constexpr int kStageElems = 2 * kBlockM * D;  // Q and dO
  static constexpr size_t kSmemBytes = (2 * kBlockN * D + kStages * kStageElems) * sizeof(uint16_t) +
                                       kStages * 2 * kBlockM * sizeof(float);  // lse and delta
};

// Backward dQ: a CTA owns kBlockM query rows (warps own query rows) and walks the same key blocks
// as the forward; K and V are double-buffered.
template <int D>
struct BwdDqTraits {
  static constexpr int kHeadDim = D;
  static constexpr int kBlockM = 64;
  static constexpr int kBlockN = 64;
  static constexpr int kWarps = kBlockM / kMmaM;
  static constexpr int kThreads = kWarps * kWarpSize;
  static constexpr int kStages = 2;
  static constexpr int kStageElems = 2 * kBlockN * D;  // K and V
  static constexpr size_t kSmemBytes = (2 * kBlockM * D + kStages * kStageElems) * sizeof(uint16_t);
};

// delta = rowsum(dO * O): one warp per (token, head) row.
struct BwdPreprocessTraits {
  static constexpr int kWarps = 8;
  static constexpr int kThreads = kWarps * kWarpSize;
};

}  // namespace allmem::swa::cuda
