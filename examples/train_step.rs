//! One training step from ground-truth boxes: target assignment (prior
//! matching and box encoding), then the MultiBox loss forward and backward,
//! on one stream, for a synthetic batch of 16 images with 5 to 15 boxes
//! each over the SSDLite-300 priors. The CPU references always run; on a
//! machine with a GPU the same step runs there too and is checked against
//! them to SPEC.md's tolerances (labels and `num_pos` exact, offsets within
//! 1e-6 of max(1, |x|), losses relative 1e-6, gradients within 1e-6 of the
//! largest reference gradient), and the example fails when they differ.
//!
//!     scripts/setup && cargo run --release --example train_step

use anyhow::Result;
use multibox::cudarc::driver::CudaSlice;
use multibox::synthetic::{BoxBatch, SplitMix64};
use multibox::targets::{self, priors, TargetAssigner, TargetConfig, TargetInputs, TargetOutputs};
use multibox::{
    reference, Gradients, Inputs, MultiboxConfig, MultiboxLoss, Outputs, Shape, Upstream,
};

const CLASSES: usize = 21;
const MAX_BOXES: usize = 20;

fn main() -> Result<()> {
    let priors = priors::ssdlite300();
    let shape = Shape::new(16, priors.len() / 4, CLASSES);
    let boxes = BoxBatch::generate(shape.batch, MAX_BOXES, CLASSES, 1);
    let mut rng = SplitMix64(2);
    // Stand-ins for the network's outputs.
    let confidence: Vec<f32> = (0..shape.confidence_len())
        .map(|_| rng.normal() as f32)
        .collect();
    let predicted_locations: Vec<f32> = (0..shape.locations_len())
        .map(|_| 0.5 * rng.normal() as f32)
        .collect();
    let target_config = TargetConfig::default();
    let loss_config = MultiboxConfig::default();
    println!(
        "B={} P={} C={} T={}: {} boxes",
        shape.batch,
        shape.priors,
        shape.classes,
        MAX_BOXES,
        boxes.gt_counts.iter().sum::<i32>()
    );

    // The CPU references: targets per image as a data loader would, then the loss.
    let shape_t = targets::TargetShape::new(shape.batch, shape.priors, MAX_BOXES);
    let t = targets::reference::assign::<i64>(
        &target_config,
        shape_t,
        &priors,
        &boxes.gt_boxes,
        &boxes.gt_labels,
        &boxes.gt_counts,
    )?;
    let cpu = reference::forward_backward(
        &loss_config,
        shape,
        &reference::Inputs {
            confidence: &confidence,
            predicted_locations: &predicted_locations,
            labels: &t.labels,
            gt_locations: &t.gt_locations,
        },
        Default::default(),
    )?;
    let l = &cpu.losses;
    println!(
        "CPU: reg {:.5} cls {:.5} num_pos {} (targets status ok: {})",
        l.regression_loss,
        l.classification_loss,
        l.num_pos,
        t.status.is_ok()
    );

    match multibox::cuda_context(0) {
        Ok(ctx) => {
            let stream = ctx.default_stream();
            // Once per run: kernels loaded, priors uploaded.
            let assigner = TargetAssigner::new(&ctx, &priors, target_config)?;
            let loss = MultiboxLoss::new(&ctx, loss_config)?;

            // Per step: the padded boxes go up; everything else stays on the device.
            let gt_boxes = stream.clone_htod(&boxes.gt_boxes)?;
            let gt_labels = stream.clone_htod(&boxes.gt_labels)?;
            let gt_counts = stream.clone_htod(&boxes.gt_counts)?;
            let mut labels: CudaSlice<i64> = stream.alloc_zeros(shape.rows())?;
            let mut gt_locations: CudaSlice<f32> = stream.alloc_zeros(shape.locations_len())?;
            let mut target_ws =
                stream.alloc_zeros::<u8>(assigner.workspace_bytes(shape.batch, MAX_BOXES)?)?;
            assigner.assign(
                &stream,
                shape.batch,
                MAX_BOXES,
                &TargetInputs {
                    gt_boxes: &gt_boxes,
                    gt_labels: &gt_labels,
                    gt_counts: &gt_counts,
                },
                &mut TargetOutputs {
                    labels: &mut labels,
                    gt_locations: &mut gt_locations,
                },
                &mut target_ws,
            )?;

            let confidence = stream.clone_htod(&confidence)?;
            let predicted_locations = stream.clone_htod(&predicted_locations)?;
            let mut grad_confidence: CudaSlice<f32> = stream.alloc_zeros(shape.confidence_len())?;
            let mut grad_locations: CudaSlice<f32> = stream.alloc_zeros(shape.locations_len())?;
            let mut reg = stream.alloc_zeros::<f32>(1)?;
            let mut cls = stream.alloc_zeros::<f32>(1)?;
            let mut num_pos = stream.alloc_zeros::<i32>(1)?;
            let mut loss_ws = stream.alloc_zeros::<u8>(multibox::workspace_bytes(shape)?)?;
            loss.forward_backward(
                &stream,
                shape,
                &Inputs {
                    confidence: &confidence,
                    predicted_locations: &predicted_locations,
                    labels: &labels,
                    gt_locations: &gt_locations,
                },
                Upstream::default(),
                &mut Gradients {
                    confidence: &mut grad_confidence,
                    predicted_locations: &mut grad_locations,
                },
                &mut Outputs {
                    regression_loss: &mut reg,
                    classification_loss: &mut cls,
                    num_pos: &mut num_pos,
                    mask: None,
                },
                &mut loss_ws,
            )?;
            let status = assigner.status(&stream, shape.batch, MAX_BOXES, &target_ws)?;
            let (reg, cls, n) = (
                stream.clone_dtoh(&reg)?[0],
                stream.clone_dtoh(&cls)?[0],
                stream.clone_dtoh(&num_pos)?[0],
            );
            println!(
                "GPU: reg {reg:.5} cls {cls:.5} num_pos {n} (targets status ok: {})",
                status.is_ok()
            );
            check_against_cpu(
                &t,
                &cpu,
                &Step {
                    labels: stream.clone_dtoh(&labels)?,
                    gt_locations: stream.clone_dtoh(&gt_locations)?,
                    reg,
                    cls,
                    num_pos: n,
                    grad_confidence: stream.clone_dtoh(&grad_confidence)?,
                    grad_locations: stream.clone_dtoh(&grad_locations)?,
                },
            )?;
            println!("GPU matches the CPU references");
        }
        Err(why) => println!("no GPU ({why}): the CPU references only"),
    }
    Ok(())
}

/// What the GPU computed in one step, copied back to the host.
struct Step {
    labels: Vec<i64>,
    gt_locations: Vec<f32>,
    reg: f32,
    cls: f32,
    num_pos: i32,
    grad_confidence: Vec<f32>,
    grad_locations: Vec<f32>,
}

/// The GPU's step against the CPU references, to SPEC.md's tolerances.
fn check_against_cpu(
    t: &targets::reference::Targets<i64>,
    cpu: &reference::Output,
    gpu: &Step,
) -> Result<()> {
    anyhow::ensure!(gpu.labels == t.labels, "labels differ");
    let offsets_close = gpu
        .gt_locations
        .iter()
        .zip(&t.gt_locations)
        .all(|(&g, &r)| (g - r).abs() <= 1e-6 * r.abs().max(1.0));
    anyhow::ensure!(offsets_close, "encoded offsets differ");
    let l = &cpu.losses;
    let close = |g: f32, r: f64| (f64::from(g) - r).abs() <= 1e-6 * r.abs().max(1e-30);
    anyhow::ensure!(
        close(gpu.reg, l.regression_loss)
            && close(gpu.cls, l.classification_loss)
            && u64::try_from(gpu.num_pos) == Ok(l.num_pos),
        "losses or num_pos differ"
    );
    let grads_close = |g: &[f32], r: &[f64]| {
        let scale = r.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        g.iter()
            .zip(r)
            .all(|(&g, &r)| (f64::from(g) - r).abs() <= 1e-6 * scale)
    };
    anyhow::ensure!(
        grads_close(&gpu.grad_confidence, &cpu.grad_confidence)
            && grads_close(&gpu.grad_locations, &cpu.grad_locations),
        "gradients differ"
    );
    Ok(())
}
