//! The CPU reference (f64) on one core: what a machine without a GPU pays
//! for a step, and the yardstick's own cost in the tests. Also the CPU
//! reference of target assignment (f32), whose per-image cost is what the
//! data loader's workers pay for the reference's `MatchPrior`.
//!
//!     cargo bench --bench cpu_reference
//!
//! Short by default (10 samples, 3 s each case); criterion's flags such as
//! `--measurement-time 20` lengthen it.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use multibox::synthetic::{Batch, BatchSpec, SplitMix64};
use multibox::targets::{self, priors, TargetConfig, TargetShape};
use multibox::{reference, MultiboxConfig, Shape};

fn forward_backward(c: &mut Criterion) {
    let config = MultiboxConfig::default();
    let mut group = c.benchmark_group("cpu_reference_forward_backward_f32");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for (name, shape) in [
        ("ssdlite_voc_b4", Shape::new(4, 3000, 21)),
        ("ssdlite_voc_b32", Shape::new(32, 3000, 21)),
    ] {
        let batch = Batch::<f32, i64>::generate(shape, BatchSpec::default());
        group.throughput(Throughput::Elements(shape.rows() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(name), &batch, |b, batch| {
            b.iter(|| {
                reference::forward_backward(
                    &config,
                    shape,
                    &batch.reference_inputs(),
                    Default::default(),
                )
            })
        });
    }
    group.finish();
}

/// A padded batch: image b has between T/4 and 3T/4 boxes of random size.
fn boxes(batch: usize, max_boxes: usize) -> (Vec<f32>, Vec<i64>, Vec<i32>) {
    let mut rng = SplitMix64(7);
    let mut gt_boxes = vec![0.0f32; batch * max_boxes * 4];
    let mut labels = vec![0i64; batch * max_boxes];
    let mut counts = Vec::with_capacity(batch);
    for b in 0..batch {
        let n = max_boxes / 4 + (rng.next_u64() % (max_boxes as u64 / 2 + 1)) as usize;
        counts.push(n as i32);
        for t in 0..n {
            let row = b * max_boxes + t;
            let (w, h) = (0.02 + 0.5 * rng.uniform(), 0.02 + 0.5 * rng.uniform());
            let (x0, y0) = ((1.0 - w) * rng.uniform(), (1.0 - h) * rng.uniform());
            gt_boxes[row * 4..row * 4 + 4].copy_from_slice(&[
                x0 as f32,
                y0 as f32,
                (x0 + w) as f32,
                (y0 + h) as f32,
            ]);
            labels[row] = 1 + (rng.next_u64() % 20) as i64;
        }
    }
    (gt_boxes, labels, counts)
}

fn assign_targets(c: &mut Criterion) {
    let config = TargetConfig::default();
    let mut group = c.benchmark_group("cpu_reference_assign_targets");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for (name, priors, max_boxes) in [
        ("ssdlite300_b32_t20", priors::ssdlite300(), 20),
        ("ssd300_b32_t20", priors::ssd300(), 20),
        ("ssd300_b32_t100", priors::ssd300(), 100),
    ] {
        let batch = 32;
        let shape = TargetShape::new(batch, priors.len() / 4, max_boxes);
        let (gt_boxes, gt_labels, gt_counts) = boxes(batch, max_boxes);
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| {
                targets::reference::assign::<i64>(
                    &config, shape, &priors, &gt_boxes, &gt_labels, &gt_counts,
                )
            })
        });
    }
    group.finish();
}

criterion_group!(benches, forward_backward, assign_targets);
criterion_main!(benches);
