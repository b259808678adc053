// The index arithmetic every SWA kernel shares, free of intrinsics (it also compiles as plain C++
// for tests/swa_sm90_emu): constants, the window/sink band (which tiles exist, which need a mask),
// sequence spans and pointers, and the dtype x head-dim dispatch of the launchers.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <c10/cuda/CUDAException.h>

#include <cstdint>

#include "swa/swa_cuda.h"

namespace allmem::swa::cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kWarpSize = 32;
constexpr int kMmaM = 16, kMmaN = 8, kMmaK = 16;  // m16n8k16
constexpr int kChunkElems = 8;                    // one 16-byte cp.async / ldmatrix row = 8 halves
constexpr int kSwizzleRows = 8;                   // rows whose chunks are XOR-permuted together

// ---------------------------------------------------------------------------------------------
// Band arithmetic (SPEC: query i sees key j iff j <= i and (j < S or i - j < W)).
__device__ __forceinline__ bool visible(int i, int j, int window, int sinks) {
  return j <= i && (j < sinks || i - j < window);
}

// True when every (i, j) of the tile [i0, i0 + bm) x [j0, j0 + bn) is inside the sequence and
// visible, so the tile needs no mask.
__device__ __forceinline__ bool tile_fully_visible(int i0, int bm, int j0, int bn, int len, int window,
                                                   int sinks) {
  const bool in_bounds = i0 + bm <= len && j0 + bn <= len;
  const bool causal = j0 + bn - 1 <= i0;
  const bool band = j0 + bn <= sinks || (i0 + bm - 1) - j0 < window;
  return in_bounds && causal && band;
}

// Key blocks a query block [i0, i_last] must visit: the window blocks [win_lo, win_hi] and the
// sink blocks [0, sink_end) that lie before win_lo. Visited last-to-first (window blocks first),
// so the first tiles are the masked diagonal ones.
struct KeyBlockRange {
  int win_lo, win_hi, sink_end;
  __device__ int count() const { return (win_hi - win_lo + 1) + sink_end; }
  __device__ int block(int t) const {
    const int n_win = win_hi - win_lo + 1;
    return t < n_win ? win_hi - t : sink_end - 1 - (t - n_win);
  }
};
__device__ __forceinline__ KeyBlockRange key_blocks_for_query_block(int i0, int bm, int bn, int len, int window,
                                                                    int sinks) {
  const int i_last = min(i0 + bm, len) - 1;
  KeyBlockRange r;
  r.win_hi = i_last / bn;
  r.win_lo = max(0, i0 - window + 1) / bn;
  const int sink_blocks = (sinks + bn - 1) / bn;
  r.sink_end = min(sink_blocks, r.win_lo);
  return r;
}

// Query blocks that see key block [j0, j0 + bn): from the diagonal to the window's reach, or to
// the end of the sequence when the block holds a sink.
__device__ __forceinline__ int2 query_blocks_for_key_block(int j0, int bm, int bn, int len, int window, int sinks) {
  const int lo = j0 / bm;
  const int reach = j0 < sinks ? len - 1 : min(len - 1, j0 + bn - 1 + window - 1);
  return make_int2(lo, reach / bm);
}

struct SeqSpan {
  int64_t start;  // first token row of the sequence (0 for dense tensors)
  int len;
};
__device__ __forceinline__ SeqSpan seq_span(const AttnShape& s, int b) {
  if (s.cu_seqlens != nullptr) {
    const int st = s.cu_seqlens[b];
    return {st, s.cu_seqlens[b + 1] - st};
  }
  return {0, s.seqlen};
}

template <typename T>
__device__ __forceinline__ T* head_ptr(const TensorRef& t, int b, int64_t row_start, int h) {
  return static_cast<T*>(t.ptr) + b * t.batch_stride + row_start * t.row_stride + (int64_t)h * t.head_stride;
}
__device__ __forceinline__ float* stat_ptr(const RowStatRef& t, int b, int64_t row_start, int h) {
  return t.ptr + b * t.batch_stride + (int64_t)h * t.head_stride + row_start;
}

// The deliberate instantiation list: {bf16, fp16} x {64, 128}. `f` is a template lambda
// []<typename T, int D>() {...}; unsupported combinations never reach here (the glue checks).
template <typename F>
inline void dispatch_dtype_headdim(DType dtype, int head_dim, F&& f) {
  const bool bf16 = dtype == DType::kBFloat16;
  if (head_dim == 64) {
    bf16 ? f.template operator()<__nv_bfloat16, 64>() : f.template operator()<__half, 64>();
  } else if (head_dim == 128) {
    bf16 ? f.template operator()<__nv_bfloat16, 128>() : f.template operator()<__half, 128>();
  } else {
    C10_THROW_ERROR(ValueError, "allmem: SWA CUDA kernels support head dim 64 or 128");
  }
}

}  // namespace allmem::swa::cuda
