//! Target assignment on the CPU: the reference against every golden case,
//! the standard priors against the goldens' priors bit for bit, and the
//! host's refusals of bad input.

mod common;

use common::target_golden::{
    check_against, committed_target_goldens_dir, load_target_cases, load_target_cases_from,
};
use multibox::targets::{self, priors, reference, TargetConfig, TargetShape};
use multibox::Error;

#[test]
fn reference_matches_every_golden_case() {
    let cases = load_target_cases();
    let mut worst = 0.0f64;
    for case in &cases {
        let (labels, locations, status) = case.run_reference();
        // Goldens come from the reference code, which skips nothing: a case
        // with a flagged input is still held to its outputs.
        if !status.is_ok() {
            println!("{}: status {status:?}", case.name);
        }
        worst = worst.max(check_against(case, "reference", &labels, &locations));
    }
    println!(
        "{} target cases; largest offset error / max(1, |golden|): {worst:e}",
        cases.len()
    );
}

#[test]
fn standard_priors_are_bit_identical_to_the_goldens() {
    let ssdlite = priors::ssdlite300();
    let ssd300 = priors::ssd300();
    assert_eq!(ssdlite.len(), 3000 * 4);
    assert_eq!(ssd300.len(), 8732 * 4);
    // The committed cases always; a MULTIBOX_TARGET_GOLDENS folder's too,
    // where their P is a preset's.
    let mut cases = load_target_cases_from(&committed_target_goldens_dir());
    if std::env::var_os("MULTIBOX_TARGET_GOLDENS").is_some() {
        cases.extend(load_target_cases());
    }
    let mut compared = 0;
    for case in cases {
        let generated = match case.shape.priors {
            3000 => &ssdlite,
            8732 => &ssd300,
            _ => continue,
        };
        let differ = generated
            .iter()
            .zip(&case.priors)
            .position(|(a, b)| a.to_bits() != b.to_bits());
        assert_eq!(
            differ, None,
            "{}: priors differ at value {differ:?}",
            case.name
        );
        compared += 1;
    }
    assert!(compared >= 2, "the committed goldens use both presets");
}

fn small_case() -> (TargetShape, Vec<f32>, Vec<f32>, Vec<i64>, Vec<i32>) {
    let priors = priors::ssdlite300();
    let shape = TargetShape::new(2, 3000, 3);
    let boxes = vec![
        0.1,
        0.1,
        0.4,
        0.5,
        0.5,
        0.5,
        0.9,
        0.8,
        f32::NAN,
        f32::NAN,
        f32::NAN,
        f32::NAN, //
        0.2,
        0.3,
        0.6,
        0.7,
        f32::NAN,
        0.0,
        0.0,
        0.0,
        f32::NAN,
        f32::NAN,
        f32::NAN,
        f32::NAN,
    ];
    let labels = vec![1, 5, -7, 2, -7, -7];
    (shape, priors, boxes, labels, vec![2, 1])
}

#[test]
fn host_refuses_bad_settings_and_lengths() {
    let (shape, priors, boxes, labels, counts) = small_case();
    let ok = reference::assign::<i64>(
        &TargetConfig::default(),
        shape,
        &priors,
        &boxes,
        &labels,
        &counts,
    );
    assert!(ok.is_ok_and(|o| o.status.is_ok()));
    let bad_configs = [
        TargetConfig {
            iou_threshold: 0.0,
            ..Default::default()
        },
        TargetConfig {
            iou_threshold: 1.5,
            ..Default::default()
        },
        TargetConfig {
            iou_threshold: f32::NAN,
            ..Default::default()
        },
        TargetConfig {
            center_variance: 0.0,
            ..Default::default()
        },
        TargetConfig {
            center_variance: -0.1,
            ..Default::default()
        },
        TargetConfig {
            size_variance: f32::INFINITY,
            ..Default::default()
        },
        TargetConfig {
            size_variance: f32::NAN,
            ..Default::default()
        },
        TargetConfig {
            num_classes: Some(1),
            ..Default::default()
        },
    ];
    for config in bad_configs {
        let r = reference::assign::<i64>(&config, shape, &priors, &boxes, &labels, &counts);
        assert!(
            matches!(r, Err(Error::InvalidConfig(_))),
            "{config:?}: {r:?}"
        );
    }
    // Thresholds at the edges of (0, 1] are fine.
    let one = TargetConfig {
        iou_threshold: 1.0,
        ..Default::default()
    };
    assert!(reference::assign::<i64>(&one, shape, &priors, &boxes, &labels, &counts).is_ok());

    let c = TargetConfig::default();
    for bad in [
        TargetShape::new(0, 3000, 3),
        TargetShape::new(2, 0, 3),
        TargetShape::new(2, 3000, 0),
    ] {
        let r = reference::assign::<i64>(&c, bad, &priors, &boxes, &labels, &counts);
        assert!(
            matches!(r, Err(Error::InvalidTargetShape { .. })),
            "{bad}: {r:?}"
        );
    }
    let r = reference::assign::<i64>(&c, shape, &priors[4..], &boxes, &labels, &counts);
    assert!(
        matches!(r, Err(Error::TargetLengthMismatch { name: "priors", .. })),
        "{r:?}"
    );
    let r = reference::assign::<i64>(&c, shape, &priors, &boxes[..20], &labels, &counts);
    assert!(
        matches!(
            r,
            Err(Error::TargetLengthMismatch {
                name: "gt_boxes",
                ..
            })
        ),
        "{r:?}"
    );
    let r = reference::assign::<i64>(&c, shape, &priors, &boxes, &labels[1..], &counts);
    assert!(
        matches!(
            r,
            Err(Error::TargetLengthMismatch {
                name: "gt_labels",
                ..
            })
        ),
        "{r:?}"
    );
    let r = reference::assign::<i64>(&c, shape, &priors, &boxes, &labels, &counts[..1]);
    assert!(
        matches!(
            r,
            Err(Error::TargetLengthMismatch {
                name: "gt_counts",
                ..
            })
        ),
        "{r:?}"
    );
    let mut out_labels = vec![0i64; shape.labels_len()];
    let mut out_loc = vec![0f32; shape.locations_len() - 1];
    let r = reference::assign_into(
        &c,
        shape,
        &priors,
        &boxes,
        &labels,
        &counts,
        &mut out_labels,
        &mut out_loc,
    );
    assert!(
        matches!(
            r,
            Err(Error::TargetLengthMismatch {
                name: "gt_locations",
                ..
            })
        ),
        "{r:?}"
    );

    for (i, v) in [(0, f32::NAN), (2, 0.0), (3, -0.1), (5, f32::INFINITY)] {
        let mut p = priors.clone();
        p[i] = v;
        let r = reference::assign::<i64>(&c, shape, &p, &boxes, &labels, &counts);
        assert!(
            matches!(r, Err(Error::InvalidPriors(_))),
            "prior value {i} = {v}: {r:?}"
        );
    }
}

/// A shape the kernels could index but whose outputs (`B * P` labels and
/// `B * P * 4` offsets, 2 TB and 4 TB here) no host could hold, with inputs
/// too short for it: the lengths are refused before anything is allocated,
/// not by an allocation failure that aborts the process.
#[test]
fn lengths_are_checked_before_the_outputs_are_allocated() {
    let shape = TargetShape::new(1 << 20, 1 << 18, 1);
    assert!(shape.validate().is_ok());
    let c = TargetConfig::default();
    let r = reference::assign::<i64>(
        &c,
        shape,
        &[0.5, 0.5, 0.1, 0.1],
        &[0.1, 0.1, 0.2, 0.2],
        &[1],
        &[1],
    );
    assert!(
        matches!(r, Err(Error::TargetLengthMismatch { name: "priors", .. })),
        "{r:?}"
    );
    // Inputs of the right lengths (T = 1 keeps them small) with priors of
    // zero size: refused as well before the outputs are allocated.
    let priors = vec![0.0f32; shape.priors_len()];
    let boxes = vec![0.0f32; shape.boxes_len()];
    let labels = vec![1i64; shape.box_labels_len()];
    let counts = vec![1i32; shape.batch];
    let r = reference::assign::<i64>(&c, shape, &priors, &boxes, &labels, &counts);
    assert!(matches!(r, Err(Error::InvalidPriors(_))), "{r:?}");
}

#[test]
fn recorded_bad_inputs_are_handled_as_spec_says() {
    let (shape, priors, boxes, labels, _) = small_case();
    let c = TargetConfig {
        num_classes: Some(3),
        ..Default::default()
    };
    let clean =
        reference::assign::<i64>(&c, shape, &priors, &boxes, &[1, 2, -7, 2, -7, -7], &[2, 1])
            .unwrap();
    assert!(clean.status.is_ok());

    // Counts outside 0..=T are clamped: -3 -> 0 (no box: zeros), 9 -> 3
    // (the NaN padding rows become degenerate boxes, skipped).
    let r = reference::assign::<i64>(&c, shape, &priors, &boxes, &[1, 2, 1, 2, 1, 1], &[9, -3])
        .unwrap();
    assert!(
        r.status.count_clamped && r.status.degenerate_box,
        "{:?}",
        r.status
    );
    assert_eq!(&r.labels[..3000], &clean.labels[..3000]);
    assert!(r.labels[3000..].iter().all(|&l| l == 0));
    assert!(r.gt_locations[3000 * 4..].iter().all(|&v| v == 0.0));

    // A label >= C is copied and recorded, and so is a label below 1.
    let r = reference::assign::<i64>(&c, shape, &priors, &boxes, &labels, &[2, 1]).unwrap();
    assert!(
        r.status.invalid_box_label && !r.status.degenerate_box,
        "{:?}",
        r.status
    );
    assert!(r.labels.contains(&5));
    let r = reference::assign::<i64>(&c, shape, &priors, &boxes, &[0, 2, -7, 2, -7, -7], &[2, 1])
        .unwrap();
    assert!(r.status.invalid_box_label);
    // The priors of the box labelled 0 are neither background nor ignored:
    // they get INVALID_PRIOR_LABEL, which the loss refuses. The padding
    // row's label, -7, is never read.
    let invalid = r
        .labels
        .iter()
        .filter(|&&l| l == targets::INVALID_PRIOR_LABEL)
        .count();
    assert!(invalid > 0, "no prior of the box labelled 0 is marked");
    assert!(!r.labels.contains(&-7));
    let clean_matches = clean.labels[..shape.priors]
        .iter()
        .filter(|&&l| l == 1)
        .count();
    assert_eq!(
        invalid, clean_matches,
        "every prior of that box, and only those"
    );
    let loss_shape = multibox::Shape::new(shape.batch, shape.priors, 3);
    let confidence = vec![0.0f32; loss_shape.confidence_len()];
    let locations = vec![0.0f32; loss_shape.locations_len()];
    let loss = multibox::reference::forward_backward(
        &multibox::MultiboxConfig::default(),
        loss_shape,
        &multibox::reference::Inputs {
            confidence: &confidence,
            predicted_locations: &locations,
            labels: &r.labels,
            gt_locations: &locations,
        },
        Default::default(),
    );
    assert!(
        matches!(loss, Err(Error::InvalidLabel { value: -2, .. })),
        "{loss:?}"
    );

    // A degenerate box is skipped as if absent.
    let mut with_bad = boxes.clone();
    with_bad[4..8].copy_from_slice(&[0.5, 0.5, 0.5, 0.9]); // x1 == x0
    let r = reference::assign::<i64>(
        &c,
        shape,
        &priors,
        &with_bad,
        &[1, 2, -7, 2, -7, -7],
        &[2, 1],
    )
    .unwrap();
    assert!(r.status.degenerate_box);
    let only_first =
        reference::assign::<i64>(&c, shape, &priors, &boxes, &[1, 2, -7, 2, -7, -7], &[1, 1])
            .unwrap();
    assert_eq!(r.labels, only_first.labels);
    assert_eq!(r.gt_locations, only_first.gt_locations);
}

#[test]
fn c_abi_reference_and_priors_match_the_rust_api() {
    use multibox::capi::*;
    use std::ffi::c_void;
    let cases = load_target_cases_from(&committed_target_goldens_dir());
    let case = cases.iter().find(|c| !c.labels_i64).expect("an i32 case");
    let labels32: Vec<i32> = case.gt_labels_as();
    let mut out_labels = vec![0i32; case.shape.labels_len()];
    let mut out_loc = vec![0f32; case.shape.locations_len()];
    let call = multibox_target_host_call {
        shape: multibox_target_shape {
            batch: case.shape.batch,
            priors: case.shape.priors,
            max_boxes: case.shape.max_boxes,
        },
        label_type: multibox_label_type::MULTIBOX_I32 as i32,
        priors: case.priors.as_ptr(),
        priors_len: case.priors.len(),
        gt_boxes: case.gt_boxes.as_ptr(),
        gt_boxes_len: case.gt_boxes.len(),
        gt_labels: labels32.as_ptr().cast::<c_void>(),
        gt_labels_len: labels32.len(),
        gt_counts: case.gt_counts.as_ptr(),
        gt_counts_len: case.gt_counts.len(),
        labels: out_labels.as_mut_ptr().cast::<c_void>(),
        labels_len: out_labels.len(),
        gt_locations: out_loc.as_mut_ptr(),
        gt_locations_len: out_loc.len(),
    };
    let mut config = multibox_target_config {
        iou_threshold: 0.0,
        center_variance: 0.0,
        size_variance: 0.0,
        num_classes: 7,
    };
    // SAFETY: every pointer is a live local of the stated length.
    unsafe {
        assert_eq!(
            multibox_target_config_default(&mut config),
            multibox_status_code::MULTIBOX_OK
        );
        config.iou_threshold = case.config.iou_threshold;
        let mut status = multibox_target_status::default();
        assert_eq!(
            multibox_reference_assign_targets(&config, &call, &mut status),
            multibox_status_code::MULTIBOX_OK
        );
        assert!(!status.count_clamped && !status.invalid_box_label && !status.degenerate_box);
        let wide: Vec<i64> = out_labels.iter().map(|&l| i64::from(l)).collect();
        check_against(case, "C ABI reference", &wide, &out_loc);

        // A short output is refused before anything is written.
        let mut short = call;
        short.gt_locations_len -= 1;
        assert_eq!(
            multibox_reference_assign_targets(&config, &short, std::ptr::null_mut()),
            multibox_status_code::MULTIBOX_INVALID_ARGUMENT
        );
        let bad = multibox_target_config {
            iou_threshold: 2.0,
            ..config
        };
        assert_eq!(
            multibox_reference_assign_targets(&bad, &call, std::ptr::null_mut()),
            multibox_status_code::MULTIBOX_INVALID_ARGUMENT
        );

        let mut len = 0usize;
        assert_eq!(
            multibox_standard_priors(1, std::ptr::null_mut(), 0, &mut len),
            multibox_status_code::MULTIBOX_OK
        );
        assert_eq!(len, 8732 * 4);
        let mut p = vec![0f32; len];
        assert_eq!(
            multibox_standard_priors(1, p.as_mut_ptr(), p.len(), &mut len),
            multibox_status_code::MULTIBOX_OK
        );
        assert_eq!(p, priors::ssd300());
        assert_eq!(
            multibox_standard_priors(2, p.as_mut_ptr(), p.len(), &mut len),
            multibox_status_code::MULTIBOX_INVALID_ARGUMENT
        );
        let mut bytes = 0usize;
        assert_eq!(
            multibox_target_workspace_bytes(32, 8732, 100, &mut bytes),
            multibox_status_code::MULTIBOX_OK
        );
        assert_eq!(
            bytes,
            targets::plan::workspace_bytes(TargetShape::new(32, 8732, 100)).unwrap()
        );
        assert_eq!(
            multibox_target_workspace_bytes(0, 8732, 100, &mut bytes),
            multibox_status_code::MULTIBOX_INVALID_ARGUMENT
        );
    }
}
