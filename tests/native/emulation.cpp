// Runtime of the host emulation declared in emulation.h: fibers, barriers, warp collectives,
// deferred cp.async copies, and the handful of CUDA runtime calls csrc/ makes.
#include "emulation.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <vector>

#if !defined(__x86_64__)
#error "the host emulation's fiber switch is written for x86-64"
#endif

// Fiber switch (System V x86-64): saves the callee-saved registers and the floating-point control
// words on the current stack, stores the stack pointer in *from, and resumes the stack `to`.
extern "C" void scion_emu_switch(void** from, void* to);
extern "C" void scion_emu_trampoline();
asm(R"(
.text
.p2align 4
.globl scion_emu_switch
.hidden scion_emu_switch
.type scion_emu_switch,@function
scion_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size scion_emu_switch, .-scion_emu_switch
.p2align 4
.globl scion_emu_trampoline
.hidden scion_emu_trampoline
.type scion_emu_trampoline,@function
scion_emu_trampoline:
  movq %rbx, %rdi
  callq *%r12
  ud2
.size scion_emu_trampoline, .-scion_emu_trampoline
)");

namespace scion_emu {

ThreadState* current = nullptr;
uint3 block_idx{0, 0, 0};
dim3 block_dim{1, 1, 1};
dim3 grid_dim{1, 1, 1};

namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kMaxSharedBytes = 227 * 1024;  // sm_90's per-block opt-in limit

[[noreturn]] void fail(const char* what) {
  std::fprintf(stderr, "scion host emulation: %s (block %u,%u,%u thread %u,%u,%u)\n", what,
               block_idx.x, block_idx.y, block_idx.z, current ? current->thread_idx.x : 0,
               current ? current->thread_idx.y : 0, current ? current->thread_idx.z : 0);
  std::abort();
}

struct Barrier {
  int expected = 0;
  int arrived = 0;
  uint64_t generation = 0;
};

struct Copy {
  void* dst;
  const void* src;
};

struct Fiber {
  ThreadState state;
  void* sp = nullptr;
  std::vector<unsigned char> stack;
  bool done = false;
  int warp = 0;
  int lane = 0;
  std::vector<Copy> open;
  std::deque<std::vector<Copy>> committed;
};

struct Warp {
  Barrier barrier;
  uint64_t slot[32][6];
};

std::vector<Fiber> fibers;
std::vector<Warp> warps;
Barrier block_barrier;
std::vector<unsigned char> smem_storage;
unsigned char* smem = nullptr;
size_t smem_bytes = 0;
void* scheduler_sp = nullptr;
Fiber* running = nullptr;
bool progress = false;
const std::function<void()>* kernel_body = nullptr;

void yield() { scion_emu_switch(&running->sp, scheduler_sp); }

void wait(Barrier& b) {
  const uint64_t generation = b.generation;
  progress = true;
  if (++b.arrived == b.expected) {
    b.arrived = 0;
    ++b.generation;
    return;
  }
  while (b.generation == generation) yield();
}

void fiber_main(void*) {
  (*kernel_body)();
  running->done = true;
  progress = true;
  for (;;) yield();
}

void start(Fiber& f) {
  // Initial frame, as scion_emu_switch pops it: control words, r15..r12, rbx, rbp, then the
  // return address (the trampoline), which is entered with a 16-byte aligned stack.
  auto top = reinterpret_cast<uintptr_t>(f.stack.data() + f.stack.size()) & ~uintptr_t{15};
  auto* frame = reinterpret_cast<uint64_t*>(top - 8 - 7 * 8);
  uint32_t mxcsr = 0x1F80;
  uint16_t fpucw = 0x037F;
  std::memcpy(frame, &mxcsr, 4);
  std::memcpy(reinterpret_cast<unsigned char*>(frame) + 4, &fpucw, 2);
  frame[1] = 0;                                        // r15
  frame[2] = 0;                                        // r14
  frame[3] = 0;                                        // r13
  frame[4] = reinterpret_cast<uint64_t>(&fiber_main);  // r12: entry
  frame[5] = 0;                                        // rbx: its argument
  frame[6] = 0;                                        // rbp
  frame[7] = reinterpret_cast<uint64_t>(&scion_emu_trampoline);
  f.sp = frame;
  f.done = false;
  f.open.clear();
  f.committed.clear();
}

Fiber& self() { return *running; }
Warp& my_warp() { return warps[self().warp]; }

bool in_shared(const void* p, size_t bytes) {
  auto* c = static_cast<const unsigned char*>(p);
  return c >= smem && c + bytes <= smem + smem_bytes;
}

uint16_t bits16(const void* row, int element) {
  uint16_t v;
  std::memcpy(&v, static_cast<const unsigned char*>(row) + 2 * element, 2);
  return v;
}

float to_float(uint16_t bits, bool bf16) {
  if (bf16) {
    uint32_t w = uint32_t{bits} << 16;
    float f;
    std::memcpy(&f, &w, 4);
    return f;
  }
  __half_raw raw;
  raw.x = bits;
  return __half2float(__half(raw));
}

}  // namespace

void launch(dim3 grid, dim3 block, size_t bytes, const std::function<void()>& body) {
  const int threads = static_cast<int>(block.x * block.y * block.z);
  if (threads <= 0 || threads > 1024) fail("block size out of range");
  if (bytes > kMaxSharedBytes) fail("dynamic shared memory above the per-block limit");
  grid_dim = grid;
  block_dim = block;
  kernel_body = &body;
  if (fibers.size() < static_cast<size_t>(threads)) fibers.resize(threads);
  const int nwarps = (threads + 31) / 32;
  warps.assign(nwarps, Warp{});
  for (int w = 0; w < nwarps; ++w) warps[w].barrier.expected = std::min(32, threads - 32 * w);
  block_barrier = Barrier{threads, 0, 0};
  smem_storage.assign(bytes + 128, 0);
  smem = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_storage.data()) + 127) &
                                          ~uintptr_t{127});
  smem_bytes = bytes;
  for (int t = 0; t < threads; ++t) {
    Fiber& f = fibers[t];
    if (f.stack.size() != kStackBytes) f.stack.assign(kStackBytes, 0);
    f.state.thread_idx = {static_cast<unsigned>(t % block.x),
                          static_cast<unsigned>((t / block.x) % block.y),
                          static_cast<unsigned>(t / (block.x * block.y))};
    f.warp = t / 32;
    f.lane = t % 32;
  }
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        block_idx = {x, y, z};
        std::memset(smem, 0xFF, bytes);
        for (int t = 0; t < threads; ++t) start(fibers[t]);
        int live = threads;
        while (live > 0) {
          progress = false;
          for (int t = 0; t < threads; ++t) {
            Fiber& f = fibers[t];
            if (f.done) continue;
            running = &f;
            current = &f.state;
            scion_emu_switch(&scheduler_sp, f.sp);
            if (f.done) --live;
          }
          if (!progress && live > 0) fail("deadlock: threads wait at barriers others never reach");
        }
      }
    }
  }
  running = nullptr;
  current = nullptr;
  kernel_body = nullptr;
}

unsigned char* shared_memory() { return smem; }

void sync_block() { wait(block_barrier); }

uint32_t shfl_xor(uint32_t value, int lane_mask) {
  Warp& w = my_warp();
  const int lane = self().lane;
  w.slot[lane][0] = value;
  wait(w.barrier);
  const int source = lane ^ lane_mask;
  if (source >= w.barrier.expected) fail("shuffle from a lane outside the warp");
  const auto result = static_cast<uint32_t>(w.slot[source][0]);
  wait(w.barrier);
  return result;
}

void ldmatrix_x4(uint32_t r[4], const void* row, bool trans) {
  Warp& w = my_warp();
  const int lane = self().lane;
  if (w.barrier.expected != 32) fail("ldmatrix in a partial warp");
  if (reinterpret_cast<uintptr_t>(row) % 16 != 0 || !in_shared(row, 16)) {
    fail("ldmatrix row address not 16-byte aligned shared memory");
  }
  w.slot[lane][0] = reinterpret_cast<uintptr_t>(row);
  wait(w.barrier);
  for (int j = 0; j < 4; ++j) {
    uint16_t lo, hi;
    if (trans) {
      const auto* r0 = reinterpret_cast<const void*>(w.slot[8 * j + 2 * (lane % 4)][0]);
      const auto* r1 = reinterpret_cast<const void*>(w.slot[8 * j + 2 * (lane % 4) + 1][0]);
      lo = bits16(r0, lane / 4);
      hi = bits16(r1, lane / 4);
    } else {
      const auto* r0 = reinterpret_cast<const void*>(w.slot[8 * j + lane / 4][0]);
      lo = bits16(r0, 2 * (lane % 4));
      hi = bits16(r0, 2 * (lane % 4) + 1);
    }
    r[j] = uint32_t{lo} | (uint32_t{hi} << 16);
  }
  wait(w.barrier);
}

void mma_16816(float c[4], const uint32_t a[4], const uint32_t b[2], bool bf16) {
  Warp& w = my_warp();
  const int lane = self().lane;
  if (w.barrier.expected != 32) fail("mma in a partial warp");
  for (int i = 0; i < 4; ++i) w.slot[lane][i] = a[i];
  w.slot[lane][4] = b[0];
  w.slot[lane][5] = b[1];
  wait(w.barrier);
  auto A = [&](int r, int k) {
    const uint64_t reg = w.slot[(r % 8) * 4 + (k % 8) / 2][(r / 8) + 2 * (k / 8)];
    return to_float(static_cast<uint16_t>(reg >> (16 * (k % 2))), bf16);
  };
  auto B = [&](int k, int n) {
    const uint64_t reg = w.slot[n * 4 + (k % 8) / 2][4 + k / 8];
    return to_float(static_cast<uint16_t>(reg >> (16 * (k % 2))), bf16);
  };
  const int g = lane / 4;
  const int t = lane % 4;
  const int rows[4] = {g, g, g + 8, g + 8};
  const int cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
  float out[4];
  for (int i = 0; i < 4; ++i) {
    float acc = c[i];
    for (int k = 0; k < 16; ++k) acc = std::fmaf(A(rows[i], k), B(k, cols[i]), acc);
    out[i] = acc;
  }
  wait(w.barrier);
  for (int i = 0; i < 4; ++i) c[i] = out[i];
}

void cp_async_16(void* dst, const void* src) {
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || !in_shared(dst, 16)) {
    fail("cp.async destination not 16-byte aligned shared memory");
  }
  if (reinterpret_cast<uintptr_t>(src) % 16 != 0) fail("cp.async source not 16-byte aligned");
  self().open.push_back({dst, src});
}

void cp_async_commit() {
  Fiber& f = self();
  f.committed.push_back(std::move(f.open));
  f.open.clear();
}

void cp_async_wait(int pending) {
  Fiber& f = self();
  while (static_cast<int>(f.committed.size()) > pending) {
    for (const Copy& c : f.committed.front()) std::memcpy(c.dst, c.src, 16);
    f.committed.pop_front();
  }
}

}  // namespace scion_emu

// The CUDA runtime calls csrc/ makes, for one emulated device 0.
namespace {
cudaError_t last_error = cudaSuccess;
}

extern "C" {

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  return device == 0 ? cudaSuccess : (last_error = cudaErrorInvalidDevice);
}

cudaError_t cudaGetLastError(void) {
  const cudaError_t e = last_error;
  last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError(void) { return last_error; }

const char* cudaGetErrorName(cudaError_t error) {
  return error == cudaSuccess ? "cudaSuccess" : "cudaErrorEmulated";
}

const char* cudaGetErrorString(cudaError_t error) {
  return error == cudaSuccess ? "no error" : "error in the host emulation";
}

cudaError_t cudaFuncSetAttribute(const void*, enum cudaFuncAttribute, int) { return cudaSuccess; }

cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount:
      *value = 4;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = static_cast<int>(227 * 1024);
      return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor:
      *value = 9;
      return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor:
      *value = 0;
      return cudaSuccess;
    default:
      *value = 0;
      return cudaSuccess;
  }
}

}  // extern "C"
