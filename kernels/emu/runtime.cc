// The CPU emulator's grid runner: each thread of a block is a fiber (its own stack) on the calling host thread.
// Blocks run one after another; within a block, warp after warp runs as far as it can (its lanes in order,
// each until it reaches a block barrier, a warp collective, or its end; a collective is released, with
// every lane's result computed at once as the hardware does, as soon as all 32 lanes wait at it), and the
// block barrier is released when every live thread waits at it. Anything else that stops progress is a
// deadlock, reported with each thread's state, and so are collectives that not every lane of a warp
// reaches, misaligned cp.async/ldmatrix addresses, and addresses outside shared memory.
//
// Shared memory starts each block filled with 0xFF bytes, and the launches take turns through eight
// schedules (warps first to last or last to first; cp.async copies landing when issued or only when the
// thread waits for them; blocks first to last or last to first), so a missing __syncthreads or cp.async
// wait shows up as poison in the results, and a kernel that relies on the order of its blocks fails.
//
// What the emulator checks is the kernels' logic: indexing, synchronisation within a block, the warp-level
// data movement, the fragment layouts of ldmatrix, mma.sync and wgmma (from the PTX ISA), cp.async's group
// semantics (copies land only when the thread waits for them), and wgmma's (products computed only when the
// thread waits for them, from shared memory made visible to the async proxy by fence.proxy.async). It does not model timing, the memory
// model across blocks (blocks run one after another), or streams (every call is synchronous).
#include "runtime.h"

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <unordered_map>
#include <sstream>
#include <vector>

// The linker's bounds of the clt_shared section, which holds every kernel's __shared__ statics.
extern "C" char __start_clt_shared[];
extern "C" char __stop_clt_shared[];

// Switching fibers: save the callee-saved registers and the floating-point control words on the current
// stack, store its pointer in *save, load `to` and restore the same from there. (ucontext's swapcontext
// also saves the signal mask, a system call each way; with get/setcontext that was 84% of the emulator's
// time under perf.)
extern "C" void clt_emu_switch(void** save, void* to);
#if defined(__x86_64__)
asm(R"(
    .text
    .globl clt_emu_switch
    .hidden clt_emu_switch
    .type clt_emu_switch, @function
clt_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size clt_emu_switch, .-clt_emu_switch
)");
#else
#error "the CUDA emulator's fiber switch is written for x86-64"
#endif

namespace clt_emu {

uint3 thread_idx, block_idx;
dim3 block_dim, grid_dim;

namespace {

std::map<std::string, Kernel>& registry() {
    static std::map<std::string, Kernel> r;
    return r;
}

enum class St { Ready, Block, Warp, Done, Failed, Mbar };
// Op::Converge: a .sync.aligned instruction with no data between lanes (wgmma.wait_group, __syncwarp): the
// warp's lanes pass it together, as on the GPU, where it executes converged.
enum class Op { Shfl, Ldmatrix, Mma, Converge };

struct Copy {
    char* dst;
    const char* src;
    uint32_t n;
};

// A queued wgmma.mma_async: the thread's accumulators (n / 2 floats), the descriptors of A and B.
struct Wgmma {
    float* d;
    int n;
    uint64_t da, db;
};

// An mbarrier (kernels/wgmma.cuh): arrivals a phase, those still to come, transaction bytes still to come
// (negative when copies landed before the bytes were announced), completed phases, the initialising thread,
// and whether that thread has made it visible to the async proxy (fence.mbarrier_init) since.
struct Mbar {
    uint32_t count, pending;
    int64_t tx;
    uint32_t phase;
    size_t init_thread;
    bool visible;
};

// A bulk-tensor copy issued and not landed yet: destination, the tensor map (copied at the issue), its
// coordinates, and the barrier it completes on.
struct Tma {
    uint32_t dst;
    TensorMap map;
    int c0, c1;
    uint32_t bar;
};

struct Fiber {
    void* sp;  // the saved stack pointer while switched out
    St st;
    uint3 tid;
    // The warp collective this thread waits at: its arguments, then its result.
    Op op;
    Shfl shfl;
    uint64_t val;
    int arg;
    uint32_t addr;  // also the mbarrier a thread waits at (St::Mbar), with the parity in `arg`
    // The block barrier a thread waits at (St::Block): its id and thread count (0: every live thread, as
    // __syncthreads).
    uint32_t bar_id, bar_n;
    uint32_t a[4], b[2];
    float c[4];
    uint64_t res;
    uint32_t r4[4];
    float d[4];
    // cp.async: the copies not yet committed, and the committed groups not yet waited for.
    std::vector<Copy> open;
    std::vector<std::vector<Copy>> groups;
    // wgmma: the products not yet committed, the committed groups not yet waited for, whether a wgmma.fence
    // came since the last wait, and the 16-byte chunks its cp.async copies wrote since its last
    // fence.proxy.async.
    std::vector<Wgmma> wg_open;
    std::vector<std::vector<Wgmma>> wg_groups;
    bool wg_fenced;
    std::vector<uintptr_t> unfenced;
};

constexpr size_t kStack = 256 * 1024;
constexpr size_t kDynamicMax = 227 * 1024;  // an H100's shared memory per block

struct State {
    const Kernel* k = nullptr;
    const void* params = nullptr;
    std::vector<Fiber> fibers;
    size_t cur = 0;
    void* main_sp = nullptr;
    std::string error;
    size_t dyn_bytes = 0;
    // The schedule (see run): warps in reverse order; cp.async copies land when issued instead of when
    // waited for.
    bool reverse_warps = false;
    bool eager_copies = false;
    // Bulk-tensor copies, when not at the issue: at the next block barrier any thread reaches (a moment in
    // between), else only when a thread waits for them (the latest).
    bool tma_at_barrier = false;
    bool reverse_blocks = false;
    // Shared 16-byte chunks written by a cp.async whose thread has not run fence.proxy.async since: the
    // async proxy (wgmma) may not read them yet. Chunk address -> the writing thread.
    std::unordered_map<uintptr_t, size_t> unfenced;
    // The block's mbarriers by shared address, and its bulk-tensor copies in flight, in issue order.
    std::map<uint32_t, Mbar> mbars;
    std::vector<Tma> tmas;
    // The barrier whose phase the running thread just completed while others wait for it (run_woken).
    uint32_t woken = 0xFFFFFFFFu;
};
constexpr uint32_t kNoBarrier = 0xFFFFFFFFu;
unsigned launches = 0;
State S;

// Dynamic shared memory: a launch's bytes (rounded up to 16) end where a guard page begins, so a kernel
// that runs off the end of its dynamic shared memory faults and is named (on the GPU: an out-of-range
// shared address), whatever instruction it uses.
constexpr size_t kDynRegion = (kDynamicMax + 4095) / 4096 * 4096;
char* dyn_region = nullptr;  // kDynRegion bytes, then the guard page; kept from launch to launch
char* dynamic = nullptr;     // this launch's dynamic shared memory, inside dyn_region

bool reserve_dynamic() {
    if (dyn_region) return true;
    void* m = mmap(nullptr, kDynRegion + 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return false;
    dyn_region = static_cast<char*>(m);
    return mprotect(dyn_region + kDynRegion, 4096, PROT_NONE) == 0;
}

Fiber& me() { return S.fibers[S.cur]; }

// Fiber stacks, each above a guard page, kept from launch to launch.
char* stacks = nullptr;
size_t n_stacks = 0;

char* stack_top(size_t i) { return stacks + (i + 1) * (kStack + 4096); }

bool reserve_stacks(size_t n) {
    if (n <= n_stacks) return true;
    if (stacks) munmap(stacks, n_stacks * (kStack + 4096));
    void* m = mmap(nullptr, n * (kStack + 4096), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (m == MAP_FAILED) {
        stacks = nullptr;
        n_stacks = 0;
        return false;
    }
    stacks = static_cast<char*>(m);
    n_stacks = n;
    for (size_t i = 0; i < n; ++i) mprotect(stacks + i * (kStack + 4096), 4096, PROT_NONE);
    return true;
}

void land(const Copy& c) {
    std::memcpy(c.dst, c.src, c.n);
    std::memset(c.dst + c.n, 0, 16 - c.n);
    const uintptr_t chunk = reinterpret_cast<uintptr_t>(c.dst);
    S.unfenced[chunk] = S.cur;
    S.fibers[S.cur].unfenced.push_back(chunk);
}

void yield() {
    Fiber& f = me();
    clt_emu_switch(&f.sp, S.main_sp);
}

// A fiber's first frame: runs the kernel, then hands back to the scheduler for good.
[[noreturn]] void entry() {
    S.k->thunk(S.k->fn, S.params);
    Fiber& f = me();
    if (!f.wg_open.empty() || !f.wg_groups.empty()) fail("the thread exits with wgmma products not waited for");
    f.st = St::Done;
    clt_emu_switch(&f.sp, S.main_sp);
    __builtin_unreachable();
}

// A new fiber's stack as clt_emu_switch leaves one: control words, six registers, then the return address
// (entry), placed so that entry starts with the stack aligned as after a call.
void* fresh_stack(size_t i) {
    uintptr_t top = reinterpret_cast<uintptr_t>(stack_top(i)) & ~(uintptr_t)15;
    void** sp = reinterpret_cast<void**>(top);
    *--sp = nullptr;                              // entry's (never used) return address slot
    *--sp = reinterpret_cast<void*>(&entry);      // at an address = 0 mod 16: entry starts at 8 mod 16
    for (int r = 0; r < 6; ++r) *--sp = nullptr;  // rbp, rbx, r12..r15
    uint32_t* cw = reinterpret_cast<uint32_t*>(--sp);
    cw[0] = 0x1f80;  // MXCSR: round to nearest, all exceptions masked
    cw[1] = 0x037f;  // x87 control word
    return sp;
}

std::string where(const Fiber& f) {
    std::ostringstream o;
    o << "kernel " << S.k->name << ", block (" << block_idx.x << ", " << block_idx.y << ", " << block_idx.z
      << "), thread (" << f.tid.x << ", " << f.tid.y << ", " << f.tid.z << ")";
    return o.str();
}

// A fault inside a kernel (a wild pointer) kills the process as an illegal address would kill the CUDA
// context; say where it happened first.
struct sigaction old_segv, old_bus;
void on_fault(int sig, siginfo_t* info, void*) {
    char buf[512];
    int n = snprintf(buf, sizeof buf, "clt-emu: %s at address %p in kernel %s, block (%u, %u, %u), thread (%u, %u, %u)\n",
                     sig == SIGSEGV ? "segmentation fault" : "bus error", info->si_addr,
                     S.k ? S.k->name.c_str() : "?", block_idx.x, block_idx.y, block_idx.z, thread_idx.x,
                     thread_idx.y, thread_idx.z);
    if (n > 0) (void)!write(2, buf, (size_t)n);
    sigaction(SIGSEGV, &old_segv, nullptr);
    sigaction(SIGBUS, &old_bus, nullptr);
}

void combine(std::vector<Fiber*>& lanes) {
    const Fiber& l0 = *lanes[0];
    for (Fiber* f : lanes)
        if (f->op != l0.op || (f->op == Op::Shfl && f->shfl != l0.shfl)) {
            S.error = where(*f) + ": the lanes of a warp wait at different collectives";
            return;
        }
    switch (l0.op) {
        case Op::Converge:
            break;
        case Op::Shfl:
            if (l0.shfl == Shfl::Match) {
                for (int i = 0; i < 32; ++i) {
                    uint64_t peers = 0;
                    for (int j = 0; j < 32; ++j)
                        if (lanes[j]->val == lanes[i]->val) peers |= 1ull << j;
                    lanes[i]->res = peers;
                }
                break;
            }
            for (int i = 0; i < 32; ++i) {
                const int arg = lanes[i]->arg;
                int src = i;
                switch (l0.shfl) {
                    case Shfl::Down: src = i + arg < 32 ? i + arg : i; break;
                    case Shfl::Up: src = i - arg >= 0 ? i - arg : i; break;
                    case Shfl::Xor: src = (i ^ arg) & 31; break;
                    case Shfl::Idx: src = arg & 31; break;
                    case Shfl::Match: break;  // (above)
                }
                lanes[i]->res = lanes[src]->val;
            }
            break;
        case Op::Ldmatrix: {
            // .m8n8.x4.b16: lanes 8j .. 8j+7 give the row addresses of matrix j; lane i receives, of each
            // matrix j, row i / 4, elements 2 (i % 4) and 2 (i % 4) + 1 (the lower one in the low half).
            for (int i = 0; i < 32; ++i) {
                const char* row = static_cast<const char*>(from_shared(lanes[i]->addr));
                if (reinterpret_cast<uintptr_t>(row) % 16 != 0) {
                    S.error = where(*lanes[i]) + ": ldmatrix row address not 16-byte aligned";
                    return;
                }
            }
            for (int i = 0; i < 32; ++i)
                for (int j = 0; j < 4; ++j) {
                    const char* row = static_cast<const char*>(from_shared(lanes[8 * j + i / 4]->addr));
                    std::memcpy(&lanes[i]->r4[j], row + (i % 4) * 4, 4);
                }
            break;
        }
        case Op::Mma: {
            // .m16n8k16.row.col.f32.bf16.bf16.f32, lane = 4 g + t. A (16 x 16): a0 = (g, 2t..2t+1),
            // a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..). B (16 x 8, k x n): b0 = (k 2t..2t+1,
            // n g), b1 = (k 2t+8.., n g). C, D (16 x 8): c0, c1 = (g, 2t..2t+1), c2, c3 = (g+8, 2t..).
            float A[16][16], B[16][8], C[16][8];
            auto lo = [](uint32_t r) { return __bfloat162float(__nv_bfloat16{(uint16_t)(r & 0xffffu)}); };
            auto hi = [](uint32_t r) { return __bfloat162float(__nv_bfloat16{(uint16_t)(r >> 16)}); };
            for (int i = 0; i < 32; ++i) {
                const Fiber& f = *lanes[i];
                const int g = i >> 2, t = i & 3;
                for (int r = 0; r < 4; ++r) {
                    const int row = g + (r & 1) * 8, col = 2 * t + (r >> 1) * 8;
                    A[row][col] = lo(f.a[r]);
                    A[row][col + 1] = hi(f.a[r]);
                }
                for (int r = 0; r < 2; ++r) {
                    B[2 * t + r * 8][g] = lo(f.b[r]);
                    B[2 * t + r * 8 + 1][g] = hi(f.b[r]);
                }
                for (int r = 0; r < 4; ++r) C[g + (r >> 1) * 8][2 * t + (r & 1)] = f.c[r];
            }
            for (int i = 0; i < 32; ++i) {
                const int g = i >> 2, t = i & 3;
                for (int r = 0; r < 4; ++r) {
                    const int m = g + (r >> 1) * 8, n = 2 * t + (r & 1);
                    float acc = C[m][n];
                    for (int k = 0; k < 16; ++k) acc = fmaf(A[m][k], B[k][n], acc);
                    lanes[i]->d[r] = acc;
                }
            }
            break;
        }
    }
    for (Fiber* f : lanes) f->st = St::Ready;
}

// ---- mbarriers and bulk-tensor copies (kernels/wgmma.cuh) ----

// Completes the barrier's phase once every arrival and every announced byte has come.
void mbar_complete(Mbar& m) {
    if (m.pending == 0 && m.tx == 0) {
        ++m.phase;
        m.pending = m.count;
    }
}

// The physical shared address of `a` under a swizzle of `span` bytes (0: none): the 16-byte chunk index
// (bits 4..) XOR the 128-byte row index (bits 7..), over span / 16 chunks (CUTLASS's Swizzle<3,4,3> for 128).
uint32_t swizzled(uint32_t a, uint32_t span) {
    if (span == 0) return a;
    const uint32_t mask = span / 16 - 1;
    return a ^ (((a >> 7) & mask) << 4);
}

// Performs a bulk-tensor copy: every element of the box from the tensor, or 0 outside it, into shared
// memory (row r of the box at dst + r * row bytes, swizzled), then its bytes complete on its barrier.
// Chunks it writes are the async proxy's: a cp.async write before it no longer needs a proxy fence.
void tma_land(const Tma& t) {
    const TensorMap& m = t.map;
    const uint32_t row_bytes = m.box[0] * m.elem;
    for (uint32_t r = 0; r < m.box[1]; ++r)
        for (uint32_t e = 0; e < m.box[0]; ++e) {
            const int64_t x = (int64_t)t.c0 + e, y = (int64_t)t.c1 + r;
            const uint32_t a = swizzled(t.dst + r * row_bytes + e * m.elem, m.swizzle);
            char* dst = static_cast<char*>(from_shared(a));
            if (x >= 0 && y >= 0 && (uint64_t)x < m.dim[0] && (uint64_t)y < m.dim[1])
                std::memcpy(dst, m.base + (uint64_t)y * m.stride + (uint64_t)x * m.elem, m.elem);
            else
                std::memset(dst, 0, m.elem);
            S.unfenced.erase(reinterpret_cast<uintptr_t>(dst) & ~(uintptr_t)15);
        }
    Mbar& b = S.mbars.at(t.bar);
    b.tx -= (int64_t)row_bytes * m.box[1];
    mbar_complete(b);
}

// Lands the bulk-tensor copies in flight on barrier `bar` (every copy in flight with kNoBarrier), in
// issue order.
void land_copies(uint32_t bar) {
    std::vector<Tma> keep;
    for (const Tma& t : S.tmas)
        if (bar == kNoBarrier || t.bar == bar) tma_land(t);
        else keep.push_back(t);
    S.tmas.swap(keep);
}

// Whether the phase a thread waits for (St::Mbar: barrier f.addr, parity f.arg) has completed. When every
// arrival of the current phase has come, the copies in flight on the barrier land first (at the latest
// moment a waiter could see them).
bool mbar_passed(const Fiber& f) {
    auto it = S.mbars.find(f.addr);
    if (it == S.mbars.end()) return false;
    Mbar& m = it->second;
    if ((m.phase & 1) != (uint32_t)f.arg) return true;
    if (m.pending == 0) land_copies(f.addr);
    return (m.phase & 1) != (uint32_t)f.arg;
}

std::string states() {
    std::ostringstream o;
    const char* names[] = {"running", "at a block barrier", "at a warp collective", "exited", "failed",
                           "at an mbarrier wait"};
    for (size_t i = 0; i < S.fibers.size(); ++i) {
        if (i > 0 && S.fibers[i].st == S.fibers[i - 1].st) continue;
        size_t j = i;
        while (j + 1 < S.fibers.size() && S.fibers[j + 1].st == S.fibers[i].st) ++j;
        o << " threads " << i << ".." << j << " " << names[(int)S.fibers[i].st] << ";";
    }
    return o.str();
}

// Switches to fiber i until it waits, yields or exits.
void run_fiber(size_t i) {
    S.cur = i;
    thread_idx = S.fibers[i].tid;
    clt_emu_switch(&S.main_sp, S.fibers[i].sp);
}

// A thread whose arrival (or landed copy) completed a barrier's phase yields at once (S.woken: the barrier)
// so that the threads waiting for that phase run before it goes on: a waiter runs as early as the hardware
// could run it, which is how a stage released before its last reader is done gets overwritten here.
// Returns false on an error (in S.error).
bool run_woken() {
    while (S.woken != kNoBarrier) {
        const uint32_t bar = S.woken;
        S.woken = kNoBarrier;
        for (size_t j = 0; j < S.fibers.size(); ++j) {
            Fiber& f = S.fibers[j];
            if (f.st != St::Mbar || f.addr != bar || !mbar_passed(f)) continue;
            f.st = St::Ready;
            run_fiber(j);
            if (!S.error.empty()) return false;
        }
    }
    return true;
}

// Runs one block to its end. Returns false on an error (in S.error).
bool run_block() {
    const size_t n = S.fibers.size();
    // Shared memory starts undefined: poison the statics and the dynamic part.
    std::memset(__start_clt_shared, 0xff, (size_t)(__stop_clt_shared - __start_clt_shared));
    std::memset(dynamic, 0xff, S.dyn_bytes);
    S.unfenced.clear();
    S.mbars.clear();
    S.tmas.clear();
    S.woken = kNoBarrier;
    for (size_t i = 0; i < n; ++i) {
        Fiber& f = S.fibers[i];
        f.st = St::Ready;
        f.tid = uint3{(unsigned)(i % block_dim.x), (unsigned)(i / block_dim.x % block_dim.y),
                      (unsigned)(i / (block_dim.x * block_dim.y))};
        f.open.clear();
        f.groups.clear();
        f.wg_open.clear();
        f.wg_groups.clear();
        f.wg_fenced = false;
        f.unfenced.clear();
        f.sp = fresh_stack(i);
    }
    const size_t n_warps = (n + 31) / 32;
    std::vector<Fiber*> lanes;
    for (;;) {
        // Warp after warp (in the launch's order), each as far as it goes: its lanes run in order until
        // each waits or exits, its collective is released as soon as all its lanes wait at it, and only a
        // block barrier or its end lets the next warp run. A warp that reads shared memory another warp
        // has not written yet (a missing __syncthreads) sees the poison.
        bool progressed = false;
        for (size_t wi = 0; wi < n_warps; ++wi) {
            const size_t w = S.reverse_warps ? n_warps - 1 - wi : wi;
            const size_t lo = 32 * w, hi = lo + 32 < n ? lo + 32 : n;
            for (;;) {
                for (size_t i = lo; i < hi; ++i) {
                    if (S.fibers[i].st == St::Mbar && mbar_passed(S.fibers[i])) S.fibers[i].st = St::Ready;
                    if (!S.error.empty()) return false;
                    if (S.fibers[i].st != St::Ready) continue;
                    run_fiber(i);
                    progressed = true;
                    if (!S.error.empty() || !run_woken()) return false;
                }
                lanes.clear();
                size_t waiting = 0, gone = 0;
                for (size_t i = lo; i < hi; ++i) {
                    lanes.push_back(&S.fibers[i]);
                    if (S.fibers[i].st == St::Warp) ++waiting;
                    if (S.fibers[i].st == St::Done) ++gone;
                }
                if (waiting == 0 || waiting + gone != lanes.size()) break;
                if (lanes.size() < 32 || gone > 0) {
                    S.error = where(*lanes[0]) + ": a full-warp collective that not all 32 lanes reach (" +
                              std::to_string(lanes.size() - gone) + " do)";
                    return false;
                }
                combine(lanes);
                if (!S.error.empty()) return false;
            }
        }
        size_t live = 0;
        std::map<uint32_t, size_t> at_barrier;  // threads waiting, by barrier id
        for (const Fiber& f : S.fibers) {
            if (f.st != St::Done) ++live;
            if (f.st == St::Block) ++at_barrier[f.bar_id];
        }
        if (live == 0) {
            if (!S.tmas.empty()) {
                S.error = "kernel " + S.k->name + ", block (" + std::to_string(block_idx.x) + ", " +
                          std::to_string(block_idx.y) + ", " + std::to_string(block_idx.z) +
                          "): the block ends with bulk-tensor copies in flight (no thread waited for them)";
                return false;
            }
            return true;
        }
        // A barrier is released once as many threads wait at it as it counts (every live thread for
        // __syncthreads); more than that, or waiters that disagree on the count, is an error.
        bool released = false;
        for (const auto& [id, waiting] : at_barrier) {
            uint32_t n = 0xFFFFFFFFu;
            for (const Fiber& f : S.fibers) {
                if (f.st != St::Block || f.bar_id != id) continue;
                if (n != 0xFFFFFFFFu && f.bar_n != n) {
                    S.error = where(f) + ": threads wait at barrier " + std::to_string(id) + " with different counts";
                    return false;
                }
                n = f.bar_n;
            }
            const size_t need = n == 0 ? live : n;
            if (waiting > need) {
                S.error = "kernel " + S.k->name + ": " + std::to_string(waiting) + " threads at barrier " +
                          std::to_string(id) + ", which counts " + std::to_string(need);
                return false;
            }
            if (waiting < need) continue;
            for (Fiber& f : S.fibers)
                if (f.st == St::Block && f.bar_id == id) f.st = St::Ready;
            released = true;
        }
        if (!released && !progressed) {
            S.error = "kernel " + S.k->name + ", block (" + std::to_string(block_idx.x) + ", " +
                      std::to_string(block_idx.y) + ", " + std::to_string(block_idx.z) + "): deadlock:" + states();
            return false;
        }
    }
}

}  // namespace

void register_kernel(const char* name, void* fn, Thunk thunk, unsigned max_threads, size_t param_size) {
    registry()[name] = Kernel{name, fn, thunk, max_threads, param_size};
}

const Kernel* find_kernel(const std::string& name) {
    auto it = registry().find(name);
    return it == registry().end() ? nullptr : &it->second;
}

std::string run(const Kernel& k, const void* params, dim3 grid, dim3 block, size_t dyn) {
    const size_t n = (size_t)block.x * block.y * block.z;
    if (n == 0 || n > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64)
        return "kernel " + k.name + ": invalid block size";
    if (n > k.max_threads)
        return "kernel " + k.name + ": " + std::to_string(n) + " threads per block, over its __launch_bounds__ (" +
               std::to_string(k.max_threads) + ")";
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535)
        return "kernel " + k.name + ": invalid grid size (" + std::to_string(grid.x) + ", " +
               std::to_string(grid.y) + ", " + std::to_string(grid.z) + ")";
    // (The driver, driver.cc, holds a kernel to 48 KiB unless it opted in with cuFuncSetAttribute.)
    if (dyn > kDynamicMax)
        return "kernel " + k.name + ": " + std::to_string(dyn) +
               " bytes of dynamic shared memory, over an H100's 227 KiB per block";
    S = State{};
    // Kernels must be right under every schedule: the launches take turns through the eight, unless
    // CLT_EMU_SCHEDULE (0..7) fixes one.
    unsigned mode = launches++ % 8;
    if (const char* e = getenv("CLT_EMU_SCHEDULE")) mode = (unsigned)atoi(e) % 8;
    S.reverse_warps = mode & 1;
    S.eager_copies = mode & 2;
    S.reverse_blocks = mode & 4;
    S.tma_at_barrier = !S.eager_copies && S.reverse_blocks;
    S.k = &k;
    S.params = params;
    S.dyn_bytes = dyn;
    if (!reserve_dynamic()) return "kernel " + k.name + ": cannot map its dynamic shared memory";
    dynamic = dyn_region + kDynRegion - (dyn + 15) / 16 * 16;
    S.fibers.resize(n);
    if (!reserve_stacks(n)) return "kernel " + k.name + ": cannot map fiber stacks";

    struct sigaction sa;
    std::memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigaction(SIGSEGV, &sa, &old_segv);
    sigaction(SIGBUS, &sa, &old_bus);

    block_dim = block;
    grid_dim = grid;
    bool ok = true;
    const uint64_t n_blocks = (uint64_t)grid.x * grid.y * grid.z;
    for (uint64_t i = 0; ok && i < n_blocks; ++i) {
        const uint64_t j = S.reverse_blocks ? n_blocks - 1 - i : i;
        block_idx = uint3{(unsigned)(j % grid.x), (unsigned)(j / grid.x % grid.y), (unsigned)(j / grid.x / grid.y)};
        ok = run_block();
    }

    sigaction(SIGSEGV, &old_segv, nullptr);
    sigaction(SIGBUS, &old_bus, nullptr);
    std::string e = S.error;
    S.fibers.clear();
    S.k = nullptr;
    return e;
}

// ---- what the kernels call (declared in include/cuda_bf16.h) ----

void fail(const char* what) {
    Fiber& f = me();
    S.error = where(f) + ": " + what;
    f.st = St::Failed;
    for (;;) yield();  // never resumed: the scheduler stops at the error
}

namespace {

// Waits at block barrier `id` for `n` threads (0: every live thread). Under the schedules that land
// bulk-tensor copies at the next block barrier, every copy in flight lands first.
void wait_at_barrier(uint32_t id, uint32_t n) {
    if (S.tma_at_barrier) land_copies(kNoBarrier);
    Fiber& f = me();
    f.bar_id = id;
    f.bar_n = n;
    f.st = St::Block;
    yield();
}

}  // namespace

void syncthreads() { wait_at_barrier(0, 0); }

void bar_sync(uint32_t id, uint32_t n) {
    if (id >= 16) fail("bar.sync: barrier ids are 0 to 15");
    const uint32_t threads = block_dim.x * block_dim.y * block_dim.z;
    if (n == 0 || n % 32 != 0 || n > threads) fail("bar.sync: the count must be a multiple of 32 up to the block's size");
    wait_at_barrier(id, n);
}

uint64_t shfl(Shfl kind, uint64_t bits, int arg) {
    Fiber& f = me();
    f.op = Op::Shfl;
    f.shfl = kind;
    f.val = bits;
    f.arg = arg;
    f.st = St::Warp;
    yield();
    return f.res;
}

void ldmatrix_x4(uint32_t addr, uint32_t out[4]) {
    Fiber& f = me();
    from_shared(addr);  // checks the address
    f.op = Op::Ldmatrix;
    f.addr = addr;
    f.st = St::Warp;
    yield();
    for (int j = 0; j < 4; ++j) out[j] = f.r4[j];
}

void mma_bf16_16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    Fiber& f = me();
    f.op = Op::Mma;
    for (int j = 0; j < 4; ++j) f.a[j] = a[j], f.c[j] = c[j];
    f.b[0] = b0;
    f.b[1] = b1;
    f.st = St::Warp;
    yield();
    for (int j = 0; j < 4; ++j) c[j] = f.d[j];
}

void cp_async16(uint32_t shared_addr, const void* src, uint32_t src_bytes) {
    char* dst = static_cast<char*>(from_shared(shared_addr));
    if (reinterpret_cast<uintptr_t>(dst) % 16 != 0) fail("cp.async destination not 16-byte aligned");
    if (src_bytes > 16) fail("cp.async source size over 16 bytes");
    if (src_bytes > 0 && reinterpret_cast<uintptr_t>(src) % 16 != 0) fail("cp.async source not 16-byte aligned");
    const Copy c{dst, static_cast<const char*>(src), src_bytes};
    if (S.eager_copies) land(c);
    else me().open.push_back(c);
}

void cp_async_commit() {
    Fiber& f = me();
    f.groups.push_back(std::move(f.open));
    f.open.clear();
}

void cp_async_wait(int pending) {
    Fiber& f = me();
    while (f.groups.size() > (size_t)pending) {
        for (const Copy& c : f.groups.front()) land(c);
        f.groups.erase(f.groups.begin());
    }
}

// Shared addresses: offsets from the start of the clt_shared section; the dynamic part follows it.
uint32_t to_shared(const void* p) {
    const char* c = static_cast<const char*>(p);
    if (c >= __start_clt_shared && c < __stop_clt_shared) return (uint32_t)(c - __start_clt_shared);
    if (c >= dynamic && c < dynamic + S.dyn_bytes)
        return (uint32_t)(__stop_clt_shared - __start_clt_shared) + (uint32_t)(c - dynamic);
    fail("__cvta_generic_to_shared of an address outside shared memory");
}

void* from_shared(uint32_t addr) {
    const size_t statics = (size_t)(__stop_clt_shared - __start_clt_shared);
    if (addr < statics) return __start_clt_shared + addr;
    if (addr - statics < S.dyn_bytes) return dynamic + (addr - statics);
    fail("a shared-memory address outside the block's shared memory");
}

void* dynamic_shared() { return dynamic; }

// ---- wgmma (kernels/wgmma.cuh) ----

void wgmma_fence() { me().wg_fenced = true; }

void fence_proxy_async() {
    Fiber& f = me();
    for (uintptr_t c : f.unfenced) {
        auto it = S.unfenced.find(c);
        if (it != S.unfenced.end() && it->second == S.cur) S.unfenced.erase(it);
    }
    f.unfenced.clear();
}

namespace {

// A descriptor's field at bit `shift` (14 bits, in units of 16 bytes), in bytes.
uint32_t desc_bytes(uint64_t d, int shift) { return (uint32_t)((d >> shift) & 0x3FFFu) << 4; }

// Computes one queued product for the calling thread: its accumulators are D's rows 16 w + g and
// 16 w + g + 8 (w: its warp within the warpgroup, lane 4 g + t), columns 8 j + 2 t and 8 j + 2 t + 1
// (PTX ISA, wgmma .m64nNk16 D fragments); element (r, k) of a K-major operand without swizzle is at
// start + (r / 8) SBO + (k / 8) LBO + (r % 8) 16 + (k % 8) 2 bytes (PTX ISA, canonical layouts).
void wgmma_compute(const Wgmma& w) {
    const Fiber& f = me();
    const size_t lin = f.tid.x + (size_t)f.tid.y * block_dim.x + (size_t)f.tid.z * block_dim.x * block_dim.y;
    const int wr = (int)(lin / 32 % 4), lane = (int)(lin % 32), g = lane >> 2, t = lane & 3;
    // Row r of a K-major operand, its 16 k as floats (bf16 -> f32 is exact).
    auto row = [&](uint64_t desc, int r, float out[16]) {
        const bool sw = (desc >> 62) == 1;  // the 128-byte swizzle: rows of 128 bytes, LBO unused
        for (int kc = 0; kc < 2; ++kc) {
            const uint32_t a =
                sw ? swizzled(desc_bytes(desc, 0) + (r / 8) * desc_bytes(desc, 32) + (r % 8) * 128 + kc * 16, 128)
                   : desc_bytes(desc, 0) + (r / 8) * desc_bytes(desc, 32) + kc * desc_bytes(desc, 16) + (r % 8) * 16;
            const char* p = static_cast<const char*>(from_shared(a));
            from_shared(a + 15);
            if (S.unfenced.count(reinterpret_cast<uintptr_t>(p)))
                fail("wgmma reads shared memory that a cp.async wrote, without a fence.proxy.async by the "
                     "writing thread since");
            for (int e = 0; e < 8; ++e) {
                uint16_t v;
                std::memcpy(&v, p + 2 * e, 2);
                out[kc * 8 + e] = __bfloat162float(__nv_bfloat16{v});
            }
        }
    };
    float A[2][16], B[16];
    row(w.da, 16 * wr + g, A[0]);
    row(w.da, 16 * wr + g + 8, A[1]);
    for (int j = 0; j < w.n / 8; ++j)
        for (int c = 0; c < 2; ++c) {
            row(w.db, 8 * j + 2 * t + c, B);
            for (int h = 0; h < 2; ++h) {
                float& d = w.d[4 * j + 2 * h + c];
                float acc = d;
                for (int k = 0; k < 16; ++k) acc = fmaf(A[h][k], B[k], acc);
                d = acc;
            }
        }
}

void wgmma_check_desc(uint64_t d) {
    if ((d >> 62) > 1)
        fail("a wgmma descriptor with the 64- or 32-byte swizzle (the emulator models none and 128 bytes)");
    if ((d >> 49) & 7) fail("a wgmma descriptor with a base offset");
    // With the swizzle, base offset 0 means the pattern starts at the matrix's 1024-byte-aligned row block:
    // the start may move along the first 128-byte row (a k16 step), not past it.
    if ((d >> 62) == 1 && ((desc_bytes(d, 0) >> 7) & 7) != 0)
        fail("a swizzled wgmma descriptor whose start is past the first row of its 1024-byte pattern");
    const uint64_t reserved = (3ull << 14) | (3ull << 30) | (7ull << 46) | (0x3FFull << 52);
    if (d & reserved) fail("a wgmma descriptor with reserved bits set");
}

}  // namespace

void wgmma_bf16(float* d, int n, uint64_t desc_a, uint64_t desc_b) {
    Fiber& f = me();
    if (!f.wg_fenced) fail("wgmma.mma_async without a wgmma.fence since the thread's last wgmma wait");
    if (n % 8 != 0 || n < 8 || n > 256) fail("wgmma: N must be a multiple of 8 from 8 to 256");
    wgmma_check_desc(desc_a);
    wgmma_check_desc(desc_b);
    f.wg_open.push_back(Wgmma{d, n, desc_a, desc_b});
}

void wgmma_commit() {
    Fiber& f = me();
    f.wg_groups.push_back(std::move(f.wg_open));
    f.wg_open.clear();
}

void syncwarp() {
    Fiber& f = me();
    f.op = Op::Converge;
    f.st = St::Warp;
    yield();
}

void wgmma_wait(int pending) {
    Fiber& f = me();
    while (f.wg_groups.size() > (size_t)pending) {
        for (const Wgmma& w : f.wg_groups.front()) wgmma_compute(w);
        f.wg_groups.erase(f.wg_groups.begin());
    }
    f.wg_fenced = false;
    // .sync.aligned: the warp's lanes leave it together (so no lane of a warp is past a wait that another
    // lane has not reached: what lets one lane release a stage for its warp).
    syncwarp();
}

// ---- mbarriers and the Tensor Memory Accelerator (kernels/wgmma.cuh) ----

namespace {

// The calling thread has completed a phase of `bar`: when another thread waits for it, yield to the
// scheduler, which runs the waiters first (run_woken).
void wake(uint32_t bar) {
    for (const Fiber& f : S.fibers)
        if (f.st == St::Mbar && f.addr == bar) {
            S.woken = bar;
            yield();
            return;
        }
}

// Checks an mbarrier's address: inside shared memory, 8-byte aligned.
void check_mbar_addr(uint32_t bar) {
    from_shared(bar);
    if (bar % 8 != 0) fail("an mbarrier not 8-byte aligned");
}

Mbar& mbar(uint32_t bar, const char* what) {
    check_mbar_addr(bar);
    auto it = S.mbars.find(bar);
    if (it == S.mbars.end()) fail(what);
    return it->second;
}

}  // namespace

void mbar_init(uint32_t bar, uint32_t count) {
    check_mbar_addr(bar);
    if (count == 0 || count >= (1u << 20)) fail("mbarrier.init: the count must be 1 to 2^20 - 1");
    S.mbars[bar] = Mbar{count, count, 0, 0, S.cur, false};
}

void fence_mbar_init() {
    for (auto& kv : S.mbars)
        if (kv.second.init_thread == S.cur) kv.second.visible = true;
}

void mbar_arrive(uint32_t bar, uint32_t tx_bytes) {
    Mbar& m = mbar(bar, "mbarrier.arrive on a barrier nobody initialised");
    if (m.pending == 0) fail("mbarrier.arrive: more arrivals than the barrier's count in one phase");
    m.tx += tx_bytes;
    if (m.tx >= (1 << 20)) fail("mbarrier.expect_tx: over 2^20 - 1 transaction bytes pending");
    --m.pending;
    const uint32_t phase = m.phase;
    mbar_complete(m);
    if (m.phase != phase) wake(bar);
}

void mbar_wait(uint32_t bar, uint32_t parity) {
    Fiber& f = me();
    mbar(bar, "mbarrier.try_wait on a barrier nobody initialised");
    f.addr = bar;
    f.arg = (int)(parity & 1);
    while (!mbar_passed(f)) {
        f.st = St::Mbar;
        yield();
    }
}

void tma_load_2d(uint32_t dst, const void* map, int c0, int c1, uint32_t bar) {
    TensorMap m;
    std::memcpy(&m, map, sizeof m);
    if (m.magic != kTensorMapMagic) fail("a bulk-tensor copy through bytes that are not a tensor map");
    if (dst % 128 != 0) fail("a bulk-tensor copy to shared memory not 128-byte aligned");
    const uint32_t bytes = m.box[0] * m.elem * m.box[1];
    if (m.swizzle != 0 && m.box[0] * m.elem != m.swizzle)
        fail("a swizzled bulk-tensor copy whose box rows are not the swizzle's span (not modelled)");
    from_shared(dst);
    from_shared(dst + bytes - 1);
    Mbar& b = mbar(bar, "a bulk-tensor copy completes on a barrier nobody initialised");
    if (!b.visible)
        fail("a bulk-tensor copy completes on an mbarrier that its initialising thread has not made visible "
             "to the async proxy (fence.mbarrier_init)");
    const Tma t{dst, m, c0, c1, bar};
    if (!S.eager_copies) {
        S.tmas.push_back(t);
        return;
    }
    const uint32_t phase = b.phase;
    tma_land(t);
    if (b.phase != phase) wake(bar);
}

}  // namespace clt_emu
