// Newton–Schulz kernel 4 (see newton_schulz.cu): the one-block path, for buckets of matrices of at
// most kSmallM × kSmallMaxN after orienting. One block runs the whole step of a matrix —
// averaging, normalization, every product and the update — with X, A and B in shared memory.
//
// Included by ns_launch.cu only: a kernel is defined in the one source file that launches it.
#ifndef SCION_NS_SMALL_CUH_
#define SCION_NS_SMALL_CUH_

#include <cstddef>
#include <cstdint>

#include "device.cuh"
#include "ns_gemm.cuh"
#include "ns_plan.cuh"
#include "ns_prepare.cuh"

namespace scion::ns {

// ---------------------------------------------------------------------------------------------
// 4. Small matrices (m ≤ 64, n ≤ 512 after orienting): the whole step of a matrix in one block,
// every intermediate in shared memory, all matrices of the bucket in one launch.

constexpr int kSmallThreads = 128;  // 2×2 warps of 32×32 output each
constexpr int kSmallRefs = 40;
constexpr int kSmallLdA = kSmallM + 8;
constexpr size_t kSmallSumsBytes = 1280;  // (kSmallThreads + 1) doubles, rounded up

struct SmallRef {
  const void* g;
  void* d;
  void* p;
  int64_t g_rs, g_cs, d_rs, d_cs, p_rs, p_cs;  // oriented (wide) strides
  float scale;
};

struct SmallArgs {
  SmallRef refs[kSmallRefs];
  int32_t m, n, n_pad, steps;
  float coef[3 * kMaxSteps];
  scion_dtype p_dtype, g_dtype, d_dtype;
  bool has_buffer;
  float alpha, beta, update_coef, decay;
  const float* lr;        // the device learning rate t, or null (see step_factors)
  const float* momentum;  // the device α, or null (see average_factors)
};
static_assert(sizeof(SmallArgs) <= 4096, "kernel argument block exceeds 4 KB");

inline size_t small_smem_bytes(int64_t n_pad) {
  return kSmallSumsBytes + 2 * (kSmallM * (n_pad + 8) + 2 * kSmallM * kSmallLdA);
}

template <typename T>
__global__ void __launch_bounds__(kSmallThreads) small_kernel(const __grid_constant__ SmallArgs a) {
  unsigned char* raw = dynamic_smem();
  double* sums = reinterpret_cast<double*>(raw);
  const int ldx = a.n_pad + 8;
  T* X = reinterpret_cast<T*>(raw + kSmallSumsBytes);
  T* A = X + kSmallM * ldx;
  T* B = A + kSmallM * kSmallLdA;
  const SmallRef& ref = a.refs[blockIdx.x];
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid % 32;
  const int warp_m = (tid / 32) / 2;
  const int warp_n = (tid / 32) % 2;

  // Averaging and Σd² in fp64 (fixed order), then X₀ = d·(1/‖d‖), zero-padded.
  const AverageFactors af = average_factors(a.momentum, a.alpha, a.beta);
  double ssq = 0.0;
  for (int e = tid; e < a.m * a.n; e += kSmallThreads) {
    const int i = e / a.n;
    const int j = e % a.n;
    const float v =
        average_element(ref.g, i * ref.g_rs + j * ref.g_cs, a.g_dtype, ref.d,
                        i * ref.d_rs + j * ref.d_cs, a.d_dtype, a.has_buffer, af.alpha, af.beta);
    ssq += static_cast<double>(v) * static_cast<double>(v);
  }
  const double inv = inverse_norm(block_total(ssq, sums, kSmallThreads));
  const void* src = a.has_buffer ? ref.d : ref.g;
  const scion_dtype src_dtype = a.has_buffer ? a.d_dtype : a.g_dtype;
  const int64_t rs = a.has_buffer ? ref.d_rs : ref.g_rs;
  const int64_t cs = a.has_buffer ? ref.d_cs : ref.g_cs;
  for (int e = tid; e < kSmallM * a.n_pad; e += kSmallThreads) {
    const int i = e / a.n_pad;
    const int j = e % a.n_pad;
    float v = 0.0f;
    if (i < a.m && j < a.n) {
      v = static_cast<float>(static_cast<double>(load_as_float(src, i * rs + j * cs, src_dtype)) *
                             inv);
    }
    X[i * ldx + j] = Operand<T>::from(v);
  }
  __syncthreads();

  for (int s = 0; s < a.steps; ++s) {
    const float ca = a.coef[3 * s];
    const float cb = a.coef[3 * s + 1];
    const float cc = a.coef[3 * s + 2];
    float acc[2][4][4];
    // A ← X·Xᵀ, then B ← b·A + c·A·A (each warp a 32×32 quarter).
    for (int product = 0; product < 2; ++product) {
      zero(acc);
      const T* in = product == 0 ? X : A;
      const int ld = product == 0 ? ldx : kSmallLdA;
      const int k = product == 0 ? a.n_pad : kSmallM;
      for (int kk = 0; kk < k; kk += 16) {
        warp_mma_k16<T, 2, 4, false>(acc, in, ld, warp_m * 32, in, ld, warp_n * 32, kk, lane);
      }
      T* out = product == 0 ? A : B;
      for_each_acc(acc, warp_m * 32, warp_n * 32, lane, [&](float v, int r, int c) {
        if (product == 1) v = __fmaf_rn(cb, Operand<T>::to(A[r * kSmallLdA + c]), cc * v);
        out[r * kSmallLdA + c] = Operand<T>::from(v);
      });
      __syncthreads();
    }
    // X ← a·X + B·X, 64 columns at a time: a column block of the result needs only the same
    // column block of X, so it is written back in place once every warp has read it.
    for (int c0 = 0; c0 < a.n_pad; c0 += 64) {
      zero(acc);
      for (int kk = 0; kk < kSmallM; kk += 16) {
        warp_mma_k16<T, 2, 4, true>(acc, B, kSmallLdA, warp_m * 32, X, ldx, c0 + warp_n * 32, kk,
                                    lane);
      }
      for_each_acc(acc, warp_m * 32, c0 + warp_n * 32, lane, [&](float& v, int r, int c) {
        v = __fmaf_rn(ca, Operand<T>::to(X[r * ldx + c]), v);
      });
      __syncthreads();
      for_each_acc(acc, warp_m * 32, c0 + warp_n * 32, lane,
                   [&](float v, int r, int c) { X[r * ldx + c] = Operand<T>::from(v); });
    }
    __syncthreads();
  }
  // x ← decay·x + coef·s·X, walked along the parameter's contiguous dimension (a tall
  // parameter's rows are X's columns).
  const bool rows_fast =
      (ref.p_rs < 0 ? -ref.p_rs : ref.p_rs) < (ref.p_cs < 0 ? -ref.p_cs : ref.p_cs);
  const StepFactors f = step_factors(a.lr, a.update_coef, a.decay);
  for (int e = tid; e < a.m * a.n; e += kSmallThreads) {
    const int r = rows_fast ? e % a.m : e / a.n;
    const int c = rows_fast ? e / a.m : e % a.n;
    const int64_t at = r * ref.p_rs + c * ref.p_cs;
    const float x = load_as_float(ref.p, at, a.p_dtype);
    const float u = ref.scale * Operand<T>::to(X[r * ldx + c]);
    store_from_float(ref.p, at, a.p_dtype, __fmaf_rn(f.coef, u, __fmul_rn(f.decay, x)));
  }
}

}  // namespace scion::ns

#endif  // SCION_NS_SMALL_CUH_
