// Per-chunk math of the TTT memory (SPEC.md "The memory branch, exactly") for one sequence and
// one head, forward and hand-derived backward, on small dense CPU tensors of the accumulation
// dtype (float32, or float64 for float64 inputs). Every backward below is derived by hand; the
// CUDA kernels are meant to follow the same decomposition: read, row normalization, closed-form
// update gradient, momentum.
#pragma once
#include <ATen/ATen.h>

#include <array>

namespace allmem::ttt {

constexpr double kNormEps = 1e-5;  // added to the current row norm (SPEC.md)

// The three fast-weight matrices (or their momenta, targets, gradients) in SPEC order:
// gate [h, d], up [h, d], down [d, h]; norm targets are [h], [h], [d].
using Mats = std::array<at::Tensor, 3>;
enum : int { kGate = 0, kUp = 1, kDown = 2 };

// silu and its first two derivatives from the pre-activation a; sigma = sigmoid(a).
struct Silu {
  at::Tensor silu, d1, d2;
};
inline Silu silu_terms(const at::Tensor& a, bool second) {
  auto sig = at::sigmoid(a);
  Silu r;
  r.silu = a * sig;
  auto one_minus = 1 - sig;
  r.d1 = sig * (1 + a * one_minus);
  if (second) r.d2 = sig * one_minus * (2 + a * (1 - 2 * sig));
  return r;
}

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

// Read: o = Wd (silu(Wg q) * (Wu q)) [+ q], q [n, d] -> o [n, d].
inline at::Tensor read_forward(const Mats& W, const at::Tensor& q, bool residual) {
  auto a = at::mm(q, W[kGate].t());
  auto b = at::mm(q, W[kUp].t());
  auto o = at::mm(at::silu(a) * b, W[kDown].t());
  if (residual) o.add_(q);
  return o;
}

// Backward of read_forward: adds dL/dW to dW, returns dL/dq.
inline at::Tensor read_backward(const Mats& W, const at::Tensor& q, const at::Tensor& dout, bool residual,
                                Mats& dW) {
  auto a = at::mm(q, W[kGate].t());
  auto b = at::mm(q, W[kUp].t());
  auto act = silu_terms(a, false);
  auto ds = at::mm(dout, W[kDown]);  // [n, h]
  auto da = ds * b * act.d1;
  auto db = ds * act.silu;
  dW[kDown].addmm_(dout.t(), act.silu * b);
  dW[kGate].addmm_(da.t(), q);
  dW[kUp].addmm_(db.t(), q);
  auto dq = at::mm(da, W[kGate]).addmm_(db, W[kUp]);
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
  auto act = silu_terms(a, false);
  Mats G;
  G[kDown] = at::mm(v.t(), act.silu * b * eta.narrow(1, kDown, 1)).neg_();
  G[kUp] = at::mm((e * act.silu * eta.narrow(1, kUp, 1)).t(), k).neg_();
  G[kGate] = at::mm((e * b * act.d1 * eta.narrow(1, kGate, 1)).t(), k).neg_();
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
  auto act = silu_terms(a, true);
  auto s = act.silu * b;
  auto xu = e * act.silu;
  auto xg = e * b * act.d1;
  auto ps = at::mm(v, Gam[kDown]);
  auto pu = at::mm(k, Gam[kUp].t());
  auto pg = at::mm(k, Gam[kGate].t());
  auto eg = eta.narrow(1, kGate, 1), eu = eta.narrow(1, kUp, 1), ed = eta.narrow(1, kDown, 1);
  deta = at::stack({(pg * xg).sum(1), (pu * xu).sum(1), (ps * s).sum(1)}, 1).neg_();
  auto rd = ps * ed, ru = pu * eu, rg = pg * eg;
  auto de = (ru * act.silu).add_(rg * b * act.d1).neg_();
  auto da = (rd * b * act.d1).add_(ru * e * act.d1).add_(rg * e * b * act.d2).neg_();
  auto db = (rd * act.silu).add_(rg * e * act.d1).neg_();
  dv = at::mm(de, W[kDown].t()).sub_(at::mm(s * ed, Gam[kDown].t()));
  dk = at::mm(da, W[kGate]).addmm_(db, W[kUp]).sub_(at::mm(xu * eu, Gam[kUp])).sub_(at::mm(xg * eg, Gam[kGate]));
  Mats dW;
  dW[kGate] = at::mm(da.t(), k);
  dW[kUp] = at::mm(db.t(), k);
  dW[kDown] = at::mm(v.t(), de);
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
inline double chunk_update_backward(const Mats& W, const Mats& M, const Mats& targets, const at::Tensor& k,
                                    const at::Tensor& v, const at::Tensor& eta, double mu_j, bool lact_order,
                                    Mats& dW, Mats& dM, Mats& dtargets, at::Tensor& dk, at::Tensor& dv,
                                    at::Tensor& deta) {
  Mats dM_new, Gam;  // dM_new: total gradient wrt the new momentum; Gam = dL/dG = -dM_new
  double dmu = 0.0;
  if (lact_order) {
    auto G = update_grad(W, k, v, eta);
    Mats dZ;
    for (int i = 0; i < 3; ++i) {
      auto Z = W[i] + (M[i] * mu_j).sub_(G[i]);
      dZ[i] = row_normalize_backward(Z, targets[i], dW[i], dtargets[i]);
      dM_new[i] = dM[i] + dZ[i];
      Gam[i] = -dM_new[i];
    }
    auto dW_G = update_grad_backward(W, k, v, eta, Gam, dk, dv, deta);
    for (int i = 0; i < 3; ++i) dW[i] = dZ[i] + dW_G[i];
  } else {
    Mats W_hat;
    for (int i = 0; i < 3; ++i) {
      W_hat[i] = row_normalize(W[i], targets[i]);
      dM_new[i] = dM[i] + dW[i];
      Gam[i] = -dM_new[i];
    }
    auto dW_hat = update_grad_backward(W_hat, k, v, eta, Gam, dk, dv, deta);
    for (int i = 0; i < 3; ++i) {
      dW_hat[i].add_(dW[i]);
      dW[i] = row_normalize_backward(W[i], targets[i], dW_hat[i], dtargets[i]);
    }
  }
  for (int i = 0; i < 3; ++i) {
    dmu += (dM_new[i] * M[i]).sum().item<double>();
    dM[i] = dM_new[i] * mu_j;
  }
  return dmu;
}

}  // namespace allmem::ttt
