// Host/device contract between the torch glue (swa_api_cuda.cpp) and the SWA CUDA kernels
// (swa_fwd.cu, swa_bwd_*.cu, swa_decode.cu). Plain structs of pointers and element strides, so the
// kernel translation units need no torch headers and compile quickly.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace allmem::swa::cuda {

enum class DType { kBFloat16, kFloat16 };

// One [rows, heads, D] tensor with the last dim contiguous. The element (b, t, h, :) lives at
// ptr + b * batch_stride + t * row_stride + h * head_stride. Varlen tensors use batch_stride = 0
// and t = cu_seqlens[b] + local index.
struct TensorRef {
  void* ptr = nullptr;
  int64_t batch_stride = 0, row_stride = 0, head_stride = 0;
};

// Per-row float32 statistics (lse, delta): (b, h, t) at ptr + b * batch_stride + h * head_stride + t.
struct RowStatRef {
  float* ptr = nullptr;
  int64_t batch_stride = 0, head_stride = 0;
};

// Problem shared by the forward and backward kernels. `seqlen` is L (dense) or the longest
// sequence (varlen); window and sinks are clamped to seqlen + 1 on the host so they fit int.
struct AttnShape {
  const int* cu_seqlens = nullptr;  // device int32 [batch + 1], or nullptr for dense
  int batch = 0, seqlen = 0, hq = 0, hkv = 0, window = 1, sinks = 0;
  float scale = 0.f;       // softmax scale applied to q.k
  float scale_log2 = 0.f;  // scale * log2(e): the kernels use exp2
};

struct FwdParams {
  AttnShape shape;
  TensorRef q, k, v, out;
  RowStatRef lse;  // natural-log LSE of the scaled scores
};

struct BwdParams {
  AttnShape shape;
  TensorRef q, k, v, out, dout, dq, dk, dv;
  RowStatRef lse, delta;  // delta: workspace for rowsum(dout * out), same layout as lse
  // float32 dQ / scale accumulated by atomics (launch_swa_bwd_dkdvq_sm90 only; zeroed by the caller,
  // q's logical layout).
  TensorRef dq_accum;
  // Hopper dK/dV kernels only: a sink key block walks every query block to the end of the sequence
  // (L / 64 steps per query head, against about (W + 128) / 64 for a window block), so its walk is
  // split over sink_parts CTAs (swa_bwd_sm90_sink_plan), whose float32 partial dK/dV the last one to
  // finish sums in part order: deterministic. sink_parts <= 1: no split, no workspace.
  int sink_parts = 1, sink_blocks = 0;
  float* sink_partial = nullptr;  // [batch][hkv][sink_blocks][sink_parts][2][128][D]
  int* sink_counter = nullptr;    // [batch][hkv][sink_blocks]: zero before the launch, left zero
};

// Decode against the S + W slot cache. The kernels read the cache as it was before the call (and
// k_new/v_new for the new positions), then a last kernel writes the new tokens into their slots,
// which gives the same result as writing and attending token by token.
struct DecodeParams {
  TensorRef q, k_new, v_new, k_cache, v_cache, out;  // q/out [B, Lnew, Hq, D] etc.
  const int* cache_seqlens = nullptr;                // device int32 [B], read-only
  int batch = 0, new_len = 0, hq = 0, hkv = 0, window = 1, sinks = 0;
  float scale_log2 = 0.f;
  int num_splits = 1, split_keys = 0;  // key range of each split CTA (a multiple of the chunk tile)
  float* o_partial = nullptr;          // [B * Lnew * Hq, num_splits, D] float32 workspace
  float* lse_partial = nullptr;        // [B * Lnew * Hq, num_splits] float32 workspace (log2 domain)
};

// Keys per dK/dV CTA (BwdDkDvTraits<D>::kBlockN, asserted in swa_bwd_dkdv.cu): the host sizes the
// backward grid with it.
constexpr int kBwdKeyBlockRows = 64;

// Launchers (one per kernel family). `head_dim` must be 64 or 128: the torch glue checks.
void launch_swa_fwd(const FwdParams& p, DType dtype, int head_dim, cudaStream_t stream);
// Hopper forward (swa_fwd_sm90.cu: wgmma + TMA, warp-specialized). Returns false, launching
// nothing, when it cannot run this problem here: the loaded cubin has no sm_90a code, a TMA
// descriptor does not encode (strides not multiples of 16 bytes, ...), or head_dim is not 64/128;
// the caller then runs launch_swa_fwd. `total_rows` is T for varlen input (rows of q/k/v), else
// unused. Selection (device, env var) is the caller's.
// `pingpong`: the variant whose two consumer warpgroups take turns issuing wgmmas (opt-in).
bool launch_swa_fwd_sm90(const FwdParams& p, int64_t total_rows, DType dtype, int head_dim, cudaStream_t stream,
                         bool pingpong = false);
// Hopper backward (swa_bwd_sm90.cuh: wgmma + TMA, warp-specialized), same contract as the two
// portable backward kernels (delta from launch_swa_bwd_preprocess first). Return false, launching
// nothing, under the same conditions as launch_swa_fwd_sm90; the caller then runs the portable one.
bool launch_swa_bwd_dq_sm90(const BwdParams& p, int64_t total_rows, DType dtype, int head_dim, cudaStream_t stream);
bool launch_swa_bwd_dkdv_sm90(const BwdParams& p, int64_t total_rows, DType dtype, int head_dim,
                              cudaStream_t stream);
// How the Hopper dK/dV kernels split the sink key blocks' walks (BwdParams::sink_parts): enough
// parts that one is no longer than an SM's fair share of the whole backward; 1 when that is one.
struct SinkPlan {
  int parts = 1, blocks = 0;
  int64_t workspace_floats = 0;  // sink_partial's size
};
SinkPlan swa_bwd_sm90_sink_plan(const AttnShape& s, int head_dim, int num_sms);
// The Hopper dK/dV kernel that also accumulates dQ / scale into p.dq_accum with float atomics
// (no dQ kernel: 5 matmuls instead of 7, but the order of the additions, so dQ's last bits, vary
// from run to run). Same return convention.
bool launch_swa_bwd_dkdvq_sm90(const BwdParams& p, int64_t total_rows, DType dtype, int head_dim,
                               cudaStream_t stream);
void launch_swa_bwd_preprocess(const BwdParams& p, DType dtype, int head_dim, cudaStream_t stream);
void launch_swa_bwd_dkdv(const BwdParams& p, DType dtype, int head_dim, cudaStream_t stream);
void launch_swa_bwd_dq(const BwdParams& p, DType dtype, int head_dim, cudaStream_t stream);
void launch_swa_decode(const DecodeParams& p, DType dtype, int head_dim, cudaStream_t stream);

// Decode split planning: the tile of keys each split CTA scores at once, and the largest number
// of keys a split may own (its scores live in shared memory).
struct DecodeTraits {
  static constexpr int kThreads = 128;
  static constexpr int kMaxSplitKeys = 512;
  static constexpr int kMinSplitKeys = 64;
};
// Shared memory a split CTA needs for a GQA group of `group` query heads.
size_t decode_smem_bytes(int group, int head_dim, int split_keys);

}  // namespace allmem::swa::cuda
