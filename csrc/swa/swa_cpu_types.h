// Tiling constants and argument structs of the CPU sliding-window attention kernels
// (swa_cpu_kernel.h), shared by every instruction-set build of them.
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

namespace allmem::swa::cpu {

// Query rows per block, keys per tile: small enough that a tile's scores, the transposed K/V
// tile and the output accumulator stay in L2, large enough to amortize the transposes.
constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 64;
// Register block of the GEMM micro-kernel: rows x (vectors per row) of C held in registers,
// sized per SIMD width so that enough independent FMAs are in flight without spilling
// (16 registers up to AVX2, 32 with AVX-512).
constexpr int64_t micro_rows(int64_t vec_bytes) { return vec_bytes >= 64 ? 8 : 4; }
constexpr int64_t kMicroVecsPerRow = 2;

// One contiguous run of keys [j0, j0 + nk) of a sequence, and whether every (query of the
// block, key of the tile) pair is visible, so that the per-element mask can be skipped.
struct KeyTile {
  int64_t j0, nk;
  bool full;
};

// Key tiles that a query block [i0, i1) must visit: the sinks before the window, then the
// window band [i0 - W + 1, i1). Everything else is invisible to every row and is never touched:
// this is what makes the cost O(L * (W + S)) instead of O(L^2).
inline void key_tiles(int64_t i0, int64_t i1, int64_t window, int64_t sinks, std::vector<KeyTile>& out) {
  out.clear();
  const int64_t ws = std::max<int64_t>(0, i0 - window + 1);
  const int64_t sink_end = std::min(sinks, ws);  // sinks below the band: visible to all rows
  for (int64_t j0 = 0; j0 < sink_end; j0 += kBlockK) out.push_back({j0, std::min(kBlockK, sink_end - j0), true});
  for (int64_t j0 = ws; j0 < i1; j0 += kBlockK) {
    const int64_t nk = std::min(kBlockK, i1 - j0);
    const int64_t j1 = j0 + nk;
    // Full iff the last key is causal for the first row and the first key is in the window of
    // the last row (or every key of the tile is a sink).
    const bool full = j1 - 1 <= i0 && (i1 - 1 - j0 < window || j1 <= sinks);
    out.push_back({j0, nk, full});
  }
}

// One (sequence, head) of the forward: row r of q at q + r * q_stride, of k/v at + r * kv_stride.
template <typename T>
struct Slice {
  const T* q;
  const T* k;
  const T* v;
  int64_t q_stride, kv_stride;  // elements between consecutive tokens
};

// One (sequence, kv head) of the backward; the group's query heads are g = 0 .. group - 1.
template <typename T>
struct BwdSlice {
  const T* q;
  const T* k;
  const T* v;
  const T* out;
  const T* dout;
  const float* lse;  // row r of group head g: lse + g * lse_head_stride + r
  T* dq;
  int64_t q_stride, kv_stride, lse_head_stride, group;
};

}  // namespace allmem::swa::cpu
