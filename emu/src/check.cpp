// The checker. Every load and store of the kernel code reaches it: the
// kernel files are compiled with GCC's -fsanitize=thread instrumentation,
// which calls `__tsan_read4(addr)`, `__tsan_write8(addr)`, ... before each
// access, and those callbacks are defined here (no TSan runtime is linked;
// this file and the scheduler are not instrumented). Atomics and fences
// announce themselves through the hooks of multibox_emu.h.
//
// Races. Fibers run one at a time, so "at the same time" means "not ordered
// by the happens-before relation the GPU guarantees":
//   - within a block, a barrier orders everything before it against
//     everything after (the block's barrier count, `epoch`, per access);
//   - within a warp, a collective (shuffle, vote, __syncwarp) orders the
//     lanes it names: a 32-entry vector clock per thread, joined at each one;
//   - across blocks, only the fence-and-atomic pattern: a thread's writes
//     (its own, or its block's before a barrier) are released by its
//     __threadfence() followed by an atomic on a location; another block
//     acquires them by an atomic on that location that comes later, then a
//     __threadfence() (by the same thread, or by any thread after a barrier
//     that follows the atomic), and they then order the accesses that follow.
// Shared memory is checked within a block, global memory across blocks.
// Each 4-byte granule keeps its last write and two reads, with a byte mask.
//
// Bounds. The caller may register the regions a launch may touch; an access
// outside all of them, outside its block's part, or a write to a read-only
// region stops the launch. Accesses to the fiber's own stack (locals) and to
// the program image (constant tables) are not checked.
//
// Traffic. The lanes of one warp at the same access site and occurrence (the
// n-th time each lane executes it) form one request, as the GPU's
// load/store unit sees them: 32-byte sectors per global request, bank
// conflicts per shared request.
#include "check.hpp"

#include <dlfcn.h>
#include <link.h>
#include <unistd.h>

#include <algorithm>
#include <cinttypes>
#include <cstdarg>
#include <cstdio>
#include <cstring>

#if !defined(MULTIBOX_EMU_ROOT)
#define MULTIBOX_EMU_ROOT ""
#endif

namespace emu {
namespace detail {

thread_local Checker* t_checker = nullptr;

// Stops the running fiber (runtime.cpp); the launch then reports the finding.
[[noreturn]] void stop_for_finding();

namespace {

std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
std::string fmt(const char* f, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, f);
    vsnprintf(buf, sizeof buf, f, ap);
    va_end(ap);
    return buf;
}

// This OS thread's instance of the TLS segment of the module that holds the
// emulator, where the kernels' static `__shared__` variables live (they are
// `static __thread`, see multibox_emu.h).
struct Range {
    uintptr_t lo = 0, hi = 0;
    bool contains(uintptr_t a) const { return a >= lo && a < hi; }
};

int find_tls(dl_phdr_info* info, size_t, void* data) {
    auto* out = static_cast<std::pair<uintptr_t, Range>*>(data);
    if (!info->dlpi_tls_data) return 0;
    for (int i = 0; i < info->dlpi_phnum; ++i) {
        const ElfW(Phdr)& ph = info->dlpi_phdr[i];
        if (ph.p_type != PT_TLS) continue;
        const uintptr_t lo = uintptr_t(info->dlpi_tls_data);
        if (out->first >= lo && out->first < lo + ph.p_memsz) {
            out->second = Range{lo, lo + ph.p_memsz};
            return 1;
        }
    }
    return 0;
}

__thread int tls_anchor;  // any TLS variable of this module

Range shared_tls_range() {
    static thread_local Range cached;
    if (cached.hi == 0) {
        std::pair<uintptr_t, Range> probe{uintptr_t(&tls_anchor), Range{}};
        dl_iterate_phdr(find_tls, &probe);
        cached = probe.second;
    }
    return cached;
}

int collect_images(dl_phdr_info* info, size_t, void* data) {
    auto* out = static_cast<std::vector<Range>*>(data);
    for (int i = 0; i < info->dlpi_phnum; ++i) {
        const ElfW(Phdr)& ph = info->dlpi_phdr[i];
        if (ph.p_type != PT_LOAD) continue;
        const uintptr_t lo = info->dlpi_addr + ph.p_vaddr;
        out->push_back(Range{lo, lo + ph.p_memsz});
    }
    return 0;
}

// Loaded program images: constant tables the compiler placed there.
bool in_program_image(uintptr_t addr) {
    static const std::vector<Range> images = [] {
        std::vector<Range> v;
        dl_iterate_phdr(collect_images, &v);
        return v;
    }();
    for (const Range& r : images)
        if (r.contains(addr)) return true;
    return false;
}

// "kernels/common.cuh:313 (block_exclusive_scan), inlined at kernels/select.cu:116"
std::string site(const void* pc) {
    if (!pc) return "?";
    Dl_info info{};
    if (!dladdr(pc, &info)) return fmt("%p", pc);
    const uintptr_t offset = uintptr_t(pc) - uintptr_t(info.dli_fbase) - 1;  // the call, not the return
    // The main program may be named as it was started (a relative path).
    const char* object = info.dli_fname && info.dli_fname[0] == '/' ? info.dli_fname : "/proc/self/exe";
    const std::string command = fmt("addr2line -C -f -i -e '%s' 0x%" PRIxPTR " 2>/dev/null", object, offset);
    FILE* pipe = popen(command.c_str(), "r");
    if (!pipe) return fmt("%p", pc);
    std::vector<std::string> lines;
    char line[1024];
    while (fgets(line, sizeof line, pipe)) {
        std::string s(line);
        while (!s.empty() && (s.back() == '\n' || s.back() == '\r')) s.pop_back();
        lines.push_back(s);
    }
    pclose(pipe);
    if (lines.size() < 2 || lines[1].rfind("??", 0) == 0) return fmt("%p", pc);
    const std::string root = MULTIBOX_EMU_ROOT;
    auto location = [&](std::string s) {
        const size_t discriminator = s.find(" (discriminator");
        if (discriminator != std::string::npos) s.resize(discriminator);
        if (!root.empty() && s.rfind(root, 0) == 0) s = s.substr(root.size());
        return s;
    };
    // "unsigned int block_reduce<256, unsigned int, BitOr>(unsigned int, ...)" -> "block_reduce"
    std::string function = lines[0];
    const size_t cut = function.find_first_of("<(");
    if (cut != std::string::npos) function.resize(cut);
    const size_t space = function.rfind(' ');
    if (space != std::string::npos) function = function.substr(space + 1);
    std::string out = location(lines[1]) + " (" + function + ")";
    for (size_t i = 3; i < lines.size(); i += 2) out += (i == 3 ? ", inlined at " : ", ") + location(lines[i]);
    return out;
}

std::string dims(uint32_t linear, const unsigned d[3]) {
    return fmt("(%u, %u, %u)", linear % d[0], linear / d[0] % d[1], linear / (d[0] * d[1]));
}

const char* verb(uint8_t kind, bool past) {
    if (kind & ACCESS_ATOMIC) return past ? "did an atomic on it" : "does an atomic on it";
    if (kind & ACCESS_WRITE) return past ? "wrote it" : "writes it";
    return past ? "read it" : "reads it";
}

bool is_write(unsigned kind) { return kind & (ACCESS_WRITE | ACCESS_ATOMIC); }
bool both_atomic(uint8_t a, unsigned b) { return (a & ACCESS_ATOMIC) && (b & ACCESS_ATOMIC); }

}  // namespace

// ---------------------------------------------------------------------------
// Launch and block state.

void Checker::begin_launch(unsigned flags, const EmuRegion* regions, size_t n_regions, const void* smem,
                           size_t smem_bytes, unsigned threads) {
    flags_ = flags;
    excluded_.clear();
    regions_.clear();
    by_start_.clear();
    for (size_t i = 0; i < n_regions; ++i) {
        RegionState r;
        r.r = regions[i];
        r.name = regions[i].name ? regions[i].name : "?";
        r.r.name = nullptr;
        if (flags & CHECK_TRAFFIC) r.touched.assign((regions[i].len + 64) / 32 / 64 + 1, 0);
        regions_.push_back(std::move(r));
        by_start_.push_back(unsigned(i));
    }
    std::sort(by_start_.begin(), by_start_.end(),
              [&](unsigned a, unsigned b) { return regions_[a].r.start < regions_[b].r.start; });
    smem_lo_ = uintptr_t(smem);
    smem_hi_ = smem_lo_ + smem_bytes;
    const Range tls = shared_tls_range();
    tls_lo_ = tls.lo;
    tls_hi_ = tls.hi;
    threads_ = threads;
    threads_state_.assign(threads, ThreadState{});
    shadow_.clear();
    last_page_ = ~uintptr_t(0);
    last_granules_ = nullptr;
    releases_.clear();
    seq_ = 0;
    finding_ = Finding{};
    requests_.clear();
    region_traffic_.assign(regions_.size() + 1, EmuRegionTraffic{});
    other_sectors_.clear();
    traffic_ = EmuTraffic{};
    global_atomics_.clear();
    shared_atomics_.clear();
}

void Checker::begin_block(uint32_t linear_block) {
    block_ = linear_block;
    epoch_ = 0;
    for (ThreadState& t : threads_state_) {
        std::memset(t.vc, 0, sizeof t.vc);
        t.fences = t.fence_epoch = 0;
        t.pending.clear();
        t.acquired.clear();
        t.occurrences.clear();
        t.touched.clear();
    }
    block_pending_.clear();
    block_acquired_.clear();
    requests_.clear();
}

void Checker::barrier() {
    ++epoch_;
    for (unsigned base = 0; base < threads_; base += 32)
        converge(base, threads_ - base >= 32 ? 0xffffffffu : (1u << (threads_ - base)) - 1u);
    // What any thread acquired, or observed with an atomic, before the
    // barrier is known to every thread after it.
    for (ThreadState& t : threads_state_) {
        block_pending_.insert(block_pending_.end(), t.pending.begin(), t.pending.end());
        block_acquired_.insert(block_acquired_.end(), t.acquired.begin(), t.acquired.end());
        t.pending.clear();
        t.acquired.clear();
    }
}

// Lanes that meet at a collective or barrier run converged from there, as if
// they had executed each access site equally often: a lane that skipped an
// access (a shorter loop, a false branch) catches up, so that the n-th
// execution of a site groups the same warp instruction across lanes.
void Checker::converge(unsigned base, unsigned group) {
    if (!(flags_ & CHECK_TRAFFIC)) return;
    std::vector<const void*> sites;
    for (unsigned l = 0; l < 32; ++l) {
        if (!((group >> l) & 1u)) continue;
        std::unordered_set<const void*>& t = threads_state_[base + l].touched;
        sites.insert(sites.end(), t.begin(), t.end());
        t.clear();
    }
    if (sites.empty()) return;
    std::sort(sites.begin(), sites.end());
    sites.erase(std::unique(sites.begin(), sites.end()), sites.end());
    for (const void* site : sites) {
        uint32_t most = 0;
        for (unsigned l = 0; l < 32; ++l)
            if ((group >> l) & 1u) most = std::max(most, threads_state_[base + l].occurrences[site]);
        for (unsigned l = 0; l < 32; ++l)
            if ((group >> l) & 1u) threads_state_[base + l].occurrences[site] = most;
    }
}

void Checker::warp_sync(unsigned base, unsigned group) {
    converge(base, group);
    uint32_t joined[32] = {};
    for (unsigned l = 0; l < 32; ++l) {
        if (!((group >> l) & 1u)) continue;
        ThreadState& t = threads_state_[base + l];
        ++t.vc[l];
        for (unsigned j = 0; j < 32; ++j) joined[j] = std::max(joined[j], t.vc[j]);
    }
    for (unsigned l = 0; l < 32; ++l)
        if ((group >> l) & 1u) std::memcpy(threads_state_[base + l].vc, joined, sizeof joined);
}

void Checker::fence() {
    ThreadState& t = threads_state_[cur_];
    ++t.fences;
    t.fence_epoch = epoch_;
    t.acquired.insert(t.acquired.end(), t.pending.begin(), t.pending.end());
    t.acquired.insert(t.acquired.end(), block_pending_.begin(), block_pending_.end());
    t.pending.clear();
}

// ---------------------------------------------------------------------------
// Accesses.

bool Checker::access(uintptr_t addr, unsigned size, unsigned kind, const void* pc) {
    if (size == 0) return true;
    int region = -1;
    const Space space = classify(addr, size, kind, &region, pc);
    if (has_finding()) return false;
    if (space == SPACE_LOCAL) return true;
    if (flags_ & CHECK_TRAFFIC) record_traffic(space, region, addr, size, kind, pc);
    if (flags_ & CHECK_RACES) {
        for (uintptr_t g = addr & ~uintptr_t(3); g < addr + size; g += 4) {
            const uintptr_t lo = std::max(g, addr), hi = std::min(g + 4, addr + size);
            const uint8_t bytes = uint8_t(((1u << (hi - lo)) - 1u) << (lo - g));
            const bool ok = space == SPACE_SHARED ? check_shared(g, bytes, kind, pc) : check_global(g, bytes, kind, pc);
            if (!ok) return false;
        }
        if ((kind & ACCESS_ATOMIC) && space == SPACE_GLOBAL) {
            // This atomic releases what the thread's last fence covered, and
            // observes (acquires, once fenced) every earlier release here.
            ThreadState& t = threads_state_[cur_];
            const uintptr_t sync = addr & ~uintptr_t(3);
            const uint64_t seq = ++seq_;
            releases_[sync].push_back(Release{block_, cur_, t.fences, t.fence_epoch, seq});
            t.pending.push_back(Acquire{sync, seq});
        }
    }
    return true;
}

bool Checker::aligned(uintptr_t addr, unsigned size, unsigned kind, const void* pc) {
    if ((addr & (size - 1)) == 0 || has_finding()) return !has_finding();
    int region = -1;
    const Space space = classify(addr, size, kind, &region, pc);
    // An access out of bounds is reported as that.
    if (has_finding()) return false;
    if (space == SPACE_LOCAL) return true;
    finding_.what = "misaligned access";
    finding_.addr = addr;
    finding_.size = size;
    finding_.second = current(0, kind, pc, 0);
    finding_.detail = fmt("%" PRIuPTR " bytes past a multiple of %u: a GPU faults", addr & (size - 1), size);
    return false;
}

bool Checker::aligned_access(uintptr_t addr, unsigned size, unsigned kind, const void* pc) {
    return aligned(addr, size, kind, pc) && access(addr, size, kind, pc);
}

Checker::Space Checker::classify(uintptr_t addr, unsigned size, unsigned kind, int* region, const void* pc) {
    if (addr >= stack_lo_ && addr < stack_hi_) return SPACE_LOCAL;
    if (addr >= smem_lo_ && addr < smem_hi_) {
        if (addr + size > smem_hi_)
            out_of_bounds(addr, size, kind, pc,
                          fmt("%" PRIuPTR " bytes past the end of the dynamic shared memory (%" PRIuPTR " bytes)",
                              addr + size - smem_hi_, smem_hi_ - smem_lo_));
        return SPACE_SHARED;
    }
    if (addr >= tls_lo_ && addr < tls_hi_) {
        for (const auto& e : excluded_)
            if (addr >= e.first && addr < e.second) return SPACE_LOCAL;
        return SPACE_SHARED;
    }
    if (regions_.empty()) return SPACE_GLOBAL;
    // The last region starting at or before addr.
    auto it = std::upper_bound(by_start_.begin(), by_start_.end(), addr,
                               [&](uintptr_t a, unsigned i) { return a < regions_[i].r.start; });
    const RegionState* before = it == by_start_.begin() ? nullptr : &regions_[*(it - 1)];
    // The region that holds the access: usually that one, but inputs may
    // overlap (a call may pass parts of one buffer as two inputs), and then
    // an earlier, longer region may hold what runs past a later one. (The
    // kernels' own constants are no region's: no search for them.) Without
    // a holder, `before` becomes the one, of those starting at or before
    // addr, that reaches furthest: the message names it.
    const RegionState* holder = before && addr + size <= before->r.start + before->r.len ? before : nullptr;
    if (before && !holder && !in_program_image(addr)) {
        for (auto j = it - 1; j != by_start_.begin() && !holder; --j) {
            const RegionState& r = regions_[*(j - 1)];
            if (addr + size <= r.r.start + r.r.len)
                holder = &r;
            else if (r.r.start + r.r.len > before->r.start + before->r.len)
                before = &r;
        }
    }
    if (holder) {
        const EmuRegion& r = holder->r;
        if (r.end_block != 0 && (block_ < r.first_block || block_ >= r.end_block)) {
            out_of_bounds(addr, size, kind, pc,
                          fmt("inside `%s` (+%" PRIu64 "), which only block%s %u%s may touch", holder->name.c_str(),
                              uint64_t(addr - r.start), r.end_block - r.first_block > 1 ? "s" : "", r.first_block,
                              r.end_block - r.first_block > 1 ? fmt("..%u", r.end_block - 1).c_str() : ""));
            return SPACE_LOCAL;
        }
        if (is_write(kind) && !r.writable) {
            out_of_bounds(addr, size, kind, pc, fmt("a write to read-only `%s` (+%" PRIu64 ")", holder->name.c_str(),
                                                    uint64_t(addr - r.start)));
            return SPACE_LOCAL;
        }
        *region = int(holder - regions_.data());
        return SPACE_GLOBAL;
    }
    if (in_program_image(addr)) return SPACE_LOCAL;
    std::string where = "outside every registered region";
    const uintptr_t end = before ? before->r.start + before->r.len : 0;
    if (before && addr < end)
        where += fmt(": it runs past the end of `%s`", before->name.c_str());
    else if (before && addr == end)
        where += fmt(": just past the end of `%s`", before->name.c_str());
    else if (before && addr < end + 4096)
        where += fmt(": %" PRIu64 " bytes past the end of `%s`", uint64_t(addr - end), before->name.c_str());
    else if (it != by_start_.end())
        where += fmt(": %" PRIu64 " bytes before `%s`", uint64_t(regions_[*it].r.start - addr),
                     regions_[*it].name.c_str());
    out_of_bounds(addr, size, kind, pc, where);
    return SPACE_LOCAL;
}

bool Checker::out_of_bounds(uintptr_t addr, unsigned size, unsigned kind, const void* pc, std::string detail) {
    if (has_finding()) return false;
    finding_.what = "out-of-bounds access";
    finding_.addr = addr;
    finding_.size = size;
    finding_.second = current(0, kind, pc, 0);
    finding_.detail = std::move(detail);
    return false;
}

Checker::Granule& Checker::granule(uintptr_t addr) {
    const uintptr_t page = addr >> 12;
    if (page != last_page_) {
        std::vector<Granule>& g = shadow_[page];
        if (g.empty()) g.resize(1024, Granule{});
        last_page_ = page;
        last_granules_ = g.data();
    }
    return last_granules_[(addr & 0xfff) >> 2];
}

Access Checker::current(uint8_t bytes, unsigned kind, const void* pc, uint32_t clock) const {
    Access a;
    a.pc = pc;
    a.block = block_;
    a.epoch = epoch_;
    a.clock = clock;
    a.warp_clock = threads_state_[cur_].vc[cur_ % 32];
    a.thread = uint16_t(cur_);
    a.bytes = bytes;
    a.kind = uint8_t(kind);
    return a;
}

bool Checker::race(const char* space, const char* order, uintptr_t granule, const Access& earlier, const Access& now) {
    finding_.what = fmt("data race (%s) on %s memory", order, space);
    finding_.addr = granule;
    finding_.size = 4;
    finding_.first = earlier;
    finding_.second = now;
    return false;
}

bool Checker::ordered_shared(const Access& a) const {
    return ordered_in_block(a.thread, a.epoch, a.clock);
}

// Within one block, an earlier access of `thread` (at barrier count `epoch`,
// its warp clock `clock`) is ordered before the current thread's by a
// barrier since, or a warp synchronisation of both since: the rule for
// shared memory, and for global memory between the threads of a block.
bool Checker::ordered_in_block(uint32_t thread, uint32_t epoch, uint32_t clock) const {
    if (thread == cur_ || epoch < epoch_) return true;
    return thread / 32 == cur_ / 32 && threads_state_[cur_].vc[thread % 32] > clock;
}

// A read (or atomic) of static __shared__ bytes must follow a write of them
// by a thread of the same block: before it, a GPU block sees whatever the
// memory held (the emulator, the previous block's values, which would make
// a kernel that forgets to set a value seem to work). Dynamic shared memory
// is exempt: kernels read padding around their runs there and mask it, and
// it is filled with 0xff (NaN, -1) before each block anyway.
bool Checker::initialised_static_shared(Granule& g, uintptr_t addr, uint8_t bytes, unsigned kind, const void* pc) {
    if (addr < tls_lo_ || addr >= tls_hi_) return true;
    if (g.written_block != block_ + 1) {
        g.written_block = block_ + 1;
        g.written_bytes = 0;
    }
    const bool reads = !is_write(kind) || (kind & ACCESS_ATOMIC);
    if (reads && (bytes & ~g.written_bytes)) {
        finding_.what = "read of uninitialised shared memory";
        finding_.addr = addr;
        finding_.size = 4;
        finding_.second = current(bytes, kind, pc, 0);
        finding_.detail = "static __shared__ bytes that no thread of this block has written (a GPU gives "
                          "whatever the memory held; the emulator would give the previous block's values)";
        return false;
    }
    if (is_write(kind)) g.written_bytes |= bytes;
    return true;
}

bool Checker::check_shared(uintptr_t addr, uint8_t bytes, unsigned kind, const void* pc) {
    Granule& g = granule(addr);
    if (!initialised_static_shared(g, addr, bytes, kind, pc)) return false;
    const Access now = current(bytes, kind, pc, threads_state_[cur_].vc[cur_ % 32]);
    auto conflicts = [&](const Access& a) {
        return a.kind && a.block == block_ && a.thread != cur_ && (a.bytes & bytes) && !both_atomic(a.kind, kind) &&
               !ordered_shared(a);
    };
    if (conflicts(g.write)) return race("shared", is_write(kind) ? "write-after-write" : "read-after-write", addr, g.write, now);
    if (is_write(kind)) {
        for (const Access& r : g.read)
            if (conflicts(r)) return race("shared", "write-after-read", addr, r, now);
        // Every earlier read is ordered before this write, so before anything
        // ordered after it: the write stands for them from now on.
        g.write = now;
        g.read[0] = g.read[1] = Access{};
        return true;
    }
    // A read that comes after another (ordered) replaces it; otherwise keep
    // reads of two different warps, which a later write must both follow.
    auto replaceable = [&](const Access& r) {
        return !r.kind || r.block != block_ || r.thread == cur_ || ordered_shared(r);
    };
    if (replaceable(g.read[0])) g.read[0] = now;
    else if (replaceable(g.read[1]) || g.read[1].thread / 32 == cur_ / 32) g.read[1] = now;
    else if (g.read[0].thread / 32 == cur_ / 32) g.read[0] = now;
    return true;
}

bool Checker::released_to(const Acquire& q, const Access& a, uintptr_t addr) const {
    auto it = releases_.find(q.sync);
    if (it == releases_.end()) return false;
    for (const Release& r : it->second) {
        if (r.block != a.block || r.seq >= q.seq) continue;
        if ((a.kind & ACCESS_ATOMIC) && q.sync == addr) return true;   // the atomic chain itself
        if (r.thread == a.thread && r.fences > a.clock) return true;   // fenced by its own thread
        if (r.fence_epoch > a.epoch) return true;                      // fenced after a barrier
    }
    return false;
}

bool Checker::ordered_global(const Access& a, uintptr_t addr) const {
    const ThreadState& t = threads_state_[cur_];
    for (const Acquire& q : t.acquired)
        if (released_to(q, a, addr)) return true;
    for (const Acquire& q : block_acquired_)
        if (released_to(q, a, addr)) return true;
    return false;
}

bool Checker::check_global(uintptr_t addr, uint8_t bytes, unsigned kind, const void* pc) {
    Granule& g = granule(addr);
    const Access now = current(bytes, kind, pc, threads_state_[cur_].fences);
    // Another block's access: ordered only through fences and atomics.
    // Another thread's of this block: by a barrier or a warp
    // synchronisation, as in shared memory (two warps writing one element,
    // say, leave which write lands to the hardware's schedule).
    auto ordered = [&](const Access& a) {
        return a.block == block_ ? ordered_in_block(a.thread, a.epoch, a.warp_clock) : ordered_global(a, addr);
    };
    auto conflicts = [&](const Access& a) {
        return a.kind && (a.bytes & bytes) && !both_atomic(a.kind, kind) && !ordered(a);
    };
    if (conflicts(g.write)) return race("global", is_write(kind) ? "write-after-write" : "read-after-write", addr, g.write, now);
    if (is_write(kind)) {
        for (const Access& r : g.read)
            if (conflicts(r)) return race("global", "write-after-read", addr, r, now);
        g.write = now;
        g.read[0] = g.read[1] = Access{};
        return true;
    }
    // A read ordered before this one is covered by it (a later write that
    // follows this read follows that one too); otherwise keep two unordered
    // reads, preferring one of another block, which no barrier can order.
    auto replaceable = [&](const Access& r) { return !r.kind || ordered(r); };
    if (replaceable(g.read[0])) g.read[0] = now;
    else if (replaceable(g.read[1]) || g.read[1].block == block_) g.read[1] = now;
    return true;
}

// ---------------------------------------------------------------------------
// Traffic.

void Checker::record_traffic(Space space, int region, uintptr_t addr, unsigned size, unsigned kind, const void* pc) {
    ThreadState& t = threads_state_[cur_];
    uint32_t& count = t.occurrences[pc];
    t.touched.insert(pc);
    const uint32_t occurrence = count++;
    Request& r = requests_[RequestKey{cur_ / 32, occurrence, pc}];
    if (r.lanes.empty()) {
        r.space = space;
        r.kind = uint8_t(kind);
        r.region = region;
    }
    r.lanes.emplace_back(addr, size);
    if (space == SPACE_GLOBAL) {
        for (uint64_t s = addr >> 5; s <= (addr + size - 1) >> 5; ++s) {
            if (region < 0) {
                other_sectors_.insert(s);
                continue;
            }
            const uint64_t i = s - (regions_[region].r.start >> 5);
            regions_[region].touched[i / 64] |= 1ull << (i % 64);
        }
    }
    if (kind & ACCESS_ATOMIC) {
        auto& counts = space == SPACE_GLOBAL ? global_atomics_ : shared_atomics_;
        const uint64_t n = ++counts[addr];
        uint64_t& max = space == SPACE_GLOBAL ? traffic_.max_global_atomics_per_address
                                              : traffic_.max_shared_atomics_per_address;
        max = std::max(max, n);
    }
}

void Checker::end_block() {
    if (!(flags_ & CHECK_TRAFFIC)) return;
    std::vector<uint64_t> units;
    std::vector<std::pair<uintptr_t, uintptr_t>> spans;
    for (auto& entry : requests_) {
        const Request& r = entry.second;
        units.clear();
        if (r.space == SPACE_SHARED) {
            // A bank serves one 4-byte word per cycle; lanes reading the same
            // word share it (broadcast). Ways = the most distinct words any
            // bank must serve. A request is conflicted when that is more
            // than its distinct words need over 32 banks: a warp's 8- or
            // 16-byte accesses take 2 or 4 wavefronts however they fall.
            for (const auto& lane : r.lanes)
                for (uint64_t w = lane.first >> 2; w <= (lane.first + lane.second - 1) >> 2; ++w) units.push_back(w);
            std::sort(units.begin(), units.end());
            units.erase(std::unique(units.begin(), units.end()), units.end());
            unsigned per_bank[32] = {};
            uint64_t ways = 0;
            for (uint64_t w : units) ways = std::max<uint64_t>(ways, ++per_bank[w % 32]);
            EmuSharedTraffic& s = traffic_.shared;
            ++s.requests;
            s.wavefronts += ways;
            s.max_ways = std::max(s.max_ways, ways);
            s.conflicted += ways > (units.size() + 31) / 32;
            continue;
        }
        EmuAccessTraffic& t = region_traffic_[r.region < 0 ? regions_.size() : size_t(r.region)]
                                  .access[(r.kind & ACCESS_ATOMIC) ? 2 : (r.kind & ACCESS_WRITE) ? 1 : 0];
        spans.clear();
        for (const auto& lane : r.lanes) {
            for (uint64_t s = lane.first >> 5; s <= (lane.first + lane.second - 1) >> 5; ++s) units.push_back(s);
            spans.emplace_back(lane.first, lane.first + lane.second);
            t.bytes += lane.second;
        }
        std::sort(units.begin(), units.end());
        units.erase(std::unique(units.begin(), units.end()), units.end());
        std::sort(spans.begin(), spans.end());
        uintptr_t covered_to = 0;
        for (const auto& s : spans) {
            const uintptr_t lo = std::max(s.first, covered_to);
            if (s.second > lo) t.used_bytes += s.second - lo;
            covered_to = std::max(covered_to, s.second);
        }
        ++t.requests;
        t.sectors += units.size();
    }
    requests_.clear();
}

void Checker::end_launch(EmuRegionTraffic* regions_out, EmuTraffic* out) {
    if (!(flags_ & CHECK_TRAFFIC)) return;
    for (size_t i = 0; i < regions_.size(); ++i) {
        uint64_t n = 0;
        for (uint64_t word : regions_[i].touched) n += uint64_t(__builtin_popcountll(word));
        region_traffic_[i].unique_sectors = n;
    }
    region_traffic_[regions_.size()].unique_sectors = other_sectors_.size();
    if (regions_out) std::copy(region_traffic_.begin(), region_traffic_.end(), regions_out);
    if (out) *out = traffic_;
}

std::string Checker::describe(const unsigned grid[3], const unsigned block[3]) const {
    const Finding& f = finding_;
    auto who = [&](const Access& a) {
        return fmt("block %s thread %s", dims(a.block, grid).c_str(), dims(a.thread, block).c_str());
    };
    std::string where = fmt("0x%" PRIx64, f.addr);
    for (const RegionState& r : regions_)
        if (f.addr >= r.r.start && f.addr < r.r.start + r.r.len)
            where = fmt("`%s` +%" PRIu64 " (0x%" PRIx64 ")", r.name.c_str(), f.addr - r.r.start, f.addr);
    if (!f.first.kind) {
        // Bounds: one access.
        return fmt("%s: %s %s %u bytes at 0x%" PRIx64 " in %s: %s", f.what.c_str(), who(f.second).c_str(),
                   is_write(f.second.kind) ? "writes" : "reads", f.size, f.addr, site(f.second.pc).c_str(),
                   f.detail.c_str());
    }
    const bool shared = f.what.find("shared") != std::string::npos;
    return fmt("%s at %s: %s %s at %s; earlier, %s %s at %s, and %s", f.what.c_str(), where.c_str(),
               who(f.second).c_str(), verb(f.second.kind, false), site(f.second.pc).c_str(), who(f.first).c_str(),
               verb(f.first.kind, true), site(f.first.pc).c_str(),
               shared ? "no barrier or warp synchronisation naming both threads orders the two"
                      : "no fence-then-atomic release by the one block, acquired by an atomic-then-fence of the "
                        "other, orders the two");
}

}  // namespace detail
}  // namespace emu

// ---------------------------------------------------------------------------
// The callbacks of GCC's -fsanitize=thread instrumentation.

namespace {

inline void plain(const void* addr, unsigned size, unsigned kind, const void* pc) {
    emu::detail::Checker* c = emu::detail::t_checker;
    if (c && c->active() && !c->access(uintptr_t(addr), size, kind, pc)) emu::detail::stop_for_finding();
}

// A GPU faults on an access that is not naturally aligned. The
// instrumentation calls the aligned hooks where the access's type implies
// its alignment (a u32 through a computed pointer, say), and the unaligned
// ones where the compiler does not vouch for it or merged narrower
// accesses itself: only the former are checked here. Vector copies check
// themselves (on_vector_copy).
inline void aligned(const void* addr, unsigned size, unsigned kind, const void* pc) {
    emu::detail::Checker* c = emu::detail::t_checker;
    if (c && c->active() && !c->aligned_access(uintptr_t(addr), size, kind, pc)) emu::detail::stop_for_finding();
}

}  // namespace

void emu::detail::on_atomic(const void* addr, unsigned size, const void* pc) {
    plain(addr, size, ACCESS_ATOMIC | ACCESS_WRITE | ACCESS_READ, pc);
}

void emu::detail::on_fence() {
    Checker* c = t_checker;
    if (c && c->active()) c->fence();
}

void emu::detail::on_vector_copy(void* to, const void* from, unsigned size) {
    Checker* c = t_checker;
    const void* pc = __builtin_return_address(0);
    if (c && c->active() &&
        !(c->aligned(uintptr_t(from), size, ACCESS_READ, pc) && c->aligned(uintptr_t(to), size, ACCESS_WRITE, pc)))
        stop_for_finding();
}

#define EMU_TSAN_ACCESS(n)                                                                                         \
    extern "C" void __tsan_read##n(void* a) { aligned(a, n, emu::detail::ACCESS_READ, __builtin_return_address(0)); } \
    extern "C" void __tsan_write##n(void* a) {                                                                     \
        aligned(a, n, emu::detail::ACCESS_WRITE, __builtin_return_address(0));                                     \
    }                                                                                                              \
    extern "C" void __tsan_unaligned_read##n(void* a) {                                                            \
        plain(a, n, emu::detail::ACCESS_READ, __builtin_return_address(0));                                        \
    }                                                                                                              \
    extern "C" void __tsan_unaligned_write##n(void* a) {                                                           \
        plain(a, n, emu::detail::ACCESS_WRITE, __builtin_return_address(0));                                       \
    }
EMU_TSAN_ACCESS(1)
EMU_TSAN_ACCESS(2)
EMU_TSAN_ACCESS(4)
EMU_TSAN_ACCESS(8)
EMU_TSAN_ACCESS(16)
#undef EMU_TSAN_ACCESS

extern "C" void __tsan_read_range(void* a, unsigned long size) {
    plain(a, unsigned(size), emu::detail::ACCESS_READ, __builtin_return_address(0));
}
extern "C" void __tsan_write_range(void* a, unsigned long size) {
    plain(a, unsigned(size), emu::detail::ACCESS_WRITE, __builtin_return_address(0));
}
extern "C" void __tsan_init() {}
extern "C" void __tsan_func_entry(void*) {}
extern "C" void __tsan_func_exit() {}
extern "C" void __tsan_vptr_update(void**, void*) {}
extern "C" void __tsan_vptr_read(void**) {}
