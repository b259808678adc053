// Hopper SWA forward: the host side (the kernel and its design: swa_fwd_sm90.cuh).
#include "swa/swa_fwd_sm90.cuh"

namespace allmem::swa::cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// Host side: launch (tensor maps: swa_sm90_utils.cuh).
template <typename T, int D, bool kPingPong>
void run_fwd_sm90(const Sm90FwdParams& sp, cudaStream_t stream) {
  using Tr = Sm90FwdTraits<D>;
  const dim3 grid((sp.p.shape.seqlen + Tr::kBlockM - 1) / Tr::kBlockM, sp.p.shape.hq, sp.p.shape.batch);
  launch_sm90(swa_fwd_sm90_kernel<T, D, kPingPong>, grid, Tr::kThreads, Tr::kSmemBytes, stream, sp);
}

}  // namespace

bool launch_swa_fwd_sm90(const FwdParams& p, int64_t total_rows, DType dtype, int head_dim, cudaStream_t stream,
                         bool pingpong) {
  if (head_dim != 64 && head_dim != 128) return false;
  if (p.shape.seqlen == 0 || p.shape.batch == 0) return true;  // nothing to do
  if (!sm90a_built_for_current_device()) return false;
  const auto [rows, batch] = tma_extent(p.shape, total_rows);
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
  dispatch_dtype_headdim(dtype, head_dim, [&]<typename T, int D>() {
    if (pingpong) {
      run_fwd_sm90<T, D, true>(sp, stream);
    } else {
      run_fwd_sm90<T, D, false>(sp, stream);
    }
  });
  return true;
}

}  // namespace allmem::swa::cuda
