//! One training step from ground-truth boxes: target assignment (prior
//! matching and box encoding), then the MultiBox loss forward and backward,
//! on one stream, for a synthetic batch of 16 images with 5 to 15 boxes
//! each over the SSDLite-300 priors. On the GPU when there is one, else with
//! the CPU references.
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
            println!(
                "GPU: reg {:.5} cls {:.5} num_pos {} (targets status ok: {})",
                stream.clone_dtoh(&reg)?[0],
                stream.clone_dtoh(&cls)?[0],
                stream.clone_dtoh(&num_pos)?[0],
                status.is_ok()
            );
        }
        Err(why) => {
            println!("no GPU ({why}): using the CPU references");
            let shape_t = targets::TargetShape::new(shape.batch, shape.priors, MAX_BOXES);
            let t = targets::reference::assign::<i64>(
                &target_config,
                shape_t,
                &priors,
                &boxes.gt_boxes,
                &boxes.gt_labels,
                &boxes.gt_counts,
            )?;
            let out = reference::forward_backward(
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
            let l = &out.losses;
            println!(
                "CPU: reg {:.5} cls {:.5} num_pos {} (targets status ok: {})",
                l.regression_loss,
                l.classification_loss,
                l.num_pos,
                t.status.is_ok()
            );
        }
    }
    Ok(())
}
