// Runs the kernels of csrc/ttt/ttt_fwd_tc.cuh and ttt_bwd_tc.cuh on the CPU
// (tests/test_ttt_tc_emu.py): one cluster of kP CTAs x 128 std::threads per (sequence, head),
// shared memory starting as NaN bytes.
#include <memory>
#include <thread>
#include <vector>

#include "ttt/ttt_bwd_tc.cuh"
#include "ttt/ttt_fwd_tc.cuh"

using namespace allmem::ttt::cuda;

template <typename Tr, typename Params, typename Kernel>
void run_clusters(const Params& p, Kernel kernel) {
  constexpr int kP = Tr::kP;
  std::vector<std::vector<unsigned char>> smem(kP, std::vector<unsigned char>(Tr::kSmemBytes));
  for (int64_t job = 0; job < p.n_seqs * p.heads; ++job) {
    auto cl = std::make_unique<emu::Cluster>();
    std::barrier<> cluster_bar(kP * Tr::kThreads);
    std::vector<std::unique_ptr<std::barrier<>>> bars;
    cl->cluster_bar = &cluster_bar;
    for (int r = 0; r < kP; ++r) {
      std::memset(smem[r].data(), 0xff, smem[r].size());  // garbage: NaN floats, NaN 16-bit values
      cl->smem[r] = smem[r].data();
      bars.emplace_back(new std::barrier<>(Tr::kThreads));
      cl->cta_bar[r] = bars.back().get();
      for (int w = 0; w < Tr::kWarps; ++w) {
        bars.emplace_back(new std::barrier<>(32));
        cl->warp_bar[r * emu::kWarpsPerCta + w] = bars.back().get();
      }
    }
    std::vector<std::thread> threads;
    for (int r = 0; r < kP; ++r) {
      for (int t = 0; t < Tr::kThreads; ++t) {
        threads.emplace_back([&, r, t] {
          threadIdx.x = t;
          blockIdx.x = static_cast<unsigned>(job * kP + r);
          emu::g_ctx.cl = cl.get();
          emu::g_ctx.cta = r;
          emu::g_ctx.cluster_bar = &cluster_bar;
          emu::g_ctx.smem = cl->smem;
          kernel(p);
        });
      }
    }
    for (auto& th : threads) th.join();
  }
}

// Same signature as emu.cpp's emu_fwd (tests/test_ttt_cuda_emu.py emulated_fwd drives both).
extern "C" void emu_fwd(const void* q, const void* k, const void* v, const void* eta, const void* mu, void* o, int dt,
                        const float* wg, const float* wu, const float* wd, const float* fast_in, const float* pend_in,
                        float* fast_out, float* pend_out, float* ckpt, const int64_t* seq, int64_t N, int64_t H,
                        int64_t C, int lact, int residual, int d, int h) {
  if (d != 64 || h != 64 || (dt != 1 && dt != 2)) return;  // the test only asks for what the kernel takes
  FwdParams p{q,        k,        v,    eta, mu, o, InDType(dt), wg, wu, wd, fast_in, pend_in,
              fast_out, pend_out, ckpt, seq, N,  H, C,           bool(lact), bool(residual)};
  if (dt == 1) run_clusters<tc::FwdTcTraits>(p, tc::ttt_fwd_tc_kernel<__nv_bfloat16>);
  else run_clusters<tc::FwdTcTraits>(p, tc::ttt_fwd_tc_kernel<__half>);
}

// Same signature as emu.cpp's emu_bwd (tests/test_ttt_cuda_emu.py emulated_bwd drives both).
extern "C" void emu_bwd(const BwdParams* p, int d, int h) {
  if (d != 64 || h != 64) return;
  if (p->dtype == InDType::kBFloat16) run_clusters<tc::BwdTcTraits>(*p, tc::ttt_bwd_tc_kernel<__nv_bfloat16>);
  else if (p->dtype == InDType::kFloat16) run_clusters<tc::BwdTcTraits>(*p, tc::ttt_bwd_tc_kernel<__half>);
}
