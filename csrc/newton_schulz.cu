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
//                         (same), apply (full grid; the last one updates the parameters); on
//                         Hopper with `wgmma`, wgmma_kernel, the same products and epilogue.
//
// With gram_restart k ≥ 1 (the Gram form, the reference's gram_iterate) step 3 is instead: X·Xᵀ
// into R once, then per step P ← a·I + b·R + c·R·R (the polynomial kernel with a diagonal
// term), Q ← Q·P and R ← P·(R·P) (the X·Xᵀ kernel on two operands: every m×m product is
// symmetric), and every k steps and at the end X ← Q·X (the apply kernel, the last one with the
// update). Diagonal tiles of the symmetric products keep one triangle, so they are exactly
// symmetric.
//
// Work matrices are padded with zeros to whole tiles, so the products need no bounds checks:
// zero rows and columns of X give zero rows and columns of A, B and the next X. Only the fused
// update looks at the true size. All reductions have a fixed order: a bucket's result has the
// same bits on every run.
//
// This file holds the C entry points. The rest, in reading order: ns_plan (the path and the
// workspace layout), ns_check (argument checks), ns_launch.cu (the launch sequence) and the
// kernels it launches, ns_prepare.cuh (1, 2), ns_gemm.cuh and ns_wgmma.cuh (3) and ns_small.cuh
// (matrices of at most 64×512 after orienting: the whole step in one block per matrix, one launch).
#include <cuda_runtime.h>

#include <cstdint>

#include "ns_check.cuh"
#include "ns_launch.cuh"
#include "ns_plan.cuh"
#include "scion_kernels.h"
#include "status.cuh"

namespace scion::ns {
namespace {

// Clears the error message, checks the problem and plans it; false (with the message set) if the
// problem is invalid.
bool check_and_plan(const scion_ns_problem* problem, Plan& plan) {
  clear_error();
  if (problem == nullptr || !check_problem(*problem)) return false;
  plan = make_plan(problem->batch, problem->rows, problem->cols, problem->tile,
                   problem->gram_restart, problem->wgmma);
  return true;
}

}  // namespace
}  // namespace scion::ns

extern "C" {

int64_t scion_ns_workspace_bytes(const scion_ns_problem* problem) {
  scion::ns::Plan plan{};
  if (!scion::ns::check_and_plan(problem, plan)) return -1;
  return static_cast<int64_t>(plan.bytes);
}

int scion_ns_tile(const scion_ns_problem* problem) {
  scion::ns::Plan plan{};
  if (!scion::ns::check_and_plan(problem, plan)) return -1;
  return plan.tile;
}

scion_status scion_ns_step(const scion_ns_problem* problem, const scion_ns_matrix* matrices,
                           void* workspace, int64_t workspace_bytes, int device,
                           scion_stream_t stream) {
  using namespace scion;
  using namespace scion::ns;
  Plan plan{};
  if (!check_and_plan(problem, plan)) return SCION_ERROR_INVALID_ARGUMENT;
  const scion_ns_problem& pr = *problem;
  if (pr.batch == 0) return SCION_OK;
  if (!check_call(pr, plan, matrices, workspace, workspace_bytes)) {
    return SCION_ERROR_INVALID_ARGUMENT;
  }
  DeviceGuard current(device, "ns_step");
  if (!current.ok()) return SCION_ERROR_CUDA;
  FirstError failure;
  run_step(pr, plan, matrices, workspace, device, reinterpret_cast<cudaStream_t>(stream), failure);
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
