// Argument contract of the TTT memory ops (csrc/registration.cpp), shared by every backend so that
// torch.ops.allmem.ttt_memory_* reject bad input with the same messages on the CPU and the GPU.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <optional>
#include <utility>
#include <vector>

#include "common/checks.h"

namespace allmem::ttt {

// Profiling of the tensor-core forward (ALLMEM_TTT_TC_PHASES=1, ttt_api_cuda.cpp): the phase
// clocks of the last such call (int64 [16] on its device, slots as FwdPhase in ttt_cuda.h), or an
// undefined tensor. Debug facility: not synchronized between threads. Defined in ttt_cpu.cpp.
at::Tensor& tc_phase_clock_slot();

// fast state / checkpoint rows: gate, up, down, then their momenta, each flattened to h*d.
constexpr int64_t kFastRows = 6;
constexpr int64_t kMomentumRow = 3;

// Dense [B, L, ...] and varlen [T, ...] inputs both become packed [T, H, ...] tokens; this is
// where each sequence starts, how long it is, and where its checkpoints go.
struct Layout {
  int64_t T = 0, H = 0, d = 0, h = 0, N = 0, C = 0;
  std::vector<int64_t> start, len, p0, slot;
  int64_t used_slots = 0;
  int64_t pend_width() const { return 2 * d + 4; }  // k | v | eta (3) | mu
  int64_t slots() const { return 2 * N + T / C; }    // >= sum over sequences of (chunks + 1)
};

inline void check_state_tensor(const at::Tensor& t, const char* name, at::IntArrayRef expected, at::ScalarType st,
                        const at::Tensor& q) {
  check_same_device(t, name, q, "q");
  ALLMEM_CHECK(t.sizes() == expected, name, " must have shape ", expected, ", got ", shape_str(t));
  ALLMEM_CHECK(t.scalar_type() == st, name, " must be ", st, " (the state dtype for ", q.scalar_type(),
               " inputs), got ", t.scalar_type());
}

// Validates the inputs common to ttt_memory_fwd and ttt_memory_bwd; `st` is the state dtype the
// backend keeps (float32, or float64 for float64 inputs on the CPU). Reads cu_seqlens and
// pending_len on the host (one copy each); a caller that knows pending_len's values on the host
// (ttt_memory_decode_step's pending_len_host) passes them instead and saves that sync.
inline Layout check_and_layout(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& eta,
                               const at::Tensor& mu, const at::Tensor& w_gate, const at::Tensor& w_up,
                               const at::Tensor& w_down, const at::Tensor& pending, const at::Tensor& pending_len,
                               const std::optional<at::Tensor>& cu_seqlens, int64_t chunk_size, at::ScalarType st,
                               std::optional<at::IntArrayRef> pending_len_host = std::nullopt,
                               bool read_lengths = true) {
  ALLMEM_CHECK(chunk_size >= 1, "chunk_size must be >= 1, got ", chunk_size);
  check_floating(q, "q");
  const bool varlen = cu_seqlens.has_value();
  if (varlen) {
    check_dim(q, 3, "q", "[T, H, d] (varlen, with cu_seqlens)");
  } else {
    check_dim(q, 4, "q", "[B, L, H, d]");
  }
  for (auto [t, name] : {std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    ALLMEM_CHECK(t->sizes() == q.sizes(), name, " must have the shape of q ", shape_str(q), ", got ",
                 shape_str(*t));
  }
  auto lead = q.sizes().vec();
  lead.pop_back();
  auto eta_shape = lead;
  eta_shape.push_back(3);
  ALLMEM_CHECK(eta.sizes() == at::IntArrayRef(eta_shape), "eta must have shape ", at::IntArrayRef(eta_shape),
               " (q's shape with the last dim 3: gate, up, down rates), got ", shape_str(eta));
  ALLMEM_CHECK(mu.sizes() == at::IntArrayRef(lead), "mu must have shape ", at::IntArrayRef(lead),
               " (q's shape without the last dim), got ", shape_str(mu));
  for (auto [t, name] : {std::pair{&k, "k"}, std::pair{&v, "v"}, std::pair{&eta, "eta"}, std::pair{&mu, "mu"}}) {
    check_same_dtype(*t, name, q, "q");
    check_same_device(*t, name, q, "q");
  }
  Layout lay;
  lay.C = chunk_size;
  lay.H = q.size(-2);
  lay.d = q.size(-1);
  check_dim(w_gate, 3, "w_gate", "[H, h, d]");
  lay.h = w_gate.size(1);
  check_state_tensor(w_gate, "w_gate", {lay.H, lay.h, lay.d}, st, q);
  check_state_tensor(w_up, "w_up", {lay.H, lay.h, lay.d}, st, q);
  check_state_tensor(w_down, "w_down", {lay.H, lay.d, lay.h}, st, q);
  if (varlen) {
    check_same_device(*cu_seqlens, "cu_seqlens", q, "q");
    lay.T = q.size(0);
    lay.N = check_cu_seqlens(*cu_seqlens, lay.T, "q.size(0)");
    auto cu = cu_seqlens->to(at::kCPU).contiguous();
    const int32_t* p = cu.data_ptr<int32_t>();
    for (int64_t n = 0; n < lay.N; ++n) {
      lay.start.push_back(p[n]);
      lay.len.push_back(p[n + 1] - p[n]);
    }
  } else {
    lay.N = q.size(0);
    lay.T = q.size(0) * q.size(1);
    for (int64_t n = 0; n < lay.N; ++n) {
      lay.start.push_back(n * q.size(1));
      lay.len.push_back(q.size(1));
    }
  }
  check_state_tensor(pending, "pending", {lay.N, lay.C, lay.H, lay.pend_width()}, st, q);
  check_same_device(pending_len, "pending_len", q, "q");
  ALLMEM_CHECK(pending_len.scalar_type() == at::kLong && pending_len.dim() == 1 && pending_len.size(0) == lay.N,
               "pending_len must be int64 [N] with N = ", lay.N, " sequences, got ", pending_len.scalar_type(), " ",
               shape_str(pending_len));
  if (!read_lengths) return lay;  // the lengths stay on the device (lay.p0, slots: empty)
  at::Tensor plen;
  const int64_t* pl = nullptr;
  if (pending_len_host.has_value()) {
    ALLMEM_CHECK(static_cast<int64_t>(pending_len_host->size()) == lay.N, "pending_len_host must hold N = ", lay.N,
                 " lengths, got ", static_cast<int64_t>(pending_len_host->size()));
    pl = pending_len_host->data();
  } else {
    plen = pending_len.to(at::kCPU).contiguous();
    pl = plen.data_ptr<int64_t>();
  }
  int64_t slot = 0;
  for (int64_t n = 0; n < lay.N; ++n) {
    ALLMEM_CHECK(pl[n] >= 0 && pl[n] < lay.C, "pending_len[", n, "] must be in [0, chunk_size = ", lay.C, "), got ",
                 pl[n]);
    lay.p0.push_back(pl[n]);
    lay.slot.push_back(slot);
    slot += (pl[n] + lay.len[n]) / lay.C + 1;
  }
  lay.used_slots = slot;
  return lay;
}

// The CUDA kernels' limits, for ttt_api_cuda.cpp and for ttt_decode.cpp (whose chunk-completing
// steps run the CUDA forward): checked where either op starts, with the same messages.
inline void check_cuda_input_dtype(const at::Tensor& q) {
  const auto st = q.scalar_type();
  ALLMEM_CHECK(st == at::kBFloat16 || st == at::kHalf || st == at::kFloat,
               "the CUDA TTT kernel takes bfloat16, float16 or float32 q, k, v, eta, mu, got ", st,
               ": run float64 on the CPU kernel (move the tensors to the CPU)");
}

inline void check_cuda_sizes(const Layout& lay) {
  ALLMEM_CHECK((lay.d == 64 || lay.d == 128) && (lay.h == 64 || lay.h == 128),
               "the CUDA TTT kernel supports head size d and hidden size h of 64 or 128, got d = ", lay.d,
               ", h = ", lay.h, " (the CPU kernel takes any sizes)");
}

// One sequence is processed as segments: each fills the current chunk (or ends the sequence).
// check_and_layout plus the forward's fast state [N, H, 6, h*d] in the state dtype `st`.
inline Layout check_fwd_and_layout(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& eta,
                                   const at::Tensor& mu, const at::Tensor& w_gate, const at::Tensor& w_up,
                                   const at::Tensor& w_down, const at::Tensor& fast, const at::Tensor& pending,
                                   const at::Tensor& pending_len, const std::optional<at::Tensor>& cu_seqlens,
                                   int64_t chunk_size, at::ScalarType st) {
  Layout lay = check_and_layout(q, k, v, eta, mu, w_gate, w_up, w_down, pending, pending_len, cu_seqlens, chunk_size, st);
  check_state_tensor(fast, "fast", {lay.N, lay.H, kFastRows, lay.h * lay.d}, st, q);
  return lay;
}

struct Segment {
  int64_t pending_before;  // rows of the chunk already filled when the segment starts
  int64_t tokens;          // new tokens in it
  int64_t first_token;     // packed index of its first token
};

inline std::vector<Segment> segments(const Layout& lay, int64_t n) {
  std::vector<Segment> out;
  int64_t p = lay.p0[n], pos = 0;
  while (true) {
    const int64_t seg = std::min(lay.len[n] - pos, lay.C - p);
    out.push_back({p, seg, lay.start[n] + pos});
    p += seg;
    pos += seg;
    if (p < lay.C) break;
    p = 0;
  }
  return out;  // all but the last complete a chunk
}

}  // namespace allmem::ttt
