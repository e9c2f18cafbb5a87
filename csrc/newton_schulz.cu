// The whole Scion step for a bucket of same-shape Spectral matrices, from one host call:
//
//   d ← (1 − α)·d + α·g                               (in place, in d's dtype; no d: d = g)
//   X ← d / ‖d‖_F                                     (wide orientation, bf16 or fp16, padded)
//   for each step (a, b, c):
//     A ← X·Xᵀ;   B ← b·A + c·A·A;   X ← a·X + B·X    (tensor cores, fp32 accumulation)
//   x ← decay·x + coef·s·X                            (fused into the last product's epilogue)
//
// Launch sequence (2 + 3·steps launches, more only for buckets above kMaxRefs matrices):
//   1. average_kernel     one block per chunk of rows of every matrix: the averaging, stored, and
//                         the chunk's Σd² in fp64 (fp64 neither overflows nor underflows for any
//                         fp32 input, so no pre-scaling pass is needed);
//   2. normalize_kernel   one block per 32 rows × ≤1024 columns of padded X: ‖d‖ from the chunk
//                         sums (same fixed order in every block, so every block gets the same
//                         bits), then X₀ = d·(1/‖d‖) rounded once to the operand type, through
//                         32×32 shared-memory tiles (coalesced for tall parameters too); zeros
//                         in the padding;
//   3. gemm_kernel        per step: Gram (upper-triangle tiles, each stored twice), polynomial
//                         (same), apply (full grid; the last one updates the parameters).
//
// Work matrices are padded with zeros to whole tiles, so the products need no bounds checks:
// zero rows and columns of X give zero rows and columns of A, B and the next X. Only the fused
// update looks at the true size. All reductions have a fixed order: a bucket's result has the
// same bits on every run.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <type_traits>

#include "device.cuh"
#include "scion_kernels.h"
#include "status.cuh"

namespace scion {
namespace {

constexpr int kThreads = 256;
// Elements per chunk of the element-wise passes (whole rows; at least one row).
constexpr int64_t kChunkElements = int64_t{1} << 16;
// Matrices per element-wise or update launch: their references travel in the kernel arguments.
constexpr int kMaxRefs = 48;
constexpr int kMaxSteps = 16;

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
  double* partial;  // [count][chunks] Σd² per chunk
};
static_assert(sizeof(SourceArgs) <= 4096, "kernel argument block exceeds 4 KB");

// The parameter update of the last product, in oriented (wide) coordinates.
struct UpdateRef {
  void* p;
  int64_t rs, cs;
  float scale;
};

struct UpdateArgs {
  UpdateRef refs[kMaxRefs];
  int32_t count;
  int32_t m, n;  // true (unpadded) oriented size
  scion_dtype p_dtype;
  float coef, decay;
};
static_assert(sizeof(UpdateArgs) <= 3072, "update references leave too little argument space");

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
  double ssq = 0.0;
  for (int r = row0; r < row1; ++r) {
    for (int c = static_cast<int>(threadIdx.x); c < args.cols; c += kThreads) {
      const float v = average_element(ref.g, r * ref.g_rs + c * ref.g_cs, args.g_dtype, ref.d,
                                      r * ref.d_rs + c * ref.d_cs, args.d_dtype, args.has_buffer,
                                      args.alpha, args.beta);
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

// ---------------------------------------------------------------------------------------------
// 3. The products.

enum class Product { kGram, kPoly, kApply };

// Block tile kTile×kTile×32, kWarpsM×kWarpsN warps, kStages-deep cp.async pipeline.
template <int kTile_, int kWarpsM_, int kWarpsN_>
struct Tiling {
  static constexpr int kTile = kTile_;
  static constexpr int kWarpsM = kWarpsM_;
  static constexpr int kWarpsN = kWarpsN_;
  static constexpr int kThreads = 32 * kWarpsM * kWarpsN;
  static constexpr int kK = 32;
  static constexpr int kStages = 3;
  static constexpr int kWarpM = kTile / kWarpsM;  // warp tile
  static constexpr int kWarpN = kTile / kWarpsN;
  static constexpr int kMI = kWarpM / 16;     // m16 fragments per warp
  static constexpr int kNI = kWarpN / 8;      // n8 fragments per warp
  static constexpr int kPad = 8;              // elements of row padding (ldmatrix bank spread)
  static constexpr int kRowA = kK + kPad;     // smem row length of a [tile][k] operand
  static constexpr int kRowT = kTile + kPad;  // of a [k][tile] (transposed) operand
  static constexpr int kStageElems =
      kTile * kRowA + (kK * kRowT > kTile * kRowA ? kK * kRowT : kTile * kRowA);
  static constexpr size_t kSmemBytes = size_t{kStages} * kStageElems * 2;
  static_assert(kWarpN % 16 == 0 && kWarpM % 16 == 0, "warp tile must hold whole fragments");
};
using TileSmall = Tiling<64, 2, 2>;   // 128 threads, warp tile 32×32
using TileLarge = Tiling<128, 2, 4>;  // 256 threads, warp tile 64×32

struct GemmArgs {
  const void* a;    // left operand rows, [batch][·][lda]
  const void* b;    // right operand: rows of Bᵀ (kGram, kPoly) or rows of B (kApply)
  const void* add;  // the term added in the epilogue (kPoly: A, kApply: X), laid out as out
  void* out;
  int64_t a_batch, b_batch, out_batch;  // element strides between matrices
  int32_t lda, ldb, ldc;
  int32_t k;                   // reduction length (a multiple of kK)
  int32_t tiles;               // tiles per matrix side (rows; kApply: rows of the output)
  int32_t tiles_n;             // kApply: tiles along the output's columns
  int32_t batch0;              // first matrix of this launch
  float acc_scale, add_scale;  // out = acc_scale·acc + add_scale·add
};

struct NoUpdate {};

// out = acc_scale·(a·bᵀ or a·b) + add_scale·add, with `add` laid out as `out`.
GemmArgs product(const void* a, int64_t a_batch, int32_t lda, const void* b, int64_t b_batch,
                 int32_t ldb, const void* add, void* out, int64_t out_batch, int32_t ldc, int32_t k,
                 float acc_scale, float add_scale, int32_t tiles, int32_t tiles_n) {
  GemmArgs g{};
  g.a = a;
  g.b = b;
  g.add = add;
  g.out = out;
  g.a_batch = a_batch;
  g.b_batch = b_batch;
  g.out_batch = out_batch;
  g.lda = lda;
  g.ldb = ldb;
  g.ldc = ldc;
  g.k = k;
  g.acc_scale = acc_scale;
  g.add_scale = add_scale;
  g.tiles = tiles;
  g.tiles_n = tiles_n;
  return g;
}

// One k16 slice of a warp's (16·kMI)×(8·kNI) tile from shared memory: acc += A·B with A rows
// a_row.. of `sa` (row-major, k along rows, leading dimension lda) and B either as rows of Bᵀ
// (b_col.. of `sb`, k along rows: X·Xᵀ-type products) or, with kTransB, as rows k of B
// (columns b_col..: B·X-type products). `kk` is the slice's first k.
template <typename T, int kMI, int kNI, bool kTransB>
__device__ __forceinline__ void warp_mma_k16(float (&acc)[kMI][kNI][4], const T* sa, int lda,
                                             int a_row, const T* sb, int ldb, int b_col, int kk,
                                             int lane) {
  uint32_t af[kMI][4];
  uint32_t bf[kNI][2];
  SCION_UNROLL
  for (int i = 0; i < kMI; ++i) {
    const int r = a_row + i * 16 + lane % 16;
    ldmatrix_x4<false>(af[i], sa + r * lda + kk + (lane / 16) * 8);
  }
  SCION_UNROLL
  for (int j = 0; j < kNI; j += 2) {
    uint32_t r4[4];
    if constexpr (kTransB) {
      const int k = kk + ((lane / 8) % 2) * 8 + lane % 8;
      const int n = b_col + j * 8 + (lane / 16) * 8;
      ldmatrix_x4<true>(r4, sb + k * ldb + n);
    } else {
      const int n = b_col + j * 8 + (lane / 16) * 8 + lane % 8;
      const int k = kk + ((lane / 8) % 2) * 8;
      ldmatrix_x4<false>(r4, sb + n * ldb + k);
    }
    bf[j][0] = r4[0];
    bf[j][1] = r4[1];
    bf[j + 1][0] = r4[2];
    bf[j + 1][1] = r4[3];
  }
  SCION_UNROLL
  for (int i = 0; i < kMI; ++i) {
    SCION_UNROLL
    for (int j = 0; j < kNI; ++j) mma_16816<T>(acc[i][j], af[i], bf[j]);
  }
}

// Calls f(element, row, column) for every accumulator element of a warp's tile whose top-left
// element is (row0, col0), in the mma.m16n8k16 C layout.
template <int kMI, int kNI, typename F>
__device__ __forceinline__ void for_each_acc(float (&acc)[kMI][kNI][4], int row0, int col0,
                                             int lane, F&& f) {
  SCION_UNROLL
  for (int i = 0; i < kMI; ++i) {
    SCION_UNROLL
    for (int j = 0; j < kNI; ++j) {
      SCION_UNROLL
      for (int e = 0; e < 4; ++e) {
        f(acc[i][j][e], row0 + i * 16 + lane / 4 + (e / 2) * 8,
          col0 + j * 8 + 2 * (lane % 4) + e % 2);
      }
    }
  }
}

template <int kMI, int kNI>
__device__ __forceinline__ void zero(float (&acc)[kMI][kNI][4]) {
  for_each_acc(acc, 0, 0, 0, [](float& v, int, int) { v = 0.0f; });
}

// Maps a linear index over the upper-triangle tiles (ti ≤ tj), row by row.
__device__ __forceinline__ void triangle_tile(int index, int tiles, int& ti, int& tj) {
  ti = 0;
  while (index >= tiles - ti) {
    index -= tiles - ti;
    ++ti;
  }
  tj = ti + index;
}

template <typename T, Product kProduct, typename Cfg, typename Update>
__global__ void __launch_bounds__(Cfg::kThreads)
    gemm_kernel(const GemmArgs args, const __grid_constant__ Update upd) {
  constexpr int kTile = Cfg::kTile;
  constexpr int kK = Cfg::kK;
  constexpr int kStages = Cfg::kStages;
  constexpr bool kTransB = kProduct == Product::kApply;
  T* smem = reinterpret_cast<T*>(dynamic_smem());
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int warp_m = warp / Cfg::kWarpsN;
  const int warp_n = warp % Cfg::kWarpsN;
  const int local = static_cast<int>(blockIdx.y);
  const int matrix = args.batch0 + local;

  int ti, tj;
  if constexpr (kProduct == Product::kApply) {
    ti = static_cast<int>(blockIdx.x) / args.tiles_n;
    tj = static_cast<int>(blockIdx.x) % args.tiles_n;
  } else {
    triangle_tile(static_cast<int>(blockIdx.x), args.tiles, ti, tj);
  }
  const int row0 = ti * kTile;
  const int col0 = tj * kTile;
  const T* a = static_cast<const T*>(args.a) + matrix * args.a_batch;
  const T* b = static_cast<const T*>(args.b) + matrix * args.b_batch;

  // Stage s: the left tile [kTile][kRowA], then the right tile ([kTile][kRowA], or [kK][kRowT]
  // when transposed).
  auto stage_a = [&](int s) { return smem + s * Cfg::kStageElems; };
  auto stage_b = [&](int s) { return smem + s * Cfg::kStageElems + kTile * Cfg::kRowA; };

  auto load_stage = [&](int s, int k0) {
    T* sa = stage_a(s);
    T* sb = stage_b(s);
    constexpr int kChunksA = kTile * kK / 8;  // 16-byte pieces
    for (int c = tid; c < kChunksA; c += Cfg::kThreads) {
      const int r = c / (kK / 8);
      const int k = (c % (kK / 8)) * 8;
      cp_async_16(sa + r * Cfg::kRowA + k, a + static_cast<int64_t>(row0 + r) * args.lda + k0 + k);
    }
    if constexpr (kTransB) {
      constexpr int kChunksB = kK * kTile / 8;
      for (int c = tid; c < kChunksB; c += Cfg::kThreads) {
        const int k = c / (kTile / 8);
        const int n = (c % (kTile / 8)) * 8;
        cp_async_16(sb + k * Cfg::kRowT + n,
                    b + static_cast<int64_t>(k0 + k) * args.ldb + col0 + n);
      }
    } else {
      for (int c = tid; c < kChunksA; c += Cfg::kThreads) {
        const int r = c / (kK / 8);
        const int k = (c % (kK / 8)) * 8;
        cp_async_16(sb + r * Cfg::kRowA + k,
                    b + static_cast<int64_t>(col0 + r) * args.ldb + k0 + k);
      }
    }
  };

  float acc[Cfg::kMI][Cfg::kNI][4];
  zero(acc);

  const int ktiles = args.k / kK;
  SCION_UNROLL
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < ktiles) load_stage(s, s * kK);
    cp_async_commit();
  }
  for (int kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    // The stage consumed in the previous iteration is free again: refill it.
    const int next = kt + kStages - 1;
    if (next < ktiles) load_stage(next % kStages, next * kK);
    cp_async_commit();

    const T* sa = stage_a(kt % kStages);
    const T* sb = stage_b(kt % kStages);
    SCION_UNROLL
    for (int kk = 0; kk < kK; kk += 16) {
      warp_mma_k16<T, Cfg::kMI, Cfg::kNI, kTransB>(acc, sa, Cfg::kRowA, warp_m * Cfg::kWarpM, sb,
                                                   kTransB ? Cfg::kRowT : Cfg::kRowA,
                                                   warp_n * Cfg::kWarpN, kk, lane);
    }
  }
  cp_async_wait<0>();

  // Epilogue: out = acc_scale·acc + add_scale·add, rounded to T and staged in shared memory
  // (the pipeline's buffers, free once every warp is done), then written out coalesced:
  //   - the tile in 16-byte row pieces, and for off-diagonal tiles of the symmetric products
  //     its mirror, walked along the mirror's rows;
  //   - or, in the last kApply, the parameter update, walked along the parameter's contiguous
  //     dimension (tall parameters have X's columns as their rows).
  constexpr bool kUpdate = kProduct == Product::kApply && !std::is_same<Update, NoUpdate>::value;
  constexpr int kStageLd = kTile + 8;
  static_assert(size_t{kTile} * kStageLd * sizeof(T) <= Cfg::kSmemBytes, "staging tile too big");
  const T* add = static_cast<const T*>(args.add) + matrix * args.out_batch;
  __syncthreads();
  for_each_acc(acc, row0 + warp_m * Cfg::kWarpM, col0 + warp_n * Cfg::kWarpN, lane,
               [&](float a_rc, int r, int c) {
                 float v = args.acc_scale * a_rc;
                 if constexpr (kProduct != Product::kGram) {
                   v = __fmaf_rn(args.add_scale,
                                 Operand<T>::to(add[static_cast<int64_t>(r) * args.ldc + c]), v);
                 }
                 smem[(r - row0) * kStageLd + (c - col0)] = Operand<T>::from(v);
               });
  __syncthreads();
  if constexpr (kUpdate) {
    const UpdateRef& ref = upd.refs[local];
    const bool rows_fast = (ref.rs < 0 ? -ref.rs : ref.rs) < (ref.cs < 0 ? -ref.cs : ref.cs);
    for (int idx = tid; idx < kTile * kTile; idx += Cfg::kThreads) {
      const int lr = rows_fast ? idx % kTile : idx / kTile;
      const int lc = rows_fast ? idx / kTile : idx % kTile;
      const int r = row0 + lr;
      const int c = col0 + lc;
      if (r < upd.m && c < upd.n) {
        const int64_t at = r * ref.rs + c * ref.cs;
        const float x = load_as_float(ref.p, at, upd.p_dtype);
        const float u = ref.scale * Operand<T>::to(smem[lr * kStageLd + lc]);
        store_from_float(ref.p, at, upd.p_dtype, __fmaf_rn(upd.coef, u, __fmul_rn(upd.decay, x)));
      }
    }
  } else {
    T* out = static_cast<T*>(args.out) + matrix * args.out_batch;
    constexpr int kPieces = kTile / 8;  // 16-byte pieces per tile row
    for (int idx = tid; idx < kTile * kPieces; idx += Cfg::kThreads) {
      const int lr = idx / kPieces;
      const int lc = idx % kPieces * 8;
      *reinterpret_cast<uint4*>(out + static_cast<int64_t>(row0 + lr) * args.ldc + col0 + lc) =
          *reinterpret_cast<const uint4*>(smem + lr * kStageLd + lc);
    }
    if (kProduct != Product::kApply && ti != tj) {
      for (int idx = tid; idx < kTile * kTile; idx += Cfg::kThreads) {
        const int lr = idx % kTile;
        const int lc = idx / kTile;
        out[static_cast<int64_t>(col0 + lc) * args.ldc + row0 + lr] = smem[lr * kStageLd + lc];
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// 4. Small matrices (m ≤ 64, n ≤ 512 after orienting): the whole step of a matrix in one block,
// every intermediate in shared memory, all matrices of the bucket in one launch.

constexpr int kSmallM = 64;
constexpr int kSmallMaxN = 512;
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
};
static_assert(sizeof(SmallArgs) <= 4096, "kernel argument block exceeds 4 KB");

size_t small_smem_bytes(int64_t n_pad) {
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
  double ssq = 0.0;
  for (int e = tid; e < a.m * a.n; e += kSmallThreads) {
    const int i = e / a.n;
    const int j = e % a.n;
    const float v =
        average_element(ref.g, i * ref.g_rs + j * ref.g_cs, a.g_dtype, ref.d,
                        i * ref.d_rs + j * ref.d_cs, a.d_dtype, a.has_buffer, a.alpha, a.beta);
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
  for (int e = tid; e < a.m * a.n; e += kSmallThreads) {
    const int r = rows_fast ? e % a.m : e / a.n;
    const int c = rows_fast ? e / a.m : e % a.n;
    const int64_t at = r * ref.p_rs + c * ref.p_cs;
    const float x = load_as_float(ref.p, at, a.p_dtype);
    const float u = ref.scale * Operand<T>::to(X[r * ldx + c]);
    store_from_float(ref.p, at, a.p_dtype, __fmaf_rn(a.update_coef, u, __fmul_rn(a.decay, x)));
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

struct Plan {
  int tile;
  int64_t m, n, m_pad, n_pad;
  int chunk_rows, chunks;  // average_kernel
  int64_t x_elems, a_elems;
  size_t bytes;
};

// 1: the one-block path; 64, 128: the tiled products with that tile.
int choose_tile(int64_t m, int64_t n, int requested) {
  if (requested == 1 || requested == 64 || requested == 128) return requested;
  if (m <= kSmallM && n <= kSmallMaxN) return 1;
  return (m >= 512 && n >= 512) ? 128 : 64;
}

Plan make_plan(int64_t batch, int64_t rows, int64_t cols, int tile_request) {
  Plan p{};
  p.m = rows < cols ? rows : cols;
  p.n = rows < cols ? cols : rows;
  p.tile = choose_tile(p.m, p.n, tile_request);
  if (p.tile == 1) {  // the one-block path needs no workspace
    p.m_pad = kSmallM;
    p.n_pad = round_up(p.n, 64);
    return p;
  }
  p.m_pad = round_up(p.m, p.tile);
  p.n_pad = round_up(p.n, p.tile);
  p.chunk_rows = static_cast<int>(cols >= kChunkElements ? 1 : kChunkElements / cols);
  if (p.chunk_rows > rows) p.chunk_rows = static_cast<int>(rows);
  p.chunks = static_cast<int>((rows + p.chunk_rows - 1) / p.chunk_rows);
  p.x_elems = p.m_pad * p.n_pad;
  p.a_elems = p.m_pad * p.m_pad;
  // X, Y, A, B in the operand type (2 bytes), then the fp64 chunk sums, 256-byte aligned.
  const int64_t operands = round_up(batch * (2 * p.x_elems + 2 * p.a_elems) * 2, 256);
  p.bytes = static_cast<size_t>(operands + round_up(batch * p.chunks * 8, 256));
  return p;
}

bool check(const scion_ns_problem& pr) {
  if (pr.batch < 0 || pr.rows <= 0 || pr.cols <= 0) {
    set_error("ns_step: need batch >= 0 and a positive shape, got batch %lld of %lld x %lld",
              static_cast<long long>(pr.batch), static_cast<long long>(pr.rows),
              static_cast<long long>(pr.cols));
    return false;
  }
  if (pr.rows > (1 << 24) || pr.cols > (1 << 24) || pr.rows * pr.cols > (int64_t{1} << 31)) {
    set_error("ns_step: matrix %lld x %lld is too large for 32-bit row and column indices",
              static_cast<long long>(pr.rows), static_cast<long long>(pr.cols));
    return false;
  }
  if (!check_dtypes("ns_step", pr.p_dtype, pr.g_dtype, pr.d_dtype)) return false;
  if (pr.compute_dtype != SCION_BFLOAT16 && pr.compute_dtype != SCION_FLOAT16) {
    set_error("ns_step: the compute dtype must be bfloat16 or float16, got code %d",
              pr.compute_dtype);
    return false;
  }
  if (pr.steps < 1 || pr.steps > kMaxSteps) {
    set_error("ns_step: steps must be in [1, %d], got %d", kMaxSteps, pr.steps);
    return false;
  }
  if (pr.tile != 0 && pr.tile != 1 && pr.tile != 64 && pr.tile != 128) {
    set_error("ns_step: tile must be 0 (automatic), 1 (one block per matrix), 64 or 128, got %d",
              pr.tile);
    return false;
  }
  if (pr.tile == 1 &&
      (std::min(pr.rows, pr.cols) > kSmallM || std::max(pr.rows, pr.cols) > kSmallMaxN)) {
    set_error(
        "ns_step: the one-block path (tile 1) takes matrices of at most %d x %d, got "
        "%lld x %lld",
        kSmallM, kSmallMaxN, static_cast<long long>(pr.rows), static_cast<long long>(pr.cols));
    return false;
  }
  if (!(pr.alpha >= 0.0 && pr.alpha <= 1.0)) {
    set_error("ns_step: alpha must be in [0, 1], got %g", pr.alpha);
    return false;
  }
  return true;
}

// What every launch of one call needs; the first failed CUDA call goes to `failure`.
struct Launcher {
  const scion_ns_problem& pr;
  const Plan& plan;
  cudaStream_t stream;
  FirstError& failure;

  bool ok(cudaError_t e, const char* stage) { return failure.ok(e, stage); }
};

template <typename T, typename Cfg>
bool run_products(Launcher& L, const scion_ns_matrix* mats, void* workspace) {
  const scion_ns_problem& pr = L.pr;
  const Plan& plan = L.plan;
  T* x = static_cast<T*>(workspace);
  T* y = x + pr.batch * plan.x_elems;
  T* a = y + pr.batch * plan.x_elems;
  T* b = a + pr.batch * plan.a_elems;
  const int tiles_m = static_cast<int>(plan.m_pad / Cfg::kTile);
  const int tiles_n = static_cast<int>(plan.n_pad / Cfg::kTile);
  const int tri = tiles_m * (tiles_m + 1) / 2;
  const size_t smem = Cfg::kSmemBytes;
  auto* gram = gemm_kernel<T, Product::kGram, Cfg, NoUpdate>;
  auto* poly = gemm_kernel<T, Product::kPoly, Cfg, NoUpdate>;
  auto* apply = gemm_kernel<T, Product::kApply, Cfg, NoUpdate>;
  auto* apply_update = gemm_kernel<T, Product::kApply, Cfg, UpdateArgs>;
  for (const void* f :
       {reinterpret_cast<const void*>(gram), reinterpret_cast<const void*>(poly),
        reinterpret_cast<const void*>(apply), reinterpret_cast<const void*>(apply_update)}) {
    if (!L.ok(cudaFuncSetAttribute(f, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   static_cast<int>(smem)),
              "raising the shared-memory limit")) {
      return false;
    }
  }
  const dim3 block(Cfg::kThreads);
  const int32_t mp = static_cast<int32_t>(plan.m_pad);
  const int32_t np = static_cast<int32_t>(plan.n_pad);
  for (int s = 0; s < pr.steps; ++s) {
    const bool last = s + 1 == pr.steps;
    const float ca = static_cast<float>(pr.coefficients[3 * s]);
    const float cb = static_cast<float>(pr.coefficients[3 * s + 1]);
    const float cc = static_cast<float>(pr.coefficients[3 * s + 2]);
    const dim3 grid_sym(tri, static_cast<unsigned>(pr.batch));
    // A ← X·Xᵀ
    GemmArgs g = product(x, plan.x_elems, np, x, plan.x_elems, np, a, a, plan.a_elems, mp, np, 1.0f,
                         0.0f, tiles_m, tiles_n);
    if (!L.ok(launch_kernel(gram, grid_sym, block, smem, L.stream, g, NoUpdate{}),
              "the X·Xᵀ launch")) {
      return false;
    }
    // B ← b·A + c·A·A
    g = product(a, plan.a_elems, mp, a, plan.a_elems, mp, a, b, plan.a_elems, mp, mp, cc, cb,
                tiles_m, tiles_n);
    if (!L.ok(launch_kernel(poly, grid_sym, block, smem, L.stream, g, NoUpdate{}),
              "the b·A + c·A·A launch")) {
      return false;
    }
    // X ← a·X + B·X
    g = product(b, plan.a_elems, mp, x, plan.x_elems, np, x, y, plan.x_elems, np, mp, 1.0f, ca,
                tiles_m, tiles_n);
    const dim3 grid_apply(static_cast<unsigned>(tiles_m * tiles_n));
    if (!last) {
      if (!L.ok(launch_kernel(apply, dim3(grid_apply.x, static_cast<unsigned>(pr.batch)), block,
                              smem, L.stream, g, NoUpdate{}),
                "the a·X + B·X launch")) {
        return false;
      }
      T* swap = x;
      x = y;
      y = swap;
      continue;
    }
    for (int64_t first = 0; first < pr.batch; first += kMaxRefs) {
      const int count = static_cast<int>(pr.batch - first < kMaxRefs ? pr.batch - first : kMaxRefs);
      UpdateArgs u{};
      u.count = count;
      u.m = static_cast<int32_t>(plan.m);
      u.n = static_cast<int32_t>(plan.n);
      u.p_dtype = static_cast<scion_dtype>(pr.p_dtype);
      u.coef = static_cast<float>(pr.coef);
      u.decay = static_cast<float>(pr.decay);
      const bool tall = pr.rows > pr.cols;
      for (int k = 0; k < count; ++k) {
        const scion_ns_matrix& mat = mats[first + k];
        u.refs[k].p = reinterpret_cast<void*>(static_cast<uintptr_t>(mat.p));
        u.refs[k].rs = tall ? mat.p_strides[1] : mat.p_strides[0];
        u.refs[k].cs = tall ? mat.p_strides[0] : mat.p_strides[1];
        u.refs[k].scale = mat.scale;
      }
      g.batch0 = static_cast<int32_t>(first);
      if (!L.ok(launch_kernel(apply_update, dim3(grid_apply.x, static_cast<unsigned>(count)), block,
                              smem, L.stream, g, u),
                "the a·X + B·X launch with the update")) {
        return false;
      }
    }
  }
  return true;
}

template <typename T>
bool run_small(Launcher& L, const scion_ns_matrix* mats) {
  const scion_ns_problem& pr = L.pr;
  const Plan& plan = L.plan;
  const size_t smem = small_smem_bytes(plan.n_pad);
  if (!L.ok(
          cudaFuncSetAttribute(reinterpret_cast<const void*>(small_kernel<T>),
                               cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
          "raising the shared-memory limit")) {
    return false;
  }
  const bool tall = pr.rows > pr.cols;
  const bool has_buffer = pr.d_dtype != -1;
  SmallArgs args{};
  args.m = static_cast<int32_t>(plan.m);
  args.n = static_cast<int32_t>(plan.n);
  args.n_pad = static_cast<int32_t>(plan.n_pad);
  args.steps = pr.steps;
  for (int i = 0; i < 3 * pr.steps; ++i) args.coef[i] = static_cast<float>(pr.coefficients[i]);
  args.p_dtype = static_cast<scion_dtype>(pr.p_dtype);
  args.g_dtype = static_cast<scion_dtype>(pr.g_dtype);
  args.d_dtype = has_buffer ? static_cast<scion_dtype>(pr.d_dtype) : SCION_FLOAT32;
  args.has_buffer = has_buffer;
  args.alpha = static_cast<float>(pr.alpha);
  args.beta = static_cast<float>(1.0 - pr.alpha);
  args.update_coef = static_cast<float>(pr.coef);
  args.decay = static_cast<float>(pr.decay);
  const int r = tall ? 1 : 0;  // which stride walks the oriented rows
  for (int64_t first = 0; first < pr.batch; first += kSmallRefs) {
    const int count =
        static_cast<int>(pr.batch - first < kSmallRefs ? pr.batch - first : kSmallRefs);
    for (int k = 0; k < count; ++k) {
      const scion_ns_matrix& mat = mats[first + k];
      args.refs[k] = SmallRef{reinterpret_cast<const void*>(static_cast<uintptr_t>(mat.g)),
                              reinterpret_cast<void*>(static_cast<uintptr_t>(mat.d)),
                              reinterpret_cast<void*>(static_cast<uintptr_t>(mat.p)),
                              mat.g_strides[r],
                              mat.g_strides[1 - r],
                              mat.d_strides[r],
                              mat.d_strides[1 - r],
                              mat.p_strides[r],
                              mat.p_strides[1 - r],
                              mat.scale};
    }
    if (!L.ok(
            launch_kernel(small_kernel<T>, dim3(count), dim3(kSmallThreads), smem, L.stream, args),
            "the one-block launch")) {
      return false;
    }
  }
  return true;
}

template <typename T>
bool run(Launcher& L, const scion_ns_matrix* mats, void* workspace) {
  if (L.plan.tile == 1) return run_small<T>(L, mats);
  const scion_ns_problem& pr = L.pr;
  const Plan& plan = L.plan;
  T* x = static_cast<T*>(workspace);
  auto* partial = reinterpret_cast<double*>(
      static_cast<unsigned char*>(workspace) +
      round_up(pr.batch * (2 * plan.x_elems + 2 * plan.a_elems) * 2, 256));
  const bool has_buffer = pr.d_dtype != -1;
  for (int64_t first = 0; first < pr.batch; first += kMaxRefs) {
    const int count = static_cast<int>(pr.batch - first < kMaxRefs ? pr.batch - first : kMaxRefs);
    SourceArgs src{};
    src.count = count;
    src.rows = static_cast<int32_t>(pr.rows);
    src.cols = static_cast<int32_t>(pr.cols);
    src.chunk_rows = plan.chunk_rows;
    src.chunks = plan.chunks;
    src.g_dtype = static_cast<scion_dtype>(pr.g_dtype);
    src.d_dtype = has_buffer ? static_cast<scion_dtype>(pr.d_dtype) : SCION_FLOAT32;
    src.has_buffer = has_buffer;
    src.alpha = static_cast<float>(pr.alpha);
    src.beta = static_cast<float>(1.0 - pr.alpha);
    src.partial = partial + first * plan.chunks;
    for (int k = 0; k < count; ++k) {
      const scion_ns_matrix& mat = mats[first + k];
      SourceRef& r = src.refs[k];
      r.g = reinterpret_cast<const void*>(static_cast<uintptr_t>(mat.g));
      r.d = reinterpret_cast<void*>(static_cast<uintptr_t>(mat.d));
      r.g_rs = mat.g_strides[0];
      r.g_cs = mat.g_strides[1];
      r.d_rs = mat.d_strides[0];
      r.d_cs = mat.d_strides[1];
    }
    const size_t sums = (kThreads + 1) * sizeof(double);
    if (!L.ok(launch_kernel(average_kernel, dim3(plan.chunks, count), dim3(kThreads), sums,
                            L.stream, src),
              "the averaging launch")) {
      return false;
    }
    NormalizeArgs na{};
    na.m_pad = static_cast<int32_t>(plan.m_pad);
    na.n_pad = static_cast<int32_t>(plan.n_pad);
    na.col_blocks = static_cast<int32_t>((plan.n_pad + kNormCols - 1) / kNormCols);
    na.tall = pr.rows > pr.cols;
    na.x = x + first * plan.x_elems;
    na.chunks = plan.chunks;
    na.partial = src.partial;
    const size_t norm_smem = kNormSumsBytes + 32 * 33 * sizeof(float);
    const unsigned norm_blocks = static_cast<unsigned>(plan.m_pad / 32 * na.col_blocks);
    if (!L.ok(launch_kernel(normalize_kernel<T>, dim3(norm_blocks, count), dim3(kThreads),
                            norm_smem, L.stream, src, na),
              "the normalization launch")) {
      return false;
    }
  }
  if (plan.tile == 128) return run_products<T, TileLarge>(L, mats, workspace);
  return run_products<T, TileSmall>(L, mats, workspace);
}

}  // namespace
}  // namespace scion

extern "C" {

int64_t scion_ns_workspace_bytes(const scion_ns_problem* problem) {
  using namespace scion;
  clear_error();
  if (problem == nullptr || !check(*problem)) return -1;
  return static_cast<int64_t>(
      make_plan(problem->batch, problem->rows, problem->cols, problem->tile).bytes);
}

int scion_ns_tile(const scion_ns_problem* problem) {
  using namespace scion;
  clear_error();
  if (problem == nullptr || !check(*problem)) return -1;
  return make_plan(problem->batch, problem->rows, problem->cols, problem->tile).tile;
}

scion_status scion_ns_step(const scion_ns_problem* problem, const scion_ns_matrix* matrices,
                           void* workspace, int64_t workspace_bytes, int device,
                           scion_stream_t stream) {
  using namespace scion;
  clear_error();
  if (problem == nullptr || !check(*problem)) return SCION_ERROR_INVALID_ARGUMENT;
  const scion_ns_problem& pr = *problem;
  if (pr.batch == 0) return SCION_OK;
  const Plan plan = make_plan(pr.batch, pr.rows, pr.cols, pr.tile);
  if (matrices == nullptr || (workspace == nullptr && plan.bytes > 0)) {
    set_error("ns_step: matrices and workspace must not be NULL");
    return SCION_ERROR_INVALID_ARGUMENT;
  }
  if (pr.batch > 65535) {
    set_error("ns_step: at most 65535 matrices per bucket, got %lld",
              static_cast<long long>(pr.batch));
    return SCION_ERROR_INVALID_ARGUMENT;
  }
  if (workspace_bytes < static_cast<int64_t>(plan.bytes) ||
      reinterpret_cast<uintptr_t>(workspace) % 256 != 0) {
    set_error("ns_step: the workspace must hold %lld bytes at a 256-byte aligned address, got %lld",
              static_cast<long long>(plan.bytes), static_cast<long long>(workspace_bytes));
    return SCION_ERROR_INVALID_ARGUMENT;
  }
  for (int64_t k = 0; k < pr.batch; ++k) {
    const scion_ns_matrix& mat = matrices[k];
    if (mat.p == 0 || mat.g == 0 || ((pr.d_dtype != -1) != (mat.d != 0))) {
      set_error(
          "ns_step: matrix %lld has a null parameter or gradient address, or a buffer "
          "address that does not match the buffer dtype",
          static_cast<long long>(k));
      return SCION_ERROR_INVALID_ARGUMENT;
    }
  }

  DeviceGuard current(device, "ns_step");
  if (!current.ok()) return SCION_ERROR_CUDA;
  FirstError failure;
  Launcher L{pr, plan, reinterpret_cast<cudaStream_t>(stream), failure};
  if (pr.compute_dtype == SCION_BFLOAT16) {
    run<__nv_bfloat16>(L, matrices, workspace);
  } else {
    run<__half>(L, matrices, workspace);
  }
  failure.ok(current.restore(), "restoring the current device");
  if (failure.err != cudaSuccess) {
    set_error(
        "ns_step: %s failed: %s (%s) [%lld matrices of %lld x %lld, tile %d, device "
        "%d]",
        failure.what, cudaGetErrorName(failure.err), cudaGetErrorString(failure.err),
        static_cast<long long>(pr.batch), static_cast<long long>(pr.rows),
        static_cast<long long>(pr.cols), plan.tile, device);
    return SCION_ERROR_CUDA;
  }
  return SCION_OK;
}

}  // extern "C"
