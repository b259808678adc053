// CPU stand-in for the CUDA runtime types and built-ins the SWA Hopper kernels use
// (tests/swa_sm90_emu: see swa/swa_sm90_ptx.cuh there).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __restrict__

typedef void* cudaStream_t;
struct uint3 { unsigned x = 0, y = 0, z = 0; };
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3() = default;
  dim3(unsigned a, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct int2 { int x, y; };
inline int2 make_int2(int x, int y) { return {x, y}; }
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline thread_local uint3 threadIdx, blockIdx;
inline thread_local dim3 gridDim, blockDim;
using std::max;
using std::min;
