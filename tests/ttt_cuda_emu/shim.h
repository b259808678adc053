// CPU emulation of the few CUDA features the TTT forward kernel (csrc/ttt/ttt_fwd.cu) uses, so its
// logic runs without a GPU: one block at a time as 256 std::threads, std::barrier for
// __syncthreads and for warp shuffles, software bf16/fp16 conversions. Used by
// tests/test_ttt_cuda_emu.py only; it says nothing about the GPU memory model or speed.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__
struct U3 { unsigned x = 0, y = 0, z = 0; };
inline thread_local U3 threadIdx, blockIdx;
struct alignas(16) float4 { float x, y, z, w; };
inline std::barrier<>* g_bar = nullptr;
inline std::barrier<>* g_warp_bar[8];
inline float g_shfl[8][32];
inline float4* g_smem = nullptr;
inline void __syncthreads() { g_bar->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float x, int off) {
  int w = threadIdx.x / 32, l = threadIdx.x % 32;
  g_shfl[w][l] = x;
  g_warp_bar[w]->arrive_and_wait();
  float r = g_shfl[w][l ^ off];
  g_warp_bar[w]->arrive_and_wait();
  return r;
}
inline float __expf(float x) { return std::exp(x); }
struct __nv_bfloat16 { uint16_t b; };
struct __half { uint16_t b; };
inline float __bfloat162float(__nv_bfloat16 h) { uint32_t u = uint32_t(h.b) << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { uint32_t u; std::memcpy(&u, &f, 4); u += 0x7fff + ((u >> 16) & 1); return {uint16_t(u >> 16)}; }
inline float __half2float(__half h) { _Float16 x; std::memcpy(&x, &h.b, 2); return float(x); }
inline __half __float2half_rn(float f) { _Float16 x = (_Float16)f; __half h; std::memcpy(&h.b, &x, 2); return h; }
