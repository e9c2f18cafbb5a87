// Error reporting shared by the C entry points: a thread-local message behind scion_last_error().
#ifndef SCION_STATUS_CUH_
#define SCION_STATUS_CUH_

#include "scion_kernels.h"

namespace scion {

// printf-style; replaces the calling thread's last error message.
void set_error(const char* fmt, ...);
void clear_error();
const char* dtype_name(scion_dtype dtype);

}  // namespace scion

#endif  // SCION_STATUS_CUH_
