// C entry points of the SWA Hopper emulator (tests/test_swa_sm90_emu.py): builds the same
// FwdParams / BwdParams the torch glue (swa_api_cuda.cpp) builds for contiguous tensors and calls
// the real launchers of swa_fwd_sm90.cu, swa_bwd_dkdv_sm90.cu and swa_bwd_dq_sm90.cu, compiled
// with g++ against the stand-in swa/swa_sm90_ptx.cuh next to this file.
//
// Layouts: dense q/k/v/out [B, L, H, D] with lse/delta [B, Hq, L]; varlen (cu_seqlens != null)
// [T, H, D] with lse/delta [Hq, T]. Returns 1 when the launcher ran the Hopper kernel, 0 when it
// declined (the portable fallback would run), -1 on a bad argument.
#include <cmath>
#include <cstdint>
#include <vector>

#include "swa/swa_cuda.h"

using namespace allmem::swa::cuda;

namespace {

AttnShape make_shape(int B, int L, int hq, int hkv, int window, int sinks, float scale, const int* cu) {
  AttnShape s;
  s.cu_seqlens = cu;
  s.batch = B;
  s.seqlen = L;
  s.hq = hq;
  s.hkv = hkv;
  s.window = window;
  s.sinks = sinks;
  s.scale = scale;
  s.scale_log2 = scale * 1.4426950408889634f;
  return s;
}
TensorRef ref(void* p, int L, int H, int D, bool varlen) {
  TensorRef t;
  t.ptr = p;
  t.row_stride = int64_t{H} * D;
  t.head_stride = D;
  t.batch_stride = varlen ? 0 : int64_t{L} * H * D;
  return t;
}
RowStatRef stat(float* p, int L, int hq, int64_t total, bool varlen) {
  RowStatRef r;
  r.ptr = p;
  r.head_stride = varlen ? total : L;
  r.batch_stride = varlen ? 0 : int64_t{hq} * L;
  return r;
}

}  // namespace

extern "C" int emu_swa_fwd_sm90(int fp16, int D, int B, int L, int hq, int hkv, int window, int sinks, float scale,
                                const int* cu_seqlens, int64_t total_rows, void* q, void* k, void* v, void* out,
                                float* lse, int pingpong) {
  const bool varlen = cu_seqlens != nullptr;
  FwdParams p;
  p.shape = make_shape(B, L, hq, hkv, window, sinks, scale, cu_seqlens);
  p.q = ref(q, L, hq, D, varlen);
  p.k = ref(k, L, hkv, D, varlen);
  p.v = ref(v, L, hkv, D, varlen);
  p.out = ref(out, L, hq, D, varlen);
  p.lse = stat(lse, L, hq, total_rows, varlen);
  return launch_swa_fwd_sm90(p, total_rows, fp16 ? DType::kFloat16 : DType::kBFloat16, D, nullptr, pingpong != 0) ? 1
                                                                                                              : 0;
}

// dq_accum != null: the one-kernel backward (launch_swa_bwd_dkdvq_sm90) accumulating dQ / scale
// there (zeroed by the caller, float32, q's layout); dq is then left alone.
// num_sms > 0: the sink walks split as swa_api_cuda.cpp plans them for a GPU with that many SMs
// (swa_bwd_sm90_sink_plan), with the workspace allocated here; 0: no split.
extern "C" int emu_swa_bwd_sm90(int fp16, int D, int B, int L, int hq, int hkv, int window, int sinks, float scale,
                                const int* cu_seqlens, int64_t total_rows, void* q, void* k, void* v, void* dout,
                                float* lse, float* delta, void* dq, void* dk, void* dv, float* dq_accum,
                                int num_sms) {
  const bool varlen = cu_seqlens != nullptr;
  BwdParams p;
  p.shape = make_shape(B, L, hq, hkv, window, sinks, scale, cu_seqlens);
  p.q = ref(q, L, hq, D, varlen);
  p.k = ref(k, L, hkv, D, varlen);
  p.v = ref(v, L, hkv, D, varlen);
  p.dout = ref(dout, L, hq, D, varlen);
  p.dq = ref(dq, L, hq, D, varlen);
  p.dk = ref(dk, L, hkv, D, varlen);
  p.dv = ref(dv, L, hkv, D, varlen);
  p.lse = stat(lse, L, hq, total_rows, varlen);
  p.delta = stat(delta, L, hq, total_rows, varlen);
  const DType dt = fp16 ? DType::kFloat16 : DType::kBFloat16;
  std::vector<float> partial;
  std::vector<int> counter;
  if (num_sms > 0) {
    const SinkPlan plan = swa_bwd_sm90_sink_plan(p.shape, D, num_sms);
    if (plan.parts > 1) {
      partial.assign(plan.workspace_floats, std::nanf(""));
      counter.assign(static_cast<size_t>(B) * hkv * plan.blocks, 0);
      p.sink_parts = plan.parts;
      p.sink_blocks = plan.blocks;
      p.sink_partial = partial.data();
      p.sink_counter = counter.data();
    }
  }
  if (dq_accum != nullptr) {
    p.dq_accum = ref(dq_accum, L, hq, D, varlen);
    const bool ran = launch_swa_bwd_dkdvq_sm90(p, total_rows, dt, D, nullptr);
    for (int c : counter) {
      if (c != 0) return -2;
    }
    return ran ? 1 : 0;
  }
  const bool a = launch_swa_bwd_dkdv_sm90(p, total_rows, dt, D, nullptr);
  const bool b = launch_swa_bwd_dq_sm90(p, total_rows, dt, D, nullptr);
  for (int c : counter) {
    if (c != 0) return -2;  // the last part of every split walk resets its counter
  }
  return a && b ? 1 : (a || b ? -1 : 0);
}
