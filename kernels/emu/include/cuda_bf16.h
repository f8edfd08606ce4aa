// The CPU emulator's stand-in for the CUDA device language (see kernels/emu/README.md).
//
// The kernels include <cuda_bf16.h> through common.cuh; when they are compiled as host C++ for the emulator
// (scripts/build-emu.sh: g++ -DCLT_EMU -I kernels/emu/include), this file is found instead of CUDA's. It
// defines what the kernels use of CUDA C++: the qualifiers, the built-in index variables, bf16, the math
// and bit-cast intrinsics, integer atomics, warp shuffles and __syncthreads. Each thread of a block runs
// as a fiber of the emulator (runtime.cc); the warp- and block-wide operations hand control back to its
// scheduler, which releases them when every thread of the warp or block has arrived.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#ifndef CLT_EMU
#error "kernels/emu/include/cuda_bf16.h is the CPU emulator's header; compile with -DCLT_EMU"
#endif

// Qualifiers. __shared__ variables are statics in one section, clt_shared: the emulator runs one block at a
// time, on one host thread, under a lock, so a static is exactly one block's shared memory, and it fills
// the whole section with 0xFF bytes before each block (shared memory starts undefined on the GPU; a read of
// an element nobody wrote gives NaN or 0xFFFFFFFF). Shared addresses are offsets into the section.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static __attribute__((section("clt_shared")))
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
#define __grid_constant__
#define __restrict__ __restrict
#define CLT_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(clt_emu::dynamic_shared())

struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x, y, z;
};
struct alignas(16) uint4 {
    unsigned int x, y, z, w;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) { return {x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

namespace clt_emu {
extern uint3 thread_idx, block_idx;
// Stops the kernel with an error (the launch fails with the message); never returns.
[[noreturn]] void fail(const char* what);
extern dim3 block_dim, grid_dim;

// Block barrier: returns once every thread of the block that has not exited has reached it.
void syncthreads();
// Named barrier `id` for `n` threads (bar.sync id, n): returns once n threads wait at it.
void bar_sync(uint32_t id, uint32_t n);
// Warp collectives with the full mask: every lane of the warp (none exited) must take part.
enum class Shfl { Down, Up, Xor, Idx, Match };  // Match: __match_any_sync (a lane gets the mask of equal values)
// __syncwarp: the warp's lanes leave it together.
void syncwarp();
uint64_t shfl(Shfl kind, uint64_t bits, int arg);
void ldmatrix_x4(uint32_t shared_addr, uint32_t out[4]);
void mma_bf16_16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1);
// cp.async: performed at once, or queued per thread and performed only when the thread waits for its group
// (the schedule alternates, runtime.cc), so a kernel that reads the destination too early fails.
void cp_async16(uint32_t shared_addr, const void* src, uint32_t src_bytes);
void cp_async_commit();
void cp_async_wait(int pending);
// wgmma (sm_90a), m64nNk16 bf16 -> f32 with both operands in shared memory through descriptors (the K-major
// layouts without swizzle and with the 128-byte swizzle). An issued product is queued per thread and computed only when the thread
// waits for its group, reading shared memory then, so a kernel that reads its accumulators, or overwrites the
// operands, before the wait fails. wgmma_bf16 asks for a wgmma_fence since the thread's last wait; a 16-byte
// chunk that a cp.async wrote is readable by wgmma only after the writing thread's fence_proxy_async.
void wgmma_fence();
void fence_proxy_async();
void wgmma_bf16(float* d, int n, uint64_t desc_a, uint64_t desc_b);
void wgmma_commit();
void wgmma_wait(int pending);
// mbarriers and the Tensor Memory Accelerator (sm_90). A barrier (its 8 bytes of shared memory are only its
// address here) counts arrivals and transaction bytes a phase; mbar_arrive adds `tx_bytes` to the bytes the
// phase expects (mbarrier.arrive.expect_tx, 0: a plain arrive). mbar_wait returns once the phase of the given
// parity has completed (the thread waits, as at a barrier). tma_load_2d copies a box of a tensor map
// (cuTensorMapEncodeTiled of the emulated driver) into shared memory, zeros outside the tensor, swizzled as
// the map says, and completes its bytes on `bar`: at once, or only when a thread waits for the barrier's
// phase and every arrival has come (the schedule alternates), so a kernel that reads a stage before its
// barrier says so, or refills one that wgmma still reads, fails.
void mbar_init(uint32_t bar, uint32_t count);
void fence_mbar_init();
void mbar_arrive(uint32_t bar, uint32_t tx_bytes);
void mbar_wait(uint32_t bar, uint32_t parity);
void tma_load_2d(uint32_t dst, const void* map, int c0, int c1, uint32_t bar);
// Shared-memory addresses as 32-bit offsets (what __cvta_generic_to_shared gives on the GPU).
uint32_t to_shared(const void* p);
void* from_shared(uint32_t addr);
void* dynamic_shared();
}  // namespace clt_emu

#define threadIdx clt_emu::thread_idx
#define blockIdx clt_emu::block_idx
#define blockDim clt_emu::block_dim
#define gridDim clt_emu::grid_dim

inline void __syncthreads() { clt_emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
    if (mask != 0xffffffffu) clt_emu::fail("__syncwarp with a partial mask (the emulator models whole warps)");
    clt_emu::syncwarp();
}

template <typename T>
inline T clt_emu_shfl(clt_emu::Shfl kind, unsigned mask, T v, int arg) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a register value");
    if (mask != 0xffffffffu) clt_emu::fail("a shuffle with a partial mask (the emulator models whole warps)");
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    bits = clt_emu::shfl(kind, bits, arg);
    T out;
    std::memcpy(&out, &bits, sizeof(T));
    return out;
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int = 32) {
    return clt_emu_shfl(clt_emu::Shfl::Down, mask, v, (int)delta);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int = 32) {
    return clt_emu_shfl(clt_emu::Shfl::Up, mask, v, (int)delta);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int = 32) {
    return clt_emu_shfl(clt_emu::Shfl::Xor, mask, v, lane_mask);
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int = 32) {
    return clt_emu_shfl(clt_emu::Shfl::Idx, mask, v, src);
}
// The lanes whose value equals this lane's (a bit per lane), over the whole warp.
inline unsigned __match_any_sync(unsigned mask, unsigned v) {
    return (unsigned)clt_emu_shfl(clt_emu::Shfl::Match, mask, (uint64_t)v, 0);
}

// Atomics: the emulator runs one thread at a time, so a read-modify-write is atomic.
template <typename T>
inline T atomicAdd(T* p, T v) {
    T old = *p;
    *p = old + v;
    return old;
}
template <typename T>
inline T atomicOr(T* p, T v) {
    T old = *p;
    *p = old | v;
    return old;
}
template <typename T>
inline T atomicMax(T* p, T v) {
    T old = *p;
    *p = old > v ? old : v;
    return old;
}

// CUDA's integer min/max overloads (device code calls them unqualified).
template <typename A, typename B>
inline typename std::common_type<A, B>::type min(A a, B b) {
    using C = typename std::common_type<A, B>::type;
    return (C)a < (C)b ? (C)a : (C)b;
}
template <typename A, typename B>
inline typename std::common_type<A, B>::type max(A a, B b) {
    using C = typename std::common_type<A, B>::type;
    return (C)a > (C)b ? (C)a : (C)b;
}

inline uint32_t __float_as_uint(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float __uint_as_float(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned int)x); }
inline unsigned int __umulhi(unsigned int a, unsigned int b) { return (unsigned int)(((uint64_t)a * b) >> 32); }
// expf, fabsf, fmaf, sqrtf, tanhf: the C library's (math.h through <cmath>).

// bf16: the bits, with CUDA's conversions (round to nearest even; NaN stays NaN).
struct __nv_bfloat16 {
    uint16_t x;
};
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{(uint16_t)((u >> 16) | 0x40u)};
    u += 0x7fffu + ((u >> 16) & 1u);
    return __nv_bfloat16{(uint16_t)(u >> 16)};
}
inline float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float((uint32_t)h.x << 16); }

inline size_t __cvta_generic_to_shared(const void* p) { return clt_emu::to_shared(p); }
