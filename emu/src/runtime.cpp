// The emulator's scheduler: runs each block's threads as fibers on the
// launching OS thread, one block after another, and implements barriers and
// warp collectives as rendezvous between those fibers. Deterministic: fibers
// are resumed in thread order and switch only at barriers, collectives and
// exit. A barrier that can never complete ends the launch with an error.
#define MULTIBOX_EMU_RUNTIME  // no math macros over the standard headers below
#include "multibox_emu.h"

#include <sys/mman.h>

#include "check.hpp"

#include <algorithm>
#include <cstdarg>
#include <cstdint>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#else
#define EMU_ASAN 0
#endif

#if !defined(__x86_64__) || defined(MULTIBOX_EMU_UCONTEXT)
#include <ucontext.h>
#endif

__thread uint3 threadIdx;
__thread uint3 blockIdx;
__thread dim3 blockDim;
__thread dim3 gridDim;

namespace emu {
namespace detail {

__thread void* dynamic_shared;

namespace {

struct Kernel {
    const char* name;
    Trampoline fn;
    unsigned long params_size;
    unsigned sm;  // the architecture whose paths this build takes (MULTIBOX_EMU_SM)
};

std::vector<Kernel>& registry() {
    static std::vector<Kernel> kernels;  // filled by static constructors, read-only afterwards
    return kernels;
}

// ---------------------------------------------------------------------------
// Context switching: a hand-written switch on x86-64 (callee-saved registers
// only; no signal mask syscall), ucontext elsewhere or with
// -DMULTIBOX_EMU_UCONTEXT.

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kGuardBytes = 4096;

#if defined(__x86_64__) && !defined(MULTIBOX_EMU_UCONTEXT)
extern "C" void multibox_emu_switch(void** save_sp, void* next_sp);
asm(R"(
    .text
    .p2align 4
    .hidden multibox_emu_switch
    .type multibox_emu_switch, @function
multibox_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size multibox_emu_switch, .-multibox_emu_switch
)");

struct Context {
    void* sp = nullptr;
    void init(char* stack, size_t size, void (*entry)()) {
        // Six zeroed callee-saved registers, then `entry` as the return
        // address, then a null fake return address for `entry` itself so
        // that it starts with the stack aligned as after a call.
        void** top = reinterpret_cast<void**>(stack + size);  // 16-byte aligned
        top[-1] = nullptr;
        top[-2] = reinterpret_cast<void*>(entry);
        for (int i = 3; i <= 8; ++i) top[-i] = nullptr;
        sp = top - 8;
    }
};
inline void swap_context(Context& from, Context& to) { multibox_emu_switch(&from.sp, to.sp); }
#else
struct Context {
    ucontext_t uc;
    void init(char* stack, size_t size, void (*entry)()) {
        getcontext(&uc);
        uc.uc_stack.ss_sp = stack;
        uc.uc_stack.ss_size = size;
        uc.uc_link = nullptr;
        makecontext(&uc, entry, 0);
    }
};
inline void swap_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

// ---------------------------------------------------------------------------
// Fibers and blocks.

enum State : unsigned char { READY, WAIT_BLOCK, WAIT_WARP, DONE };

struct Fiber {
    Context ctx;
    char* stack = nullptr;  // lowest usable byte, above the guard page
    bool stack_dirty = false;  // abandoned mid-run (ASan: stale poisoning)
    void* fake_stack = nullptr;
    State state = DONE;
    Op op = SYNCTHREADS;
    Site site{};
    unsigned mask = 0;
    int arg = 0, width = 0;
    unsigned long long in = 0, out = 0;
    uint3 tid{};
};

// Per OS thread: fibers and their stacks, reused from launch to launch.
struct Pool {
    std::vector<Fiber> fibers;
    Context scheduler;
    ~Pool() {
        for (Fiber& f : fibers) munmap(f.stack - kGuardBytes, kStackBytes + kGuardBytes);
    }
    void reserve(unsigned n) {
        while (fibers.size() < n) {
            void* m = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
            if (m == MAP_FAILED) throw std::bad_alloc();
            mprotect(m, kGuardBytes, PROT_NONE);  // a stack overflow faults instead of corrupting
            fibers.emplace_back();
            fibers.back().stack = static_cast<char*>(m) + kGuardBytes;
        }
    }
};

struct Block {
    const Kernel* kernel = nullptr;
    const void* params = nullptr;
    Fiber* fibers = nullptr;
    unsigned n = 0;       // threads in the block
    unsigned cur = 0;     // the running fiber
    unsigned done = 0;    // fibers that exited
    unsigned at_barrier = 0;
    std::string error;
    Context* scheduler = nullptr;
#if EMU_ASAN
    const void* sched_stack = nullptr;
    size_t sched_stack_size = 0;
#endif
};

__thread Block* t_block;

std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
std::string fmt(const char* f, ...) {
    char buf[2048];
    va_list ap;
    va_start(ap, f);
    vsnprintf(buf, sizeof buf, f, ap);
    va_end(ap);
    return buf;
}
std::string where(const Site& s) { return fmt("`%s` (%s:%d)", s.what, s.file, s.line); }
std::string thread_name(const Fiber& f) { return fmt("thread (%u, %u, %u)", f.tid.x, f.tid.y, f.tid.z); }
bool same_site(const Site& a, const Site& b) {
    return a.line == b.line && (a.file == b.file || std::strcmp(a.file, b.file) == 0) &&
           (a.what == b.what || std::strcmp(a.what, b.what) == 0);
}

// Switch from the running fiber back to the scheduler; returns when the
// scheduler resumes this fiber (never, if it exited or failed).
void to_scheduler(Block& b, Fiber& f, bool exiting) {
#if EMU_ASAN
    __sanitizer_start_switch_fiber(exiting ? nullptr : &f.fake_stack, b.sched_stack, b.sched_stack_size);
    swap_context(f.ctx, *b.scheduler);
    __sanitizer_finish_switch_fiber(f.fake_stack, &b.sched_stack, &b.sched_stack_size);
#else
    (void)exiting;
    swap_context(f.ctx, *b.scheduler);
#endif
}

[[noreturn]] void fail_here(const std::string& message) {
    Block& b = *t_block;
    Fiber& f = b.fibers[b.cur];
    if (b.error.empty()) b.error = thread_name(f) + ": " + message;
    f.state = DONE;
    f.stack_dirty = true;
    to_scheduler(b, f, true);
    __builtin_unreachable();
}

void fiber_main() {
    Block* b = t_block;
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &b->sched_stack, &b->sched_stack_size);
#endif
    b->kernel->fn(b->params);
    b = t_block;
    Fiber& f = b->fibers[b->cur];
    f.state = DONE;
    ++b->done;
    to_scheduler(*b, f, true);
    __builtin_unreachable();
}

// Why no fiber can run: explain the lowest-numbered waiting thread.
std::string diagnose(const Block& b) {
    unsigned w = 0;
    while (b.fibers[w].state == DONE) ++w;
    const Fiber& f = b.fibers[w];
    if (f.state == WAIT_BLOCK) {
        unsigned here = 0, exited = 0, elsewhere = 0, first_exited = 0, first_elsewhere = 0;
        for (unsigned i = 0; i < b.n; ++i) {
            const Fiber& g = b.fibers[i];
            if (g.state == DONE) {
                if (exited++ == 0) first_exited = i;
            } else if (g.state == WAIT_BLOCK && same_site(g.site, f.site)) {
                ++here;
            } else if (elsewhere++ == 0) {
                first_elsewhere = i;
            }
        }
        std::string m = fmt("deadlock: %s can never complete: %u of %u threads wait there", where(f.site).c_str(),
                            here, b.n);
        if (exited) m += fmt("; %u exited (first: %s)", exited, thread_name(b.fibers[first_exited]).c_str());
        if (elsewhere) {
            const Fiber& g = b.fibers[first_elsewhere];
            m += fmt("; %u wait elsewhere (first: %s at %s)", elsewhere, thread_name(g).c_str(), where(g.site).c_str());
        }
        return m;
    }
    const unsigned lane = w % 32, base = w - lane;
    std::string m = fmt("deadlock: %s (warp %u, lane %u) waits at %s with mask 0x%08x, but ", thread_name(f).c_str(),
                        w / 32, lane, where(f.site).c_str(), f.mask);
    for (unsigned l = 0; l < 32 && base + l < b.n; ++l) {
        if (!((f.mask >> l) & 1u)) continue;
        const Fiber& g = b.fibers[base + l];
        if (g.state == DONE) return m + fmt("lane %u exited", l);
        if (g.state == WAIT_BLOCK) return m + fmt("lane %u waits at %s", l, where(g.site).c_str());
        if (!same_site(g.site, f.site)) return m + fmt("lane %u waits at %s", l, where(g.site).c_str());
        if (g.mask != f.mask) return m + fmt("lane %u waits there with mask 0x%08x", l, g.mask);
    }
    return m + "no lane is missing (emulator bug)";
}

std::string run_block(Block& b) {
    for (unsigned i = 0; i < b.n; ++i) {
        Fiber& f = b.fibers[i];
#if EMU_ASAN
        if (f.stack_dirty) __asan_unpoison_memory_region(f.stack, kStackBytes);
#endif
        f.stack_dirty = false;
        f.state = READY;
        f.tid = uint3{i % blockDim.x, i / blockDim.x % blockDim.y, i / (blockDim.x * blockDim.y)};
        f.ctx.init(f.stack, kStackBytes, fiber_main);
    }
    while (b.done < b.n) {
        bool ran = false;
        for (unsigned i = 0; i < b.n; ++i) {
            Fiber& f = b.fibers[i];
            if (f.state != READY) continue;
            ran = true;
            b.cur = i;
            threadIdx = f.tid;
            if (t_checker) t_checker->resume(i, uintptr_t(f.stack), uintptr_t(f.stack) + kStackBytes);
#if EMU_ASAN
            void* fake = nullptr;
            __sanitizer_start_switch_fiber(&fake, f.stack, kStackBytes);
            swap_context(*b.scheduler, f.ctx);
            __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
            swap_context(*b.scheduler, f.ctx);
#endif
            if (!b.error.empty()) break;
        }
        if (b.error.empty() && !ran) b.error = diagnose(b);
        if (!b.error.empty()) {
            for (unsigned i = 0; i < b.n; ++i)
                if (b.fibers[i].state != DONE) b.fibers[i].stack_dirty = true;  // abandoned
            return b.error;
        }
    }
    return std::string();
}

// The launch's device math model (emu::detail::device_math): off, or on
// with this seed.
__thread bool t_device_math;
__thread unsigned t_math_seed;

std::string launch(const char* name, const unsigned grid[3], const unsigned block[3], unsigned dyn_bytes,
                   const void* params, size_t params_len, unsigned checks, const EmuRegion* regions,
                   size_t n_regions, EmuRegionTraffic* region_traffic, EmuTraffic* traffic,
                   const unsigned* math_seed, unsigned sm) {
    const Kernel* k = nullptr;
    bool known = false;
    for (const Kernel& r : registry()) {
        if (std::strcmp(r.name, name) != 0) continue;
        known = true;
        if (r.sm != sm) continue;
        if (k) return fmt("kernel `%s` is registered twice for sm_%u (two kernels/*.cu define it)", name, sm);
        k = &r;
    }
    if (!known) return fmt("unknown kernel `%s` (not in kernels/*.cu or emu/tests/kernels/*.cu)", name);
    if (!k)
        return fmt("kernel `%s` has no sm_%u build (emu/build.rs builds kernels/*.cu for sm_75 and sm_90, "
                   "its own test kernels for the one their file names, sm_75 by default)",
                   name, sm);
    if (params_len != k->params_size)
        return fmt("kernel `%s`: params are %zu bytes, its params struct is %lu", name, params_len, k->params_size);
    const unsigned long long threads = 1ull * block[0] * block[1] * block[2];
    if (threads == 0 || threads > 1024 || block[2] > 64)
        return fmt("kernel `%s`: block (%u, %u, %u) is not 1..=1024 threads with z <= 64", name, block[0], block[1],
                   block[2]);
    if (grid[0] == 0 || grid[1] == 0 || grid[2] == 0 || grid[0] > 0x7fffffffu || grid[1] > 65535 || grid[2] > 65535)
        return fmt("kernel `%s`: grid (%u, %u, %u) is out of range", name, grid[0], grid[1], grid[2]);
    if (dyn_bytes > 227 * 1024)
        return fmt("kernel `%s`: %u bytes of dynamic shared memory (at most 227 KiB)", name, dyn_bytes);
    if (t_block) return fmt("kernel `%s` launched from inside a kernel", name);

    static thread_local Pool pool;
    pool.reserve(unsigned(threads));
    // Params in aligned storage, like the GPU's constant bank.
    std::vector<unsigned long long> param_copy((params_len + 7) / 8 + 1);
    std::memcpy(param_copy.data(), params, params_len);
    // Exactly as large as asked for, so that ASan sees overruns.
    struct Freer {
        void* p;
        ~Freer() { ::operator delete(p, std::align_val_t(16)); }
    } smem{::operator new(dyn_bytes ? dyn_bytes : 1, std::align_val_t(16))};

    blockDim = dim3{block[0], block[1], block[2]};
    gridDim = dim3{grid[0], grid[1], grid[2]};
    static thread_local Checker checker;
    checker.begin_launch(checks, regions, n_regions, smem.p, dyn_bytes, unsigned(threads));
    checker.exclude(&threadIdx, sizeof threadIdx);
    checker.exclude(&blockIdx, sizeof blockIdx);
    checker.exclude(&blockDim, sizeof blockDim);
    checker.exclude(&gridDim, sizeof gridDim);
    checker.exclude(&dynamic_shared, sizeof dynamic_shared);
    struct Unset {
        ~Unset() {
            t_checker = nullptr;
            t_device_math = false;
        }
    } unset;
    t_checker = checks ? &checker : nullptr;
    t_device_math = math_seed != nullptr;
    t_math_seed = math_seed ? *math_seed : 0u;
    std::string error;
    // Blocks run one at a time, each to its end, in linear order or (with
    // CHECK_REVERSE_BLOCKS) the reverse: a GPU promises no order, and the
    // checker can only judge the order that ran ("the last block" of a
    // reduction, say, is block 0 when reversed).
    const unsigned long long n_blocks = 1ull * grid[0] * grid[1] * grid[2];
    for (unsigned long long i = 0; i < n_blocks && error.empty(); ++i) {
        const unsigned long long linear = (checks & CHECK_REVERSE_BLOCKS) ? n_blocks - 1 - i : i;
        const unsigned x = unsigned(linear % grid[0]), y = unsigned(linear / grid[0] % grid[1]),
                       z = unsigned(linear / grid[0] / grid[1]);
        blockIdx = uint3{x, y, z};
        checker.begin_block(unsigned(linear));
        std::memset(smem.p, 0xff, dyn_bytes);  // uninitialised shared memory reads as NaN / -1
        dynamic_shared = smem.p;
        Block b;
        b.kernel = k;
        b.params = param_copy.data();
        b.fibers = pool.fibers.data();
        b.n = unsigned(threads);
        b.scheduler = &pool.scheduler;
        t_block = &b;
        error = run_block(b);
        t_block = nullptr;
        checker.end_block();
        if (checker.has_finding()) {
            error = fmt("kernel `%s`: ", name) + checker.describe(grid, block);
        } else if (!error.empty()) {
            error = fmt("kernel `%s`, block (%u, %u, %u): ", name, x, y, z) + error;
        }
    }
    dynamic_shared = nullptr;
    if (error.empty()) checker.end_launch(region_traffic, traffic);
    return error;
}

}  // namespace

Registrar::Registrar(const char* name, Trampoline fn, unsigned long params_size, unsigned sm) {
    registry().push_back(Kernel{name, fn, params_size, sm});
}

int block_barrier(const Site& site, Op op, int pred) {
    Block& b = *t_block;
    Fiber& f = b.fibers[b.cur];
    f.state = WAIT_BLOCK;
    f.site = site;
    f.op = op;
    f.in = pred != 0;
    if (++b.at_barrier < b.n) {
        to_scheduler(b, f, false);
        return int(f.out);
    }
    // Every thread is at a block barrier: the same one, or never.
    b.at_barrier = 0;
    if (t_checker) t_checker->barrier();
    unsigned count = 0;
    for (unsigned i = 0; i < b.n; ++i) {
        const Fiber& g = b.fibers[i];
        if (!same_site(g.site, site))
            fail_here(fmt("deadlock: threads wait at different barriers: %s at %s, %s at %s",
                          thread_name(g).c_str(), where(g.site).c_str(), thread_name(f).c_str(), where(site).c_str()));
        count += unsigned(g.in);
    }
    const unsigned result = op == SYNCTHREADS_COUNT ? count
                            : op == SYNCTHREADS_OR  ? count != 0
                            : op == SYNCTHREADS_AND ? count == b.n
                                                    : 0;
    for (unsigned i = 0; i < b.n; ++i) {
        b.fibers[i].state = READY;
        b.fibers[i].out = result;
    }
    return int(result);
}

unsigned long long warp_op(const Site& site, Op op, unsigned mask, unsigned long long value, int arg, int width) {
    Block& b = *t_block;
    Fiber& f = b.fibers[b.cur];
    const unsigned lane = b.cur % 32, base = b.cur - lane;
    // Lanes past the end of a partial last warp do not exist: masks may name
    // them, they take no part, and reading from them gives the poison value.
    const unsigned live = b.n - base >= 32 ? 0xffffffffu : (1u << (b.n - base)) - 1u;
    if (!((mask >> lane) & 1u)) fail_here(fmt("%s: mask 0x%08x does not name the calling lane %u", where(site).c_str(), mask, lane));
    if (width < 1 || width > 32 || (width & (width - 1)))
        fail_here(fmt("%s: width %d is not a power of two in 1..=32", where(site).c_str(), width));
    f.state = WAIT_WARP;
    f.site = site;
    f.op = op;
    f.mask = mask;
    f.in = value;
    f.arg = arg;
    f.width = width;
    const unsigned group = mask & live;
    // Highest lane first: lanes arrive in order, so only the last one scans far.
    for (int l = 31; l >= 0; --l) {
        if (!((group >> l) & 1u)) continue;
        const Fiber& g = b.fibers[base + l];
        if (g.state != WAIT_WARP || g.mask != mask || !same_site(g.site, site)) {
            to_scheduler(b, f, false);
            return f.out;
        }
    }
    if (t_checker) t_checker->warp_sync(base, group);
    unsigned ballot = 0;
    for (unsigned l = 0; l < 32; ++l)
        if (((group >> l) & 1u) && b.fibers[base + l].in) ballot |= 1u << l;
    for (unsigned l = 0; l < 32; ++l) {
        if (!((group >> l) & 1u)) continue;
        Fiber& g = b.fibers[base + l];
        g.state = READY;
        switch (op) {
        case BALLOT: g.out = ballot; break;
        case ANY: g.out = ballot != 0; break;
        case ALL: g.out = ballot == group; break;
        case SHFL_IDX: case SHFL_UP: case SHFL_DOWN: case SHFL_XOR: {
            // PTX shfl.sync with c = ((32 - width) << 8) | (up ? 0 : 31).
            const int segmask = 32 - g.width, c = op == SHFL_UP ? 0 : 31;
            const int min_lane = int(l) & segmask, max_lane = min_lane | (c & ~segmask);
            int j;
            bool in_range;
            if (op == SHFL_UP) {
                j = int(l) - g.arg;
                in_range = j >= max_lane;
            } else if (op == SHFL_DOWN) {
                j = int(l) + g.arg;
                in_range = j <= max_lane;
            } else if (op == SHFL_XOR) {
                j = int(l) ^ g.arg;
                in_range = j <= max_lane;
            } else {
                j = min_lane | (g.arg & ~segmask & 31);
                in_range = true;
            }
            if (!in_range) j = int(l);
            // A lane that is not taking part: undefined on a GPU, all ones here.
            g.out = ((group >> j) & 1u) ? b.fibers[base + j].in : ~0ull;
            break;
        }
        default: g.out = 0; break;
        }
    }
    return f.out;
}

unsigned active_mask() {
    // Every lane the warp has: what a converged warp gives, and independent of
    // the order in which the emulator runs (and retires) lanes.
    const Block& b = *t_block;
    const unsigned base = b.cur - b.cur % 32;
    return b.n - base >= 32 ? 0xffffffffu : (1u << (b.n - base)) - 1u;
}

void trap(const Site& site) { fail_here(where(site) + " was called"); }

void stop_for_finding() { fail_here("stopped by the checker"); }

}  // namespace detail
}  // namespace emu

// ---------------------------------------------------------------------------
// C interface for the Rust side (emu/src/lib.rs).

// Whether the kernels were built with the access instrumentation the race
// and bounds checks need (not under AddressSanitizer, which excludes it).
extern "C" int multibox_emu_checks_available() noexcept {
#if defined(MULTIBOX_EMU_INSTRUMENTED)
    return 1;
#else
    return 0;
#endif
}

extern "C" int multibox_emu_launch(const char* name, const unsigned* grid, const unsigned* block, unsigned dyn_bytes,
                                   const void* params, size_t params_len, unsigned checks,
                                   const emu::detail::EmuRegion* regions, size_t n_regions,
                                   emu::detail::EmuRegionTraffic* region_traffic, emu::detail::EmuTraffic* traffic,
                                   const unsigned* math_seed, unsigned sm, char* err, size_t err_cap) noexcept {
    std::string e;
    if (!multibox_emu_checks_available()) checks = 0;
    try {
        e = emu::detail::launch(name, grid, block, dyn_bytes, params, params_len, checks, regions, n_regions,
                                region_traffic, traffic, math_seed, sm);
    } catch (const std::exception& ex) {
        e = std::string("emulator failure: ") + ex.what();
    }
    if (e.empty()) return 0;
    if (err_cap) std::snprintf(err, err_cap, "%s", e.c_str());
    return 1;
}

extern "C" size_t multibox_emu_kernel_count() noexcept { return emu::detail::registry().size(); }

extern "C" const char* multibox_emu_kernel_name(size_t i) noexcept { return emu::detail::registry()[i].name; }

extern "C" unsigned multibox_emu_kernel_sm(size_t i) noexcept { return emu::detail::registry()[i].sm; }

extern "C" size_t multibox_emu_kernel_params_size(size_t i) noexcept {
    return emu::detail::registry()[i].params_size;
}

namespace emu {
namespace detail {
namespace {
// splitmix64's finaliser: every bit of the input moves about half the output's.
uint64_t mix(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
}  // namespace

float device_math(float exact, float x, MathFunction function, unsigned ulps) {
    if (!t_device_math || ulps == 0) return exact;
    uint32_t bits, arg;
    std::memcpy(&bits, &exact, sizeof bits);
    std::memcpy(&arg, &x, sizeof arg);
    const uint32_t magnitude = bits & 0x7fffffffu;
    // Zeros, subnormals, infinities and NaN stay as they are: the bounds
    // are stated for normal results.
    if (magnitude < 0x00800000u || magnitude >= 0x7f800000u) return exact;
    const uint64_t h = mix(arg ^ uint64_t(function) << 32 ^ uint64_t(t_math_seed) * 0x9e3779b97f4a7c15ull);
    const long long moved = (long long)magnitude + (long long)(h % (2 * ulps + 1)) - (long long)ulps;
    // Stay normal and finite: a step never crosses into another kind of value.
    bits = (bits & 0x80000000u) | uint32_t(std::min(std::max(moved, 0x00800000ll), 0x7f7fffffll));
    float y;
    std::memcpy(&y, &bits, sizeof y);
    return y;
}
}  // namespace detail
}  // namespace emu
