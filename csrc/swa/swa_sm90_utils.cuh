// Building blocks of the Hopper (sm_90a) SWA kernels (swa_fwd_sm90.cu, swa_bwd_sm90.cuh): the
// 128-byte-swizzled tile layout TMA writes and wgmma reads, wgmma descriptors and wrappers,
// mbarrier / TMA / named-barrier / setmaxnreg PTX, and the host side of TMA (tensor maps) and of
// the "does the loaded cubin have sm_90a code" check. Everything is in an anonymous namespace:
// each kernel translation unit gets its own copy (and its own kSm90aBuilt symbol to ask about).
#pragma once
#include <cuda.h>  // CUtensorMap and cuTensorMapEncodeTiled's types (the function is fetched at run time)

#include <cute/arch/mma_sm90_gmma.hpp>  // wgmma.mma_async wrappers (raw PTX, no CuTe layouts)
#include <algorithm>
#include <type_traits>
#include <utility>

#include "swa/swa_kernel_utils.cuh"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define ALLMEM_SWA_SM90A_DEVICE 1
#endif

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

// Not const: a const __device__ variable could be folded away, and the host reads it by symbol.
__device__ int kSm90aBuilt =
#ifdef ALLMEM_SWA_SM90A_DEVICE
    1;
#else
    0;
#endif

#ifdef ALLMEM_SWA_SM90A_DEVICE
// ---------------------------------------------------------------------------------------------
// mbarrier, TMA, named barriers, setmaxnreg (PTX ISA 8.0, sm_90)
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ bool mbar_try_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done)
      : "r"(bar), "r"(parity)
      : "memory");
  return done != 0;
}
__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;\n" : "=l"(t));
  return t;
}
// Waits until the phase with the given parity has completed. A fresh barrier counts as having
// completed the phase before phase 0, so waiting for parity 1 on it returns at once (the producer's
// first pass over the empty barriers).
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  while (!mbar_try_wait(bar, parity)) {
  }
}
// The producer's waits: one that lasts kHangTimeoutNs means a broken pipeline (a TMA that never
// lands, a lost arrival), so it traps and the launch fails with an error instead of hanging the GPU
// session (legitimate waits are microseconds, even under compute-sanitizer far below this). Only
// the producer checks: in the consumers the timer code cost registers and made ptxas serialize
// the wgmmas. The producer waits for the consumers' last release before it exits, so a consumer
// stuck on a load also ends in this trap.
constexpr uint64_t kHangTimeoutNs = 20ull * 1000 * 1000 * 1000;
__device__ __forceinline__ void mbar_wait_or_trap(uint32_t bar, uint32_t parity) {
  if (mbar_try_wait(bar, parity)) return;
  const uint64_t t0 = global_timer_ns();
  while (!mbar_try_wait(bar, parity)) {
    if (global_timer_ns() - t0 > kHangTimeoutNs) __trap();
  }
}
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1, int c2,
                                            int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, %6}], "
      "[%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}
__device__ __forceinline__ void tma_prefetch_desc(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

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

namespace gmma = cute::SM90::GMMA;
// wgmma m64nNk16, fp32 accumulators. SS: A and B both from shared memory, both K-major (the
// contraction dim contiguous: Q K^T, K Q^T, dO V^T, V dO^T). RS: A from registers (an accumulator
// rounded to 16 bits, see acc layout below), B from shared memory MN-major (a [k rows][n] tile
// read "transposed": P V, P^T dO, dS K, dS^T Q).
template <typename T, int N>
using GmmaSS = std::conditional_t<
    std::is_same_v<T, __nv_bfloat16>,
    std::conditional_t<N == 128, gmma::MMA_64x128x16_F32BF16BF16_SS<gmma::Major::K, gmma::Major::K>,
                       gmma::MMA_64x64x16_F32BF16BF16_SS<gmma::Major::K, gmma::Major::K>>,
    std::conditional_t<N == 128, gmma::MMA_64x128x16_F32F16F16_SS<gmma::Major::K, gmma::Major::K>,
                       gmma::MMA_64x64x16_F32F16F16_SS<gmma::Major::K, gmma::Major::K>>>;
template <typename T, int N>
using GmmaRS = std::conditional_t<
    std::is_same_v<T, __nv_bfloat16>,
    std::conditional_t<N == 128, gmma::MMA_64x128x16_F32BF16BF16_RS<gmma::Major::K, gmma::Major::MN>,
                       gmma::MMA_64x64x16_F32BF16BF16_RS<gmma::Major::K, gmma::Major::MN>>,
    std::conditional_t<N == 128, gmma::MMA_64x128x16_F32F16F16_RS<gmma::Major::K, gmma::Major::MN>,
                       gmma::MMA_64x64x16_F32F16F16_RS<gmma::Major::K, gmma::Major::MN>>>;

template <class Op, int N, size_t... I>
__device__ __forceinline__ void gmma_ss(uint64_t da, uint64_t db, float (&d)[N], gmma::ScaleOut scale_d,
                                        std::index_sequence<I...>) {
  Op::fma(da, db, d[I]..., scale_d);
}
template <class Op, int N, size_t... I>
__device__ __forceinline__ void gmma_rs(const uint32_t (&a)[4], uint64_t db, float (&d)[N], std::index_sequence<I...>) {
  Op::fma(a[0], a[1], a[2], a[3], db, d[I]..., gmma::ScaleOut::One);
}

template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) cute::warpgroup_fence_operand(r[i]);
}
template <int N>
__device__ __forceinline__ void fence_regs(uint32_t (&r)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) cute::warpgroup_fence_operand(r[i][j]);
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
// Host side: tensor maps and launch.
using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                   const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                   CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

EncodeTiledFn encode_tiled_fn() {
  static const EncodeTiledFn fn = []() -> EncodeTiledFn {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();
      return nullptr;
    }
    return reinterpret_cast<EncodeTiledFn>(f);
  }();
  return fn;
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

// Whether the cubin the driver loaded for the current device has the kernel bodies (sm_90a).
bool sm90a_built_for_current_device() {
  static int cached[64];  // 0 unknown, 1 yes, 2 no
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) {
    (void)cudaGetLastError();
    return false;
  }
  if (cached[dev] == 0) {
    int built = 0;
    const bool ok = cudaMemcpyFromSymbol(&built, kSm90aBuilt, sizeof(int)) == cudaSuccess;
    if (!ok) (void)cudaGetLastError();
    cached[dev] = ok && built == 1 ? 1 : 2;
  }
  return cached[dev] == 1;
}

}  // namespace
}  // namespace allmem::swa::cuda
