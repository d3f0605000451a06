//! Every golden case through every available backend, held to SPEC.md's
//! tolerances. Run with `-- --nocapture` to see one line per case and
//! backend with the largest errors found.

mod common;

use common::check::{max_abs, GRAD_HALF_GOLDEN_FLOOR};
use common::golden::Expected;
use common::{
    check, emulated, gpu, list_cases, BackendResult, Case, CaseMeta, CaseVisitor, Report,
};
use half::{bf16, f16};
use multibox::reference::{self, Upstream};
use multibox::{DType, Float, Label, Layout};
use multibox_emu::Arch;

/// A backend computes a case with upstream gradients 1.0, or returns `None`
/// when it is not available here (no GPU, ...), which is reported, not failed.
type Backend<T, L> = (&'static str, fn(&Case<T, L>) -> Option<BackendResult<T>>);

/// Every backend the goldens are checked against: add the emulated kernels
/// and the GPU here.
fn backends<T: Float, L: Label>() -> Vec<Backend<T, L>> {
    vec![
        ("cpu reference", cpu_reference::<T, L>),
        ("emulated kernels", emulated_kernels::<T, L>),
        ("gpu", on_gpu::<T, L>),
    ]
}

/// The kernels on the GPU, when there is one.
fn on_gpu<T: Float, L: Label>(case: &Case<T, L>) -> Option<BackendResult<T>> {
    let ctx = gpu::device(&format!("golden case {} on the gpu", case.meta.name))?;
    let inputs = emulated::HostInputs {
        confidence: &case.confidence,
        predicted_locations: &case.predicted_locations,
        labels: &case.labels,
        gt_locations: &case.gt_locations,
    };
    let out = gpu::run(
        &ctx,
        &case.meta.config,
        case.meta.shape,
        &inputs,
        emulated::Call::default(),
    )
    .unwrap_or_else(|e| panic!("case {}: the GPU failed: {e}", case.meta.name));
    Some(kernel_result("gpu", case, out))
}

/// The crate's CUDA kernels, run on the CPU by the emulator.
fn emulated_kernels<T: Float, L: Label>(case: &Case<T, L>) -> Option<BackendResult<T>> {
    if emulated::skipped() {
        return None;
    }
    let inputs = emulated::HostInputs {
        confidence: &case.confidence,
        predicted_locations: &case.predicted_locations,
        labels: &case.labels,
        gt_locations: &case.gt_locations,
    };
    let out = emulated::run(
        &case.meta.config,
        case.meta.shape,
        &inputs,
        emulated::Call::default(),
    )
    .unwrap_or_else(|e| panic!("case {}: the emulated kernels failed: {e}", case.meta.name));
    Some(kernel_result("emulated kernels", case, out))
}

/// What the kernels wrote, in the checker's form; their status must be clean.
fn kernel_result<T: Float, L: Label>(
    backend: &str,
    case: &Case<T, L>,
    out: emulated::KernelOutput<T>,
) -> BackendResult<T> {
    let name = &case.meta.name;
    assert!(
        out.status.is_ok(),
        "case {name} on {backend}: status {:?}",
        out.status
    );
    BackendResult {
        backend: backend.into(),
        regression_loss: f64::from(out.regression_loss),
        classification_loss: f64::from(out.classification_loss),
        num_pos: u64::try_from(out.num_pos).expect("num_pos >= 0"),
        mask: out.mask,
        grad_confidence: out.grad_confidence,
        grad_locations: out.grad_locations,
    }
}

fn cpu_reference<T: Float, L: Label>(case: &Case<T, L>) -> Option<BackendResult<T>> {
    let out = reference::forward_backward(
        &case.meta.config,
        case.meta.shape,
        &case.inputs(),
        Upstream::default(),
    )
    .unwrap_or_else(|e| panic!("case {}: the CPU reference refused it: {e}", case.meta.name));
    Some(BackendResult::from_reference("cpu reference", &out))
}

struct RunAllBackends;

impl CaseVisitor for RunAllBackends {
    type Output = Vec<Result<Report, String>>;
    fn visit<T: Float, L: Label>(self, case: &Case<T, L>) -> Self::Output {
        backends::<T, L>()
            .into_iter()
            .map(|(name, run)| match run(case) {
                Some(result) => Ok(check(case, &result)),
                None => Err(format!(
                    "skipped {:18} {name}: not run here (no GPU, or MULTIBOX_SKIP_EMULATOR=1)",
                    case.meta.name
                )),
            })
            .collect()
    }
}

#[test]
fn every_golden_case_on_every_backend() {
    let cases = list_cases();
    let mut reports = Vec::new();
    for meta in &cases {
        for outcome in meta.visit(RunAllBackends) {
            match outcome {
                Ok(report) => {
                    println!("{}", report.line());
                    reports.push(report);
                }
                Err(skipped) => println!("{skipped}"),
            }
        }
    }
    assert!(!reports.is_empty(), "no backend ran any golden case");

    let worst = |of: &dyn Fn(&Report) -> f64, among: &dyn Fn(&Report) -> bool| {
        reports
            .iter()
            .filter(|r| among(r))
            .max_by(|a, b| of(a).total_cmp(&of(b)))
            .map(|r| (of(r), r))
    };
    let any = |_: &Report| true;
    let is_f32 = |r: &Report| r.dtype == DType::F32;
    let is_half = |r: &Report| r.dtype != DType::F32;
    println!(
        "worst over {} runs of {} cases:",
        reports.len(),
        cases.len()
    );
    if let Some((err, r)) = worst(&|r| r.loss_rel_err(), &any) {
        println!(
            "  losses, relative error:                   {err:.2e} ({}, {})",
            r.case, r.backend
        );
    }
    if let Some((err, r)) = worst(&|r| r.grad_rel_to_max_err(), &is_f32) {
        println!(
            "  f32 gradients, max |err| / max |golden|:  {err:.2e} ({}, {})",
            r.case, r.backend
        );
    }
    if let Some((ulps, r)) = worst(&|r| f64::from(r.grad_max_ulps), &is_half) {
        println!(
            "  f16/bf16 gradients, ulps from golden:     {ulps} ({}, {})",
            r.case, r.backend
        );
    }

    let failures: Vec<&str> = reports
        .iter()
        .flat_map(|r| &r.failures)
        .map(String::as_str)
        .collect();
    assert!(
        failures.is_empty(),
        "{} golden check(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// A committed case: the checker's own test must not depend on
/// `$MULTIBOX_GOLDENS`.
fn case_named(name: &str) -> CaseMeta {
    common::golden::list_cases_in(&common::golden::committed_goldens_dir())
        .into_iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("golden case {name} not found"))
}

/// The checker must catch each kind of error, just past its tolerance, and
/// pass just inside it; its messages name case, backend, array and index.
#[test]
fn checker_catches_each_kind_of_error() {
    let case = case_named("ssdlite_voc_f32").load::<f32, i64>();
    let good = BackendResult::<f32>::from_reference("perturbed", &golden_reference(&case));
    assert!(
        check(&case, &good).passed(),
        "{:?}",
        check(&case, &good).failures
    );

    let failures = |edit: &dyn Fn(&mut BackendResult<f32>)| {
        let mut result = good.clone();
        edit(&mut result);
        check(&case, &result).failures
    };
    let loss = case.expected.classification_loss;
    assert!(failures(&|r| r.classification_loss = loss * (1.0 + 0.9e-6)).is_empty());
    let f = failures(&|r| r.classification_loss = loss * (1.0 + 1.1e-6));
    assert!(
        f.len() == 1 && f[0].contains("array classification_loss"),
        "{f:?}"
    );
    assert!(failures(&|r| r.regression_loss = f64::NAN).len() == 1);
    assert!(failures(&|r| r.num_pos += 1)[0].contains("array num_pos"));

    let row = case.expected.mask.iter().position(|&m| m == 0).unwrap();
    let f = failures(&|r| r.mask[row] = 1);
    assert_eq!(f.len(), 1);
    for part in [
        "case ssdlite_voc_f32",
        "backend perturbed",
        "array mask",
        &format!("index {row} "),
        "expected 0, got 1",
    ] {
        assert!(f[0].contains(part), "{:?} lacks {part:?}", f[0]);
    }

    // Exact: the largest |gradient| is an f32.
    let scale = max_abs(&case.expected.grad_confidence) as f32;
    let i = case
        .expected
        .grad_confidence
        .iter()
        .position(|&g| g != 0.0)
        .unwrap();
    assert!(failures(&|r| r.grad_confidence[i] += 0.9e-6 * scale).is_empty());
    let f = failures(&|r| r.grad_confidence[i] += 1.1e-6 * scale);
    assert!(
        f.len() == 1
            && f[0].contains("array grad_confidence")
            && f[0].contains(&format!("index {i} ")),
        "{f:?}"
    );
    assert_eq!(
        failures(&|r| r.grad_locations.pop().map_or((), drop)).len(),
        1
    );
    // Many mismatches: a few spelled out, the rest counted.
    let f = failures(&|r| r.grad_locations.iter_mut().for_each(|g| *g += 1.0));
    assert!(f.len() == 6 && f[5].contains("more mismatches"), "{f:?}");

    // f16: 1 ulp passes, 2 ulps fail.
    let case = case_named("ssdlite_voc_f16").load::<f16, i64>();
    let good = BackendResult::<f16>::from_reference("perturbed", &golden_reference(&case));
    let i = case
        .expected
        .grad_confidence
        .iter()
        .position(|&g| g > 0.01)
        .unwrap();
    let step = |ulps: u16| {
        let mut result = good.clone();
        let want = f16::from_f32(case.expected.grad_confidence[i]);
        result.grad_confidence[i] = f16::from_bits(want.to_bits() + ulps);
        check(&case, &result)
    };
    assert!(step(1).passed() && step(1).grad_max_ulps == 1);
    let report = step(2);
    assert!(
        report.failures.len() == 1 && report.failures[0].contains("2 ulp"),
        "{:?}",
        report.failures
    );

    // bf16: below the golden's own float64 rounding, ulps do not count
    // (a golden 0 against a true -exp(-50) / N); just above it, they do.
    let case = case_named("ssdlite_voc_bf16").load::<bf16, i64>();
    let good = BackendResult::<bf16>::from_reference("perturbed", &golden_reference(&case));
    let scale = max_abs(&case.expected.grad_confidence);
    let zero = case.expected.mask.iter().position(|&m| m == 0).unwrap() * case.meta.shape.classes;
    assert_eq!(case.expected.grad_confidence[zero], 0.0);
    let at = |fraction: f64| {
        let mut result = good.clone();
        result.grad_confidence[zero] = bf16::from_f64(-fraction * scale);
        check(&case, &result)
    };
    assert!(at(0.5 * GRAD_HALF_GOLDEN_FLOOR).passed());
    let report = at(2.0 * GRAD_HALF_GOLDEN_FLOOR);
    assert!(
        report.failures.len() == 1 && report.failures[0].contains(&format!("index {zero} ")),
        "{:?}",
        report.failures
    );
}

fn golden_reference<T: Float, L: Label>(case: &Case<T, L>) -> reference::Output {
    reference::forward_backward(
        &case.meta.config,
        case.meta.shape,
        &case.inputs(),
        Upstream::default(),
    )
    .unwrap()
}

/// The layouts and normalisers besides the goldens' own (row-major, by N).
fn variants() -> Vec<(Layout, emulated::Normalizer)> {
    use emulated::Normalizer::*;
    vec![
        (Layout::ChannelMajor, Positives),
        (Layout::RowMajor, Given(0.0)), // 0.0: replaced by a divisor per case
        (Layout::ChannelMajor, GivenOnDevice(0.0)),
        (Layout::RowMajor, PerImage),
        (Layout::ChannelMajor, PerImage),
    ]
}

/// A divisor unlike N: what a sum over other ranks' positives might be.
fn given_divisor(num_pos: u64) -> f32 {
    1.5 * num_pos as f32 + 0.75
}

struct RunVariants;

impl CaseVisitor for RunVariants {
    type Output = Vec<Report>;
    fn visit<T: Float, L: Label>(self, case: &Case<T, L>) -> Self::Output {
        let shape = case.meta.shape;
        let mut reports = Vec::new();
        let device = gpu::device(&format!(
            "golden case {} variants on the gpu",
            case.meta.name
        ));
        for (v, (layout, normalizer)) in (1u32..).zip(variants()) {
            let n = given_divisor(case.expected.num_pos);
            let normalizer = match normalizer {
                emulated::Normalizer::Given(_) => emulated::Normalizer::Given(n),
                emulated::Normalizer::GivenOnDevice(_) => emulated::Normalizer::GivenOnDevice(n),
                other => other,
            };
            let to =
                |data: &[T], per_prior| Layout::RowMajor.convert(data, shape, per_prior, layout);
            let (confidence, predicted_locations, gt_locations) = (
                to(&case.confidence, shape.classes),
                to(&case.predicted_locations, 4),
                to(&case.gt_locations, 4),
            );
            let options = reference::Options {
                layout,
                normalizer: normalizer.reference(),
            };
            let inputs = reference::Inputs {
                confidence: &confidence,
                predicted_locations: &predicted_locations,
                labels: &case.labels,
                gt_locations: &gt_locations,
            };
            let want = reference::forward_backward_with(
                &case.meta.config,
                shape,
                &inputs,
                Upstream::default(),
                &options,
            )
            .unwrap();
            let name = format!("{} {layout:?} {normalizer:?}", case.meta.name);
            // The reference agrees with what the golden implies: the mined
            // set always, and under a given n the losses N / n times the golden's.
            assert_eq!(want.mask, case.expected.mask, "{name}");
            if let (emulated::Normalizer::Given(_), true) = (normalizer, case.expected.num_pos > 0)
            {
                let factor = case.expected.num_pos as f64 / f64::from(n);
                for (got, golden) in [
                    (want.losses.regression_loss, case.expected.regression_loss),
                    (
                        want.losses.classification_loss,
                        case.expected.classification_loss,
                    ),
                ] {
                    assert!(
                        (got - golden * factor).abs() <= 1e-6 * (golden * factor).abs(),
                        "{name}"
                    );
                }
            }
            let mut meta = case.meta.clone();
            meta.name.clone_from(&name);
            let variant = Case {
                meta,
                confidence: confidence.clone(),
                predicted_locations: predicted_locations.clone(),
                labels: case.labels.clone(),
                gt_locations: gt_locations.clone(),
                expected: Expected {
                    regression_loss: want.losses.regression_loss,
                    classification_loss: want.losses.classification_loss,
                    num_pos: want.losses.num_pos,
                    mask: want.mask.clone(),
                    grad_confidence: want.grad_confidence_as::<f32>(),
                    grad_locations: want.grad_locations_as::<f32>(),
                },
            };
            let host = emulated::HostInputs {
                confidence: &confidence,
                predicted_locations: &predicted_locations,
                labels: &case.labels,
                gt_locations: &gt_locations,
            };
            // The split form too: the backward must find the forward's
            // divisor. It runs each launch's blocks last to first (a GPU
            // promises no order), the fused form first to last. And it
            // runs the kernels as sm_90 does (the fused form as sm_75),
            // computing exp and log as a GPU's math library may (a seed per
            // variant): the mined set and the tolerances must not hang on
            // the host's more accurate results.
            for split in [false, true] {
                let call = emulated::Call {
                    layout,
                    normalizer,
                    split,
                    reverse_blocks: split,
                    device_math: split.then_some(v),
                    arch: if split { Arch::Sm90 } else { Arch::Sm75 },
                    ..Default::default()
                };
                if !emulated::skipped() {
                    let out = emulated::run(&case.meta.config, shape, &host, call)
                        .unwrap_or_else(|e| panic!("{name}: the emulated kernels failed: {e}"));
                    reports.push(check(
                        &variant,
                        &kernel_result("emulated kernels", &variant, out),
                    ));
                }
                if let Some(ctx) = &device {
                    let out = gpu::run(ctx, &case.meta.config, shape, &host, call)
                        .unwrap_or_else(|e| panic!("{name}: the GPU failed: {e}"));
                    reports.push(check(&variant, &kernel_result("gpu", &variant, out)));
                }
            }
        }
        reports
    }
}

/// Every golden case in the other layout and under the other normalisers,
/// on the emulated kernels (and the GPU, when there is one), against the
/// CPU reference on the same inputs
/// (which is held to the goldens above, and here to the mined set and the
/// N / n scaling the goldens imply).
#[test]
fn every_golden_case_in_each_layout_and_normaliser() {
    let cases = list_cases();
    let mut reports = Vec::new();
    for meta in &cases {
        reports.extend(meta.visit(RunVariants));
    }
    let backends =
        usize::from(!emulated::skipped()) + usize::from(gpu::device("golden variants").is_some());
    if backends == 0 {
        eprintln!(
            "golden variants: no kernels ran (MULTIBOX_SKIP_EMULATOR=1 and no GPU); \
             only the CPU reference was checked"
        );
    }
    assert_eq!(reports.len(), cases.len() * variants().len() * 2 * backends);
    let worst_loss = reports.iter().map(Report::loss_rel_err).fold(0.0, f64::max);
    println!(
        "{} runs of {} cases: worst loss relative error {worst_loss:.2e}",
        reports.len(),
        cases.len()
    );
    let failures: Vec<&str> = reports
        .iter()
        .flat_map(|r| &r.failures)
        .map(String::as_str)
        .collect();
    assert!(
        failures.is_empty(),
        "{} check(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
