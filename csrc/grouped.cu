// Sign, ColNorm, RowNorm and BiasRMS: averaging, LMO and update in one multi-tensor launch.
//
// Every one of these LMOs acts on independent groups of elements (rows, columns, or the whole
// tensor), and the ℓ2 ones share one form, so one kernel serves them all:
//
//   d ← (1 − α)·d + α·g                     (stored in d's dtype; no buffer: d = g)
//   u = d / (‖d‖₂·q + ε)                     per group (RowNorm, ColNorm, BiasRMS)
//   u = sign(d)·q                            (Sign; zeros and NaNs kept)
//   x ← decay·x + coef·u                     in x's dtype, rounded once
//
// Tensors travel in the kernel arguments (address, group count and length, strides), so a whole
// parameter group is one launch (more only past kMaxTensors tensors). A group is walked by one
// warp, lanes striding along it, when its elements are adjacent or when its groups are not;
// when the groups are adjacent and their elements are not (ColNorm on a row-major weight), each
// lane walks one group, so a warp reads 32 neighbouring columns per row: coalesced either way.
// The sums have a fixed order: the same bits on every run.
#include <cmath>
#include <cstdint>

#include "device.cuh"
#include "scion_kernels.h"
#include "status.cuh"

namespace scion {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxTensors = 48;

struct GroupedArgs {
  scion_grouped_tensor t[kMaxTensors];
  int32_t block_start[kMaxTensors + 1];  // first block of each tensor; the last is the grid
  int32_t count;
  scion_dtype p_dtype, g_dtype, d_dtype;
  bool has_buffer, sign;
  float alpha, beta, coef, decay;
  const float* lr;        // the device learning rate t, or null (see step_factors)
  const float* momentum;  // the device α, or null (see average_factors)
};
static_assert(sizeof(GroupedArgs) <= 4096, "kernel argument block exceeds 4 KB");

// Lane-per-group layout: the groups are adjacent and their elements are not.
__host__ __device__ inline bool lane_groups(const scion_grouped_tensor& t) {
  return t.group_stride == 1 && t.elem_stride != 1 && t.groups > 1;
}

__host__ __device__ inline int64_t groups_per_block(const scion_grouped_tensor& t) {
  return lane_groups(t) ? kThreads : kWarps;
}

// One element of pass 1: the averaging, stored; returns d.
__device__ __forceinline__ float averaged(const GroupedArgs& a, AverageFactors af,
                                          const scion_grouped_tensor& t, int64_t at) {
  return average_element(reinterpret_cast<const void*>(t.g), at, a.g_dtype,
                         reinterpret_cast<void*>(t.d), at, a.d_dtype, a.has_buffer, af.alpha,
                         af.beta);
}

__device__ __forceinline__ void update(const GroupedArgs& a, StepFactors f,
                                       const scion_grouped_tensor& t, int64_t at, float u) {
  void* p = reinterpret_cast<void*>(t.p);
  const float x = load_as_float(p, at, a.p_dtype);
  store_from_float(p, at, a.p_dtype, __fmaf_rn(f.coef, u, __fmul_rn(f.decay, x)));
}

__device__ __forceinline__ float sign_times(float d, float q) {
  return d > 0.0f ? q : (d < 0.0f ? -q : d);
}

// A group of `length` elements at `base`, `stride` apart, walked by `lanes` threads from `lane`;
// returns this thread's share of Σd² (Sign: updates at once, returns 0).
__device__ __forceinline__ float first_pass(const GroupedArgs& a, AverageFactors af, StepFactors f,
                                            const scion_grouped_tensor& t, int64_t base, int lane,
                                            int lanes) {
  float ssq = 0.0f;
  for (int64_t e = lane; e < t.length; e += lanes) {
    const int64_t at = base + e * t.elem_stride;
    const float d = averaged(a, af, t, at);
    if (a.sign) {
      update(a, f, t, at, sign_times(d, t.q));
    } else {
      ssq = __fmaf_rn(d, d, ssq);
    }
  }
  return ssq;
}

// Pass 2 of an ℓ2 group: reads back the d this thread stored (or g) and updates x.
__device__ __forceinline__ void second_pass(const GroupedArgs& a, StepFactors f,
                                            const scion_grouped_tensor& t, int64_t base, int lane,
                                            int lanes, float inv) {
  const void* src =
      a.has_buffer ? reinterpret_cast<const void*>(t.d) : reinterpret_cast<const void*>(t.g);
  const scion_dtype dtype = a.has_buffer ? a.d_dtype : a.g_dtype;
  for (int64_t e = lane; e < t.length; e += lanes) {
    const int64_t at = base + e * t.elem_stride;
    update(a, f, t, at, load_as_float(src, at, dtype) * inv);
  }
}

__global__ void __launch_bounds__(kThreads) grouped_kernel(const __grid_constant__ GroupedArgs a) {
  const int block = static_cast<int>(blockIdx.x);
  int lo = 0;
  int hi = a.count - 1;
  while (lo < hi) {  // the tensor whose blocks contain this one
    const int mid = (lo + hi + 1) >> 1;
    if (a.block_start[mid] <= block) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const scion_grouped_tensor& t = a.t[lo];
  const int64_t first = static_cast<int64_t>(block - a.block_start[lo]) * groups_per_block(t);
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const StepFactors f = step_factors(a.lr, a.coef, a.decay);
  const AverageFactors af = average_factors(a.momentum, a.alpha, a.beta);
  if (lane_groups(t)) {
    const int64_t group = first + threadIdx.x;
    if (group < t.groups) {
      const int64_t base = group * t.group_stride;
      const float ssq = first_pass(a, af, f, t, base, 0, 1);
      if (!a.sign) second_pass(a, f, t, base, 0, 1, 1.0f / (sqrtf(ssq) * t.q + t.eps));
    }
  } else {
    const int64_t group = first + warp;
    if (group < t.groups) {  // uniform across the warp: the shuffles see every lane
      const int64_t base = group * t.group_stride;
      const float ssq = warp_sum(first_pass(a, af, f, t, base, lane, 32));
      if (!a.sign) second_pass(a, f, t, base, lane, 32, 1.0f / (sqrtf(ssq) * t.q + t.eps));
    }
  }
}

}  // namespace
}  // namespace scion

extern "C" {

scion_status scion_grouped_step(int64_t num_tensors, const scion_grouped_tensor* tensors,
                                int p_dtype, int g_dtype, int d_dtype, int sign, double alpha,
                                double coef, double decay, uint64_t lr, uint64_t momentum,
                                int device, scion_stream_t stream) {
  using namespace scion;
  clear_error();
  if (!check_dtypes("grouped_step", p_dtype, g_dtype, d_dtype)) {
    return SCION_ERROR_INVALID_ARGUMENT;
  }
  if (!(alpha >= 0.0 && alpha <= 1.0) || num_tensors < 0 ||
      (num_tensors > 0 && tensors == nullptr)) {
    set_error("grouped_step: need 0 <= alpha <= 1 and a tensor list (alpha %g, %lld tensors)",
              alpha, static_cast<long long>(num_tensors));
    return SCION_ERROR_INVALID_ARGUMENT;
  }
  for (int64_t i = 0; i < num_tensors; ++i) {
    const scion_grouped_tensor& t = tensors[i];
    if (t.groups < 0 || t.length < 0 || t.p == 0 || t.g == 0 || ((d_dtype != -1) != (t.d != 0))) {
      set_error(
          "grouped_step: tensor %lld has a negative size, a null address, or a buffer "
          "address that does not match the buffer dtype",
          static_cast<long long>(i));
      return SCION_ERROR_INVALID_ARGUMENT;
    }
    if ((t.groups + kThreads - 1) / kWarps > (int64_t{1} << 30)) {
      set_error("grouped_step: tensor %lld has too many groups (%lld)", static_cast<long long>(i),
                static_cast<long long>(t.groups));
      return SCION_ERROR_INVALID_ARGUMENT;
    }
  }
  DeviceGuard current(device, "grouped_step");
  if (!current.ok()) return SCION_ERROR_CUDA;
  GroupedArgs a{};
  a.p_dtype = static_cast<scion_dtype>(p_dtype);
  a.g_dtype = static_cast<scion_dtype>(g_dtype);
  a.d_dtype = d_dtype == -1 ? SCION_FLOAT32 : static_cast<scion_dtype>(d_dtype);
  a.has_buffer = d_dtype != -1;
  a.sign = sign != 0;
  a.alpha = static_cast<float>(alpha);
  a.beta = static_cast<float>(1.0 - alpha);
  a.coef = static_cast<float>(coef);
  a.decay = static_cast<float>(decay);
  a.lr = reinterpret_cast<const float*>(static_cast<uintptr_t>(lr));
  a.momentum = reinterpret_cast<const float*>(static_cast<uintptr_t>(momentum));
  auto flush = [&]() {
    if (a.count == 0) return cudaSuccess;
    const cudaError_t e =
        launch_kernel(grouped_kernel, dim3(a.block_start[a.count]), dim3(kThreads), 0,
                      reinterpret_cast<cudaStream_t>(stream), a);
    a.count = 0;
    return e;
  };
  FirstError failure;
  for (int64_t i = 0; i < num_tensors && failure.err == cudaSuccess; ++i) {
    const scion_grouped_tensor& t = tensors[i];
    if (t.groups == 0 || t.length == 0) continue;
    const int64_t blocks = (t.groups + groups_per_block(t) - 1) / groups_per_block(t);
    if (a.count == kMaxTensors || a.block_start[a.count] + blocks > (int64_t{1} << 31) - 1) {
      failure.ok(flush(), "launch");
    }
    a.t[a.count] = t;
    a.block_start[a.count + 1] = a.block_start[a.count] + static_cast<int32_t>(blocks);
    ++a.count;
  }
  if (failure.err == cudaSuccess) failure.ok(flush(), "launch");
  failure.ok(current.restore(), "restoring the current device");
  if (failure.err != cudaSuccess) {
    set_error("grouped_step: %s failed: %s (%s) [%lld tensors, device %d]", failure.what,
              cudaGetErrorName(failure.err), cudaGetErrorString(failure.err),
              static_cast<long long>(num_tensors), device);
    return SCION_ERROR_CUDA;
  }
  return SCION_OK;
}

}  // extern "C"
