// The CUDA basics csrc/ttt/ttt_fwd_tc.cuh and ttt_bwd_tc.cuh use, on the CPU (see tc/ttt/ttt_tc_ops.cuh).
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
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) float2 { float x, y; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
struct __nv_bfloat16 { uint16_t b; };
struct __half { uint16_t b; };

namespace emu {
constexpr int kMaxCtas = 32, kWarpsPerCta = 8;  // the most a kernel launches (per job)
struct WarpEx {
  const void* ptr[32];
  uint32_t reg[32][6];
  float f[32];
};
struct Cluster {
  std::barrier<>* cluster_bar;
  std::barrier<>* cta_bar[kMaxCtas];
  std::barrier<>* warp_bar[kMaxCtas * kWarpsPerCta];
  WarpEx ex[kMaxCtas * kWarpsPerCta];
  unsigned char* smem[kMaxCtas];
};
struct Ctx {
  Cluster* cl = nullptr;
  int cta = 0;
  std::barrier<>* cluster_bar = nullptr;
  unsigned char* const* smem = nullptr;
};
inline thread_local Ctx g_ctx;
inline Ctx& ctx() { return g_ctx; }
inline int lane() { return threadIdx.x % 32; }
inline int warp_slot() { return g_ctx.cta * kWarpsPerCta + threadIdx.x / 32; }
inline WarpEx& warp_ex() { return g_ctx.cl->ex[warp_slot()]; }
inline void warp_sync() { g_ctx.cl->warp_bar[warp_slot()]->arrive_and_wait(); }

inline float to_float(__nv_bfloat16 h) { uint32_t u = uint32_t(h.b) << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline float to_float(__half h) { _Float16 x; std::memcpy(&x, &h.b, 2); return float(x); }
template <typename T> T from_float(float f);
template <> inline __nv_bfloat16 from_float<__nv_bfloat16>(float f) {
  uint32_t u; std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {uint16_t((u >> 16) | 0x40)};  // NaN stays NaN
  u += 0x7fff + ((u >> 16) & 1);
  return {uint16_t(u >> 16)};
}
template <> inline __half from_float<__half>(float f) { _Float16 x = (_Float16)f; __half h; std::memcpy(&h.b, &x, 2); return h; }
}  // namespace emu

inline void __syncthreads() { emu::g_ctx.cl->cta_bar[emu::g_ctx.cta]->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp_sync(); }
inline float __shfl_xor_sync(unsigned, float x, int off) {
  auto& w = emu::warp_ex();
  w.f[emu::lane()] = x;
  emu::warp_sync();
  const float r = w.f[emu::lane() ^ off];
  emu::warp_sync();
  return r;
}
