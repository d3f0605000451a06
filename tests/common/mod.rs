//! Test helpers shared by the integration tests: the golden-case loader and
//! the checker that holds any backend (the CPU reference today; the emulated
//! kernels and the GPU later) to SPEC.md's tolerances.
#![allow(dead_code, unused_imports)] // each test binary uses a different part

pub mod check;
pub mod emulated;
pub mod emulated_targets;
pub mod extents;
pub mod golden;
pub mod gpu;
pub mod target_golden;

pub use check::{check, BackendResult, Report};
pub use golden::{list_cases, Case, CaseMeta, CaseVisitor, Expected};

use std::path::PathBuf;

/// The repository's root: where the crate was built, or, for a test
/// executable carried to another machine (scripts/gpu-check runs them there
/// from the repository's root, with no Rust), the working directory when
/// the built-in path does not hold the tests.
pub fn repo_root() -> PathBuf {
    let built = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    if built.join("tests").is_dir() {
        return built;
    }
    std::env::current_dir().expect("the working directory is readable")
}
