// Building blocks of the portable (sm_80+) SWA kernels: warp-level mma.sync m16n8k16 with fp32
// accumulation, ldmatrix, cp.async with zero-fill, an XOR-swizzled shared-memory tile layout, and
// the window/sink band arithmetic that decides which tiles exist and which need a mask.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "swa/swa_tile_math.cuh"
#include "swa/swa_warp_math.cuh"

namespace allmem::swa::cuda {

// ---------------------------------------------------------------------------------------------
// Element types
template <typename T>
struct ElemTraits;
template <>
struct ElemTraits<__nv_bfloat16> {
  __device__ static uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  __device__ static float2 unpack(uint32_t x) {
    return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&x));
  }
  __device__ static float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ static __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};
template <>
struct ElemTraits<__half> {
  __device__ static uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  __device__ static float2 unpack(uint32_t x) { return __half22float2(*reinterpret_cast<__half2*>(&x)); }
  __device__ static float to_float(__half x) { return __half2float(x); }
  __device__ static __half from_float(float x) { return __float2half_rn(x); }
};

// D = A * B + D, A 16x16 row-major (4 regs), B 16x8 "col" (2 regs), D 16x8 fp32 (4 regs).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// 16-byte global->shared copy; when !valid the destination is zero-filled and nothing is read
// (src-size 0), which is how rows past the end of a sequence become zeros.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_4(uint32_t dst, const void* src, bool valid) {
  const int src_bytes = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

// ---------------------------------------------------------------------------------------------
// Shared-memory tile [rows][D] of 16-bit elements. Each row is D/8 chunks of 16 bytes; chunk c of
// row r is stored at position c ^ (r % 8), so the 8 row addresses of one ldmatrix phase (same
// logical chunk, 8 consecutive rows) hit 8 different bank groups.
template <int D>
struct SwizzledTile {
  static_assert(D % (kChunkElems * kSwizzleRows) == 0, "rows must hold a multiple of 8 chunks");
  static constexpr int kChunks = D / kChunkElems;
  __device__ static __forceinline__ int offset(int row, int chunk) {
    return row * D + ((chunk ^ (row % kSwizzleRows)) * kChunkElems);
  }
};

// Copies rows [row0, row0 + kRows) of one head of `src` into a swizzled tile with all threads of
// the CTA; rows at or past `len` are zero-filled.
template <typename T, int D, int kRows, int kThreads>
__device__ __forceinline__ void load_tile_async(T* smem, const T* src, int64_t row_stride, int row0, int len,
                                                int tid) {
  using Tile = SwizzledTile<D>;
  constexpr int kTotal = kRows * Tile::kChunks;
  static_assert(kTotal % kThreads == 0, "tile chunks must split evenly over the threads");
#pragma unroll
  for (int i = 0; i < kTotal / kThreads; ++i) {
    const int idx = tid + i * kThreads;
    const int r = idx / Tile::kChunks, c = idx % Tile::kChunks;
    const bool valid = row0 + r < len;
    const T* g = src + (valid ? (int64_t)(row0 + r) * row_stride + c * kChunkElems : 0);
    cp_async_16(smem_u32(smem + Tile::offset(r, c)), g, valid);
  }
}

// Loads `n` float32 row statistics (lse or delta) starting at `src[row0]`, zero past `len`.
template <int kRows>
__device__ __forceinline__ void load_rowstat_async(float* smem, const float* src, int row0, int len, int tid) {
  if (tid < kRows) {
    const bool valid = row0 + tid < len;
    cp_async_4(smem_u32(smem + tid), src + (valid ? row0 + tid : 0), valid);
  }
}

// ---------------------------------------------------------------------------------------------
// Fragment addressing. Lane l of a warp reads, in the three ldmatrix patterns used here:
//  A (16 rows x 16 k) of a row-major tile:       row l % 16,                     chunk 2*ks + l / 16
//  B (16 k x 16 n) of a tile stored [n][k]:      row (l / 16) * 8 + l % 8,       chunk 2*ks + (l / 8) % 2
//  B (16 k x 16 n) of a tile stored [k][n], .trans: row ((l / 8) % 2) * 8 + l % 8, chunk 2*n2 + l / 16
// and the mma.sync accumulator element e of an n8 tile sits at row l/4 + 8*(e/2), col 2*(l%4) + e%2.
// In all three the lane's row is l % 8 modulo 8, so the swizzle XOR depends on the lane only:
// chunk 2*idx + c lands at 8*(idx/4) + ((2*(idx%4) + c) ^ (l%8)). FragAddr keeps the four lane
// addresses for idx % 4 and adds the rest as compile-time offsets, instead of the compiler hoisting
// one address register per (idx, row block) pair out of the main loop.
template <int D>
struct FragAddr {
  uint32_t base[4];
  // row0: first tile row of this warp's operand (a multiple of 8); lane_row / lane_chunk: the
  // pattern's per-lane row in [0, 16) and chunk parity.
  __device__ __forceinline__ FragAddr(const void* tile, int row0, int lane_row, int lane_chunk) {
    const uint32_t t = smem_u32(tile);
    const int r8 = lane_row % kSwizzleRows;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      base[q] = t + static_cast<uint32_t>(((row0 + lane_row) * D + ((2 * q + lane_chunk) ^ r8) * kChunkElems) *
                                          sizeof(uint16_t));
    }
  }
  // Address of the 16-wide slice `idx` (k16 step or n16 pair) at `row_off` rows further (a
  // multiple of 8, compile-time in every caller).
  __device__ __forceinline__ uint32_t at(int row_off, int idx) const {
    return base[idx % 4] +
           static_cast<uint32_t>((row_off * D + (idx / 4) * kSwizzleRows * kChunkElems) * sizeof(uint16_t));
  }
  __device__ __forceinline__ FragAddr shifted(uint32_t bytes) const {
    FragAddr r = *this;
#pragma unroll
    for (int q = 0; q < 4; ++q) r.base[q] += bytes;
    return r;
  }
};
template <int D>
__device__ __forceinline__ FragAddr<D> frag_a(const void* tile, int row0, int lane) {
  return FragAddr<D>(tile, row0, lane % 16, lane / 16);
}
template <int D>
__device__ __forceinline__ FragAddr<D> frag_b_nk(const void* tile, int lane) {
  return FragAddr<D>(tile, 0, (lane / 16) * 8 + lane % 8, (lane / 8) % 2);
}
template <int D>
__device__ __forceinline__ FragAddr<D> frag_b_kn_trans(const void* tile, int lane) {
  return FragAddr<D>(tile, 0, ((lane / 8) % 2) * 8 + lane % 8, lane / 16);
}

// acc[16 x kN] += A[16 x D] * B^T, A rows from `a` (frag_a), B stored [n][k] with k = D
// contiguous (frag_b_nk): S = Q K^T when warps own query rows, S^T = K Q^T when they own keys.
template <typename T, int D, int kN>
__device__ __forceinline__ void gemm_a_bnk(float (&acc)[kN / kMmaN][4], const FragAddr<D>& a, const FragAddr<D>& b) {
#pragma unroll
  for (int ks = 0; ks < D / kMmaK; ++ks) {
    uint32_t af[4];
    ldmatrix_x4(af, a.at(0, ks));
#pragma unroll
    for (int n2 = 0; n2 < kN / 16; ++n2) {
      uint32_t bf[4];
      ldmatrix_x4(bf, b.at(n2 * 16, ks));
      mma_16816<T>(acc[2 * n2], af, bf[0], bf[1]);
      mma_16816<T>(acc[2 * n2 + 1], af, bf[2], bf[3]);
    }
  }
}

// Packs a 16 x 16 slice (n8 tiles 2*kk and 2*kk+1) of an fp32 accumulator into an A fragment.
template <typename T, int kNT>
__device__ __forceinline__ void acc_to_a_frag(uint32_t (&a)[4], const float (&acc)[kNT][4], int kk) {
  a[0] = ElemTraits<T>::pack(acc[2 * kk][0], acc[2 * kk][1]);
  a[1] = ElemTraits<T>::pack(acc[2 * kk][2], acc[2 * kk][3]);
  a[2] = ElemTraits<T>::pack(acc[2 * kk + 1][0], acc[2 * kk + 1][1]);
  a[3] = ElemTraits<T>::pack(acc[2 * kk + 1][2], acc[2 * kk + 1][3]);
}

// acc[16 x D] += P[16 x kK] (fp32 accumulator layout, rounded to T) * B, B stored [k][n] with
// n = D contiguous (frag_b_kn_trans): O += P V, dQ += dS K, dV += P^T dO, dK += dS^T Q.
template <typename T, int D, int kK>
__device__ __forceinline__ void gemm_p_bkn(float (&acc)[D / kMmaN][4], const float (&p)[kK / kMmaN][4],
                                           const FragAddr<D>& b) {
#pragma unroll
  for (int kk = 0; kk < kK / kMmaK; ++kk) {
    uint32_t af[4];
    acc_to_a_frag<T>(af, p, kk);
#pragma unroll
    for (int n2 = 0; n2 < D / 16; ++n2) {
      uint32_t bf[4];
      ldmatrix_x4_trans(bf, b.at(kk * 16, n2));
      mma_16816<T>(acc[2 * n2], af, bf[0], bf[1]);
      mma_16816<T>(acc[2 * n2 + 1], af, bf[2], bf[3]);
    }
  }
}

template <int kN>
__device__ __forceinline__ void zero_acc(float (&acc)[kN][4]) {
#pragma unroll
  for (int i = 0; i < kN; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
}

// Writes a warp's 16 x D fp32 accumulator (scaled) as T into rows row0.. of a swizzled tile.
template <typename T, int D>
__device__ __forceinline__ void acc_to_smem(T* tile, const float (&acc)[D / kMmaN][4], int row0, float scale,
                                            int lane) {
#pragma unroll
  for (int nt = 0; nt < D / kMmaN; ++nt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = row0 + lane / 4 + half * 8;
      const int off = SwizzledTile<D>::offset(r, nt) + 2 * (lane % 4);
      *reinterpret_cast<uint32_t*>(tile + off) =
          ElemTraits<T>::pack(acc[nt][2 * half] * scale, acc[nt][2 * half + 1] * scale);
    }
  }
}

// Copies rows [0, kRows) of a swizzled tile to global rows row0.. (skipping rows >= len), using
// `nthreads` threads starting at thread index `tid` of that group.
template <typename T, int D, int kRows>
__device__ __forceinline__ void store_tile(T* dst, int64_t row_stride, const T* tile, int row0, int len, int tid,
                                           int nthreads) {
  using Tile = SwizzledTile<D>;
  for (int idx = tid; idx < kRows * Tile::kChunks; idx += nthreads) {
    const int r = idx / Tile::kChunks, c = idx % Tile::kChunks;
    if (row0 + r < len) {
      *reinterpret_cast<uint4*>(dst + (int64_t)(row0 + r) * row_stride + c * kChunkElems) =
          *reinterpret_cast<const uint4*>(tile + Tile::offset(r, c));
    }
  }
}

}  // namespace allmem::swa::cuda
