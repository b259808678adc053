// allmem::ttt_memory_decode_step: one decode token per sequence, the packed state advanced in place
// (allmem_ops.ttt_memory_decode_ maps TTTState onto it). ttt_memory_fwd is functional, so a decode
// step through it copies the whole chunk buffer (N * C * H * (2d + 4) floats) in and out; here a
// step that completes no chunk is the read o = f(W; q) as three batched GEMVs over the N * H fast
// weights in the state's precision plus one row written into the buffer, and only a step in which
// some sequence completes its chunk runs ttt_memory_fwd (the update, exactly as in prefill) and
// copies its state into the caller's tensors. The same ATen code runs on every backend. With the
// pending lengths given on the host, a step that completes no chunk never waits for the device.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <tuple>

#include "common/checks.h"
#include "ttt/ttt_common.h"
#ifdef ALLMEM_WITH_CUDA
#include "ttt/ttt_decode_cuda.h"
#endif

namespace allmem::ttt {
namespace {

using FwdOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

[[maybe_unused]] bool decode_kernel_requested() {
  const char* env = std::getenv("ALLMEM_TTT_DECODE_KERNEL");
  return env != nullptr && std::strcmp(env, "1") == 0;
}

FwdOut call_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& eta,
                const at::Tensor& mu, const at::Tensor& w_gate, const at::Tensor& w_up, const at::Tensor& w_down,
                const at::Tensor& fast, const at::Tensor& pending, const at::Tensor& pending_len, int64_t chunk_size,
                bool lact_order, bool residual) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("allmem::ttt_memory_fwd", "")
                       .typed<FwdOut(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const std::optional<at::Tensor>&, int64_t, bool, bool)>();
  return op.call(q, k, v, eta, mu, w_gate, w_up, w_down, fast, pending, pending_len, std::nullopt, chunk_size,
                 lact_order, residual);
}

at::Tensor ttt_memory_decode_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& eta,
                                  const at::Tensor& mu, const at::Tensor& w_gate, const at::Tensor& w_up,
                                  const at::Tensor& w_down, at::Tensor& fast, at::Tensor& pending,
                                  at::Tensor& pending_len, int64_t chunk_size, bool lact_order, bool residual,
                                  at::OptionalIntArrayRef pending_len_host) {
  ALLMEM_NO_AUTOCAST();  // the read's matmuls run in the state's precision
  ALLMEM_NO_TF32();      // ... and in IEEE float32 whatever the TF32 setting (decode == prefill)
  check_floating(q, "q");
  if (q.is_cuda()) check_cuda_input_dtype(q);
  check_dim(q, 4, "q", "[B, 1, H, d] (one decode token per sequence)");
  ALLMEM_CHECK(q.size(1) == 1, "q must be [B, 1, H, d] (one decode token per sequence), got shape ", shape_str(q));
  const at::ScalarType st = accumulate_dtype(q.scalar_type());
  // Shapes, dtypes and devices of everything, and pending_len on the host: the one sync of a step,
  // unless the caller passes the values it knows (pending_len_host, checked the same way; they must
  // equal pending_len's, which the Python wrapper ensures by the tensor's version counter). A step
  // that completes a chunk syncs in ttt_memory_fwd either way.
  std::optional<at::IntArrayRef> host;
  if (pending_len_host.has_value()) host = *pending_len_host;
  const Layout lay = check_and_layout(q, k, v, eta, mu, w_gate, w_up, w_down, pending, pending_len, std::nullopt,
                                      chunk_size, st, host);
  const int64_t B = lay.N, H = lay.H, d = lay.d, h = lay.h;
  if (q.is_cuda()) check_cuda_sizes(lay);  // its chunk-completing steps run the CUDA forward
  check_state_tensor(fast, "fast", {B, H, kFastRows, h * d}, st, q);
  ALLMEM_CHECK(fast.is_contiguous() && pending.is_contiguous() && pending_len.is_contiguous(),
               "fast, pending and pending_len must be contiguous (they are updated in place)");
  if (B == 0 || H == 0) return at::empty(q.sizes(), q.options());  // contiguous, as every other return
  const int64_t hi = *std::max_element(lay.p0.begin(), lay.p0.end());
  if (hi + 1 == chunk_size) {  // some sequence completes its chunk: the update, as in prefill
    auto [o, fast_out, pend_out, plen_out, ckpt] =
        call_fwd(q, k, v, eta, mu, w_gate, w_up, w_down, fast, pending, pending_len, chunk_size, lact_order, residual);
    fast.copy_(fast_out);
    pending.copy_(pend_out);
    pending_len.copy_(plen_out);
    return o;
  }
#ifdef ALLMEM_WITH_CUDA
  // ALLMEM_TTT_DECODE_KERNEL=1 (read at every call; opt-in until it has run on a GPU): the read and
  // the row write in one launch (ttt_decode_kernel.cu) instead of the ATen sequence below.
  if (q.is_cuda() && st == at::kFloat && decode_kernel_requested()) {
    at::Tensor o = ttt_decode_step_kernel_cuda(q, k, v, eta, mu, fast, pending, pending_len, chunk_size, h, residual);
    pending_len.add_(1);
    return o;
  }
#endif
  // The read with the weights as they are: W [B*H, rows, cols] views of the packed state.
  auto mat = [&](int64_t i, int64_t rows, int64_t cols) { return fast.select(2, i).view({B * H, rows, cols}); };
  const at::Tensor x = q.select(1, 0).to(st).reshape({B * H, d, 1});
  const at::Tensor s = at::silu(at::bmm(mat(0, h, d), x)).mul_(at::bmm(mat(1, h, d), x));
  const at::Tensor o = residual ? at::baddbmm(x, mat(2, d, h), s) : at::bmm(mat(2, d, h), s);
  // The token's k | v | eta | mu into row pending_len of each sequence's buffer, by the device
  // lengths (not the host copy): the host values only decide whether a chunk completes, so a step
  // that completes none is the same launches whatever the lengths, and a CUDA graph of it replays
  // correctly for as long as no sequence completes its chunk (the caller's side of the contract).
  const at::Tensor row =
      at::cat({k.select(1, 0), v.select(1, 0), eta.select(1, 0), mu.select(1, 0).unsqueeze(-1)}, -1);  // [B, H, 2d+4]
  pending.index_put_({at::arange(B, pending_len.options()), pending_len}, row.to(st));
  pending_len.add_(1);
  return o.view({B, 1, H, d}).to(q.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(allmem, CPU, m) { m.impl("ttt_memory_decode_step", TORCH_FN(ttt_memory_decode_step)); }
#ifdef ALLMEM_WITH_CUDA
TORCH_LIBRARY_IMPL(allmem, CUDA, m) { m.impl("ttt_memory_decode_step", TORCH_FN(ttt_memory_decode_step)); }
#endif

}  // namespace allmem::ttt
