// Newton–Schulz kernel 3 (see newton_schulz.cu): the tiled tensor-core products of every step —
// X·Xᵀ and b·A + c·A·A on upper-triangle tiles, a·X + B·X on the full grid, the last one with the
// parameter update in its epilogue — and the warp-level pieces they share with the one-block path
// (ns_small.cuh).
//
// Included by ns_launch.cu only: a kernel is defined in the one source file that launches it.
#ifndef SCION_NS_GEMM_CUH_
#define SCION_NS_GEMM_CUH_

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "device.cuh"
#include "ns_plan.cuh"

namespace scion::ns {

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
  // Per product (the interface WgmmaTiling shares): a tile's columns, the shared memory.
  static constexpr int columns(Product) { return kTile; }
  static constexpr size_t smem_bytes(Product) { return kSmemBytes; }
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
  int32_t matrices;            // matrices of this launch
  int32_t per_matrix;          // output tiles per matrix (the wgmma kernels walk them)
  float acc_scale, add_scale;  // out = acc_scale·acc + add_scale·add
  float diag_scale;            // kPoly: + diag_scale on the diagonal (the Gram form's a·I)
};

struct NoUpdate {};

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
  const float* lr;  // the device learning rate t, or null (see step_factors)
};
static_assert(sizeof(UpdateArgs) <= 3072, "update references leave too little argument space");

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

// The tiles of `tiles` × `tiles` blocks (kTile square) that the symmetric products compute: tiles
// of one block row and kRatio block columns that reach the upper triangle, the diagonal
// included. Row ti holds tiles tj = ti / kRatio .. cols - 1, of cols = ceil(tiles / kRatio); for
// kRatio 1 that is the upper triangle, ti ≤ tj. triangle_tile maps a linear index over them, row
// by row; triangle_tiles counts them.
template <int kRatio = 1>
__host__ __device__ inline void triangle_tile(int index, int tiles, int& ti, int& tj) {
  const int cols = (tiles + kRatio - 1) / kRatio;
  ti = 0;
  while (index >= cols - ti / kRatio) {
    index -= cols - ti / kRatio;
    ++ti;
  }
  tj = ti / kRatio + index;
}
template <int kRatio = 1>
__host__ __device__ inline int triangle_tiles(int tiles) {
  const int cols = (tiles + kRatio - 1) / kRatio;
  int count = 0;
  for (int ti = 0; ti < tiles; ++ti) count += cols - ti / kRatio;
  return count;
}

// What a product block works on: its matrix (the launch's `local`-th, the bucket's `matrix`-th)
// and that matrix's operands, and its output tile (ti, tj) of kTile rows × kTileN columns, whose
// first element is (row0, col0): the full grid row by row (kApply, args.tiles_n tiles to a row),
// or the triangle's tiles (the symmetric products, triangle_tile).
template <typename T, Product kProduct, int kTile, int kTileN = kTile>
struct BlockTile {
  static_assert(kTileN % kTile == 0, "a tile spans whole blocks of columns");
  int local, matrix, ti, tj, row0, col0;
  const T* a;
  const T* b;

  // The block's tile of a launch with a block per tile (blockIdx.x) and matrix (blockIdx.y).
  __device__ __forceinline__ explicit BlockTile(const GemmArgs& args)
      : BlockTile(args, static_cast<int>(blockIdx.y), static_cast<int>(blockIdx.x)) {}

  // Tile `index` of the launch's `local`-th matrix.
  __device__ __forceinline__ BlockTile(const GemmArgs& args, int local_, int index)
      : local(local_), matrix(args.batch0 + local_) {
    if constexpr (kProduct == Product::kApply) {
      ti = index / args.tiles_n;
      tj = index % args.tiles_n;
    } else {
      triangle_tile<kTileN / kTile>(index, args.tiles, ti, tj);
    }
    row0 = ti * kTile;
    col0 = tj * kTileN;
    a = static_cast<const T*>(args.a) + matrix * args.a_batch;
    b = static_cast<const T*>(args.b) + matrix * args.b_batch;
  }
};

// The barrier of store_tile when every thread of the block takes part.
struct BlockSync {
  __device__ __forceinline__ void operator()() const { __syncthreads(); }
};

// The epilogue of every tiled product: out = acc_scale·acc + add_scale·add (kPoly: + diag_scale
// on the diagonal), rounded to T and staged in shared memory (the pipeline's buffers, free once
// every thread is done with them: the first barrier below), then written out coalesced:
//   - the tile in 16-byte row pieces, and for the symmetric products the mirror of what lies
//     right of the diagonal, walked along the mirror's rows;
//   - or, in the last kApply, the parameter update, walked along the parameter's contiguous
//     dimension (tall parameters have X's columns as their rows).
// `for_each(f)` calls f(value, row, column) for every accumulator element this thread holds, in
// the output's coordinates (the block's tile `at`). kThreads threads, numbered `tid` from 0,
// take part and meet at `sync()` (by default the whole block's barrier). A kApply tile wider
// than kTile may overhang the output's columns (args.ldc of them): those are neither read nor
// written.
template <int kThreads, typename T, Product kProduct, int kTile, int kTileN, typename Update,
          typename ForEach, typename Sync = BlockSync>
__device__ __forceinline__ void store_tile(const GemmArgs& args, const Update& upd, T* smem,
                                           int tid, const BlockTile<T, kProduct, kTile, kTileN>& at,
                                           ForEach&& for_each, Sync sync = Sync{}) {
  const int row0 = at.row0;
  const int col0 = at.col0;
  constexpr bool kUpdate = kProduct == Product::kApply && !std::is_same<Update, NoUpdate>::value;
  constexpr int kStageLd = kTileN + 8;
  constexpr bool kOverhang = kTileN > kTile;
  const T* add = static_cast<const T*>(args.add) + at.matrix * args.out_batch;
  sync();
  for_each([&](float a_rc, int r, int c) {
    if (kOverhang && c >= args.ldc) return;
    float v = args.acc_scale * a_rc;
    if constexpr (kProduct != Product::kGram) {
      v = __fmaf_rn(args.add_scale, Operand<T>::to(add[static_cast<int64_t>(r) * args.ldc + c]), v);
    }
    if constexpr (kProduct == Product::kPoly) {
      if (r == c && args.diag_scale != 0.0f) v += args.diag_scale;
    }
    smem[(r - row0) * kStageLd + (c - col0)] = Operand<T>::from(v);
  });
  sync();
  if constexpr (kUpdate) {
    const UpdateRef& ref = upd.refs[at.local];
    const StepFactors f = step_factors(upd.lr, upd.coef, upd.decay);
    const bool rows_fast = (ref.rs < 0 ? -ref.rs : ref.rs) < (ref.cs < 0 ? -ref.cs : ref.cs);
    for (int idx = tid; idx < kTile * kTileN; idx += kThreads) {
      const int lr = rows_fast ? idx % kTile : idx / kTileN;
      const int lc = rows_fast ? idx / kTile : idx % kTileN;
      const int r = row0 + lr;
      const int c = col0 + lc;
      if (r < upd.m && c < upd.n) {
        const int64_t at = r * ref.rs + c * ref.cs;
        const float x = load_as_float(ref.p, at, upd.p_dtype);
        const float u = ref.scale * Operand<T>::to(smem[lr * kStageLd + lc]);
        store_from_float(ref.p, at, upd.p_dtype, __fmaf_rn(f.coef, u, __fmul_rn(f.decay, x)));
      }
    }
    return;
  }
  T* out = static_cast<T*>(args.out) + at.matrix * args.out_batch;
  // `cols` staged columns from lc0 to the output's columns c0.., in 16-byte row pieces.
  auto store_rows = [&](int c0, int lc0, int cols) {
    const int pieces = cols / 8;
    for (int idx = tid; idx < kTile * pieces; idx += kThreads) {
      const int lr = idx / pieces;
      const int lc = idx % pieces * 8;
      if (kOverhang && c0 + lc >= args.ldc) continue;
      *reinterpret_cast<uint4*>(out + static_cast<int64_t>(row0 + lr) * args.ldc + c0 + lc) =
          *reinterpret_cast<const uint4*>(smem + lr * kStageLd + lc0 + lc);
    }
  };
  if constexpr (kProduct == Product::kApply) {
    store_rows(col0, 0, kTileN);
  } else {
    // The symmetric products, kTile columns at a time (the whole tile when square). Left of the
    // diagonal, the tile whose mirror this is stores it: skipped. On it, both triangles are
    // computed; keep the upper one's, so the result is exactly symmetric also where a·bᵀ is so
    // only in exact arithmetic (the Gram form's products, whose transposes the next products
    // read; reads and writes are disjoint). Right of it: stored, and mirrored along the
    // mirror's rows. Past the matrix (a wide tile's overhang): skipped.
    for (int h = 0; h < kTileN / kTile; ++h) {
      const int c0 = col0 + h * kTile;
      if (c0 < row0 || c0 >= args.ldc) continue;
      T* block = smem + h * kTile;
      if (c0 == row0) {
        for (int idx = tid; idx < kTile * kTile; idx += kThreads) {
          const int lr = idx / kTile;
          const int lc = idx % kTile;
          if (lr > lc) block[lr * kStageLd + lc] = block[lc * kStageLd + lr];
        }
        sync();
      }
      store_rows(c0, h * kTile, kTile);
      if (c0 != row0) {
        for (int idx = tid; idx < kTile * kTile; idx += kThreads) {
          const int lr = idx % kTile;
          const int lc = idx / kTile;
          out[static_cast<int64_t>(c0 + lc) * args.ldc + row0 + lr] = block[lr * kStageLd + lc];
        }
      }
    }
  }
}

// Asynchronous copy of a kRows × kCols block of 16-bit elements, row-major at `src` (rows
// `src_ld` apart) into shared memory at `dst` (rows `dst_ld` apart), in 16-byte pieces spread
// over kThreads threads.
template <int kRows, int kCols, int kThreads, typename T>
__device__ __forceinline__ void copy_block(T* dst, int dst_ld, const T* src, int64_t src_ld,
                                           int tid) {
  constexpr int kPieces = kCols / 8;
  for (int c = tid; c < kRows * kPieces; c += kThreads) {
    const int r = c / kPieces;
    const int k = (c % kPieces) * 8;
    cp_async_16(dst + r * dst_ld + k, src + r * src_ld + k);
  }
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
  const BlockTile<T, kProduct, kTile> at(args);
  const int row0 = at.row0;
  const int col0 = at.col0;
  const T* a = at.a;
  const T* b = at.b;

  // Stage s: the left tile [kTile][kRowA], then the right tile ([kTile][kRowA], or [kK][kRowT]
  // when transposed).
  auto stage_a = [&](int s) { return smem + s * Cfg::kStageElems; };
  auto stage_b = [&](int s) { return smem + s * Cfg::kStageElems + kTile * Cfg::kRowA; };

  auto load_stage = [&](int s, int k0) {
    constexpr int kThreads = Cfg::kThreads;
    copy_block<kTile, kK, kThreads>(stage_a(s), Cfg::kRowA,
                                    a + static_cast<int64_t>(row0) * args.lda + k0, args.lda, tid);
    if constexpr (kTransB) {
      copy_block<kK, kTile, kThreads>(
          stage_b(s), Cfg::kRowT, b + static_cast<int64_t>(k0) * args.ldb + col0, args.ldb, tid);
    } else {
      copy_block<kTile, kK, kThreads>(
          stage_b(s), Cfg::kRowA, b + static_cast<int64_t>(col0) * args.ldb + k0, args.ldb, tid);
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

  static_assert(size_t{kTile} * (kTile + 8) * sizeof(T) <= Cfg::kSmemBytes, "staging tile too big");
  store_tile<Cfg::kThreads>(args, upd, smem, tid, at, [&](auto&& f) {
    for_each_acc(acc, row0 + warp_m * Cfg::kWarpM, col0 + warp_n * Cfg::kWarpN, lane, f);
  });
}

}  // namespace scion::ns

#endif  // SCION_NS_GEMM_CUH_
