// SWA backward for Hopper (sm_90a): the dQ kernel and the dK/dV kernel as one template, built on
// the forward's pieces (swa_sm90_utils.cuh: TMA into 128-byte-swizzled tiles, mbarrier rings,
// warp specialization, wgmma with fp32 accumulators).
//
// Both kernels keep two "resident" tiles of 128 rows in shared memory for the whole CTA and stream
// two tiles of kBlockN rows per step through a ring of kStages:
//
//                 resident A1, A2     streamed B1, B2     step walk
//   dQ   kernel   Q, dO  (query rows) K, V  (key rows)    the key blocks of the band (the forward's)
//   dK/dV kernel  K, V   (key rows)   Q, dO (query rows)  every query head of the GQA group x the
//                                                          query blocks that see the keys
//
// Per step, each consumer warpgroup (64 resident rows):
//   X = A1 B1^T, Y = A2 B2^T               (wgmma SS, both K-major: S, dP for dQ; S^T, dP^T for dK/dV)
//   P = exp2(X * scale log2e - lse log2e) on visible (query, key) pairs, else 0
//   dS = P (Y - delta)
//   dQ += dS B1                             (wgmma RS, B1 = K read MN-major)
//   dV += P B2, dK += dS B1                 (wgmma RS, B2 = dO, B1 = Q read MN-major)
// and scales dQ / dK by the softmax scale at the end. lse / delta are per query: per accumulator
// row in the dQ kernel (two rows per thread, read once), per accumulator column in the dK/dV
// kernel (the producer warp stages the step's kBlockN values next to its tiles).
//
// Deterministic: every dQ / dK / dV element has exactly one writer (the dK/dV CTA sums the GQA
// group's heads in registers), no atomics. The contract is the portable backward's (BwdParams;
// delta = rowsum(dO * O) from swa_bwd_preprocess_kernel; lse natural-log float32).
#pragma once
#include "swa/swa_sm90_utils.cuh"

namespace allmem::swa::cuda {
namespace {

template <int D, bool kKeySide, bool kDqAtomic = false>
struct Sm90BwdTraits {
  static_assert(kKeySide || !kDqAtomic, "atomic dQ belongs to the dK/dV kernel");
  static constexpr int kConsumerWarpgroups = 2;
  static constexpr int kRowsPerWarpgroup = 64;  // wgmma M
  static constexpr int kBlockM = kConsumerWarpgroups * kRowsPerWarpgroup;  // resident rows
  // Streamed rows per step (the N of X and Y, the K of the RS products). Registers per consumer
  // thread: the accumulators (dK + dV: D floats; dQ: D / 2) plus X and Y (kBlockN floats) plus
  // their 16-bit fragments. dK/dV at D = 128 with 64 streamed rows: up to 237 of the 240 a consumer
  // gets; dQ with 128: up to 215 (ptxas, no spills). 128 rows halve the bytes streamed per FLOP.
  static constexpr int kBlockN = kKeySide ? 64 : 128;
  static constexpr int kResBytes = kBlockM * D * 2;     // each resident tile
  static constexpr int kStreamBytes = kBlockN * D * 2;  // each streamed tile
  static constexpr int kStageBytes = 2 * kStreamBytes;
  // Ring depth: three stages where shared memory allows (dK/dV; dQ at D = 64), else two.
  static constexpr int kStages =
      2 * kResBytes + 3 * kStageBytes + (kDqAtomic ? 4 * kBlockM * kBlockN : 0) + 2048 <= 227 * 1024 ? 3 : 2;
  static constexpr int kThreads = (1 + kConsumerWarpgroups) * 128;
  // dK/dV: per stage, the step's queries' lse * log2e and delta, then its first query row and query
  // head (ints; the consumers read them instead of walking the step order themselves: registers).
  static constexpr int kStatFloats = kKeySide ? 2 * kBlockN + 4 : 0;
  // Barriers: resident tiles full; per stage: streamed tiles (and stats) full / empty.
  static constexpr int kBarriers = 1 + 2 * kStages;
  // kDqAtomic: dS^T of the step as 16 bits, [128 keys][64 queries] (one 128-byte line per key),
  // double-buffered: the A operand of dQ = dS K.
  static constexpr int kDsBytes = kDqAtomic ? kBlockM * kBlockN * 2 : 0;
  static constexpr int kTileBytes = 2 * kResBytes + kStages * kStageBytes + 2 * kDsBytes;
  // + 16: the sink-split "last part" flag after the barriers.
  static constexpr size_t kSmemBytes = kAtomBytes + kTileBytes + kStages * kStatFloats * 4 + kBarriers * 8 + 16;
  static constexpr int kProducerRegs = 24, kConsumerRegs = 240;
  // The producer warp: its 32 lanes each arrive on a stage's full barrier (after writing their
  // share of the stats; lane 0's arrival also carries the TMA byte count).
  static constexpr int kFullArrivals = 32;
  static_assert(D % kLineElems == 0, "D must be a multiple of 64");
  static_assert(kResBytes % kAtomBytes == 0 && kStreamBytes % kAtomBytes == 0, "tiles keep 1024-byte alignment");
  static_assert(128 * kProducerRegs + kConsumerWarpgroups * 128 * kConsumerRegs <= 65536, "register file");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory per CTA");
};

struct Sm90BwdParams {
  BwdParams p;
  // 4-D {D, rows, heads, batch} maps: resident tiles (box rows 128), streamed tiles (box rows
  // kBlockN). dQ kernel: a1 = q, a2 = dout, b1 = k, b2 = v. dK/dV kernel: a1 = k, a2 = v, b1 = q,
  // b2 = dout.
  CUtensorMap tm_a1, tm_a2, tm_b1, tm_b2;
};

// Grid: dQ (query blocks, longest first; hq; batch); dK/dV (hkv; key blocks, the sink blocks with
// the longest walks first; batch).
template <typename T, int D, bool kKeySide, bool kDqAtomic>
__global__ void __launch_bounds__(Sm90BwdTraits<D, kKeySide, kDqAtomic>::kThreads, 1)
    swa_bwd_sm90_kernel(const __grid_constant__ Sm90BwdParams params) {
#ifdef ALLMEM_SWA_SM90A_DEVICE
  using Tr = Sm90BwdTraits<D, kKeySide, kDqAtomic>;
  constexpr int kBM = Tr::kBlockM, kBN = Tr::kBlockN, kStages = Tr::kStages;
  const BwdParams& p = params.p;
  const AttnShape& s = p.shape;
  const int group = s.hq / s.hkv;

  // dK/dV: blockIdx.y < n_blocks is key block y (part 0 of its walk); above, the further parts of
  // the sink blocks' walks (BwdParams::sink_parts), part = 1 + e % (parts - 1) of block e / (parts - 1).
  // (Recomputed after the main loop rather than kept live through it: registers.)
  auto block_and_part = [&]() {
    int blk_ = kKeySide ? static_cast<int>(blockIdx.y) : static_cast<int>(gridDim.x - 1 - blockIdx.x), part_ = 0;
    if constexpr (kKeySide) {
      const int n_blocks = (s.seqlen + kBM - 1) / kBM;
      if (blk_ >= n_blocks) {
        const int e = blk_ - n_blocks;
        blk_ = e / (p.sink_parts - 1);
        part_ = 1 + e % (p.sink_parts - 1);
      }
    }
    return make_int2(blk_, part_);
  };
  const int blk = block_and_part().x;
  const int h_res = kKeySide ? blockIdx.x : blockIdx.y;  // head of the resident tiles (kv head / query head)
  const int b = blockIdx.z;
  const SeqSpan seq = seq_span(s, b);
  const int r0 = blk * kBM;  // first resident row: query i0 (dQ) or key j0 (dK/dV)
  if (r0 >= seq.len) return;  // varlen: grid sized for the longest sequence (whole CTA leaves)
  auto is_split = [&]() { return kKeySide && p.sink_parts > 1 && r0 < s.sinks; };  // a split sink walk
  const bool varlen = s.cu_seqlens != nullptr;
  const int row_base = varlen ? static_cast<int>(seq.start) : 0;
  const int batch_coord = varlen ? 0 : b;

  // The step walk. dQ: key blocks of kBN keys (window blocks last to first, then the sinks).
  // dK/dV: for each query head of the group, query blocks of kBN queries that see the keys.
  KeyBlockRange kr{};
  int2 qb = make_int2(0, 0);
  int n_steps;
  if constexpr (kKeySide) {
    qb = query_blocks_for_key_block(r0, kBN, kBM, seq.len, s.window, s.sinks);
    n_steps = group * (qb.y - qb.x + 1);
  } else {
    kr = key_blocks_for_query_block(r0, kBM, kBN, seq.len, s.window, s.sinks);
    n_steps = kr.count();  // >= 1: the diagonal block always exists
  }
  // A split walk: this CTA's part is steps [t_lo, t_lo + n_steps) of the whole (possibly none, for
  // a varlen sequence shorter than the longest); t below counts from t_lo.
  int t_lo = 0;
  if (is_split()) {
    const int total = n_steps, part = block_and_part().y, parts = p.sink_parts;
    t_lo = static_cast<int>(int64_t{total} * part / parts);
    n_steps = static_cast<int>(int64_t{total} * (part + 1) / parts) - t_lo;
  }
  const int nq = qb.y - qb.x + 1;
  auto step_row0 = [&](int t) { return kKeySide ? (qb.x + (t_lo + t) % nq) * kBN : kr.block(t) * kBN; };
  auto step_head = [&](int t) { return kKeySide ? h_res * group + (t_lo + t) / nq : h_res / group; };

  ALLMEM_SWA_DYNAMIC_SMEM(smem_raw);
  const uint32_t smem_base = (smem_u32(smem_raw) + kAtomBytes - 1) & ~uint32_t(kAtomBytes - 1);
  unsigned char* smem_gen = smem_raw + (smem_base - smem_u32(smem_raw));
  const uint32_t sA1 = smem_base;
  const uint32_t sA2 = sA1 + Tr::kResBytes;
  const uint32_t sB0 = sA2 + Tr::kResBytes;  // stage st: B1 at sB0 + st * kStageBytes, B2 right after
  const uint32_t sDs = sB0 + kStages * Tr::kStageBytes;  // kDqAtomic: two dS^T tiles
  float* const sStat = reinterpret_cast<float*>(smem_gen + Tr::kTileBytes);  // [kStages][lse2 | delta]
  const uint32_t bars = smem_base + Tr::kTileBytes + kStages * Tr::kStatFloats * 4;
  const uint32_t bar_res = bars;
  auto bar_full = [&](int st) { return bars + 8 * (1 + st); };
  auto bar_empty = [&](int st) { return bars + 8 * (1 + kStages + st); };
  constexpr int kConsumerWarps = Tr::kConsumerWarpgroups * 4;

  const int tid = threadIdx.x;
  const int warpgroup = tid / 128;
  const int lane = tid % kWarpSize;
  if (tid == 0) {
    tma_prefetch_desc(&params.tm_a1);
    tma_prefetch_desc(&params.tm_a2);
    tma_prefetch_desc(&params.tm_b1);
    tma_prefetch_desc(&params.tm_b2);
    mbar_init(bar_res, 1);
    for (int st = 0; st < kStages; ++st) {
      mbar_init(bar_full(st), Tr::kFullArrivals);
      mbar_init(bar_empty(st), kConsumerWarps);  // one arrival per consumer warp
    }
    fence_mbarrier_init();
  }
  __syncthreads();  // the last CTA-wide barrier: the producer warps leave early

  if (warpgroup == 0) {
    // ------------------------------------------------------------------ producer (warp 0)
    setmaxnreg_dec<Tr::kProducerRegs>();
    if (tid < kWarpSize) {
      if (lane == 0) {
        mbar_arrive_expect_tx(bar_res, 2 * Tr::kResBytes);
        tma_load_tile<D, kBM>(sA1, &params.tm_a1, bar_res, row_base + r0, h_res, batch_coord);
        tma_load_tile<D, kBM>(sA2, &params.tm_a2, bar_res, row_base + r0, h_res, batch_coord);
      }
      for (int t = 0; t < n_steps; ++t) {
        const int st = t % kStages;
        const int c0 = step_row0(t), hs = step_head(t);
        mbar_wait_or_trap(bar_empty(st), ((t / kStages) & 1) ^ 1);
        if constexpr (kKeySide) {
          // This step's queries' lse (log2 domain) and delta; zeros past the sequence (masked).
          float* stat = sStat + st * Tr::kStatFloats;
          const float* gl = stat_ptr(p.lse, b, seq.start, hs);
          const float* gd = stat_ptr(p.delta, b, seq.start, hs);
#pragma unroll
          for (int c = lane; c < kBN; c += kWarpSize) {
            const bool ok = c0 + c < seq.len;
            stat[c] = ok ? gl[c0 + c] * kLog2e : 0.f;
            stat[kBN + c] = ok ? gd[c0 + c] : 0.f;
          }
        }
        const uint32_t stage = sB0 + st * Tr::kStageBytes;
        if (lane == 0) {
          if constexpr (kKeySide) {
            int* where = reinterpret_cast<int*>(sStat + st * Tr::kStatFloats + 2 * kBN);
            where[0] = c0;
            where[1] = hs;
          }
          mbar_arrive_expect_tx(bar_full(st), Tr::kStageBytes);
          tma_load_tile<D, kBN>(stage, &params.tm_b1, bar_full(st), row_base + c0, hs, batch_coord);
          tma_load_tile<D, kBN>(stage + Tr::kStreamBytes, &params.tm_b2, bar_full(st), row_base + c0, hs,
                                batch_coord);
        } else {
          mbar_arrive(bar_full(st));  // releases this lane's stats writes
        }
      }
      // The consumers' last release (nothing reuses that stage afterwards): a consumer stuck on a
      // load ends in mbar_wait_or_trap's trap instead of hanging.
      const int last = n_steps - 1;
      if (n_steps > 0) mbar_wait_or_trap(bar_empty(last % kStages), (last / kStages) & 1);
    }
    return;
  }

  // -------------------------------------------------------------------- consumers
  setmaxnreg_inc<Tr::kConsumerRegs>();
  const int cwg = warpgroup - 1;           // consumer warpgroup: resident rows 64 cwg ..
  const int ctid = tid - 128 * warpgroup;  // thread in the warpgroup
  const int wwarp = ctid / kWarpSize;
  const int warp_row0 = cwg * Tr::kRowsPerWarpgroup + wwarp * kMmaM;  // tile row of this warp's first row
  const int res_row[2] = {r0 + warp_row0 + lane / 4, r0 + warp_row0 + lane / 4 + 8};
  const uint32_t a1_wg = sA1 + cwg * Tr::kRowsPerWarpgroup * kLineBytes;
  const uint32_t a2_wg = sA2 + cwg * Tr::kRowsPerWarpgroup * kLineBytes;
  const float scale_log2 = s.scale_log2;
  const int len = seq.len, window = s.window, sinks = s.sinks;

  // dQ: lse (log2 domain) and delta of this thread's two query rows (rows past the end: masked).
  float row_lse2[2] = {0.f, 0.f}, row_delta[2] = {0.f, 0.f};
  if constexpr (!kKeySide) {
    const float* gl = stat_ptr(p.lse, b, seq.start, h_res);
    const float* gd = stat_ptr(p.delta, b, seq.start, h_res);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (res_row[r] < len) {
        row_lse2[r] = gl[res_row[r]] * kLog2e;
        row_delta[r] = gd[res_row[r]];
      }
    }
  }

  float acc1[D / 2];                   // dQ or dK (64 rows x D per warpgroup)
  float acc2[kKeySide ? D / 2 : 1];    // dV
#pragma unroll
  for (int i = 0; i < D / 2; ++i) acc1[i] = 0.f;
#pragma unroll
  for (int i = 0; i < (kKeySide ? D / 2 : 1); ++i) acc2[i] = 0.f;
  float x[kBN / 2], y[kBN / 2];        // X then P; Y then dS
  float dqa[kDqAtomic ? D / 4 : 1];    // kDqAtomic: dQ / scale of the step, 64 queries x D / 2
  constexpr bool kOverlap = D == 64;   // see the schedule below
  uint32_t pf[kBN / 16][4], dsf[kBN / 16][4];

  auto issue_sdp = [&](int t) {
    const uint32_t b1 = sB0 + (t % kStages) * Tr::kStageBytes;
    issue_ss<T, D, kBM, kBN>(x, a1_wg, b1, false);                     // S (dQ) or S^T (dK/dV)
    issue_ss<T, D, kBM, kBN>(y, a2_wg, b1 + Tr::kStreamBytes, false);  // dP = dO V^T or dP^T = V dO^T
  };
  // P and dS of step t in place of X and Y, then packed into the RS products' A fragments.
  // Element 4 i + e: resident row res_row[e / 2], streamed column c0 + 8 i + 2 (lane % 4) + e % 2
  // (swa_sm90_utils.cuh, accumulator layout).
  // Returns the step's first streamed row and (dK/dV) query head.
  auto p_and_ds = [&](int t) {
    const float* stat = sStat + (t % kStages) * Tr::kStatFloats;
    const int* where = reinterpret_cast<const int*>(stat + 2 * kBN);
    // First streamed row: key j0 (dQ) or query i0 (dK/dV, staged by the producer).
    const int c0 = kKeySide ? where[0] : step_row0(t);
    const bool full = kKeySide ? tile_fully_visible(c0, kBN, r0 + warp_row0, kMmaM, len, window, sinks)
                               : tile_fully_visible(r0 + warp_row0, kMmaM, c0, kBN, len, window, sinks);
#pragma unroll
    for (int i = 0; i < kBN / 8; ++i) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = 8 * i + 2 * (lane % 4) + (e % 2);
        const float l2 = kKeySide ? stat[col] : row_lse2[e / 2];
        const float dl = kKeySide ? stat[kBN + col] : row_delta[e / 2];
        float pv = exp2f(x[4 * i + e] * scale_log2 - l2);
        float ds = pv * (y[4 * i + e] - dl);
        if (!full) {  // one select per element; masked elements may hold anything (inf, NaN)
          const int qi = kKeySide ? c0 + col : res_row[e / 2];
          const int kj = kKeySide ? res_row[e / 2] : c0 + col;
          const bool vis = (qi < len) & (kj < len) & (kj <= qi) & ((kj < sinks) | (qi - kj < window));
          pv = vis ? pv : 0.f;
          ds = vis ? ds : 0.f;
        }
        x[4 * i + e] = pv;
        y[4 * i + e] = ds;
      }
    }
    if constexpr (kKeySide) pack_a_frags<T, kBN>(pf, x);
    pack_a_frags<T, kBN>(dsf, y);
    return make_int2(c0, kKeySide ? where[1] : 0);
  };
  auto issue_products = [&](int t) {
    const uint32_t b1 = sB0 + (t % kStages) * Tr::kStageBytes;
    if constexpr (kKeySide) issue_rs<T, D, kBN>(acc2, pf, b1 + Tr::kStreamBytes);  // dV += P^T dO
    issue_rs<T, D, kBN>(acc1, dsf, b1);  // dQ += dS K  or  dK += dS^T Q
  };
  auto fence_all = [&]() {
    fence_regs(acc1);
    if constexpr (kKeySide) fence_regs(acc2);
    fence_regs(pf);
    fence_regs(dsf);
    fence_regs(x);
    fence_regs(y);
    if constexpr (kDqAtomic) fence_regs(dqa);
  };
  auto release = [&](int t) {
    __syncwarp();
    if (lane == 0) mbar_arrive(bar_empty(t % kStages));  // this warp is done with the stage
  };
  // kDqAtomic: dQ / scale += dS K for the step's 64 queries. Both warpgroups write their 64 key
  // rows of dS^T (the same 16-bit values as the dK fragments) into tile t % 2, meet at a named
  // barrier, and each computes half of the head dim over all 128 keys (A = that tile, B = the
  // resident K), then adds it to dq_accum with vector atomics. Tile t % 2 is written again at step
  // t + 2, after both warpgroups passed the barrier of step t + 1, i.e. retired their step-t wgmmas.
  auto store_ds = [&](int t) {
    unsigned char* tile = smem_gen + (sDs - smem_base) + (t & 1) * Tr::kDsBytes;
#pragma unroll
    for (int i = 0; i < kBN / 8; ++i) {
      const int col = 8 * i + 2 * (lane % 4);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = warp_row0 + lane / 4 + 8 * r;  // key row of the tile
        *reinterpret_cast<uint32_t*>(tile + row * kLineBytes + (((col / 8) ^ (row % 8)) * 16) + (col % 8) * 2) =
            ElemTraits<T>::pack(y[4 * i + 2 * r], y[4 * i + 2 * r + 1]);
      }
    }
    fence_proxy_async_shared();  // the st.shared above before the wgmmas that read the tile
    named_barrier_sync(3, 2 * 128);
  };
  auto issue_dq = [&](int t) {
    if constexpr (kDqAtomic) {
      constexpr int kHalf = D / 2;
      const int c0 = cwg * kHalf;  // first head-dim column of this warpgroup
      const uint32_t b_start = sA1 + (c0 / kLineElems) * kBM * kLineBytes + (c0 % kLineElems) * 2;
      issue_ss_mn<T, kHalf, kBM, kBM>(dqa, sDs + (t & 1) * Tr::kDsBytes, b_start);
    }
  };
  auto add_dq = [&](int2 step) {  // step: p_and_ds's (first query row, query head)
    const int i0 = step.x;
    float* g = head_ptr<float>(p.dq_accum, b, seq.start, step.y);
#pragma unroll
    for (int i = 0; i < D / 16; ++i) {
      const int col = cwg * (D / 2) + 8 * i + 2 * (lane % 4);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int qi = i0 + wwarp * kMmaM + lane / 4 + 8 * r;
        if (qi < len) red_add_v2(g + (int64_t)qi * p.dq_accum.row_stride + col, dqa[4 * i + 2 * r], dqa[4 * i + 2 * r + 1]);
      }
    }
  };
  // Schedule of a consumer warpgroup.
  // D = 64 (kOverlap): S and dP of step 0 first; then per step t: P, dS of step t (registers
  //   only); wait for step t + 1's tiles; issue the RS products of step t and then S, dP of step
  //   t + 1 (they write X and Y, which step t's products no longer read: those read the packed
  //   fragments), so the tensor cores get both back to back; wait for the products -> give stage t
  //   back; wait for S, dP. The last step is peeled: a branch between the wgmma issues of the loop
  //   body made ptxas serialize every wgmma.
  // D = 128: X, Y, the fragments and the accumulators do not fit the registers together (ptxas
  //   serialized every wgmma "for insufficient register resources"), so each step issues S, dP,
  //   waits, computes P, dS, issues the products and waits; the two consumer warpgroups overlap
  //   each other instead.
  // A wait loop between two wgmma issues made ptxas fence them (forward), so the mbarrier waits
  // come before the issues.
  mbar_wait(bar_res, 0);
  if (n_steps == 0) {
    // An empty part of a split walk: zero partials below.
  } else if constexpr (kOverlap) {
    mbar_wait(bar_full(0), 0);
    fence_all();
    warpgroup_arrive();
    issue_sdp(0);
    warpgroup_commit();
    warpgroup_wait<0>();
    fence_all();
    for (int t = 0; t + 1 < n_steps; ++t) {
      const int2 step = p_and_ds(t);
      if constexpr (kDqAtomic) store_ds(t);
      mbar_wait(bar_full((t + 1) % kStages), ((t + 1) / kStages) & 1);
      fence_all();
      warpgroup_arrive();
      issue_products(t);
      if constexpr (kDqAtomic) issue_dq(t);
      warpgroup_commit();
      issue_sdp(t + 1);
      warpgroup_commit();
      warpgroup_wait<1>();  // step t's products done (groups retire in order)
      fence_all();
      release(t);
      if constexpr (kDqAtomic) add_dq(step);
      warpgroup_wait<0>();  // S and dP of step t + 1
      fence_all();
    }
    const int2 step = p_and_ds(n_steps - 1);
    if constexpr (kDqAtomic) store_ds(n_steps - 1);
    fence_all();
    warpgroup_arrive();
    issue_products(n_steps - 1);
    if constexpr (kDqAtomic) issue_dq(n_steps - 1);
    warpgroup_commit();
    warpgroup_wait<0>();
    fence_all();
    release(n_steps - 1);
    if constexpr (kDqAtomic) add_dq(step);
  } else {
    for (int t = 0; t < n_steps; ++t) {
      mbar_wait(bar_full(t % kStages), (t / kStages) & 1);
      fence_all();
      warpgroup_arrive();
      issue_sdp(t);
      warpgroup_commit();
      warpgroup_wait<0>();
      fence_all();
      const int2 step = p_and_ds(t);
      if constexpr (kDqAtomic) store_ds(t);
      fence_all();
      warpgroup_arrive();
      issue_products(t);
      if constexpr (kDqAtomic) issue_dq(t);
      warpgroup_commit();
      warpgroup_wait<0>();
      fence_all();
      release(t);
      if constexpr (kDqAtomic) add_dq(step);
    }
  }

  // A split sink walk: every part writes its float32 partial dK / dV; the last part to finish (an
  // atomic counter) sums all of them in part order, so the result does not depend on which one that
  // is, and writes dK / dV; the others are done.
  if constexpr (kKeySide) {
    if (is_split()) {
      const int part = block_and_part().y, parts = p.sink_parts;
      const int64_t block_slot = (int64_t{b} * s.hkv + h_res) * p.sink_blocks + blk;
      float* base = p.sink_partial + block_slot * parts * 2 * kBM * D;
      float* mine = base + int64_t{part} * 2 * kBM * D;
#pragma unroll
      for (int i = 0; i < D / 8; ++i) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int off = (warp_row0 + lane / 4 + 8 * r) * D + 8 * i + 2 * (lane % 4), a = 4 * i + 2 * r;
          *reinterpret_cast<float2*>(mine + off) = make_float2(acc1[a], acc1[a + 1]);
          *reinterpret_cast<float2*>(mine + kBM * D + off) = make_float2(acc2[a], acc2[a + 1]);
        }
      }
      threadfence_gpu();
      named_barrier_sync(3, 2 * 128);
      int* flag = reinterpret_cast<int*>(smem_gen + Tr::kSmemBytes - kAtomBytes - 16);
      if (cwg == 0 && ctid == 0) {
        int* counter = p.sink_counter + block_slot;
        const bool last_part = atomic_add_global(counter, 1) == parts - 1;
        if (last_part) *counter = 0;  // every part has counted: ready for the next launch
        *flag = last_part;
      }
      named_barrier_sync(3, 2 * 128);
      if (!*flag) return;
      // The last part: dK = scale * sum, dV = sum of the partials in part order, 8 columns a
      // thread, straight to global memory (nothing of this CTA's accumulators is needed any more).
      threadfence_gpu();
      T* gk = head_ptr<T>(p.dk, b, seq.start, h_res);
      T* gv = head_ptr<T>(p.dv, b, seq.start, h_res);
      for (int idx = cwg * 128 + ctid; idx < kBM * D / 8; idx += 2 * 128) {
        const int r = idx / (D / 8), c = (idx % (D / 8)) * 8;
        if (r0 + r >= len) continue;
        float sk[8] = {}, sv[8] = {};
        for (int q = 0; q < parts; ++q) {
          const float* src = base + int64_t{q} * 2 * kBM * D + r * D + c;
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const float4 k4 = load_global_cg(reinterpret_cast<const float4*>(src) + h);
            const float4 v4 = load_global_cg(reinterpret_cast<const float4*>(src + kBM * D) + h);
            sk[4 * h] += k4.x, sk[4 * h + 1] += k4.y, sk[4 * h + 2] += k4.z, sk[4 * h + 3] += k4.w;
            sv[4 * h] += v4.x, sv[4 * h + 1] += v4.y, sv[4 * h + 2] += v4.z, sv[4 * h + 3] += v4.w;
          }
        }
        uint4 ok, ov;
        ok.x = ElemTraits<T>::pack(sk[0] * s.scale, sk[1] * s.scale);
        ok.y = ElemTraits<T>::pack(sk[2] * s.scale, sk[3] * s.scale);
        ok.z = ElemTraits<T>::pack(sk[4] * s.scale, sk[5] * s.scale);
        ok.w = ElemTraits<T>::pack(sk[6] * s.scale, sk[7] * s.scale);
        ov.x = ElemTraits<T>::pack(sv[0], sv[1]);
        ov.y = ElemTraits<T>::pack(sv[2], sv[3]);
        ov.z = ElemTraits<T>::pack(sv[4], sv[5]);
        ov.w = ElemTraits<T>::pack(sv[6], sv[7]);
        *reinterpret_cast<uint4*>(gk + (int64_t)(r0 + r) * p.dk.row_stride + c) = ok;
        *reinterpret_cast<uint4*>(gv + (int64_t)(r0 + r) * p.dv.row_stride + c) = ov;
      }
      return;
    }
  }
  // Epilogue: stage the warpgroup's 64 rows through its own rows of the resident tiles (only its
  // own wgmmas read them, and they are complete), then 16-byte stores of the rows inside the
  // sequence. dQ = scale dS K, dK = scale dS^T Q, dV = P^T dO.
  // kDqAtomic: the other warpgroup's dQ products read every row of K (this warpgroup's too), so
  // both must have retired them before either overwrites its rows (the emulator caught this race).
  if constexpr (kDqAtomic) named_barrier_sync(3, 2 * 128);
  const float scale1[2] = {s.scale, s.scale}, unit[2] = {1.f, 1.f};
  stage_acc_rows<T, D, kBM>(smem_gen, 0, acc1, scale1, warp_row0, lane);
  if constexpr (kKeySide) stage_acc_rows<T, D, kBM>(smem_gen, Tr::kResBytes, acc2, unit, warp_row0, lane);
  named_barrier_sync(1 + cwg, 128);
  const TensorRef& out1 = kKeySide ? p.dk : p.dq;
  store_staged_rows<T, D, kBM>(head_ptr<T>(out1, b, seq.start, h_res), out1.row_stride, smem_gen, 0, cwg, ctid, r0,
                               len);
  if constexpr (kKeySide) {
    store_staged_rows<T, D, kBM>(head_ptr<T>(p.dv, b, seq.start, h_res), p.dv.row_stride, smem_gen, Tr::kResBytes,
                                 cwg, ctid, r0, len);
  }
#endif  // ALLMEM_SWA_SM90A_DEVICE
}

template <typename T, int D, bool kKeySide, bool kDqAtomic>
void run_bwd_sm90(const Sm90BwdParams& sp, cudaStream_t stream) {
  using Tr = Sm90BwdTraits<D, kKeySide, kDqAtomic>;
  const int blocks = (sp.p.shape.seqlen + Tr::kBlockM - 1) / Tr::kBlockM;
  // dK/dV: the further parts of the split sink walks after the key blocks.
  const int extra = sp.p.sink_parts > 1 ? sp.p.sink_blocks * (sp.p.sink_parts - 1) : 0;
  const dim3 grid = kKeySide ? dim3(sp.p.shape.hkv, blocks + extra, sp.p.shape.batch)
                             : dim3(blocks, sp.p.shape.hq, sp.p.shape.batch);
  launch_sm90(swa_bwd_sm90_kernel<T, D, kKeySide, kDqAtomic>, grid, Tr::kThreads, Tr::kSmemBytes, stream, sp);
}

// Launches the dQ kernel (kKeySide false), the dK/dV kernel, or the dK/dV kernel with the atomic
// dQ (kDqAtomic); false (nothing launched) when it cannot run here: no sm_90a code in the loaded
// cubin, or a tensor map does not encode.
template <bool kKeySide, bool kDqAtomic = false>
bool launch_bwd_sm90(const BwdParams& p, int64_t total_rows, DType dtype, int head_dim, cudaStream_t stream) {
  if (head_dim != 64 && head_dim != 128) return false;
  if (p.shape.seqlen == 0 || p.shape.batch == 0) return true;  // nothing to do
  if (!sm90a_built_for_current_device()) return false;
  const auto [rows, batch] = tma_extent(p.shape, total_rows);
  bool ok = false;
  dispatch_dtype_headdim(dtype, head_dim, [&]<typename T, int D>() {
    using Tr = Sm90BwdTraits<D, kKeySide, kDqAtomic>;
    Sm90BwdParams sp;
    sp.p = p;
    const TensorRef& a1 = kKeySide ? p.k : p.q;
    const TensorRef& a2 = kKeySide ? p.v : p.dout;
    const TensorRef& b1 = kKeySide ? p.q : p.k;
    const TensorRef& b2 = kKeySide ? p.dout : p.v;
    const int h_a = kKeySide ? p.shape.hkv : p.shape.hq, h_b = kKeySide ? p.shape.hq : p.shape.hkv;
    ok = encode_map(&sp.tm_a1, a1, dtype, D, rows, h_a, batch, Tr::kBlockM) &&
         encode_map(&sp.tm_a2, a2, dtype, D, rows, h_a, batch, Tr::kBlockM) &&
         encode_map(&sp.tm_b1, b1, dtype, D, rows, h_b, batch, Tr::kBlockN) &&
         encode_map(&sp.tm_b2, b2, dtype, D, rows, h_b, batch, Tr::kBlockN);
    if (ok) run_bwd_sm90<T, D, kKeySide, kDqAtomic>(sp, stream);
  });
  return ok;
}

// BwdParams::sink_parts for the Hopper dK/dV kernels: steps of a sink block's walk at the longest
// length over an SM's fair share of all key blocks' steps (every walk about group * ((128 + W) / 64
// + 2) steps: the window's query blocks).
inline SinkPlan sink_plan(const AttnShape& s, int head_dim, int num_sms) {
  using Tr = Sm90BwdTraits<64, true>;  // tile shapes do not depend on D
  constexpr int kBM = Tr::kBlockM, kBN = Tr::kBlockN;
  SinkPlan plan;
  const int64_t n_blocks = (int64_t{s.seqlen} + kBM - 1) / kBM;
  plan.blocks = static_cast<int>(std::min<int64_t>((int64_t{s.sinks} + kBM - 1) / kBM, n_blocks));
  if (plan.blocks == 0 || s.seqlen == 0 || num_sms <= 0) return plan;
  const int64_t group = s.hq / std::max(s.hkv, 1);
  const int64_t win_steps = group * ((int64_t{kBM} + s.window) / kBN + 2);
  const int64_t sink_steps = group * ((int64_t{s.seqlen} + kBN - 1) / kBN);
  const int64_t fair = std::max<int64_t>(1, int64_t{s.batch} * s.hkv * n_blocks * win_steps / num_sms);
  constexpr int64_t kMaxParts = 64;
  plan.parts = static_cast<int>(std::clamp<int64_t>((sink_steps + fair - 1) / fair, 1, kMaxParts));
  if (plan.parts > 1) {
    plan.workspace_floats = int64_t{s.batch} * s.hkv * plan.blocks * plan.parts * 2 * kBM * head_dim;
  }
  return plan;
}

}  // namespace
}  // namespace allmem::swa::cuda
