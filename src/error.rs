//! The crate's error type.

use crate::Shape;

/// Everything that can go wrong in a call. Each variant is reported before
/// anything is launched or written, except [`Error::Driver`] (a CUDA call
/// failed) and [`Error::Launch`] (a launch backend refused a kernel).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// B, P or C out of range (`B >= 1`, `P >= 1`, `C >= 2`).
    #[error("invalid shape {shape}: {reason}")]
    InvalidShape {
        /// The shape that was passed.
        shape: Shape,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The shape's element counts do not fit the kernels' index types.
    #[error("shape {shape} is too large: {reason}")]
    TooLarge {
        /// The shape that was passed.
        shape: Shape,
        /// Which limit it exceeds.
        reason: String,
    },
    /// A buffer's length does not match the shape.
    #[error("`{name}` has {actual} elements, but shape {shape} needs {expected}")]
    LengthMismatch {
        /// The argument's name (`confidence`, `labels`, ...).
        name: &'static str,
        /// What the shape requires.
        expected: usize,
        /// What was passed.
        actual: usize,
        /// The shape.
        shape: Shape,
    },
    /// Two buffers of a raw or C call that overlap where the kernels write
    /// either one: no output may overlap an input, another output or the
    /// workspace, nor the workspace an input. (The typed entry points'
    /// borrows rule this out.)
    #[error(
        "`{a}` and `{b}` overlap: no output may overlap an input, another output or the \
         workspace, nor the workspace an input"
    )]
    Overlap {
        /// The first buffer's name, in the call's order.
        a: &'static str,
        /// The second buffer's name.
        b: &'static str,
    },
    /// The workspace passed is smaller than [`crate::workspace_bytes`] says.
    #[error("workspace has {actual} bytes, shape {shape} needs {expected}")]
    WorkspaceTooSmall {
        /// Bytes required.
        expected: usize,
        /// Bytes passed.
        actual: usize,
        /// The shape.
        shape: Shape,
    },
    /// A configuration value out of range.
    #[error("invalid config: {0}")]
    InvalidConfig(String),
    /// An upstream gradient that is not finite.
    #[error("upstream gradient `{name}` is {value}, not a finite number")]
    InvalidUpstream {
        /// `g_reg` or `g_cls`.
        name: &'static str,
        /// The value passed.
        value: f32,
    },
    /// A label outside `-1..C` (found by the CPU reference; the kernels
    /// report it through the device status word instead).
    #[error(
        "label {value} at image {image}, prior {prior} is invalid: labels must be -1 (ignore), \
         0 (background) or a class from 1 to {} (C = {classes} classes, background included)",
        .classes.saturating_sub(1)
    )]
    InvalidLabel {
        /// Image index.
        image: usize,
        /// Prior index within the image.
        prior: usize,
        /// The label found.
        value: i64,
        /// C, the number of classes.
        classes: usize,
    },
    /// A required device address is null.
    #[error("`{name}` is a null device pointer")]
    NullPointer {
        /// The argument's name.
        name: &'static str,
    },
    /// A device pointer not aligned as the kernels require.
    #[error("`{name}` must be aligned to {align} bytes (address {addr:#x})")]
    Misaligned {
        /// The argument's name.
        name: &'static str,
        /// Required alignment in bytes.
        align: usize,
        /// The address passed.
        addr: u64,
    },
    /// A buffer or stream that lives on another device or context than the
    /// loss or assigner it was passed to.
    #[error("`{name}` belongs to another CUDA context than the loss or assigner it was passed to (ordinal {expected_ordinal})")]
    WrongContext {
        /// The argument's name.
        name: &'static str,
        /// The ordinal of the loss's device.
        expected_ordinal: usize,
    },
    /// A device address whose memory the kernels cannot use, as the driver
    /// describes it (the raw and C entry points ask it): host memory CUDA
    /// does not know, a freed buffer, or one that ends before the shape's
    /// size, where its allocation is followed by memory CUDA does not know.
    #[error("`{name}` (address {addr:#x}) is not device memory the kernels can use: {reason}")]
    NotDeviceMemory {
        /// The argument's name.
        name: &'static str,
        /// The address passed.
        addr: u64,
        /// What the driver said of it.
        reason: String,
    },
    /// This build has no kernels (`MULTIBOX_SKIP_KERNELS=1`), or the device
    /// is older than every architecture they are built for (sm_75).
    #[error("no kernel image for this device: {0}")]
    NoKernels(String),
    /// No usable CUDA device (see [`crate::cuda_context`]).
    #[error("no CUDA device: {0}")]
    NoDevice(String),
    /// A target-assignment shape out of range (`B, P, T >= 1`, indices in 32 bits).
    #[error("invalid target shape {shape}: {reason}")]
    InvalidTargetShape {
        /// The shape that was passed.
        shape: crate::targets::TargetShape,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A target-assignment buffer whose length does not match the shape.
    #[error("`{name}` has {actual} elements, but target shape {shape} needs {expected}")]
    TargetLengthMismatch {
        /// The argument's name (`gt_boxes`, `labels`, ...).
        name: &'static str,
        /// What the shape requires.
        expected: usize,
        /// What was passed.
        actual: usize,
        /// The shape.
        shape: crate::targets::TargetShape,
    },
    /// The workspace passed is smaller than [`crate::targets::plan::workspace_bytes`] says.
    #[error("workspace has {actual} bytes, target shape {shape} needs {expected}")]
    TargetWorkspaceTooSmall {
        /// Bytes required.
        expected: usize,
        /// Bytes passed.
        actual: usize,
        /// The shape.
        shape: crate::targets::TargetShape,
    },
    /// Priors that are not `[P, 4]` finite center-form boxes with positive sizes.
    #[error("invalid priors: {0}")]
    InvalidPriors(String),
    /// A CUDA driver call failed.
    #[error("CUDA driver: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    /// A launch backend (the driver or the test emulator) refused a launch.
    #[error("launching `{kernel}`: {message}")]
    Launch {
        /// The kernel's symbol.
        kernel: &'static str,
        /// What the backend said.
        message: String,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
