// The limits of the Newton–Schulz step and the plan of one call: the path it takes (one block per
// matrix, or tiled products with a 64 or 128 tile), the oriented and padded sizes, the chunks of
// the averaging pass and the layout of the device workspace.
#ifndef SCION_NS_PLAN_CUH_
#define SCION_NS_PLAN_CUH_

#include <cstddef>
#include <cstdint>

namespace scion::ns {

constexpr int kMaxSteps = 16;
// Matrices per element-wise or update launch: their references travel in the kernel arguments.
constexpr int kMaxRefs = 48;
// The one-block path takes matrices of at most kSmallM × kSmallMaxN after orienting.
constexpr int kSmallM = 64;
constexpr int kSmallMaxN = 512;

struct Plan {
  int tile;                    // 1: the one-block path; 64, 128: the tiled products
  int wgmma;                   // 0: mma.sync; 1..4: wgmma (ns_wgmma.cuh; tile 128), with
                               // a·X + B·X reading Xᵀ from registers (1) or X from smem (2;
                               // 3: on 128×256 tiles; 4: the symmetric products' too)
  int gram_restart;            // 0: the plain iteration; k: the Gram form, restarts every k
  int64_t m, n, m_pad, n_pad;  // oriented (wide: m ≤ n) size, and padded with zeros
  int chunk_rows, chunks;      // average_kernel
  int64_t x_elems, a_elems;    // elements of one padded X (m_pad × n_pad) and one A (m_pad²)
  // Workspace: X, Y, A, B (the Gram form: X, Y, R, P, Q, T) of every matrix in the operand
  // type, then from sums_offset the fp64 chunk sums; `bytes` in all (0 on the one-block path).
  int64_t sums_offset;
  size_t bytes;
};

// 1: the one-block path; 64, 128: the tiled products with that tile. `requested` (1, 64 or 128)
// wins; anything else chooses by the oriented size m × n (never 1 for the Gram form, never 64
// for the wgmma products).
int choose_tile(int64_t m, int64_t n, int requested, bool gram, bool wgmma);

// The plan for `batch` matrices of rows × cols with the tile requested (0: automatic), in the
// Gram form restarting every `gram_restart` steps (0: the plain iteration), the tiled products on
// mma.sync (wgmma 0) or wgmma (1..4: see Plan::wgmma).
Plan make_plan(int64_t batch, int64_t rows, int64_t cols, int tile_request, int gram_restart,
               int wgmma);

}  // namespace scion::ns

#endif  // SCION_NS_PLAN_CUH_
