// Interface between the torch glue (ttt_api_cuda.cpp) and the CUDA kernels of the TTT memory
// (ttt_fwd.cu). Plain structs only: no ATen types cross into the kernel translation units.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

namespace allmem::ttt::cuda {

// The arrival counters of the kernels without clusters: one per job slot of a wave, each in its own
// 128-byte line (the jobs' polls do not share an L2 line); FwdParams / BwdParams::xcount holds
// wave * kXcountStride of them, zeroed before each wave.
constexpr int kXcountStride = 32;

// Element type of q, k, v, eta, mu and o (the state is always float32 on the GPU path).
enum class InDType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// One forward launch. Token tensors are contiguous [T, H, x] (dense [B, L, H, x] viewed as
// T = B * L tokens); the packed state follows csrc/registration.cpp: fast [N, H, 6, h*d]
// (gate, up, down, then their momenta), pending [N, C, H, 2d+4] (k | v | eta | mu rows).
struct FwdParams {
  const void* q;
  const void* k;
  const void* v;
  const void* eta;  // [T, H, 3]
  const void* mu;   // [T, H]
  void* o;          // [T, H, d], the input dtype
  InDType dtype;
  const float* w_gate;  // [H, h, d]: row norms are the normalization targets
  const float* w_up;    // [H, h, d]
  const float* w_down;  // [H, d, h]
  const float* fast_in;
  const float* pend_in;
  float* fast_out;  // also the working state of each (sequence, head) while the kernel runs
  float* pend_out;  // also the chunk buffer
  float* ckpt;      // [slots, H, 6, h*d]: (W, M) at every segment start
  const int64_t* seq;  // [4, N] on the device: token start, length, initial pending length, first slot
  int64_t n_seqs;
  int64_t heads;
  int64_t chunk;
  bool lact_order;
  bool residual;
  bool skip_read;  // tensor-core forward only: o is left to launch_ttt_read_tc (split mode)
  // Token-split tensor-core forward only (ttt_fwd_tc.cuh), profiling: nullptr, or kPhaseSlots
  // int64 on the device that CTA 0 of the grid fills with its phase clocks (ALLMEM_TTT_TC_PHASES=1).
  long long* phase_clock;
  // The hidden-unit chain without clusters (ttt_chain_tc.cuh kGx): per job slot of a wave
  // ChainTcTraits::kXchgFloats floats (row-norm partials, double-buffered, and with token parts
  // their -G partials) and one arrival counter (zeroed before each wave), and the
  // first job of this launch (the jobs run in waves of co-resident ones). 0 / null otherwise.
  float* xchg;
  unsigned* xcount;  // job slot j's counter at xcount[j * kXcountStride]
  int64_t job0;
  // The token-split forward without clusters (ttt_fwd_tc.cuh kGx): per job slot of a wave, the
  // owners' published 16-bit rows [2][3][d][d] (as they are, normalized); xchg then holds per job
  // slot kP partial blocks (FwdTcTraitsP::kPart floats) and xcount one counter (zeroed before each
  // wave), indexed by the job's place in its wave.
  void* xpub;
};

// The slots of FwdParams::phase_clock: SM cycles of CTA 0's thread 0 summed per phase (each phase
// ends at a barrier, so it includes waiting for the CTA or cluster), then counts and totals.
// allmem_ops/ttt.py tc_phase_clock names them in this order.
enum FwdPhase : int {
  kPhaseStage = 0,   // update tile: rates to shared memory, k/v wait, barrier
  kPhaseFactors,     // update tile: a, b, e products and the per-token factors
  kPhaseGrads,       // update tile: the weight-gradient products
  kPhaseReduceWait,  // partials to shared memory, cluster barrier
  kPhaseReduce,      // rank-order sums over the cluster, momentum step (LaCT: normalization)
  kPhasePublish,     // new 16-bit rows into every CTA, cluster barrier
  kPhaseSegment,     // per segment: checkpoint, chunk-buffer rows, barrier
  kPhaseRead,        // per segment: read tiles (fused mode)
  kPhasePrologue,    // state and targets in, first publish
  kPhaseEpilogue,    // buffer tail and final state out
  kPhaseChunks,      // count: completed chunks
  kPhaseTiles,       // count: update tiles of CTA 0
  kPhaseCycles,      // SM cycles, kernel start to end
  kPhaseNs,          // nanoseconds (global timer), kernel start to end
  kPhaseSlots = 16
};

// The chunk-parallel read of the split tensor-core forward: work item i is the token range
// [work[3i], work[3i] + work[3i+1]) of one segment, read with the weights of checkpoint slot
// work[3i+2] (for every head).
struct ReadParams {
  const void* q;  // [T, H, d]
  void* o;
  InDType dtype;
  const float* ckpt;   // [slots, H, 6, h*d]
  const int64_t* work;  // [n_work, 3] on the device
  int64_t n_work;
  int64_t heads;
  bool residual;
  int d;  // d = h, 64 or 128
  bool wgmma;  // d = 64: the wgmma read (ttt_read_wg_kernel, sm_90a; ALLMEM_TTT_TC_WGMMA=1)
};

// The work list of split mode's reads (ReadParams::work): (first token, length, checkpoint slot)
// of every non-empty segment, walking each sequence as the kernels do (each segment fills the
// current chunk). Per sequence n: start[n], len[n], initial pending length p0[n], first slot[n].
inline std::vector<int64_t> segment_reads(const int64_t* start, const int64_t* len, const int64_t* p0,
                                          const int64_t* slot, int64_t n_seqs, int64_t chunk) {
  std::vector<int64_t> work;
  for (int64_t n = 0; n < n_seqs; ++n) {
    int64_t fill = p0[n], pos = 0, s = slot[n];
    while (true) {
      const int64_t seg = len[n] - pos < chunk - fill ? len[n] - pos : chunk - fill;
      if (seg > 0) work.insert(work.end(), {start[n] + pos, seg, s});
      ++s;
      fill += seg;
      pos += seg;
      if (fill < chunk) break;
      fill = 0;
    }
  }
  return work;
}

// One backward launch (the CPU op's ttt_memory_bwd): walks each (sequence, head) in reverse from
// the forward's checkpoints. Gradients of the tokens come out float32 [T, H, x]; d_targets
// [N, H, 2h + d] holds each job's gradient of the row-norm targets (summed over N by the caller).
struct BwdParams {
  const void* grad_o;  // [T, H, d]
  const void* q;
  const void* k;
  const void* v;
  const void* eta;
  const void* mu;
  InDType dtype;
  const float* w_gate;
  const float* w_up;
  const float* w_down;
  const float* pend_in;    // the forward's initial pending [N, C, H, 2d+4]
  const float* grad_pend;  // [N, C, H, 2d+4]
  const float* ckpt;       // [slots, H, 6, h*d]
  float* d_fast;           // [N, H, 6, h*d]: grad_fast on entry, d_fast on exit (the working dW, dM)
  float* d_pend;           // [N, C, H, 2d+4], zero on entry
  float* dq;               // [T, H, d]
  float* dk;
  float* dv;
  float* deta;       // [T, H, 3]
  float* dmu;        // [T, H]
  float* d_targets;  // [N, H, 2h + d]
  float* scratch;    // [N, H, 3, h*d]
  const int64_t* seq;
  int64_t n_seqs;
  int64_t heads;
  int64_t chunk;
  bool lact_order;
  bool residual;
  // Tensor-core backward only, split mode: dq and the read's weight gradients come from
  // launch_ttt_read_bwd_tc; the chain adds dw_read [slots, H, 3, h*d] at each non-empty segment.
  bool skip_read;
  const float* dw_read;
  // The tensor-core backward without clusters (ttt_bwd_tc.cuh kGx; split mode only): per job slot
  // of a wave, 8 partial blocks of kBwdGxPartFloats floats at xchg (the CTAs' weight-gradient
  // partials, row-major [3][d][d], then their shares of mu's sum and of dmu's dot product), the
  // 16-bit rows [6][d][d] (Wx, P) the owners publish at xpub, one arrival counter at xcount (zeroed
  // before each wave); job0 the first job of the launch. 0 / null otherwise.
  float* xchg;
  unsigned* xcount;
  void* xpub;
  int64_t job0;
};

// The chunk-parallel read backward of split mode: per work item (as ReadParams) and head, dq of
// the segment's tokens and the segment's read weight gradients (gate, up, down) into dw_read.
struct ReadBwdParams {
  const void* q;
  const void* grad_o;
  float* dq;  // [T, H, d]
  InDType dtype;
  const float* ckpt;
  const int64_t* work;
  int64_t n_work;
  int64_t heads;
  bool residual;
  float* dw_read;  // [slots, H, 3, h*d]
};

// Launches the forward on `stream`; d, h in {64, 128} (checked by the caller).
void launch_ttt_fwd(const FwdParams& p, int d, int h, cudaStream_t stream);
void launch_ttt_bwd(const BwdParams& p, int d, int h, cudaStream_t stream);

// The tensor-core forward (ttt_fwd_tc.cuh): d = h = 64, bf16/fp16 inputs, sm_90+ (clusters).
// Same inputs, outputs and checkpoints as launch_ttt_fwd.
// cluster: CTAs per (sequence, head), 8 or 16 (a non-portable cluster size; the caller checks that
// the device runs one: ttt_fwd_tc_active_clusters); warps: per CTA, 4 or 8.
// wgmma: the chain's products on wgmma (ttt_fwd_tc.cuh kWg; split mode (p.skip_read), a binary
// with sm_90a code: ttt_fwd_wg_available).
void launch_ttt_fwd_tc(const FwdParams& p, cudaStream_t stream, int cluster = 8, int warps = 4, bool wgmma = false);
// Whether the device runs this binary's sm_90a code (the wgmma chain's target).
bool ttt_fwd_wg_available();
// Clusters of that many CTAs of the kernel (with that many warps; wgmma: its wgmma form) the current
// device runs at once (0: none).
int ttt_fwd_tc_active_clusters(InDType dt, int cluster, int warps, bool wgmma = false);
// Split mode (use_split_read in ttt_api_cuda.cpp): the cluster forward with p.skip_read runs only the
// sequential updates and writes the checkpoints; then every segment's read runs in parallel from
// them (ttt_read_tc.cuh), one CTA per (segment, head). Same outputs, bit for bit.
void launch_ttt_read_tc(const ReadParams& p, cudaStream_t stream);
// The update chain of split mode split by hidden units (ttt_chain_tc.cuh), d = h in {64, 128},
// bf16/fp16, sm_90+: checkpoints, final state and chunk buffer as launch_ttt_fwd_tc; o is left to
// launch_ttt_read_tc. Split mode uses it for d = h = 128 (and for 64 with ALLMEM_TTT_TC_CHAIN=units);
// split mode is the default at d = 128.
// global: the chain without clusters (ttt_chain_tc.cuh kGx; any sm_80+ device that fits its
// shared memory: ttt_chain_gx_jobs > 0), in cooperative waves of `wave` jobs (1 to
// ttt_chain_gx_jobs), with per job slot of a wave ttt_chain_gx_xchg_floats floats at p.xchg and one
// counter at p.xcount. ctas x parts: unit groups x token parts (CTAs per job = their product;
// ttt_chain_tc.cu lists the shapes: 8 x 1 at d = 64; 8 x 1, 16 x 1, 8 x 2 and, without clusters,
// 8 x 4 at d = 128; a cluster of 16 needs ttt_chain_tc_active_clusters > 0).
void launch_ttt_chain_tc(const FwdParams& p, int d, cudaStream_t stream, bool global = false, int64_t wave = 0,
                         int ctas = 8, int parts = 1);
// (sequence, head) jobs of the chain without clusters the current device runs at once (0: none).
int64_t ttt_chain_gx_jobs(InDType dt, int d, int ctas = 8, int parts = 1);
// Floats of p.xchg per job slot of the chain without clusters.
int64_t ttt_chain_gx_xchg_floats(int d, int ctas, int parts);
// Clusters of the d = 128 chain with ctas x parts CTAs (16 x 1 or 8 x 2) the current device runs
// at once (0: none).
int ttt_chain_tc_active_clusters(InDType dt, int ctas, int parts);
// The token-split forward without clusters (ttt_fwd_tc.cuh kGx; d = h = 64, 8 CTAs x 4 warps,
// mma.sync; any sm_80+ device that fits it: ttt_fwd_tc_gx_jobs > 0), fused or split mode
// (p.skip_read) as launch_ttt_fwd_tc, in cooperative waves of `wave` jobs (1 to
// ttt_fwd_tc_gx_jobs); per job slot of a wave: p.xchg 8 x kFwdGxPartFloats floats, p.xpub
// 6 x 64 x 64 values of the input dtype, p.xcount one counter.
constexpr int64_t kFwdGxPartFloats = 3 * 64 * 64 + 8;  // padded to 32 bytes
void launch_ttt_fwd_tc_gx(const FwdParams& p, cudaStream_t stream, int64_t wave);
int64_t ttt_fwd_tc_gx_jobs(InDType dt);
// The tensor-core backward (ttt_bwd_tc.cuh): same sizes and devices; same inputs and outputs as
// launch_ttt_bwd (p.scratch unused), from either forward's checkpoints.
// cluster: 8 or 16 CTAs per (sequence, head), as the forward's (ttt_bwd_tc_active_clusters).
void launch_ttt_bwd_tc(const BwdParams& p, cudaStream_t stream, int cluster = 8);
int ttt_bwd_tc_active_clusters(InDType dt, int cluster);
// The tensor-core backward without clusters (ttt_bwd_tc.cuh kGx; d = h = 64, 8 CTAs per job; any
// sm_80+ device that fits its shared memory: ttt_bwd_tc_gx_jobs > 0), split mode only (p.skip_read,
// after launch_ttt_read_bwd_tc), in cooperative waves of `wave` jobs (1 to ttt_bwd_tc_gx_jobs); per
// job slot of a wave: p.xchg 8 x kBwdGxPartFloats floats, p.xpub 6 x 64 x 64 values of the input
// dtype, p.xcount one counter. Bitwise the split-mode cluster backward's outputs.
constexpr int64_t kBwdGxPartFloats = 3 * 64 * 64 + 8;  // padded to 32 bytes
void launch_ttt_bwd_tc_gx(const BwdParams& p, cudaStream_t stream, int64_t wave);
int64_t ttt_bwd_tc_gx_jobs(InDType dt);
void launch_ttt_read_bwd_tc(const ReadBwdParams& p, cudaStream_t stream);

// One decode step that completes no chunk (ttt_decode.cpp, ALLMEM_TTT_DECODE_KERNEL=1): block
// (sequence n, head) reads o = f(W; q) with the state's float32 weights and writes the token's
// k | v | eta | mu into row pending_len[n] of its chunk buffer. Tokens [N, 1, H, x] contiguous;
// fast [N, H, 6, h*d]; pending [N, C, H, 2d+4]; pending_len is advanced by the caller afterwards.
struct DecodeParams {
  const void *q, *k, *v, *eta, *mu;
  void* o;
  InDType dtype;
  const float* fast;
  float* pending;
  int64_t* pending_len;  // read by the step kernel, advanced by the advance kernel
  int64_t n_seqs, heads, chunk;
  int64_t row_limit;  // a sequence whose length is outside [0, row_limit) is guarded: NaN o, nothing written
  int d, h;
  bool residual;
};
void launch_ttt_decode(const DecodeParams& p, cudaStream_t stream);
// pending_len[n] = (pending_len[n] + 1) % chunk where it is in [0, row_limit); kept elsewhere.
void launch_ttt_decode_advance(const DecodeParams& p, cudaStream_t stream);

// The elementwise steps of the composite backward (ttt_bwd_composite.cpp) as single launches on
// float32 rows (the ATen sequence they replace: about 40 launches per chunk). Row-major, contiguous
// unless a stride is given; one warp per row where a row needs a sum.
//
// Update terms, per token row: p1 = [a, b, pg, pu] (k Wg^T, k Wu^T, k Dg^T, k Du^T), p2 = [e, ps]
// (v Wd, v Dd) with D the gradient of the new momentum, eta = (eta_g, eta_u, eta_d):
// f1 = [da, db, eta_g xg, eta_u xu], f2 = [de, eta_d s], deta = (pg.xg, pu.xu, ps.s), where
// s = silu(a) b, xu = e silu(a), xg = e b silu'(a) (ttt_chunk.h update_grad_backward).
struct UpdateTermsParams {
  const float *p1, *p2, *eta;  // [rows, 4h], [rows, 2h], [rows, 3]
  float *f1, *f2, *deta;       // [rows, 4h], [rows, 2h], [rows, 3]
  int64_t rows;
  int h;
};
// Read terms, per token row: ab = [a, b] (q Wg^T, q Wu^T), ds = dO Wd: f = [ds b silu'(a), ds silu(a)],
// s = silu(a) b. With ds = f = null (the forward's read): s only.
struct ReadTermsParams {
  const float *ab, *ds;  // [rows, 2h], [rows, h]
  float *f, *s;          // [rows, 2h], [rows, h]
  int64_t rows;
  int h;
};
// Gradient terms of the update (the composite forward; LaCT order's backward), per token row from
// ab = [a, b] (k Wg^T, k Wu^T), e = v Wd: fgu = -[eta_g e b silu'(a), eta_u e silu(a)], fd = -eta_d s,
// so that G = [fgu^T K ; V^T fd] (SPEC.md's gradient, summed over the chunk with the rates).
struct GradTermsParams {
  const float *ab, *e, *eta;  // [rows, 2h], [rows, h], [rows, 3]
  float *fgu, *fd;            // [rows, 2h], [rows, h]
  int64_t rows;
  int h;
};
// Row normalization of packed weights [batch, 3, h*d] (gate and up: h rows of d; down: d rows of
// h; every row contiguous, rows back to back), targets [batch, 2h + d]: out = w target / (|w| + eps).
// With g (backward): out = d/dw of <g, normalize(w)>, and dtarget [batch, 2h + d] += <g, w> / (|w| + eps).
struct RowNormParams {
  const float* w;
  int64_t w_batch_stride;  // elements between batch entries of w (>= 3hd)
  const float* target;     // [batch, 2h + d]
  const float* g;          // null: forward; else [batch, 3, h*d] contiguous
  const float* g_add;      // backward, optional: [batch, 3, h*d] added to g
  float* out;              // [batch, 3, h*d]
  float* dtarget;          // backward only
  int64_t batch;
  int d, h;
};
// The weights of one chunk's update backward, stacked for its matmuls: per weight row (one warp)
// w (normalized by target where target is given, as row_norm), D = a + b, written as
// wk [batch, 4h, d] = [Wg; Wu; Dg; Du], wv [batch, d, 2h] = [Wd | Dd] and dsum [batch, 3, h*d] = D.
struct PrepParams {
  const float* w;
  int64_t w_batch_stride;
  const float* target;  // [batch, 2h + d], or null: w as it is
  const float *a, *b;   // [batch, 3, h*d]
  float *wk, *wv, *dsum;
  int64_t batch;
  int d, h;
};
// The momentum step of one chunk's update backward, block per chain: g = <D, M> over the three
// matrices; every one of the chunk's mu-gradient rows gets g / chunk; dm = D * mu where live (all
// chains when live is null), else dm is kept.
struct MomentumParams {
  const float* dsum;  // D [batch, n]
  const float* m;     // M, rows of n contiguous
  int64_t m_batch_stride;
  const float* mu;    // [batch]
  const bool* live;   // [batch] or null
  float* dm;          // [batch, n], in place
  float* dmu_rows;    // [batch, chunk]
  int64_t batch, n, chunk;
};
// One completed chunk's update backward for a batch of chains on the tensor cores (d = h = D in
// {64, 128}, bf16/fp16 operands, float32 state; ttt_bwd_step_tc.cuh), the step of the composite
// backward's walk (ttt_bwd_composite.cpp) that its ATen sequence (prep, two products, the
// per-token terms, two weight-gradient products, the normalization's backward, the momentum
// step) computes. Per chain c (all tensors contiguous, chain-major):
//   in:  k, v [C][D] (16-bit), eta [C][3], mu [c] (the chunk's mean momentum), w: (W, M) at the
//        chunk start [6][D*D] at w + c * w_stride, m_next (LaCT order: M after the update, at
//        m_next + c * w_stride; else null), targets [3D] (gate | up | down row norms);
//        dw, dm [3][D*D]: the gradients wrt the W, M after the update;
//        dw_read [3][D*D] or null: added to dw at the end (the read of the chunk's segment).
//   out: dw, dm in place: the gradients wrt the W, M before it (plus dw_read);
//        d_targets [3D] += this chunk's share; dmu [C]: every row the momentum's gradient / C;
//        the per-token factors f1 [C][4D] = [da | db | eta_g x_g | eta_u x_u] and f2 [C][2D] =
//        [de | eta_d s] (16-bit), the stacked weights wk [4D][D] = [Wg; Wu; Dg; Du] and wv [D][2D]
//        = [Wd | Dd] (16-bit, W normalized or as the order takes it, D the gradient wrt the new
//        momentum), so that dk = f1 wk and dv = f2 wv^T (the caller's batched products), and
//        deta_part [8][C][3]: the rate gradients summed over each CTA's hidden units (the caller
//        sums the 8 in order).
struct BwdStepParams {
  const void* k;
  const void* v;
  InDType dtype;
  const float* eta;
  const float* mu;
  const float* w;
  const float* m_next;
  int64_t w_stride;
  const float* targets;
  float* dw;
  float* dm;
  const float* dw_read;
  float* d_targets;
  float* dmu;
  void* f1;
  void* f2;
  void* wk;
  void* wv;
  float* deta_part;
  int64_t chains;
  int64_t chunk;
  bool lact_order;
};
void launch_bwd_step_tc(const BwdStepParams& p, int d, cudaStream_t stream);
void launch_update_terms(const UpdateTermsParams& p, cudaStream_t stream);
void launch_prep(const PrepParams& p, cudaStream_t stream);
void launch_momentum(const MomentumParams& p, cudaStream_t stream);
void launch_read_terms(const ReadTermsParams& p, cudaStream_t stream);
void launch_grad_terms(const GradTermsParams& p, cudaStream_t stream);
void launch_row_norm(const RowNormParams& p, cudaStream_t stream);

}  // namespace allmem::ttt::cuda
