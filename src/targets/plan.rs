//! The launch plan of target assignment: three launches and the workspace
//! layout, a pure function of the shape, mirrored in `kernels/targets.cu`
//! (sizes asserted on both sides).
//!
//! 1. `targets_reset`: zeroes each box's best-prior key and the status word.
//! 2. `targets_match_*`: per (image, tile of [`PRIOR_TILE`] priors), each
//!    prior's best box over the image's boxes (held in shared memory), and
//!    each box's best prior by a 64-bit atomic max.
//! 3. `targets_encode_*`: per (image, tile), the forced matches, the labels
//!    and the encoded offsets.

use super::TargetShape;
use crate::{DType, LabelType, Result};

/// Priors per block of the match and encode kernels (`PRIOR_TILE` in targets.cu).
pub const PRIOR_TILE: u32 = 256;
/// Threads per block of the reset kernel.
pub const RESET_THREADS: u32 = 256;

const ALIGN: usize = 256;

/// The three kernels of an assignment, in launch order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TargetStep {
    /// Zero the per-box keys and the status word.
    Reset,
    /// Per prior its best box; per box its best prior.
    Match,
    /// Forced matches, labels and offsets.
    Encode,
}

impl TargetStep {
    /// The kernel symbol for this step and these types (`dtype` is the
    /// element type of `gt_locations`).
    pub fn kernel_name(self, dtype: DType, labels: LabelType) -> &'static str {
        use DType::*;
        use LabelType::*;
        match (self, dtype, labels) {
            (TargetStep::Reset, _, _) => "targets_reset",
            (TargetStep::Match, _, I32) => "targets_match_i32",
            (TargetStep::Match, _, I64) => "targets_match_i64",
            (TargetStep::Encode, F32, I32) => "targets_encode_f32_i32",
            (TargetStep::Encode, F32, I64) => "targets_encode_f32_i64",
            (TargetStep::Encode, F16, I32) => "targets_encode_f16_i32",
            (TargetStep::Encode, F16, I64) => "targets_encode_f16_i64",
            (TargetStep::Encode, BF16, I32) => "targets_encode_bf16_i32",
            (TargetStep::Encode, BF16, I64) => "targets_encode_bf16_i64",
        }
    }

    /// The file stem in `kernels/` that holds the kernels.
    pub fn source(self) -> &'static str {
        "targets"
    }

    /// Every kernel symbol of target assignment.
    pub fn all_kernel_names() -> Vec<&'static str> {
        let mut names = Vec::new();
        for step in [TargetStep::Reset, TargetStep::Match, TargetStep::Encode] {
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                for labels in [LabelType::I32, LabelType::I64] {
                    let name = step.kernel_name(dtype, labels);
                    if !names.contains(&name) {
                        names.push(name);
                    }
                }
            }
        }
        names
    }
}

/// One launch of target assignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetLaunch {
    /// Which kernel.
    pub step: TargetStep,
    /// Blocks (x only).
    pub grid: u32,
    /// Threads per block.
    pub block: u32,
    /// Dynamic shared memory (none: the tiles are static).
    pub shared_bytes: u32,
}

/// Byte ranges of the assignment's workspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetWorkspace {
    /// `u64` per box `[B * T]`: its best prior as `(iou bits << 32) | !prior`.
    pub box_best: crate::plan::Section,
    /// [`PriorMatch`] per prior `[B * P]`: its best box and that iou.
    pub prior_best: crate::plan::Section,
    /// The `u32` status word.
    pub status: crate::plan::Section,
    /// Total bytes.
    pub bytes: usize,
}

/// The launches and workspace of one assignment call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetPlan {
    /// The shape this plan is for.
    pub shape: TargetShape,
    /// Tiles of [`PRIOR_TILE`] priors per image.
    pub tiles_per_image: u32,
    /// Kernel 1.
    pub reset: TargetLaunch,
    /// Kernel 2.
    pub matching: TargetLaunch,
    /// Kernel 3.
    pub encode: TargetLaunch,
    /// Workspace sections.
    pub workspace: TargetWorkspace,
}

impl TargetPlan {
    /// The plan for `shape`; fails on the shapes [`TargetShape::validate`] rejects.
    pub fn new(shape: TargetShape) -> Result<Self> {
        shape.validate()?;
        let tiles = shape.priors.div_ceil(PRIOR_TILE as usize) as u32;
        let per_prior = |step| TargetLaunch {
            step,
            grid: shape.batch as u32 * tiles,
            block: PRIOR_TILE,
            shared_bytes: 0,
        };
        let mut offset = 0;
        let mut section = |len: usize| {
            let s = crate::plan::Section { offset, len };
            offset = (offset + len).next_multiple_of(ALIGN);
            s
        };
        let box_best = section(shape.batch * shape.max_boxes * 8);
        let prior_best = section(shape.batch * shape.priors * std::mem::size_of::<PriorMatch>());
        let status = section(4);
        let bytes = status.offset + status.len;
        Ok(Self {
            shape,
            tiles_per_image: tiles,
            reset: TargetLaunch {
                step: TargetStep::Reset,
                grid: (shape.batch * shape.max_boxes).div_ceil(RESET_THREADS as usize) as u32,
                block: RESET_THREADS,
                shared_bytes: 0,
            },
            matching: per_prior(TargetStep::Match),
            encode: per_prior(TargetStep::Encode),
            workspace: TargetWorkspace {
                box_best,
                prior_best,
                status,
                bytes,
            },
        })
    }

    /// The launches of a call, in order.
    pub fn launches(&self) -> [TargetLaunch; 3] {
        [self.reset, self.matching, self.encode]
    }
}

/// Bytes of workspace an assignment with this shape needs.
///
/// ```
/// use multibox::targets::{plan, TargetShape};
/// let bytes = plan::workspace_bytes(TargetShape::new(32, 8732, 100))?;
/// assert!(bytes >= 32 * 8732 * 8 + 32 * 100 * 8);
/// # Ok::<(), multibox::Error>(())
/// ```
pub fn workspace_bytes(shape: TargetShape) -> Result<usize> {
    Ok(TargetPlan::new(shape)?.workspace.bytes)
}

/// Kernel 2's result for one prior (`PriorMatch` in targets.cu).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct PriorMatch {
    /// The best box's iou (-1 when the image has no box).
    pub iou: f32,
    /// The best box's row, or -1.
    pub index: i32,
}

/// The kernels' host arguments (`TargetParams` in targets.cu).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct TargetParams {
    pub(crate) priors: u64,
    pub(crate) gt_boxes: u64,
    pub(crate) gt_labels: u64,
    pub(crate) gt_counts: u64,
    pub(crate) labels: u64,
    pub(crate) gt_locations: u64,
    pub(crate) box_best: u64,
    pub(crate) prior_best: u64,
    pub(crate) status: u64,
    pub(crate) batch: u32,
    pub(crate) priors_count: u32,
    pub(crate) max_boxes: u32,
    pub(crate) num_classes: u32,
    pub(crate) tiles_per_image: u32,
    pub(crate) iou_threshold: f32,
    pub(crate) center_variance: f32,
    pub(crate) size_variance: f32,
}

const _: () = assert!(std::mem::size_of::<TargetParams>() == 104);
const _: () = assert!(std::mem::size_of::<PriorMatch>() == 8);

/// Status bits (`TARGET_STATUS_*` in targets.cu).
pub(crate) const STATUS_COUNT_CLAMPED: u32 = 1;
pub(crate) const STATUS_INVALID_BOX_LABEL: u32 = 2;
pub(crate) const STATUS_DEGENERATE_BOX: u32 = 4;
