//! Every golden case through every available backend, held to SPEC.md's
//! tolerances. Run with `-- --nocapture` to see one line per case and
//! backend with the largest errors found.

mod common;

use common::{
    check, emulated, gpu, list_cases, BackendResult, Case, CaseMeta, CaseVisitor, Report,
};
use half::f16;
use multibox::reference::{self, Upstream};
use multibox::{DType, Float, Label};

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
                    "skipped {:18} {name}: not available here",
                    case.meta.name
                )),
            })
            .collect()
    }
}

#[test]
fn every_golden_case_on_every_backend() {
    let cases = list_cases();
    assert!(
        !cases.is_empty(),
        "no golden case found in {}",
        common::golden::goldens_dir().display()
    );
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

fn case_named(name: &str) -> CaseMeta {
    list_cases()
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

    let scale = case
        .expected
        .grad_confidence
        .iter()
        .fold(0.0f32, |m, g| m.max(g.abs()));
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
