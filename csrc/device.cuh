// Device primitives shared by the kernels: launching, dynamic shared memory, warp reductions,
// element conversions, the sm_80+ tensor-core building blocks (ldmatrix, mma.sync, cp.async) and
// Hopper's warpgroup products (wgmma, sm_90a).
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

#include <cuda.h>  // CUtensorMap (a type only: nothing here calls the driver)
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
  return scion_emu::launch(reinterpret_cast<const void*>(kernel), grid, block, smem,
                           [&] { kernel(args...); });
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
  // 1024-byte aligned: the 128-byte swizzle's atoms (smem_descriptor_sw128).
  extern __shared__ __align__(1024) unsigned char scion_smem[];
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

// ---------------------------------------------------------------------------------------------
// Hopper's warpgroup products (sm_90a): wgmma.mma_async m64n128k16 with fp32 accumulators, the
// operands read from shared memory through matrix descriptors (B always, A too or A from
// registers), issued asynchronously and waited for by commit groups.
//
// SCION_WGMMA is 1 where these instructions exist: device code for sm_90a, and the host
// emulation (tests/native/emulation.h models them from the PTX ISA's layouts). Kernels that use
// them compile to a trap elsewhere and are launched only where the loaded image is sm_90a.
#if defined(SCION_HOST_EMULATION) || (defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL))
#define SCION_WGMMA 1
#else
#define SCION_WGMMA 0
#endif

// The 32-bit shared-window address of a pointer into shared memory.
__device__ __forceinline__ uint32_t shared_address(const void* p) {
#ifdef SCION_HOST_EMULATION
  return scion_emu::shared_address(p);
#else
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
#endif
}

// The descriptor of a 16-bit operand in the 128-byte swizzle: 128-byte rows in atoms of 8 rows
// (1024 bytes, 1024-byte aligned), the 16-byte chunk j of row r stored at chunk j ^ (r % 8).
//   - K-major (rows of M or N, 64 elements of K each): atoms `sbo` bytes apart; `start` is the
//     first row plus the byte offset of the k16 slice (32 per slice); `lbo` is unused (16).
//   - MN-major (rows of K, 64 elements of N each): atoms of 8 k `sbo` bytes apart, blocks of 64
//     along N `lbo` bytes apart; `start` is the slice's first k row.
__device__ __forceinline__ uint64_t smem_descriptor_sw128(const void* start, uint32_t sbo,
                                                          uint32_t lbo = 16) {
  return static_cast<uint64_t>((shared_address(start) >> 4) & 0x3FFF) |
         static_cast<uint64_t>((lbo >> 4) & 0x3FFF) << 16 |
         static_cast<uint64_t>((sbo >> 4) & 0x3FFF) << 32 | uint64_t{1} << 62;
}

// Orders this thread's earlier register accesses (accumulators, A fragments) before the
// warpgroup's next products.
__device__ __forceinline__ void wgmma_fence() {
#ifdef SCION_HOST_EMULATION
  scion_emu::wgmma_fence();
#elif SCION_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void wgmma_commit() {
#ifdef SCION_HOST_EMULATION
  scion_emu::wgmma_commit();
#elif SCION_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}

// Keeps the compiler from moving other instructions' accesses to the accumulators across this
// point (into a product group's span, where ptxas would serialize the products).
template <int kN>
__device__ __forceinline__ void fence_accumulators(float (&d)[kN]) {
#if SCION_WGMMA && !defined(SCION_HOST_EMULATION)
  SCION_UNROLL
  for (int i = 0; i < kN; ++i) asm volatile("" : "+f"(d[i])::"memory");
#else
  (void)d;
#endif
}

// Waits until at most kPending of the warpgroup's committed product groups are in flight.
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
#ifdef SCION_HOST_EMULATION
  scion_emu::wgmma_wait(kPending);
#elif SCION_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
#endif
}

// Makes this thread's shared-memory writes (stores, completed cp.async copies) visible to the
// products, which read through the async proxy.
__device__ __forceinline__ void fence_proxy_async() {
#ifdef SCION_HOST_EMULATION
  scion_emu::fence_proxy_async();
#elif SCION_WGMMA
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// The accumulator operands of a 64×n product: n/2 registers a thread (n = 128, 256), the
// upper half only for n = 256.
#define SCION_WGMMA_D_LOW                                                            \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "           \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define SCION_WGMMA_D_HIGH                                                                       \
  "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "             \
  "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "             \
  "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
  "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
#define SCION_WGMMA_D_LIST_64 "{" SCION_WGMMA_D_LOW "}"
#define SCION_WGMMA_D_LIST_128 "{" SCION_WGMMA_D_LOW ", " SCION_WGMMA_D_HIGH "}"
#define SCION_WGMMA_D_OPERANDS_64                                                                 \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
      "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]),    \
      "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]),  \
      "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]),  \
      "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]),  \
      "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]),  \
      "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]),  \
      "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]),  \
      "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
#define SCION_WGMMA_D_OPERANDS_128                                                               \
  SCION_WGMMA_D_OPERANDS_64, "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]),    \
      "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), \
      "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), \
      "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), \
      "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), \
      "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]),           \
      "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]),        \
      "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]),        \
      "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]),        \
      "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]),        \
      "+f"(d[127])

// The wgmma instruction for operand type `ab` ("bf16", "f16"): A from shared memory (SS; B
// K-major, or N-major with trans_b "1") or registers (RS); scale-d from the operand after the
// descriptors.
#define SCION_WGMMA_SS_128(ab, trans_b)                                                  \
  asm volatile(                                                                          \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                       \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." ab "." ab " " SCION_WGMMA_D_LIST_64 \
      ", %64, %65, p, 1, 1, 0, " trans_b ";\n}\n"                                        \
      : SCION_WGMMA_D_OPERANDS_64                                                        \
      : "l"(desc_a), "l"(desc_b), "r"(scale_d))
#define SCION_WGMMA_SS_256(ab, trans_b)                                                   \
  asm volatile(                                                                           \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"                                       \
      "wgmma.mma_async.sync.aligned.m64n256k16.f32." ab "." ab " " SCION_WGMMA_D_LIST_128 \
      ", %128, %129, p, 1, 1, 0, " trans_b ";\n}\n"                                       \
      : SCION_WGMMA_D_OPERANDS_128                                                        \
      : "l"(desc_a), "l"(desc_b), "r"(scale_d))
#define SCION_WGMMA_RS(ab)                                                               \
  asm volatile(                                                                          \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                       \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." ab "." ab " " SCION_WGMMA_D_LIST_64 \
      ", {%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"                                    \
      : SCION_WGMMA_D_OPERANDS_64                                                        \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d))

// A barrier among `count` threads of the block (whole warps), named by `id` in 1..15 (0 is
// __syncthreads'): some warps meet while the others go on or have exited.
__device__ __forceinline__ void named_barrier_sync(int id, int count) {
#ifdef SCION_HOST_EMULATION
  scion_emu::named_barrier_sync(id, count);
#else
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
#endif
}

// ---------------------------------------------------------------------------------------------
// Hopper's tensor memory accelerator (TMA) and the shared-memory barriers it completes.

// Initializes the barrier at `bar` (8 bytes of shared memory) for `count` arrivals a phase.
__device__ __forceinline__ void mbarrier_init(uint64_t* bar, uint32_t count) {
#ifdef SCION_HOST_EMULATION
  scion_emu::mbarrier_init(bar, count);
#elif SCION_WGMMA
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(shared_address(bar)), "r"(count)
               : "memory");
#endif
}

// Makes initialized barriers visible to the async proxy (the TMA units); then a block barrier.
__device__ __forceinline__ void fence_mbarrier_init() {
#ifdef SCION_HOST_EMULATION
#elif SCION_WGMMA
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}

// One arrival on `bar` that also expects `bytes` more of transactions (TMA copies) this phase.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
#ifdef SCION_HOST_EMULATION
  scion_emu::mbarrier_arrive_expect_tx(bar, bytes);
#elif SCION_WGMMA
  asm volatile(
      "mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(shared_address(bar)),
      "r"(bytes)
      : "memory");
#endif
}

// One arrival on `bar`.
__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
#ifdef SCION_HOST_EMULATION
  scion_emu::mbarrier_arrive_expect_tx(bar, 0);
#elif SCION_WGMMA
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(shared_address(bar)) : "memory");
#endif
}

// Waits until the phase of `bar` with parity `parity` has completed.
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
#ifdef SCION_HOST_EMULATION
  scion_emu::mbarrier_wait(bar, parity);
#elif SCION_WGMMA
  asm volatile(
      "{\n.reg .pred done;\nwaiting:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra waiting;\n}\n" ::"r"(shared_address(bar)),
      "r"(parity)
      : "memory");
#endif
}

// Copies the box at coordinates (c0, c1, c2) (innermost first) of the tensor `map` describes
// into shared memory at `dst` (its swizzle applied), completing `bytes` on `bar`.
__device__ __forceinline__ void tma_load_3d(void* dst, const CUtensorMap* map, int c0, int c1,
                                            int c2, uint64_t* bar) {
#ifdef SCION_HOST_EMULATION
  scion_emu::tma_load_3d(dst, map, c0, c1, c2, bar);
#elif SCION_WGMMA
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(shared_address(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(shared_address(bar))
      : "memory");
#endif
}

// d (+)= A·B for a 64×n×16 tile (n = 2·kRegs: 128 or 256), A (64×16) and B (16×n: stored as n
// rows of K, or with kTransB as 16 rows of N) from shared memory. `d`: this thread's n/2
// accumulators; row 16·w + lane/4 + 8·((i/2)%2), column 8·(i/4) + 2·(lane%4) + i%2 of the
// warpgroup's tile for d[i], warp w of the warpgroup (per warp and 8 columns, the mma.m16n8k16
// accumulator layout). `accumulate` false: d = A·B.
template <typename T, bool kTransB = false, int kRegs>
__device__ __forceinline__ void wgmma_ss(float (&d)[kRegs], uint64_t desc_a, uint64_t desc_b,
                                         bool accumulate) {
  static_assert(kRegs == 64 || kRegs == 128, "m64n128k16 or m64n256k16");
#ifdef SCION_HOST_EMULATION
  scion_emu::wgmma(d, 2 * kRegs, nullptr, desc_a, desc_b, accumulate, Operand<T>::kBf16, kTransB);
#elif SCION_WGMMA
  const int scale_d = accumulate ? 1 : 0;
  if constexpr (kRegs == 128) {
    if constexpr (Operand<T>::kBf16 && kTransB) {
      SCION_WGMMA_SS_256("bf16", "1");
    } else if constexpr (Operand<T>::kBf16) {
      SCION_WGMMA_SS_256("bf16", "0");
    } else if constexpr (kTransB) {
      SCION_WGMMA_SS_256("f16", "1");
    } else {
      SCION_WGMMA_SS_256("f16", "0");
    }
  } else if constexpr (Operand<T>::kBf16 && kTransB) {
    SCION_WGMMA_SS_128("bf16", "1");
  } else if constexpr (Operand<T>::kBf16) {
    SCION_WGMMA_SS_128("bf16", "0");
  } else if constexpr (kTransB) {
    SCION_WGMMA_SS_128("f16", "1");
  } else {
    SCION_WGMMA_SS_128("f16", "0");
  }
#else
  (void)d, (void)desc_a, (void)desc_b, (void)accumulate;
#endif
}

// The same with A from registers: `a` holds this thread's fragment of A in the mma.m16n8k16 A
// layout, warp w of the warpgroup holding rows 16·w..16·w+15.
template <typename T>
__device__ __forceinline__ void wgmma_rs(float (&d)[64], const uint32_t (&a)[4], uint64_t desc_b,
                                         bool accumulate) {
#ifdef SCION_HOST_EMULATION
  scion_emu::wgmma(d, 128, a, 0, desc_b, accumulate, Operand<T>::kBf16);
#elif SCION_WGMMA
  const int scale_d = accumulate ? 1 : 0;
  if constexpr (Operand<T>::kBf16) {
    SCION_WGMMA_RS("bf16");
  } else {
    SCION_WGMMA_RS("f16");
  }
#else
  (void)d, (void)a, (void)desc_b, (void)accumulate;
#endif
}

}  // namespace scion

#endif  // SCION_DEVICE_CUH_
