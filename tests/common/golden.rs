//! Loading the golden cases of `tests/goldens/` (format: its README.md).

use std::path::{Path, PathBuf};

use half::{bf16, f16};
use multibox::{DType, Float, Label, LabelType, MultiboxConfig, Shape};
use serde_json::Value;

/// The folder of golden cases: `$MULTIBOX_GOLDENS` if set, else `tests/goldens/`.
pub fn goldens_dir() -> PathBuf {
    match std::env::var_os("MULTIBOX_GOLDENS") {
        Some(dir) => PathBuf::from(dir),
        None => committed_goldens_dir(),
    }
}

/// `tests/goldens/`, whatever the environment says.
pub fn committed_goldens_dir() -> PathBuf {
    super::repo_root().join("tests").join("goldens")
}

/// Python's `json` module writes `NaN`, `Infinity` and `-Infinity`, which
/// JSON has not (`no_positives_f32` records the reference's NaN losses that
/// way): outside strings they become `null`, which the loader never needs.
fn python_json_to_json(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut in_string = false;
    while let Some(c) = rest.chars().next() {
        if !in_string {
            if let Some(token) = ["NaN", "Infinity", "-Infinity"]
                .into_iter()
                .find(|t| rest.starts_with(t))
            {
                out.push_str("null");
                rest = &rest[token.len()..];
                continue;
            }
        }
        match c {
            '"' => in_string = !in_string,
            '\\' if in_string => {
                // Copy the escaped character too, so that `\"` does not end the string.
                out.push(c);
                rest = &rest[1..];
                let Some(next) = rest.chars().next() else {
                    break;
                };
                out.push(next);
                rest = &rest[next.len_utf8()..];
                continue;
            }
            _ => {}
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// A case's `case.json`, before its arrays are read.
#[derive(Debug, Clone)]
pub struct CaseMeta {
    /// The case's name (its folder's name).
    pub name: String,
    /// Its folder.
    pub dir: PathBuf,
    /// `B`, `P`, `C`.
    pub shape: Shape,
    /// `neg_pos_ratio` from the case; `beta` and `min_negatives_per_image`
    /// if the case gives them, else the defaults.
    pub config: MultiboxConfig,
    /// The input dtype.
    pub dtype: DType,
    /// The label type.
    pub label_type: LabelType,
    /// Whether background losses tie at the mining boundary.
    pub ties_broken_by_lower_prior_index: bool,
    /// What the case is about.
    pub note: String,
    json: Value,
}

/// Every case under [`goldens_dir`], sorted by name. Panics with the
/// folder's name when a case cannot be read, and when there is no case at
/// all (a test that checks nothing must not pass); names each subfolder
/// without a `case.json` on stderr (a half-copied folder must not run fewer
/// cases quietly).
pub fn list_cases() -> Vec<CaseMeta> {
    list_cases_in(&goldens_dir())
}

/// Every case under `dir` (see [`list_cases`]).
pub fn list_cases_in(dir: &Path) -> Vec<CaseMeta> {
    let entries = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read golden folder {}: {e}", dir.display()));
    let mut cases: Vec<CaseMeta> = entries
        .map(|e| {
            e.unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
                .path()
        })
        .filter(|p| p.is_dir() && has_case_json(p))
        .map(|p| CaseMeta::read(&p))
        .collect();
    assert!(
        !cases.is_empty(),
        "no golden case found in {}",
        dir.display()
    );
    cases.sort_by(|a, b| a.name.cmp(&b.name));
    cases
}

/// Whether the folder `dir` holds a case; says so on stderr where it does not.
pub fn has_case_json(dir: &Path) -> bool {
    let found = dir.join("case.json").is_file();
    if !found {
        eprintln!("skipping {}: no case.json in it", dir.display());
    }
    found
}

impl CaseMeta {
    /// Reads `dir/case.json`.
    pub fn read(dir: &Path) -> Self {
        let path = dir.join("case.json");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let json: Value = serde_json::from_str(&python_json_to_json(&text))
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let field = |key: &str| {
            json.get(key)
                .unwrap_or_else(|| panic!("{}: no `{key}`", path.display()))
        };
        let uint = |key: &str| {
            field(key)
                .as_u64()
                .unwrap_or_else(|| panic!("{}: `{key}` is not an unsigned integer", path.display()))
                as usize
        };
        let text_of = |key: &str| {
            field(key)
                .as_str()
                .unwrap_or_else(|| panic!("{}: `{key}` is not a string", path.display()))
                .to_string()
        };
        let shape = Shape::new(uint("batch"), uint("priors"), uint("classes"));
        let mut config = MultiboxConfig {
            neg_pos_ratio: field("neg_pos_ratio")
                .as_f64()
                .expect("neg_pos_ratio is a number") as f32,
            ..MultiboxConfig::default()
        };
        if let Some(beta) = json.get("beta").and_then(Value::as_f64) {
            config.beta = beta as f32;
        }
        if let Some(min_neg) = json.get("min_negatives_per_image").and_then(Value::as_u64) {
            config.min_negatives_per_image =
                u32::try_from(min_neg).expect("min_negatives_per_image fits in u32");
        }
        let dtype = match text_of("input_dtype").as_str() {
            "f32" => DType::F32,
            "f16" => DType::F16,
            "bf16" => DType::BF16,
            other => panic!("{}: unknown input_dtype {other:?}", path.display()),
        };
        let label_type = match text_of("label_dtype").as_str() {
            "i32" => LabelType::I32,
            "i64" => LabelType::I64,
            other => panic!("{}: unknown label_dtype {other:?}", path.display()),
        };
        let name = json
            .get("name")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| {
                dir.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            });
        Self {
            name,
            dir: dir.to_path_buf(),
            shape,
            config,
            dtype,
            label_type,
            ties_broken_by_lower_prior_index: field("ties_broken_by_lower_prior_index")
                .as_bool()
                .unwrap_or(false),
            note: json
                .get("note")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            json,
        }
    }

    /// Loads the arrays as `T` inputs and `L` labels. Panics if `T`/`L` are
    /// not the case's types, or if a stored input is not exactly a `T`.
    pub fn load<T: Float, L: Label>(&self) -> Case<T, L> {
        assert_eq!(
            T::DTYPE,
            self.dtype,
            "case {}: loaded with the wrong input type",
            self.name
        );
        assert_eq!(
            L::LABEL_TYPE,
            self.label_type,
            "case {}: loaded with the wrong label type",
            self.name
        );
        let s = self.shape;
        let conf_shape = [s.batch, s.priors, s.classes];
        let loc_shape = [s.batch, s.priors, 4];
        let row_shape = [s.batch, s.priors];
        let labels = match self.label_type {
            LabelType::I64 => self.read_array("labels", "int64", &row_shape, 8, |b| {
                i64::from_le_bytes(b.try_into().unwrap())
            }),
            LabelType::I32 => self.read_array("labels", "int32", &row_shape, 4, |b| {
                i64::from(i32::from_le_bytes(b.try_into().unwrap()))
            }),
        };
        Case {
            confidence: self.read_inputs("confidence", &conf_shape),
            predicted_locations: self.read_inputs("locations", &loc_shape),
            labels: labels.into_iter().map(L::from_i64).collect(),
            gt_locations: self.read_inputs("gt_locations", &loc_shape),
            expected: Expected {
                regression_loss: self.number("regression_loss"),
                classification_loss: self.number("classification_loss"),
                num_pos: self.number("num_pos") as u64,
                mask: self.read_array("mask", "uint8", &row_shape, 1, |b| b[0]),
                grad_confidence: self.read_f32("grad_confidence", &conf_shape),
                grad_locations: self.read_f32("grad_locations", &loc_shape),
            },
            meta: self.clone(),
        }
    }

    /// Loads the case with its own `(T, L)` and hands it to `visitor`.
    pub fn visit<V: CaseVisitor>(&self, visitor: V) -> V::Output {
        match (self.dtype, self.label_type) {
            (DType::F32, LabelType::I64) => visitor.visit(&self.load::<f32, i64>()),
            (DType::F32, LabelType::I32) => visitor.visit(&self.load::<f32, i32>()),
            (DType::F16, LabelType::I64) => visitor.visit(&self.load::<f16, i64>()),
            (DType::F16, LabelType::I32) => visitor.visit(&self.load::<f16, i32>()),
            (DType::BF16, LabelType::I64) => visitor.visit(&self.load::<bf16, i64>()),
            (DType::BF16, LabelType::I32) => visitor.visit(&self.load::<bf16, i32>()),
        }
    }

    fn number(&self, key: &str) -> f64 {
        self.json
            .get(key)
            .and_then(Value::as_f64)
            .unwrap_or_else(|| panic!("case {}: `{key}` is not a number", self.name))
    }

    fn read_f32(&self, array: &str, shape: &[usize]) -> Vec<f32> {
        self.read_array(array, "float32", shape, 4, |b| {
            f32::from_le_bytes(b.try_into().unwrap())
        })
    }

    fn read_inputs<T: Float>(&self, array: &str, shape: &[usize]) -> Vec<T> {
        let values = self.read_f32(array, shape);
        values
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let t = T::from_f32(v);
                let back = t.to_f32();
                assert!(
                    back.to_bits() == v.to_bits() || (back.is_nan() && v.is_nan()),
                    "case {}: {array}[{i}] = {v:e} is not exactly a {:?} (rounds to {back:e})",
                    self.name,
                    T::DTYPE
                );
                t
            })
            .collect()
    }

    /// Reads `<array>.bin`, checking `files.<array>` in case.json and the byte count.
    fn read_array<E>(
        &self,
        array: &str,
        dtype: &str,
        shape: &[usize],
        size: usize,
        decode: impl Fn(&[u8]) -> E,
    ) -> Vec<E> {
        let file = self.json.get("files").and_then(|f| f.get(array));
        if let Some(file) = file {
            let stored_dtype = file.get("dtype").and_then(Value::as_str);
            assert_eq!(
                stored_dtype,
                Some(dtype),
                "case {}: {array}.bin has dtype {stored_dtype:?}",
                self.name
            );
            let stored_shape: Option<Vec<usize>> =
                file.get("shape").and_then(Value::as_array).map(|dims| {
                    dims.iter()
                        .map(|d| d.as_u64().unwrap_or(u64::MAX) as usize)
                        .collect()
                });
            assert_eq!(
                stored_shape.as_deref(),
                Some(shape),
                "case {}: {array}.bin has the wrong shape",
                self.name
            );
        }
        let path = self.dir.join(format!("{array}.bin"));
        let bytes =
            std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let count: usize = shape.iter().product();
        assert_eq!(
            bytes.len(),
            count * size,
            "{}: {} bytes, shape {shape:?} of {dtype} needs {}",
            path.display(),
            bytes.len(),
            count * size
        );
        bytes.chunks_exact(size).map(decode).collect()
    }
}

/// One golden case, its inputs in the case's types.
#[derive(Debug, Clone)]
pub struct Case<T: Float, L: Label> {
    /// What case.json says.
    pub meta: CaseMeta,
    /// `[B, P, C]`.
    pub confidence: Vec<T>,
    /// `[B, P, 4]`.
    pub predicted_locations: Vec<T>,
    /// `[B, P]`.
    pub labels: Vec<L>,
    /// `[B, P, 4]`.
    pub gt_locations: Vec<T>,
    /// What every backend must produce.
    pub expected: Expected,
}

impl<T: Float, L: Label> Case<T, L> {
    /// The inputs as the reference takes them.
    pub fn inputs(&self) -> multibox::reference::Inputs<'_, T, L> {
        multibox::reference::Inputs {
            confidence: &self.confidence,
            predicted_locations: &self.predicted_locations,
            labels: &self.labels,
            gt_locations: &self.gt_locations,
        }
    }
}

/// The expected results of a golden case (upstream gradients 1.0).
#[derive(Debug, Clone)]
pub struct Expected {
    /// In f64.
    pub regression_loss: f64,
    /// In f64.
    pub classification_loss: f64,
    /// `N`.
    pub num_pos: u64,
    /// `[B, P]`, 1 = in the classification set.
    pub mask: Vec<u8>,
    /// `[B, P, C]`, the f64 gradient rounded to f32.
    pub grad_confidence: Vec<f32>,
    /// `[B, P, 4]`, the f64 gradient rounded to f32.
    pub grad_locations: Vec<f32>,
}

/// Something to do with a case whatever its `(T, L)`: the generic body that
/// [`CaseMeta::visit`] instantiates for the case's types.
pub trait CaseVisitor {
    /// What the visit returns.
    type Output;
    /// Runs on the loaded case.
    fn visit<T: Float, L: Label>(self, case: &Case<T, L>) -> Self::Output;
}
