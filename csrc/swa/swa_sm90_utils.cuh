// Layout and issue logic of the Hopper (sm_90a) SWA kernels (swa_fwd_sm90.cuh, swa_bwd_sm90.cuh):
// the 128-byte-swizzled tile layout TMA writes and wgmma reads, tile loads, wgmma descriptors and
// the SS / RS issue loops, accumulator-to-fragment packing, tensor-map encoding. Every instruction
// and driver call it needs comes from swa_sm90_ptx.cuh.
#pragma once
#include <algorithm>

#include "swa/swa_sm90_ptx.cuh"

namespace allmem::swa::cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// Shared-memory layout (both operands of both matmuls)
//
// A tile of R rows x D columns (16-bit elements) is stored as D/64 column blocks; block cb holds
// columns [64 cb, 64 cb + 64) of every row as one 128-byte line per row, rows consecutive:
//     element (r, c) -> byte  cb * R * 128  +  r * 128  +  ((chunk ^ (r % 8)) * 16)  +  (c % 8) * 2,
//     cb = c / 64, chunk = (c % 64) / 8.
// The XOR is the hardware's 128-byte swizzle (CU_TENSOR_MAP_SWIZZLE_128B on the TMA side, layout
// type 1 "SWIZZLE_128B" in the wgmma descriptor): address bits [4, 7) are XOR-ed with bits [7, 10),
// so it is a function of the absolute shared address and every tile and column block must start
// on a 1024-byte boundary (8 rows x 128 bytes = one swizzle atom). TMA writes this layout for a
// box of {64 columns, R rows}, one box per column block.
//
// wgmma descriptors (PTX ISA "matrix descriptor"; CuTe mma_sm90_desc.hpp names the fields):
//   bits [0, 14) start address >> 4, [16, 30) leading byte offset (LBO) >> 4, [32, 46) stride
//   byte offset (SBO) >> 4, [49, 52) base offset (0: atoms 1024-aligned), [62, 64) layout (1).
//  * K-major operand (Q as A and K as B of S = Q K^T: the contraction dim D is contiguous): the
//    canonical SWIZZLE_128B K-major layout is 8-row groups of 128-byte lines, groups SBO apart ->
//    SBO = 1024; LBO is unused for swizzled K-major layouts (set to 1). One k16 step covers 32
//    bytes of a line: k-step ks starts at column block ks / 4, plus (ks % 4) * 32 bytes (the
//    hardware applies the swizzle to the computed addresses, so stepping the start address inside
//    the atom is how CUTLASS iterates K too).
//  * MN-major operand (V as B of O = P V: B[k = key][n = d], n contiguous): the canonical
//    SWIZZLE_128B MN-major layout is 64 n-values per 128-byte line, 8 k-lines per atom; atoms
//    along k are SBO apart (1024 here: key rows are consecutive), the next 64 n-values (the next
//    column block of V) LBO apart (R * 128 bytes). A k16 step is two atoms: + 2048 bytes.
// Warpgroup g's 64 query rows start at row 64 g: + 64 * 128 bytes inside each column block of Q.
// (LBO/SBO/layout of both were compared on the host with CuTe's make_gmma_desc<K / MN> for
// Layout_{K,MN}_SW128_Atom<bf16> tiled to these tile shapes in this order: identical.)
constexpr int kLineBytes = 128;  // one swizzle line: 64 16-bit elements
constexpr int kLineElems = 64;
constexpr int kAtomBytes = 8 * kLineBytes;

#ifdef ALLMEM_SWA_SM90A_DEVICE
// Loads rows [row0, row0 + kRows) of one head as D/64 TMA boxes into a tile laid out as above.
// Rows past the end of the tensor arrive as zeros (TMA out-of-bounds fill).
template <int D, int kRows>
__device__ __forceinline__ void tma_load_tile(uint32_t tile, const CUtensorMap* map, uint32_t bar, int row0, int head,
                                              int batch) {
#pragma unroll
  for (int cb = 0; cb < D / kLineElems; ++cb) {
    tma_load_4d(tile + cb * kRows * kLineBytes, map, bar, cb * kLineElems, row0, head, batch);
  }
}

// ---------------------------------------------------------------------------------------------
// wgmma
constexpr uint64_t kDescSwizzle128 = 1ull << 62;
__device__ __forceinline__ uint64_t make_desc(uint32_t addr, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>((lbo_bytes >> 4) & 0x3FFF) << 16) |
         (static_cast<uint64_t>((sbo_bytes >> 4) & 0x3FFF) << 32) | kDescSwizzle128;
}

template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) fence_operand(r[i]);
}
template <int N>
__device__ __forceinline__ void fence_regs(uint32_t (&r)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) fence_operand(r[i][j]);
  }
}

// acc[64 x N] (= / +=) A B^T over the head dim D, both K-major in swizzled shared memory: A is the
// warpgroup's 64 rows of a kRowsA-row tile (a_wg already points at its first row), B an N-row
// tile. Issued, not waited for; `accumulate` false overwrites acc (the first k-step scales it by 0).
template <typename T, int D, int kRowsA, int N>
__device__ __forceinline__ void issue_ss(float (&acc)[N / 2], uint32_t a_wg, uint32_t b_tile, bool accumulate) {
  using Op = GmmaSS<T, N>;
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    const uint32_t col = (ks % 4) * 32;  // bytes inside the 128-byte line of column block ks / 4
    const uint64_t da = make_desc(a_wg + (ks / 4) * kRowsA * kLineBytes + col, 16, kAtomBytes);
    const uint64_t db = make_desc(b_tile + (ks / 4) * N * kLineBytes + col, 16, kAtomBytes);
    gmma_ss<Op>(da, db, acc, (ks == 0 && !accumulate) ? gmma::ScaleOut::Zero : gmma::ScaleOut::One,
                std::make_index_sequence<N / 2>{});
  }
}

// acc[64 x D] += A B with A[64 x kRowsB] in registers (a[kk]: the A fragment of columns
// [16 kk, 16 kk + 16)) and B the kRowsB x D tile in swizzled shared memory read MN-major (its rows
// are the contraction dim). Issued, not waited for.
template <typename T, int D, int kRowsB>
__device__ __forceinline__ void issue_rs(float (&acc)[D / 2], const uint32_t (&a)[kRowsB / 16][4], uint32_t b_tile) {
  using Op = GmmaRS<T, D>;
#pragma unroll
  for (int kk = 0; kk < kRowsB / 16; ++kk) {
    const uint64_t db = make_desc(b_tile + kk * 2 * kAtomBytes, kRowsB * kLineBytes, kAtomBytes);
    gmma_rs<Op>(a[kk], db, acc, std::make_index_sequence<D / 2>{});
  }
}

// acc[64 x N] = A B with both operands MN-major in swizzled shared memory: A [kK rows][64] holds
// A^T (the M = 64 values of each k in one 128-byte line), B the N columns of a kRowsB x 64-column-
// block tile starting at b_start (which may sit inside a line: N = 32 starts at byte 64). kK / 16
// k-steps of two atoms each. Issued, not waited for.
template <typename T, int N, int kK, int kRowsB>
__device__ __forceinline__ void issue_ss_mn(float (&acc)[N / 2], uint32_t a_tile, uint32_t b_start) {
  using Op = GmmaSSmn<T, N>;
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    const uint64_t da = make_desc(a_tile + kk * 2 * kAtomBytes, kK * kLineBytes, kAtomBytes);
    const uint64_t db = make_desc(b_start + kk * 2 * kAtomBytes, kRowsB * kLineBytes, kAtomBytes);
    gmma_ss<Op>(da, db, acc, kk == 0 ? gmma::ScaleOut::Zero : gmma::ScaleOut::One, std::make_index_sequence<N / 2>{});
  }
}

// Epilogue, step 1: this thread's share of a warpgroup's 64 x D fp32 accumulator, times
// scale[r] for its row half r, rounded to T into the swizzled tile at tile_off (kRows rows per
// column block; warp_row0 = the tile row of this warp's first row). The caller owns those rows.
template <typename T, int D, int kRows>
__device__ __forceinline__ void stage_acc_rows(unsigned char* smem, uint32_t tile_off, const float (&acc)[D / 2],
                                               const float (&scale)[2], int warp_row0, int lane) {
#pragma unroll
  for (int i = 0; i < D / 8; ++i) {
    const int col = 8 * i + 2 * (lane % 4);
    const int cb = col / kLineElems, chunk = (col % kLineElems) / 8;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = warp_row0 + lane / 4 + 8 * r;  // tile row
      const uint32_t off = tile_off + cb * kRows * kLineBytes + row * kLineBytes + ((chunk ^ (row % 8)) * 16) +
                           (col % 8) * 2;
      *reinterpret_cast<uint32_t*>(smem + off) =
          ElemTraits<T>::pack(acc[4 * i + 2 * r] * scale[r], acc[4 * i + 2 * r + 1] * scale[r]);
    }
  }
}

// Epilogue, step 2 (after the warpgroup's barrier): its 64 staged rows (tile rows 64 wg ..) to
// global memory as 16-byte chunks, rows row0 + r < len only; dst points at row 0 of the head.
template <typename T, int D, int kRows>
__device__ __forceinline__ void store_staged_rows(T* dst, int64_t row_stride, const unsigned char* smem,
                                                  uint32_t tile_off, int wg, int wg_tid, int row0, int len) {
  constexpr int kChunksPerRow = D / 8;
#pragma unroll
  for (int idx = wg_tid; idx < 64 * kChunksPerRow; idx += 128) {
    const int r = wg * 64 + idx / kChunksPerRow, c = idx % kChunksPerRow;
    const int cb = c / 8, chunk = c % 8;
    if (row0 + r < len) {
      const uint32_t off = tile_off + cb * kRows * kLineBytes + r * kLineBytes + ((chunk ^ (r % 8)) * 16);
      *reinterpret_cast<uint4*>(dst + (int64_t)(row0 + r) * row_stride + c * 8) =
          *reinterpret_cast<const uint4*>(smem + off);
    }
  }
}
#endif  // ALLMEM_SWA_SM90A_DEVICE

// Accumulator layout of wgmma m64nN (per warpgroup; warp w of the group owns rows 16 w .. 16 w + 15):
// register 4 i + e of lane l holds row 16 w + l / 4 + 8 (e / 2), column 8 i + 2 (l % 4) + (e % 2),
// i.e. the mma.sync m16n8 layout repeated over the n8 blocks i. The A fragment of a register-
// sourced wgmma (m64k16) is the mma.sync m16n8k16 A layout, so columns [16 kk, 16 kk + 16) of an
// accumulator become the A fragment kk from n8 blocks 2 kk and 2 kk + 1 (pack_a_frags).
#ifdef ALLMEM_SWA_SM90A_DEVICE
template <typename T, int N>
__device__ __forceinline__ void pack_a_frags(uint32_t (&a)[N / 16][4], const float (&acc)[N / 2]) {
#pragma unroll
  for (int kk = 0; kk < N / 16; ++kk) {
#pragma unroll
    for (int r = 0; r < 4; ++r) a[kk][r] = ElemTraits<T>::pack(acc[8 * kk + 2 * r], acc[8 * kk + 2 * r + 1]);
  }
}
#endif  // ALLMEM_SWA_SM90A_DEVICE

// ---------------------------------------------------------------------------------------------
// Host side
// The extent of the 4-D tensor maps: rows (the packed T for varlen, else L) and batch (1 for varlen).
struct TmaExtent {
  int64_t rows;
  int batch;
};
inline TmaExtent tma_extent(const AttnShape& s, int64_t total_rows) {
  const bool varlen = s.cu_seqlens != nullptr;
  return {varlen ? total_rows : s.seqlen, varlen ? 1 : s.batch};
}

// {D, rows, heads, batch} with the TensorRef's strides; a dimension of extent 1 gets a placeholder
// stride (its coordinate is always 0) so size-1 views with odd strides still encode. Returns false
// (the caller falls back to the portable kernel) for strides TMA cannot express.
bool encode_map(CUtensorMap* map, const TensorRef& t, DType dtype, int head_dim, int64_t rows, int heads, int batch,
                int box_rows) {
  const EncodeTiledFn encode = encode_tiled_fn();
  if (encode == nullptr) return false;
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(head_dim), static_cast<cuuint64_t>(rows),
                              static_cast<cuuint64_t>(heads), static_cast<cuuint64_t>(batch)};
  const int64_t strides_el[3] = {t.row_stride, t.head_stride, t.batch_stride};
  // Placeholder for extent-1 dims: the byte span of the whole view (a multiple of 16, and at
  // least every real stride, in case the driver checks an ordering).
  int64_t span = int64_t{head_dim} * 2;
  for (int i = 0; i < 3; ++i) {
    const int64_t bytes = strides_el[i] * 2;
    if (dims[i + 1] == 1) continue;
    if (bytes <= 0 || bytes % 16 != 0 || bytes >= (int64_t{1} << 40)) return false;
    span = std::max<int64_t>(span, bytes * static_cast<int64_t>(dims[i + 1]));
  }
  span = (span + 15) / 16 * 16;
  if (span >= (int64_t{1} << 40)) return false;
  cuuint64_t strides[3];
  for (int i = 0; i < 3; ++i) {
    strides[i] = static_cast<cuuint64_t>(dims[i + 1] == 1 ? span : strides_el[i] * 2);
  }
  const cuuint32_t box[4] = {static_cast<cuuint32_t>(kLineElems), static_cast<cuuint32_t>(box_rows), 1, 1};
  const cuuint32_t elem_strides[4] = {1, 1, 1, 1};
  const CUtensorMapDataType type =
      dtype == DType::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  const CUresult r = encode(map, type, 4, t.ptr, dims, strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                            CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS;
}

}  // namespace
}  // namespace allmem::swa::cuda
