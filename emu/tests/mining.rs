//! The selection kernel's k = floor(ratio * positives) in integer arithmetic
//! is exact for every finite ratio >= 0: it equals the f64 product's floor
//! wherever that is exact (m * positives < 2^53 for the ratio's 24-bit
//! significand m, so every count below 2^29), and the exact value beyond
//! (kernel in emu/tests/kernels/mining.cu).
mod common;

use common::{addr, run};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct FloorParams {
    ratios: u64,
    positives: u64,
    out: u64,
    n: u32,
    unused: u32,
}

fn f64_floor(ratio: f32, positives: u32) -> u64 {
    let x = (f64::from(ratio) * f64::from(positives)).floor();
    if x >= 18446744073709551615.0 {
        u64::MAX
    } else {
        x as u64
    }
}

#[test]
fn floor_ratio_times_is_exact() {
    let mut ratios = vec![
        0.0,
        f32::from_bits(1), // the smallest subnormal
        1e-30,
        0.1,
        1.0 / 3.0,
        0.5,
        1.0,
        2.9999998,
        3.0,
        3.0000002,
        7.0,
        1e10,
        1e30,
        f32::MAX,
    ];
    // Ratios just around k / pos, where rounding would show.
    for k in 1..200u32 {
        let r = k as f32 / 7.0;
        ratios.extend([
            f32::from_bits(r.to_bits() - 1),
            r,
            f32::from_bits(r.to_bits() + 1),
        ]);
    }
    let counts = [
        0u32,
        1,
        2,
        3,
        7,
        10,
        1000,
        8732,
        65535,
        1 << 24,
        (1 << 29) - 1,
    ];
    let (mut rs, mut ps) = (Vec::new(), Vec::new());
    for &r in &ratios {
        for &c in &counts {
            rs.push(r);
            ps.push(c);
        }
    }
    let n = rs.len();
    let mut out = vec![0u64; n];
    let params = FloorParams {
        ratios: addr(rs.as_ptr()),
        positives: addr(ps.as_ptr()),
        out: addr(out.as_mut_ptr()),
        n: n as u32,
        unused: 0,
    };
    run(
        "emu_test_floor_ratio_times",
        [(n as u32).div_ceil(256), 1, 1],
        [256, 1, 1],
        0,
        &params,
    )
    .unwrap();
    for i in 0..n {
        assert_eq!(
            out[i],
            f64_floor(rs[i], ps[i]),
            "ratio {:e} ({:#x}) x {}",
            rs[i],
            rs[i].to_bits(),
            ps[i]
        );
    }
}

#[test]
fn floor_ratio_times_is_exact_where_f64_rounds() {
    // 3.0000002384185791015625 * 2147483647 = 6442451452.99999976...: f64
    // rounds the product up to ...453.0.
    let cases = [
        (
            f32::from_bits(0x4040_0001),
            2_147_483_647u32,
            6_442_451_452u64,
        ),
        (f32::from_bits(0x4040_0001), u32::MAX, 12_884_902_908),
        (1.0, u32::MAX, u32::MAX as u64),
        (f32::MAX, 2, u64::MAX),
    ];
    let rs: Vec<f32> = cases.iter().map(|c| c.0).collect();
    let ps: Vec<u32> = cases.iter().map(|c| c.1).collect();
    let mut out = vec![0u64; cases.len()];
    let params = FloorParams {
        ratios: addr(rs.as_ptr()),
        positives: addr(ps.as_ptr()),
        out: addr(out.as_mut_ptr()),
        n: cases.len() as u32,
        unused: 0,
    };
    run(
        "emu_test_floor_ratio_times",
        [1, 1, 1],
        [256, 1, 1],
        0,
        &params,
    )
    .unwrap();
    let want: Vec<u64> = cases.iter().map(|c| c.2).collect();
    assert_eq!(out, want);
}
