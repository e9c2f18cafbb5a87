// Enqueuing a planned Newton–Schulz step: the one entry into ns_launch.cu, the source file that
// holds the kernels and their launch sequence.
#ifndef SCION_NS_LAUNCH_CUH_
#define SCION_NS_LAUNCH_CUH_

#include <cuda_runtime.h>

#include "ns_plan.cuh"
#include "scion_kernels.h"
#include "status.cuh"

namespace scion::ns {

// Enqueues the whole step of a checked, non-empty bucket on `stream` of `device` (the current
// device), by the path plan.tile names. The first failed CUDA call goes to `failure`; nothing is
// enqueued after it.
void run_step(const scion_ns_problem& pr, const Plan& plan, const scion_ns_matrix* matrices,
              void* workspace, int device, cudaStream_t stream, FirstError& failure);

}  // namespace scion::ns

#endif  // SCION_NS_LAUNCH_CUH_
