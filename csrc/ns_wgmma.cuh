// Newton–Schulz kernel 3 on Hopper (sm_90a): the same products as ns_gemm.cuh — X·Xᵀ and
// b·A + c·A·A on upper-triangle tiles, a·X + B·X on the full grid with the parameter update in
// the last one's epilogue — on the warpgroup tensor-core instructions (wgmma.mma_async), fed by
// the tensor memory accelerator (TMA), sharing ns_gemm.cuh's epilogue (store_tile).
//
// A block computes tiles of 128 rows × 128 or 256 columns (WgmmaTiling<columns of a·X + B·X,
// of the symmetric products>): one, or when launched persistent (a block per multiprocessor)
// every gridDim.x-th tile of the launch in turn. A producer warpgroup, of which one thread
// issues the TMA copies, and two consumer warpgroups of 64 rows each, which alone run the
// epilogue (store_tile, through a staging tile of its own: the producer is already loading the
// next tile). K streams through shared memory in stages of 64, in one sequence across a block's
// tiles; each stage has two mbarriers: `full` (its copies have landed) and `empty` (both
// consumers are done with it). The producer runs up to the stage count ahead, and every
// consumer keeps one product group in flight (but in one a·X + B·X, see below). Every operand
// is read as TMA stored it, never transposed in shared memory, in the 128-byte swizzle, which
// TMA writes and which wgmma's descriptors and ldmatrix read without bank conflicts:
//   - X·Xᵀ, b·A + c·A·A (and the Gram form's products): D = L·Rᵀ with L and R read row by row,
//     both from shared memory through descriptors, R in one or two boxes of 128 rows (256-wide
//     triangle tiles straddle the diagonal: store_tile keeps what lies on or above it);
//   - a·X + B·X (kXShared false) is computed transposed, Dᵀ = Xᵀ·Bᵀ: A = Xᵀ comes from registers
//     (ldmatrix.trans of X's stage, two 64×64 boxes), and Bᵀ's K-major form is B's rows. The
//     epilogue writes Dᵀ's elements back in place. ptxas serializes products whose register
//     inputs are written while earlier ones are in flight (C7513), so here each stage's products
//     are waited for before the next stage's fragments are loaded;
//   - or (kXShared) D = B·X with X read from the same boxes as an N-major operand (the
//     descriptor's transpose bit), so its products overlap as the others' do. On 128×256 tiles
//     (m64n256k16, 128 accumulators a thread: ptxas fits a consumer in the 168 registers a
//     thread of 384 has, with no setmaxnreg) a tile may overhang X's padded columns by 128
//     (TMA reads zeros there, store_tile writes nothing).
//
// Included by ns_launch.cu only: a kernel is defined in the one source file that launches it.
#ifndef SCION_NS_WGMMA_CUH_
#define SCION_NS_WGMMA_CUH_

#include <cstddef>
#include <cstdint>

#include "device.cuh"
#include "ns_gemm.cuh"

namespace scion::ns {

template <int kApplyN_, int kSquareN_ = 128>
struct WgmmaTiling {
  static constexpr int kTile = 128;           // rows of every tile
  static constexpr int kApplyN = kApplyN_;    // columns of a·X + B·X's tiles: 128 or 256
  static constexpr int kSquareN = kSquareN_;  // of the symmetric products' tiles: 128 or 256
  static constexpr int kThreads = 384;        // the producer warpgroup, then two consumers
  static constexpr int kK = 64;               // K per stage: four k16 products
  // A box of kTile rows × kK in the 128-byte swizzle: one 128-byte row per matrix row, 8-row
  // atoms of 1024 bytes (SBO), a k16 slice 32 bytes further along the row.
  static constexpr int kRowBytes = kK * 2;
  static constexpr int kAtomBytes = 8 * kRowBytes;
  static constexpr int kOperandBytes = kTile * kRowBytes;
  static_assert(kRowBytes == 128, "the 128-byte swizzle holds exactly kK = 64 16-bit elements");
  static_assert((kApplyN == 128 || kApplyN == 256) && (kSquareN == 128 || kSquareN == 256),
                "m64n128k16 or m64n256k16");
  // kApply's X stage: kK rows × kApplyN columns as boxes of kK × 64 columns, same swizzle.
  static constexpr int kBoxBytes = kK * 128;
  static_assert(kOperandBytes % kAtomBytes == 0 && kBoxBytes % kAtomBytes == 0,
                "stages must keep the swizzle atoms aligned");
  // Per product, the layout of shared memory: `stages` stages (the left operand's box, then the
  // right one's), from `barriers` the stages' `full` and `empty` mbarriers, from `staging` the
  // epilogue's tile (its own, so that a persistent block's next loads overlap it).
  static constexpr int columns(Product p) { return p == Product::kApply ? kApplyN : kSquareN; }
  static constexpr int stages(Product p) { return columns(p) > 128 ? 3 : 4; }
  static constexpr int stage_bytes(Product p) { return kOperandBytes + columns(p) * kRowBytes; }
  static constexpr int barriers(Product p) { return stages(p) * stage_bytes(p); }
  static constexpr int staging(Product p) {
    return (barriers(p) + 16 * stages(p) + 127) / 128 * 128;
  }
  static constexpr size_t smem_bytes(Product p) {
    return static_cast<size_t>(staging(p)) + size_t{kTile} * (columns(p) + 8) * 2;
  }
  static_assert(smem_bytes(Product::kApply) <= 227 * 1024 &&
                    smem_bytes(Product::kGram) <= 227 * 1024,
                "above Hopper's shared memory a block");
};

template <typename Cfg>
inline constexpr bool kIsWgmma = false;
template <int kApplyN, int kSquareN>
inline constexpr bool kIsWgmma<WgmmaTiling<kApplyN, kSquareN>> = true;

// The tensor maps of one launch (3-D: columns, rows, matrices; boxes of 64 columns in the
// 128-byte swizzle): the left operand (kTile rows a box), and the right one (the symmetric
// products: kTile rows; kApply: X, kK rows).
struct TmaMaps {
  CUtensorMap left, right;
};

// The consumers' barrier in the epilogue (the producer warpgroup is not there).
struct ConsumerSync {
  __device__ __forceinline__ void operator()() const { named_barrier_sync(1, 256); }
};

template <typename T, Product kProduct, typename Cfg, typename Update, bool kXShared>
__global__ void __launch_bounds__(Cfg::kThreads, 1)
    wgmma_kernel(const GemmArgs args, const __grid_constant__ TmaMaps maps,
                 const __grid_constant__ Update upd) {
#if SCION_WGMMA
  static_assert(Cfg::kK == 64 && Cfg::kTile == 128 && Cfg::kThreads == 384,
                "the fragment maps below are written for this tiling");
  constexpr int kTile = Cfg::kTile;
  constexpr int kK = Cfg::kK;
  constexpr int kStages = Cfg::stages(kProduct);
  constexpr int kN = Cfg::columns(kProduct);  // the tile's columns
  constexpr int kRegs = kN / 2;               // accumulators a consumer thread
  constexpr bool kApply = kProduct == Product::kApply;
  constexpr bool kTransposed = kApply && !kXShared;  // Dᵀ, Xᵀ from registers
  static_assert(!kTransposed || kN == kTile, "Xᵀ from registers on square tiles only");
  using Tile = BlockTile<T, kProduct, kTile, kN>;
  unsigned char* smem = dynamic_smem();
  auto* full = reinterpret_cast<uint64_t*>(smem + Cfg::barriers(kProduct));  // stage s landed
  uint64_t* empty = full + kStages;  // both consumers are done with stage s
  const int tid = static_cast<int>(threadIdx.x);
  const int group = tid / 128 - 1;    // consumer warpgroup: rows 64·group.. of D; -1: producer
  const int warp = (tid % 128) / 32;  // warp within the warpgroup
  const int lane = tid % 32;
  // The block walks tiles blockIdx.x, + gridDim.x, ... of the launch (all its matrices' in
  // turn): one of them with a block per tile, several when persistent. K stages run through
  // the buffers in one sequence across the tiles: stage `seq` in buffer seq % kStages.
  const int per_matrix = args.per_matrix;
  const int tiles = per_matrix * args.matrices;
  const int ktiles = args.k / kK;

  // Stage s: the left operand's box (L's rows row0..; kApply: B's rows row0..), then the right
  // one's (R's rows col0.., kN / kTile boxes; kApply: X's rows k.. × columns col0.., kN / 64
  // boxes).
  constexpr int kStageBytes = Cfg::stage_bytes(kProduct);
  auto stage_l = [&](int s) { return smem + s * kStageBytes; };
  auto stage_r = [&](int s) { return smem + s * kStageBytes + Cfg::kOperandBytes; };
  auto load_stage = [&](int s, int k0, const Tile& at) {  // the producer thread
    // The stage's last readers are done (its `empty` barrier): order their generic-proxy reads
    // (kApply's ldmatrix) before the async-proxy writes.
    fence_proxy_async();
    mbarrier_arrive_expect_tx(&full[s], kStageBytes);
    tma_load_3d(stage_l(s), &maps.left, k0, at.row0, at.matrix, &full[s]);
    if constexpr (kApply) {
      SCION_UNROLL
      for (int box = 0; box < kN / 64; ++box) {
        tma_load_3d(stage_r(s) + box * Cfg::kBoxBytes, &maps.right, at.col0 + 64 * box, k0,
                    at.matrix, &full[s]);
      }
    } else {
      SCION_UNROLL
      for (int box = 0; box < kN / kTile; ++box) {  // R's rows, kTile a box
        tma_load_3d(stage_r(s) + box * Cfg::kOperandBytes, &maps.right, k0, at.col0 + kTile * box,
                    at.matrix, &full[s]);
      }
    }
  };

  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(&full[s], 1);
      mbarrier_init(&empty[s], 2);  // one arrival per consumer warpgroup
    }
    fence_mbarrier_init();
  }
  __syncthreads();

  if (group < 0) {
    if (tid == 0) {  // the producer: each stage into its buffer once the buffer is empty
      int seq = 0;
      for (int t = static_cast<int>(blockIdx.x); t < tiles; t += static_cast<int>(gridDim.x)) {
        const Tile at(args, t / per_matrix, t % per_matrix);
        for (int kt = 0; kt < ktiles; ++kt, ++seq) {
          const int s = seq % kStages;
          if (seq >= kStages) {
            mbarrier_wait(&empty[s], static_cast<uint32_t>(seq / kStages - 1) & 1u);
          }
          load_stage(s, kt * kK, at);
        }
      }
    }
    return;  // the consumers wait for every copy; the epilogue is theirs
  }

  const bool signals = tid % 128 == 0;  // one arrival on `empty` per warpgroup
  int seq = 0;
  for (int t = static_cast<int>(blockIdx.x); t < tiles; t += static_cast<int>(gridDim.x)) {
    const Tile at(args, t / per_matrix, t % per_matrix);
    float acc[kRegs];
    SCION_UNROLL
    for (int i = 0; i < kRegs; ++i) acc[i] = 0.0f;

    // One K stage: its products are issued and left in flight, and the previous stage's waited
    // for and its buffer released (but with Xᵀ from registers, see the top: this stage's).
    uint32_t frag[kK / 16][4];
    for (int kt = 0; kt < ktiles; ++kt, ++seq) {
      const int s = seq % kStages;
      mbarrier_wait(&full[s], static_cast<uint32_t>(seq / kStages) & 1u);
      if constexpr (kTransposed) {
        // Xᵀ's fragments for rows (X's columns) 64·group + 16·warp.., k16 slice by slice: X's
        // rows k of the box `group`, 16-byte chunks of 8 columns at chunk c ^ (k % 8).
        const unsigned char* box = stage_r(s) + group * Cfg::kBoxBytes;
        SCION_UNROLL
        for (int kk = 0; kk < kK / 16; ++kk) {
          const int k = kk * 16 + lane % 8 + 8 * (lane / 16);
          const int chunk = 2 * warp + (lane / 8) % 2;
          ldmatrix_x4<true>(frag[kk], box + k * 128 + 16 * (chunk ^ (k % 8)));
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
          if constexpr (kApply) {
            // X's rows 16·kk.. of every box: atoms of 8 rows along K, the boxes along N.
            const uint64_t desc_b = smem_descriptor_sw128(stage_r(s) + 2 * kk * Cfg::kAtomBytes,
                                                          Cfg::kAtomBytes, Cfg::kBoxBytes);
            wgmma_ss<T, true>(acc, desc_a, desc_b, true);
          } else {
            const uint64_t desc_b = smem_descriptor_sw128(stage_r(s) + 32 * kk, Cfg::kAtomBytes);
            wgmma_ss<T>(acc, desc_a, desc_b, true);
          }
        }
      }
      wgmma_commit();
      if constexpr (kTransposed) {
        wgmma_wait<0>();
        if (signals) mbarrier_arrive(&empty[s]);
      } else {
        wgmma_wait<1>();
        if (signals && kt > 0) mbarrier_arrive(&empty[(seq - 1) % kStages]);
      }
      fence_accumulators(acc);
    }
    wgmma_wait<0>();
    fence_accumulators(acc);
    if (!kTransposed && signals) mbarrier_arrive(&empty[(seq - 1) % kStages]);  // the tile's last

    // acc[i] is element (64·group + 16·warp + lane/4 + 8·((i/2)%2), 8·(i/4) + 2·(lane%4) + i%2)
    // of the block's D; with Xᵀ from registers D is the output tile's transpose.
    store_tile<256>(
        args, upd, reinterpret_cast<T*>(smem + Cfg::staging(kProduct)), tid - 128, at,
        [&](auto&& f) {
          SCION_UNROLL
          for (int i = 0; i < kRegs; ++i) {
            const int dr = 64 * group + 16 * warp + lane / 4 + 8 * ((i / 2) % 2);
            const int dc = 8 * (i / 4) + 2 * (lane % 4) + i % 2;
            if constexpr (kTransposed) {
              f(acc[i], at.row0 + dc, at.col0 + dr);
            } else {
              f(acc[i], at.row0 + dr, at.col0 + dc);
            }
          }
        },
        ConsumerSync{});
  }
#else
  (void)args, (void)maps, (void)upd;
  __trap();  // launched only where the loaded image is sm_90a (see the launcher)
#endif
}

}  // namespace scion::ns

#endif  // SCION_NS_WGMMA_CUH_
