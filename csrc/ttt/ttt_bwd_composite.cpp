// The TTT memory backward as batched ATen math: ttt_chunk.h's hand-derived backward with the heads
// of one sequence as the batch dimension ([H, n, x] tokens, [H, h, d] weights), so each step is one
// batched matmul or one elementwise op over all heads, on whatever device the tensors are. The
// walk (sequences, segments in reverse from the checkpoints, the pending chunk) is ttt_cpu.cpp's.
#include "ttt/ttt_bwd_composite.h"

#include <array>
#include <cstdlib>
#include <map>
#include <utility>
#include <cstring>
#include <vector>

#include "common/checks.h"
#include "ttt/ttt_chunk.h"
#include "ttt/ttt_common.h"

namespace allmem::ttt {

BwdChoice bwd_choice() {
  const char* env = std::getenv("ALLMEM_TTT_BWD");
  if (env == nullptr) return BwdChoice::kAuto;
  if (std::strcmp(env, "composite") == 0) return BwdChoice::kComposite;
  if (std::strcmp(env, "kernel") == 0) return BwdChoice::kKernel;
  return BwdChoice::kAuto;
}

namespace {

// gate [H, h, d], up [H, h, d], down [H, d, h]
using BMats = Mats;

// Rows `first`.. of [H, 6, h*d] state rows as batched matrices (views).
BMats bmats_of(const at::Tensor& rows6, int64_t first, int64_t h, int64_t d) {
  const int64_t H = rows6.size(0);
  return {rows6.select(1, first).view({H, h, d}), rows6.select(1, first + 1).view({H, h, d}),
          rows6.select(1, first + 2).view({H, d, h})};
}

at::Tensor tr(const at::Tensor& x) { return x.transpose(-2, -1); }

// Backward of the read o = Wd (silu(Wg q) * (Wu q)) [+ q]: adds to dW, returns dq [H, n, d].
at::Tensor read_backward_b(const BMats& W, const at::Tensor& q, const at::Tensor& dout, bool residual, BMats& dW) {
  auto a = at::matmul(q, tr(W[kGate]));
  auto b = at::matmul(q, tr(W[kUp]));
  auto sig = at::sigmoid(a);
  auto silu = a * sig;
  auto d1 = sig * (1 + a * (1 - sig));
  auto ds = at::matmul(dout, W[kDown]);  // [H, n, h]
  auto s = silu * b;
  auto db = ds * silu;
  auto da = ds * b * d1;
  dW[kDown].baddbmm_(tr(dout), s);
  dW[kGate].baddbmm_(tr(da), q);
  dW[kUp].baddbmm_(tr(db), q);
  auto dq = at::matmul(da, W[kGate]).baddbmm_(db, W[kUp]);
  if (residual) dq.add_(dout);
  return dq;
}

struct Factors {  // the per-token quantities of the update at weights W
  at::Tensor a, b, e, sig, silu, d1, eg, eu, ed;
};

Factors factors(const BMats& W, const at::Tensor& k, const at::Tensor& v, const at::Tensor& eta) {
  Factors f;
  f.a = at::matmul(k, tr(W[kGate]));
  f.b = at::matmul(k, tr(W[kUp]));
  f.e = at::matmul(v, W[kDown]);
  f.sig = at::sigmoid(f.a);
  f.silu = f.a * f.sig;
  f.d1 = f.sig * (1 + f.a * (1 - f.sig));
  f.eg = eta.narrow(2, kGate, 1);
  f.eu = eta.narrow(2, kUp, 1);
  f.ed = eta.narrow(2, kDown, 1);
  return f;
}

// G of SPEC.md at W (ttt_chunk.h update_grad): Gd = -V^T (eta_d s), Gu = -(eta_u e silu(a))^T K,
// Gg = -(eta_g e b silu'(a))^T K.
BMats update_grad_b(const BMats& W, const at::Tensor& k, const at::Tensor& v, const at::Tensor& eta) {
  const Factors f = factors(W, k, v, eta);
  BMats G;
  G[kGate] = at::matmul(tr(f.eg * f.e * f.b * f.d1), k).neg_();
  G[kUp] = at::matmul(tr(f.eu * f.e * f.silu), k).neg_();
  G[kDown] = at::matmul(tr(v), f.ed * f.silu * f.b).neg_();
  return G;
}

// ttt_chunk.h update_grad_backward, batched: returns dL/dW, writes dk, dv [H, n, d], deta [H, n, 3].
BMats update_grad_backward_b(const BMats& W, const at::Tensor& k, const at::Tensor& v, const at::Tensor& eta,
                             const BMats& Gam, at::Tensor& dk, at::Tensor& dv, at::Tensor& deta) {
  const Factors f = factors(W, k, v, eta);
  auto ps = at::matmul(v, Gam[kDown]);
  auto pu = at::matmul(k, tr(Gam[kUp]));
  auto pg = at::matmul(k, tr(Gam[kGate]));
  auto om = 1 - f.sig;
  auto d2 = f.sig * om * (2 + f.a * (1 - 2 * f.sig));
  auto s = f.silu * f.b, xu = f.e * f.silu, xg = f.e * f.b * f.d1;
  auto rd = ps * f.ed, ru = pu * f.eu, rg = pg * f.eg;
  deta = at::stack({(pg * xg).sum(-1), (pu * xu).sum(-1), (ps * s).sum(-1)}, -1).neg_();
  auto de = (ru * f.silu + rg * f.b * f.d1).neg_();
  auto da = (rd * f.b * f.d1 + ru * f.e * f.d1 + rg * f.e * f.b * d2).neg_();
  auto db = (rd * f.silu + rg * f.e * f.d1).neg_();
  dv = at::matmul(de, tr(W[kDown])).sub_(at::matmul(s * f.ed, tr(Gam[kDown])));
  dk = at::matmul(da, W[kGate]).baddbmm_(db, W[kUp]);
  dk.sub_(at::matmul(xu * f.eu, Gam[kUp])).sub_(at::matmul(xg * f.eg, Gam[kGate]));
  BMats dW;
  dW[kGate] = at::matmul(tr(da), k);
  dW[kUp] = at::matmul(tr(db), k);
  dW[kDown] = at::matmul(tr(v), de);
  return dW;
}

}  // namespace

BwdOutputs ttt_memory_bwd_composite(const at::Tensor& grad_o, const std::optional<at::Tensor>& grad_fast,
                                    const std::optional<at::Tensor>& grad_pending, const at::Tensor& q,
                                    const at::Tensor& k, const at::Tensor& v, const at::Tensor& eta,
                                    const at::Tensor& mu, const at::Tensor& w_gate, const at::Tensor& w_up,
                                    const at::Tensor& w_down, const at::Tensor& pending,
                                    const at::Tensor& pending_len, const at::Tensor& checkpoints,
                                    const std::optional<at::Tensor>& cu_seqlens, int64_t chunk_size,
                                    bool lact_order, bool residual) {
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  ALLMEM_NO_AUTOCAST();
  BwdArgs io(grad_o, grad_fast, grad_pending, q, k, v, eta, mu, w_gate, w_up, w_down, pending, pending_len, checkpoints,
             cu_seqlens, chunk_size);
  const Layout& lay = io.lay;
  const int64_t d = lay.d, h = lay.h, C = lay.C, H = lay.H;
  const auto &qa = io.qa, &ka = io.ka, &va = io.va, &etaa = io.etaa, &doa = io.doa, &mua = io.mua;
  const auto &tg = io.tg, &tu = io.tu, &td = io.td, &pend_in = io.pend_in, &ckpt = io.ckpt;
  const auto &gfast = io.gfast, &gpend = io.gpend;
  auto &dq = io.dq, &dk = io.dk, &dv = io.dv, &deta = io.deta, &dmu = io.dmu, &d_fast = io.d_fast, &d_pend = io.d_pend;
  auto d_targets = at::zeros({H, 2 * h + d}, qa.options());
  const int64_t PW = lay.pend_width();
  const auto longs = at::TensorOptions().dtype(at::kLong).device(q.device());
  auto on_device = [&](const std::vector<int64_t>& v) { return at::tensor(v, at::kLong).to(q.device()); };

  // Sequences with the same length and pending length have the same segments: each such group runs
  // as one batch of G * H chains (a dense batch without state is a single group), so a step is one
  // launch for all of them.
  std::map<std::pair<int64_t, int64_t>, std::vector<int64_t>> groups;
  for (int64_t n = 0; n < lay.N; ++n) groups[{lay.len[n], lay.p0[n]}].push_back(n);
  for (const auto& entry : groups) {
    const std::vector<int64_t>& ns = entry.second;
    const int64_t G = static_cast<int64_t>(ns.size()), GH = G * H;
    std::vector<int64_t> starts, slots;
    for (int64_t n : ns) {
      starts.push_back(lay.start[n]);
      slots.push_back(lay.slot[n]);
    }
    const auto ns_t = on_device(ns), starts_t = on_device(starts), slots_t = on_device(slots);
    auto clone3 = [](const BMats& m) { return BMats{m[0].clone(), m[1].clone(), m[2].clone()}; };
    const auto gf = gfast.index_select(0, ns_t).flatten(0, 1);  // [G*H, 6, h*d]
    BMats dW = clone3(bmats_of(gf, 0, h, d)), dM = clone3(bmats_of(gf, kMomentumRow, h, d));
    // [N, C, H, 2d + 4] chunk buffers -> the group's, heads folded into the batch: [G*H, C, 2d + 4].
    auto by_head = [&](const at::Tensor& t) { return t.index_select(0, ns_t).permute({0, 2, 1, 3}).reshape({GH, C, PW}); };
    const auto init_pend = by_head(pend_in), gpend_g = by_head(gpend);
    auto d_init_pend = at::zeros_like(init_pend);
    const BMats tgt{tg.repeat({G, 1}), tu.repeat({G, 1}), td.repeat({G, 1})};
    auto d_tg = at::zeros({GH, 2 * h + d}, qa.options());
    BMats d_tgt{d_tg.narrow(1, 0, h), d_tg.narrow(1, h, h), d_tg.narrow(1, 2 * h, d)};

    const auto segs = segments(lay, ns[0]);
    for (int64_t i = static_cast<int64_t>(segs.size()) - 1; i >= 0; --i) {
      const Segment& s = segs[i];
      const int64_t nt = s.tokens, pos = s.first_token - lay.start[ns[0]];
      // Packed rows of this segment's tokens, sequence by sequence: [G * nt].
      at::Tensor idx;
      if (nt > 0) idx = (starts_t.unsqueeze(1) + pos + at::arange(nt, longs).unsqueeze(0)).flatten();
      // [T, H, x] -> [G*H, nt, x] and [T, H] -> [G*H, nt]; scatter is the inverse, into dst.
      auto gather = [&](const at::Tensor& t) {
        auto r = t.view({t.size(0), H, -1}).index_select(0, idx).view({G, nt, H, -1}).permute({0, 2, 1, 3});
        r = r.reshape({GH, nt, -1});
        return t.dim() == 2 ? r.squeeze(-1) : r;
      };
      auto scatter = [&](at::Tensor& dst, const at::Tensor& val) {
        auto r = val.reshape({G, H, nt, -1}).permute({0, 2, 1, 3}).reshape({G * nt, H, -1});
        dst.view({dst.size(0), H, -1}).index_copy_(0, idx, r);
      };
      const auto ck = ckpt.index_select(0, slots_t + i).flatten(0, 1);  // (W, M) at the segment start
      const BMats W = bmats_of(ck, 0, h, d), M = bmats_of(ck, kMomentumRow, h, d);
      ChunkView mine;
      if (nt > 0) mine = {gather(ka), gather(va), gather(etaa), gather(mua)};
      ChunkView grad;  // gradient of every row of the chunk
      if (i + 1 < static_cast<int64_t>(segs.size())) {
        ChunkView chunk = mine;
        if (s.pending_before > 0) {
          auto buf = at::empty({GH, C, PW}, qa.options());
          buf.narrow(1, 0, s.pending_before).copy_(init_pend.narrow(1, 0, s.pending_before));
          chunk = ChunkView::of_buffer(buf, d);
          chunk.rows(s.pending_before, nt).copy_from(mine);
        }
        auto gmu = chunk_update_backward_impl(W, M, tgt, chunk.k, chunk.v, chunk.eta, chunk.mu.mean(1).view({-1, 1, 1}),
                                              lact_order, dW, dM, d_tgt, grad.k, grad.v, grad.eta, update_grad_b,
                                              update_grad_backward_b);
        grad.mu = (gmu / static_cast<double>(C)).unsqueeze(1).expand({GH, C});
      } else {
        grad = ChunkView::of_buffer(gpend_g, d);  // the partial chunk only lands in the state
      }
      if (s.pending_before > 0) {
        ChunkView::of_buffer(d_init_pend, d).rows(0, s.pending_before).copy_from(grad.rows(0, s.pending_before));
      }
      if (nt > 0) {
        const ChunkView g = grad.rows(s.pending_before, nt);
        scatter(dk, g.k);
        scatter(dv, g.v);
        scatter(deta, g.eta);
        scatter(dmu, g.mu);
        scatter(dq, read_backward_b(W, gather(qa), gather(doa), residual, dW));
      }
    }
    auto df = at::empty({GH, kFastRows, h * d}, qa.options());
    for (int m = 0; m < 3; ++m) {
      df.select(1, m).copy_(dW[m].reshape({GH, h * d}));
      df.select(1, kMomentumRow + m).copy_(dM[m].reshape({GH, h * d}));
    }
    d_fast.index_copy_(0, ns_t, df.view({G, H, kFastRows, h * d}));
    d_pend.index_copy_(0, ns_t, d_init_pend.view({G, H, C, PW}).permute({0, 2, 1, 3}));
    d_targets.add_(d_tg.view({G, H, -1}).sum(0));
  }

  return io.finish(d_targets, q, k, v, eta, mu, w_gate, w_up, w_down);
}

}  // namespace allmem::ttt
