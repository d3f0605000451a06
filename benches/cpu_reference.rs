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
use multibox::synthetic::{Batch, BatchSpec, BoxBatch};
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
        let boxes = BoxBatch::generate(batch, max_boxes, 21, 7);
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| {
                targets::reference::assign::<i64>(
                    &config,
                    shape,
                    &priors,
                    &boxes.gt_boxes,
                    &boxes.gt_labels,
                    &boxes.gt_counts,
                )
            })
        });
    }
    group.finish();
}

criterion_group!(benches, forward_backward, assign_targets);
criterion_main!(benches);
