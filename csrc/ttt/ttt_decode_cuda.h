// The fused CUDA decode step (ttt_decode_kernel.cu), for ttt_decode.cpp: no CUDA types cross here.
#pragma once
#include <ATen/ATen.h>

namespace allmem::ttt {

// o [B, 1, H, d] of a step that completes no chunk, with the token written into each sequence's
// buffer row pending_len (not advanced here). Arguments already checked by ttt_decode.cpp.
at::Tensor ttt_decode_step_kernel_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& eta, const at::Tensor& mu, const at::Tensor& fast,
                                       at::Tensor& pending, const at::Tensor& pending_len, int64_t chunk_size,
                                       int64_t h, bool residual);

}  // namespace allmem::ttt
