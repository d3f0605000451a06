//! The launch plan: grids, blocks, shared memory and the workspace layout,
//! as a pure function of the shape, so that tests can check it and the GPU
//! and the emulator run exactly the same sequence.
//!
//! The `#[repr(C)]` records here mirror `kernels/multibox.cuh`; their sizes
//! are asserted on both sides.

use std::ops::Range;

use crate::launch::{RawCall, RawNormalizer, RawUpstream};
use crate::{DType, LabelType, Layout, Result, Shape};

/// Threads per block of the two row passes (`ROW_THREADS` in multibox.cuh).
pub const ROW_THREADS: u32 = 256;
/// Threads per block of the per-image selection (`SELECT_THREADS` in select.cu).
pub const SELECT_THREADS: u32 = 512;
/// At most this many blocks walk the rows (fewer where the device's
/// resident blocks say so, [`GridLimits`]); each leaves one status word,
/// which the selection kernel's last block ORs together. Enough to fill any
/// current GPU several times over, few enough that that pass is cheap.
pub const MAX_ROW_BLOCKS: u32 = 2048;

/// Workspace sections are aligned to this many bytes.
const ALIGN: usize = 256;

/// The fewest bytes between two workspace sections (one 16-byte vector):
/// a write one past a section's end lands in no section, where the test
/// suite's emulator reports it, rather than in the next one, which the
/// same kernel may be allowed to write.
pub const SECTION_GAP: usize = 16;

/// The three kernels of a call, in launch order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Step {
    /// Per prior: log-sum-exp, mining key, the positives' loss terms.
    Rows,
    /// Per image: radix select of the hard negatives; the last block sums the losses.
    Select,
    /// Per prior: the gradients.
    Gradient,
}

impl Step {
    /// The kernel symbol for this step, these types and this layout. Kernel
    /// 3 has an entry per layout (the channel-major one's staging would
    /// otherwise set the registers, and so the occupancy, of both); the
    /// other two serve both layouts.
    pub fn kernel_name(self, dtype: DType, labels: LabelType, layout: Layout) -> &'static str {
        use DType::*;
        use LabelType::*;
        use Layout::*;
        match (self, dtype, labels, layout) {
            (Step::Select, _, _, _) => "multibox_select",
            (Step::Rows, F32, I32, _) => "multibox_rows_f32_i32",
            (Step::Rows, F32, I64, _) => "multibox_rows_f32_i64",
            (Step::Rows, F16, I32, _) => "multibox_rows_f16_i32",
            (Step::Rows, F16, I64, _) => "multibox_rows_f16_i64",
            (Step::Rows, BF16, I32, _) => "multibox_rows_bf16_i32",
            (Step::Rows, BF16, I64, _) => "multibox_rows_bf16_i64",
            (Step::Gradient, F32, I32, RowMajor) => "multibox_gradient_f32_i32",
            (Step::Gradient, F32, I64, RowMajor) => "multibox_gradient_f32_i64",
            (Step::Gradient, F16, I32, RowMajor) => "multibox_gradient_f16_i32",
            (Step::Gradient, F16, I64, RowMajor) => "multibox_gradient_f16_i64",
            (Step::Gradient, BF16, I32, RowMajor) => "multibox_gradient_bf16_i32",
            (Step::Gradient, BF16, I64, RowMajor) => "multibox_gradient_bf16_i64",
            (Step::Gradient, F32, I32, ChannelMajor) => "multibox_gradient_channel_major_f32_i32",
            (Step::Gradient, F32, I64, ChannelMajor) => "multibox_gradient_channel_major_f32_i64",
            (Step::Gradient, F16, I32, ChannelMajor) => "multibox_gradient_channel_major_f16_i32",
            (Step::Gradient, F16, I64, ChannelMajor) => "multibox_gradient_channel_major_f16_i64",
            (Step::Gradient, BF16, I32, ChannelMajor) => "multibox_gradient_channel_major_bf16_i32",
            (Step::Gradient, BF16, I64, ChannelMajor) => "multibox_gradient_channel_major_bf16_i64",
        }
    }

    /// The file stem in `kernels/` that holds this step's kernels.
    pub fn source(self) -> &'static str {
        match self {
            Step::Rows => "rows",
            Step::Select => "select",
            Step::Gradient => "gradient",
        }
    }

    /// This step's kernel symbols, one per combination of types and layout
    /// it is built for (the selection works on keys only, so it has one).
    pub fn kernel_names(self) -> Vec<&'static str> {
        self.names_for(&[Layout::RowMajor, Layout::ChannelMajor])
    }

    /// This step's kernel symbols that serve `layout`, one per type
    /// combination it is built for.
    pub fn layout_kernel_names(self, layout: Layout) -> Vec<&'static str> {
        self.names_for(&[layout])
    }

    fn names_for(self, layouts: &[Layout]) -> Vec<&'static str> {
        let mut names: Vec<&'static str> = Vec::new();
        for &layout in layouts {
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                for labels in [LabelType::I32, LabelType::I64] {
                    let name = self.kernel_name(dtype, labels, layout);
                    if !names.contains(&name) {
                        names.push(name);
                    }
                }
            }
        }
        names
    }

    /// Every kernel symbol the crate launches.
    pub fn all_kernel_names() -> Vec<&'static str> {
        [Step::Rows, Step::Select, Step::Gradient]
            .into_iter()
            .flat_map(Step::kernel_names)
            .collect()
    }
}

/// Which part of the loss a call computes.
///
/// The forward (kernels 1 and 2) writes the losses and leaves the mining
/// decisions (keys, per-image selections, the positive count) in the
/// workspace; the backward (kernel 3) reads them back and writes the
/// gradients. [`Pass::ForwardBackward`] runs all three in one call, for
/// callers who know the upstream gradients before the forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Pass {
    /// The losses only (kernels 1 and 2); no gradient buffer is touched.
    Forward,
    /// The gradients only (kernel 3), from the workspace that a
    /// [`Pass::Forward`] call on the same inputs, shape and configuration
    /// left; no loss output is touched.
    Backward,
    /// The losses and the gradients (kernels 1, 2 and 3).
    #[default]
    ForwardBackward,
}

impl Pass {
    /// Kernels 1 and 2 run: the losses are written, the workspace filled.
    pub fn runs_forward(self) -> bool {
        matches!(self, Pass::Forward | Pass::ForwardBackward)
    }

    /// Kernel 3 runs: the gradients are written.
    pub fn writes_gradients(self) -> bool {
        matches!(self, Pass::Backward | Pass::ForwardBackward)
    }

    /// The pass of the older `backward: bool` flag: `true` is
    /// [`Pass::ForwardBackward`], `false` [`Pass::Forward`].
    pub fn from_backward(backward: bool) -> Self {
        if backward {
            Pass::ForwardBackward
        } else {
            Pass::Forward
        }
    }
}

/// One kernel launch: grid, block and dynamic shared memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Launch {
    /// Which kernel.
    pub step: Step,
    /// Blocks (x only).
    pub grid: u32,
    /// Threads per block.
    pub block: u32,
    /// Dynamic shared memory in bytes.
    pub shared_bytes: u32,
}

/// Byte ranges of the workspace's sections, [`WorkspaceLayout::totals`]
/// first (at offset 0 for every shape), then the others in field order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkspaceLayout {
    /// `u32` mining key per prior, `[B * P]`.
    pub keys: Section,
    /// One [`PositiveTerms`] per prior, `[B * P]` (only positives' are written).
    pub terms: Section,
    /// One `u32` status word per block of kernel 1.
    pub block_status: Section,
    /// One [`ImageSelection`] per image.
    pub images: Section,
    /// One [`Totals`], at offset 0.
    pub totals: Section,
    /// Total bytes.
    pub bytes: usize,
}

impl WorkspaceLayout {
    /// Byte offset of the device status word (see [`crate::DeviceStatus`]).
    pub fn status_offset(&self) -> usize {
        self.totals.offset + std::mem::offset_of!(Totals, status)
    }
}

/// A byte range of the workspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Section {
    /// Offset from the workspace's start, a multiple of 256.
    pub offset: usize,
    /// Length in bytes.
    pub len: usize,
}

/// Everything a call launches, and where it keeps its intermediates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchPlan {
    /// The shape this plan is for.
    pub shape: Shape,
    /// The logits' type, whose size decides how many rows a tile holds.
    pub dtype: DType,
    /// The layout of the call's tensors, which decides the tiles.
    pub layout: Layout,
    /// Kernel 1's lanes per row of logits ([`lanes_per_row`]: 1, 2, 4, ..., 32).
    pub lanes_per_row: u32,
    /// Kernel 3's lanes per row of the classification set ([`set_lanes`]).
    pub set_lanes: u32,
    /// Kernel 3's lanes that copy a set row into shared memory ([`set_copy_lanes`]).
    pub set_copy_lanes: u32,
    /// Rows of kernel 1's tiles in shared memory ([`tile_rows`]): a step of
    /// the lane groups, `ROW_THREADS / lanes_per_row`; 0: rows too long for
    /// a tile, read from global memory. A channel-major tile is this many
    /// consecutive priors of one image.
    pub tile_rows: u32,
    /// Elements between the class planes of kernel 1's channel-major tile
    /// in shared memory ([`plane_stride`]); 0 row-major or unstaged.
    pub plane_stride: u32,
    /// Rows of kernel 3's row-major tiles whose logit gradients are built
    /// in shared memory and stored whole ([`gradient_tile_rows`]):
    /// [`ROW_THREADS`], or 0 (channel-major, or rows too long for a tile).
    pub gradient_tile_rows: u32,
    /// Priors of each part of kernel 3's channel-major tile whose set
    /// logits are staged in shared memory ([`gradient_plane_rows`]: 256,
    /// 128, 64 or 32); 0 row-major, or where not even 32 fit (the set's
    /// logits are then read from global memory).
    pub gradient_plane_rows: u32,
    /// Elements between the class planes of that part in shared memory
    /// ([`gradient_plane_stride`]); 0 where there is no part.
    pub gradient_plane_stride: u32,
    /// Bytes of each of kernel 3's shared slots for the set's rows when
    /// its tile is not staged ([`set_slot_bytes`]); 0: those rows are
    /// read from global memory.
    pub set_slot_bytes: u32,
    /// Kernel 1: per prior.
    pub rows: Launch,
    /// Kernel 2: per image.
    pub select: Launch,
    /// Kernel 3: per tile of [`ROW_THREADS`] priors (the backward); a
    /// channel-major tile stays in one image.
    pub gradient: Launch,
    /// Workspace sections.
    pub workspace: WorkspaceLayout,
}

/// The most blocks of [`ROW_THREADS`] threads a multiprocessor holds on
/// any architecture: 2,048 threads (sm_80, sm_90, sm_100; others hold
/// fewer).
pub const MAX_BLOCKS_PER_SM: usize = 8;

/// How many blocks of one kernel of [`ROW_THREADS`] threads a
/// multiprocessor keeps resident, by the dynamic shared memory each block
/// takes: what the occupancy calculator says for the kernel's registers,
/// its static shared memory and the device. The tile a shape needs decides
/// the blocks: kernel 3's row-major entry holds 5 an sm_90 SM up to C = 81
/// in f16/bf16 (a 41,504-byte tile), and 4 from C = 82 (42,016 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Residency {
    /// Element `k - 1`: the most dynamic shared memory, in bytes, that each
    /// of `k` blocks resident at once may take; `None` where the kernel's
    /// registers or threads allow fewer than `k` blocks whatever the shared
    /// memory.
    pub shared_for: [Option<u32>; MAX_BLOCKS_PER_SM],
}

impl Residency {
    /// `blocks` resident whatever shared memory they take.
    ///
    /// # Panics
    /// If `blocks` is above [`MAX_BLOCKS_PER_SM`].
    pub fn uniform(blocks: usize) -> Self {
        assert!(
            blocks <= MAX_BLOCKS_PER_SM,
            "{blocks} blocks an SM: at most {MAX_BLOCKS_PER_SM}"
        );
        let mut shared_for = [None; MAX_BLOCKS_PER_SM];
        for bytes in shared_for.iter_mut().take(blocks) {
            *bytes = Some(u32::MAX);
        }
        Self { shared_for }
    }

    /// Blocks resident at once when each takes `shared` bytes of dynamic
    /// shared memory; at least 1 (a launch runs its blocks in waves).
    pub fn blocks(&self, shared: u32) -> u32 {
        self.shared_for
            .iter()
            .take_while(|most| most.is_some_and(|most| shared <= most))
            .count()
            .max(1) as u32
    }
}

/// How many blocks of each row kernel the device keeps resident at once:
/// the row kernels' grids stop there, since their blocks walk the tiles
/// with a stride, and more blocks would only wait for a second wave.
/// Without a device ([`GridLimits::default`], `sms` 0) the grids stop at
/// [`MAX_ROW_BLOCKS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GridLimits {
    /// Multiprocessors; 0 where the device is not known.
    pub sms: u32,
    /// Kernel 1's blocks an SM.
    pub rows: Residency,
    /// Kernel 3's blocks an SM, row-major.
    pub gradient: Residency,
    /// Kernel 3's blocks an SM, channel-major (its own entry, with its own
    /// registers).
    pub gradient_channel_major: Residency,
}

impl Default for GridLimits {
    fn default() -> Self {
        Self {
            sms: 0,
            rows: Residency::uniform(MAX_BLOCKS_PER_SM),
            gradient: Residency::uniform(MAX_BLOCKS_PER_SM),
            gradient_channel_major: Residency::uniform(MAX_BLOCKS_PER_SM),
        }
    }
}

impl GridLimits {
    /// Grids of at most `rows` blocks for kernel 1 and `gradient` for
    /// kernel 3: a device of one SM. Tests use it to make a few blocks walk
    /// many tiles.
    ///
    /// # Panics
    /// If either is above [`MAX_BLOCKS_PER_SM`].
    pub fn at_most(rows: usize, gradient: usize) -> Self {
        Self {
            sms: 1,
            rows: Residency::uniform(rows),
            gradient: Residency::uniform(gradient),
            gradient_channel_major: Residency::uniform(gradient),
        }
    }

    /// Kernel 3's residency for `layout`.
    pub fn gradient_for(&self, layout: Layout) -> &Residency {
        match layout {
            Layout::RowMajor => &self.gradient,
            Layout::ChannelMajor => &self.gradient_channel_major,
        }
    }

    /// The grid of a kernel of `residency` whose blocks take `shared` bytes
    /// each, for `blocks` tiles: one block a tile, up to the blocks the
    /// device holds at once, and never more than [`MAX_ROW_BLOCKS`] (the
    /// workspace has a status word for each of kernel 1's).
    fn grid(&self, residency: &Residency, shared: u32, blocks: usize) -> u32 {
        let resident = match self.sms {
            0 => MAX_ROW_BLOCKS,
            sms => sms.saturating_mul(residency.blocks(shared)),
        };
        blocks.min(resident.min(MAX_ROW_BLOCKS) as usize) as u32
    }
}

impl LaunchPlan {
    /// The row-major f32 plan for `shape` on no particular device
    /// ([`GridLimits::default`]); fails on the shapes [`Shape::validate`]
    /// rejects.
    pub fn new(shape: Shape) -> Result<Self> {
        Self::with_limits(shape, DType::F32, Layout::RowMajor, GridLimits::default())
    }

    /// The plan for `shape` with `dtype` logits in `layout` on a device that
    /// keeps `limits` blocks resident. Only the row kernels' lanes, tiles
    /// and grids depend on the type, the layout and the device:
    /// the workspace layout is the same for all of them (its per-block
    /// status words are sized for the largest grid), so [`workspace_bytes`]
    /// fits them all.
    pub fn with_limits(
        shape: Shape,
        dtype: DType,
        layout: Layout,
        limits: GridLimits,
    ) -> Result<Self> {
        shape.validate()?;
        let lanes_per_row = lanes_per_row(shape.classes, dtype);
        let tile_rows = tile_rows(shape, lanes_per_row, layout, dtype);
        let plane_stride = match (layout, tile_rows) {
            (Layout::ChannelMajor, 1..) => rows_plane_stride(shape, tile_rows, dtype),
            _ => 0,
        };
        // With a tile or without, a block takes one step of the lane groups
        // at a time.
        let rows_shared = tile_shared_bytes(shape, tile_rows, layout, dtype);
        let rows_launch = Launch {
            step: Step::Rows,
            grid: limits.grid(
                &limits.rows,
                rows_shared,
                tiles(shape, layout, ROW_THREADS / lanes_per_row),
            ),
            block: ROW_THREADS,
            shared_bytes: rows_shared,
        };

        let gradient_tile_rows = gradient_tile_rows(shape.classes, layout, dtype);
        let gradient_plane_rows = gradient_plane_rows(shape, layout, dtype);
        let gradient_plane_stride = match gradient_plane_rows {
            0 => 0,
            rows => gradient_plane_stride(shape.priors, rows, dtype),
        };
        let set_slot_bytes = set_slot_bytes(shape.classes, layout, dtype);
        let set_lanes = set_lanes(shape.classes, dtype);
        let gradient_shared_bytes = if gradient_tile_rows != 0 {
            row_tile_bytes(shape.classes, gradient_tile_rows, dtype)
        } else if gradient_plane_rows != 0 {
            planes_bytes(gradient_plane_stride, shape.classes, dtype)
        } else {
            (ROW_THREADS / set_lanes) * set_slot_bytes
        };

        let mut offset = 0;
        let mut section = |len: usize| {
            let s = Section { offset, len };
            offset = (offset + len + SECTION_GAP).next_multiple_of(ALIGN);
            s
        };
        // Totals first, at the same offset for every shape: each forward
        // overwrites the stamp a backward checks, and a stale backward's
        // status word lands on a forward's, whatever their shapes.
        let totals = section(std::mem::size_of::<Totals>());
        let keys = section(shape.rows() * 4);
        let terms = section(shape.rows() * std::mem::size_of::<PositiveTerms>());
        // Channel-major tiles stop at image boundaries, so that layout has
        // the most of them, and f32 rows the most lanes, so the fewest rows
        // per tile.
        let most_lanes = [DType::F32, DType::F16, DType::BF16]
            .into_iter()
            .map(|dtype| self::lanes_per_row(shape.classes, dtype))
            .max()
            .unwrap_or(32);
        let most_tiles = tiles(shape, Layout::ChannelMajor, ROW_THREADS / most_lanes);
        let most_row_blocks = most_tiles.min(MAX_ROW_BLOCKS as usize);
        let block_status = section(most_row_blocks * 4);
        let images = section(shape.batch * std::mem::size_of::<ImageSelection>());
        let bytes = images.offset + images.len;

        Ok(Self {
            shape,
            dtype,
            layout,
            lanes_per_row,
            set_lanes,
            set_copy_lanes: set_copy_lanes(shape.classes, dtype),
            tile_rows,
            plane_stride,
            gradient_tile_rows,
            gradient_plane_rows,
            gradient_plane_stride,
            set_slot_bytes,
            rows: rows_launch,
            select: Launch {
                step: Step::Select,
                grid: shape.batch as u32,
                block: SELECT_THREADS,
                shared_bytes: select_shared_bytes(shape),
            },
            // Kernel 3 walks tiles of ROW_THREADS rows, one row per thread
            // for its decisions (see gradient.cu).
            gradient: Launch {
                step: Step::Gradient,
                grid: limits.grid(
                    limits.gradient_for(layout),
                    gradient_shared_bytes,
                    tiles(shape, layout, ROW_THREADS),
                ),
                block: ROW_THREADS,
                shared_bytes: gradient_shared_bytes,
            },
            workspace: WorkspaceLayout {
                keys,
                terms,
                block_status,
                images,
                totals,
                bytes,
            },
        })
    }

    /// The launches of `pass`, in order: the forward is the rows and the
    /// selection, the backward the gradient kernel alone.
    pub fn launches(&self, pass: Pass) -> impl Iterator<Item = Launch> {
        let forward = pass.runs_forward().then_some([self.rows, self.select]);
        let gradient = pass.writes_gradients().then_some(self.gradient);
        forward.into_iter().flatten().chain(gradient)
    }

    /// The memory `step` of `call` may touch, buffer by buffer and workspace
    /// section by section: the kernels' reach, which the test suite's
    /// emulator enforces (an access outside these regions, outside its
    /// block's part, or a write to a read-only one fails the launch).
    ///
    /// The selection's block `b` works on image `b` only: its keys and its
    /// row of the mask are separate regions, so a read one key past the
    /// image is caught even though it stays inside the workspace.
    pub fn regions(&self, step: Step, call: &RawCall) -> Vec<Region> {
        let b = &call.buffers;
        let shape = self.shape;
        let t = call.dtype.size();
        let ws = &self.workspace;
        let section = |name: &str, s: Section, writable| {
            Region::new(name, b.workspace + s.offset as u64, s.len, writable)
        };
        let inputs = || {
            [
                Region::new(
                    "confidence",
                    b.confidence,
                    shape.confidence_len() * t,
                    false,
                ),
                Region::new(
                    "predicted_locations",
                    b.predicted_locations,
                    shape.locations_len() * t,
                    false,
                ),
                Region::new(
                    "labels",
                    b.labels,
                    shape.rows() * call.label_type.size(),
                    false,
                ),
                Region::new(
                    "gt_locations",
                    b.gt_locations,
                    shape.locations_len() * t,
                    false,
                ),
            ]
        };
        let mut regions = Vec::new();
        match step {
            Step::Rows => {
                regions.extend(inputs());
                regions.push(section("keys", ws.keys, true));
                regions.push(section("terms", ws.terms, true));
                regions.push(section("block_status", ws.block_status, true));
                regions.push(section("totals", ws.totals, true));
            }
            Step::Select => {
                let image_bytes = shape.priors * 4;
                for image in 0..shape.batch {
                    let blocks = Some(image as u32..image as u32 + 1);
                    let offset = (image * image_bytes) as u64;
                    let keys = Region::new(
                        &format!("keys[image {image}]"),
                        b.workspace + ws.keys.offset as u64 + offset,
                        image_bytes,
                        false,
                    );
                    regions.push(Region {
                        blocks: blocks.clone(),
                        ..keys
                    });
                    let terms_bytes = shape.priors * std::mem::size_of::<PositiveTerms>();
                    let terms = Region::new(
                        &format!("terms[image {image}]"),
                        b.workspace + (ws.terms.offset + image * terms_bytes) as u64,
                        terms_bytes,
                        false,
                    );
                    regions.push(Region {
                        blocks: blocks.clone(),
                        ..terms
                    });
                    if b.mask != 0 {
                        let mask = Region::new(
                            &format!("mask[image {image}]"),
                            b.mask + (image * shape.priors) as u64,
                            shape.priors,
                            true,
                        );
                        regions.push(Region { blocks, ..mask });
                    }
                }
                regions.push(section("block_status", ws.block_status, false));
                regions.push(section("images", ws.images, true));
                if let RawNormalizer::GivenOnDevice(addr) = call.normalizer {
                    regions.push(Region::new("normalizer", addr, 4, false));
                }
                regions.push(section("totals", ws.totals, true));
                regions.push(Region::new("regression_loss", b.regression_loss, 4, true));
                regions.push(Region::new(
                    "classification_loss",
                    b.classification_loss,
                    4,
                    true,
                ));
                regions.push(Region::new("num_pos", b.num_pos, 4, true));
            }
            Step::Gradient => {
                regions.extend(inputs());
                if let RawUpstream::Device(addr) = call.upstream {
                    regions.push(Region::new("upstream", addr, 8, false));
                }
                regions.push(section("keys", ws.keys, false));
                regions.push(section("images", ws.images, false));
                // The forward's divisor and stamp; block 0 writes the status
                // word when the stamp is not this call's (a stale workspace).
                let totals = b.workspace + ws.totals.offset as u64;
                let status = std::mem::offset_of!(Totals, status);
                let rest = std::mem::offset_of!(Totals, normalizer_kind);
                regions.push(Region {
                    blocks: Some(0..1),
                    ..Region::new("totals.status", totals + status as u64, 4, true)
                });
                regions.push(Region::new(
                    "totals",
                    totals + rest as u64,
                    std::mem::size_of::<Totals>() - rest,
                    false,
                ));
                regions.push(Region::new(
                    "grad_confidence",
                    b.grad_confidence,
                    shape.confidence_len() * t,
                    true,
                ));
                regions.push(Region::new(
                    "grad_locations",
                    b.grad_locations,
                    shape.locations_len() * t,
                    true,
                ));
            }
        }
        regions
    }
}

/// A byte range one kernel of a call may touch ([`LaunchPlan::regions`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    /// The buffer or workspace section, e.g. `confidence`, `keys[image 3]`.
    pub name: String,
    /// Device (or, in the emulator, host) address of the first byte.
    pub addr: u64,
    /// Length in bytes.
    pub len: usize,
    /// Only these blocks may touch it; `None`: every block.
    pub blocks: Option<Range<u32>>,
    /// Whether the kernel writes it.
    pub writable: bool,
}

impl Region {
    pub(crate) fn new(name: &str, addr: u64, len: usize, writable: bool) -> Self {
        Self {
            name: name.to_owned(),
            addr,
            len,
            blocks: None,
            writable,
        }
    }
}

/// Bytes of workspace a call with this shape needs.
///
/// ```
/// let shape = multibox::Shape::new(32, 3000, 21);
/// assert!(multibox::workspace_bytes(shape)? >= 32 * 3000 * 4);
/// # Ok::<(), multibox::Error>(())
/// ```
pub fn workspace_bytes(shape: Shape) -> Result<usize> {
    Ok(LaunchPlan::new(shape)?.workspace.bytes)
}

/// The fewest bytes one call must move through device memory: every input
/// read once and, with `backward`, every gradient written once. The yardstick
/// of the benches and of the emulator's traffic model.
///
/// ```
/// use multibox::{DType, LabelType, Shape};
/// let floor = multibox::plan::bytes_floor(Shape::new(1, 10, 3), DType::F32, LabelType::I64, true);
/// assert_eq!(floor, 2 * 10 * 3 * 4 + 3 * 10 * 4 * 4 + 10 * 8);
/// ```
pub fn bytes_floor(shape: Shape, dtype: DType, labels: LabelType, backward: bool) -> usize {
    let passes = if backward { 2 } else { 1 };
    let logits = passes * shape.confidence_len() * dtype.size();
    let boxes = (passes + 1) * shape.locations_len() * dtype.size(); // pred and gt read
    logits + boxes + shape.rows() * labels.size()
}

/// Dynamic shared memory kernel 1 stages a tile of logits in, at most: what
/// the 48 KiB a block may take without opting in leaves beside kernel 1's
/// static shared memory (2,080 bytes), rounded down to 256 bytes: 46,848.
/// Enough for a thread per row at C = 91 in f16/bf16 (46,624 bytes). Four
/// such blocks, which their registers allow at 256 threads, fit an H100's SM.
pub const ROW_TILE_BYTES: usize = 48 * 1024 - 9 * 256;

/// Dynamic shared memory the selection may keep an image's keys in, at
/// most: with its static shared memory (8,352 bytes: the 2,048-bucket
/// histogram and the scan), within the 48 KiB a block may take without
/// opting in. 9,984 keys: SSD300's 8,732 priors and SSDLite's 3,000 fit.
pub const SELECT_KEYS_BYTES: usize = 39 * 1024;

/// The selection's dynamic shared memory for `shape`: an image's keys
/// (4 bytes a prior) where they fit [`SELECT_KEYS_BYTES`], else 0 (the
/// keys are then read from global memory, L2, in each pass).
///
/// The first pass reads them from global memory anyway (they come from
/// kernel 1); kept, the later radix passes (up to two), the tie search
/// and the pass that writes the mask and adds up the losses wait on
/// shared memory (some 30 cycles a load) instead of L2 (some 250): each
/// of those loops' steps waits on its load before its warp collectives.
pub fn select_shared_bytes(shape: Shape) -> u32 {
    let bytes = shape.priors * 4;
    if bytes <= SELECT_KEYS_BYTES {
        bytes as u32
    } else {
        0
    }
}

/// Kernel 1's lanes per row: the fewest (a power of two up to 32) that
/// leave a row-major tile of one step, `ROW_THREADS / lanes` rows, within
/// [`ROW_TILE_BYTES`]. Each lane takes a contiguous run of `C / lanes`
/// classes (rounded up) and reads it from the staged tile with 16-byte
/// loads. One lane (a thread per row) up to C = 45 in f32 and C = 91 in
/// f16/bf16, two for f32 at C = 81; 32 when not even 8 rows fit (their rows
/// are then read from global memory).
pub fn lanes_per_row(classes: usize, dtype: DType) -> u32 {
    let mut lanes = 1;
    while lanes < 32
        && row_tile_bytes(classes, ROW_THREADS / lanes, dtype) as usize > ROW_TILE_BYTES
    {
        lanes *= 2;
    }
    lanes
}

/// Kernel 3's lanes per row of the classification set. Where its rows are
/// staged in shared memory (a row-major tile fits, [`gradient_tile_rows`]),
/// the smallest power of two that leaves each lane at most 16 classes:
/// every lane a row adds shuffle steps and per-row work, and a lane reads
/// its share as cheaply as the group would. Otherwise the smallest power
/// of two that leaves each at most 4 classes, capped at a warp: such a
/// row's gradients go to global memory, where a group's stores (and, for
/// rows too long for a slot, its loads) should be contiguous. A function
/// of the class count and the type, not of the layout, so that both
/// layouts add a row's terms in the same order. C = 21 gets 2 lanes, C = 81
/// 8 in f16/bf16 and 32 in f32.
pub fn set_lanes(classes: usize, dtype: DType) -> u32 {
    let share = if gradient_tile_rows(classes, Layout::RowMajor, dtype) != 0 {
        16
    } else {
        4
    };
    (classes.div_ceil(share).next_power_of_two() as u32).clamp(1, 32)
}

/// The 16-byte words a row of `classes` elements can cover: it may start at
/// any element of a word.
fn row_words(classes: usize, dtype: DType) -> usize {
    let size = dtype.size();
    (16 - size + classes * size).div_ceil(16)
}

/// Kernel 3's lanes that copy one set row into shared memory (the staged
/// tile or a slot), a 16-byte word a lane: a power of two no smaller than
/// the words a row can cover, and no smaller than [`set_lanes`], so that a
/// round of the copy takes whole lane groups; capped at a warp. C = 21 f16
/// covers at most 4 words and gets 4 lanes, C = 81 bf16 11 words and 16
/// lanes.
pub fn set_copy_lanes(classes: usize, dtype: DType) -> u32 {
    (row_words(classes, dtype).next_power_of_two() as u32)
        .max(set_lanes(classes, dtype))
        .clamp(1, 32)
}

/// Kernel 1's rows per tile: one step of the lane groups,
/// `ROW_THREADS / lanes_per_row`, when it fits [`ROW_TILE_BYTES`]; 0
/// otherwise (the rows are then read from global memory). Channel-major,
/// the planes are padded to P's residue ([`plane_stride`]), so where a
/// row-major tile just fits (C = 90 and 91, and the top of each wider band
/// of lanes per row), whether they fit depends on P (SSDLite's 3,000
/// priors, a multiple of 8, need no padding).
///
/// # Panics
/// If `lanes_per_row` is 0 ([`lanes_per_row`] gives 1 to 32).
pub fn tile_rows(shape: Shape, lanes_per_row: u32, layout: Layout, dtype: DType) -> u32 {
    let rows = ROW_THREADS / lanes_per_row;
    if tile_shared_bytes(shape, rows, layout, dtype) as usize <= ROW_TILE_BYTES {
        rows
    } else {
        0
    }
}

/// Dynamic shared memory kernel 3 builds a row-major tile's logit gradients
/// in, or holds a channel-major tile's logits in, at most: within what the
/// 48 KiB a block may take without opting in leaves beside kernel 3's
/// static shared memory (its lists: 3,888 bytes in the row-major entry,
/// 4,720 in the channel-major one).
pub const GRADIENT_TILE_BYTES: usize = 42 * 1024;

/// Kernel 3's rows per staged tile: row-major, [`ROW_THREADS`] when their
/// logit gradients fit [`GRADIENT_TILE_BYTES`] (C up to 83 in f16/bf16, 41
/// in f32); 0 otherwise, and channel-major, whose stores are whole class
/// planes of a tile's priors and need no staging (its tile holds logits:
/// [`gradient_plane_rows`]).
pub fn gradient_tile_rows(classes: usize, layout: Layout, dtype: DType) -> u32 {
    let fits = row_tile_bytes(classes, ROW_THREADS, dtype) as usize <= GRADIENT_TILE_BYTES;
    if layout == Layout::RowMajor && fits {
        ROW_THREADS
    } else {
        0
    }
}

/// Kernel 3's channel-major tile, staged: it walks its [`ROW_THREADS`]
/// priors in parts of this many, and for each copies into shared memory
/// the 32-byte sectors of the logits that hold a set prior's, each sector
/// whole and once, into the part's class planes
/// ([`gradient_plane_stride`] elements apart). The most priors, of 256,
/// 128, 64 and 32 (a word of the tile's set bitmask), whose planes fit
/// [`GRADIENT_TILE_BYTES`]: the whole tile up to C = 81 in f16/bf16 and 41
/// in f32, then half as many priors for about each doubling of C, down to
/// 32 priors up to C = 537 in f16/bf16 and 298 in f32 (a little more for
/// some P: the planes' padding depends on it). 0 where not even 32 fit, and
/// row-major.
pub fn gradient_plane_rows(shape: Shape, layout: Layout, dtype: DType) -> u32 {
    let fits = |rows| {
        let stride = gradient_plane_stride(shape.priors, rows, dtype);
        planes_bytes(stride, shape.classes, dtype) as usize <= GRADIENT_TILE_BYTES
    };
    match layout {
        Layout::RowMajor => 0,
        Layout::ChannelMajor => [256, 128, 64, 32]
            .into_iter()
            .find(|&rows| fits(rows))
            .unwrap_or(0),
    }
}

/// Elements between kernel 3's staged class planes for parts of `rows`
/// priors: [`plane_stride`] (each plane keeps its offset within 16 bytes),
/// and a 16-byte word more where that stride is a multiple of 32 bytes.
/// A lane group reads one prior's classes across the planes, and planes a
/// multiple of 32 bytes apart share at most 4 of the 32 banks (all of them
/// one bank at 128 bytes: 32-way conflicts for f32 rows at C = 81, a warp
/// a row); 16 bytes more spread consecutive planes over 8 banks.
pub fn gradient_plane_stride(priors: usize, rows: u32, dtype: DType) -> u32 {
    let stride = plane_stride(priors, rows, dtype);
    if (stride as usize * dtype.size()).is_multiple_of(32) {
        stride + (16 / dtype.size()) as u32
    } else {
        stride
    }
}

/// Shared bytes of C class planes `stride` elements apart, after the first
/// plane's offset within 16 bytes (at most 16 bytes less an element).
fn planes_bytes(stride: u32, classes: usize, dtype: DType) -> u32 {
    let size = dtype.size();
    saturating_u32(16 - size + stride as usize * size * classes)
}

/// Kernel 3's shared slot for one set row when its row-major tile is not
/// staged ([`gradient_tile_rows`] is 0): as many bytes as the 16-byte words
/// a row can cover (it keeps its offset within 16 bytes), one slot per lane
/// group, so that the set's rows are read from global memory once, as
/// whole words, and not in each of three passes. 0 where the block's
/// slots would not fit [`GRADIENT_TILE_BYTES`] (f32 rows above 1,341
/// classes, half rows above 2,681; they are read from global memory), and
/// where no slot is needed (a staged tile, or channel-major).
pub fn set_slot_bytes(classes: usize, layout: Layout, dtype: DType) -> u32 {
    let bytes = 16 * row_words(classes, dtype);
    let groups = (ROW_THREADS / set_lanes(classes, dtype)) as usize;
    let unstaged = layout == Layout::RowMajor && gradient_tile_rows(classes, layout, dtype) == 0;
    if unstaged && groups * bytes <= GRADIENT_TILE_BYTES {
        bytes as u32
    } else {
        0
    }
}

/// Dynamic shared memory for a row-major tile of `tile_rows` rows (kernel
/// 1's logits, kernel 3's logit gradients): the tile as it lies in global
/// memory, plus 32 bytes. The copy keeps the logits' offset within a
/// 16-byte line, and a row's last 16-byte load may reach past the tile's
/// last element to the end of its line.
pub fn row_tile_bytes(classes: usize, tile_rows: u32, dtype: DType) -> u32 {
    match tile_rows {
        0 => 0,
        _ => saturating_u32(tile_rows as usize * dtype.size() * classes + 32),
    }
}

/// `n`, or `u32::MAX` where it does not fit: a tile of millions of classes
/// must not wrap around to a size that seems to fit shared memory.
fn saturating_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Kernel 1's channel-major tile in shared memory: elements from one class
/// plane's run of priors to the next. The smallest count no less than
/// `tile_rows` that is congruent to P modulo a 16-byte word's elements, so
/// that every plane keeps in shared memory its global run's offset within
/// 16 bytes, and is copied with 16-byte loads and stores whatever P is.
pub fn plane_stride(priors: usize, tile_rows: u32, dtype: DType) -> u32 {
    let per_word = 16 / dtype.size();
    let pad = (per_word - tile_rows as usize % per_word + priors % per_word) % per_word;
    tile_rows + pad as u32
}

/// Kernel 1's channel-major plane stride for a tile of `tile_rows` priors
/// of `shape`: [`plane_stride`], or up to 7 16-byte words more where that
/// spreads a warp's shared reads over all 32 banks and the tile still fits
/// [`ROW_TILE_BYTES`].
///
/// With `lanes = ROW_THREADS / tile_rows` lanes a row, a warp reads
/// `R = 32 / lanes` consecutive priors of a plane in each lane group's
/// place, and lane `s` of every group reads `s * per` planes further
/// (`per = ceil(C / lanes)` classes a lane). In f32 (a bank a 4-byte
/// element) the lanes' R-element runs fill the 32 banks once when `per *
/// stride` is an odd multiple of R modulo 32; a stride that is a multiple
/// of 32 puts them all on the same R banks. That is f32 at C = 46 to 90,
/// two lanes a row, with P a multiple of 4 (SSD300's 8,732, SSDLite's
/// 3,000): 128 priors a tile, a stride of 128, two words a bank, twice the
/// wavefronts of every read in both passes. The stride must stay congruent
/// to P modulo 4, so P = 2 modulo 4 has no such stride; the half types have
/// one lane a row up to C = 91, where a warp reads 32 consecutive
/// elements whatever the stride, and keep [`plane_stride`] beyond, as does
/// a tile of fewer than 8 rows (more than a warp's lanes a row: the plan
/// never makes one).
pub fn rows_plane_stride(shape: Shape, tile_rows: u32, dtype: DType) -> u32 {
    let least = plane_stride(shape.priors, tile_rows, dtype);
    if dtype != DType::F32 || !(ROW_THREADS / 32..ROW_THREADS).contains(&tile_rows) {
        return least;
    }
    let lanes = (ROW_THREADS / tile_rows) as usize;
    let (rows, per) = (32 / lanes, shape.classes.div_ceil(lanes));
    let spreads = |stride: u32| {
        let offset = per * stride as usize % 32;
        offset.is_multiple_of(rows) && (offset / rows) % 2 == 1
    };
    // A 16-byte word (4 elements) at a time keeps P's residue; 8 of them
    // try every stride modulo 32.
    (0..8)
        .map(|k| least + 4 * k)
        .find(|&stride| {
            spreads(stride) && planes_bytes(stride, shape.classes, dtype) as usize <= ROW_TILE_BYTES
        })
        .unwrap_or(least)
}

/// Dynamic shared memory for kernel 1's tile of `tile_rows` rows of
/// `shape` in `layout`: row-major, [`row_tile_bytes`]; channel-major, the
/// C class planes [`rows_plane_stride`] elements apart, after the first
/// plane's offset within 16 bytes (at most 16 bytes less an element).
pub fn tile_shared_bytes(shape: Shape, tile_rows: u32, layout: Layout, dtype: DType) -> u32 {
    match (tile_rows, layout) {
        (0, _) => 0,
        (_, Layout::RowMajor) => row_tile_bytes(shape.classes, tile_rows, dtype),
        (_, Layout::ChannelMajor) => planes_bytes(
            rows_plane_stride(shape, tile_rows, dtype),
            shape.classes,
            dtype,
        ),
    }
}

/// Tiles of `tile` priors a row kernel walks: runs of consecutive rows
/// across the batch row-major, runs within one image channel-major.
fn tiles(shape: Shape, layout: Layout, tile: u32) -> usize {
    match layout {
        Layout::RowMajor => shape.rows().div_ceil(tile as usize),
        Layout::ChannelMajor => shape.batch * shape.priors.div_ceil(tile as usize),
    }
}

/// A positive prior's loss terms, from kernel 1 to kernel 2
/// (`PositiveTerms` in multibox.cuh).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct PositiveTerms {
    /// `lse - x[label]`.
    pub cross_entropy: f32,
    /// Smooth-L1 over the four offsets.
    pub regression: f32,
}

/// Kernel 2's decision for one image (`ImageSelection` in multibox.cuh).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct ImageSelection {
    /// Candidates with a larger key are mined.
    pub threshold: u32,
    /// Candidates with key == threshold and prior index <= this are mined.
    pub tie_cutoff: i32,
    /// Positives in the image.
    pub num_pos: u32,
    /// Sum of the mined negatives' background losses.
    pub negative_ce: f32,
    /// Sum of the positives' cross-entropy.
    pub positive_ce: f32,
    /// Sum of the positives' smooth-L1.
    pub regression: f32,
    unused: [u32; 2],
}

/// Batch-wide results (`Totals` in multibox.cuh).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Totals {
    /// Kernel 2's arrival counter.
    pub images_done: u32,
    /// N, the batch's positives.
    pub num_pos: u32,
    /// The device status word.
    pub status: u32,
    /// The normaliser the forward used (`NORMALIZER_*` in multibox.cuh).
    pub normalizer_kind: u32,
    /// The batch's divisor (N or n; 0: zero losses and gradients; NaN: NaN).
    pub divisor: f32,
    /// The forward's call stamp, which a backward checks (never 0).
    pub forward_stamp: u32,
    unused: [u32; 2],
}

/// The kernels' host arguments (`MultiboxParams` in multibox.cuh): device
/// addresses, then the shape and the configuration.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct MultiboxParams {
    pub(crate) confidence: u64,
    pub(crate) predicted_locations: u64,
    pub(crate) labels: u64,
    pub(crate) gt_locations: u64,
    pub(crate) upstream: u64,
    pub(crate) grad_confidence: u64,
    pub(crate) grad_locations: u64,
    pub(crate) regression_loss: u64,
    pub(crate) classification_loss: u64,
    pub(crate) num_pos: u64,
    pub(crate) mask: u64,
    pub(crate) normalizer: u64,
    pub(crate) keys: u64,
    pub(crate) terms: u64,
    pub(crate) block_status: u64,
    pub(crate) images: u64,
    pub(crate) totals: u64,
    pub(crate) batch: u32,
    pub(crate) priors: u32,
    pub(crate) classes: u32,
    pub(crate) lanes_per_row: u32,
    pub(crate) set_lanes: u32,
    pub(crate) row_blocks: u32,
    pub(crate) min_negatives: u32,
    pub(crate) neg_pos_ratio: f32,
    pub(crate) beta: f32,
    pub(crate) g_reg: f32,
    pub(crate) g_cls: f32,
    pub(crate) tile_rows: u32,
    pub(crate) layout: u32,
    pub(crate) normalizer_kind: u32,
    pub(crate) normalizer_value: f32,
    pub(crate) gradient_tile_rows: u32,
    pub(crate) set_copy_lanes: u32,
    pub(crate) set_slot_bytes: u32,
    pub(crate) plane_stride: u32,
    pub(crate) gradient_plane_rows: u32,
    pub(crate) gradient_plane_stride: u32,
    pub(crate) select_staged_keys: u32,
    pub(crate) forward_stamp: u32,
    pub(crate) check_forward_stamp: u32,
}

const _: () = assert!(std::mem::size_of::<MultiboxParams>() == 232);
const _: () = assert!(std::mem::size_of::<PositiveTerms>() == 8);
const _: () = assert!(std::mem::size_of::<ImageSelection>() == 32);
const _: () = assert!(std::mem::size_of::<Totals>() == 32);

/// Bits of the device status word (`STATUS_*` in multibox.cuh).
pub(crate) const STATUS_INVALID_LABEL: u32 = 1;
pub(crate) const STATUS_NONFINITE_INPUT: u32 = 2;
pub(crate) const STATUS_STALE_WORKSPACE: u32 = 4;

/// `MultiboxParams::layout` (`LAYOUT_*` in multibox.cuh).
pub(crate) fn layout_code(layout: Layout) -> u32 {
    match layout {
        Layout::RowMajor => 0,
        Layout::ChannelMajor => 1,
    }
}

/// `MultiboxParams::normalizer_kind` (`NORMALIZER_*` in multibox.cuh).
pub(crate) const NORMALIZER_POSITIVES: u32 = 0;
pub(crate) const NORMALIZER_GIVEN: u32 = 1;
pub(crate) const NORMALIZER_PER_IMAGE: u32 = 2;
