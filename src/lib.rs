//! multibox: fused CUDA kernels for the SSD MultiBox loss.
#![warn(missing_docs)]

mod config;
mod dtype;
mod error;
pub mod kernels;
mod launch;
mod loss;
pub mod plan;
pub mod reference;
pub mod synthetic;

pub use config::{MultiboxConfig, Reduction, Shape};
/// cudarc, re-exported so callers use the same version.
pub use cudarc;
pub use dtype::{DType, Float, Label, LabelType};
pub use error::{Error, Result};
pub use launch::{launch_call, Backend, DeviceStatus, RawBuffers, RawCall, RawUpstream};
pub use loss::{cuda_context, Gradients, Inputs, MultiboxLoss, Outputs, Upstream};
pub use plan::{workspace_bytes, LaunchPlan};
