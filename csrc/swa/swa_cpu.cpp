// CPU implementation of the sliding-window attention ops (schemas in csrc/registration.cpp,
// math in SPEC.md "SWA with sinks"; reference allmem_ops.reference.swa_naive; tests
// tests/test_swa.py; benchmark bench/bench_swa_cpu.py).
//
// swa_fwd: FlashAttention-style. Queries in blocks of kBlockQ rows, keys in tiles of kBlockK,
//   online softmax; a query block visits only the sink tiles and the band [i0 - W + 1, i1), so
//   the cost is O(L * (W + S)). Work items (sequence, query block, query head) go to
//   at::parallel_for.
// swa_bwd: hand-written from lse and delta = rowsum(dout * out): P is recomputed per tile, then
//   dV += P^T dO, dS = P * (dO V^T - delta), dK += dS^T Q, dQ += dS K. One work item per
//   (sequence, kv head) owns dK/dV of that head (the group's query heads accumulate into them
//   serially: no races, no atomics); parallelism is therefore B * Hkv.
//   float64: the row lse is recomputed in float64, since the float32 lse of the schema would cap
//   the gradient accuracy at ~1e-7.
// swa_decode: per (batch row, kv head), each new token is written to its slot, then the group's
//   query heads attend over the (at most S + W) slots holding visible positions with the same
//   tile kernel as the forward: O(S + W) per token.
// Dtypes: float32 and float64 natively; float16/bfloat16 inputs are widened to float32, computed,
//   and the results rounded once (lse is float32 always).
//
// The tile kernels (swa_cpu_kernel.h) are compiled three times: portable, and (GCC, x86-64)
// AVX2+FMA and AVX-512, selected at run time by kernels(): the x86-64 baseline (SSE2, no FMA)
// runs the score and value GEMMs at a fraction of what the core can do.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "swa/swa_common.h"
#include "swa/swa_cpu_types.h"

namespace allmem::swa::cpu {

// GCC: see swa_cpu_kernel.h for why these options, and kernels() for how the build is chosen.
#if defined(__GNUC__) && !defined(__clang__)
#define ALLMEM_SWA_GCC 1
#else
#define ALLMEM_SWA_GCC 0
#endif

#if ALLMEM_SWA_GCC
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math", "fp-contract=fast")
#endif
namespace isa_portable {
#define ALLMEM_SWA_VEC_BYTES 16
#include "swa/swa_cpu_kernel.h"
#undef ALLMEM_SWA_VEC_BYTES
}  // namespace isa_portable
#if ALLMEM_SWA_GCC
#pragma GCC pop_options
#endif

#if ALLMEM_SWA_GCC && defined(__x86_64__)
#define ALLMEM_SWA_X86_BUILDS 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#pragma GCC optimize("no-trapping-math", "fp-contract=fast")
namespace isa_avx2 {
#define ALLMEM_SWA_VEC_BYTES 32
#include "swa/swa_cpu_kernel.h"
#undef ALLMEM_SWA_VEC_BYTES
}  // namespace isa_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")
#pragma GCC optimize("no-trapping-math", "fp-contract=fast")
namespace isa_avx512 {
#define ALLMEM_SWA_VEC_BYTES 64
#include "swa/swa_cpu_kernel.h"
#undef ALLMEM_SWA_VEC_BYTES
}  // namespace isa_avx512
#pragma GCC pop_options
#else
#define ALLMEM_SWA_X86_BUILDS 0
#endif

namespace {

template <typename T>
struct KernelSet {
  decltype(&isa_portable::fwd_block<T>) fwd;
  decltype(&isa_portable::bwd_kv_head<T>) bwd;
  decltype(&isa_portable::attend_block<T>) attend;
};

// The widest build this CPU runs, capped by ALLMEM_SWA_CPU_ISA=portable|avx2|avx512 (the tests
// run every build the machine has against the reference).
template <typename T>
KernelSet<T> kernels() {
  const char* env = std::getenv("ALLMEM_SWA_CPU_ISA");
  const std::string cap = env == nullptr ? "avx512" : env;
  ALLMEM_CHECK(cap == "portable" || cap == "avx2" || cap == "avx512",
               "ALLMEM_SWA_CPU_ISA must be portable, avx2 or avx512, got ", cap);
#if ALLMEM_SWA_X86_BUILDS
  static const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  static const bool has_avx512 = has_avx2 && __builtin_cpu_supports("avx512f") &&
                                 __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
                                 __builtin_cpu_supports("avx512dq");
  if (has_avx512 && cap == "avx512") return {&isa_avx512::fwd_block<T>, &isa_avx512::bwd_kv_head<T>, &isa_avx512::attend_block<T>};
  if (has_avx2 && cap != "portable") return {&isa_avx2::fwd_block<T>, &isa_avx2::bwd_kv_head<T>, &isa_avx2::attend_block<T>};
#endif
  return {&isa_portable::fwd_block<T>, &isa_portable::bwd_kv_head<T>, &isa_portable::attend_block<T>};
}

// Where each sequence lives: tokens [start, start + len) of the token dimension, and its rows of
// lse at lse_base + h * lse_head_stride + i (dense lse [B, Hq, L], varlen lse [Hq, T]).
struct Sequences {
  std::vector<int64_t> start, len, lse_base;
  int64_t lse_head_stride = 0;
};

Sequences sequences(const Problem& p, const std::optional<at::Tensor>& cu_seqlens) {
  Sequences s;
  s.start.resize(p.batch);
  s.len.resize(p.batch);
  s.lse_base.resize(p.batch);
  if (p.varlen) {
    auto cu = cu_seqlens->to(at::kCPU).contiguous();
    const int32_t* c = cu.data_ptr<int32_t>();
    int64_t longest = 0;
    for (int64_t n = 0; n < p.batch; ++n) {
      s.start[n] = c[n];
      s.len[n] = c[n + 1] - c[n];
      s.lse_base[n] = c[n];
      longest = std::max(longest, s.len[n]);
    }
    ALLMEM_CHECK(p.max_len >= longest, "max_seqlen must be >= the longest sequence in cu_seqlens (", longest,
                 "), got ", p.max_len);
    s.lse_head_stride = p.total;
  } else {
    for (int64_t n = 0; n < p.batch; ++n) {
      s.start[n] = n * p.max_len;
      s.len[n] = p.max_len;
      s.lse_base[n] = n * p.hq * p.max_len;
    }
    s.lse_head_stride = p.max_len;
  }
  return s;
}

// Items per parallel chunk so that a chunk holds at least ~8 MFLOP (~0.1-1 ms): small problems
// (a decode step, gradcheck-sized inputs) then run inline instead of paying a thread-pool round
// trip, which costs milliseconds when the cores are oversubscribed.
int64_t grain_for(int64_t flops_per_item) {
  constexpr int64_t kMinFlopsPerChunk = int64_t(1) << 23;
  return std::max<int64_t>(1, kMinFlopsPerChunk / std::max<int64_t>(1, flops_per_item));
}

at::Tensor widened(const at::Tensor& t) { return t.to(accumulate_dtype(t.scalar_type())).contiguous(); }

void check_cpu(const at::Tensor& t, const char* name) {
  ALLMEM_CHECK(t.device().is_cpu(), name, " must be a CPU tensor for the CPU kernel, got ", t.device());
}

std::tuple<at::Tensor, at::Tensor> swa_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               int64_t window, int64_t sinks, std::optional<double> softmax_scale,
                                               const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen) {
  const Problem p = check_qkv(q, k, v, window, sinks, softmax_scale, cu_seqlens, max_seqlen);
  check_cpu(q, "q");
  const Sequences seqs = sequences(p, cu_seqlens);
  const at::Tensor qc = widened(q), kc = widened(k), vc = widened(v);
  at::Tensor out = at::empty(q.sizes(), qc.options());
  at::Tensor lse = at::empty(lse_shape(p), q.options().dtype(at::kFloat));

  // Work items: (sequence, query block) x query head.
  std::vector<std::pair<int64_t, int64_t>> blocks;
  for (int64_t n = 0; n < p.batch; ++n)
    for (int64_t i0 = 0; i0 < seqs.len[n]; i0 += kBlockQ) blocks.emplace_back(n, i0);
  const int64_t n_items = static_cast<int64_t>(blocks.size()) * p.hq;
  const int64_t D = p.head_dim, group = p.hq / p.hkv;

  AT_DISPATCH_FLOATING_TYPES(qc.scalar_type(), "swa_fwd_cpu", [&] {
    using T = scalar_t;
    const auto fwd = kernels<T>().fwd;
    const T* qp = qc.const_data_ptr<T>();
    const T* kp = kc.const_data_ptr<T>();
    const T* vp = vc.const_data_ptr<T>();
    T* op = out.mutable_data_ptr<T>();
    float* lp = lse.mutable_data_ptr<float>();
    const int64_t q_stride = p.hq * D, kv_stride = p.hkv * D;
    const int64_t keys = std::min(p.max_len, window + sinks + kBlockQ);
    at::parallel_for(0, n_items, grain_for(4 * kBlockQ * keys * D), [&](int64_t begin, int64_t end) {
      std::vector<T> scratch;
      std::vector<KeyTile> tiles;
      for (int64_t item = begin; item < end; ++item) {
        const auto [n, i0] = blocks[item / p.hq];
        const int64_t h = item % p.hq, hk = h / group;
        const int64_t nq = std::min(kBlockQ, seqs.len[n] - i0);
        const int64_t tok = seqs.start[n];
        const Slice<T> x{qp + tok * q_stride + h * D, kp + tok * kv_stride + hk * D, vp + tok * kv_stride + hk * D,
                         q_stride, kv_stride};
        fwd(x, D, i0, nq, window, sinks, static_cast<T>(p.scale), op + (tok + i0) * q_stride + h * D,
            lp + seqs.lse_base[n] + h * seqs.lse_head_stride + i0, scratch, tiles);
      }
    });
  });
  return {out.to(q.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> swa_bwd_cpu(const at::Tensor& dout, const at::Tensor& q,
                                                           const at::Tensor& k, const at::Tensor& v,
                                                           const at::Tensor& out, const at::Tensor& lse,
                                                           int64_t window, int64_t sinks, std::optional<double> softmax_scale,
                                                           const std::optional<at::Tensor>& cu_seqlens,
                                                           int64_t max_seqlen) {
  const Problem p = check_qkv(q, k, v, window, sinks, softmax_scale, cu_seqlens, max_seqlen);
  check_cpu(q, "q");
  check_bwd_args(p, q, dout, out, lse);
  const Sequences seqs = sequences(p, cu_seqlens);
  const at::Tensor qc = widened(q), kc = widened(k), vc = widened(v), oc = widened(out), doc = widened(dout);
  const at::Tensor lc = lse.contiguous();
  at::Tensor dq = at::empty(q.sizes(), qc.options());
  at::Tensor dk = at::empty(k.sizes(), kc.options());
  at::Tensor dv = at::empty(v.sizes(), vc.options());
  const int64_t D = p.head_dim, group = p.hq / p.hkv;

  AT_DISPATCH_FLOATING_TYPES(qc.scalar_type(), "swa_bwd_cpu", [&] {
    using T = scalar_t;
    const auto bwd = kernels<T>().bwd;
    const bool recompute_lse = std::is_same_v<T, double>;
    const int64_t q_stride = p.hq * D, kv_stride = p.hkv * D;
    const T* qp = qc.const_data_ptr<T>();
    const T* kp = kc.const_data_ptr<T>();
    const T* vp = vc.const_data_ptr<T>();
    const T* op = oc.const_data_ptr<T>();
    const T* dop = doc.const_data_ptr<T>();
    const float* lp = lc.const_data_ptr<float>();
    T* dqp = dq.mutable_data_ptr<T>();
    T* dkp = dk.mutable_data_ptr<T>();
    T* dvp = dv.mutable_data_ptr<T>();
    // One item per (sequence, kv head): it owns dK/dV of that head, so no two threads touch
    // the same accumulator, and dQ of the group's query heads.
    const int64_t keys = std::min(p.max_len, window + sinks + kBlockQ);
    at::parallel_for(0, p.batch * p.hkv, grain_for(12 * p.max_len * group * keys * D), [&](int64_t begin, int64_t end) {
      std::vector<T> scratch, dk_acc, dv_acc;
      std::vector<KeyTile> tiles;
      for (int64_t item = begin; item < end; ++item) {
        const int64_t n = item / p.hkv, hk = item % p.hkv;
        const int64_t len = seqs.len[n], tok = seqs.start[n], h0 = hk * group;
        dk_acc.assign(len * D, T(0));
        dv_acc.assign(len * D, T(0));
        const int64_t qoff = tok * q_stride + h0 * D, kvoff = tok * kv_stride + hk * D;
        const BwdSlice<T> x{qp + qoff,  kp + kvoff, vp + kvoff, op + qoff,
                            dop + qoff, lp + seqs.lse_base[n] + h0 * seqs.lse_head_stride,
                            dqp + qoff, q_stride,   kv_stride,  seqs.lse_head_stride,
                            group};
        bwd(x, len, D, window, sinks, static_cast<T>(p.scale), recompute_lse, dk_acc.data(), dv_acc.data(), scratch,
            tiles);
        const T scale = static_cast<T>(p.scale);
        for (int64_t r = 0; r < len; ++r) {
          T* dkr = dkp + kvoff + r * kv_stride;
          T* dvr = dvp + kvoff + r * kv_stride;
          for (int64_t d = 0; d < D; ++d) {
            dkr[d] = dk_acc[r * D + d] * scale;
            dvr[d] = dv_acc[r * D + d];
          }
        }
      }
    });
  });
  return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type())};
}

template <typename scalar_t>
struct DecodeArgs {
  const scalar_t* q;
  const scalar_t* k_new;
  const scalar_t* v_new;
  scalar_t* k_cache;
  scalar_t* v_cache;
  scalar_t* out;
  int64_t l_new, hq, hkv, D, slots, window, sinks;
  double scale;
};

// One (batch row, kv head) of swa_decode: the Lnew tokens in order, each written into its slot and
// then attending. Once position pos is written, the slots holding positions visible to it are
// exactly [0, min(S, pos + 1)) (sinks) and [S, S + min(W, pos + 1 - S)) (every ring slot written
// so far holds one of the last W positions). Softmax ignores key order, so the group's query
// heads attend over these two slot ranges as fully visible tiles with the prefill tile kernel.
// Reduced-precision caches are mirrored in float32 for the item: widened once, then one row per
// token.
template <typename scalar_t>
void decode_kv_head(const DecodeArgs<scalar_t>& a, int64_t b, int64_t hk, int64_t cached,
                    decltype(&isa_portable::attend_block<at::opmath_type<scalar_t>>) attend) {
  using T = at::opmath_type<scalar_t>;
  constexpr bool kWiden = !std::is_same_v<T, scalar_t>;
  const int64_t group = a.hq / a.hkv, D = a.D, row = a.hkv * D;
  scalar_t* kc = a.k_cache + (b * a.slots * a.hkv + hk) * D;  // slot j at kc + j * row
  scalar_t* vc = a.v_cache + (b * a.slots * a.hkv + hk) * D;
  std::vector<T> kw, vw, qw, ow, scratch;
  std::vector<KeyTile> tiles;
  if constexpr (kWiden) {
    kw.resize(a.slots * D);
    vw.resize(a.slots * D);
    qw.resize(group * D);
    ow.resize(group * D);
    for (int64_t j = 0; j < a.slots; ++j)
      for (int64_t d = 0; d < D; ++d) {
        kw[j * D + d] = static_cast<T>(kc[j * row + d]);
        vw[j * D + d] = static_cast<T>(vc[j * row + d]);
      }
  }
  const T scale = static_cast<T>(a.scale);
  for (int64_t t = 0; t < a.l_new; ++t) {
    const int64_t pos = cached + t;
    const int64_t slot = cache_slot(pos, a.window, a.sinks);
    const int64_t src = ((b * a.l_new + t) * a.hkv + hk) * D;
    std::copy(a.k_new + src, a.k_new + src + D, kc + slot * row);
    std::copy(a.v_new + src, a.v_new + src + D, vc + slot * row);
    tiles.clear();
    const int64_t n_sink = std::min(a.sinks, pos + 1);
    const int64_t n_ring = std::min(a.window, std::max<int64_t>(0, pos + 1 - a.sinks));
    for (int64_t j0 = 0; j0 < n_sink; j0 += kBlockK) tiles.push_back({j0, std::min(kBlockK, n_sink - j0), true});
    for (int64_t j0 = 0; j0 < n_ring; j0 += kBlockK)
      tiles.push_back({a.sinks + j0, std::min(kBlockK, n_ring - j0), true});
    const int64_t qoff = ((b * a.l_new + t) * a.hq + hk * group) * D;  // the group's rows, stride D
    Slice<T> x;
    T* out;
    if constexpr (kWiden) {
      for (int64_t d = 0; d < D; ++d) {
        kw[slot * D + d] = static_cast<T>(a.k_new[src + d]);
        vw[slot * D + d] = static_cast<T>(a.v_new[src + d]);
      }
      for (int64_t e = 0; e < group * D; ++e) qw[e] = static_cast<T>(a.q[qoff + e]);
      x = {qw.data(), kw.data(), vw.data(), D, D};
      out = ow.data();
    } else {
      x = {a.q + qoff, kc, vc, D, row};
      out = a.out + qoff;
    }
    for (int64_t g0 = 0; g0 < group; g0 += kBlockQ)
      attend(x, D, g0, std::min(kBlockQ, group - g0), tiles, a.window, a.sinks, scale, out + g0 * D, nullptr,
             scratch);
    if constexpr (kWiden)
      for (int64_t e = 0; e < group * D; ++e) a.out[qoff + e] = static_cast<scalar_t>(ow[e]);
  }
}

at::Tensor swa_decode_cpu(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new, at::Tensor& k_cache,
                          at::Tensor& v_cache, const at::Tensor& cache_seqlens, int64_t window, int64_t sinks,
                          std::optional<double> softmax_scale, bool /*check_lengths: always checked here*/) {
  const DecodeProblem dp = check_decode_args(q, k_new, v_new, k_cache, v_cache, cache_seqlens, window, sinks,
                                             softmax_scale);
  check_cpu(q, "q");
  const int64_t B = dp.batch, l_new = dp.new_len, hq = dp.hq, D = dp.head_dim, hkv = dp.hkv, slots = dp.slots;
  // Written in place through raw pointers, so the layout must be the plain one.
  ALLMEM_CHECK(k_cache.is_contiguous(), "k_cache must be contiguous");
  ALLMEM_CHECK(v_cache.is_contiguous(), "v_cache must be contiguous");
  const at::Tensor lens = cache_seqlens.contiguous();
  const int32_t* lp = lens.const_data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b)
    ALLMEM_CHECK(lp[b] >= 0, "cache_seqlens must be >= 0, got cache_seqlens[", b, "] = ", lp[b]);
  const double scale = dp.scale;
  const at::Tensor qc = q.contiguous(), kn = k_new.contiguous(), vn = v_new.contiguous();
  at::Tensor out = at::empty(q.sizes(), qc.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "swa_decode_cpu", [&] {
    const DecodeArgs<scalar_t> a{qc.const_data_ptr<scalar_t>(),
                                 kn.const_data_ptr<scalar_t>(),
                                 vn.const_data_ptr<scalar_t>(),
                                 k_cache.mutable_data_ptr<scalar_t>(),
                                 v_cache.mutable_data_ptr<scalar_t>(),
                                 out.mutable_data_ptr<scalar_t>(),
                                 l_new,
                                 hq,
                                 hkv,
                                 D,
                                 slots,
                                 window,
                                 sinks,
                                 scale};
    const auto attend = kernels<at::opmath_type<scalar_t>>().attend;
    at::parallel_for(0, B * hkv, grain_for(4 * l_new * (hq / hkv) * slots * D), [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item)
        decode_kv_head(a, item / hkv, item % hkv, lp[item / hkv], attend);
    });
  });
  return out;
}

}  // namespace
}  // namespace allmem::swa::cpu

TORCH_LIBRARY_IMPL(allmem, CPU, m) {
  m.impl("swa_fwd", &allmem::swa::cpu::swa_fwd_cpu);
  m.impl("swa_bwd", &allmem::swa::cpu::swa_bwd_cpu);
  m.impl("swa_decode", &allmem::swa::cpu::swa_decode_cpu);
}
