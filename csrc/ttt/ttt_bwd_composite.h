// The TTT memory backward and forward as batched ATen math (ttt_bwd_composite.cpp): the
// hand-derived backward of ttt_chunk.h with the heads of a group of sequences in one batched
// matmul, on any device. On a GPU its matmuls are cuBLAS calls and its other steps single kernels
// (ttt_composite_kernels.cu); the backward is the default for the shapes the hand-written CUDA
// kernels serve slowly (d = h = 128 has no tensor-core backward; the SIMT one runs one CTA per
// head chain). Same arguments, checks and outputs as torch.ops.allmem.ttt_memory_bwd / _fwd.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace allmem::ttt {

using BwdOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                              at::Tensor, at::Tensor, at::Tensor>;
using FwdOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The forward the same way (same arguments, checks and outputs as torch.ops.allmem.ttt_memory_fwd,
// checkpoints included, so either backward runs from it): per completed chunk the update as
// batched matmuls and fused steps, then every chunk's read from the checkpoints in one pass per
// block of chunks. Selected by ALLMEM_TTT_FWD=composite (read at every call) on the CPU and CUDA
// ops; not a default anywhere yet.
FwdOutputs ttt_memory_fwd_composite(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& eta, const at::Tensor& mu, const at::Tensor& w_gate,
                                    const at::Tensor& w_up, const at::Tensor& w_down, const at::Tensor& fast,
                                    const at::Tensor& pending, const at::Tensor& pending_len,
                                    const std::optional<at::Tensor>& cu_seqlens, int64_t chunk_size, bool lact_order,
                                    bool residual);
bool composite_fwd_requested();

// The chunk update of decoding (SPEC.md "Decoding"), in place, for sequences whose chunk buffer is
// full: fast [B, H, 6, h*d] (W, M) and pending [B, C, H, 2d+4] (every row written) of the packed
// decode state. Where `complete` (bool [B], on the state's device) is true, or for every sequence
// if it is undefined, (W, M) becomes the update of the buffered chunk (normalize, gradient,
// momentum: the composite forward's batched matmuls, IEEE in the state's precision) and the buffer
// rows are zeroed (as a prefill leaves the buffer of a sequence whose chunk completed); elsewhere
// both are kept. The launches do not depend on the values (no host read): CUDA-graph capturable.
void decode_chunk_update_(at::Tensor& fast, at::Tensor& pending, const at::Tensor& complete, const at::Tensor& w_gate,
                          const at::Tensor& w_up, const at::Tensor& w_down, bool lact_order);

BwdOutputs ttt_memory_bwd_composite(const at::Tensor& grad_o, const std::optional<at::Tensor>& grad_fast,
                                    const std::optional<at::Tensor>& grad_pending, const at::Tensor& q,
                                    const at::Tensor& k, const at::Tensor& v, const at::Tensor& eta,
                                    const at::Tensor& mu, const at::Tensor& w_gate, const at::Tensor& w_up,
                                    const at::Tensor& w_down, const at::Tensor& pending,
                                    const at::Tensor& pending_len, const at::Tensor& checkpoints,
                                    const std::optional<at::Tensor>& cu_seqlens, int64_t chunk_size,
                                    bool lact_order, bool residual);

// ALLMEM_TTT_BWD (read at every call): "composite" selects it on any backend, "kernel" the
// hand-written backward of the backend; unset (or anything else) is kAuto: the CPU kernel on the
// CPU; on CUDA the tensor-core backward where it applies, else, for bfloat16/float16 inputs, this
// one (the SIMT kernel measured 6-20x slower, bench/results/gpu_2026-11-26e_h100), and the SIMT
// kernel for float32 inputs (exact float32 FMAs, independent of the TF32 setting).
enum class BwdChoice { kAuto, kComposite, kKernel };
BwdChoice bwd_choice();
inline bool composite_bwd_requested() { return bwd_choice() == BwdChoice::kComposite; }

}  // namespace allmem::ttt
