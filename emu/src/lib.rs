//! Test-only CPU emulator for the CUDA kernels in `kernels/*.cu`.
//!
//! Every kernel is compiled for the CPU by `build.rs` and registered under
//! its name. [`launch`] runs one the way a GPU would: each block's threads as
//! fibers with CUDA's barriers, warp shuffles, votes and atomics. Blocks run
//! one after another on the calling thread, so a launch is deterministic. A
//! barrier or warp collective that can never complete makes the launch
//! return an error naming the kernel, the block and the barrier's file:line.
//!
//! Every load and store of the kernel code is seen by a checker
//! ([`launch_checked`]): a data race on shared memory within a block or on
//! global memory between blocks, an access outside the [`Region`]s the
//! caller registered, or a write to a read-only one stops the launch with an
//! error naming both accesses' file:line. On request it also models the
//! launch's memory traffic ([`Traffic`]), and computes exp and log as a
//! GPU's math library may, within CUDA's error bounds
//! ([`Checks::device_math`]). Each kernel file is built as sm_75 and as
//! sm_90 runs it ([`Arch`]).
//!
//! See `emu/README.md` for what it cannot catch.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::fmt;

/// Why a launch was refused or stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmuError {
    /// What went wrong, naming the kernel (and block and barrier, if any).
    pub message: String,
}

impl fmt::Display for EmuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for EmuError {}

/// A buffer or part of one that a launch may touch (registered with
/// [`Checks::regions`]). Once any region is registered, an access outside
/// every region is an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    /// Named in reports, e.g. `keys[image 3]`.
    pub name: String,
    /// Host address of the first byte.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// Only these blocks (linear index) may touch it; `None`: every block.
    pub blocks: Option<std::ops::Range<u32>>,
    /// Whether the kernel may write it (atomics included).
    pub writable: bool,
}

/// What the checker does during one launch.
#[derive(Debug, Clone, Default)]
pub struct Checks {
    /// Report data races (on by default in [`launch`]).
    pub races: bool,
    /// Model the memory traffic ([`Traffic`]).
    pub traffic: bool,
    /// The regions the launch may touch; empty: no bounds check.
    pub regions: Vec<Region>,
    /// Run the blocks from the last to the first (default: first to last).
    /// A GPU promises no order, and what the checker judges (which block
    /// finishes a reduction last, say) is the order that ran.
    pub reverse_blocks: bool,
    /// The device math model, with this seed: each result of `expf`,
    /// `exp2f`, `logf`, `log1pf` and `ex2.approx` moves within CUDA's error
    /// bound for it (2, 2, 1, 1 and 2 ulp), pseudo-randomly but as a
    /// function of its argument, as on a GPU. `None`: the host's results.
    /// Not a check: it works in every build.
    pub device_math: Option<u32>,
    /// Which build of the kernel runs: as sm_75 or as sm_90 would run it.
    pub arch: Arch,
}

/// The GPU architecture whose code paths a launch takes. `build.rs` builds
/// every `kernels/*.cu` twice; the emulator's own test kernels once, for
/// sm_75 unless their file defines `MULTIBOX_EMU_SM`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Arch {
    /// The portable paths, as sm_75 runs them.
    #[default]
    Sm75,
    /// The paths built on sm_80 instructions (`MB_SM80` in common.cuh:
    /// packed half maxima and finiteness checks), as sm_80 and later run
    /// them, the instructions computed as PTX defines them.
    Sm90,
}

impl Arch {
    /// The compute capability, as `MULTIBOX_EMU_SM` spells it.
    pub fn sm(self) -> u32 {
        match self {
            Arch::Sm75 => 75,
            Arch::Sm90 => 90,
        }
    }

    fn from_sm(sm: u32) -> Self {
        match sm {
            90 => Arch::Sm90,
            75 => Arch::Sm75,
            other => panic!("a kernel registered for sm_{other}, which build.rs never builds"),
        }
    }
}

/// Global memory traffic of one kind of access to one region.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AccessTraffic {
    /// Warp requests: the lanes of one warp at one access site and
    /// occurrence (the n-th time each lane executes it).
    pub requests: u64,
    /// 32-byte sectors those requests touch, summed over requests.
    pub sectors: u64,
    /// Bytes the lanes asked for.
    pub bytes: u64,
    /// Distinct bytes within each request, summed over requests.
    pub used_bytes: u64,
}

impl AccessTraffic {
    /// Sectors per warp request (0 without requests).
    pub fn sectors_per_request(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.sectors as f64 / self.requests as f64
        }
    }

    /// Bytes used / bytes in the sectors fetched (1 without requests).
    pub fn efficiency(&self) -> f64 {
        if self.sectors == 0 {
            1.0
        } else {
            self.used_bytes as f64 / (self.sectors * 32) as f64
        }
    }
}

/// The traffic of one region over a launch.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RegionTraffic {
    /// Loads.
    pub loads: AccessTraffic,
    /// Stores.
    pub stores: AccessTraffic,
    /// Atomics.
    pub atomics: AccessTraffic,
    /// Distinct 32-byte sectors the launch touched: the lower bound of its
    /// DRAM traffic for this region.
    pub unique_sectors: u64,
}

impl RegionTraffic {
    /// Lower bound of the DRAM bytes: every sector touched, once.
    pub fn unique_bytes(&self) -> u64 {
        self.unique_sectors * 32
    }
}

/// Shared memory requests and their bank conflicts.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SharedTraffic {
    /// Warp requests to shared memory.
    pub requests: u64,
    /// Sum over requests of the bank-conflict ways (1 = conflict-free).
    pub wavefronts: u64,
    /// The worst request's ways: the most distinct 4-byte words one bank serves.
    pub max_ways: u64,
    /// Requests with more ways than their distinct words need, ceil(words /
    /// 32): a warp's 8- or 16-byte accesses take 2 or 4 wavefronts however
    /// they fall, and count as conflicted only beyond that.
    pub conflicted: u64,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct RawTraffic {
    shared: SharedTraffic,
    max_global_atomics_per_address: u64,
    max_shared_atomics_per_address: u64,
}

/// The memory traffic model of one launch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Per registered region, in the order given: its name and traffic.
    pub regions: Vec<(String, RegionTraffic)>,
    /// Global accesses outside every region (all of them when none is registered).
    pub unregistered: RegionTraffic,
    /// Shared memory.
    pub shared: SharedTraffic,
    /// The largest number of atomics on one global address.
    pub max_global_atomics_per_address: u64,
    /// The largest number of atomics on one shared address.
    pub max_shared_atomics_per_address: u64,
}

impl Traffic {
    /// Every region's traffic, plus the unregistered rest.
    pub fn all(&self) -> impl Iterator<Item = &RegionTraffic> {
        self.regions
            .iter()
            .map(|(_, t)| t)
            .chain([&self.unregistered])
    }

    /// Lower bound of the launch's DRAM bytes: the distinct sectors touched.
    pub fn unique_bytes(&self) -> u64 {
        self.all().map(RegionTraffic::unique_bytes).sum()
    }

    /// The traffic of the region named `name`.
    pub fn region(&self, name: &str) -> Option<&RegionTraffic> {
        self.regions.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }
}

#[repr(C)]
struct RawRegion {
    name: *const c_char,
    start: u64,
    len: u64,
    first_block: u32,
    end_block: u32,
    writable: u32,
    unused: u32,
}

const CHECK_RACES: u32 = 1;
const CHECK_TRAFFIC: u32 = 2;
const CHECK_BOUNDS: u32 = 4;
const CHECK_REVERSE_BLOCKS: u32 = 8;

extern "C" {
    fn multibox_emu_launch(
        name: *const c_char,
        grid: *const u32,
        block: *const u32,
        dynamic_shared_bytes: u32,
        params: *const c_void,
        params_len: usize,
        checks: u32,
        regions: *const RawRegion,
        n_regions: usize,
        region_traffic: *mut RegionTraffic,
        traffic: *mut RawTraffic,
        math_seed: *const u32,
        sm: u32,
        err: *mut c_char,
        err_cap: usize,
    ) -> c_int;
    fn multibox_emu_checks_available() -> c_int;
    fn multibox_emu_kernel_count() -> usize;
    fn multibox_emu_kernel_name(index: usize) -> *const c_char;
    fn multibox_emu_kernel_sm(index: usize) -> u32;
    fn multibox_emu_kernel_params_size(index: usize) -> usize;
}

/// Whether the checker works in this build: the kernels carry the access
/// instrumentation it needs, which AddressSanitizer builds
/// (`MULTIBOX_EMU_SANITIZE=address`) leave out.
pub fn checks_available() -> bool {
    // SAFETY: a constant query without arguments.
    unsafe { multibox_emu_checks_available() != 0 }
}

/// Whether [`launch`] checks for races: in every build that can, unless
/// `MULTIBOX_EMU_RACECHECK=0` turns it off (for a quick look at a kernel that
/// is known to race).
pub fn races_checked_by_default() -> bool {
    checks_available() && std::env::var("MULTIBOX_EMU_RACECHECK").as_deref() != Ok("0")
}

/// Runs kernel `kernel` over `grid` blocks of `block` threads and returns
/// when every block has finished. `params` are the bytes of the kernel's
/// params struct (its size is checked); pointers inside are host pointers.
/// Data races stop the launch with an error (see
/// [`races_checked_by_default`]); no bounds are checked. Safe to call from
/// several threads at once.
///
/// # Safety
///
/// Every pointer in `params` must be valid for the reads and writes the
/// kernel does through it, and nothing else may access that memory during
/// the launch (kernels are C++: an out-of-bounds index is undefined
/// behaviour, as on the GPU).
pub unsafe fn launch(
    kernel: &str,
    grid: [u32; 3],
    block: [u32; 3],
    dynamic_shared_bytes: u32,
    params: &[u8],
) -> Result<(), EmuError> {
    let checks = Checks {
        races: races_checked_by_default(),
        ..Checks::default()
    };
    // SAFETY: the caller's promise, passed on.
    unsafe { launch_checked(kernel, grid, block, dynamic_shared_bytes, params, &checks) }
        .map(|_| ())
}

/// [`launch`] with the checks chosen: races, bounds (an access outside every
/// registered region, outside its block's part of one, or a write to a
/// read-only one is an error) and the traffic model, returned when asked for.
///
/// # Safety
///
/// As for [`launch`]. A registered region does not make memory valid: the
/// check runs as the kernel accesses it.
pub unsafe fn launch_checked(
    kernel: &str,
    grid: [u32; 3],
    block: [u32; 3],
    dynamic_shared_bytes: u32,
    params: &[u8],
    checks: &Checks,
) -> Result<Option<Traffic>, EmuError> {
    let name = CString::new(kernel).map_err(|_| EmuError {
        message: format!("kernel name {kernel:?} contains a NUL byte"),
    })?;
    let wants_checks = checks.races || checks.traffic || !checks.regions.is_empty();
    if wants_checks && !checks_available() {
        return Err(EmuError {
            message:
                "the checker is not available in this build (AddressSanitizer builds leave out the \
                      access instrumentation it needs)"
                    .to_owned(),
        });
    }
    let names: Vec<CString> = checks
        .regions
        .iter()
        .map(|r| CString::new(r.name.replace('\0', " ")).expect("NULs replaced"))
        .collect();
    let regions: Vec<RawRegion> = checks
        .regions
        .iter()
        .zip(&names)
        .map(|(r, name)| {
            let (first_block, end_block) = match &r.blocks {
                Some(b) => (b.start, b.end.max(b.start + 1)),
                None => (0, 0),
            };
            RawRegion {
                name: name.as_ptr(),
                start: r.start,
                len: r.len,
                first_block,
                end_block,
                writable: r.writable.into(),
                unused: 0,
            }
        })
        .collect();
    let flag = |on: bool, bit: u32| if on { bit } else { 0 };
    let flags = flag(checks.races, CHECK_RACES)
        | flag(checks.traffic, CHECK_TRAFFIC)
        | flag(!checks.regions.is_empty(), CHECK_BOUNDS)
        | flag(checks.reverse_blocks, CHECK_REVERSE_BLOCKS);
    let mut region_traffic = vec![RegionTraffic::default(); regions.len() + 1];
    let mut raw_traffic = RawTraffic::default();
    let mut err = vec![0u8; 8192];
    // SAFETY: the name and region names are NUL-terminated and outlive the
    // call, grid/block point to 3 u32 each, regions/region_traffic/params/err
    // are valid for their lengths (region_traffic has one entry more than
    // regions, as the C side writes), math_seed is null or points to a u32
    // that outlives the call; the caller vouches for the pointers
    // inside params. The C++ side catches its own exceptions.
    let rc = unsafe {
        multibox_emu_launch(
            name.as_ptr(),
            grid.as_ptr(),
            block.as_ptr(),
            dynamic_shared_bytes,
            params.as_ptr().cast(),
            params.len(),
            flags,
            regions.as_ptr(),
            regions.len(),
            region_traffic.as_mut_ptr(),
            &mut raw_traffic,
            checks
                .device_math
                .as_ref()
                .map_or(std::ptr::null(), std::ptr::from_ref),
            checks.arch.sm(),
            err.as_mut_ptr().cast(),
            err.len(),
        )
    };
    if rc == 0 {
        if !checks.traffic {
            return Ok(None);
        }
        let unregistered = region_traffic.pop().expect("one entry more than regions");
        return Ok(Some(Traffic {
            regions: checks
                .regions
                .iter()
                .map(|r| r.name.clone())
                .zip(region_traffic)
                .collect(),
            unregistered,
            shared: raw_traffic.shared,
            max_global_atomics_per_address: raw_traffic.max_global_atomics_per_address,
            max_shared_atomics_per_address: raw_traffic.max_shared_atomics_per_address,
        }));
    }
    let message = CStr::from_bytes_until_nul(&err)
        .map(|m| m.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "emulator error (message lost)".to_owned());
    Err(EmuError { message })
}

/// Every registered build of a kernel: its name and architecture, sorted.
pub fn kernel_builds() -> Vec<(String, Arch)> {
    // SAFETY: the registry is filled by static constructors before main and
    // never changes afterwards.
    let count = unsafe { multibox_emu_kernel_count() };
    let mut builds: Vec<(String, Arch)> = (0..count)
        .map(|i| {
            // SAFETY: i < count, and every name is a NUL-terminated string
            // literal with static lifetime.
            let name = unsafe { CStr::from_ptr(multibox_emu_kernel_name(i)) };
            // SAFETY: as above.
            let sm = unsafe { multibox_emu_kernel_sm(i) };
            (name.to_string_lossy().into_owned(), Arch::from_sm(sm))
        })
        .collect();
    builds.sort();
    builds
}

/// The size in bytes of the params struct of `kernel`'s build for `arch`,
/// which [`launch`] expects `params` to have; `None` for a kernel that has
/// no such build.
pub fn params_size(kernel: &str, arch: Arch) -> Option<usize> {
    // SAFETY: as in `kernel_builds`.
    let count = unsafe { multibox_emu_kernel_count() };
    (0..count).find_map(|i| {
        // SAFETY: i < count; the name is a static NUL-terminated literal.
        let name = unsafe { CStr::from_ptr(multibox_emu_kernel_name(i)) };
        // SAFETY: as above.
        let sm = unsafe { multibox_emu_kernel_sm(i) };
        // SAFETY: as above.
        (name.to_bytes() == kernel.as_bytes() && sm == arch.sm())
            .then(|| unsafe { multibox_emu_kernel_params_size(i) })
    })
}

/// The names of every registered kernel, sorted, each once.
pub fn kernel_names() -> Vec<String> {
    let mut names: Vec<String> = kernel_builds().into_iter().map(|(name, _)| name).collect();
    names.dedup();
    names
}
