// SWA decode against the S + W slot cache, split-KV so that one query token per sequence still
// fills the GPU:
//   1. split kernel: CTA (token, kv head, split) scores its share of the token's visible keys for
//      every query head of the GQA group (so K/V are read once per group), and writes a partial
//      output normalized by its own sum plus its log2-sum-exp;
//   2. combine kernel: merges the splits of each (token, head) by their LSE weights;
//   3. cache kernel: writes the new tokens into their slots.
// Token t of sequence b sits at position p = cache_seqlens[b] + t and sees positions
// [0, min(S, p + 1)) and [max(S, p - W + 1), p]. Each such position j is either one of this call's
// new tokens (j >= cache_seqlens[b]: read from k_new/v_new) or still in the cache as the call found
// it, so reading the old cache and writing the new tokens last equals the token-by-token order.
#include "swa/swa_kernel_utils.cuh"

namespace allmem::swa::cuda {
namespace {

constexpr int kDecodeWarps = DecodeTraits::kThreads / kWarpSize;
constexpr int kHeadsPerPass = 4;  // query heads accumulated together in the P V pass

template <int D>
struct DecodeLayout {
  // P V: each thread owns a column pair; kRowGroups threads share each column, over keys.
  static constexpr int kColPairs = D / 2;
  static constexpr int kRowGroups = DecodeTraits::kThreads / kColPairs;
  static_assert(DecodeTraits::kThreads % kColPairs == 0, "threads must tile the column pairs");
};

// The visible positions of one decode token, numbered 0..count-1: sinks first, then the window.
struct DecodeBand {
  long long cached, n_sink, win_lo, count;
  __device__ DecodeBand(long long cached_, long long pos, int window, int sinks) : cached(cached_) {
    n_sink = min(static_cast<long long>(sinks), pos + 1);
    win_lo = max(static_cast<long long>(sinks), pos - window + 1);
    count = n_sink + max(0LL, pos - win_lo + 1);
  }
  __device__ long long position(long long v) const { return v < n_sink ? v : win_lo + (v - n_sink); }
};

__device__ __forceinline__ long long slot_of(long long pos, int window, int sinks) {
  return pos < sinks ? pos : sinks + (pos - sinks) % window;
}

// Row of position j for KV head hk: a new token of this call, or the cache slot holding it.
template <typename T>
__device__ __forceinline__ const T* kv_row(const TensorRef& fresh, const TensorRef& cache, const DecodeParams& p,
                                           int b, int hk, long long j, long long cached) {
  if (j >= cached) return head_ptr<const T>(fresh, b, j - cached, hk);
  return head_ptr<const T>(cache, b, slot_of(j, p.window, p.sinks), hk);
}

template <typename T, int D>
__global__ void __launch_bounds__(DecodeTraits::kThreads) swa_decode_split_kernel(const DecodeParams p) {
  using L = DecodeLayout<D>;
  const int group = p.hq / p.hkv;
  extern __shared__ __align__(16) float smem_f[];
  float* sQ = smem_f;                        // [group][D]
  float* sP = sQ + group * D;                // [group][split_keys]: scores, then probabilities
  float* sRed = sP + group * p.split_keys;   // [kRowGroups][group][D]
  float* sMax = sRed + L::kRowGroups * group * D;  // [group], log2 domain
  float* sSum = sMax + group;                // [group]

  const int bt = blockIdx.x, hk = blockIdx.y, split = blockIdx.z;
  const int b = bt / p.new_len, t = bt % p.new_len;
  const int tid = threadIdx.x, warp = tid / kWarpSize, lane = tid % kWarpSize;
  const long long cached = p.cache_seqlens[b];
  if (cached < 0) return;  // unchecked negative length (ALLMEM_SWA_DECODE_CHECK=0): the combine writes NaN
  const DecodeBand band(cached, cached + t, p.window, p.sinks);
  const long long v_lo = static_cast<long long>(split) * p.split_keys;
  const int n = static_cast<int>(max(0LL, min(band.count - v_lo, static_cast<long long>(p.split_keys))));
  const int64_t row0 = static_cast<int64_t>(bt) * p.hq + hk * group;  // (token, first head of group)

  if (n == 0) {  // this split lies past the token's band: weight zero in the combine
    for (int idx = tid; idx < group * D; idx += DecodeTraits::kThreads) {
      const int h = idx / D, d = idx % D;
      p.o_partial[((row0 + h) * p.num_splits + split) * D + d] = 0.f;
      if (d == 0) p.lse_partial[(row0 + h) * p.num_splits + split] = -INFINITY;
    }
    return;
  }

  for (int idx = tid; idx < group * D; idx += DecodeTraits::kThreads) {
    const int h = idx / D, d = idx % D;
    sQ[idx] = ElemTraits<T>::to_float(head_ptr<const T>(p.q, b, t, hk * group + h)[d]);
  }
  __syncthreads();

  // Scores: a thread per key, its row held in registers while it is dotted with every head.
  constexpr int kVecs = D / kChunkElems;
  for (int kl = tid; kl < n; kl += DecodeTraits::kThreads) {
    const T* kr = kv_row<T>(p.k_new, p.k_cache, p, b, hk, band.position(v_lo + kl), cached);
    uint4 kv[kVecs];
#pragma unroll
    for (int c = 0; c < kVecs; ++c) kv[c] = reinterpret_cast<const uint4*>(kr)[c];
    for (int h = 0; h < group; ++h) {
      const float* q = sQ + h * D;
      float acc = 0.f;
#pragma unroll
      for (int c = 0; c < kVecs; ++c) {
        const uint32_t w[4] = {kv[c].x, kv[c].y, kv[c].z, kv[c].w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float2 kf = ElemTraits<T>::unpack(w[e]);
          acc += kf.x * q[c * kChunkElems + 2 * e] + kf.y * q[c * kChunkElems + 2 * e + 1];
        }
      }
      sP[h * p.split_keys + kl] = acc * p.scale_log2;
    }
  }
  __syncthreads();

  for (int h = warp; h < group; h += kDecodeWarps) {
    float* s = sP + h * p.split_keys;
    float mx = -INFINITY;
    for (int kl = lane; kl < n; kl += kWarpSize) mx = fmaxf(mx, s[kl]);
#pragma unroll
    for (int off = kWarpSize / 2; off > 0; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    float sum = 0.f;
    for (int kl = lane; kl < n; kl += kWarpSize) {
      const float e = exp2f(s[kl] - mx);
      s[kl] = e;
      sum += e;
    }
#pragma unroll
    for (int off = kWarpSize / 2; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (lane == 0) {
      sMax[h] = mx;
      sSum[h] = sum;
    }
  }
  __syncthreads();

  // P V: thread (rg, cp) sums column pair cp over keys rg, rg + kRowGroups, ...
  const int cp = tid % L::kColPairs, rg = tid / L::kColPairs;
  for (int h0 = 0; h0 < group; h0 += kHeadsPerPass) {
    float acc[kHeadsPerPass][2] = {};
    for (int kl = rg; kl < n; kl += L::kRowGroups) {
      const T* vr = kv_row<T>(p.v_new, p.v_cache, p, b, hk, band.position(v_lo + kl), cached);
      const float2 vf = ElemTraits<T>::unpack(reinterpret_cast<const uint32_t*>(vr)[cp]);
#pragma unroll
      for (int hh = 0; hh < kHeadsPerPass; ++hh) {
        if (h0 + hh < group) {
          const float w = sP[(h0 + hh) * p.split_keys + kl];
          acc[hh][0] += w * vf.x;
          acc[hh][1] += w * vf.y;
        }
      }
    }
#pragma unroll
    for (int hh = 0; hh < kHeadsPerPass; ++hh) {
      if (h0 + hh < group) {
        float* r = sRed + (rg * group + h0 + hh) * D + 2 * cp;
        r[0] = acc[hh][0];
        r[1] = acc[hh][1];
      }
    }
  }
  __syncthreads();

  for (int idx = tid; idx < group * D; idx += DecodeTraits::kThreads) {
    const int h = idx / D, d = idx % D;
    float o = 0.f;
#pragma unroll
    for (int r = 0; r < L::kRowGroups; ++r) o += sRed[(r * group + h) * D + d];
    p.o_partial[((row0 + h) * p.num_splits + split) * D + d] = o / sSum[h];
    if (d == 0) p.lse_partial[(row0 + h) * p.num_splits + split] = sMax[h] + log2f(sSum[h]);
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(DecodeTraits::kThreads) swa_decode_combine_kernel(const DecodeParams p) {
  const int64_t row = blockIdx.x;  // (token, head)
  const int bt = static_cast<int>(row / p.hq), h = static_cast<int>(row % p.hq);
  const int b = bt / p.new_len, t = bt % p.new_len;
  T* out = head_ptr<T>(p.out, b, t, h);
  if (p.cache_seqlens[b] < 0) {  // unchecked negative length: no partials were written
    for (int d = threadIdx.x; d < D; d += blockDim.x) out[d] = ElemTraits<T>::from_float(NAN);
    return;
  }
  const float* lse = p.lse_partial + row * p.num_splits;
  float mx = -INFINITY;
  for (int s = 0; s < p.num_splits; ++s) mx = fmaxf(mx, lse[s]);
  float total = 0.f;
  for (int s = 0; s < p.num_splits; ++s) total += exp2f(lse[s] - mx);
  const float inv = 1.f / total;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float o = 0.f;
    for (int s = 0; s < p.num_splits; ++s) {
      const float w = exp2f(lse[s] - mx);  // 0 for empty splits (lse = -inf)
      if (w > 0.f) o += w * p.o_partial[(row * p.num_splits + s) * D + d];
    }
    out[d] = ElemTraits<T>::from_float(o * inv);
  }
}

// One thread per 16-byte chunk of the new token's K (first half of the threads) or V row. When a
// call brings more than W tokens, a ring slot is written only by the last token that maps to it.
template <typename T, int D>
__global__ void swa_decode_write_cache_kernel(const DecodeParams p) {
  constexpr int kVecs = D / kChunkElems;
  const int bt = blockIdx.x, hk = blockIdx.y;
  const int b = bt / p.new_len, t = bt % p.new_len;
  if (p.cache_seqlens[b] < 0) return;  // unchecked negative length: the cache stays as it was
  const long long pos = static_cast<long long>(p.cache_seqlens[b]) + t;
  const bool last_writer = pos < p.sinks || t + static_cast<long long>(p.window) >= p.new_len;
  if (!last_writer) return;
  const long long slot = slot_of(pos, p.window, p.sinks);
  const bool is_v = threadIdx.x >= kVecs;
  const int c = threadIdx.x % kVecs;
  const TensorRef& src = is_v ? p.v_new : p.k_new;
  const TensorRef& dst = is_v ? p.v_cache : p.k_cache;
  reinterpret_cast<uint4*>(head_ptr<T>(dst, b, slot, hk))[c] =
      reinterpret_cast<const uint4*>(head_ptr<const T>(src, b, t, hk))[c];
}

template <typename T, int D>
void run_decode(const DecodeParams& p, cudaStream_t stream) {
  const size_t smem = decode_smem_bytes(p.hq / p.hkv, D, p.split_keys);
  auto split_kernel = swa_decode_split_kernel<T, D>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(split_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  const int tokens = p.batch * p.new_len;
  split_kernel<<<dim3(tokens, p.hkv, p.num_splits), DecodeTraits::kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  swa_decode_combine_kernel<T, D><<<static_cast<unsigned>(tokens) * p.hq, DecodeTraits::kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  swa_decode_write_cache_kernel<T, D><<<dim3(tokens, p.hkv), 2 * (D / kChunkElems), 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

size_t decode_smem_bytes(int group, int head_dim, int split_keys) {
  const int row_groups = DecodeTraits::kThreads / (head_dim / 2);
  return sizeof(float) * (static_cast<size_t>(group) * head_dim + static_cast<size_t>(group) * split_keys +
                          static_cast<size_t>(row_groups) * group * head_dim + 2 * group);
}

void launch_swa_decode(const DecodeParams& p, DType dtype, int head_dim, cudaStream_t stream) {
  if (p.batch == 0 || p.new_len == 0) return;
  dispatch_dtype_headdim(dtype, head_dim, [&]<typename T, int D>() { run_decode<T, D>(p, stream); });
}

}  // namespace allmem::swa::cuda
