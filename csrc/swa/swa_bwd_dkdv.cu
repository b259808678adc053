// SWA backward, key side: dV = P^T dO and dK = scale * dS^T Q. One CTA per key block of one KV
// head; its warps own key rows, so S^T = K Q^T, P^T and dS^T stay in registers and feed the two
// accumulating matmuls directly. The CTA walks every query head of its GQA group and every query
// block that sees its keys, so each dK/dV element has exactly one writer: deterministic, no atomics.
#include "swa/swa_traits.cuh"

namespace allmem::swa::cuda {

static_assert(BwdDkDvTraits<64>::kBlockN == kBwdKeyBlockRows && BwdDkDvTraits<128>::kBlockN == kBwdKeyBlockRows,
              "the host sizes the dK/dV grid with kBwdKeyBlockRows (swa_cuda.h)");
namespace {

template <typename T, int D>
__global__ void __launch_bounds__(BwdDkDvTraits<D>::kThreads) swa_bwd_dkdv_kernel(const BwdParams p) {
  using Tr = BwdDkDvTraits<D>;
  constexpr int kBM = Tr::kBlockM, kBN = Tr::kBlockN;
  constexpr int kMT = kBM / kMmaN, kDT = D / kMmaN;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + kBN * D;
  T* sStage = sV + kBN * D;  // [kStages][Q tile, dO tile]
  float* sStats = reinterpret_cast<float*>(sStage + Tr::kStages * Tr::kStageElems);  // [kStages][lse, delta]

  const AttnShape& s = p.shape;
  // Key blocks vary slowest-but-one so the long-running sink blocks (seen by every later query)
  // of all heads are scheduled first.
  const int hk = blockIdx.x, n_block = blockIdx.y, b = blockIdx.z;
  const SeqSpan seq = seq_span(s, b);
  const int j0 = n_block * kBN;
  if (j0 >= seq.len) return;
  const int group = s.hq / s.hkv;
  const int tid = threadIdx.x, warp = tid / kWarpSize, lane = tid % kWarpSize;
  const int warp_row0 = warp * kMmaM;
  const int key_of[2] = {j0 + warp_row0 + lane / 4, j0 + warp_row0 + lane / 4 + 8};

  const int2 qb = query_blocks_for_key_block(j0, kBM, kBN, seq.len, s.window, s.sinks);
  const int n_qblocks = qb.y - qb.x + 1;
  const int n_steps = group * n_qblocks;
  auto load_step = [&](int step) {
    const int h = hk * group + step / n_qblocks;
    const int i0 = (qb.x + step % n_qblocks) * kBM;
    T* stage = sStage + (step % Tr::kStages) * Tr::kStageElems;
    float* stats = sStats + (step % Tr::kStages) * 2 * kBM;
    load_tile_async<T, D, kBM, Tr::kThreads>(stage, head_ptr<const T>(p.q, b, seq.start, h), p.q.row_stride, i0,
                                             seq.len, tid);
    load_tile_async<T, D, kBM, Tr::kThreads>(stage + kBM * D, head_ptr<const T>(p.dout, b, seq.start, h),
                                             p.dout.row_stride, i0, seq.len, tid);
    load_rowstat_async<kBM>(stats, stat_ptr(p.lse, b, seq.start, h), i0, seq.len, tid);
    load_rowstat_async<kBM>(stats + kBM, stat_ptr(p.delta, b, seq.start, h), i0, seq.len, tid);
  };

  load_tile_async<T, D, kBN, Tr::kThreads>(sK, head_ptr<const T>(p.k, b, seq.start, hk), p.k.row_stride, j0, seq.len,
                                           tid);
  load_tile_async<T, D, kBN, Tr::kThreads>(sV, head_ptr<const T>(p.v, b, seq.start, hk), p.v.row_stride, j0, seq.len,
                                           tid);
  load_step(0);
  cp_async_commit();

  const FragAddr<D> fK = frag_a<D>(sK, warp_row0, lane);
  const FragAddr<D> fV = frag_a<D>(sV, warp_row0, lane);
  const FragAddr<D> fQ0 = frag_b_nk<D>(sStage, lane);  // stage 0; dO is kBM rows further
  const FragAddr<D> fQt0 = frag_b_kn_trans<D>(sStage, lane);
  constexpr uint32_t kStageBytes = Tr::kStageElems * sizeof(T);
  constexpr uint32_t kDoBytes = kBM * D * sizeof(T);
  float dk[kDT][4], dv[kDT][4];
  zero_acc(dk);
  zero_acc(dv);
  for (int t = 0; t < n_steps; ++t) {
    const int i0 = (qb.x + t % n_qblocks) * kBM;
    cp_async_wait_all();
    __syncthreads();  // step t landed; every warp is done with step t - 1 (the stage refilled now)
    if (t + 1 < n_steps) {
      load_step(t + 1);
      cp_async_commit();
    }
    const uint32_t stage_off = (t % Tr::kStages) * kStageBytes;
    const float* sLse = sStats + (t % Tr::kStages) * 2 * kBM;
    const float* sDelta = sLse + kBM;

    float pt[kMT][4];  // P^T: rows = this warp's keys, cols = the block's queries
    zero_acc(pt);
    gemm_a_bnk<T, D, kBM>(pt, fK, fQ0.shifted(stage_off));
    const bool full = tile_fully_visible(i0, kBM, j0 + warp_row0, kMmaM, seq.len, s.window, s.sinks);
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int qi = mt * kMmaN + 2 * (lane % 4) + (e % 2);
        float x = exp2f(pt[mt][e] * s.scale_log2 - sLse[qi] * kLog2e);
        if (!full) {
          const int i = i0 + qi, j = key_of[e / 2];
          if (!(i < seq.len && j < seq.len && visible(i, j, s.window, s.sinks))) x = 0.f;
        }
        pt[mt][e] = x;
      }
    }
    float dst[kMT][4];  // dP^T, then dS^T
    zero_acc(dst);
    gemm_a_bnk<T, D, kBM>(dst, fV, fQ0.shifted(stage_off + kDoBytes));
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int qi = mt * kMmaN + 2 * (lane % 4) + (e % 2);
        dst[mt][e] = pt[mt][e] * (dst[mt][e] - sDelta[qi]);
      }
    }
    gemm_p_bkn<T, D, kBM>(dv, pt, fQt0.shifted(stage_off + kDoBytes));
    gemm_p_bkn<T, D, kBM>(dk, dst, fQt0.shifted(stage_off));
  }

  // Only this warp read its rows of sK / sV, so it stages its dK / dV rows there.
  T* sdK = sK + warp_row0 * D;
  T* sdV = sV + warp_row0 * D;
  __syncthreads();  // orders every ldmatrix of the main loop before the staging stores
  acc_to_smem<T, D>(sdK, dk, 0, s.scale, lane);
  acc_to_smem<T, D>(sdV, dv, 0, 1.f, lane);
  __syncwarp();
  store_tile<T, D, kMmaM>(head_ptr<T>(p.dk, b, seq.start, hk), p.dk.row_stride, sdK, j0 + warp_row0, seq.len, lane,
                          kWarpSize);
  store_tile<T, D, kMmaM>(head_ptr<T>(p.dv, b, seq.start, hk), p.dv.row_stride, sdV, j0 + warp_row0, seq.len, lane,
                          kWarpSize);
}

template <typename T, int D>
void run_dkdv(const BwdParams& p, cudaStream_t stream) {
  using Tr = BwdDkDvTraits<D>;
  auto kernel = swa_bwd_dkdv_kernel<T, D>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)Tr::kSmemBytes));
  const dim3 grid(p.shape.hkv, (p.shape.seqlen + Tr::kBlockN - 1) / Tr::kBlockN, p.shape.batch);
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void launch_swa_bwd_dkdv(const BwdParams& p, DType dtype, int head_dim, cudaStream_t stream) {
  if (p.shape.seqlen == 0 || p.shape.batch == 0) return;
  dispatch_dtype_headdim(dtype, head_dim, [&]<typename T, int D>() { run_dkdv<T, D>(p, stream); });
}

}  // namespace allmem::swa::cuda
