// The emulator's checker: data races, out-of-bounds accesses and a memory
// traffic model, fed by the instrumented loads and stores of the kernel code
// (see check.cpp) and by the scheduler's barriers and warp collectives
// (runtime.cpp). Internal to the emulator.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace emu {
namespace detail {

// A buffer or workspace section a launch may touch; mirrors `EmuRegion` in
// emu/src/lib.rs. `end_block == 0`: every block; otherwise only the blocks
// `first_block..end_block` (linear block index).
struct EmuRegion {
    const char* name;
    uint64_t start;
    uint64_t len;
    uint32_t first_block;
    uint32_t end_block;
    uint32_t writable;
    uint32_t unused;
};

// Global memory traffic of one region (or of the unregistered rest), per
// launch; mirrors `EmuRegionTraffic` in lib.rs. Index 0 loads, 1 stores,
// 2 atomics.
struct EmuAccessTraffic {
    uint64_t requests;        // warp requests: the lanes of one warp at one site and occurrence
    uint64_t sectors;         // 32-byte sectors those requests touch, summed over requests
    uint64_t bytes;           // bytes the lanes asked for
    uint64_t used_bytes;      // distinct bytes within each request, summed
};
struct EmuRegionTraffic {
    EmuAccessTraffic access[3];
    uint64_t unique_sectors;  // distinct sectors over the launch: DRAM's lower bound
};
struct EmuSharedTraffic {
    uint64_t requests;
    uint64_t wavefronts;      // sum over requests of the bank-conflict ways
    uint64_t max_ways;
    uint64_t conflicted;      // requests with more ways than their distinct words need (over 32 banks)
};
struct EmuTraffic {
    EmuSharedTraffic shared;
    uint64_t max_global_atomics_per_address;
    uint64_t max_shared_atomics_per_address;
};

// Launch flags (`EMU_CHECK_*` in lib.rs).
constexpr unsigned CHECK_RACES = 1u;
constexpr unsigned CHECK_TRAFFIC = 2u;
constexpr unsigned CHECK_BOUNDS = 4u;  // regions registered
constexpr unsigned CHECK_REVERSE_BLOCKS = 8u;  // run the blocks last to first

enum AccessKind : uint8_t { ACCESS_READ = 1, ACCESS_WRITE = 2, ACCESS_ATOMIC = 4 };

// One access as the shadow memory remembers it.
struct Access {
    const void* pc;     // return address in the kernel code (0: none)
    uint32_t block;     // linear block index
    uint32_t epoch;     // the block's barrier count at the access
    uint32_t clock;     // shared: the thread's own warp clock; global: its fence count
    uint32_t warp_clock;  // global: the thread's own warp clock (the order within a block)
    uint16_t thread;    // linear thread index within the block
    uint8_t bytes;      // which bytes of the 4-byte granule
    uint8_t kind;       // AccessKind bits; 0: empty
};

// What the checker found first; formatted after the block stops.
struct Finding {
    std::string what;   // "data race (read-after-write) on shared memory", "out of bounds", ...
    uint64_t addr = 0;
    unsigned size = 0;
    Access first{}, second{};  // first: the earlier access (pc 0 if none)
    std::string detail;
};

class Checker {
  public:
    // Before the first block.
    void begin_launch(unsigned flags, const EmuRegion* regions, size_t n_regions, const void* smem,
                      size_t smem_bytes, unsigned threads);
    // Memory the kernel code reads that is the emulator's, not the kernel's:
    // the built-ins threadIdx, blockIdx, ... (thread-local like static
    // __shared__ variables, and never written by the kernels).
    void exclude(const void* p, size_t bytes) { excluded_.push_back({uintptr_t(p), uintptr_t(p) + bytes}); }
    void begin_block(uint32_t linear_block);
    // The scheduler resumed thread `thread`, whose stack is [lo, hi).
    void resume(unsigned thread, uintptr_t stack_lo, uintptr_t stack_hi) {
        cur_ = thread;
        stack_lo_ = stack_lo;
        stack_hi_ = stack_hi;
    }
    // Every thread of the block passed a barrier.
    void barrier();
    // The lanes in `group` of the warp starting at thread `base` completed a collective.
    void warp_sync(unsigned base, unsigned group);
    void fence();
    // A load, store or atomic by the current thread. Returns false if it is a
    // finding: the launch must stop.
    bool access(uintptr_t addr, unsigned size, unsigned kind, const void* pc);
    // Whether addr, in shared or global memory, is a multiple of size, as
    // a GPU requires of an access of that size; false if it is a finding.
    bool aligned(uintptr_t addr, unsigned size, unsigned kind, const void* pc);
    // An access whose type implies its alignment: `aligned`, then `access`.
    bool aligned_access(uintptr_t addr, unsigned size, unsigned kind, const void* pc);
    // After the block's threads finished: the traffic of its warp requests.
    void end_block();
    void end_launch(EmuRegionTraffic* regions_out, EmuTraffic* out);

    bool active() const { return flags_ != 0; }
    bool has_finding() const { return !finding_.what.empty(); }
    // The finding as a message, with file:line of both accesses.
    std::string describe(const unsigned grid[3], const unsigned block[3]) const;

  private:
    struct Granule {
        Access write;
        Access read[2];
        // Static __shared__ only: which bytes a thread of block
        // `written_block - 1` wrote (0: none this launch). A GPU gives a
        // block whatever its shared memory held before; the emulator, the
        // previous block's values.
        uint32_t written_block;
        uint8_t written_bytes;
    };
    struct Release {   // a global atomic by `thread` of `block`, after its last fence
        uint32_t block, thread, fences, fence_epoch;
        uint64_t seq;
    };
    struct Acquire {
        uintptr_t sync;  // the atomic's granule
        uint64_t seq;
    };
    struct ThreadState {
        uint32_t vc[32];   // warp vector clock: what this thread knows of each lane
        uint32_t fences = 0, fence_epoch = 0;
        std::vector<Acquire> pending, acquired;
        std::unordered_map<const void*, uint32_t> occurrences;  // traffic: per site
        std::unordered_set<const void*> touched;  // traffic: sites executed since the warp last converged
    };
    enum Space : uint8_t { SPACE_LOCAL, SPACE_SHARED, SPACE_GLOBAL };
    struct RequestKey {
        uint32_t warp, occurrence;
        const void* pc;
        bool operator==(const RequestKey& o) const { return warp == o.warp && occurrence == o.occurrence && pc == o.pc; }
    };
    struct RequestKeyHash {
        size_t operator()(const RequestKey& k) const {
            return std::hash<const void*>()(k.pc) ^ (size_t(k.warp) << 40) ^ (size_t(k.occurrence) * 0x9e3779b97f4a7c15ull);
        }
    };
    struct Request {
        Space space;
        uint8_t kind;
        int region;  // -1: unregistered global memory
        std::vector<std::pair<uintptr_t, unsigned>> lanes;
    };
    struct RegionState {
        EmuRegion r;
        std::string name;
        std::vector<uint64_t> touched;  // traffic: a bit per sector
    };

    Space classify(uintptr_t addr, unsigned size, unsigned kind, int* region, const void* pc);
    bool check_shared(uintptr_t granule, uint8_t bytes, unsigned kind, const void* pc);
    bool check_global(uintptr_t granule, uint8_t bytes, unsigned kind, const void* pc);
    bool ordered_shared(const Access& a) const;
    bool ordered_in_block(uint32_t thread, uint32_t epoch, uint32_t clock) const;
    bool ordered_global(const Access& a, uintptr_t granule) const;
    bool released_to(const Acquire& q, const Access& a, uintptr_t granule) const;
    Granule& granule(uintptr_t addr);
    Access current(uint8_t bytes, unsigned kind, const void* pc, uint32_t clock) const;
    bool race(const char* space, const char* order, uintptr_t granule, const Access& earlier, const Access& now);
    void record_traffic(Space space, int region, uintptr_t addr, unsigned size, unsigned kind, const void* pc);
    bool out_of_bounds(uintptr_t addr, unsigned size, unsigned kind, const void* pc, std::string detail);
    bool initialised_static_shared(Granule& g, uintptr_t addr, uint8_t bytes, unsigned kind, const void* pc);
    void converge(unsigned base, unsigned group);

    unsigned flags_ = 0;
    std::vector<RegionState> regions_;  // the caller's order
    std::vector<unsigned> by_start_;    // indices into regions_, sorted by start
    uintptr_t smem_lo_ = 0, smem_hi_ = 0, tls_lo_ = 0, tls_hi_ = 0;
    uintptr_t stack_lo_ = 0, stack_hi_ = 0;
    std::vector<std::pair<uintptr_t, uintptr_t>> excluded_;
    unsigned threads_ = 0, cur_ = 0;
    uint32_t block_ = 0, epoch_ = 0;
    uint64_t seq_ = 0;
    std::vector<ThreadState> threads_state_;
    std::vector<Acquire> block_pending_, block_acquired_;
    std::unordered_map<uintptr_t, std::vector<Granule>> shadow_;  // 4 KiB page -> 1024 granules
    uintptr_t last_page_ = ~uintptr_t(0);
    Granule* last_granules_ = nullptr;
    std::unordered_map<uintptr_t, std::vector<Release>> releases_;  // per atomic granule
    Finding finding_;

    // Traffic.
    std::unordered_map<RequestKey, Request, RequestKeyHash> requests_;
    std::vector<EmuRegionTraffic> region_traffic_;  // regions_ order, then the unregistered rest
    std::unordered_set<uint64_t> other_sectors_;
    EmuTraffic traffic_{};
    std::unordered_map<uintptr_t, uint64_t> global_atomics_, shared_atomics_;
};

// The hooks of multibox_emu.h (declared there for the kernels).
void on_atomic(const void* addr, unsigned size, const void* pc);
void on_fence();
void on_vector_copy(void* to, const void* from, unsigned size);

// The checker of the launch running on this OS thread, or null.
extern thread_local Checker* t_checker;

}  // namespace detail
}  // namespace emu
