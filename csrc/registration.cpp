// Every schema of the `allmem` op library, in one place. Implementations register themselves
// with TORCH_LIBRARY_IMPL next to their kernels (csrc/<op>/<op>_cpu.cpp, csrc/<op>/*.cu);
// autograd and fake (meta) kernels are registered from Python (allmem_ops/<op>.py).
#include <torch/library.h>

#include "ttt/ttt_common.h"

#include <string>

TORCH_LIBRARY(allmem, m) {
  // Which backends this binary carries, for allmem_ops.build_info() and the tests.
  m.def("build_info() -> str", []() -> std::string {
#ifdef ALLMEM_WITH_CUDA
    return "cpu,cuda";
#else
    return "cpu";
#endif
  });

  // ---- Sliding-window attention with sink tokens (SPEC.md "SWA with sinks") ----
  // Dense: q [B, L, Hq, D], k/v [B, L, Hkv, D] -> out [B, L, Hq, D], lse [B, Hq, L] float32.
  // Varlen (cu_seqlens int32 [N+1]): q [T, Hq, D], k/v [T, Hkv, D] -> out [T, Hq, D], lse [Hq, T].
  m.def(
      "swa_fwd(Tensor q, Tensor k, Tensor v, int window, int sinks, float? softmax_scale, "
      "Tensor? cu_seqlens, int max_seqlen) -> (Tensor out, Tensor lse)");
  m.def(
      "swa_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, int window, "
      "int sinks, float? softmax_scale, Tensor? cu_seqlens, int max_seqlen) -> (Tensor dq, Tensor dk, Tensor dv)");
  // Decode against an S + W slot cache (S sink slots, then a ring of W). q [B, Lnew, Hq, D],
  // k_new/v_new [B, Lnew, Hkv, D], k_cache/v_cache [B, S + W, Hkv, D], cache_seqlens int32 [B]
  // (tokens already in the cache per sequence). Writes the new tokens into the cache, one at a
  // time, each attending after it is written; returns out [B, Lnew, Hq, D]. check_lengths=False:
  // the caller vouches that cache_seqlens >= 0, so the CUDA op skips reading them on the host (its
  // one sync; the kernels still guard on the device); the CPU op always checks (no sync there).
  m.def(
      "swa_decode(Tensor q, Tensor k_new, Tensor v_new, Tensor(a!) k_cache, Tensor(b!) v_cache, "
      "Tensor cache_seqlens, int window, int sinks, float? softmax_scale, bool check_lengths=True) -> Tensor");

  // ---- TTT memory (SPEC.md "The memory branch, exactly") ----
  // TTT-SCHEMAS-BEGIN (owned by csrc/ttt)
  // q/k/v [B, L, H, d] (varlen: [T, H, d] with cu_seqlens int32 [N+1]), eta [.., H, 3], mu [.., H];
  // w_gate/w_up [H, h, d], w_down [H, d, h]: the params, whose row norms are the normalization
  // targets. The state is packed, float32 (float64 for float64 inputs): fast [N, H, 6, h*d] =
  // gate, up, down, then their momenta; pending [N, C, H, 2d+4] = k | v | eta | mu rows of the
  // incomplete chunk, pending_len int64 [N]. checkpoints [2N + T//C, H, 6, h*d]: (W, M) at every
  // chunk start, for the backward.
  m.def(
      "ttt_memory_fwd(Tensor q, Tensor k, Tensor v, Tensor eta, Tensor mu, Tensor w_gate, Tensor w_up, "
      "Tensor w_down, Tensor fast, Tensor pending, Tensor pending_len, Tensor? cu_seqlens, int chunk_size, "
      "bool lact_order, bool residual) -> (Tensor o, Tensor fast_out, Tensor pending_out, Tensor pending_len_out, "
      "Tensor checkpoints)");
  m.def(
      "ttt_memory_bwd(Tensor grad_o, Tensor? grad_fast, Tensor? grad_pending, Tensor q, Tensor k, Tensor v, "
      "Tensor eta, Tensor mu, Tensor w_gate, Tensor w_up, Tensor w_down, Tensor pending, Tensor pending_len, "
      "Tensor checkpoints, Tensor? cu_seqlens, int chunk_size, bool lact_order, bool residual) -> (Tensor dq, "
      "Tensor dk, Tensor dv, Tensor deta, Tensor dmu, Tensor dw_gate, Tensor dw_up, Tensor dw_down, "
      "Tensor d_fast, Tensor d_pending)");
  // One decode token per sequence (q/k/v [B, 1, H, d], eta [B, 1, H, 3], mu [B, 1, H]) with the
  // packed state of B sequences advanced in place: fast changes only when a sequence completes its
  // chunk; returns o [B, 1, H, d] (csrc/ttt/ttt_decode.cpp). pending_len_host: the values of
  // pending_len if the caller knows them (saves the step's host sync; must be right).
  // chunk_update: 'auto' (the lengths on the host decide), 'none' (no sequence may complete its
  // chunk; one that would gets NaN and keeps its state) or 'masked' (every sequence's update, kept
  // where its chunk completes): the last two never read the device and are CUDA-graph capturable.
  m.def(
      "ttt_memory_decode_step(Tensor q, Tensor k, Tensor v, Tensor eta, Tensor mu, Tensor w_gate, Tensor w_up, "
      "Tensor w_down, Tensor(a!) fast, Tensor(b!) pending, Tensor(c!) pending_len, int chunk_size, bool lact_order, "
      "bool residual, int[]? pending_len_host=None, str chunk_update=\"auto\") -> Tensor");
  // Profiling (not part of the op contract): the phase clocks of the last tensor-core TTT forward
  // run with ALLMEM_TTT_TC_PHASES=1 (int64 [16], csrc/ttt/ttt_cuda.h FwdPhase), empty if none.
  m.def("_ttt_tc_phase_clock() -> Tensor", []() -> at::Tensor {
    const at::Tensor& t = allmem::ttt::tc_phase_clock_slot();
    return t.defined() ? t.clone() : at::empty({0}, at::kLong);
  });
  // TTT-SCHEMAS-END
}
