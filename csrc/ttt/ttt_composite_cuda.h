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
// w [batch, 3, h*d] with any batch stride (rows contiguous); g, out contiguous; dtarget with g only.
void composite_row_norm_cuda(const at::Tensor& w, const at::Tensor& target, const std::optional<at::Tensor>& g,
                             at::Tensor& out, const std::optional<at::Tensor>& dtarget, int64_t d, int64_t h);

}  // namespace allmem::ttt
