// SWA forward (out + float32 LSE) for Hopper (sm_90a): FlashAttention-3 style.
//
//  * warp specialization: warpgroup 0 is the producer (one thread issues TMA loads, the warpgroup
//    gives its registers away with setmaxnreg.dec); warpgroups 1 and 2 are consumers, each owns 64
//    of the CTA's 128 query rows (setmaxnreg.inc to 240 registers);
//  * Q (once), K and V tiles (a ring of kStages each) arrive by TMA (cp.async.bulk.tensor) into
//    128-byte-swizzled shared memory and signal mbarriers with their byte count; consumers give a
//    stage back by arriving on its "empty" mbarrier;
//  * S = Q K^T is wgmma m64n128k16 with both operands in shared memory; O += P V is wgmma
//    m64nDk16 with P in registers (the S accumulator rounded to bf16/fp16) and V in shared memory
//    read transposed (MN-major descriptor), fp32 accumulation;
//  * inside a consumer warpgroup, S(t) = Q K(t)^T and O += P(t-1) V(t-1) are in flight together,
//    and the softmax of S(t) runs while P(t-1) V(t-1) is still executing.
//
// Same contract as swa_fwd.cu (FwdParams, SPEC "SWA with sinks": query i sees key j iff j <= i and
// (j < S or i - j < W); GQA; varlen through cu_seqlens; LSE in natural log, float32) and the same
// band walk (key_blocks_for_query_block: window blocks last to first, then the sink blocks; tiles
// outside the band are never loaded; tiles fully visible to a warp's 16 rows skip the mask).
//
// Compiled for every target in ALLMEM_CUDA_ARCHS, but the kernel body exists only in the sm_90a
// pass (__CUDA_ARCH_FEAT_SM90_ALL); `kSm90aBuilt` tells the host at run time whether the cubin the
// driver picked for this device has it (sm_80 or plain sm_90 cubins do not), so the dispatcher
// falls back to the portable kernel instead of launching an empty one.
#include <cuda.h>  // CUtensorMap and cuTensorMapEncodeTiled's types (the function is fetched at run time)

#include <cute/arch/mma_sm90_gmma.hpp>  // wgmma.mma_async wrappers (raw PTX, no CuTe layouts)
#include <algorithm>
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

template <int D>
struct Sm90FwdTraits {
  static constexpr int kConsumerWarpgroups = 2;
  static constexpr int kRowsPerWarpgroup = 64;  // wgmma M
  static constexpr int kBlockM = kConsumerWarpgroups * kRowsPerWarpgroup;
  static constexpr int kBlockN = 128;  // keys per tile: the N of S = Q K^T and the K of O += P V
  static constexpr int kStages = 2;    // K and V ring depth
  static constexpr int kThreads = (1 + kConsumerWarpgroups) * 128;
  static constexpr int kQBytes = kBlockM * D * 2;
  static constexpr int kKVBytes = kBlockN * D * 2;
  // Barriers: Q full, K full/empty and V full/empty per stage.
  static constexpr int kBarriers = 1 + 4 * kStages;
  static constexpr int kTileBytes = kQBytes + 2 * kStages * kKVBytes;
  // + 1024 so the tiles can be aligned by hand (dynamic shared memory is only 16-byte aligned).
  static constexpr size_t kSmemBytes = kAtomBytes + kTileBytes + kBarriers * 8;
  static constexpr int kProducerRegs = 24, kConsumerRegs = 240;
  static_assert(D % kLineElems == 0, "D must be a multiple of 64");
  static_assert(kQBytes % kAtomBytes == 0 && kKVBytes % kAtomBytes == 0, "tiles must keep 1024-byte alignment");
  static_assert(128 * kProducerRegs + kConsumerWarpgroups * 128 * kConsumerRegs <= 65536, "register file");
};

struct Sm90FwdParams {
  FwdParams p;
  CUtensorMap tm_q, tm_k, tm_v;  // 4-D {D, rows, heads, batch} maps, box {64, rows of a tile, 1, 1}
};

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
template <typename T>
struct GmmaOps;
template <>
struct GmmaOps<__nv_bfloat16> {
  using QK = gmma::MMA_64x128x16_F32BF16BF16_SS<gmma::Major::K, gmma::Major::K>;
  template <int N>
  using PV = std::conditional_t<N == 128, gmma::MMA_64x128x16_F32BF16BF16_RS<gmma::Major::K, gmma::Major::MN>,
                                gmma::MMA_64x64x16_F32BF16BF16_RS<gmma::Major::K, gmma::Major::MN>>;
};
template <>
struct GmmaOps<__half> {
  using QK = gmma::MMA_64x128x16_F32F16F16_SS<gmma::Major::K, gmma::Major::K>;
  template <int N>
  using PV = std::conditional_t<N == 128, gmma::MMA_64x128x16_F32F16F16_RS<gmma::Major::K, gmma::Major::MN>,
                                gmma::MMA_64x64x16_F32F16F16_RS<gmma::Major::K, gmma::Major::MN>>;
};

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

// s[64 rows of this warpgroup x 128 keys] = Q_wg K^T (issued, not waited for).
template <typename T, int D>
__device__ __forceinline__ void issue_qk(float (&s)[64], uint32_t q_wg, uint32_t k_tile) {
  using Tr = Sm90FwdTraits<D>;
  using Op = typename GmmaOps<T>::QK;
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    const uint32_t col = (ks % 4) * 32;  // bytes inside the 128-byte line of column block ks / 4
    const uint64_t da = make_desc(q_wg + (ks / 4) * Tr::kBlockM * kLineBytes + col, 16, kAtomBytes);
    const uint64_t db = make_desc(k_tile + (ks / 4) * Tr::kBlockN * kLineBytes + col, 16, kAtomBytes);
    gmma_ss<Op>(da, db, s, ks == 0 ? gmma::ScaleOut::Zero : gmma::ScaleOut::One, std::make_index_sequence<64>{});
  }
}

// o[64 x D] += P[64 x 128 keys] V (issued, not waited for). p[kk] is the A fragment of keys
// [16 kk, 16 kk + 16).
template <typename T, int D>
__device__ __forceinline__ void issue_pv(float (&o)[D / 2], const uint32_t (&p)[8][4], uint32_t v_tile) {
  using Tr = Sm90FwdTraits<D>;
  using Op = typename GmmaOps<T>::template PV<D>;
#pragma unroll
  for (int kk = 0; kk < Tr::kBlockN / 16; ++kk) {
    const uint64_t db = make_desc(v_tile + kk * 2 * kAtomBytes, Tr::kBlockN * kLineBytes, kAtomBytes);
    gmma_rs<Op>(p[kk], db, o, std::make_index_sequence<D / 2>{});
  }
}
#endif  // ALLMEM_SWA_SM90A_DEVICE

// ---------------------------------------------------------------------------------------------
// Accumulator layout of wgmma m64nN (per warpgroup; warp w of the group owns rows 16 w .. 16 w + 15):
// register 4 i + e of lane l holds row 16 w + l / 4 + 8 (e / 2), column 8 i + 2 (l % 4) + (e % 2),
// i.e. the mma.sync m16n8 layout repeated over the n8 blocks i. The A fragment of a register-
// sourced wgmma (m64k16) is the mma.sync m16n8k16 A layout, so keys [16 kk, 16 kk + 16) of S
// become P's A fragment from n8 blocks 2 kk and 2 kk + 1 (acc_to_a_frag in the portable kernel).
template <typename T, int D>
__global__ void __launch_bounds__(Sm90FwdTraits<D>::kThreads, 1)
    swa_fwd_sm90_kernel(const __grid_constant__ Sm90FwdParams params) {
#ifdef ALLMEM_SWA_SM90A_DEVICE
  using Tr = Sm90FwdTraits<D>;
  constexpr int kBM = Tr::kBlockM, kBN = Tr::kBlockN, kStages = Tr::kStages;
  const FwdParams& p = params.p;
  const AttnShape& s = p.shape;

  // Longest query blocks (the ones reaching the most sink/window tiles) first.
  const int m_block = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const SeqSpan seq = seq_span(s, b);
  const int i0 = m_block * kBM;
  if (i0 >= seq.len) return;  // varlen: grid is sized for the longest sequence (whole CTA leaves)
  const int hk = h / (s.hq / s.hkv);
  const bool varlen = s.cu_seqlens != nullptr;
  // TMA coordinates: rows of the whole [T] (varlen) or of batch b's [L] (dense).
  const int row_base = varlen ? static_cast<int>(seq.start) : 0;
  const int batch_coord = varlen ? 0 : b;
  const KeyBlockRange kr = key_blocks_for_query_block(i0, kBM, kBN, seq.len, s.window, s.sinks);
  const int n_steps = kr.count();  // >= 1: the diagonal block always exists

  extern __shared__ unsigned char smem_raw[];
  const uint32_t smem_base = (smem_u32(smem_raw) + kAtomBytes - 1) & ~uint32_t(kAtomBytes - 1);
  unsigned char* smem_gen = smem_raw + (smem_base - smem_u32(smem_raw));
  const uint32_t sQ = smem_base;
  const uint32_t sK0 = sQ + Tr::kQBytes;
  const uint32_t sV0 = sK0 + kStages * Tr::kKVBytes;
  const uint32_t bars = sV0 + kStages * Tr::kKVBytes;
  const uint32_t barQ = bars;
  auto bar_k_full = [&](int st) { return bars + 8 * (1 + st); };
  auto bar_k_empty = [&](int st) { return bars + 8 * (1 + kStages + st); };
  auto bar_v_full = [&](int st) { return bars + 8 * (1 + 2 * kStages + st); };
  auto bar_v_empty = [&](int st) { return bars + 8 * (1 + 3 * kStages + st); };
  constexpr int kConsumerWarps = Tr::kConsumerWarpgroups * 4;

  const int tid = threadIdx.x;
  const int warpgroup = tid / 128;
  if (tid == 0) {
    tma_prefetch_desc(&params.tm_q);
    tma_prefetch_desc(&params.tm_k);
    tma_prefetch_desc(&params.tm_v);
    mbar_init(barQ, 1);
    for (int st = 0; st < kStages; ++st) {
      mbar_init(bar_k_full(st), 1);  // the producer's arrive.expect_tx; TMA bytes complete the phase
      mbar_init(bar_v_full(st), 1);
      mbar_init(bar_k_empty(st), kConsumerWarps);  // one arrival per consumer warp
      mbar_init(bar_v_empty(st), kConsumerWarps);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();  // the last CTA-wide barrier: the producer warps leave early

  if (warpgroup == 0) {
    // ------------------------------------------------------------------ producer
    setmaxnreg_dec<Tr::kProducerRegs>();
    if (tid == 0) {
      mbar_arrive_expect_tx(barQ, Tr::kQBytes);
      tma_load_tile<D, kBM>(sQ, &params.tm_q, barQ, row_base + i0, h, batch_coord);
      for (int t = 0; t < n_steps; ++t) {
        const int st = t % kStages;
        const uint32_t phase = (t / kStages) & 1;
        const int j0 = kr.block(t) * kBN;
        mbar_wait_or_trap(bar_k_empty(st), phase ^ 1);
        mbar_arrive_expect_tx(bar_k_full(st), Tr::kKVBytes);
        tma_load_tile<D, kBN>(sK0 + st * Tr::kKVBytes, &params.tm_k, bar_k_full(st), row_base + j0, hk, batch_coord);
        mbar_wait_or_trap(bar_v_empty(st), phase ^ 1);
        mbar_arrive_expect_tx(bar_v_full(st), Tr::kKVBytes);
        tma_load_tile<D, kBN>(sV0 + st * Tr::kKVBytes, &params.tm_v, bar_v_full(st), row_base + j0, hk, batch_coord);
      }
      // The consumers' last release (V of the last tile; nothing reuses that stage afterwards, so
      // its parity cannot come round again): see mbar_wait_or_trap.
      const int last = n_steps - 1;
      mbar_wait_or_trap(bar_v_empty(last % kStages), (last / kStages) & 1);
    }
    return;
  }

  // -------------------------------------------------------------------- consumers
  setmaxnreg_inc<Tr::kConsumerRegs>();
  const int cwg = warpgroup - 1;                   // consumer warpgroup: query rows 64 cwg ..
  const int ctid = tid - 128 * warpgroup;          // thread in the warpgroup
  const int wwarp = ctid / kWarpSize, lane = tid % kWarpSize;
  const int warp_row0 = cwg * Tr::kRowsPerWarpgroup + wwarp * kMmaM;  // first of this warp's 16 rows
  const int row_of[2] = {i0 + warp_row0 + lane / 4, i0 + warp_row0 + lane / 4 + 8};
  const uint32_t q_wg = sQ + cwg * Tr::kRowsPerWarpgroup * kLineBytes;
  const float scale_log2 = s.scale_log2;

  float o[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
  float sc[64];
  uint32_t pf[kBN / 16][4];
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};  // this thread's share; summed over the quad at the end

  // Scales, masks and exponentiates sc in place (log2 domain), updates the running max and sum,
  // and returns the factor the previous output must be multiplied by, per row half.
  auto softmax_step = [&](int j0, float (&corr)[2]) {
    const bool full = tile_fully_visible(i0 + warp_row0, kMmaM, j0, kBN, seq.len, s.window, s.sinks);
#pragma unroll
    for (int i = 0; i < 16; ++i) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = sc[4 * i + e] * scale_log2;
        if (!full) {  // visible() and j < len without short-circuit branches: one select per element
          const int j = j0 + 8 * i + 2 * (lane % 4) + (e % 2), row = row_of[e / 2];
          const bool vis = (j < seq.len) & (j <= row) & ((j < s.sinks) | (row - j < s.window));
          x = vis ? x : -INFINITY;
        }
        sc[4 * i + e] = x;
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = row_max[r];
#pragma unroll
      for (int i = 0; i < 16; ++i) mx = fmaxf(mx, fmaxf(sc[4 * i + 2 * r], sc[4 * i + 2 * r + 1]));
      mx = quad_max(mx);
      // A row with nothing visible yet keeps max -inf; subtracting 0 instead keeps exp2 at 0.
      const float m_use = mx == -INFINITY ? 0.f : mx;
      corr[r] = exp2f(row_max[r] - m_use);
      row_max[r] = mx;
      float sum = 0.f;
#pragma unroll
      for (int i = 0; i < 16; ++i) {
#pragma unroll
        for (int e = 2 * r; e < 2 * r + 2; ++e) {
          sc[4 * i + e] = exp2f(sc[4 * i + e] - m_use);
          sum += sc[4 * i + e];
        }
      }
      row_sum[r] = row_sum[r] * corr[r] + sum;
    }
  };
  auto convert_p = [&]() {
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      pf[kk][0] = ElemTraits<T>::pack(sc[8 * kk + 0], sc[8 * kk + 1]);
      pf[kk][1] = ElemTraits<T>::pack(sc[8 * kk + 2], sc[8 * kk + 3]);
      pf[kk][2] = ElemTraits<T>::pack(sc[8 * kk + 4], sc[8 * kk + 5]);
      pf[kk][3] = ElemTraits<T>::pack(sc[8 * kk + 6], sc[8 * kk + 7]);
    }
  };
  auto release = [&](uint32_t bar) {
    __syncwarp();
    if (lane == 0) mbar_arrive(bar);
  };

  auto rescale_o = [&](const float (&corr)[2]) {
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      o[4 * i + 0] *= corr[0];
      o[4 * i + 1] *= corr[0];
      o[4 * i + 2] *= corr[1];
      o[4 * i + 3] *= corr[1];
    }
  };

  mbar_wait(barQ, 0);

  // Schedule of a consumer warpgroup, tile t >= 1 (P(t) and corr(t) come from softmax(S(t))):
  //   wait for every wgmma (P(t-2) V(t-2) done) -> give V(t-2) back
  //   O *= corr(t-1); pack P(t-1) into A fragments
  //   issue S(t) = Q K(t)^T, then O += P(t-1) V(t-1)
  //   wait for S(t) only -> give K(t) back; softmax(S(t)) while P(t-1) V(t-1) runs
  // The wait for P V sits at the top of the next iteration, in another basic block than the
  // softmax: in one block ptxas hoisted it above the exponentials (it may move a wait earlier,
  // and the P packing / O rescale after it pulled it up), which serialized softmax and P V.
  float corr[2];

  // Tile 0: S = Q K0^T, softmax.
  mbar_wait(bar_k_full(0), 0);
  fence_regs(sc);
  cute::warpgroup_arrive();
  issue_qk<T, D>(sc, q_wg, sK0);
  cute::warpgroup_commit_batch();
  cute::warpgroup_wait<0>();
  fence_regs(sc);
  release(bar_k_empty(0));
  softmax_step(kr.block(0) * kBN, corr);  // o is zero: corr(0) multiplies zeros

  for (int t = 1; t < n_steps; ++t) {
    const int st = t % kStages, pst = (t - 1) % kStages;
    cute::warpgroup_wait<0>();  // P(t-2) V(t-2) (t >= 2) done: O and the A fragments are free
    fence_regs(o);
    fence_regs(pf);
    if (t >= 2) release(bar_v_empty((t - 2) % kStages));
    rescale_o(corr);
    convert_p();
    // Both waits before the issues: a wait loop between them made ptxas inject a wgmma.fence.
    mbar_wait(bar_k_full(st), (t / kStages) & 1);
    mbar_wait(bar_v_full(pst), ((t - 1) / kStages) & 1);
    fence_regs(sc);
    fence_regs(o);
    fence_regs(pf);
    cute::warpgroup_arrive();
    issue_qk<T, D>(sc, q_wg, sK0 + st * Tr::kKVBytes);
    cute::warpgroup_commit_batch();
    issue_pv<T, D>(o, pf, sV0 + pst * Tr::kKVBytes);
    cute::warpgroup_commit_batch();
    cute::warpgroup_wait<1>();  // S(t) done (groups complete in order); P(t-1) V(t-1) may still run
    fence_regs(sc);
    release(bar_k_empty(st));
    softmax_step(kr.block(t) * kBN, corr);  // touches sc and the row statistics only
  }

  // Last tile's O += P V.
  {
    cute::warpgroup_wait<0>();
    fence_regs(o);
    fence_regs(pf);
    if (n_steps >= 2) release(bar_v_empty((n_steps - 2) % kStages));
    rescale_o(corr);
    convert_p();
    const int pst = (n_steps - 1) % kStages;
    mbar_wait(bar_v_full(pst), ((n_steps - 1) / kStages) & 1);
    fence_regs(o);
    fence_regs(pf);
    cute::warpgroup_arrive();
    issue_pv<T, D>(o, pf, sV0 + pst * Tr::kKVBytes);
    cute::warpgroup_commit_batch();
    cute::warpgroup_wait<0>();
    fence_regs(o);
    release(bar_v_empty(pst));
  }

  // Epilogue: normalize, LSE, stage the warpgroup's 64 rows through its own rows of the Q tile
  // (only this warpgroup's wgmmas read them, and they are complete), then 16-byte stores.
  float inv[2];
  float* gLse = stat_ptr(p.lse, b, seq.start, h);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float total = quad_sum(row_sum[r]);
    inv[r] = total > 0.f ? 1.f / total : 0.f;
    if (lane % 4 == 0 && row_of[r] < seq.len) {
      gLse[row_of[r]] = total > 0.f ? (row_max[r] + log2f(total)) * kLn2 : -INFINITY;
    }
  }
#pragma unroll
  for (int i = 0; i < D / 8; ++i) {
    const int col = 8 * i + 2 * (lane % 4);
    const int cb = col / kLineElems, chunk = (col % kLineElems) / 8;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = warp_row0 + lane / 4 + 8 * r;  // tile row
      const uint32_t off = cb * kBM * kLineBytes + row * kLineBytes + ((chunk ^ (row % 8)) * 16) + (col % 8) * 2;
      *reinterpret_cast<uint32_t*>(smem_gen + off) =
          ElemTraits<T>::pack(o[4 * i + 2 * r] * inv[r], o[4 * i + 2 * r + 1] * inv[r]);
    }
  }
  named_barrier_sync(1 + cwg, 128);
  T* gO = head_ptr<T>(p.out, b, seq.start, h);
  constexpr int kChunksPerRow = D / 8;
#pragma unroll
  for (int idx = ctid; idx < Tr::kRowsPerWarpgroup * kChunksPerRow; idx += 128) {
    const int r = cwg * Tr::kRowsPerWarpgroup + idx / kChunksPerRow, c = idx % kChunksPerRow;
    const int cb = c / 8, chunk = c % 8;
    if (i0 + r < seq.len) {
      const uint32_t off = cb * kBM * kLineBytes + r * kLineBytes + ((chunk ^ (r % 8)) * 16);
      *reinterpret_cast<uint4*>(gO + (int64_t)(i0 + r) * p.out.row_stride + c * 8) =
          *reinterpret_cast<const uint4*>(smem_gen + off);
    }
  }
#endif  // ALLMEM_SWA_SM90A_DEVICE
}

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

template <typename T, int D>
void run_fwd_sm90(const Sm90FwdParams& sp, cudaStream_t stream) {
  using Tr = Sm90FwdTraits<D>;
  auto kernel = swa_fwd_sm90_kernel<T, D>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)Tr::kSmemBytes));
  const dim3 grid((sp.p.shape.seqlen + Tr::kBlockM - 1) / Tr::kBlockM, sp.p.shape.hq, sp.p.shape.batch);
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(sp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

bool launch_swa_fwd_sm90(const FwdParams& p, int64_t total_rows, DType dtype, int head_dim, cudaStream_t stream) {
  if (head_dim != 64 && head_dim != 128) return false;
  if (p.shape.seqlen == 0 || p.shape.batch == 0) return true;  // nothing to do
  if (!sm90a_built_for_current_device()) return false;
  const bool varlen = p.shape.cu_seqlens != nullptr;
  const int64_t rows = varlen ? total_rows : p.shape.seqlen;
  const int batch = varlen ? 1 : p.shape.batch;
  Sm90FwdParams sp;
  sp.p = p;
  // Q boxes cover a query block (128 rows), K/V boxes a key block (128 rows): same box shape.
  constexpr int kBox = 128;
  static_assert(Sm90FwdTraits<64>::kBlockM == kBox && Sm90FwdTraits<64>::kBlockN == kBox &&
                Sm90FwdTraits<128>::kBlockM == kBox && Sm90FwdTraits<128>::kBlockN == kBox);
  if (!encode_map(&sp.tm_q, p.q, dtype, head_dim, rows, p.shape.hq, batch, kBox) ||
      !encode_map(&sp.tm_k, p.k, dtype, head_dim, rows, p.shape.hkv, batch, kBox) ||
      !encode_map(&sp.tm_v, p.v, dtype, head_dim, rows, p.shape.hkv, batch, kBox)) {
    return false;
  }
  dispatch_dtype_headdim(dtype, head_dim, [&]<typename T, int D>() { run_fwd_sm90<T, D>(sp, stream); });
  return true;
}

}  // namespace allmem::swa::cuda
