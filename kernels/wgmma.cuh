// The inline PTX of Hopper's warpgroup MMA (wgmma), the proxy fence, mbarriers and the Tensor Memory
// Accelerator's bulk-tensor copy that encode_wgmma.cu needs, one wrapper per instruction, for the sm_90a
// module only. Compiled for the CPU emulator (CLT_EMU), each wrapper calls the emulator's model of the
// instruction instead (kernels/emu/runtime.cc: the descriptor decoded as the PTX ISA defines it, the product
// computed when the thread waits for its group, mbarrier phases, copies landing at the issue or later).
#pragma once
#include "ptx.cuh"

// A shared-memory matrix descriptor (PTX ISA, "Matrix Descriptor Format") for the canonical K-major layout
// without swizzle: 8 x 16-byte core matrices (8 rows of 8 bf16, 128 contiguous bytes), `lbo` bytes from one
// core matrix to the next along K, `sbo` bytes from one 8-row group to the next along M (or N). Bits 0-13:
// start address >> 4; 16-29: lbo >> 4; 32-45: sbo >> 4; 49-51: base offset (0); 62-63: swizzle (0, none).
__device__ __forceinline__ uint64_t wgmma_desc(uint32_t smem, uint32_t lbo, uint32_t sbo) {
    return (uint64_t)((smem & 0x3FFFFu) >> 4) | (uint64_t)((lbo & 0x3FFFFu) >> 4) << 16 |
           (uint64_t)((sbo & 0x3FFFFu) >> 4) << 32;
}

// The same for the canonical K-major layout with the 128-byte swizzle (encode_wgmma_tma, whose tiles the
// Tensor Memory Accelerator writes so): rows of 64 bf16 (128 bytes) one after another, 8-row groups `sbo`
// (1024) bytes apart, the 16-byte chunk c of row r at chunk c ^ (r % 8), as a function of the shared address
// (bits 4-6 ^= bits 7-9), so the 8-row groups start 1024-byte aligned. A k16 step within the 64 columns
// starts 32 bytes further (the base offset stays 0: bits 7-9 of the start are 0). LBO is unused for this
// layout (1 by convention); bits 62-63: 1, the 128-byte swizzle.
__device__ __forceinline__ uint64_t wgmma_desc_sw128(uint32_t smem, uint32_t sbo) {
    return (uint64_t)((smem & 0x3FFFFu) >> 4) | (uint64_t)1 << 16 | (uint64_t)((sbo & 0x3FFFFu) >> 4) << 32 |
           (uint64_t)1 << 62;
}

#ifndef CLT_EMU

// Orders this warpgroup's earlier register accesses (the accumulators) before the wgmma that follow.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }

// Makes this thread's earlier shared-memory writes (the landed cp.async copies) visible to the async proxy,
// through which wgmma reads its operands.
__device__ __forceinline__ void fence_proxy_async() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// Pins the M accumulators at this point of the program for the compiler: a volatile asm that reads and
// writes each one, so that no use of them moves across the wgmma issue or wait it sits beside (volatile asm
// statements keep their order; plain register uses do not).
template <int M>
__device__ __forceinline__ void wgmma_fence_operands(float* d) {
#pragma unroll
    for (int i = 0; i < M; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }

// Waits until at most N of this warpgroup's committed wgmma groups are still in flight.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// d += A B for one m64nNk16 step of the warpgroup: A (64 x 16, K-major) and B (N x 16, K-major: W's [F][d]
// rows) in shared memory through their descriptors, bf16 in, fp32 accumulators (N / 2 a thread). Thread (warp
// w of the warpgroup, lane 4 g + t) holds d[4 j + 2 h + c] = D[16 w + g + 8 h][8 j + 2 t + c] (PTX ISA, wgmma
// D fragments for .m64nNk16). The operands after the descriptors: scale-d 1 (D += A B), A and B not negated,
// neither transposed (both K-major).
template <int N>
__device__ __forceinline__ void wgmma_bf16(float* d, uint64_t desc_a, uint64_t desc_b);

template <>
__device__ __forceinline__ void wgmma_bf16<128>(float* d, uint64_t desc_a, uint64_t desc_b) {
    asm volatile(
        "{\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "%64, %65, 1, 1, 1, 0, 0;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]),
          "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]),
          "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]),
          "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
          "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]),
          "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]),
          "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]),
          "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]),
          "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(desc_a), "l"(desc_b)
        : "memory");
}

template <>
__device__ __forceinline__ void wgmma_bf16<256>(float* d, uint64_t desc_a, uint64_t desc_b) {
    asm volatile(
        "{\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
        "{"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
        "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
        "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
        "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
        "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
        "%128, %129, 1, 1, 1, 0, 0;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]),
          "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]),
          "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]),
          "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
          "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]),
          "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]),
          "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]),
          "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]),
          "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
          "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]),
          "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
          "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]),
          "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
          "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]),
          "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
          "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]),
          "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),
          "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]),
          "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
          "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]),
          "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),
          "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]),
          "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),
          "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]),
          "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "l"(desc_a), "l"(desc_b)
        : "memory");
}

// ---- mbarriers and the Tensor Memory Accelerator (encode_wgmma_tma) ----

// How long an mbarrier wait may last before the watchdog in mbar_wait traps: 2 s.
#ifndef CLT_MBAR_TIMEOUT_NS
#define CLT_MBAR_TIMEOUT_NS 2000000000ull
#endif

// Initialises the mbarrier at `bar` (8 bytes of shared memory) for `count` arrivals a phase.
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

// Makes the initialised mbarriers visible to the async proxy (the TMA unit completes transactions on them).
__device__ __forceinline__ void fence_mbar_init() {
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// One arrival on `bar`.
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

// One arrival on `bar`, which also expects `bytes` more of transactions (TMA copies) in this phase.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}

// Whether the phase of `bar` with parity `parity` has completed (try_wait itself waits a while, a time the
// hardware chooses, before it answers no).
__device__ __forceinline__ bool mbar_try_wait(uint32_t bar, uint32_t parity) {
    uint32_t done;
    asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                 : "=r"(done)
                 : "r"(bar), "r"(parity)
                 : "memory");
    return done != 0;
}

// The global nanosecond timer.
__device__ __forceinline__ uint64_t globaltimer_ns() {
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;\n" : "=l"(t));
    return t;
}

// Waits until the phase of `bar` with parity `parity` has completed (a barrier's phases alternate in parity;
// a fresh barrier counts its phase before the first as completed with parity 1). A watchdog: no wait of a
// correct launch lasts a millisecond (every block of the persistent grid is resident, and each waits only on
// its own copies and warps), so one that lasts CLT_MBAR_TIMEOUT_NS prints the block, thread, barrier and
// parity and traps. A hang (copies that never complete the bytes announced, a lost arrival) then fails the
// launch within seconds, where it would otherwise hold the process until an outer time limit kills it,
// with every later kernel's run (the CPU emulator reports the same hangs as deadlocks).
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
    if (mbar_try_wait(bar, parity)) return;
    const uint64_t t0 = globaltimer_ns();
    while (!mbar_try_wait(bar, parity))
        if (globaltimer_ns() - t0 > CLT_MBAR_TIMEOUT_NS) {
            printf("clt: block %u thread %u: mbarrier at shared 0x%x, parity %u, not completed after %llu ns\n",
                   blockIdx.x, threadIdx.x, bar, parity, (unsigned long long)CLT_MBAR_TIMEOUT_NS);
            __trap();
        }
}

// TMA: the box of the 2-D tensor `map` (a __grid_constant__ parameter's address) at element coordinates
// (c0 along the rows, c1 the row) into shared memory at `dst`, completing its bytes as transactions on
// `bar`; elements outside the tensor are written as zeros (and counted).
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const void* map, int c0, int c1, uint32_t bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
            dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar)
        : "memory");
}

#else  // the CPU emulator

inline void wgmma_fence() { clt_emu::wgmma_fence(); }
inline void fence_proxy_async() { clt_emu::fence_proxy_async(); }
template <int M>
inline void wgmma_fence_operands(float*) {}
inline void wgmma_commit() { clt_emu::wgmma_commit(); }
template <int N>
inline void wgmma_wait() {
    clt_emu::wgmma_wait(N);
}
template <int N>
inline void wgmma_bf16(float* d, uint64_t desc_a, uint64_t desc_b) {
    clt_emu::wgmma_bf16(d, N, desc_a, desc_b);
}
inline void mbar_init(uint32_t bar, uint32_t count) { clt_emu::mbar_init(bar, count); }
inline void fence_mbar_init() { clt_emu::fence_mbar_init(); }
inline void mbar_arrive(uint32_t bar) { clt_emu::mbar_arrive(bar, 0); }
inline void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) { clt_emu::mbar_arrive(bar, bytes); }
inline void mbar_wait(uint32_t bar, uint32_t parity) { clt_emu::mbar_wait(bar, parity); }
inline void tma_load_2d(uint32_t dst, const void* map, int c0, int c1, uint32_t bar) {
    clt_emu::tma_load_2d(dst, map, c0, c1, bar);
}

#endif
