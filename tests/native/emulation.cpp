// Runtime of the host emulation declared in emulation.h: fibers, barriers, warp collectives,
// deferred cp.async copies and wgmma products, and the handful of CUDA runtime calls csrc/ makes.
#include "emulation.h"

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <utility>
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

// How often csrc/ made the host-side calls a real runtime charges for, beside the arithmetic:
// read by the tests of what a call costs the host (scion_emu_call_count, below).
enum class Call { kLaunch, kFuncSetAttribute, kFuncGetAttributes, kEncodeTensorMap, kCount };
std::atomic<long long> call_counts[static_cast<int>(Call::kCount)];

void count_call(Call c) { call_counts[static_cast<int>(c)].fetch_add(1); }

// The dynamic shared-memory limit cudaFuncSetAttribute set per kernel (launches above 48 KiB
// need it, as on a device).
constexpr size_t kDefaultSharedBytes = 48 * 1024;
std::mutex shared_limits_mutex;
std::map<const void*, int> shared_limits;

int64_t shared_limit(const void* kernel) {
  const std::lock_guard<std::mutex> lock(shared_limits_mutex);
  const auto it = shared_limits.find(kernel);
  return it == shared_limits.end() ? 0 : it->second;
}

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

// One issued wgmma, as this thread will carry it out at its wgmma.wait_group: its accumulators,
// and A as a snapshot of the warpgroup's registers or through a descriptor.
struct Product {
  float* d;
  int n;
  bool accumulate, bf16, a_in_registers, trans_b;
  uint64_t desc_a, desc_b;
  std::vector<float> a;  // 64×16, row-major (a_in_registers)
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
  std::vector<Product> mma_open;
  std::deque<std::vector<Product>> mma_committed;
  bool fenced = false;  // a wgmma.fence since this thread last waited for products
};

struct Warp {
  Barrier barrier;
  uint64_t slot[32][6];
};

// What the 128 threads of a warpgroup pass to one wgmma.
struct WarpgroupSlot {
  uint64_t desc_a, desc_b;
  uint32_t a[4];
  int n;
  bool accumulate, a_in_registers, trans_b;
};
struct Warpgroup {
  Barrier barrier;
  WarpgroupSlot slot[128];
};

// A shared-memory barrier (mbarrier): arrivals and transaction bytes still owed by the current
// phase, phases completed, and the TMA copies that will complete transactions on it.
struct TmaCopy {
  unsigned char* dst;
  CUtensorMap map;
  int c[3];
};
struct MemoryBarrier {
  uint32_t count = 0, pending = 0;
  int64_t tx = 0;
  uint64_t completed = 0;
  std::vector<TmaCopy> copies;
};

std::vector<Fiber> fibers;
std::vector<Warp> warps;
std::vector<Warpgroup> warpgroups;
std::map<const void*, MemoryBarrier> memory_barriers;  // of the running block
Barrier block_barrier;
std::map<int, Barrier> named_barriers;  // bar.sync 1..15 of the running block
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
  if (!running->mma_open.empty() || !running->mma_committed.empty()) {
    fail("a thread ended with wgmma products it never waited for");
  }
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
  f.mma_open.clear();
  f.mma_committed.clear();
  f.fenced = false;
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

cudaError_t launch(const void* kernel, dim3 grid, dim3 block, size_t bytes,
                   const std::function<void()>& body) {
  count_call(Call::kLaunch);
  const int threads = static_cast<int>(block.x * block.y * block.z);
  if (threads <= 0 || threads > 1024) fail("block size out of range");
  if (bytes > kMaxSharedBytes) fail("dynamic shared memory above the per-block limit");
  if (bytes > kDefaultSharedBytes && static_cast<int64_t>(bytes) > shared_limit(kernel)) {
    return cudaErrorInvalidValue;  // as a device refuses it
  }
  grid_dim = grid;
  block_dim = block;
  kernel_body = &body;
  if (fibers.size() < static_cast<size_t>(threads)) fibers.resize(threads);
  const int nwarps = (threads + 31) / 32;
  warps.assign(nwarps, Warp{});
  for (int w = 0; w < nwarps; ++w) warps[w].barrier.expected = std::min(32, threads - 32 * w);
  const int ngroups = (threads + 127) / 128;
  warpgroups.assign(ngroups, Warpgroup{});
  for (int g = 0; g < ngroups; ++g) {
    warpgroups[g].barrier.expected = std::min(128, threads - 128 * g);
  }
  block_barrier = Barrier{threads, 0, 0};
  // 1024-byte aligned, as the swizzle patterns of wgmma's descriptors assume.
  smem_storage.assign(bytes + 1024, 0);
  smem = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(smem_storage.data()) + 1023) & ~uintptr_t{1023});
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
        memory_barriers.clear();
        named_barriers.clear();
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
        for (const auto& [bar, b] : memory_barriers) {
          if (!b.copies.empty()) fail("a block ended with TMA copies nobody waited for");
        }
      }
    }
  }
  running = nullptr;
  current = nullptr;
  kernel_body = nullptr;
  return cudaSuccess;
}

unsigned char* shared_memory() { return smem; }

void sync_block() { wait(block_barrier); }

void named_barrier_sync(int id, int count) {
  if (id < 1 || id > 15) fail("a named barrier outside 1..15");
  if (count <= 0 || count % 32 != 0 || count > block_barrier.expected) {
    fail("a named barrier's thread count must be whole warps of the block");
  }
  Barrier& b = named_barriers[id];
  if (b.expected == 0) b.expected = count;
  if (b.expected != count) fail("a named barrier used with different thread counts");
  wait(b);
}

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

namespace {

// Element (row, k) of a 16-bit K-major operand in shared memory, through a wgmma matrix
// descriptor (the PTX ISA's canonical layouts): start address, leading-dimension byte offset
// (LBO: between core matrices along K) and stride-dimension byte offset (SBO: between groups of
// 8 rows), all in 16-byte units, and the swizzle mode in bits 62–63. Without swizzling a core
// matrix is 8 rows of 16 contiguous bytes; with the 128-byte swizzle a row of 8 rows × 128 bytes
// holds 64 elements along K and the 16-byte chunks of each row are permuted by the row index
// (address bits 4–6 ^= bits 7–9).
float operand(uint64_t desc, int row, int k, bool bf16) {
  const uint32_t start = static_cast<uint32_t>(desc & 0x3FFF) << 4;
  const uint32_t lbo = static_cast<uint32_t>((desc >> 16) & 0x3FFF) << 4;
  const uint32_t sbo = static_cast<uint32_t>((desc >> 32) & 0x3FFF) << 4;
  const int base_offset = static_cast<int>((desc >> 49) & 7);
  const int mode = static_cast<int>(desc >> 62);
  if (base_offset != 0) fail("wgmma descriptor with a nonzero base offset");
  uint32_t at;
  if (mode == 0) {
    at = start + (row / 8) * sbo + (row % 8) * 16 + (k / 8) * lbo + (k % 8) * 2;
  } else if (mode == 1) {
    at = start + (row / 8) * sbo + (row % 8) * 128 + k * 2;
    at ^= ((at >> 7) & 7) << 4;
  } else {
    fail("wgmma descriptor with a 64- or 32-byte swizzle (not emulated)");
  }
  if (at + 2 > smem_bytes) fail("wgmma operand outside the block's shared memory");
  return to_float(bits16(smem + at, 0), bf16);
}

// Element (k, n) of an MN-major 16-bit B operand in the 128-byte swizzle (the PTX ISA's
// canonical ((T,8,m),(8,k)):((1,T,LBO),(8T,SBO)) with T = 8): 64 elements of N contiguous in a
// 128-byte row, a row per k, atoms of 8 rows SBO bytes apart along K, blocks of 64 along N LBO
// bytes apart, the 16-byte chunks permuted by address bits 7–9.
float operand_mn(uint64_t desc, int k, int n, bool bf16) {
  const uint32_t start = static_cast<uint32_t>(desc & 0x3FFF) << 4;
  const uint32_t lbo = static_cast<uint32_t>((desc >> 16) & 0x3FFF) << 4;
  const uint32_t sbo = static_cast<uint32_t>((desc >> 32) & 0x3FFF) << 4;
  if (((desc >> 49) & 7) != 0) fail("wgmma descriptor with a nonzero base offset");
  if ((desc >> 62) != 1)
    fail("an MN-major wgmma operand without the 128-byte swizzle (not emulated)");
  uint32_t at = start + (n / 64) * lbo + (k / 8) * sbo + (k % 8) * 128 + (n % 64) * 2;
  at ^= ((at >> 7) & 7) << 4;
  if (at + 2 > smem_bytes) fail("wgmma operand outside the block's shared memory");
  return to_float(bits16(smem + at, 0), bf16);
}

Warpgroup& my_warpgroup() {
  const int tid = static_cast<int>(&self() - fibers.data());
  return warpgroups[tid / 128];
}

void run(const Product& p, int t) {
  const int warp = t / 32;
  const int lane = t % 32;
  for (int i = 0; i < p.n / 2; ++i) {
    const int row = warp * 16 + lane / 4 + 8 * ((i / 2) % 2);
    const int col = (i / 4) * 8 + 2 * (lane % 4) + i % 2;
    float acc = p.accumulate ? p.d[i] : 0.0f;
    for (int k = 0; k < 16; ++k) {
      const float a = p.a_in_registers ? p.a[row * 16 + k] : operand(p.desc_a, row, k, p.bf16);
      const float b =
          p.trans_b ? operand_mn(p.desc_b, k, col, p.bf16) : operand(p.desc_b, col, k, p.bf16);
      acc = std::fmaf(a, b, acc);
    }
    p.d[i] = acc;
  }
}

}  // namespace

uint32_t shared_address(const void* p) {
  if (!in_shared(p, 1)) fail("shared-memory address of a pointer outside shared memory");
  return static_cast<uint32_t>(static_cast<const unsigned char*>(p) - smem);
}

void wgmma_fence() { self().fenced = true; }

void wgmma(float* d, int n, const uint32_t* a, uint64_t desc_a, uint64_t desc_b, bool accumulate,
           bool bf16, bool trans_b) {
  Warpgroup& g = my_warpgroup();
  Fiber& f = self();
  const int t = static_cast<int>(&f - fibers.data()) % 128;
  if (g.barrier.expected != 128) fail("wgmma in a partial warpgroup");
  if (!f.fenced) fail("wgmma without a wgmma.fence after the registers were last accessed");
  if (n % 8 != 0 || n < 8 || n > 256) fail("wgmma with an invalid n");
  WarpgroupSlot& mine = g.slot[t];
  mine = WarpgroupSlot{desc_a, desc_b, {0, 0, 0, 0}, n, accumulate, a != nullptr, trans_b};
  if (a != nullptr) {
    for (int r = 0; r < 4; ++r) mine.a[r] = a[r];
  }
  wait(g.barrier);
  const WarpgroupSlot& first = g.slot[0];
  if (first.n != n || first.accumulate != accumulate || first.a_in_registers != (a != nullptr) ||
      first.trans_b != trans_b || first.desc_b != desc_b ||
      (a == nullptr && first.desc_a != desc_a)) {
    fail("wgmma whose shape, scale-d or descriptors differ across the warpgroup");
  }
  Product p{d, n, accumulate, bf16, a != nullptr, trans_b, desc_a, desc_b, {}};
  if (a != nullptr) {
    // The mma.m16n8k16 A layout, warp w holding rows 16w..16w+15.
    p.a.resize(64 * 16);
    for (int row = 0; row < 64; ++row) {
      for (int k = 0; k < 16; ++k) {
        const int r = row % 16;
        const WarpgroupSlot& s = g.slot[(row / 16) * 32 + (r % 8) * 4 + (k % 8) / 2];
        const uint32_t reg = s.a[(r / 8) + 2 * (k / 8)];
        p.a[row * 16 + k] = to_float(static_cast<uint16_t>(reg >> (16 * (k % 2))), bf16);
      }
    }
  }
  wait(g.barrier);  // every thread has read the slots before they are reused
  f.mma_open.push_back(std::move(p));
}

void wgmma_commit() {
  Fiber& f = self();
  f.mma_committed.push_back(std::move(f.mma_open));
  f.mma_open.clear();
}

void wgmma_wait(int pending) {
  Fiber& f = self();
  const int t = static_cast<int>(&f - fibers.data()) % 128;
  while (static_cast<int>(f.mma_committed.size()) > pending) {
    for (const Product& p : f.mma_committed.front()) run(p, t);
    f.mma_committed.pop_front();
  }
  f.fenced = false;
}

void fence_proxy_async() {}

// --- TMA and shared-memory barriers ---------------------------------------------------------

namespace {

// The emulation's tensor map, in CUtensorMap's 128 opaque bytes.
struct TensorMap {
  uint64_t magic;
  const unsigned char* base;
  uint64_t dims[3];
  uint64_t strides[2];  // bytes between consecutive indices of dims 1 and 2
  uint32_t box[3];
  uint32_t element_bytes;
  uint32_t swizzle128;
};
static_assert(sizeof(TensorMap) <= sizeof(CUtensorMap), "the emulated map must fit a CUtensorMap");
constexpr uint64_t kMapMagic = 0x5C10A7E45C10A7E4ull;

TensorMap decode(const CUtensorMap& map) {
  TensorMap t;
  std::memcpy(&t, &map, sizeof t);
  if (t.magic != kMapMagic) fail("a tensor map not made by cuTensorMapEncodeTiled");
  return t;
}

MemoryBarrier& barrier_at(const void* bar) {
  if (reinterpret_cast<uintptr_t>(bar) % 8 != 0 || !in_shared(bar, 8)) {
    fail("mbarrier not 8-byte aligned shared memory");
  }
  auto it = memory_barriers.find(bar);
  if (it == memory_barriers.end()) fail("mbarrier used before mbarrier.init");
  return it->second;
}

void complete_phase(MemoryBarrier& b) {
  if (b.pending == 0 && b.tx == 0) {
    ++b.completed;
    b.pending = b.count;
    progress = true;
  }
}

// Carries out a TMA copy: the box, zeros outside the tensor, rows of the box's innermost
// dimension stored one after another, with the 128-byte swizzle on the shared-memory address.
void run_copy(MemoryBarrier& b, const TmaCopy& copy) {
  const TensorMap t = decode(copy.map);
  const uint32_t e = t.element_bytes;
  const size_t bytes = size_t{t.box[0]} * t.box[1] * t.box[2] * e;
  if (copy.dst + bytes > smem + smem_bytes) fail("TMA box beyond the block's shared memory");
  for (uint32_t z = 0; z < t.box[2]; ++z) {
    for (uint32_t y = 0; y < t.box[1]; ++y) {
      for (uint32_t x = 0; x < t.box[0]; ++x) {
        const int64_t gx = copy.c[0] + int64_t{x}, gy = copy.c[1] + int64_t{y};
        const int64_t gz = copy.c[2] + int64_t{z};
        uintptr_t at =
            reinterpret_cast<uintptr_t>(copy.dst) + ((size_t{z} * t.box[1] + y) * t.box[0] + x) * e;
        if (t.swizzle128) at ^= ((at >> 7) & 7) << 4;
        unsigned char* out = reinterpret_cast<unsigned char*>(at);
        const bool inside = gx >= 0 && gy >= 0 && gz >= 0 && gx < int64_t(t.dims[0]) &&
                            gy < int64_t(t.dims[1]) && gz < int64_t(t.dims[2]);
        if (inside) {
          std::memcpy(out, t.base + gz * t.strides[1] + gy * t.strides[0] + gx * e, e);
        } else {
          std::memset(out, 0, e);
        }
      }
    }
  }
  b.tx -= static_cast<int64_t>(bytes);
  if (b.tx < 0) fail("TMA copies completed more bytes than the barrier expected");
}

}  // namespace

void mbarrier_init(uint64_t* bar, uint32_t count) {
  if (reinterpret_cast<uintptr_t>(bar) % 8 != 0 || !in_shared(bar, 8)) {
    fail("mbarrier not 8-byte aligned shared memory");
  }
  if (count == 0) fail("mbarrier.init with a zero count");
  MemoryBarrier& b = memory_barriers[bar];
  b = MemoryBarrier{};
  b.count = b.pending = count;
}

void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  MemoryBarrier& b = barrier_at(bar);
  if (b.pending == 0) fail("mbarrier arrival beyond its count");
  b.tx += bytes;
  --b.pending;
  progress = true;
  complete_phase(b);
}

// SCION_EMULATION_TMA=eager carries TMA copies out when issued (a stage refilled while its
// products still read it shows up); by default they wait for the first thread that waits on
// their barrier's phase and finds it incomplete (a stage read before its wait shows up).
static bool eager_copies() {
  const char* mode = std::getenv("SCION_EMULATION_TMA");
  return mode != nullptr && std::strcmp(mode, "eager") == 0;
}

void tma_load_3d(void* dst, const CUtensorMap* map, int c0, int c1, int c2, uint64_t* bar) {
  const TensorMap t = decode(*map);
  auto* d = static_cast<unsigned char*>(dst);
  const size_t align = t.swizzle128 ? 1024 : 128;
  if (reinterpret_cast<uintptr_t>(d) % align != 0 || !in_shared(d, 1)) {
    fail("TMA destination not aligned shared memory (1024 bytes with the 128-byte swizzle)");
  }
  TmaCopy copy{d, *map, {c0, c1, c2}};
  MemoryBarrier& b = barrier_at(bar);
  if (eager_copies()) {
    run_copy(b, copy);
    complete_phase(b);
  } else {
    b.copies.push_back(copy);
  }
}

void mbarrier_wait(uint64_t* bar, uint32_t parity) {
  for (;;) {
    MemoryBarrier& b = barrier_at(bar);
    if ((b.completed & 1) != (parity & 1)) return;
    if (!b.copies.empty()) {
      std::vector<TmaCopy> copies;
      copies.swap(b.copies);
      for (const TmaCopy& c : copies) run_copy(b, c);
      progress = true;
      complete_phase(b);
      continue;
    }
    yield();
  }
}

}  // namespace scion_emu

// The CUDA runtime calls csrc/ makes, for one emulated device 0.
namespace {
cudaError_t last_error = cudaSuccess;
}

namespace {

// cuTensorMapEncodeTiled for the emulated device: rank-3 16-bit tensors, no interleave, no
// swizzle or the 128-byte one, stored in the emulation's own encoding.
CUresult CUDAAPI encode_tiled(CUtensorMap* map, CUtensorMapDataType type, cuuint32_t rank,
                              void* address, const cuuint64_t* dims, const cuuint64_t* strides,
                              const cuuint32_t* box, const cuuint32_t* element_strides,
                              CUtensorMapInterleave interleave, CUtensorMapSwizzle swizzle,
                              CUtensorMapL2promotion, CUtensorMapFloatOOBfill) {
  scion_emu::count_call(scion_emu::Call::kEncodeTensorMap);
  const bool half =
      type == CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 || type == CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  if (!half || rank != 3 || interleave != CU_TENSOR_MAP_INTERLEAVE_NONE ||
      (swizzle != CU_TENSOR_MAP_SWIZZLE_NONE && swizzle != CU_TENSOR_MAP_SWIZZLE_128B) ||
      reinterpret_cast<uintptr_t>(address) % 16 != 0) {
    return CUDA_ERROR_INVALID_VALUE;
  }
  scion_emu::TensorMap t{};
  t.magic = scion_emu::kMapMagic;
  t.base = static_cast<const unsigned char*>(address);
  t.element_bytes = 2;
  t.swizzle128 = swizzle == CU_TENSOR_MAP_SWIZZLE_128B;
  for (int i = 0; i < 3; ++i) {
    if (box[i] == 0 || box[i] > 256 || element_strides[i] != 1) return CUDA_ERROR_INVALID_VALUE;
    t.dims[i] = dims[i];
    t.box[i] = box[i];
  }
  for (int i = 0; i < 2; ++i) {
    if (strides[i] % 16 != 0) return CUDA_ERROR_INVALID_VALUE;
    t.strides[i] = strides[i];
  }
  if ((box[0] * 2) % 16 != 0 || (t.swizzle128 && box[0] * 2 > 128)) return CUDA_ERROR_INVALID_VALUE;
  *map = CUtensorMap{};
  std::memcpy(map, &t, sizeof t);
  return CUDA_SUCCESS;
}

}  // namespace

// The emulated device's multiprocessors: SCION_EMULATION_SMS (1 to 1024), or 4. Persistent
// launches size their grids by it, so a small count makes each block walk several tiles.
static int multiprocessors() {
  const char* sms = std::getenv("SCION_EMULATION_SMS");
  const int n = sms != nullptr ? std::atoi(sms) : 4;
  return n >= 1 && n <= 1024 ? n : 4;
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

cudaError_t cudaFuncSetAttribute(const void* kernel, enum cudaFuncAttribute attr, int value) {
  scion_emu::count_call(scion_emu::Call::kFuncSetAttribute);
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || static_cast<size_t>(value) > scion_emu::kMaxSharedBytes) {
      return last_error = cudaErrorInvalidValue;
    }
    const std::lock_guard<std::mutex> lock(scion_emu::shared_limits_mutex);
    scion_emu::shared_limits[kernel] = value;
  }
  return cudaSuccess;
}

// Every emulated kernel runs as if built for the emulated device's architecture (9.0).
cudaError_t cudaFuncGetAttributes(struct cudaFuncAttributes* attr, const void*) {
  scion_emu::count_call(scion_emu::Call::kFuncGetAttributes);
  *attr = cudaFuncAttributes{};
  attr->binaryVersion = 90;
  attr->ptxVersion = 90;
  attr->maxThreadsPerBlock = 1024;
  return cudaSuccess;
}

cudaError_t cudaGetDriverEntryPointByVersion(const char* symbol, void** fn, unsigned int,
                                             unsigned long long,
                                             enum cudaDriverEntryPointQueryResult* status) {
  const bool known = std::strcmp(symbol, "cuTensorMapEncodeTiled") == 0;
  *fn = known ? reinterpret_cast<void*>(&encode_tiled) : nullptr;
  if (status != nullptr)
    *status = known ? cudaDriverEntryPointSuccess : cudaDriverEntryPointSymbolNotFound;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount:  // SCION_EMULATION_SMS, or 4
      *value = multiprocessors();
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

// The count of one kind of call since the module was loaded: "launch", "cudaFuncSetAttribute",
// "cudaFuncGetAttributes" or "cuTensorMapEncodeTiled"; -1 for another name. Exported (the
// module's other symbols are hidden), for the tests to reach through ctypes.
__attribute__((visibility("default"))) long long scion_emu_call_count(const char* name) {
  using scion_emu::Call;
  const std::pair<const char*, Call> names[] = {{"launch", Call::kLaunch},
                                                {"cudaFuncSetAttribute", Call::kFuncSetAttribute},
                                                {"cudaFuncGetAttributes", Call::kFuncGetAttributes},
                                                {"cuTensorMapEncodeTiled", Call::kEncodeTensorMap}};
  for (const auto& [known, call] : names) {
    if (std::strcmp(name, known) == 0) return scion_emu::call_counts[static_cast<int>(call)].load();
  }
  return -1;
}

}  // extern "C"
