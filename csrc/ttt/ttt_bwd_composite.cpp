// The TTT memory backward (and, opt-in, forward) as batched ATen math: ttt_chunk.h's hand-derived
// backward with the heads of a group of sequences as the batch dimension ([G*H, C, x] tokens,
// [G*H, 3, h*d] packed weights), on whatever device the tensors are. Per completed chunk: the row
// normalization, two products with stacked weights, one step for the per-token terms, four
// products for dk, dv and the weight gradients, the normalization's backward (on CUDA the
// non-matmul steps are single kernels, ttt_composite_kernels.cu). The reads (and their backward)
// need only the checkpoints, so they run for a whole block of chunks at once, outside the chain;
// tokens are gathered and scattered per block, in the input dtype. The walk (segments in reverse
// from the checkpoints, the pending chunk) is ttt_cpu.cpp's; struct Group below says how
// sequences are batched.
#include "ttt/ttt_bwd_composite.h"

#include <ATen/record_function.h>
#include <torch/version.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <map>
#include <optional>
#include <utility>
#include <cstring>
#include <vector>

#include "common/checks.h"
#include "ttt/ttt_chunk.h"
#include "ttt/ttt_common.h"
#ifdef ALLMEM_WITH_CUDA
#include "ttt/ttt_composite_cuda.h"
#endif

namespace allmem::ttt {

BwdChoice bwd_choice() {
  const char* env = std::getenv("ALLMEM_TTT_BWD");
  if (env == nullptr) return BwdChoice::kAuto;
  if (std::strcmp(env, "composite") == 0) return BwdChoice::kComposite;
  if (std::strcmp(env, "kernel") == 0) return BwdChoice::kKernel;
  return BwdChoice::kAuto;
}

bool composite_fwd_requested() {
  const char* env = std::getenv("ALLMEM_TTT_FWD");
  return env != nullptr && std::strcmp(env, "composite") == 0;
}

namespace {

// Buffers of one block of chunks are kept under this many bytes (the gathered tokens, their
// gradients and the read's temporaries); the walk goes block by block. ALLMEM_TTT_COMPOSITE_BLOCK
// (a positive integer, read at every call) caps the chunks per block further (tests, tuning).
constexpr int64_t kBlockBytes = int64_t{1} << 30;

int64_t max_block_chunks(int64_t bytes_per_chunk) {
  int64_t nb = std::max<int64_t>(1, kBlockBytes / std::max<int64_t>(bytes_per_chunk, 1));
  if (const char* env = std::getenv("ALLMEM_TTT_COMPOSITE_BLOCK")) {
    const long long cap = std::atoll(env);
    if (cap > 0) nb = std::min<int64_t>(nb, cap);
  }
  return nb;
}

// The fused CUDA steps (ttt_composite_kernels.cu) for float32 CUDA tensors with
// ALLMEM_TTT_COMPOSITE_KERNELS=1 (read at every call; opt-in until they have passed their GPU tests:
// written without a GPU); otherwise, and on the CPU, the ATen sequences below.
bool use_kernels(const at::Tensor& t) {
#ifdef ALLMEM_WITH_CUDA
  if (!t.is_cuda() || t.scalar_type() != at::kFloat) return false;
  const char* env = std::getenv("ALLMEM_TTT_COMPOSITE_KERNELS");
  return env != nullptr && std::strcmp(env, "1") == 0;
#else
  (void)t;
  return false;
#endif
}

// How the composite's matmuls take their operands. Default: float32 (float64 on the CPU for float64
// inputs), IEEE whatever the TF32 setting (ALLMEM_NO_TF32 at both entry points).
// ALLMEM_TTT_COMPOSITE_MM=16 (read at every call; opt-in, for bfloat16/float16 inputs): operands
// rounded to the input dtype, float32 accumulation and results, as the tensor-core kernels and a bf16-autocast reference round them: on CUDA cuBLAS's
// 16-bit tensor-core GEMMs (at::bmm with out_dtype float32); on the CPU the same values in float32
// (a product of two 16-bit numbers is exact in float32), for the tests.
struct Mm {
  bool low = false;
  at::ScalarType dt = at::kFloat;

  static Mm for_inputs(const at::Tensor& q) {
    Mm m;
    const char* env = std::getenv("ALLMEM_TTT_COMPOSITE_MM");
    const auto st = q.scalar_type();
    m.low = env != nullptr && std::strcmp(env, "16") == 0 && (st == at::kBFloat16 || st == at::kHalf);
    m.dt = st;
    return m;
  }
  // An operand as the matmuls take it (a no-op in float32 mode or where it is 16-bit already).
  at::Tensor lo(const at::Tensor& x) const { return low && x.scalar_type() != dt ? x.to(dt) : x; }
  at::Tensor bmm(const at::Tensor& a, const at::Tensor& b) const {
    if (!low) return at::bmm(a, b);
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)  // bmm.dtype
    if (a.is_cuda()) return at::bmm(lo(a), lo(b), at::kFloat);
#endif
    return at::bmm(lo(a).to(at::kFloat), lo(b).to(at::kFloat));
  }
  void bmm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) const {
    if (!low) {
      at::bmm_out(out, a, b);
      return;
    }
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
    if (a.is_cuda()) {
      at::bmm_out(out, lo(a), lo(b), at::kFloat);
      return;
    }
#endif
    at::bmm_out(out, lo(a).to(at::kFloat), lo(b).to(at::kFloat));
  }
};

// Packed fast-weight tensors [B, 3, h*d] (gate [h, d], up [h, d], down [d, h], rows back to back;
// any batch stride): gate and up stacked as [B, 2h, d], down as [B, d, h] (views).
at::Tensor gate_up(const at::Tensor& t, int64_t h, int64_t d) { return t.narrow(1, 0, 2).view({t.size(0), 2 * h, d}); }
at::Tensor down(const at::Tensor& t, int64_t h, int64_t d) { return t.select(1, 2).view({t.size(0), d, h}); }
Mats mats3(const at::Tensor& t, int64_t h, int64_t d) {
  const int64_t B = t.size(0);
  return {t.select(1, 0).view({B, h, d}), t.select(1, 1).view({B, h, d}), down(t, h, d)};
}
// Targets (row norms) [B, 2h + d] of gate | up | down as per-matrix views.
Mats targets3(const at::Tensor& t, int64_t h, int64_t d) { return {t.narrow(1, 0, h), t.narrow(1, h, h), t.narrow(1, 2 * h, d)}; }

// normalize(w) row by row (SPEC.md step 2) -> [B, 3, h*d] contiguous.
at::Tensor row_normalize3(const at::Tensor& w, const at::Tensor& target, int64_t d, int64_t h) {
  RECORD_FUNCTION("allmem::composite_row_norm", std::vector<c10::IValue>());  // one launch on CUDA (bench: launch counts)
  auto out = at::empty({w.size(0), 3, h * d}, w.options());
#ifdef ALLMEM_WITH_CUDA
  if (use_kernels(w)) {
    composite_row_norm_cuda(w, target, std::nullopt, out, std::nullopt, d, h);
    return out;
  }
#endif
  const Mats W = mats3(w, h, d), O = mats3(out, h, d), Tg = targets3(target, h, d);
  for (int m = 0; m < 3; ++m) O[m].copy_(row_normalize(W[m], Tg[m]));
  return out;
}

// Backward of row_normalize3 for the gradient g of its output: returns the gradient of w, adds the
// targets' gradient to dtarget [B, 2h + d].
// With g_add, for the gradient g + g_add.
at::Tensor row_normalize3_backward(const at::Tensor& w, const at::Tensor& target, const at::Tensor& g,
                                   at::Tensor& dtarget, int64_t d, int64_t h,
                                   const std::optional<at::Tensor>& g_add = std::nullopt) {
  RECORD_FUNCTION("allmem::composite_row_norm_backward", std::vector<c10::IValue>());  // one launch on CUDA (bench: launch counts)
  auto out = at::empty({w.size(0), 3, h * d}, w.options());
#ifdef ALLMEM_WITH_CUDA
  if (use_kernels(w)) {
    composite_row_norm_cuda(w, target, g.contiguous(), out, dtarget, d, h,
                            g_add.has_value() ? std::optional<at::Tensor>(g_add->contiguous()) : std::nullopt);
    return out;
  }
#endif
  const auto gg = g_add.has_value() ? g + *g_add : g;
  const Mats W = mats3(w, h, d), O = mats3(out, h, d), Gr = mats3(gg, h, d), Tg = targets3(target, h, d);
  Mats dT = targets3(dtarget, h, d);
  for (int m = 0; m < 3; ++m) O[m].copy_(row_normalize_backward(W[m], Tg[m], Gr[m], dT[m]));
  return out;
}

// The per-token terms of the update's backward (ttt_chunk.h update_grad_backward) from
// p1 = [a, b, pg, pu], p2 = [e, ps] (products with the weights Wx and D, the gradient of the new
// momentum): f1 = [da, db, eta_g xg, eta_u xu], f2 = [de, eta_d s], deta. See UpdateTermsParams.
void update_terms(const at::Tensor& p1, const at::Tensor& p2, const at::Tensor& eta, at::Tensor& f1, at::Tensor& f2,
                  at::Tensor& deta, int64_t h) {
  RECORD_FUNCTION("allmem::composite_update_terms", std::vector<c10::IValue>());  // one launch on CUDA (bench: launch counts)
#ifdef ALLMEM_WITH_CUDA
  if (use_kernels(p1)) {
    composite_update_terms_cuda(p1, p2, eta, f1, f2, deta);
    return;
  }
#endif
  const auto a = p1.narrow(-1, 0, h), b = p1.narrow(-1, h, h), pg = p1.narrow(-1, 2 * h, h), pu = p1.narrow(-1, 3 * h, h);
  const auto e = p2.narrow(-1, 0, h), ps = p2.narrow(-1, h, h);
  const auto eg = eta.narrow(-1, 0, 1), eu = eta.narrow(-1, 1, 1), ed = eta.narrow(-1, 2, 1);
  const auto sig = at::sigmoid(a), silu = a * sig, om = 1 - sig;
  const auto d1 = sig * (1 + a * om);
  const auto d2 = sig * om * (2 + a * (1 - 2 * sig));
  const auto s = silu * b, xu = e * silu, xg = e * b * d1;
  const auto rd = ps * ed, ru = pu * eu, rg = pg * eg;
  deta.select(-1, 0).copy_((pg * xg).sum(-1));
  deta.select(-1, 1).copy_((pu * xu).sum(-1));
  deta.select(-1, 2).copy_((ps * s).sum(-1));
  f1.narrow(-1, 0, h).copy_(rd * b * d1 + ru * e * d1 + rg * e * b * d2);
  f1.narrow(-1, h, h).copy_(rd * silu + rg * e * d1);
  f1.narrow(-1, 2 * h, h).copy_(eg * xg);
  f1.narrow(-1, 3 * h, h).copy_(eu * xu);
  f2.narrow(-1, 0, h).copy_(ru * silu + rg * b * d1);
  f2.narrow(-1, h, h).copy_(ed * s);
}

// The per-token terms of the read's backward from ab = [a, b] (q Wg^T, q Wu^T) and ds = dO Wd:
// f = [ds b silu'(a), ds silu(a)] (da, db), s = silu(a) b. ds, f undefined (the forward): s only.
void read_terms(const at::Tensor& ab, const at::Tensor& ds, at::Tensor& f, at::Tensor& s, int64_t h) {
  RECORD_FUNCTION("allmem::composite_read_terms", std::vector<c10::IValue>());  // one launch on CUDA (bench: launch counts)
#ifdef ALLMEM_WITH_CUDA
  if (use_kernels(ab)) {
    composite_read_terms_cuda(ab, ds, f, s);
    return;
  }
#endif
  const auto a = ab.narrow(-1, 0, h), b = ab.narrow(-1, h, h);
  const auto sig = at::sigmoid(a), silu = a * sig;
  s.copy_(silu * b);
  if (!ds.defined()) return;
  f.narrow(-1, 0, h).copy_(ds * b * sig * (1 + a * (1 - sig)));
  f.narrow(-1, h, h).copy_(ds * silu);
}

// The per-token factors of the update's gradient from ab = [a, b] (k Wg^T, k Wu^T) and e = v Wd:
// fgu = -[eta_g e b silu'(a), eta_u e silu(a)], fd = -eta_d s (GradTermsParams).
void grad_terms(const at::Tensor& ab, const at::Tensor& e, const at::Tensor& eta, at::Tensor& fgu, at::Tensor& fd,
                int64_t h) {
  RECORD_FUNCTION("allmem::composite_grad_terms", std::vector<c10::IValue>());  // one launch on CUDA (bench: launch counts)
#ifdef ALLMEM_WITH_CUDA
  if (use_kernels(ab)) {
    composite_grad_terms_cuda(ab, e, eta, fgu, fd);
    return;
  }
#endif
  const auto a = ab.narrow(-1, 0, h), b = ab.narrow(-1, h, h);
  const auto sig = at::sigmoid(a), silu = a * sig;
  fgu.narrow(-1, 0, h).copy_(-(eta.narrow(-1, 0, 1) * e * b * sig * (1 + a * (1 - sig))));
  fgu.narrow(-1, h, h).copy_(-(eta.narrow(-1, 1, 1) * e * silu));
  fd.copy_(-(eta.narrow(-1, 2, 1) * silu * b));
}

// The stacked weights of one chunk's update backward: wk = [Wg; Wu; Dg; Du] [B, 4h, d],
// wv = [Wd | Dd] [B, d, 2h], with W = normalize(w) (target given) or w, and D = a + b (returned).
struct Stacked {
  at::Tensor wk, wv, D;
};
Stacked prep3(const at::Tensor& w, const at::Tensor* target, const at::Tensor& a, const at::Tensor& b, int64_t d,
              int64_t h) {
  RECORD_FUNCTION("allmem::composite_prep", std::vector<c10::IValue>());  // one launch on CUDA (bench: launch counts)
  const int64_t B = w.size(0);
#ifdef ALLMEM_WITH_CUDA
  if (use_kernels(w)) {
    Stacked st{at::empty({B, 4 * h, d}, w.options()), at::empty({B, d, 2 * h}, w.options()),
               at::empty({B, 3, h * d}, w.options())};
    composite_prep_cuda(w, target != nullptr ? std::optional<at::Tensor>(*target) : std::nullopt, a.contiguous(),
                        b.contiguous(), st.wk, st.wv, st.D, d, h);
    return st;
  }
#endif
  const auto W = target != nullptr ? row_normalize3(w, *target, d, h) : w;
  auto D = a + b;
  return {at::cat({gate_up(W, h, d), gate_up(D, h, d)}, 1), at::cat({down(W, h, d), down(D, h, d)}, 2), D};
}

// The momentum step of one chunk's backward (MomentumParams): every row of dmu_rows [B, C, 1] gets
// <D, M> / C; dM = D * mu [B, 1, 1] where live [B, 1, 1] (or everywhere), else kept.
void momentum3(const at::Tensor& D, const at::Tensor& M, const at::Tensor& mu, const at::Tensor& live, at::Tensor& dM,
               at::Tensor dmu_rows) {
  RECORD_FUNCTION("allmem::composite_momentum", std::vector<c10::IValue>());  // one launch on CUDA (bench: launch counts)
#ifdef ALLMEM_WITH_CUDA
  if (use_kernels(D)) {
    composite_momentum_cuda(D, M, mu.reshape({-1}), live.defined() ? std::optional<at::Tensor>(live.reshape({-1}))
                                                                   : std::nullopt,
                            dM, dmu_rows);
    return;
  }
#endif
  const int64_t B = D.size(0), C = dmu_rows.size(1);
  dmu_rows.copy_(((D * M).sum(at::IntArrayRef{1, 2}) / static_cast<double>(C)).view({B, 1, 1}));
  const auto next = D * mu;
  dM = live.defined() ? at::where(live, next, dM) : next;
}

// G of SPEC.md at Wx (ttt_chunk.h update_grad), packed [B, 3, h*d]: Gg = -(eta_g e b silu'(a))^T K,
// Gu = -(eta_u e silu(a))^T K, Gd = -V^T (eta_d s): two products for a, b, e, one step for the
// factors, two for G.
// k, v: as the matmuls take them (Mm::lo).
at::Tensor update_grad3(const at::Tensor& Wx, const at::Tensor& k, const at::Tensor& v, const at::Tensor& eta,
                        int64_t d, int64_t h, const Mm& mm) {
  const int64_t B = Wx.size(0);
  const auto ab = mm.bmm(k, gate_up(Wx, h, d).transpose(1, 2));
  const auto e = mm.bmm(v, down(Wx, h, d));
  auto fgu = at::empty_like(ab), fd = at::empty_like(e);
  grad_terms(ab, e, eta, fgu, fd, h);
  const auto ggu = mm.bmm(fgu.transpose(1, 2), k);  // [B, 2h, d]
  const auto gd = mm.bmm(v.transpose(1, 2), fd);     // [B, d, h]
  return at::cat({ggu.view({B, 2, h * d}), gd.view({B, 1, h * d})}, 1);
}

// One chunk's update of the packed state (W, M) [B, 6, h*d] -> the new (W, M) (SPEC.md steps 2-3,
// or LaCT's order), with the chunk's tokens k, v, eta, its momentum mu_j [B, 1, 1], the targets.
at::Tensor chunk_update3(const at::Tensor& state, const at::Tensor& mu_j, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& eta, const at::Tensor& tgt, int64_t d, int64_t h, bool lact_order,
                         const Mm& mm) {
  const auto W = state.narrow(1, 0, 3), M = state.narrow(1, kMomentumRow, 3);
  auto next = at::empty({state.size(0), kFastRows, h * d}, state.options());
  auto W_new = next.narrow(1, 0, 3), M_new = next.narrow(1, kMomentumRow, 3);
  if (lact_order) {  // M' = mu M - G(W), W' = normalize(W + M')
    M_new.copy_(M * mu_j - update_grad3(W, k, v, eta, d, h, mm));
    W_new.copy_(row_normalize3(W + M_new, tgt, d, h));
  } else {  // W_hat = normalize(W), M' = mu M - G(W_hat), W' = W_hat + M'
    const auto W_hat = row_normalize3(W, tgt, d, h);
    M_new.copy_(M * mu_j - update_grad3(W_hat, k, v, eta, d, h, mm));
    at::add_out(W_new, W_hat, M_new);
  }
  return next;
}

// The per-token terms of the update gradient's backward for the weights stacked by prep3, as the
// matmuls take them (wk = [Wx_g; Wx_u; Dg; Du], wv = [Wx_d | Dd]): f1 [B, n, 4h], f2 [B, n, 2h]
// (update_terms), deta written.
std::pair<at::Tensor, at::Tensor> update_factors(const at::Tensor& wk, const at::Tensor& wv, const at::Tensor& k,
                                                 const at::Tensor& v, const at::Tensor& eta, at::Tensor deta,
                                                 int64_t h, const Mm& mm) {
  const auto p1 = mm.bmm(k, wk.transpose(1, 2));  // a, b, pg, pu
  const auto p2 = mm.bmm(v, wv);                  // e, ps
  auto f1 = at::empty_like(p1), f2 = at::empty_like(p2);
  update_terms(p1, p2, eta, f1, f2, deta, h);
  return {f1, f2};
}

// dL/dWx [B, 3, h*d] from the factors (as the matmuls take them): da^T K, db^T K, V^T de.
at::Tensor factor_weight_grads(const at::Tensor& f1l, const at::Tensor& f2l, const at::Tensor& k, const at::Tensor& v,
                               int64_t d, int64_t h, const Mm& mm) {
  const int64_t B = f1l.size(0);
  const auto dgu = mm.bmm(f1l.narrow(-1, 0, 2 * h).transpose(1, 2), k);  // [B, 2h, d]
  const auto dd = mm.bmm(v.transpose(1, 2), f2l.narrow(-1, 0, h));       // [B, d, h]
  return at::cat({dgu.view({B, 2, h * d}), dd.view({B, 1, h * d})}, 1);
}

// Backward of the update gradient G(Wx) of one chunk, given D = dL/dM_new (dL/dG = -D) and the
// weights stacked by prep3: writes dk, dv, deta of the chunk's rows, returns dL/dWx [B, 3, h*d] of
// that path. Two products for every per-token product, one fused step for the per-token terms,
// then dk, dv and the three weight gradients: 6 matmuls.
at::Tensor update_grad3_backward(const Stacked& st, const at::Tensor& k, const at::Tensor& v, const at::Tensor& eta,
                                 at::Tensor dk, at::Tensor dv, at::Tensor deta, int64_t d, int64_t h, const Mm& mm) {
  const auto wk = mm.lo(st.wk), wv = mm.lo(st.wv);
  const auto [f1, f2] = update_factors(wk, wv, k, v, eta, deta, h, mm);
  const auto f1l = mm.lo(f1), f2l = mm.lo(f2);
  mm.bmm_out(dk, f1l, wk);
  mm.bmm_out(dv, f2l, wv.transpose(1, 2));
  return factor_weight_grads(f1l, f2l, k, v, d, h, mm);
}

// Sequences with the same pending length share their chunk boundaries: a group of them runs as one
// batch of G * H chains, so a step is one launch for all of them (a dense batch without state is
// a single group). In chunk coordinates (row u = p0 + t for token t) segment c is rows [cC, cC + C)
// of chunk c: the first after p0 rows of the initial buffer, the last of each sequence its trailing
// partial chunk (only read). Sequences of different lengths in one group ("ragged") walk up to the
// longest one's chunks, each chain masked where its own sequence has no such chunk (its state kept,
// its gradients of the targets untouched, its rows not scattered). The walk goes in blocks of
// chunks; tokens are gathered into [chunks, G*H, C, x] and scattered back once per block, with
// indices computed on the device (no host sync inside the walk).
struct Group {
  int64_t G, H, GH, C, T, p0, nseg, PW;  // nseg: the longest sequence's segments
  bool ragged;                           // lengths differ
  int64_t len;                           // the longest length
  at::Tensor ns_t, starts_t, slots_t, lens_t, nseg_t;
  at::TensorOptions longs;

  Group(const Layout& lay, const std::vector<int64_t>& ns, const at::Device& dev)
      : G(static_cast<int64_t>(ns.size())), H(lay.H), GH(G * lay.H), C(lay.C), T(lay.T), p0(lay.p0[ns[0]]), nseg(0),
        PW(lay.pend_width()), ragged(false), len(0), longs(at::TensorOptions().dtype(at::kLong).device(dev)) {
    std::vector<int64_t> starts, slots, lens, nsegs;
    for (int64_t n : ns) {
      starts.push_back(lay.start[n]);
      slots.push_back(lay.slot[n]);
      lens.push_back(lay.len[n]);
      nsegs.push_back(static_cast<int64_t>(segments(lay, n).size()));
      ragged = ragged || lay.len[n] != lay.len[ns[0]];
      len = std::max(len, lay.len[n]);
      nseg = std::max(nseg, nsegs.back());
    }
    std::vector<int64_t> all(ns);  // one host-to-device copy for the index lists
    for (const auto* v : {&starts, &slots, &lens, &nsegs}) all.insert(all.end(), v->begin(), v->end());
    const auto t = at::tensor(all, at::kLong).to(dev);
    ns_t = t.narrow(0, 0, G), starts_t = t.narrow(0, G, G), slots_t = t.narrow(0, 2 * G, G);
    lens_t = t.narrow(0, 3 * G, G), nseg_t = t.narrow(0, 4 * G, G);
  }
  bool has_tokens() const { return len > 0; }
  // Uniform groups: chunk c's tokens are rows [lo, hi) (for every sequence).
  int64_t lo_row(int64_t c) const { return std::max<int64_t>(0, p0 - c * C); }
  int64_t hi_row(int64_t c) const { return std::min<int64_t>(C, p0 + len - c * C); }

  // Token index t = cC + r - p0 of chunks [ca, cb), rows [ra, rb): [nc, 1, 1, nr].
  at::Tensor token_index(int64_t ca, int64_t cb, int64_t ra, int64_t rb) const {
    return (at::arange(ca, cb, longs) * C).view({-1, 1, 1, 1}) + at::arange(ra, rb, longs).view({1, 1, 1, -1}) - p0;
  }
  // Rows of a [T*H, x] token view for chunks [ca, cb) and chunk rows [ra, rb), ordered (chunk,
  // sequence, head, row), the token clamped into its sequence (callers zero or skip the rest).
  at::Tensor token_rows(int64_t ca, int64_t cb, int64_t ra, int64_t rb) const {
    auto t = token_index(ca, cb, ra, rb).clamp_min(0);
    t = ragged ? at::minimum(t, (lens_t - 1).clamp_min(0).view({1, G, 1, 1})) : t.clamp_max(std::max<int64_t>(len - 1, 0));
    auto row = starts_t.view({1, G, 1, 1}) + t;
    if (ragged) row = row.clamp(0, std::max<int64_t>(T - 1, 0));  // an empty sequence at the end
    return (row * H + at::arange(H, longs).view({1, 1, H, 1})).flatten();
  }
  // Which (chunk, sequence, row) of chunks [c0, c1) hold this call's tokens: bool [nb, G, 1, C].
  at::Tensor valid_rows(int64_t c0, int64_t c1) const {
    const auto t = token_index(c0, c1, 0, C);
    return (t >= 0).logical_and(t < lens_t.view({1, G, 1, 1}));
  }
  // Per chunk of [c0, c1) and chain: the chunk completes (its update runs) / is the sequence's
  // trailing one; bool [nb, G*H, 1, 1].
  at::Tensor chain_mask(int64_t c0, int64_t c1, bool trailing) const {
    const auto c = at::arange(c0, c1, longs).view({-1, 1});
    const auto last = (nseg_t - 1).view({1, G});
    const auto m = trailing ? c.eq(last) : c.lt(last);
    return m.view({c1 - c0, G, 1}).expand({c1 - c0, G, H}).reshape({c1 - c0, GH, 1, 1});
  }
  // Checkpoint slots of chunks [c0, c1), chunk-major ([nb * G], then H in the slot); past a
  // sequence's last segment its last slot (whose state the masked walk keeps).
  at::Tensor slots_of(int64_t c0, int64_t c1) const {
    auto c = at::arange(c0, c1, longs).view({c1 - c0, 1});
    if (ragged) c = at::minimum(c, (nseg_t - 1).view({1, G}));
    return (slots_t.view({1, G}) + c).flatten();
  }
  // [N, C, H, 2d + 4] chunk buffers -> the group's, heads folded into the batch: [G*H, C, 2d + 4].
  at::Tensor by_head(const at::Tensor& t) const {
    return t.index_select(0, ns_t).permute({0, 2, 1, 3}).reshape({GH, C, PW});
  }
  // Inverse of by_head into dst [N, C, H, 2d + 4].
  void put_by_head(at::Tensor& dst, const at::Tensor& g) const {
    dst.index_copy_(0, ns_t, g.view({G, H, C, PW}).permute({0, 2, 1, 3}));
  }

  // Rows of a token view [T*H, x] (the input dtype) in the accumulation dtype: a fresh tensor.
  static at::Tensor gather(const at::Tensor& t_r, const at::Tensor& rows, at::ScalarType acc) {
    return t_r.index_select(0, rows).to(acc);
  }

  // The update's inputs k, v, eta, mu of chunks [c0, c1) ([nb, G*H, C, x]), from the token rows
  // `rows` (token_rows(c0, c1, 0, C)); rows before p0 of chunk 0 are the initial buffer's.
  std::array<at::Tensor, 4> chunk_inputs(const at::Tensor& rows, int64_t c0, int64_t c1, const at::Tensor& k_r,
                                         const at::Tensor& v_r, const at::Tensor& eta_r, const at::Tensor& mu_r,
                                         const at::Tensor& init_pend, int64_t d) const {
    const int64_t nb = c1 - c0;
    const auto acc = init_pend.scalar_type();
    std::array<at::Tensor, 4> out{gather(k_r, rows, acc).view({nb, GH, C, d}),
                                  gather(v_r, rows, acc).view({nb, GH, C, d}),
                                  gather(eta_r, rows, acc).view({nb, GH, C, 3}),
                                  gather(mu_r, rows, acc).view({nb, GH, C, 1})};
    if (p0 > 0 && c0 == 0) {
      const auto ip = init_pend.narrow(1, 0, p0);
      const int64_t col[4] = {0, d, 2 * d, 2 * d + 3}, width[4] = {d, d, 3, 1};
      for (int i = 0; i < 4; ++i) out[i][0].narrow(1, 0, p0).copy_(ip.narrow(2, col[i], width[i]));
    }
    return out;
  }

  // The rows of chunks [c0, c1) that hold this call's tokens, from a block [nb, G*H, C, x] (any
  // view of that size) into out_rows [T*H + 1, x] (converted to its dtype; the last row is a
  // scratch row the other rows of a ragged group go to).
  void scatter(at::Tensor& out_rows, const at::Tensor& blk, int64_t c0, int64_t c1) const {
    const int64_t x = out_rows.size(1), nb = c1 - c0;
    if (ragged) {
      const auto dst = at::where(valid_rows(c0, c1).expand({nb, G, H, C}).flatten(), token_rows(c0, c1, 0, C), T * H);
      out_rows.index_copy_(0, dst, blk.reshape({-1, x}).to(out_rows.scalar_type()));
      return;
    }
    std::vector<std::array<int64_t, 4>> pieces;  // chunks [ca, cb), rows [ra, rb)
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t lo = lo_row(c), hi = hi_row(c);
      if (hi <= lo) continue;
      if (lo == 0 && hi == C && !pieces.empty() && pieces.back()[1] == c && pieces.back()[2] == 0 &&
          pieces.back()[3] == C) {
        ++pieces.back()[1];
      } else {
        pieces.push_back({c, c + 1, lo, hi});
      }
    }
    for (const auto& pc : pieces) {
      auto src = blk.reshape({nb, G, H, C, x}).narrow(0, pc[0] - c0, pc[1] - pc[0]).narrow(3, pc[2], pc[3] - pc[2]);
      out_rows.index_copy_(0, token_rows(pc[0], pc[1], pc[2], pc[3]), src.reshape({-1, x}).to(out_rows.scalar_type()));
    }
  }

  // Each sequence's chunk buffer after the call, [G*H, C, 2d + 4]: its trailing chunk's rows (the
  // initial ones too where no chunk completed), zeros after them.
  at::Tensor final_buffer(const at::Tensor& k_r, const at::Tensor& v_r, const at::Tensor& eta_r, const at::Tensor& mu_r,
                          const at::Tensor& init_pend, int64_t d) const {
    const auto acc = init_pend.scalar_type();
    auto buf = at::zeros({GH, C, PW}, init_pend.options());
    if (p0 > 0) {  // sequences still in their first chunk keep the initial rows
      const auto first = (nseg_t == 1).view({G, 1, 1, 1}).expand({G, H, 1, 1}).reshape({GH, 1, 1});
      buf.narrow(1, 0, p0).copy_(at::where(first, init_pend.narrow(1, 0, p0), 0.0));
    }
    if (!has_tokens()) return buf;
    // row r of sequence g's last chunk holds token t = (nseg_g - 1) C + r - p0
    const auto t = ((nseg_t - 1) * C - p0).view({G, 1, 1}) + at::arange(C, longs).view({1, 1, C});  // [G, 1, C]
    const auto ok = (t >= 0).logical_and(t < lens_t.view({G, 1, 1})).expand({G, H, C}).reshape({GH, C, 1});
    auto tc = at::minimum(t.clamp_min(0), (lens_t - 1).clamp_min(0).view({G, 1, 1}));
    const auto rows = ((starts_t.view({G, 1, 1}) + tc).clamp(0, std::max<int64_t>(T - 1, 0)) * H +
                       at::arange(H, longs).view({1, H, 1}))
                          .flatten();
    const at::Tensor* src[4] = {&k_r, &v_r, &eta_r, &mu_r};
    const int64_t col[4] = {0, d, 2 * d, 2 * d + 3};
    for (int i = 0; i < 4; ++i) {
      const auto vals = gather(*src[i], rows, acc).view({GH, C, -1});
      auto dst = buf.narrow(2, col[i], vals.size(-1));
      dst.copy_(at::where(ok, vals, dst));
    }
    return buf;
  }
};

// Groups: sequences with the same pending length whose chunk counts are within a factor 2 of each
// other (so a ragged group does at most about twice the work of separate ones), in a fixed order.
std::vector<std::vector<int64_t>> groups_of(const Layout& lay) {
  std::map<std::pair<int64_t, int64_t>, std::vector<int64_t>> groups;
  for (int64_t n = 0; n < lay.N; ++n) {
    int64_t bucket = 0;
    for (int64_t c = static_cast<int64_t>(segments(lay, n).size()); c > 1; c >>= 1) ++bucket;
    groups[{lay.p0[n], bucket}].push_back(n);
  }
  std::vector<std::vector<int64_t>> out;
  for (auto& entry : groups) out.push_back(std::move(entry.second));
  return out;
}

}  // namespace

FwdOutputs ttt_memory_fwd_composite(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& eta, const at::Tensor& mu, const at::Tensor& w_gate,
                                    const at::Tensor& w_up, const at::Tensor& w_down, const at::Tensor& fast,
                                    const at::Tensor& pending, const at::Tensor& pending_len,
                                    const std::optional<at::Tensor>& cu_seqlens, int64_t chunk_size, bool lact_order,
                                    bool residual) {
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  ALLMEM_NO_AUTOCAST();
  ALLMEM_NO_TF32();  // float32 matmuls exact whatever the TF32 setting
  const auto acc = accumulate_dtype(q.scalar_type());
  const Layout lay = check_fwd_and_layout(q, k, v, eta, mu, w_gate, w_up, w_down, fast, pending, pending_len,
                                          cu_seqlens, chunk_size, acc);
  const int64_t d = lay.d, h = lay.h, C = lay.C, H = lay.H, T = lay.T, hd = h * d;
  // Tokens as rows [T*H, x] (row t*H + head) in the input dtype: converted block by block, no
  // whole-sequence copies in the accumulation dtype.
  auto rows_of = [&](const at::Tensor& t, int64_t x) { return t.contiguous().view({T * H, x}); };
  const auto q_r = rows_of(q, d), k_r = rows_of(k, d), v_r = rows_of(v, d), eta_r = rows_of(eta, 3);
  const auto mu_r = rows_of(mu, 1);
  const auto opts = q.options().dtype(acc);
  const auto fast_in = fast.contiguous(), pend_in = pending.contiguous();
  const auto tgt_h = at::cat({row_norm(w_gate), row_norm(w_up), row_norm(w_down)}, 1).to(acc);  // [H, 2h + d]
  const Mm mm = Mm::for_inputs(q);

  auto o_r = at::empty({T * H + 1, d}, q.options());  // + a scratch row (Group::scatter)
  auto fast_out = at::empty_like(fast_in);
  auto pend_out = at::empty_like(pend_in);
  auto ckpt = at::empty({lay.slots(), H, kFastRows, hd}, opts);
  ckpt.narrow(0, lay.used_slots, lay.slots() - lay.used_slots).zero_();  // keep the output deterministic

  for (const auto& ns : groups_of(lay)) {
    const Group g(lay, ns, q.device());
    const int64_t GH = g.GH;
    const auto init_pend = g.by_head(pend_in);
    const auto tgt = tgt_h.repeat({g.G, 1});
    at::Tensor state = fast_in.index_select(0, g.ns_t).view({GH, kFastRows, hd});  // (W, M)
    const int64_t esize = static_cast<int64_t>(c10::elementSize(acc));
    const int64_t per_chunk = GH * (C * (4 * d + 6 * h + 8) + 6 * hd) * esize;
    const int64_t nb_max = max_block_chunks(per_chunk);
    for (int64_t c0 = 0; c0 < g.nseg;) {
      const int64_t c1 = std::min<int64_t>(g.nseg, c0 + nb_max), nb = c1 - c0, R = nb * GH;
      const int64_t n_complete = c1 == g.nseg ? nb - 1 : nb;  // chunks [c0, c0 + n_complete) update
      auto ckb = at::empty({nb, GH, kFastRows, hd}, opts);    // (W, M) at each segment start
      if (g.has_tokens()) {
        const auto rows = g.token_rows(c0, c1, 0, C);
        const auto in = g.chunk_inputs(rows, c0, c1, k_r, v_r, eta_r, mu_r, init_pend, d);
        const auto mu_chunk = in[3].mean(2);  // [nb, GH, 1]
        const auto upd = g.ragged ? g.chain_mask(c0, c1, false) : at::Tensor();  // chains whose chunk completes
        const auto K = mm.lo(in[0]), V = mm.lo(in[1]);  // as the matmuls take them
        for (int64_t j = 0; j < nb; ++j) {
          ckb[j].copy_(state);
          if (j >= n_complete) continue;
          const auto next = chunk_update3(ckb[j], mu_chunk[j].view({GH, 1, 1}), K[j], V[j], in[2][j], tgt, d, h,
                                          lact_order, mm);
          state = g.ragged ? at::where(upd[j], next, state) : next;
        }
        // Every chunk's read in one pass: o = Wd (silu(Wg q) * (Wu q)) [+ q] with its segment's weights.
        const auto Qb = Group::gather(q_r, rows, acc).view({R, C, d});
        const auto ckr = ckb.view({R, kFastRows, hd});
        const auto ab = mm.bmm(mm.lo(Qb), gate_up(ckr, h, d).transpose(1, 2));
        auto s = at::empty({R, C, h}, opts);
        at::Tensor none;
        read_terms(ab, none, none, s, h);
        auto ob = mm.bmm(s, down(ckr, h, d).transpose(1, 2));
        if (residual) ob.add_(Qb);
        g.scatter(o_r, ob, c0, c1);
      } else {
        ckb[0].copy_(state);  // no tokens: one (trailing, empty) segment
      }
      ckpt.view({-1, H, kFastRows, hd}).index_copy_(0, g.slots_of(c0, c1), ckb.view({nb * g.G, H, kFastRows, hd}));
      c0 = c1;
    }
    fast_out.index_copy_(0, g.ns_t, state.view({g.G, H, kFastRows, hd}));
    g.put_by_head(pend_out, g.final_buffer(k_r, v_r, eta_r, mu_r, init_pend, d));
  }

  std::vector<int64_t> plen(lay.N);
  for (int64_t n = 0; n < lay.N; ++n) plen[n] = (lay.p0[n] + lay.len[n]) % C;
  auto plen_out = at::tensor(plen, at::kLong).to(q.device());
  return {o_r.narrow(0, 0, T * H).view(q.sizes()), fast_out, pend_out, plen_out, ckpt};
}

void decode_chunk_update_(at::Tensor& fast, at::Tensor& pending, const at::Tensor& complete, const at::Tensor& w_gate,
                          const at::Tensor& w_up, const at::Tensor& w_down, bool lact_order) {
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  ALLMEM_NO_AUTOCAST();
  ALLMEM_NO_TF32();
  const int64_t B = fast.size(0), H = fast.size(1), hd = fast.size(3), C = pending.size(1), PW = pending.size(3);
  const int64_t d = (PW - 4) / 2, h = hd / d, BH = B * H;
  if (BH == 0) return;
  const auto st = fast.scalar_type();
  // The buffered chunk as [B*H, C, x] chains (head-major, as the state), one copy.
  const auto buf = pending.permute({0, 2, 1, 3}).reshape({BH, C, PW});
  const auto K = buf.narrow(2, 0, d).contiguous(), V = buf.narrow(2, d, d).contiguous();
  const auto eta = buf.narrow(2, 2 * d, 3).contiguous();
  const auto mu_j = buf.narrow(2, 2 * d + 3, 1).mean(1).view({BH, 1, 1});
  const auto tgt = at::cat({row_norm(w_gate), row_norm(w_up), row_norm(w_down)}, 1).to(st).repeat({B, 1});
  const Mm mm;  // IEEE products in the state's precision
  const auto next = chunk_update3(fast.view({BH, kFastRows, hd}), mu_j, K, V, eta, tgt, d, h, lact_order, mm);
  if (!complete.defined()) {
    fast.copy_(next.view(fast.sizes()));
    pending.zero_();
    return;
  }
  const auto where_b = complete.view({B, 1, 1, 1});
  fast.copy_(at::where(where_b, next.view(fast.sizes()), fast));
  pending.masked_fill_(where_b, 0.0);
}

// The composite backward's chunk step (ALLMEM_TTT_COMPOSITE_STEP=tc, read at every call): on CUDA
// the tensor-core kernel where it applies (ttt_bwd_step_tc.cuh, composite_step_tc_applies: bf16/fp16,
// d = h in {64, 128}, sm_90); on the CPU the same outputs by the ATen steps (step_aten), so that the
// walk around the kernel (StepBlock) is tested against the composite's own steps without a GPU.
enum class StepMode { kOff, kKernel, kAten };
StepMode step_mode(const at::Tensor& q, int64_t d, int64_t h) {
  const char* env = std::getenv("ALLMEM_TTT_COMPOSITE_STEP");
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, "0") == 0) return StepMode::kOff;
  ALLMEM_CHECK(std::strcmp(env, "tc") == 0, "ALLMEM_TTT_COMPOSITE_STEP: expected tc or 0, got '", env, "'");
  if (q.is_cpu()) return StepMode::kAten;
#ifdef ALLMEM_WITH_CUDA
  if (composite_step_tc_applies(q, d, h)) return StepMode::kKernel;
#else
  (void)d;
  (void)h;
#endif
  TORCH_WARN_ONCE("allmem: ALLMEM_TTT_COMPOSITE_STEP=tc needs CUDA bfloat16/float16 inputs with d = h in {64, 128} "
                  "on an sm_90 GPU; the composite backward's ATen steps run instead");
  return StepMode::kOff;
}

// The kernel's outputs for one chunk by the ATen steps (its CPU stand-in): dW, dM in place (dM may
// be rebound), d_tg added to, dmu [GH, C], the factors f1, f2, the stacked weights wk, wv, and
// the rate gradients in part 0 of dp [GH, 8, C, 3] (the other parts zero).
void step_aten(const at::Tensor& K, const at::Tensor& V, const at::Tensor& E, const at::Tensor& mu, const at::Tensor& w,
               const at::Tensor& mn, const at::Tensor& tgt, at::Tensor& dW, at::Tensor& dM, const at::Tensor& dwr,
               at::Tensor& d_tg, const at::Tensor& dmu, at::Tensor& f1, at::Tensor& f2, at::Tensor& wk, at::Tensor& wv,
               at::Tensor& dp, int64_t d, int64_t h, bool lact, const Mm& mm) {
  const int64_t GH = w.size(0), C = K.size(1);
  const auto W = w.narrow(1, 0, 3), M = w.narrow(1, kMomentumRow, 3);
  at::Tensor dZ;
  Stacked st;
  if (lact) {  // Z = W + M_next was normalized; the gradient was taken at W
    dZ = row_normalize3_backward(W + mn, tgt, dW, d_tg, d, h);
    st = prep3(W, nullptr, dM, dZ, d, h);
  } else {
    st = prep3(W, &tgt, dM, dW, d, h);
  }
  dp.zero_();
  const auto [g1, g2] = update_factors(mm.lo(st.wk), mm.lo(st.wv), K, V, E, dp.select(1, 0), h, mm);
  f1.copy_(g1);
  f2.copy_(g2);
  wk.copy_(st.wk);
  wv.copy_(st.wv);
  const auto dWx = factor_weight_grads(mm.lo(g1), mm.lo(g2), K, V, d, h, mm);
  const auto dW_new = lact ? dZ + dWx : row_normalize3_backward(W, tgt, dWx, d_tg, d, h, dW);
  momentum3(st.D, M, mu.view({GH, 1, 1}), at::Tensor(), dM, dmu.view({GH, C, 1}));
  at::add_out(dW, dW_new, dwr);
}

// The chunk step's side of one block of a group's walk (not ragged): k, v of the block's completed
// chunks (16-bit for the kernel), buffers for the step's outputs, one step per chunk (chunk), then
// dk, dv of every completed chunk as two batched products and deta as the sum of the 8 CTAs' parts
// (finish).
struct StepBlock {
  int64_t GH, C, d, h, nc;
  bool lact, kernel;
  at::Tensor K, V, E, ckv, ck_after, F1, F2, WK, WV, DP;
  // ckv_: the block's checkpoints [nb, GH, 6, h*d] (chunk j's state at its start); Kb, Vb, Eb the
  // block's k, v (as the walk's matmuls take them: no copy where that is dt already), rates.
  StepBlock(const Group& g, const at::Tensor& ckpt, const at::Tensor& ckv_, const at::Tensor& Kb, const at::Tensor& Vb,
            const at::Tensor& Eb, int64_t c0, int64_t n_complete, int64_t d_, int64_t h_, bool lact_order,
            bool use_kernel, at::ScalarType dt)
      : GH(g.GH), C(g.C), d(d_), h(h_), nc(n_complete), lact(lact_order), kernel(use_kernel), ckv(ckv_) {
    K = Kb.narrow(0, 0, nc).to(dt).contiguous();
    V = Vb.narrow(0, 0, nc).to(dt).contiguous();
    E = Eb.narrow(0, 0, nc).contiguous();
    // LaCT order needs the M after each chunk's update: the next segment's checkpoint, in the block
    // but for the last completed chunk of a block without the trailing one (its successor starts
    // the next block in the walk's order: one slot more).
    if (lact && nc == ckv.size(0)) {
      ck_after = ckpt.index_select(0, g.slots_of(c0 + nc, c0 + nc + 1)).view({GH, kFastRows, h * d});
    }
    const auto o16 = K.options(), o32 = E.options();
    F1 = at::empty({nc, GH, C, 4 * h}, o16);
    F2 = at::empty({nc, GH, C, 2 * h}, o16);
    WK = at::empty({nc, GH, 4 * h, d}, o16);
    WV = at::empty({nc, GH, d, 2 * h}, o16);
    DP = at::empty({nc, GH, 8, C, 3}, o32);
  }
  void chunk(int64_t j, const at::Tensor& w, const at::Tensor& mu_j, const at::Tensor& tgt, const at::Tensor& dwr,
             at::Tensor& dW, at::Tensor& dM, at::Tensor& d_tg, const at::Tensor& dmu_rows, const Mm& mm) {
    RECORD_FUNCTION("allmem::composite_step", std::vector<c10::IValue>());  // one launch on CUDA (bench: launch counts)
    auto f1 = F1[j], f2 = F2[j], wk = WK[j], wv = WV[j], dp = DP[j];
    const auto dmu = dmu_rows.view({GH, C}), mu = mu_j.reshape({GH}).contiguous();
    const auto mn = lact ? (j + 1 < ckv.size(0) ? ckv[j + 1] : ck_after).narrow(1, kMomentumRow, 3) : at::Tensor();
    if (!kernel) {
      step_aten(K[j], V[j], E[j], mu, w, mn, tgt, dW, dM, dwr, d_tg, dmu, f1, f2, wk, wv, dp, d, h, lact, mm);
      return;
    }
#ifdef ALLMEM_WITH_CUDA
    auto dmu_out = dmu;
    composite_step_tc_cuda(K[j], V[j], E[j], mu, w, lact ? std::optional<at::Tensor>(mn) : std::nullopt, tgt, dW, dM,
                           dwr, d_tg, dmu_out, f1, f2, wk, wv, dp, lact);
#endif
  }
  void finish(at::Tensor& dKb, at::Tensor& dVb, at::Tensor& dEb, const Mm& mm) {
    auto dk = dKb.narrow(0, 0, nc).view({nc * GH, C, d}), dv = dVb.narrow(0, 0, nc).view({nc * GH, C, d});
    mm.bmm_out(dk, F1.view({nc * GH, C, 4 * h}), WK.view({nc * GH, 4 * h, d}));
    mm.bmm_out(dv, F2.view({nc * GH, C, 2 * h}), WV.view({nc * GH, d, 2 * h}).transpose(1, 2));
    auto de = dEb.narrow(0, 0, nc);
    at::sum_out(de, DP, {2});
  }
};

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
  ALLMEM_NO_TF32();  // float32 matmuls exact whatever the TF32 setting
  BwdArgs io(grad_o, grad_fast, grad_pending, q, k, v, eta, mu, w_gate, w_up, w_down, pending, pending_len, checkpoints,
             cu_seqlens, chunk_size, /*token_copies=*/false);
  const Layout& lay = io.lay;
  const int64_t d = lay.d, h = lay.h, C = lay.C, H = lay.H, T = lay.T, hd = h * d;
  const auto acc = io.acc;
  const auto &pend_in = io.pend_in, &ckpt = io.ckpt, &gfast = io.gfast, &gpend = io.gpend;
  const auto opts = q.options().dtype(acc);
  auto &d_fast = io.d_fast, &d_pend = io.d_pend;
  // Tokens and their gradients as rows [T*H, x] (row t*H + head), in the input dtype: blocks are
  // converted to the accumulation dtype as they are gathered and back as they are scattered (no
  // whole-sequence copies in float32).
  auto rows_of = [&](const at::Tensor& t, int64_t x) { return t.contiguous().view({T * H, x}); };
  const auto q_r = rows_of(q, d), k_r = rows_of(k, d), v_r = rows_of(v, d), eta_r = rows_of(eta, 3);
  const auto mu_r = rows_of(mu, 1), do_r = rows_of(grad_o, d);
  // The token gradients, each with a scratch row (Group::scatter); the op returns the rest.
  auto with_scratch = [&](int64_t x) { return at::empty({T * H + 1, x}, q.options()); };
  auto dq_r = with_scratch(d), dk_r = with_scratch(d), dv_r = with_scratch(d), deta_r = with_scratch(3);
  auto dmu_r = with_scratch(1);
  io.dq = dq_r.narrow(0, 0, T * H).view({T, H, d}), io.dk = dk_r.narrow(0, 0, T * H).view({T, H, d});
  io.dv = dv_r.narrow(0, 0, T * H).view({T, H, d}), io.deta = deta_r.narrow(0, 0, T * H).view({T, H, 3});
  io.dmu = dmu_r.narrow(0, 0, T * H).view({T, H});
  auto d_targets = at::zeros({H, 2 * h + d}, opts);
  const auto tgt_h = at::cat({io.tg, io.tu, io.td}, 1);  // [H, 2h + d]
  const Mm mm = Mm::for_inputs(q);
  // The tensor-core step (ttt_bwd_step_tc.cuh: one launch per completed chunk for the whole group
  // instead of the ATen sequence; opt-in, ALLMEM_TTT_COMPOSITE_STEP=tc) for groups that are not
  // ragged. It takes 16-bit k, v and Wx, D, the factors as 16-bit operands (the tensor-core
  // kernels' precision), and leaves dk, dv to two batched products per block of chunks.
  const StepMode step = step_mode(q, d, h);
  Mm mm16;  // the kernel's outputs in the products: 16-bit operands, float32 results
  mm16.low = true;
  mm16.dt = q.scalar_type();
  const Mm& mm_step = step == StepMode::kKernel ? mm16 : mm;
  const at::ScalarType step_dt = step == StepMode::kKernel ? q.scalar_type() : acc;

  for (const auto& ns : groups_of(lay)) {
    const Group g(lay, ns, q.device());
    const int64_t G = g.G, GH = g.GH, nseg = g.nseg, p0 = g.p0;
    // dW, dM: the gradient of the state after the segment being walked, [G*H, 3, h*d].
    const auto gf = gfast.index_select(0, g.ns_t).view({GH, kFastRows, hd});
    at::Tensor dW = gf.narrow(1, 0, 3).clone(at::MemoryFormat::Contiguous);
    at::Tensor dM = gf.narrow(1, kMomentumRow, 3).clone(at::MemoryFormat::Contiguous);
    const auto init_pend = g.by_head(pend_in), gpend_g = g.by_head(gpend);
    auto d_init_pend = at::zeros_like(init_pend);
    const auto tgt = tgt_h.repeat({G, 1});
    auto d_tg = at::zeros({GH, 2 * h + d}, opts);

    const int64_t esize = static_cast<int64_t>(c10::elementSize(acc));
    const bool use_step = step != StepMode::kOff && !g.ragged;
    // The step's buffers per chunk: its k, v, the factors and stacked weights, the rate partials.
    const int64_t step_bytes =
        use_step ? GH * ((C * (6 * h + 2 * d) + 6 * hd) * static_cast<int64_t>(c10::elementSize(step_dt)) + 8 * C * 3 * esize)
                 : 0;
    const int64_t per_chunk = GH * (C * (7 * d + 6 * h + 12) + 6 * hd) * esize + step_bytes;
    const int64_t nb_max = max_block_chunks(per_chunk);
    for (int64_t c1 = nseg; c1 > 0;) {
      const int64_t c0 = std::max<int64_t>(0, c1 - nb_max), nb = c1 - c0, R = nb * GH;
      const bool has_trailing = c1 == nseg;
      const int64_t n_complete = has_trailing ? nb - 1 : nb;  // chunks [c0, c0 + n_complete) update
      auto dKb = at::empty({nb, GH, C, d}, opts), dVb = at::empty({nb, GH, C, d}, opts);
      auto dEb = at::empty({nb, GH, C, 3}, opts), dMUb = at::empty({nb, GH, C, 1}, opts);
      if (has_trailing && !g.ragged) {  // the partial chunk only lands in the state
        dKb[nb - 1].copy_(gpend_g.narrow(2, 0, d));
        dVb[nb - 1].copy_(gpend_g.narrow(2, d, d));
        dEb[nb - 1].copy_(gpend_g.narrow(2, 2 * d, 3));
        dMUb[nb - 1].copy_(gpend_g.narrow(2, 2 * d + 3, 1));
      }
      at::Tensor dQb, dWr;
      if (g.has_tokens()) {
        const auto rows = g.token_rows(c0, c1, 0, C);
        const auto ckb = ckpt.index_select(0, g.slots_of(c0, c1)).view({R, kFastRows, hd});  // (W, M) at each segment start
        // The read's backward of every chunk in the block at once (it needs only the weights at the
        // segment start); rows outside the sequence get dO = 0, so they add nothing.
        const auto Qb = Group::gather(q_r, rows, acc).view({R, C, d});
        auto DOb = Group::gather(do_r, rows, acc).view({nb, GH, C, d});
        if (g.ragged) {
          DOb = at::where(g.valid_rows(c0, c1).expand({nb, G, g.H, C}).reshape({nb, GH, C, 1}), DOb, 0.0);
        } else {
          if (p0 > 0 && c0 == 0) DOb[0].narrow(1, 0, p0).zero_();
          if (has_trailing && g.hi_row(c1 - 1) < C) DOb[nb - 1].narrow(1, g.hi_row(c1 - 1), C - g.hi_row(c1 - 1)).zero_();
        }
        DOb = DOb.view({R, C, d});
        const auto wgu = mm.lo(gate_up(ckb, h, d)), wd = down(ckb, h, d);
        const auto Ql = mm.lo(Qb), DOl = mm.lo(DOb);
        const auto ab = mm.bmm(Ql, wgu.transpose(1, 2));
        const auto ds = mm.bmm(DOl, wd);
        auto f = at::empty_like(ab), s = at::empty_like(ds);
        read_terms(ab, ds, f, s, h);
        const auto fl = mm.lo(f);
        dWr = at::cat({mm.bmm(fl.transpose(1, 2), Ql).view({R, 2, hd}), mm.bmm(DOl.transpose(1, 2), s).view({R, 1, hd})}, 1)
                  .view({nb, GH, 3, hd});
        dQb = mm.bmm(fl, wgu);
        if (residual) dQb.add_(DOb);

        const auto in = g.chunk_inputs(rows, c0, c1, k_r, v_r, eta_r, mu_r, init_pend, d);
        const auto Kb = mm.lo(in[0]), Vb = mm.lo(in[1]);  // as the matmuls take them
        const auto& Eb = in[2];
        const auto mu_chunk = in[3].mean(2);  // [nb, GH, 1]: each chunk's momentum
        const auto ckv = ckb.view({nb, GH, kFastRows, hd});
        const auto upd = g.ragged ? g.chain_mask(c0, c1, false) : at::Tensor();  // chains whose chunk completes

        std::optional<StepBlock> sb;
        if (use_step && n_complete > 0) {
          sb.emplace(g, ckpt, ckv, Kb, Vb, Eb, c0, n_complete, d, h, lact_order, step == StepMode::kKernel, step_dt);
        }
        for (int64_t j = nb - 1; j >= 0; --j) {
          if (sb.has_value()) {
            if (j < n_complete) {  // the chunk's step adds the read's gradient of its segment to dW
              sb->chunk(j, ckv[j], mu_chunk[j], tgt, dWr[j], dW, dM, d_tg, dMUb[j], mm_step);
            } else {
              dW.add_(dWr[j]);
            }
            continue;
          }
          if (j < n_complete) {  // backward of the update of chunk c0 + j
            const auto W = ckv[j].narrow(1, 0, 3), M = ckv[j].narrow(1, kMomentumRow, 3);
            const auto mu_j = mu_chunk[j].view({GH, 1, 1});
            // Ragged groups: chains whose sequence has no such completed chunk keep dW, dM and feed
            // zeros to the normalization's backward (so their targets' gradient is untouched).
            auto live = [&](const at::Tensor& x) { return g.ragged ? at::where(upd[j], x, 0.0) : x; };
            at::Tensor dW_new;
            Stacked st;  // st.D = dL/dM_new
            if (lact_order) {  // W_new = normalize(W + mu M - G(W))
              auto Z = M * mu_j;
              Z.add_(W).sub_(update_grad3(W, Kb[j], Vb[j], Eb[j], d, h, mm));
              auto dZ = row_normalize3_backward(Z, tgt, live(dW), d_tg, d, h);
              st = prep3(W, nullptr, dM, dZ, d, h);
              dW_new = dZ.add_(update_grad3_backward(st, Kb[j], Vb[j], Eb[j], dKb[j], dVb[j], dEb[j], d, h, mm));
            } else {  // W_new = normalize(W) + mu M - G(normalize(W))
              st = prep3(W, &tgt, dM, dW, d, h);
              auto dW_hat = update_grad3_backward(st, Kb[j], Vb[j], Eb[j], dKb[j], dVb[j], dEb[j], d, h, mm);
              dW_new = g.ragged ? row_normalize3_backward(W, tgt, live(dW_hat.add_(dW)), d_tg, d, h)
                                : row_normalize3_backward(W, tgt, dW_hat, d_tg, d, h, dW);
            }
            momentum3(st.D, M, mu_j, g.ragged ? upd[j] : at::Tensor(), dM, dMUb[j]);
            dW = g.ragged ? at::where(upd[j], dW_new, dW) : dW_new;
          }
          dW.add_(dWr[j]);  // the read of segment c0 + j saw the weights at its start
        }
        if (sb.has_value()) sb->finish(dKb, dVb, dEb, mm_step);
      }
      if (g.ragged) {  // each sequence's trailing chunk only lands in the state
        const auto trail = g.chain_mask(c0, c1, true);
        dKb = at::where(trail, gpend_g.narrow(2, 0, d), dKb);
        dVb = at::where(trail, gpend_g.narrow(2, d, d), dVb);
        dEb = at::where(trail, gpend_g.narrow(2, 2 * d, 3), dEb);
        dMUb = at::where(trail, gpend_g.narrow(2, 2 * d + 3, 1), dMUb);
      }
      if (p0 > 0 && c0 == 0) {  // gradient of the initial buffer's rows
        const auto dst = d_init_pend.narrow(1, 0, p0);
        dst.narrow(2, 0, d).copy_(dKb[0].narrow(1, 0, p0));
        dst.narrow(2, d, d).copy_(dVb[0].narrow(1, 0, p0));
        dst.narrow(2, 2 * d, 3).copy_(dEb[0].narrow(1, 0, p0));
        dst.narrow(2, 2 * d + 3, 1).copy_(dMUb[0].narrow(1, 0, p0));
      }
      if (g.has_tokens()) {  // the tokens' gradients
        g.scatter(dq_r, dQb, c0, c1);
        g.scatter(dk_r, dKb, c0, c1);
        g.scatter(dv_r, dVb, c0, c1);
        g.scatter(deta_r, dEb, c0, c1);
        g.scatter(dmu_r, dMUb, c0, c1);
      }
      c1 = c0;
    }
    d_fast.index_copy_(0, g.ns_t, at::cat({dW, dM}, 1).view({G, H, kFastRows, hd}));
    g.put_by_head(d_pend, d_init_pend);
    d_targets.add_(d_tg.view({G, H, -1}).sum(0));
  }

  return io.finish(d_targets, q, k, v, eta, mu, w_gate, w_up, w_down);
}

}  // namespace allmem::ttt
