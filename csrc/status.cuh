// What every C entry point shares: the thread-local error message behind scion_last_error(), the
// check of dtype codes, making the caller's device current for the call, and keeping the first
// failed CUDA call of a sequence for the error message.
#ifndef SCION_STATUS_CUH_
#define SCION_STATUS_CUH_

#include <cuda_runtime.h>

#include "scion_kernels.h"

namespace scion {

// printf-style; replaces the calling thread's last error message.
void set_error(const char* fmt, ...);
void clear_error();
const char* dtype_name(scion_dtype dtype);

// Whether the parameter, gradient and buffer dtype codes are scion_dtype values (the buffer's may
// also be -1: no buffer); if not, sets "<op>: unsupported dtype codes (...)".
bool check_dtypes(const char* op, int p_dtype, int g_dtype, int d_dtype);

// Makes `device` the calling thread's current device for one call into the library. If that
// fails, ok() is false and the error message says "<op>: selecting device N failed: ...".
// restore(), or else the destructor, makes the previous device current again.
class DeviceGuard {
 public:
  DeviceGuard(int device, const char* op);
  ~DeviceGuard() { restore(); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

  bool ok() const { return ok_; }
  // Puts the previous device back if the constructor changed it (once); the status of doing so.
  cudaError_t restore();

 private:
  int previous_ = -1;
  bool ok_ = false;
  bool switched_ = false;
};

// The first failure in a sequence of CUDA calls, and the stage it happened in.
struct FirstError {
  cudaError_t err = cudaSuccess;
  const char* what = "";

  // Keeps e if it is the first failure; whether e is cudaSuccess.
  bool ok(cudaError_t e, const char* stage) {
    if (e != cudaSuccess && err == cudaSuccess) {
      err = e;
      what = stage;
    }
    return e == cudaSuccess;
  }
};

}  // namespace scion

#endif  // SCION_STATUS_CUH_
