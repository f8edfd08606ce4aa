// The CPU emulator's CUDA driver: the part of libcuda's API that cudarc calls for this crate, over host
// memory and the emulated kernels (runtime.cc). Built as target/emu/libcuda.so by scripts/build-emu.sh; a
// process that finds it first on LD_LIBRARY_PATH (tests/cuda.rs under scripts/test.sh) runs the crate's
// whole CUDA backend, unchanged, on the CPU.
//
// Device memory is host memory: a device pointer is a host address, each allocation followed by an
// inaccessible page (overruns fault) and filled with 0xFF bytes at first. Every call is synchronous, so streams
// and events only order what is already ordered, and event times are host times. Copies are checked
// against the allocations they touch; a kernel's failure (runtime.cc) is CUDA_ERROR_LAUNCH_FAILED, with
// cuGetErrorString returning the emulator's message for it.
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <set>
#include <string>

#include "runtime.h"

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef void* CUcontext;
typedef void* CUstream;
typedef void* CUevent;
typedef void* CUmodule;
typedef void* CUfunction;

namespace {

enum : CUresult {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_IMAGE = 200,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_NOT_SUPPORTED = 801,
    CUDA_ERROR_LAUNCH_FAILED = 719,
};

std::mutex M;                           // one call at a time (the fibers run on the caller's thread)
struct Alloc {
    size_t bytes;  // what was asked for
    void* map;     // the mapping that holds it, and its length
    size_t map_len;
};
std::map<uintptr_t, Alloc> allocs;      // device allocations, by start address
std::string last_launch_error;          // cuGetErrorString(CUDA_ERROR_LAUNCH_FAILED)
int ctx_token, stream_token;            // addresses used as the context and default-stream handles
const auto t0 = std::chrono::steady_clock::now();

struct Module {
    std::set<std::string> entries;  // the .entry names in its PTX
};
struct Function {
    const clt_emu::Kernel* k;
    int max_dynamic_shared;
};
struct Event {
    double ms;
};

CUresult fail(CUresult code, const std::string& what) {
    fprintf(stderr, "clt-emu: %s\n", what.c_str());
    return code;
}

// Whether [p, p + n) lies inside one device allocation.
bool device_range(CUdeviceptr p, size_t n) {
    auto it = allocs.upper_bound((uintptr_t)p);
    if (it == allocs.begin()) return false;
    --it;
    return (uintptr_t)p + n <= it->first + it->second.bytes;
}

// A device allocation is 256-byte aligned (as cuMemAlloc's) and ends where an inaccessible page begins,
// so a kernel that reads or writes past the end of a buffer (by more than the rounding to 256 bytes)
// faults at once, and the fault handler names the kernel, block and thread (runtime.cc). Its bytes start
// as 0xFF: device memory is not zeroed, so nothing may read what was not written.
CUresult alloc(CUdeviceptr* p, size_t bytes) {
    const size_t page = 4096;
    const size_t body = ((bytes == 0 ? 1 : bytes) + 255) / 256 * 256;
    const size_t len = (body + page - 1) / page * page + page;
    void* m = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
    char* guard = static_cast<char*>(m) + len - page;
    mprotect(guard, page, PROT_NONE);
    char* start = guard - body;
    std::memset(start, 0xff, body);
    std::lock_guard<std::mutex> g(M);
    allocs[(uintptr_t)start] = Alloc{bytes, m, len};
    *p = (CUdeviceptr)(uintptr_t)start;
    return CUDA_SUCCESS;
}

CUresult release(CUdeviceptr p) {
    std::lock_guard<std::mutex> g(M);
    auto it = allocs.find((uintptr_t)p);
    if (it == allocs.end()) return fail(CUDA_ERROR_INVALID_VALUE, "cuMemFree of an address that is not an allocation");
    munmap(it->second.map, it->second.map_len);
    allocs.erase(it);
    return CUDA_SUCCESS;
}

CUresult copy(void* dst, const void* src, size_t n, bool dst_dev, bool src_dev, const char* what) {
    {
        std::lock_guard<std::mutex> g(M);
        if (dst_dev && !device_range((CUdeviceptr)(uintptr_t)dst, n))
            return fail(CUDA_ERROR_INVALID_VALUE, std::string(what) + ": destination outside any device allocation");
        if (src_dev && !device_range((CUdeviceptr)(uintptr_t)src, n))
            return fail(CUDA_ERROR_INVALID_VALUE, std::string(what) + ": source outside any device allocation");
    }
    std::memmove(dst, src, n);
    return CUDA_SUCCESS;
}

CUresult memset8(CUdeviceptr p, unsigned char v, size_t n) {
    {
        std::lock_guard<std::mutex> g(M);
        if (!device_range(p, n)) return fail(CUDA_ERROR_INVALID_VALUE, "cuMemsetD8 outside any device allocation");
    }
    std::memset((void*)(uintptr_t)p, v, n);
    return CUDA_SUCCESS;
}

double now_ms() {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

extern "C" {

CUresult cuInit(unsigned) { return CUDA_SUCCESS; }
CUresult cuDriverGetVersion(int* v) {
    *v = 13000;
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetCount(int* n) {
    *n = 1;
    return CUDA_SUCCESS;
}
CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    if (ordinal != 0) return CUDA_ERROR_INVALID_DEVICE;
    *d = 0;
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetName(char* name, int len, CUdevice) {
    snprintf(name, (size_t)len, "CLT CPU emulator (kernels as host C++, not a GPU)");
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetAttribute(int* v, int attr, CUdevice) {
    switch (attr) {
        case 1: *v = 1024; break;               // max threads per block
        case 2: *v = 1024; break;               // max block dim x
        case 3: *v = 1024; break;               // y
        case 4: *v = 64; break;                 // z
        case 5: *v = 2147483647; break;         // max grid dim x
        case 6: case 7: *v = 65535; break;      // y, z
        case 8: *v = 48 * 1024; break;          // shared memory per block
        case 10: *v = 32; break;                // warp size
        case 16: *v = 132; break;               // multiprocessors
        case 75: *v = 9; break;                 // compute capability major
        case 76: *v = 0; break;                 // minor
        case 115: *v = 1; break;                // memory pools supported
        default: *v = 0;
    }
    return CUDA_SUCCESS;
}
CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice) {
    *bytes = (size_t)16 << 30;
    return CUDA_SUCCESS;
}
CUresult cuMemGetInfo_v2(size_t* free_b, size_t* total) {
    *free_b = (size_t)16 << 30;
    *total = (size_t)16 << 30;
    return CUDA_SUCCESS;
}
// Each process is its own emulated device (its memory is its own): the UUID is the process id and the
// ordinal, so ranks on one machine see distinct devices, as ranks on distinct GPUs do. With
// CLT_EMU_ONE_DEVICE=1 every process reports the same device, as ranks sharing one GPU would.
CUresult cuDeviceGetUuid(char* uuid, CUdevice d) {
    std::memset(uuid, 0, 16);
    const char* one = getenv("CLT_EMU_ONE_DEVICE");
    const long pid = one && std::strcmp(one, "1") == 0 ? 0L : (long)getpid();
    std::memcpy(uuid, &pid, sizeof pid);
    std::memcpy(uuid + 8, &d, sizeof d);
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetUuid_v2(char* uuid, CUdevice d) { return cuDeviceGetUuid(uuid, d); }

CUresult cuDevicePrimaryCtxRetain(CUcontext* c, CUdevice) {
    *c = &ctx_token;
    return CUDA_SUCCESS;
}
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) { return CUDA_SUCCESS; }
CUresult cuCtxSetCurrent(CUcontext) { return CUDA_SUCCESS; }
CUresult cuCtxGetCurrent(CUcontext* c) {
    *c = &ctx_token;
    return CUDA_SUCCESS;
}
CUresult cuCtxPushCurrent_v2(CUcontext) { return CUDA_SUCCESS; }
CUresult cuCtxPopCurrent_v2(CUcontext* c) {
    if (c) *c = &ctx_token;
    return CUDA_SUCCESS;
}
CUresult cuCtxSynchronize() { return CUDA_SUCCESS; }
CUresult cuCtxGetStreamPriorityRange(int* least, int* greatest) {
    *least = 0;
    *greatest = 0;
    return CUDA_SUCCESS;
}
CUresult cuCtxSetFlags(unsigned) { return CUDA_SUCCESS; }

CUresult cuStreamCreate(CUstream* s, unsigned) {
    *s = new int(0);
    return CUDA_SUCCESS;
}
CUresult cuStreamCreateWithPriority(CUstream* s, unsigned f, int) { return cuStreamCreate(s, f); }
CUresult cuStreamDestroy_v2(CUstream s) {
    if (s != &stream_token) delete static_cast<int*>(s);
    return CUDA_SUCCESS;
}
CUresult cuStreamSynchronize(CUstream) { return CUDA_SUCCESS; }
CUresult cuStreamQuery(CUstream) { return CUDA_SUCCESS; }
CUresult cuStreamWaitEvent(CUstream, CUevent, unsigned) { return CUDA_SUCCESS; }
CUresult cuStreamIsCapturing(CUstream, int* status) {
    *status = 0;
    return CUDA_SUCCESS;
}
CUresult cuLaunchHostFunc(CUstream, void (*fn)(void*), void* data) {
    fn(data);
    return CUDA_SUCCESS;
}

CUresult cuEventCreate(CUevent* e, unsigned) {
    *e = new Event{now_ms()};
    return CUDA_SUCCESS;
}
CUresult cuEventDestroy_v2(CUevent e) {
    delete static_cast<Event*>(e);
    return CUDA_SUCCESS;
}
CUresult cuEventRecord(CUevent e, CUstream) {
    static_cast<Event*>(e)->ms = now_ms();
    return CUDA_SUCCESS;
}
CUresult cuEventSynchronize(CUevent) { return CUDA_SUCCESS; }
CUresult cuEventQuery(CUevent) { return CUDA_SUCCESS; }
CUresult cuEventElapsedTime(float* ms, CUevent a, CUevent b) {
    *ms = (float)(static_cast<Event*>(b)->ms - static_cast<Event*>(a)->ms);
    return CUDA_SUCCESS;
}
CUresult cuEventElapsedTime_v2(float* ms, CUevent a, CUevent b) { return cuEventElapsedTime(ms, a, b); }

CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) { return alloc(p, bytes); }
CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, CUstream) { return alloc(p, bytes); }
CUresult cuMemFree_v2(CUdeviceptr p) { return release(p); }
CUresult cuMemFreeAsync(CUdeviceptr p, CUstream) { return release(p); }
CUresult cuMemHostAlloc(void** p, size_t bytes, unsigned) {
    return posix_memalign(p, 256, bytes == 0 ? 1 : bytes) == 0 ? CUDA_SUCCESS : CUDA_ERROR_OUT_OF_MEMORY;
}
CUresult cuMemAllocHost_v2(void** p, size_t bytes) { return cuMemHostAlloc(p, bytes, 0); }
CUresult cuMemFreeHost(void* p) {
    free(p);
    return CUDA_SUCCESS;
}
CUresult cuMemcpyHtoD_v2(CUdeviceptr d, const void* h, size_t n) {
    return copy((void*)(uintptr_t)d, h, n, true, false, "cuMemcpyHtoD");
}
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr d, const void* h, size_t n, CUstream) { return cuMemcpyHtoD_v2(d, h, n); }
CUresult cuMemcpyDtoH_v2(void* h, CUdeviceptr d, size_t n) {
    return copy(h, (const void*)(uintptr_t)d, n, false, true, "cuMemcpyDtoH");
}
CUresult cuMemcpyDtoHAsync_v2(void* h, CUdeviceptr d, size_t n, CUstream) { return cuMemcpyDtoH_v2(h, d, n); }
CUresult cuMemcpyDtoD_v2(CUdeviceptr d, CUdeviceptr s, size_t n) {
    return copy((void*)(uintptr_t)d, (const void*)(uintptr_t)s, n, true, true, "cuMemcpyDtoD");
}
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr d, CUdeviceptr s, size_t n, CUstream) { return cuMemcpyDtoD_v2(d, s, n); }
CUresult cuMemsetD8_v2(CUdeviceptr p, unsigned char v, size_t n) { return memset8(p, v, n); }
CUresult cuMemsetD8Async(CUdeviceptr p, unsigned char v, size_t n, CUstream) { return memset8(p, v, n); }

CUresult cuModuleLoadData(CUmodule* m, const void* image) {
    // The entries of the PTX text: ".entry name(".
    auto* mod = new Module;
    const char* s = static_cast<const char*>(image);
    for (const char* p = strstr(s, ".entry "); p; p = strstr(p + 1, ".entry ")) {
        const char* b = p + 7;
        while (*b == ' ') ++b;
        const char* e = b;
        while (*e && *e != '(' && *e != ' ' && *e != '\n') ++e;
        mod->entries.insert(std::string(b, e));
    }
    if (mod->entries.empty()) {
        delete mod;
        return fail(CUDA_ERROR_INVALID_IMAGE, "cuModuleLoadData: no .entry in the image (not PTX?)");
    }
    *m = mod;
    return CUDA_SUCCESS;
}
CUresult cuModuleUnload(CUmodule m) {
    delete static_cast<Module*>(m);
    return CUDA_SUCCESS;
}
CUresult cuModuleGetFunction(CUfunction* f, CUmodule m, const char* name) {
    if (!static_cast<Module*>(m)->entries.count(name)) return CUDA_ERROR_NOT_FOUND;
    const clt_emu::Kernel* k = clt_emu::find_kernel(name);
    if (!k) return fail(CUDA_ERROR_NOT_FOUND, std::string("kernel ") + name + " is in the PTX but not in the emulator");
    *f = new Function{k, 48 * 1024};
    return CUDA_SUCCESS;
}
CUresult cuFuncSetAttribute(CUfunction f, int attr, int value) {
    if (attr == 8) static_cast<Function*>(f)->max_dynamic_shared = value;  // MAX_DYNAMIC_SHARED_SIZE_BYTES
    return CUDA_SUCCESS;
}
CUresult cuFuncGetAttribute(int* v, int attr, CUfunction f) {
    *v = attr == 0 ? (int)static_cast<Function*>(f)->k->max_threads : 0;  // MAX_THREADS_PER_BLOCK
    return CUDA_SUCCESS;
}
CUresult cuFuncSetCacheConfig(CUfunction, int) { return CUDA_SUCCESS; }

CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned shared, CUstream, void** params, void** extra) {
    if (!f || !params || extra) return CUDA_ERROR_INVALID_VALUE;
    const Function* fn = static_cast<Function*>(f);
    std::lock_guard<std::mutex> g(M);
    if ((int)shared > fn->max_dynamic_shared)
        return fail(CUDA_ERROR_INVALID_VALUE, "kernel " + fn->k->name + ": dynamic shared memory over its limit");
    const std::string e = clt_emu::run(*fn->k, params[0], dim3{gx, gy, gz}, dim3{bx, by, bz}, shared);
    if (!e.empty()) {
        last_launch_error = "clt-emu: " + e;
        return fail(CUDA_ERROR_LAUNCH_FAILED, e);
    }
    return CUDA_SUCCESS;
}

// One row per code the emulator returns: its name and its message (a launch failure's is the emulator's
// own message for the last failed launch).
namespace {
struct Code {
    CUresult code;
    const char* name;
    const char* message;
};
const Code codes[] = {
    {CUDA_SUCCESS, "CUDA_SUCCESS", "no error"},
    {CUDA_ERROR_INVALID_VALUE, "CUDA_ERROR_INVALID_VALUE", "invalid argument"},
    {CUDA_ERROR_OUT_OF_MEMORY, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory"},
    {CUDA_ERROR_INVALID_DEVICE, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"},
    {CUDA_ERROR_INVALID_IMAGE, "CUDA_ERROR_INVALID_IMAGE", "device kernel image is invalid"},
    {CUDA_ERROR_NOT_FOUND, "CUDA_ERROR_NOT_FOUND", "named symbol not found"},
    {CUDA_ERROR_LAUNCH_FAILED, "CUDA_ERROR_LAUNCH_FAILED", nullptr},
};
const Code* find_code(CUresult code) {
    for (const Code& c : codes)
        if (c.code == code) return &c;
    return nullptr;
}
}  // namespace

CUresult cuGetErrorString(CUresult code, const char** s) {
    const Code* c = find_code(code);
    if (!c) *s = "error in the CPU emulator";
    else *s = c->message ? c->message : last_launch_error.c_str();
    return CUDA_SUCCESS;
}
CUresult cuGetErrorName(CUresult code, const char** s) {
    const Code* c = find_code(code);
    *s = c ? c->name : "CUDA_ERROR_UNKNOWN";
    return CUDA_SUCCESS;
}

}  // extern "C"
