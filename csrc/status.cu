// The library-wide error message, the checks every entry point shares, and version queries.
#include <cuda_runtime.h>

#include <cstdarg>
#include <cstdio>

#include "status.cuh"

namespace scion {
namespace {
thread_local char g_last_error[1024] = "";

bool valid_dtype(int code) {
  return code == SCION_FLOAT32 || code == SCION_BFLOAT16 || code == SCION_FLOAT16;
}
}  // namespace

void set_error(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(g_last_error, sizeof(g_last_error), fmt, ap);
  va_end(ap);
}

void clear_error() { g_last_error[0] = '\0'; }

const char* dtype_name(scion_dtype dtype) {
  switch (dtype) {
    case SCION_FLOAT32:
      return "float32";
    case SCION_BFLOAT16:
      return "bfloat16";
    case SCION_FLOAT16:
      return "float16";
  }
  return "unknown";
}

bool check_dtypes(const char* op, int p_dtype, int g_dtype, int d_dtype) {
  if (valid_dtype(p_dtype) && valid_dtype(g_dtype) && (d_dtype == -1 || valid_dtype(d_dtype))) {
    return true;
  }
  set_error("%s: unsupported dtype codes (param %d, grad %d, buffer %d)", op, p_dtype, g_dtype,
            d_dtype);
  return false;
}

DeviceGuard::DeviceGuard(int device, const char* op) {
  cudaError_t err = cudaGetDevice(&previous_);
  if (err == cudaSuccess && previous_ != device) {
    err = cudaSetDevice(device);
    switched_ = err == cudaSuccess;
  }
  ok_ = err == cudaSuccess;
  if (!ok_) set_error("%s: selecting device %d failed: %s", op, device, cudaGetErrorString(err));
}

cudaError_t DeviceGuard::restore() {
  if (!switched_) return cudaSuccess;
  switched_ = false;
  return cudaSetDevice(previous_);
}

}  // namespace scion

extern "C" {

const char* scion_last_error(void) { return scion::g_last_error; }

int scion_cuda_runtime_version(void) { return CUDART_VERSION; }

}  // extern "C"
