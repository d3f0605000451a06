//! Each emulated CUDA feature against known answers (kernels in
//! emu/tests/kernels/features.cu).
mod common;

use common::{addr, run, IoParams};

#[test]
fn block_sum_gives_every_thread_its_blocks_total() {
    let input: Vec<i32> = (0..8 * 256).map(|i| (i * 37 % 101) - 50).collect();
    let (mut every, mut totals) = (vec![0; input.len()], vec![0; 8]);
    run(
        "emu_test_block_sum",
        [8, 1, 1],
        [256, 1, 1],
        0,
        &IoParams::new(&input, &mut every, &mut totals),
    )
    .unwrap();
    for b in 0..8 {
        let want: i32 = input[b * 256..(b + 1) * 256].iter().sum();
        assert_eq!(totals[b], want, "block {b}");
        assert!(
            every[b * 256..(b + 1) * 256].iter().all(|&t| t == want),
            "block {b}"
        );
    }
}

#[test]
fn block_reduce_of_a_struct_gives_every_thread_each_reduction() {
    for threads in [32usize, 512] {
        let blocks = 3;
        let input: Vec<i32> = (0..blocks * threads)
            .map(|i| (i as i32 * 7919 % 1009) - 500)
            .collect();
        let (mut every, mut firsts) = (vec![0; 3 * input.len()], vec![0; 3 * blocks]);
        run(
            &format!("emu_test_block_reduce_{threads}"),
            [blocks as u32, 1, 1],
            [threads as u32, 1, 1],
            0,
            &IoParams::new(&input, &mut every, &mut firsts),
        )
        .unwrap();
        for b in 0..blocks {
            let block = &input[b * threads..(b + 1) * threads];
            let bits = block
                .iter()
                .fold(0u32, |acc, &v| acc | 1 << (v as u32 % 32));
            let want = [
                block.iter().sum::<i32>(),
                bits as i32,
                *block.iter().min().unwrap(),
            ];
            assert_eq!(
                firsts[3 * b..3 * b + 3],
                want,
                "{threads} threads, block {b}"
            );
            for t in b * threads..(b + 1) * threads {
                assert_eq!(
                    every[3 * t..3 * t + 3],
                    want,
                    "{threads} threads, thread {t}"
                );
            }
        }
    }
}

#[test]
fn warp_collectives_in_divergent_code_involve_only_their_lanes() {
    let input: Vec<i32> = (0..128).map(|t| t * t % 97 + 1).collect();
    let mut out = vec![0; 128];
    run(
        "emu_test_divergent_warp",
        [1, 1, 1],
        [128, 1, 1],
        0,
        &IoParams::new(&input, &mut out, &mut []),
    )
    .unwrap();
    let warp1: i32 = input[32..64].iter().sum();
    for t in 0..128 {
        let lane = t % 32;
        let want = match t / 32 {
            1 => warp1,
            2 if lane < 15 => input[t + 1],
            3 if lane >= 8 => input[96 + 8],
            _ => input[t],
        };
        assert_eq!(out[t], want, "thread {t}");
    }
}

/// PTX shfl.sync: the source lane, or the caller's own lane when out of range.
fn shfl_source(mode: char, lane: i32, b: i32, width: i32) -> i32 {
    let seg = 32 - width;
    let min_lane = lane & seg;
    let max_lane = min_lane | (if mode == 'u' { 0 } else { 31 } & !seg);
    let (j, ok) = match mode {
        'i' => (min_lane | (b & !seg & 31), true),
        'u' => (lane - b, lane - b >= max_lane),
        'd' => (lane + b, lane + b <= max_lane),
        _ => (lane ^ b, (lane ^ b) <= max_lane),
    };
    if ok {
        j
    } else {
        lane
    }
}

#[test]
fn shuffles_of_every_kind_width_and_type() {
    const N: usize = 64;
    let input: Vec<i32> = (0..N as i32).map(|t| t * 3 + 1).collect();
    let mut out = vec![0; 16 * N];
    run(
        "emu_test_shuffles",
        [1, 1, 1],
        [N as u32, 1, 1],
        0,
        &IoParams::new(&input, &mut out, &mut []),
    )
    .unwrap();
    for t in 0..N {
        let (lane, base) = ((t % 32) as i32, t - t % 32);
        let v = |mode, b, width| input[base + shfl_source(mode, lane, b, width) as usize];
        let want = [
            v('i', (lane * 7 + 3) & 31, 32),
            v('i', lane + 5, 8),
            v('i', 40, 32),
            v('u', 3, 32),
            v('u', 2, 8),
            v('d', 5, 32),
            v('d', 3, 16),
            v('x', 9, 32),
            v('x', 1, 4),
            v('x', 6, 4),
            4 * v('x', 16, 32) + 1,
            v('d', 1, 32),
            -v('u', 1, 32),
            2 * v('i', lane ^ 3, 32) + 1,
            v('i', 31 - lane, 32),
            match lane {
                0..=7 => input[t + 8],
                8..=15 => -1, // lanes 16..23 are not in the mask: poison
                _ => -2,
            },
        ];
        for (case, &w) in want.iter().enumerate() {
            assert_eq!(out[case * N + t], w, "case {case}, thread {t}");
        }
    }
    // Spot checks that do not rely on shfl_source: xor 6 with width 4 reads
    // an earlier group (lane 4 reads lane 2) but never a later one.
    assert_eq!(out[9 * N + 4], input[2]);
    assert_eq!(out[9 * N], input[0]);
    assert_eq!(out[4 * N + 9], input[9]);
    assert_eq!(out[4 * N + 10], input[8]);
}

#[test]
fn warp_votes_and_bit_intrinsics() {
    const N: usize = 64;
    let mut out = vec![0; 7 * N];
    run(
        "emu_test_votes",
        [1, 1, 1],
        [N as u32, 1, 1],
        0,
        &IoParams::new(&[], &mut out, &mut []),
    )
    .unwrap();
    let every_third = (0..32).filter(|l| l % 3 == 0).fold(0u32, |m, l| m | 1 << l);
    for t in 0..N {
        let (lane, warp) = (t % 32, t / 32);
        let tu = t as u32;
        let clz = if t == 0 {
            32
        } else {
            tu.leading_zeros() as i32
        };
        let ffs = if t == 0 {
            0
        } else {
            tu.trailing_zeros() as i32 + 4
        };
        let clzll = ((t as u64) << 20).leading_zeros() as i32;
        let want = [
            every_third as i32,
            (warp == 1) as i32,
            (warp == 0) as i32,
            if lane >= 8 {
                0xaaaa_aa00_u32 as i32
            } else {
                -1
            },
            -1,
            8 + clz * 100 + ffs * 10000,
            tu.reverse_bits() as i32 ^ clzll ^ (64 - t as i32) ^ (41 << 8),
        ];
        for (case, &w) in want.iter().enumerate() {
            assert_eq!(out[case * N + t], w, "case {case}, thread {t}");
        }
    }
}

#[test]
fn syncthreads_count_or_and_with_a_partial_warp() {
    const N: usize = 100;
    let mut out = vec![0; 2 * 4 * N];
    run(
        "emu_test_block_votes",
        [2, 1, 1],
        [N as u32, 1, 1],
        0,
        &IoParams::new(&[], &mut out, &mut []),
    )
    .unwrap();
    for b in 0..2 {
        for t in 0..N {
            let o = |case: usize| out[(b * 4 + case) * N + t];
            assert_eq!(
                [o(0), o(1), o(2), o(3)],
                [15, b as i32, (b == 0) as i32, 100],
                "block {b}, thread {t}"
            );
        }
    }
}

/// `Counters` of features.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
struct Counters {
    add_i: i32,
    add_u: u32,
    add_u64: u64,
    add_f: f32,
    max_i: i32,
    min_i: i32,
    max_u: u32,
    min_u: u32,
    inc: u32,
    dec: u32,
    _pad: u32,
    max_i64: i64,
    min_i64: i64,
    max_u64: u64,
    min_u64: u64,
    cas_i: i32,
    cas_u: u32,
    cas_u64: u64,
    or_bits: u32,
    and_bits: u32,
    xor_bits: u32,
    sub_i: i32,
    exch_i: i32,
    exch_f: f32,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct AtomicParams {
    counters: u64,
    tickets: u64,
}

#[test]
fn atomics_under_contention_across_blocks() {
    const THREADS: usize = 64 * 128;
    let start = Counters {
        min_i: i32::MAX,
        min_u: u32::MAX,
        max_i64: i64::MIN,
        min_i64: i64::MAX,
        min_u64: u64::MAX,
        max_i: i32::MIN,
        and_bits: u32::MAX,
        exch_i: -1,
        ..bytemuck::Zeroable::zeroed()
    };
    let mut c = start;
    let mut tickets = vec![0i32; THREADS];
    let params = AtomicParams {
        counters: addr(&mut c as *mut Counters),
        tickets: addr(tickets.as_mut_ptr()),
    };
    run("emu_test_atomics", [64, 1, 1], [128, 1, 1], 0, &params).unwrap();

    let keys: Vec<i64> = (0..THREADS as i64)
        .map(|g| (g * 7919) % 10007 - 5000)
        .collect();
    let (kmax, kmin) = (*keys.iter().max().unwrap(), *keys.iter().min().unwrap());
    let (mut inc, mut dec) = (0u32, 0u32);
    for _ in 0..THREADS {
        inc = if inc >= 999 { 0 } else { inc + 1 };
        dec = if dec == 0 || dec > 9 { 9 } else { dec - 1 };
    }
    let want = Counters {
        add_i: THREADS as i32,
        add_u: 2 * THREADS as u32,
        add_u64: (THREADS as u64) << 33,
        add_f: THREADS as f32,
        max_i: kmax as i32,
        min_i: kmin as i32,
        max_u: (kmax + 5000) as u32,
        min_u: (kmin + 5000) as u32,
        inc,
        dec,
        _pad: 0,
        max_i64: kmax << 32,
        min_i64: kmin << 32,
        max_u64: ((kmax + 5000) as u64) << 32,
        min_u64: ((kmin + 5000) as u64) << 32,
        cas_i: 3 * THREADS as i32,
        cas_u: THREADS as u32,
        // Thread g swaps g for g + 1: all succeed only in the emulator's
        // (deterministic) thread order.
        cas_u64: THREADS as u64,
        or_bits: u32::MAX,
        and_bits: 1 << 31,
        xor_bits: 0b011, // bits 0 and 1 toggled 2731 times, bit 2 2730 times
        sub_i: -2 * THREADS as i32,
        exch_i: THREADS as i32 - 1,
        exch_f: 0.5,
    };
    assert_eq!(c, want);
    assert!(
        tickets.iter().all(|&t| t == 1),
        "every ticket handed out exactly once"
    );
}

#[test]
fn dynamic_shared_memory_is_per_block_and_aligned() {
    const N: usize = 1000;
    let input: Vec<i32> = (0..3 * N as i32).map(|i| i * 5 - 7).collect();
    let (mut out, mut misalign) = (vec![0; 3 * N], vec![-1; 3]);
    let params = IoParams::new(&input, &mut out, &mut misalign);
    run(
        "emu_test_dynamic_shared",
        [3, 1, 1],
        [N as u32, 1, 1],
        4 * N as u32,
        &params,
    )
    .unwrap();
    for b in 0..3 {
        for t in 0..N {
            assert_eq!(
                out[b * N + t],
                input[b * N + N - 1 - t],
                "block {b}, thread {t}"
            );
        }
    }
    assert_eq!(misalign, [0, 0, 0]);
}

#[test]
fn multi_dimensional_grid_and_block_indices() {
    for (grid, block) in [
        ([3u32, 2, 2], [8u32, 2, 2]),
        ([2, 1, 3], [16, 2, 3]),
        ([1, 1, 1], [1, 1, 32]),
    ] {
        let per_block = (block[0] * block[1] * block[2]) as usize;
        let blocks = (grid[0] * grid[1] * grid[2]) as usize;
        let mut out = vec![-1; 6 * per_block * blocks];
        run(
            "emu_test_indices",
            grid,
            block,
            0,
            &IoParams::new(&[], &mut out, &mut []),
        )
        .unwrap();
        let pack = |d: [u32; 3]| (d[0] | d[1] << 8 | d[2] << 16) as i32;
        let mut g = 0;
        for bz in 0..grid[2] {
            for by in 0..grid[1] {
                for bx in 0..grid[0] {
                    for tz in 0..block[2] {
                        for ty in 0..block[1] {
                            for tx in 0..block[0] {
                                let t = g % per_block;
                                let warp = (t / 32 * 32) as i32;
                                let want = [
                                    pack([tx, ty, tz]),
                                    pack([bx, by, bz]),
                                    pack(block),
                                    pack(grid),
                                    (warp..warp + 32).sum(),
                                    g as i32,
                                ];
                                assert_eq!(
                                    out[6 * g..6 * g + 6],
                                    want,
                                    "grid {grid:?} block {block:?} thread {g}"
                                );
                                g += 1;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `emu_test_math` over `inputs` (a multiple of 64), with the device math
/// model off (`None`) or on with a seed: per input, expf, exp2f, logf,
/// log1pf and ex2.approx.ftz.
fn math(inputs: &[f32], device_math: Option<u32>) -> Vec<[f32; 5]> {
    let bits: Vec<i32> = inputs.iter().map(|x| x.to_bits() as i32).collect();
    let mut out = vec![0i32; 5 * bits.len()];
    let params = IoParams::new(&bits, &mut out, &mut []);
    let checks = multibox_emu::Checks {
        races: multibox_emu::races_checked_by_default(),
        device_math,
        ..Default::default()
    };
    // SAFETY: the kernel reads inputs.len() ints and writes five times as
    // many, within the live Vecs whose addresses params carries.
    unsafe {
        multibox_emu::launch_checked(
            "emu_test_math",
            [(bits.len() / 64) as u32, 1, 1],
            [64, 1, 1],
            0,
            bytemuck::bytes_of(&params),
            &checks,
        )
    }
    .unwrap();
    out.chunks(5)
        .map(|c| std::array::from_fn(|f| f32::from_bits(c[f] as u32)))
        .collect()
}

/// Distance in ulps between two finite floats of one sign.
fn ulps(a: f32, b: f32) -> u32 {
    assert_eq!(a.is_sign_negative(), b.is_sign_negative(), "{a} vs {b}");
    (a.to_bits() & 0x7fff_ffff).abs_diff(b.to_bits() & 0x7fff_ffff)
}

#[test]
fn device_math_model_moves_results_within_cudas_bounds() {
    // Arguments across the kernels' ranges, each twice, and special values.
    let mut inputs: Vec<f32> = (0..448)
        .map(|i| (i as f32 - 200.0) * 0.173 + 1e-3 * (i % 7) as f32)
        .collect();
    inputs.extend_from_within(0..448);
    inputs.extend([
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -200.0,
        1e-40,
        -1.0,
    ]);
    inputs.resize(960, 0.5);
    let ex2 = |x: f32| {
        let y = (if x.abs() < f32::MIN_POSITIVE { 0.0 } else { x }).exp2();
        if y < f32::MIN_POSITIVE {
            0.0
        } else {
            y
        }
    };
    let host = |x: f32| [x.exp(), x.exp2(), x.ln(), x.ln_1p(), ex2(x)];
    let same = |a: f32, b: f32| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());

    // Off: the host's results, bit for bit, the flush to zero included.
    for (x, got) in inputs.iter().zip(math(&inputs, None)) {
        let want = host(*x);
        for f in 0..5 {
            assert!(
                same(got[f], want[f]),
                "f{f}({x:e}) = {:e}, host {:e}",
                got[f],
                want[f]
            );
        }
    }

    let bound = [2, 2, 1, 1, 2];
    let runs: Vec<Vec<[f32; 5]>> = [1u32, 2].iter().map(|&s| math(&inputs, Some(s))).collect();
    let (mut moved, mut normal) = ([[0usize; 5]; 2], [[0usize; 5]; 2]);
    for (r, run) in runs.iter().enumerate() {
        for (i, (x, got)) in inputs.iter().zip(run).enumerate() {
            let want = host(*x);
            for f in 0..5 {
                let (g, w) = (got[f], want[f]);
                if w.is_nan() || w.is_infinite() || w.abs() < f32::MIN_POSITIVE {
                    assert!(
                        same(g, w),
                        "f{f}({x:e}): {g:e} from {w:e}: not a normal result"
                    );
                    continue;
                }
                assert!(
                    ulps(g, w) <= bound[f],
                    "f{f}({x:e}) = {g:e}, host {w:e}: past {} ulp",
                    bound[f]
                );
                moved[r][f] += usize::from(g != w);
                normal[r][f] += 1;
                // A function of the argument: the repeated inputs agree.
                if i < 448 {
                    assert!(
                        same(g, run[i + 448][f]),
                        "f{f}({x:e}) differs between calls"
                    );
                }
            }
        }
    }
    // Most normal results move (4 of 5 draws for 2 ulp, 2 of 3 for 1),
    // and the seeds move them differently.
    for r in 0..2 {
        for f in 0..5 {
            let (n, of) = (moved[r][f], normal[r][f]);
            assert!(
                of > 400 && 2 * n > of,
                "seed {}: f{f} moved {n} of {of}",
                r + 1
            );
        }
    }
    let differ = runs[0]
        .iter()
        .zip(&runs[1])
        .filter(|(a, b)| (0..5).any(|f| !same(a[f], b[f])))
        .count();
    assert!(
        differ > 800,
        "seeds 1 and 2 agree on {} of 960 inputs",
        960 - differ
    );
}
