//! common.cuh's f16 / bf16 conversions on the CPU are bit-exact IEEE
//! round-to-nearest-even, i.e. what the GPU's cvt instructions give: checked
//! against the `half` crate for every 16-bit pattern (widening) and for
//! every value, midpoint and near-midpoint plus millions of random f32
//! (narrowing). Kernels in emu/tests/kernels/halfs.cu. And the sm_90
//! build's packed half instructions against PTX's definitions
//! (emu/tests/kernels/packed_halves.cu).
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

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct PackedParams {
    a: u64,
    b: u64,
    out: u64,
    n: u32,
    unused: u32,
}

/// The packed half instructions of the sm_90 build (max.{bf16,f16}x2,
/// fma.rn.{bf16,f16}x2 with b = 0) held to PTX's definitions, computed here
/// with the `half` crate: max gives the other operand where one is NaN, a
/// NaN where both are, else (a > b ? a : b); a * 0 + acc is NaN once a is
/// NaN or infinite or acc is NaN, else acc plus a zero of a's sign. Every
/// pair of special and ordinary values, in both halves of a word.
#[test]
fn packed_half_instructions_follow_ptx() {
    let values = [
        0.0f32,
        -0.0,
        1.0,
        -1.0,
        2.5,
        -3.0,
        65504.0,
        1e-7,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
    ];
    let pairs: Vec<(f32, f32)> = values
        .iter()
        .flat_map(|&x| values.iter().map(move |&y| (x, y)))
        .collect();
    // Word a holds (x, y), word b (y, x): each half sees every order.
    let words = |bits: &dyn Fn(f32) -> u16| -> (Vec<u32>, Vec<u32>) {
        let word = |lo: f32, hi: f32| u32::from(bits(lo)) | u32::from(bits(hi)) << 16;
        pairs.iter().map(|&(x, y)| (word(x, y), word(y, x))).unzip()
    };
    let (a16, b16) = words(&|v| f16::from_f32(v).to_bits());
    let (ab, bb) = words(&|v| bf16::from_f32(v).to_bits());
    let run_on = |a: &[u32], b: &[u32]| {
        let mut out = vec![0u32; 4 * a.len()];
        let params = PackedParams {
            a: addr(a.as_ptr()),
            b: addr(b.as_ptr()),
            out: addr(out.as_mut_ptr()),
            n: a.len() as u32,
            unused: 0,
        };
        let checks = multibox_emu::Checks {
            races: multibox_emu::races_checked_by_default(),
            arch: multibox_emu::Arch::Sm90,
            ..Default::default()
        };
        let grid = (a.len() as u32).div_ceil(64);
        // SAFETY: the kernel reads n words of a and b and writes 4 n of out,
        // all live Vecs of those lengths.
        unsafe {
            multibox_emu::launch_checked(
                "emu_test_packed_halves",
                [grid, 1, 1],
                [64, 1, 1],
                0,
                bytemuck::bytes_of(&params),
                &checks,
            )
        }
        .unwrap();
        out
    };
    let (out16, outb) = (run_on(&a16, &b16), run_on(&ab, &bb));

    // One half of a word, as f32, and the expected results from it.
    let max = |x: f32, y: f32, xb: u16, yb: u16| -> Option<u16> {
        match (x.is_nan(), y.is_nan()) {
            (true, true) => None, // some NaN
            (true, false) => Some(yb),
            (false, true) => Some(xb),
            _ => Some(if x > y { xb } else { yb }),
        }
    };
    let times_zero_plus = |x: f32, acc: f32| -> f32 { x * 0.0 + acc };
    let check = |name: &str,
                 got: &[u32],
                 a: &[u32],
                 b: &[u32],
                 widen: &dyn Fn(u16) -> f32,
                 narrow: &dyn Fn(f32) -> u16,
                 at: usize| {
        for i in 0..a.len() {
            for half in 0..2 {
                let part = |w: u32| (w >> (16 * half)) as u16;
                let (xb, yb) = (part(a[i]), part(b[i]));
                let (x, y) = (widen(xb), widen(yb));
                let g_max = part(got[4 * i + at]);
                match max(x, y, xb, yb) {
                    None => assert!(widen(g_max).is_nan(), "{name} max({x}, {y}) = {g_max:#x}"),
                    Some(want) => assert_eq!(g_max, want, "{name} max({x}, {y})"),
                }
                let g_fma = part(got[4 * i + at + 2]);
                let want = times_zero_plus(x, y);
                if want.is_nan() {
                    assert!(widen(g_fma).is_nan(), "{name} {x} * 0 + {y} = {g_fma:#x}");
                } else {
                    assert_eq!(g_fma, narrow(want), "{name} {x} * 0 + {y}");
                }
            }
        }
    };
    let (w16, n16) = (
        |b: u16| f16::from_bits(b).to_f32(),
        |v: f32| f16::from_f32(v).to_bits(),
    );
    let (wb, nb) = (
        |b: u16| bf16::from_bits(b).to_f32(),
        |v: f32| bf16::from_f32(v).to_bits(),
    );
    check("f16", &out16, &a16, &b16, &w16, &n16, 1);
    check("bf16", &outb, &ab, &bb, &wb, &nb, 0);
}
