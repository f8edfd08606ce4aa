// The CPU emulator's NCCL: the calls src/dist/nccl.rs makes (through cudarc) over host memory, built as
// target/emu/libnccl.so by scripts/build-emu.sh. Ranks are processes (under mpirun), so an all-reduce goes
// through files: the communicator is a folder in /dev/shm named by the unique id rank 0 made (and MPI
// broadcast); for its n-th all-reduce each rank writes its buffer as n.<rank> (written whole, then renamed
// into place), waits until every rank's is there, and sums them in rank order, so every rank gets the same
// bits. A rank's files of all-reduce n are removed at all-reduce n + 1 (by then every rank has read them,
// since every rank's n + 1 file exists) or when the communicator is destroyed. A peer that never writes
// its file makes the call fail after CLT_EMU_NCCL_TIMEOUT_S seconds (default 60) instead of hanging.
// Only float32 sums (what the crate uses); anything else is ncclInvalidArgument.
//
// Streams: the emulated driver defers each stream's work (driver.cc). An all-reduce first runs its stream's
// queued work (so the send buffer holds what stream order says it holds: if the stream was not made to wait
// for the kernel that writes it, that kernel has not run), exchanges at once, and queues the write of the
// sum into the receive buffer on the stream, so that work on another stream that reads the result without
// waiting for the all-reduce (an event) reads the old contents.
#include <sys/stat.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "driver_calls.h"

namespace {
enum : int { ncclSuccess = 0, ncclSystemError = 2, ncclInvalidArgument = 4, ncclInvalidUsage = 5 };
constexpr int ncclFloat32 = 7, ncclSum = 0;

struct Comm {
    std::string dir;
    int nranks, rank;
    long seq = 0;
};

std::string file(const Comm& c, long seq, int rank) { return c.dir + "/" + std::to_string(seq) + "." + std::to_string(rank); }

bool exists(const std::string& p) {
    struct stat st;
    return stat(p.c_str(), &st) == 0;
}

int fail(int code, const std::string& what) {
    fprintf(stderr, "clt-emu nccl: %s\n", what.c_str());
    return code;
}

// The sum, waiting on the stream to be written into the receive buffer.
struct Result {
    void* recv;
    std::vector<float> sum;
};
void write_result(void* p) {
    Result* r = static_cast<Result*>(p);
    std::memcpy(r->recv, r->sum.data(), r->sum.size() * 4);
    delete r;
}
int deliver(void* recv, std::vector<float> sum, void* stream) {
    const auto& d = clt_emu_driver::calls();
    auto* r = new Result{recv, std::move(sum)};
    if (!d.host_func || d.host_func(stream, write_result, r) != 0) write_result(r);
    return ncclSuccess;
}
}  // namespace

extern "C" {

struct ncclUniqueId {
    char internal[128];
};

int ncclGetVersion(int* v) {
    *v = 22800;
    return ncclSuccess;
}

int ncclGetUniqueId(ncclUniqueId* id) {
    std::random_device rd;
    std::memset(id->internal, 0, sizeof id->internal);
    snprintf(id->internal, sizeof id->internal, "%08x%08x%08x", rd(), rd(), (unsigned)getpid());
    return ncclSuccess;
}

int ncclCommInitRank(void** comm, int nranks, ncclUniqueId id, int rank) {
    if (nranks < 1 || rank < 0 || rank >= nranks) return ncclInvalidArgument;
    char name[129];
    std::memcpy(name, id.internal, 128);
    name[128] = 0;
    for (const char* p = name; *p; ++p)
        if (!isxdigit((unsigned char)*p)) return fail(ncclInvalidArgument, "unique id not made by this emulator");
    auto* c = new Comm{std::string("/dev/shm/clt-nccl-") + name, nranks, rank};
    if (nranks > 1 && mkdir(c->dir.c_str(), 0700) != 0 && errno != EEXIST) {
        delete c;
        return fail(ncclSystemError, "cannot create the communicator's folder in /dev/shm");
    }
    *comm = c;
    return ncclSuccess;
}

int ncclCommCount(const void* comm, int* n) {
    *n = static_cast<const Comm*>(comm)->nranks;
    return ncclSuccess;
}
int ncclCommUserRank(const void* comm, int* r) {
    *r = static_cast<const Comm*>(comm)->rank;
    return ncclSuccess;
}
int ncclCommCuDevice(const void*, int* d) {
    *d = 0;
    return ncclSuccess;
}
int ncclGroupStart() { return ncclSuccess; }
int ncclGroupEnd() { return ncclSuccess; }

int ncclAllReduce(const void* send, void* recv, size_t count, int type, int op, void* comm, void* stream) {
    if (type != ncclFloat32 || op != ncclSum) return fail(ncclInvalidArgument, "only float32 sums are emulated");
    Comm& c = *static_cast<Comm*>(comm);
    const size_t bytes = count * 4;
    if (!clt_emu_driver::drain(stream)) return fail(ncclSystemError, "the stream's earlier work failed");
    if (c.nranks == 1) {
        const float* s = static_cast<const float*>(send);
        return deliver(recv, std::vector<float>(s, s + count), stream);
    }
    const long seq = c.seq++;
    const std::string mine = file(c, seq, c.rank), tmp = mine + ".tmp";
    FILE* f = fopen(tmp.c_str(), "wb");
    if (!f || fwrite(send, 1, bytes, f) != bytes || fclose(f) != 0 || rename(tmp.c_str(), mine.c_str()) != 0)
        return fail(ncclSystemError, "cannot write " + mine);
    const char* t = getenv("CLT_EMU_NCCL_TIMEOUT_S");
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(t ? atoi(t) : 60);
    for (int r = 0; r < c.nranks; ++r)
        while (!exists(file(c, seq, r))) {
            if (std::chrono::steady_clock::now() > deadline)
                return fail(ncclSystemError, "rank " + std::to_string(r) + " did not join all-reduce " +
                                                 std::to_string(seq) + " in time");
            std::this_thread::sleep_for(std::chrono::milliseconds(1));
        }
    // Every rank has reached this all-reduce, so all have finished reading the previous one.
    if (seq > 0) unlink(file(c, seq - 1, c.rank).c_str());
    std::vector<float> sum(count, 0.f), part(count);
    for (int r = 0; r < c.nranks; ++r) {
        FILE* in = fopen(file(c, seq, r).c_str(), "rb");
        const bool ok = in && fread(part.data(), 1, bytes, in) == bytes;
        if (in) fclose(in);
        if (!ok) return fail(ncclSystemError, "cannot read " + file(c, seq, r) + " (a different count on that rank?)");
        for (size_t i = 0; i < count; ++i) sum[i] += part[i];
    }
    return deliver(recv, std::move(sum), stream);
}

// Destroying: the last all-reduce's file may still be read by a slower rank; leave it to the folder's
// owner, rank 0, which removes what is left once every rank's last file is gone or after a short wait.
static int destroy(void* comm) {
    Comm* c = static_cast<Comm*>(comm);
    if (c->nranks > 1) {
        const std::string done = c->dir + "/done." + std::to_string(c->rank);
        if (FILE* f = fopen(done.c_str(), "wb")) fclose(f);
        if (c->rank == 0) {
            const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
            for (int r = 0; r < c->nranks; ++r)
                while (!exists(c->dir + "/done." + std::to_string(r)) && std::chrono::steady_clock::now() < deadline)
                    std::this_thread::sleep_for(std::chrono::milliseconds(1));
            for (long s = c->seq - 1; s < c->seq; ++s)
                for (int r = 0; r < c->nranks && s >= 0; ++r) unlink(file(*c, s, r).c_str());
            for (int r = 0; r < c->nranks; ++r) unlink((c->dir + "/done." + std::to_string(r)).c_str());
            rmdir(c->dir.c_str());
        }
    }
    delete c;
    return ncclSuccess;
}
int ncclCommDestroy(void* comm) { return destroy(comm); }
int ncclCommAbort(void* comm) { return destroy(comm); }
int ncclCommFinalize(void*) { return ncclSuccess; }

const char* ncclGetErrorString(int code) {
    switch (code) {
        case ncclSuccess: return "no error";
        case ncclSystemError: return "system error (emulator: see its message on stderr)";
        case ncclInvalidArgument: return "invalid argument";
        default: return "error in the emulated NCCL";
    }
}

}  // extern "C"
