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
