// Torch glue of the SWA CUDA kernels: argument checks beyond the shared contract (swa_common.h),
// output allocation, and TORCH_LIBRARY_IMPL(allmem, CUDA). The kernels themselves live in
// swa_fwd.cu, swa_bwd_dq.cu, swa_bwd_dkdv.cu and swa_decode.cu (see csrc/swa/README.md).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "swa/swa_common.h"
#include "swa/swa_cuda.h"

namespace allmem::swa::cuda {
namespace {

constexpr int64_t kAlignElems = 8;         // cp.async and the epilogue move 16-byte chunks
constexpr int64_t kMaxGridYZ = 65535;      // CUDA limit on gridDim.y and gridDim.z
constexpr int64_t kMaxSeqlen = INT_MAX / 4;  // band arithmetic runs in int (i + W, j + Bn + W)
// The dK/dV kernel puts key blocks along gridDim.y.
constexpr int kKeyBlockRows = kBwdKeyBlockRows;
constexpr double kLog2eD = 1.4426950408889634;

// ALLMEM_SWA_SM90 selects the forward kernel on sm_90 devices: unset/"1" the Hopper kernel
// (swa_fwd_sm90.cu) when it can run this problem, else the portable one (the default since it
// passed every GPU test on an H100 and two H200s: bench/results/gpu_2026-11-26e_h100); "0" the
// portable kernel; "require" the Hopper kernel or an error (tests).
// ALLMEM_SWA_SM90_BWD selects the backward kernels the same way (the Hopper dQ and dK/dV kernels
// of swa_bwd_sm90.cuh, both or neither; the default since run e: 1.7x the portable backward),
// plus "atomic": the Hopper dK/dV kernel that also sums dQ with float atomics (no dQ kernel; dQ's
// last bits vary from run to run; measured 5-12% slower than the two kernels in run e), or an error.
// Both are read at every call (one getenv), so a process can switch them at run time.
// ALLMEM_SWA_SM90=pingpong: the Hopper forward whose consumer warpgroups take turns issuing their
// wgmmas (FlashAttention-3's ping-pong), or an error; same results, within +-4% of the default
// schedule in run e, so not the default.
enum class Sm90Mode { kOff, kOn, kRequire, kAtomic, kPingPong };
Sm90Mode sm90_mode_of(const char* var) {
  const char* v = std::getenv(var);
  if (v == nullptr || v[0] == '\0') return Sm90Mode::kOn;  // the default: Hopper where it can run
  if (std::strcmp(v, "0") == 0) return Sm90Mode::kOff;
  if (std::strcmp(v, "atomic") == 0) return Sm90Mode::kAtomic;
  if (std::strcmp(v, "pingpong") == 0) return Sm90Mode::kPingPong;
  return std::strcmp(v, "require") == 0 ? Sm90Mode::kRequire : Sm90Mode::kOn;
}

bool is_hopper_device() {
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  return props->major == 9 && props->minor == 0;
}

DType cuda_dtype(const at::Tensor& t, const char* name) {
  const auto st = t.scalar_type();
  ALLMEM_CHECK(st == at::kBFloat16 || st == at::kHalf, "the CUDA SWA kernels take bfloat16 or float16 ", name,
               ", got ", st, ": cast to bfloat16/float16, or run float32/float64 on the CPU kernel");
  return st == at::kBFloat16 ? DType::kBFloat16 : DType::kFloat16;
}

void check_on_cuda(const at::Tensor& t, const char* name) {
  ALLMEM_CHECK(t.is_cuda(), name, " must be a CUDA tensor for the CUDA kernel, got ", t.device());
}

void check_head_dim(int64_t d) {
  ALLMEM_CHECK(d == 64 || d == 128, "the CUDA SWA kernels support head dim 64 or 128, got ", d,
               " (the CPU kernel takes any head dim)");
}

void check_last_dim_contiguous(const at::Tensor& t, const char* name) {
  ALLMEM_CHECK(t.stride(-1) == 1, name, " must have a contiguous last (head) dimension (stride 1), got strides ",
               shape_str(t.strides()), ": call .contiguous() first");
}

// 16-byte aligned base and strides (in elements) that are multiples of 8, for every dim that has
// more than one element (the stride of a size-1 dim is never used).
bool is_aligned(const at::Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % (kAlignElems * t.element_size()) != 0) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    if (t.size(d) > 1 && t.stride(d) % kAlignElems != 0) return false;
  }
  return true;
}

// A dimension of extent > 1 with stride 0 (an expanded view): TMA descriptors cannot express it.
bool has_zero_stride(const at::Tensor& t) {
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) > 1 && t.stride(d) == 0) return true;
  }
  return false;
}

// Inputs the kernels only read: a misaligned view (e.g. a slice of a fused projection at an odd
// offset) or an expanded one (a stride of 0, which the Hopper kernels' TMA cannot read; autograd
// hands over expanded gradients) is copied rather than rejected.
at::Tensor readable(const at::Tensor& t, const char* name) {
  check_last_dim_contiguous(t, name);
  return is_aligned(t) && !has_zero_stride(t) ? t : t.clone(at::MemoryFormat::Contiguous);
}

TensorRef ref_of(const at::Tensor& t, bool varlen) {
  TensorRef r;
  r.ptr = t.data_ptr();
  if (varlen) {  // [T, H, D]
    r.row_stride = t.stride(0);
    r.head_stride = t.stride(1);
  } else {  // [B, L, H, D]
    r.batch_stride = t.stride(0);
    r.row_stride = t.stride(1);
    r.head_stride = t.stride(2);
  }
  return r;
}

RowStatRef stat_ref(const at::Tensor& contiguous_stat, const Problem& p) {
  RowStatRef r;
  r.ptr = contiguous_stat.data_ptr<float>();
  r.head_stride = p.varlen ? p.total : p.max_len;
  r.batch_stride = p.varlen ? 0 : p.hq * p.max_len;
  return r;
}

// Validates the problem for the CUDA kernels and returns the launch shape. For varlen input it
// reads cu_seqlens once (one device sync) to validate it and to size the grid by the longest
// sequence, so a wrong max_seqlen cannot leave rows unwritten.
// `cu_device` receives the contiguous device copy of cu_seqlens the kernels read; keep it alive
// until the launch.
AttnShape attn_shape(const at::Tensor& q, Problem& p, const std::optional<at::Tensor>& cu_seqlens,
                     at::Tensor& cu_device) {
  check_on_cuda(q, "q");
  check_head_dim(p.head_dim);
  if (p.varlen) {
    cu_device = cu_seqlens->contiguous();
    const at::Tensor cu_host = cu_seqlens->to(at::kCPU).contiguous();
    p.batch = check_cu_seqlens(cu_host, p.total, "T (q.size(0))");
    const int32_t* c = cu_host.const_data_ptr<int32_t>();
    int64_t longest = 0;
    for (int64_t n = 0; n < p.batch; ++n) longest = std::max<int64_t>(longest, c[n + 1] - c[n]);
    ALLMEM_CHECK(p.max_len >= longest, "max_seqlen (", p.max_len, ") is smaller than the longest sequence in ",
                 "cu_seqlens (", longest, ")");
    p.max_len = longest;
  }
  ALLMEM_CHECK(p.max_len <= kMaxSeqlen, "the CUDA SWA kernels support sequences up to ", kMaxSeqlen,
               " tokens, got ", p.max_len);
  ALLMEM_CHECK(p.batch <= kMaxGridYZ, "the CUDA SWA kernels support up to ", kMaxGridYZ, " sequences, got ", p.batch);
  ALLMEM_CHECK(p.hq <= kMaxGridYZ, "the CUDA SWA kernels support up to ", kMaxGridYZ, " query heads, got ", p.hq);
  ALLMEM_CHECK((p.max_len + kKeyBlockRows - 1) / kKeyBlockRows <= kMaxGridYZ,
               "the CUDA SWA backward supports sequences up to ", kMaxGridYZ * kKeyBlockRows, " tokens, got ",
               p.max_len);
  AttnShape s;
  s.cu_seqlens = p.varlen ? cu_device.data_ptr<int>() : nullptr;
  s.batch = static_cast<int>(p.batch);
  s.seqlen = static_cast<int>(p.max_len);
  s.hq = static_cast<int>(p.hq);
  s.hkv = static_cast<int>(p.hkv);
  // A window longer than the sequence, or more sinks than tokens, changes nothing.
  s.window = static_cast<int>(std::min<int64_t>(p.window, p.max_len + 1));
  s.sinks = static_cast<int>(std::min<int64_t>(p.sinks, p.max_len));
  s.scale = static_cast<float>(p.scale);
  s.scale_log2 = static_cast<float>(p.scale * kLog2eD);
  return s;
}

std::tuple<at::Tensor, at::Tensor> swa_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                const at::Tensor& v_in, int64_t window, int64_t sinks,
                                                std::optional<double> softmax_scale, const std::optional<at::Tensor>& cu_seqlens,
                                                int64_t max_seqlen) {
  Problem p = check_qkv(q_in, k_in, v_in, window, sinks, softmax_scale, cu_seqlens, max_seqlen,
                        /*validate_cu_seqlens=*/false);
  const DType dtype = cuda_dtype(q_in, "q");
  at::Tensor cu_device;
  const AttnShape shape = attn_shape(q_in, p, cu_seqlens, cu_device);
  const c10::cuda::CUDAGuard guard(q_in.device());
  at::Tensor out = at::empty(q_in.sizes(), q_in.options());
  at::Tensor lse = at::empty(lse_shape(p), q_in.options().dtype(at::kFloat));
  if (q_in.numel() == 0) return {out, lse};
  const at::Tensor q = readable(q_in, "q"), k = readable(k_in, "k"), v = readable(v_in, "v");

  FwdParams fp;
  fp.shape = shape;
  fp.q = ref_of(q, p.varlen);
  fp.k = ref_of(k, p.varlen);
  fp.v = ref_of(v, p.varlen);
  fp.out = ref_of(out, p.varlen);
  fp.lse = stat_ref(lse, p);
  const int d = static_cast<int>(p.head_dim);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Sm90Mode mode = sm90_mode_of("ALLMEM_SWA_SM90");
  if (mode != Sm90Mode::kOff) {
    const bool ran = is_hopper_device() && launch_swa_fwd_sm90(fp, p.varlen ? q.size(0) : 0, dtype, d, stream,
                                                                mode == Sm90Mode::kPingPong);
    ALLMEM_CHECK(ran || mode == Sm90Mode::kOn,
                 "ALLMEM_SWA_SM90=require/pingpong: the Hopper SWA forward cannot run here (needs an sm_90 device, a build ",
                 "with the 90a target, and q/k/v strides that are multiples of 16 bytes)");
    if (ran) return {out, lse};
  }
  launch_swa_fwd(fp, dtype, d, stream);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> swa_bwd_cuda(const at::Tensor& dout_in, const at::Tensor& q_in,
                                                            const at::Tensor& k_in, const at::Tensor& v_in,
                                                            const at::Tensor& out_in, const at::Tensor& lse_in,
                                                            int64_t window, int64_t sinks, std::optional<double> softmax_scale,
                                                            const std::optional<at::Tensor>& cu_seqlens,
                                                            int64_t max_seqlen) {
  Problem p = check_qkv(q_in, k_in, v_in, window, sinks, softmax_scale, cu_seqlens, max_seqlen,
                        /*validate_cu_seqlens=*/false);
  const DType dtype = cuda_dtype(q_in, "q");
  check_bwd_args(p, q_in, dout_in, out_in, lse_in);
  at::Tensor cu_device;
  const AttnShape shape = attn_shape(q_in, p, cu_seqlens, cu_device);
  const c10::cuda::CUDAGuard guard(q_in.device());
  at::Tensor dq = at::empty(q_in.sizes(), q_in.options());
  at::Tensor dk = at::empty(k_in.sizes(), k_in.options());
  at::Tensor dv = at::empty(v_in.sizes(), v_in.options());
  if (q_in.numel() == 0) return {dq, dk, dv};
  const at::Tensor q = readable(q_in, "q"), k = readable(k_in, "k"), v = readable(v_in, "v");
  const at::Tensor out = readable(out_in, "out");
  // Autograd hands over whatever gradient layout the graph produced (expanded, transposed), so
  // dout is made contiguous instead of rejected.
  const at::Tensor dout =
      dout_in.stride(-1) == 1 && is_aligned(dout_in) && !has_zero_stride(dout_in) ? dout_in : dout_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  at::Tensor delta = at::empty(lse_shape(p), lse.options());

  BwdParams bp;
  bp.shape = shape;
  bp.q = ref_of(q, p.varlen);
  bp.k = ref_of(k, p.varlen);
  bp.v = ref_of(v, p.varlen);
  bp.out = ref_of(out, p.varlen);
  bp.dout = ref_of(dout, p.varlen);
  bp.dq = ref_of(dq, p.varlen);
  bp.dk = ref_of(dk, p.varlen);
  bp.dv = ref_of(dv, p.varlen);
  bp.lse = stat_ref(lse, p);
  bp.delta = stat_ref(delta, p);
  const int d = static_cast<int>(p.head_dim);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  launch_swa_bwd_preprocess(bp, dtype, d, stream);
  const Sm90Mode mode = sm90_mode_of("ALLMEM_SWA_SM90_BWD");
  const bool hopper = mode != Sm90Mode::kOff && is_hopper_device();
  const int64_t total_rows = p.varlen ? q.size(0) : 0;
  auto cannot_run = [](const char* value) {
    return std::string("ALLMEM_SWA_SM90_BWD=") + value +
           ": the Hopper SWA backward cannot run here (needs an sm_90 device, a build with the 90a target, and "
           "q/k/v/dout strides that are multiples of 16 bytes)";
  };
  at::Tensor sink_partial, sink_counter;  // the Hopper dK/dV kernels' split sink walks
  if (hopper) {
    const SinkPlan plan = swa_bwd_sm90_sink_plan(shape, d, at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
    if (plan.parts > 1) {
      sink_partial = at::empty({plan.workspace_floats}, q_in.options().dtype(at::kFloat));
      sink_counter = at::zeros({int64_t{shape.batch} * shape.hkv * plan.blocks}, q_in.options().dtype(at::kInt));
      bp.sink_parts = plan.parts;
      bp.sink_blocks = plan.blocks;
      bp.sink_partial = sink_partial.data_ptr<float>();
      bp.sink_counter = sink_counter.data_ptr<int>();
    }
  }
  if (mode == Sm90Mode::kAtomic) {
    at::Tensor dq_accum = at::zeros(q_in.sizes(), q_in.options().dtype(at::kFloat));
    bp.dq_accum = ref_of(dq_accum, p.varlen);
    ALLMEM_CHECK(hopper && launch_swa_bwd_dkdvq_sm90(bp, total_rows, dtype, d, stream), cannot_run("atomic"));
    dq.copy_(dq_accum.mul_(shape.scale));
    return {dq, dk, dv};
  }
  // Both kernels or neither: they need the same tensor maps (q/k/v/dout), so when the first one runs
  // the second does too.
  const bool ran = hopper && launch_swa_bwd_dkdv_sm90(bp, total_rows, dtype, d, stream);
  ALLMEM_CHECK(ran || mode != Sm90Mode::kRequire, cannot_run("require"));
  if (ran) {
    if (!launch_swa_bwd_dq_sm90(bp, total_rows, dtype, d, stream)) launch_swa_bwd_dq(bp, dtype, d, stream);
    return {dq, dk, dv};
  }
  launch_swa_bwd_dkdv(bp, dtype, d, stream);
  launch_swa_bwd_dq(bp, dtype, d, stream);
  return {dq, dk, dv};
}

// Number of split CTAs per (token, kv head): enough CTAs for about kWavesTarget per SM, each
// split at least kMinSplitKeys keys, and at most kMaxSplitKeys (their scores sit in shared memory).
void plan_decode_splits(DecodeParams& dp, int64_t band_keys, int num_sms) {
  constexpr int64_t kWavesTarget = 2;
  const int64_t ctas = static_cast<int64_t>(dp.batch) * dp.new_len * dp.hkv;
  const int64_t max_splits = std::max<int64_t>(1, (band_keys + DecodeTraits::kMinSplitKeys - 1) /
                                                      DecodeTraits::kMinSplitKeys);
  int64_t splits = std::clamp<int64_t>((kWavesTarget * num_sms + ctas - 1) / ctas, 1, max_splits);
  splits = std::max<int64_t>(splits, (band_keys + DecodeTraits::kMaxSplitKeys - 1) / DecodeTraits::kMaxSplitKeys);
  dp.split_keys = static_cast<int>((band_keys + splits - 1) / splits);
  dp.num_splits = static_cast<int>((band_keys + dp.split_keys - 1) / dp.split_keys);
}

at::Tensor swa_decode_cuda(const at::Tensor& q_in, const at::Tensor& k_new_in, const at::Tensor& v_new_in,
                           at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& cache_seqlens, int64_t window,
                           int64_t sinks, std::optional<double> softmax_scale, bool check_lengths) {
  const DecodeProblem shape = check_decode_args(q_in, k_new_in, v_new_in, k_cache, v_cache, cache_seqlens, window,
                                                sinks, softmax_scale);
  check_on_cuda(q_in, "q");
  const DType dtype = cuda_dtype(q_in, "q");
  const int64_t B = shape.batch, l_new = shape.new_len, hq = shape.hq, D = shape.head_dim, hkv = shape.hkv;
  check_head_dim(D);
  const int64_t slots = shape.slots;
  ALLMEM_CHECK(slots <= kMaxSeqlen, "the CUDA decode kernel supports S + W up to ", kMaxSeqlen, ", got ", slots);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{k_cache, "k_cache"}, {v_cache, "v_cache"}}) {
    // Written in place, so it cannot be copied into an aligned layout behind the caller's back.
    check_last_dim_contiguous(t, name);
    ALLMEM_CHECK(is_aligned(t), name, " must be 16-byte aligned with strides that are multiples of 8 elements, ",
                 "got strides ", shape_str(t.strides()));
  }
  ALLMEM_CHECK(B * l_new <= INT_MAX / std::max<int64_t>(hq, 1), "B * Lnew * Hq must fit int32, got ", B * l_new * hq);
  ALLMEM_CHECK(hkv <= kMaxGridYZ, "the CUDA decode kernel supports up to ", kMaxGridYZ, " kv heads, got ", hkv);
  const double scale = shape.scale;
  const c10::cuda::CUDAGuard guard(q_in.device());
  at::Tensor out = at::empty(q_in.sizes(), q_in.options());
  if (q_in.numel() == 0) return out;
  // Same contract as the CPU kernel. Reading the lengths costs one host sync per call (and makes
  // the op impossible to capture in a CUDA graph); check_lengths=False (SWAKVCache passes it while
  // it alone has written its lengths) or ALLMEM_SWA_DECODE_CHECK=0 (read at every call) skips it:
  // the kernels then guard on the device, a negative length giving NaN outputs for that sequence
  // and leaving its cache untouched instead of an error. Never an out-of-bounds access.
  const at::Tensor seqlens = cache_seqlens.contiguous();
  const char* check_env = std::getenv("ALLMEM_SWA_DECODE_CHECK");
  if (check_lengths && (check_env == nullptr || std::strcmp(check_env, "0") != 0)) {
    const int min_len = seqlens.min().item<int>();
    ALLMEM_CHECK(min_len >= 0, "cache_seqlens must be >= 0, got a minimum of ", min_len);
  }

  const at::Tensor q = readable(q_in, "q"), k_new = readable(k_new_in, "k_new"),
                   v_new = readable(v_new_in, "v_new");
  DecodeParams dp;
  dp.q = ref_of(q, false);
  dp.k_new = ref_of(k_new, false);
  dp.v_new = ref_of(v_new, false);
  dp.k_cache = ref_of(k_cache, false);
  dp.v_cache = ref_of(v_cache, false);
  dp.out = ref_of(out, false);
  dp.cache_seqlens = seqlens.data_ptr<int>();
  dp.batch = static_cast<int>(B);
  dp.new_len = static_cast<int>(l_new);
  dp.hq = static_cast<int>(hq);
  dp.hkv = static_cast<int>(hkv);
  dp.window = static_cast<int>(window);
  dp.sinks = static_cast<int>(sinks);
  dp.scale_log2 = static_cast<float>(scale * kLog2eD);
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  plan_decode_splits(dp, slots, props->multiProcessorCount);
  ALLMEM_CHECK(dp.num_splits <= kMaxGridYZ, "the CUDA decode kernel supports S + W up to ",
               kMaxGridYZ * DecodeTraits::kMaxSplitKeys, ", got ", slots);
  const size_t smem = decode_smem_bytes(static_cast<int>(hq / hkv), static_cast<int>(D), dp.split_keys);
  ALLMEM_CHECK(smem <= props->sharedMemPerBlockOptin, "the CUDA decode kernel needs ", smem,
               " bytes of shared memory for ", hq / hkv, " query heads per kv head; this GPU offers ",
               props->sharedMemPerBlockOptin);
  const int64_t rows = B * l_new * hq;
  at::Tensor o_partial = at::empty({rows, dp.num_splits, D}, q.options().dtype(at::kFloat));
  at::Tensor lse_partial = at::empty({rows, dp.num_splits}, q.options().dtype(at::kFloat));
  dp.o_partial = o_partial.data_ptr<float>();
  dp.lse_partial = lse_partial.data_ptr<float>();
  launch_swa_decode(dp, dtype, static_cast<int>(D), at::cuda::getCurrentCUDAStream());
  return out;
}

}  // namespace
}  // namespace allmem::swa::cuda

TORCH_LIBRARY_IMPL(allmem, CUDA, m) {
  m.impl("swa_fwd", &allmem::swa::cuda::swa_fwd_cuda);
  m.impl("swa_bwd", &allmem::swa::cuda::swa_bwd_cuda);
  m.impl("swa_decode", &allmem::swa::cuda::swa_decode_cuda);
}
