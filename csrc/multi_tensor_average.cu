// Multi-tensor running average: d <- (1 - alpha) * d + alpha * g over a list of tensor pairs.
//
// Launch scheme. A per-parameter loop would issue one tiny kernel per tensor; instead the pairs
// are packed into a by-value kernel argument (addresses, element counts and a prefix sum of
// per-tensor chunk counts) and a single grid covers every chunk of every packed tensor. Block b
// finds its tensor by binary search over the prefix sum, then walks its 64K-element chunk with a
// block-stride loop. When the list does not fit into one argument block (kMaxTensors pairs), it is
// split into consecutive launches on the same stream.
//
// Numerics. Every element is computed in fp32 as
//
//     d_new = fmaf(alpha_f, g, beta_f * d),  alpha_f = (float)alpha,  beta_f = (float)(1.0 - alpha)
//
// with beta_f * d rounded to fp32 before the fused multiply-add, then rounded once (to nearest
// even) to the state's type. This mirrors the pure-PyTorch definition
//
//     d.mul_(1 - alpha).add_(g.to(d.dtype), alpha=alpha)
//
// for fp32 state: mul_ receives the Python double 1 - alpha, converts it to fp32 and stores the
// rounded product; add_ then forms d + alpha * g in fp32 (fused or not, depending on how PyTorch
// was compiled: at most one rounding apart). Computing beta in double on the host
// (rather than 1.0f - alpha_f on the device) keeps the first factor bit-identical to what mul_
// uses. For bf16 state the kernel is more accurate than the two-op reference, which rounds to
// bf16 after each op and rounds an fp32/fp16 gradient to bf16 first.

#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>

#include "device.cuh"
#include "scion_kernels.h"
#include "status.cuh"

namespace scion {
namespace {

// Pairs per launch: with 144 the argument block is 4048 bytes, inside the classic 4 KB
// kernel-parameter limit that every supported driver and architecture accepts.
constexpr int kMaxTensors = 144;
constexpr int64_t kChunkSize = int64_t{1} << 16;
constexpr int kThreads = 512;
// Elements per vector access: 16 bytes for fp32, 8 bytes for 16-bit types.
constexpr int kVec = 4;
// gridDim.x limit; block indices and the prefix sum are int32.
constexpr int64_t kMaxBlocksPerLaunch = INT_MAX;

struct AverageArgs {
  void* state[kMaxTensors];
  const void* grad[kMaxTensors];
  int64_t numel[kMaxTensors];
  // block_start[i] is the first block of tensor i; block_start[num_tensors] is the grid size.
  int32_t block_start[kMaxTensors + 1];
  int32_t num_tensors;
  float alpha;
  float beta;
};
static_assert(sizeof(AverageArgs) <= 4096, "kernel argument block exceeds 4 KB");

static_assert(kChunkSize % kVec == 0, "chunks must start on a vector boundary");

// ---------------------------------------------------------------------------------------------
// Element conversions. All are host-callable too, so the chunk routine can be exercised on the
// host.

__host__ __device__ inline float to_float(float x) { return x; }
__host__ __device__ inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__host__ __device__ inline float to_float(__half x) { return __half2float(x); }

template <typename T>
__host__ __device__ inline T from_float(float x);
template <>
__host__ __device__ inline float from_float<float>(float x) {
  return x;
}
template <>
__host__ __device__ inline __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

__host__ __device__ inline float average(float alpha, float beta, float d, float g) {
#ifdef __CUDA_ARCH__
  // Explicit _rn intrinsics: the product must be rounded on its own (as the reference's mul_
  // stores it) and must never be contracted into a different fused operation.
  return __fmaf_rn(alpha, g, __fmul_rn(beta, d));
#else
  return std::fmaf(alpha, g, beta * d);
#endif
}

template <typename T>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

// Processes chunk `block` of the packed list with `nthreads` cooperating threads.
template <typename S, typename G>
__host__ __device__ inline void average_chunk(const AverageArgs& args, int32_t block, int tid,
                                              int nthreads) {
  // Last tensor whose first block is <= block; empty tensors are never packed, so it is unique.
  int lo = 0;
  int hi = args.num_tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (args.block_start[mid] <= block) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const int64_t begin = static_cast<int64_t>(block - args.block_start[lo]) * kChunkSize;
  const int64_t remaining = args.numel[lo] - begin;
  const int64_t n = remaining < kChunkSize ? remaining : kChunkSize;
  S* __restrict__ d = static_cast<S*>(args.state[lo]) + begin;
  const G* __restrict__ g = static_cast<const G*>(args.grad[lo]) + begin;
  const float alpha = args.alpha;
  const float beta = args.beta;

  // Chunk starts are multiples of kVec elements, so a chunk is vector-aligned iff its tensor's
  // base address is. Views with odd storage offsets take the scalar path.
  const bool aligned = reinterpret_cast<uintptr_t>(d) % sizeof(Pack<S>) == 0 &&
                       reinterpret_cast<uintptr_t>(g) % sizeof(Pack<G>) == 0;
  int64_t tail = 0;
  if (aligned) {
    const int64_t packs = n / kVec;
    Pack<S>* __restrict__ dp = reinterpret_cast<Pack<S>*>(d);
    const Pack<G>* __restrict__ gp = reinterpret_cast<const Pack<G>*>(g);
    for (int64_t p = tid; p < packs; p += nthreads) {
      Pack<S> dv = dp[p];
      const Pack<G> gv = gp[p];
      SCION_UNROLL
      for (int k = 0; k < kVec; ++k) {
        dv.v[k] = from_float<S>(average(alpha, beta, to_float(dv.v[k]), to_float(gv.v[k])));
      }
      dp[p] = dv;
    }
    tail = packs * kVec;
  }
  for (int64_t i = tail + tid; i < n; i += nthreads) {
    d[i] = from_float<S>(average(alpha, beta, to_float(d[i]), to_float(g[i])));
  }
}

template <typename S, typename G>
__global__ void __launch_bounds__(kThreads)
    multi_tensor_average_kernel(const __grid_constant__ AverageArgs args) {
  average_chunk<S, G>(args, static_cast<int32_t>(blockIdx.x), static_cast<int>(threadIdx.x),
                      static_cast<int>(blockDim.x));
}

// ---------------------------------------------------------------------------------------------
// Host side.

int64_t chunks_of(int64_t numel) { return (numel + kChunkSize - 1) / kChunkSize; }

// Packs the non-empty pairs into argument blocks and calls launch(args, grid_blocks) for each
// full block and for the final partial one. Stops at the first launch returning false. Returns
// the number of successful launches. Arguments must already be validated.
template <typename Launch>
int64_t pack_launches(int64_t num_tensors, const uint64_t* state_ptrs, const uint64_t* grad_ptrs,
                      const int64_t* numels, float alpha, float beta, Launch&& launch) {
  AverageArgs args{};
  args.alpha = alpha;
  args.beta = beta;
  int64_t launches = 0;
  for (int64_t t = 0; t < num_tensors; ++t) {
    if (numels[t] == 0) continue;
    const int64_t chunks = chunks_of(numels[t]);
    const int32_t used = args.block_start[args.num_tensors];
    if (args.num_tensors == kMaxTensors || used + chunks > kMaxBlocksPerLaunch) {
      if (!launch(static_cast<const AverageArgs&>(args), used)) return launches;
      ++launches;
      args.num_tensors = 0;
    }
    const int i = args.num_tensors++;
    args.state[i] = reinterpret_cast<void*>(static_cast<uintptr_t>(state_ptrs ? state_ptrs[t] : 0));
    args.grad[i] =
        reinterpret_cast<const void*>(static_cast<uintptr_t>(grad_ptrs ? grad_ptrs[t] : 0));
    args.numel[i] = numels[t];
    args.block_start[i + 1] = args.block_start[i] + static_cast<int32_t>(chunks);
  }
  if (args.num_tensors > 0) {
    if (!launch(static_cast<const AverageArgs&>(args), args.block_start[args.num_tensors])) {
      return launches;
    }
    ++launches;
  }
  return launches;
}

// Checks what the host can check; returns false with the error message set otherwise.
bool validate(int64_t num_tensors, const uint64_t* state_ptrs, const uint64_t* grad_ptrs,
              const int64_t* numels, bool need_pointers) {
  if (num_tensors < 0) {
    set_error("multi_tensor_average: num_tensors must be >= 0, got %lld",
              static_cast<long long>(num_tensors));
    return false;
  }
  if (num_tensors > 0 && numels == nullptr) {
    set_error("multi_tensor_average: numels is NULL");
    return false;
  }
  if (need_pointers && num_tensors > 0 && (state_ptrs == nullptr || grad_ptrs == nullptr)) {
    set_error("multi_tensor_average: pointer arrays are NULL");
    return false;
  }
  for (int64_t t = 0; t < num_tensors; ++t) {
    if (numels[t] < 0) {
      set_error("multi_tensor_average: tensor %lld has negative element count %lld",
                static_cast<long long>(t), static_cast<long long>(numels[t]));
      return false;
    }
    if (chunks_of(numels[t]) > kMaxBlocksPerLaunch) {
      set_error("multi_tensor_average: tensor %lld has %lld elements, more than one launch covers",
                static_cast<long long>(t), static_cast<long long>(numels[t]));
      return false;
    }
    if (need_pointers && numels[t] > 0 && (state_ptrs[t] == 0 || grad_ptrs[t] == 0)) {
      set_error("multi_tensor_average: tensor %lld has %lld elements but a null data pointer",
                static_cast<long long>(t), static_cast<long long>(numels[t]));
      return false;
    }
  }
  return true;
}

struct CallInfo {
  int64_t num_tensors;
  int64_t total_elements;
  scion_dtype state_dtype;
  scion_dtype grad_dtype;
  int device;
};

// launches_total < 0: the failure happened before any launch was attempted.
scion_status cuda_failure(const CallInfo& info, const char* what, cudaError_t err,
                          int64_t launches_done = 0, int64_t launches_total = -1) {
  char progress[96] = "";
  if (launches_total >= 0) {
    // Earlier launches of this call were already enqueued, so part of the states is updated.
    std::snprintf(progress, sizeof(progress), ", after %lld of %lld launches",
                  static_cast<long long>(launches_done), static_cast<long long>(launches_total));
  }
  set_error(
      "multi_tensor_average: %s failed: %s (%s) [%lld tensors, %lld elements, state %s, grad %s, "
      "device %d%s]",
      what, cudaGetErrorName(err), cudaGetErrorString(err),
      static_cast<long long>(info.num_tensors), static_cast<long long>(info.total_elements),
      dtype_name(info.state_dtype), dtype_name(info.grad_dtype), info.device, progress);
  return SCION_ERROR_CUDA;
}

template <typename S, typename G>
scion_status launch_all(const CallInfo& info, int64_t num_tensors, const uint64_t* state_ptrs,
                        const uint64_t* grad_ptrs, const int64_t* numels, float alpha, float beta,
                        cudaStream_t stream) {
  const int64_t total = pack_launches(num_tensors, nullptr, nullptr, numels, 0.f, 0.f,
                                      [](const AverageArgs&, int32_t) { return true; });
  cudaError_t err = cudaSuccess;
  const int64_t done =
      pack_launches(num_tensors, state_ptrs, grad_ptrs, numels, alpha, beta,
                    [&](const AverageArgs& args, int32_t blocks) {
                      err = launch_kernel(multi_tensor_average_kernel<S, G>, dim3(blocks),
                                          dim3(kThreads), 0, stream, args);
                      return err == cudaSuccess;
                    });
  if (err != cudaSuccess) return cuda_failure(info, "kernel launch", err, done, total);
  return SCION_OK;
}

}  // namespace
}  // namespace scion

extern "C" {

scion_status scion_multi_tensor_average(int64_t num_tensors, const uint64_t* state_ptrs,
                                        const uint64_t* grad_ptrs, const int64_t* numels,
                                        scion_dtype state_dtype, scion_dtype grad_dtype,
                                        double alpha, int device, scion_stream_t stream) {
  using namespace scion;
  clear_error();
  if (!(alpha >= 0.0 && alpha <= 1.0)) {
    set_error("multi_tensor_average: alpha must be in [0, 1], got %g", alpha);
    return SCION_ERROR_INVALID_ARGUMENT;
  }
  const bool state_ok = state_dtype == SCION_FLOAT32 || state_dtype == SCION_BFLOAT16;
  const bool grad_ok =
      grad_dtype == SCION_FLOAT32 || grad_dtype == SCION_BFLOAT16 || grad_dtype == SCION_FLOAT16;
  if (!state_ok || !grad_ok) {
    set_error("multi_tensor_average: unsupported dtype codes (state %d, grad %d)",
              static_cast<int>(state_dtype), static_cast<int>(grad_dtype));
    return SCION_ERROR_INVALID_ARGUMENT;
  }
  if (device < 0) {
    set_error("multi_tensor_average: device must be >= 0, got %d", device);
    return SCION_ERROR_INVALID_ARGUMENT;
  }
  if (!validate(num_tensors, state_ptrs, grad_ptrs, numels, /*need_pointers=*/true)) {
    return SCION_ERROR_INVALID_ARGUMENT;
  }
  CallInfo info{num_tensors, 0, state_dtype, grad_dtype, device};
  for (int64_t t = 0; t < num_tensors; ++t) info.total_elements += numels[t];
  if (info.total_elements == 0) return SCION_OK;

  // The caller's current device is restored afterwards: the CUDA runtime shares the
  // per-thread current context with every other runtime instance in the process.
  int previous = -1;
  cudaError_t err = cudaGetDevice(&previous);
  if (err != cudaSuccess) return cuda_failure(info, "cudaGetDevice", err);
  if (previous != device) {
    err = cudaSetDevice(device);
    if (err != cudaSuccess) return cuda_failure(info, "cudaSetDevice", err);
  }

  const float alpha_f = static_cast<float>(alpha);
  const float beta_f = static_cast<float>(1.0 - alpha);
  auto* cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  scion_status status = SCION_OK;
  // Six instantiations: {fp32, bf16} state x {fp32, bf16, fp16} gradient.
#define SCION_LAUNCH(S, G) \
  launch_all<S, G>(info, num_tensors, state_ptrs, grad_ptrs, numels, alpha_f, beta_f, cuda_stream)
  if (state_dtype == SCION_FLOAT32) {
    switch (grad_dtype) {
      case SCION_FLOAT32:
        status = SCION_LAUNCH(float, float);
        break;
      case SCION_BFLOAT16:
        status = SCION_LAUNCH(float, __nv_bfloat16);
        break;
      case SCION_FLOAT16:
        status = SCION_LAUNCH(float, __half);
        break;
    }
  } else {
    switch (grad_dtype) {
      case SCION_FLOAT32:
        status = SCION_LAUNCH(__nv_bfloat16, float);
        break;
      case SCION_BFLOAT16:
        status = SCION_LAUNCH(__nv_bfloat16, __nv_bfloat16);
        break;
      case SCION_FLOAT16:
        status = SCION_LAUNCH(__nv_bfloat16, __half);
        break;
    }
  }
#undef SCION_LAUNCH

  if (previous != device) {
    err = cudaSetDevice(previous);
    if (err != cudaSuccess && status == SCION_OK) {
      return cuda_failure(info, "restoring the current device", err);
    }
  }
  return status;
}

int64_t scion_multi_tensor_average_num_launches(int64_t num_tensors, const int64_t* numels) {
  using namespace scion;
  clear_error();
  if (!validate(num_tensors, nullptr, nullptr, numels, /*need_pointers=*/false)) return -1;
  return pack_launches(num_tensors, nullptr, nullptr, numels, 0.f, 0.f,
                       [](const AverageArgs&, int32_t) { return true; });
}

int64_t scion_multi_tensor_average_max_tensors_per_launch(void) { return scion::kMaxTensors; }

int64_t scion_multi_tensor_average_chunk_size(void) { return scion::kChunkSize; }

}  // extern "C"
