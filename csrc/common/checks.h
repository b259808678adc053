// Argument checks shared by every op: each message names the argument, what was expected, and
// what was given, so a user calling torch.ops.allmem.* directly learns what to fix.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>

namespace allmem {

// Accumulation / state dtype: float64 stays float64; float32, float16 and bfloat16 compute in float32.
inline at::ScalarType accumulate_dtype(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

inline std::string shape_str(const at::Tensor& t) { return c10::str(t.sizes()); }

#define ALLMEM_CHECK(cond, ...) TORCH_CHECK(cond, "allmem: ", __VA_ARGS__)

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
