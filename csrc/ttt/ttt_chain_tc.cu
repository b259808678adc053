// Launch code of split mode's hidden-unit chain (the kernel and its design: ttt_chain_tc.cuh), in
// its own translation unit so its instantiations compile in parallel with the token-split forward's.
// Shapes (d = h, unit groups P x token parts S = CTAs per job):
//   d = 64: 8 x 1; d = 128: 8 x 1, 16 x 1, 8 x 2 (cluster or not), 8 x 4 (without clusters only).
// The cluster kernels' bodies exist only for sm_90+; the kernels without clusters (kGx) run on
// sm_80+.
#include <c10/cuda/CUDAException.h>

#include "ttt/ttt_chain_tc.cuh"
#include "ttt/ttt_cuda.h"
#include "ttt/ttt_tc_launch.h"

namespace allmem::ttt::cuda {
namespace {

template <typename T, int D, int P, int S>
void launch_chain(const FwdParams& p, cudaStream_t stream) {
  using Tr = tc::ChainTcTraits<D, false, P, S>;
  launch_clusters(tc::ttt_chain_tc_kernel<T, D, false, P, S>, p, p.n_seqs * p.heads * Tr::kP, Tr::kThreads,
                  Tr::kSmemBytes, Tr::kP, stream);
}

template <typename T, int D, int P, int S>
int64_t chain_gx_jobs() {
  using Tr = tc::ChainTcTraits<D, true, P, S>;
  return cooperative_jobs(tc::ttt_chain_tc_kernel<T, D, true, P, S>, Tr::kThreads, Tr::kSmemBytes, Tr::kP);
}

template <typename T, int D, int P, int S>
void launch_chain_gx(const FwdParams& p, int64_t wave, cudaStream_t stream) {
  using Tr = tc::ChainTcTraits<D, true, P, S>;
  launch_cooperative_waves(tc::ttt_chain_tc_kernel<T, D, true, P, S>, p, p.n_seqs * p.heads, wave, Tr::kThreads,
                           Tr::kSmemBytes, Tr::kP, stream, "launch_ttt_chain_tc");
}

// The shapes there are, as (d, P, S, global) -> f.template operator()<D, P, S, kGx>(); false if none.
template <typename F>
bool with_shape(int d, int ctas, int parts, bool global, F&& f) {
  if (d == 64 && ctas == 8 && parts == 1) {
    global ? f.template operator()<64, 8, 1, true>() : f.template operator()<64, 8, 1, false>();
    return true;
  }
  if (d != 128) return false;
  if (ctas == 8 && parts == 1) {
    global ? f.template operator()<128, 8, 1, true>() : f.template operator()<128, 8, 1, false>();
  } else if (ctas == 16 && parts == 1) {
    global ? f.template operator()<128, 16, 1, true>() : f.template operator()<128, 16, 1, false>();
  } else if (ctas == 8 && parts == 2) {
    global ? f.template operator()<128, 8, 2, true>() : f.template operator()<128, 8, 2, false>();
  } else if (ctas == 8 && parts == 4 && global) {
    f.template operator()<128, 8, 4, true>();
  } else {
    return false;
  }
  return true;
}

void check_shape(int d, int ctas, int parts, bool global, const char* who) {
  const bool ok = with_shape(d, ctas, parts, global, []<int, int, int, bool>() {});
  TORCH_CHECK(ok, "allmem: ", who, ": no hidden-unit chain of d = ", d, " with ", ctas, " unit groups x ", parts,
              " token parts", global ? "" : " in a cluster",
              " (d = 64: 8 x 1; d = 128: 8 x 1, 16 x 1, 8 x 2, and 8 x 4 without clusters)");
}

template <typename T>
void launch_typed(const FwdParams& p, int d, int ctas, int parts, bool global, int64_t wave, cudaStream_t stream) {
  with_shape(d, ctas, parts, global, [&]<int D, int P, int S, bool G>() {
    if constexpr (G) {
      launch_chain_gx<T, D, P, S>(p, wave, stream);
    } else {
      launch_chain<T, D, P, S>(p, stream);
    }
  });
}

// f.template operator()<T>() with T the 16-bit type of dt (callers check it is one).
template <typename F>
void with_dtype(InDType dt, F&& f) {
  if (dt == InDType::kBFloat16) {
    f.template operator()<__nv_bfloat16>();
  } else {
    f.template operator()<__half>();
  }
}

}  // namespace

void launch_ttt_chain_tc(const FwdParams& p, int d, cudaStream_t stream, bool global, int64_t wave, int ctas,
                         int parts) {
  check_shape(d, ctas, parts, global, "launch_ttt_chain_tc");
  if (p.dtype == InDType::kBFloat16) return launch_typed<__nv_bfloat16>(p, d, ctas, parts, global, wave, stream);
  if (p.dtype == InDType::kFloat16) return launch_typed<__half>(p, d, ctas, parts, global, wave, stream);
  TORCH_CHECK(false, "allmem: launch_ttt_chain_tc: bfloat16 or float16 inputs only (the caller checks)");
}

int ttt_chain_tc_active_clusters(InDType dt, int ctas, int parts) {
  check_shape(128, ctas, parts, false, "ttt_chain_tc_active_clusters");
  int n = 0;
  with_dtype(dt, [&]<typename T>() {
    with_shape(128, ctas, parts, false, [&]<int D, int P, int S, bool G>() {
      if constexpr (!G) {
        using Tr = tc::ChainTcTraits<D, false, P, S>;
        n = max_active_clusters(tc::ttt_chain_tc_kernel<T, D, false, P, S>, Tr::kThreads, Tr::kSmemBytes, Tr::kP);
      }
    });
  });
  return n;
}

int64_t ttt_chain_gx_jobs(InDType dt, int d, int ctas, int parts) {
  check_shape(d, ctas, parts, true, "ttt_chain_gx_jobs");
  int64_t n = 0;
  with_dtype(dt, [&]<typename T>() {
    with_shape(d, ctas, parts, true, [&]<int D, int P, int S, bool G>() {
      if constexpr (G) n = chain_gx_jobs<T, D, P, S>();
    });
  });
  return n;
}

int64_t ttt_chain_gx_xchg_floats(int d, int ctas, int parts) {
  check_shape(d, ctas, parts, true, "ttt_chain_gx_xchg_floats");
  int64_t n = 0;
  with_shape(d, ctas, parts, true, [&]<int D, int P, int S, bool G>() {
    if constexpr (G) n = tc::ChainTcTraits<D, true, P, S>::kXchgFloats;
  });
  return n;
}

}  // namespace allmem::ttt::cuda
