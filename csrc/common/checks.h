// Argument checks shared by every op: each message names the argument, what was expected, and
// what was given, so a user calling torch.ops.allmem.* directly learns what to fix.
#pragma once
#include <ATen/Context.h>
#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Exception.h>

#include <cstdio>
#include <optional>
#include <string>
#include <type_traits>

namespace allmem {

// Accumulation / state dtype: float64 stays float64; float32, float16 and bfloat16 compute in float32.
inline at::ScalarType accumulate_dtype(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

// Error messages format numbers themselves (std::to_string, snprintf) instead of through iostreams:
// on the H200 machine's torch 2.11 toolchain, any extension that streamed an integer into a
// TORCH_CHECK message crashed the process (bench/results/gpu_2026-11-26_h200/README.md). Other
// values (dtypes, devices, strings) still go through c10::str, which was seen to work there.
namespace detail {

inline std::string int_list(c10::ArrayRef<int64_t> xs) {
  std::string s = "[";
  for (size_t i = 0; i < xs.size(); ++i) s += (i ? ", " : "") + std::to_string(xs[i]);
  return s + "]";
}

template <typename T>
std::string piece(const T& x) {
  if constexpr (std::is_convertible_v<const T&, const char*> || std::is_same_v<T, std::string>) {
    return std::string(x);
  } else if constexpr (std::is_same_v<T, bool>) {
    return x ? "1" : "0";
  } else if constexpr (std::is_integral_v<T>) {
    return std::to_string(x);
  } else if constexpr (std::is_floating_point_v<T>) {
    char buf[32];
    std::snprintf(buf, sizeof(buf), "%g", static_cast<double>(x));
    return buf;
  } else if constexpr (std::is_convertible_v<const T&, c10::ArrayRef<int64_t>>) {
    return int_list(x);
  } else {
    return c10::str(x);
  }
}

template <typename... Args>
std::string message(const Args&... args) {
  std::string s;
  ((s += piece(args)), ...);
  return s;
}

}  // namespace detail

inline std::string shape_str(c10::ArrayRef<int64_t> sizes) { return detail::int_list(sizes); }
inline std::string shape_str(const at::Tensor& t) { return detail::int_list(t.sizes()); }

// At the top of an op whose kernel computes with ATen ops (matmuls): torch.autocast has no kernel
// for the allmem ops, so its dispatch keys stay active inside them and would run those matmuls in
// 16 bits; the ops define their own precision (float32 state and accumulation).
#define ALLMEM_NO_AUTOCAST() \
  const c10::impl::ExcludeDispatchKeyGuard allmem_no_autocast_guard_(c10::autocast_dispatch_keyset)

// The ops' float32 ATen matmuls (the composite TTT passes, the decode step's read) are IEEE float32
// products whatever torch.backends.cuda.matmul.allow_tf32 / set_float32_matmul_precision say, as
// in the hand-written kernels (at::NoTF32Guard: thread-local, honoured by the cuBLAS path). Without
// it a user's TF32 setting silently rounded their operands to 10 mantissa bits.
#define ALLMEM_NO_TF32() const at::NoTF32Guard allmem_no_tf32_guard_

#define ALLMEM_CHECK(cond, ...) TORCH_CHECK(cond, ::allmem::detail::message("allmem: ", __VA_ARGS__))

inline void check_floating(const at::Tensor& t, const char* name) {
  const auto st = t.scalar_type();
  ALLMEM_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, name,
               " must be float32, float64, float16 or bfloat16, got ", st);
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name, const char* layout) {
  ALLMEM_CHECK(t.dim() == dim, name, " must be ", dim, "-D ", layout, ", got shape ", shape_str(t));
}

inline void check_same_device(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn) {
  ALLMEM_CHECK(a.device() == b.device(), an, " and ", bn, " must be on the same device, got ", a.device(),
               " and ", b.device());
}

inline void check_same_dtype(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn) {
  ALLMEM_CHECK(a.scalar_type() == b.scalar_type(), an, " and ", bn, " must have the same dtype, got ",
               a.scalar_type(), " and ", b.scalar_type());
}

// Validates cu_seqlens (int32 [N+1], starts at 0, non-decreasing, ends at total) and returns N.
// Reads the values, so on CUDA it synchronizes: callers on hot paths validate once up front.
inline int64_t check_cu_seqlens(const at::Tensor& cu, int64_t total, const char* total_name) {
  ALLMEM_CHECK(cu.scalar_type() == at::kInt, "cu_seqlens must be int32, got ", cu.scalar_type());
  ALLMEM_CHECK(cu.dim() == 1 && cu.size(0) >= 2, "cu_seqlens must be 1-D [N+1] with N >= 1, got shape ",
               shape_str(cu));
  auto c = cu.to(at::kCPU).contiguous();
  const int32_t* p = c.data_ptr<int32_t>();
  const int64_t n = c.size(0) - 1;
  ALLMEM_CHECK(p[0] == 0, "cu_seqlens[0] must be 0, got ", p[0]);
  for (int64_t i = 0; i < n; ++i) {
    ALLMEM_CHECK(p[i + 1] >= p[i], "cu_seqlens must be non-decreasing, got cu_seqlens[", i, "] = ", p[i],
                 " > cu_seqlens[", i + 1, "] = ", p[i + 1]);
  }
  ALLMEM_CHECK(p[n] == total, "cu_seqlens[-1] must equal ", total_name, " = ", total, ", got ", p[n]);
  return n;
}

}  // namespace allmem
