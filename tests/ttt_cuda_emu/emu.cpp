// Runs ttt_fwd_kernel on the CPU under shim.h. `fwd_emu.inc` is csrc/ttt/ttt_fwd.cu with its CUDA
// includes, dynamic shared memory declaration and launch code rewritten by
// tests/test_ttt_cuda_emu.py (see there).
#include <memory>
#include <thread>
#include <vector>

#include "fwd_emu.inc"

using namespace allmem::ttt::cuda;

template <int D, int Hd>
void run(const FwdParams& p) {
  using Tr = FwdTraits<D, Hd>;
  std::vector<float4> smem(Tr::kSmemFloats / 4 + 1);
  for (int64_t b = 0; b < p.n_seqs * p.heads; ++b) {
    for (auto& f : smem) f = float4{NAN, NAN, NAN, NAN};  // shared memory starts as garbage
    g_smem = smem.data();
    std::barrier<> bar(Tr::kThreads);
    g_bar = &bar;
    std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
    for (int w = 0; w < 8; ++w) {
      warp_bars.emplace_back(new std::barrier<>(32));
      g_warp_bar[w] = warp_bars.back().get();
    }
    std::vector<std::thread> threads;
    for (int t = 0; t < Tr::kThreads; ++t) {
      threads.emplace_back([&, t] {
        threadIdx.x = t;
        blockIdx.x = static_cast<unsigned>(b);
        ttt_fwd_kernel<D, Hd>(p);
      });
    }
    for (auto& th : threads) th.join();
  }
}

extern "C" void emu_fwd(const void* q, const void* k, const void* v, const void* eta, const void* mu, void* o, int dt,
                        const float* wg, const float* wu, const float* wd, const float* fast_in, const float* pend_in,
                        float* fast_out, float* pend_out, float* ckpt, const int64_t* seq, int64_t N, int64_t H,
                        int64_t C, int lact, int residual, int d, int h) {
  FwdParams p{q,      k,       v,        eta,      mu,   o, InDType(dt), wg, wu, wd, fast_in, pend_in,
              fast_out, pend_out, ckpt, seq, N, H, C, bool(lact), bool(residual)};
  if (d == 64 && h == 64) run<64, 64>(p);
  else if (d == 64 && h == 128) run<64, 128>(p);
  else if (d == 128 && h == 64) run<128, 64>(p);
  else run<128, 128>(p);
}
