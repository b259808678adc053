// Tile sizes and shared-memory layouts of the TTT CUDA kernels (ttt_fwd.cu, ttt_bwd.cu).
//
// First version (correct before fast): one CTA of 256 threads per (sequence, head) walks its
// chunks in order (the backward in reverse) with SIMT float32 FMA. The fast weights and momenta
// of the head live in its slot of fast_out (backward: d_fast) in global memory (L2-resident:
// 6 * h * d * 4 bytes = 96 KB for d = h = 64, 384 KB for 128, which would not fit in shared memory
// next to the tiles); shared memory holds the token tiles and the [tile, h] intermediates.
// Tensor-core (mma.sync, bf16 operands, fp32 accumulation) tiles and a split of each chunk's
// tokens over a cluster are the next step.
#pragma once
#include <cstdint>

namespace allmem::ttt::cuda {

template <int D, int Hd>
struct FwdTraits {
  static_assert((D == 64 || D == 128) && (Hd == 64 || Hd == 128), "d and h must be 64 or 128");
  static constexpr int kThreads = 256;
  static constexpr int kWarps = kThreads / 32;
  static constexpr int kTile = 32;  // tokens per tile (reads and chunk-gradient passes)
  // Rows padded by 4 floats: keeps float4 alignment of every row.
  static constexpr int kLdD = D + 4;
  static constexpr int kLdH = Hd + 4;
  static constexpr int64_t kMat = int64_t{D} * Hd;  // elements of one fast-weight matrix
  static constexpr int kPendWidth = 2 * D + 4;      // k | v | eta (3) | mu
  // Shared memory, in floats: X1, X2 [kTile, kLdD]; A, B, E [kTile, kLdH]; eta [kTile, 4];
  // norm targets [2h + d]; reduction scratch [32].
  static constexpr int kOffX1 = 0;
  static constexpr int kOffX2 = kOffX1 + kTile * kLdD;
  static constexpr int kOffA = kOffX2 + kTile * kLdD;
  static constexpr int kOffB = kOffA + kTile * kLdH;
  static constexpr int kOffE = kOffB + kTile * kLdH;
  static constexpr int kOffEta = kOffE + kTile * kLdH;
  static constexpr int kOffTarget = kOffEta + kTile * 4;
  static constexpr int kOffRed = kOffTarget + 2 * Hd + D;
  static constexpr int kSmemFloats = kOffRed + 32;
  static constexpr int kSmemBytes = kSmemFloats * 4;
  static_assert(kSmemBytes <= 160 * 1024, "must fit the opt-in shared memory of sm_80");
  static_assert(kOffX2 % 4 == 0 && kOffA % 4 == 0 && kOffB % 4 == 0 && kOffE % 4 == 0, "float4 rows");
};

// The backward keeps more [tile, h] intermediates (a, b, e and the three projections of the
// momentum gradient) and two output tiles, so its tiles are half as tall.
template <int D, int Hd>
struct BwdTraits {
  static_assert((D == 64 || D == 128) && (Hd == 64 || Hd == 128), "d and h must be 64 or 128");
  static constexpr int kThreads = 256;
  static constexpr int kWarps = kThreads / 32;
  static constexpr int kTile = 16;
  static constexpr int kLdD = D + 4;
  static constexpr int kLdH = Hd + 4;
  static constexpr int64_t kMat = int64_t{D} * Hd;
  static constexpr int kPendWidth = 2 * D + 4;
  // X1..X4 [kTile, kLdD]; A, B, E, PS, PU, PG [kTile, kLdH]; eta [kTile, 4]; targets and their
  // gradient [2h + d] each; reduction scratch [32].
  static constexpr int kOffX = 0;
  static constexpr int kOffH = kOffX + 4 * kTile * kLdD;
  static constexpr int kOffEta = kOffH + 6 * kTile * kLdH;
  static constexpr int kOffTarget = kOffEta + kTile * 4;
  static constexpr int kOffDTarget = kOffTarget + 2 * Hd + D;
  static constexpr int kOffRed = kOffDTarget + 2 * Hd + D;
  static constexpr int kSmemFloats = kOffRed + 32;
  static constexpr int kSmemBytes = kSmemFloats * 4;
  static_assert(kSmemBytes <= 160 * 1024, "must fit the opt-in shared memory of sm_80");
};

}  // namespace allmem::ttt::cuda
