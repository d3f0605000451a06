//! What a caller chooses once: the loss's parameters and the batch shape.

use crate::{Error, Result};

/// How the float sums (the two losses) are reduced across blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reduction {
    /// Per-block partial sums added in a fixed order by the last block:
    /// bit-identical results run after run.
    #[default]
    Deterministic,
}

/// The parameters of the MultiBox loss.
///
/// ```
/// let config = multibox::MultiboxConfig { neg_pos_ratio: 3.0, ..Default::default() };
/// assert!(config.validate().is_ok());
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MultiboxConfig {
    /// Hard negatives mined per positive, per image (`k = floor(ratio * pos)`).
    /// A positive, finite real; 3 by default.
    pub neg_pos_ratio: f32,
    /// Floor on the negatives mined per image, also for images with no
    /// positive (0 by default, as in the reference).
    pub min_negatives_per_image: u32,
    /// The smooth-L1 transition point; positive and finite; 1 by default.
    pub beta: f32,
    /// How the losses are summed across blocks.
    pub reduction: Reduction,
}

impl Default for MultiboxConfig {
    fn default() -> Self {
        Self {
            neg_pos_ratio: 3.0,
            min_negatives_per_image: 0,
            beta: 1.0,
            reduction: Reduction::Deterministic,
        }
    }
}

impl MultiboxConfig {
    /// Checks every field's range.
    pub fn validate(&self) -> Result<()> {
        if !(self.neg_pos_ratio.is_finite() && self.neg_pos_ratio > 0.0) {
            return Err(Error::InvalidConfig(format!(
                "neg_pos_ratio must be a positive finite number, got {}",
                self.neg_pos_ratio
            )));
        }
        if !(self.beta.is_finite() && self.beta > 0.0) {
            return Err(Error::InvalidConfig(format!(
                "beta must be a positive finite number, got {}",
                self.beta
            )));
        }
        Ok(())
    }

    /// Number of negatives image `b` mines: `min(max(floor(ratio * pos), min_neg), candidates)`.
    ///
    /// `floor(ratio * pos)` is exact for every count: the f32 ratio is
    /// `m * 2^e` with an integer `m < 2^24`, so the product is the integer
    /// `m * pos` shifted by `e` (the kernels do the same, without f64).
    pub fn negatives_to_mine(&self, num_pos: u64, candidates: u64) -> u64 {
        floor_ratio_times(self.neg_pos_ratio, num_pos)
            .max(u64::from(self.min_negatives_per_image))
            .min(candidates)
    }
}

/// `floor(ratio * n)` for a finite `ratio >= 0`, exactly; saturates at `u64::MAX`.
fn floor_ratio_times(ratio: f32, n: u64) -> u64 {
    let bits = ratio.to_bits();
    let biased = (bits >> 23) & 0xff;
    let (m, e) = if biased == 0 {
        (u128::from(bits & 0x7f_ffff), -149)
    } else {
        (
            u128::from((bits & 0x7f_ffff) | 0x80_0000),
            biased as i32 - 150,
        )
    };
    let product = m * u128::from(n); // < 2^88
    let floor = if e >= 0 {
        product.checked_shl(e as u32).filter(|p| p >> e == product)
    } else {
        Some(product.checked_shr((-e) as u32).unwrap_or(0))
    };
    floor.map_or(u64::MAX, |f| u64::try_from(f).unwrap_or(u64::MAX))
}

/// How the four tensors of a call are laid out in memory (one setting for
/// all of them; the gradients are written in the same layout).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Layout {
    /// `[B, P, C]` logits and `[B, P, 4]` boxes: one prior's values are
    /// contiguous (a head whose outputs were permuted to channels-last and
    /// concatenated, as in pytorch-ssd and mmdetection).
    #[default]
    RowMajor,
    /// `[B, C, P]` logits and `[B, 4, P]` boxes: one class's (one
    /// coordinate's) values over the priors are contiguous (heads
    /// concatenated without a transpose, as in NVIDIA's SSD).
    ChannelMajor,
}

impl Layout {
    /// Element offset of class (or box coordinate) `c` of prior `p` of image
    /// `b`, in an array of `per_prior` values per prior (`C` or 4).
    pub const fn offset(
        self,
        shape: Shape,
        per_prior: usize,
        b: usize,
        p: usize,
        c: usize,
    ) -> usize {
        match self {
            Layout::RowMajor => (b * shape.priors + p) * per_prior + c,
            Layout::ChannelMajor => (b * per_prior + c) * shape.priors + p,
        }
    }

    /// `data`, an array of `per_prior` values per prior (`C` for the logits,
    /// 4 for the boxes) in layout `self`, rearranged into layout `to`: a
    /// host-side transpose for tests and for checking results, never needed
    /// to call the loss.
    ///
    /// ```
    /// use multibox::{Layout, Shape};
    /// let shape = Shape::new(1, 3, 2);
    /// let row_major = [0, 1, 10, 11, 20, 21]; // prior p, class c: 10 p + c
    /// let channel_major = Layout::RowMajor.convert(&row_major, shape, 2, Layout::ChannelMajor);
    /// assert_eq!(channel_major, [0, 10, 20, 1, 11, 21]);
    /// ```
    ///
    /// # Panics
    /// When `data.len()` is not `B * P * per_prior`.
    pub fn convert<T: Copy>(
        self,
        data: &[T],
        shape: Shape,
        per_prior: usize,
        to: Layout,
    ) -> Vec<T> {
        assert_eq!(
            data.len(),
            shape.rows() * per_prior,
            "Layout::convert: {} values for {shape} with {per_prior} per prior",
            data.len()
        );
        let mut out = data.to_vec();
        if self != to {
            for b in 0..shape.batch {
                for p in 0..shape.priors {
                    for c in 0..per_prior {
                        out[to.offset(shape, per_prior, b, p, c)] =
                            data[self.offset(shape, per_prior, b, p, c)];
                    }
                }
            }
        }
        out
    }
}

/// The batch shape: `B` images, `P` priors per image, `C` classes (background included).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shape {
    /// B, the number of images.
    pub batch: usize,
    /// P, the number of priors (anchors) per image.
    pub priors: usize,
    /// C, the number of classes, background (label 0) included.
    pub classes: usize,
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "[B={}, P={}, C={}]",
            self.batch, self.priors, self.classes
        )
    }
}

impl Shape {
    /// A shape of `batch` images, `priors` priors and `classes` classes.
    pub const fn new(batch: usize, priors: usize, classes: usize) -> Self {
        Self {
            batch,
            priors,
            classes,
        }
    }

    /// `B * P`: one row of logits per prior.
    pub const fn rows(&self) -> usize {
        self.batch * self.priors
    }

    /// Elements of `confidence`: `B * P * C`.
    pub const fn confidence_len(&self) -> usize {
        self.batch * self.priors * self.classes
    }

    /// Elements of `predicted_locations` and `gt_locations`: `B * P * 4`.
    pub const fn locations_len(&self) -> usize {
        self.batch * self.priors * 4
    }

    /// Checks the ranges of SPEC.md and that the kernels' indices cannot overflow:
    /// rows (`B * P`) index with 32-bit signed integers and so must stay below 2^31,
    /// and so must `C`; element offsets are 64-bit.
    pub fn validate(&self) -> Result<()> {
        let invalid = |reason| {
            Err(Error::InvalidShape {
                shape: *self,
                reason,
            })
        };
        if self.batch == 0 {
            return invalid("B (batch) must be at least 1");
        }
        if self.priors == 0 {
            return invalid("P (priors) must be at least 1");
        }
        if self.classes < 2 {
            return invalid("C (classes) must be at least 2: background plus one class");
        }
        let too_large = |reason: String| {
            Err(Error::TooLarge {
                shape: *self,
                reason,
            })
        };
        const LIMIT: u128 = i32::MAX as u128;
        let rows = self.batch as u128 * self.priors as u128;
        if rows > LIMIT {
            return too_large(format!(
                "B * P = {rows} priors exceed the kernels' 32-bit row index (at most {LIMIT})"
            ));
        }
        if self.classes as u128 > LIMIT {
            return too_large(format!(
                "C = {} exceeds the kernels' 32-bit class index",
                self.classes
            ));
        }
        let bytes = rows * self.classes as u128 * 4;
        if bytes > isize::MAX as u128 {
            return too_large(format!(
                "B * P * C * 4 = {bytes} bytes exceed the address space"
            ));
        }
        Ok(())
    }
}
