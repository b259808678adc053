// Every schema of the `allmem` op library, in one place. Implementations register themselves
// with TORCH_LIBRARY_IMPL next to their kernels (csrc/<op>/<op>_cpu.cpp, csrc/<op>/*.cu);
// autograd and fake (meta) kernels are registered from Python (allmem_ops/<op>.py).
#include <torch/library.h>

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
      "swa_fwd(Tensor q, Tensor k, Tensor v, int window, int sinks, float softmax_scale, "
      "Tensor? cu_seqlens, int max_seqlen) -> (Tensor out, Tensor lse)");
  m.def(
      "swa_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, int window, "
      "int sinks, float softmax_scale, Tensor? cu_seqlens, int max_seqlen) -> (Tensor dq, Tensor dk, Tensor dv)");
  // Decode against an S + W slot cache (S sink slots, then a ring of W). q [B, Lnew, Hq, D],
  // k_new/v_new [B, Lnew, Hkv, D], k_cache/v_cache [B, S + W, Hkv, D], cache_seqlens int32 [B]
  // (tokens already in the cache per sequence). Writes the new tokens into the cache, one at a
  // time, each attending after it is written; returns out [B, Lnew, Hq, D].
  m.def(
      "swa_decode(Tensor q, Tensor k_new, Tensor v_new, Tensor(a!) k_cache, Tensor(b!) v_cache, "
      "Tensor cache_seqlens, int window, int sinks, float softmax_scale) -> Tensor");

  // ---- TTT memory (SPEC.md "The memory branch, exactly") ----
  // TTT-SCHEMAS-BEGIN (owned by csrc/ttt)
  // TTT-SCHEMAS-END
}
