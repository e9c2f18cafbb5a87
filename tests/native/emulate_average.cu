// Runs the multi-tensor average kernel's device code on the host, block by block and thread by
// thread, through the same launch packing the CUDA entry point uses. This checks the packing,
// the chunk indexing, the vector/scalar paths and misaligned tensors on machines without a GPU;
// tests/test_native_host.py drives it and compares with the pure-PyTorch reference.
//
//   emulate_average DIR
//
// DIR/manifest.txt: "state_code grad_code alpha n" then n lines "numel state_offset grad_offset"
// (offsets in elements into the flat buffers), dtype codes as in scion_kernels.h.
// DIR/state.bin and DIR/grad.bin: the flat buffers. Writes DIR/out.bin (the updated states) and
// prints the number of launches.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "../../csrc/multi_tensor_average.cu"

namespace {

std::vector<char> read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::vector<char>((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

size_t element_size(int code) { return code == SCION_FLOAT32 ? 4 : 2; }

template <typename S, typename G>
int64_t emulate(int64_t n, const uint64_t* sp, const uint64_t* gp, const int64_t* numels,
                double alpha) {
  using namespace scion;
  return pack_launches(n, sp, gp, numels, static_cast<float>(alpha),
                       static_cast<float>(1.0 - alpha), [](const AverageArgs& a, int32_t blocks) {
                         for (int32_t b = 0; b < blocks; ++b) {
                           for (int tid = 0; tid < kThreads; ++tid) {
                             average_chunk<S, G>(a, b, tid, kThreads);
                           }
                         }
                         return true;
                       });
}

template <typename S>
int64_t dispatch_grad(int grad_code, int64_t n, const uint64_t* sp, const uint64_t* gp,
                      const int64_t* numels, double alpha) {
  switch (grad_code) {
    case SCION_FLOAT32:
      return emulate<S, float>(n, sp, gp, numels, alpha);
    case SCION_BFLOAT16:
      return emulate<S, __nv_bfloat16>(n, sp, gp, numels, alpha);
    default:
      return emulate<S, __half>(n, sp, gp, numels, alpha);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s DIR\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  std::ifstream manifest(dir + "/manifest.txt");
  int state_code = 0, grad_code = 0;
  double alpha = 0;
  int64_t n = 0;
  if (!(manifest >> state_code >> grad_code >> alpha >> n)) {
    std::fprintf(stderr, "bad manifest\n");
    return 2;
  }
  std::vector<int64_t> numels(n), state_off(n), grad_off(n);
  for (int64_t t = 0; t < n; ++t) manifest >> numels[t] >> state_off[t] >> grad_off[t];

  // 64-byte aligned copies, so an element offset alone decides whether a tensor is aligned.
  const std::vector<char> state_in = read_file(dir + "/state.bin");
  const std::vector<char> grad_in = read_file(dir + "/grad.bin");
  char* state = static_cast<char*>(std::aligned_alloc(64, (state_in.size() / 64 + 1) * 64));
  char* grad = static_cast<char*>(std::aligned_alloc(64, (grad_in.size() / 64 + 1) * 64));
  std::copy(state_in.begin(), state_in.end(), state);
  std::copy(grad_in.begin(), grad_in.end(), grad);

  std::vector<uint64_t> sp(n), gp(n);
  for (int64_t t = 0; t < n; ++t) {
    sp[t] = reinterpret_cast<uintptr_t>(state + state_off[t] * element_size(state_code));
    gp[t] = reinterpret_cast<uintptr_t>(grad + grad_off[t] * element_size(grad_code));
  }
  const int64_t launches =
      state_code == SCION_FLOAT32
          ? dispatch_grad<float>(grad_code, n, sp.data(), gp.data(), numels.data(), alpha)
          : dispatch_grad<__nv_bfloat16>(grad_code, n, sp.data(), gp.data(), numels.data(), alpha);

  std::ofstream out(dir + "/out.bin", std::ios::binary);
  out.write(state, static_cast<std::streamsize>(state_in.size()));
  std::printf("%lld\n", static_cast<long long>(launches));
  std::free(state);
  std::free(grad);
  return 0;
}
