// The CPU emulator's kernel registry and grid runner, shared by runtime.cc, driver.cc and the generated
// registration files (one per kernel file, written by scripts/build-emu.sh).
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

#include "cuda_bf16.h"

namespace clt_emu {

// Calls kernel `fn` with its parameter struct at `params`.
using Thunk = void (*)(void* fn, const void* params);

struct Kernel {
    std::string name;
    void* fn;
    Thunk thunk;
    unsigned max_threads;  // __launch_bounds__, else 1024
    size_t param_size;     // sizeof its parameter struct (a queued launch keeps a copy)
};

void register_kernel(const char* name, void* fn, Thunk thunk, unsigned max_threads, size_t param_size);
// The kernel called `name`, or nullptr.
const Kernel* find_kernel(const std::string& name);

// Registers a kernel at load time: `static Registrar r("name", name, bound(...));`.
struct Registrar {
    template <class P>
    Registrar(const char* name, void (*f)(P), unsigned max_threads) {
        register_kernel(name, reinterpret_cast<void*>(f), &call<P>, max_threads, sizeof(P));
    }
    template <class P>
    static void call(void* fn, const void* params) {
        // (Copied to storage of P's alignment first: the queued copy is only 16-byte aligned, and a struct
        // holding a tensor map is 128.)
        alignas(P) unsigned char buf[sizeof(P)];
        std::memcpy(buf, params, sizeof(P));
        reinterpret_cast<void (*)(P)>(fn)(*reinterpret_cast<const P*>(buf));
    }
};
constexpr unsigned bound() { return 1024; }
constexpr unsigned bound(unsigned b) { return b; }

// The emulator's CUtensorMap (128 opaque bytes to the program): what cuTensorMapEncodeTiled (driver.cc)
// checked and tma_load_2d (runtime.cc) reads. Rank 2, no interleave, element strides 1.
struct TensorMap {
    uint64_t magic;     // kTensorMapMagic
    const char* base;   // the global address
    uint64_t dim[2];    // elements a row, rows
    uint64_t stride;    // bytes from one row to the next
    uint32_t box[2];    // the box: elements a row, rows
    uint32_t elem;      // bytes an element
    uint32_t swizzle;   // the swizzle's span in bytes: 0 (none), 32, 64 or 128
};
constexpr uint64_t kTensorMapMagic = 0x434c542d544d4150ull;  // "CLT-TMAP"
static_assert(sizeof(TensorMap) <= 128, "a CUtensorMap holds 128 bytes");

// Runs the whole grid, block after block, each block's threads as fibers. Returns "" or what went wrong
// (a deadlock, a warp collective some lanes skipped, a misaligned or non-shared address, ...).
std::string run(const Kernel& k, const void* params, dim3 grid, dim3 block, size_t dynamic_shared_bytes);

}  // namespace clt_emu
