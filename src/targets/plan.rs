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
            offset = (offset + len + crate::plan::SECTION_GAP).next_multiple_of(ALIGN);
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

    /// The memory `step`'s blocks may touch for `call`, as
    /// [`crate::plan::LaunchPlan::regions`] gives the loss's, for the test
    /// suite's emulator. Blocks `image * tiles_per_image ..` of the match
    /// and encode kernels own image `image`'s count, boxes, box labels,
    /// workspace rows and outputs: a clamped count that reads one row past
    /// its image, or a write into another image's labels, fails the launch
    /// even where it stays inside the buffer. The priors are shared and
    /// read-only; only the kernels that write a buffer may.
    pub fn regions(
        &self,
        step: TargetStep,
        call: &super::launch::RawTargetCall,
    ) -> Vec<crate::plan::Region> {
        use crate::plan::Region;
        let (shape, b, ws) = (self.shape, &call.buffers, &self.workspace);
        let (t, p) = (shape.max_boxes, shape.priors);
        let label = call.label_type.size();
        let box_best = b.workspace + ws.box_best.offset as u64;
        let prior_best = b.workspace + ws.prior_best.offset as u64;
        let status = Region::new("status", b.workspace + ws.status.offset as u64, 4, true);
        if step == TargetStep::Reset {
            return vec![
                Region::new("box_best", box_best, ws.box_best.len, true),
                status,
            ];
        }
        let mut regions = vec![Region::new("priors", b.priors, p * 16, false)];
        let encode = step == TargetStep::Encode;
        for image in 0..shape.batch {
            let first = image as u32 * self.tiles_per_image;
            let owned = |name: &str, addr: u64, len: usize, writable| Region {
                blocks: Some(first..first + self.tiles_per_image),
                ..Region::new(&format!("{name}[image {image}]"), addr, len, writable)
            };
            let per_box = |base: u64, bytes: usize| base + (image * t * bytes) as u64;
            let per_prior = |base: u64, bytes: usize| base + (image * p * bytes) as u64;
            regions.push(owned("gt_counts", b.gt_counts + image as u64 * 4, 4, false));
            regions.push(owned("gt_boxes", per_box(b.gt_boxes, 16), t * 16, false));
            regions.push(owned(
                "gt_labels",
                per_box(b.gt_labels, label),
                t * label,
                false,
            ));
            regions.push(owned("box_best", per_box(box_best, 8), t * 8, !encode));
            regions.push(owned(
                "prior_best",
                per_prior(prior_best, 8),
                p * 8,
                !encode,
            ));
            if encode {
                regions.push(owned("labels", per_prior(b.labels, label), p * label, true));
                let bytes = 4 * call.dtype.size();
                regions.push(owned(
                    "gt_locations",
                    per_prior(b.gt_locations, bytes),
                    p * bytes,
                    true,
                ));
            }
        }
        if !encode {
            regions.push(status);
        }
        regions
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
