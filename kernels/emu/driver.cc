// The CPU emulator's CUDA driver: the part of libcuda's API that cudarc calls for this crate, over host
// memory and the emulated kernels (runtime.cc). Built as target/emu/libcuda.so by scripts/build-emu.sh; a
// process that finds it first on LD_LIBRARY_PATH (tests/cuda.rs under scripts/test.sh) runs the crate's
// whole CUDA backend, unchanged, on the CPU.
//
// Device memory is host memory: a device pointer is a host address, each allocation followed by an
// inaccessible page (overruns fault) and filled with 0xFF bytes at first. Copies are checked against the
// allocations they touch; a kernel's failure (runtime.cc) is CUDA_ERROR_LAUNCH_FAILED, with cuGetErrorString
// returning the emulator's message for it.
//
// Streams are deferred: work queued on a stream (launches, asynchronous copies and memsets, stream-ordered
// frees, host functions, event records) runs only when something needs it: a synchronisation of its stream,
// of an event recorded after it, or of the context; a query of either; or another stream's work that waits
// on such an event (cuStreamWaitEvent), when that work runs. So the work of two streams runs in the latest
// order CUDA allows, and a missing wait between streams shows deterministically: a kernel reads a buffer
// another stream has not written yet, a host write to pinned memory overtakes the queued copy that reads it.
// The legacy default stream (handle 0) waits for, and is waited for by, blocking streams as in CUDA
// (cudarc's streams are non-blocking). Copies with pageable host memory behave as CUDA's do: host-to-device
// takes the bytes at the call, device-to-host returns once the copy is done; pinned memory (cuMemHostAlloc)
// is read and written when the copy runs. A queued launch's failure is returned by the call that ran it and
// then by every synchronisation (sticky, as in CUDA). CLT_EMU_STREAMS=eager runs everything at the call
// instead (the emulator's old behaviour); CLT_EMU_STREAMS=side-first runs the created streams' work at the
// call and defers only the legacy stream's, the other extreme (see mode()). Event times are host times of
// when the record ran.
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <deque>
#include <functional>
#include <memory>
#include <vector>
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

std::recursive_mutex M;                 // one call at a time (the fibers run on the caller's thread); queued
                                        // work runs inside the call that needs it, under the same lock
struct Alloc {
    size_t bytes;  // what was asked for
    void* map;     // the mapping that holds it, and its length
    size_t map_len;
};
std::map<uintptr_t, Alloc> allocs;      // device allocations, by start address
std::string last_launch_error;          // cuGetErrorString(CUDA_ERROR_LAUNCH_FAILED)
int ctx_token;                          // its address is the context's handle
const auto t0 = std::chrono::steady_clock::now();

struct Module {
    std::set<std::string> entries;  // the .entry names in its PTX
};
struct Function {
    const clt_emu::Kernel* k;
    int max_dynamic_shared;
};
// A stream's queue: the work not run yet, and how much was ever queued and run (positions are 1-based:
// an event recorded as the n-th item is complete once `done >= n`).
struct Stream {
    explicit Stream(bool b) : blocking(b) {}
    bool blocking;  // synchronises with the legacy default stream
    std::deque<std::function<CUresult()>> q;
    long queued = 0, done = 0;
};
Stream legacy(true);                    // handle 0 (and CU_STREAM_LEGACY, CU_STREAM_PER_THREAD)
std::set<Stream*> streams;              // created and not destroyed (destroyed ones are kept, drained)
CUresult sticky = CUDA_SUCCESS;         // the first failure of queued work
std::map<uintptr_t, size_t> pinned;     // cuMemHostAlloc blocks: start, bytes

struct Event {
    std::shared_ptr<double> ms;  // set when the record runs (shared with the queued record)
    Stream* stream = nullptr;    // the last record's stream and position
    long at = 0;
};

Stream* stream_of(CUstream s) {
    const uintptr_t h = (uintptr_t)s;
    return h <= 2 ? &legacy : static_cast<Stream*>(s);
}

// CLT_EMU_STREAMS: "deferred" (the default), "eager" (everything at the call), or "side-first" (the
// streams a program creates run at the call, the legacy default stream, the compute stream, deferred: a
// copy or collective on a side stream then runs as early as its waits allow, before compute work queued
// earlier that nothing has waited for).
int mode() {
    static const int m = [] {
        const char* v = getenv("CLT_EMU_STREAMS");
        if (v && std::strcmp(v, "eager") == 0) return 1;
        if (v && std::strcmp(v, "side-first") == 0) return 2;
        return 0;
    }();
    return m;
}
bool eager() { return mode() == 1; }

CUresult run_until(Stream* s, long at);

// Queues `f` on `s` (after the implicit waits of the legacy stream's semantics); returns its position.
// Eager: runs the stream at once.
long enqueue(Stream* s, std::function<CUresult()> f) {
    if (s == &legacy) {
        std::vector<std::pair<Stream*, long>> before;
        for (Stream* b : streams)
            if (b->blocking && b->queued > b->done) before.push_back({b, b->queued});
        if (!before.empty()) {
            s->q.push_back([before] {
                for (auto& [b, at] : before) run_until(b, at);
                return CUDA_SUCCESS;
            });
            ++s->queued;
        }
    } else if (s->blocking && legacy.queued > legacy.done) {
        const long at = legacy.queued;
        s->q.push_back([at] { return run_until(&legacy, at); });
        ++s->queued;
    }
    s->q.push_back(std::move(f));
    const long at = ++s->queued;
    if (eager() || (mode() == 2 && s != &legacy)) run_until(s, at);
    return at;
}

// Runs `s`'s queued work up to position `at`; returns the sticky failure, if any.
CUresult run_until(Stream* s, long at) {
    while (s->done < at && !s->q.empty()) {
        std::function<CUresult()> f = std::move(s->q.front());
        s->q.pop_front();
        ++s->done;
        const CUresult r = f();
        if (r != CUDA_SUCCESS && sticky == CUDA_SUCCESS) sticky = r;
    }
    return sticky;
}

CUresult run_all(Stream* s) { return run_until(s, s->queued); }

CUresult run_everything() {
    run_all(&legacy);
    for (Stream* s : streams) run_all(s);
    return sticky;
}

bool is_pinned(const void* p, size_t n) {
    auto it = pinned.upper_bound((uintptr_t)p);
    if (it == pinned.begin()) return false;
    --it;
    return (uintptr_t)p + n <= it->first + it->second;
}

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
    std::lock_guard<std::recursive_mutex> g(M);
    allocs[(uintptr_t)start] = Alloc{bytes, m, len};
    *p = (CUdeviceptr)(uintptr_t)start;
    return CUDA_SUCCESS;
}

CUresult release(CUdeviceptr p) {
    std::lock_guard<std::recursive_mutex> g(M);
    auto it = allocs.find((uintptr_t)p);
    if (it == allocs.end()) return fail(CUDA_ERROR_INVALID_VALUE, "cuMemFree of an address that is not an allocation");
    munmap(it->second.map, it->second.map_len);
    allocs.erase(it);
    return CUDA_SUCCESS;
}

CUresult copy(void* dst, const void* src, size_t n, bool dst_dev, bool src_dev, const char* what) {
    {
        std::lock_guard<std::recursive_mutex> g(M);
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
        std::lock_guard<std::recursive_mutex> g(M);
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
// The compute capability the emulated device reports, as 10 major + minor: 9.0 (an H100's), or
// CLT_EMU_CC ("8.0", say) to run the tests as a device without Hopper's instructions would (the wgmma
// kernels refused with an error, their tests skipped).
static int emu_cc() {
    const char* e = getenv("CLT_EMU_CC");
    int major = 9, minor = 0;
    if (e && sscanf(e, "%d.%d", &major, &minor) < 1) major = 9;
    return 10 * major + minor;
}

// The multiprocessors the emulated device reports: 1 (CLT_EMU_SMS overrides), so that a persistent grid
// (one block an SM, encode_wgmma_tma) runs every tile in one block, looping, on the tests' small shapes.
static int emu_sms() {
    const char* e = getenv("CLT_EMU_SMS");
    const int n = e ? atoi(e) : 1;
    return n > 0 ? n : 1;
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
        case 16: *v = emu_sms(); break;         // multiprocessors
        case 75: *v = emu_cc() / 10; break;     // compute capability major (9, or CLT_EMU_CC's)
        case 76: *v = emu_cc() % 10; break;     // minor
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
CUresult cuCtxSynchronize() {
    std::lock_guard<std::recursive_mutex> g(M);
    return run_everything();
}
CUresult cuCtxGetStreamPriorityRange(int* least, int* greatest) {
    *least = 0;
    *greatest = 0;
    return CUDA_SUCCESS;
}
CUresult cuCtxSetFlags(unsigned) { return CUDA_SUCCESS; }

CUresult cuStreamCreate(CUstream* s, unsigned flags) {
    std::lock_guard<std::recursive_mutex> g(M);
    auto* st = new Stream((flags & 1) == 0);  // CU_STREAM_NON_BLOCKING = 1
    streams.insert(st);
    *s = st;
    return CUDA_SUCCESS;
}
CUresult cuStreamCreateWithPriority(CUstream* s, unsigned f, int) { return cuStreamCreate(s, f); }
// The stream's queued work still runs (as in CUDA); the object is kept, drained, so that events recorded on
// it stay valid.
CUresult cuStreamDestroy_v2(CUstream s) {
    std::lock_guard<std::recursive_mutex> g(M);
    Stream* st = stream_of(s);
    run_all(st);
    if (st != &legacy) streams.erase(st);
    return CUDA_SUCCESS;
}
CUresult cuStreamSynchronize(CUstream s) {
    std::lock_guard<std::recursive_mutex> g(M);
    return run_all(stream_of(s));
}
CUresult cuStreamQuery(CUstream s) { return cuStreamSynchronize(s); }
CUresult cuStreamWaitEvent(CUstream s, CUevent e, unsigned) {
    std::lock_guard<std::recursive_mutex> g(M);
    const Event* ev = static_cast<Event*>(e);
    if (!ev->stream) return CUDA_SUCCESS;  // never recorded: nothing to wait for
    Stream* other = ev->stream;
    const long at = ev->at;
    enqueue(stream_of(s), [other, at] { return run_until(other, at); });
    return CUDA_SUCCESS;
}
CUresult cuStreamIsCapturing(CUstream, int* status) {
    *status = 0;
    return CUDA_SUCCESS;
}
CUresult cuLaunchHostFunc(CUstream s, void (*fn)(void*), void* data) {
    std::lock_guard<std::recursive_mutex> g(M);
    enqueue(stream_of(s), [fn, data] {
        fn(data);
        return CUDA_SUCCESS;
    });
    return CUDA_SUCCESS;
}

CUresult cuEventCreate(CUevent* e, unsigned) {
    auto* ev = new Event;
    ev->ms = std::make_shared<double>(now_ms());
    *e = ev;
    return CUDA_SUCCESS;
}
CUresult cuEventDestroy_v2(CUevent e) {
    std::lock_guard<std::recursive_mutex> g(M);
    delete static_cast<Event*>(e);  // a queued record keeps its own reference to the time
    return CUDA_SUCCESS;
}
CUresult cuEventRecord(CUevent e, CUstream s) {
    std::lock_guard<std::recursive_mutex> g(M);
    Event* ev = static_cast<Event*>(e);
    auto ms = std::make_shared<double>(0.0);
    ev->ms = ms;
    ev->stream = stream_of(s);
    ev->at = enqueue(ev->stream, [ms] {
        *ms = now_ms();
        return CUDA_SUCCESS;
    });
    return CUDA_SUCCESS;
}
CUresult cuEventSynchronize(CUevent e) {
    std::lock_guard<std::recursive_mutex> g(M);
    const Event* ev = static_cast<Event*>(e);
    return ev->stream ? run_until(ev->stream, ev->at) : sticky;
}
CUresult cuEventQuery(CUevent e) { return cuEventSynchronize(e); }
CUresult cuEventElapsedTime(float* ms, CUevent a, CUevent b) {
    cuEventSynchronize(a);
    if (const CUresult r = cuEventSynchronize(b)) return r;
    *ms = (float)(*static_cast<Event*>(b)->ms - *static_cast<Event*>(a)->ms);
    return CUDA_SUCCESS;
}
CUresult cuEventElapsedTime_v2(float* ms, CUevent a, CUevent b) { return cuEventElapsedTime(ms, a, b); }

CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) { return alloc(p, bytes); }
CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, CUstream) { return alloc(p, bytes); }
// A synchronous free waits for all queued work (it may still use the memory); a stream-ordered one is
// queued.
CUresult cuMemFree_v2(CUdeviceptr p) {
    std::lock_guard<std::recursive_mutex> g(M);
    run_everything();
    return release(p);
}
CUresult cuMemFreeAsync(CUdeviceptr p, CUstream s) {
    std::lock_guard<std::recursive_mutex> g(M);
    if (!allocs.count((uintptr_t)p)) return fail(CUDA_ERROR_INVALID_VALUE, "cuMemFreeAsync of an address that is not an allocation");
    enqueue(stream_of(s), [p] { return release(p); });
    return CUDA_SUCCESS;
}
// The device's default memory pool: one handle, and of its attributes only the release threshold
// (CU_MEMPOOL_ATTR_RELEASE_THRESHOLD = 4, a cuuint64_t; 0 by default, as on the GPU), which the backend sets
// and a test reads back. The emulator's allocations never go back to a driver, whatever it says.
static uint64_t pool_release_threshold = 0;
static int default_pool_handle = 0;
CUresult cuDeviceGetDefaultMemPool(void** pool, CUdevice d) {
    if (d != 0) return fail(CUDA_ERROR_INVALID_VALUE, "cuDeviceGetDefaultMemPool of a device that is not 0");
    *pool = &default_pool_handle;
    return CUDA_SUCCESS;
}
CUresult cuMemPoolSetAttribute(void* pool, int attr, void* value) {
    if (pool != &default_pool_handle) return fail(CUDA_ERROR_INVALID_VALUE, "cuMemPoolSetAttribute of an unknown pool");
    if (attr != 4) return fail(CUDA_ERROR_INVALID_VALUE, "cuMemPoolSetAttribute: only the release threshold (4) is emulated");
    std::memcpy(&pool_release_threshold, value, sizeof pool_release_threshold);
    return CUDA_SUCCESS;
}
CUresult cuMemPoolGetAttribute(void* pool, int attr, void* value) {
    if (pool != &default_pool_handle) return fail(CUDA_ERROR_INVALID_VALUE, "cuMemPoolGetAttribute of an unknown pool");
    if (attr != 4) return fail(CUDA_ERROR_INVALID_VALUE, "cuMemPoolGetAttribute: only the release threshold (4) is emulated");
    std::memcpy(value, &pool_release_threshold, sizeof pool_release_threshold);
    return CUDA_SUCCESS;
}
CUresult cuMemHostAlloc(void** p, size_t bytes, unsigned) {
    if (posix_memalign(p, 256, bytes == 0 ? 1 : bytes) != 0) return CUDA_ERROR_OUT_OF_MEMORY;
    std::lock_guard<std::recursive_mutex> g(M);
    pinned[(uintptr_t)*p] = bytes;
    return CUDA_SUCCESS;
}
CUresult cuMemAllocHost_v2(void** p, size_t bytes) { return cuMemHostAlloc(p, bytes, 0); }
CUresult cuMemFreeHost(void* p) {
    std::lock_guard<std::recursive_mutex> g(M);
    run_everything();  // queued copies may still read or write it
    pinned.erase((uintptr_t)p);
    free(p);
    return CUDA_SUCCESS;
}

// A copy queued on `s`: checked against the allocations now, and again when it runs (a stream-ordered
// free may come first). From pageable host memory the bytes are taken now; to pageable host memory the call
// returns once the copy has run; pinned memory is read or written when the copy runs. `sync`: the call
// returns once the copy has run (the synchronous copies, on the legacy stream).
CUresult queue_copy(void* dst, const void* src, size_t n, bool dst_dev, bool src_dev, const char* what, CUstream s,
                    bool sync) {
    std::lock_guard<std::recursive_mutex> g(M);
    if (dst_dev && !device_range((CUdeviceptr)(uintptr_t)dst, n))
        return fail(CUDA_ERROR_INVALID_VALUE, std::string(what) + ": destination outside any device allocation");
    if (src_dev && !device_range((CUdeviceptr)(uintptr_t)src, n))
        return fail(CUDA_ERROR_INVALID_VALUE, std::string(what) + ": source outside any device allocation");
    std::shared_ptr<std::vector<char>> staged;
    if (!src_dev && !is_pinned(src, n)) {
        staged = std::make_shared<std::vector<char>>(static_cast<const char*>(src), static_cast<const char*>(src) + n);
        src = staged->data();
    }
    const bool wait = sync || (!dst_dev && !is_pinned(dst, n));
    Stream* st = stream_of(s);
    const long at = enqueue(st, [=] { return copy(dst, src, n, dst_dev, src_dev && !staged, what); });
    return wait ? run_until(st, at) : CUDA_SUCCESS;
}

CUresult queue_memset(CUdeviceptr p, unsigned char v, size_t n, CUstream s, bool sync) {
    std::lock_guard<std::recursive_mutex> g(M);
    if (!device_range(p, n)) return fail(CUDA_ERROR_INVALID_VALUE, "cuMemsetD8 outside any device allocation");
    Stream* st = stream_of(s);
    const long at = enqueue(st, [=] { return memset8(p, v, n); });
    return sync ? run_until(st, at) : CUDA_SUCCESS;
}

CUresult cuMemcpyHtoD_v2(CUdeviceptr d, const void* h, size_t n) {
    return queue_copy((void*)(uintptr_t)d, h, n, true, false, "cuMemcpyHtoD", nullptr, true);
}
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr d, const void* h, size_t n, CUstream s) {
    return queue_copy((void*)(uintptr_t)d, h, n, true, false, "cuMemcpyHtoDAsync", s, false);
}
CUresult cuMemcpyDtoH_v2(void* h, CUdeviceptr d, size_t n) {
    return queue_copy(h, (const void*)(uintptr_t)d, n, false, true, "cuMemcpyDtoH", nullptr, true);
}
CUresult cuMemcpyDtoHAsync_v2(void* h, CUdeviceptr d, size_t n, CUstream s) {
    return queue_copy(h, (const void*)(uintptr_t)d, n, false, true, "cuMemcpyDtoHAsync", s, false);
}
CUresult cuMemcpyDtoD_v2(CUdeviceptr d, CUdeviceptr src, size_t n) {
    return queue_copy((void*)(uintptr_t)d, (const void*)(uintptr_t)src, n, true, true, "cuMemcpyDtoD", nullptr, true);
}
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr d, CUdeviceptr src, size_t n, CUstream s) {
    return queue_copy((void*)(uintptr_t)d, (const void*)(uintptr_t)src, n, true, true, "cuMemcpyDtoDAsync", s, false);
}
CUresult cuMemsetD8_v2(CUdeviceptr p, unsigned char v, size_t n) { return queue_memset(p, v, n, nullptr, true); }
CUresult cuMemsetD8Async(CUdeviceptr p, unsigned char v, size_t n, CUstream s) {
    return queue_memset(p, v, n, s, false);
}

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

// The launch is checked now and queued with a copy of its parameter struct; it runs when its stream's
// work is needed. A failure is the result of the call that ran it (and sticky).
CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned shared, CUstream s, void** params, void** extra) {
    if (!f || !params || extra) return CUDA_ERROR_INVALID_VALUE;
    const Function* fn = static_cast<Function*>(f);
    std::lock_guard<std::recursive_mutex> g(M);
    if ((int)shared > fn->max_dynamic_shared)
        return fail(CUDA_ERROR_INVALID_VALUE, "kernel " + fn->k->name + ": dynamic shared memory over its limit");
    const clt_emu::Kernel* k = fn->k;
    auto p = std::make_shared<std::vector<unsigned char>>(static_cast<const unsigned char*>(params[0]),
                                                          static_cast<const unsigned char*>(params[0]) + k->param_size);
    const dim3 grid{gx, gy, gz}, block{bx, by, bz};
    Stream* st = stream_of(s);
    const long at = enqueue(st, [=]() -> CUresult {
        const std::string e = clt_emu::run(*k, p->data(), grid, block, shared);
        if (e.empty()) return CUDA_SUCCESS;
        last_launch_error = "clt-emu: " + e;
        return fail(CUDA_ERROR_LAUNCH_FAILED, e);
    });
    // Eager: the launch has run; report its failure here, as before.
    return eager() ? run_until(st, at) : CUDA_SUCCESS;
}

// A tensor map for the Tensor Memory Accelerator (kernels/wgmma.cuh's tma_load_2d), checked as the driver
// documents and written as the emulator's TensorMap (runtime.h). The emulator models what the crate uses:
// rank 2, no interleave, element strides 1, zeros outside the tensor; anything else is refused by name.
CUresult cuTensorMapEncodeTiled(void* map, int dtype, unsigned rank, void* global, const uint64_t* dim,
                                const uint64_t* strides, const unsigned* box, const unsigned* elem_strides,
                                int interleave, int swizzle, int l2_promotion, int oob_fill) {
    static const unsigned elem_bytes[] = {1, 2, 4, 4, 8, 8, 2, 4, 8, 2, 4, 4, 4};  // CUtensorMapDataType 0..12
    if (!map || (uintptr_t)map % 64 != 0)
        return fail(CUDA_ERROR_INVALID_VALUE, "cuTensorMapEncodeTiled: the tensor map is not 64-byte aligned");
    if (dtype < 0 || dtype > 12) return fail(CUDA_ERROR_INVALID_VALUE, "cuTensorMapEncodeTiled: unknown data type");
    if (rank != 2 || interleave != 0 || oob_fill != 0 || !elem_strides || elem_strides[0] != 1 ||
        elem_strides[1] != 1)
        return fail(CUDA_ERROR_NOT_SUPPORTED,
                    "cuTensorMapEncodeTiled: the emulator models rank 2, no interleave, element strides 1 and "
                    "zero fill only");
    if (swizzle < 0 || swizzle > 3 || l2_promotion < 0 || l2_promotion > 3)
        return fail(CUDA_ERROR_INVALID_VALUE, "cuTensorMapEncodeTiled: unknown swizzle or L2 promotion");
    const unsigned elem = elem_bytes[dtype], span = swizzle == 0 ? 0 : 16u << swizzle;
    if ((uintptr_t)global % 16 != 0)
        return fail(CUDA_ERROR_INVALID_VALUE, "cuTensorMapEncodeTiled: the global address is not 16-byte aligned");
    for (int i = 0; i < 2; ++i)
        if (dim[i] == 0 || dim[i] > (1ull << 32) || box[i] == 0 || box[i] > 256)
            return fail(CUDA_ERROR_INVALID_VALUE,
                        "cuTensorMapEncodeTiled: a dimension outside 1..2^32 or a box side outside 1..256");
    if (strides[0] % 16 != 0 || strides[0] >= (1ull << 40))
        return fail(CUDA_ERROR_INVALID_VALUE,
                    "cuTensorMapEncodeTiled: the row stride is not a multiple of 16 bytes under 2^40");
    if (box[0] * elem % 16 != 0)
        return fail(CUDA_ERROR_INVALID_VALUE, "cuTensorMapEncodeTiled: the box's rows are not multiples of 16 bytes");
    if (span != 0 && box[0] * elem > span)
        return fail(CUDA_ERROR_INVALID_VALUE, "cuTensorMapEncodeTiled: the box's rows are longer than the swizzle");
    {
        std::lock_guard<std::recursive_mutex> g(M);
        const uint64_t extent = (dim[1] - 1) * strides[0] + dim[0] * elem;
        if (!device_range((CUdeviceptr)(uintptr_t)global, extent))
            return fail(CUDA_ERROR_INVALID_VALUE,
                        "cuTensorMapEncodeTiled: the tensor is not inside one device allocation");
    }
    clt_emu::TensorMap t{};
    t.magic = clt_emu::kTensorMapMagic;
    t.base = static_cast<const char*>(global);
    t.dim[0] = dim[0];
    t.dim[1] = dim[1];
    t.stride = strides[0];
    t.box[0] = box[0];
    t.box[1] = box[1];
    t.elem = elem;
    t.swizzle = span;
    std::memset(map, 0, 128);
    std::memcpy(map, &t, sizeof t);
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
