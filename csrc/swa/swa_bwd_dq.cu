// SWA backward, query side: delta = rowsum(dO * O) (preprocess), then dQ = scale * dS K with one
// CTA per query block walking the forward's key blocks. Each dQ element is written by exactly one
// CTA, so the result is deterministic (no atomics).
#include "swa/swa_traits.cuh"

namespace allmem::swa::cuda {
namespace {

template <typename T, int D>
__global__ void __launch_bounds__(BwdPreprocessTraits::kThreads) swa_bwd_preprocess_kernel(const BwdParams p) {
  const AttnShape& s = p.shape;
  const int b = blockIdx.y;
  const SeqSpan seq = seq_span(s, b);
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row = (int64_t)blockIdx.x * BwdPreprocessTraits::kWarps + threadIdx.x / kWarpSize;
  const int t = static_cast<int>(row / s.hq), h = static_cast<int>(row % s.hq);
  if (t >= seq.len) return;
  const T* dO = head_ptr<const T>(p.dout, b, seq.start, h) + (int64_t)t * p.dout.row_stride;
  const T* O = head_ptr<const T>(p.out, b, seq.start, h) + (int64_t)t * p.out.row_stride;
  float acc = 0.f;
#pragma unroll
  for (int d = lane; d < D; d += kWarpSize) acc += ElemTraits<T>::to_float(dO[d]) * ElemTraits<T>::to_float(O[d]);
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) stat_ptr(p.delta, b, seq.start, h)[t] = acc;
}

template <typename T, int D>
__global__ void __launch_bounds__(BwdDqTraits<D>::kThreads) swa_bwd_dq_kernel(const BwdParams p) {
  using Tr = BwdDqTraits<D>;
  constexpr int kBM = Tr::kBlockM, kBN = Tr::kBlockN;
  constexpr int kNT = kBN / kMmaN, kDT = D / kMmaN;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + kBM * D;
  T* sStage = sdO + kBM * D;  // [kStages][K tile, V tile]

  const AttnShape& s = p.shape;
  const int m_block = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const SeqSpan seq = seq_span(s, b);
  const int i0 = m_block * kBM;
  if (i0 >= seq.len) return;
  const int hk = h / (s.hq / s.hkv);
  const int tid = threadIdx.x, warp = tid / kWarpSize, lane = tid % kWarpSize;
  const int warp_row0 = warp * kMmaM;
  const int row_of[2] = {i0 + warp_row0 + lane / 4, i0 + warp_row0 + lane / 4 + 8};

  const T* gK = head_ptr<const T>(p.k, b, seq.start, hk);
  const T* gV = head_ptr<const T>(p.v, b, seq.start, hk);
  const KeyBlockRange kr = key_blocks_for_query_block(i0, kBM, kBN, seq.len, s.window, s.sinks);
  const int n_steps = kr.count();
  auto load_kv = [&](int step) {
    T* stage = sStage + (step % Tr::kStages) * Tr::kStageElems;
    const int j0 = kr.block(step) * kBN;
    load_tile_async<T, D, kBN, Tr::kThreads>(stage, gK, p.k.row_stride, j0, seq.len, tid);
    load_tile_async<T, D, kBN, Tr::kThreads>(stage + kBN * D, gV, p.v.row_stride, j0, seq.len, tid);
  };

  load_tile_async<T, D, kBM, Tr::kThreads>(sQ, head_ptr<const T>(p.q, b, seq.start, h), p.q.row_stride, i0, seq.len,
                                           tid);
  load_tile_async<T, D, kBM, Tr::kThreads>(sdO, head_ptr<const T>(p.dout, b, seq.start, h), p.dout.row_stride, i0,
                                           seq.len, tid);
  load_kv(0);
  cp_async_commit();

  // Per-row statistics of this thread's two rows (rows past the end are masked below).
  const float* gLse = stat_ptr(p.lse, b, seq.start, h);
  const float* gDelta = stat_ptr(p.delta, b, seq.start, h);
  float lse2[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const bool valid = row_of[r] < seq.len;
    lse2[r] = valid ? gLse[row_of[r]] * kLog2e : 0.f;
    delta[r] = valid ? gDelta[row_of[r]] : 0.f;
  }

  const FragAddr<D> fQ = frag_a<D>(sQ, warp_row0, lane);
  const FragAddr<D> fdO = frag_a<D>(sdO, warp_row0, lane);
  const FragAddr<D> fK0 = frag_b_nk<D>(sStage, lane);  // stage 0; V is kBN rows further
  const FragAddr<D> fKt0 = frag_b_kn_trans<D>(sStage, lane);
  constexpr uint32_t kStageBytes = Tr::kStageElems * sizeof(T);
  float dq[kDT][4];
  zero_acc(dq);
  for (int t = 0; t < n_steps; ++t) {
    const int j0 = kr.block(t) * kBN;
    cp_async_wait_all();
    __syncthreads();  // stage t landed; every warp is done with stage t - 1 (the one refilled now)
    if (t + 1 < n_steps) {
      load_kv(t + 1);
      cp_async_commit();
    }
    const uint32_t stage_off = (t % Tr::kStages) * kStageBytes;
    const FragAddr<D> fK = fK0.shifted(stage_off);

    float pr[kNT][4];
    zero_acc(pr);
    gemm_a_bnk<T, D, kBN>(pr, fQ, fK);
    const bool full = tile_fully_visible(i0 + warp_row0, kMmaM, j0, kBN, seq.len, s.window, s.sinks);
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = exp2f(pr[nt][e] * s.scale_log2 - lse2[e / 2]);
        if (!full) {
          const int i = row_of[e / 2], j = j0 + nt * kMmaN + 2 * (lane % 4) + (e % 2);
          if (!(i < seq.len && j < seq.len && visible(i, j, s.window, s.sinks))) x = 0.f;
        }
        pr[nt][e] = x;
      }
    }
    float ds[kNT][4];
    zero_acc(ds);
    gemm_a_bnk<T, D, kBN>(ds, fdO, fK.shifted(kBN * D * sizeof(T)));  // dP = dO V^T
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) ds[nt][e] = pr[nt][e] * (ds[nt][e] - delta[e / 2]);
    }
    gemm_p_bkn<T, D, kBN>(dq, ds, fKt0.shifted(stage_off));
  }

  // Only this warp read its rows of sQ, so it can stage its dQ rows there.
  T* sOut = sQ + warp_row0 * D;
  __syncthreads();  // orders every ldmatrix of the main loop before the staging stores
  acc_to_smem<T, D>(sOut, dq, 0, s.scale, lane);
  __syncwarp();
  store_tile<T, D, kMmaM>(head_ptr<T>(p.dq, b, seq.start, h), p.dq.row_stride, sOut, i0 + warp_row0, seq.len, lane,
                          kWarpSize);
}

template <typename T, int D>
void run_preprocess(const BwdParams& p, cudaStream_t stream) {
  using Tr = BwdPreprocessTraits;
  const int64_t rows = (int64_t)p.shape.seqlen * p.shape.hq;
  const dim3 grid(static_cast<unsigned>((rows + Tr::kWarps - 1) / Tr::kWarps), p.shape.batch);
  swa_bwd_preprocess_kernel<T, D><<<grid, Tr::kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int D>
void run_dq(const BwdParams& p, cudaStream_t stream) {
  using Tr = BwdDqTraits<D>;
  auto kernel = swa_bwd_dq_kernel<T, D>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)Tr::kSmemBytes));
  const dim3 grid((p.shape.seqlen + Tr::kBlockM - 1) / Tr::kBlockM, p.shape.hq, p.shape.batch);
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void launch_swa_bwd_preprocess(const BwdParams& p, DType dtype, int head_dim, cudaStream_t stream) {
  if (p.shape.seqlen == 0 || p.shape.batch == 0) return;
  dispatch_dtype_headdim(dtype, head_dim, [&]<typename T, int D>() { run_preprocess<T, D>(p, stream); });
}

void launch_swa_bwd_dq(const BwdParams& p, DType dtype, int head_dim, cudaStream_t stream) {
  if (p.shape.seqlen == 0 || p.shape.batch == 0) return;
  dispatch_dtype_headdim(dtype, head_dim, [&]<typename T, int D>() { run_dq<T, D>(p, stream); });
}

}  // namespace allmem::swa::cuda
