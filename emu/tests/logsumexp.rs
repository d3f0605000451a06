//! emu/tests/kernels/logsumexp.cu (written like the loss kernels, on
//! common.cuh) against an f64 log-sum-exp.
mod common;

use common::{addr, run};
use half::{bf16, f16};

/// `LseParams` of emu/tests/kernels/logsumexp.cu.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct LseParams {
    logits: u64,
    lse: u64,
    rows: u32,
    classes: u32,
}

/// Launches `multibox_logsumexp_<dtype>` as the crate does: 256 threads,
/// one warp per row.
fn lse<T>(dtype: &str, logits: &[T], rows: usize, classes: usize) -> Vec<f32> {
    assert_eq!(logits.len(), rows * classes);
    let mut out = vec![f32::NAN; rows];
    let params = LseParams {
        logits: addr(logits.as_ptr()),
        lse: addr(out.as_mut_ptr()),
        rows: rows as u32,
        classes: classes as u32,
    };
    let grid = (rows * 32).div_ceil(256) as u32;
    run(
        &format!("multibox_logsumexp_{dtype}"),
        [grid, 1, 1],
        [256, 1, 1],
        0,
        &params,
    )
    .unwrap();
    out
}

/// Deterministic logits in [-12, 12), with a per-row offset so that rows
/// differ in scale.
fn logits(rows: usize, classes: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..rows * classes)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s >> 8) as f32 / (1 << 24) as f32 * 24.0 - 12.0 + (i / classes % 7) as f32
        })
        .collect()
}

fn check(dtype: &str, got: &[f32], widened: &[f32], classes: usize) {
    for (r, (&g, row)) in got.iter().zip(widened.chunks(classes)).enumerate() {
        let m = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
        let want = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
        // Relative error, against at least 1 so that an lse near 0 is not
        // held to an absolute error below f32's resolution of its terms.
        let err = (g as f64 - want).abs() / want.abs().max(1.0);
        assert!(
            err <= 1e-6,
            "{dtype} classes {classes} row {r}: {g} vs {want} (rel err {err:e})"
        );
    }
}

const SHAPES: [(usize, usize); 7] = [
    (1, 1),
    (7, 5),
    (33, 21),
    (100, 32),
    (64, 81),
    (9, 1000),
    (12_000, 81),
];

#[test]
fn f32_matches_f64_reference() {
    for (i, &(rows, classes)) in SHAPES.iter().enumerate() {
        let x = logits(rows, classes, i as u32);
        check("f32", &lse("f32", &x, rows, classes), &x, classes);
    }
}

#[test]
fn f16_and_bf16_match_f64_reference_of_their_values() {
    for (i, &(rows, classes)) in SHAPES.iter().enumerate() {
        let x = logits(rows, classes, 100 + i as u32);
        let h: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
        let widened: Vec<f32> = h.iter().map(|v| v.to_f32()).collect();
        check("f16", &lse("f16", &h, rows, classes), &widened, classes);
        let b: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        let widened: Vec<f32> = b.iter().map(|v| v.to_f32()).collect();
        check("bf16", &lse("bf16", &b, rows, classes), &widened, classes);
    }
}

#[test]
fn launches_are_deterministic_and_safe_from_many_threads() {
    let (rows, classes) = (2000, 81);
    let x = logits(rows, classes, 7);
    let first = lse("f32", &x, rows, classes);
    std::thread::scope(|s| {
        let runs: Vec<_> = (0..4)
            .map(|_| s.spawn(|| lse("f32", &x, rows, classes)))
            .collect();
        for run in runs {
            let again = run.join().unwrap();
            assert!(first
                .iter()
                .zip(&again)
                .all(|(a, b)| a.to_bits() == b.to_bits()));
        }
    });
}
