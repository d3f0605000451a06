//! Synthetic batches with the statistics of SSD training, for the example,
//! the benches and the randomized tests. Deterministic for a given seed.

use crate::{Float, Label, Shape};

/// A batch on the host: the four inputs of the loss.
#[derive(Debug, Clone)]
pub struct Batch<T, L> {
    /// The shape.
    pub shape: Shape,
    /// `[B, P, C]` logits.
    pub confidence: Vec<T>,
    /// `[B, P, 4]` predicted offsets.
    pub predicted_locations: Vec<T>,
    /// `[B, P]` labels.
    pub labels: Vec<L>,
    /// `[B, P, 4]` target offsets.
    pub gt_locations: Vec<T>,
}

/// A padded batch of ground-truth boxes, the inputs of target assignment
/// (`crate::targets`): image b's boxes are rows `0..gt_counts[b]` of its
/// `max_boxes`; the rest is zero padding.
#[derive(Debug, Clone)]
pub struct BoxBatch {
    /// `[B, T, 4]` corners `(x0, y0, x1, y1)`, relative to the image.
    pub gt_boxes: Vec<f32>,
    /// `[B, T]` labels in `1..classes`.
    pub gt_labels: Vec<i64>,
    /// `[B]` boxes per image.
    pub gt_counts: Vec<i32>,
}

impl BoxBatch {
    /// Draws `batch` images of between T/4 and 3T/4 boxes (`T = max_boxes`),
    /// each 2 to 52 % of the image wide and high, inside the image, with a
    /// label in `1..classes`. Deterministic for a given seed.
    ///
    /// # Panics
    /// If `classes < 2` (no label to draw) while there are boxes.
    pub fn generate(batch: usize, max_boxes: usize, classes: usize, seed: u64) -> Self {
        let mut rng = SplitMix64(seed);
        let mut b = Self {
            gt_boxes: vec![0.0; batch * max_boxes * 4],
            gt_labels: vec![0; batch * max_boxes],
            gt_counts: Vec::with_capacity(batch),
        };
        for image in 0..batch {
            let n = max_boxes / 4 + (rng.next_u64() % (max_boxes as u64 / 2 + 1)) as usize;
            b.gt_counts.push(n as i32);
            for t in 0..n {
                let row = image * max_boxes + t;
                let (w, h) = (0.02 + 0.5 * rng.uniform(), 0.02 + 0.5 * rng.uniform());
                let (x0, y0) = ((1.0 - w) * rng.uniform(), (1.0 - h) * rng.uniform());
                b.gt_boxes[row * 4..row * 4 + 4].copy_from_slice(&[
                    x0 as f32,
                    y0 as f32,
                    (x0 + w) as f32,
                    (y0 + h) as f32,
                ]);
                b.gt_labels[row] = 1 + (rng.next_u64() % (classes as u64 - 1)) as i64;
            }
        }
        b
    }
}

/// How a synthetic batch is drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchSpec {
    /// Fraction of priors that are positive (SSD: about 1 to 3 %).
    pub positive_fraction: f64,
    /// Fraction of priors labelled -1 (ignored).
    pub ignored_fraction: f64,
    /// Standard deviation of the logits.
    pub logit_scale: f64,
    /// Seed of the generator.
    pub seed: u64,
}

impl Default for BatchSpec {
    fn default() -> Self {
        Self {
            positive_fraction: 0.02,
            ignored_fraction: 0.0,
            logit_scale: 1.0,
            seed: 1,
        }
    }
}

impl<T: Float, L: Label> Batch<T, L> {
    /// Draws a batch: normal logits and offsets, positives with a class in
    /// 1..C spread over the priors.
    ///
    /// # Panics
    /// If `shape.classes < 2` and a positive is drawn (no class to give it):
    /// a loss shape has `C >= 2` ([`Shape::validate`]).
    pub fn generate(shape: Shape, spec: BatchSpec) -> Self {
        let mut rng = SplitMix64(spec.seed);
        let confidence = (0..shape.confidence_len())
            .map(|_| T::from_f64(rng.normal() * spec.logit_scale))
            .collect();
        let predicted_locations = (0..shape.locations_len())
            .map(|_| T::from_f64(rng.normal()))
            .collect();
        let gt_locations = (0..shape.locations_len())
            .map(|_| T::from_f64(rng.normal()))
            .collect();
        let labels = (0..shape.rows())
            .map(|_| {
                let u = rng.uniform();
                let label = if u < spec.positive_fraction {
                    1 + (rng.next_u64() % (shape.classes as u64 - 1)) as i64
                } else if u < spec.positive_fraction + spec.ignored_fraction {
                    -1
                } else {
                    0
                };
                L::from_i64(label)
            })
            .collect();
        Self {
            shape,
            confidence,
            predicted_locations,
            labels,
            gt_locations,
        }
    }

    /// The batch in `layout` (a generated batch is row-major): its logits and
    /// both box arrays transposed on the host, its labels as they are.
    pub fn in_layout(self, layout: crate::Layout) -> Self {
        let shape = self.shape;
        let to = |v: &[T], per_prior| crate::Layout::RowMajor.convert(v, shape, per_prior, layout);
        Self {
            confidence: to(&self.confidence, shape.classes),
            predicted_locations: to(&self.predicted_locations, 4),
            gt_locations: to(&self.gt_locations, 4),
            ..self
        }
    }

    /// The batch as the CPU reference's inputs.
    pub fn reference_inputs(&self) -> crate::reference::Inputs<'_, T, L> {
        crate::reference::Inputs {
            confidence: &self.confidence,
            predicted_locations: &self.predicted_locations,
            labels: &self.labels,
            gt_locations: &self.gt_locations,
        }
    }
}

/// A small, fast, well-mixed generator (Steele, Lea and Flood's SplitMix64).
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}
