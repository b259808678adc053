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
#pragma once
#include "swa/swa_sm90_utils.cuh"

namespace allmem::swa::cuda {
namespace {

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


// ---------------------------------------------------------------------------------------------
// Accumulator and register-A-fragment layouts: swa_sm90_utils.cuh (pack_a_frags).
// kPingPong: the two consumer warpgroups take turns issuing their wgmmas (named barriers 5 and 6:
// a warpgroup syncs on its own before issuing and arrives on the other's after), so one's softmax
// runs while the other's matmuls do (FlashAttention-3's ping-pong). Opt-in variant: same results.
template <typename T, int D, bool kPingPong>
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

  ALLMEM_SWA_DYNAMIC_SMEM(smem_raw);
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
    fence_mbarrier_init();
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
  auto convert_p = [&]() { pack_a_frags<T, kBN>(pf, sc); };
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

  // Ping-pong turns: n_steps + 1 issue points per warpgroup (tile 0, the loop, the last P V).
  // Warpgroup 0 goes first (warpgroup 1 arrives on its barrier once up front, and skips its last
  // arrival so every barrier phase gets exactly 256 arrivals).
  auto my_turn = [&]() {
    if constexpr (kPingPong) named_barrier_sync(5 + cwg, 2 * 128);
  };
  auto pass_turn = [&](bool last) {
    if constexpr (kPingPong) {
      if (!(last && cwg == 1)) named_barrier_arrive(5 + (cwg ^ 1), 2 * 128);
    }
  };
  if constexpr (kPingPong) {
    if (cwg == 1) named_barrier_arrive(5, 2 * 128);
  }

  // Tile 0: S = Q K0^T, softmax.
  mbar_wait(bar_k_full(0), 0);
  fence_regs(sc);
  my_turn();
  warpgroup_arrive();
  issue_ss<T, D, kBM, kBN>(sc, q_wg, sK0, false);  // S = Q K^T
  warpgroup_commit();
  pass_turn(false);
  warpgroup_wait<0>();
  fence_regs(sc);
  release(bar_k_empty(0));
  softmax_step(kr.block(0) * kBN, corr);  // o is zero: corr(0) multiplies zeros

  for (int t = 1; t < n_steps; ++t) {
    const int st = t % kStages, pst = (t - 1) % kStages;
    warpgroup_wait<0>();  // P(t-2) V(t-2) (t >= 2) done: O and the A fragments are free
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
    my_turn();
    warpgroup_arrive();
    issue_ss<T, D, kBM, kBN>(sc, q_wg, sK0 + st * Tr::kKVBytes, false);
    warpgroup_commit();
    issue_rs<T, D, kBN>(o, pf, sV0 + pst * Tr::kKVBytes);  // O += P V
    warpgroup_commit();
    pass_turn(false);
    warpgroup_wait<1>();  // S(t) done (groups complete in order); P(t-1) V(t-1) may still run
    fence_regs(sc);
    release(bar_k_empty(st));
    softmax_step(kr.block(t) * kBN, corr);  // touches sc and the row statistics only
  }

  // Last tile's O += P V.
  {
    warpgroup_wait<0>();
    fence_regs(o);
    fence_regs(pf);
    if (n_steps >= 2) release(bar_v_empty((n_steps - 2) % kStages));
    rescale_o(corr);
    convert_p();
    const int pst = (n_steps - 1) % kStages;
    mbar_wait(bar_v_full(pst), ((n_steps - 1) / kStages) & 1);
    fence_regs(o);
    fence_regs(pf);
    my_turn();
    warpgroup_arrive();
    issue_rs<T, D, kBN>(o, pf, sV0 + pst * Tr::kKVBytes);  // O += P V
    warpgroup_commit();
    pass_turn(true);
    warpgroup_wait<0>();
    fence_regs(o);
    release(bar_v_empty(pst));
  }

  // Epilogue: normalize, LSE, stage the warpgroup's 64 rows through its own rows of the Q tile
  // (only this warpgroup's wgmmas read them, and they are complete), then 16-byte stores.
  float inv[2];
  finish_rows(inv, row_sum, row_max, row_of, stat_ptr(p.lse, b, seq.start, h), seq.len, lane);
  stage_acc_rows<T, D, kBM>(smem_gen, 0, o, inv, warp_row0, lane);
  named_barrier_sync(1 + cwg, 128);
  store_staged_rows<T, D, kBM>(head_ptr<T>(p.out, b, seq.start, h), p.out.row_stride, smem_gen, 0, cwg, ctid, i0,
                               seq.len);
#endif  // ALLMEM_SWA_SM90A_DEVICE
}

}  // namespace
}  // namespace allmem::swa::cuda
