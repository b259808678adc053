// CUDA forward of the TTT memory (SPEC.md "The memory branch, exactly"), mirroring the CPU op
// (ttt_cpu.cpp) step for step so its outputs, checkpoints included, are interchangeable with it:
// per (sequence, head), the sequence is cut into segments that each fill the current chunk; at
// every segment start (W, M) goes to the checkpoints, the segment's tokens are read with W, and a
// completed chunk runs the update (row normalization, closed-form gradient with per-token rates,
// momentum). Layout and tile sizes: ttt_traits.cuh. Everything is deterministic: every reduction
// runs in a fixed order, with no atomics.
#include <c10/cuda/CUDAException.h>

#include "ttt/ttt_cuda.h"
#include "ttt/ttt_kernel_utils.cuh"
#include "ttt/ttt_traits.cuh"

namespace allmem::ttt::cuda {
namespace {

// Where the rows of the chunk being updated come from: this call's tokens (a chunk made only of
// them) or the chunk buffer (pending rows, possibly completed by this call's tokens).
struct ChunkSource {
  bool direct;
  int64_t first_token;  // direct: packed index of the chunk's first token
  const float* buf;     // buffered: row t of this head at buf + t * buf_stride
  int64_t buf_stride;
};

template <int D, int Hd>
__global__ void __launch_bounds__(FwdTraits<D, Hd>::kThreads, 1) ttt_fwd_kernel(const FwdParams p) {
  using Tr = FwdTraits<D, Hd>;
  constexpr int kT = Tr::kThreads, kTile = Tr::kTile, kW = Tr::kWarps;
  constexpr int kLdD = Tr::kLdD, kLdH = Tr::kLdH, PW = Tr::kPendWidth;
  constexpr int64_t HD = Tr::kMat;
  extern __shared__ float4 smem4[];
  float* smem = reinterpret_cast<float*>(smem4);
  float* X1 = smem + Tr::kOffX1;  // q, or the chunk's k
  float* X2 = smem + Tr::kOffX2;  // read output, or the chunk's v
  float* A = smem + Tr::kOffA;
  float* B = smem + Tr::kOffB;
  float* E = smem + Tr::kOffE;
  float* ETA = smem + Tr::kOffEta;
  float* TG = smem + Tr::kOffTarget;  // row-norm targets: gate [h], up [h], down [d]
  float* RED = smem + Tr::kOffRed;

  const int tid = threadIdx.x;
  const int64_t H = p.heads, C = p.chunk, N = p.n_seqs;
  const int64_t n = blockIdx.x / H, hh = blockIdx.x % H;
  const int64_t start = p.seq[n], len = p.seq[N + n], p0 = p.seq[2 * N + n];
  int64_t slot = p.seq[3 * N + n];

  float* W = p.fast_out + (n * H + hh) * 6 * HD;  // Wg, Wu, Wd, Mg, Mu, Md
  float* Wg = W;
  float* Wu = W + HD;
  float* Wd = W + 2 * HD;
  float* Mg = W + 3 * HD;
  float* Mu = W + 4 * HD;
  float* Md = W + 5 * HD;
  {
    const float* src = p.fast_in + (n * H + hh) * 6 * HD;
    for (int64_t i = tid; i < 6 * HD; i += kT) W[i] = src[i];
  }
  // This head's pending rows: row t at pend + t * pstride.
  const int64_t pstride = H * PW;
  float* pend = p.pend_out + (n * C * H + hh) * PW;
  {
    const float* src = p.pend_in + (n * C * H + hh) * PW;
    for (int64_t i = tid; i < C * PW; i += kT) {
      const int64_t t = i / PW, c = i % PW;
      pend[t * pstride + c] = src[t * pstride + c];
    }
  }
  row_norms<Hd, D, kW>(p.w_gate + hh * HD, TG);
  row_norms<Hd, D, kW>(p.w_up + hh * HD, TG + Hd);
  row_norms<D, Hd, kW>(p.w_down + hh * HD, TG + 2 * Hd);
  __syncthreads();

  auto tok = [&](int64_t token) { return token * H + hh; };  // row of (token, head) in [T, H, .]

  // The update of one complete chunk (ttt_chunk.h chunk_update), in place on W, M.
  auto chunk_update = [&](const ChunkSource& src) {
    float part = 0.f;
    for (int64_t t = tid; t < C; t += kT) {
      part += src.direct ? load_in(p.mu, tok(src.first_token + t), p.dtype) : src.buf[t * src.buf_stride + 2 * D + 3];
    }
    const float mu_j = block_sum<kW>(part, RED) / static_cast<float>(C);
    if (!p.lact_order) {  // the gradient is taken at W_hat = normalize(W)
      row_normalize<Hd, D, kW>(Wg, TG);
      row_normalize<Hd, D, kW>(Wu, TG + Hd);
      row_normalize<D, Hd, kW>(Wd, TG + 2 * Hd);
    }
    // M_j = mu_j M - G: scale first, then every tile adds its share of -G.
    for (int64_t i = tid; i < 3 * HD; i += kT) Mg[i] *= mu_j;
    __syncthreads();
    for (int64_t t0 = 0; t0 < C; t0 += kTile) {
      const int nt = static_cast<int>(C - t0 < kTile ? C - t0 : kTile);
      // Rows past the chunk end are zero (rates included), so they add nothing.
      for (int i = tid; i < kTile * D; i += kT) {
        const int t = i / D, c = i % D;
        float kv = 0.f, vv = 0.f;
        if (t < nt) {
          if (src.direct) {
            const int64_t row = tok(src.first_token + t0 + t) * D + c;
            kv = load_in(p.k, row, p.dtype);
            vv = load_in(p.v, row, p.dtype);
          } else {
            const float* r = src.buf + (t0 + t) * src.buf_stride;
            kv = r[c];
            vv = r[D + c];
          }
        }
        X1[t * kLdD + c] = kv;
        X2[t * kLdD + c] = vv;
      }
      for (int i = tid; i < kTile * 3; i += kT) {
        const int t = i / 3, m = i % 3;
        float r = 0.f;
        if (t < nt) {
          r = src.direct ? load_in(p.eta, tok(src.first_token + t0 + t) * 3 + m, p.dtype)
                         : src.buf[(t0 + t) * src.buf_stride + 2 * D + m];
        }
        ETA[t * 4 + m] = r;
      }
      __syncthreads();
      tile_x_wt<Hd, D, kTile, kT>(X1, kLdD, Wg, A, kLdH);  // a = K Wg^T
      tile_x_wt<Hd, D, kTile, kT>(X1, kLdD, Wu, B, kLdH);  // b = K Wu^T
      tile_x_w<Hd, D, kTile, kT>(X2, kLdD, Wd, E, kLdH);   // e = V Wd
      __syncthreads();
      // A <- eta_g e b silu'(a), B <- eta_d s, E <- eta_u e silu(a): the negated per-token
      // gradient factors (ttt_chunk.h update_grad).
      for (int i = tid; i < kTile * Hd; i += kT) {
        const int t = i / Hd, j = t * kLdH + i % Hd;
        const float x = A[j], y = B[j], z = E[j];
        const float sg = sigmoidf(x), silu = x * sg, d1 = sg * (1.f + x * (1.f - sg));
        A[j] = ETA[t * 4 + 0] * z * y * d1;
        B[j] = ETA[t * 4 + 2] * silu * y;
        E[j] = ETA[t * 4 + 1] * z * silu;
      }
      __syncthreads();
      add_yt_x<Hd, D, kTile, kT>(Mg, A, kLdH, X1, kLdD);  // -Gg = (eta_g e b silu'(a))^T K
      add_yt_x<Hd, D, kTile, kT>(Mu, E, kLdH, X1, kLdD);  // -Gu = (eta_u e silu(a))^T K
      add_yt_x<D, Hd, kTile, kT>(Md, X2, kLdD, B, kLdH);  // -Gd = V^T (eta_d s)
      __syncthreads();
    }
    for (int64_t i = tid; i < 3 * HD; i += kT) Wg[i] += Mg[i];
    __syncthreads();
    if (p.lact_order) {
      row_normalize<Hd, D, kW>(Wg, TG);
      row_normalize<Hd, D, kW>(Wu, TG + Hd);
      row_normalize<D, Hd, kW>(Wd, TG + 2 * Hd);
      __syncthreads();
    }
  };

  int64_t fill = p0, pos = 0;
  while (true) {
    const int64_t pb = fill;
    const int64_t seg = (len - pos < C - fill) ? len - pos : C - fill;
    const int64_t first = start + pos;
    {
      float* ck = p.ckpt + (slot * H + hh) * 6 * HD;
      for (int64_t i = tid; i < 6 * HD; i += kT) ck[i] = W[i];
      ++slot;
    }
    // Read: o = Wd (silu(Wg q) * (Wu q)) [+ q] with the weights as they are.
    for (int64_t t0 = 0; t0 < seg; t0 += kTile) {
      const int nt = static_cast<int>(seg - t0 < kTile ? seg - t0 : kTile);
      for (int i = tid; i < kTile * D; i += kT) {
        const int t = i / D, c = i % D;
        X1[t * kLdD + c] = t < nt ? load_in(p.q, tok(first + t0 + t) * D + c, p.dtype) : 0.f;
      }
      __syncthreads();
      tile_x_wt<Hd, D, kTile, kT>(X1, kLdD, Wg, A, kLdH);
      tile_x_wt<Hd, D, kTile, kT>(X1, kLdD, Wu, B, kLdH);
      __syncthreads();
      for (int i = tid; i < kTile * Hd; i += kT) {
        const int j = (i / Hd) * kLdH + i % Hd;
        const float x = A[j];
        A[j] = x * sigmoidf(x) * B[j];
      }
      __syncthreads();
      tile_x_wt<D, Hd, kTile, kT>(A, kLdH, Wd, X2, kLdD);
      __syncthreads();
      for (int i = tid; i < nt * D; i += kT) {
        const int t = i / D, c = i % D;
        const float o = X2[t * kLdD + c] + (p.residual ? X1[t * kLdD + c] : 0.f);
        store_out(p.o, tok(first + t0 + t) * D + c, o, p.dtype);
      }
      __syncthreads();
    }
    fill = pb + seg;
    // A chunk made only of this call's tokens is used in place; others go through the buffer.
    const bool direct = pb == 0 && fill == C;
    if (!direct && seg > 0) {
      for (int64_t i = tid; i < seg * PW; i += kT) {
        const int64_t t = i / PW;
        const int c = static_cast<int>(i % PW);
        pend[(pb + t) * pstride + c] = pending_column(p.k, p.v, p.eta, p.mu, tok(first + t), c, D, p.dtype);
      }
    }
    __syncthreads();
    if (fill == C) chunk_update(ChunkSource{direct, first, pend, pstride});
    pos += seg;
    if (fill < C) break;
    fill = 0;
  }
  // Rows past the partial chunk are zero in the returned buffer (as on the CPU).
  for (int64_t i = tid; i < (C - fill) * PW; i += kT) {
    pend[(fill + i / PW) * pstride + i % PW] = 0.f;
  }
}

template <int D, int Hd>
void launch(const FwdParams& p, cudaStream_t stream) {
  using Tr = FwdTraits<D, Hd>;
  auto kernel = ttt_fwd_kernel<D, Hd>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes));
  const dim3 grid(static_cast<unsigned>(p.n_seqs * p.heads));
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void launch_ttt_fwd(const FwdParams& p, int d, int h, cudaStream_t stream) {
  if (d == 64 && h == 64) return launch<64, 64>(p, stream);
  if (d == 64 && h == 128) return launch<64, 128>(p, stream);
  if (d == 128 && h == 64) return launch<128, 64>(p, stream);
  if (d == 128 && h == 128) return launch<128, 128>(p, stream);
  TORCH_CHECK(false, "allmem: launch_ttt_fwd: unsupported d = ", d, ", h = ", h,
              " (the caller checks d, h in {64, 128})");
}

}  // namespace allmem::ttt::cuda
