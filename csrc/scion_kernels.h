/*
 * C entry points of the scion_kernels CUDA library.
 *
 * This header is deliberately plain C: no CUDA, PyTorch or Python headers. Tensors cross it as raw
 * device addresses plus element counts, and the stream as the driver-level handle that a
 * cudaStream_t is (a pointer to the opaque CUstream_st), so the host-side binding can be compiled
 * by an ordinary C++ compiler without the CUDA include path.
 *
 * Every entry point returns a scion_status; on failure a human-readable description is available
 * from scion_last_error() on the same thread until the next call into the library.
 */
#ifndef SCION_KERNELS_H_
#define SCION_KERNELS_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

struct CUstream_st;
/* Same type as cudaStream_t; NULL is the legacy default stream. */
typedef struct CUstream_st* scion_stream_t;

typedef enum scion_status {
  SCION_OK = 0,
  SCION_ERROR_INVALID_ARGUMENT = 1,
  SCION_ERROR_CUDA = 2,
} scion_status;

/* Element types understood by the kernels. The values are part of the binding's ABI. */
typedef enum scion_dtype {
  SCION_FLOAT32 = 0,
  SCION_BFLOAT16 = 1,
  SCION_FLOAT16 = 2,
} scion_dtype;

/*
 * The whole Scion step for a bucket of same-shape Spectral matrices (see newton_schulz.cu):
 *
 *   d <- (1 - alpha) * d + alpha * g               in place, in d's dtype (no buffer: d = g)
 *   X <- d / ||d||_F                               oriented wide (m <= n), compute dtype
 *   for step s:  A <- X X^T;  B <- b_s A + c_s A A;  X <- a_s X + B X
 *   x <- decay * x + coef * scale * X              in x's dtype
 *
 * With gram_restart k >= 1 the same steps run on the Gram matrix (Gram Newton-Schulz, the
 * reference's newton_schulz.gram_iterate): R <- X X^T, Q <- I; per step P <- a I + b R + c R R,
 * Q <- Q P, R <- P R P, and every k steps X <- Q X, R <- X X^T, Q <- I; finally X <- Q X.
 *
 * Matrices are given in the parameter's own (rows, cols) coordinates by element strides; a
 * tall matrix (rows > cols) is orthogonalized as its transpose. The products run on tensor
 * cores in the compute dtype with fp32 accumulation; every reduction has a fixed order.
 */
typedef struct scion_ns_problem {
  int64_t batch;           /* matrices in the bucket (0 is a no-op; at most 65535) */
  int64_t rows, cols;      /* shape of every matrix */
  int p_dtype, g_dtype;    /* scion_dtype codes */
  int d_dtype;             /* scion_dtype code of the buffers, or -1: no buffer (d = g) */
  int compute_dtype;       /* SCION_BFLOAT16 or SCION_FLOAT16 */
  int steps;               /* 1..16 */
  int tile;                /* 0: automatic; 1: one block per matrix (oriented m <= 64,
                              n <= 512, no workspace); 64 or 128: tiled products */
  double coefficients[48]; /* (a, b, c) of step s at 3s, 3s+1, 3s+2 */
  double alpha, coef, decay;
  uint64_t lr;       /* device address of one float32 learning rate t, or 0; with it the
                        update is x <- (1 - decay * t) * x + coef * t * scale * X, t read
                        by the kernels (nothing fixed on the host: CUDA-graph safe) */
  uint64_t momentum; /* device address of one float32 alpha, or 0 (then `alpha`): the
                        averaging factor read by the kernels */
  int gram_restart;  /* 0: the plain iteration; k >= 1: the Gram form, restarting from X
                        every k steps (tiled products only: tile 1 is refused, tile 0 never
                        chooses it) */
  int wgmma;         /* 0: the tiled products on mma.sync (sm_80 and up); 1 to 4: on Hopper's
                        wgmma, fed by TMA, with the 128 tile (tile 64 is refused, tile 0
                        chooses 1 or 128); a*X + B*X reads X^T from registers (1) or X from
                        shared memory (2), that on 128x256 tiles (3), and the symmetric
                        products on 128x256 tiles too (4).
                        Runs only where the module's loaded image is sm_90a (a build with 90a
                        on a compute capability 9.0 device); elsewhere the call fails with
                        cudaErrorInvalidDeviceFunction. */
  int persistent;    /* 0: one block per output tile; 1: the wgmma products (wgmma 1 to 4
                        only) launch one block per multiprocessor, each walking the tiles in
                        turn, its producer loading the next tile while its consumers store
                        the last one */
} scion_ns_problem;

typedef struct scion_ns_matrix {
  uint64_t p, g, d; /* device addresses (d is 0 when there is no buffer) */
  int64_t p_strides[2], g_strides[2], d_strides[2]; /* element strides of rows, columns */
  float scale;                                      /* the per-matrix factor s */
} scion_ns_matrix;

/* Bytes of device workspace scion_ns_step needs (256-byte aligned); -1 on invalid input. */
int64_t scion_ns_workspace_bytes(const scion_ns_problem* problem);

/* The path scion_ns_step will take (1: one block per matrix; 64 or 128: tiled products with
 * that tile); -1 on invalid input. The product instructions follow `wgmma`. */
int scion_ns_tile(const scion_ns_problem* problem);

scion_status scion_ns_step(const scion_ns_problem* problem, const scion_ns_matrix* matrices,
                           void* workspace, int64_t workspace_bytes, int device,
                           scion_stream_t stream);

/*
 * Sign, ColNorm, RowNorm and BiasRMS (see grouped.cu): for every group of every tensor,
 *
 *   d <- (1 - alpha) * d + alpha * g        in place, in d's dtype (d_dtype -1: no buffer, d = g)
 *   u = d / (||d||_2 * q + eps)             or, with sign, u = sign(d) * q
 *   x <- decay * x + coef * u               in x's dtype
 *
 * With `lr` (the device address of one float32 t, or 0) the update is
 * x <- (1 - decay * t) * x + coef * t * u, t read by the kernel; with `momentum` (the device
 * address of one float32, or 0) alpha is read by the kernel too.
 *
 * Group k of a tensor holds `length` elements at element offsets
 * k * group_stride + e * elem_stride (the same offsets in x, g and d). All tensors share the
 * three dtypes; they go in as few launches as the kernel-argument space allows.
 */
typedef struct scion_grouped_tensor {
  uint64_t p, g, d; /* device addresses (d is 0 when there is no buffer) */
  int64_t groups, length, group_stride, elem_stride;
  float q, eps;
} scion_grouped_tensor;

scion_status scion_grouped_step(int64_t num_tensors, const scion_grouped_tensor* tensors,
                                int p_dtype, int g_dtype, int d_dtype, int sign, double alpha,
                                double coef, double decay, uint64_t lr, uint64_t momentum,
                                int device, scion_stream_t stream);

/* Description of the last failure on the calling thread ("" if none). */
const char* scion_last_error(void);

/* CUDA runtime version the library was built against (e.g. 13000), from CUDART_VERSION. */
int scion_cuda_runtime_version(void);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* SCION_KERNELS_H_ */
