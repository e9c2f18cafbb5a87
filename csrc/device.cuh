// Device primitives shared by the kernels: launching, dynamic shared memory, warp reductions,
// element conversions and the sm_80+ tensor-core building blocks (ldmatrix, mma.sync, cp.async).
//
// Every kernel reaches the hardware only through this header, so that the same sources can be
// compiled as ordinary C++ with SCION_HOST_EMULATION defined: tests/native/emulation.h then
// provides threadIdx/blockIdx, __syncthreads, shuffles, the fragment layouts of ldmatrix and
// mma.sync and deferred cp.async copies on the CPU, and the kernels run block by block, thread by
// thread, against CPU tensors. Rules that keep both builds equivalent:
//   - shared memory only through dynamic_smem() (no static __shared__ arrays);
//   - no thread returns early from a kernel that synchronizes;
//   - launches only through launch_kernel().
#ifndef SCION_DEVICE_CUH_
#define SCION_DEVICE_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

#include "scion_kernels.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "scion_kernels' CUDA kernels need sm_80 or newer (bf16 mma.sync, cp.async)"
#endif

#ifdef __CUDA_ARCH__
#define SCION_UNROLL _Pragma("unroll")
#else
#define SCION_UNROLL
#endif

namespace scion {

// ---------------------------------------------------------------------------------------------
// Launching.

// kernel<<<grid, block, smem, stream>>>(args...), then the launch's status.
template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                          cudaStream_t stream, Args&&... args) {
#ifdef SCION_HOST_EMULATION
  (void)stream;  // one emulated stream: launches run in call order
  scion_emu::launch(grid, block, smem, [&] { kernel(args...); });
  return cudaSuccess;
#else
  // clang-format reads .cuh as C++ and would split the launch brackets.
  // clang-format off
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
  // clang-format on
  return cudaGetLastError();
#endif
}

// ---------------------------------------------------------------------------------------------
// Shared memory and synchronization.

__device__ __forceinline__ unsigned char* dynamic_smem() {
#ifdef SCION_HOST_EMULATION
  return scion_emu::shared_memory();
#else
  extern __shared__ __align__(128) unsigned char scion_smem[];
  return scion_smem;
#endif
}

// Sum over the 32 lanes of a warp; every lane gets the result (the same bits on every lane, in a
// fixed butterfly order).
__device__ __forceinline__ float warp_sum(float v) {
  SCION_UNROLL
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// NaN-propagating maximum of |x| (fmaxf would drop a NaN).
__device__ __forceinline__ float max_abs(float m, float x) {
  const float a = fabsf(x);
  return (a > m || a != a) ? a : m;
}

__device__ __forceinline__ float warp_max(float v) {
  SCION_UNROLL
  for (int offset = 16; offset > 0; offset >>= 1) {
    v = max_abs(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  return v;
}

// ---------------------------------------------------------------------------------------------
// Element types. Loads and stores take the element type at run time (a uniform branch) where a
// kernel would otherwise be instantiated for every combination of parameter, gradient and
// buffer types.

__device__ __forceinline__ float load_as_float(const void* base, int64_t i, scion_dtype dtype) {
  switch (dtype) {
    case SCION_BFLOAT16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
    case SCION_FLOAT16:
      return __half2float(static_cast<const __half*>(base)[i]);
    default:
      return static_cast<const float*>(base)[i];
  }
}

// Stores x rounded to nearest even in `dtype`; returns the stored value as a float.
__device__ __forceinline__ float store_from_float(void* base, int64_t i, scion_dtype dtype,
                                                  float x) {
  switch (dtype) {
    case SCION_BFLOAT16: {
      const __nv_bfloat16 v = __float2bfloat16_rn(x);
      static_cast<__nv_bfloat16*>(base)[i] = v;
      return __bfloat162float(v);
    }
    case SCION_FLOAT16: {
      const __half v = __float2half_rn(x);
      static_cast<__half*>(base)[i] = v;
      return __half2float(v);
    }
    default:
      static_cast<float*>(base)[i] = x;
      return x;
  }
}

// One element of the averaging d ← (1 − α)·d + α·g (β = 1 − α), in fp32 as fma(α, g, β·d) with
// one rounding to d's dtype, stored; returns the stored d (g itself when there is no buffer).
__device__ __forceinline__ float average_element(const void* g, int64_t g_at, scion_dtype g_dtype,
                                                 void* d, int64_t d_at, scion_dtype d_dtype,
                                                 bool has_buffer, float alpha, float beta) {
  const float v = load_as_float(g, g_at, g_dtype);
  if (!has_buffer) return v;
  const float old = load_as_float(d, d_at, d_dtype);
  return store_from_float(d, d_at, d_dtype, __fmaf_rn(alpha, v, __fmul_rn(beta, old)));
}

// The update's factors of u and x: (coef, decay) as given, or, with a device learning rate t
// (`lr`, one float32; null: none), per unit of it: (coef·t, 1 − decay·t). Read once per thread.
struct StepFactors {
  float coef, decay;
};
__device__ __forceinline__ StepFactors step_factors(const float* lr, float coef, float decay) {
  if (lr == nullptr) return StepFactors{coef, decay};
  const float t = *lr;
  return StepFactors{__fmul_rn(coef, t), __fmaf_rn(-decay, t, 1.0f)};
}

// The averaging's factors (α, β = 1 − α): as given, or α read from the device (`momentum`, one
// float32; null: none) and β = 1 − α. Read once per thread.
struct AverageFactors {
  float alpha, beta;
};
__device__ __forceinline__ AverageFactors average_factors(const float* momentum, float alpha,
                                                          float beta) {
  if (momentum == nullptr) return AverageFactors{alpha, beta};
  const float a = *momentum;
  return AverageFactors{a, 1.0f - a};
}

// The 16-bit operand types of the tensor-core products.
template <typename T>
struct Operand;
template <>
struct Operand<__nv_bfloat16> {
  __device__ __forceinline__ static __nv_bfloat16 from(float x) { return __float2bfloat16_rn(x); }
  __device__ __forceinline__ static float to(__nv_bfloat16 x) { return __bfloat162float(x); }
  static constexpr bool kBf16 = true;
};
template <>
struct Operand<__half> {
  __device__ __forceinline__ static __half from(float x) { return __float2half_rn(x); }
  __device__ __forceinline__ static float to(__half x) { return __half2float(x); }
  static constexpr bool kBf16 = false;
};

// ---------------------------------------------------------------------------------------------
// Tensor-core building blocks (sm_80+). Fragment layouts are those of the PTX ISA for
// mma.m16n8k16 with 16-bit inputs and fp32 accumulators (lane = 4·group + t):
//   A 16×16, row-major, 4 registers of 2 elements: a[0] (row g, cols 2t..2t+1), a[1] (row g+8),
//     a[2] (row g, cols 2t+8..), a[3] (row g+8, cols 2t+8..);
//   B 16×8, "col": b[0] (rows k = 2t..2t+1, col g), b[1] (rows 2t+8..);
//   C 16×8 fp32: c[0..1] (row g, cols 2t..2t+1), c[2..3] (row g+8).

// Four 8×8 matrices of 16-bit elements from shared memory; lane l gives the address of row l%8
// of matrix l/8 (16 bytes, 16-byte aligned). Without `trans` lane l receives, in r[j], elements
// 2·(l%4) and 2·(l%4)+1 of row l/4 of matrix j; with it, element l/4 of rows 2·(l%4) and
// 2·(l%4)+1.
template <bool kTrans>
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* row) {
#ifdef SCION_HOST_EMULATION
  scion_emu::ldmatrix_x4(r, row, kTrans);
#else
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  }
#endif
}

// c += A·B for one 16×8×16 tile, fp32 accumulation.
template <typename T>
__device__ __forceinline__ void mma_16816(float c[4], const uint32_t a[4], const uint32_t b[2]) {
#ifdef SCION_HOST_EMULATION
  scion_emu::mma_16816(c, a, b, Operand<T>::kBf16);
#else
  if constexpr (Operand<T>::kBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#endif
}

// Asynchronous 16-byte copy global → shared (both 16-byte aligned), bypassing L1.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem) {
#ifdef SCION_HOST_EMULATION
  scion_emu::cp_async_16(smem, gmem);
#else
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(addr), "l"(gmem));
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#ifdef SCION_HOST_EMULATION
  scion_emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most kPending of this thread's committed copy groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#ifdef SCION_HOST_EMULATION
  scion_emu::cp_async_wait(kPending);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
#endif
}

}  // namespace scion

#endif  // SCION_DEVICE_CUH_
