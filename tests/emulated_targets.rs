//! Target assignment's kernels (kernels/targets.cu) on the CPU emulator:
//! every golden case, randomized cases against the CPU reference, the
//! device status word for each recorded bad input (with guards around every
//! output: nothing is written out of bounds), the host's refusals before any
//! launch, and the plan's workspace layout.

mod common;

use common::emulated_targets::{assign, Assigned};
use common::extents::Extents;
use common::target_golden::{check_against, load_target_cases, TargetCase};
use half::{bf16, f16};
use multibox::synthetic::SplitMix64;
use multibox::targets::plan::{TargetPlan, PRIOR_TILE};
use multibox::targets::{
    launch_assign, priors, reference, RawTargetBuffers, RawTargetCall, TargetConfig, TargetShape,
    INVALID_PRIOR_LABEL,
};
use multibox::{DType, Error, Float, Label, LabelType};

fn emulate_case<L: Label>(case: &TargetCase, gpu_like: Option<u32>) -> Assigned<f32, L> {
    assign::<f32, L>(
        &case.config,
        case.shape,
        &case.priors,
        &case.gt_boxes,
        &case.gt_labels_as::<L>(),
        &case.gt_counts,
        gpu_like,
    )
    .unwrap_or_else(|e| panic!("{}: {e}", case.name))
}

/// Every golden case as sm_75 runs the kernels with the host's logarithm,
/// and as sm_90 does with one as a GPU's math library may compute it (a
/// seed per case).
#[test]
fn emulated_kernels_match_every_golden_case() {
    let cases = load_target_cases();
    let mut worst = 0.0f64;
    for (seed, case) in (1u32..).zip(&cases) {
        for gpu_like in [None, Some(seed)] {
            let (labels, locations, status) = if case.labels_i64 {
                let a = emulate_case::<i64>(case, gpu_like);
                (a.labels, a.gt_locations, a.status)
            } else {
                let a = emulate_case::<i32>(case, gpu_like);
                (
                    a.labels.iter().map(|&l| i64::from(l)).collect(),
                    a.gt_locations,
                    a.status,
                )
            };
            // The status word is the reference's on the same input (the
            // goldens record none).
            assert_eq!(status, case.run_reference().2, "{}: status", case.name);
            let backend = match gpu_like {
                None => "emulated kernels".to_owned(),
                Some(s) => format!("emulated kernels, sm_90, device math {s}"),
            };
            worst = worst.max(check_against(case, &backend, &labels, &locations));
        }
    }
    println!(
        "{} target cases on the emulated kernels, as sm_75 and as sm_90 with the device's logarithm; \
         largest offset error / max(1, |golden|): {worst:e}",
        cases.len()
    );
}

/// A random batch drawn to reach the corners: random or standard priors,
/// priors and boxes on a coarse grid (many equal ious), duplicated boxes,
/// boxes outside [0, 1], tiny and huge boxes, empty images, more boxes than
/// one shared-memory chunk.
struct Drawn {
    shape: TargetShape,
    config: TargetConfig,
    priors: Vec<f32>,
    boxes: Vec<f32>,
    labels: Vec<i64>,
    counts: Vec<i32>,
}

fn draw(seed: u64) -> Drawn {
    let mut rng = SplitMix64(seed);
    let grid = rng.next_u64().is_multiple_of(3);
    let coord = |rng: &mut SplitMix64, lo: f64, hi: f64| {
        let v = lo + (hi - lo) * rng.uniform();
        (if grid { (v * 8.0).round() / 8.0 } else { v }) as f32
    };
    let (priors, p) = match rng.next_u64() % 5 {
        0 => (priors::ssdlite300(), 3000),
        _ => {
            let p = 1 + (rng.next_u64() % 700) as usize;
            let mut v = Vec::with_capacity(p * 4);
            for _ in 0..p {
                let cx = coord(&mut rng, -0.1, 1.1);
                let cy = coord(&mut rng, -0.1, 1.1);
                let w = coord(&mut rng, 0.01, 0.9).max(0.01);
                let h = coord(&mut rng, 0.01, 0.9).max(0.01);
                v.extend([cx, cy, w, h]);
            }
            (v, p)
        }
    };
    let batch = 1 + (rng.next_u64() % 4) as usize;
    let max_boxes = match rng.next_u64() % 6 {
        0 => 260 + (rng.next_u64() % 60) as usize, // more than one chunk of 256
        _ => 1 + (rng.next_u64() % 30) as usize,
    };
    let shape = TargetShape::new(batch, p, max_boxes);
    let mut boxes = vec![f32::NAN; shape.boxes_len()];
    let mut labels = vec![-7i64; shape.box_labels_len()];
    let mut counts = Vec::with_capacity(batch);
    for b in 0..batch {
        let n = match rng.next_u64() % 5 {
            0 => 0,
            1 => max_boxes,
            _ => (rng.next_u64() % (max_boxes as u64 + 1)) as usize,
        };
        counts.push(n as i32);
        for t in 0..n {
            let row = b * max_boxes + t;
            let bx = if t > 0 && rng.next_u64().is_multiple_of(6) {
                // A duplicate of an earlier box: they share their best prior.
                let src = b * max_boxes + (rng.next_u64() % t as u64) as usize;
                [
                    boxes[src * 4],
                    boxes[src * 4 + 1],
                    boxes[src * 4 + 2],
                    boxes[src * 4 + 3],
                ]
            } else {
                let size = [0.002, 0.05, 0.3, 1.2][(rng.next_u64() % 4) as usize];
                let x0 = coord(&mut rng, -0.3, 1.1);
                let y0 = coord(&mut rng, -0.3, 1.1);
                let w = coord(&mut rng, 0.0, size).max(0.001);
                let h = coord(&mut rng, 0.0, size).max(0.001);
                [x0, y0, x0 + w, y0 + h]
            };
            boxes[row * 4..row * 4 + 4].copy_from_slice(&bx);
            labels[row] = 1 + (rng.next_u64() % 20) as i64;
        }
    }
    let config = TargetConfig {
        iou_threshold: [0.5, 0.45, 0.3, 1.0, 0.01][(rng.next_u64() % 5) as usize],
        center_variance: [0.1, 0.2][(rng.next_u64() % 2) as usize],
        size_variance: [0.2, 0.1][(rng.next_u64() % 2) as usize],
        num_classes: None,
    };
    Drawn {
        shape,
        config,
        priors,
        boxes,
        labels,
        counts,
    }
}

/// The emulated kernels against the CPU reference: labels exact, offsets
/// within SPEC's tolerance (in f32), status identical.
/// The kernels on `d` against the reference: odd seeds as sm_90 runs them,
/// with the device math model (`assign`).
fn compare<T: Float, L: Label>(d: &Drawn, seed: u64, what: &str) {
    let labels: Vec<L> = d.labels.iter().map(|&l| L::from_i64(l)).collect();
    let want = reference::assign::<L>(&d.config, d.shape, &d.priors, &d.boxes, &labels, &d.counts)
        .unwrap_or_else(|e| panic!("{what}: reference: {e}"));
    let gpu_like = (seed % 2 == 1).then_some(seed as u32);
    let got = assign::<T, L>(
        &d.config, d.shape, &d.priors, &d.boxes, &labels, &d.counts, gpu_like,
    )
    .unwrap_or_else(|e| panic!("{what}: emulated: {e}"));
    assert_eq!(got.status, want.status, "{what}: status");
    let p = d.shape.priors;
    if let Some(i) = got
        .labels
        .iter()
        .zip(&want.labels)
        .position(|(a, b)| a.to_i64() != b.to_i64())
    {
        panic!(
            "{what}: label of image {} prior {}: kernels {:?}, reference {:?}",
            i / p,
            i % p,
            got.labels[i],
            want.labels[i]
        );
    }
    // Rounded to T once, from f32 values within 1e-6 relative: within one
    // rounding of T of the reference's rounding.
    let tolerance = match T::DTYPE {
        DType::F32 => 1e-6,
        DType::F16 => 1e-3,
        DType::BF16 => 8e-3,
    };
    for (i, (g, w)) in got.gt_locations.iter().zip(&want.gt_locations).enumerate() {
        let (g, w) = (f64::from(g.to_f32()), f64::from(*w));
        assert!(
            (g - w).abs() <= tolerance * w.abs().max(1.0),
            "{what}: gt_locations of image {} prior {} [{}]: kernels {g}, reference {w}",
            i / (4 * p),
            (i / 4) % p,
            i % 4
        );
    }
}

#[test]
fn randomized_cases_match_the_reference() {
    for seed in 0..40u64 {
        let d = draw(seed);
        let what = format!("seed {seed} {}", d.shape);
        match seed % 4 {
            0 | 1 => compare::<f32, i64>(&d, seed, &what),
            2 => compare::<f32, i32>(&d, seed, &what),
            _ => compare::<f32, i64>(&d, seed, &what),
        }
    }
}

/// Every encode instance of the half types: each with both label types
/// (f16/i32 and bf16/i64 had never been launched, as gcov of kernels/*.cu
/// showed: scripts/kernel-coverage).
#[test]
fn half_outputs_round_the_same_offsets() {
    for seed in 100..106u64 {
        let d = draw(seed);
        compare::<f16, i64>(&d, seed, &format!("f16/i64, seed {seed}"));
        compare::<f16, i32>(&d, seed, &format!("f16/i32, seed {seed}"));
        compare::<bf16, i32>(&d, seed, &format!("bf16/i32, seed {seed}"));
        compare::<bf16, i64>(&d, seed, &format!("bf16/i64, seed {seed}"));
    }
}

#[test]
fn device_status_records_each_bad_input_and_matches_the_reference() {
    let priors = priors::ssdlite300();
    let shape = TargetShape::new(3, 3000, 4);
    let good = [0.1f32, 0.1, 0.4, 0.5];
    let mut boxes = vec![f32::NAN; shape.boxes_len()];
    for row in 0..12 {
        boxes[row * 4..row * 4 + 4].copy_from_slice(&[
            good[0] + 0.05 * row as f32,
            good[1],
            good[2] + 0.05 * row as f32,
            good[3],
        ]);
    }
    let labels = vec![1i64; 12];
    let config = TargetConfig {
        num_classes: Some(21),
        ..Default::default()
    };
    let run = |boxes: &[f32], labels: &[i64], counts: &[i32]| {
        let want =
            reference::assign::<i64>(&config, shape, &priors, boxes, labels, counts).unwrap();
        let got = assign::<f32, i64>(&config, shape, &priors, boxes, labels, counts, None).unwrap();
        assert_eq!(got.status, want.status);
        assert_eq!(got.labels, want.labels);
        for (g, w) in got.gt_locations.iter().zip(&want.gt_locations) {
            assert!((g - w).abs() <= 1e-6 * w.abs().max(1.0));
        }
        got.status
    };
    assert!(run(&boxes, &labels, &[4, 2, 0]).is_ok());

    for counts in [[5, 2, 0], [4, -1, 0], [i32::MAX, i32::MIN, 3]] {
        let s = run(&boxes, &labels, &counts);
        assert!(s.count_clamped, "{counts:?}: {s:?}");
    }
    for bad in [0i64, -1, 21, i64::MAX] {
        let mut l = labels.clone();
        l[5] = bad;
        let s = run(&boxes, &l, &[4, 2, 0]);
        assert!(
            s.invalid_box_label && !s.count_clamped && !s.degenerate_box,
            "label {bad}: {s:?}"
        );
        // A label in a padding row is never read.
        let mut l = labels.clone();
        l[7] = bad;
        assert!(run(&boxes, &l, &[4, 2, 0]).is_ok(), "padding label {bad}");
    }
    let degenerate = [
        [f32::NAN, 0.1, 0.4, 0.5],
        [0.1, f32::NAN, 0.4, 0.5],
        [0.1, 0.1, f32::INFINITY, 0.5],
        [0.1, 0.1, 0.4, f32::INFINITY],
        [f32::NEG_INFINITY, 0.1, 0.4, 0.5],
        [0.4, 0.1, 0.4, 0.5],
        [0.1, 0.5, 0.4, 0.1],
        [0.5, 0.1, 0.4, 0.5],
    ];
    for bx in degenerate {
        let mut b = boxes.clone();
        b[4..8].copy_from_slice(&bx);
        let s = run(&b, &labels, &[4, 2, 0]);
        assert!(s.degenerate_box && !s.invalid_box_label, "{bx:?}: {s:?}");
        // Every box of an image degenerate: the image is as if empty.
        let mut b = boxes.clone();
        for t in 0..4 {
            b[t * 4..t * 4 + 4].copy_from_slice(&bx);
        }
        let got =
            assign::<f32, i64>(&config, shape, &priors, &b, &labels, &[4, 2, 0], None).unwrap();
        assert!(got.labels[..3000].iter().all(|&l| l == 0));
        assert!(got.gt_locations[..12000].iter().all(|&v| v == 0.0));
    }
}

/// A box with an invalid label whose best prior a later box also takes:
/// the invalid box keeps that forced match, so its label still reaches a
/// prior (and through it the loss, whose losses are then NaN: SPEC.md, "Bad
/// input"); between valid boxes the later one wins, as the reference does.
/// Box 0 overlaps prior 0 by an iou of 0.44, below the threshold, and no
/// other prior at all; box 1 is prior 0 itself.
#[test]
fn an_invalid_box_label_keeps_its_forced_prior() {
    let priors = [
        0.5f32, 0.5, 0.2, 0.2, //
        0.1, 0.1, 0.1, 0.1, //
        0.9, 0.9, 0.1, 0.1,
    ];
    let shape = TargetShape::new(1, 3, 2);
    let boxes = [0.35f32, 0.35, 0.65, 0.65, 0.4, 0.4, 0.6, 0.6];
    let config = TargetConfig {
        num_classes: Some(21),
        ..Default::default()
    };
    for (first, prior_0, invalid) in [
        (2i64, 1i64, false),
        (0, INVALID_PRIOR_LABEL, true),
        (-5, INVALID_PRIOR_LABEL, true),
        (21, 21, true),
    ] {
        let labels = [first, 1];
        let want =
            reference::assign::<i64>(&config, shape, &priors, &boxes, &labels, &[2]).unwrap();
        let got = assign::<f32, i64>(&config, shape, &priors, &boxes, &labels, &[2], None).unwrap();
        assert_eq!(want.labels, [prior_0, 0, 0], "box 0 labelled {first}");
        assert_eq!(got.labels, want.labels, "box 0 labelled {first}");
        assert_eq!(got.status.invalid_box_label, invalid);
        assert_eq!(got.status, want.status);
        for (g, w) in got.gt_locations.iter().zip(&want.gt_locations) {
            assert!((g - w).abs() <= 1e-6 * w.abs().max(1.0), "{g} {w}");
        }
    }
}

/// A call at made-up addresses from `addr`, 16 MiB apart (a backend that
/// launches nothing never touches them): buffers that overlap would be
/// refused.
fn raw_call(shape: TargetShape, addr: u64, workspace_bytes: usize) -> RawTargetCall {
    let at = |i: u64| addr + (i << 24);
    RawTargetCall {
        shape,
        dtype: DType::F32,
        label_type: LabelType::I64,
        buffers: RawTargetBuffers {
            priors: at(0),
            gt_boxes: at(1),
            gt_labels: at(2),
            gt_counts: at(3),
            labels: at(4),
            gt_locations: at(5),
            workspace: at(6),
            workspace_bytes,
        },
    }
}

/// A backend that fails the test if anything is launched.
struct NoLaunch;
impl multibox::Backend for NoLaunch {
    unsafe fn launch(
        &self,
        kernel: &'static str,
        _: u32,
        _: u32,
        _: u32,
        _: &[u8],
    ) -> multibox::Result<()> {
        panic!("{kernel} launched for a call that should have been refused");
    }
}

/// The raw entry point asks about every buffer, with the bytes its kernels
/// may reach, before the first launch (the driver backend asks the driver).
#[test]
fn every_buffer_is_checked_before_any_launch() {
    let shape = TargetShape::new(2, 300, 5);
    let bytes = TargetPlan::new(shape).unwrap().workspace.bytes;
    let call = RawTargetCall {
        dtype: DType::F16,
        label_type: LabelType::I32,
        ..raw_call(shape, 4096, bytes + 512)
    };
    let run = |refuse| {
        let backend = Extents::refusing(refuse);
        // SAFETY: Extents dereferences nothing.
        let result = unsafe { launch_assign(&TargetConfig::default(), &call, &backend) };
        (
            result.map(|_| ()),
            backend.checked.into_inner(),
            backend.launched.get(),
        )
    };
    let (result, checked, launched) = run(None);
    result.unwrap();
    assert_eq!(launched, 3);
    let extents: Vec<_> = checked
        .iter()
        .map(|&(name, _, bytes)| (name, bytes))
        .collect();
    assert_eq!(
        extents,
        [
            ("priors", 300 * 4 * 4),
            ("gt_boxes", 2 * 5 * 4 * 4),
            ("gt_labels", 2 * 5 * 4),
            ("gt_counts", 2 * 4),
            ("labels", 2 * 300 * 4),
            ("gt_locations", 2 * 300 * 4 * 2),
            ("workspace", bytes),
        ]
    );
    for name in ["priors", "gt_counts", "workspace"] {
        let (result, _, launched) = run(Some(name));
        assert!(
            matches!(result, Err(Error::NotDeviceMemory { name: n, .. }) if n == name),
            "{name}: {result:?}"
        );
        assert_eq!(launched, 0, "{name}");
    }
}

#[test]
fn host_refuses_bad_calls_before_launching() {
    let shape = TargetShape::new(2, 300, 5);
    let bytes = TargetPlan::new(shape).unwrap().workspace.bytes;
    let ok = raw_call(shape, 4096, bytes);
    let c = TargetConfig::default();
    let refused = |config: &TargetConfig, call: &RawTargetCall| {
        // SAFETY: NoLaunch dereferences nothing.
        unsafe { launch_assign(config, call, &NoLaunch) }.expect_err("refused")
    };
    for name in [
        "priors",
        "gt_boxes",
        "gt_labels",
        "gt_counts",
        "labels",
        "gt_locations",
        "workspace",
    ] {
        let mut call = ok;
        let b = &mut call.buffers;
        let field = match name {
            "priors" => &mut b.priors,
            "gt_boxes" => &mut b.gt_boxes,
            "gt_labels" => &mut b.gt_labels,
            "gt_counts" => &mut b.gt_counts,
            "labels" => &mut b.labels,
            "gt_locations" => &mut b.gt_locations,
            _ => &mut b.workspace,
        };
        *field = 0;
        assert!(
            matches!(refused(&c, &call), Error::NullPointer { name: n } if n == name),
            "{name}"
        );
        let mut call = ok;
        let b = &mut call.buffers;
        let field = match name {
            "priors" => &mut b.priors,
            "gt_boxes" => &mut b.gt_boxes,
            "gt_labels" => &mut b.gt_labels,
            "gt_counts" => &mut b.gt_counts,
            "labels" => &mut b.labels,
            "gt_locations" => &mut b.gt_locations,
            _ => &mut b.workspace,
        };
        *field = 4098;
        assert!(
            matches!(refused(&c, &call), Error::Misaligned { name: n, .. } if n == name),
            "{name}"
        );
    }
    let small = raw_call(shape, 4096, bytes - 1);
    assert!(matches!(
        refused(&c, &small),
        Error::TargetWorkspaceTooSmall { .. }
    ));
    let bad_config = TargetConfig {
        iou_threshold: 0.0,
        ..c
    };
    assert!(matches!(refused(&bad_config, &ok), Error::InvalidConfig(_)));
    let bad_shape = raw_call(TargetShape::new(2, 300, 0), 4096, bytes);
    assert!(matches!(
        refused(&c, &bad_shape),
        Error::InvalidTargetShape { .. }
    ));
    let huge = raw_call(TargetShape::new(1 << 20, 1 << 20, 5), 4096, usize::MAX);
    assert!(matches!(
        refused(&c, &huge),
        Error::InvalidTargetShape { .. }
    ));
}

/// No output may overlap an input, another output or the workspace, nor
/// the workspace an input: refused, naming both, before anything is
/// launched. Inputs may overlap one another; buffers may touch end to end.
#[test]
fn overlapping_buffers_are_refused_before_launching() {
    let shape = TargetShape::new(2, 300, 5);
    let bytes = TargetPlan::new(shape).unwrap().workspace.bytes;
    let ok = raw_call(shape, 4096, bytes);
    let b = ok.buffers;
    let c = TargetConfig::default();
    let overlap = |edit: &dyn Fn(&mut RawTargetBuffers)| {
        let mut call = ok;
        edit(&mut call.buffers);
        // SAFETY: NoLaunch dereferences nothing.
        match unsafe { launch_assign(&c, &call, &NoLaunch) } {
            Err(Error::Overlap { a, b }) => (a, b),
            other => panic!("not refused as an overlap: {other:?}"),
        }
    };
    assert_eq!(
        overlap(&|x| x.gt_locations = b.labels),
        ("labels", "gt_locations")
    );
    assert_eq!(
        overlap(&|x| x.labels = b.gt_labels),
        ("gt_labels", "labels")
    );
    assert_eq!(
        overlap(&|x| x.gt_locations = b.priors + 16),
        ("priors", "gt_locations")
    );
    assert_eq!(
        overlap(&|x| x.labels = (b.workspace + bytes as u64 - 1) & !7),
        ("labels", "workspace")
    );
    assert_eq!(
        overlap(&|x| x.gt_counts = b.workspace),
        ("gt_counts", "workspace")
    );
    let accepted = |what: &str, edit: &dyn Fn(&mut RawTargetBuffers)| {
        let mut call = ok;
        edit(&mut call.buffers);
        let backend = Extents::refusing(None);
        // SAFETY: Extents dereferences nothing.
        let result = unsafe { launch_assign(&c, &call, &backend) };
        assert!(result.is_ok(), "{what}: {result:?}");
        assert_eq!(backend.launched.get(), 3, "{what}");
    };
    accepted("distinct", &|_| {});
    accepted("inputs over inputs", &|x| {
        x.gt_boxes = b.priors;
        x.gt_counts = b.priors + 4;
    });
    accepted("end to end", &|x| {
        // [B, P] i64 labels between the priors and the workspace.
        x.labels = b.workspace - 2 * 300 * 8;
        x.priors = x.labels - 300 * 16;
    });
}

#[test]
fn plan_lays_out_the_workspace_without_overlap() {
    for shape in [
        TargetShape::new(1, 1, 1),
        TargetShape::new(32, 3000, 20),
        TargetShape::new(256, 8732, 100),
        TargetShape::new(3, 257, 300),
    ] {
        let plan = TargetPlan::new(shape).unwrap();
        let ws = plan.workspace;
        let sections = [ws.box_best, ws.prior_best, ws.status];
        for s in sections {
            assert_eq!(s.offset % 256, 0, "{shape}");
        }
        assert_eq!(ws.box_best.len, shape.batch * shape.max_boxes * 8);
        assert_eq!(ws.prior_best.len, shape.batch * shape.priors * 8);
        assert_eq!(ws.status.len, 4);
        for pair in sections.windows(2) {
            let gap = multibox::plan::SECTION_GAP;
            assert!(
                pair[0].offset + pair[0].len + gap <= pair[1].offset,
                "{shape}"
            );
        }
        assert_eq!(ws.bytes, ws.status.offset + 4);
        let tiles = shape.priors.div_ceil(PRIOR_TILE as usize) as u32;
        assert_eq!(plan.tiles_per_image, tiles);
        assert_eq!(plan.matching.grid, shape.batch as u32 * tiles);
        assert_eq!(plan.encode.grid, plan.matching.grid);
        assert!(
            plan.reset.grid as usize * plan.reset.block as usize >= shape.batch * shape.max_boxes
        );
        assert_eq!(
            multibox::targets::plan::workspace_bytes(shape).unwrap(),
            ws.bytes
        );
    }
}
