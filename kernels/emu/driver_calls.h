// The emulated driver's stream calls, for the emulated libraries (cublas.cc, nccl.cc): looked up in the
// libcuda.so this process has already loaded (cudarc opens it before any cuBLAS or NCCL call); null where it
// has not. The driver defers each stream's work (driver.cc), so a library call first runs its stream's
// queued work, which is what makes its inputs hold what stream order says they hold.
#pragma once
#include <dlfcn.h>

namespace clt_emu_driver {

using StreamSync = int (*)(void*);
using HostFunc = int (*)(void*, void (*)(void*), void*);

struct Calls {
    StreamSync sync = nullptr;        // cuStreamSynchronize
    HostFunc host_func = nullptr;     // cuLaunchHostFunc
};

inline const Calls& calls() {
    static const Calls c = [] {
        Calls c;
        for (const char* name : {"libcuda.so", "libcuda.so.1"}) {
            if (void* h = dlopen(name, RTLD_NOW | RTLD_NOLOAD)) {
                c.sync = reinterpret_cast<StreamSync>(dlsym(h, "cuStreamSynchronize"));
                c.host_func = reinterpret_cast<HostFunc>(dlsym(h, "cuLaunchHostFunc"));
                if (c.sync && c.host_func) break;
            }
        }
        return c;
    }();
    return c;
}

// Runs `stream`'s queued work; false if it failed.
inline bool drain(void* stream) { return !calls().sync || calls().sync(stream) == 0; }

}  // namespace clt_emu_driver
