// Tile kernels of the CPU sliding-window attention (forward and backward), on raw pointers.
//
// Deliberately WITHOUT an include guard: swa_cpu.cpp includes this file once per instruction
// set, each time inside its own namespace (and, for AVX2/AVX-512, under `#pragma GCC target`),
// so the same source gives a portable build and runtime-selected SIMD builds. It must therefore
// include nothing itself; the includer provides <algorithm>, <cmath>, <cstdint>, <limits>,
// <vector> and swa/swa_cpu_types.h (tiles, argument structs), and defines ALLMEM_SWA_VEC_BYTES,
// the SIMD register width of the target (16 for SSE2/NEON, 32 for AVX2, 64 for AVX-512).
// Under GCC the includer compiles it with -fno-trapping-math and -ffp-contract=fast (optimize
// pragma): with FP exceptions assumed observable, GCC refuses to if-convert the float compares of
// exp/max below and leaves those loops scalar; contraction turns a * b + c into FMA where the
// target has it (ISO C++ mode otherwise forbids it). A function compiled with other options is
// not inlined into these, hence builtins and local helpers instead of std:: calls in hot loops.
//
// T is the compute type (float or double); reduced-precision inputs are widened by the caller.
// A "slice" is one (sequence, head): row r of q/k/v/out lives at ptr + r * stride, its D values
// contiguous.

// C[m][n] (+)= sum_k A(m, k) * B[k][n] for m < MB, n < NB, with A(m, k) = A[m * a_rs + k * a_cs].
// Written with GCC/Clang vector types: C's MB x NB block lives in registers and each step is a
// broadcast of A(m, k) times a row of B. (Left to the auto-vectorizer, GCC vectorizes the k loop
// instead, with shuffles, at a tenth of the speed.)
template <typename T, int64_t MB, int64_t NB>
inline void micro_gemm(int64_t K, const T* A, int64_t a_rs, int64_t a_cs, const T* B, int64_t ldb, T* C,
                       int64_t ldc, bool accumulate) {
  typedef T V __attribute__((vector_size(ALLMEM_SWA_VEC_BYTES)));
  constexpr int64_t kLen = ALLMEM_SWA_VEC_BYTES / sizeof(T);
  constexpr int64_t kVecs = NB / kLen;
  static_assert(NB % kLen == 0, "micro-kernel width must be whole vectors");
  V c[MB][kVecs];
  for (int64_t m = 0; m < MB; ++m)
    for (int64_t j = 0; j < kVecs; ++j) {
      if (accumulate)
        __builtin_memcpy(&c[m][j], C + m * ldc + j * kLen, sizeof(V));
      else
        c[m][j] = V{};
    }
  for (int64_t k = 0; k < K; ++k) {
    V b[kVecs];
    for (int64_t j = 0; j < kVecs; ++j) __builtin_memcpy(&b[j], B + k * ldb + j * kLen, sizeof(V));
    for (int64_t m = 0; m < MB; ++m) {
      const T a = A[m * a_rs + k * a_cs];
      for (int64_t j = 0; j < kVecs; ++j) c[m][j] += a * b[j];
    }
  }
  for (int64_t m = 0; m < MB; ++m)
    for (int64_t j = 0; j < kVecs; ++j) __builtin_memcpy(C + m * ldc + j * kLen, &c[m][j], sizeof(V));
}

// Edge version of micro_gemm for the last rows/columns (runtime sizes, same arithmetic).
template <typename T>
inline void edge_gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t a_rs, int64_t a_cs, const T* B,
                      int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  for (int64_t m = 0; m < M; ++m) {
    T* c = C + m * ldc;
    if (!accumulate)
      for (int64_t n = 0; n < N; ++n) c[n] = T(0);
    for (int64_t k = 0; k < K; ++k) {
      const T a = A[m * a_rs + k * a_cs];
      const T* b = B + k * ldb;
      for (int64_t n = 0; n < N; ++n) c[n] += a * b[n];
    }
  }
}

// C[M][N] (+)= A(M x K) * B[K][N] (see micro_gemm for the operand layout).
template <typename T>
void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t a_rs, int64_t a_cs, const T* B, int64_t ldb,
          T* C, int64_t ldc, bool accumulate) {
  constexpr int64_t MB = micro_rows(ALLMEM_SWA_VEC_BYTES);
  constexpr int64_t NB = kMicroVecsPerRow * ALLMEM_SWA_VEC_BYTES / static_cast<int64_t>(sizeof(T));
  const int64_t m_main = M - M % MB, n_main = N - N % NB;
  for (int64_t m = 0; m < m_main; m += MB) {
    for (int64_t n = 0; n < n_main; n += NB)
      micro_gemm<T, MB, NB>(K, A + m * a_rs, a_rs, a_cs, B + n, ldb, C + m * ldc + n, ldc, accumulate);
    if (n_main < N)
      edge_gemm<T>(MB, N - n_main, K, A + m * a_rs, a_rs, a_cs, B + n_main, ldb, C + m * ldc + n_main, ldc,
                   accumulate);
  }
  if (m_main < M) edge_gemm<T>(M - m_main, N, K, A + m_main * a_rs, a_rs, a_cs, B, ldb, C + m_main * ldc, ldc, accumulate);
}

// S[r][c] = q_r . k_(j0 + c) for the few-row case (decode: one token's query heads), where
// transposing each K tile for the GEMM would cost as much as the products themselves.
template <typename T>
void dot_scores(int64_t nq, const T* q, int64_t q_stride, const T* k, int64_t kv_stride, int64_t j0, int64_t nk,
                int64_t D, T* s) {
  typedef T V __attribute__((vector_size(ALLMEM_SWA_VEC_BYTES)));
  constexpr int64_t kLen = ALLMEM_SWA_VEC_BYTES / sizeof(T);
  for (int64_t c = 0; c < nk; ++c) {
    const T* kr = k + (j0 + c) * kv_stride;
    for (int64_t r = 0; r < nq; ++r) {
      const T* qr = q + r * q_stride;
      V acc = {};
      int64_t d = 0;
      for (; d + kLen <= D; d += kLen) {
        V a, b;
        __builtin_memcpy(&a, qr + d, sizeof(V));
        __builtin_memcpy(&b, kr + d, sizeof(V));
        acc += a * b;
      }
      T sum = 0;
      for (int64_t l = 0; l < kLen; ++l) sum += acc[l];
      for (; d < D; ++d) sum += qr[d] * kr[d];
      s[r * kBlockK + c] = sum;
    }
  }
}

// x[i] <- exp(x[i]) for x[i] <= 0 (or -inf -> 0, NaN -> NaN). float: a branch-free Cephes-style
// polynomial (relative error ~2 ulp) that the compiler vectorizes; std::exp does not vectorize
// and would dominate the runtime. double: std::exp (the double path is for exactness, not speed).
inline void exp_nonpositive(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float xi = x[i];
    const float xc = xi < -87.0f ? -87.0f : xi;  // this order keeps a NaN a NaN
    const float t = xc * 1.44269504088896341f;
    // Round to nearest with the 1.5 * 2^23 trick: exact for |t| < 2^22 and vectorizable.
    const float nf = (t + 12582912.0f) - 12582912.0f;
    const float r = (xc - nf * 0.693359375f) - nf * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const float y = (p * r) * r + r + 1.0f;
    const float two_n = __builtin_bit_cast(float, (static_cast<int32_t>(nf) + 127) << 23);
    x[i] = xi < -87.0f ? 0.0f : y * two_n;
  }
}
inline void exp_nonpositive(double* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::exp(x[i]);
}

template <typename T>
inline T max2(T a, T b) {
  return a > b ? a : b;
}

// Max and sum of x[0, n), in kLanes independent partials so that they vectorize (a single
// running scalar is a serial dependency chain).
constexpr int64_t kLanes = 8;
template <typename T>
inline T row_max(const T* x, int64_t n) {
  T part[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) part[l] = -std::numeric_limits<T>::infinity();
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) part[l] = max2(part[l], x[c + l]);
  for (; c < n; ++c) part[0] = max2(part[0], x[c]);
  T m = part[0];
  for (int64_t l = 1; l < kLanes; ++l) m = max2(m, part[l]);
  return m;
}
template <typename T>
inline T row_sum(const T* x, int64_t n) {
  T part[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) part[l] += x[c + l];
  for (; c < n; ++c) part[0] += x[c];
  T s = 0;
  for (int64_t l = 0; l < kLanes; ++l) s += part[l];
  return s;
}

// dst[d][c] = src row (j0 + c), element d, for c < nk: a K or V tile laid out so that the score
// GEMM reads it with unit stride along keys.
template <typename T>
inline void transpose_tile(const T* src, int64_t stride, int64_t j0, int64_t nk, int64_t D, T* dst) {
  for (int64_t c = 0; c < nk; ++c) {
    const T* s = src + (j0 + c) * stride;
    for (int64_t d = 0; d < D; ++d) dst[d * kBlockK + c] = s[d];
  }
}

// Scales a score tile and applies the mask (invisible -> -inf). Rows are queries i0 + r.
template <typename T>
inline void scale_and_mask(T* s, int64_t nq, const KeyTile& t, int64_t i0, T scale, int64_t window, int64_t sinks) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  for (int64_t r = 0; r < nq; ++r) {
    T* row = s + r * kBlockK;
    const int64_t i = i0 + r;
    if (t.full) {
      for (int64_t c = 0; c < t.nk; ++c) row[c] *= scale;
    } else {
      for (int64_t c = 0; c < t.nk; ++c) {
        const int64_t j = t.j0 + c;
        const bool vis = j <= i && (j < sinks || i - j < window);
        row[c] = vis ? row[c] * scale : kNegInf;
      }
    }
  }
}

// Attention of query rows [i0, i0 + nq) of a slice over the given key tiles, online softmax.
// Out row r at out + r * q_stride; lse[r] (natural log) unless lse is null. Tiles that are not
// `full` are masked with the (window, sinks) rule at the rows' positions.
template <typename T>
void attend_block(const Slice<T>& x, int64_t D, int64_t i0, int64_t nq, const std::vector<KeyTile>& tiles,
                  int64_t window, int64_t sinks, T scale, T* out, float* lse, std::vector<T>& scratch) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  scratch.resize(kBlockQ * kBlockK + D * kBlockK + kBlockQ * D + 2 * kBlockQ);
  T* s = scratch.data();
  T* kt = s + kBlockQ * kBlockK;
  T* acc = kt + D * kBlockK;
  T* m = acc + kBlockQ * D;
  T* l = m + kBlockQ;
  std::fill(acc, acc + nq * D, T(0));
  std::fill(m, m + nq, kNegInf);
  std::fill(l, l + nq, T(0));
  const T* qb = x.q + i0 * x.q_stride;
  const bool few_rows = nq < micro_rows(ALLMEM_SWA_VEC_BYTES);
  for (const KeyTile& t : tiles) {
    if (few_rows) {
      dot_scores(nq, qb, x.q_stride, x.k, x.kv_stride, t.j0, t.nk, D, s);
    } else {
      transpose_tile(x.k, x.kv_stride, t.j0, t.nk, D, kt);
      gemm<T>(nq, t.nk, D, qb, x.q_stride, 1, kt, kBlockK, s, kBlockK, false);
    }
    scale_and_mask(s, nq, t, i0, scale, window, sinks);
    for (int64_t r = 0; r < nq; ++r) {
      T* row = s + r * kBlockK;
      const T m_new = max2(m[r], row_max(row, t.nk));
      if (m_new == kNegInf) {  // nothing visible yet in this row: contributes nothing
        std::fill(row, row + t.nk, T(0));
        continue;
      }
      for (int64_t c = 0; c < t.nk; ++c) row[c] -= m_new;
      exp_nonpositive(row, t.nk);
      const T sum = row_sum(row, t.nk);
      const T alpha = m[r] == kNegInf ? T(0) : std::exp(m[r] - m_new);
      l[r] = l[r] * alpha + sum;
      m[r] = m_new;
      if (alpha != T(1)) {
        T* a = acc + r * D;
        for (int64_t d = 0; d < D; ++d) a[d] *= alpha;
      }
    }
    gemm<T>(nq, D, t.nk, s, kBlockK, 1, x.v + t.j0 * x.kv_stride, x.kv_stride, acc, D, true);
  }
  for (int64_t r = 0; r < nq; ++r) {
    // l > 0 always: key i is visible to query i.
    const T inv = T(1) / l[r];
    T* o = out + r * x.q_stride;
    const T* a = acc + r * D;
    for (int64_t d = 0; d < D; ++d) o[d] = a[d] * inv;
    if (lse != nullptr) lse[r] = static_cast<float>(m[r] + std::log(l[r]));
  }
}

// Forward of one query block [i0, i0 + nq) of one (sequence, head): the visible key tiles only.
template <typename T>
void fwd_block(const Slice<T>& x, int64_t D, int64_t i0, int64_t nq, int64_t window, int64_t sinks, T scale,
               T* out, float* lse, std::vector<T>& scratch, std::vector<KeyTile>& tiles) {
  key_tiles(i0, i0 + nq, window, sinks, tiles);
  attend_block(x, D, i0, nq, tiles, window, sinks, scale, out, lse, scratch);
}

// Backward of one (sequence, kv head): every query head of its group and every query block.
// dK/dV accumulate in dk_acc/dv_acc ([len][D], zeroed by the caller) without races because one
// task owns the kv head. q/dout/out/dq for head g of the group are at the given base + g * D.
// recompute_lse: derive each row's log-sum-exp in T from the scores instead of reading the
// float32 lse (float64 inputs, where a float32 lse would cap the accuracy at ~1e-7).

template <typename T>
void bwd_kv_head(const BwdSlice<T>& x, int64_t len, int64_t D, int64_t window, int64_t sinks, T scale,
                 bool recompute_lse, T* dk_acc, T* dv_acc, std::vector<T>& scratch, std::vector<KeyTile>& tiles) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  scratch.resize(2 * kBlockQ * kBlockK + 2 * D * kBlockK + kBlockQ * D + 4 * kBlockQ);
  T* p = scratch.data();
  T* dp = p + kBlockQ * kBlockK;
  T* kt = dp + kBlockQ * kBlockK;
  T* vt = kt + D * kBlockK;
  T* dq = vt + D * kBlockK;
  T* delta = dq + kBlockQ * D;
  T* lse = delta + kBlockQ;
  T* m = lse + kBlockQ;  // running max and sum of the lse recomputation
  T* l = m + kBlockQ;
  for (int64_t g = 0; g < x.group; ++g) {
    const T* qh = x.q + g * D;
    const T* oh = x.out + g * D;
    const T* doh = x.dout + g * D;
    T* dqh = x.dq + g * D;
    const float* lseh = x.lse + g * x.lse_head_stride;
    for (int64_t i0 = 0; i0 < len; i0 += kBlockQ) {
      const int64_t nq = std::min(kBlockQ, len - i0);
      const T* qb = qh + i0 * x.q_stride;
      const T* dob = doh + i0 * x.q_stride;
      key_tiles(i0, i0 + nq, window, sinks, tiles);
      for (int64_t r = 0; r < nq; ++r) {
        const T* o = oh + (i0 + r) * x.q_stride;
        const T* dor = dob + r * x.q_stride;
        T acc = 0;
        for (int64_t d = 0; d < D; ++d) acc += o[d] * dor[d];
        delta[r] = acc;
        lse[r] = static_cast<T>(lseh[i0 + r]);
      }
      if (recompute_lse) {
        std::fill(m, m + nq, kNegInf);
        std::fill(l, l + nq, T(0));
        for (const KeyTile& t : tiles) {
          transpose_tile(x.k, x.kv_stride, t.j0, t.nk, D, kt);
          gemm<T>(nq, t.nk, D, qb, x.q_stride, 1, kt, kBlockK, p, kBlockK, false);
          scale_and_mask(p, nq, t, i0, scale, window, sinks);
          for (int64_t r = 0; r < nq; ++r) {
            T* row = p + r * kBlockK;
            const T m_new = max2(m[r], row_max(row, t.nk));
            if (m_new == kNegInf) continue;
            T sum = 0;
            for (int64_t c = 0; c < t.nk; ++c) sum += std::exp(row[c] - m_new);
            l[r] = (m[r] == kNegInf ? T(0) : l[r] * std::exp(m[r] - m_new)) + sum;
            m[r] = m_new;
          }
        }
        for (int64_t r = 0; r < nq; ++r) lse[r] = m[r] + std::log(l[r]);
      }
      std::fill(dq, dq + nq * D, T(0));
      for (const KeyTile& t : tiles) {
        const T* kb = x.k + t.j0 * x.kv_stride;
        transpose_tile(x.k, x.kv_stride, t.j0, t.nk, D, kt);
        transpose_tile(x.v, x.kv_stride, t.j0, t.nk, D, vt);
        gemm<T>(nq, t.nk, D, qb, x.q_stride, 1, kt, kBlockK, p, kBlockK, false);
        scale_and_mask(p, nq, t, i0, scale, window, sinks);
        for (int64_t r = 0; r < nq; ++r) {
          T* row = p + r * kBlockK;
          for (int64_t c = 0; c < t.nk; ++c) row[c] -= lse[r];  // -inf stays -inf -> P = 0
          exp_nonpositive(row, t.nk);
        }
        gemm<T>(nq, t.nk, D, dob, x.q_stride, 1, vt, kBlockK, dp, kBlockK, false);
        for (int64_t r = 0; r < nq; ++r) {
          const T* pr = p + r * kBlockK;
          T* ds = dp + r * kBlockK;
          for (int64_t c = 0; c < t.nk; ++c) ds[c] = pr[c] * (ds[c] - delta[r]);
        }
        // dV += P^T dO, dK += dS^T Q (scaled at the end), dQ += dS K (scaled on write-out).
        gemm<T>(t.nk, D, nq, p, 1, kBlockK, dob, x.q_stride, dv_acc + t.j0 * D, D, true);
        gemm<T>(t.nk, D, nq, dp, 1, kBlockK, qb, x.q_stride, dk_acc + t.j0 * D, D, true);
        gemm<T>(nq, D, t.nk, dp, kBlockK, 1, kb, x.kv_stride, dq, D, true);
      }
      for (int64_t r = 0; r < nq; ++r) {
        T* dst = dqh + (i0 + r) * x.q_stride;
        const T* src = dq + r * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = src[d] * scale;
      }
    }
  }
}
