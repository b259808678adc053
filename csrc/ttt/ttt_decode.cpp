// allmem::ttt_memory_decode_step: one decode token per sequence, the packed state advanced in place
// (allmem_ops.ttt_memory_decode_ maps TTTState onto it). ttt_memory_fwd is functional, so a decode
// step through it copies the whole chunk buffer (N * C * H * (2d + 4) floats) in and out; here a
// step is the read o = f(W; q) as three batched GEMVs over the N * H fast weights in the state's
// precision, one row written into the buffer, and for the sequences whose chunk this token
// completes the chunk update in place (decode_chunk_update_: the composite forward's batched
// matmuls, IEEE in the state's precision). The same ATen code runs on every backend.
// chunk_update: 'auto' decides on the host which sequences complete (their lengths read, or given
// as pending_len_host: then the step never waits for the device); 'none' (no sequence may complete)
// and 'masked' (every sequence's update computed, kept where its chunk completes) read nothing on
// the host and launch the same work whatever the lengths: the two CUDA-graph capturable steps.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <optional>
#include <tuple>

#include "common/checks.h"
#include "ttt/ttt_bwd_composite.h"
#include "ttt/ttt_common.h"
#ifdef ALLMEM_WITH_CUDA
#include "ttt/ttt_decode_cuda.h"
#endif

namespace allmem::ttt {
namespace {

enum class Update { kAuto, kNone, kMasked };

Update parse_update(c10::string_view mode) {
  if (mode == "auto") return Update::kAuto;
  if (mode == "none") return Update::kNone;
  if (mode == "masked") return Update::kMasked;
  ALLMEM_CHECK(false, "chunk_update must be 'auto', 'none' or 'masked', got '", std::string(mode), "'");
  return Update::kAuto;
}

[[maybe_unused]] bool decode_kernel_requested() {
  const char* env = std::getenv("ALLMEM_TTT_DECODE_KERNEL");
  return env != nullptr && std::strcmp(env, "1") == 0;
}

at::Tensor ttt_memory_decode_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& eta,
                                  const at::Tensor& mu, const at::Tensor& w_gate, const at::Tensor& w_up,
                                  const at::Tensor& w_down, at::Tensor& fast, at::Tensor& pending,
                                  at::Tensor& pending_len, int64_t chunk_size, bool lact_order, bool residual,
                                  at::OptionalIntArrayRef pending_len_host, c10::string_view chunk_update) {
  ALLMEM_NO_AUTOCAST();  // the read's matmuls run in the state's precision
  ALLMEM_NO_TF32();      // ... and in IEEE float32 whatever the TF32 setting (decode == prefill)
  const Update mode = parse_update(chunk_update);
  const bool on_device = mode != Update::kAuto;  // the lengths stay on the device: nothing read, capturable
#ifdef ALLMEM_WITH_CUDA
  // An 'auto' step's launches depend on the lengths it was given (wrap or not, which sequences
  // update, an index copy from a host buffer): a graph of one would be wrong at other lengths.
  ALLMEM_CHECK(on_device || !q.is_cuda() || !cuda_stream_capturing(q),
               "a chunk_update='auto' decode step cannot be captured in a CUDA graph (its launches depend on the "
               "lengths): capture chunk_update='none' and 'masked' steps");
#endif
  check_floating(q, "q");
  if (q.is_cuda()) check_cuda_input_dtype(q);
  check_dim(q, 4, "q", "[B, 1, H, d] (one decode token per sequence)");
  ALLMEM_CHECK(q.size(1) == 1, "q must be [B, 1, H, d] (one decode token per sequence), got shape ", shape_str(q));
  const at::ScalarType st = accumulate_dtype(q.scalar_type());
  // Shapes, dtypes and devices of everything, and (chunk_update 'auto') pending_len on the host: the
  // one sync of a step, unless the caller passes the values it knows (pending_len_host, checked the
  // same way; they must equal pending_len's, which the Python wrapper ensures by the tensor's
  // version counter). 'none' and 'masked' read nothing: host values, if given, are only checked.
  std::optional<at::IntArrayRef> host;
  if (pending_len_host.has_value()) host = *pending_len_host;
  const Layout lay = check_and_layout(q, k, v, eta, mu, w_gate, w_up, w_down, pending, pending_len, std::nullopt,
                                      chunk_size, st, host, /*read_lengths=*/!on_device || host.has_value());
  const int64_t B = lay.N, H = lay.H, d = lay.d, h = lay.h, C = chunk_size;
  if (q.is_cuda()) check_cuda_sizes(lay);  // the sizes of the CUDA prefill (and decode kernel), whose state it continues
  check_state_tensor(fast, "fast", {B, H, kFastRows, h * d}, st, q);
  ALLMEM_CHECK(fast.is_contiguous() && pending.is_contiguous() && pending_len.is_contiguous(),
               "fast, pending and pending_len must be contiguous (they are updated in place)");
  int64_t completing = 0;  // sequences that complete their chunk (known on the host: 'auto', or host values)
  for (int64_t n = 0; n < static_cast<int64_t>(lay.p0.size()); ++n) {
    if (lay.p0[n] + 1 == C) {
      ALLMEM_CHECK(mode != Update::kNone, "chunk_update='none' but sequence ", n,
                   " completes its chunk at this step (pending_len_host[", n, "] = chunk_size - 1 = ", C - 1,
                   "): use 'auto' or 'masked'");
      ++completing;
    }
  }
  if (B == 0 || H == 0) return at::empty(q.sizes(), q.options());  // contiguous, as every other return
  // Rows [0, row_limit) are valid lengths: 'auto' checked them on the host, the capturable steps
  // guard them on the device.
  const int64_t row_limit = mode == Update::kNone ? C - 1 : C;
  bool kernel = false;
#ifdef ALLMEM_WITH_CUDA
  // ALLMEM_TTT_DECODE_KERNEL=1 (read at every call; opt-in until it has run on a GPU): the read and
  // the row write in one launch, the length advance in another (ttt_decode_kernel.cu, with the same
  // guard) instead of the ATen sequences below.
  kernel = q.is_cuda() && st == at::kFloat && decode_kernel_requested();
#endif
  at::Tensor o, ok;
  if (kernel) {
#ifdef ALLMEM_WITH_CUDA
    o = ttt_decode_step_kernel_cuda(q, k, v, eta, mu, fast, pending, pending_len, C, h, residual, row_limit);
#endif
  } else {
    // The read with the weights as they are (before this step's update: SPEC.md step 1), as three
    // batched GEMVs over W [B*H, rows, cols] views of the packed state.
    auto mat = [&](int64_t i, int64_t rows, int64_t cols) { return fast.select(2, i).view({B * H, rows, cols}); };
    const at::Tensor x = q.select(1, 0).to(st).reshape({B * H, d, 1});
    const at::Tensor s = at::silu(at::bmm(mat(0, h, d), x)).mul_(at::bmm(mat(1, h, d), x));
    o = residual ? at::baddbmm(x, mat(2, d, h), s) : at::bmm(mat(2, d, h), s);
    // The token's k | v | eta | mu into row pending_len of each sequence's buffer, by the device
    // lengths (not the host copy): the host values only decide whether a chunk completes, so a
    // step that completes none is the same launches whatever the lengths, and a CUDA graph of it
    // replays correctly for as long as no sequence completes its chunk.
    const at::Tensor seqs = at::arange(B, pending_len.options());
    at::Tensor row =
        at::cat({k.select(1, 0), v.select(1, 0), eta.select(1, 0), mu.select(1, 0).unsqueeze(-1)}, -1).to(st);
    at::Tensor at_row = pending_len;
    if (on_device) {
      // Nobody checked the device lengths: a sequence whose length is out of range (or, with
      // 'none', would complete its chunk) gets NaN outputs and keeps its state; nothing out of
      // bounds is touched (its row write goes to a clamped row with that row's own contents).
      ok = pending_len.ge(0).logical_and_(pending_len.lt(row_limit));
      at_row = pending_len.clamp(0, C - 1);
      row = at::where(ok.view({B, 1, 1}), row, pending.index({seqs, at_row}));
      o = o.view({B, H * d}).masked_fill_(ok.logical_not().view({B, 1}), std::numeric_limits<double>::quiet_NaN());
    }
    pending.index_put_({seqs, at_row}, row);
    o = o.view({B, 1, H, d}).to(q.scalar_type());
  }
  // The chunk update, after the read (which uses the weights before it) and the row write.
  if (mode == Update::kMasked) {  // every sequence's update, kept where its chunk completes
    decode_chunk_update_(fast, pending, pending_len.eq(C - 1), w_gate, w_up, w_down, lact_order);
  } else if (completing == B) {  // every sequence completes (equal phases)
    decode_chunk_update_(fast, pending, at::Tensor(), w_gate, w_up, w_down, lact_order);
  } else if (completing > 0) {  // the update of the completing sequences only, by indices sent without a sync
    auto ids_host = at::empty({completing}, at::TensorOptions(at::kLong).pinned_memory(fast.is_cuda()));
    int64_t* p = ids_host.data_ptr<int64_t>();
    for (int64_t n = 0; n < B; ++n)
      if (lay.p0[n] + 1 == C) *p++ = n;
    const auto ids = ids_host.to(fast.device(), /*non_blocking=*/true);
    auto sub_fast = fast.index_select(0, ids), sub_pending = pending.index_select(0, ids);
    decode_chunk_update_(sub_fast, sub_pending, at::Tensor(), w_gate, w_up, w_down, lact_order);
    fast.index_copy_(0, ids, sub_fast);
    pending.index_copy_(0, ids, sub_pending);
  }
  // The lengths: + 1, wrapping to 0 where a chunk completed; guarded ones kept.
  if (kernel) {
#ifdef ALLMEM_WITH_CUDA
    ttt_decode_advance_cuda(pending_len, C, row_limit);
#endif
  } else if (on_device) {
    pending_len.copy_(at::where(ok, pending_len.add(1).remainder_(C), pending_len));
  } else if (completing > 0) {
    pending_len.add_(1).remainder_(C);
  } else {
    pending_len.add_(1);
  }
  return o;
}

}  // namespace

TORCH_LIBRARY_IMPL(allmem, CPU, m) { m.impl("ttt_memory_decode_step", TORCH_FN(ttt_memory_decode_step)); }
#ifdef ALLMEM_WITH_CUDA
TORCH_LIBRARY_IMPL(allmem, CUDA, m) { m.impl("ttt_memory_decode_step", TORCH_FN(ttt_memory_decode_step)); }
#endif

}  // namespace allmem::ttt
