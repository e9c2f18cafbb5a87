// Validation of the Newton–Schulz entry points' arguments (see ns_check.cuh).
#include <algorithm>
#include <cstdint>

#include "ns_check.cuh"
#include "status.cuh"

namespace scion::ns {

bool check_problem(const scion_ns_problem& pr) {
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
  if (pr.gram_restart < 0 || (pr.gram_restart > 0 && pr.tile == 1)) {
    set_error(
        "ns_step: gram_restart must be 0 or, with a tiled path (tile 0, 64, 128), a step "
        "count >= 1; got %d with tile %d",
        pr.gram_restart, pr.tile);
    return false;
  }
  if (pr.wgmma < 0 || pr.wgmma > 4 || (pr.wgmma != 0 && pr.tile == 64)) {
    set_error(
        "ns_step: wgmma must be 0 to 4, and 1 to 4 run the 128 tile (tile 0, 1 or 128); got %d "
        "with tile %d",
        pr.wgmma, pr.tile);
    return false;
  }
  if (pr.persistent < 0 || pr.persistent > 1 || (pr.persistent == 1 && pr.wgmma == 0)) {
    set_error(
        "ns_step: persistent must be 0 or 1, and 1 runs the wgmma products (wgmma 1 to 4); got "
        "%d with wgmma %d",
        pr.persistent, pr.wgmma);
    return false;
  }
  if (!(pr.alpha >= 0.0 && pr.alpha <= 1.0)) {
    set_error("ns_step: alpha must be in [0, 1], got %g", pr.alpha);
    return false;
  }
  return true;
}

bool check_call(const scion_ns_problem& pr, const Plan& plan, const scion_ns_matrix* matrices,
                const void* workspace, int64_t workspace_bytes) {
  if (matrices == nullptr || (workspace == nullptr && plan.bytes > 0)) {
    set_error("ns_step: matrices and workspace must not be NULL");
    return false;
  }
  if (pr.batch > 65535) {
    set_error("ns_step: at most 65535 matrices per bucket, got %lld",
              static_cast<long long>(pr.batch));
    return false;
  }
  if (workspace_bytes < static_cast<int64_t>(plan.bytes) ||
      reinterpret_cast<uintptr_t>(workspace) % 256 != 0) {
    set_error("ns_step: the workspace must hold %lld bytes at a 256-byte aligned address, got %lld",
              static_cast<long long>(plan.bytes), static_cast<long long>(workspace_bytes));
    return false;
  }
  for (int64_t k = 0; k < pr.batch; ++k) {
    const scion_ns_matrix& mat = matrices[k];
    if (mat.p == 0 || mat.g == 0 || ((pr.d_dtype != -1) != (mat.d != 0))) {
      set_error(
          "ns_step: matrix %lld has a null parameter or gradient address, or a buffer "
          "address that does not match the buffer dtype",
          static_cast<long long>(k));
      return false;
    }
  }
  return true;
}

}  // namespace scion::ns
