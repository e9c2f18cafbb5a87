// Python binding of the scion_kernels C entry points (module scion_kernels._C).
//
// This is the only C++ that knows about Python. It takes plain integers: device addresses as
// unsigned 64-bit ints, element counts, dtype codes, the device ordinal and the CUDA stream handle
// (torch.cuda.Stream.cuda_stream). Tensor validation happens in
// scion_kernels/backends/cuda/native.py before any address gets here; the C library repeats the
// checks it can make on integers alone.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "scion_kernels.h"

namespace py = pybind11;

namespace {

[[noreturn]] void raise_last_error(const char* op) {
  std::string message = scion_last_error();
  if (message.empty()) message = std::string(op) + " failed";
  throw std::runtime_error(message);
}

scion_ns_problem ns_problem(int64_t batch, int64_t rows, int64_t cols, int p_dtype, int g_dtype,
                            int d_dtype, int compute_dtype, const std::vector<double>& coefficients,
                            double alpha, double coef, double decay, uint64_t lr, uint64_t momentum,
                            int tile, int gram_restart, int wgmma, int persistent = 0) {
  if (coefficients.empty() || coefficients.size() % 3 != 0 || coefficients.size() > 48) {
    throw std::invalid_argument("ns_step: coefficients must hold 1 to 16 (a, b, c) triples, got " +
                                std::to_string(coefficients.size()) + " numbers");
  }
  scion_ns_problem pr{};
  pr.batch = batch;
  pr.rows = rows;
  pr.cols = cols;
  pr.p_dtype = p_dtype;
  pr.g_dtype = g_dtype;
  pr.d_dtype = d_dtype;
  pr.compute_dtype = compute_dtype;
  pr.steps = static_cast<int>(coefficients.size() / 3);
  pr.tile = tile;
  for (size_t i = 0; i < coefficients.size(); ++i) pr.coefficients[i] = coefficients[i];
  pr.alpha = alpha;
  pr.coef = coef;
  pr.decay = decay;
  pr.lr = lr;
  pr.momentum = momentum;
  pr.gram_restart = gram_restart;
  pr.wgmma = wgmma;
  pr.persistent = persistent;
  return pr;
}

int64_t ns_workspace_bytes(int64_t batch, int64_t rows, int64_t cols, int tile, int gram_restart,
                           int wgmma) {
  const scion_ns_problem pr =
      ns_problem(batch, rows, cols, SCION_FLOAT32, SCION_FLOAT32, -1, SCION_BFLOAT16,
                 {1.0, 0.0, 0.0}, 1.0, 0.0, 1.0, 0, 0, tile, gram_restart, wgmma);
  const int64_t bytes = scion_ns_workspace_bytes(&pr);
  if (bytes < 0) throw std::invalid_argument(scion_last_error());
  return bytes;
}

int ns_tile(int64_t rows, int64_t cols, int tile, int gram_restart, int wgmma) {
  const scion_ns_problem pr =
      ns_problem(1, rows, cols, SCION_FLOAT32, SCION_FLOAT32, -1, SCION_BFLOAT16, {1.0, 0.0, 0.0},
                 1.0, 0.0, 1.0, 0, 0, tile, gram_restart, wgmma);
  const int chosen = scion_ns_tile(&pr);
  if (chosen < 0) throw std::invalid_argument(scion_last_error());
  return chosen;
}

void ns_step(int64_t rows, int64_t cols, int p_dtype, int g_dtype, int d_dtype, int compute_dtype,
             const std::vector<double>& coefficients, double alpha, double coef, double decay,
             uint64_t lr, uint64_t momentum, int tile, const std::vector<uint64_t>& p,
             const std::vector<uint64_t>& g, const std::vector<uint64_t>& d,
             const std::vector<int64_t>& strides, const std::vector<float>& scales,
             uint64_t workspace, int64_t workspace_bytes, int device, uint64_t stream,
             int gram_restart, int wgmma, int persistent) {
  const size_t batch = p.size();
  const bool has_buffer = d_dtype != -1;
  if (g.size() != batch || (has_buffer ? d.size() != batch : !d.empty()) ||
      strides.size() != 6 * batch || scales.size() != batch) {
    throw std::invalid_argument("ns_step: per-matrix lists disagree (p " + std::to_string(batch) +
                                ", g " + std::to_string(g.size()) + ", d " +
                                std::to_string(d.size()) + ", strides " +
                                std::to_string(strides.size()) + " (6 each), scales " +
                                std::to_string(scales.size()) + ")");
  }
  const scion_ns_problem pr = ns_problem(static_cast<int64_t>(batch), rows, cols, p_dtype, g_dtype,
                                         d_dtype, compute_dtype, coefficients, alpha, coef, decay,
                                         lr, momentum, tile, gram_restart, wgmma, persistent);
  std::vector<scion_ns_matrix> mats(batch);
  for (size_t k = 0; k < batch; ++k) {
    scion_ns_matrix& m = mats[k];
    m.p = p[k];
    m.g = g[k];
    m.d = has_buffer ? d[k] : 0;
    for (int e = 0; e < 2; ++e) {
      m.p_strides[e] = strides[6 * k + e];
      m.g_strides[e] = strides[6 * k + 2 + e];
      m.d_strides[e] = strides[6 * k + 4 + e];
    }
    m.scale = scales[k];
  }
  scion_status status;
  {
    py::gil_scoped_release release;
    status = scion_ns_step(
        &pr, mats.data(), reinterpret_cast<void*>(static_cast<uintptr_t>(workspace)),
        workspace_bytes, device, reinterpret_cast<scion_stream_t>(static_cast<uintptr_t>(stream)));
  }
  if (status == SCION_ERROR_INVALID_ARGUMENT) throw std::invalid_argument(scion_last_error());
  if (status != SCION_OK) raise_last_error("ns_step");
}

void grouped_step(const std::vector<uint64_t>& p, const std::vector<uint64_t>& g,
                  const std::vector<uint64_t>& d, const std::vector<int64_t>& layout,
                  const std::vector<float>& q, const std::vector<float>& eps, int p_dtype,
                  int g_dtype, int d_dtype, bool sign, double alpha, double coef, double decay,
                  uint64_t lr, uint64_t momentum, int device, uint64_t stream) {
  const size_t n = p.size();
  const bool has_buffer = d_dtype != -1;
  if (g.size() != n || (has_buffer ? d.size() != n : !d.empty()) || layout.size() != 4 * n ||
      q.size() != n || eps.size() != n) {
    throw std::invalid_argument(
        "grouped_step: per-tensor lists disagree (p " + std::to_string(n) + ", g " +
        std::to_string(g.size()) + ", d " + std::to_string(d.size()) + ", layout " +
        std::to_string(layout.size()) + " (4 each), q " + std::to_string(q.size()) + ", eps " +
        std::to_string(eps.size()) + ")");
  }
  std::vector<scion_grouped_tensor> tensors(n);
  for (size_t i = 0; i < n; ++i) {
    tensors[i] = scion_grouped_tensor{p[i],
                                      g[i],
                                      has_buffer ? d[i] : 0,
                                      layout[4 * i],
                                      layout[4 * i + 1],
                                      layout[4 * i + 2],
                                      layout[4 * i + 3],
                                      q[i],
                                      eps[i]};
  }
  scion_status status;
  {
    py::gil_scoped_release release;
    status = scion_grouped_step(static_cast<int64_t>(n), tensors.data(), p_dtype, g_dtype, d_dtype,
                                sign ? 1 : 0, alpha, coef, decay, lr, momentum, device,
                                reinterpret_cast<scion_stream_t>(static_cast<uintptr_t>(stream)));
  }
  if (status == SCION_ERROR_INVALID_ARGUMENT) throw std::invalid_argument(scion_last_error());
  if (status != SCION_OK) raise_last_error("grouped_step");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() =
      "Native CUDA kernels of scion_kernels. Low-level: takes raw device addresses; use "
      "the \"cuda\" backend (scion_kernels.backends.cuda) instead.";

  m.attr("DTYPE_FLOAT32") = static_cast<int>(SCION_FLOAT32);
  m.attr("DTYPE_BFLOAT16") = static_cast<int>(SCION_BFLOAT16);
  m.attr("DTYPE_FLOAT16") = static_cast<int>(SCION_FLOAT16);
  m.attr("CUDA_RUNTIME_VERSION") = scion_cuda_runtime_version();

  m.def("ns_workspace_bytes", &ns_workspace_bytes, py::arg("batch"), py::arg("rows"),
        py::arg("cols"), py::arg("tile") = 0, py::arg("gram_restart") = 0, py::arg("wgmma") = 0,
        "Bytes of device workspace ns_step needs for `batch` matrices of rows x cols.");
  m.def("ns_tile", &ns_tile, py::arg("rows"), py::arg("cols"), py::arg("tile") = 0,
        py::arg("gram_restart") = 0, py::arg("wgmma") = 0,
        "The path ns_step takes for rows x cols matrices (1: one block per matrix; 64 or 128: "
        "tiled products with that tile).");
  m.def("ns_step", &ns_step, py::arg("rows"), py::arg("cols"), py::arg("p_dtype"),
        py::arg("g_dtype"), py::arg("d_dtype"), py::arg("compute_dtype"), py::arg("coefficients"),
        py::arg("alpha"), py::arg("coef"), py::arg("decay"), py::arg("lr"), py::arg("momentum"),
        py::arg("tile"), py::arg("p"), py::arg("g"), py::arg("d"), py::arg("strides"),
        py::arg("scales"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("device"),
        py::arg("stream"), py::arg("gram_restart") = 0, py::arg("wgmma") = 0,
        py::arg("persistent") = 0,
        "The Scion step of one bucket of rows x cols matrices: averaging, Newton-Schulz with "
        "the flattened (a, b, c) `coefficients`, and x <- decay*x + coef*scale*polar(d) (with "
        "`lr`, the device address of one float32 t or 0: x <- (1-decay*t)*x + coef*t*...; "
        "`momentum`: the device address of one float32 alpha, or 0). "
        "`strides` holds (p, g, d) x (row, column) element strides per matrix; d_dtype -1 "
        "means no buffer (d = g, `d` empty). Enqueued on `stream` of `device`. "
        "`gram_restart` k >= 1 runs the steps in the Gram form, restarting every k steps. "
        "`wgmma` 1 to 4 runs the tiled products on Hopper's wgmma (an sm_90a image; tile 128), "
        "a*X + B*X reading X^T from registers (1) or X from shared memory (2), that on 128x256 "
        "tiles (3), and the symmetric products on 128x256 tiles too (4); `persistent` 1 launches "
        "those products one block per multiprocessor, each walking the output tiles.");
  m.def("grouped_step", &grouped_step, py::arg("p"), py::arg("g"), py::arg("d"), py::arg("layout"),
        py::arg("q"), py::arg("eps"), py::arg("p_dtype"), py::arg("g_dtype"), py::arg("d_dtype"),
        py::arg("sign"), py::arg("alpha"), py::arg("coef"), py::arg("decay"), py::arg("lr"),
        py::arg("momentum"), py::arg("device"), py::arg("stream"),
        "Sign or l2 groups of many tensors: d <- (1-alpha)*d + alpha*g, then x <- decay*x + "
        "coef*u with u = d/(|d|*q + eps) per group, or sign(d)*q. `layout` holds (groups, "
        "length, group stride, element stride) per tensor; d_dtype -1 means no buffer; `lr` "
        "and `momentum` as for ns_step.");
}
