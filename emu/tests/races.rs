//! The checker finds planted bugs, each reported with its kind and both
//! lines, and passes their correct twins (kernels in
//! emu/tests/kernels/races.cu); its traffic model matches hand-computed
//! counts.
mod common;

use common::{addr, mark_line};
use multibox_emu::{launch_checked, Checks, Region, Traffic};

const RACES: &str = include_str!("kernels/races.cu");
const THREADS: u32 = 128;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct RaceParams {
    out: u64,
    input: u64,
    n: u32,
    variant: u32,
    counter: u64,
    partials: u64,
}

/// 32 i32 on a 128-byte boundary: buffers that start on a sector, as
/// cudaMalloc's do, so that sector counts are the hand-computed ones.
#[repr(C, align(128))]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Line([i32; 32]);

/// `n` i32 from 0, sector-aligned.
fn aligned(n: usize) -> Vec<Line> {
    let mut lines = vec![Line([0; 32]); n.div_ceil(32)];
    for (i, x) in bytemuck::cast_slice_mut::<Line, i32>(&mut lines)
        .iter_mut()
        .enumerate()
    {
        *x = i as i32;
    }
    lines
}

/// Buffers of one launch, registered as regions.
struct Buffers {
    out: Vec<Line>,
    input: Vec<Line>,
    n: usize,
    counter: Vec<u32>,
    partials: Vec<i32>,
    /// Run the blocks last to first ([`Checks::reverse_blocks`]).
    reverse_blocks: bool,
}

impl Buffers {
    fn new(n: usize) -> Self {
        Self {
            out: aligned(4096),
            input: aligned(n),
            n,
            counter: vec![0],
            partials: vec![0; 64],
            reverse_blocks: false,
        }
    }

    fn out(&self) -> &[i32] {
        bytemuck::cast_slice(&self.out)
    }

    /// The first `n` elements of `in`: the region the kernels may read.
    fn input(&self) -> &[i32] {
        &bytemuck::cast_slice(&self.input)[..self.n]
    }

    fn regions(&self) -> Vec<Region> {
        fn region<T>(name: &str, v: &[T], writable: bool) -> Region {
            Region {
                name: name.to_owned(),
                start: addr(v.as_ptr()),
                len: std::mem::size_of_val(v) as u64,
                blocks: None,
                writable,
            }
        }
        vec![
            region("out", self.out(), true),
            region("in", self.input(), false),
            region("counter", &self.counter, true),
            region("partials", &self.partials, true),
        ]
    }

    fn launch(
        &mut self,
        kernel: &str,
        blocks: u32,
        threads: u32,
        variant: u32,
        traffic: bool,
    ) -> Result<Option<Traffic>, String> {
        let regions = self.regions();
        self.launch_in(kernel, blocks, threads, variant, traffic, regions)
    }

    /// As [`Buffers::launch`], with `regions` registered instead of
    /// [`Buffers::regions`].
    fn launch_in(
        &mut self,
        kernel: &str,
        blocks: u32,
        threads: u32,
        variant: u32,
        traffic: bool,
        regions: Vec<Region>,
    ) -> Result<Option<Traffic>, String> {
        assert!(
            multibox_emu::checks_available(),
            "this build has no checker (AddressSanitizer build?)"
        );
        let params = RaceParams {
            out: addr(self.out.as_mut_ptr()),
            input: addr(self.input.as_ptr()),
            n: self.n as u32,
            variant,
            counter: addr(self.counter.as_mut_ptr()),
            partials: addr(self.partials.as_mut_ptr()),
        };
        let checks = Checks {
            races: true,
            traffic,
            regions,
            reverse_blocks: self.reverse_blocks,
            ..Checks::default()
        };
        // SAFETY: the params point into self's Vecs, which the kernels index
        // within their lengths (or within a registered region's bounds: the
        // checker stops an access past them before it happens).
        unsafe {
            launch_checked(
                kernel,
                [blocks, 1, 1],
                [threads, 1, 1],
                0,
                bytemuck::bytes_of(&params),
                &checks,
            )
        }
        .map_err(|e| e.message)
    }
}

fn at(mark: &str) -> String {
    format!("emu/tests/kernels/races.cu:{}", mark_line(RACES, mark))
}

fn assert_has(message: &str, parts: &[&str]) {
    for part in parts {
        assert!(message.contains(part), "{part:?} missing from: {message}");
    }
}

/// Variant 0 runs clean; `variant` fails with a message containing `parts`.
fn planted(kernel: &str, blocks: u32, threads: u32, variant: u32, parts: &[&str]) {
    let mut b = Buffers::new(1000);
    if let Err(e) = b.launch(kernel, blocks, threads, 0, false) {
        panic!("the correct {kernel} was reported: {e}");
    }
    let mut b = Buffers::new(1000);
    let message = b
        .launch(kernel, blocks, threads, variant, false)
        .expect_err("the planted bug was not reported");
    assert_has(&message, &[&format!("kernel `{kernel}`")]);
    assert_has(&message, parts);
}

#[test]
fn a_missing_barrier_is_a_read_after_write() {
    planted(
        "emu_race_missing_barrier",
        2,
        THREADS,
        1,
        &[
            "data race (read-after-write) on shared memory",
            "block (0, 0, 0) thread (32, 0, 0) reads it at",
            &at("missing_barrier_read"),
            "block (0, 0, 0) thread (0, 0, 0) wrote it at",
            &at("missing_barrier_write"),
        ],
    );
}

#[test]
fn scratch_reused_without_a_barrier_is_a_write_after_read() {
    planted(
        "emu_race_scratch_reuse",
        1,
        THREADS,
        1,
        &[
            "data race (write-after-read) on shared memory",
            &format!("writes it at {}", at("scratch_write")),
            &format!("read it at {}", at("scratch_read")),
        ],
    );
}

#[test]
fn a_warp_synchronous_read_needs_syncwarp() {
    planted(
        "emu_race_warp_synchronous",
        1,
        32,
        1,
        &[
            "data race (read-after-write) on shared memory",
            "thread (1, 0, 0) reads it at",
            &at("warp_read"),
            "thread (0, 0, 0) wrote it at",
            &at("warp_write"),
        ],
    );
}

#[test]
fn two_warps_of_a_block_writing_one_global_location_is_a_write_after_write() {
    planted(
        "emu_race_warps_write_global",
        2,
        THREADS,
        1,
        &[
            "data race (write-after-write) on global memory at `out` +0",
            "block (0, 0, 0) thread (32, 0, 0) writes it at",
            &at("warps_global_second"),
            "block (0, 0, 0) thread (0, 0, 0) wrote it at",
            &at("warps_global_first"),
        ],
    );
}

#[test]
fn a_static_shared_value_a_block_never_wrote_is_uninitialised() {
    planted(
        "emu_race_uninitialised_shared",
        2,
        THREADS,
        1,
        &[
            "read of uninitialised shared memory: block (1, 0, 0) thread (",
            &at("uninitialised_read"),
            "no thread of this block has written",
        ],
    );
}

#[test]
fn two_blocks_writing_one_location_is_a_write_after_write() {
    planted(
        "emu_race_blocks_write_write",
        3,
        THREADS,
        1,
        &[
            "data race (write-after-write) on global memory at `out` +0",
            "block (1, 0, 0) thread (0, 0, 0) writes it at",
            "block (0, 0, 0) thread (0, 0, 0) wrote it at",
            &at("blocks_write"),
        ],
    );
}

#[test]
fn the_last_block_reduction_needs_both_fences_and_the_atomic_first() {
    let blocks = 5;
    // The correct pattern runs clean and sums every block.
    let mut b = Buffers::new(1000);
    b.launch("emu_race_last_block", blocks, THREADS, 0, false)
        .unwrap();
    let want: i32 = (0..blocks as i32)
        .map(|blk| (0..THREADS as i32).map(|t| t + blk).sum::<i32>())
        .sum();
    assert_eq!(b.out()[0], want);
    let read_after_write = "data race (read-after-write) on global memory at `partials`";
    // No fence between the partial's write and the atomic.
    planted(
        "emu_race_last_block",
        blocks,
        THREADS,
        1,
        &[
            read_after_write,
            &format!(
                "block (4, 0, 0) thread (0, 0, 0) reads it at {}",
                at("last_read")
            ),
            &format!(
                "block (0, 0, 0) thread (0, 0, 0) wrote it at {}",
                at("last_write")
            ),
        ],
    );
    // No fence between the last block's atomic and its reads.
    planted(
        "emu_race_last_block",
        blocks,
        THREADS,
        2,
        &[read_after_write, &at("last_read"), &at("last_write")],
    );
    // Reading before the atomic has seen the final count.
    planted(
        "emu_race_last_block",
        blocks,
        THREADS,
        3,
        &[
            read_after_write,
            &format!(
                "block (1, 0, 0) thread (0, 0, 0) reads it at {}",
                at("last_early_read")
            ),
            &at("last_write"),
        ],
    );
}

/// A GPU runs blocks in no promised order: the correct reduction is clean
/// and right with the blocks run last to first too, and a "last block"
/// picked by its index rather than by the atomic's count passes in the
/// usual order but not reversed, where block 4 reads the partials first.
#[test]
fn the_last_block_is_the_atomics_whatever_order_the_blocks_run() {
    let blocks = 5;
    let want: i32 = (0..blocks as i32)
        .map(|blk| (0..THREADS as i32).map(|t| t + blk).sum::<i32>())
        .sum();
    for variant in [0, 4] {
        let mut b = Buffers::new(1000);
        b.launch("emu_race_last_block", blocks, THREADS, variant, false)
            .unwrap();
        assert_eq!(b.out()[0], want, "variant {variant}, blocks in order");
    }
    let mut b = Buffers::new(1000);
    b.reverse_blocks = true;
    b.launch("emu_race_last_block", blocks, THREADS, 0, false)
        .unwrap();
    assert_eq!(b.out()[0], want, "blocks reversed");
    let mut b = Buffers::new(1000);
    b.reverse_blocks = true;
    let message = b
        .launch("emu_race_last_block", blocks, THREADS, 4, false)
        .expect_err("a last block by index was not reported with the blocks reversed");
    assert_has(
        &message,
        &[
            "data race (write-after-read) on global memory at `partials`",
            &format!(
                "block (3, 0, 0) thread (0, 0, 0) writes it at {}",
                at("last_write")
            ),
            &format!(
                "block (4, 0, 0) thread (0, 0, 0) read it at {}",
                at("last_read")
            ),
        ],
    );
}

#[test]
fn a_read_past_a_registered_region_is_out_of_bounds() {
    planted(
        "emu_race_bounds",
        1,
        THREADS,
        1,
        &[
            "out-of-bounds access",
            "reads 4 bytes",
            &at("bounds_read"),
            "just past the end of `in`",
        ],
    );
}

#[test]
fn a_misaligned_vector_access_is_reported() {
    planted(
        "emu_race_misaligned",
        1,
        THREADS,
        1,
        &[
            "misaligned access",
            "reads 16 bytes",
            &at("misaligned_load"),
            "4 bytes past a multiple of 16",
        ],
    );
    planted(
        "emu_race_misaligned",
        1,
        THREADS,
        2,
        &[
            "misaligned access",
            "writes 16 bytes",
            &at("misaligned_store"),
            "8 bytes past a multiple of 16",
        ],
    );
}

#[test]
fn regions_owned_by_one_block_and_read_only_regions_are_enforced() {
    let mut b = Buffers::new(1000);
    let mut regions = b.regions();
    // `in` may be read by block 1 only: block 0's read is refused.
    regions[1].blocks = Some(1..2);
    let err = b
        .launch_in("emu_race_bounds", 2, THREADS, 0, false, regions.clone())
        .unwrap_err();
    assert_has(
        &err,
        &[
            "block (0, 0, 0)",
            "inside `in` (+0), which only block 1 may touch",
            &at("bounds_read"),
        ],
    );
    // `out` read-only: the first store is refused.
    regions[1].blocks = None;
    regions[0].writable = false;
    let err = b
        .launch_in("emu_race_bounds", 1, THREADS, 0, false, regions)
        .unwrap_err();
    assert_has(&err, &["writes 4 bytes", "a write to read-only `out` (+0)"]);
}

/// Regions may overlap, as a call's inputs may (parts of one buffer): an
/// access past the end of the later region but inside an earlier, longer
/// one is in bounds, and one past both names the region that reaches
/// furthest.
#[test]
fn overlapping_regions_hold_what_either_holds() {
    let mut b = Buffers::new(1000);
    let mut regions = b.regions();
    // `in` again, from its second element to its tenth.
    let head = Region {
        name: "in_head".to_owned(),
        start: regions[1].start + 4,
        len: 36,
        ..regions[1].clone()
    };
    regions.push(head);
    b.launch_in("emu_race_bounds", 1, THREADS, 0, false, regions.clone())
        .expect("reads of `in` past `in_head` were refused");
    let err = b
        .launch_in("emu_race_bounds", 1, THREADS, 1, false, regions)
        .unwrap_err();
    assert_has(
        &err,
        &[
            "reads 4 bytes",
            &at("bounds_read"),
            "just past the end of `in`",
        ],
    );
}

#[test]
fn contiguous_copy_is_four_sectors_per_request_fully_used() {
    let n = 1024;
    let mut b = Buffers::new(n);
    let t = b
        .launch(
            "emu_traffic_copy",
            (n as u32).div_ceil(THREADS),
            THREADS,
            0,
            true,
        )
        .unwrap()
        .unwrap();
    let input = t.region("in").unwrap();
    assert_eq!(input.loads.requests, n as u64 / 32);
    assert_eq!(input.loads.sectors, n as u64 / 32 * 4);
    assert_eq!(input.loads.sectors_per_request(), 4.0);
    assert_eq!(input.loads.efficiency(), 1.0);
    assert_eq!(input.loads.bytes, 4 * n as u64);
    assert_eq!(input.unique_bytes(), 4 * n as u64);
    let out = t.region("out").unwrap();
    assert_eq!(out.stores.sectors_per_request(), 4.0);
    assert_eq!(out.stores.efficiency(), 1.0);
    assert_eq!(out.unique_bytes(), 4 * n as u64);
    assert_eq!(t.unregistered, Default::default());
}

#[test]
fn stride_32_gather_is_32_sectors_per_request() {
    let n = 256;
    let mut b = Buffers::new(n * 32);
    let t = b
        .launch(
            "emu_traffic_gather",
            (n as u32).div_ceil(THREADS),
            THREADS,
            0,
            true,
        )
        .unwrap()
        .unwrap();
    let input = t.region("in").unwrap();
    assert_eq!(input.loads.requests, n as u64 / 32);
    assert_eq!(input.loads.sectors_per_request(), 32.0);
    assert_eq!(input.loads.efficiency(), 4.0 / 32.0);
    assert_eq!(input.unique_sectors, n as u64);
}

#[test]
fn a_32_way_bank_conflict_reads_as_32_ways() {
    let mut b = Buffers::new(1);
    let t = b
        .launch("emu_traffic_banks", 1, 32, 0, true)
        .unwrap()
        .unwrap();
    assert_eq!(t.shared.max_ways, 32);
    let mut b = Buffers::new(1);
    let t = b
        .launch("emu_traffic_banks", 1, 32, 1, true)
        .unwrap()
        .unwrap();
    // The fill loop and the stride-33 read are conflict-free.
    assert_eq!(t.shared.max_ways, 1);
    assert_eq!(t.shared.conflicted, 0);
    assert_eq!(t.shared.requests, 33 + 1);
}

#[test]
fn atomics_on_one_address_are_counted() {
    let mut b = Buffers::new(1);
    let t = b
        .launch("emu_traffic_atomics", 3, THREADS, 0, true)
        .unwrap()
        .unwrap();
    assert_eq!(t.max_global_atomics_per_address, 3 * THREADS as u64);
    assert_eq!(
        t.region("counter").unwrap().atomics.requests,
        3 * THREADS as u64 / 32
    );
    assert_eq!(b.counter[0], 3 * THREADS);
}

#[test]
fn lanes_reconverge_at_warp_synchronisation() {
    let mut b = Buffers::new(1);
    let t = b
        .launch("emu_traffic_ragged", 1, 32, 0, true)
        .unwrap()
        .unwrap();
    let out = t.region("out").unwrap().stores;
    assert_eq!(out.requests, 6);
    assert_eq!(out.sectors, 3 * (4 + 1));
    assert_eq!(out.efficiency(), 1.0);
}

#[test]
fn a_16_byte_vector_copy_is_one_access_per_lane() {
    let n = 4096;
    let mut b = Buffers::new(n);
    let t = b
        .launch(
            "emu_traffic_vector",
            (n as u32 / 4).div_ceil(THREADS),
            THREADS,
            0,
            true,
        )
        .unwrap()
        .unwrap();
    for a in [
        t.region("in").unwrap().loads,
        t.region("out").unwrap().stores,
    ] {
        assert_eq!(a.requests, n as u64 / 4 / 32);
        assert_eq!(a.sectors_per_request(), 16.0);
        assert_eq!(a.efficiency(), 1.0);
        assert_eq!(a.bytes, 4 * n as u64);
    }
    assert_eq!(&b.out()[..n], b.input());
}

#[test]
fn block_primitives_leave_their_scratch_free_for_reuse() {
    let mut b = Buffers::new(1);
    b.launch("emu_race_primitives_reuse_scratch", 2, THREADS, 0, false)
        .unwrap();
    let out: &[i32] = b.out();
    let sum = (0..THREADS).sum::<u32>();
    for t in 0..2 * THREADS as usize {
        let got: Vec<u32> = out[4 * t..4 * t + 4].iter().map(|&x| x as u32).collect();
        assert_eq!(
            got,
            [t as u32 % THREADS, THREADS, u32::MAX, sum],
            "thread {t}"
        );
    }
}
