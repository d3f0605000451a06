//! Target assignment on a real GPU: every golden case, randomized batches
//! against the CPU reference, the status word, CUDA-graph capture of
//! targets-then-loss, and the refusals. Without a GPU each test prints why
//! it is skipped; with MULTIBOX_REQUIRE_GPU=1 it fails instead.
//! `scripts/emulated-gpu-tests` runs them on the emulated driver of
//! `emu/driver`.

mod common;

use std::sync::Arc;

use common::gpu;
use common::target_golden::{check_against, load_target_cases};
use multibox::cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use multibox::synthetic::SplitMix64;
use multibox::targets::{
    priors, reference, TargetAssigner, TargetConfig, TargetInputs, TargetOutputs, TargetStatus,
};
use multibox::{
    Error, Float, Gradients, Inputs, Label, MultiboxConfig, MultiboxLoss, Outputs, Shape, Upstream,
};

/// Device buffers of one assignment; outputs and workspace start as garbage.
struct DeviceBatch<T, L> {
    batch: usize,
    max_boxes: usize,
    gt_boxes: CudaSlice<f32>,
    gt_labels: CudaSlice<L>,
    gt_counts: CudaSlice<i32>,
    labels: CudaSlice<L>,
    gt_locations: CudaSlice<T>,
    workspace: CudaSlice<u8>,
}

impl<T: Float, L: Label> DeviceBatch<T, L> {
    fn new(
        stream: &Arc<CudaStream>,
        assigner: &TargetAssigner,
        (batch, max_boxes): (usize, usize),
        boxes: &[f32],
        labels: &[L],
        counts: &[i32],
    ) -> multibox::Result<Self> {
        let p = assigner.num_priors();
        Ok(Self {
            batch,
            max_boxes,
            gt_boxes: stream.clone_htod(boxes)?,
            gt_labels: stream.clone_htod(labels)?,
            gt_counts: stream.clone_htod(counts)?,
            labels: stream.clone_htod(&vec![L::from_i64(-99); batch * p])?,
            gt_locations: stream.clone_htod(&vec![T::from_f32(f32::NAN); batch * p * 4])?,
            workspace: stream
                .clone_htod(&vec![0xabu8; assigner.workspace_bytes(batch, max_boxes)?])?,
        })
    }

    fn assign(
        &mut self,
        assigner: &TargetAssigner,
        stream: &Arc<CudaStream>,
    ) -> multibox::Result<()> {
        assigner.assign(
            stream,
            self.batch,
            self.max_boxes,
            &TargetInputs {
                gt_boxes: &self.gt_boxes,
                gt_labels: &self.gt_labels,
                gt_counts: &self.gt_counts,
            },
            &mut TargetOutputs {
                labels: &mut self.labels,
                gt_locations: &mut self.gt_locations,
            },
            &mut self.workspace,
        )
    }

    fn read(
        &self,
        assigner: &TargetAssigner,
        stream: &Arc<CudaStream>,
    ) -> (Vec<L>, Vec<T>, TargetStatus) {
        let status = assigner
            .status(stream, self.batch, self.max_boxes, &self.workspace)
            .unwrap();
        (
            stream.clone_dtoh(&self.labels).unwrap(),
            stream.clone_dtoh(&self.gt_locations).unwrap(),
            status,
        )
    }
}

fn run<L: Label>(
    ctx: &Arc<CudaContext>,
    config: TargetConfig,
    priors: &[f32],
    shape: (usize, usize),
    boxes: &[f32],
    labels: &[i64],
    counts: &[i32],
) -> (Vec<i64>, Vec<f32>, TargetStatus) {
    let stream = ctx.default_stream();
    let assigner = TargetAssigner::new(ctx, priors, config).unwrap();
    let labels: Vec<L> = labels.iter().map(|&l| L::from_i64(l)).collect();
    let mut d =
        DeviceBatch::<f32, L>::new(&stream, &assigner, shape, boxes, &labels, counts).unwrap();
    d.assign(&assigner, &stream).unwrap();
    let (l, loc, status) = d.read(&assigner, &stream);
    (l.iter().map(|x| x.to_i64()).collect(), loc, status)
}

#[test]
fn gpu_matches_every_golden_case() {
    let Some(ctx) = gpu::device("gpu_matches_every_golden_case") else {
        return;
    };
    let mut worst = 0.0f64;
    for case in load_target_cases() {
        let shape = (case.shape.batch, case.shape.max_boxes);
        let args = (
            &case.priors,
            shape,
            &case.gt_boxes,
            &case.gt_labels,
            &case.gt_counts,
        );
        let (labels, locations, status) = if case.labels_i64 {
            run::<i64>(&ctx, case.config, args.0, args.1, args.2, args.3, args.4)
        } else {
            run::<i32>(&ctx, case.config, args.0, args.1, args.2, args.3, args.4)
        };
        // The status word is the reference's on the same input (the
        // goldens record none).
        assert_eq!(status, case.run_reference().2, "{}: status", case.name);
        worst = worst.max(check_against(&case, "GPU", &labels, &locations));
    }
    println!("GPU: largest offset error / max(1, |golden|): {worst:e}");
}

/// A random padded batch over the SSD300 priors, with duplicates and boxes
/// outside [0, 1]; NaN padding.
fn random_batch(seed: u64, batch: usize, max_boxes: usize) -> (Vec<f32>, Vec<i64>, Vec<i32>) {
    let mut rng = SplitMix64(seed);
    let mut boxes = vec![f32::NAN; batch * max_boxes * 4];
    let mut labels = vec![-7i64; batch * max_boxes];
    let mut counts = Vec::new();
    for b in 0..batch {
        let n = (rng.next_u64() % (max_boxes as u64 + 1)) as usize;
        counts.push(n as i32);
        for t in 0..n {
            let row = b * max_boxes + t;
            let bx = if t > 0 && rng.next_u64().is_multiple_of(5) {
                let s = row - 1;
                [
                    boxes[s * 4],
                    boxes[s * 4 + 1],
                    boxes[s * 4 + 2],
                    boxes[s * 4 + 3],
                ]
            } else {
                let x0 = (rng.uniform() * 1.2 - 0.1) as f32;
                let y0 = (rng.uniform() * 1.2 - 0.1) as f32;
                let w = (rng.uniform() * 0.5 + 0.002) as f32;
                let h = (rng.uniform() * 0.5 + 0.002) as f32;
                [x0, y0, x0 + w, y0 + h]
            };
            boxes[row * 4..row * 4 + 4].copy_from_slice(&bx);
            labels[row] = 1 + (rng.next_u64() % 80) as i64;
        }
    }
    (boxes, labels, counts)
}

#[test]
fn gpu_matches_the_reference_on_random_batches() {
    let Some(ctx) = gpu::device("gpu_matches_the_reference_on_random_batches") else {
        return;
    };
    let priors = priors::ssd300();
    for (seed, batch, max_boxes) in [(1, 8, 20), (2, 3, 300), (3, 32, 100)] {
        let (boxes, labels, counts) = random_batch(seed, batch, max_boxes);
        let config = TargetConfig::default();
        let (got_labels, got_loc, status) = run::<i64>(
            &ctx,
            config,
            &priors,
            (batch, max_boxes),
            &boxes,
            &labels,
            &counts,
        );
        let shape = multibox::targets::TargetShape::new(batch, 8732, max_boxes);
        let want =
            reference::assign::<i64>(&config, shape, &priors, &boxes, &labels, &counts).unwrap();
        assert_eq!(status, want.status, "seed {seed}");
        assert_eq!(got_labels, want.labels, "seed {seed}");
        for (g, w) in got_loc.iter().zip(&want.gt_locations) {
            assert!(
                (g - w).abs() <= 1e-6 * w.abs().max(1.0),
                "seed {seed}: {g} vs {w}"
            );
        }
    }
}

/// The half-precision offsets, each type with each label type: the labels
/// are the reference's, the offsets within one rounding of the type (the
/// kernels round their f32 offsets once). Their only GPU run.
#[test]
fn gpu_half_outputs_round_the_references_offsets() {
    let Some(ctx) = gpu::device("gpu_half_outputs_round_the_references_offsets") else {
        return;
    };
    let priors = priors::ssdlite300();
    let (batch, max_boxes) = (4, 50);
    let (boxes, labels, counts) = random_batch(4, batch, max_boxes);
    let config = TargetConfig::default();
    let shape = multibox::targets::TargetShape::new(batch, 3000, max_boxes);
    let want = reference::assign::<i64>(&config, shape, &priors, &boxes, &labels, &counts).unwrap();
    let stream = ctx.default_stream();
    let assigner = TargetAssigner::new(&ctx, &priors, config).unwrap();
    let check = |d: (Vec<i64>, Vec<f64>, TargetStatus), what: &str, tolerance: f64| {
        let (got_labels, got_loc, status) = d;
        assert_eq!(status, want.status, "{what}");
        assert_eq!(got_labels, want.labels, "{what}");
        assert_eq!(got_loc.len(), want.gt_locations.len(), "{what}");
        for (i, (g, w)) in got_loc.iter().zip(&want.gt_locations).enumerate() {
            let w = f64::from(*w);
            assert!(
                (g - w).abs() <= tolerance * w.abs().max(1.0),
                "{what}: offset {i}: {g} vs {w}"
            );
        }
    };
    fn run_as<T: Float, L: Label>(
        stream: &Arc<CudaStream>,
        assigner: &TargetAssigner,
        shape: (usize, usize),
        (boxes, labels, counts): (&[f32], &[i64], &[i32]),
    ) -> (Vec<i64>, Vec<f64>, TargetStatus) {
        let labels: Vec<L> = labels.iter().map(|&l| L::from_i64(l)).collect();
        let mut d =
            DeviceBatch::<T, L>::new(stream, assigner, shape, boxes, &labels, counts).unwrap();
        d.assign(assigner, stream).unwrap();
        let (l, loc, status) = d.read(assigner, stream);
        (
            l.iter().map(|x| x.to_i64()).collect(),
            loc.iter().map(|x| f64::from(x.to_f32())).collect(),
            status,
        )
    }
    let inputs = (boxes.as_slice(), labels.as_slice(), counts.as_slice());
    let shape = (batch, max_boxes);
    use half::{bf16, f16};
    check(
        run_as::<f16, i32>(&stream, &assigner, shape, inputs),
        "f16/i32",
        1e-3,
    );
    check(
        run_as::<f16, i64>(&stream, &assigner, shape, inputs),
        "f16/i64",
        1e-3,
    );
    check(
        run_as::<bf16, i32>(&stream, &assigner, shape, inputs),
        "bf16/i32",
        8e-3,
    );
    check(
        run_as::<bf16, i64>(&stream, &assigner, shape, inputs),
        "bf16/i64",
        8e-3,
    );
}

#[test]
fn gpu_status_records_bad_inputs() {
    let Some(ctx) = gpu::device("gpu_status_records_bad_inputs") else {
        return;
    };
    let priors = priors::ssdlite300();
    let boxes = [0.1f32, 0.1, 0.4, 0.5, f32::NAN, 0.0, 1.0, 1.0];
    let config = TargetConfig {
        num_classes: Some(21),
        ..Default::default()
    };
    let (_, _, s) = run::<i64>(&ctx, config, &priors, (2, 1), &boxes, &[1, 30], &[1, 5]);
    assert!(
        s.count_clamped && s.invalid_box_label && s.degenerate_box,
        "{s:?}"
    );
}

/// The buffers of one training step: assignment, then the loss.
struct TrainStep {
    targets: DeviceBatch<f32, i64>,
    shape: Shape,
    confidence: CudaSlice<f32>,
    predicted_locations: CudaSlice<f32>,
    grad_confidence: CudaSlice<f32>,
    grad_locations: CudaSlice<f32>,
    regression_loss: CudaSlice<f32>,
    classification_loss: CudaSlice<f32>,
    num_pos: CudaSlice<i32>,
    workspace: CudaSlice<u8>,
}

impl TrainStep {
    fn launch(&mut self, assigner: &TargetAssigner, loss: &MultiboxLoss, stream: &Arc<CudaStream>) {
        self.targets.assign(assigner, stream).unwrap();
        loss.forward_backward(
            stream,
            self.shape,
            &Inputs {
                confidence: &self.confidence,
                predicted_locations: &self.predicted_locations,
                labels: &self.targets.labels,
                gt_locations: &self.targets.gt_locations,
            },
            Upstream::default(),
            &mut Gradients {
                confidence: &mut self.grad_confidence,
                predicted_locations: &mut self.grad_locations,
            },
            &mut Outputs {
                regression_loss: &mut self.regression_loss,
                classification_loss: &mut self.classification_loss,
                num_pos: &mut self.num_pos,
                mask: None,
            },
            &mut self.workspace,
        )
        .unwrap();
    }

    fn read(
        &self,
        assigner: &TargetAssigner,
        stream: &Arc<CudaStream>,
    ) -> (Vec<f32>, Vec<f32>, Vec<i64>) {
        (
            stream.clone_dtoh(&self.grad_confidence).unwrap(),
            stream.clone_dtoh(&self.classification_loss).unwrap(),
            self.targets.read(assigner, stream).0,
        )
    }
}

#[test]
fn targets_then_loss_capture_in_one_cuda_graph() {
    let Some(ctx) = gpu::device_alone("targets_then_loss_capture_in_one_cuda_graph") else {
        return;
    };
    // cudarc's event tracking records events around buffer use, which
    // stream capture does not allow across streams.
    // SAFETY: no other stream of this test's context uses these buffers.
    unsafe { ctx.disable_event_tracking() };
    let stream = ctx.new_stream().unwrap();
    let priors = priors::ssdlite300();
    let assigner = TargetAssigner::new(&ctx, &priors, TargetConfig::default()).unwrap();
    let loss = MultiboxLoss::new(&ctx, MultiboxConfig::default()).unwrap();
    let (batch, max_boxes) = (8, 20);
    let shape = Shape::new(batch, 3000, 21);
    let (boxes, labels, counts) = random_batch(7, batch, max_boxes);
    let labels: Vec<i64> = labels
        .iter()
        .map(|&l| if l > 0 { 1 + l % 20 } else { l })
        .collect();
    let mut rng = SplitMix64(9);
    let confidence: Vec<f32> = (0..shape.confidence_len())
        .map(|_| rng.normal() as f32)
        .collect();
    let predicted: Vec<f32> = (0..shape.locations_len())
        .map(|_| rng.normal() as f32)
        .collect();
    let new_step = || TrainStep {
        targets: DeviceBatch::new(
            &stream,
            &assigner,
            (batch, max_boxes),
            &boxes,
            &labels,
            &counts,
        )
        .unwrap(),
        shape,
        confidence: stream.clone_htod(&confidence).unwrap(),
        predicted_locations: stream.clone_htod(&predicted).unwrap(),
        grad_confidence: stream.alloc_zeros(shape.confidence_len()).unwrap(),
        grad_locations: stream.alloc_zeros(shape.locations_len()).unwrap(),
        regression_loss: stream.alloc_zeros(1).unwrap(),
        classification_loss: stream.alloc_zeros(1).unwrap(),
        num_pos: stream.alloc_zeros(1).unwrap(),
        workspace: stream
            .alloc_zeros(multibox::workspace_bytes(shape).unwrap())
            .unwrap(),
    };

    let mut direct = new_step();
    direct.launch(&assigner, &loss, &stream);
    let want = direct.read(&assigner, &stream);

    let mut captured = new_step();
    stream.synchronize().unwrap();
    stream
        .begin_capture(
            multibox::cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
        )
        .unwrap();
    captured.launch(&assigner, &loss, &stream);
    let graph = stream
        .end_capture(multibox::cudarc::driver::sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH)
        .unwrap()
        .expect("a graph");
    for _ in 0..3 {
        graph.launch().unwrap();
    }
    assert_eq!(captured.read(&assigner, &stream), want);
}

#[test]
fn gpu_refuses_bad_calls_before_launching() {
    let Some(ctx) = gpu::device("gpu_refuses_bad_calls_before_launching") else {
        return;
    };
    let stream = ctx.default_stream();
    let priors = priors::ssdlite300();
    assert!(matches!(
        TargetAssigner::new(&ctx, &priors[..7], TargetConfig::default()),
        Err(Error::InvalidPriors(_))
    ));
    assert!(matches!(
        TargetAssigner::new(
            &ctx,
            &priors,
            TargetConfig {
                size_variance: 0.0,
                ..Default::default()
            }
        ),
        Err(Error::InvalidConfig(_))
    ));
    let assigner = TargetAssigner::new(&ctx, &priors, TargetConfig::default()).unwrap();
    let (boxes, labels, counts) = random_batch(3, 2, 4);
    let mut d =
        DeviceBatch::<f32, i64>::new(&stream, &assigner, (2, 4), &boxes, &labels, &counts).unwrap();
    d.max_boxes = 5;
    assert!(matches!(
        d.assign(&assigner, &stream),
        Err(Error::TargetLengthMismatch {
            name: "gt_boxes",
            ..
        })
    ));
    d.max_boxes = 4;
    d.workspace = stream.alloc_zeros::<u8>(16).unwrap();
    assert!(matches!(
        d.assign(&assigner, &stream),
        Err(Error::TargetWorkspaceTooSmall { .. })
    ));
    assert!(matches!(
        assigner.status(&stream, 2, 4, &d.workspace),
        Err(Error::TargetWorkspaceTooSmall { actual: 16, .. })
    ));
}
