// Runs the kernels of csrc/ttt/ttt_fwd_tc.cuh and ttt_bwd_tc.cuh on the CPU
// (tests/test_ttt_tc_emu.py): one cluster of kP CTAs x 128 std::threads per (sequence, head),
// shared memory starting as NaN bytes.
#include <algorithm>
#include <cmath>
#include <memory>
#include <thread>
#include <vector>

#include "ttt/ttt_bwd_step_tc.cuh"
#include "ttt/ttt_bwd_tc.cuh"
#include "ttt/ttt_chain_tc.cuh"
#include "ttt/ttt_fwd_tc.cuh"
#include "ttt/ttt_read_tc.cuh"

using namespace allmem::ttt::cuda;

// Runs n_jobs clusters of kP CTAs x kThreads one after another; set_block(job, rank) sets
// blockIdx for the CTA of that rank, body() is the kernel call. clusters = false: the kP CTAs run
// at once as before (as a cooperative launch's would), but a cluster primitive aborts.
template <typename SetBlock, typename Body>
void run_jobs(int kP, int kThreads, int kWarps, int smem_bytes, int64_t n_jobs, SetBlock set_block, Body body,
              bool clusters = true) {
  std::vector<std::vector<unsigned char>> smem(kP, std::vector<unsigned char>(smem_bytes));
  for (int64_t job = 0; job < n_jobs; ++job) {
    auto cl = std::make_unique<emu::Cluster>();
    std::barrier<> cluster_bar(kP * kThreads);
    std::vector<std::unique_ptr<std::barrier<>>> bars;
    cl->cluster_bar = &cluster_bar;
    for (int r = 0; r < kP; ++r) {
      std::memset(smem[r].data(), 0xff, smem[r].size());  // garbage: NaN floats, NaN 16-bit values
      cl->smem[r] = smem[r].data();
      bars.emplace_back(new std::barrier<>(kThreads));
      cl->cta_bar[r] = bars.back().get();
      for (int w = 0; w < kWarps; ++w) {
        bars.emplace_back(new std::barrier<>(32));
        cl->warp_bar[r * emu::kWarpsPerCta + w] = bars.back().get();
      }
    }
    std::vector<std::thread> threads;
    for (int r = 0; r < kP; ++r) {
      for (int t = 0; t < kThreads; ++t) {
        threads.emplace_back([&, r, t] {
          threadIdx.x = t;
          set_block(job, r);
          emu::g_ctx.cl = cl.get();
          emu::g_ctx.cta = r;
          emu::g_ctx.cluster_bar = clusters ? &cluster_bar : nullptr;
          emu::g_ctx.smem = cl->smem;
          body();
        });
      }
    }
    for (auto& th : threads) th.join();
  }
}

// The (segment, head) grid of split mode's read kernels: blockIdx.x the work item, .y the head;
// one CTA of 128 threads at a time, no clusters (they run on sm_80 too).
template <typename Body>
void run_segment_grid(int64_t n_work, int64_t heads, int smem_bytes, Body body) {
  run_jobs(
      1, tc::FwdTcTraits::kThreads, tc::FwdTcTraits::kWarps, smem_bytes, n_work * heads,
      [n_work](int64_t job, int) {
        blockIdx.x = static_cast<unsigned>(job % n_work);
        blockIdx.y = static_cast<unsigned>(job / n_work);
      },
      body, false);
}

// One cluster of kP CTAs per (sequence, head), as launch_tc launches them.
template <typename Tr, typename Params, typename Kernel>
void run_clusters(const Params& p, Kernel kernel) {
  run_jobs(
      Tr::kP, Tr::kThreads, Tr::kWarps, Tr::kSmemBytes, p.n_seqs * p.heads,
      [](int64_t job, int r) { blockIdx.x = static_cast<unsigned>(job * Tr::kP + r); }, [&] { kernel(p); });
}

// The wgmma chain (ALLMEM_TTT_TC_WGMMA=1, 4 warps, split mode only: it skips the reads),
// then the wgmma read..
static bool g_fwd_wg = false;
extern "C" void emu_set_wgmma(int on) { g_fwd_wg = on != 0; }

// ttt_api_cuda.cpp read_work: ttt_cuda.h segment_reads on the sequence table [start | len | p0 | slot].
std::vector<int64_t> read_work(const int64_t* seq, int64_t N, int64_t C) {
  return segment_reads(seq, seq + N, seq + 2 * N, seq + 3 * N, N, C);
}

// The read kernel of split mode on a grid of (segment, head) CTAs, with the work list
// ttt_api_cuda.cpp read_work builds.
template <typename T, int D>
void run_read(const FwdParams& p) {
  const std::vector<int64_t> work = read_work(p.seq, p.n_seqs, p.chunk);
  ReadParams r{p.q, p.o, p.dtype, p.ckpt, work.data(), static_cast<int64_t>(work.size() / 3), p.heads, p.residual, D};
  if constexpr (D == 64) {
    if (g_fwd_wg) {  // the wgmma read after the wgmma chain, as the glue pairs them
      r.wgmma = true;
      run_segment_grid(r.n_work, p.heads, tc::ReadWgTraits::kSmemBytes, [&] { tc::ttt_read_wg_kernel<T>(r); });
      return;
    }
  }
  run_segment_grid(r.n_work, p.heads, tc::ReadTcTraits<D>::kSmemBytes, [&] { tc::ttt_read_tc_kernel<T, D>(r); });
}

// CTAs per cluster of the token-split forward (ttt_fwd_tc_kernel<T, 8 or 16>), as
// ALLMEM_TTT_TC_CLUSTER picks it on a GPU; emu_set_cluster sets it.
static int g_fwd_cluster = 8;
extern "C" void emu_set_cluster(int ctas) { g_fwd_cluster = ctas == 16 ? 16 : 8; }
// Warps per CTA of the same kernel (ALLMEM_TTT_TC_WARPS), 4 or 8.
static int g_fwd_warps = 4;
extern "C" void emu_set_warps(int warps) { g_fwd_warps = warps == 8 ? 8 : 4; }
// FwdParams::phase_clock of the token-split forward (ALLMEM_TTT_TC_PHASES on a GPU): nullptr or
// kPhaseSlots int64.
static long long* g_phase_clock = nullptr;
extern "C" void emu_set_phase_clock(long long* buf) { g_phase_clock = buf; }

// A kernel without clusters as launch_cooperative_waves launches it: waves of `wave` jobs (p.job0
// the first, blockIdx.x within the wave), exchange buffers per job slot of a wave (NaN-filled: a
// read before a write shows), the slots' counters zeroed before each wave.
template <typename Tr, typename Params, typename Kernel>
void run_waves(Params p, int64_t wave, int64_t xchg_floats, int64_t xpub_bytes, Kernel kernel) {
  const int64_t jobs = p.n_seqs * p.heads;
  std::vector<float> xchg(static_cast<size_t>(wave * xchg_floats), std::nanf(""));
  std::vector<unsigned char> xpub(static_cast<size_t>(wave * xpub_bytes), 0xff);
  std::vector<unsigned> xcount(static_cast<size_t>(wave * kXcountStride));
  p.xchg = xchg.data();
  p.xpub = xpub.data();
  p.xcount = xcount.data();
  for (int64_t j0 = 0; j0 < jobs; j0 += wave) {
    p.job0 = j0;
    std::fill(xcount.begin(), xcount.end(), 0u);
    run_jobs(
        Tr::kP, Tr::kThreads, Tr::kWarps, Tr::kSmemBytes, std::min(wave, jobs - j0),
        [](int64_t job, int r) { blockIdx.x = static_cast<unsigned>(job * Tr::kP + r); }, [&] { kernel(p); }, false);
  }
}

// The token-split forward without clusters (ALLMEM_TTT_TC_CHAIN=tokens-global): emu_set_fwd_gx(wave),
// waves of that many jobs; 0: the cluster kernels.
static int64_t g_fwd_gx_wave = 0;
extern "C" void emu_set_fwd_gx(int64_t wave) { g_fwd_gx_wave = wave; }

template <typename T>
void run_fwd_tc(FwdParams p) {
  p.phase_clock = g_phase_clock;
  if (g_fwd_gx_wave > 0) {
    using Tr = tc::FwdTcTraitsP<8, 4, false, true>;
    run_waves<Tr>(p, g_fwd_gx_wave, Tr::kP * Tr::kPart, 6 * Tr::kMat * int64_t{sizeof(T)},
                  tc::ttt_fwd_tc_kernel<T, 8, 4, false, true>);
    return;
  }
  if (g_fwd_wg && g_fwd_warps == 8) {
    if (g_fwd_cluster == 16) run_clusters<tc::FwdTcTraitsP<16, 8, true>>(p, tc::ttt_fwd_tc_kernel<T, 16, 8, true>);
    else run_clusters<tc::FwdTcTraitsP<8, 8, true>>(p, tc::ttt_fwd_tc_kernel<T, 8, 8, true>);
  } else if (g_fwd_wg) {
    if (g_fwd_cluster == 16) run_clusters<tc::FwdTcTraitsP<16, 4, true>>(p, tc::ttt_fwd_tc_kernel<T, 16, 4, true>);
    else run_clusters<tc::FwdTcTraitsP<8, 4, true>>(p, tc::ttt_fwd_tc_kernel<T, 8, 4, true>);
  } else if (g_fwd_warps == 8) {
    if (g_fwd_cluster == 16) run_clusters<tc::FwdTcTraitsP<16, 8>>(p, tc::ttt_fwd_tc_kernel<T, 16, 8>);
    else run_clusters<tc::FwdTcTraitsP<8, 8>>(p, tc::ttt_fwd_tc_kernel<T, 8, 8>);
  } else if (g_fwd_cluster == 16) {
    run_clusters<tc::FwdTcTraitsP<16>>(p, tc::ttt_fwd_tc_kernel<T, 16>);
  } else {
    run_clusters<tc::FwdTcTraits>(p, tc::ttt_fwd_tc_kernel<T>);
  }
}

// The split forward: the cluster kernel without the reads, then the read kernel.
template <typename T>
void run_split(FwdParams p) {
  p.skip_read = true;
  run_fwd_tc<T>(p);
  run_read<T, 64>(p);
}

// Token parts of the hidden-unit chain at d = 128 (ALLMEM_TTT_TC_CHAIN_PARTS on a GPU): 1, 2 (8
// unit groups x 2 parts, with or without clusters) or 4 (without clusters only).
static int g_chain_parts = 1;
extern "C" void emu_set_chain_parts(int parts) { g_chain_parts = parts == 2 || parts == 4 ? parts : 1; }

// The split forward with the hidden-unit chain (ttt_chain_tc.cuh), then the read kernel.
// d = 128 with emu_set_cluster(16): 16 CTAs per job (as ALLMEM_TTT_TC_CLUSTER=16 on a GPU); with
// emu_set_chain_parts(2): 8 unit groups x 2 token parts.
template <typename T, int D>
void run_chain(const FwdParams& p) {
  if constexpr (D == 128) {
    if (g_chain_parts == 2) {
      run_clusters<tc::ChainTcTraits<D, false, 8, 2>>(p, tc::ttt_chain_tc_kernel<T, D, false, 8, 2>);
      run_read<T, D>(p);
      return;
    }
    if (g_fwd_cluster == 16) {
      run_clusters<tc::ChainTcTraits<D, false, 16>>(p, tc::ttt_chain_tc_kernel<T, D, false, 16>);
      run_read<T, D>(p);
      return;
    }
  }
  run_clusters<tc::ChainTcTraits<D>>(p, tc::ttt_chain_tc_kernel<T, D>);
  run_read<T, D>(p);
}

// The hidden-unit chain without clusters (ttt_chain_tc.cuh kGx, ALLMEM_TTT_TC_CHAIN=global) as
// launch_ttt_chain_tc launches it: waves of `wave` jobs (blockIdx.x within the wave, p.job0 its
// first job), the row-norm partials and zeroed counters in (host) global memory; then the read.
static int64_t g_chain_gx_wave = 0;  // 0: the cluster chain; > 0: kGx in waves of that many jobs
extern "C" void emu_set_chain_gx(int64_t wave) { g_chain_gx_wave = wave; }

template <typename T, int D, int P, int S = 1>
void run_chain_gx_p(const FwdParams& p) {
  using Tr = tc::ChainTcTraits<D, true, P, S>;
  run_waves<Tr>(p, g_chain_gx_wave, Tr::kXchgFloats, 0, tc::ttt_chain_tc_kernel<T, D, true, P, S>);
  run_read<T, D>(p);
}

template <typename T, int D>
void run_chain_gx(const FwdParams& p) {
  if constexpr (D == 128) {
    if (g_chain_parts == 2) return run_chain_gx_p<T, D, 8, 2>(p);
    if (g_chain_parts == 4) return run_chain_gx_p<T, D, 8, 4>(p);
    if (g_fwd_cluster == 16) return run_chain_gx_p<T, D, 16>(p);
  }
  run_chain_gx_p<T, D, 8>(p);
}

// Same signature as emu.cpp's emu_fwd (tests/test_ttt_cuda_emu.py emulated_fwd drives both).
extern "C" void emu_fwd(const void* q, const void* k, const void* v, const void* eta, const void* mu, void* o, int dt,
                        const float* wg, const float* wu, const float* wd, const float* fast_in, const float* pend_in,
                        float* fast_out, float* pend_out, float* ckpt, const int64_t* seq, int64_t N, int64_t H,
                        int64_t C, int lact, int residual, int d, int h) {
  if (d != 64 || h != 64 || (dt != 1 && dt != 2)) return;  // the test only asks for what the kernel takes
  FwdParams p{q,        k,        v,    eta, mu, o, InDType(dt), wg, wu, wd, fast_in, pend_in,
              fast_out, pend_out, ckpt, seq, N,  H, C,           bool(lact), bool(residual)};
  if (dt == 1) run_fwd_tc<__nv_bfloat16>(p);
  else run_fwd_tc<__half>(p);
}

// The same with the split forward (ALLMEM_TTT_TC_SPLIT=1 on a GPU).
extern "C" void emu_fwd_split(const void* q, const void* k, const void* v, const void* eta, const void* mu, void* o,
                              int dt, const float* wg, const float* wu, const float* wd, const float* fast_in,
                              const float* pend_in, float* fast_out, float* pend_out, float* ckpt, const int64_t* seq,
                              int64_t N, int64_t H, int64_t C, int lact, int residual, int d, int h) {
  if (d != 64 || h != 64 || (dt != 1 && dt != 2)) return;
  FwdParams p{q,        k,        v,    eta, mu, o, InDType(dt), wg, wu, wd, fast_in, pend_in,
              fast_out, pend_out, ckpt, seq, N,  H, C,           bool(lact), bool(residual)};
  if (dt == 1) run_split<__nv_bfloat16>(p);
  else run_split<__half>(p);
}

// The tensor-core backward on clusters of 8 or 16 (emu_set_cluster, as ALLMEM_TTT_TC_CLUSTER).
template <typename T>
void run_bwd_tc(const BwdParams& p) {
  if (g_fwd_cluster == 16) run_clusters<tc::BwdTcTraitsP<16>>(p, tc::ttt_bwd_tc_kernel<T, 16>);
  else run_clusters<tc::BwdTcTraits>(p, tc::ttt_bwd_tc_kernel<T>);
}

// Same signature as emu.cpp's emu_bwd (tests/test_ttt_cuda_emu.py emulated_bwd drives both).
extern "C" void emu_bwd(const BwdParams* p, int d, int h) {
  if (d != 64 || h != 64) return;
  if (p->dtype == InDType::kBFloat16) run_bwd_tc<__nv_bfloat16>(*p);
  else if (p->dtype == InDType::kFloat16) run_bwd_tc<__half>(*p);
}

// The backward without clusters (ttt_bwd_tc.cuh kGx, split mode; ALLMEM_TTT_TC_CHAIN=global on a
// GPU): emu_set_bwd_gx(wave), waves of that many jobs; 0: the cluster kernels.
static int64_t g_bwd_gx_wave = 0;
extern "C" void emu_set_bwd_gx(int64_t wave) { g_bwd_gx_wave = wave; }

// The split backward (ALLMEM_TTT_TC_SPLIT=1 on a GPU): the reads' backward on a grid of (segment,
// head) CTAs into a NaN-filled dw_read, then the chain kernel without its read phase.
template <typename T>
void run_bwd_split(BwdParams p) {
  const std::vector<int64_t> work = read_work(p.seq, p.n_seqs, p.chunk);
  const int64_t n_work = static_cast<int64_t>(work.size() / 3), H = p.heads;
  int64_t slots = 0;
  for (int64_t i = 0; i < n_work; ++i) slots = std::max(slots, work[3 * i + 2] + 1);
  std::vector<float> dw_read(static_cast<size_t>(slots * H * 3 * 64 * 64), std::nanf(""));
  ReadBwdParams r{p.q, p.grad_o, p.dq, p.dtype, p.ckpt, work.data(), n_work, H, p.residual, dw_read.data()};
  run_segment_grid(n_work, H, tc::ReadBwdTcTraits::kSmemBytes, [&] { tc::ttt_read_bwd_tc_kernel<T>(r); });
  p.skip_read = true;
  p.dw_read = dw_read.data();
  if (g_bwd_gx_wave > 0) {
    using Tr = tc::BwdTcTraitsP<8, true>;
    run_waves<Tr>(p, g_bwd_gx_wave, Tr::kP * Tr::kPart, 6 * Tr::kMat * int64_t{sizeof(T)},
                  tc::ttt_bwd_tc_kernel<T, 8, true>);
    return;
  }
  run_bwd_tc<T>(p);
}

extern "C" void emu_bwd_split(const BwdParams* p, int d, int h) {
  if (d != 64 || h != 64) return;
  if (p->dtype == InDType::kBFloat16) run_bwd_split<__nv_bfloat16>(*p);
  else if (p->dtype == InDType::kFloat16) run_bwd_split<__half>(*p);
}

// The same with split mode's hidden-unit chain (d = h in {64, 128}).
extern "C" void emu_fwd_chain(const void* q, const void* k, const void* v, const void* eta, const void* mu, void* o,
                              int dt, const float* wg, const float* wu, const float* wd, const float* fast_in,
                              const float* pend_in, float* fast_out, float* pend_out, float* ckpt, const int64_t* seq,
                              int64_t N, int64_t H, int64_t C, int lact, int residual, int d, int h) {
  if (d != h || (d != 64 && d != 128) || (dt != 1 && dt != 2)) return;
  FwdParams p{q,        k,        v,    eta, mu, o, InDType(dt), wg, wu, wd, fast_in, pend_in,
              fast_out, pend_out, ckpt, seq, N,  H, C,           bool(lact), bool(residual)};
  if (g_chain_gx_wave > 0) {
    if (dt == 1) {
      if (d == 64) run_chain_gx<__nv_bfloat16, 64>(p);
      else run_chain_gx<__nv_bfloat16, 128>(p);
    } else {
      if (d == 64) run_chain_gx<__half, 64>(p);
      else run_chain_gx<__half, 128>(p);
    }
    return;
  }
  if (dt == 1) {
    if (d == 64) run_chain<__nv_bfloat16, 64>(p);
    else run_chain<__nv_bfloat16, 128>(p);
  } else {
    if (d == 64) run_chain<__half, 64>(p);
    else run_chain<__half, 128>(p);
  }
}

// One chunk's update backward on the tensor cores (ttt_bwd_step_tc.cuh): a cluster of 8 CTAs per
// chain, as launch_bwd_step_tc launches them.
template <typename T, int D>
void run_bwd_step(const BwdStepParams& p) {
  using Tr = tc::BwdStepTraits<D>;
  run_jobs(
      Tr::kP, Tr::kThreads, Tr::kWarps, Tr::kSmemBytes, p.chains,
      [](int64_t job, int r) { blockIdx.x = static_cast<unsigned>(job * Tr::kP + r); },
      [&] { tc::ttt_bwd_step_tc_kernel<T, D>(p); });
}

extern "C" void emu_bwd_step(const BwdStepParams* p, int d) {
  if (d != 64 && d != 128) return;
  if (p->dtype == InDType::kBFloat16) {
    if (d == 64) run_bwd_step<__nv_bfloat16, 64>(*p);
    else run_bwd_step<__nv_bfloat16, 128>(*p);
  } else if (p->dtype == InDType::kFloat16) {
    if (d == 64) run_bwd_step<__half, 64>(*p);
    else run_bwd_step<__half, 128>(*p);
  }
}
