//! common.cuh's f16 / bf16 conversions on the CPU are bit-exact IEEE
//! round-to-nearest-even, i.e. what the GPU's cvt instructions give: checked
//! against the `half` crate for every 16-bit pattern (widening) and for
//! every value, midpoint and near-midpoint plus millions of random f32
//! (narrowing). Kernels in emu/tests/kernels/halfs.cu.
mod common;

use common::{addr, run};
use half::{bf16, f16};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct ConvertParams {
    input: u64,
    out: u64,
    n: u32,
    unused: u32,
}

fn convert<From: Copy, To: Copy + Default>(kernel: &str, input: &[From]) -> Vec<To> {
    let mut out = vec![To::default(); input.len()];
    let params = ConvertParams {
        input: addr(input.as_ptr()),
        out: addr(out.as_mut_ptr()),
        n: input.len() as u32,
        unused: 0,
    };
    run(kernel, [64, 1, 1], [256, 1, 1], 0, &params).unwrap();
    out
}

#[test]
fn widening_every_f16_and_bf16_pattern_is_exact() {
    let all: Vec<u16> = (0..=u16::MAX).collect();
    let from_f16: Vec<f32> = convert("emu_test_f16_to_f32", &all);
    let from_bf16: Vec<f32> = convert("emu_test_bf16_to_f32", &all);
    for (&bits, (&a, &b)) in all.iter().zip(from_f16.iter().zip(&from_bf16)) {
        for (got, want) in [
            (a, f16::from_bits(bits).to_f32()),
            (b, bf16::from_bits(bits).to_f32()),
        ] {
            if want.is_nan() {
                // A NaN's payload is not pinned down: only that it stays NaN.
                assert!(got.is_nan(), "{bits:#06x}: {got} is not NaN");
            } else {
                assert_eq!(
                    got.to_bits(),
                    want.to_bits(),
                    "{bits:#06x}: {got} != {want}"
                );
            }
        }
    }
}

/// SplitMix64: a reproducible stream without a dependency.
fn random_bits(seed: u64, n: usize) -> impl Iterator<Item = u32> {
    let mut s = seed;
    (0..n).map(move |_| {
        s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) as u32
    })
}

/// Each value, the midpoint to the next one up (the value past the largest
/// finite one being 2^16 for f16 and 2^128 for bf16) and one f32 ulp either
/// side of both, with both signs; then infinities, NaNs and random f32.
fn narrowing_inputs(widen: impl Fn(u16) -> f32, past_largest: f64) -> Vec<f32> {
    let mut xs = Vec::new();
    let mut push = |x: f32| {
        for y in [x, -x] {
            let b = y.to_bits();
            xs.extend([
                y,
                f32::from_bits(b.wrapping_sub(1)),
                f32::from_bits(b.wrapping_add(1)),
            ]);
        }
    };
    let mut bits = 0u16;
    loop {
        let v = widen(bits) as f64;
        let next = widen(bits + 1) as f64;
        if next.is_infinite() {
            push(((v + past_largest) / 2.0) as f32);
            push(v as f32);
            break;
        }
        push(v as f32);
        push(((v + next) / 2.0) as f32); // exact in f32: one more mantissa bit
        bits += 1;
    }
    xs.extend([
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MAX,
        f32::MIN,
        f32::MIN_POSITIVE,
    ]);
    xs.extend(
        [
            0x7fc0_0000,
            0x7f80_0001,
            0xffff_ffff,
            0x7fa0_0000,
            0xff80_1234,
        ]
        .map(f32::from_bits),
    );
    // Uniform over all bit patterns, then over the f16 range (exponents
    // 2^-27..2^17), where most of the rounding happens.
    xs.extend(random_bits(1, 2_000_000).map(f32::from_bits));
    xs.extend(
        random_bits(2, 2_000_000)
            .map(|r| f32::from_bits((r & 0x807f_ffff) | ((100 + (r >> 23) % 44) << 23))),
    );
    xs
}

fn check_narrowing(kernel: &str, xs: Vec<f32>, reference: impl Fn(f32) -> u16) {
    assert!(xs.len() > 4_000_000);
    let got: Vec<u16> = convert(kernel, &xs);
    let mut nans = 0;
    for (&x, &g) in xs.iter().zip(&got) {
        if x.is_nan() {
            nans += 1;
            assert_eq!(
                g,
                0x7fff,
                "{kernel}: NaN {:#010x} must give the canonical 0x7fff",
                x.to_bits()
            );
            continue;
        }
        assert_eq!(g, reference(x), "{kernel}: {x:e} ({:#010x})", x.to_bits());
    }
    assert!(nans > 1000);
}

#[test]
fn narrowing_to_f16_rounds_to_nearest_even() {
    let xs = narrowing_inputs(|b| f16::from_bits(b).to_f32(), 65536.0);
    check_narrowing("emu_test_f32_to_f16", xs, |x| f16::from_f32(x).to_bits());
}

#[test]
fn narrowing_to_bf16_rounds_to_nearest_even() {
    let xs = narrowing_inputs(|b| bf16::from_bits(b).to_f32(), 2f64.powi(128));
    check_narrowing("emu_test_f32_to_bf16", xs, |x| bf16::from_f32(x).to_bits());
}
