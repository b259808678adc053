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

// The tensor-core step of the composite backward (ttt_bwd_step_tc.cuh): one completed chunk's update
// backward for G chains. Whether it runs for inputs like q with these sizes: ALLMEM_TTT_COMPOSITE_STEP=tc
// (read at every call; opt-in until its GPU tests have passed), a CUDA q of bf16/fp16, d = h in
// {64, 128}, an sm_90 device.
bool composite_step_tc_applies(const at::Tensor& q, int64_t d, int64_t h);
// BwdStepParams (ttt_cuda.h) over tensors, chain-major: k, v [G, C, d] in q's 16-bit dtype; eta
// [G, C, 3], mu [G], targets [G, 3d], dw, dm, dw_read [G, 3, d*d], d_targets [G, 3d], dmu [G, C],
// deta_part [G, 8, C, 3] float32; w [G, 6, d*d] ((W, M) at the chunk start) and m_next [G, 3, d*d]
// (LaCT order: M after the update) with contiguous rows and w's batch stride; f1 [G, C, 4d], f2
// [G, C, 2d], wk [G, 4d, d], wv [G, d, 2d] in k's dtype. All contiguous but w and m_next.
void composite_step_tc_cuda(const at::Tensor& k, const at::Tensor& v, const at::Tensor& eta, const at::Tensor& mu,
                            const at::Tensor& w, const std::optional<at::Tensor>& m_next, const at::Tensor& targets,
                            at::Tensor& dw, at::Tensor& dm, const std::optional<at::Tensor>& dw_read,
                            at::Tensor& d_targets, at::Tensor& dmu, at::Tensor& f1, at::Tensor& f2, at::Tensor& wk,
                            at::Tensor& wv, at::Tensor& deta_part, bool lact_order);

}  // namespace allmem::ttt
