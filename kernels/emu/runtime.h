// The CPU emulator's kernel registry and grid runner, shared by runtime.cc, driver.cc and the generated
// registration files (one per kernel file, written by scripts/build-emu.sh).
#pragma once
#include <cstddef>
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
        reinterpret_cast<void (*)(P)>(fn)(*static_cast<const P*>(params));
    }
};
constexpr unsigned bound() { return 1024; }
constexpr unsigned bound(unsigned b) { return b; }

// Runs the whole grid, block after block, each block's threads as fibers. Returns "" or what went wrong
// (a deadlock, a warp collective some lanes skipped, a misaligned or non-shared address, ...).
std::string run(const Kernel& k, const void* params, dim3 grid, dim3 block, size_t dynamic_shared_bytes);

}  // namespace clt_emu
