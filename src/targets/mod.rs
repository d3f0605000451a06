//! Target assignment (prior matching and box encoding): the `labels` and
//! `gt_locations` the loss takes, made from each image's ground-truth boxes,
//! as the reference's `MatchPrior` does per image in the data loader.
//!
//! SPEC.md, "Target assignment", fixes the semantics bit for bit in f32.
//! The pieces, one idea per module:
//!
//! - [`priors`]: the standard SSD priors (SSDLite-300, SSD300, or any specs);
//! - [`reference`](mod@reference): the CPU reference, in the reference's f32 order of
//!   operations;
//! - [`plan`]: the kernels' launches and workspace, a pure function of the shape;
//! - [`launch`]: one call's launch sequence on any [`crate::Backend`];
//! - [`TargetAssigner`]: the kernels on a CUDA context, priors uploaded once.
//!
//! ```
//! use multibox::targets::{self, priors, TargetConfig, TargetShape};
//!
//! let priors = priors::ssdlite300();
//! let shape = TargetShape::new(1, priors.len() / 4, 2); // B, P, T
//! let gt_boxes = [0.1, 0.1, 0.5, 0.6, 0.4, 0.2, 0.9, 0.9];
//! let gt_labels = [3i64, 7];
//! let out = targets::reference::assign::<i64>(
//!     &TargetConfig::default(), shape, &priors, &gt_boxes, &gt_labels, &[2])?;
//! assert!(out.labels.iter().any(|&l| l == 3) && out.labels.iter().any(|&l| l == 7));
//! assert!(out.status.is_ok());
//! # Ok::<(), multibox::Error>(())
//! ```

mod assigner;
pub mod launch;
pub mod plan;
pub mod priors;
pub mod reference;

pub use assigner::{TargetAssigner, TargetInputs, TargetOutputs};
pub use launch::{launch_assign, RawTargetBuffers, RawTargetCall};

use crate::{Error, Result};

/// The settings of target assignment (the reference `MultiboxLoss`'s
/// `iou_threshold`, `center_variance`, `size_variance`).
///
/// ```
/// let config = multibox::targets::TargetConfig { iou_threshold: 0.45, ..Default::default() };
/// assert!(config.validate().is_ok());
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TargetConfig {
    /// A prior whose best box has an IoU at least this is positive; in `(0, 1]`, 0.5 by default.
    pub iou_threshold: f32,
    /// Divides the encoded centre offsets; positive and finite, 0.1 by default.
    pub center_variance: f32,
    /// Divides the encoded log sizes; positive and finite, 0.2 by default.
    pub size_variance: f32,
    /// C, the classes of the loss that follows (background included), when
    /// known: a box label `>= C` is then reported as invalid. Box labels
    /// below 1 are reported whatever this is.
    pub num_classes: Option<u32>,
}

impl Default for TargetConfig {
    fn default() -> Self {
        Self {
            iou_threshold: 0.5,
            center_variance: 0.1,
            size_variance: 0.2,
            num_classes: None,
        }
    }
}

impl TargetConfig {
    /// Checks every field's range (SPEC.md: thresholds outside `(0, 1]`,
    /// variances `<= 0` or not finite are host errors).
    pub fn validate(&self) -> Result<()> {
        let t = self.iou_threshold;
        if !(t > 0.0 && t <= 1.0) {
            return Err(Error::InvalidConfig(format!(
                "iou_threshold must be in (0, 1], got {t}"
            )));
        }
        for (name, v) in [
            ("center_variance", self.center_variance),
            ("size_variance", self.size_variance),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(Error::InvalidConfig(format!(
                    "{name} must be a positive finite number, got {v}"
                )));
            }
        }
        if let Some(c) = self.num_classes {
            if c < 2 {
                return Err(Error::InvalidConfig(format!(
                    "num_classes must be at least 2 (background and one class), got {c}"
                )));
            }
        }
        Ok(())
    }
}

/// The shape of one assignment call: `B` images, `P` priors, and `T` box
/// rows per image (the padded length; image b uses `gt_counts[b]` of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TargetShape {
    /// B, the number of images.
    pub batch: usize,
    /// P, the number of priors.
    pub priors: usize,
    /// T, box rows per image (padding included).
    pub max_boxes: usize,
}

impl std::fmt::Display for TargetShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "[B={}, P={}, T={}]",
            self.batch, self.priors, self.max_boxes
        )
    }
}

impl TargetShape {
    /// A shape of `batch` images, `priors` priors and `max_boxes` box rows per image.
    pub const fn new(batch: usize, priors: usize, max_boxes: usize) -> Self {
        Self {
            batch,
            priors,
            max_boxes,
        }
    }

    /// Checks `B >= 1`, `P >= 1`, `T >= 1` and that the kernels' indices fit.
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: &'static str| {
            Err(Error::InvalidTargetShape {
                shape: *self,
                reason,
            })
        };
        if self.batch == 0 {
            return bad("batch must be at least 1");
        }
        if self.priors == 0 {
            return bad("priors must be at least 1");
        }
        if self.max_boxes == 0 {
            return bad(
                "max_boxes must be at least 1 (pad an empty batch to one row with a count of 0)",
            );
        }
        // Grid x of the per-prior kernels is B * ceil(P / 256) < 2^31; prior
        // indices are packed in 32 bits; B * P * 4 and B * T * 4 must fit u64
        // (trivially) and usize.
        const LIMIT: usize = i32::MAX as usize;
        let tiles = self.priors.div_ceil(plan::PRIOR_TILE as usize);
        if self.priors >= LIMIT
            || self.max_boxes >= LIMIT
            || self.batch >= LIMIT
            || self.batch.checked_mul(tiles).is_none_or(|g| g >= LIMIT)
            || self
                .batch
                .checked_mul(self.max_boxes)
                .is_none_or(|n| n >= LIMIT)
            || self.locations_len_checked().is_none()
        {
            return bad("too large for the kernels' 32-bit grid and index arithmetic");
        }
        Ok(())
    }

    fn locations_len_checked(&self) -> Option<usize> {
        self.batch.checked_mul(self.priors)?.checked_mul(4)
    }

    /// `P * 4`: floats in `priors`.
    pub fn priors_len(&self) -> usize {
        self.priors * 4
    }
    /// `B * T * 4`: floats in `gt_boxes`.
    pub fn boxes_len(&self) -> usize {
        self.batch * self.max_boxes * 4
    }
    /// `B * T`: entries of `gt_labels`.
    pub fn box_labels_len(&self) -> usize {
        self.batch * self.max_boxes
    }
    /// `B * P`: entries of the output `labels`.
    pub fn labels_len(&self) -> usize {
        self.batch * self.priors
    }
    /// `B * P * 4`: entries of the output `gt_locations`.
    pub fn locations_len(&self) -> usize {
        self.batch * self.priors * 4
    }
}

/// The label a prior matched to a box labelled below 1 gets: neither
/// background (0) nor ignored (-1), so that the loss counts it an invalid
/// label (SPEC.md, "Bad input": its losses are NaN).
pub const INVALID_PRIOR_LABEL: i64 = -2;

/// What assignment saw in its inputs that SPEC.md has it record rather than
/// refuse (on the GPU it cannot refuse: it never reads back). Later
/// versions may add flags, as [`crate::DeviceStatus`]'s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct TargetStatus {
    /// A `gt_counts[b]` outside `0..=T`, clamped to that range.
    pub count_clamped: bool,
    /// A box label below 1 (or `>= C` when C is known). The priors matched
    /// to such a box get [`INVALID_PRIOR_LABEL`] (below 1) or the label (`>=
    /// C`), so that a following loss call refuses them: losses NaN. Such a
    /// box keeps its best prior even where a later valid box shares it, so
    /// that it always labels one; only a degenerate one (skipped) leaves no
    /// such label, and this flag is its only record. (With C unknown, a
    /// label `>= C` is not seen here: its box is matched as a valid one,
    /// and the loss sees the label only on the priors it keeps.)
    pub invalid_box_label: bool,
    /// A box that is not finite, or has `x1 <= x0` or `y1 <= y0`: skipped as
    /// if absent.
    pub degenerate_box: bool,
}

impl TargetStatus {
    /// Decodes the device status word (`TARGET_STATUS_*` in kernels/targets.cu).
    pub fn from_bits(bits: u32) -> Self {
        Self {
            count_clamped: bits & plan::STATUS_COUNT_CLAMPED != 0,
            invalid_box_label: bits & plan::STATUS_INVALID_BOX_LABEL != 0,
            degenerate_box: bits & plan::STATUS_DEGENERATE_BOX != 0,
        }
    }

    /// The status word for these flags.
    pub fn bits(&self) -> u32 {
        let mut b = 0;
        if self.count_clamped {
            b |= plan::STATUS_COUNT_CLAMPED;
        }
        if self.invalid_box_label {
            b |= plan::STATUS_INVALID_BOX_LABEL;
        }
        if self.degenerate_box {
            b |= plan::STATUS_DEGENERATE_BOX;
        }
        b
    }

    /// No flag is set.
    pub fn is_ok(&self) -> bool {
        self.bits() == 0
    }
}

/// Whether a box `(x0, y0, x1, y1)` takes part in matching: finite, with
/// `x1 > x0` and `y1 > y0` (SPEC.md: other boxes are skipped as if absent).
pub fn is_valid_box(b: [f32; 4]) -> bool {
    b.iter().all(|v| v.is_finite()) && b[2] > b[0] && b[3] > b[1]
}

/// Checks priors on the host: `P * 4` finite values, widths and heights
/// positive. Returns P.
pub fn validate_priors(priors: &[f32]) -> Result<usize> {
    if priors.is_empty() || !priors.len().is_multiple_of(4) {
        return Err(Error::InvalidPriors(format!(
            "priors must be [P, 4] with P >= 1, got {} values",
            priors.len()
        )));
    }
    for (i, p) in priors.chunks_exact(4).enumerate() {
        if !p.iter().all(|v| v.is_finite()) || p[2] <= 0.0 || p[3] <= 0.0 {
            return Err(Error::InvalidPriors(format!(
                "prior {i} is {p:?}: priors must be finite (cx, cy, w, h) with w, h > 0"
            )));
        }
    }
    Ok(priors.len() / 4)
}
