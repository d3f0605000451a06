//! The main job: the MultiBox loss and its gradients for a synthetic
//! SSDLite-VOC batch (32 images, 3000 priors, 21 classes), on the GPU when
//! there is one (its losses then checked against the CPU reference's),
//! else with the CPU reference.
//!
//!     scripts/setup && cargo run --release --example ssdlite

use std::time::Instant;

use anyhow::Result;
use multibox::synthetic::{Batch, BatchSpec};
use multibox::{reference, MultiboxConfig, Shape};

fn main() -> Result<()> {
    let shape = Shape::new(32, 3000, 21);
    let config = MultiboxConfig::default();
    let batch = Batch::<f32, i64>::generate(shape, BatchSpec::default());
    println!(
        "SSDLite-VOC batch: B={} P={} C={}, neg_pos_ratio {}",
        shape.batch, shape.priors, shape.classes, config.neg_pos_ratio
    );

    match multibox::cuda_context(0) {
        Ok(ctx) => gpu(&ctx, &config, &batch),
        Err(why) => {
            println!("no GPU ({why}): using the CPU reference");
            cpu(&config, &batch)
        }
    }
}

fn cpu(config: &MultiboxConfig, batch: &Batch<f32, i64>) -> Result<()> {
    let start = Instant::now();
    let out = reference::forward_backward(
        config,
        batch.shape,
        &batch.reference_inputs(),
        Default::default(),
    )?;
    let elapsed = start.elapsed();
    let l = &out.losses;
    println!("regression_loss     {:.6}", l.regression_loss);
    println!("classification_loss {:.6}", l.classification_loss);
    println!("num_pos             {}", l.num_pos);
    println!(
        "CPU reference, forward+backward: {:.1} ms",
        elapsed.as_secs_f64() * 1e3
    );
    Ok(())
}

fn gpu(
    ctx: &std::sync::Arc<multibox::cudarc::driver::CudaContext>,
    config: &MultiboxConfig,
    batch: &Batch<f32, i64>,
) -> Result<()> {
    let shape = batch.shape;
    let stream = ctx.default_stream();
    let loss = multibox::MultiboxLoss::new(ctx, *config)?;
    let confidence = stream.clone_htod(&batch.confidence)?;
    let predicted_locations = stream.clone_htod(&batch.predicted_locations)?;
    let labels = stream.clone_htod(&batch.labels)?;
    let gt_locations = stream.clone_htod(&batch.gt_locations)?;
    let mut grad_confidence = stream.alloc_zeros::<f32>(shape.confidence_len())?;
    let mut grad_locations = stream.alloc_zeros::<f32>(shape.locations_len())?;
    let mut regression_loss = stream.alloc_zeros::<f32>(1)?;
    let mut classification_loss = stream.alloc_zeros::<f32>(1)?;
    let mut num_pos = stream.alloc_zeros::<i32>(1)?;
    let mut workspace = stream.alloc_zeros::<u8>(multibox::workspace_bytes(shape)?)?;

    let inputs = multibox::Inputs {
        confidence: &confidence,
        predicted_locations: &predicted_locations,
        labels: &labels,
        gt_locations: &gt_locations,
    };
    let mut step = || -> multibox::Result<()> {
        loss.forward_backward(
            &stream,
            shape,
            &inputs,
            multibox::Upstream::default(),
            &mut multibox::Gradients {
                confidence: &mut grad_confidence,
                predicted_locations: &mut grad_locations,
            },
            &mut multibox::Outputs {
                regression_loss: &mut regression_loss,
                classification_loss: &mut classification_loss,
                num_pos: &mut num_pos,
                mask: None,
            },
            &mut workspace,
        )
    };
    step()?; // warm-up
    stream.synchronize()?;
    let iterations = 100;
    let start = Instant::now();
    for _ in 0..iterations {
        step()?;
    }
    stream.synchronize()?;
    let per_call = start.elapsed().as_secs_f64() / iterations as f64;

    let reg = stream.clone_dtoh(&regression_loss)?[0];
    let cls = stream.clone_dtoh(&classification_loss)?[0];
    let n = stream.clone_dtoh(&num_pos)?[0];
    println!("regression_loss     {reg:.6}");
    println!("classification_loss {cls:.6}");
    println!("num_pos             {n}");
    println!(
        "GPU {} forward+backward: {:.1} us per call (wall clock, {iterations} calls)",
        ctx.name()?,
        per_call * 1e6
    );
    println!(
        "device status: {:?}",
        loss.status(&stream, shape, &workspace)?
    );

    // The same losses from the CPU reference (SPEC.md: relative 1e-6).
    let cpu = reference::forward(config, shape, &batch.reference_inputs())?.losses;
    let close = |gpu: f32, cpu: f64| (f64::from(gpu) - cpu).abs() <= 1e-6 * cpu.abs().max(1e-30);
    println!(
        "CPU reference:      regression_loss {:.6}, classification_loss {:.6}, num_pos {}",
        cpu.regression_loss, cpu.classification_loss, cpu.num_pos
    );
    anyhow::ensure!(
        close(reg, cpu.regression_loss)
            && close(cls, cpu.classification_loss)
            && u64::try_from(n) == Ok(cpu.num_pos),
        "the GPU's losses differ from the CPU reference's"
    );
    Ok(())
}
