// Per-chunk math of the TTT memory (SPEC.md "The memory branch, exactly") for one sequence and
// one head, forward and hand-derived backward, on small dense CPU tensors of the accumulation
// dtype (float32, or float64 for float64 inputs). Every backward below is derived by hand; the
// CUDA kernels are meant to follow the same decomposition: read, row normalization, closed-form
// update gradient, momentum.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "ttt/ttt_common.h"

namespace allmem::ttt {

constexpr double kNormEps = 1e-5;  // added to the current row norm (SPEC.md)

// The three fast-weight matrices (or their momenta, targets, gradients) in SPEC order:
// gate [h, d], up [h, d], down [d, h]; norm targets are [h], [h], [d].
using Mats = std::array<at::Tensor, 3>;
enum : int { kGate = 0, kUp = 1, kDown = 2 };

inline at::Tensor row_norm(const at::Tensor& w) {
  return at::linalg_vector_norm(w, 2, at::IntArrayRef{-1}, false, std::nullopt);
}

// w_hat = w * target / (||w|| + eps), rows along the last dim.
inline at::Tensor row_normalize(const at::Tensor& w, const at::Tensor& target) {
  return w * (target / (row_norm(w) + kNormEps)).unsqueeze(-1);
}

// Backward of row_normalize: with rho = ||w||, c = target / (rho + eps),
//   dw = c * g - target * <g, w> / ((rho + eps)^2 * rho) * w,   dtarget = <g, w> / (rho + eps).
// A zero row has <g, w> = 0, so its second term vanishes; rho is guarded only to avoid 0/0.
inline at::Tensor row_normalize_backward(const at::Tensor& w, const at::Tensor& target, const at::Tensor& g,
                                         at::Tensor& dtarget) {
  auto rho = row_norm(w);
  auto denom = rho + kNormEps;
  auto gw = (g * w).sum(-1);
  dtarget.add_(gw / denom);
  auto rho_safe = at::where(rho > 0, rho, at::ones_like(rho));
  auto coef = -target * gw / (denom * denom * rho_safe);
  return g * (target / denom).unsqueeze(-1) + w * coef.unsqueeze(-1);
}

// A chunk's k [.., n, d], v [.., n, d], eta [.., n, 3], mu [.., n] (any leading batch dims): either
// rows of the chunk buffer [.., n, 2d+4] (k | v | eta | mu) or views of the token tensors.
struct ChunkView {
  at::Tensor k, v, eta, mu;
  static ChunkView of_buffer(const at::Tensor& buf, int64_t d) {
    return {buf.narrow(-1, 0, d), buf.narrow(-1, d, d), buf.narrow(-1, 2 * d, 3), buf.select(-1, 2 * d + 3)};
  }
  ChunkView rows(int64_t from, int64_t count) const {
    return {k.narrow(-2, from, count), v.narrow(-2, from, count), eta.narrow(-2, from, count),
            mu.narrow(-1, from, count)};
  }
  void copy_from(const ChunkView& src) const {
    k.copy_(src.k);
    v.copy_(src.v);
    eta.copy_(src.eta);
    mu.copy_(src.mu);
  }
};

// The norm targets are the initial weights' row norms N = ||w[r]||, so dL/dw[r] = dN[r] w[r] / ||w[r]||
// (0 for a zero row).
inline at::Tensor target_param_grad(const at::Tensor& w, const at::Tensor& target, const at::Tensor& dtarget) {
  auto safe = at::where(target > 0, target, at::ones_like(target));
  // w.contiguous(): the gradient is contiguous whatever w's strides (as the fake kernel says).
  return w.contiguous() * (dtarget * (target > 0).to(w.scalar_type()) / safe).unsqueeze(-1);
}

// The elementwise parts below run as one fused pass over [n, h] (sigmoid itself stays a
// vectorized ATen op): the chunk-sized intermediates are read and written once instead of once
// per ATen op. All [n, h] tensors here are fresh contiguous matmul outputs; eta rows may be
// strided (a view of the chunk buffer).
template <typename scalar_t>
struct EtaRows {
  const scalar_t* p;
  int64_t stride;
  scalar_t operator()(int64_t t, int m) const { return p[t * stride + m]; }
};

template <typename scalar_t>
EtaRows<scalar_t> eta_rows(const at::Tensor& eta) {
  TORCH_INTERNAL_ASSERT(eta.dim() == 2 && eta.size(1) == 3 && eta.stride(1) == 1);
  return {eta.data_ptr<scalar_t>(), eta.stride(0)};
}

// Read: o = Wd (silu(Wg q) * (Wu q)) [+ q], q [n, d] -> o [n, d].
inline at::Tensor read_forward(const Mats& W, const at::Tensor& q, bool residual) {
  auto a = at::mm(q, W[kGate].t());
  auto b = at::mm(q, W[kUp].t());
  auto o = at::mm(at::silu(a) * b, W[kDown].t());
  if (residual) o.add_(q);
  return o;
}

// Backward of read_forward: adds dL/dW to dW, returns dL/dq.
//   ds = dO Wd, da = ds b silu'(a), db = ds silu(a); dWd += dO^T s, dWg += da^T Q, dWu += db^T Q.
inline at::Tensor read_backward(const Mats& W, const at::Tensor& q, const at::Tensor& dout, bool residual,
                                Mats& dW) {
  auto a = at::mm(q, W[kGate].t());
  auto b = at::mm(q, W[kUp].t());
  auto sig = at::sigmoid(a);
  auto ds = at::mm(dout, W[kDown]);  // [n, h]
  const int64_t count = a.numel();
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "ttt_read_backward", [&] {
    scalar_t* pa = a.data_ptr<scalar_t>();   // a -> s
    scalar_t* pb = b.data_ptr<scalar_t>();   // b -> db
    scalar_t* pd = ds.data_ptr<scalar_t>();  // ds -> da
    const scalar_t* ps = sig.data_ptr<scalar_t>();
    for (int64_t i = 0; i < count; ++i) {
      const scalar_t x = pa[i], y = pb[i], g = pd[i], sg = ps[i];
      const scalar_t silu = x * sg, d1 = sg * (1 + x * (1 - sg));
      pa[i] = silu * y;
      pb[i] = g * silu;
      pd[i] = g * y * d1;
    }
  });
  dW[kDown].addmm_(dout.t(), a);
  dW[kGate].addmm_(ds.t(), q);
  dW[kUp].addmm_(b.t(), q);
  auto dq = at::mm(ds, W[kGate]).addmm_(b, W[kUp]);
  if (residual) dq.add_(dout);
  return dq;
}

// The closed-form chunk gradient of SPEC.md at weights W, chunk k, v [C, d], eta [C, 3]:
//   a = K Wg^T, b = K Wu^T, e = V Wd (rows e_t = Wd^T v_t), s = silu(a) b
//   Gd = -V^T (eta_d s),  Gu = -(eta_u e silu(a))^T K,  Gg = -(eta_g e b silu'(a))^T K.
inline Mats update_grad(const Mats& W, const at::Tensor& k, const at::Tensor& v, const at::Tensor& eta) {
  auto a = at::mm(k, W[kGate].t());
  auto b = at::mm(k, W[kUp].t());
  auto e = at::mm(v, W[kDown]);
  auto sig = at::sigmoid(a);
  const int64_t n = a.size(0), h = a.size(1);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "ttt_update_grad", [&] {
    scalar_t* pa = a.data_ptr<scalar_t>();  // a -> eta_g e b silu'(a)
    scalar_t* pb = b.data_ptr<scalar_t>();  // b -> eta_d s
    scalar_t* pe = e.data_ptr<scalar_t>();  // e -> eta_u e silu(a)
    const scalar_t* ps = sig.data_ptr<scalar_t>();
    const auto rate = eta_rows<scalar_t>(eta);
    for (int64_t t = 0; t < n; ++t) {
      const scalar_t eg = rate(t, kGate), eu = rate(t, kUp), ed = rate(t, kDown);
      for (int64_t j = t * h; j < (t + 1) * h; ++j) {
        const scalar_t x = pa[j], y = pb[j], z = pe[j], sg = ps[j];
        const scalar_t silu = x * sg, d1 = sg * (1 + x * (1 - sg));
        pa[j] = eg * z * y * d1;
        pb[j] = ed * silu * y;
        pe[j] = eu * z * silu;
      }
    }
  });
  Mats G;
  G[kDown] = at::mm(v.t(), b).neg_();
  G[kUp] = at::mm(e.t(), k).neg_();
  G[kGate] = at::mm(a.t(), k).neg_();
  return G;
}

// Backward of update_grad given Gam = dL/dG (same shapes as G). Returns dL/dW and writes
// dL/dk, dL/dv [C, d] and dL/deta [C, 3]. With per-token projections
//   ps = V Gam_d (rows (Gam_d^T v_t)^T), pu = K Gam_u^T, pg = K Gam_g^T, and x_u = e silu(a),
//   x_g = e b silu'(a):
//   deta_d = -<ps, s>, deta_u = -<pu, x_u>, deta_g = -<pg, x_g>        (per token)
//   ds = -eta_d ps
//   de = -eta_u pu silu(a) - eta_g pg b silu'(a)
//   da = ds b silu'(a) - eta_u pu e silu'(a) - eta_g pg e b silu''(a)
//   db = ds silu(a) - eta_g pg e silu'(a)
//   dv = -(eta_d s) Gam_d^T + de Wd^T
//   dk = -(eta_u x_u) Gam_u - (eta_g x_g) Gam_g + da Wg + db Wu
//   dWg = da^T K, dWu = db^T K, dWd = V^T de.
inline Mats update_grad_backward(const Mats& W, const at::Tensor& k, const at::Tensor& v, const at::Tensor& eta,
                                 const Mats& Gam, at::Tensor& dk, at::Tensor& dv, at::Tensor& deta) {
  auto a = at::mm(k, W[kGate].t());
  auto b = at::mm(k, W[kUp].t());
  auto e = at::mm(v, W[kDown]);
  auto sig = at::sigmoid(a);
  auto ps = at::mm(v, Gam[kDown]);
  auto pu = at::mm(k, Gam[kUp].t());
  auto pg = at::mm(k, Gam[kGate].t());
  const int64_t n = a.size(0), h = a.size(1);
  deta = at::empty({n, 3}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "ttt_update_grad_backward", [&] {
    // In place: a -> da, b -> db, e -> de, ps -> eta_d s, pu -> eta_u x_u, pg -> eta_g x_g.
    scalar_t *pa = a.data_ptr<scalar_t>(), *pb = b.data_ptr<scalar_t>(), *pe = e.data_ptr<scalar_t>();
    scalar_t *pps = ps.data_ptr<scalar_t>(), *ppu = pu.data_ptr<scalar_t>(), *ppg = pg.data_ptr<scalar_t>();
    const scalar_t* psig = sig.data_ptr<scalar_t>();
    scalar_t* pdeta = deta.data_ptr<scalar_t>();
    const auto rate = eta_rows<scalar_t>(eta);
    for (int64_t t = 0; t < n; ++t) {
      const scalar_t eg = rate(t, kGate), eu = rate(t, kUp), ed = rate(t, kDown);
      scalar_t sum_g = 0, sum_u = 0, sum_d = 0;
      for (int64_t j = t * h; j < (t + 1) * h; ++j) {
        const scalar_t x = pa[j], y = pb[j], z = pe[j], sg = psig[j];
        const scalar_t om = 1 - sg;
        const scalar_t silu = x * sg, d1 = sg * (1 + x * om), d2 = sg * om * (2 + x * (1 - 2 * sg));
        const scalar_t s = silu * y, xu = z * silu, xg = z * y * d1;
        const scalar_t rd = pps[j] * ed, ru = ppu[j] * eu, rg = ppg[j] * eg;
        sum_g += ppg[j] * xg;
        sum_u += ppu[j] * xu;
        sum_d += pps[j] * s;
        pe[j] = -(ru * silu + rg * y * d1);
        pa[j] = -(rd * y * d1 + ru * z * d1 + rg * z * y * d2);
        pb[j] = -(rd * silu + rg * z * d1);
        pps[j] = s * ed;
        ppu[j] = xu * eu;
        ppg[j] = xg * eg;
      }
      pdeta[3 * t + kGate] = -sum_g;
      pdeta[3 * t + kUp] = -sum_u;
      pdeta[3 * t + kDown] = -sum_d;
    }
  });
  dv = at::mm(e, W[kDown].t()).sub_(at::mm(ps, Gam[kDown].t()));
  dk = at::mm(a, W[kGate]).addmm_(b, W[kUp]).sub_(at::mm(pu, Gam[kUp])).sub_(at::mm(pg, Gam[kGate]));
  Mats dW;
  dW[kGate] = at::mm(a.t(), k);
  dW[kUp] = at::mm(b.t(), k);
  dW[kDown] = at::mm(v.t(), e);
  return dW;
}

// One chunk update (SPEC.md steps 2-3), in place on W, M. mu_j = mean of the chunk's mu.
//   default:    W_hat = normalize(W); M = mu_j M - G(W_hat); W = W_hat + M
//   lact_order: M = mu_j M - G(W); W = normalize(W + M)
inline void chunk_update(Mats& W, Mats& M, const Mats& targets, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& eta, double mu_j, bool lact_order) {
  if (lact_order) {
    auto G = update_grad(W, k, v, eta);
    for (int i = 0; i < 3; ++i) {
      M[i] = (M[i] * mu_j).sub_(G[i]);
      W[i] = row_normalize(W[i] + M[i], targets[i]);
    }
  } else {
    Mats W_hat;
    for (int i = 0; i < 3; ++i) W_hat[i] = row_normalize(W[i], targets[i]);
    auto G = update_grad(W_hat, k, v, eta);
    for (int i = 0; i < 3; ++i) {
      M[i] = (M[i] * mu_j).sub_(G[i]);
      W[i] = W_hat[i] + M[i];
    }
  }
}

// Backward of chunk_update. W, M: the values before the update. On entry dW, dM hold the
// gradients wrt the updated W, M; on exit wrt W, M before it. Adds to dtargets, writes dk, dv,
// deta of the chunk's tokens and returns dL/dmu_j (each token's mu gets 1/C of it).
// With M' = mu_j M - G and dM' the total gradient reaching M' (default order: dM + dW, since
// W' = W_hat + M'; LaCT order: dM + dZ, Z = W + M' the input of the final normalization):
//   dL/dM = mu_j dM',  dL/dmu_j = <dM', M> (all three matrices),  dL/dG = -dM',
// then update_grad_backward at the weights G was taken at, and row_normalize_backward.
// Generic over a leading batch of chains (ttt_bwd_composite.cpp): the matrices may be [.., r, c],
// mu_j a double or a tensor broadcasting against them, `grad` / `grad_backward` the update_grad /
// update_grad_backward for that layout; dL/dmu_j comes back summed over each matrix's last two
// dims (a 0-dim tensor for one chain).
template <class Mu, class Grad, class GradBackward>
at::Tensor chunk_update_backward_impl(const Mats& W, const Mats& M, const Mats& targets, const at::Tensor& k,
                                      const at::Tensor& v, const at::Tensor& eta, const Mu& mu_j, bool lact_order,
                                      Mats& dW, Mats& dM, Mats& dtargets, at::Tensor& dk, at::Tensor& dv,
                                      at::Tensor& deta, Grad grad, GradBackward grad_backward) {
  Mats dM_new, Gam;  // dM_new: total gradient wrt the new momentum; Gam = dL/dG = -dM_new
  if (lact_order) {
    auto G = grad(W, k, v, eta);
    Mats dZ;
    for (int i = 0; i < 3; ++i) {
      auto Z = W[i] + (M[i] * mu_j).sub_(G[i]);
      dZ[i] = row_normalize_backward(Z, targets[i], dW[i], dtargets[i]);
      dM_new[i] = dM[i] + dZ[i];
      Gam[i] = -dM_new[i];
    }
    auto dW_G = grad_backward(W, k, v, eta, Gam, dk, dv, deta);
    for (int i = 0; i < 3; ++i) dW[i] = dZ[i] + dW_G[i];
  } else {
    Mats W_hat;
    for (int i = 0; i < 3; ++i) {
      W_hat[i] = row_normalize(W[i], targets[i]);
      dM_new[i] = dM[i] + dW[i];
      Gam[i] = -dM_new[i];
    }
    auto dW_hat = grad_backward(W_hat, k, v, eta, Gam, dk, dv, deta);
    for (int i = 0; i < 3; ++i) {
      dW_hat[i].add_(dW[i]);
      dW[i] = row_normalize_backward(W[i], targets[i], dW_hat[i], dtargets[i]);
    }
  }
  at::Tensor dmu;
  for (int i = 0; i < 3; ++i) {
    auto part = (dM_new[i] * M[i]).sum(at::IntArrayRef{-2, -1});
    dmu = i == 0 ? part : dmu.add_(part);
    dM[i] = dM_new[i] * mu_j;
  }
  return dmu;
}

// One chain (the CPU op).
inline double chunk_update_backward(const Mats& W, const Mats& M, const Mats& targets, const at::Tensor& k,
                                    const at::Tensor& v, const at::Tensor& eta, double mu_j, bool lact_order,
                                    Mats& dW, Mats& dM, Mats& dtargets, at::Tensor& dk, at::Tensor& dv,
                                    at::Tensor& deta) {
  return chunk_update_backward_impl(W, M, targets, k, v, eta, mu_j, lact_order, dW, dM, dtargets, dk, dv, deta,
                                    update_grad, update_grad_backward)
      .item<double>();
}

// The arguments of ttt_memory_bwd, checked, in the accumulation dtype as packed [T, H, x] tokens,
// and its outputs allocated: what both CPU-side backwards (ttt_cpu.cpp, ttt_bwd_composite.cpp)
// start from. finish() turns the summed norm-target gradients [H, 2h + d] into the parameters'
// gradients and returns the op's outputs in the input dtype.
struct BwdArgs {
  Layout lay;
  at::ScalarType acc;
  at::Tensor qa, ka, va, etaa, doa, mua, tg, tu, td, pend_in, ckpt, gfast, gpend;
  at::Tensor dq, dk, dv, deta, dmu, d_fast, d_pend;

  BwdArgs(const at::Tensor& grad_o, const std::optional<at::Tensor>& grad_fast,
          const std::optional<at::Tensor>& grad_pending, const at::Tensor& q, const at::Tensor& k,
          const at::Tensor& v, const at::Tensor& eta, const at::Tensor& mu, const at::Tensor& w_gate,
          const at::Tensor& w_up, const at::Tensor& w_down, const at::Tensor& pending, const at::Tensor& pending_len,
          const at::Tensor& checkpoints, const std::optional<at::Tensor>& cu_seqlens, int64_t chunk_size,
          bool token_copies = true)
      : acc(accumulate_dtype(q.scalar_type())) {
    lay = check_and_layout(q, k, v, eta, mu, w_gate, w_up, w_down, pending, pending_len, cu_seqlens, chunk_size, acc);
    const int64_t d = lay.d, h = lay.h;
    ALLMEM_CHECK(grad_o.sizes() == q.sizes(), "grad_o must have the shape of q ", shape_str(q), ", got ",
                 shape_str(grad_o));
    check_same_device(grad_o, "grad_o", q, "q");
    const std::vector<int64_t> fast_shape{lay.N, lay.H, kFastRows, h * d};
    if (grad_fast.has_value()) check_state_tensor(*grad_fast, "grad_fast", fast_shape, acc, q);
    if (grad_pending.has_value()) check_state_tensor(*grad_pending, "grad_pending", pending.sizes(), acc, q);
    check_state_tensor(checkpoints, "checkpoints", {lay.slots(), lay.H, kFastRows, h * d}, acc, q);
    const auto acc_opts = q.options().dtype(acc);
    tg = row_norm(w_gate), tu = row_norm(w_up), td = row_norm(w_down);
    pend_in = pending.contiguous(), ckpt = checkpoints.contiguous();
    gfast = grad_fast.has_value() ? grad_fast->contiguous() : at::zeros(fast_shape, acc_opts);
    gpend = grad_pending.has_value() ? grad_pending->contiguous() : at::zeros_like(pend_in);
    d_fast = at::empty(fast_shape, acc_opts);
    d_pend = at::zeros_like(pend_in);
    // token_copies = false (the composite backward): no whole-sequence copies in the accumulation
    // dtype; the caller reads the inputs as they are and allocates and fills dq..dmu itself.
    if (!token_copies) return;
    auto tokens = [&](const at::Tensor& t) { return t.to(acc).contiguous().view({lay.T, t.size(-2), t.size(-1)}); };
    qa = tokens(q), ka = tokens(k), va = tokens(v), etaa = tokens(eta), doa = tokens(grad_o);
    mua = mu.to(acc).contiguous().view({lay.T, lay.H});
    dq = at::empty_like(qa), dk = at::empty_like(ka), dv = at::empty_like(va), deta = at::empty_like(etaa);
    dmu = at::empty_like(mua);
  }

  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
             at::Tensor, at::Tensor>
  finish(const at::Tensor& d_targets, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
         const at::Tensor& eta, const at::Tensor& mu, const at::Tensor& w_gate, const at::Tensor& w_up,
         const at::Tensor& w_down) const {
    const int64_t d = lay.d, h = lay.h;
    auto dwg = target_param_grad(w_gate, tg, d_targets.narrow(1, 0, h));
    auto dwu = target_param_grad(w_up, tu, d_targets.narrow(1, h, h));
    auto dwd = target_param_grad(w_down, td, d_targets.narrow(1, 2 * h, d));
    const auto in_dt = q.scalar_type();
    auto back = [&](const at::Tensor& t, const at::Tensor& like) { return t.view(like.sizes()).to(in_dt); };
    return {back(dq, q), back(dk, k), back(dv, v), back(deta, eta), back(dmu, mu), dwg, dwu, dwd, d_fast, d_pend};
  }
};

}  // namespace allmem::ttt
