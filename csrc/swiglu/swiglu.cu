// SwiGLU forward in CUDA C++: out[r, c] = silu(gate_up[r, c]) * gate_up[r, F + c], fp32 math.
//
// Not dispatched from Python (the Triton kernel in triton_kernels.py is the fast path); kept as
// the CUDA template for ops where CUDA wins, and compile-checked by tests/csrc (nvcc -c).
// Build: nvcc -O3 -arch=sm_90 -c swiglu.cu  (a torch extension can wrap launch_swiglu_forward_bf16).
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cstdint>

namespace {

__device__ __forceinline__ float silu(float x) { return x / (1.0f + __expf(-x)); }

// One thread per output element; blockIdx.x is the row (up to 2^31 - 1 rows), blockIdx.y the
// column block, so no thread divides a 64-bit flat index.
__global__ void swiglu_forward_bf16_kernel(const __nv_bfloat16* __restrict__ gate_up,
                                           __nv_bfloat16* __restrict__ out,
                                           int64_t n_cols) {
  const int64_t row = blockIdx.x;
  const int64_t col = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (col >= n_cols) return;
  const __nv_bfloat16* in_row = gate_up + row * 2 * n_cols;
  const float gate = __bfloat162float(in_row[col]);
  const float up = __bfloat162float(in_row[n_cols + col]);
  out[row * n_cols + col] = __float2bfloat16(silu(gate) * up);
}

}  // namespace

// gate_up: [n_rows, 2 * n_cols] bf16 row-major; out: [n_rows, n_cols] bf16. Returns the launch status.
extern "C" cudaError_t launch_swiglu_forward_bf16(const void* gate_up, void* out, int64_t n_rows, int64_t n_cols,
                                                  cudaStream_t stream) {
  if (n_rows == 0 || n_cols == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const int64_t col_blocks = (n_cols + kThreads - 1) / kThreads;
  if (n_rows > 2147483647 || col_blocks > 65535) return cudaErrorInvalidValue;  // grid.x / grid.y limits
  const dim3 grid(static_cast<unsigned>(n_rows), static_cast<unsigned>(col_blocks));
  swiglu_forward_bf16_kernel<<<grid, kThreads, 0, stream>>>(static_cast<const __nv_bfloat16*>(gate_up),
                                                            static_cast<__nv_bfloat16*>(out), n_cols);
  return cudaGetLastError();
}
