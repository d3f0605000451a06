//! Fused CUDA kernels for the SSD MultiBox loss: the training loss of SSD,
//! SSDLite and MobileNetV2-SSDLite detectors, with its gradients, in three
//! launches per step (per prior: the log-sum-exp, the mining key and the
//! positives' cross-entropy and smooth-L1; per image: the hard negatives by
//! radix select, and the sums; then the gradients), with no host
//! synchronisation, no allocation and bit-identical results run after run.
//! A CPU reference in f64 ([`reference`](mod@reference)) computes the same
//! thing for machines without a GPU.
//!
//! ```
//! use multibox::cudarc::driver::CudaSlice;
//! use multibox::synthetic::{Batch, BatchSpec};
//! use multibox::{reference, MultiboxConfig, MultiboxLoss, Shape};
//!
//! let shape = Shape::new(2, 3000, 21); // B images, P priors, C classes
//! let config = MultiboxConfig { neg_pos_ratio: 3.0, ..Default::default() };
//! let batch = Batch::<f32, i64>::generate(shape, BatchSpec::default());
//!
//! // Without a GPU: the CPU reference (f64), same semantics.
//! let cpu = reference::forward_backward(&config, shape, &batch.reference_inputs(), Default::default())?;
//! println!("reg {:.4} cls {:.4} N {}", cpu.losses.regression_loss, cpu.losses.classification_loss, cpu.losses.num_pos);
//!
//! // With a GPU: three fused launches on your stream, nothing read back.
//! if let Ok(ctx) = multibox::cuda_context(0) {
//!     let stream = ctx.default_stream();
//!     let loss = MultiboxLoss::new(&ctx, config)?; // once: loads the kernels
//!     let confidence = stream.clone_htod(&batch.confidence)?;
//!     let predicted_locations = stream.clone_htod(&batch.predicted_locations)?;
//!     let labels = stream.clone_htod(&batch.labels)?;
//!     let gt_locations = stream.clone_htod(&batch.gt_locations)?;
//!     let mut grad_confidence: CudaSlice<f32> = stream.alloc_zeros(shape.confidence_len())?;
//!     let mut grad_locations: CudaSlice<f32> = stream.alloc_zeros(shape.locations_len())?;
//!     let mut reg = stream.alloc_zeros::<f32>(1)?;
//!     let mut cls = stream.alloc_zeros::<f32>(1)?;
//!     let mut num_pos = stream.alloc_zeros::<i32>(1)?;
//!     let mut workspace = stream.alloc_zeros::<u8>(multibox::workspace_bytes(shape)?)?;
//!
//!     loss.forward_backward(
//!         &stream,
//!         shape,
//!         &multibox::Inputs { confidence: &confidence, predicted_locations: &predicted_locations, labels: &labels, gt_locations: &gt_locations },
//!         multibox::Upstream::Host { g_reg: 1.0, g_cls: 1.0 },
//!         &mut multibox::Gradients { confidence: &mut grad_confidence, predicted_locations: &mut grad_locations },
//!         &mut multibox::Outputs { regression_loss: &mut reg, classification_loss: &mut cls, num_pos: &mut num_pos, mask: None },
//!         &mut workspace,
//!     )?;
//!     let gpu_cls = stream.clone_dtoh(&cls)?[0];
//!     assert!((gpu_cls as f64 - cpu.losses.classification_loss).abs() <= 1e-5 * cpu.losses.classification_loss);
//! }
//! # Ok::<(), multibox::Error>(())
//! ```
//!
//! What is computed is fixed by the crate's specification, summarised in the
//! README: the reference PyTorch MultiBox loss, except that a batch with no
//! positive gives 0 (not NaN), ties among the hard-negative candidates go
//! to the lower prior index, and a fractional `neg_pos_ratio * pos_b` is
//! rounded down.
//!
//! Per call, [`CallOptions`] chooses the [`Layout`] (row-major `[B, P, C]`
//! or NVIDIA's channel-major `[B, C, P]`, read and written in place) and the
//! [`Normalizer`] (N, a divisor from the host or the device for data-parallel
//! training, or per image): see [`MultiboxLoss::forward_backward_with`].
//!
//! The pieces, following one call down: [`MultiboxLoss`] validates and
//! takes device addresses, [`launch_call`] runs the [`plan::LaunchPlan`]'s
//! launches on a [`Backend`], and the kernels live in `kernels/*.cu`
//! (embedded by build.rs, see [`kernels`]).
#![warn(missing_docs)]

#[cfg(feature = "candle")]
pub mod candle;
pub mod capi;
mod config;
pub mod device_memory;
mod dtype;
mod error;
pub mod kernels;
mod launch;
mod loss;
pub mod plan;
pub mod reference;
pub mod synthetic;
pub mod targets;

/// candle-core (feature `candle`), re-exported so callers use the version
/// [`candle`] takes tensors of (0.11).
#[cfg(feature = "candle")]
pub use candle_core;
pub use config::{Layout, MultiboxConfig, Reduction, Shape};
/// cudarc, re-exported so callers use the same version.
pub use cudarc;
pub use dtype::{DType, Float, Label, LabelType};
pub use error::{Error, Result};
pub use launch::{
    launch_call, Backend, DeviceStatus, RawBuffers, RawCall, RawNormalizer, RawUpstream,
};
pub use loss::{
    cuda_context, CallOptions, Gradients, Inputs, MultiboxLoss, Normalizer, Outputs, Upstream,
};
pub use plan::{workspace_bytes, LaunchPlan, Pass};

// The README's Rust examples, run as doctests by `cargo test --doc` (the
// candle one compiles to an empty `main` unless the `candle` feature is on:
// `cargo test --features candle --doc`).
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
