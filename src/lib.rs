//! multibox: fused CUDA kernels for the SSD MultiBox loss.
#![warn(missing_docs)]

mod config;
mod dtype;
mod error;
pub mod kernels;
pub mod reference;

pub use config::{MultiboxConfig, Reduction, Shape};
pub use dtype::{DType, Float, Label, LabelType};
pub use error::{Error, Result};
