// SWA forward (out + float32 LSE), FlashAttention-2 style on mma.sync: a CTA owns a block of
// query rows of one head, keeps the running max / sum / output in registers, and visits only the
// key blocks of its window + sink band (swa_kernel_utils.cuh, key_blocks_for_query_block).
#include "swa/swa_traits.cuh"

namespace allmem::swa::cuda {
namespace {

template <typename T, int D>
__global__ void __launch_bounds__(FwdTraits<D>::kThreads) swa_fwd_kernel(const FwdParams p) {
  using Tr = FwdTraits<D>;
  constexpr int kBM = Tr::kBlockM, kBN = Tr::kBlockN;
  constexpr int kNT = kBN / kMmaN, kDT = D / kMmaN;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + kBM * D;
  T* sV = sK + kBN * D;

  const AttnShape& s = p.shape;
  const int m_block = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const SeqSpan seq = seq_span(s, b);
  const int i0 = m_block * kBM;
  if (i0 >= seq.len) return;  // varlen: grid is sized for the longest sequence
  const int hk = h / (s.hq / s.hkv);
  const int tid = threadIdx.x, warp = tid / kWarpSize, lane = tid % kWarpSize;
  const int warp_row0 = warp * kMmaM;
  const int row_of[2] = {i0 + warp_row0 + lane / 4, i0 + warp_row0 + lane / 4 + 8};

  const T* gQ = head_ptr<const T>(p.q, b, seq.start, h);
  const T* gK = head_ptr<const T>(p.k, b, seq.start, hk);
  const T* gV = head_ptr<const T>(p.v, b, seq.start, hk);
  const KeyBlockRange kr = key_blocks_for_query_block(i0, kBM, kBN, seq.len, s.window, s.sinks);
  const int n_steps = kr.count();

  load_tile_async<T, D, kBM, Tr::kThreads>(sQ, gQ, p.q.row_stride, i0, seq.len, tid);
  load_tile_async<T, D, kBN, Tr::kThreads>(sK, gK, p.k.row_stride, kr.block(0) * kBN, seq.len, tid);
  cp_async_commit();

  const FragAddr<D> fQ = frag_a<D>(sQ, warp_row0, lane);
  const FragAddr<D> fK = frag_b_nk<D>(sK, lane);
  const FragAddr<D> fV = frag_b_kn_trans<D>(sV, lane);
  float o[kDT][4];
  zero_acc(o);
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};  // this thread's share; summed over the quad at the end

  for (int t = 0; t < n_steps; ++t) {
    const int j0 = kr.block(t) * kBN;
    cp_async_wait_all();
    __syncthreads();  // K[t] landed; every warp is done with V[t-1]
    load_tile_async<T, D, kBN, Tr::kThreads>(sV, gV, p.v.row_stride, j0, seq.len, tid);
    cp_async_commit();

    float sc[kNT][4];
    zero_acc(sc);
    gemm_a_bnk<T, D, kBN>(sc, fQ, fK);

    const bool full = tile_fully_visible(i0 + warp_row0, kMmaM, j0, kBN, seq.len, s.window, s.sinks);
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = sc[nt][e] * s.scale_log2;
        if (!full) {
          const int j = j0 + nt * kMmaN + 2 * (lane % 4) + (e % 2);
          if (!(j < seq.len && visible(row_of[e / 2], j, s.window, s.sinks))) x = -INFINITY;
        }
        sc[nt][e] = x;
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = row_max[r];
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) mx = fmaxf(mx, fmaxf(sc[nt][2 * r], sc[nt][2 * r + 1]));
      mx = quad_max(mx);
      // A row with nothing visible yet keeps max -inf; subtracting 0 instead keeps exp2 at 0.
      const float m_use = mx == -INFINITY ? 0.f : mx;
      const float corr = exp2f(row_max[r] - m_use);
      row_max[r] = mx;
      row_sum[r] *= corr;
#pragma unroll
      for (int dt = 0; dt < kDT; ++dt) {
        o[dt][2 * r] *= corr;
        o[dt][2 * r + 1] *= corr;
      }
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
        for (int e = 2 * r; e < 2 * r + 2; ++e) {
          sc[nt][e] = exp2f(sc[nt][e] - m_use);
          row_sum[r] += sc[nt][e];
        }
      }
    }

    cp_async_wait_all();
    __syncthreads();  // V[t] landed; every warp is done with K[t]
    if (t + 1 < n_steps) {
      load_tile_async<T, D, kBN, Tr::kThreads>(sK, gK, p.k.row_stride, kr.block(t + 1) * kBN, seq.len, tid);
      cp_async_commit();
    }
    gemm_p_bkn<T, D, kBN>(o, sc, fV);
  }

  // Epilogue: normalize, stage this warp's rows through its own slice of sQ (only this warp read
  // those rows), write 16-byte chunks.
  float inv[2];
  finish_rows(inv, row_sum, row_max, row_of, stat_ptr(p.lse, b, seq.start, h), seq.len, lane);
#pragma unroll
  for (int dt = 0; dt < kDT; ++dt) {
    o[dt][0] *= inv[0];
    o[dt][1] *= inv[0];
    o[dt][2] *= inv[1];
    o[dt][3] *= inv[1];
  }
  T* sO = sQ + warp_row0 * D;
  __syncthreads();  // orders every ldmatrix of the main loop before the staging stores
  acc_to_smem<T, D>(sO, o, 0, 1.f, lane);
  __syncwarp();
  store_tile<T, D, kMmaM>(head_ptr<T>(p.out, b, seq.start, h), p.out.row_stride, sO, i0 + warp_row0, seq.len, lane,
                          kWarpSize);
}

template <typename T, int D>
void run_fwd(const FwdParams& p, cudaStream_t stream) {
  using Tr = FwdTraits<D>;
  auto kernel = swa_fwd_kernel<T, D>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)Tr::kSmemBytes));
  const dim3 grid((p.shape.seqlen + Tr::kBlockM - 1) / Tr::kBlockM, p.shape.hq, p.shape.batch);
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void launch_swa_fwd(const FwdParams& p, DType dtype, int head_dim, cudaStream_t stream) {
  if (p.shape.seqlen == 0 || p.shape.batch == 0) return;
  dispatch_dtype_headdim(dtype, head_dim, [&]<typename T, int D>() { run_fwd<T, D>(p, stream); });
}

}  // namespace allmem::swa::cuda
