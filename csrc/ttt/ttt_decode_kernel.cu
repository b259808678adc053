// The read and row write of a TTT decode step in one launch (ttt_decode.cpp selects it with
// ALLMEM_TTT_DECODE_KERNEL=1 instead of its ATen sequence): block (sequence n, head) computes the
// read o = Wd (silu(Wg x) * (Wu x)) [+ x] of its token with the float32 weights of the state, one
// warp per output row (lanes over the contraction, a shuffle sum: fixed order, deterministic), and
// copies the token's k | v | eta | mu into row pending_len[n] of its chunk buffer. A sequence whose
// length is outside [0, row_limit) (lengths nobody checked: the capturable steps) gets NaN outputs
// and nothing written. The length itself is advanced afterwards by the advance kernel (the H blocks
// of a sequence all read it), after the chunk update where one runs.
#include <c10/cuda/CUDAException.h>

#include <limits>

#include "ttt/ttt_cuda.h"
#include "ttt/ttt_kernel_utils.cuh"

namespace allmem::ttt::cuda {
namespace {

constexpr int kDecodeThreads = 128;
constexpr int kDecodeWarps = kDecodeThreads / 32;

__global__ void __launch_bounds__(kDecodeThreads) ttt_decode_kernel(const DecodeParams p) {
  extern __shared__ float4 smem4[];
  float* x = reinterpret_cast<float*>(smem4);  // [d]: the token's q
  float* s = x + p.d;                          // [h]: silu(Wg x) * (Wu x)
  const int64_t job = blockIdx.x, n = job / p.heads, hh = job % p.heads;
  const int d = p.d, h = p.h, tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t hd = int64_t{h} * d;
  const int64_t row = p.pending_len[n];
  if (row < 0 || row >= p.row_limit) {  // guarded: NaN outputs, the state kept (uniform per block)
    for (int c = tid; c < d; c += kDecodeThreads) store_out(p.o, job * d + c, std::numeric_limits<float>::quiet_NaN(), p.dtype);
    return;
  }
  for (int c = tid; c < d; c += kDecodeThreads) x[c] = load_in(p.q, job * d + c, p.dtype);
  __syncthreads();
  const float* wg = p.fast + job * 6 * hd;  // gate [h, d], up [h, d], down [d, h], then the momenta
  const float* wu = wg + hd;
  const float* wd = wu + hd;
  for (int r = warp; r < h; r += kDecodeWarps) {
    float a = 0.f, b = 0.f;
    for (int c = lane; c < d; c += 32) {
      a += wg[int64_t{r} * d + c] * x[c];
      b += wu[int64_t{r} * d + c] * x[c];
    }
    a = warp_sum(a);
    b = warp_sum(b);
    if (lane == 0) s[r] = a * sigmoidf(a) * b;
  }
  __syncthreads();
  for (int c = warp; c < d; c += kDecodeWarps) {
    float acc = 0.f;
    for (int r = lane; r < h; r += 32) acc += wd[int64_t{c} * h + r] * s[r];
    acc = warp_sum(acc);
    if (lane == 0) store_out(p.o, job * d + c, p.residual ? acc + x[c] : acc, p.dtype);
  }
  const int pw = 2 * d + 4;
  float* dst = p.pending + ((n * p.chunk + row) * p.heads + hh) * pw;
  for (int j = tid; j < pw; j += kDecodeThreads) dst[j] = pending_column(p.k, p.v, p.eta, p.mu, job, j, d, p.dtype);
}

// One thread per sequence (after every block of the step kernel has read the lengths).
__global__ void __launch_bounds__(kDecodeThreads) ttt_decode_advance_kernel(const DecodeParams p) {
  const int64_t n = int64_t{blockIdx.x} * kDecodeThreads + threadIdx.x;
  if (n >= p.n_seqs) return;
  const int64_t len = p.pending_len[n];
  if (len >= 0 && len < p.row_limit) p.pending_len[n] = (len + 1) % p.chunk;
}

}  // namespace

void launch_ttt_decode(const DecodeParams& p, cudaStream_t stream) {
  const int64_t blocks = p.n_seqs * p.heads;
  if (blocks == 0) return;
  const size_t smem = static_cast<size_t>(p.d + p.h) * sizeof(float);
  ttt_decode_kernel<<<static_cast<unsigned>(blocks), kDecodeThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_ttt_decode_advance(const DecodeParams& p, cudaStream_t stream) {
  if (p.n_seqs == 0) return;
  const int64_t blocks = (p.n_seqs + kDecodeThreads - 1) / kDecodeThreads;
  ttt_decode_advance_kernel<<<static_cast<unsigned>(blocks), kDecodeThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace allmem::ttt::cuda
