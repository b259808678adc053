// The composite forward's and backward's fused CUDA steps (ttt_composite_kernels.cu), for ttt_bwd_composite.cpp:
// no CUDA types cross here. Float32 CUDA tensors; shapes as in ttt_cuda.h's UpdateTermsParams,
// ReadTermsParams, RowNormParams (the caller allocates the outputs).
#pragma once
#include <ATen/ATen.h>

#include <optional>

namespace allmem::ttt {

void composite_update_terms_cuda(const at::Tensor& p1, const at::Tensor& p2, const at::Tensor& eta, at::Tensor& f1,
                                 at::Tensor& f2, at::Tensor& deta);
// ds and f undefined (the forward's read): s only.
void composite_read_terms_cuda(const at::Tensor& ab, const at::Tensor& ds, at::Tensor& f, at::Tensor& s);
void composite_grad_terms_cuda(const at::Tensor& ab, const at::Tensor& e, const at::Tensor& eta, at::Tensor& fgu,
                               at::Tensor& fd);
// w [batch, 3, h*d] with any batch stride (rows contiguous); g, g_add, out contiguous; dtarget with g only.
void composite_row_norm_cuda(const at::Tensor& w, const at::Tensor& target, const std::optional<at::Tensor>& g,
                             at::Tensor& out, const std::optional<at::Tensor>& dtarget, int64_t d, int64_t h,
                             const std::optional<at::Tensor>& g_add = std::nullopt);
// PrepParams: w as above; a, b, dsum [batch, 3, h*d], wk [batch, 4h, d], wv [batch, d, 2h] contiguous.
void composite_prep_cuda(const at::Tensor& w, const std::optional<at::Tensor>& target, const at::Tensor& a,
                         const at::Tensor& b, at::Tensor& wk, at::Tensor& wv, at::Tensor& dsum, int64_t d, int64_t h);
// MomentumParams: dsum, dm [batch, 3, h*d] contiguous; m with any batch stride (rows contiguous);
// mu [batch] float, live [batch] bool (optional), dmu_rows [batch, chunk] contiguous.
void composite_momentum_cuda(const at::Tensor& dsum, const at::Tensor& m, const at::Tensor& mu,
                             const std::optional<at::Tensor>& live, at::Tensor& dm, at::Tensor& dmu_rows);

}  // namespace allmem::ttt
