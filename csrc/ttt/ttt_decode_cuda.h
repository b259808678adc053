// The fused CUDA decode step (ttt_decode_kernel.cu), for ttt_decode.cpp: no CUDA types cross here.
#pragma once
#include <ATen/ATen.h>

namespace allmem::ttt {

// o [B, 1, H, d] of a step, with the token written into each sequence's buffer row pending_len;
// a sequence whose length is outside [0, row_limit) gets NaN outputs and nothing written.
// Arguments already checked by ttt_decode.cpp.
at::Tensor ttt_decode_step_kernel_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& eta, const at::Tensor& mu, const at::Tensor& fast,
                                       at::Tensor& pending, const at::Tensor& pending_len, int64_t chunk_size,
                                       int64_t h, bool residual, int64_t row_limit);
// Then (after the chunk update, where one runs): pending_len = (pending_len + 1) % chunk_size where
// it is in [0, row_limit), in one launch.
void ttt_decode_advance_cuda(at::Tensor& pending_len, int64_t chunk_size, int64_t row_limit);
// Whether the current CUDA stream of `t`'s device is capturing a graph.
bool cuda_stream_capturing(const at::Tensor& t);

}  // namespace allmem::ttt
