// The inline PTX the tensor-core encoders use (cp.async, ldmatrix, mma.sync, named barriers), one wrapper per
// instruction.
// Compiled for the CPU emulator (CLT_EMU), each wrapper calls the emulator's model of the instruction
// instead (kernels/emu/runtime.cc), so encode_mma's own code is the same in both builds.
#pragma once
#include "common.cuh"

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

#ifndef CLT_EMU

// 16 bytes global -> shared, asynchronously; with valid == false nothing is read and the 16 bytes are zeroed.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
    const uint32_t n = valid ? 16u : 0u;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n) : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2,
                                            uint32_t& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr)
                 : "memory");
}

// c += a * b for one m16n8k16 tile (bf16 inputs, fp32 accumulators).
__device__ __forceinline__ void mma_bf16_16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Named barrier `id` for `n` threads (a multiple of 32): the warps that take part wait for each other only.
__device__ __forceinline__ void bar_sync(uint32_t id, uint32_t n) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(n) : "memory");
}

#else  // the CPU emulator

inline void cp_async16(uint32_t dst, const void* src, bool valid) { clt_emu::cp_async16(dst, src, valid ? 16u : 0u); }
inline void cp_async_commit() { clt_emu::cp_async_commit(); }
template <int N>
inline void cp_async_wait() {
    clt_emu::cp_async_wait(N);
}
inline void ldmatrix_x4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
    uint32_t r[4];
    clt_emu::ldmatrix_x4(addr, r);
    r0 = r[0];
    r1 = r[1];
    r2 = r[2];
    r3 = r[3];
}
inline void mma_bf16_16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    clt_emu::mma_bf16_16816(c, a, b0, b1);
}
inline void bar_sync(uint32_t id, uint32_t n) { clt_emu::bar_sync(id, n); }

#endif
