//! The crate's CUDA kernels, run on the CPU by the emulator, against the CPU
//! reference on randomized cases; determinism; the device status word; and
//! every bad input, refused before anything is launched.

mod common;

use common::emulated::{
    self, Call, Forward, HostInputs, KernelOutput, Normalizer, Placed, Upstream,
};
use common::extents::Extents;
use half::{bf16, f16};
use multibox::reference;
use multibox::synthetic::SplitMix64;
use multibox::{
    launch_call, Backend, Error, Float, Label, Layout, MultiboxConfig, Pass, RawBuffers, RawCall,
    RawNormalizer, RawUpstream, Shape,
};
use multibox_emu::Arch;

/// One randomized case, drawn to reach the corners: heavy ties, images with
/// no positive or only positives, ignored priors, odd shapes.
struct Drawn<T, L> {
    shape: Shape,
    config: MultiboxConfig,
    confidence: Vec<T>,
    predicted_locations: Vec<T>,
    labels: Vec<L>,
    gt_locations: Vec<T>,
    upstream: (f32, f32),
}

impl<T: Float, L: Label> Drawn<T, L> {
    fn draw(seed: u64, max_elements: usize) -> Self {
        Self::draw_with_classes(seed, max_elements, None)
    }

    /// As `draw`, with `classes` classes (when given) instead of the drawn
    /// count; everything else is drawn as `draw` draws it.
    fn draw_with_classes(seed: u64, max_elements: usize, classes: Option<usize>) -> Self {
        let mut rng = SplitMix64(seed);
        let mut pick = |n: u64| rng.next_u64() % n;
        let drawn = [2, 3, 21, 33, 81, 91, 200][pick(7) as usize];
        let classes = classes.unwrap_or(drawn);
        let batch = 1 + pick(64) as usize;
        let max_priors = (max_elements / (batch * classes)).clamp(1, 20000);
        let priors = 1 + pick(max_priors as u64) as usize;
        let shape = Shape::new(batch, priors, classes);
        let config = MultiboxConfig {
            neg_pos_ratio: [3.0, 0.5, 1.0, 2.5, 7.0][pick(5) as usize],
            min_negatives_per_image: [0, 0, 1, 5, 50][pick(5) as usize],
            beta: [1.0, 0.11, 2.0][pick(3) as usize],
            ..Default::default()
        };
        // Ties: logits on a coarse grid make many rows (and keys) equal.
        let ties = pick(3) == 0;
        let positive_fraction = [0.0, 0.01, 0.05, 0.3, 1.0][pick(5) as usize];
        let ignored_fraction = [0.0, 0.0, 0.1][pick(3) as usize];
        let scale = [1.0, 4.0, 20.0][pick(3) as usize];
        let mut rng = SplitMix64(seed ^ 0x5eed);
        let confidence = (0..shape.confidence_len())
            .map(|_| {
                let x = rng.normal() * scale;
                T::from_f64(if ties { (x * 0.5).round() } else { x })
            })
            .collect();
        let predicted_locations = (0..shape.locations_len())
            .map(|_| T::from_f64(rng.normal()))
            .collect();
        let gt_locations = (0..shape.locations_len())
            .map(|_| T::from_f64(rng.normal()))
            .collect();
        let empty_image = rng.next_u64().is_multiple_of(4);
        let labels = (0..shape.rows())
            .map(|r| {
                let u = rng.uniform();
                let label = if empty_image && r < priors {
                    0 // the first image has no positive
                } else if u < positive_fraction {
                    1 + (rng.next_u64() % (classes as u64 - 1)) as i64
                } else if u < positive_fraction + ignored_fraction {
                    -1
                } else {
                    0
                };
                L::from_i64(label)
            })
            .collect();
        let upstream = [(1.0, 1.0), (0.5, 2.0), (1024.0, 1024.0)][(rng.next_u64() % 3) as usize];
        Self {
            shape,
            config,
            confidence,
            predicted_locations,
            labels,
            gt_locations,
            upstream,
        }
    }

    /// A case with the given logits and labels, random box offsets from
    /// `rng`, the default configuration and unit upstream gradients.
    fn with(shape: Shape, confidence: Vec<T>, labels: Vec<L>, rng: &mut SplitMix64) -> Self {
        let locations: Vec<f64> = (0..shape.locations_len()).map(|_| rng.normal()).collect();
        Self {
            shape,
            config: MultiboxConfig::default(),
            confidence,
            predicted_locations: locations.iter().map(|&v| T::from_f64(v)).collect(),
            labels,
            gt_locations: locations.iter().map(|&v| T::from_f64(v * 0.5)).collect(),
            upstream: (1.0, 1.0),
        }
    }

    fn host(&self) -> HostInputs<'_, T, L> {
        HostInputs {
            confidence: &self.confidence,
            predicted_locations: &self.predicted_locations,
            labels: &self.labels,
            gt_locations: &self.gt_locations,
        }
    }

    fn reference(&self) -> reference::Output {
        self.reference_with(Normalizer::Positives)
    }

    /// The reference on the row-major inputs, under `normalizer`.
    fn reference_with(&self, normalizer: Normalizer) -> reference::Output {
        let inputs = reference::Inputs {
            confidence: &self.confidence,
            predicted_locations: &self.predicted_locations,
            labels: &self.labels,
            gt_locations: &self.gt_locations,
        };
        let upstream = reference::Upstream {
            g_reg: self.upstream.0,
            g_cls: self.upstream.1,
        };
        let options = reference::Options {
            normalizer: normalizer.reference(),
            ..Default::default()
        };
        reference::forward_backward_with(&self.config, self.shape, &inputs, upstream, &options)
            .unwrap()
    }

    /// What each image's sums are divided by under `normalizer` (SPEC.md,
    /// "Normalisation"); None: the image adds 0.
    fn divisors(&self, normalizer: Normalizer) -> Vec<Option<f64>> {
        let p = self.shape.priors;
        let positives: Vec<u64> = (0..self.shape.batch)
            .map(|b| {
                (0..p)
                    .filter(|&i| self.labels[b * p + i].to_i64() > 0)
                    .count() as u64
            })
            .collect();
        let total: u64 = positives.iter().sum();
        let batch = self.shape.batch as f64;
        positives
            .iter()
            .map(|&pos| match normalizer {
                Normalizer::Positives => (total > 0).then_some(total as f64),
                Normalizer::Given(n) | Normalizer::GivenOnDevice(n) => {
                    (n > 0.0).then_some(f64::from(n))
                }
                Normalizer::PerImage => (pos > 0).then_some(batch * pos as f64),
            })
            .collect()
    }
}

/// Holds the kernels' output to the reference within SPEC.md's tolerances.
///
/// The kernels compute mining keys in f32, the reference in f64; two keys
/// within f32 rounding of each other may come out in either order. So a
/// prior mined by one and not the other must be a candidate whose key lies
/// within that rounding of the image's k-th key, each image must mine
/// exactly k_b, and such a row's gradient is checked against the f64
/// softmax gradient for the set the kernels chose.
///
/// `divisors[b]` is what image b's sums are divided by (None: it adds 0).
fn compare<T: Float, L: Label>(
    what: &str,
    case: &Drawn<T, L>,
    want: &reference::Output,
    got: &KernelOutput<T>,
    divisors: &[Option<f64>],
) {
    let shape = case.shape;
    let (p, c) = (shape.priors, shape.classes);
    assert!(got.status.is_ok(), "{what}: status {:?}", got.status);
    assert_eq!(got.num_pos as u64, want.losses.num_pos, "{what}: num_pos");

    let mut swapped_loss = 0.0f64; // cls difference the boundary choices explain
    for (b, &divisor) in divisors.iter().enumerate() {
        let mined: usize = (0..p)
            .filter(|&i| got.mask[b * p + i] == 1 && case.labels[b * p + i].to_i64() == 0)
            .count();
        assert_eq!(
            mined as u64, want.negatives_mined[b],
            "{what}: image {b} mined {mined} negatives"
        );
        let keys: Vec<f64> = (0..p)
            .filter(|&i| want.mask[b * p + i] == 1 && case.labels[b * p + i].to_i64() == 0)
            .map(|i| want.background_loss[b * p + i])
            .collect();
        let kth = keys.iter().copied().fold(f64::INFINITY, f64::min);
        for i in 0..p {
            let r = b * p + i;
            if got.mask[r] == want.mask[r] {
                continue;
            }
            assert_eq!(
                case.labels[r].to_i64(),
                0,
                "{what}: prior {r} is not a candidate but masks differ"
            );
            let key = want.background_loss[r];
            let tol = 4e-6 * kth.abs().max(1.0);
            assert!(
                (key - kth).abs() <= tol,
                "{what}: prior {r} (key {key}) chosen differently, but the k-th key is {kth}"
            );
            if let Some(d) = divisor {
                swapped_loss += if got.mask[r] == 1 { key / d } else { -key / d };
            }
        }
    }

    let rel = |got: f64, want: f64| {
        if want == 0.0 {
            got.abs()
        } else {
            ((got - want) / want).abs()
        }
    };
    let reg = f64::from(got.regression_loss);
    assert!(
        rel(reg, want.losses.regression_loss) <= 1e-6,
        "{what}: reg {reg} vs {}",
        want.losses.regression_loss
    );
    let cls = f64::from(got.classification_loss);
    let want_cls = want.losses.classification_loss + swapped_loss;
    assert!(
        rel(cls, want_cls) <= 1e-6,
        "{what}: cls {cls} vs {want_cls}"
    );

    // The reference's gradient, with rows the kernels chose differently recomputed.
    let mut grad = want.grad_confidence.clone();
    for r in 0..shape.rows() {
        if got.mask[r] == want.mask[r] {
            continue;
        }
        let row = &case.confidence[r * c..(r + 1) * c];
        let x: Vec<f64> = row.iter().map(|v| f64::from(v.to_f32())).collect();
        let m = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let s: f64 = x.iter().map(|v| (v - m).exp()).sum();
        for j in 0..c {
            grad[r * c + j] = match divisors[r / p] {
                Some(d) if got.mask[r] == 1 => {
                    f64::from(case.upstream.1) / d
                        * ((x[j] - m).exp() / s - if j == 0 { 1.0 } else { 0.0 })
                }
                _ => 0.0,
            };
        }
    }
    check_grad(what, "grad_confidence", &grad, &got.grad_confidence);
    check_grad(
        what,
        "grad_locations",
        &want.grad_locations,
        &got.grad_locations,
    );
}

fn check_grad<T: Float>(what: &str, name: &str, want: &[f64], got: &[T]) {
    assert_eq!(want.len(), got.len(), "{what}: {name} length");
    let scale = want.iter().fold(0.0f64, |m, g| m.max(g.abs()));
    for (i, (&w, &g)) in want.iter().zip(got).enumerate() {
        let ok = if T::DTYPE == multibox::DType::F32 {
            (f64::from(g.to_f32()) - w).abs() <= 1e-6 * scale
        } else {
            ulps_apart(g, T::from_f64(w)) <= 1
        };
        assert!(ok, "{what}: {name}[{i}] = {:?}, reference {w}", g.to_f32());
    }
}

fn ulps_apart<T: Float>(a: T, b: T) -> u32 {
    let ordered = |x: T| {
        let bits = u32::from(bytemuck::cast::<T, u16>(x));
        if bits & 0x8000 != 0 {
            0x8000 - (bits & 0x7fff)
        } else {
            0x8000 + bits
        }
    };
    ordered(a).abs_diff(ordered(b))
}

/// The kernels on `case` with its upstream gradients, held to the reference:
/// as sm_75 runs them with the host's math, or (`gpu_like`, a seed) as
/// sm_90 does with the device math model's.
fn checked_with_its_upstream<T: Float, L: Label>(
    what: &str,
    case: &Drawn<T, L>,
    gpu_like: Option<u32>,
) {
    let want = case.reference();
    let call = Call {
        upstream: Upstream::Host(case.upstream.0, case.upstream.1),
        device_math: gpu_like,
        arch: if gpu_like.is_some() {
            Arch::Sm90
        } else {
            Arch::Sm75
        },
        ..Call::default()
    };
    let got = emulated::run(&case.config, case.shape, &case.host(), call)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    compare(
        what,
        case,
        &want,
        &got,
        &case.divisors(Normalizer::Positives),
    );
}

/// Cases drawn from `seeds`, odd seeds as sm_90 runs the kernels, with exp
/// and log as a GPU's math library may compute them (the emulator's device
/// math model).
fn randomized<T: Float, L: Label>(seeds: std::ops::Range<u64>, max_elements: usize) {
    for seed in seeds {
        let case = Drawn::<T, L>::draw(seed, max_elements);
        let gpu_like = (seed % 2 == 1).then_some(seed as u32);
        let what = format!(
            "seed {seed} {:?}/{:?} {} {:?} sm_90 and device math {gpu_like:?}",
            T::DTYPE,
            L::LABEL_TYPE,
            case.shape,
            case.config
        );
        checked_with_its_upstream(&what, &case, gpu_like);
    }
}

#[test]
fn randomized_f32_i64() {
    randomized::<f32, i64>(0..12, 400_000);
}

#[test]
fn randomized_f32_i32() {
    randomized::<f32, i32>(100..108, 200_000);
}

#[test]
fn randomized_f16_i64() {
    randomized::<f16, i64>(200..208, 200_000);
}

#[test]
fn randomized_f16_i32() {
    randomized::<f16, i32>(300..306, 200_000);
}

#[test]
fn randomized_bf16_i64() {
    randomized::<bf16, i64>(400..408, 200_000);
}

#[test]
fn randomized_bf16_i32() {
    randomized::<bf16, i32>(500..506, 200_000);
}

/// Each randomized case under every normaliser: row-major against the
/// reference, and channel-major against row-major on the transposed
/// inputs. Both layouts compute every row's statistics with the same lanes
/// in the same order, so everything must be the same bits: the mask,
/// `num_pos`, the losses (summed per image in the same order) and every
/// gradient.
/// `classes`, when given, replaces the drawn class count.
fn layouts_and_normalisers<T: Float, L: Label>(
    seeds: std::ops::Range<u64>,
    max_elements: usize,
    classes: Option<usize>,
) {
    for seed in seeds {
        let case = Drawn::<T, L>::draw_with_classes(seed, max_elements, classes);
        let n = [0.5f32, 3.0, 1234.5][(seed % 3) as usize];
        let normalizer = [
            Normalizer::Positives,
            Normalizer::Given(n),
            Normalizer::GivenOnDevice(n),
            Normalizer::PerImage,
        ][(seed % 4) as usize];
        let what = format!("seed {seed} {:?} {} {normalizer:?}", T::DTYPE, case.shape);
        let want = case.reference_with(normalizer);
        let divisors = case.divisors(normalizer);
        let call = Call {
            upstream: Upstream::Host(case.upstream.0, case.upstream.1),
            normalizer,
            ..Call::default()
        };
        let row_major = emulated::run(&case.config, case.shape, &case.host(), call)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        compare(
            &format!("{what} row-major"),
            &case,
            &want,
            &row_major,
            &divisors,
        );

        let call = Call {
            layout: Layout::ChannelMajor,
            ..call
        };
        assert_channel_major_is_row_major(&what, &case, call, &row_major);
    }
}

/// `case` channel-major on the emulator: every output bit of `row_major`.
fn assert_channel_major_is_row_major<T: Float, L: Label>(
    what: &str,
    case: &Drawn<T, L>,
    call: Call,
    row_major: &KernelOutput<T>,
) {
    let run =
        |inputs: &HostInputs<'_, T, L>, call| emulated::run(&case.config, case.shape, inputs, call);
    emulated::assert_channel_major_is_row_major(
        what,
        case.shape,
        &case.host(),
        call,
        row_major,
        run,
    );
}

#[test]
fn randomized_layouts_and_normalisers_f32() {
    layouts_and_normalisers::<f32, i64>(600..612, 200_000, None);
}

#[test]
fn randomized_layouts_and_normalisers_half() {
    layouts_and_normalisers::<f16, i32>(700..704, 100_000, None);
    layouts_and_normalisers::<bf16, i64>(800..804, 100_000, None);
}

/// The class counts of the common SSD heads (VOC's 21, COCO's 81,
/// torchvision's SSDLite's 91) in the types they train in, each on the
/// path its plan gives it: kernel 1 a thread per row up to C = 91 in
/// f16/bf16 and C = 45 in f32, kernel 3 a staged tile up to C = 83 and 41.
/// Against the reference, and channel-major bit for bit.
#[test]
fn common_ssd_heads_match_the_reference_in_both_layouts() {
    layouts_and_normalisers::<f32, i64>(900..901, 200_000, Some(21));
    layouts_and_normalisers::<f32, i32>(901..902, 200_000, Some(81));
    layouts_and_normalisers::<bf16, i64>(902..903, 200_000, Some(81));
    layouts_and_normalisers::<f16, i32>(903..904, 200_000, Some(91));
    layouts_and_normalisers::<bf16, i64>(904..905, 200_000, Some(91));
}

/// Kernel 1's lane groups each take a contiguous run of a row's classes,
/// read with 16-byte loads row-major: four lanes (C = 200 in bf16), 32
/// whose last lane's run is empty (C = 961 in f32, 31 classes a lane), and
/// half-type rows too long for a tile, whose runs' ends are read from
/// global memory element by element (C = 3000 in bf16).
#[test]
fn lane_groups_split_rows_into_runs_of_classes() {
    use multibox::plan::{lanes_per_row, tile_rows};
    use multibox::DType;
    assert_eq!(lanes_per_row(200, DType::BF16), 4);
    assert_eq!(lanes_per_row(961, DType::F32), 32);
    let shape = |classes| multibox::Shape::new(1, 100, classes);
    assert_eq!(tile_rows(shape(961), 32, Layout::RowMajor, DType::F32), 8);
    assert_eq!(lanes_per_row(3000, DType::BF16), 32);
    assert_eq!(tile_rows(shape(3000), 32, Layout::RowMajor, DType::BF16), 0);
    layouts_and_normalisers::<bf16, i64>(905..906, 200_000, Some(200));
    layouts_and_normalisers::<f32, i32>(906..907, 200_000, Some(961));
    layouts_and_normalisers::<bf16, i32>(907..908, 200_000, Some(3000));
}

/// Kernel 3's staged set rows: lane groups of `set_lanes` (up to 16
/// classes a lane) for the arithmetic, and wider groups of
/// `set_copy_lanes` (a lane for each 16-byte word a row can cover) that
/// copy each warp's rows into the tile in rounds: one lane a row and four
/// copying (C = 16 in f16), two and four (C = 17 in bf16), four and
/// sixteen (C = 41 in f32, the largest staged f32 row), eight and sixteen
/// (C = 83 in bf16, the largest staged half row). Against the reference,
/// and channel-major bit for bit.
#[test]
fn kernel_3_copies_set_rows_wide_and_works_them_narrow() {
    use multibox::plan::{gradient_tile_rows, set_copy_lanes, set_lanes};
    use multibox::DType;
    for (classes, dtype, lanes, copy) in [
        (16, DType::F16, 1, 4),
        (17, DType::BF16, 2, 4),
        (41, DType::F32, 4, 16),
        (83, DType::BF16, 8, 16),
    ] {
        assert_eq!(
            (set_lanes(classes, dtype), set_copy_lanes(classes, dtype)),
            (lanes, copy)
        );
        assert_ne!(gradient_tile_rows(classes, Layout::RowMajor, dtype), 0);
    }
    layouts_and_normalisers::<f16, i64>(908..909, 100_000, Some(16));
    layouts_and_normalisers::<bf16, i32>(909..910, 100_000, Some(17));
    layouts_and_normalisers::<f32, i64>(910..911, 100_000, Some(41));
    layouts_and_normalisers::<bf16, i64>(911..912, 150_000, Some(83));
}

/// Many images (B > 512: kernel 2's last block sums several images a
/// thread) and the ratios at the ends of f32 (1e30 and f32::MAX mine every
/// candidate, the smallest subnormal none but min_negatives_per_image,
/// u32::MAX of those takes them all), with the positives' count
/// (channel-major too, bit for bit) and per image, against the reference.
#[test]
fn many_images_and_extreme_ratios() {
    for (ratio, min_negatives, batch) in [
        (1.0e30f32, 0u32, 513usize),
        (f32::MAX, 0, 64),
        (f32::from_bits(1), 2, 64),
        (0.3, u32::MAX, 64),
    ] {
        let shape = Shape::new(batch, 7, 2);
        let mut rng = SplitMix64(u64::from(ratio.to_bits()));
        let confidence = (0..shape.confidence_len())
            .map(|_| rng.normal() as f32)
            .collect();
        let labels = (0..shape.rows())
            .map(|_| match rng.next_u64() % 6 {
                0 => 1,
                1 => -1,
                _ => 0,
            })
            .collect();
        let mut case = Drawn::<f32, i64>::with(shape, confidence, labels, &mut rng);
        case.config.neg_pos_ratio = ratio;
        case.config.min_negatives_per_image = min_negatives;
        let what = format!("ratio {ratio:e}, at least {min_negatives}, B = {batch}");
        let got = checked_in_both_layouts(&what, &case);
        // Every candidate of an image is in the set where the ratio or the
        // minimum reaches them all (an image without a positive mines its
        // minimum only).
        for image in 0..batch {
            let rows = image * 7..image * 7 + 7;
            let label = |r: usize| case.labels[r];
            let positives = rows.clone().filter(|&r| label(r) > 0).count();
            let candidates = rows.clone().filter(|&r| label(r) == 0).count();
            let mined = rows
                .clone()
                .filter(|&r| label(r) == 0 && got.mask[r] == 1)
                .count();
            let all = (ratio > 1e29 && positives > 0) || min_negatives == u32::MAX;
            if all {
                assert_eq!(mined, candidates, "{what}: image {image}");
            }
        }
        let normalizer = Normalizer::PerImage;
        let call = Call {
            normalizer,
            ..Call::default()
        };
        let got = emulated::run(&case.config, shape, &case.host(), call).unwrap();
        let want = case.reference_with(normalizer);
        compare(&what, &case, &want, &got, &case.divisors(normalizer));
    }
}

/// Large images exercise every radix pass and the tie scan over many
/// chunks: with the image's keys in shared memory (the most priors that
/// fit) and read from global memory (more than fit).
#[test]
fn long_images_with_heavy_ties() {
    let most_staged = multibox::plan::SELECT_KEYS_BYTES / 4;
    for (priors, staged) in [(most_staged, true), (20000, false)] {
        let shape = Shape::new(2, priors, 2);
        assert_eq!(
            multibox::plan::select_shared_bytes(shape) != 0,
            staged,
            "P = {priors}"
        );
        let mut rng = SplitMix64(7);
        // Two classes and logits in {-1, 0, 1}: only 9 distinct rows, so the
        // k-th key is tied thousands of times and the lower-index rule decides.
        let confidence: Vec<f32> = (0..shape.confidence_len())
            .map(|_| (rng.next_u64() % 3) as f32 - 1.0)
            .collect();
        let labels: Vec<i64> = (0..shape.rows())
            .map(|_| i64::from(rng.next_u64().is_multiple_of(50)))
            .collect();
        let case = Drawn::with(shape, confidence, labels, &mut rng);
        let want = case.reference();
        let got = emulated::run(&case.config, shape, &case.host(), Call::default()).unwrap();
        // Equal rows give bit-equal keys on both sides: the masks agree exactly.
        assert_eq!(got.mask, want.mask, "P = {priors}");
        compare(
            &format!("heavy ties, P = {priors}"),
            &case,
            &want,
            &got,
            &case.divisors(Normalizer::Positives),
        );
    }
}

/// Rows too long for kernel 1's shared-memory tile (the plan's tile_rows is
/// 0) are read from global memory, with the same results.
#[test]
fn rows_too_long_for_a_tile_are_read_from_global_memory() {
    let shape = Shape::new(3, 40, 7000);
    assert_eq!(multibox::plan::LaunchPlan::new(shape).unwrap().tile_rows, 0);
    let mut rng = SplitMix64(77);
    let confidence: Vec<f32> = (0..shape.confidence_len())
        .map(|_| (rng.normal() * 3.0) as f32)
        .collect();
    let labels: Vec<i64> = (0..shape.rows())
        .map(|i| match i % 9 {
            0 => 1 + (rng.next_u64() % 6999) as i64,
            1 => -1,
            _ => 0,
        })
        .collect();
    let case = Drawn::with(shape, confidence, labels, &mut rng);
    let want = case.reference();
    let got = emulated::run(&case.config, shape, &case.host(), Call::default()).unwrap();
    compare(
        "long rows",
        &case,
        &want,
        &got,
        &case.divisors(Normalizer::Positives),
    );
    let cm = multibox::plan::LaunchPlan::with_limits(
        shape,
        multibox::DType::F32,
        Layout::ChannelMajor,
        Default::default(),
    )
    .unwrap();
    assert_eq!(cm.tile_rows, 0);
    assert_channel_major_is_row_major("long rows", &case, Call::default(), &got);
    // Two blocks walking all the tiles: the same bits, and the checker
    // sees each block reuse its shared memory from tile to tile.
    let few = Call {
        grid_limits: multibox::plan::GridLimits::at_most(2, 2),
        ..Call::default()
    };
    let walked = emulated::run(&case.config, shape, &case.host(), few).unwrap();
    assert_eq!(walked, got);
    assert_channel_major_is_row_major("long rows, two blocks", &case, few, &got);
}

/// Confident rows, as late in training: every row's own class (its label,
/// the background for negatives) 12 above the rest, so each loss is about
/// 1e-4. A positive's loss is log1p(rest / e) with `rest` the sum of the
/// other classes' terms: a sum that took in the label's own term (about 1)
/// and took it out again would keep that term's rounding, 1e-7 at each
/// class added after it, and miss 1e-6 relative. Staged and read from
/// global memory, one and two lanes a row (whose label lies in either
/// lane's run), both layouts bit for bit.
fn confident_rows<T: Float>(shape: Shape, seed: u64) {
    let mut rng = SplitMix64(seed);
    let labels: Vec<i64> = (0..shape.rows())
        .map(|i| match i % 5 {
            0 => 1 + (rng.next_u64() % (shape.classes as u64 - 1)) as i64,
            _ => 0,
        })
        .collect();
    let c = shape.classes;
    let confidence: Vec<T> = (0..shape.confidence_len())
        .map(|i| {
            let own = labels[i / c] as usize == i % c;
            T::from_f64(rng.normal() + if own { 12.0 } else { 0.0 })
        })
        .collect();
    let case = Drawn::with(shape, confidence, labels, &mut rng);
    checked_in_both_layouts(&format!("confident rows {shape} {:?}", T::DTYPE), &case);
}

/// Runs `case` row-major, close to the reference, and channel-major, bit
/// for bit the row-major call; then both layouts as sm_90 runs the kernels
/// (packed half maxima), bit for bit as sm_75 does. Returns the row-major
/// output.
fn checked_in_both_layouts<T: Float, L: Label>(what: &str, case: &Drawn<T, L>) -> KernelOutput<T> {
    let want = case.reference();
    let got = emulated::run(&case.config, case.shape, &case.host(), Call::default()).unwrap();
    compare(
        what,
        case,
        &want,
        &got,
        &case.divisors(Normalizer::Positives),
    );
    assert_channel_major_is_row_major(what, case, Call::default(), &got);
    let sm90 = Call {
        arch: Arch::Sm90,
        ..Call::default()
    };
    let on_sm90 = emulated::run(&case.config, case.shape, &case.host(), sm90).unwrap();
    emulated::assert_same_bits(&format!("{what} sm_90"), &on_sm90, &got);
    assert_channel_major_is_row_major(&format!("{what} sm_90"), case, sm90, &got);
    got
}

#[test]
fn confident_positives_keep_their_relative_precision() {
    let one_lane = Shape::new(2, 300, 21);
    let two_lanes = Shape::new(2, 130, 81);
    assert_eq!(multibox::plan::lanes_per_row(21, multibox::DType::F16), 1);
    assert_eq!(multibox::plan::lanes_per_row(81, multibox::DType::F32), 2);
    confident_rows::<f16>(one_lane, 5);
    confident_rows::<bf16>(one_lane, 6);
    confident_rows::<f32>(one_lane, 7);
    confident_rows::<f32>(two_lanes, 8);
    let global = Shape::new(1, 24, 7000);
    assert_eq!(
        multibox::plan::LaunchPlan::new(global).unwrap().tile_rows,
        0
    );
    confident_rows::<f32>(global, 9);
}

/// Rows whose sum overflows at their own logit's shift: kernel 1 sums a
/// row's terms at rint(x_own log2 e), one pass, and only a row with a class
/// some 88 or more above its own (a term past 2^128) takes a second try at
/// its maximum's shift. Positives and negatives with a class 100 above the
/// own one (a second try), 80 above (none: a sum near 2^115), and positives
/// 60 below the rest, and negatives whose sum is finite but its ratio to
/// the own term is not, between ordinary rows of the same warps; one and two
/// lanes a row, staged and from global memory, and channel-major two priors
/// a lane group (P even) and element by element (P odd), bit for bit
/// against row-major and close to the reference. Each hard negative is
/// mined (fewer of them than 3 per positive), so the mined set's edge lies
/// among the ordinary rows.
fn rows_far_from_their_own_class<T: Float>(shape: Shape, seed: u64) {
    let mut rng = SplitMix64(seed);
    let c = shape.classes;
    let other = |i: usize| 1 + (i * 7 + 3) % (c - 1);
    let labels: Vec<i64> = (0..shape.rows())
        .map(|i| match i % 7 {
            0 | 3 => 1 + (i / 7 % (c - 1)) as i64,
            _ => 0,
        })
        .collect();
    let confidence: Vec<T> = (0..shape.confidence_len())
        .map(|e| {
            let (row, class) = (e / c, e % c);
            let label = labels[row] as usize;
            // A class other than the row's own, 100 or 80 above the rest.
            let far = if other(row) == label {
                1 + other(row) % (c - 1)
            } else {
                other(row)
            };
            let noise = rng.normal();
            match row % 7 {
                0 | 1 if class == far => T::from_f64(noise + 100.0),
                2 if class == far => T::from_f64(noise + 80.0),
                3 if class == label => T::from_f64(noise - 60.0),
                // A sum just below 2^128 (its class 88.5 above the rest's
                // scale) over an own term of 2^-0.43: finite, but not
                // once divided by it.
                4 if class == far => T::from_f64(88.5),
                4 if class == 0 => T::from_f64(-0.3),
                _ => T::from_f64(noise),
            }
        })
        .collect();
    let case = Drawn::with(shape, confidence, labels, &mut rng);
    let what = format!("rows far from their own class {shape} {:?}", T::DTYPE);
    let got = checked_in_both_layouts(&what, &case);
    assert!(
        got.classification_loss.is_finite(),
        "{what}: {}",
        got.classification_loss
    );
}

#[test]
fn rows_that_overflow_at_their_own_shift_take_their_maximum() {
    let one_lane = Shape::new(2, 300, 21);
    rows_far_from_their_own_class::<f16>(one_lane, 11);
    rows_far_from_their_own_class::<bf16>(one_lane, 12);
    rows_far_from_their_own_class::<f32>(one_lane, 13);
    rows_far_from_their_own_class::<f16>(Shape::new(2, 301, 21), 14);
    rows_far_from_their_own_class::<f32>(Shape::new(2, 130, 81), 15);
    let global = Shape::new(1, 24, 7000);
    assert_eq!(
        multibox::plan::LaunchPlan::new(global).unwrap().tile_rows,
        0
    );
    rows_far_from_their_own_class::<f32>(global, 16);
}

/// Finite logits too large for the own logit's shift: past |x| log2(e) =
/// 2^24 the shift rint(x log2 e) can be ulps of the product away from x
/// log2(e) (256 at 2^32), so the own term would over- or underflow; such
/// rows take their second try, against their maximum, exact at any
/// magnitude. Magnitudes from 1.5e7 to 1e30, in positives whose own logit
/// is the largest (loss 0), tied with another class (ln 2) or far below
/// (loss about |x|), negatives tied between the background and a class,
/// negatives whose background is far below a class (mined first: a wrong
/// key would drop them from the set), negatives with every class at -|x|
/// (ln C), among ordinary rows; one and two lanes a row, staged and from
/// global memory, channel-major by pairs and element by element, bit for
/// bit against row-major and close to the reference.
fn rows_with_huge_logits<T: Float>(shape: Shape, seed: u64) {
    const MAGNITUDES: [f64; 6] = [1.5e7, 2.5e9, 5e9, 1e10, 1e20, 1e30];
    let mut rng = SplitMix64(seed);
    let c = shape.classes;
    let labels: Vec<i64> = (0..shape.rows())
        .map(|i| match i % 7 {
            0 | 1 | 4 => 1 + (i / 7 % (c - 1)) as i64,
            _ => 0,
        })
        .collect();
    let confidence: Vec<T> = (0..shape.confidence_len())
        .map(|e| {
            let (row, class) = (e / c, e % c);
            let v = MAGNITUDES[row / 7 % MAGNITUDES.len()];
            let own = labels[row] as usize;
            let tied = 1 + (own + 2) % (c - 1); // a class other than the own one
            let noise = rng.normal();
            T::from_f64(match row % 7 {
                0 if class == own => v,
                1 if class == own || class == tied => v,
                2 if class == 0 || class == tied => v,
                3 if class == tied => v,
                4 if class == own => -v,
                5 => -v,
                _ => noise,
            })
        })
        .collect();
    let mut case = Drawn::with(shape, confidence, labels, &mut rng);
    // Fewer negatives mined than there are candidates: the set's edge lies
    // among the ordinary rows, after the far ones (3 of every 7 rows).
    case.config.neg_pos_ratio = 1.0;
    let what = format!("huge logits {shape} {:?}", T::DTYPE);
    let want = case.reference();
    assert!(
        want.losses.classification_loss > 1e6,
        "{what}: the far rows count"
    );
    let got = checked_in_both_layouts(&what, &case);
    for (row, &m) in got.mask.iter().enumerate() {
        if row % 7 == 3 {
            assert_eq!(m, 1, "{what}: row {row}'s background is far below a class");
        }
    }
}

#[test]
fn rows_with_huge_logits_take_their_maximum() {
    let one_lane = Shape::new(2, 300, 21);
    rows_with_huge_logits::<bf16>(one_lane, 21);
    rows_with_huge_logits::<f32>(one_lane, 22);
    rows_with_huge_logits::<f32>(Shape::new(2, 301, 21), 23);
    rows_with_huge_logits::<f32>(Shape::new(2, 130, 81), 24);
    rows_with_huge_logits::<f32>(Shape::new(1, 24, 7000), 25);
}

/// Channel-major class planes start wherever c * P puts them within 16
/// bytes. Kernel 1 stages each plane's run of a tile's priors, and kernel 3
/// writes each plane's run of gradients, as 16-byte words with the ends
/// element by element: P of every residue modulo a word's elements, full
/// and partial tiles, logits and gradients one element past alignment
/// (kernel 1's passes two priors a lane group, or one), and one and two
/// lanes a row (C = 21 and C = 81 in f32), bit for bit against the
/// row-major call and close to the reference.
#[test]
fn channel_major_planes_at_every_offset_within_16_bytes() {
    // `part`: the priors of kernel 3's staged parts of a tile.
    fn planes<T: Float, L: Label>(priors: usize, classes: usize, part: u32) {
        let shape = Shape::new(2, priors, classes);
        let plan = multibox::plan::LaunchPlan::with_limits(
            shape,
            T::DTYPE,
            Layout::ChannelMajor,
            Default::default(),
        )
        .unwrap();
        assert_ne!(plan.tile_rows, 0, "staged");
        assert_eq!(plan.gradient_plane_rows, part, "kernel 3's parts");
        let mut rng = SplitMix64(priors as u64 * 1000 + classes as u64);
        let confidence = (0..shape.confidence_len())
            .map(|_| T::from_f64(rng.normal() * 3.0))
            .collect();
        // Positives, ignored priors and negatives, a few of which are mined.
        let labels = (0..shape.rows())
            .map(|i| match i % 11 {
                0 | 4 => L::from_i64(1 + (i / 11 % (classes - 1)) as i64),
                7 => L::from_i64(-1),
                _ => L::from_i64(0),
            })
            .collect();
        let case = Drawn::<T, L>::with(shape, confidence, labels, &mut rng);
        let what = format!("{:?} P={priors} C={classes}", T::DTYPE);
        let want = case.reference();
        // The misaligned calls as sm_90 runs the kernels.
        for misaligned in [false, true] {
            let call = Call {
                misaligned,
                arch: if misaligned { Arch::Sm90 } else { Arch::Sm75 },
                ..Call::default()
            };
            let row_major = emulated::run(&case.config, shape, &case.host(), call).unwrap();
            compare(
                &what,
                &case,
                &want,
                &row_major,
                &case.divisors(Normalizer::Positives),
            );
            let call = Call {
                layout: Layout::ChannelMajor,
                ..call
            };
            // The logits placed 0 and 1 elements past 256-byte alignment:
            // with P even, kernel 1 reads 2-element aligned planes two
            // priors a lane group, and the others element by element.
            for skip in [0, 1] {
                let placed = |inputs: &HostInputs<'_, T, L>, call| {
                    let confidence = Placed::copy_of(inputs.confidence, skip);
                    let inputs = HostInputs {
                        confidence: confidence.as_slice(),
                        ..*inputs
                    };
                    emulated::run(&case.config, shape, &inputs, call)
                };
                emulated::assert_channel_major_is_row_major(
                    &format!("{what}, logits {skip} elements past alignment"),
                    shape,
                    &case.host(),
                    call,
                    &row_major,
                    placed,
                );
            }
        }
    }
    // Tiles of 256 priors (kernel 1's of 128 at C = 81 in f32): P = 256 +
    // 0..8 gives every plane offset within 16 bytes in the half types, and
    // a last tile of 0 to 7 priors, shorter than a word. Kernel 3 stages
    // its tiles whole, in halves (f32 at C = 81), quarters (C = 200) or
    // eighths (C = 500).
    for priors in 256..264 {
        planes::<f16, i64>(priors, 21, 256);
        planes::<bf16, i32>(priors, 21, 256);
    }
    for priors in [256, 257, 258, 259, 300] {
        planes::<f32, i64>(priors, 21, 256);
        planes::<f32, i32>(priors, 81, 128);
    }
    for priors in [256, 259, 263, 300] {
        planes::<f16, i32>(priors, 200, 64);
        planes::<bf16, i64>(priors, 500, 32);
    }
}

#[test]
fn outputs_are_bit_identical_whatever_the_workspace_held() {
    let case = Drawn::<f32, i64>::draw(42, 300_000);
    let run = |fill| {
        let call = Call {
            fill,
            ..Call::default()
        };
        emulated::run(&case.config, case.shape, &case.host(), call).unwrap()
    };
    let (a, b, c) = (run(0x00), run(0xab), run(0xff));
    let bits = |e: &KernelOutput<f32>| {
        let mut v = vec![
            e.regression_loss.to_bits(),
            e.classification_loss.to_bits(),
            e.num_pos as u32,
        ];
        v.extend(
            e.grad_confidence
                .iter()
                .chain(&e.grad_locations)
                .map(|g| g.to_bits()),
        );
        v.extend(e.mask.iter().map(|&m| u32::from(m)));
        v
    };
    assert_eq!(bits(&a), bits(&b));
    assert_eq!(bits(&a), bits(&c));
}

/// Buffers that start one element into an allocation (a slice of a user's
/// tensor): the kernels' vector accesses fall back to element accesses where
/// the address is not aligned, with the same results.
fn misaligned_buffers_give_identical_outputs<T: Float, L: Label>(seed: u64) {
    let case = Drawn::<T, L>::draw(seed, 200_000);
    let aligned = emulated::run(&case.config, case.shape, &case.host(), Call::default()).unwrap();
    let shift = |v: &[T]| -> Vec<T> { std::iter::once(v[0]).chain(v.iter().copied()).collect() };
    let (confidence, predicted, gt) = (
        shift(&case.confidence),
        shift(&case.predicted_locations),
        shift(&case.gt_locations),
    );
    let inputs = HostInputs {
        confidence: &confidence[1..],
        predicted_locations: &predicted[1..],
        labels: &case.labels,
        gt_locations: &gt[1..],
    };
    let bits = |v: &[T]| -> Vec<u8> { bytemuck::cast_slice(v).to_vec() };
    // The gradients misaligned with the inputs too, and (below) aligned
    // while the inputs are not: kernel 3 copies a row with 16-byte words
    // only where the logits and their gradients share their alignment.
    let call = Call {
        misaligned: true,
        ..Call::default()
    };
    let misaligned = emulated::run(&case.config, case.shape, &inputs, call).unwrap();
    let inputs_only = emulated::run(&case.config, case.shape, &inputs, Call::default()).unwrap();
    assert_eq!(
        bits(&aligned.grad_confidence),
        bits(&inputs_only.grad_confidence),
        "seed {seed}, only the inputs misaligned"
    );
    assert_eq!(
        bits(&aligned.grad_confidence),
        bits(&misaligned.grad_confidence),
        "seed {seed}"
    );
    assert_eq!(
        bits(&aligned.grad_locations),
        bits(&misaligned.grad_locations),
        "seed {seed}"
    );
    assert_eq!(aligned.mask, misaligned.mask);
    assert_eq!(
        aligned.regression_loss.to_bits(),
        misaligned.regression_loss.to_bits()
    );
    assert_eq!(
        aligned.classification_loss.to_bits(),
        misaligned.classification_loss.to_bits()
    );
}

/// Kernel 3 reads a set row's logits as the 16-byte words that cover it,
/// but never outside the logits' buffer: with the buffer starting and
/// ending inside a 16-byte word, and its first and last rows positives,
/// the words around its two ends are read element by element (the
/// emulator fails any access outside the buffer). The same bits as an
/// aligned buffer.
fn set_rows_at_the_ends_of_the_buffer<T: Float, L: Label>(classes: usize, seed: u64) {
    let mut case = Drawn::<T, L>::draw_with_classes(seed, 60_000, Some(classes));
    let last = case.shape.rows() - 1;
    case.labels[0] = L::from_i64(1);
    case.labels[last] = L::from_i64(classes as i64 - 1);
    let aligned = emulated::run(&case.config, case.shape, &case.host(), Call::default()).unwrap();
    assert_eq!((aligned.mask[0], aligned.mask[last]), (1, 1));

    // The logits `shift` elements into an allocation, with a shift that
    // leaves both ends of the buffer inside a 16-byte word.
    let size = std::mem::size_of::<T>();
    let len = case.confidence.len();
    let mut padded = vec![case.confidence[0]; len + 16];
    let shift = (1..16 / size)
        .find(|&s| {
            let start = padded[s..].as_ptr() as usize;
            !start.is_multiple_of(16) && !(start + len * size).is_multiple_of(16)
        })
        .expect("a shift that misaligns both ends");
    padded[shift..shift + len].copy_from_slice(&case.confidence);
    let inputs = HostInputs {
        confidence: &padded[shift..shift + len],
        ..case.host()
    };
    let shifted = emulated::run(&case.config, case.shape, &inputs, Call::default())
        .unwrap_or_else(|e| panic!("C={classes} {:?}: {e}", T::DTYPE));
    let bits = |v: &[T]| -> Vec<u8> { bytemuck::cast_slice(v).to_vec() };
    assert_eq!(aligned.mask, shifted.mask);
    assert_eq!(
        bits(&aligned.grad_confidence),
        bits(&shifted.grad_confidence),
        "C={classes} {:?}",
        T::DTYPE
    );
}

#[test]
fn set_rows_at_the_ends_of_the_buffer_are_read_within_it() {
    use multibox::plan::{gradient_tile_rows, set_slot_bytes};
    use multibox::DType;
    // The staged tile's path, then the slots'.
    assert_ne!(gradient_tile_rows(21, Layout::RowMajor, DType::F16), 0);
    assert_ne!(gradient_tile_rows(3, Layout::RowMajor, DType::BF16), 0);
    assert_ne!(set_slot_bytes(81, Layout::RowMajor, DType::F32), 0);
    assert_ne!(set_slot_bytes(961, Layout::RowMajor, DType::F32), 0);
    set_rows_at_the_ends_of_the_buffer::<f16, i64>(21, 40);
    set_rows_at_the_ends_of_the_buffer::<bf16, i32>(3, 41);
    set_rows_at_the_ends_of_the_buffer::<f32, i32>(81, 42);
    set_rows_at_the_ends_of_the_buffer::<f32, i64>(961, 43);
}

/// On a device with few resident blocks every block of kernels 1 and 3
/// walks many tiles: the same masks and gradients, bit for bit, and losses
/// within the reference's tolerance (the per-block sums group differently).
fn few_resident_blocks_walk_many_tiles<T: Float, L: Label>(seed: u64) {
    let case = Drawn::<T, L>::draw(seed, 300_000);
    let call = Call {
        upstream: Upstream::Host(case.upstream.0, case.upstream.1),
        ..Call::default()
    };
    let many = emulated::run(&case.config, case.shape, &case.host(), call).unwrap();
    let call = Call {
        grid_limits: multibox::plan::GridLimits::at_most(2, 3),
        ..call
    };
    let few = emulated::run(&case.config, case.shape, &case.host(), call).unwrap();
    let bits = |v: &[T]| -> Vec<u8> { bytemuck::cast_slice(v).to_vec() };
    assert_eq!(many.mask, few.mask, "seed {seed}");
    assert_eq!(
        bits(&many.grad_confidence),
        bits(&few.grad_confidence),
        "seed {seed}"
    );
    assert_eq!(
        bits(&many.grad_locations),
        bits(&few.grad_locations),
        "seed {seed}"
    );
    let divisors = case.divisors(Normalizer::Positives);
    compare(
        "few resident blocks",
        &case,
        &case.reference(),
        &few,
        &divisors,
    );
}

#[test]
fn blocks_that_walk_many_tiles_give_the_same_results() {
    few_resident_blocks_walk_many_tiles::<f32, i64>(21);
    few_resident_blocks_walk_many_tiles::<bf16, i32>(22);
    few_resident_blocks_walk_many_tiles::<f16, i64>(23);
}

#[test]
fn element_aligned_buffers_give_the_same_bits() {
    // Kernel 3's staged tiles (C = 3, 3, 21), then its unstaged path (f32,
    // C = 81: spans of zeros, the set's rows straight to global memory).
    misaligned_buffers_give_identical_outputs::<f32, i64>(11);
    misaligned_buffers_give_identical_outputs::<f16, i32>(12);
    misaligned_buffers_give_identical_outputs::<bf16, i64>(13);
    misaligned_buffers_give_identical_outputs::<f32, i32>(30);
}

#[test]
fn forward_only_gives_the_same_losses_and_mask() {
    let case = Drawn::<bf16, i64>::draw(9, 200_000);
    let both = emulated::run(&case.config, case.shape, &case.host(), Call::default()).unwrap();
    let forward = emulated::run(
        &case.config,
        case.shape,
        &case.host(),
        Call {
            backward: false,
            ..Call::default()
        },
    )
    .unwrap();
    assert_eq!(
        forward.regression_loss.to_bits(),
        both.regression_loss.to_bits()
    );
    assert_eq!(
        forward.classification_loss.to_bits(),
        both.classification_loss.to_bits()
    );
    assert_eq!(forward.num_pos, both.num_pos);
    assert_eq!(forward.mask, both.mask);
    assert!(forward.grad_confidence.is_empty());
}

/// The backward as a call of its own after the forward, on the same
/// workspace, gives forward_backward's outputs bit for bit: every dtype and
/// label type, upstream from the host and from device memory, randomized
/// cases with ties, empty images and ignored priors.
#[test]
fn forward_then_backward_equals_forward_backward_bit_for_bit() {
    fn check<T: Float, L: Label>(seed: u64) {
        let case = Drawn::<T, L>::draw(seed, 60_000);
        let (g_reg, g_cls) = case.upstream;
        for upstream in [Upstream::Host(g_reg, g_cls), Upstream::Device(0.75, 3.0)] {
            let fused = Call {
                upstream,
                ..Call::default()
            };
            let split = Call {
                split: true,
                ..fused
            };
            let run = |call| emulated::run(&case.config, case.shape, &case.host(), call).unwrap();
            let (a, b) = (run(fused), run(split));
            let what = format!("seed {seed} {} {upstream:?}", case.shape);
            assert_eq!(
                a.regression_loss.to_bits(),
                b.regression_loss.to_bits(),
                "{what}"
            );
            assert_eq!(
                a.classification_loss.to_bits(),
                b.classification_loss.to_bits(),
                "{what}"
            );
            assert_eq!(a.num_pos, b.num_pos, "{what}");
            assert_eq!(a.mask, b.mask, "{what}");
            let bits = |g: &[T]| -> Vec<u8> { bytemuck::cast_slice(g).to_vec() };
            assert!(
                bits(&a.grad_confidence) == bits(&b.grad_confidence),
                "{what}: grad_confidence"
            );
            assert!(
                bits(&a.grad_locations) == bits(&b.grad_locations),
                "{what}: grad_locations"
            );
            assert_eq!(a.status, b.status, "{what}");
        }
    }
    for seed in 0..4 {
        check::<f32, i64>(100 + seed);
        check::<f16, i32>(200 + seed);
        check::<bf16, i64>(300 + seed);
    }
}

/// A backward on a workspace whose last forward was not of its own call
/// (another shape's, layout's, type's or configuration's, after its own),
/// or that no forward wrote (zeroed or not), writes NaN over both
/// gradients, every element, and says `stale_workspace` in the status
/// word: never gradients from whatever the keys happen to hold (zeros, on
/// a zeroed workspace). After its own forward it passes. Every input type,
/// both layouts.
#[test]
fn a_backward_without_its_forward_gives_nan_and_says_so() {
    use multibox::synthetic::{Batch, BatchSpec};

    fn check<T: Float, L: Label>(layout: Layout) {
        let shape = Shape::new(3, 700, 21);
        let batch = Batch::<T, L>::generate(shape, BatchSpec::default());
        let inputs = HostInputs {
            confidence: &batch.confidence,
            predicted_locations: &batch.predicted_locations,
            labels: &batch.labels,
            gt_locations: &batch.gt_locations,
        };
        let config = MultiboxConfig::default();
        let run = |forward, fill| {
            let call = Call {
                split: true,
                forward,
                fill,
                layout,
                ..Call::default()
            };
            emulated::run(&config, shape, &inputs, call).unwrap()
        };
        let nan = |g: &[T]| g.iter().all(|x| x.to_f32().is_nan());
        let own = run(Forward::Same, 0xab);
        assert!(own.status.is_ok(), "{layout:?}: {:?}", own.status);
        let finite = |g: &[T]| g.iter().all(|x| x.to_f32().is_finite());
        assert!(finite(&own.grad_confidence) && finite(&own.grad_locations));

        for (what, forward, fill) in emulated::stale_forwards(L::LABEL_TYPE) {
            let got = run(forward, fill);
            let what = format!("{} {layout:?}: {what}", T::DTYPE.name());
            let status = got.status;
            assert!(
                status.stale_workspace && !status.invalid_label && !status.nonfinite_input,
                "{what}: {status:?}"
            );
            assert!(nan(&got.grad_confidence), "{what}: grad_confidence");
            assert!(nan(&got.grad_locations), "{what}: grad_locations");
        }
    }
    for layout in [Layout::RowMajor, Layout::ChannelMajor] {
        check::<f32, i64>(layout);
        check::<f16, i32>(layout);
        check::<bf16, i64>(layout);
    }
}

#[test]
fn upstream_gradients_from_device_memory_match_host_values() {
    let case = Drawn::<f16, i32>::draw(11, 100_000);
    let host = emulated::run(
        &case.config,
        case.shape,
        &case.host(),
        Call {
            upstream: Upstream::Host(0.25, 3.0),
            ..Call::default()
        },
    )
    .unwrap();
    let device = emulated::run(
        &case.config,
        case.shape,
        &case.host(),
        Call {
            upstream: Upstream::Device(0.25, 3.0),
            ..Call::default()
        },
    )
    .unwrap();
    assert_eq!(host, device);
    let unit = emulated::run(&case.config, case.shape, &case.host(), Call::default()).unwrap();
    assert!(host.num_pos > 0);
    assert_ne!(
        host.grad_confidence, unit.grad_confidence,
        "g_cls must scale the gradient"
    );
}

#[test]
fn no_positive_in_the_batch_gives_zeros() {
    let shape = Shape::new(3, 500, 21);
    let case = Drawn::<f32, i64> {
        shape,
        config: MultiboxConfig {
            min_negatives_per_image: 10,
            ..Default::default()
        },
        confidence: (0..shape.confidence_len())
            .map(|i| (i % 17) as f32 * 0.3)
            .collect(),
        predicted_locations: vec![1.0; shape.locations_len()],
        labels: vec![0; shape.rows()],
        gt_locations: vec![0.0; shape.locations_len()],
        upstream: (1.0, 1.0),
    };
    let got = emulated::run(&case.config, shape, &case.host(), Call::default()).unwrap();
    assert_eq!(
        (got.regression_loss, got.classification_loss, got.num_pos),
        (0.0, 0.0, 0)
    );
    assert!(got
        .grad_confidence
        .iter()
        .chain(&got.grad_locations)
        .all(|&g| g == 0.0));
    // min_negatives_per_image still mines, so the mask shows the choice.
    assert_eq!(got.mask.iter().filter(|&&m| m == 1).count(), 30);
    let divisors = case.divisors(Normalizer::Positives);
    compare("no positive", &case, &case.reference(), &got, &divisors);
}

/// SPEC.md: a given divisor n <= 0 behaves like N == 0 (zeros, no logit
/// read), a non-finite one makes both losses NaN and the set's gradients
/// NaN; the same whether n comes from the host or from device memory, in
/// either layout. The split backward divides by what its forward recorded.
#[test]
fn given_divisors_at_and_past_the_edges() {
    let mut rng = SplitMix64(91);
    let shape = Shape::new(2, 300, 21);
    let confidence: Vec<f32> = (0..shape.confidence_len())
        .map(|_| rng.normal() as f32)
        .collect();
    let labels: Vec<i64> = (0..shape.rows())
        .map(|i| i64::from(i % 13 == 0) * 3)
        .collect();
    let case = Drawn::with(shape, confidence, labels, &mut rng);
    for n in [
        0.0f32,
        -0.0,
        -5.0,
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
    ] {
        for normalizer in [Normalizer::Given(n), Normalizer::GivenOnDevice(n)] {
            for (layout, split) in [(Layout::RowMajor, false), (Layout::ChannelMajor, true)] {
                let what = format!("{normalizer:?} {layout:?}");
                let call = Call {
                    normalizer,
                    layout,
                    split,
                    ..Call::default()
                };
                let got = emulated::run(&case.config, shape, &case.host(), call).unwrap();
                assert!(got.status.is_ok(), "{what}");
                assert_eq!(got.num_pos, 47, "{what}: num_pos stays the local count");
                let set = got.mask.iter().filter(|&&m| m == 1).count();
                assert_eq!(set, 47 * 4, "{what}: the mining does not see n");
                let in_set = |i: usize, per_prior: usize| {
                    // Gradients are in the call's layout; masks are [B, P].
                    let row = match layout {
                        Layout::RowMajor => i / per_prior,
                        Layout::ChannelMajor => {
                            let (b, rest) = (i / (per_prior * 300), i % (per_prior * 300));
                            b * 300 + rest % 300
                        }
                    };
                    got.mask[row] == 1
                };
                if n.is_nan() || n.is_infinite() {
                    assert!(
                        got.regression_loss.is_nan() && got.classification_loss.is_nan(),
                        "{what}"
                    );
                    for (i, g) in got.grad_confidence.iter().enumerate() {
                        assert_eq!(
                            g.is_nan(),
                            in_set(i, 21),
                            "{what}: grad_confidence[{i}] = {g}"
                        );
                        assert!(g.is_nan() || *g == 0.0, "{what}");
                    }
                } else {
                    assert_eq!(
                        (got.regression_loss, got.classification_loss),
                        (0.0, 0.0),
                        "{what}"
                    );
                    assert!(
                        got.grad_confidence
                            .iter()
                            .chain(&got.grad_locations)
                            .all(|&g| g == 0.0),
                        "{what}"
                    );
                }
            }
        }
    }
}

/// Per image, an image without positives adds 0 to the losses and gets
/// zero gradients even where min_negatives_per_image mined negatives.
#[test]
fn per_image_an_image_without_positives_gets_zeros() {
    let mut rng = SplitMix64(93);
    let shape = Shape::new(3, 200, 5);
    let confidence: Vec<f32> = (0..shape.confidence_len())
        .map(|_| rng.normal() as f32)
        .collect();
    // Image 1 has no positive.
    let labels: Vec<i64> = (0..shape.rows())
        .map(|i| i64::from(i / 200 != 1 && i % 7 == 0) * 2)
        .collect();
    let mut case = Drawn::with(shape, confidence, labels, &mut rng);
    case.config.min_negatives_per_image = 5;
    let normalizer = Normalizer::PerImage;
    let want = case.reference_with(normalizer);
    let call = Call {
        normalizer,
        ..Call::default()
    };
    let got = emulated::run(&case.config, shape, &case.host(), call).unwrap();
    compare("per image", &case, &want, &got, &case.divisors(normalizer));
    assert_eq!(got.mask[200..400].iter().filter(|&&m| m == 1).count(), 5);
    assert!(got.grad_confidence[200 * 5..400 * 5]
        .iter()
        .all(|&g| g == 0.0));
    assert!(got.grad_confidence[..200 * 5].iter().any(|&g| g != 0.0));
}

#[test]
fn invalid_labels_make_the_losses_nan_and_set_the_status() {
    let shape = Shape::new(2, 300, 3);
    // 2^32 + 1 and -2^32 would pass for 1 and 0 if truncated to 32 bits.
    for bad in [
        3i64,
        1000,
        -2,
        i64::MIN,
        i64::MAX,
        (1 << 32) + 1,
        -(1 << 32),
    ] {
        let mut case = Drawn::<f32, i64>::draw(5, 0);
        case.shape = shape;
        case.confidence = vec![0.5; shape.confidence_len()];
        case.predicted_locations = vec![0.0; shape.locations_len()];
        case.gt_locations = vec![0.0; shape.locations_len()];
        case.labels = (0..shape.rows() as i64).map(|i| i % 3).collect();
        case.labels[417] = bad;
        let got = emulated::run(&case.config, shape, &case.host(), Call::default()).unwrap();
        assert!(got.status.invalid_label, "label {bad}");
        assert!(
            got.regression_loss.is_nan() && got.classification_loss.is_nan(),
            "label {bad}"
        );
        // The bad prior counts as ignored: no gradient, not in the mask.
        assert_eq!(got.mask[417], 0);
        assert!(got.grad_confidence[417 * 3..418 * 3]
            .iter()
            .all(|&g| g == 0.0));
    }
}

#[test]
fn non_finite_inputs_are_flagged_and_propagate() {
    let shape = Shape::new(1, 100, 4);
    let mut case = Drawn::<f32, i32>::draw(3, 0);
    case.shape = shape;
    case.confidence = (0..400).map(|i| (i % 7) as f32).collect();
    case.predicted_locations = vec![0.5; 400];
    case.gt_locations = vec![0.0; 400];
    case.labels = (0..100).map(|i| if i % 10 == 0 { 1 } else { 0 }).collect();
    case.confidence[4 * 33 + 2] = f32::NAN; // a candidate's logit
    let got = emulated::run(&case.config, shape, &case.host(), Call::default()).unwrap();
    assert!(got.status.nonfinite_input && !got.status.invalid_label);
    let want = case.reference();
    assert!(
        want.losses.classification_loss.is_nan(),
        "the reference mines the NaN row first"
    );
    assert!(got.classification_loss.is_nan());
    assert_eq!(
        f64::from(got.regression_loss),
        want.losses.regression_loss as f32 as f64
    );
}

/// A positive's box difference is taken in f32: finite f32 offsets of
/// opposite sign beyond 1.7e38 overflow it (flagged, and the regression
/// loss is infinite), finite f16 ones never do.
#[test]
fn box_differences_that_overflow_f32_are_flagged() {
    fn run<T: Float>(big: f64) -> KernelOutput<T> {
        let shape = Shape::new(1, 50, 3);
        let mut case = Drawn::<T, i32>::draw(4, 0);
        case.shape = shape;
        case.confidence = (0..150).map(|i| T::from_f64((i % 5) as f64)).collect();
        case.labels = (0..50).map(|i| i32::from(i % 10 == 0)).collect();
        case.predicted_locations = vec![T::from_f64(0.25); 200];
        case.gt_locations = vec![T::from_f64(0.0); 200];
        case.predicted_locations[4 * 20 + 1] = T::from_f64(big); // prior 20: a positive
        case.gt_locations[4 * 20 + 1] = T::from_f64(-big);
        emulated::run(&case.config, shape, &case.host(), Call::default()).unwrap()
    }
    let f32_out = run::<f32>(3e38);
    assert!(f32_out.status.nonfinite_input && !f32_out.status.invalid_label);
    assert_eq!(f32_out.regression_loss, f32::INFINITY);
    let f16_out = run::<f16>(60000.0);
    assert!(f16_out.status.is_ok(), "{:?}", f16_out.status);
    assert!(f16_out.regression_loss.is_finite());
}

/// Non-finite box offsets: the gradient of a positive's coordinate is the
/// reference's, clamp(d / beta, -1, 1), a NaN difference (NaN, or inf -
/// inf) giving NaN and an infinite one +-1, in f32 and in the half types,
/// row-major and channel-major alike (bit for bit); the other coordinates
/// keep their finite gradients.
#[test]
fn non_finite_box_offsets_give_the_references_gradients() {
    fn check<T: Float>() {
        let shape = Shape::new(1, 40, 3);
        let mut rng = SplitMix64(31);
        let confidence = (0..shape.confidence_len())
            .map(|_| T::from_f64(rng.normal()))
            .collect();
        let labels = (0..40).map(|i| i64::from(i % 5 == 0)).collect();
        let mut case = Drawn::<T, i64>::with(shape, confidence, labels, &mut rng);
        let (nan, inf) = (T::from_f64(f64::NAN), T::from_f64(f64::INFINITY));
        // Prior 10 (a positive): NaN - 0.5, inf - inf, inf - 0.5, and a finite pair.
        case.predicted_locations[40..43].copy_from_slice(&[nan, inf, inf]);
        case.gt_locations[40..43].copy_from_slice(&[T::from_f64(0.5), inf, T::from_f64(0.5)]);
        let what = format!("{:?}", T::DTYPE);
        let want = case.reference();
        let got = emulated::run(&case.config, shape, &case.host(), Call::default()).unwrap();
        assert!(got.status.nonfinite_input, "{what}");
        let g: Vec<f64> = got
            .grad_locations
            .iter()
            .map(|v| f64::from(v.to_f32()))
            .collect();
        assert!(g[40].is_nan() && g[41].is_nan(), "{what}: {:?}", &g[40..44]);
        assert!(want.grad_locations[40].is_nan() && want.grad_locations[41].is_nan());
        // SPEC.md's precision on the finite gradients: f32 within 1e-6 of
        // the largest; a 16-bit type within its rounding (1e-2 relative).
        let finite = |i: &usize| *i != 40 && *i != 41;
        let largest = (0..160)
            .filter(finite)
            .fold(0f64, |m, i| m.max(want.grad_locations[i].abs()));
        for i in (0..160).filter(finite) {
            let w = want.grad_locations[i];
            let tolerance = match T::DTYPE {
                multibox::DType::F32 => 1e-6 * largest,
                _ => 1e-2 * w.abs().max(1e-3),
            };
            assert!(
                (g[i] - w).abs() <= tolerance,
                "{what}: grad_locations[{i}] {} against {w}",
                g[i]
            );
        }
        assert_eq!(g[42], want.grad_locations[42], "{what}: inf - 0.5 clamps");
        assert_channel_major_is_row_major(&what, &case, Call::default(), &got);
    }
    check::<f32>();
    check::<f16>();
    check::<bf16>();
}

/// A non-finite `value` at `(row, class)`, in an ignored row that no loss
/// reads: kernel 1 (built for `arch`) flags it, the losses stay the
/// reference's, and the channel-major call flags it as well and gives the
/// same bits.
fn non_finite_logit_is_flagged<T: Float, L: Label>(
    shape: Shape,
    row: usize,
    class: usize,
    value: f32,
    arch: Arch,
) {
    let call = Call {
        arch,
        ..Call::default()
    };
    let mut rng = SplitMix64(41);
    let mut confidence: Vec<T> = (0..shape.confidence_len())
        .map(|_| T::from_f64(rng.normal()))
        .collect();
    let c = shape.classes as i64;
    let labels: Vec<L> = (0..shape.rows() as i64)
        .map(|i| L::from_i64(if i % 10 == 3 { 1 + i * 37 % (c - 1) } else { 0 }))
        .collect();
    let mut case = Drawn::with(shape, confidence.clone(), labels, &mut rng);
    let what = format!(
        "{shape} {:?}/{:?} {value} {arch:?}",
        T::DTYPE,
        L::LABEL_TYPE
    );
    let clean = emulated::run(&case.config, shape, &case.host(), call).unwrap();
    assert!(clean.status.is_ok(), "{what}");
    case.labels[row] = L::from_i64(-1);
    confidence[row * shape.classes + class] = T::from_f32(value);
    case.confidence = confidence;
    let run = |inputs: &HostInputs<'_, T, L>, call: Call| {
        let got = emulated::run(&case.config, shape, inputs, call)?;
        assert!(
            got.status.nonfinite_input && !got.status.invalid_label,
            "{what} {:?}",
            call.layout
        );
        Ok(got)
    };
    let got = run(&case.host(), call).unwrap();
    let want = case.reference();
    let rel = |a: f32, b: f64| ((f64::from(a) - b) / b).abs();
    assert!(
        rel(got.classification_loss, want.losses.classification_loss) <= 1e-6,
        "{what}"
    );
    assert!(
        rel(got.regression_loss, want.losses.regression_loss) <= 1e-6,
        "{what}"
    );
    emulated::assert_channel_major_is_row_major(&what, shape, &case.host(), call, &got, run);
}

/// Kernel 1 checks every logit as it stages it: an infinity in an ignored
/// prior's row is flagged, and so is -inf (whose exponential is an
/// ordinary 0). Both builds: sm_80 and later check half types two at a
/// time with a packed fma, so the value goes in either half of a word
/// (elements 117 * 81 + 40 and + 41: odd and even).
#[test]
fn an_infinite_logit_anywhere_is_flagged() {
    let shape = Shape::new(2, 70, 81);
    for value in [f32::INFINITY, f32::NEG_INFINITY, f32::NAN] {
        for (arch, class) in [Arch::Sm75, Arch::Sm90]
            .into_iter()
            .flat_map(|a| [(a, 40), (a, 41)])
        {
            non_finite_logit_is_flagged::<f32, i32>(shape, 117, class, value, arch);
            non_finite_logit_is_flagged::<f16, i32>(shape, 117, class, value, arch);
            non_finite_logit_is_flagged::<bf16, i32>(shape, 117, class, value, arch);
        }
    }
}

/// A backend that fails the test if anything reaches it.
struct MustNotLaunch;

impl Backend for MustNotLaunch {
    unsafe fn launch(
        &self,
        kernel: &'static str,
        _: u32,
        _: u32,
        _: u32,
        _: &[u8],
    ) -> multibox::Result<()> {
        panic!("{kernel} was launched for an invalid call");
    }
}

/// A forward_backward call at made-up addresses, which a backend that
/// launches nothing never touches: every buffer distinct and aligned but
/// the mask (bytes), with a device upstream and divisor.
fn fake_call(shape: Shape, workspace_bytes: usize) -> RawCall {
    RawCall {
        shape,
        dtype: multibox::DType::F16,
        label_type: multibox::LabelType::I64,
        buffers: RawBuffers {
            confidence: 0x1000,
            predicted_locations: 0x2000,
            labels: 0x3000,
            gt_locations: 0x4000,
            grad_confidence: 0x5000,
            grad_locations: 0x6000,
            regression_loss: 0x7000,
            classification_loss: 0x7004,
            num_pos: 0x7008,
            mask: 0x8001,
            workspace: 0x10000,
            workspace_bytes,
        },
        upstream: RawUpstream::Host {
            g_reg: 1.0,
            g_cls: 1.0,
        },
        pass: Pass::ForwardBackward,
        layout: multibox::Layout::RowMajor,
        normalizer: RawNormalizer::Positives,
    }
}

#[test]
fn every_bad_call_is_refused_before_any_launch() {
    let shape = Shape::new(2, 10, 3);
    let workspace_bytes = multibox::workspace_bytes(shape).unwrap();
    let good = fake_call(shape, workspace_bytes);
    let config = MultiboxConfig::default();
    let refuse = |edit: &dyn Fn(&mut RawCall, &mut MultiboxConfig)| {
        let (mut call, mut config) = (good, config);
        edit(&mut call, &mut config);
        // SAFETY: MustNotLaunch never touches the addresses.
        unsafe { launch_call(&config, &call, &MustNotLaunch) }.expect_err("a bad call was accepted")
    };
    assert!(matches!(
        refuse(&|c, _| c.buffers.confidence = 0),
        Error::NullPointer { name: "confidence" }
    ));
    assert!(matches!(
        refuse(&|c, _| c.buffers.grad_locations = 0),
        Error::NullPointer {
            name: "grad_locations"
        }
    ));
    assert!(matches!(
        refuse(&|c, _| c.buffers.labels = 0x3004),
        Error::Misaligned {
            name: "labels",
            align: 8,
            ..
        }
    ));
    assert!(matches!(
        refuse(&|c, _| c.buffers.confidence = 0x1001),
        Error::Misaligned {
            name: "confidence",
            align: 2,
            ..
        }
    ));
    assert!(matches!(
        refuse(&|c, _| c.buffers.workspace = 0x10080),
        Error::Misaligned {
            name: "workspace",
            ..
        }
    ));
    assert!(matches!(
        refuse(&|c, _| c.buffers.num_pos = 0x7002),
        Error::Misaligned {
            name: "num_pos",
            ..
        }
    ));
    assert!(matches!(
        refuse(&|c, _| c.buffers.workspace_bytes -= 1),
        Error::WorkspaceTooSmall { expected, .. } if expected == workspace_bytes
    ));
    assert!(matches!(
        refuse(&|c, _| c.shape = Shape::new(0, 10, 3)),
        Error::InvalidShape { .. }
    ));
    assert!(matches!(
        refuse(&|c, _| c.shape = Shape::new(2, 10, 1)),
        Error::InvalidShape { .. }
    ));
    assert!(matches!(
        refuse(&|c, _| c.shape = Shape::new(1 << 20, 1 << 12, 3)),
        Error::TooLarge { .. }
    ));
    assert!(matches!(
        refuse(&|c, _| c.upstream = RawUpstream::Host {
            g_reg: f32::NAN,
            g_cls: 1.0
        }),
        Error::InvalidUpstream { name: "g_reg", .. }
    ));
    assert!(matches!(
        refuse(&|c, _| c.upstream = RawUpstream::Device(0)),
        Error::NullPointer { name: "upstream" }
    ));
    assert!(matches!(
        refuse(&|c, _| c.normalizer = RawNormalizer::GivenOnDevice(0)),
        Error::NullPointer { name: "normalizer" }
    ));
    assert!(matches!(
        refuse(&|c, _| c.normalizer = RawNormalizer::GivenOnDevice(0x9002)),
        Error::Misaligned {
            name: "normalizer",
            ..
        }
    ));
    assert!(matches!(
        refuse(&|c, _| c.upstream = RawUpstream::Device(0x9002)),
        Error::Misaligned {
            name: "upstream",
            ..
        }
    ));
    assert!(matches!(
        refuse(&|_, k| k.neg_pos_ratio = 0.0),
        Error::InvalidConfig(_)
    ));
    assert!(matches!(
        refuse(&|_, k| k.beta = f32::INFINITY),
        Error::InvalidConfig(_)
    ));
    // The backward alone needs the gradients, the inputs and the workspace,
    // and checks its upstream.
    let backward_only = |edit: &dyn Fn(&mut RawCall)| {
        let mut call = good;
        call.pass = Pass::Backward;
        edit(&mut call);
        // SAFETY: MustNotLaunch never touches the addresses.
        unsafe { launch_call(&config, &call, &MustNotLaunch) }
            .expect_err("a bad backward was accepted")
    };
    assert!(matches!(
        backward_only(&|c| c.buffers.grad_confidence = 0),
        Error::NullPointer {
            name: "grad_confidence"
        }
    ));
    assert!(matches!(
        backward_only(&|c| c.buffers.workspace = 0),
        Error::NullPointer { name: "workspace" }
    ));
    assert!(matches!(
        backward_only(&|c| c.buffers.gt_locations = 0),
        Error::NullPointer {
            name: "gt_locations"
        }
    ));
    assert!(matches!(
        backward_only(&|c| c.buffers.workspace_bytes = 0),
        Error::WorkspaceTooSmall { .. }
    ));
    assert!(matches!(
        backward_only(&|c| c.upstream = RawUpstream::Device(0)),
        Error::NullPointer { name: "upstream" }
    ));
    assert!(matches!(
        backward_only(&|c| c.upstream = RawUpstream::Host {
            g_reg: 1.0,
            g_cls: f32::INFINITY
        }),
        Error::InvalidUpstream { name: "g_cls", .. }
    ));
    // A forward-only call needs no gradient buffers.
    let mut forward = good;
    forward.pass = Pass::Forward;
    forward.buffers.grad_confidence = 0;
    forward.buffers.grad_locations = 0;
    let launched = std::cell::Cell::new(0);
    struct Count<'a>(&'a std::cell::Cell<usize>);
    impl Backend for Count<'_> {
        unsafe fn launch(
            &self,
            _: &'static str,
            _: u32,
            _: u32,
            _: u32,
            _: &[u8],
        ) -> multibox::Result<()> {
            self.0.set(self.0.get() + 1);
            Ok(())
        }
    }
    // SAFETY: Count never touches the addresses.
    unsafe { launch_call(&config, &forward, &Count(&launched)) }.unwrap();
    assert_eq!(launched.get(), 2);
    // A backward-only call needs no loss outputs and launches one kernel.
    let mut backward = good;
    backward.pass = Pass::Backward;
    backward.buffers.regression_loss = 0;
    backward.buffers.classification_loss = 0;
    backward.buffers.num_pos = 0;
    backward.buffers.mask = 0;
    launched.set(0);
    // SAFETY: Count never touches the addresses.
    unsafe { launch_call(&config, &backward, &Count(&launched)) }.unwrap();
    assert_eq!(launched.get(), 1);
}

/// No output may overlap an input, another output or the workspace, nor
/// the workspace an input: the raw and C entry points refuse such a call,
/// naming both buffers, before anything is launched. A gradient is not
/// computed in place over its own input either. Inputs may overlap one
/// another, buffers may touch end to end, and an address the pass does not
/// use overlaps nothing.
#[test]
fn overlapping_buffers_are_refused_before_any_launch() {
    let shape = Shape::new(2, 10, 3);
    let workspace_bytes = multibox::workspace_bytes(shape).unwrap();
    let good = fake_call(shape, workspace_bytes);
    let (logits, boxes) = (2 * 10 * 3 * 2, 2 * 10 * 4 * 2);
    let b = good.buffers;
    let ws_end = b.workspace + workspace_bytes as u64;
    let config = MultiboxConfig::default();
    // Refused as an overlap of these two buffers, in the call's order.
    let refused = |want: (&str, &str), edit: &dyn Fn(&mut RawCall)| {
        let mut call = good;
        edit(&mut call);
        // SAFETY: MustNotLaunch never touches the addresses.
        match unsafe { launch_call(&config, &call, &MustNotLaunch) } {
            Err(Error::Overlap { a, b }) => assert_eq!((a, b), want),
            other => panic!("{want:?}: not refused as an overlap: {other:?}"),
        }
    };
    // Outputs over outputs.
    refused(("regression_loss", "classification_loss"), &|c| {
        c.buffers.classification_loss = b.regression_loss;
        c.buffers.num_pos = b.regression_loss;
    });
    refused(("classification_loss", "num_pos"), &|c| {
        c.buffers.num_pos = b.classification_loss
    });
    refused(("grad_confidence", "grad_locations"), &|c| {
        c.buffers.grad_locations = b.grad_confidence + 64
    });
    refused(("num_pos", "mask"), &|c| c.buffers.mask = b.num_pos + 3);
    // Outputs in the workspace, at either end.
    refused(("workspace", "mask"), &|c| c.buffers.mask = b.workspace + 1);
    refused(("workspace", "grad_locations"), &|c| {
        c.buffers.grad_locations = ws_end - 8
    });
    refused(("workspace", "regression_loss"), &|c| {
        c.buffers.regression_loss = ws_end - 4
    });
    // Outputs over inputs: the gradients over their own inputs (in place)
    // or part of them, a loss inside the labels.
    refused(("confidence", "grad_confidence"), &|c| {
        c.buffers.grad_confidence = b.confidence
    });
    refused(("predicted_locations", "grad_locations"), &|c| {
        c.buffers.grad_locations = b.predicted_locations
    });
    refused(("confidence", "grad_confidence"), &|c| {
        c.buffers.grad_confidence = b.confidence + logits as u64 - 2
    });
    refused(("labels", "num_pos"), &|c| c.buffers.num_pos = b.labels + 8);
    // The workspace over an input; the device upstream and divisor (inputs)
    // over outputs.
    refused(("gt_locations", "workspace"), &|c| {
        c.buffers.gt_locations = ws_end - 2
    });
    refused(("num_pos", "normalizer"), &|c| {
        c.normalizer = RawNormalizer::GivenOnDevice(b.num_pos)
    });
    refused(("grad_locations", "upstream"), &|c| {
        c.upstream = RawUpstream::Device(b.grad_locations + boxes as u64 - 4)
    });
    // Each pass alone: the backward's gradients, the forward's losses.
    refused(("confidence", "grad_confidence"), &|c| {
        c.pass = Pass::Backward;
        c.buffers.grad_confidence = b.confidence;
    });
    refused(("workspace", "mask"), &|c| {
        c.pass = Pass::Forward;
        c.buffers.mask = b.workspace;
    });

    // What is not an overlap: each call is accepted and launched.
    let accepted = |what: &str, edit: &dyn Fn(&mut RawCall)| {
        let mut call = good;
        edit(&mut call);
        let backend = Extents::refusing(None);
        // SAFETY: Extents never touches the addresses.
        let result = unsafe { launch_call(&config, &call, &backend) };
        assert!(result.is_ok(), "{what}: {result:?}");
        let launches =
            2 * usize::from(call.pass.runs_forward()) + usize::from(call.pass.writes_gradients());
        assert_eq!(backend.launched.get(), launches, "{what}");
    };
    accepted("distinct buffers", &|_| {});
    accepted("end to end", &|c| {
        c.buffers.grad_confidence = b.confidence + logits as u64;
        c.buffers.regression_loss = b.confidence - 4;
        c.buffers.mask = ws_end;
        c.buffers.gt_locations = b.workspace - boxes as u64;
    });
    accepted("no mask", &|c| c.buffers.mask = 0);
    accepted("channel-major", &|c| c.layout = Layout::ChannelMajor);
    accepted("inputs over inputs", &|c| {
        c.buffers.predicted_locations = b.confidence;
        c.buffers.gt_locations = b.confidence + 8;
        c.upstream = RawUpstream::Device(b.labels);
        c.normalizer = RawNormalizer::GivenOnDevice(b.labels);
    });
    accepted("one divisor and upstream", &|c| {
        c.upstream = RawUpstream::Device(0x9000);
        c.normalizer = RawNormalizer::GivenOnDevice(0x9004);
    });
    // Addresses a pass ignores overlap nothing: stale loss outputs in a
    // backward, stale gradients and upstream in a forward.
    accepted("backward, stale outputs", &|c| {
        c.pass = Pass::Backward;
        c.buffers.regression_loss = b.grad_confidence;
        c.buffers.classification_loss = b.confidence;
        c.buffers.num_pos = b.workspace;
        c.buffers.mask = b.workspace;
        c.normalizer = RawNormalizer::GivenOnDevice(b.grad_locations);
    });
    accepted("forward, stale gradients", &|c| {
        c.pass = Pass::Forward;
        c.buffers.grad_confidence = b.confidence;
        c.buffers.grad_locations = b.workspace;
        c.upstream = RawUpstream::Device(b.num_pos);
    });
}

/// The raw entry points ask the backend about every buffer a pass touches,
/// with the bytes its kernels may reach, before the first launch; the
/// driver backend asks the driver (multibox::device_memory).
#[test]
fn every_buffer_a_pass_touches_is_checked_before_any_launch() {
    let shape = Shape::new(2, 10, 3);
    let workspace_bytes = multibox::workspace_bytes(shape).unwrap();
    let call = RawCall {
        label_type: multibox::LabelType::I32,
        upstream: RawUpstream::Device(0x9000),
        normalizer: RawNormalizer::GivenOnDevice(0xa000),
        ..fake_call(shape, workspace_bytes + 4096)
    };
    let run = |call: &RawCall, refuse| {
        let backend = Extents::refusing(refuse);
        // SAFETY: Extents never touches the addresses.
        let result = unsafe { launch_call(&MultiboxConfig::default(), call, &backend) };
        (
            result.map(|_| ()),
            backend.checked.into_inner(),
            backend.launched.get(),
        )
    };
    let (logits, boxes, rows) = (2 * 10 * 3 * 2, 2 * 10 * 4 * 2, 2 * 10);
    let (result, mut checked, launched) = run(&call, None);
    result.unwrap();
    assert_eq!(launched, 3);
    checked.sort();
    let mut want = vec![
        ("confidence", 0x1000, logits),
        ("predicted_locations", 0x2000, boxes),
        ("labels", 0x3000, rows * 4),
        ("gt_locations", 0x4000, boxes),
        ("grad_confidence", 0x5000, logits),
        ("grad_locations", 0x6000, boxes),
        ("regression_loss", 0x7000, 4),
        ("classification_loss", 0x7004, 4),
        ("num_pos", 0x7008, 4),
        ("mask", 0x8001, rows),
        // What the kernels use of the workspace, not what the caller has.
        ("workspace", 0x10000, workspace_bytes),
        ("upstream", 0x9000, 8),
        ("normalizer", 0xa000, 4),
    ];
    want.sort();
    assert_eq!(checked, want);

    // A pass checks only what it touches: the forward no gradient or
    // upstream, the backward no loss output, mask or divisor.
    for (pass, skipped) in [
        (
            Pass::Forward,
            ["grad_confidence", "grad_locations", "upstream"].as_slice(),
        ),
        (
            Pass::Backward,
            [
                "regression_loss",
                "classification_loss",
                "num_pos",
                "mask",
                "normalizer",
            ]
            .as_slice(),
        ),
    ] {
        let (result, checked, _) = run(&RawCall { pass, ..call }, None);
        result.unwrap();
        let names: Vec<_> = checked.iter().map(|c| c.0).collect();
        for (name, _, _) in &want {
            assert_eq!(
                names.contains(name),
                !skipped.contains(name),
                "{pass:?}: {name}"
            );
        }
    }
    // No mask: not checked.
    let mut no_mask = call;
    no_mask.buffers.mask = 0;
    let (_, checked, _) = run(&no_mask, None);
    assert!(!checked.iter().any(|c| c.0 == "mask"));

    // A refusal stops the call before its first launch.
    for name in ["confidence", "workspace", "grad_locations", "normalizer"] {
        let (result, _, launched) = run(&call, Some(name));
        assert!(
            matches!(result, Err(Error::NotDeviceMemory { name: n, .. }) if n == name),
            "{name}: {result:?}"
        );
        assert_eq!(launched, 0, "{name}");
    }
}

/// What the driver may say of an address, and what the raw entry points
/// make of it (multibox::device_memory::judge).
#[test]
fn addresses_are_judged_by_what_the_driver_says() {
    use multibox::device_memory::{judge, judge_end, Owner, PointerInfo, Reach};
    const HOST: u32 = 1;
    const DEVICE: u32 = 2;
    const ARRAY: u32 = 3;
    const UNIFIED: u32 = 4;
    let owner = Owner {
        context: 0xc0,
        ordinal: 1,
        pageable_memory_access: false,
    };
    let ours = PointerInfo {
        memory_type: DEVICE,
        managed: false,
        device_ordinal: 1,
        context: 0xc0,
        range_start: 0x1000,
        range_size: 0x1000,
    };
    let at =
        |info: PointerInfo, addr: u64, bytes: usize| judge("confidence", addr, bytes, &info, owner);
    assert_eq!(at(ours, 0x1000, 0x1000).unwrap(), Reach::Whole);
    assert_eq!(at(ours, 0x1800, 0x800).unwrap(), Reach::Whole);
    assert_eq!(at(ours, 0x1800, 0x801).unwrap(), Reach::PastItsAllocation);
    // Memory of a pool or of the virtual memory API: no context.
    let pooled = PointerInfo { context: 0, ..ours };
    assert_eq!(at(pooled, 0x1000, 16).unwrap(), Reach::Whole);
    // No range known: nothing to check it against.
    let unranged = PointerInfo {
        range_start: 0,
        range_size: 0,
        ..ours
    };
    assert_eq!(at(unranged, 0x1000, 1 << 40).unwrap(), Reach::Whole);
    // Pinned host and managed memory: reachable from every device.
    for info in [
        PointerInfo {
            memory_type: HOST,
            device_ordinal: 0,
            context: 0xd0,
            ..ours
        },
        PointerInfo {
            memory_type: UNIFIED,
            device_ordinal: 0,
            ..ours
        },
        PointerInfo {
            managed: true,
            device_ordinal: 0,
            context: 0xd0,
            ..ours
        },
    ] {
        assert!(at(info, 0x1000, 16).is_ok(), "{info:?}");
    }
    // Unknown memory, another device or context, an array: refused, by name.
    let unknown = PointerInfo::default();
    let e = at(unknown, 0x1234, 16).unwrap_err();
    assert!(
        matches!(
            e,
            Error::NotDeviceMemory {
                name: "confidence",
                addr: 0x1234,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("CUDA knows no allocation"), "{e}");
    for info in [
        PointerInfo {
            device_ordinal: 0,
            ..ours
        },
        PointerInfo {
            context: 0xd0,
            ..ours
        },
    ] {
        let e = at(info, 0x1000, 16).unwrap_err();
        assert!(
            matches!(
                e,
                Error::WrongContext {
                    name: "confidence",
                    expected_ordinal: 1
                }
            ),
            "{info:?}: {e:?}"
        );
    }
    assert!(matches!(
        at(
            PointerInfo {
                memory_type: ARRAY,
                ..ours
            },
            0x1000,
            16
        ),
        Err(Error::NotDeviceMemory { .. })
    ));
    // Only a positive answer refuses: an ordinal the driver left at -1 passes.
    let no_ordinal = PointerInfo {
        device_ordinal: -1,
        ..ours
    };
    assert!(at(no_ordinal, 0x1000, 16).is_ok());
    // A device that reaches pageable host memory (HMM, ATS) can use memory
    // CUDA does not know: malloc'd memory passes there.
    let pageable = Owner {
        pageable_memory_access: true,
        ..owner
    };
    assert_eq!(
        judge("confidence", 0x1234, 16, &unknown, pageable).unwrap(),
        Reach::Whole
    );
    assert!(judge_end("confidence", 0x1800, 0x1000, &ours, &unknown, pageable).is_ok());

    // Past its allocation, the memory under the last byte decides: unknown
    // is a buffer too short for the shape; the next mapping of ours is fine;
    // another device's is not.
    let e = judge_end("confidence", 0x1800, 0x1000, &ours, &unknown, owner).unwrap_err();
    assert!(
        e.to_string()
            .contains("needs 4096 bytes from there, but its allocation ends 2048 bytes in"),
        "{e}"
    );
    assert!(judge_end("confidence", 0x1800, 0x1000, &ours, &pooled, owner).is_ok());
    assert!(matches!(
        judge_end(
            "confidence",
            0x1800,
            0x1000,
            &ours,
            &PointerInfo {
                device_ordinal: 0,
                ..ours
            },
            owner
        ),
        Err(Error::WrongContext { .. })
    ));
}

#[test]
fn the_emulator_knows_every_kernel_the_crate_launches() {
    let known = multibox_emu::kernel_names();
    for name in multibox::plan::Step::all_kernel_names() {
        assert!(
            known.iter().any(|k| k == name),
            "{name} is not compiled into the emulator"
        );
    }
}

/// The emulator's traffic model (what the kernels ask of memory, counted
/// on the CPU; not a measurement), on tensors placed as a device allocator
/// places them. Every other test would pass a kernel that fell back to
/// element accesses; this one would not. Kernel 1 reads the logits, and
/// kernel 3 writes their gradients, in whole sectors (at least 99 % of the
/// bytes fetched are asked for row-major, 90 % for f32 rows at C = 81,
/// whose gradients are written row by row; channel-major, whose class
/// planes start anywhere within a sector, 95 %, and 93 % with every tensor
/// one element past alignment); kernel 3 fetches each sector of the set's
/// rows once; and, row-major, the call touches at most 1.1 times the bytes
/// floor.
#[test]
fn the_traffic_model_sees_whole_sectors() {
    use common::emulated::{buffer_traffic, PlacedInputs};
    use multibox::synthetic::{Batch, BatchSpec};

    if !multibox_emu::checks_available() {
        // The AddressSanitizer build leaves out the instrumentation the
        // model counts with; the plain build runs this test.
        eprintln!("skipped: this emulator build has no traffic model (AddressSanitizer)");
        return;
    }

    // `sliced`: every tensor one element past 256-byte alignment. `loads`
    // and `stores`: the least sector efficiency of kernel 1's logit loads
    // and kernel 3's gradient stores.
    fn check<T: Float, L: Label>(
        shape: Shape,
        layout: Layout,
        sliced: bool,
        loads: f64,
        stores: f64,
    ) {
        let what = format!("{:?} {shape} {layout:?} sliced {sliced}", T::DTYPE);
        let batch = Batch::<T, L>::generate(shape, BatchSpec::default()).in_layout(layout);
        let placed = PlacedInputs::new(&batch, usize::from(sliced));
        let call = Call {
            layout,
            model_traffic: true,
            races: false,
            misaligned: sliced,
            ..Call::default()
        };
        let out = emulated::run(&MultiboxConfig::default(), shape, &placed.host(), call).unwrap();
        // A buffer's traffic in one kernel.
        let traffic = |kernel: &str, buffer: &str| {
            let (_, t) = out
                .traffic
                .iter()
                .find(|(k, _)| k.starts_with(kernel))
                .unwrap_or_else(|| panic!("{what}: no {kernel}"));
            buffer_traffic(t, buffer)
        };
        let logits = traffic("multibox_rows", "confidence").loads.efficiency();
        assert!(logits >= loads, "{what}: kernel 1 logits {logits:.3}");
        let gradients = traffic("multibox_gradient", "grad_confidence")
            .stores
            .efficiency();
        assert!(
            gradients >= stores,
            "{what}: kernel 3 gradients {gradients:.3}"
        );
        // Kernel 3 writes every gradient element once. This also holds the
        // checker to seeing every store: one it missed (GCC's
        // instrumentation once skipped f16 box gradients) would show here.
        let size = T::DTYPE.size() as u64;
        for (buffer, elements) in [
            ("grad_confidence", shape.rows() * shape.classes),
            ("grad_locations", shape.rows() * 4),
        ] {
            let written = traffic("multibox_gradient", buffer).stores.bytes;
            assert_eq!(
                written,
                elements as u64 * size,
                "{what}: {buffer} bytes stored"
            );
        }
        // Kernel 3 fetches the sectors of the set's logits once: row-major
        // as the words that cover each set row, channel-major where its
        // tile is staged as the whole sectors that hold a set prior's, and
        // those by whole requests.
        let staged = multibox::plan::gradient_plane_rows(shape, layout, T::DTYPE) != 0;
        let set_rows = traffic("multibox_gradient", "confidence");
        if layout == Layout::RowMajor || staged {
            assert!(
                set_rows.loads.sectors as f64 <= 1.02 * set_rows.unique_sectors as f64,
                "{what}: kernel 3 fetches {} sectors of the set's rows, {} distinct",
                set_rows.loads.sectors,
                set_rows.unique_sectors
            );
        }
        if staged {
            let efficiency = set_rows.loads.efficiency();
            assert!(
                efficiency >= 0.9,
                "{what}: kernel 3 set logits {efficiency:.3}"
            );
        }
        // The selection reads an image's keys from global memory once and
        // keeps them in shared memory for its later passes (every shape here
        // fits), where the L2 path read them once a pass.
        assert_ne!(multibox::plan::select_shared_bytes(shape), 0, "{what}");
        let keys = traffic("multibox_select", "keys").loads.bytes;
        assert_eq!(
            keys,
            shape.rows() as u64 * 4,
            "{what}: selection key bytes loaded"
        );
        // Channel-major, kernel 1's pass reads one element (or, unsliced,
        // a pair of priors' elements) a lane from planes the plan's stride
        // spreads over the banks: few requests conflict (f32 at C = 81, two
        // lanes a row, had 92 % with planes 128 elements apart). Sliced
        // bf16 at C = 81 has 2,324 conflicted of 15,094: as many as when a
        // pass for the maximum came first, whose 10,206 requests had none.
        if layout == Layout::ChannelMajor {
            let (_, rows) = out
                .traffic
                .iter()
                .find(|(k, _)| k.starts_with("multibox_rows"))
                .unwrap();
            let conflicted = rows.shared.conflicted as f64 / rows.shared.requests as f64;
            assert!(
                conflicted <= 0.2,
                "{what}: kernel 1 {:.0} % of shared requests conflicted",
                100.0 * conflicted
            );
        }
        // Kernel 3's reads of the logits touch exactly the sectors that
        // hold a set row's logits, unsliced (sectors then start at the
        // tensor's start).
        if !sliced {
            let size = T::DTYPE.size();
            let mut sectors = std::collections::HashSet::new();
            for (row, _) in out.mask.iter().enumerate().filter(|(_, &m)| m != 0) {
                let (b, p) = (row / shape.priors, row % shape.priors);
                for c in 0..shape.classes {
                    let element = match layout {
                        Layout::RowMajor => row * shape.classes + c,
                        Layout::ChannelMajor => (b * shape.classes + c) * shape.priors + p,
                    };
                    sectors.insert(element * size / 32);
                }
            }
            assert_eq!(
                set_rows.unique_sectors,
                sectors.len() as u64,
                "{what}: distinct sectors of kernel 3's logit loads"
            );
        }
        // Within 1.1x the bytes floor. Channel-major, less kernel 3's
        // second read of the sectors that hold the set's logits: that one
        // is the layout's (a plane's sector holds 8 or 16 priors, about one
        // of them in the set), and no split into a forward and a backward
        // call can keep the logits on chip between the two.
        if !sliced {
            let unique: u64 = out.traffic.iter().map(|(_, t)| t.unique_bytes()).sum();
            let second_read = match layout {
                Layout::RowMajor => 0,
                Layout::ChannelMajor => set_rows.unique_sectors * 32,
            };
            let floor = multibox::plan::bytes_floor(shape, T::DTYPE, L::LABEL_TYPE, true);
            assert!(
                (unique - second_read) as f64 <= 1.1 * floor as f64,
                "{what}: {unique} distinct bytes, {second_read} of them the set's second read, floor {floor}"
            );
        }
    }
    let row_major = Layout::RowMajor;
    check::<f16, i64>(Shape::new(4, 3000, 21), row_major, false, 0.99, 0.99);
    check::<bf16, i32>(Shape::new(2, 2000, 81), row_major, false, 0.99, 0.99);
    check::<f32, i64>(Shape::new(2, 2000, 81), row_major, false, 0.99, 0.9);
    // Channel-major, a class plane's run of a tile starts wherever c * P
    // puts it: its ends are element requests, split at the sector
    // boundaries (sector_split), so that no sector is also a word's. Sliced,
    // every run is misaligned: split at 16 bytes, 89 %.
    for sliced in [false, true] {
        let least = if sliced { 0.93 } else { 0.95 };
        let channel_major = Layout::ChannelMajor;
        check::<f16, i64>(Shape::new(4, 3000, 21), channel_major, sliced, least, least);
        check::<bf16, i32>(Shape::new(2, 2000, 81), channel_major, sliced, least, least);
        check::<f32, i64>(Shape::new(2, 2000, 81), channel_major, sliced, least, least);
    }
}

// ---------------------------------------------------------------------------
// Paths the emulated suite did not run (gcov of kernels/*.cu, see
// scripts/kernel-coverage): each test names the kernel code it reaches.

/// A row-major and a channel-major plan of `shape` for T's dtype.
fn plans<T: Float>(shape: Shape) -> [multibox::plan::LaunchPlan; 2] {
    [Layout::RowMajor, Layout::ChannelMajor].map(|layout| {
        multibox::plan::LaunchPlan::with_limits(shape, T::DTYPE, layout, Default::default())
            .unwrap()
    })
}

/// Rows too long for every shared-memory tile, in each type and label type:
/// kernel 1 reads them from global memory (walk_tiles' unstaged branch,
/// chunked_row_sums<false> / strided_row_sums<false>), kernel 3 row-major
/// reads the set's rows from global memory (SET_ROWS_IN_GLOBAL) and
/// channel-major writes unstaged planes (write_gradients_channel_major<...,
/// false>). Before, f16 never took kernel 1's row-major global path,
/// f16/i64 and f32/i32 no unstaged kernel 1 path at all, and kernel 3's
/// global paths ran in f32/i64 and bf16/i32 only.
fn long_rows<T: Float, L: Label>(shape: Shape, seed: u64) {
    let [rm, cm] = plans::<T>(shape);
    assert_eq!(rm.tile_rows, 0, "{shape}");
    assert_eq!(cm.tile_rows, 0, "{shape}");
    assert_eq!(
        (rm.gradient_tile_rows, rm.set_slot_bytes),
        (0, 0),
        "{shape}"
    );
    assert_eq!(cm.gradient_plane_rows, 0, "{shape}");
    let mut rng = SplitMix64(seed);
    let c = shape.classes as u64;
    let labels: Vec<L> = (0..shape.rows())
        .map(|i| {
            L::from_i64(match i % 9 {
                0 | 4 => 1 + (rng.next_u64() % (c - 1)) as i64,
                1 => -1,
                _ => 0,
            })
        })
        .collect();
    let confidence: Vec<T> = (0..shape.confidence_len())
        .map(|_| T::from_f64(rng.normal() * 3.0))
        .collect();
    let case = Drawn::with(shape, confidence, labels, &mut rng);
    checked_in_both_layouts(
        &format!("long rows {shape} {:?}/{:?}", T::DTYPE, L::LABEL_TYPE),
        &case,
    );
}

#[test]
fn long_rows_in_every_type_and_label_type() {
    // C = 3001: past every tile in f16/bf16 (kernel 1 at 2,926, kernel 3's
    // slots at 2,681, its planes at 537), and odd, so rows start anywhere
    // within 16 bytes.
    let shape = Shape::new(2, 20, 3001);
    long_rows::<f32, i32>(shape, 31);
    long_rows::<f32, i64>(shape, 32);
    long_rows::<f16, i32>(shape, 33);
    long_rows::<f16, i64>(shape, 34);
    long_rows::<bf16, i32>(shape, 35);
    long_rows::<bf16, i64>(shape, 36);
}

/// The second try (against the row's maximum) of rows read from global
/// memory in the half types: chunked_row_sums<false, f16> and
/// strided_row_sums<false, f16> with FromMax never ran before.
#[test]
fn long_half_rows_that_overflow_at_their_own_shift_take_their_maximum() {
    let global = Shape::new(1, 24, 7000);
    assert_eq!(plans::<f16>(global)[0].tile_rows, 0);
    rows_far_from_their_own_class::<f16>(global, 17);
    rows_far_from_their_own_class::<bf16>(global, 18);
    confident_rows::<f16>(global, 19);
}

/// A non-finite logit in a row too long for a tile: kernel 1 checks such
/// rows as it reads them from global memory (rows.cu, `row_nonfinite`),
/// a branch no test had reached; every type, both layouts, both builds.
#[test]
fn an_infinite_logit_in_a_long_row_is_flagged() {
    fn check<T: Float, L: Label>(value: f32) {
        let shape = Shape::new(2, 6, 3001);
        assert_eq!(plans::<T>(shape).map(|p| p.tile_rows), [0, 0]);
        for arch in [Arch::Sm75, Arch::Sm90] {
            non_finite_logit_is_flagged::<T, L>(shape, 8, 2999, value, arch);
        }
    }
    for value in [f32::INFINITY, f32::NEG_INFINITY, f32::NAN] {
        check::<f32, i32>(value);
        check::<f32, i64>(value);
        check::<f16, i32>(value);
        check::<f16, i64>(value);
        check::<bf16, i32>(value);
        check::<bf16, i64>(value);
    }
}

/// A call without a mask (`mask` 0, which the C ABI and the Rust API
/// allow): the selection kernel's `if (p.mask)` had only ever been true.
/// The same losses, count and gradients, bit for bit, in both layouts.
#[test]
fn no_mask_gives_the_same_losses_and_gradients() {
    fn check<T: Float, L: Label>(seed: u64) {
        let case = Drawn::<T, L>::draw(seed, 100_000);
        let what = format!("seed {seed} {}", case.shape);
        let run = |inputs: &HostInputs<'_, T, L>, call| {
            emulated::run(&case.config, case.shape, inputs, call)
        };
        let a = run(&case.host(), Call::default()).unwrap();
        let without = Call {
            with_mask: false,
            ..Call::default()
        };
        let b = run(&case.host(), without).unwrap();
        assert!(b.mask.is_empty(), "{what}");
        assert_eq!(a.num_pos, b.num_pos, "{what}");
        assert_eq!(a.status, b.status, "{what}");
        let losses =
            |o: &KernelOutput<T>| [o.regression_loss.to_bits(), o.classification_loss.to_bits()];
        assert_eq!(losses(&a), losses(&b), "{what}");
        let bits = |v: &[T]| -> Vec<u8> { bytemuck::cast_slice(v).to_vec() };
        assert_eq!(bits(&a.grad_confidence), bits(&b.grad_confidence), "{what}");
        assert_eq!(bits(&a.grad_locations), bits(&b.grad_locations), "{what}");
        // Channel-major without a mask: the same bits as row-major.
        emulated::assert_channel_major_is_row_major(
            &what,
            case.shape,
            &case.host(),
            without,
            &b,
            run,
        );
    }
    check::<f32, i64>(51);
    check::<f16, i32>(52);
}

/// neg_pos_ratio at the ends of what the config accepts: f32::MAX and 1e20
/// (k saturates: floor_ratio_times' `e >= 64 || product > ~0 >> e` branch,
/// never taken before: every candidate is mined) and the smallest
/// subnormal (k = 0 unless min_negatives_per_image asks for more).
#[test]
fn extreme_neg_pos_ratios_match_the_reference() {
    for (seed, ratio) in [
        (61, f32::MAX),
        (62, 1e20),
        (63, f32::from_bits(1)),
        (64, 1e-30),
    ] {
        let mut case = Drawn::<f32, i64>::draw(seed, 100_000);
        case.config.neg_pos_ratio = ratio;
        let what = format!("ratio {ratio:e} {}", case.shape);
        checked_with_its_upstream(&what, &case, None);
    }
}

/// One prior an image, channel-major: a prior's four box gradients are
/// contiguous (the plane stride is P = 1), which store_box writes as one
/// store4; only bf16 had taken that branch. Every type, against the
/// reference and bit for bit the row-major call.
#[test]
fn one_prior_an_image_in_every_type() {
    fn check<T: Float>(seed: u64) {
        let shape = Shape::new(9, 1, 21);
        let mut rng = SplitMix64(seed);
        let labels: Vec<i64> = (0..shape.rows() as i64)
            .map(|i| [3, 0, 0, -1, 7][i as usize % 5])
            .collect();
        let confidence: Vec<T> = (0..shape.confidence_len())
            .map(|_| T::from_f64(rng.normal() * 2.0))
            .collect();
        let case = Drawn::with(shape, confidence, labels, &mut rng);
        checked_in_both_layouts(&format!("one prior {:?}", T::DTYPE), &case);
    }
    check::<f32>(71);
    check::<f16>(72);
    check::<bf16>(73);
}

/// Invalid labels beyond f32/i64 row-major staged rows, the one path
/// `invalid_labels_make_the_losses_nan_and_set_the_status` runs: i32
/// labels, the half types, channel-major, and rows too long for a tile,
/// whose labels kernel 1 reads from global memory unclamped (rows.cu,
/// `label_of`'s `load_label` arm) and must still refuse before indexing
/// with them. The call flags it, both losses are NaN, the bad prior is out
/// of the mask with zero gradients, and channel-major gives the same bits.
#[test]
fn invalid_labels_on_every_path() {
    fn check<T: Float, L: Label>(shape: Shape, bads: &[i64]) {
        for &bad in bads {
            let c = shape.classes as i64;
            let labels: Vec<L> = (0..shape.rows() as i64)
                .map(|i| {
                    L::from_i64(match (i, i % 3) {
                        (5, _) => bad,
                        (_, 0) => 0,
                        (_, 1) => 1 + i % (c - 1),
                        _ => -1,
                    })
                })
                .collect();
            let mut rng = SplitMix64(bad as u64);
            let confidence: Vec<T> = (0..shape.confidence_len())
                .map(|_| T::from_f64(rng.normal()))
                .collect();
            let case = Drawn::with(shape, confidence, labels, &mut rng);
            let what = format!("{shape} {:?}/{:?} label {bad}", T::DTYPE, L::LABEL_TYPE);
            let run = |inputs: &HostInputs<'_, T, L>, call: Call| {
                let got = emulated::run(&case.config, shape, inputs, call)?;
                assert!(got.status.invalid_label, "{what} {:?}", call.layout);
                assert!(
                    got.regression_loss.is_nan() && got.classification_loss.is_nan(),
                    "{what} {:?}",
                    call.layout
                );
                Ok(got)
            };
            let got = run(&case.host(), Call::default()).unwrap();
            assert_eq!(got.mask[5], 0, "{what}");
            let row = &got.grad_confidence[5 * shape.classes..6 * shape.classes];
            assert!(row.iter().all(|g| g.to_f32() == 0.0), "{what}");
            emulated::assert_channel_major_is_row_major(
                &what,
                shape,
                &case.host(),
                Call::default(),
                &got,
                run,
            );
        }
    }
    let staged = Shape::new(2, 40, 3);
    let long = Shape::new(1, 8, 3001);
    for shape in [staged, long] {
        let c = shape.classes as i64;
        check::<f32, i32>(shape, &[c, -2, i64::from(i32::MIN), i64::from(i32::MAX)]);
        check::<f32, i64>(shape, &[c, -2, i64::MIN, (1 << 32) + 1]);
        check::<f16, i32>(shape, &[c, -2]);
        check::<bf16, i64>(shape, &[c, -(1 << 32)]);
    }
}

/// A staged tile shorter than its run to the first 16-byte boundary: the
/// last row-major tile of B * P = 257 rows holds one row of C = 2 f32 (C =
/// 5 f16), and with the logits one element into their allocation that row
/// lies inside one 16-byte word (head_to_16_bytes' `n < head`, which no
/// test reached). The same bits as aligned logits.
#[test]
fn a_one_row_tile_inside_a_16_byte_word() {
    fn check<T: Float>(classes: usize) {
        let shape = Shape::new(1, 257, classes);
        let mut rng = SplitMix64(81);
        let labels: Vec<i64> = (0..shape.rows() as i64)
            .map(|i| if i % 4 == 0 { 1 } else { 0 })
            .collect();
        let confidence: Vec<T> = (0..shape.confidence_len())
            .map(|_| T::from_f64(rng.normal()))
            .collect();
        let case = Drawn::with(shape, confidence, labels, &mut rng);
        let aligned = checked_in_both_layouts(&format!("{shape} {:?}", T::DTYPE), &case);
        let shifted: Vec<T> = std::iter::once(case.confidence[0])
            .chain(case.confidence.iter().copied())
            .collect();
        let inputs = HostInputs {
            confidence: &shifted[1..],
            ..case.host()
        };
        let got = emulated::run(&case.config, shape, &inputs, Call::default()).unwrap();
        let bits = |v: &[T]| -> Vec<u8> { bytemuck::cast_slice(v).to_vec() };
        assert_eq!(got.mask, aligned.mask);
        assert_eq!(bits(&got.grad_confidence), bits(&aligned.grad_confidence));
        assert_eq!(
            got.classification_loss.to_bits(),
            aligned.classification_loss.to_bits()
        );
    }
    check::<f32>(2);
    check::<f16>(5);
}
