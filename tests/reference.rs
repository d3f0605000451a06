//! The CPU reference against hand-computed values, finite differences, a
//! naive re-implementation of the mining, and every kind of bad input.

use multibox::reference::{self, Inputs, Normalizer, Options, Output, Upstream};
use multibox::{Error, Layout, MultiboxConfig, Shape};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A test case in f32 inputs and i64 labels, mutable field by field.
#[derive(Debug, Clone)]
struct Case {
    shape: Shape,
    confidence: Vec<f32>,
    predicted_locations: Vec<f32>,
    labels: Vec<i64>,
    gt_locations: Vec<f32>,
}

impl Case {
    /// Zero logits and boxes, every label 0.
    fn zeros(batch: usize, priors: usize, classes: usize) -> Self {
        let shape = Shape::new(batch, priors, classes);
        Self {
            shape,
            confidence: vec![0.0; shape.confidence_len()],
            predicted_locations: vec![0.0; shape.locations_len()],
            labels: vec![0; shape.rows()],
            gt_locations: vec![0.0; shape.locations_len()],
        }
    }

    /// Logits and boxes on a grid of 1/64 in [-4, 4] (so that small powers
    /// of two can be added exactly), labels: `pos` positives, `ignored`
    /// ignored, the rest background.
    fn random(rng: &mut StdRng, shape: Shape, pos: f64, ignored: f64) -> Self {
        let mut case = Self::zeros(shape.batch, shape.priors, shape.classes);
        let grid = |rng: &mut StdRng| rng.random_range(-256i32..=256) as f32 / 64.0;
        case.confidence.iter_mut().for_each(|x| *x = grid(rng));
        case.predicted_locations
            .iter_mut()
            .for_each(|x| *x = grid(rng));
        case.gt_locations.iter_mut().for_each(|x| *x = grid(rng));
        for label in &mut case.labels {
            let u: f64 = rng.random();
            *label = if u < pos {
                rng.random_range(1..shape.classes as i64)
            } else if u < pos + ignored {
                -1
            } else {
                0
            };
        }
        case
    }

    fn inputs(&self) -> Inputs<'_, f32, i64> {
        Inputs {
            confidence: &self.confidence,
            predicted_locations: &self.predicted_locations,
            labels: &self.labels,
            gt_locations: &self.gt_locations,
        }
    }

    fn row_mut(&mut self, row: usize) -> &mut [f32] {
        let c = self.shape.classes;
        &mut self.confidence[row * c..(row + 1) * c]
    }

    fn run(&self, config: &MultiboxConfig) -> Output {
        self.run_with(config, Upstream::default())
    }

    fn run_with(&self, config: &MultiboxConfig, upstream: Upstream) -> Output {
        reference::forward_backward(config, self.shape, &self.inputs(), upstream)
            .expect("valid input")
    }

    fn try_run(&self, config: &MultiboxConfig, upstream: Upstream) -> multibox::Result<Output> {
        reference::forward_backward(config, self.shape, &self.inputs(), upstream)
    }
}

fn ratio(neg_pos_ratio: f32) -> MultiboxConfig {
    MultiboxConfig {
        neg_pos_ratio,
        ..Default::default()
    }
}

fn cross_entropy(logits: &[f32], label: usize) -> f64 {
    let max = logits
        .iter()
        .fold(f64::NEG_INFINITY, |m, &x| m.max(f64::from(x)));
    let sum: f64 = logits.iter().map(|&x| (f64::from(x) - max).exp()).sum();
    max + sum.ln() - f64::from(logits[label])
}

fn mined(out: &Output, image: usize, priors: usize) -> Vec<usize> {
    (0..priors)
        .filter(|&p| out.mask[image * priors + p] == 1)
        .collect()
}

fn assert_close(got: f64, want: f64, rel: f64, what: &str) {
    assert!(
        (got - want).abs() <= rel * want.abs().max(1e-300),
        "{what}: got {got:e}, want {want:e}"
    );
}

#[test]
fn ignored_priors_get_no_loss_no_gradient_and_are_never_mined() {
    // Image of 6 priors; the ignored ones (1, 4) have the largest background
    // loss, so they would be mined first if they were candidates.
    let mut case = Case::zeros(1, 6, 3);
    case.labels = vec![1, -1, 0, 0, -1, 0];
    case.row_mut(1).copy_from_slice(&[-5.0, 5.0, 0.0]);
    case.row_mut(4).copy_from_slice(&[-6.0, 0.0, 6.0]);
    case.row_mut(3).copy_from_slice(&[-1.0, 1.0, 0.0]); // the hardest real negative
    case.predicted_locations[4..8].copy_from_slice(&[3.0, 3.0, 3.0, 3.0]); // prior 1's box
    let out = case.run(&ratio(1.0));

    assert_eq!(out.losses.num_pos, 1);
    assert_eq!(out.negatives_mined, [1]);
    assert_eq!(out.mask, [1, 0, 0, 1, 0, 0]);
    let want_cls =
        cross_entropy(&case.confidence[0..3], 1) + cross_entropy(&case.confidence[9..12], 0);
    assert_close(out.losses.classification_loss, want_cls, 1e-15, "cls");
    assert_eq!(
        out.losses.regression_loss, 0.0,
        "only prior 0 is positive, and its box is exact"
    );
    for ignored in [1, 4] {
        assert!(out.grad_confidence[ignored * 3..ignored * 3 + 3]
            .iter()
            .all(|&g| g == 0.0));
        assert!(out.grad_locations[ignored * 4..ignored * 4 + 4]
            .iter()
            .all(|&g| g == 0.0));
    }
    assert!(
        out.grad_confidence[9..12].iter().any(|&g| g != 0.0),
        "the mined negative has a gradient"
    );
}

#[test]
fn min_negatives_per_image_raises_the_floor_also_without_positives() {
    let mut rng = StdRng::seed_from_u64(11);
    let mut case = Case::random(&mut rng, Shape::new(3, 40, 5), 0.0, 0.0);
    case.labels[3] = 2; // image 0: one positive, 39 candidates
                        // image 1: no positive, 40 candidates
    case.labels[80..120]
        .iter_mut()
        .skip(4)
        .for_each(|l| *l = -1); // image 2: 4 candidates
    let config = MultiboxConfig {
        neg_pos_ratio: 3.0,
        min_negatives_per_image: 6,
        ..Default::default()
    };
    let out = case.run(&config);

    assert_eq!(out.negatives_mined, [6, 6, 4]);
    assert_eq!(mined(&out, 0, 40).len(), 7);
    assert_eq!(mined(&out, 1, 40).len(), 6);
    assert_eq!(mined(&out, 2, 40), [0, 1, 2, 3]);
    // The mined are the hardest: every mined key >= every unmined candidate's key.
    for image in 0..2 {
        let keys = &out.background_loss[image * 40..(image + 1) * 40];
        let is_candidate = |p: usize| case.labels[image * 40 + p] == 0;
        let set = |p: usize| out.mask[image * 40 + p] == 1;
        let lowest_mined = (0..40)
            .filter(|&p| is_candidate(p) && set(p))
            .map(|p| keys[p])
            .fold(f64::INFINITY, f64::min);
        let highest_left = (0..40)
            .filter(|&p| is_candidate(p) && !set(p))
            .map(|p| keys[p])
            .fold(0.0, f64::max);
        assert!(
            lowest_mined >= highest_left,
            "image {image}: {lowest_mined} < {highest_left}"
        );
    }
    // Without the floor, image 0 mines 3 and image 1 none.
    assert_eq!(case.run(&ratio(3.0)).negatives_mined, [3, 0, 0]);
}

#[test]
fn non_integer_ratio_rounds_down_per_image() {
    let mut case = Case::zeros(3, 30, 3);
    for (image, pos) in [(0, 3), (1, 1), (2, 5)] {
        case.labels[image * 30..image * 30 + pos]
            .iter_mut()
            .for_each(|l| *l = 1);
    }
    let out = case.run(&ratio(2.5));
    // floor(7.5), floor(2.5), floor(12.5)
    assert_eq!(out.negatives_mined, [7, 2, 12]);
    assert_eq!(out.mask.iter().map(|&m| u64::from(m)).sum::<u64>(), 9 + 21);
}

#[test]
fn beta_changes_the_smooth_l1_transition() {
    let mut case = Case::zeros(1, 2, 2);
    case.labels = vec![1, 0];
    // d = pred - gt per coordinate; beta = 0.5: two quadratic, one exactly at
    // beta (linear branch), one linear.
    case.predicted_locations[..4].copy_from_slice(&[0.25, 0.0, 1.0, 2.0]);
    case.gt_locations[..4].copy_from_slice(&[0.0, 0.375, 0.5, 0.0]);
    let config = MultiboxConfig {
        beta: 0.5,
        ..Default::default()
    };
    let out = case.run(&config);
    // 0.5 * 0.0625 / 0.5 + 0.5 * 0.140625 / 0.5 + (0.5 - 0.25) + (2 - 0.25)
    assert_eq!(out.losses.regression_loss, 0.0625 + 0.140625 + 0.25 + 1.75);
    assert_eq!(out.grad_locations[..4], [0.5, -0.75, 1.0, 1.0]);
    assert!(
        out.grad_locations[4..].iter().all(|&g| g == 0.0),
        "the negative gets no box gradient"
    );
    // beta = 1 puts the third coordinate in the quadratic branch.
    let out = case.run(&MultiboxConfig::default());
    assert_eq!(
        out.losses.regression_loss,
        0.03125 + 0.0703125 + 0.125 + 1.5
    );
    assert_eq!(out.grad_locations[..4], [0.25, -0.375, 0.5, 1.0]);
}

#[test]
fn upstream_gradients_scale_the_gradients_linearly_not_the_losses() {
    let mut rng = StdRng::seed_from_u64(3);
    let case = Case::random(&mut rng, Shape::new(2, 50, 6), 0.2, 0.1);
    let config = MultiboxConfig::default();
    let unit = case.run(&config);
    let scaled = case.run_with(
        &config,
        Upstream {
            g_reg: 2.5,
            g_cls: -0.75,
        },
    );
    assert_eq!(scaled.losses, unit.losses);
    assert_eq!(scaled.mask, unit.mask);
    let scales = [
        (&scaled.grad_locations, &unit.grad_locations, 2.5),
        (&scaled.grad_confidence, &unit.grad_confidence, -0.75),
    ];
    for (got, base, scale) in scales {
        assert!(base.iter().any(|&g| g != 0.0));
        for (&g, &b) in got.iter().zip(base) {
            assert!(
                (g - scale * b).abs() <= 1e-15 * b.abs(),
                "{g} != {scale} * {b}"
            );
        }
    }
    let zero = case.run_with(
        &config,
        Upstream {
            g_reg: 0.0,
            g_cls: 1.0,
        },
    );
    assert!(zero.grad_locations.iter().all(|&g| g == 0.0));
    assert_eq!(zero.grad_confidence, unit.grad_confidence);
}

/// Central differences of `g_reg * reg + g_cls * cls` in f64, with the mined
/// set held fixed (asserted) and every box difference away from smooth-L1's kink.
#[test]
fn gradients_match_finite_differences() {
    let mut rng = StdRng::seed_from_u64(5);
    let mut case = Case::random(&mut rng, Shape::new(2, 12, 4), 0.3, 0.1);
    let config = MultiboxConfig {
        neg_pos_ratio: 2.0,
        beta: 0.75,
        ..Default::default()
    };
    let upstream = Upstream {
        g_reg: 1.5,
        g_cls: 0.625,
    };
    // Inputs are on a 1/64 grid in [-4, 4]: h = 2^-14 keeps x ± h exact in
    // f32, and |pred - gt| is then never within h of beta = 0.75 unless it
    // equals it. The truncation error (h² f''' / 6 ~ 1e-9) and the f64
    // rounding of the losses (~1e-12 / h) stay far below the tolerance.
    let h = 1.0f32 / 16384.0;
    let tol = 1e-8;
    for (p, g) in case.predicted_locations.iter_mut().zip(&case.gt_locations) {
        if ((*p - g).abs() - config.beta).abs() < 2.0 * h {
            *p += 0.25;
        }
    }
    let base = case.run_with(&config, upstream);
    assert!(base.losses.num_pos > 0);
    assert!(
        base.negatives_mined.iter().all(|&k| k > 0),
        "both images mine: {:?}",
        base.negatives_mined
    );
    let objective = |c: &Case| {
        let out = c.run_with(&config, upstream);
        assert_eq!(out.mask, base.mask, "a perturbation changed the mined set");
        f64::from(upstream.g_reg) * out.losses.regression_loss
            + f64::from(upstream.g_cls) * out.losses.classification_loss
    };
    let central = |edit: &dyn Fn(&mut Case, f32)| {
        let (mut plus, mut minus) = (case.clone(), case.clone());
        edit(&mut plus, h);
        edit(&mut minus, -h);
        (objective(&plus) - objective(&minus)) / (2.0 * f64::from(h))
    };

    let (mut checked, mut worst) = (0, 0.0f64);
    for i in 0..case.confidence.len() {
        let fd = central(&|c: &mut Case, d| c.confidence[i] += d);
        let analytic = base.grad_confidence[i];
        worst = worst.max((fd - analytic).abs());
        assert!(
            (fd - analytic).abs() <= tol,
            "d confidence[{i}]: finite difference {fd:e}, reference {analytic:e}"
        );
        checked += usize::from(analytic != 0.0);
    }
    for i in 0..case.predicted_locations.len() {
        let fd = central(&|c: &mut Case, d| c.predicted_locations[i] += d);
        let analytic = base.grad_locations[i];
        worst = worst.max((fd - analytic).abs());
        assert!(
            (fd - analytic).abs() <= tol,
            "d predicted_locations[{i}]: finite difference {fd:e}, reference {analytic:e}"
        );
        checked += usize::from(analytic != 0.0);
    }
    println!(
        "{checked} non-zero gradients checked, max |finite difference - reference| = {worst:.2e}"
    );
    assert!(checked > 50, "only {checked} non-zero gradients checked");
}

#[test]
fn tied_keys_go_to_the_lower_prior_index() {
    // Identical background rows: 7 candidates with equal keys; 1 positive
    // mines 3: the three lowest candidate indices.
    let mut case = Case::zeros(1, 8, 3);
    case.labels[2] = 1;
    assert_eq!(mined(&case.run(&ratio(3.0)), 0, 8), [0, 1, 2, 3]);

    // Two tied groups: priors 5, 6, 7 share the highest key, 0, 1, 3, 4 a
    // lower one; 4 mined = the whole first group plus the lowest index of the second.
    for p in [5, 6, 7] {
        case.row_mut(p).copy_from_slice(&[-1.0, 0.5, 0.5]);
    }
    let out = case.run(&ratio(4.0));
    assert_eq!(out.background_loss[5], out.background_loss[7]);
    assert_eq!(mined(&out, 0, 8), [0, 2, 5, 6, 7]);
}

#[test]
fn nan_keys_rank_above_every_other_key() {
    let mut case = Case::zeros(1, 6, 3);
    case.labels[0] = 1;
    case.row_mut(2).copy_from_slice(&[-9.0, 9.0, 0.0]); // the largest finite key
    case.row_mut(4)[1] = f32::NAN;
    let out = case.run(&ratio(1.0));
    assert!(out.background_loss[4].is_nan());
    assert_eq!(mined(&out, 0, 6), [0, 4]);
    // The NaN flows into the loss, not into an error.
    assert!(out.losses.classification_loss.is_nan());
    let out = case.run(&ratio(2.0));
    assert_eq!(mined(&out, 0, 6), [0, 2, 4]);
}

#[test]
fn no_positive_in_the_batch_gives_zero_losses_and_zero_gradients() {
    let mut rng = StdRng::seed_from_u64(9);
    let case = Case::random(&mut rng, Shape::new(2, 30, 4), 0.0, 0.2);
    assert!(case.labels.iter().all(|&l| l <= 0));
    for min_neg in [0, 3] {
        let config = MultiboxConfig {
            min_negatives_per_image: min_neg,
            ..Default::default()
        };
        let out = case.run_with(
            &config,
            Upstream {
                g_reg: 3.0,
                g_cls: 3.0,
            },
        );
        assert_eq!(
            (
                out.losses.regression_loss,
                out.losses.classification_loss,
                out.losses.num_pos
            ),
            (0.0, 0.0, 0)
        );
        assert!(
            out.grad_confidence
                .iter()
                .chain(&out.grad_locations)
                .all(|&g| g == 0.0),
            "min_neg {min_neg}"
        );
        assert_eq!(out.grad_confidence.len(), case.shape.confidence_len());
        assert_eq!(out.grad_locations.len(), case.shape.locations_len());
        assert_eq!(out.negatives_mined, [u64::from(min_neg); 2]);
        assert_eq!(
            out.mask.iter().filter(|&&m| m == 1).count(),
            2 * min_neg as usize
        );
    }
}

#[test]
fn forward_gives_the_same_losses_without_gradients() {
    let mut rng = StdRng::seed_from_u64(13);
    let case = Case::random(&mut rng, Shape::new(2, 64, 7), 0.1, 0.05);
    let config = MultiboxConfig::default();
    let fwd = reference::forward(&config, case.shape, &case.inputs()).unwrap();
    let both = case.run(&config);
    assert!(both.losses.num_pos > 0 && both.losses.classification_loss > 0.0);
    assert_eq!(fwd.losses, both.losses);
    assert_eq!(fwd.mask, both.mask);
    assert_eq!(fwd.background_loss, both.background_loss);
    assert!(fwd.grad_confidence.is_empty() && fwd.grad_locations.is_empty());
}

#[test]
fn label_and_input_types_do_not_change_the_result() {
    let mut rng = StdRng::seed_from_u64(17);
    let case = Case::random(&mut rng, Shape::new(2, 40, 5), 0.15, 0.1);
    let config = MultiboxConfig::default();
    let want = case.run(&config);
    // The 1/64 grid in [-4, 4] is exact in f16 and bf16.
    let labels32: Vec<i32> = case.labels.iter().map(|&l| l as i32).collect();
    let to_bf16 = |v: &[f32]| {
        v.iter()
            .map(|&x| half::bf16::from_f32(x))
            .collect::<Vec<_>>()
    };
    let (conf, pred, gt) = (
        to_bf16(&case.confidence),
        to_bf16(&case.predicted_locations),
        to_bf16(&case.gt_locations),
    );
    let inputs = Inputs {
        confidence: &conf,
        predicted_locations: &pred,
        labels: &labels32,
        gt_locations: &gt,
    };
    let got =
        reference::forward_backward(&config, case.shape, &inputs, Upstream::default()).unwrap();
    assert_eq!(got, want);
}

/// Against a naive stable descending sort per image, on an SSD300-sized batch
/// whose rows come from a small pool, so that exact ties are everywhere.
#[test]
fn mining_matches_a_stable_descending_sort_on_a_full_size_batch() {
    let mut rng = StdRng::seed_from_u64(21);
    let shape = Shape::new(32, 8732, 81);
    let pool: Vec<Vec<f32>> = (0..40)
        .map(|_| {
            (0..81)
                .map(|_| rng.random_range(-256i32..=256) as f32 / 64.0)
                .collect()
        })
        .collect();
    let mut case = Case::zeros(shape.batch, shape.priors, shape.classes);
    for row in 0..shape.rows() {
        let pick = rng.random_range(0..pool.len());
        case.row_mut(row).copy_from_slice(&pool[pick]);
        let u: f64 = rng.random();
        case.labels[row] = if u < 0.01 {
            rng.random_range(1..81)
        } else if u < 0.05 {
            -1
        } else {
            0
        };
    }
    let config = ratio(3.0);
    let out = case.run(&config);

    let p_count = shape.priors;
    for image in 0..shape.batch {
        let labels = &case.labels[image * p_count..(image + 1) * p_count];
        let keys = &out.background_loss[image * p_count..(image + 1) * p_count];
        let pos = labels.iter().filter(|&&l| l > 0).count() as u64;
        let mut candidates: Vec<usize> = (0..p_count).filter(|&p| labels[p] == 0).collect();
        let k = (3 * pos).min(candidates.len() as u64) as usize;
        assert_eq!(out.negatives_mined[image], k as u64);
        candidates.sort_by(|&a, &b| keys[b].total_cmp(&keys[a])); // stable: ties keep index order
        let mut want: Vec<usize> = candidates[..k].to_vec();
        want.extend((0..p_count).filter(|&p| labels[p] > 0));
        want.sort_unstable();
        assert_eq!(mined(&out, image, p_count), want, "image {image}");
    }
}

// ---- bad input: each gets its own error ----

fn small() -> Case {
    let mut case = Case::zeros(2, 5, 3);
    case.labels[1] = 1;
    case
}

/// Breaks one input of a case.
type Edit = fn(&mut Case);

#[test]
fn each_wrong_length_names_its_argument() {
    let config = MultiboxConfig::default();
    let shape = small().shape;
    let edits: [(&str, usize, Edit); 4] = [
        ("confidence", shape.confidence_len(), |c| {
            c.confidence.push(0.0)
        }),
        ("predicted_locations", shape.locations_len(), |c| {
            c.predicted_locations.pop();
        }),
        ("labels", shape.rows(), |c| c.labels.push(0)),
        ("gt_locations", shape.locations_len(), |c| {
            c.gt_locations.clear()
        }),
    ];
    for (name, len, edit) in edits {
        let mut case = small();
        edit(&mut case);
        let err = case.try_run(&config, Upstream::default()).unwrap_err();
        assert!(
            matches!(err, Error::LengthMismatch { name: n, expected, shape: s, .. } if n == name && expected == len && s == shape),
            "{name}: {err}"
        );
        assert!(err.to_string().contains(name));
        let fwd = reference::forward(&config, case.shape, &case.inputs()).unwrap_err();
        assert!(matches!(fwd, Error::LengthMismatch { name: n, .. } if n == name));
    }
}

#[test]
fn shapes_out_of_range_are_refused() {
    let config = MultiboxConfig::default();
    let empty = Inputs::<f32, i64> {
        confidence: &[],
        predicted_locations: &[],
        labels: &[],
        gt_locations: &[],
    };
    for shape in [
        Shape::new(2, 5, 1),
        Shape::new(0, 5, 3),
        Shape::new(2, 0, 3),
    ] {
        let err =
            reference::forward_backward(&config, shape, &empty, Upstream::default()).unwrap_err();
        assert!(
            matches!(err, Error::InvalidShape { shape: s, .. } if s == shape),
            "{shape}: {err}"
        );
    }
    let huge = Shape::new(1 << 16, 1 << 16, 2);
    let err = reference::forward(&config, huge, &empty).unwrap_err();
    assert!(
        matches!(err, Error::TooLarge { shape: s, .. } if s == huge),
        "{err}"
    );
}

#[test]
fn invalid_labels_are_reported_with_their_position() {
    for bad in [5, 3, -2, i64::MIN] {
        let mut case = small();
        case.labels[5 + 2] = bad; // image 1, prior 2
        let err = case
            .try_run(&MultiboxConfig::default(), Upstream::default())
            .unwrap_err();
        assert!(
            matches!(err, Error::InvalidLabel { image: 1, prior: 2, value, classes: 3 } if value == bad),
            "label {bad}: {err}"
        );
        // The message names the valid classes, 1 to C-1, not 1 to C.
        let message = err.to_string();
        assert!(
            message.contains("from 1 to 2 (C = 3 classes"),
            "label {bad}: {message}"
        );
    }
    // The edges are valid.
    let mut case = small();
    case.labels[0] = 2;
    case.labels[3] = -1;
    assert!(case
        .try_run(&MultiboxConfig::default(), Upstream::default())
        .is_ok());
    // i32 labels too.
    let case = small();
    let labels: Vec<i32> = vec![0, 0, 0, 0, -3, 0, 0, 0, 0, 0];
    let inputs = Inputs {
        confidence: &case.confidence,
        predicted_locations: &case.predicted_locations,
        labels: &labels,
        gt_locations: &case.gt_locations,
    };
    let err = reference::forward(&MultiboxConfig::default(), case.shape, &inputs).unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidLabel {
                image: 0,
                prior: 4,
                value: -3,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn invalid_config_values_are_refused() {
    let case = small();
    let bad_ratios = [0.0, -1.0, f32::NAN, f32::INFINITY];
    let bad_betas = [0.0, -0.5, f32::NAN, f32::INFINITY];
    let configs = bad_ratios
        .iter()
        .map(|&r| MultiboxConfig {
            neg_pos_ratio: r,
            ..Default::default()
        })
        .chain(bad_betas.iter().map(|&b| MultiboxConfig {
            beta: b,
            ..Default::default()
        }));
    for config in configs {
        let err = case.try_run(&config, Upstream::default()).unwrap_err();
        assert!(matches!(err, Error::InvalidConfig(_)), "{config:?}: {err}");
        assert!(matches!(
            reference::forward(&config, case.shape, &case.inputs()),
            Err(Error::InvalidConfig(_))
        ));
    }
}

#[test]
fn non_finite_upstream_gradients_are_refused() {
    let case = small();
    let config = MultiboxConfig::default();
    let cases = [
        (
            Upstream {
                g_reg: f32::NAN,
                g_cls: 1.0,
            },
            "g_reg",
        ),
        (
            Upstream {
                g_reg: 1.0,
                g_cls: f32::NAN,
            },
            "g_cls",
        ),
        (
            Upstream {
                g_reg: 1.0,
                g_cls: f32::NEG_INFINITY,
            },
            "g_cls",
        ),
    ];
    for (upstream, which) in cases {
        let err = case.try_run(&config, upstream).unwrap_err();
        assert!(
            matches!(err, Error::InvalidUpstream { name, .. } if name == which),
            "{upstream:?}: {err}"
        );
    }
}

// ---- rounding the f64 gradients to f16 / bf16 ----

/// The value nearest to `x` among `r` and its two neighbours, ties to even:
/// what a correctly rounded `from_f64` must return.
fn assert_correctly_rounded<T: multibox::Float>(
    x: f64,
    r: T,
    bits: fn(T) -> u16,
    from_bits: fn(u16) -> T,
) {
    let b = bits(r);
    let err = |t: T| (f64::from(t.to_f32()) - x).abs();
    for nb in [b.wrapping_sub(1), b.wrapping_add(1)] {
        let n = from_bits(nb);
        if n.to_f32().is_finite() && (nb & 0x7fff) != 0x7fff && (b ^ nb) & 0x8000 == 0 {
            let (e, en) = (err(r), err(n));
            assert!(
                e < en || (e == en && b & 1 == 0),
                "{x:e} rounded to {:e}, but {:e} is nearer",
                r.to_f32(),
                n.to_f32()
            );
        }
    }
}

#[test]
fn f64_gradients_round_once_to_the_nearest_half_value() {
    use half::{bf16, f16};
    use multibox::Float;
    // Just above a midpoint, by less than an f32 ulp: rounding f64 -> f32 -> T
    // or dropping the low mantissa bits gives the tie's even neighbour instead.
    let above = 1.0 + 2f64.powi(-40);
    assert_eq!(
        <bf16 as Float>::from_f64((1.0 + 2f64.powi(-8)) * above).to_bits(),
        0x3f81
    );
    assert_eq!(
        <f16 as Float>::from_f64((1.0 + 2f64.powi(-11)) * above).to_bits(),
        0x3c01
    );
    assert_eq!(
        <bf16 as Float>::from_f64(-(1.0 + 2f64.powi(-8)) * above).to_bits(),
        0xbf81
    );
    // Exact ties still go to even.
    assert_eq!(
        <bf16 as Float>::from_f64(1.0 + 2f64.powi(-8)).to_bits(),
        0x3f80
    );
    assert_eq!(
        <f16 as Float>::from_f64(1.0 + 3.0 * 2f64.powi(-11)).to_bits(),
        0x3c02
    );

    let mut rng = StdRng::seed_from_u64(23);
    for _ in 0..200_000 {
        // Values around midpoints, in the normal and subnormal ranges.
        let x = rng.random_range(-1.0..1.0f64) * 2f64.powi(rng.random_range(-30..10));
        assert_correctly_rounded(x, <f16 as Float>::from_f64(x), f16::to_bits, f16::from_bits);
        assert_correctly_rounded(
            x,
            <bf16 as Float>::from_f64(x),
            bf16::to_bits,
            bf16::from_bits,
        );
    }
}

#[test]
fn negatives_to_mine_takes_the_exact_floor_of_ratio_times_positives() {
    let k = |ratio: f32, pos: u64| {
        MultiboxConfig {
            neg_pos_ratio: ratio,
            ..Default::default()
        }
        .negatives_to_mine(pos, u64::MAX)
    };
    // Where f64 is exact, the same as its floor.
    for pos in [0u64, 1, 7, 8732, (1 << 29) - 1] {
        for ratio in [0.1f32, 1.0 / 3.0, 2.9999998, 3.0, 3.0000002, 7.0] {
            assert_eq!(
                k(ratio, pos),
                (f64::from(ratio) * pos as f64).floor() as u64
            );
        }
    }
    // 3.0000002384185791015625 * 2147483647 = 6442451452.99999976...,
    // which f64 rounds up to an integer.
    assert_eq!(k(f32::from_bits(0x4040_0001), 2_147_483_647), 6_442_451_452);
    assert_eq!(k(f32::MAX, 2), u64::MAX);
    assert_eq!(k(1e30, 0), 0);
}

// ---------------------------------------------------------------------------
// Normalisers and layouts (SPEC.md, "Normalisation" and "Layouts").

fn run_options(case: &Case, options: Options) -> Output {
    reference::forward_backward_with(
        &MultiboxConfig::default(),
        case.shape,
        &case.inputs(),
        Upstream {
            g_reg: 0.5,
            g_cls: 2.0,
        },
        &options,
    )
    .expect("valid input")
}

fn given(n: f32) -> Options {
    Options {
        normalizer: Normalizer::Given(n),
        ..Default::default()
    }
}

#[test]
fn a_given_divisor_rescales_losses_and_gradients_by_n_over_it() {
    let mut rng = StdRng::seed_from_u64(41);
    let case = Case::random(&mut rng, Shape::new(3, 50, 6), 0.1, 0.05);
    let by_positives = run_options(&case, Options::default());
    let n_pos = by_positives.losses.num_pos as f64;
    assert!(n_pos > 0.0);
    for n in [1.0f32, 7.5, 1234.0] {
        let out = run_options(&case, given(n));
        let factor = n_pos / f64::from(n);
        assert_eq!(out.mask, by_positives.mask, "mining does not see n");
        assert_eq!(
            out.losses.num_pos, by_positives.losses.num_pos,
            "num_pos stays local"
        );
        let l = |o: &Output| [o.losses.regression_loss, o.losses.classification_loss];
        for (got, want) in l(&out).into_iter().zip(l(&by_positives)) {
            assert_close(got, want * factor, 1e-14, &format!("loss, n = {n}"));
        }
        for (got, want) in out.grad_confidence.iter().chain(&out.grad_locations).zip(
            by_positives
                .grad_confidence
                .iter()
                .chain(&by_positives.grad_locations),
        ) {
            assert!((got - want * factor).abs() <= 1e-15 * want.abs().max(1e-300) * 4.0);
        }
    }
}

#[test]
fn a_given_divisor_of_zero_or_less_gives_zeros_and_a_non_finite_one_nan() {
    let mut rng = StdRng::seed_from_u64(43);
    let case = Case::random(&mut rng, Shape::new(2, 40, 5), 0.15, 0.0);
    for n in [0.0f32, -0.0, -3.0, f32::NEG_INFINITY] {
        let out = run_options(&case, given(n));
        if n.is_finite() {
            assert_eq!(out.losses.regression_loss, 0.0, "n = {n}");
            assert_eq!(out.losses.classification_loss, 0.0, "n = {n}");
            assert!(out
                .grad_confidence
                .iter()
                .chain(&out.grad_locations)
                .all(|&g| g == 0.0));
        } else {
            assert!(out.losses.regression_loss.is_nan() && out.losses.classification_loss.is_nan());
        }
        assert!(out.losses.num_pos > 0);
    }
    for n in [f32::NAN, f32::INFINITY] {
        let out = run_options(&case, given(n));
        assert!(out.losses.regression_loss.is_nan(), "n = {n}");
        assert!(out.losses.classification_loss.is_nan(), "n = {n}");
        // The set's gradients are NaN, every other one 0.
        for (row, &m) in out.mask.iter().enumerate() {
            let g = &out.grad_confidence[row * 5..row * 5 + 5];
            assert!(g
                .iter()
                .all(|v| if m == 1 { v.is_nan() } else { *v == 0.0 }));
        }
    }
}

#[test]
fn per_image_normalisation_averages_each_images_own_ratio() {
    // Image 0: 1 positive; image 1: 4; image 2: none (adds 0, still counts in B).
    let mut rng = StdRng::seed_from_u64(47);
    let mut case = Case::random(&mut rng, Shape::new(3, 20, 4), 0.0, 0.0);
    for (image, positives) in [(0, 1), (1, 4)] {
        for p in 0..positives {
            case.labels[image * 20 + p] = 1 + p as i64 % 3;
        }
    }
    let config = MultiboxConfig {
        min_negatives_per_image: 2,
        ..Default::default()
    };
    let per_image = Options {
        normalizer: Normalizer::PerImage,
        ..Default::default()
    };
    let run = |options: &Options, case: &Case| {
        reference::forward_backward_with(
            &config,
            case.shape,
            &case.inputs(),
            Upstream::default(),
            options,
        )
        .unwrap()
    };
    let out = run(&per_image, &case);
    let whole = run(&Options::default(), &case);
    assert_eq!(out.mask, whole.mask);
    assert_eq!(out.losses.num_pos, 5);
    // Each image alone, normalised by its own positives (the default on a
    // one-image batch), then the mean over the three images.
    let mut want = [0.0f64; 2];
    for image in 0..3 {
        let one = Case {
            shape: Shape::new(1, 20, 4),
            confidence: case.confidence[image * 80..(image + 1) * 80].to_vec(),
            predicted_locations: case.predicted_locations[image * 80..(image + 1) * 80].to_vec(),
            labels: case.labels[image * 20..(image + 1) * 20].to_vec(),
            gt_locations: case.gt_locations[image * 80..(image + 1) * 80].to_vec(),
        };
        let o = run(&Options::default(), &one);
        want[0] += o.losses.regression_loss / 3.0;
        want[1] += o.losses.classification_loss / 3.0;
        // Gradients: image b's rows scaled by 1 / (B pos_b), i.e. the
        // one-image gradient divided by B; zero for the image without positives.
        let rows = image * 20..(image + 1) * 20;
        for (got, w) in out.grad_confidence[rows.start * 4..rows.end * 4]
            .iter()
            .zip(&o.grad_confidence)
        {
            assert_close(*got, w / 3.0, 1e-15, "grad_confidence");
        }
        if image == 2 {
            assert!(out.grad_confidence[rows.start * 4..rows.end * 4]
                .iter()
                .all(|&g| g == 0.0));
            assert!(
                out.mask[rows.clone()].contains(&1),
                "its mined negatives are in the mask"
            );
        }
    }
    assert_close(out.losses.regression_loss, want[0], 1e-15, "reg");
    assert_close(out.losses.classification_loss, want[1], 1e-15, "cls");
}

#[test]
fn channel_major_inputs_give_the_row_major_result_transposed() {
    let mut rng = StdRng::seed_from_u64(53);
    let case = Case::random(&mut rng, Shape::new(2, 33, 5), 0.1, 0.05);
    let shape = case.shape;
    let (rm, cm) = (Layout::RowMajor, Layout::ChannelMajor);
    let confidence = rm.convert(&case.confidence, shape, 5, cm);
    let predicted_locations = rm.convert(&case.predicted_locations, shape, 4, cm);
    let gt_locations = rm.convert(&case.gt_locations, shape, 4, cm);
    let inputs = Inputs {
        confidence: &confidence,
        predicted_locations: &predicted_locations,
        labels: &case.labels,
        gt_locations: &gt_locations,
    };
    for normalizer in [
        Normalizer::Positives,
        Normalizer::Given(3.0),
        Normalizer::PerImage,
    ] {
        let want = run_options(
            &case,
            Options {
                normalizer,
                ..Default::default()
            },
        );
        let got = reference::forward_backward_with(
            &MultiboxConfig::default(),
            shape,
            &inputs,
            Upstream {
                g_reg: 0.5,
                g_cls: 2.0,
            },
            &Options {
                layout: cm,
                normalizer,
            },
        )
        .unwrap();
        assert_eq!(got.losses, want.losses);
        assert_eq!(got.mask, want.mask);
        assert_eq!(
            got.grad_confidence,
            rm.convert(&want.grad_confidence, shape, 5, cm)
        );
        assert_eq!(
            got.grad_locations,
            rm.convert(&want.grad_locations, shape, 4, cm)
        );
    }
}
