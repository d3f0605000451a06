//! The launch plan: grids, blocks, shared memory and the workspace layout,
//! as a pure function of the shape, so that tests can check it and the GPU
//! and the emulator run exactly the same sequence.
//!
//! The `#[repr(C)]` records here mirror `kernels/multibox.cuh`; their sizes
//! are asserted on both sides.

use crate::{DType, LabelType, Result, Shape};

/// Threads per block of the two row passes (`ROW_THREADS` in multibox.cuh).
pub const ROW_THREADS: u32 = 256;
/// Threads per block of the per-image selection (`SELECT_THREADS` in select.cu).
pub const SELECT_THREADS: u32 = 512;
/// At most this many blocks walk the rows; each adds one partial sum, which
/// the selection kernel's last block adds up. Enough to fill any current GPU
/// several times over, few enough that the final sum is cheap.
pub const MAX_ROW_BLOCKS: u32 = 2048;

/// Workspace sections are aligned to this many bytes.
const ALIGN: usize = 256;

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
    /// The kernel symbol for this step and these types.
    pub fn kernel_name(self, dtype: DType, labels: LabelType) -> &'static str {
        use DType::*;
        use LabelType::*;
        match (self, dtype, labels) {
            (Step::Select, _, _) => "multibox_select",
            (Step::Rows, F32, I32) => "multibox_rows_f32_i32",
            (Step::Rows, F32, I64) => "multibox_rows_f32_i64",
            (Step::Rows, F16, I32) => "multibox_rows_f16_i32",
            (Step::Rows, F16, I64) => "multibox_rows_f16_i64",
            (Step::Rows, BF16, I32) => "multibox_rows_bf16_i32",
            (Step::Rows, BF16, I64) => "multibox_rows_bf16_i64",
            (Step::Gradient, F32, I32) => "multibox_gradient_f32_i32",
            (Step::Gradient, F32, I64) => "multibox_gradient_f32_i64",
            (Step::Gradient, F16, I32) => "multibox_gradient_f16_i32",
            (Step::Gradient, F16, I64) => "multibox_gradient_f16_i64",
            (Step::Gradient, BF16, I32) => "multibox_gradient_bf16_i32",
            (Step::Gradient, BF16, I64) => "multibox_gradient_bf16_i64",
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

    /// This step's kernel symbols, one per type combination it is built for
    /// (the selection works on keys only, so it has one).
    pub fn kernel_names(self) -> Vec<&'static str> {
        let mut names: Vec<&'static str> = Vec::new();
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for labels in [LabelType::I32, LabelType::I64] {
                let name = self.kernel_name(dtype, labels);
                if !names.contains(&name) {
                    names.push(name);
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

/// Byte ranges of the workspace's sections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkspaceLayout {
    /// `u32` mining key per prior, `[B * P]`.
    pub keys: Section,
    /// One [`RowBlockPartial`] per row block.
    pub partials: Section,
    /// One [`ImageSelection`] per image.
    pub images: Section,
    /// One [`Totals`].
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
    /// Lanes of a warp that share one row of logits (1, 2, 4, ..., 32).
    pub lanes_per_row: u32,
    /// Kernel 1: per prior.
    pub rows: Launch,
    /// Kernel 2: per image.
    pub select: Launch,
    /// Kernel 3: per prior (the backward).
    pub gradient: Launch,
    /// Workspace sections.
    pub workspace: WorkspaceLayout,
}

impl LaunchPlan {
    /// The plan for `shape`; fails on the shapes [`Shape::validate`] rejects.
    pub fn new(shape: Shape) -> Result<Self> {
        shape.validate()?;
        let lanes_per_row = lanes_per_row(shape.classes);
        let rows_per_step = (ROW_THREADS / lanes_per_row) as usize;
        let steps = shape.rows().div_ceil(rows_per_step);
        let row_blocks = steps.min(MAX_ROW_BLOCKS as usize) as u32;
        let row_launch = |step| Launch {
            step,
            grid: row_blocks,
            block: ROW_THREADS,
            shared_bytes: 0,
        };

        let mut offset = 0;
        let mut section = |len: usize| {
            let s = Section { offset, len };
            offset = (offset + len).next_multiple_of(ALIGN);
            s
        };
        let keys = section(shape.rows() * 4);
        let partials = section(row_blocks as usize * std::mem::size_of::<RowBlockPartial>());
        let images = section(shape.batch * std::mem::size_of::<ImageSelection>());
        let totals = section(std::mem::size_of::<Totals>());
        let bytes = totals.offset + totals.len;

        Ok(Self {
            shape,
            lanes_per_row,
            rows: row_launch(Step::Rows),
            select: Launch {
                step: Step::Select,
                grid: shape.batch as u32,
                block: SELECT_THREADS,
                shared_bytes: 0,
            },
            gradient: row_launch(Step::Gradient),
            workspace: WorkspaceLayout {
                keys,
                partials,
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

/// Lanes per row: the smallest power of two that leaves each lane at most
/// four classes, capped at a warp. C = 21 gets 8 lanes (4 rows per warp),
/// C = 81 and up get 32.
pub fn lanes_per_row(classes: usize) -> u32 {
    (classes.div_ceil(4).next_power_of_two() as u32).clamp(1, 32)
}

/// Kernel 1's per-block sums (`RowBlockPartial` in multibox.cuh).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct RowBlockPartial {
    /// Smooth-L1 sum over the block's positives.
    pub regression: f32,
    /// Cross-entropy sum over the block's positives.
    pub positive_ce: f32,
    /// Status bits seen by the block.
    pub status: u32,
    unused: u32,
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
    unused: u32,
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
    pub(crate) keys: u64,
    pub(crate) partials: u64,
    pub(crate) images: u64,
    pub(crate) totals: u64,
    pub(crate) batch: u32,
    pub(crate) priors: u32,
    pub(crate) classes: u32,
    pub(crate) lanes_per_row: u32,
    pub(crate) row_blocks: u32,
    pub(crate) min_negatives: u32,
    pub(crate) neg_pos_ratio: f32,
    pub(crate) beta: f32,
    pub(crate) g_reg: f32,
    pub(crate) g_cls: f32,
}

const _: () = assert!(std::mem::size_of::<MultiboxParams>() == 160);
const _: () = assert!(std::mem::size_of::<RowBlockPartial>() == 16);
const _: () = assert!(std::mem::size_of::<ImageSelection>() == 16);
const _: () = assert!(std::mem::size_of::<Totals>() == 16);

/// Bits of the device status word (`STATUS_*` in multibox.cuh).
pub(crate) const STATUS_INVALID_LABEL: u32 = 1;
pub(crate) const STATUS_NONFINITE_INPUT: u32 = 2;
