// Newton–Schulz kernels 1 and 2 (see newton_schulz.cu): the averaging with per-chunk sums of
// squares, and the normalized, oriented, zero-padded operand X₀ = d / ‖d‖_F; with the block-wide
// fixed-order sum and the inverse norm that the one-block path (ns_small.cuh) uses as well.
//
// Included by ns_launch.cu only: a kernel is defined in the one source file that launches it.
#ifndef SCION_NS_PREPARE_CUH_
#define SCION_NS_PREPARE_CUH_

#include <cmath>
#include <cstdint>

#include "device.cuh"
#include "ns_plan.cuh"

namespace scion::ns {

// Threads per block of kernels 1 and 2.
constexpr int kThreads = 256;

// One matrix of the bucket, in the parameter's own (row, column) coordinates.
struct SourceRef {
  const void* g;
  void* d;  // the averaging buffer, or null (d = g)
  int64_t g_rs, g_cs, d_rs, d_cs;
};

struct SourceArgs {
  SourceRef refs[kMaxRefs];
  int32_t count;
  int32_t rows, cols;  // of the parameter
  int32_t chunk_rows;  // rows per chunk of average_kernel
  int32_t chunks;      // chunks per matrix
  scion_dtype g_dtype, d_dtype;
  bool has_buffer;
  float alpha, beta;
  const float* momentum;  // the device α, or null (see average_factors)
  double* partial;        // [count][chunks] Σd² per chunk
};
static_assert(sizeof(SourceArgs) <= 4096, "kernel argument block exceeds 4 KB");

// Σ own over the block's threads in a fixed order (the same bits on every run); every thread
// gets the total. `sums` holds nthreads + 1 doubles of shared memory.
__device__ __forceinline__ double block_total(double own, double* sums, int nthreads) {
  const int tid = static_cast<int>(threadIdx.x);
  sums[tid] = own;
  __syncthreads();  // also makes the block's earlier global stores visible to all its threads
  if (tid == 0) {
    double total = 0.0;
    for (int t = 0; t < nthreads; ++t) total += sums[t];
    sums[nthreads] = total;
  }
  __syncthreads();
  return sums[nthreads];
}

// 1/√total, 0 for a zero total, NaN for NaN.
__device__ __forceinline__ double inverse_norm(double total) {
  const double norm = sqrt(total);
  return norm > 0.0 ? 1.0 / norm : (norm == 0.0 ? 0.0 : norm);
}

// ---------------------------------------------------------------------------------------------
// 1. Averaging and per-chunk sums of squares.

__global__ void __launch_bounds__(kThreads)
    average_kernel(const __grid_constant__ SourceArgs args) {
  double* sums = reinterpret_cast<double*>(dynamic_smem());
  const int matrix = static_cast<int>(blockIdx.y);
  const int chunk = static_cast<int>(blockIdx.x);
  const SourceRef& ref = args.refs[matrix];
  const int row0 = chunk * args.chunk_rows;
  const int row1 = row0 + args.chunk_rows < args.rows ? row0 + args.chunk_rows : args.rows;
  const AverageFactors af = average_factors(args.momentum, args.alpha, args.beta);
  double ssq = 0.0;
  for (int r = row0; r < row1; ++r) {
    for (int c = static_cast<int>(threadIdx.x); c < args.cols; c += kThreads) {
      const float v = average_element(ref.g, r * ref.g_rs + c * ref.g_cs, args.g_dtype, ref.d,
                                      r * ref.d_rs + c * ref.d_cs, args.d_dtype, args.has_buffer,
                                      af.alpha, af.beta);
      ssq += static_cast<double>(v) * static_cast<double>(v);
    }
  }
  const double total = block_total(ssq, sums, kThreads);
  if (threadIdx.x == 0) args.partial[static_cast<int64_t>(matrix) * args.chunks + chunk] = total;
}

// ---------------------------------------------------------------------------------------------
// 2. X₀ = d / ‖d‖_F, oriented wide, padded with zeros.

// A block writes 32 rows of X, kNormCols columns at most, in 32×32 tiles staged in shared memory:
// the tile is read along the parameter's rows and written along X's rows, so both sides are
// coalesced whether X is the parameter or its transpose (tall parameters).
constexpr int kNormCols = 1024;

struct NormalizeArgs {
  int32_t m_pad, n_pad;  // padded oriented size
  int32_t col_blocks;    // blocks along X's columns
  bool tall;             // oriented (i, j) is the parameter's (j, i)
  void* x;               // [count][m_pad][n_pad]
  int32_t chunks;        // partial sums per matrix
  const double* partial;
};

constexpr size_t kNormSumsBytes = 2064;  // (kThreads + 1) doubles, 16-byte rounded

template <typename T>
__global__ void __launch_bounds__(kThreads)
    normalize_kernel(const __grid_constant__ SourceArgs src, const NormalizeArgs args) {
  double* sums = reinterpret_cast<double*>(dynamic_smem());
  float* tile = reinterpret_cast<float*>(dynamic_smem() + kNormSumsBytes);  // [32][33]
  const int matrix = static_cast<int>(blockIdx.y);
  const int tid = static_cast<int>(threadIdx.x);
  const double* partial = args.partial + static_cast<int64_t>(matrix) * args.chunks;
  double own = 0.0;
  for (int k = tid; k < args.chunks; k += kThreads) own += partial[k];
  const double inv = inverse_norm(block_total(own, sums, kThreads));

  const SourceRef& ref = src.refs[matrix];
  const void* base = src.has_buffer ? ref.d : ref.g;
  const scion_dtype dtype = src.has_buffer ? src.d_dtype : src.g_dtype;
  const int64_t rs = src.has_buffer ? ref.d_rs : ref.g_rs;
  const int64_t cs = src.has_buffer ? ref.d_cs : ref.g_cs;
  T* x = static_cast<T*>(args.x) +
         static_cast<int64_t>(matrix) * args.m_pad * static_cast<int64_t>(args.n_pad);
  const int i0 = static_cast<int>(blockIdx.x) / args.col_blocks * 32;
  const int j_begin = static_cast<int>(blockIdx.x) % args.col_blocks * kNormCols;
  const int j_end = j_begin + kNormCols < args.n_pad ? j_begin + kNormCols : args.n_pad;
  const int tx = tid % 32;
  const int ty = tid / 32;
  for (int j0 = j_begin; j0 < j_end; j0 += 32) {
    // Parameter rows r0.. and columns c0.. of this tile.
    const int r0 = args.tall ? j0 : i0;
    const int c0 = args.tall ? i0 : j0;
    for (int k = ty; k < 32; k += kThreads / 32) {
      const int r = r0 + k;
      const int c = c0 + tx;
      float v = 0.0f;
      if (r < src.rows && c < src.cols) {
        v = static_cast<float>(static_cast<double>(load_as_float(base, r * rs + c * cs, dtype)) *
                               inv);
      }
      tile[k * 33 + tx] = v;
    }
    __syncthreads();
    for (int k = ty; k < 32; k += kThreads / 32) {
      const float v = args.tall ? tile[tx * 33 + k] : tile[k * 33 + tx];
      x[static_cast<int64_t>(i0 + k) * args.n_pad + j0 + tx] = Operand<T>::from(v);
    }
    __syncthreads();
  }
}

}  // namespace scion::ns

#endif  // SCION_NS_PREPARE_CUH_
