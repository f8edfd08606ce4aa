// The CPU emulator's cuBLAS: the one call the dense baseline (src/backend/cuda/dense.rs) makes, cublasGemmEx
// with bf16 A and B, f32 C and fp32 compute, as a plain column-major loop over host memory (device pointers
// are host addresses in the emulator, driver.cc). Built as target/emu/libcublas.so by scripts/build-emu.sh,
// so the dense step and its test run on the CPU too. Any other type combination is CUBLAS_STATUS_NOT_SUPPORTED.
#include <cstdint>
#include <cstring>
#include <vector>

#include "driver_calls.h"

namespace {
enum : int {
    CUBLAS_STATUS_SUCCESS = 0,
    CUBLAS_STATUS_INVALID_VALUE = 7,
    CUBLAS_STATUS_EXECUTION_FAILED = 13,
    CUBLAS_STATUS_NOT_SUPPORTED = 15,
};
constexpr int CUDA_R_32F = 0, CUDA_R_16BF = 14, CUBLAS_COMPUTE_32F = 68, CUBLAS_OP_N = 0, CUBLAS_OP_T = 1;
struct Handle {
    void* stream = nullptr;  // cublasSetStream's
};

float bf16(const uint16_t* p, size_t i) {
    const uint32_t u = (uint32_t)p[i] << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
}  // namespace

extern "C" {

int cublasCreate_v2(void** handle) {
    *handle = new Handle;
    return CUBLAS_STATUS_SUCCESS;
}
int cublasDestroy_v2(void* h) {
    delete static_cast<Handle*>(h);
    return CUBLAS_STATUS_SUCCESS;
}
int cublasSetStream_v2(void* h, void* stream) {
    static_cast<Handle*>(h)->stream = stream;
    return CUBLAS_STATUS_SUCCESS;
}
int cublasGetStatusString(int) { return 0; }

// C = alpha op(A) op(B) + beta C, column-major; with beta == 0, C is not read (it may hold poison). Runs at
// the call, after the handle's stream's queued work (which writes A and B).
int cublasGemmEx(void* handle, int ta, int tb, int m, int n, int k, const void* alpha, const void* a, int a_type, int lda,
                 const void* b, int b_type, int ldb, const void* beta, void* c, int c_type, int ldc, int compute,
                 int /*algo*/) {
    if (a_type != CUDA_R_16BF || b_type != CUDA_R_16BF || c_type != CUDA_R_32F || compute != CUBLAS_COMPUTE_32F)
        return CUBLAS_STATUS_NOT_SUPPORTED;
    if (m < 0 || n < 0 || k < 0 || (ta != CUBLAS_OP_N && ta != CUBLAS_OP_T) || (tb != CUBLAS_OP_N && tb != CUBLAS_OP_T))
        return CUBLAS_STATUS_INVALID_VALUE;
    if (lda < (ta == CUBLAS_OP_N ? m : k) || ldb < (tb == CUBLAS_OP_N ? k : n) || ldc < m || lda < 1 || ldb < 1 || ldc < 1)
        return CUBLAS_STATUS_INVALID_VALUE;
    if (!clt_emu_driver::drain(static_cast<Handle*>(handle)->stream)) return CUBLAS_STATUS_EXECUTION_FAILED;
    const float al = *static_cast<const float*>(alpha), be = *static_cast<const float*>(beta);
    const uint16_t* A = static_cast<const uint16_t*>(a);
    const uint16_t* B = static_cast<const uint16_t*>(b);
    float* C = static_cast<float*>(c);
    std::vector<float> col((size_t)k);
    for (int j = 0; j < n; ++j) {
        for (int kk = 0; kk < k; ++kk)
            col[kk] = tb == CUBLAS_OP_N ? bf16(B, (size_t)kk + (size_t)j * ldb) : bf16(B, (size_t)j + (size_t)kk * ldb);
        for (int i = 0; i < m; ++i) {
            float acc = 0.f;
            for (int kk = 0; kk < k; ++kk) {
                const float av = ta == CUBLAS_OP_N ? bf16(A, (size_t)i + (size_t)kk * lda) : bf16(A, (size_t)kk + (size_t)i * lda);
                acc += av * col[kk];
            }
            float& out = C[(size_t)i + (size_t)j * ldc];
            out = be == 0.f ? al * acc : al * acc + be * out;
        }
    }
    return CUBLAS_STATUS_SUCCESS;
}

}  // extern "C"
