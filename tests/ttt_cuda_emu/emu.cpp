// Runs ttt_fwd_kernel, ttt_bwd_kernel, ttt_decode_kernel and the composite backward's kernels on
// the CPU under shim.h. `fwd_emu.inc`, `bwd_emu.inc`, `decode_emu.inc`, `composite_emu.inc` are
// csrc/ttt/ttt_fwd.cu, ttt_bwd.cu, ttt_decode_kernel.cu, ttt_composite_kernels.cu with their CUDA
// include, dynamic shared memory declaration and launch code rewritten by tests/test_ttt_cuda_emu.py.
#include <memory>
#include <thread>
#include <vector>

#include "fwd_emu.inc"
#include "bwd_emu.inc"
#include "decode_emu.inc"
#include "composite_emu.inc"

using namespace allmem::ttt::cuda;

// `blocks` blocks of `threads` std::threads, one block after the other, each calling body() with
// threadIdx/blockIdx set and `smem_floats` floats of NaN-filled shared memory.
template <typename Body>
void run_grid(int64_t blocks, int threads, int64_t smem_floats, Body body) {
  std::vector<float4> smem(smem_floats / 4 + 1);
  for (int64_t b = 0; b < blocks; ++b) {
    for (auto& f : smem) f = float4{NAN, NAN, NAN, NAN};  // shared memory starts as garbage
    g_smem = smem.data();
    std::barrier<> bar(threads);
    g_bar = &bar;
    std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
    for (int w = 0; w < 8; ++w) {
      warp_bars.emplace_back(new std::barrier<>(32));
      g_warp_bar[w] = warp_bars.back().get();
    }
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        threadIdx.x = t;
        blockIdx.x = static_cast<unsigned>(b);
        body();
      });
    }
    for (auto& th : pool) th.join();
  }
}

template <typename Tr, typename Params>
void run(void (*kernel)(Params), const Params& p) {
  run_grid(p.n_seqs * p.heads, Tr::kThreads, Tr::kSmemFloats, [&] { kernel(p); });
}

template <int D_, int Hd_>
struct Sizes {
  static constexpr int D = D_, Hd = Hd_;
};

template <template <int, int> class Traits, typename Params, typename KernelOf>
void dispatch(const Params& p, int d, int h, KernelOf kernel_of) {
  if (d == 64 && h == 64) run<Traits<64, 64>>(kernel_of(Sizes<64, 64>{}), p);
  else if (d == 64 && h == 128) run<Traits<64, 128>>(kernel_of(Sizes<64, 128>{}), p);
  else if (d == 128 && h == 64) run<Traits<128, 64>>(kernel_of(Sizes<128, 64>{}), p);
  else run<Traits<128, 128>>(kernel_of(Sizes<128, 128>{}), p);
}

extern "C" void emu_fwd(const void* q, const void* k, const void* v, const void* eta, const void* mu, void* o, int dt,
                        const float* wg, const float* wu, const float* wd, const float* fast_in, const float* pend_in,
                        float* fast_out, float* pend_out, float* ckpt, const int64_t* seq, int64_t N, int64_t H,
                        int64_t C, int lact, int residual, int d, int h) {
  FwdParams p{q,      k,       v,        eta,      mu,   o, InDType(dt), wg, wu, wd, fast_in, pend_in,
              fast_out, pend_out, ckpt, seq, N, H, C, bool(lact), bool(residual)};
  dispatch<FwdTraits>(p, d, h, [](auto tr) { return &ttt_fwd_kernel<decltype(tr)::D, decltype(tr)::Hd>; });
}

// BwdParams is passed by pointer (ctypes builds it field by field).
extern "C" void emu_bwd(const BwdParams* p, int d, int h) {
  dispatch<BwdTraits>(*p, d, h, [](auto tr) { return &ttt_bwd_kernel<decltype(tr)::D, decltype(tr)::Hd>; });
}

// One block per (sequence, head), kDecodeThreads threads, d + h floats of shared memory.
extern "C" void emu_decode(const DecodeParams* p) {
  run_grid(p->n_seqs * p->heads, kDecodeThreads, p->d + p->h, [&] { ttt_decode_kernel(*p); });
}
// The length advance: one thread per sequence.
extern "C" void emu_decode_advance(const DecodeParams* p) {
  run_grid((p->n_seqs + kDecodeThreads - 1) / kDecodeThreads, kDecodeThreads, 0, [&] { ttt_decode_advance_kernel(*p); });
}

// The composite backward's kernels (ttt_composite_kernels.cu) with their launch geometry: a warp
// per row (8 rows per block) or a thread per element.
extern "C" void emu_update_terms(const UpdateTermsParams* p) {
  run_grid((p->rows + kTermsWarps - 1) / kTermsWarps, kTermsThreads, 0, [&] { update_terms_kernel(*p); });
}
extern "C" void emu_read_terms(const ReadTermsParams* p) {
  run_grid((p->rows * p->h + kTermsThreads - 1) / kTermsThreads, kTermsThreads, 0, [&] { read_terms_kernel(*p); });
}
extern "C" void emu_row_norm(const RowNormParams* p) {
  const int64_t rows = p->batch * (2 * p->h + p->d);
  run_grid((rows + kTermsWarps - 1) / kTermsWarps, kTermsThreads, 0, [&] { row_norm_kernel(*p); });
}
extern "C" void emu_grad_terms(const GradTermsParams* p) {
  run_grid((p->rows * p->h + kTermsThreads - 1) / kTermsThreads, kTermsThreads, 0, [&] { grad_terms_kernel(*p); });
}
extern "C" void emu_prep(const PrepParams* p) {
  const int64_t rows = p->batch * (2 * p->h + p->d);
  run_grid((rows + kTermsWarps - 1) / kTermsWarps, kTermsThreads, 0, [&] { prep_kernel(*p); });
}
extern "C" void emu_momentum(const MomentumParams* p) {
  run_grid(p->batch, kTermsThreads, kTermsWarps + 1, [&] { momentum_kernel(*p); });
}
