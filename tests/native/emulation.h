// Host emulation of the CUDA features csrc/ uses, so the kernels run on a CPU under test.
//
// Force-included (g++ -include) before every csrc/*.cu source, compiled as C++ with
// SCION_HOST_EMULATION defined; emulation.cpp holds the runtime. A launch runs its blocks one after
// another; within a block every CUDA thread is a fiber (a user-level context on one OS thread),
// switched at each barrier. So __syncthreads, warp shuffles, ldmatrix and mma.sync (both warp
// collectives, emulated lane by lane from the PTX fragment layouts) and Hopper's wgmma (a
// warpgroup collective reading shared memory through its matrix descriptors) behave as on the
// device, and a missing barrier or a read before its cp.async completed shows up as a wrong
// result:
//   - cp.async copies are deferred until the matching cp.async.wait_group;
//   - wgmma products are deferred until the matching wgmma.wait_group: they read shared memory and
//     write their accumulators then, not when issued;
//   - TMA copies are deferred until a thread waits on the barrier they complete (tensor maps are
//     the emulation's own encoding, from its cuTensorMapEncodeTiled);
//   - dynamic shared memory is filled with 0xFF bytes (NaN as fp32, bf16 and fp16) per block;
//   - a block whose threads cannot all reach a barrier aborts with a message (deadlock).
// Runs are deterministic: fibers switch in a fixed order.
#ifndef SCION_TESTS_EMULATION_H_
#define SCION_TESTS_EMULATION_H_

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>

// The CUDA headers define the execution-space keywords away for a host compiler; these cover
// any they leave out.
#ifndef __global__
#define __global__
#endif
#ifndef __device__
#define __device__
#endif
#ifndef __host__
#define __host__
#endif
#ifndef __forceinline__
#define __forceinline__ inline
#endif
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#ifndef __grid_constant__
#define __grid_constant__
#endif

namespace scion_emu {

struct ThreadState {
  uint3 thread_idx;
};

// The running fiber's CUDA thread index, and the launch geometry.
extern ThreadState* current;
extern uint3 block_idx;
extern dim3 block_dim;
extern dim3 grid_dim;

// Runs `kernel`'s `body` on the grid; as a device does, refuses (cudaErrorInvalidValue) more
// than 48 KiB of dynamic shared memory unless cudaFuncSetAttribute raised the kernel's limit.
cudaError_t launch(const void* kernel, dim3 grid, dim3 block, size_t smem_bytes,
                   const std::function<void()>& body);
unsigned char* shared_memory();
void sync_block();
// bar.sync id, count: `count` threads of the block meet (the first call fixes the count).
void named_barrier_sync(int id, int count);
// Warp collectives: every lane of the calling warp must call them, in the same order.
uint32_t shfl_xor(uint32_t value, int lane_mask);
void ldmatrix_x4(uint32_t r[4], const void* row, bool trans);
void mma_16816(float c[4], const uint32_t a[4], const uint32_t b[2], bool bf16);
void cp_async_16(void* smem, const void* gmem);
void cp_async_commit();
void cp_async_wait(int pending);
// Hopper's warpgroup products (all 128 threads of a warpgroup call them, in the same order).
// `d`: this thread's n/2 fp32 accumulators of a 64×n×16 product; `a`: its four registers of A,
// or null when A comes from shared memory through `desc_a`; `trans_b`: B is N-major.
uint32_t shared_address(const void* p);
void wgmma_fence();
void wgmma(float* d, int n, const uint32_t* a, uint64_t desc_a, uint64_t desc_b, bool accumulate,
           bool bf16, bool trans_b = false);
void wgmma_commit();
void wgmma_wait(int pending);
void fence_proxy_async();
// Shared-memory barriers and TMA copies: a copy is carried out when a thread waits on its
// barrier, and a thread waiting for a phase that has not completed lets the others run.
void mbarrier_init(uint64_t* bar, uint32_t count);
void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes);
void mbarrier_wait(uint64_t* bar, uint32_t parity);
void tma_load_3d(void* dst, const CUtensorMap* map, int c0, int c1, int c2, uint64_t* bar);

}  // namespace scion_emu

#define threadIdx (scion_emu::current->thread_idx)
#define blockIdx (scion_emu::block_idx)
#define blockDim (scion_emu::block_dim)
#define gridDim (scion_emu::grid_dim)

inline void __syncthreads() { scion_emu::sync_block(); }

inline float __shfl_xor_sync(unsigned, float v, int lane_mask, int = 32) {
  uint32_t bits;
  __builtin_memcpy(&bits, &v, 4);
  bits = scion_emu::shfl_xor(bits, lane_mask);
  __builtin_memcpy(&v, &bits, 4);
  return v;
}

inline float __fmaf_rn(float a, float b, float c) { return std::fmaf(a, b, c); }
inline float __fmul_rn(float a, float b) {
  volatile float r = a * b;
  return r;
}
inline float __fadd_rn(float a, float b) {
  volatile float r = a + b;
  return r;
}
inline float __fdiv_rn(float a, float b) {
  volatile float r = a / b;
  return r;
}
inline float __frcp_rn(float a) { return __fdiv_rn(1.0f, a); }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }

#endif  // SCION_TESTS_EMULATION_H_
