// The library-wide error message and version queries.
#include <cuda_runtime.h>

#include <cstdarg>
#include <cstdio>

#include "status.cuh"

namespace scion {
namespace {
thread_local char g_last_error[1024] = "";
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

}  // namespace scion

extern "C" {

const char* scion_last_error(void) { return scion::g_last_error; }

int scion_cuda_runtime_version(void) { return CUDART_VERSION; }

}  // extern "C"
