// Newton–Schulz kernel 3 on Hopper (sm_90a): the same products as ns_gemm.cuh — X·Xᵀ and
// b·A + c·A·A on upper-triangle tiles, a·X + B·X on the full grid with the parameter update in
// the last one's epilogue — on the warpgroup tensor-core instructions (wgmma.mma_async), sharing
// ns_gemm.cuh's epilogue (store_tile).
//
// A block computes a 128×128 tile with two warpgroups of 64 rows each; K streams through
// shared memory in stages of 64, with cp.async, two stages ahead of the products and (but in
// a·X + B·X) one product group in flight per warpgroup. Both operands of wgmma are K-major, so no
// operand is ever transposed in shared memory:
//   - X·Xᵀ, b·A + c·A·A (and the Gram form's products): D = L·Rᵀ with L and R read row by row,
//     both from shared memory in the K-major 128-byte swizzle;
//   - a·X + B·X is computed transposed, Dᵀ = Xᵀ·Bᵀ: A = Xᵀ comes from registers (ldmatrix.trans
//     of X's row-major stage, as the sm_80 kernel reads it), and Bᵀ's K-major form is B's rows,
//     in the same swizzle. The epilogue writes Dᵀ's elements back in place.
//
// Included by ns_launch.cu only: a kernel is defined in the one source file that launches it.
#ifndef SCION_NS_WGMMA_CUH_
#define SCION_NS_WGMMA_CUH_

#include <cstddef>
#include <cstdint>

#include "device.cuh"
#include "ns_gemm.cuh"

namespace scion::ns {

struct WgmmaTiling {
  static constexpr int kTile = 128;
  static constexpr int kThreads = 256;  // two warpgroups
  static constexpr int kK = 64;         // K per stage: four m64n128k16 products
  static constexpr int kStages = 4;
  static constexpr int kAhead = kStages - 2;  // stages loaded ahead of the products
  // A K-major operand of kTile rows × kK in the 128-byte swizzle: one 128-byte row per matrix
  // row, 8-row atoms of 1024 bytes (SBO), a k16 slice 32 bytes further along the row.
  static constexpr int kRowBytes = kK * 2;
  static constexpr int kAtomBytes = 8 * kRowBytes;
  static constexpr int kOperandBytes = kTile * kRowBytes;
  static_assert(kRowBytes == 128, "the 128-byte swizzle holds exactly kK = 64 16-bit elements");
  // X's stage in kApply, row-major [kK][kRowT] (padded against ldmatrix bank conflicts).
  static constexpr int kRowT = kTile + 8;
  static constexpr int kXBytes = kK * kRowT * 2;
  static constexpr int kStageBytes =
      kOperandBytes + (kXBytes > kOperandBytes ? kXBytes : kOperandBytes);
  static constexpr size_t kSmemBytes = size_t{kStages} * kStageBytes;
  static_assert(kStageBytes % kAtomBytes == 0, "stages must keep the swizzle atoms aligned");
  static_assert(size_t{kTile} * (kTile + 8) * 2 <= kSmemBytes, "staging tile too big");
};

// Copies rows row0.. (kTile of them) × columns k0..k0+kK of a row-major matrix into the
// K-major 128-byte swizzle: row r at byte 128·r, its 16-byte chunk j at chunk j ^ (r % 8) (the
// layout TMA's 128-byte swizzle writes; bank-conflict free for wgmma's reads). Consecutive
// threads copy consecutive chunks of a row.
template <typename T, typename Cfg>
__device__ __forceinline__ void load_k_major(unsigned char* dst, const T* src, int64_t ld, int row0,
                                             int k0, int tid) {
  constexpr int kChunks = Cfg::kRowBytes / 16;
  for (int c = tid; c < Cfg::kTile * kChunks; c += Cfg::kThreads) {
    const int r = c / kChunks;
    const int j = c % kChunks;
    cp_async_16(dst + r * Cfg::kRowBytes + 16 * (j ^ (r % 8)),
                src + static_cast<int64_t>(row0 + r) * ld + k0 + 8 * j);
  }
}

template <typename T, Product kProduct, typename Cfg, typename Update>
__global__ void __launch_bounds__(Cfg::kThreads, 1)
    wgmma_kernel(const GemmArgs args, const __grid_constant__ Update upd) {
#if SCION_WGMMA
  static_assert(Cfg::kK == 64 && Cfg::kTile == 128 && Cfg::kThreads == 256,
                "the loaders and fragment maps below are written for this tiling");
  constexpr int kTile = Cfg::kTile;
  constexpr int kK = Cfg::kK;
  constexpr int kStages = Cfg::kStages;
  constexpr bool kTransposed = kProduct == Product::kApply;
  unsigned char* smem = dynamic_smem();
  const int tid = static_cast<int>(threadIdx.x);
  const int group = tid / 128;        // warpgroup: rows 64·group.. of its D
  const int warp = (tid % 128) / 32;  // warp within the warpgroup
  const int lane = tid % 32;
  const BlockTile<T, kProduct, kTile> at(args);
  const int row0 = at.row0;
  const int col0 = at.col0;
  const T* a = at.a;
  const T* b = at.b;

  // Stage s: the K-major operand (L's rows row0..; kApply: B's rows row0..), then R's rows
  // col0.. in the same layout, or (kApply) X's rows k.. × columns col0.. row-major.
  auto stage_l = [&](int s) { return smem + s * Cfg::kStageBytes; };
  auto stage_r = [&](int s) { return smem + s * Cfg::kStageBytes + Cfg::kOperandBytes; };
  auto load_stage = [&](int s, int k0) {
    load_k_major<T, Cfg>(stage_l(s), a, args.lda, row0, k0, tid);
    if constexpr (kTransposed) {
      copy_block<kK, kTile, Cfg::kThreads>(reinterpret_cast<T*>(stage_r(s)), Cfg::kRowT,
                                           b + static_cast<int64_t>(k0) * args.ldb + col0, args.ldb,
                                           tid);
    } else {
      load_k_major<T, Cfg>(stage_r(s), b, args.ldb, col0, k0, tid);
    }
  };

  float acc[64];
  SCION_UNROLL
  for (int i = 0; i < 64; ++i) acc[i] = 0.0f;

  const int ktiles = args.k / kK;
  SCION_UNROLL
  for (int s = 0; s < Cfg::kAhead; ++s) {
    if (s < ktiles) load_stage(s, s * kK);
    cp_async_commit();
  }
  // One K stage: its products are issued and left in flight, the previous stage's waited for —
  // except in kApply, whose products read Xᵀ's fragments from registers: ptxas serializes
  // products whose register inputs are written while earlier ones are in flight (C7513), so
  // there each stage's products are waited for before the next stage's fragments are loaded,
  // and the two warpgroups overlap each other instead.
  uint32_t frag[kK / 16][4];
  for (int kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<Cfg::kAhead - 1>();
    fence_proxy_async();  // the copies were generic-proxy writes; wgmma reads through the async one
    __syncthreads();
    // Every warpgroup has waited for the products of stage kt - 2 (at the end of stage kt - 1):
    // their buffer is free again.
    const int next = kt + Cfg::kAhead;
    if (next < ktiles) load_stage(next % kStages, next * kK);
    cp_async_commit();

    const int s = kt % kStages;
    if constexpr (kTransposed) {
      // Xᵀ's fragments for rows (X's columns) 64·group + 16·warp.., k16 slice by slice.
      const T* sx = reinterpret_cast<const T*>(stage_r(s));
      SCION_UNROLL
      for (int kk = 0; kk < kK / 16; ++kk) {
        const int k = kk * 16 + lane % 8 + 8 * (lane / 16);
        const int n = 64 * group + 16 * warp + 8 * ((lane / 8) % 2);
        ldmatrix_x4<true>(frag[kk], sx + k * Cfg::kRowT + n);
      }
      fence_accumulators(acc);
      wgmma_fence();
      SCION_UNROLL
      for (int kk = 0; kk < kK / 16; ++kk) {
        const uint64_t desc_b = smem_descriptor_sw128(stage_l(s) + 32 * kk, Cfg::kAtomBytes);
        wgmma_rs<T>(acc, frag[kk], desc_b, true);
      }
    } else {
      fence_accumulators(acc);
      wgmma_fence();
      SCION_UNROLL
      for (int kk = 0; kk < kK / 16; ++kk) {
        const uint64_t desc_a = smem_descriptor_sw128(
            stage_l(s) + 64 * group * Cfg::kRowBytes + 32 * kk, Cfg::kAtomBytes);
        const uint64_t desc_b = smem_descriptor_sw128(stage_r(s) + 32 * kk, Cfg::kAtomBytes);
        wgmma_ss<T>(acc, desc_a, desc_b, true);
      }
    }
    wgmma_commit();
    if constexpr (kTransposed) {
      wgmma_wait<0>();
    } else {
      wgmma_wait<1>();
    }
    fence_accumulators(acc);
  }
  wgmma_wait<0>();
  fence_accumulators(acc);
  cp_async_wait<0>();

  // acc[i] is element (64·group + 16·warp + lane/4 + 8·((i/2)%2), 8·(i/4) + 2·(lane%4) + i%2) of
  // the block's D; for kApply D is the output tile's transpose.
  store_tile<T, kProduct, kTile, Cfg::kThreads>(
      args, upd, reinterpret_cast<T*>(smem), tid, at.local, at.matrix, at.ti, at.tj, [&](auto&& f) {
        SCION_UNROLL
        for (int i = 0; i < 64; ++i) {
          const int dr = 64 * group + 16 * warp + lane / 4 + 8 * ((i / 2) % 2);
          const int dc = 8 * (i / 4) + 2 * (lane % 4) + i % 2;
          if constexpr (kTransposed) {
            f(acc[i], row0 + dc, col0 + dr);
          } else {
            f(acc[i], row0 + dr, col0 + dc);
          }
        }
      });
#else
  (void)args, (void)upd;
  __trap();  // launched only where the loaded image is sm_90a (see the launcher)
#endif
}

}  // namespace scion::ns

#endif  // SCION_NS_WGMMA_CUH_
