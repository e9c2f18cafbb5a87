// Python binding of the scion_kernels C entry points (module scion_kernels._C).
//
// This is the only C++ that knows about Python. It takes plain integers: device addresses as
// unsigned 64-bit ints, element counts, dtype codes, the device ordinal and the CUDA stream handle
// (torch.cuda.Stream.cuda_stream). Tensor validation happens in scion_kernels/_native.py before
// any address gets here; the C library repeats the checks it can make on integers alone.

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

void multi_tensor_average(const std::vector<uint64_t>& state_ptrs,
                          const std::vector<uint64_t>& grad_ptrs, const std::vector<int64_t>& numels,
                          int state_dtype, int grad_dtype, double alpha, int device,
                          uint64_t stream) {
  if (state_ptrs.size() != grad_ptrs.size() || state_ptrs.size() != numels.size()) {
    throw std::invalid_argument(
        "multi_tensor_average: state_ptrs, grad_ptrs and numels must have equal lengths, got " +
        std::to_string(state_ptrs.size()) + ", " + std::to_string(grad_ptrs.size()) + " and " +
        std::to_string(numels.size()));
  }
  scion_status status;
  {
    // The call only enqueues work; other Python threads may run meanwhile.
    py::gil_scoped_release release;
    status = scion_multi_tensor_average(
        static_cast<int64_t>(numels.size()), state_ptrs.data(), grad_ptrs.data(), numels.data(),
        static_cast<scion_dtype>(state_dtype), static_cast<scion_dtype>(grad_dtype), alpha, device,
        reinterpret_cast<scion_stream_t>(static_cast<uintptr_t>(stream)));
  }
  if (status == SCION_ERROR_INVALID_ARGUMENT) {
    throw std::invalid_argument(scion_last_error());
  }
  if (status != SCION_OK) raise_last_error("multi_tensor_average");
}

int64_t multi_tensor_average_num_launches(const std::vector<int64_t>& numels) {
  const int64_t launches =
      scion_multi_tensor_average_num_launches(static_cast<int64_t>(numels.size()), numels.data());
  if (launches < 0) throw std::invalid_argument(scion_last_error());
  return launches;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() =
      "Native CUDA kernels of scion_kernels. Low-level: takes raw device addresses; use "
      "scion_kernels._native instead.";

  m.attr("DTYPE_FLOAT32") = static_cast<int>(SCION_FLOAT32);
  m.attr("DTYPE_BFLOAT16") = static_cast<int>(SCION_BFLOAT16);
  m.attr("DTYPE_FLOAT16") = static_cast<int>(SCION_FLOAT16);
  m.attr("CUDA_RUNTIME_VERSION") = scion_cuda_runtime_version();
  m.attr("MULTI_TENSOR_AVERAGE_MAX_TENSORS_PER_LAUNCH") =
      scion_multi_tensor_average_max_tensors_per_launch();
  m.attr("MULTI_TENSOR_AVERAGE_CHUNK_SIZE") = scion_multi_tensor_average_chunk_size();

  m.def("multi_tensor_average", &multi_tensor_average, py::arg("state_ptrs"), py::arg("grad_ptrs"),
        py::arg("numels"), py::arg("state_dtype"), py::arg("grad_dtype"), py::arg("alpha"),
        py::arg("device"), py::arg("stream"),
        "In place, for each pair t: d_t <- (1 - alpha) * d_t + alpha * g_t, computed in fp32 as "
        "fmaf(alpha, g, (1 - alpha) * d) with one final rounding to the state dtype. Enqueued on "
        "`stream` (a cudaStream_t as int) of CUDA device `device`. Raises ValueError for invalid "
        "arguments and RuntimeError for CUDA failures.");
  m.def("multi_tensor_average_num_launches", &multi_tensor_average_num_launches, py::arg("numels"),
        "Number of kernel launches multi_tensor_average issues for these element counts (host "
        "only).");
}
