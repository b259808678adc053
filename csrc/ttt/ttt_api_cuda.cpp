// Torch glue of the TTT memory CUDA kernels: argument checks (the CPU op's contract, plus the GPU
// path's limits), output allocation and TORCH_LIBRARY_IMPL(allmem, CUDA). The kernels are in
// ttt_fwd.cu and ttt_bwd.cu; their inputs and outputs (checkpoints included) have the CPU op's
// layouts and meaning, so the Python wrapper (allmem_ops/ttt.py) is the same for both backends.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>
#include <vector>

#include "common/checks.h"
#include "ttt/ttt_bwd_composite.h"
#include "ttt/ttt_chunk.h"
#include "ttt/ttt_composite_cuda.h"
#include "ttt/ttt_decode_cuda.h"
#include "ttt/ttt_common.h"
#include "ttt/ttt_cuda.h"

namespace allmem::ttt::cuda {
namespace {

void check_on_cuda(const at::Tensor& t, const char* name) {
  ALLMEM_CHECK(t.is_cuda(), name, " must be a CUDA tensor for the CUDA kernel, got ", t.device());
}

InDType cuda_dtype(const at::Tensor& q) {
  check_cuda_input_dtype(q);
  const auto st = q.scalar_type();
  return st == at::kBFloat16 ? InDType::kBFloat16 : st == at::kHalf ? InDType::kFloat16 : InDType::kFloat32;
}

// The shared contract (ttt_common.h) with the GPU path's limits: the dtype first, so float64
// input is told to use the CPU kernel rather than that its float64 state should be float32.
Layout check_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& eta,
                  const at::Tensor& mu, const at::Tensor& w_gate, const at::Tensor& w_up, const at::Tensor& w_down,
                  const at::Tensor& pending, const at::Tensor& pending_len,
                  const std::optional<at::Tensor>& cu_seqlens, int64_t chunk_size) {
  check_on_cuda(q, "q");
  check_floating(q, "q");
  cuda_dtype(q);
  Layout lay = check_and_layout(q, k, v, eta, mu, w_gate, w_up, w_down, pending, pending_len, cu_seqlens,
                                chunk_size, at::kFloat);
  check_cuda_sizes(lay);
  ALLMEM_CHECK(lay.N * lay.H <= INT_MAX, "the CUDA TTT kernel runs one CTA per (sequence, head): at most ", INT_MAX,
               " of them, got ", lay.N, " x ", lay.H);
  return lay;
}

// The tensor-core forward (ttt_fwd_tc.cuh) is the default where it applies (d = h = 64, bf16/fp16,
// sm_90+) since it passed its GPU tests (bench/results/gpu_2026-11-26b_h200); ALLMEM_TTT_TC=0,
// read at every call, selects the SIMT kernel; anything else runs the SIMT kernel. Both write the
// same outputs and checkpoints.
// Its q, k, v rows are read as 16-byte vectors: views that start off a 16-byte boundary take the
// SIMT kernel.
// The tensor-core backward (ttt_bwd_tc.cuh) follows the same switch and conditions (its q, k, v
// and grad_o rows are 16-byte vectors too); it runs from either forward's checkpoints.
// The conditions every tensor-core kernel shares: not switched off, sm_90+, bf16/fp16, the
// cluster grid fits, 16-byte aligned token rows; `d` = h is the size the kernel takes.
bool tc_conditions(const Layout& lay, InDType dt, std::initializer_list<const at::Tensor*> rows, int64_t d) {
  const char* env = std::getenv("ALLMEM_TTT_TC");
  if (env != nullptr && std::strcmp(env, "0") == 0) return false;
  const int major = at::cuda::getCurrentDeviceProperties()->major;
  if (lay.d != d || lay.h != d || major < 9 || (dt != InDType::kBFloat16 && dt != InDType::kFloat16) ||
      lay.N * lay.H > INT_MAX / 8) {
    return false;
  }
  for (const at::Tensor* t : rows) {
    if (reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 != 0) return false;
  }
  return true;
}

// The fused tensor-core kernels (ttt_fwd_tc.cuh, ttt_bwd_tc.cuh) take d = h = 64.
bool use_tc_kernels(const Layout& lay, InDType dt, std::initializer_list<const at::Tensor*> rows) {
  return tc_conditions(lay, dt, rows, 64);
}

// Split mode's update chain, from ALLMEM_TTT_TC_CHAIN (read at every call): unset, empty or
// "tokens", the token-split cluster kernel at d = h = 64 and the hidden-unit cluster chain
// (ttt_chain_tc.cuh) at 128 (the token-split kernel is 64 only); "units", the hidden-unit chain at
// 64 too (3.3x slower there, run d); "global", the hidden-unit chain without clusters (kGx: row-norm
// partials and one barrier per chunk through global memory, cooperative launches) at d = h = 64 and
// 128 on any sm_80+ device whose shared memory fits it (an error where it does not), always with
// split mode's read; "tokens-global", at d = 64 the token-split forward without clusters (its
// reduction and publish through global memory; fused or split mode as the cluster kernel), at 128
// the same as "global". With either of the last two the d = h = 64 backward is the tensor-core one
// without clusters (ttt_bwd_tc.cuh kGx, split mode). Opt-in: emulator-tested, not yet run on a GPU;
// off sm_90 they are the only tensor-core kernels (the SIMT forward, one CTA per head chain, and the
// composite backward run otherwise).
enum class ChainMode { kTokens, kUnits, kGlobal, kTokensGlobal };

ChainMode chain_mode() {
  const char* env = std::getenv("ALLMEM_TTT_TC_CHAIN");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "tokens") == 0) return ChainMode::kTokens;
  if (std::strcmp(env, "units") == 0) return ChainMode::kUnits;
  if (std::strcmp(env, "tokens-global") == 0) return ChainMode::kTokensGlobal;
  ALLMEM_CHECK(std::strcmp(env, "global") == 0, "ALLMEM_TTT_TC_CHAIN: expected tokens, units, global or "
               "tokens-global, got '", env, "'");
  return ChainMode::kGlobal;
}

bool use_units_chain(int64_t d, ChainMode mode) { return d == 128 || mode == ChainMode::kUnits; }

// Jobs per cooperative launch of a kernel without clusters, from ALLMEM_TTT_TC_GX_WAVE (tests:
// several waves on a small batch): unset, as many as the device runs at once.
int64_t chain_gx_wave() {
  const char* env = std::getenv("ALLMEM_TTT_TC_GX_WAVE");
  if (env == nullptr || *env == '\0') return 0;
  char* end = nullptr;
  const long long n = std::strtoll(env, &end, 10);
  ALLMEM_CHECK(end != env && *end == '\0' && n > 0, "ALLMEM_TTT_TC_GX_WAVE: expected a positive integer, got '", env,
               "'");
  return n;
}

// Jobs per wave: as many as run at once (`fit`), at most ALLMEM_TTT_TC_GX_WAVE and the jobs there are.
int64_t gx_wave(int64_t jobs, int64_t fit) {
  const int64_t cap = chain_gx_wave();
  const int64_t w = cap > 0 && cap < fit ? cap : fit;
  return std::max<int64_t>(1, std::min(w, jobs));
}

// The kernels without clusters: the token-split forward (d = 64), the hidden-unit chain, the
// tensor-core backward (d = 64).
enum class GxKernel { kTokens, kChain, kBwd };

const char* gx_name(GxKernel kind) {
  return kind == GxKernel::kTokens ? "token-split forward" : kind == GxKernel::kChain ? "hidden-unit chain" : "backward";
}

// Jobs a kernel without clusters runs at once on the current device (the chain at d with `ctas`
// unit groups x `parts` token parts per job), asked once per device and kernel.
int64_t gx_fit(InDType dt, int64_t d, GxKernel kind, int ctas, int parts = 1) {
  static std::mutex mu;
  static std::map<std::tuple<int, int, int, int, int, int>, int64_t> cache;
  const std::tuple<int, int, int, int, int, int> key{
      at::cuda::current_device(), static_cast<int>(dt), static_cast<int>(d), static_cast<int>(kind), ctas, parts};
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it == cache.end()) {
    const int64_t n = kind == GxKernel::kTokens ? ttt_fwd_tc_gx_jobs(dt)
                      : kind == GxKernel::kBwd  ? ttt_bwd_tc_gx_jobs(dt)
                                                : ttt_chain_gx_jobs(dt, static_cast<int>(d), ctas, parts);
    it = cache.emplace(key, n).first;
  }
  return it->second;
}

// Whether the chain without clusters takes this call (ALLMEM_TTT_TC_CHAIN=global): as the other
// tensor-core kernels (not switched off, bf16/fp16, d = h in {64, 128}, 16-byte aligned rows), on
// sm_80+; heads along the read grid's y. Where only the device is what stops it (before sm_80, or
// too little shared memory) the request is an error rather than a silent change of kernel.
bool use_chain_gx(const Layout& lay, InDType dt, std::initializer_list<const at::Tensor*> rows, GxKernel kind) {
  const char* env = std::getenv("ALLMEM_TTT_TC");
  if (env != nullptr && std::strcmp(env, "0") == 0) return false;
  if (lay.d != lay.h || (lay.d != 64 && lay.d != 128) || (dt != InDType::kBFloat16 && dt != InDType::kFloat16) ||
      lay.H > 65535) {
    return false;
  }
  for (const at::Tensor* t : rows) {
    if (reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 != 0) return false;
  }
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  ALLMEM_CHECK(prop->major >= 8, "ALLMEM_TTT_TC_CHAIN: the kernels without clusters need an sm_80+ device, got sm_",
               prop->major, prop->minor);
  ALLMEM_CHECK(gx_fit(dt, lay.d, kind, 8) > 0, "ALLMEM_TTT_TC_CHAIN: this device cannot run the ", gx_name(kind),
               " without clusters at d = ", lay.d, " (too little shared memory per SM)");
  return true;
}

// Split mode of the tensor-core kernels (ttt_read_tc.cuh, ttt_bwd_tc.cuh): the reads (forward)
// and the reads' backward run chunk-parallel outside the sequential cluster chain. Its forward is
// bitwise the fused kernel's; its backward sums the read's weight gradient in another order (within
// 1e-3 of the fused backward, 4 u of float64). ALLMEM_TTT_TC_SPLIT=1 forces it on, =0 off. Unset
// (or anything else): on for d = h = 128, where the units chain + read is the only tensor-core
// forward (GPU tests and sanitizers passed in run d; not benchmarked yet, but the SIMT forward it
// replaces took 43 ms at B=1 L=8k and 672 ms at 128k in run b, 17-21x the compiled reference, one
// CTA per head chain); and for d = h = 64 when the longest sequence spans at least
// kSplitMinChunks chunks. Measured on an
// H200 (bench/results/gpu_2026-11-26d_h200, H = 8, C = 2048, split vs fused, ms): forward B=1 8k
// 0.43 vs 0.37, 32k 0.79 vs 0.85, 128k 2.36 vs 2.83, B=8 128k 11.99 vs 13.78; forward+backward B=1
// 8k 1.99 vs 1.62, 32k 2.79 vs 2.87, 128k 8.29 vs 9.63, B=8 8k 3.81 vs 3.75, 32k 11.53 vs 12.50.
// It pays from 16 chunks (32k) and loses at 4 (8k); 8 is between, not measured.
constexpr int64_t kSplitMinChunks = 8;

bool use_split_read(const Layout& lay) {
  if (lay.H > 65535) return false;  // the read kernels put heads along gridDim.y
  const char* env = std::getenv("ALLMEM_TTT_TC_SPLIT");
  if (env != nullptr && std::strcmp(env, "1") == 0) return true;
  if (env != nullptr && std::strcmp(env, "0") == 0) return false;
  if (lay.d == 128 && lay.h == 128) return true;
  if (lay.d != 64 || lay.h != 64) return false;
  int64_t longest = 0;  // tokens of the longest sequence's chunk walk, its pending tokens included
  for (int64_t i = 0; i < lay.N; ++i) longest = std::max(longest, lay.p0[i] + lay.len[i]);
  return longest >= kSplitMinChunks * lay.C;
}

// Warps per CTA of the token-split tensor-core forward (ttt_fwd_tc.cuh), from ALLMEM_TTT_TC_WARPS
// (read at every call): unset or "4", the default; "8" (opt-in: emulator-tested, not yet run on a
// GPU): two warp groups split each tile's hidden units and gradient columns.
int fwd_tc_warps() {
  const char* env = std::getenv("ALLMEM_TTT_TC_WARPS");
  if (env == nullptr || std::strcmp(env, "4") == 0) return 4;
  ALLMEM_CHECK(std::strcmp(env, "8") == 0, "ALLMEM_TTT_TC_WARPS: expected 4 or 8, got '", env, "'");
  return 8;
}

// The split-mode chain's products on wgmma (ttt_fwd_tc.cuh kWg), from ALLMEM_TTT_TC_WGMMA (read at
// every call): unset or "0", mma.sync (the default); "1" (opt-in: emulator-tested, not yet run on
// a GPU): the wgmma chain (4 or 8 warps: one or two warpgroups) and read where split mode runs the
// token-split chain, on a device that runs this binary's sm_90a code (else an error).
bool fwd_tc_wgmma() {
  const char* env = std::getenv("ALLMEM_TTT_TC_WGMMA");
  if (env == nullptr || std::strcmp(env, "0") == 0) return false;
  ALLMEM_CHECK(std::strcmp(env, "1") == 0, "ALLMEM_TTT_TC_WGMMA: expected 0 or 1, got '", env, "'");
  ALLMEM_CHECK(ttt_fwd_wg_available(), "ALLMEM_TTT_TC_WGMMA=1: this build has no sm_90a code for the device "
               "(build with ALLMEM_CUDA_ARCHS including 90a, run on an H100/H200)");
  return true;
}

// 8 or 16 CTAs per (sequence, head) job, from ALLMEM_TTT_TC_CLUSTER (read at every call): unset or
// "8", 8 (the default: the 16-CTA kernels have passed their emulator tests, not yet a GPU's); "16",
// 16 (an error naming `what` where the device cannot run a job of 16 at once); "auto", 16 where all
// `jobs` jobs of 16 run at once (and `split` has work for 16 CTAs), else 8. fit16() (jobs of 16
// the device runs at once; it may set kernel attributes) is asked once per device and `key` (per
// call site: each lambda type has its own cache).
template <class Fit>
int sixteen_or_eight(int64_t jobs, int key, const char* what, Fit fit16, bool split = true) {
  const char* env = std::getenv("ALLMEM_TTT_TC_CLUSTER");
  if (env == nullptr || std::strcmp(env, "8") == 0) return 8;
  const bool force = std::strcmp(env, "16") == 0;
  ALLMEM_CHECK(force || std::strcmp(env, "auto") == 0, "ALLMEM_TTT_TC_CLUSTER: expected 8, 16 or auto, got '", env,
               "'");
  if (jobs > INT_MAX / 16) return 8;
  static std::mutex mu;
  static std::map<std::pair<int, int>, int64_t> cache;
  const std::pair<int, int> k{at::cuda::current_device(), key};
  int64_t fit = 0;
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache.find(k);
    if (it == cache.end()) it = cache.emplace(k, static_cast<int64_t>(fit16())).first;
    fit = it->second;
  }
  ALLMEM_CHECK(!force || fit > 0, "ALLMEM_TTT_TC_CLUSTER=16: this device cannot run 16 CTAs of the ", what,
               " at once");
  return force || (split && jobs <= fit) ? 16 : 8;
}

// CTAs per cluster of the token-split tensor-core forward (with `warps` warps) and of the
// tensor-core backward: clusters of 16 at B = 1, H = 8 give twice the SMs per chain, half the tiles
// per CTA per chunk. The outputs (checkpoints, gradients) do not depend on it beyond float32
// summation order (mu's mean, the gradient partials).
// wgmma: the forward's wgmma form (its occupancy is its own: less shared memory).
int tc_cluster(const Layout& lay, InDType dt, int warps, bool backward, bool wgmma = false) {
  return sixteen_or_eight(lay.N * lay.H, (backward ? 0 : warps + (wgmma ? 16 : 0)) + 32 * static_cast<int>(dt),
                          backward ? "tensor-core TTT backward (a cluster of 16)"
                                   : "tensor-core TTT forward (a cluster of 16)",
                          [&] { return backward ? ttt_bwd_tc_active_clusters(dt, 16)
                                                : ttt_fwd_tc_active_clusters(dt, 16, warps, wgmma); },
                          // auto: 16 only where a chunk has a 64-token tile for each CTA (else the
                          // ranks without one only add a reduction over 16 peers)
                          (lay.C + 63) / 64 >= 16);
}

// Jobs of the d = 128 hidden-unit chain with ctas x parts CTAs each the current device runs at once:
// without clusters gx_fit's count, else the clusters of that shape (asked once per device, dtype
// and shape).
int64_t chain_fit(InDType dt, bool gx, int ctas, int parts) {
  if (gx) return gx_fit(dt, 128, GxKernel::kChain, ctas, parts);
  static std::mutex mu;
  static std::map<std::tuple<int, int, int, int>, int64_t> cache;
  std::lock_guard<std::mutex> lock(mu);
  const std::tuple<int, int, int, int> key{at::cuda::current_device(), static_cast<int>(dt), ctas, parts};
  auto it = cache.find(key);
  if (it == cache.end()) it = cache.emplace(key, ttt_chain_tc_active_clusters(dt, ctas, parts)).first;
  return it->second;
}

// CTAs per job of split mode's hidden-unit chain (ttt_chain_tc.cuh): 8 (each owns d / 8 hidden
// units), or at d = h = 128 16 (8 units each: twice the SMs per chain, half the products per CTA;
// a cluster of 16, or 16 co-resident CTAs without clusters). d = 64 keeps 8 (the products take n8
// blocks of units), though the variable is still checked. Opt-in: emulator-tested, not yet run on a
// GPU.
int chain_ctas(const Layout& lay, InDType dt, bool gx) {
  if (lay.d != 128) {  // the variable checked (too many jobs: 8 before any device query)
    return sixteen_or_eight(std::numeric_limits<int64_t>::max(), 0, "", [] { return int64_t{0}; });
  }
  return sixteen_or_eight(
      lay.N * lay.H, static_cast<int>(dt) * 2 + (gx ? 1 : 0),
      gx ? "TTT hidden-unit chain (without clusters)" : "TTT hidden-unit chain (a cluster of 16)",
      [&]() -> int64_t { return chain_fit(dt, gx, 16, 1); });
}

// The hidden-unit chain's shape: unit groups (ctas) x token parts (parts), CTAs per job their product.
struct ChainShape {
  int ctas = 8;
  int parts = 1;
};

// Token parts of the hidden-unit chain at d = h = 128, from ALLMEM_TTT_TC_CHAIN_PARTS (read at every
// call): unset or "1", 1 (each CTA walks every tile of a chunk for its d / 8 or d / 16 units); "2",
// 8 unit groups x 2 token parts, 16 CTAs per job (a cluster of 16, or 16 co-resident CTAs without
// clusters): each CTA walks every second tile, and the two parts' -G partials and momentum sums are
// added in part order, so both hold the same weights; "4", 8 x 4, 32 CTAs per job, without clusters
// only (ALLMEM_TTT_TC_CHAIN=global); "auto", the most parts (4 only without clusters) with which all
// B * H jobs run at once, else 1. It halves or quarters the tiles each CTA walks per chunk, which
// ALLMEM_TTT_TC_CLUSTER=16 does not (that halves each tile's products), for one more barrier per
// chunk. Opt-in: emulator-tested, not yet run on a GPU. Not with ALLMEM_TTT_TC_CLUSTER=16 (an error;
// auto then takes 1); it takes precedence over the cluster size's auto; at d = 64 the value is
// checked and unused (the token-split kernel is the d = 64 chain).
ChainShape chain_shape(const Layout& lay, InDType dt, bool gx) {
  const char* env = std::getenv("ALLMEM_TTT_TC_CHAIN_PARTS");
  int parts = 1;
  bool automatic = false;
  if (env != nullptr && *env != '\0' && std::strcmp(env, "1") != 0) {
    automatic = std::strcmp(env, "auto") == 0;
    ALLMEM_CHECK(automatic || std::strcmp(env, "2") == 0 || std::strcmp(env, "4") == 0,
                 "ALLMEM_TTT_TC_CHAIN_PARTS: expected 1, 2, 4 or auto, got '", env, "'");
    parts = automatic ? 0 : env[0] - '0';
  }
  const char* cl = std::getenv("ALLMEM_TTT_TC_CLUSTER");
  const bool sixteen = cl != nullptr && std::strcmp(cl, "16") == 0;
  if (parts == 1 || lay.d != 128 || (automatic && sixteen)) return {chain_ctas(lay, dt, gx), 1};
  ALLMEM_CHECK(!sixteen, "ALLMEM_TTT_TC_CHAIN_PARTS=", parts,
               " splits the tokens of 8 unit groups; not with ALLMEM_TTT_TC_CLUSTER=16 (16 unit groups)");
  ALLMEM_CHECK(gx || parts != 4, "ALLMEM_TTT_TC_CHAIN_PARTS=4: 32 CTAs per job exceed a cluster; it needs "
               "ALLMEM_TTT_TC_CHAIN=global (the chain without clusters)");
  if (automatic) {
    for (int s : {4, 2}) {
      if ((gx || s == 2) && lay.N * lay.H <= chain_fit(dt, gx, 8, s)) return {8, s};
    }
    return {chain_ctas(lay, dt, gx), 1};
  }
  // The cluster form launches every job's CTAs in one grid (the form without clusters, in waves).
  ALLMEM_CHECK(gx || lay.N * lay.H <= INT_MAX / (8 * parts), "ALLMEM_TTT_TC_CHAIN_PARTS=",
               parts, ": ", lay.N * lay.H, " (sequence, head) jobs of ", 8 * parts,
               " CTAs exceed a grid's 2^31 - 1 blocks; use 1 part or ALLMEM_TTT_TC_CHAIN=global");
  ALLMEM_CHECK(chain_fit(dt, gx, 8, parts) > 0, "ALLMEM_TTT_TC_CHAIN_PARTS=", parts, ": this device cannot run the ",
               8 * parts, " CTAs of a hidden-unit chain job at once",
               gx ? "" : " (a cluster of 16; ALLMEM_TTT_TC_CHAIN=global runs it without clusters)");
  return {8, parts};
}

// The read work of split mode (segment_reads), on the device.
at::Tensor read_work(const Layout& lay, const at::Device& device) {
  const auto work = segment_reads(lay.start.data(), lay.len.data(), lay.p0.data(), lay.slot.data(), lay.N, lay.C);
  return at::tensor(work, at::TensorOptions().dtype(at::kLong)).to(device);
}

// Per sequence, on the device: first packed token, length, initial pending length, first slot.
at::Tensor seq_table(const Layout& lay, const at::Device& device) {
  std::vector<int64_t> seq;
  seq.reserve(4 * lay.N);
  for (const auto* col : {&lay.start, &lay.len, &lay.p0, &lay.slot}) seq.insert(seq.end(), col->begin(), col->end());
  return at::tensor(seq, at::TensorOptions().dtype(at::kLong)).to(device);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ttt_memory_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& eta, const at::Tensor& mu,
    const at::Tensor& w_gate, const at::Tensor& w_up, const at::Tensor& w_down, const at::Tensor& fast,
    const at::Tensor& pending, const at::Tensor& pending_len, const std::optional<at::Tensor>& cu_seqlens,
    int64_t chunk_size, bool lact_order, bool residual) {
  const Layout lay = check_cuda(q, k, v, eta, mu, w_gate, w_up, w_down, pending, pending_len, cu_seqlens, chunk_size);
  check_state_tensor(fast, "fast", {lay.N, lay.H, kFastRows, lay.h * lay.d}, at::kFloat, q);
  const c10::cuda::CUDAGuard guard(q.device());
  if (composite_fwd_requested()) {  // batched ATen/cuBLAS and the composite's fused steps
    return ttt_memory_fwd_composite(q, k, v, eta, mu, w_gate, w_up, w_down, fast, pending, pending_len, cu_seqlens,
                                    chunk_size, lact_order, residual);
  }
  const InDType dt = cuda_dtype(q);
  auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous(), etac = eta.contiguous(), muc = mu.contiguous();
  auto wg = w_gate.contiguous(), wu = w_up.contiguous(), wd = w_down.contiguous();
  auto fast_in = fast.contiguous(), pend_in = pending.contiguous();

  auto o = at::empty_like(qc);
  auto fast_out = at::empty_like(fast_in);
  auto pend_out = at::empty_like(pend_in);
  auto ckpt = at::empty({lay.slots(), lay.H, kFastRows, lay.h * lay.d}, fast_in.options());
  if (lay.slots() > lay.used_slots) {
    ckpt.narrow(0, lay.used_slots, lay.slots() - lay.used_slots).zero_();  // keep the output deterministic
  }
  auto seq = seq_table(lay, q.device());
  std::vector<int64_t> plen_host(lay.N);
  for (int64_t n = 0; n < lay.N; ++n) plen_host[n] = (lay.p0[n] + lay.len[n]) % lay.C;
  auto plen_out = at::tensor(plen_host, at::TensorOptions().dtype(at::kLong)).to(q.device());

  if (lay.N > 0 && lay.H > 0) {
    FwdParams p{};
    p.q = qc.data_ptr();
    p.k = kc.data_ptr();
    p.v = vc.data_ptr();
    p.eta = etac.data_ptr();
    p.mu = muc.data_ptr();
    p.o = o.data_ptr();
    p.dtype = dt;
    p.w_gate = wg.data_ptr<float>();
    p.w_up = wu.data_ptr<float>();
    p.w_down = wd.data_ptr<float>();
    p.fast_in = fast_in.data_ptr<float>();
    p.pend_in = pend_in.data_ptr<float>();
    p.fast_out = fast_out.data_ptr<float>();
    p.pend_out = pend_out.data_ptr<float>();
    p.ckpt = ckpt.data_ptr<float>();
    p.seq = seq.data_ptr<int64_t>();
    p.n_seqs = lay.N;
    p.heads = lay.H;
    p.chunk = lay.C;
    p.lact_order = lact_order;
    p.residual = residual;
    const ChainMode chain = chain_mode();
    // Without clusters: the token-split forward (tokens-global, d = 64; fused or split mode as the
    // cluster kernel), else the hidden-unit chain (always split mode).
    const bool gx_tokens = chain == ChainMode::kTokensGlobal && lay.d == 64;
    const bool gx = (chain == ChainMode::kGlobal || chain == ChainMode::kTokensGlobal) &&
                    use_chain_gx(lay, dt, {&qc, &kc, &vc}, gx_tokens ? GxKernel::kTokens : GxKernel::kChain);
    const bool split = (gx && !gx_tokens) || use_split_read(lay);
    bool wgmma = false;  // the token-split chain ran on wgmma: the read does too
    const char* phases = std::getenv("ALLMEM_TTT_TC_PHASES");
    const bool profile = phases != nullptr && std::strcmp(phases, "1") == 0;
    if (profile) tc_phase_clock_slot() = at::Tensor();  // no stale clocks if another kernel runs
    // d = h = 128: tensor cores only in split mode (the units chain, then the parallel read).
    at::Tensor xchg, xcount, xpub;  // the kernels without clusters' exchange buffers, per job slot of a wave
    auto gx_buffers = [&](int64_t wave, int64_t floats_per_job) {
      xchg = at::empty({wave * floats_per_job}, fast_in.options());
      xcount = at::empty({wave * kXcountStride}, q.options().dtype(at::kInt));  // zeroed before each wave
      p.xchg = xchg.data_ptr<float>();
      p.xcount = reinterpret_cast<unsigned*>(xcount.data_ptr<int32_t>());
    };
    if (gx || use_tc_kernels(lay, dt, {&qc, &kc, &vc}) || (split && tc_conditions(lay, dt, {&qc, &kc, &vc}, 128))) {
      if (gx_tokens && gx) {
        const int64_t wave = gx_wave(lay.N * lay.H, gx_fit(dt, 64, GxKernel::kTokens, 8));
        gx_buffers(wave, 8 * kFwdGxPartFloats);
        xpub = at::empty({wave * 6 * 64 * 64}, q.options());
        p.xpub = xpub.data_ptr();
        p.skip_read = split;
        launch_ttt_fwd_tc_gx(p, at::cuda::getCurrentCUDAStream(), wave);
      } else if (gx) {
        const ChainShape cs = chain_shape(lay, dt, true);
        const int64_t wave = gx_wave(lay.N * lay.H, gx_fit(dt, lay.d, GxKernel::kChain, cs.ctas, cs.parts));
        gx_buffers(wave, ttt_chain_gx_xchg_floats(static_cast<int>(lay.d), cs.ctas, cs.parts));
        launch_ttt_chain_tc(p, static_cast<int>(lay.d), at::cuda::getCurrentCUDAStream(), true, wave, cs.ctas,
                            cs.parts);
      } else if (split && use_units_chain(lay.d, chain)) {
        const ChainShape cs = chain_shape(lay, dt, false);
        launch_ttt_chain_tc(p, static_cast<int>(lay.d), at::cuda::getCurrentCUDAStream(), false, 0, cs.ctas,
                            cs.parts);
      } else {
        p.skip_read = split;
        at::Tensor clock;
        if (profile) {
          clock = at::zeros({kPhaseSlots}, q.options().dtype(at::kLong));
          p.phase_clock = reinterpret_cast<long long*>(clock.data_ptr<int64_t>());
        }
        const int warps = fwd_tc_warps();
        wgmma = split && fwd_tc_wgmma();
        launch_ttt_fwd_tc(p, at::cuda::getCurrentCUDAStream(), tc_cluster(lay, dt, warps, false, wgmma), warps,
                          wgmma);
        if (clock.defined()) tc_phase_clock_slot() = clock;
      }
      if (split) {
        auto work = read_work(lay, q.device());
        ReadParams r{};
        r.q = qc.data_ptr();
        r.o = o.data_ptr();
        r.dtype = dt;
        r.ckpt = ckpt.data_ptr<float>();
        r.work = work.data_ptr<int64_t>();
        r.n_work = work.numel() / 3;
        r.heads = lay.H;
        r.residual = residual;
        r.d = static_cast<int>(lay.d);
        r.wgmma = wgmma;
        launch_ttt_read_tc(r, at::cuda::getCurrentCUDAStream());
      }
    } else {
      launch_ttt_fwd(p, static_cast<int>(lay.d), static_cast<int>(lay.h), at::cuda::getCurrentCUDAStream());
    }
  }
  return {o.view(q.sizes()), fast_out, pend_out, plen_out, ckpt};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
ttt_memory_bwd_cuda(const at::Tensor& grad_o, const std::optional<at::Tensor>& grad_fast,
                    const std::optional<at::Tensor>& grad_pending, const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& v, const at::Tensor& eta, const at::Tensor& mu, const at::Tensor& w_gate,
                    const at::Tensor& w_up, const at::Tensor& w_down, const at::Tensor& pending,
                    const at::Tensor& pending_len, const at::Tensor& checkpoints,
                    const std::optional<at::Tensor>& cu_seqlens, int64_t chunk_size, bool lact_order, bool residual) {
  const Layout lay = check_cuda(q, k, v, eta, mu, w_gate, w_up, w_down, pending, pending_len, cu_seqlens, chunk_size);
  const c10::cuda::CUDAGuard guard(q.device());
  const InDType dt = cuda_dtype(q);
  const int64_t d = lay.d, h = lay.h;
  ALLMEM_CHECK(grad_o.sizes() == q.sizes(), "grad_o must have the shape of q ", shape_str(q), ", got ",
               shape_str(grad_o));
  check_same_device(grad_o, "grad_o", q, "q");
  const std::vector<int64_t> fast_shape{lay.N, lay.H, kFastRows, h * d};
  if (grad_fast.has_value()) check_state_tensor(*grad_fast, "grad_fast", fast_shape, at::kFloat, q);
  if (grad_pending.has_value()) check_state_tensor(*grad_pending, "grad_pending", pending.sizes(), at::kFloat, q);
  check_state_tensor(checkpoints, "checkpoints", {lay.slots(), lay.H, kFastRows, h * d}, at::kFloat, q);

  auto f32 = q.options().dtype(at::kFloat);
  auto go = grad_o.to(q.scalar_type()).contiguous();
  auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous(), etac = eta.contiguous(), muc = mu.contiguous();
  // The batched-ATen backward (ttt_bwd_composite.h: cuBLAS matmuls over all heads of a sequence
  // per chunk) when asked for (ALLMEM_TTT_BWD=composite), and by default where the tensor-core
  // backward does not apply to 16-bit inputs (d = h = 128, or ALLMEM_TTT_TC=0): the SIMT kernel,
  // one CTA per head chain, took 2.0 s at d = 128 B=1 L=128k H=4 against the composite's 0.10 s on
  // an H100 (bench/results/gpu_2026-11-26e_h100). ALLMEM_TTT_BWD=kernel keeps the SIMT kernel.
  const BwdChoice choice = bwd_choice();
  // ALLMEM_TTT_TC_CHAIN=global or tokens-global (the forward's kernels without clusters) at d = h = 64:
  // the tensor-core backward without clusters too (split mode; sm_80+, an error where the device
  // cannot run it). Opt-in: emulator-tested, not yet run on a GPU.
  const ChainMode chain = chain_mode();
  const bool gx = choice != BwdChoice::kComposite &&
                  (chain == ChainMode::kGlobal || chain == ChainMode::kTokensGlobal) && d == 64 && h == 64 &&
                  use_chain_gx(lay, dt, {&qc, &kc, &vc, &go}, GxKernel::kBwd);
  const bool tc = gx || use_tc_kernels(lay, dt, {&qc, &kc, &vc, &go});
  if (choice == BwdChoice::kComposite || (choice == BwdChoice::kAuto && !tc && dt != InDType::kFloat32)) {
    return ttt_memory_bwd_composite(grad_o, grad_fast, grad_pending, q, k, v, eta, mu, w_gate, w_up, w_down, pending,
                                    pending_len, checkpoints, cu_seqlens, chunk_size, lact_order, residual);
  }
  auto wg = w_gate.contiguous(), wu = w_up.contiguous(), wd = w_down.contiguous();
  auto pend_in = pending.contiguous(), ckpt = checkpoints.contiguous();
  // The tensor-core kernels read the checkpoints as 16-byte vectors: a caller's view off a 16-byte
  // boundary is copied (the forward's own checkpoints are fresh allocations).
  if (reinterpret_cast<uintptr_t>(ckpt.data_ptr()) % 16 != 0) ckpt = ckpt.clone();
  auto d_fast = grad_fast.has_value() ? grad_fast->contiguous().clone() : at::zeros(fast_shape, f32);
  auto gpend = grad_pending.has_value() ? grad_pending->contiguous() : at::zeros_like(pend_in);
  auto d_pend = at::zeros_like(pend_in);
  auto dq = at::empty({lay.T, lay.H, d}, f32), dk = at::empty_like(dq), dv = at::empty_like(dq);
  auto deta = at::empty({lay.T, lay.H, 3}, f32), dmu = at::empty({lay.T, lay.H}, f32);
  auto d_targets = at::zeros({lay.N, lay.H, 2 * h + d}, f32);
  auto scratch = at::empty({lay.N, lay.H, 3, h * d}, f32);
  auto seq = seq_table(lay, q.device());

  if (lay.N > 0 && lay.H > 0) {
    BwdParams p{};
    p.grad_o = go.data_ptr();
    p.q = qc.data_ptr();
    p.k = kc.data_ptr();
    p.v = vc.data_ptr();
    p.eta = etac.data_ptr();
    p.mu = muc.data_ptr();
    p.dtype = dt;
    p.w_gate = wg.data_ptr<float>();
    p.w_up = wu.data_ptr<float>();
    p.w_down = wd.data_ptr<float>();
    p.pend_in = pend_in.data_ptr<float>();
    p.grad_pend = gpend.data_ptr<float>();
    p.ckpt = ckpt.data_ptr<float>();
    p.d_fast = d_fast.data_ptr<float>();
    p.d_pend = d_pend.data_ptr<float>();
    p.dq = dq.data_ptr<float>();
    p.dk = dk.data_ptr<float>();
    p.dv = dv.data_ptr<float>();
    p.deta = deta.data_ptr<float>();
    p.dmu = dmu.data_ptr<float>();
    p.d_targets = d_targets.data_ptr<float>();
    p.scratch = scratch.data_ptr<float>();
    p.seq = seq.data_ptr<int64_t>();
    p.n_seqs = lay.N;
    p.heads = lay.H;
    p.chunk = lay.C;
    p.lact_order = lact_order;
    p.residual = residual;
    if (tc) {
      at::Tensor work, dw_read;
      if (gx || use_split_read(lay)) {  // the reads' backward in parallel first, then the chain without it
        work = read_work(lay, q.device());
        dw_read = at::empty({lay.slots(), lay.H, 3, h * d}, f32);
        ReadBwdParams r{};
        r.q = qc.data_ptr();
        r.grad_o = go.data_ptr();
        r.dq = dq.data_ptr<float>();
        r.dtype = dt;
        r.ckpt = ckpt.data_ptr<float>();
        r.work = work.data_ptr<int64_t>();
        r.n_work = work.numel() / 3;
        r.heads = lay.H;
        r.residual = residual;
        r.dw_read = dw_read.data_ptr<float>();
        launch_ttt_read_bwd_tc(r, at::cuda::getCurrentCUDAStream());
        p.skip_read = true;
        p.dw_read = dw_read.data_ptr<float>();
      }
      at::Tensor xchg, xcount, xpub;  // the backward without clusters' exchange buffers, per job slot of a wave
      if (gx) {
        const int64_t wave = gx_wave(lay.N * lay.H, gx_fit(dt, 64, GxKernel::kBwd, 8));
        xchg = at::empty({wave * 8 * kBwdGxPartFloats}, f32);
        xcount = at::empty({wave * kXcountStride}, q.options().dtype(at::kInt));  // zeroed before each wave
        xpub = at::empty({wave * 6 * 64 * 64}, q.options());
        p.xchg = xchg.data_ptr<float>();
        p.xcount = reinterpret_cast<unsigned*>(xcount.data_ptr<int32_t>());
        p.xpub = xpub.data_ptr();
        launch_ttt_bwd_tc_gx(p, at::cuda::getCurrentCUDAStream(), wave);
      } else {
        launch_ttt_bwd_tc(p, at::cuda::getCurrentCUDAStream(), tc_cluster(lay, dt, 4, true));
      }
    } else {
      launch_ttt_bwd(p, static_cast<int>(d), static_cast<int>(h), at::cuda::getCurrentCUDAStream());
    }
  }

  // The targets are the params' row norms: dN[r] * w[r] / ||w[r]|| (0 for a zero row), as on the CPU.
  auto dT = d_targets.sum(0);
  // ttt_chunk.h's, as the CPU op's (float32 weights here).
  auto param_grad = [&](const at::Tensor& w, const at::Tensor& dtarget) {
    return target_param_grad(w, row_norm(w), dtarget);
  };
  auto dwg = param_grad(wg, dT.narrow(1, 0, h));
  auto dwu = param_grad(wu, dT.narrow(1, h, h));
  auto dwd = param_grad(wd, dT.narrow(1, 2 * h, d));
  const auto in_dt = q.scalar_type();
  auto back = [&](const at::Tensor& t, const at::Tensor& like) { return t.view(like.sizes()).to(in_dt); };
  return {back(dq, q), back(dk, k), back(dv, v), back(deta, eta), back(dmu, mu), dwg, dwu, dwd, d_fast, d_pend};
}

}  // namespace

}  // namespace allmem::ttt::cuda

namespace allmem::ttt {

at::Tensor ttt_decode_step_kernel_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& eta, const at::Tensor& mu, const at::Tensor& fast,
                                       at::Tensor& pending, const at::Tensor& pending_len, int64_t chunk_size,
                                       int64_t h, bool residual, int64_t row_limit) {
  using namespace allmem::ttt::cuda;
  const c10::cuda::CUDAGuard guard(q.device());
  ALLMEM_CHECK(q.size(0) * q.size(2) <= INT32_MAX, "B * H must fit the grid (2^31 - 1), got ", q.size(0) * q.size(2));
  auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous(), etac = eta.contiguous(), muc = mu.contiguous();
  auto o = at::empty_like(qc);
  DecodeParams p{};
  p.q = qc.data_ptr();
  p.k = kc.data_ptr();
  p.v = vc.data_ptr();
  p.eta = etac.data_ptr();
  p.mu = muc.data_ptr();
  p.o = o.data_ptr();
  p.dtype = cuda_dtype(q);
  p.fast = fast.data_ptr<float>();
  p.pending = pending.data_ptr<float>();
  p.pending_len = const_cast<int64_t*>(pending_len.data_ptr<int64_t>());  // only read here
  p.n_seqs = q.size(0);
  p.heads = q.size(2);
  p.chunk = chunk_size;
  p.row_limit = row_limit;
  p.d = static_cast<int>(q.size(3));
  p.h = static_cast<int>(h);
  p.residual = residual;
  launch_ttt_decode(p, at::cuda::getCurrentCUDAStream());
  return o;
}

bool cuda_stream_capturing(const at::Tensor& t) {
  const c10::cuda::CUDAGuard guard(t.device());
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

void ttt_decode_advance_cuda(at::Tensor& pending_len, int64_t chunk_size, int64_t row_limit) {
  using namespace allmem::ttt::cuda;
  const c10::cuda::CUDAGuard guard(pending_len.device());
  DecodeParams p{};
  p.pending_len = pending_len.data_ptr<int64_t>();
  p.n_seqs = pending_len.size(0);
  p.chunk = chunk_size;
  p.row_limit = row_limit;
  launch_ttt_decode_advance(p, at::cuda::getCurrentCUDAStream());
}

}  // namespace allmem::ttt

namespace allmem::ttt::cuda {

TORCH_LIBRARY_IMPL(allmem, CUDA, m) {
  m.impl("ttt_memory_fwd", &ttt_memory_fwd_cuda);
  m.impl("ttt_memory_bwd", &ttt_memory_bwd_cuda);
}

}  // namespace allmem::ttt::cuda

// The composite backward's fused steps (ttt_composite_cuda.h).
namespace allmem::ttt {
namespace {
void check_f32_cuda(const at::Tensor& t, const char* name, bool contiguous = true) {
  ALLMEM_CHECK(t.is_cuda() && t.scalar_type() == at::kFloat, name, " must be a float32 CUDA tensor, got ",
               t.scalar_type(), " on ", t.device());
  if (contiguous) ALLMEM_CHECK(t.is_contiguous(), name, " must be contiguous");
}
}  // namespace

void composite_update_terms_cuda(const at::Tensor& p1, const at::Tensor& p2, const at::Tensor& eta, at::Tensor& f1,
                                 at::Tensor& f2, at::Tensor& deta) {
  check_f32_cuda(p1, "p1");
  check_f32_cuda(p2, "p2");
  check_f32_cuda(eta, "eta");
  check_f32_cuda(f1, "f1");
  check_f32_cuda(f2, "f2");
  check_f32_cuda(deta, "deta");
  const int64_t h = p2.size(-1) / 2, rows = h > 0 ? p2.numel() / (2 * h) : 0;
  ALLMEM_CHECK(p1.numel() == rows * 4 * h && f1.numel() == p1.numel() && f2.numel() == p2.numel() &&
                   eta.numel() == rows * 3 && deta.numel() == eta.numel(),
               "composite update terms: inconsistent sizes");
  const c10::cuda::CUDAGuard guard(p1.device());
  cuda::UpdateTermsParams p{p1.data_ptr<float>(), p2.data_ptr<float>(), eta.data_ptr<float>(), f1.data_ptr<float>(),
                            f2.data_ptr<float>(), deta.data_ptr<float>(), rows, static_cast<int>(h)};
  cuda::launch_update_terms(p, at::cuda::getCurrentCUDAStream());
}

void composite_read_terms_cuda(const at::Tensor& ab, const at::Tensor& ds, at::Tensor& f, at::Tensor& s) {
  check_f32_cuda(ab, "ab");
  check_f32_cuda(s, "s");
  const bool backward = ds.defined();
  ALLMEM_CHECK(backward == f.defined(), "composite read terms: ds and f go together");
  if (backward) {
    check_f32_cuda(ds, "ds");
    check_f32_cuda(f, "f");
  }
  const int64_t h = s.size(-1), rows = h > 0 ? s.numel() / h : 0;
  ALLMEM_CHECK(ab.numel() == rows * 2 * h && (!backward || (f.numel() == ab.numel() && ds.numel() == s.numel())),
               "composite read terms: inconsistent sizes");
  const c10::cuda::CUDAGuard guard(ab.device());
  cuda::ReadTermsParams p{ab.data_ptr<float>(), backward ? ds.data_ptr<float>() : nullptr,
                          backward ? f.data_ptr<float>() : nullptr, s.data_ptr<float>(), rows, static_cast<int>(h)};
  cuda::launch_read_terms(p, at::cuda::getCurrentCUDAStream());
}

void composite_grad_terms_cuda(const at::Tensor& ab, const at::Tensor& e, const at::Tensor& eta, at::Tensor& fgu,
                               at::Tensor& fd) {
  check_f32_cuda(ab, "ab");
  check_f32_cuda(e, "e");
  check_f32_cuda(eta, "eta");
  check_f32_cuda(fgu, "fgu");
  check_f32_cuda(fd, "fd");
  const int64_t h = e.size(-1), rows = h > 0 ? e.numel() / h : 0;
  ALLMEM_CHECK(ab.numel() == rows * 2 * h && fgu.numel() == ab.numel() && fd.numel() == e.numel() &&
                   eta.numel() == rows * 3,
               "composite grad terms: inconsistent sizes");
  const c10::cuda::CUDAGuard guard(ab.device());
  cuda::GradTermsParams p{ab.data_ptr<float>(), e.data_ptr<float>(), eta.data_ptr<float>(), fgu.data_ptr<float>(),
                          fd.data_ptr<float>(), rows, static_cast<int>(h)};
  cuda::launch_grad_terms(p, at::cuda::getCurrentCUDAStream());
}

void composite_row_norm_cuda(const at::Tensor& w, const at::Tensor& target, const std::optional<at::Tensor>& g,
                             at::Tensor& out, const std::optional<at::Tensor>& dtarget, int64_t d, int64_t h,
                             const std::optional<at::Tensor>& g_add) {
  check_f32_cuda(w, "w", false);
  check_f32_cuda(target, "target");
  check_f32_cuda(out, "out");
  const int64_t batch = w.size(0), hd = h * d;
  ALLMEM_CHECK(w.dim() == 3 && w.size(1) == 3 && w.size(2) == hd && w.stride(2) == 1 && w.stride(1) == hd,
               "composite row norm: w must be [batch, 3, h*d] with contiguous rows");
  ALLMEM_CHECK(target.numel() == batch * (2 * h + d) && out.numel() == batch * 3 * hd,
               "composite row norm: inconsistent sizes");
  ALLMEM_CHECK(g.has_value() == dtarget.has_value(), "composite row norm: g and dtarget go together");
  if (g.has_value()) {
    check_f32_cuda(*g, "g");
    check_f32_cuda(*dtarget, "dtarget");
    ALLMEM_CHECK(g->numel() == out.numel() && dtarget->numel() == target.numel(),
                 "composite row norm: inconsistent sizes");
  }
  if (g_add.has_value()) {
    ALLMEM_CHECK(g.has_value(), "composite row norm: g_add needs g");
    check_f32_cuda(*g_add, "g_add");
    ALLMEM_CHECK(g_add->numel() == out.numel(), "composite row norm: inconsistent sizes");
  }
  const c10::cuda::CUDAGuard guard(w.device());
  cuda::RowNormParams p{w.data_ptr<float>(),
                        w.stride(0),
                        target.data_ptr<float>(),
                        g.has_value() ? g->data_ptr<float>() : nullptr,
                        g_add.has_value() ? g_add->data_ptr<float>() : nullptr,
                        out.data_ptr<float>(),
                        dtarget.has_value() ? dtarget->data_ptr<float>() : nullptr,
                        batch,
                        static_cast<int>(d),
                        static_cast<int>(h)};
  cuda::launch_row_norm(p, at::cuda::getCurrentCUDAStream());
}

void composite_prep_cuda(const at::Tensor& w, const std::optional<at::Tensor>& target, const at::Tensor& a,
                         const at::Tensor& b, at::Tensor& wk, at::Tensor& wv, at::Tensor& dsum, int64_t d, int64_t h) {
  check_f32_cuda(w, "w", false);
  check_f32_cuda(a, "a");
  check_f32_cuda(b, "b");
  check_f32_cuda(wk, "wk");
  check_f32_cuda(wv, "wv");
  check_f32_cuda(dsum, "dsum");
  const int64_t batch = w.size(0), hd = h * d;
  ALLMEM_CHECK(w.dim() == 3 && w.size(1) == 3 && w.size(2) == hd && w.stride(2) == 1 && w.stride(1) == hd,
               "composite prep: w must be [batch, 3, h*d] with contiguous rows");
  ALLMEM_CHECK(a.numel() == batch * 3 * hd && b.numel() == a.numel() && dsum.numel() == a.numel() &&
                   wk.numel() == batch * 4 * hd && wv.numel() == batch * 2 * hd,
               "composite prep: inconsistent sizes");
  if (target.has_value()) {
    check_f32_cuda(*target, "target");
    ALLMEM_CHECK(target->numel() == batch * (2 * h + d), "composite prep: inconsistent sizes");
  }
  const c10::cuda::CUDAGuard guard(w.device());
  cuda::PrepParams p{w.data_ptr<float>(), w.stride(0), target.has_value() ? target->data_ptr<float>() : nullptr,
                     a.data_ptr<float>(), b.data_ptr<float>(), wk.data_ptr<float>(), wv.data_ptr<float>(),
                     dsum.data_ptr<float>(), batch, static_cast<int>(d), static_cast<int>(h)};
  cuda::launch_prep(p, at::cuda::getCurrentCUDAStream());
}

void composite_momentum_cuda(const at::Tensor& dsum, const at::Tensor& m, const at::Tensor& mu,
                             const std::optional<at::Tensor>& live, at::Tensor& dm, at::Tensor& dmu_rows) {
  check_f32_cuda(dsum, "dsum");
  check_f32_cuda(m, "m", false);
  check_f32_cuda(mu, "mu");
  check_f32_cuda(dm, "dm");
  check_f32_cuda(dmu_rows, "dmu_rows");
  const int64_t batch = dsum.size(0), n = dsum.numel() / std::max<int64_t>(batch, 1);
  ALLMEM_CHECK(m.dim() == 3 && m.size(0) == batch && m.size(1) * m.size(2) == n && m.stride(2) == 1 &&
                   m.stride(1) == m.size(2),
               "composite momentum: m must be [batch, 3, h*d] with contiguous rows");
  ALLMEM_CHECK(mu.numel() == batch && dm.numel() == dsum.numel() && dmu_rows.numel() % std::max<int64_t>(batch, 1) == 0,
               "composite momentum: inconsistent sizes");
  if (live.has_value()) {
    ALLMEM_CHECK(live->is_cuda() && live->scalar_type() == at::kBool && live->is_contiguous() && live->numel() == batch,
                 "composite momentum: live must be a contiguous bool CUDA tensor of one flag per chain");
  }
  const c10::cuda::CUDAGuard guard(dsum.device());
  cuda::MomentumParams p{dsum.data_ptr<float>(), m.data_ptr<float>(), m.stride(0), mu.data_ptr<float>(),
                         live.has_value() ? live->data_ptr<bool>() : nullptr, dm.data_ptr<float>(),
                         dmu_rows.data_ptr<float>(), batch, n, batch > 0 ? dmu_rows.numel() / batch : 0};
  cuda::launch_momentum(p, at::cuda::getCurrentCUDAStream());
}

bool composite_step_tc_applies(const at::Tensor& q, int64_t d, int64_t h) {
  const char* env = std::getenv("ALLMEM_TTT_COMPOSITE_STEP");
  if (env == nullptr || std::strcmp(env, "tc") != 0) return false;
  if (!q.is_cuda() || (q.scalar_type() != at::kBFloat16 && q.scalar_type() != at::kHalf)) return false;
  if (d != h || (d != 64 && d != 128)) return false;
  const c10::cuda::CUDAGuard guard(q.device());
  return at::cuda::getCurrentDeviceProperties()->major == 9;  // the kernel's code is sm_90a's
}

void composite_step_tc_cuda(const at::Tensor& k, const at::Tensor& v, const at::Tensor& eta, const at::Tensor& mu,
                            const at::Tensor& w, const std::optional<at::Tensor>& m_next, const at::Tensor& targets,
                            at::Tensor& dw, at::Tensor& dm, const std::optional<at::Tensor>& dw_read,
                            at::Tensor& d_targets, at::Tensor& dmu, at::Tensor& f1, at::Tensor& f2, at::Tensor& wk,
                            at::Tensor& wv, at::Tensor& deta_part, bool lact_order) {
  const auto dt = k.scalar_type();
  ALLMEM_CHECK(k.is_cuda() && (dt == at::kBFloat16 || dt == at::kHalf) && k.dim() == 3 && k.is_contiguous(),
               "composite step: k must be a contiguous bf16/fp16 CUDA tensor [chains, C, d]");
  const int64_t G = k.size(0), C = k.size(1), d = k.size(2), hd = d * d;
  ALLMEM_CHECK(d == 64 || d == 128, "composite step: d = h must be 64 or 128, got ", d);
  auto same16 = [&](const at::Tensor& t, const char* name, std::initializer_list<int64_t> shape) {
    ALLMEM_CHECK(t.is_cuda() && t.scalar_type() == dt && t.is_contiguous() && t.sizes() == at::IntArrayRef(shape),
                 "composite step: ", name, " must be a contiguous ", dt, " CUDA tensor of size ",
                 at::IntArrayRef(shape), ", got ", t.scalar_type(), " ", t.sizes());
  };
  auto f32 = [&](const at::Tensor& t, const char* name, int64_t numel) {
    check_f32_cuda(t, name);
    ALLMEM_CHECK(t.numel() == numel, "composite step: ", name, " must have ", numel, " elements, got ", t.numel());
  };
  same16(v, "v", {G, C, d});
  same16(f1, "f1", {G, C, 4 * d});
  same16(f2, "f2", {G, C, 2 * d});
  same16(wk, "wk", {G, 4 * d, d});
  same16(wv, "wv", {G, d, 2 * d});
  f32(eta, "eta", G * C * 3);
  f32(mu, "mu", G);
  f32(targets, "targets", G * 3 * d);
  f32(dw, "dw", G * 3 * hd);
  f32(dm, "dm", G * 3 * hd);
  f32(d_targets, "d_targets", G * 3 * d);
  f32(dmu, "dmu", G * C);
  f32(deta_part, "deta_part", G * 8 * C * 3);
  if (dw_read.has_value()) f32(*dw_read, "dw_read", G * 3 * hd);
  check_f32_cuda(w, "w", false);
  ALLMEM_CHECK(w.dim() == 3 && w.size(0) == G && w.size(1) == 6 && w.size(2) == hd && w.stride(2) == 1 &&
                   w.stride(1) == hd,
               "composite step: w must be [chains, 6, d*d] with contiguous rows");
  if (lact_order) {
    ALLMEM_CHECK(m_next.has_value(), "composite step: LaCT order needs m_next");
    check_f32_cuda(*m_next, "m_next", false);
    ALLMEM_CHECK(m_next->dim() == 3 && m_next->size(0) == G && m_next->size(1) == 3 && m_next->size(2) == hd &&
                     m_next->stride(2) == 1 && m_next->stride(1) == hd && (G <= 1 || m_next->stride(0) == w.stride(0)),
                 "composite step: m_next must be [chains, 3, d*d] with contiguous rows and w's batch stride");
  }
  ALLMEM_CHECK(G <= INT_MAX / 8, "composite step: too many chains (", G, ")");
  // k, v rows go by 16-byte cp.async, the factors by 4-byte pairs.
  ALLMEM_CHECK(reinterpret_cast<uintptr_t>(k.data_ptr()) % 16 == 0 && reinterpret_cast<uintptr_t>(v.data_ptr()) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(f1.data_ptr()) % 4 == 0 && reinterpret_cast<uintptr_t>(f2.data_ptr()) % 4 == 0,
               "composite step: k, v must start on a 16-byte boundary, f1, f2 on a 4-byte one");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&v, &eta, &mu, &w, &targets, &dw, &dm, &d_targets,
                                                                      &dmu, &f1, &f2, &wk, &wv, &deta_part}) {
    ALLMEM_CHECK(t->device() == k.device(), "composite step: every tensor must be on k's device ", k.device(),
                 ", got ", t->device());
  }
  const c10::cuda::CUDAGuard guard(k.device());
  cuda::BwdStepParams p{k.data_ptr(),
                        v.data_ptr(),
                        dt == at::kBFloat16 ? cuda::InDType::kBFloat16 : cuda::InDType::kFloat16,
                        eta.data_ptr<float>(),
                        mu.data_ptr<float>(),
                        w.data_ptr<float>(),
                        lact_order ? m_next->data_ptr<float>() : nullptr,
                        w.stride(0),
                        targets.data_ptr<float>(),
                        dw.data_ptr<float>(),
                        dm.data_ptr<float>(),
                        dw_read.has_value() ? dw_read->data_ptr<float>() : nullptr,
                        d_targets.data_ptr<float>(),
                        dmu.data_ptr<float>(),
                        f1.data_ptr(),
                        f2.data_ptr(),
                        wk.data_ptr(),
                        wv.data_ptr(),
                        deta_part.data_ptr<float>(),
                        G,
                        C,
                        lact_order};
  cuda::launch_bwd_step_tc(p, static_cast<int>(d), at::cuda::getCurrentCUDAStream());
}

}  // namespace allmem::ttt
