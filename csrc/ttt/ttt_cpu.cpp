// CPU kernels of the TTT memory: forward (saves the fast weights and momenta at every chunk
// start) and the hand-derived backward (walks the chunks in reverse from those checkpoints).
// Parallel over (sequence, head); the per-chunk math is in ttt_chunk.h.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "ttt/ttt_bwd_composite.h"
#include "ttt/ttt_chunk.h"
#include "ttt/ttt_common.h"

namespace allmem::ttt {
namespace {


// [B, L, H, x] or [T, H, x] -> contiguous [T, H, x] in the accumulation dtype.
at::Tensor tokens(const at::Tensor& t, const Layout& lay, at::ScalarType acc) {
  return t.to(acc).contiguous().view({lay.T, t.size(-2), t.size(-1)});
}

Mats mats_of(const at::Tensor& rows6, int64_t first, const Layout& lay) {
  return {rows6[first].view({lay.h, lay.d}), rows6[first + 1].view({lay.h, lay.d}),
          rows6[first + 2].view({lay.d, lay.h})};
}

Mats cloned(const Mats& m) { return {m[0].clone(), m[1].clone(), m[2].clone()}; }

void store(const at::Tensor& rows6, int64_t first, const Mats& m) {
  for (int64_t i = 0; i < 3; ++i) rows6[first + i].copy_(m[i].reshape(-1));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_targets(const at::Tensor& w_gate, const at::Tensor& w_up,
                                                            const at::Tensor& w_down) {
  return {row_norm(w_gate), row_norm(w_up), row_norm(w_down)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ttt_memory_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& eta, const at::Tensor& mu,
    const at::Tensor& w_gate, const at::Tensor& w_up, const at::Tensor& w_down, const at::Tensor& fast,
    const at::Tensor& pending, const at::Tensor& pending_len, const std::optional<at::Tensor>& cu_seqlens,
    int64_t chunk_size, bool lact_order, bool residual) {
  // Everything below is plain tensor math with a hand-written backward: keep autograd out, also
  // in the worker threads (the guard is thread-local).
  if (composite_fwd_requested()) {
    return ttt_memory_fwd_composite(q, k, v, eta, mu, w_gate, w_up, w_down, fast, pending, pending_len, cu_seqlens,
                                    chunk_size, lact_order, residual);
  }
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  ALLMEM_NO_AUTOCAST();
  const auto acc = accumulate_dtype(q.scalar_type());
  const Layout lay = check_fwd_and_layout(q, k, v, eta, mu, w_gate, w_up, w_down, fast, pending, pending_len,
                                          cu_seqlens, chunk_size, acc);
  const int64_t d = lay.d, C = lay.C;
  auto qa = tokens(q, lay, acc), ka = tokens(k, lay, acc), va = tokens(v, lay, acc);
  auto etaa = tokens(eta, lay, acc);
  auto mua = mu.to(acc).contiguous().view({lay.T, lay.H});
  auto [tg, tu, td] = norm_targets(w_gate, w_up, w_down);
  auto fast_in = fast.contiguous(), pend_in = pending.contiguous();

  auto o = at::empty({lay.T, lay.H, d}, qa.options());
  auto fast_out = at::empty_like(fast_in);
  auto pend_out = at::empty_like(pend_in);
  auto ckpt = at::empty({lay.slots(), lay.H, kFastRows, lay.h * d}, qa.options());
  ckpt.narrow(0, lay.used_slots, lay.slots() - lay.used_slots).zero_();  // keep the output deterministic

  at::parallel_for(0, lay.N * lay.H, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView no_autograd_here;
    ALLMEM_NO_AUTOCAST();
    for (int64_t job = begin; job < end; ++job) {
      const int64_t n = job / lay.H, hh = job % lay.H;
      const Mats targets{tg[hh], tu[hh], td[hh]};
      auto row = fast_in[n][hh];
      Mats W = cloned(mats_of(row, 0, lay)), M = cloned(mats_of(row, kMomentumRow, lay));
      auto buf = pend_in[n].select(1, hh).clone();
      const auto buffered = ChunkView::of_buffer(buf, d);
      int64_t slot = lay.slot[n], p = 0;
      for (const Segment& s : segments(lay, n)) {
        auto rows = [&](const at::Tensor& t) { return t.narrow(0, s.first_token, s.tokens).select(1, hh); };
        const ChunkView mine{rows(ka), rows(va), rows(etaa), rows(mua)};
        store(ckpt[slot][hh], 0, W);
        store(ckpt[slot][hh], kMomentumRow, M);
        ++slot;
        if (s.tokens > 0) rows(o).copy_(read_forward(W, rows(qa), residual));
        p = s.pending_before + s.tokens;
        // A chunk made only of this call's tokens is used in place; others go through the buffer.
        const bool direct = s.pending_before == 0 && p == C;
        if (!direct && s.tokens > 0) buffered.rows(s.pending_before, s.tokens).copy_from(mine);
        if (p == C) {
          const ChunkView& chunk = direct ? mine : buffered;
          chunk_update(W, M, targets, chunk.k, chunk.v, chunk.eta, chunk.mu.mean().item<double>(), lact_order);
        }
      }
      if (p == C) p = 0;
      buf.narrow(0, p, C - p).zero_();
      store(fast_out[n][hh], 0, W);
      store(fast_out[n][hh], kMomentumRow, M);
      pend_out[n].select(1, hh).copy_(buf);
    }
  });

  auto plen_out = at::empty({lay.N}, at::TensorOptions().dtype(at::kLong));
  for (int64_t n = 0; n < lay.N; ++n) plen_out[n] = (lay.p0[n] + lay.len[n]) % C;
  return {o.view(q.sizes()).to(q.scalar_type()), fast_out, pend_out, plen_out.to(q.device()), ckpt};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
ttt_memory_bwd_cpu(const at::Tensor& grad_o, const std::optional<at::Tensor>& grad_fast,
                   const std::optional<at::Tensor>& grad_pending, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const at::Tensor& eta, const at::Tensor& mu, const at::Tensor& w_gate,
                   const at::Tensor& w_up, const at::Tensor& w_down, const at::Tensor& pending,
                   const at::Tensor& pending_len, const at::Tensor& checkpoints,
                   const std::optional<at::Tensor>& cu_seqlens, int64_t chunk_size, bool lact_order, bool residual) {
  if (composite_bwd_requested()) {
    return ttt_memory_bwd_composite(grad_o, grad_fast, grad_pending, q, k, v, eta, mu, w_gate, w_up, w_down, pending,
                                    pending_len, checkpoints, cu_seqlens, chunk_size, lact_order, residual);
  }
  // Everything below is plain tensor math with a hand-written backward: keep autograd out, also
  // in the worker threads (the guard is thread-local).
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  ALLMEM_NO_AUTOCAST();
  BwdArgs io(grad_o, grad_fast, grad_pending, q, k, v, eta, mu, w_gate, w_up, w_down, pending, pending_len, checkpoints,
             cu_seqlens, chunk_size);
  const Layout& lay = io.lay;
  const int64_t d = lay.d, h = lay.h, C = lay.C;
  const auto &qa = io.qa, &ka = io.ka, &va = io.va, &etaa = io.etaa, &doa = io.doa, &mua = io.mua;
  const auto &tg = io.tg, &tu = io.tu, &td = io.td, &pend_in = io.pend_in, &ckpt = io.ckpt;
  const auto &gfast = io.gfast, &gpend = io.gpend;
  auto &dq = io.dq, &dk = io.dk, &dv = io.dv, &deta = io.deta, &dmu = io.dmu, &d_fast = io.d_fast, &d_pend = io.d_pend;
  auto d_targets = at::zeros({lay.N, lay.H, 2 * h + d}, qa.options());  // per job, summed over N below

  at::parallel_for(0, lay.N * lay.H, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView no_autograd_here;
    ALLMEM_NO_AUTOCAST();
    for (int64_t job = begin; job < end; ++job) {
      const int64_t n = job / lay.H, hh = job % lay.H;
      const Mats targets{tg[hh], tu[hh], td[hh]};
      auto dt_row = d_targets[n][hh];
      Mats d_tgt{dt_row.narrow(0, 0, h), dt_row.narrow(0, h, h), dt_row.narrow(0, 2 * h, d)};
      Mats dW = cloned(mats_of(gfast[n][hh], 0, lay)), dM = cloned(mats_of(gfast[n][hh], kMomentumRow, lay));
      const auto segs = segments(lay, n);
      auto init_pend = pend_in[n].select(1, hh);
      auto d_init_pend = d_pend[n].select(1, hh);
      for (int64_t i = static_cast<int64_t>(segs.size()) - 1; i >= 0; --i) {
        const Segment& s = segs[i];
        auto rows = [&](const at::Tensor& t) { return t.narrow(0, s.first_token, s.tokens).select(1, hh); };
        auto ck = ckpt[lay.slot[n] + i][hh];
        const Mats W = mats_of(ck, 0, lay), M = mats_of(ck, kMomentumRow, lay);
        const ChunkView mine{rows(ka), rows(va), rows(etaa), rows(mua)};
        ChunkView grad;  // gradient of every row of the chunk
        if (i + 1 < static_cast<int64_t>(segs.size())) {
          ChunkView chunk = mine;
          if (s.pending_before > 0) {
            auto buf = at::empty({C, lay.pend_width()}, qa.options());
            buf.narrow(0, 0, s.pending_before).copy_(init_pend.narrow(0, 0, s.pending_before));
            chunk = ChunkView::of_buffer(buf, d);
            chunk.rows(s.pending_before, s.tokens).copy_from(mine);
          }
          const double gmu = chunk_update_backward(W, M, targets, chunk.k, chunk.v, chunk.eta,
                                                   chunk.mu.mean().item<double>(), lact_order, dW, dM, d_tgt,
                                                   grad.k, grad.v, grad.eta);
          grad.mu = at::full({C}, gmu / static_cast<double>(C), qa.options());
        } else {
          grad = ChunkView::of_buffer(gpend[n].select(1, hh), d);  // the partial chunk only lands in the state
        }
        if (s.pending_before > 0) {
          ChunkView::of_buffer(d_init_pend, d).rows(0, s.pending_before).copy_from(grad.rows(0, s.pending_before));
        }
        if (s.tokens > 0) {
          const ChunkView dmine{rows(dk), rows(dv), rows(deta), rows(dmu)};
          dmine.copy_from(grad.rows(s.pending_before, s.tokens));
          rows(dq).copy_(read_backward(W, rows(qa), rows(doa), residual, dW));
        }
      }
      store(d_fast[n][hh], 0, dW);
      store(d_fast[n][hh], kMomentumRow, dM);
    }
  });

  return io.finish(d_targets.sum(0), q, k, v, eta, mu, w_gate, w_up, w_down);
}

}  // namespace

at::Tensor& tc_phase_clock_slot() {
  // Never destroyed: a CUDA tensor released during static destruction could outlive the allocator.
  static at::Tensor* last = new at::Tensor();
  return *last;
}

TORCH_LIBRARY_IMPL(allmem, CPU, m) {
  m.impl("ttt_memory_fwd", &ttt_memory_fwd_cpu);
  m.impl("ttt_memory_bwd", &ttt_memory_bwd_cpu);
}

}  // namespace allmem::ttt
