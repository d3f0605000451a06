//! The CPU reference of target assignment: SPEC.md's steps, in f32, in the
//! reference's order of operations. Rust never fuses a multiply and an add
//! unless asked (`mul_add`), so each operation below rounds once, as
//! PyTorch's float32 CPU kernels do.
//!
//! The kernels (kernels/targets.cu) compute the same values with the same
//! operations; the labels agree bit for bit, the offsets up to the last ulp
//! of `ln` (SPEC.md's tolerance).

use super::{is_valid_box, validate_priors, TargetConfig, TargetShape, TargetStatus};
use crate::{Error, Float, Label, Result};

/// What assignment produces for a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Targets<L> {
    /// `[B, P]`: the class of each prior's matched box, 0 for background.
    pub labels: Vec<L>,
    /// `[B, P, 4]`: each prior's best box, encoded against the prior.
    pub gt_locations: Vec<f32>,
    /// What was recorded about the inputs.
    pub status: TargetStatus,
}

/// A box in corner form.
#[derive(Debug, Clone, Copy)]
struct Corners {
    x0: f32,
    y0: f32,
    x1: f32,
    y1: f32,
}

impl Corners {
    fn of_box(b: &[f32]) -> Self {
        Self {
            x0: b[0],
            y0: b[1],
            x1: b[2],
            y1: b[3],
        }
    }

    /// SPEC step 1: `(cx - w/2, cy - h/2, cx + w/2, cy + h/2)`.
    fn of_prior(p: &[f32]) -> Self {
        let (cx, cy, w, h) = (p[0], p[1], p[2], p[3]);
        Self {
            x0: cx - w / 2.0,
            y0: cy - h / 2.0,
            x1: cx + w / 2.0,
            y1: cy + h / 2.0,
        }
    }

    /// `area_of`: the product of the width and height, each clamped at 0.
    fn area(&self) -> f32 {
        clamp0(self.x1 - self.x0) * clamp0(self.y1 - self.y0)
    }
}

/// `torch.clamp(x, min=0)` for the finite values that reach it.
fn clamp0(x: f32) -> f32 {
    if x < 0.0 {
        0.0
    } else {
        x
    }
}

/// SPEC step 2: `overlap / (area_t + area_p - overlap + 1e-5)`, the box
/// first as in the reference's `iou_of(gt_boxes, priors)`.
pub fn iou(gt_box: [f32; 4], prior_center: [f32; 4]) -> f32 {
    iou_corners(&Corners::of_box(&gt_box), &Corners::of_prior(&prior_center))
}

fn iou_corners(t: &Corners, p: &Corners) -> f32 {
    let left = t.x0.max(p.x0);
    let top = t.y0.max(p.y0);
    let right = t.x1.min(p.x1);
    let bottom = t.y1.min(p.y1);
    let overlap = clamp0(right - left) * clamp0(bottom - top);
    overlap / (t.area() + p.area() - overlap + 1e-5)
}

/// SPEC step 7: the box in center form, encoded against the prior (center form).
pub fn encode(gt_box: [f32; 4], prior: [f32; 4], config: &TargetConfig) -> [f32; 4] {
    let [x0, y0, x1, y1] = gt_box;
    let bcx = (x0 + x1) / 2.0;
    let bcy = (y0 + y1) / 2.0;
    let bw = x1 - x0;
    let bh = y1 - y0;
    let [pcx, pcy, pw, ph] = prior;
    [
        (bcx - pcx) / pw / config.center_variance,
        (bcy - pcy) / ph / config.center_variance,
        (bw / pw).ln() / config.size_variance,
        (bh / ph).ln() / config.size_variance,
    ]
}

/// Target assignment on the CPU, into new vectors; see [`assign_into`].
pub fn assign<L: Label>(
    config: &TargetConfig,
    shape: TargetShape,
    priors: &[f32],
    gt_boxes: &[f32],
    gt_labels: &[L],
    gt_counts: &[i32],
) -> Result<Targets<L>> {
    // Before the outputs are allocated: a shape too large for the kernels'
    // indices, or inputs too short for the shape, is an error, not an
    // allocation of B * P * 5 elements that aborts the process.
    config.validate()?;
    shape.validate()?;
    check_input_lengths(shape, priors, gt_boxes, gt_labels, gt_counts)?;
    validate_priors(priors)?;
    let mut labels = vec![L::default(); shape.labels_len()];
    let mut gt_locations = vec![0.0f32; shape.locations_len()];
    let status = assign_into(
        config,
        shape,
        priors,
        gt_boxes,
        gt_labels,
        gt_counts,
        &mut labels,
        &mut gt_locations,
    )?;
    Ok(Targets {
        labels,
        gt_locations,
        status,
    })
}

/// Target assignment on the CPU (SPEC.md, "Target assignment"), written into
/// `labels` (`[B, P]`) and `gt_locations` (`[B, P, 4]`, rounded once to T).
///
/// `priors` is `[P, 4]` center form, `gt_boxes` `[B, T, 4]` corner form,
/// `gt_labels` `[B, T]`, `gt_counts` `[B]`: image b's boxes are rows
/// `0..gt_counts[b]`; the padding rows are never read.
///
/// Host errors: the config's ranges, the shape, the slices' lengths, and
/// priors that are not finite or have `w, h <= 0`. What the kernels record
/// in their status word (clamped counts, invalid box labels, degenerate
/// boxes) is handled as they do and returned as [`TargetStatus`].
#[allow(clippy::too_many_arguments)]
pub fn assign_into<L: Label, T: Float>(
    config: &TargetConfig,
    shape: TargetShape,
    priors: &[f32],
    gt_boxes: &[f32],
    gt_labels: &[L],
    gt_counts: &[i32],
    labels: &mut [L],
    gt_locations: &mut [T],
) -> Result<TargetStatus> {
    config.validate()?;
    shape.validate()?;
    check_input_lengths(shape, priors, gt_boxes, gt_labels, gt_counts)?;
    check_length("labels", shape.labels_len(), labels.len(), shape)?;
    check_length(
        "gt_locations",
        shape.locations_len(),
        gt_locations.len(),
        shape,
    )?;
    validate_priors(priors)?;

    let (p_count, t_max) = (shape.priors, shape.max_boxes);
    let prior_corners: Vec<Corners> = priors.chunks_exact(4).map(Corners::of_prior).collect();
    let mut status = TargetStatus::default();
    // Per image, reused: each prior's best (iou, box) and each box's best prior.
    let mut best_box: Vec<(f32, usize)> = Vec::with_capacity(p_count);
    let mut valid: Vec<usize> = Vec::with_capacity(t_max);
    // A box label outside 1..C-1 (only below 1 when C is unknown).
    let invalid = |label: L| {
        let label = label.to_i64();
        label < 1 || config.num_classes.is_some_and(|c| label >= i64::from(c))
    };

    for b in 0..shape.batch {
        let count = gt_counts[b];
        if count < 0 || count as usize > t_max {
            status.count_clamped = true;
        }
        let n = count.clamp(0, t_max as i32) as usize;
        let boxes = &gt_boxes[b * t_max * 4..][..n * 4];
        let box_labels = &gt_labels[b * t_max..][..n];
        valid.clear();
        for (t, (bx, &label)) in boxes.chunks_exact(4).zip(box_labels).enumerate() {
            if invalid(label) {
                status.invalid_box_label = true;
            }
            if is_valid_box([bx[0], bx[1], bx[2], bx[3]]) {
                valid.push(t);
            } else {
                status.degenerate_box = true;
            }
        }
        let out_labels = &mut labels[b * p_count..][..p_count];
        let out_locations = &mut gt_locations[b * p_count * 4..][..p_count * 4];
        if valid.is_empty() {
            // SPEC step 8: no box, every label 0 and every offset 0.
            out_labels.fill(L::default());
            out_locations.fill(T::from_f32(0.0));
            continue;
        }
        let corners: Vec<Corners> = valid
            .iter()
            .map(|&t| Corners::of_box(&boxes[t * 4..t * 4 + 4]))
            .collect();

        // Steps 3 and 4 in one sweep. Each prior keeps the first box with
        // the largest iou; each box the first prior (iou compared with NaN
        // as 0, as the kernels' packed keys do).
        best_box.clear();
        let mut best_prior: Vec<(f32, usize)> = vec![(-1.0, 0); valid.len()];
        for (p, pc) in prior_corners.iter().enumerate() {
            let mut best = (-1.0f32, usize::MAX);
            for (k, tc) in corners.iter().enumerate() {
                let v = iou_corners(tc, pc);
                if v > best.0 {
                    best = (v, valid[k]);
                }
                let key = if v > 0.0 { v } else { 0.0 };
                if key > best_prior[k].0 {
                    best_prior[k] = (key, p);
                }
            }
            best_box.push(best);
        }
        // Step 5: forced matches, in box order: a later box wins a shared
        // prior, but a box with an invalid label wins over every valid one,
        // so that its label reaches the loss (whose losses are then NaN,
        // SPEC.md "Bad input") even where a later box shares its prior.
        for invalid_pass in [false, true] {
            for (k, &(_, p)) in best_prior.iter().enumerate() {
                if invalid(box_labels[valid[k]]) == invalid_pass {
                    best_box[p] = (2.0, valid[k]);
                }
            }
        }
        // Steps 6 and 7.
        for (p, &(v, t)) in best_box.iter().enumerate() {
            let out = &mut out_locations[p * 4..p * 4 + 4];
            if t == usize::MAX {
                // Every iou NaN (priors the host could not check): as no box.
                out_labels[p] = L::default();
                out.fill(T::from_f32(0.0));
                continue;
            }
            out_labels[p] = if v < config.iou_threshold {
                L::default()
            } else if box_labels[t].to_i64() < 1 {
                L::from_i64(super::INVALID_PRIOR_LABEL)
            } else {
                box_labels[t]
            };
            let bx = &boxes[t * 4..t * 4 + 4];
            let prior = &priors[p * 4..p * 4 + 4];
            let e = encode(
                [bx[0], bx[1], bx[2], bx[3]],
                [prior[0], prior[1], prior[2], prior[3]],
                config,
            );
            for (o, v) in out.iter_mut().zip(e) {
                *o = T::from_f32(v);
            }
        }
    }
    Ok(status)
}

/// The inputs' lengths against `shape`, in argument order.
fn check_input_lengths<L>(
    shape: TargetShape,
    priors: &[f32],
    gt_boxes: &[f32],
    gt_labels: &[L],
    gt_counts: &[i32],
) -> Result<()> {
    check_length("priors", shape.priors_len(), priors.len(), shape)?;
    check_length("gt_boxes", shape.boxes_len(), gt_boxes.len(), shape)?;
    check_length("gt_labels", shape.box_labels_len(), gt_labels.len(), shape)?;
    check_length("gt_counts", shape.batch, gt_counts.len(), shape)
}

fn check_length(
    name: &'static str,
    expected: usize,
    actual: usize,
    shape: TargetShape,
) -> Result<()> {
    if expected != actual {
        return Err(Error::TargetLengthMismatch {
            name,
            expected,
            actual,
            shape,
        });
    }
    Ok(())
}
