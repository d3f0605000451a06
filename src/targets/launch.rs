//! One assignment call's launch sequence, written once for every backend
//! (the CUDA driver in [`super::TargetAssigner`], the CPU emulator in the
//! tests), validated before the first launch.

use super::plan::{TargetParams, TargetPlan};
use super::{TargetConfig, TargetShape};
use crate::launch::{check_alignment, check_overlaps, Extent};
use crate::{Backend, DType, Error, LabelType, Result};

/// Device addresses of one assignment's buffers. Arrays are contiguous and
/// row-major, of the element types the call names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RawTargetBuffers {
    /// `[P, 4]` f32 priors, center form.
    pub priors: u64,
    /// `[B, T, 4]` f32 boxes, corner form; rows past `gt_counts[b]` are never read.
    pub gt_boxes: u64,
    /// `[B, T]` box labels, i32 or i64.
    pub gt_labels: u64,
    /// `[B]` i32 box counts.
    pub gt_counts: u64,
    /// `[B, P]` output labels, the label type.
    pub labels: u64,
    /// `[B, P, 4]` output offsets, f32 / f16 / bf16.
    pub gt_locations: u64,
    /// At least [`super::plan::workspace_bytes`] bytes, 256-byte aligned.
    pub workspace: u64,
    /// Size of the workspace in bytes.
    pub workspace_bytes: usize,
}

/// Everything one raw assignment needs besides the settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RawTargetCall {
    /// B, P, T.
    pub shape: TargetShape,
    /// Element type of `gt_locations` (the loss's T).
    pub dtype: DType,
    /// Element type of `gt_labels` and `labels`.
    pub label_type: LabelType,
    /// Device addresses.
    pub buffers: RawTargetBuffers,
}

/// Validates `call` and launches the three assignment kernels on `backend`.
///
/// A call in which an output (`labels`, `gt_locations`) overlaps an input,
/// another output or the workspace, or the workspace overlaps an input, is
/// refused with [`Error::Overlap`]; inputs may overlap one another.
///
/// # Safety
/// Every address in `call.buffers` must point to memory that `backend` can
/// access, of at least the size the shape and types imply, and stay valid
/// until the launched work completes.
pub unsafe fn launch_assign<B: Backend + ?Sized>(
    config: &TargetConfig,
    call: &RawTargetCall,
    backend: &B,
) -> Result<TargetPlan> {
    config.validate()?;
    let plan = TargetPlan::new(call.shape)?;
    let params = params(config, call, &plan)?;
    let b = &call.buffers;
    let shape = call.shape;
    let l = call.label_type.size();
    let extent = |name, addr, bytes, written| Extent {
        name,
        addr,
        bytes,
        written,
    };
    let extents = [
        extent("priors", b.priors, shape.priors_len() * 4, false),
        extent("gt_boxes", b.gt_boxes, shape.boxes_len() * 4, false),
        extent("gt_labels", b.gt_labels, shape.box_labels_len() * l, false),
        extent("gt_counts", b.gt_counts, shape.batch * 4, false),
        extent("labels", b.labels, shape.labels_len() * l, true),
        extent(
            "gt_locations",
            b.gt_locations,
            shape.locations_len() * call.dtype.size(),
            true,
        ),
        extent("workspace", b.workspace, plan.workspace.bytes, true),
    ];
    check_overlaps(&extents)?;
    for e in extents {
        backend.check_buffer(e.name, e.addr, e.bytes)?;
    }
    for launch in plan.launches() {
        let kernel = launch.step.kernel_name(call.dtype, call.label_type);
        // SAFETY: `params` holds the addresses the caller vouched for,
        // checked for null and alignment above, in TargetParams' layout.
        unsafe {
            backend.launch(
                kernel,
                launch.grid,
                launch.block,
                launch.shared_bytes,
                bytemuck::bytes_of(&params),
            )?
        };
    }
    Ok(plan)
}

fn params(config: &TargetConfig, call: &RawTargetCall, plan: &TargetPlan) -> Result<TargetParams> {
    let b = &call.buffers;
    let l = call.label_type.size();
    let required = [
        ("priors", b.priors, 4),
        ("gt_boxes", b.gt_boxes, 4),
        ("gt_labels", b.gt_labels, l),
        ("gt_counts", b.gt_counts, 4),
        ("labels", b.labels, l),
        ("gt_locations", b.gt_locations, call.dtype.size()),
        ("workspace", b.workspace, 256),
    ];
    for &(name, addr, align) in &required {
        if addr == 0 {
            return Err(Error::NullPointer { name });
        }
        check_alignment(name, addr, align)?;
    }
    if b.workspace_bytes < plan.workspace.bytes {
        return Err(Error::TargetWorkspaceTooSmall {
            expected: plan.workspace.bytes,
            actual: b.workspace_bytes,
            shape: call.shape,
        });
    }
    let ws = &plan.workspace;
    let at = |s: crate::plan::Section| b.workspace + s.offset as u64;
    let shape = call.shape;
    Ok(TargetParams {
        priors: b.priors,
        gt_boxes: b.gt_boxes,
        gt_labels: b.gt_labels,
        gt_counts: b.gt_counts,
        labels: b.labels,
        gt_locations: b.gt_locations,
        box_best: at(ws.box_best),
        prior_best: at(ws.prior_best),
        status: at(ws.status),
        // TargetPlan::new validated that these fit in 32 bits.
        batch: shape.batch as u32,
        priors_count: shape.priors as u32,
        max_boxes: shape.max_boxes as u32,
        num_classes: config.num_classes.unwrap_or(0),
        tiles_per_image: plan.tiles_per_image,
        iou_threshold: config.iou_threshold,
        center_variance: config.center_variance,
        size_variance: config.size_variance,
    })
}
