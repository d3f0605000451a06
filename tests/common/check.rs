//! Holding any backend's results to a golden case, with SPEC.md's tolerances.

use half::{bf16, f16};
use multibox::reference::Output;
use multibox::{DType, Float, Label};

use super::golden::Case;

/// Losses: relative error (absolute where the expected loss is 0).
pub const LOSS_REL_TOL: f64 = 1e-6;
/// f32 gradients: max |error| relative to max |golden gradient|.
pub const GRAD_F32_REL_TOL: f64 = 1e-6;
/// f16 / bf16 gradients: ulps of `T` from the golden value rounded to `T`.
pub const GRAD_HALF_ULP_TOL: u32 = 1;
/// f16 / bf16 gradients: an error this small, relative to max |golden
/// gradient|, passes whatever its ulps. The golden is float64, not exact: a
/// positive's own-class gradient `softmax - 1` cancels there, leaving up to
/// about |logsumexp| * 2^-52 of the scale (1e-14 for logits in the
/// hundreds). Where the true value is smaller than that (a confident row,
/// `-exp(-50)` say), the golden holds 0 or a multiple of 2^-53 while the
/// kernels, which sum the other classes apart, hold the true value: bf16's
/// range counts thousands of ulps between them. The floor sits a hundred
/// times above the golden's rounding and a million times below f32's
/// tolerance, so no error a bf16 or f16 gradient can show at the scale of
/// the loss hides under it.
pub const GRAD_HALF_GOLDEN_FLOOR: f64 = 1e-12;
/// Mismatches spelled out per array; the rest are counted.
const MAX_MESSAGES_PER_ARRAY: usize = 5;

/// What one backend produced for a case, in the form the kernels write it:
/// losses (widened to f64), `num_pos`, the mask and the gradients in `T`.
#[derive(Debug, Clone)]
pub struct BackendResult<T: Float> {
    /// The backend's name, for messages (`cpu reference`, `gpu`, ...).
    pub backend: String,
    /// The regression loss.
    pub regression_loss: f64,
    /// The classification loss.
    pub classification_loss: f64,
    /// `N`.
    pub num_pos: u64,
    /// `[B, P]`, 1 = in the classification set.
    pub mask: Vec<u8>,
    /// `[B, P, C]`, with upstream gradients 1.0.
    pub grad_confidence: Vec<T>,
    /// `[B, P, 4]`, with upstream gradients 1.0.
    pub grad_locations: Vec<T>,
}

impl<T: Float> BackendResult<T> {
    /// The CPU reference's output, its f64 gradients rounded once to `T`.
    pub fn from_reference(backend: &str, out: &Output) -> Self {
        Self {
            backend: backend.to_string(),
            regression_loss: out.losses.regression_loss,
            classification_loss: out.losses.classification_loss,
            num_pos: out.losses.num_pos,
            mask: out.mask.clone(),
            grad_confidence: out.grad_confidence_as::<T>(),
            grad_locations: out.grad_locations_as::<T>(),
        }
    }
}

/// The largest errors found for one (case, backend), and every tolerance violated.
#[derive(Debug, Clone)]
pub struct Report {
    /// Case name.
    pub case: String,
    /// Backend name.
    pub backend: String,
    /// The case's input type.
    pub dtype: DType,
    /// Relative error of the regression loss (absolute if the expected loss is 0).
    pub regression_rel_err: f64,
    /// Relative error of the classification loss (absolute if the expected loss is 0).
    pub classification_rel_err: f64,
    /// max |got - golden| over the confidence gradient (golden rounded to `T`
    /// for f16 / bf16).
    pub grad_confidence_max_abs_err: f64,
    /// max |golden| over the confidence gradient (the scale of the f32 tolerance).
    pub grad_confidence_scale: f64,
    /// max |got - golden| over the location gradient (golden rounded to `T`
    /// for f16 / bf16).
    pub grad_locations_max_abs_err: f64,
    /// max |golden| over the location gradient.
    pub grad_locations_scale: f64,
    /// f16 / bf16: the most ulps of `T` between got and golden-rounded-to-`T` (0 for f32).
    pub grad_max_ulps: u32,
    /// One message per violation: case, backend, array, index, expected, got.
    pub failures: Vec<String>,
}

impl Report {
    /// Whether every check passed.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    /// The largest loss relative error.
    pub fn loss_rel_err(&self) -> f64 {
        nan_max(self.regression_rel_err, self.classification_rel_err)
    }

    /// The largest gradient error relative to its array's max |golden| (0 where that is 0).
    pub fn grad_rel_to_max_err(&self) -> f64 {
        let rel = |err: f64, scale: f64| if scale > 0.0 { err / scale } else { err };
        nan_max(
            rel(self.grad_confidence_max_abs_err, self.grad_confidence_scale),
            rel(self.grad_locations_max_abs_err, self.grad_locations_scale),
        )
    }

    /// One line for the test log.
    pub fn line(&self) -> String {
        let verdict = if self.passed() { "ok" } else { "FAILED" };
        let ulps = match self.dtype {
            DType::F32 => String::new(),
            DType::F16 | DType::BF16 => format!(", max {} ulp", self.grad_max_ulps),
        };
        format!(
            "{verdict:6} {:18} {:4} {:14} loss rel err reg {:.2e} cls {:.2e} | grad max abs err conf {:.2e} loc {:.2e} \
             (rel to max {:.2e}{ulps})",
            self.case,
            self.dtype.name(),
            self.backend,
            self.regression_rel_err,
            self.classification_rel_err,
            self.grad_confidence_max_abs_err,
            self.grad_locations_max_abs_err,
            self.grad_rel_to_max_err(),
        )
    }
}

/// `err <= tol`, false for a NaN error.
fn within(err: f64, tol: f64) -> bool {
    matches!(
        err.partial_cmp(&tol),
        Some(std::cmp::Ordering::Less | std::cmp::Ordering::Equal)
    )
}

/// A max that keeps NaN (a NaN error must not hide).
fn nan_max(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

/// Compares `got` to the case's expectations with SPEC.md's tolerances.
/// Never panics on a mismatch: the report lists them all.
pub fn check<T: Float, L: Label>(case: &Case<T, L>, got: &BackendResult<T>) -> Report {
    let exp = &case.expected;
    let shape = case.meta.shape;
    let mut report = Report {
        case: case.meta.name.clone(),
        backend: got.backend.clone(),
        dtype: T::DTYPE,
        regression_rel_err: loss_rel_err(exp.regression_loss, got.regression_loss),
        classification_rel_err: loss_rel_err(exp.classification_loss, got.classification_loss),
        grad_confidence_max_abs_err: 0.0,
        grad_confidence_scale: 0.0,
        grad_locations_max_abs_err: 0.0,
        grad_locations_scale: 0.0,
        grad_max_ulps: 0,
        failures: Vec::new(),
    };
    let prefix = format!("case {}, backend {}", report.case, report.backend);

    for (array, expected, value, err) in [
        (
            "regression_loss",
            exp.regression_loss,
            got.regression_loss,
            report.regression_rel_err,
        ),
        (
            "classification_loss",
            exp.classification_loss,
            got.classification_loss,
            report.classification_rel_err,
        ),
    ] {
        if !within(err, LOSS_REL_TOL) {
            report.failures.push(format!(
                "{prefix}, array {array}, index 0: expected {expected:.17e}, got {value:.17e} \
                 (relative error {err:.3e} > {LOSS_REL_TOL:e})"
            ));
        }
    }
    if got.num_pos != exp.num_pos {
        report.failures.push(format!(
            "{prefix}, array num_pos, index 0: expected {}, got {}",
            exp.num_pos, got.num_pos
        ));
    }

    let row_index = |i: usize| {
        format!(
            "{i} (image {}, prior {})",
            i / shape.priors,
            i % shape.priors
        )
    };
    let mut mismatches = Mismatches::new(&prefix, "mask");
    if got.mask.len() != exp.mask.len() {
        mismatches.length(exp.mask.len(), got.mask.len());
    } else {
        for (i, (&e, &g)) in exp.mask.iter().zip(&got.mask).enumerate() {
            if e != g {
                mismatches.push(|| format!("index {}: expected {e}, got {g}", row_index(i)));
            }
        }
    }
    report.failures.extend(mismatches.finish());

    let classes = shape.classes;
    let conf_index = move |i: usize| {
        format!(
            "{i} (image {}, prior {}, class {})",
            i / classes / shape.priors,
            i / classes % shape.priors,
            i % classes
        )
    };
    let loc_index = move |i: usize| {
        format!(
            "{i} (image {}, prior {}, coord {})",
            i / 4 / shape.priors,
            i / 4 % shape.priors,
            i % 4
        )
    };
    let conf = check_grad(
        &prefix,
        "grad_confidence",
        &exp.grad_confidence,
        &got.grad_confidence,
        &conf_index,
    );
    let loc = check_grad(
        &prefix,
        "grad_locations",
        &exp.grad_locations,
        &got.grad_locations,
        &loc_index,
    );
    report.grad_confidence_max_abs_err = conf.max_abs_err;
    report.grad_confidence_scale = conf.scale;
    report.grad_locations_max_abs_err = loc.max_abs_err;
    report.grad_locations_scale = loc.scale;
    report.grad_max_ulps = conf.max_ulps.max(loc.max_ulps);
    report.failures.extend(conf.failures);
    report.failures.extend(loc.failures);
    report
}

fn loss_rel_err(expected: f64, got: f64) -> f64 {
    if expected == 0.0 {
        got.abs()
    } else {
        (got - expected).abs() / expected.abs()
    }
}

struct GradCheck {
    max_abs_err: f64,
    scale: f64,
    max_ulps: u32,
    failures: Vec<String>,
}

/// max |v|: the scale the gradient tolerances are relative to.
pub fn max_abs(values: &[f32]) -> f64 {
    values
        .iter()
        .fold(0.0f64, |m, &v| m.max(f64::from(v).abs()))
}

/// f32: max |err| <= 1e-6 * max |golden|. f16 / bf16: within 1 ulp of the
/// golden value rounded to `T`, or within the golden's own float64 rounding
/// ([`GRAD_HALF_GOLDEN_FLOOR`]).
fn check_grad<T: Float>(
    prefix: &str,
    array: &str,
    expected: &[f32],
    got: &[T],
    index: &dyn Fn(usize) -> String,
) -> GradCheck {
    let scale = max_abs(expected);
    let mut result = GradCheck {
        max_abs_err: 0.0,
        scale,
        max_ulps: 0,
        failures: Vec::new(),
    };
    let mut mismatches = Mismatches::new(prefix, array);
    if got.len() != expected.len() {
        mismatches.length(expected.len(), got.len());
        result.failures = mismatches.finish();
        return result;
    }
    let tol = GRAD_F32_REL_TOL * scale;
    for (i, (&e, &g)) in expected.iter().zip(got).enumerate() {
        let g32 = g.to_f32();
        // For f16 / bf16 the error is measured from the golden value rounded
        // to `T`, so that it shows the backend's error, not `T`'s rounding.
        let reference = T::from_f32(e).to_f32();
        let err = (f64::from(g32) - f64::from(reference)).abs();
        result.max_abs_err = nan_max(result.max_abs_err, err);
        match T::DTYPE {
            DType::F32 => {
                if !within(err, tol) {
                    mismatches.push(|| {
                        format!("index {}: expected {e:e}, got {g32:e} (|error| {err:.3e} > tolerance {tol:.3e} = 1e-6 * {scale:.3e})", index(i))
                    });
                }
            }
            DType::F16 | DType::BF16 => {
                let want = T::from_f32(e);
                let ulps = ulp_distance::<T>(want, g);
                let below_golden_rounding = within(
                    (f64::from(g32) - f64::from(e)).abs(),
                    GRAD_HALF_GOLDEN_FLOOR * scale,
                );
                if !below_golden_rounding {
                    result.max_ulps = result.max_ulps.max(ulps.unwrap_or(u32::MAX));
                }
                if !below_golden_rounding && ulps.is_none_or(|u| u > GRAD_HALF_ULP_TOL) {
                    let shown = ulps.map_or_else(|| "NaN".to_string(), |u| u.to_string());
                    mismatches.push(|| {
                        format!(
                            "index {}: expected {e:e} (as {}: {:e}), got {g32:e} ({shown} ulp > {GRAD_HALF_ULP_TOL})",
                            index(i),
                            T::DTYPE.name(),
                            want.to_f32()
                        )
                    });
                }
            }
        }
    }
    result.failures = mismatches.finish();
    result
}

/// Ulps between two 16-bit floats, counted on their bit patterns (±0 are 0
/// apart); `None` if either is NaN. Only for f16 / bf16.
pub fn ulp_distance<T: Float>(a: T, b: T) -> Option<u32> {
    let bits = |x: T| -> Option<u16> {
        let v = x.to_f32();
        if v.is_nan() {
            return None;
        }
        // Exact: `v` is a T value.
        match T::DTYPE {
            DType::F16 => Some(f16::from_f32(v).to_bits()),
            DType::BF16 => Some(bf16::from_f32(v).to_bits()),
            DType::F32 => panic!("ulp_distance is for 16-bit types"),
        }
    };
    // Sign-magnitude to a monotonic integer line.
    let ordered = |b: u16| {
        if b & 0x8000 != 0 {
            -i32::from(b & 0x7fff)
        } else {
            i32::from(b)
        }
    };
    Some(ordered(bits(a)?).abs_diff(ordered(bits(b)?)))
}

/// Collects an array's mismatches: the first few spelled out, the rest counted.
struct Mismatches {
    prefix: String,
    messages: Vec<String>,
    count: usize,
}

impl Mismatches {
    fn new(prefix: &str, array: &str) -> Self {
        Self {
            prefix: format!("{prefix}, array {array}"),
            messages: Vec::new(),
            count: 0,
        }
    }

    fn push(&mut self, message: impl FnOnce() -> String) {
        self.count += 1;
        if self.messages.len() < MAX_MESSAGES_PER_ARRAY {
            self.messages
                .push(format!("{}, {}", self.prefix, message()));
        }
    }

    fn length(&mut self, expected: usize, got: usize) {
        self.push(|| format!("length: expected {expected} elements, got {got}"));
    }

    fn finish(mut self) -> Vec<String> {
        if self.count > self.messages.len() {
            self.messages.push(format!(
                "{}: {} more mismatches",
                self.prefix,
                self.count - self.messages.len()
            ));
        }
        self.messages
    }
}
