//! The CPU reference of the MultiBox loss, forward and backward, in f64.
//!
//! This module is the yardstick the CUDA kernels are held to and the fallback
//! for callers without a GPU. It follows `SPEC.md` line by line, written for
//! clarity first:
//!
//! 1. **Validate** everything before any work: the config, the shape, every
//!    slice length, the upstream gradients and every label
//!    (`-1` ignore, `0` background, `1..C-1` object classes).
//! 2. **One pass over the rows** (one row = one prior's `C` logits), widened to
//!    f64: the row's log-sum-exp `lse` (the row maximum subtracted first) and
//!    the background loss `lse - x[0]`, the mining key.
//! 3. **Mining, per image**: of the `candidates_b` priors labelled 0, the
//!    `k_b = config.negatives_to_mine(pos_b, candidates_b)` with the largest
//!    key are mined; ties go to the lower prior index, NaN keys rank above
//!    everything (as a stable descending `torch.sort` would).
//! 4. **Losses**: with `N` the number of positives in the whole batch (the
//!    default [`Normalizer`]; [`Options`] chooses another, and the layout),
//!    `cls = Σ_set (lse - x[label]) / N` over positives and mined negatives,
//!    `reg = Σ_positives Σ_4 smooth_l1(pred - gt, beta) / N`. If `N == 0`
//!    both losses and every gradient are 0 (not NaN).
//! 5. **Gradients** (with [`forward_backward`]):
//!    `d confidence = g_cls / N * (softmax(x) - onehot(label))` for priors in
//!    the set, `d predicted_locations = g_reg / N * clamp((pred - gt) / beta, -1, 1)`
//!    for positives, 0 everywhere else.
//!
//! The kernels compute in f32; this reference computes in f64 from the same
//! (exactly widened) inputs, so its results are the ones `SPEC.md`'s
//! tolerances are measured against. One consequence, also in `SPEC.md`: its
//! mining keys are f64, so two keys within f32 rounding of each other may be
//! ordered differently than on the GPU; exact ties (equal inputs) always
//! follow the lower-index rule here and there.
//!
//! Non-finite inputs are not an error: they propagate into the losses and
//! gradients as they would in the PyTorch reference.
//!
//! # Example
//!
//! One image, three priors, two classes. Every logit is 0, so every prior's
//! cross-entropy is `ln 2` and the two background priors' mining keys tie:
//! with `neg_pos_ratio = 1` the one positive mines one negative, the one with
//! the lower index.
//!
//! ```
//! use multibox::reference::{self, Inputs, Upstream};
//! use multibox::{MultiboxConfig, Shape};
//!
//! let shape = Shape::new(1, 3, 2);
//! let config = MultiboxConfig { neg_pos_ratio: 1.0, ..Default::default() };
//! let confidence = [0.0f32; 3 * 2];
//! let labels = [1i64, 0, 0];
//! let gt_locations = [0.0f32; 3 * 4];
//! let mut predicted_locations = [0.0f32; 3 * 4];
//! predicted_locations[..4].copy_from_slice(&[0.5, 0.0, 0.0, 2.0]);
//!
//! let inputs = Inputs {
//!     confidence: &confidence,
//!     predicted_locations: &predicted_locations,
//!     labels: &labels,
//!     gt_locations: &gt_locations,
//! };
//! let out = reference::forward_backward(&config, shape, &inputs, Upstream::default())?;
//!
//! assert_eq!(out.losses.num_pos, 1);
//! assert_eq!(out.mask, [1, 1, 0]); // the tie goes to prior 1
//! assert!((out.losses.classification_loss - 2.0 * 2f64.ln()).abs() < 1e-15);
//! // smooth_l1(0.5) + smooth_l1(2.0) = 0.125 + 1.5
//! assert_eq!(out.losses.regression_loss, 1.625);
//! // d loc = clamp(pred - gt, -1, 1) / N for the positive
//! assert_eq!(out.grad_locations[..4], [0.5, 0.0, 0.0, 1.0]);
//! // d conf = softmax - onehot for the set: [0.5 - 0, 0.5 - 1] for prior 0
//! assert_eq!(out.grad_confidence, [0.5, -0.5, -0.5, 0.5, 0.0, 0.0]);
//! // Rounded once to the kernels' storage type:
//! let grad: Vec<half::f16> = out.grad_confidence_as();
//! assert_eq!(grad[1].to_f32(), -0.5);
//! # Ok::<(), multibox::Error>(())
//! ```

use std::cmp::Ordering;

use crate::{Error, Float, Label, Layout, MultiboxConfig, Result, Shape};

/// The four input arrays of one call, contiguous, in [`Options::layout`]'s
/// layout (row-major, the default, is shown below; channel-major's are
/// `[B, C, P]` and `[B, 4, P]`; labels are `[B, P]` in both).
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a, T: Float, L: Label> {
    /// Logits, `[B, P, C]`.
    pub confidence: &'a [T],
    /// Predicted box offsets, `[B, P, 4]`.
    pub predicted_locations: &'a [T],
    /// Class per prior, `[B, P]`: `-1` ignore, `0` background, `1..C-1` objects.
    pub labels: &'a [L],
    /// Encoded target box offsets, `[B, P, 4]`.
    pub gt_locations: &'a [T],
}

/// The upstream gradients of the two losses (they carry loss scaling and
/// loss weights). Both must be finite; both are 1 by default.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Upstream {
    /// d(total) / d(regression_loss).
    pub g_reg: f32,
    /// d(total) / d(classification_loss).
    pub g_cls: f32,
}

impl Default for Upstream {
    fn default() -> Self {
        Self {
            g_reg: 1.0,
            g_cls: 1.0,
        }
    }
}

/// What the loss sums are divided by (SPEC.md, "Normalisation").
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Normalizer {
    /// N, the batch's positive count (the reference's; the default).
    #[default]
    Positives,
    /// A divisor the caller chose, typically the positive count summed over
    /// the ranks of a data-parallel job. `n <= 0` gives zero losses and
    /// gradients, as N == 0 does; a non-finite `n` gives NaN losses (and NaN
    /// gradients for the priors in the set).
    Given(f32),
    /// NVIDIA's SSD: each image's sums over its own positive count (an image
    /// without positives adds 0), averaged over the B images.
    PerImage,
}

/// The per-call settings besides the upstream gradients; the default is
/// today's row-major call normalised by N.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Options {
    /// The layout of the inputs, and of the gradients written.
    pub layout: Layout,
    /// The divisor of the losses and gradients.
    pub normalizer: Normalizer,
}

/// The two losses and the positive count, in f64.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Losses {
    /// Smooth-L1 over positives' 4 coordinates, divided by the normaliser's
    /// divisor (`num_pos` by default; a divisor of 0 gives 0: see [`Normalizer`]).
    pub regression_loss: f64,
    /// Cross-entropy over positives and mined negatives, divided as
    /// `regression_loss` is.
    pub classification_loss: f64,
    /// `N`, the number of priors with a label > 0 in the whole batch.
    pub num_pos: u64,
}

/// Everything the reference computes for one call.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    /// The losses.
    pub losses: Losses,
    /// `[B, P]`: 1 where the prior enters the classification loss (every
    /// positive and every mined negative), 0 elsewhere.
    pub mask: Vec<u8>,
    /// `[B, P]`: `logsumexp(x) - x[0]` for every prior, the mining key of the
    /// background candidates (computed for every row, but it ranks label-0
    /// priors only).
    pub background_loss: Vec<f64>,
    /// `[B]`: `k_b`, the number of negatives mined in each image.
    pub negatives_mined: Vec<u64>,
    /// `[B, P, C]`: d(g_reg * reg + g_cls * cls) / d confidence; empty after [`forward`].
    pub grad_confidence: Vec<f64>,
    /// `[B, P, 4]`: d(g_reg * reg + g_cls * cls) / d predicted_locations; empty after [`forward`].
    pub grad_locations: Vec<f64>,
}

impl Output {
    /// The confidence gradient rounded once from f64 to `T` (as
    /// [`Float::from_f64`] rounds), the form the kernels write.
    pub fn grad_confidence_as<T: Float>(&self) -> Vec<T> {
        self.grad_confidence
            .iter()
            .map(|&g| T::from_f64(g))
            .collect()
    }

    /// The location gradient rounded once from f64 to `T` (as
    /// [`Float::from_f64`] rounds), the form the kernels write.
    pub fn grad_locations_as<T: Float>(&self) -> Vec<T> {
        self.grad_locations
            .iter()
            .map(|&g| T::from_f64(g))
            .collect()
    }
}

/// The loss alone (evaluation): losses, mask, mining keys and per-image
/// negative counts; the gradient vectors of the result are empty.
///
/// # Errors
///
/// [`Error::InvalidConfig`], [`Error::InvalidShape`], [`Error::TooLarge`],
/// [`Error::LengthMismatch`] (naming the argument) or [`Error::InvalidLabel`]
/// (the first invalid label in memory order); nothing is computed then.
pub fn forward<T: Float, L: Label>(
    config: &MultiboxConfig,
    shape: Shape,
    inputs: &Inputs<T, L>,
) -> Result<Output> {
    compute(config, shape, inputs, None, &Options::default())
}

/// [`forward`] with a layout and a normaliser ([`Options`]).
///
/// # Errors
///
/// As [`forward`]. A [`Normalizer::Given`] divisor that is not positive or
/// not finite is not an error: it gives the zeros or NaN SPEC.md asks for.
pub fn forward_with<T: Float, L: Label>(
    config: &MultiboxConfig,
    shape: Shape,
    inputs: &Inputs<T, L>,
    options: &Options,
) -> Result<Output> {
    compute(config, shape, inputs, None, options)
}

/// The loss and its gradients with respect to `confidence` and
/// `predicted_locations`, scaled by the upstream gradients.
///
/// # Errors
///
/// As [`forward`], plus [`Error::InvalidUpstream`] when `g_reg` or `g_cls`
/// is not finite.
pub fn forward_backward<T: Float, L: Label>(
    config: &MultiboxConfig,
    shape: Shape,
    inputs: &Inputs<T, L>,
    upstream: Upstream,
) -> Result<Output> {
    compute(config, shape, inputs, Some(upstream), &Options::default())
}

/// [`forward_backward`] with a layout and a normaliser ([`Options`]); the
/// gradients are in the inputs' layout.
///
/// # Errors
///
/// As [`forward_backward`].
pub fn forward_backward_with<T: Float, L: Label>(
    config: &MultiboxConfig,
    shape: Shape,
    inputs: &Inputs<T, L>,
    upstream: Upstream,
    options: &Options,
) -> Result<Output> {
    compute(config, shape, inputs, Some(upstream), options)
}

/// The gradients of an earlier [`forward`] on the same inputs, scaled by
/// upstream gradients learned since (the split that autograd frameworks
/// use). The reference keeps no state between calls, so this computes the
/// mining again from `inputs`: the result is [`forward_backward`]'s, losses
/// included.
///
/// # Errors
///
/// As [`forward_backward`].
pub fn backward<T: Float, L: Label>(
    config: &MultiboxConfig,
    shape: Shape,
    inputs: &Inputs<T, L>,
    upstream: Upstream,
) -> Result<Output> {
    compute(config, shape, inputs, Some(upstream), &Options::default())
}

/// Smooth-L1 with transition point `beta`: `0.5 d² / beta` below `beta`, `|d| - 0.5 beta` above.
fn smooth_l1(d: f64, beta: f64) -> f64 {
    if d.abs() < beta {
        0.5 * d * d / beta
    } else {
        d.abs() - 0.5 * beta
    }
}

/// The mining order of two priors of one image: `Less` means `a` is mined
/// before `b`. Larger key first, NaN above everything (as `torch.sort`
/// descending), then the lower prior index. A total order, so the top `k`
/// is unique.
fn mining_order(keys: &[f64], a: usize, b: usize) -> Ordering {
    let (ka, kb) = (keys[a], keys[b]);
    let by_key = match (ka.is_nan(), kb.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Less,
        (false, true) => Ordering::Greater,
        (false, false) => kb.partial_cmp(&ka).unwrap_or(Ordering::Equal),
    };
    by_key.then(a.cmp(&b))
}

/// Checks everything `SPEC.md` calls bad input, before any work.
fn validate<T: Float, L: Label>(
    config: &MultiboxConfig,
    shape: Shape,
    inputs: &Inputs<T, L>,
    upstream: Option<Upstream>,
) -> Result<()> {
    config.validate()?;
    shape.validate()?;
    let lengths = [
        (
            "confidence",
            inputs.confidence.len(),
            shape.confidence_len(),
        ),
        (
            "predicted_locations",
            inputs.predicted_locations.len(),
            shape.locations_len(),
        ),
        ("labels", inputs.labels.len(), shape.rows()),
        (
            "gt_locations",
            inputs.gt_locations.len(),
            shape.locations_len(),
        ),
    ];
    for (name, actual, expected) in lengths {
        if actual != expected {
            return Err(Error::LengthMismatch {
                name,
                expected,
                actual,
                shape,
            });
        }
    }
    if let Some(up) = upstream {
        for (name, value) in [("g_reg", up.g_reg), ("g_cls", up.g_cls)] {
            if !value.is_finite() {
                return Err(Error::InvalidUpstream { name, value });
            }
        }
    }
    // `C < 2^31` after `shape.validate()`, so the cast is exact.
    let classes = shape.classes as i64;
    if let Some(row) = inputs
        .labels
        .iter()
        .position(|l| !(-1..classes).contains(&l.to_i64()))
    {
        return Err(Error::InvalidLabel {
            image: row / shape.priors,
            prior: row % shape.priors,
            value: inputs.labels[row].to_i64(),
            classes: shape.classes,
        });
    }
    Ok(())
}

fn compute<T: Float, L: Label>(
    config: &MultiboxConfig,
    shape: Shape,
    inputs: &Inputs<T, L>,
    upstream: Option<Upstream>,
    options: &Options,
) -> Result<Output> {
    validate(config, shape, inputs, upstream)?;
    if options.layout == Layout::RowMajor {
        return compute_row_major(config, shape, inputs, upstream, options.normalizer);
    }
    // Channel-major: the same computation on a row-major copy, the
    // gradients transposed back. Clarity over speed, as everywhere here.
    let (from, to) = (options.layout, Layout::RowMajor);
    let confidence = from.convert(inputs.confidence, shape, shape.classes, to);
    let predicted_locations = from.convert(inputs.predicted_locations, shape, 4, to);
    let gt_locations = from.convert(inputs.gt_locations, shape, 4, to);
    let row_major = Inputs {
        confidence: &confidence,
        predicted_locations: &predicted_locations,
        labels: inputs.labels,
        gt_locations: &gt_locations,
    };
    let mut out = compute_row_major(config, shape, &row_major, upstream, options.normalizer)?;
    if upstream.is_some() {
        out.grad_confidence = to.convert(&out.grad_confidence, shape, shape.classes, from);
        out.grad_locations = to.convert(&out.grad_locations, shape, 4, from);
    }
    Ok(out)
}

/// [`compute`] on validated row-major inputs.
fn compute_row_major<T: Float, L: Label>(
    config: &MultiboxConfig,
    shape: Shape,
    inputs: &Inputs<T, L>,
    upstream: Option<Upstream>,
    normalizer: Normalizer,
) -> Result<Output> {
    let (b_count, p_count, c_count) = (shape.batch, shape.priors, shape.classes);
    let widen = |x: T| f64::from(x.to_f32());
    let label = |row: usize| inputs.labels[row].to_i64();
    let row_logits = |row: usize| &inputs.confidence[row * c_count..(row + 1) * c_count];

    // Per row: the maximum and `Σ exp(x - max)` (so `lse = max + ln(sum)`),
    // and the background loss.
    let mut row_max = Vec::with_capacity(shape.rows());
    let mut row_sum = Vec::with_capacity(shape.rows());
    let mut background_loss = Vec::with_capacity(shape.rows());
    for row in 0..shape.rows() {
        let x = row_logits(row);
        let max = x
            .iter()
            .map(|&v| widen(v))
            .fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = x.iter().map(|&v| (widen(v) - max).exp()).sum();
        row_max.push(max);
        row_sum.push(sum);
        // -log_softmax as PyTorch orders it, -((x - max) - ln sum): the
        // difference first, which no magnitude of the logits absorbs.
        background_loss.push((max - widen(x[0])) + sum.ln());
    }

    // Mining, per image.
    let mut mask = vec![0u8; shape.rows()];
    let mut negatives_mined = Vec::with_capacity(b_count);
    let mut candidates = Vec::with_capacity(p_count);
    for b in 0..b_count {
        let base = b * p_count;
        let keys = &background_loss[base..base + p_count];
        candidates.clear();
        let mut pos_b = 0u64;
        for p in 0..p_count {
            match label(base + p) {
                0 => candidates.push(p),
                l if l > 0 => {
                    pos_b += 1;
                    mask[base + p] = 1;
                }
                _ => {} // -1: ignored
            }
        }
        let k = config.negatives_to_mine(pos_b, candidates.len() as u64);
        // k <= candidates.len(), so it fits in usize.
        let k_usize = k as usize;
        if k_usize > 0 && k_usize < candidates.len() {
            // Partition so that the first k are the top k in mining order.
            candidates.select_nth_unstable_by(k_usize - 1, |&a, &c| mining_order(keys, a, c));
        }
        for &p in &candidates[..k_usize] {
            mask[base + p] = 1;
        }
        negatives_mined.push(k);
    }

    // Per image: the positives and the two loss sums over its set.
    let beta = f64::from(config.beta);
    let mut positives = vec![0u64; b_count];
    let mut cls_sums = vec![0.0; b_count];
    let mut reg_sums = vec![0.0; b_count];
    for row in 0..shape.rows() {
        if mask[row] == 0 {
            continue;
        }
        let image = row / p_count;
        // Labels were validated: in the set, 0 <= label < C.
        let target = label(row) as usize;
        cls_sums[image] += (row_max[row] - widen(row_logits(row)[target])) + row_sum[row].ln();
        if target == 0 {
            continue; // a mined negative: no box regression
        }
        positives[image] += 1;
        for j in row * 4..row * 4 + 4 {
            let d = widen(inputs.predicted_locations[j]) - widen(inputs.gt_locations[j]);
            reg_sums[image] += smooth_l1(d, beta);
        }
    }
    let num_pos: u64 = positives.iter().sum();
    let divisor = Divisor::new(normalizer, &positives, num_pos);
    let (regression_loss, classification_loss) = divisor.losses(&reg_sums, &cls_sums);
    let losses = Losses {
        regression_loss,
        classification_loss,
        num_pos,
    };

    let Some(up) = upstream else {
        return Ok(Output {
            losses,
            mask,
            background_loss,
            negatives_mined,
            grad_confidence: Vec::new(),
            grad_locations: Vec::new(),
        });
    };
    let mut grad_confidence = vec![0.0; shape.confidence_len()];
    let mut grad_locations = vec![0.0; shape.locations_len()];
    for row in 0..shape.rows() {
        // An image whose divisor is "none" (N == 0, n <= 0, an image
        // without positives under PerImage) gets zeros, its logits unread.
        let Some(d) = divisor.of_image(row / p_count) else {
            continue;
        };
        if mask[row] == 0 {
            continue;
        }
        let target = label(row) as usize;
        let x = row_logits(row);
        let (max, sum) = (row_max[row], row_sum[row]);
        let scale_cls = f64::from(up.g_cls) / d;
        let grad = &mut grad_confidence[row * c_count..(row + 1) * c_count];
        for (g, &v) in grad.iter_mut().zip(x) {
            *g = scale_cls * (widen(v) - max).exp() / sum;
        }
        // softmax[target] - 1 = -(the others' share), summed as such: 1 -
        // (1 - 1e-20) cancels to 0 even in f64, the others' sum does not.
        let others: f64 = x
            .iter()
            .enumerate()
            .filter(|&(c, _)| c != target)
            .map(|(_, &v)| (widen(v) - max).exp())
            .sum();
        grad[target] = -scale_cls * others / sum;
        if target == 0 {
            continue;
        }
        let scale_reg = f64::from(up.g_reg) / d;
        let boxes = row * 4..row * 4 + 4;
        let pairs = inputs.predicted_locations[boxes.clone()]
            .iter()
            .zip(&inputs.gt_locations[boxes.clone()]);
        for (g, (&p, &t)) in grad_locations[boxes].iter_mut().zip(pairs) {
            *g = scale_reg * ((widen(p) - widen(t)) / beta).clamp(-1.0, 1.0);
        }
    }
    Ok(Output {
        losses,
        mask,
        background_loss,
        negatives_mined,
        grad_confidence,
        grad_locations,
    })
}

/// What the loss sums of each image are divided by (SPEC.md,
/// "Normalisation"); `None` for an image that contributes 0 (losses and
/// gradients), `Some(NaN)` when a given divisor is not finite.
enum Divisor {
    /// One divisor for the whole batch: N, or the caller's n.
    Batch(Option<f64>),
    /// `B * pos_b` per image (None for an image without positives).
    PerImage(Vec<Option<f64>>),
}

impl Divisor {
    fn new(normalizer: Normalizer, positives: &[u64], num_pos: u64) -> Self {
        match normalizer {
            // N == 0: both losses and every gradient are 0, not 0 / 0.
            Normalizer::Positives => Divisor::Batch((num_pos > 0).then_some(num_pos as f64)),
            Normalizer::Given(n) if !n.is_finite() => Divisor::Batch(Some(f64::NAN)),
            Normalizer::Given(n) => Divisor::Batch((n > 0.0).then_some(f64::from(n))),
            Normalizer::PerImage => {
                let b = positives.len() as f64;
                Divisor::PerImage(
                    positives
                        .iter()
                        .map(|&pos| (pos > 0).then_some(b * pos as f64))
                        .collect(),
                )
            }
        }
    }

    fn of_image(&self, image: usize) -> Option<f64> {
        match self {
            Divisor::Batch(d) => *d,
            Divisor::PerImage(d) => d[image],
        }
    }

    /// `(reg, cls)` from the per-image sums.
    fn losses(&self, reg_sums: &[f64], cls_sums: &[f64]) -> (f64, f64) {
        let total = |sums: &[f64], image_divisor: &dyn Fn(usize) -> Option<f64>| -> f64 {
            sums.iter()
                .enumerate()
                .map(|(b, s)| image_divisor(b).map_or(0.0, |d| s / d))
                .sum()
        };
        match self {
            Divisor::Batch(None) => (0.0, 0.0),
            Divisor::Batch(Some(d)) => (
                reg_sums.iter().sum::<f64>() / d,
                cls_sums.iter().sum::<f64>() / d,
            ),
            // mean_b (sum_b / pos_b): B * pos_b is each image's divisor.
            Divisor::PerImage(_) => (
                total(reg_sums, &|b| self.of_image(b)),
                total(cls_sums, &|b| self.of_image(b)),
            ),
        }
    }
}
