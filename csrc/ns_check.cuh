// The checks of the Newton–Schulz entry points' arguments. Each returns false at the first
// problem it finds, with the error message (scion_last_error) saying what it was.
#ifndef SCION_NS_CHECK_CUH_
#define SCION_NS_CHECK_CUH_

#include <cstdint>

#include "ns_plan.cuh"
#include "scion_kernels.h"

namespace scion::ns {

// The problem alone: shape, dtypes, steps, tile and alpha.
bool check_problem(const scion_ns_problem& pr);

// The rest of a step's arguments, for a valid problem of at least one matrix planned as `plan`:
// the matrix list and every matrix's addresses, the bucket size, and the workspace.
bool check_call(const scion_ns_problem& pr, const Plan& plan, const scion_ns_matrix* matrices,
                const void* workspace, int64_t workspace_bytes);

}  // namespace scion::ns

#endif  // SCION_NS_CHECK_CUH_
