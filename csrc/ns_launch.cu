// The launch sequence of the Newton–Schulz step (newton_schulz.cu has the overview): each kernel's
// arguments from the problem and the plan, and the launches in order, a bucket in slices of as many
// matrices as one launch's arguments can reference.
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

#include "device.cuh"
#include "ns_gemm.cuh"
#include "ns_launch.cuh"
#include "ns_plan.cuh"
#include "ns_prepare.cuh"
#include "ns_small.cuh"
#include "ns_wgmma.cuh"
#include "status.cuh"

namespace scion::ns {
namespace {

// What every launch of one call needs; the first failed CUDA call goes to `failure`.
struct Launcher {
  const scion_ns_problem& pr;
  const Plan& plan;
  int device;  // the current device
  cudaStream_t stream;
  FirstError& failure;

  bool ok(cudaError_t e, const char* stage) { return failure.ok(e, stage); }
};

// Calls launch(first, count) for the bucket's matrices first.. first + count - 1, in consecutive
// slices of at most `per`, until a call returns false; whether none did.
template <typename F>
bool for_each_slice(int64_t batch, int per, F&& launch) {
  for (int64_t first = 0; first < batch; first += per) {
    const int count = static_cast<int>(batch - first < per ? batch - first : per);
    if (!launch(first, count)) return false;
  }
  return true;
}

// out = acc_scale·(a·bᵀ or a·b) + add_scale·add, with `add` laid out as `out`. (The initializer
// lists GemmArgs' fields in their declared order.)
GemmArgs product(const void* a, int64_t a_batch, int32_t lda, const void* b, int64_t b_batch,
                 int32_t ldb, const void* add, void* out, int64_t out_batch, int32_t ldc, int32_t k,
                 float acc_scale, float add_scale, int32_t tiles, int32_t tiles_n) {
  const int32_t batch0 = 0;      // set per launch where a launch takes part of the bucket
  const int32_t matrices = 0;    // set by the launch
  const int32_t per_matrix = 0;  // set by the launch
  const float diag_scale = 0.0f;
  return GemmArgs{a,        b,          add,       out,       a_batch,   b_batch, out_batch,
                  lda,      ldb,        ldc,       k,         tiles,     tiles_n, batch0,
                  matrices, per_matrix, acc_scale, add_scale, diag_scale};
}

// cuTensorMapEncodeTiled, from the driver through the runtime (no link-time dependency on
// libcuda), or null where the driver has none.
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
#if CUDART_VERSION >= 12050
    const cudaError_t e = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000,
                                                           cudaEnableDefault, &found);
#else  // before 12.5, the unversioned lookup (deprecated since)
    const cudaError_t e =
        cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &fn, cudaEnableDefault, &found);
#endif
    if (e != cudaSuccess || found != cudaDriverEntryPointSuccess) fn = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encode;
}

// The tensor map of `batch` dense rows × cols matrices of T, `batch_stride` elements apart,
// read in boxes of 64 columns × box_rows rows in the 128-byte swizzle; false if the driver
// refuses it.
template <typename T>
bool encode_map(CUtensorMap& map, const void* base, int64_t rows, int64_t cols, int64_t batch,
                int64_t batch_stride, uint32_t box_rows) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  if (encode == nullptr) return false;
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows),
                              static_cast<cuuint64_t>(batch)};
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(cols) * sizeof(T),
                                 static_cast<cuuint64_t>(batch_stride) * sizeof(T)};
  const cuuint32_t box[3] = {64, box_rows, 1};
  const cuuint32_t unit[3] = {1, 1, 1};
  const CUtensorMapDataType type =
      Operand<T>::kBf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  return encode(&map, type, 3, const_cast<void*>(base), dims, strides, box, unit,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// The tensor maps of one call, each encoded once. A call's products read a few buffers (X and Y,
// A and B, the Gram form's R, P, Q and T) with the same shapes in every step, so the two maps of
// each launch are mostly ones an earlier launch encoded: 6 distinct maps for the 30 of five plain
// steps. Keyed by every argument that varies within a call (the type and the batch do not).
template <typename T>
class CallMaps {
 public:
  explicit CallMaps(int64_t batch) : batch_(batch) {}

  // encode_map<T>(map, base, rows, cols, batch, batch_stride, box_rows), or its earlier result.
  bool get(CUtensorMap& map, const void* base, int64_t rows, int64_t cols, int64_t batch_stride,
           uint32_t box_rows) {
    const Key key{base, rows, cols, batch_stride, box_rows};
    for (int i = 0; i < count_; ++i) {
      if (keys_[i] == key) {
        map = maps_[i];
        return true;
      }
    }
    if (!encode_map<T>(map, base, rows, cols, batch_, batch_stride, box_rows)) return false;
    if (count_ < kCapacity) {  // past it (no path comes near), encoded every time
      keys_[count_] = key;
      maps_[count_++] = map;
    }
    return true;
  }

 private:
  struct Key {
    const void* base;
    int64_t rows, cols, batch_stride;
    uint32_t box_rows;
    bool operator==(const Key& o) const {
      return base == o.base && rows == o.rows && cols == o.cols && batch_stride == o.batch_stride &&
             box_rows == o.box_rows;
    }
  };
  static constexpr int kCapacity = 12;
  int64_t batch_;
  int count_ = 0;
  Key keys_[kCapacity];
  CUtensorMap maps_[kCapacity];
};

// What a kernel needs once per device before it is launched: its dynamic shared-memory limit
// raised (cudaFuncSetAttribute) and, for the wgmma kernels, a check that the device loaded
// sm_90a's image (cudaFuncGetAttributes). Both hold for the life of the device's context, so they
// are done once per process, kernel and device, not on every call; each entry is a kernel, a
// device and the limit set. It holds for a device's primary context, the one the runtime and
// PyTorch use: a context made through the driver API and made current instead would need its
// own set-up, and cudaDeviceReset unloads the kernels with their attributes; neither is done
// here or by PyTorch.
struct ReadyKernel {
  const void* kernel;
  int device;
  int smem;
};

std::mutex& ready_mutex() {
  static std::mutex m;
  return m;
}

std::vector<ReadyKernel>& ready_kernels() {
  static std::vector<ReadyKernel> v;
  return v;
}

// Readies `kernel` for launches with `smem` bytes of dynamic shared memory on L.device (see
// ReadyKernel); `wgmma`: it is a wgmma kernel, whose image is checked first.
bool ready(Launcher& L, const void* kernel, size_t smem, bool wgmma) {
  const int bytes = static_cast<int>(smem);
  // Held across the CUDA calls, so that two threads never lower each other's limit.
  const std::lock_guard<std::mutex> lock(ready_mutex());
  ReadyKernel* known = nullptr;
  for (ReadyKernel& k : ready_kernels()) {
    if (k.kernel == kernel && k.device == L.device) known = &k;
  }
  if (known != nullptr && known->smem >= bytes) return true;
  if (wgmma && known == nullptr) {
    // The wgmma kernels trap unless the image the device loaded is sm_90a's: compiled from
    // compute_90a PTX for sm_90 (an sm_80 image, or compute_80 PTX compiled for a newer
    // device, has the trap). A build for plain "90" is not told apart: ARCHS names 90a.
    cudaFuncAttributes attr{};
    if (!L.ok(cudaFuncGetAttributes(&attr, kernel), "looking up the wgmma kernels")) return false;
    if ((attr.binaryVersion != 90 || attr.ptxVersion < 90) &&
        !L.ok(cudaErrorInvalidDeviceFunction,
              "the wgmma products (they need a build with sm_90a on a compute capability 9.0 "
              "device)")) {
      return false;
    }
  }
  if (!L.ok(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes),
            "raising the shared-memory limit")) {
    return false;
  }
  if (known != nullptr) {
    known->smem = bytes;
  } else {
    ready_kernels().push_back(ReadyKernel{kernel, L.device, bytes});
  }
  return true;
}

// The products' kernel for a tiling: wgmma_kernel for Hopper's, gemm_kernel otherwise.
// kXShared: the wgmma a·X + B·X reads X from shared memory (N-major), not Xᵀ from registers.
// A kernel depends only on its own product's tile width (one instance for every tiling that
// shares it).
template <typename T, Product kProduct, typename Cfg, typename Update, bool kXShared = false>
constexpr auto product_kernel() {
  if constexpr (kIsWgmma<Cfg>) {
    constexpr bool kApply = kProduct == Product::kApply;
    constexpr bool kShared = kXShared && kApply;  // one kernel otherwise
    using Tiling = std::conditional_t<kApply, WgmmaTiling<Cfg::kApplyN>,
                                      WgmmaTiling<Cfg::kTile, Cfg::kSquareN>>;
    return wgmma_kernel<T, kProduct, Tiling, Update, kShared>;
  } else {
    return gemm_kernel<T, kProduct, Cfg, Update>;
  }
}

template <typename T, typename Cfg, bool kXShared = false>
bool run_products(Launcher& L, const scion_ns_matrix* mats, void* workspace) {
  const scion_ns_problem& pr = L.pr;
  const Plan& plan = L.plan;
  T* x = static_cast<T*>(workspace);
  T* y = x + pr.batch * plan.x_elems;
  T* a = y + pr.batch * plan.x_elems;
  T* b = a + pr.batch * plan.a_elems;
  // The a·X + B·X tiles may be wider than the others (WgmmaTiling<256>): the last one along
  // X's columns then overhangs them (see store_tile).
  constexpr int kApplyN = Cfg::columns(Product::kApply);
  const int tiles_m = static_cast<int>(plan.m_pad / Cfg::kTile);
  const int tiles_n = static_cast<int>((plan.n_pad + kApplyN - 1) / kApplyN);
  constexpr int kRatio = Cfg::columns(Product::kGram) / Cfg::kTile;
  const int tri = triangle_tiles<kRatio>(tiles_m);
  auto* gram = product_kernel<T, Product::kGram, Cfg, NoUpdate>();
  auto* poly = product_kernel<T, Product::kPoly, Cfg, NoUpdate>();
  auto* apply = product_kernel<T, Product::kApply, Cfg, NoUpdate, kXShared>();
  auto* apply_update = product_kernel<T, Product::kApply, Cfg, UpdateArgs, kXShared>();
  const std::pair<const void*, Product> kernels[] = {
      {reinterpret_cast<const void*>(gram), Product::kGram},
      {reinterpret_cast<const void*>(poly), Product::kPoly},
      {reinterpret_cast<const void*>(apply), Product::kApply},
      {reinterpret_cast<const void*>(apply_update), Product::kApply}};
  for (const auto& [f, kind] : kernels) {
    if (!ready(L, f, Cfg::smem_bytes(kind), kIsWgmma<Cfg>)) return false;
  }
  const dim3 block(Cfg::kThreads);
  const int32_t mp = static_cast<int32_t>(plan.m_pad);
  const int32_t np = static_cast<int32_t>(plan.n_pad);
  // Persistent wgmma products: a block per multiprocessor (one fits, by its shared memory).
  // (cudaDeviceGetAttribute reads the runtime's table: nothing to save by keeping it here.)
  int sms = 0;
  if (kIsWgmma<Cfg> && pr.persistent &&
      !L.ok(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, L.device),
            "counting the multiprocessors")) {
    return false;
  }
  CallMaps<T> call_maps(pr.batch);
  // One launch of `kernel` (a `kind` product) on `g` for `matrices` matrices from g.batch0:
  // a block per tile and matrix (a wgmma kernel walks its tiles in one sequence, so it takes
  // them all along x, or as many as there are multiprocessors when persistent), with the TMA
  // maps for the wgmma kernels: the left operand (tiles_m·kTile rows of g.k), and the right
  // one, of as many rows (the symmetric products) or X (a·X + B·X: g.k rows of g.ldb).
  auto launch = [&](auto* kernel, Product kind, GemmArgs g, int matrices, const auto& u,
                    const char* what) {
    const size_t smem = Cfg::smem_bytes(kind);
    const int per_matrix = kind == Product::kApply ? tiles_m * tiles_n : tri;
    g.matrices = matrices;
    g.per_matrix = per_matrix;
    if constexpr (kIsWgmma<Cfg>) {
      const int64_t tiles = int64_t{per_matrix} * matrices;
      if (tiles > INT32_MAX) return L.ok(cudaErrorInvalidConfiguration, what);  // int tile index
      const dim3 grid(static_cast<unsigned>(sms > 0 && sms < tiles ? sms : tiles));
      TmaMaps maps{};
      const int64_t rows = int64_t{tiles_m} * Cfg::kTile;
      const bool encoded = call_maps.get(maps.left, g.a, rows, g.k, g.a_batch, Cfg::kTile) &&
                           (kind == Product::kApply
                                ? call_maps.get(maps.right, g.b, g.k, g.ldb, g.b_batch, Cfg::kK)
                                : call_maps.get(maps.right, g.b, rows, g.k, g.b_batch, Cfg::kTile));
      if (!encoded) {
        return L.ok(cudaErrorInvalidValue, "encoding the TMA tensor maps (cuTensorMapEncodeTiled)");
      }
      return L.ok(launch_kernel(kernel, grid, block, smem, L.stream, g, maps, u), what);
    } else {
      const dim3 grid(static_cast<unsigned>(per_matrix), static_cast<unsigned>(matrices));
      return L.ok(launch_kernel(kernel, grid, block, smem, L.stream, g, u), what);
    }
  };
  const int batch = static_cast<int>(pr.batch);
  // dst ← X·Xᵀ (symmetric tiles).
  auto xxt = [&](const T* src, T* dst) {
    const GemmArgs g = product(src, plan.x_elems, np, src, plan.x_elems, np, dst, dst, plan.a_elems,
                               mp, np, 1.0f, 0.0f, tiles_m, tiles_n);
    return launch(gram, Product::kGram, g, batch, NoUpdate{}, "the X·Xᵀ launch");
  };
  // dst ← b·A + c·A·A (+ diag·I in the Gram form).
  auto polynomial = [&](const T* src, T* dst, float cb, float cc, float diag) {
    GemmArgs g = product(src, plan.a_elems, mp, src, plan.a_elems, mp, src, dst, plan.a_elems, mp,
                         mp, cc, cb, tiles_m, tiles_n);
    g.diag_scale = diag;
    return launch(poly, Product::kPoly, g, batch, NoUpdate{}, "the b·A + c·A·A launch");
  };
  // The args of dst ← a·src + left·src.
  auto apply_args = [&](const T* left, const T* src, T* dst, float ca) {
    return product(left, plan.a_elems, mp, src, plan.x_elems, np, src, dst, plan.x_elems, np, mp,
                   1.0f, ca, tiles_m, tiles_n);
  };
  auto apply_plain = [&](const T* left, const T* src, T* dst, float ca) {
    return launch(apply, Product::kApply, apply_args(left, src, dst, ca), batch, NoUpdate{},
                  "the a·X + B·X launch");
  };
  // The last product also updates the parameters: x ← decay·x + coef·s·X (see step_factors).
  auto apply_last = [&](const T* left, const T* src, T* dst, float ca) {
    GemmArgs g = apply_args(left, src, dst, ca);
    const bool tall = pr.rows > pr.cols;
    return for_each_slice(pr.batch, kMaxRefs, [&](int64_t first, int count) {
      UpdateArgs u{};
      u.count = count;
      u.m = static_cast<int32_t>(plan.m);
      u.n = static_cast<int32_t>(plan.n);
      u.p_dtype = static_cast<scion_dtype>(pr.p_dtype);
      u.coef = static_cast<float>(pr.coef);
      u.decay = static_cast<float>(pr.decay);
      u.lr = reinterpret_cast<const float*>(static_cast<uintptr_t>(pr.lr));
      for (int k = 0; k < count; ++k) {
        const scion_ns_matrix& mat = mats[first + k];
        u.refs[k].p = reinterpret_cast<void*>(static_cast<uintptr_t>(mat.p));
        u.refs[k].rs = tall ? mat.p_strides[1] : mat.p_strides[0];
        u.refs[k].cs = tall ? mat.p_strides[0] : mat.p_strides[1];
        u.refs[k].scale = mat.scale;
      }
      g.batch0 = static_cast<int32_t>(first);
      return launch(apply_update, Product::kApply, g, count, u,
                    "the a·X + B·X launch with the update");
    });
  };
  auto coefficient = [&](int s, int i) { return static_cast<float>(pr.coefficients[3 * s + i]); };

  if (plan.gram_restart == 0) {
    for (int s = 0; s < pr.steps; ++s) {
      // A ← X·Xᵀ;  B ← b·A + c·A·A;  X ← a·X + B·X
      if (!xxt(x, a) || !polynomial(a, b, coefficient(s, 1), coefficient(s, 2), 0.0f)) {
        return false;
      }
      if (s + 1 == pr.steps) return apply_last(b, x, y, coefficient(s, 0));
      if (!apply_plain(b, x, y, coefficient(s, 0))) return false;
      T* swap = x;
      x = y;
      y = swap;
    }
    return true;
  }

  // The Gram form (the reference's gram_iterate, the same rounding points). Every m×m product is
  // of two polynomials of one symmetric matrix, so symmetric: the X·Xᵀ kernel on (left, right),
  // left·rightᵀ = left·right, on the triangle tiles only.
  T* r = a;
  T* p = b;
  T* q = b + pr.batch * plan.a_elems;
  T* t = q + pr.batch * plan.a_elems;
  auto square = [&](const T* left, const T* right, T* dst) {
    const GemmArgs g = product(left, plan.a_elems, mp, right, plan.a_elems, mp, dst, dst,
                               plan.a_elems, mp, mp, 1.0f, 0.0f, tiles_m, tiles_n);
    return launch(gram, Product::kGram, g, batch, NoUpdate{}, "a Gram-form product launch");
  };
  if (!xxt(x, r)) return false;  // R ← X·Xᵀ
  bool fresh = true;             // Q = I
  for (int s = 0;; ++s) {
    // P ← a·I + b·R + c·R·R
    if (!polynomial(r, p, coefficient(s, 1), coefficient(s, 2), coefficient(s, 0))) return false;
    T* current = p;
    if (fresh) {  // Q ← P: the buffers trade places
      p = q;
      q = current;
    } else {  // Q ← Q·P
      if (!square(q, p, t)) return false;
      T* swap = q;
      q = t;
      t = swap;
    }
    fresh = false;
    if (s + 1 == pr.steps) break;
    if ((s + 1) % plan.gram_restart == 0) {  // X ← Q·X;  R ← X·Xᵀ;  Q ← I
      if (!apply_plain(q, x, y, 0.0f)) return false;
      T* swap = x;
      x = y;
      y = swap;
      if (!xxt(x, r)) return false;
      fresh = true;
    } else if (!square(r, current, t) || !square(current, t, r)) {  // R ← P·(R·P)
      return false;
    }
  }
  return apply_last(q, x, y, 0.0f);  // X ← Q·X
}

template <typename T>
bool run_small(Launcher& L, const scion_ns_matrix* mats) {
  const scion_ns_problem& pr = L.pr;
  const Plan& plan = L.plan;
  const size_t smem = small_smem_bytes(plan.n_pad);
  if (!ready(L, reinterpret_cast<const void*>(small_kernel<T>), smem, false)) return false;
  const bool tall = pr.rows > pr.cols;
  const bool has_buffer = pr.d_dtype != -1;
  SmallArgs args{};
  args.m = static_cast<int32_t>(plan.m);
  args.n = static_cast<int32_t>(plan.n);
  args.n_pad = static_cast<int32_t>(plan.n_pad);
  args.steps = pr.steps;
  for (int i = 0; i < 3 * pr.steps; ++i) args.coef[i] = static_cast<float>(pr.coefficients[i]);
  args.p_dtype = static_cast<scion_dtype>(pr.p_dtype);
  args.g_dtype = static_cast<scion_dtype>(pr.g_dtype);
  args.d_dtype = has_buffer ? static_cast<scion_dtype>(pr.d_dtype) : SCION_FLOAT32;
  args.has_buffer = has_buffer;
  args.alpha = static_cast<float>(pr.alpha);
  args.beta = static_cast<float>(1.0 - pr.alpha);
  args.update_coef = static_cast<float>(pr.coef);
  args.decay = static_cast<float>(pr.decay);
  args.lr = reinterpret_cast<const float*>(static_cast<uintptr_t>(pr.lr));
  args.momentum = reinterpret_cast<const float*>(static_cast<uintptr_t>(pr.momentum));
  const int r = tall ? 1 : 0;  // which stride walks the oriented rows
  return for_each_slice(pr.batch, kSmallRefs, [&](int64_t first, int count) {
    for (int k = 0; k < count; ++k) {
      const scion_ns_matrix& mat = mats[first + k];
      args.refs[k] = SmallRef{reinterpret_cast<const void*>(static_cast<uintptr_t>(mat.g)),
                              reinterpret_cast<void*>(static_cast<uintptr_t>(mat.d)),
                              reinterpret_cast<void*>(static_cast<uintptr_t>(mat.p)),
                              mat.g_strides[r],
                              mat.g_strides[1 - r],
                              mat.d_strides[r],
                              mat.d_strides[1 - r],
                              mat.p_strides[r],
                              mat.p_strides[1 - r],
                              mat.scale};
    }
    return L.ok(
        launch_kernel(small_kernel<T>, dim3(count), dim3(kSmallThreads), smem, L.stream, args),
        "the one-block launch");
  });
}

template <typename T>
bool run(Launcher& L, const scion_ns_matrix* mats, void* workspace) {
  if (L.plan.tile == 1) return run_small<T>(L, mats);
  const scion_ns_problem& pr = L.pr;
  const Plan& plan = L.plan;
  T* x = static_cast<T*>(workspace);
  auto* partial =
      reinterpret_cast<double*>(static_cast<unsigned char*>(workspace) + plan.sums_offset);
  const bool has_buffer = pr.d_dtype != -1;
  const bool prepared = for_each_slice(pr.batch, kMaxRefs, [&](int64_t first, int count) {
    SourceArgs src{};
    src.count = count;
    src.rows = static_cast<int32_t>(pr.rows);
    src.cols = static_cast<int32_t>(pr.cols);
    src.chunk_rows = plan.chunk_rows;
    src.chunks = plan.chunks;
    src.g_dtype = static_cast<scion_dtype>(pr.g_dtype);
    src.d_dtype = has_buffer ? static_cast<scion_dtype>(pr.d_dtype) : SCION_FLOAT32;
    src.has_buffer = has_buffer;
    src.alpha = static_cast<float>(pr.alpha);
    src.beta = static_cast<float>(1.0 - pr.alpha);
    src.momentum = reinterpret_cast<const float*>(static_cast<uintptr_t>(pr.momentum));
    src.partial = partial + first * plan.chunks;
    for (int k = 0; k < count; ++k) {
      const scion_ns_matrix& mat = mats[first + k];
      SourceRef& r = src.refs[k];
      r.g = reinterpret_cast<const void*>(static_cast<uintptr_t>(mat.g));
      r.d = reinterpret_cast<void*>(static_cast<uintptr_t>(mat.d));
      r.g_rs = mat.g_strides[0];
      r.g_cs = mat.g_strides[1];
      r.d_rs = mat.d_strides[0];
      r.d_cs = mat.d_strides[1];
    }
    const size_t sums = (kThreads + 1) * sizeof(double);
    if (!L.ok(launch_kernel(average_kernel, dim3(plan.chunks, count), dim3(kThreads), sums,
                            L.stream, src),
              "the averaging launch")) {
      return false;
    }
    NormalizeArgs na{};
    na.m_pad = static_cast<int32_t>(plan.m_pad);
    na.n_pad = static_cast<int32_t>(plan.n_pad);
    na.col_blocks = static_cast<int32_t>((plan.n_pad + kNormCols - 1) / kNormCols);
    na.tall = pr.rows > pr.cols;
    na.x = x + first * plan.x_elems;
    na.chunks = plan.chunks;
    na.partial = src.partial;
    const size_t norm_smem = kNormSumsBytes + 32 * 33 * sizeof(float);
    const unsigned norm_blocks = static_cast<unsigned>(plan.m_pad / 32 * na.col_blocks);
    return L.ok(launch_kernel(normalize_kernel<T>, dim3(norm_blocks, count), dim3(kThreads),
                              norm_smem, L.stream, src, na),
                "the normalization launch");
  });
  if (!prepared) return false;
  if (plan.wgmma == 4) return run_products<T, WgmmaTiling<256, 256>, true>(L, mats, workspace);
  if (plan.wgmma == 3) return run_products<T, WgmmaTiling<256>, true>(L, mats, workspace);
  if (plan.wgmma == 2) return run_products<T, WgmmaTiling<128>, true>(L, mats, workspace);
  if (plan.wgmma == 1) return run_products<T, WgmmaTiling<128>>(L, mats, workspace);
  if (plan.tile == 128) return run_products<T, TileLarge>(L, mats, workspace);
  return run_products<T, TileSmall>(L, mats, workspace);
}

}  // namespace

void run_step(const scion_ns_problem& pr, const Plan& plan, const scion_ns_matrix* matrices,
              void* workspace, int device, cudaStream_t stream, FirstError& failure) {
  Launcher L{pr, plan, device, stream, failure};
  if (pr.compute_dtype == SCION_BFLOAT16) {
    run<__nv_bfloat16>(L, matrices, workspace);
  } else {
    run<__half>(L, matrices, workspace);
  }
}

}  // namespace scion::ns
