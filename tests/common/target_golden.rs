//! Loading the target-assignment goldens of `tests/goldens-targets/`
//! (format: its README.md), and holding an output to SPEC.md's tolerances.

use std::path::{Path, PathBuf};

use multibox::targets::{reference, TargetConfig, TargetShape, TargetStatus};
use serde_json::Value;

/// `$MULTIBOX_TARGET_GOLDENS` if set, else `tests/goldens-targets/`.
pub fn target_goldens_dir() -> PathBuf {
    match std::env::var_os("MULTIBOX_TARGET_GOLDENS") {
        Some(dir) => PathBuf::from(dir),
        None => committed_target_goldens_dir(),
    }
}

/// `tests/goldens-targets/`, whatever the environment says.
pub fn committed_target_goldens_dir() -> PathBuf {
    super::repo_root().join("tests").join("goldens-targets")
}

/// One case, its arrays read.
#[derive(Debug, Clone)]
pub struct TargetCase {
    pub name: String,
    pub shape: TargetShape,
    pub config: TargetConfig,
    /// true: i64 labels; false: i32.
    pub labels_i64: bool,
    pub priors: Vec<f32>,
    pub gt_boxes: Vec<f32>,
    /// Box labels widened to i64.
    pub gt_labels: Vec<i64>,
    pub gt_counts: Vec<i32>,
    pub labels: Vec<i64>,
    pub gt_locations: Vec<f32>,
}

impl TargetCase {
    /// The CPU reference on this case, in its label type: labels (widened),
    /// offsets and status word.
    pub fn run_reference(&self) -> (Vec<i64>, Vec<f32>, TargetStatus) {
        fn run<L: multibox::Label>(case: &TargetCase) -> (Vec<i64>, Vec<f32>, TargetStatus) {
            let out = reference::assign::<L>(
                &case.config,
                case.shape,
                &case.priors,
                &case.gt_boxes,
                &case.gt_labels_as::<L>(),
                &case.gt_counts,
            )
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
            (
                out.labels.iter().map(|l| l.to_i64()).collect(),
                out.gt_locations,
                out.status,
            )
        }
        if self.labels_i64 {
            run::<i64>(self)
        } else {
            run::<i32>(self)
        }
    }

    pub fn gt_labels_as<L: multibox::Label>(&self) -> Vec<L> {
        self.gt_labels.iter().map(|&l| L::from_i64(l)).collect()
    }
}

fn read(dir: &Path, file: &str) -> Vec<u8> {
    std::fs::read(dir.join(file)).unwrap_or_else(|e| panic!("{}/{file}: {e}", dir.display()))
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn ints(bytes: &[u8], i64s: bool) -> Vec<i64> {
    if i64s {
        bytes
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    } else {
        bytes
            .chunks_exact(4)
            .map(|c| i64::from(i32::from_le_bytes(c.try_into().unwrap())))
            .collect()
    }
}

/// Every case of the folder, in `cases.json` order if there is one, else
/// every subfolder with a `case.json`. Panics when none is found: a test
/// that checks nothing must not pass.
pub fn load_target_cases() -> Vec<TargetCase> {
    load_target_cases_from(&target_goldens_dir())
}

/// Every case of `dir` (see [`load_target_cases`]).
pub fn load_target_cases_from(dir: &Path) -> Vec<TargetCase> {
    let dir = dir.to_path_buf();
    let names: Vec<String> = match std::fs::read_to_string(dir.join("cases.json")) {
        Ok(text) => serde_json::from_str(&text).expect("cases.json is a list of names"),
        Err(_) => {
            let mut names: Vec<String> = std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .map(|e| e.unwrap_or_else(|e| panic!("reading {}: {e}", dir.display())))
                .filter(|e| e.path().is_dir() && super::golden::has_case_json(&e.path()))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        }
    };
    assert!(
        !names.is_empty(),
        "no target golden case in {}",
        dir.display()
    );
    names.iter().map(|n| load(&dir.join(n), n)).collect()
}

fn load(dir: &Path, name: &str) -> TargetCase {
    let json: Value = serde_json::from_str(&String::from_utf8(read(dir, "case.json")).unwrap())
        .unwrap_or_else(|e| panic!("{name}/case.json: {e}"));
    let int = |k: &str| json[k].as_u64().unwrap_or_else(|| panic!("{name}: `{k}`")) as usize;
    let float = |k: &str| json[k].as_f64().unwrap_or_else(|| panic!("{name}: `{k}`")) as f32;
    let shape = TargetShape::new(int("batch"), int("priors"), int("max_boxes"));
    let labels_i64 = match json["label_dtype"].as_str() {
        Some("i64") => true,
        Some("i32") => false,
        other => panic!("{name}: label_dtype {other:?}"),
    };
    let case = TargetCase {
        name: name.to_string(),
        shape,
        config: TargetConfig {
            iou_threshold: float("iou_threshold"),
            center_variance: float("center_variance"),
            size_variance: float("size_variance"),
            num_classes: None,
        },
        labels_i64,
        priors: f32s(&read(dir, "priors.bin")),
        gt_boxes: f32s(&read(dir, "gt_boxes.bin")),
        gt_labels: ints(&read(dir, "gt_labels.bin"), labels_i64),
        gt_counts: ints(&read(dir, "gt_counts.bin"), false)
            .into_iter()
            .map(|c| c as i32)
            .collect(),
        labels: ints(&read(dir, "labels.bin"), labels_i64),
        gt_locations: f32s(&read(dir, "gt_locations.bin")),
    };
    assert_eq!(case.priors.len(), shape.priors_len(), "{name}: priors.bin");
    assert_eq!(
        case.gt_boxes.len(),
        shape.boxes_len(),
        "{name}: gt_boxes.bin"
    );
    assert_eq!(
        case.gt_labels.len(),
        shape.box_labels_len(),
        "{name}: gt_labels.bin"
    );
    assert_eq!(case.gt_counts.len(), shape.batch, "{name}: gt_counts.bin");
    assert_eq!(case.labels.len(), shape.labels_len(), "{name}: labels.bin");
    assert_eq!(
        case.gt_locations.len(),
        shape.locations_len(),
        "{name}: gt_locations.bin"
    );
    case
}

/// Holds `labels` and `gt_locations` to the golden: labels exact, offsets
/// within `1e-6 * max(1, |golden|)`. Returns the largest offset error
/// relative to that scale's `max(1, |golden|)`.
pub fn check_against(case: &TargetCase, what: &str, labels: &[i64], gt_locations: &[f32]) -> f64 {
    assert_eq!(
        labels.len(),
        case.labels.len(),
        "{}/{what}: labels length",
        case.name
    );
    let p = case.shape.priors;
    let wrong: Vec<(usize, usize, i64, i64)> = labels
        .iter()
        .zip(&case.labels)
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(i, (a, b))| (i / p, i % p, *a, *b))
        .take(5)
        .collect();
    assert!(
        wrong.is_empty(),
        "{}/{what}: labels differ at (image, prior, got, golden) {wrong:?}",
        case.name
    );
    assert_eq!(
        gt_locations.len(),
        case.gt_locations.len(),
        "{}/{what}: gt_locations length",
        case.name
    );
    let mut worst = 0.0f64;
    for (i, (&got, &golden)) in gt_locations.iter().zip(&case.gt_locations).enumerate() {
        let scale = f64::from(golden.abs()).max(1.0);
        let err = (f64::from(got) - f64::from(golden)).abs() / scale;
        assert!(
            err <= 1e-6,
            "{}/{what}: gt_locations[{}] (image {}, prior {}, coordinate {}) = {got}, golden {golden}",
            case.name,
            i,
            i / (4 * p),
            (i / 4) % p,
            i % 4
        );
        worst = worst.max(err);
    }
    worst
}
