//! The CPU reference (f64) on one core: what a machine without a GPU pays
//! for a step, and the yardstick's own cost in the tests.
//!
//!     cargo bench --bench cpu_reference
//!
//! Short by default (10 samples, 3 s each case); criterion's flags such as
//! `--measurement-time 20` lengthen it.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use multibox::synthetic::{Batch, BatchSpec};
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

criterion_group!(benches, forward_backward);
criterion_main!(benches);
