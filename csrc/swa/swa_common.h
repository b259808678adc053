// Shape and argument contract of the sliding-window attention ops, shared by every backend.
// Validation lives here (not in the Python wrappers) so that torch.ops.allmem.* called directly
// from C++ or another framework rejects bad input with the same messages.
#pragma once
#include <cmath>
#include <optional>
#include <utility>
#include <vector>

#include "common/checks.h"

namespace allmem::swa {

// Logical problem: N sequences; sequence n occupies rows [seq_start(n), seq_start(n) + seq_len(n))
// of the token dimension. Dense inputs are N = B sequences of L tokens each.
struct Problem {
  bool varlen = false;
  int64_t batch = 0;        // N sequences
  int64_t max_len = 0;      // L (dense) or max_seqlen (varlen)
  int64_t total = 0;        // B * L or T
  int64_t hq = 0, hkv = 0, head_dim = 0;
  int64_t window = 0, sinks = 0;
  double scale = 0.0;
};

inline void check_window_sinks(int64_t window, int64_t sinks) {
  ALLMEM_CHECK(window >= 1, "window must be >= 1, got ", window);
  ALLMEM_CHECK(sinks >= 0, "sinks must be >= 0, got ", sinks);
}

// softmax_scale: None means 1/sqrt(D); an explicit value must be finite and > 0.
inline double resolve_scale(std::optional<double> softmax_scale, int64_t head_dim) {
  if (!softmax_scale.has_value()) return 1.0 / std::sqrt(static_cast<double>(head_dim));
  const double s = *softmax_scale;
  ALLMEM_CHECK(std::isfinite(s) && s > 0, "softmax_scale must be finite and > 0 (or None for 1/sqrt(D)), got ", s);
  return s;
}

// Validates q/k/v (+ cu_seqlens) for swa_fwd / swa_bwd and returns the problem description.
// validate_cu_seqlens=false skips reading cu_seqlens' values (the CUDA path reads them once).
inline Problem check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t window,
                         int64_t sinks, std::optional<double> softmax_scale, const std::optional<at::Tensor>& cu_seqlens,
                         int64_t max_seqlen, bool validate_cu_seqlens = true) {
  check_window_sinks(window, sinks);
  check_floating(q, "q");
  check_same_dtype(q, "q", k, "k");
  check_same_dtype(q, "q", v, "v");
  check_same_device(q, "q", k, "k");
  check_same_device(q, "q", v, "v");
  Problem p;
  p.varlen = cu_seqlens.has_value();
  p.window = window;
  p.sinks = sinks;
  const int64_t tok_dims = p.varlen ? 1 : 2;
  const char* layout = p.varlen ? "[T, H, D] (varlen)" : "[B, L, H, D]";
  check_dim(q, tok_dims + 2, "q", layout);
  check_dim(k, tok_dims + 2, "k", layout);
  check_dim(v, tok_dims + 2, "v", layout);
  ALLMEM_CHECK(k.sizes() == v.sizes(), "k and v must have the same shape, got ", shape_str(k), " and ",
               shape_str(v));
  for (int64_t d = 0; d < tok_dims; ++d) {
    ALLMEM_CHECK(q.size(d) == k.size(d), "q and k must agree in the token dimensions, got q ", shape_str(q),
                 " and k ", shape_str(k));
  }
  p.hq = q.size(tok_dims);
  p.hkv = k.size(tok_dims);
  p.head_dim = q.size(tok_dims + 1);
  ALLMEM_CHECK(k.size(tok_dims + 1) == p.head_dim, "k and v head dim must equal q's head dim ", p.head_dim,
               ", got ", k.size(tok_dims + 1));
  ALLMEM_CHECK(p.hkv >= 1 && p.hq % p.hkv == 0, "number of q heads (", p.hq,
               ") must be a multiple of the number of k/v heads (", p.hkv, ")");
  ALLMEM_CHECK(p.head_dim >= 1, "head dim must be >= 1, got ", p.head_dim);
  p.scale = resolve_scale(softmax_scale, p.head_dim);
  if (p.varlen) {
    const auto& cu = *cu_seqlens;
    check_same_device(q, "q", cu, "cu_seqlens");
    p.total = q.size(0);
    if (validate_cu_seqlens) {
      p.batch = check_cu_seqlens(cu, p.total, "T (q.size(0))");
    } else {
      ALLMEM_CHECK(cu.scalar_type() == at::kInt, "cu_seqlens must be int32, got ", cu.scalar_type());
      ALLMEM_CHECK(cu.dim() == 1 && cu.size(0) >= 2, "cu_seqlens must be 1-D [N+1], got shape ", shape_str(cu));
      p.batch = cu.size(0) - 1;
    }
    ALLMEM_CHECK(max_seqlen >= 0, "max_seqlen must be >= 0, got ", max_seqlen);
    p.max_len = max_seqlen;
  } else {
    p.batch = q.size(0);
    p.max_len = q.size(1);
    p.total = p.batch * p.max_len;
  }
  return p;
}

// Row statistics (lse, delta) layout: [B, Hq, L] dense, [Hq, T] varlen.
inline std::vector<int64_t> lse_shape(const Problem& p) {
  if (p.varlen) return {p.hq, p.total};
  return {p.batch, p.hq, p.max_len};
}

inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  ALLMEM_CHECK(t.sizes() == ref.sizes(), name, " must have the shape of ", ref_name, " ", shape_str(ref), ", got ",
               shape_str(t));
  check_same_dtype(ref, ref_name, t, name);
  check_same_device(ref, ref_name, t, name);
}

// swa_bwd's arguments beyond q/k/v: dout and out shaped like q, lse float32 of lse_shape(p).
inline void check_bwd_args(const Problem& p, const at::Tensor& q, const at::Tensor& dout, const at::Tensor& out,
                           const at::Tensor& lse) {
  check_like(dout, "dout", q, "q");
  check_like(out, "out", q, "q");
  ALLMEM_CHECK(lse.scalar_type() == at::kFloat, "lse must be float32, got ", lse.scalar_type());
  check_same_device(q, "q", lse, "lse");
  const auto want_lse = lse_shape(p);
  ALLMEM_CHECK(lse.sizes() == at::IntArrayRef(want_lse), "lse must have shape ", shape_str(want_lse),
               ", got ", shape_str(lse));
}

struct DecodeProblem {
  int64_t batch = 0, new_len = 0, hq = 0, hkv = 0, head_dim = 0;
  int64_t slots = 0;  // S + W
  double scale = 0.0;
};

// swa_decode's arguments: dtypes, devices and shapes of q/k_new/v_new, the S + W cache and
// cache_seqlens. Values of cache_seqlens and backend limits are each backend's to check.
inline DecodeProblem check_decode_args(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                                       const at::Tensor& k_cache, const at::Tensor& v_cache,
                                       const at::Tensor& cache_seqlens, int64_t window, int64_t sinks,
                                       std::optional<double> softmax_scale) {
  check_window_sinks(window, sinks);
  check_floating(q, "q");
  check_same_dtype(q, "q", k_new, "k_new");
  check_same_dtype(q, "q", v_new, "v_new");
  check_same_dtype(q, "q", k_cache, "k_cache");
  check_same_dtype(q, "q", v_cache, "v_cache");
  check_same_device(q, "q", k_new, "k_new");
  check_same_device(q, "q", v_new, "v_new");
  check_same_device(q, "q", k_cache, "k_cache");
  check_same_device(q, "q", v_cache, "v_cache");
  check_same_device(q, "q", cache_seqlens, "cache_seqlens");
  check_dim(q, 4, "q", "[B, Lnew, Hq, D]");
  check_dim(k_new, 4, "k_new", "[B, Lnew, Hkv, D]");
  DecodeProblem p;
  p.batch = q.size(0);
  p.new_len = q.size(1);
  p.hq = q.size(2);
  p.head_dim = q.size(3);
  p.hkv = k_new.size(2);
  ALLMEM_CHECK(k_new.size(0) == p.batch && k_new.size(1) == p.new_len && k_new.size(3) == p.head_dim,
               "k_new must be [B, Lnew, Hkv, D] with B, Lnew, D of q ", shape_str(q), ", got ", shape_str(k_new));
  ALLMEM_CHECK(v_new.sizes() == k_new.sizes(), "v_new must have the shape of k_new ", shape_str(k_new), ", got ",
               shape_str(v_new));
  ALLMEM_CHECK(p.hkv >= 1 && p.hq % p.hkv == 0, "number of q heads (", p.hq,
               ") must be a multiple of the number of k/v heads (", p.hkv, ")");
  p.slots = sinks + window;
  const std::vector<int64_t> want_cache{p.batch, p.slots, p.hkv, p.head_dim};
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{k_cache, "k_cache"}, {v_cache, "v_cache"}}) {
    ALLMEM_CHECK(t.sizes() == at::IntArrayRef(want_cache), name, " must have shape [B, S + W, Hkv, D] = ",
                 shape_str(want_cache), ", got ", shape_str(t));
  }
  ALLMEM_CHECK(cache_seqlens.scalar_type() == at::kInt, "cache_seqlens must be int32, got ",
               cache_seqlens.scalar_type());
  ALLMEM_CHECK(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == p.batch, "cache_seqlens must have shape [B] = [",
               p.batch, "], got ", shape_str(cache_seqlens));
  p.scale = resolve_scale(softmax_scale, p.head_dim);
  return p;
}

// Visibility rule (SPEC.md): key j is visible to query i iff j <= i and (j < S or i - j < W).
inline bool visible(int64_t i, int64_t j, int64_t window, int64_t sinks) {
  return j <= i && (j < sinks || i - j < window);
}

// Slot of absolute position `pos` in the S + W decode cache: sinks first, then a ring of W.
inline int64_t cache_slot(int64_t pos, int64_t window, int64_t sinks) {
  return pos < sinks ? pos : sinks + (pos - sinks) % window;
}

}  // namespace allmem::swa
