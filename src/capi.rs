//! The C ABI: what C, C++ and Python (ctypes) trainers link.
//!
//! `include/multibox.h` is generated from this file by cbindgen (with
//! `cbindgen.toml`); `tests/c_abi.rs` fails when the two differ and says how
//! to update the header (`MULTIBOX_BLESS=1 cargo test --test c_abi`).
//!
//! The rules every function here follows:
//!
//! - It returns a [`multibox_status_code`] (except [`multibox_version`],
//!   [`multibox_abi`] and [`multibox_last_error`], which cannot fail). On failure,
//!   [`multibox_last_error`] gives a readable message on the same thread.
//! - It never unwinds across the boundary: a panic becomes
//!   [`multibox_status_code::MULTIBOX_PANIC`].
//! - Every pointer argument is checked for null, every enum value passed as
//!   an integer is checked for range, and every shape, length and
//!   configuration is validated as in the Rust API before anything runs.
//! - One that uses a device leaves the calling thread's current CUDA context
//!   as it found it (the runtime API's current device follows that context).
//!
//! The device entry points ([`multibox_forward`], [`multibox_backward`],
//! [`multibox_forward_backward`]) wrap [`crate::MultiboxLoss::launch_raw`]:
//! device addresses and a `CUstream` (a `cudaStream_t` is the same pointer),
//! on the device's primary context, the one the CUDA runtime and PyTorch use.
//! The reference entry points run the CPU reference ([`crate::reference`]) on
//! host arrays and need no GPU.
#![allow(non_camel_case_types)]
#![deny(unsafe_op_in_unsafe_fn)]

use std::cell::RefCell;
use std::ffi::{c_char, c_void, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::plan::Pass;
use crate::{
    reference, DType, Error, LabelType, Layout, MultiboxConfig, MultiboxLoss, RawBuffers, RawCall,
    RawNormalizer, RawUpstream, Shape,
};

/// What every fallible function returns.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum multibox_status_code {
    /// Success.
    MULTIBOX_OK = 0,
    /// A null pointer, a shape, length, configuration, enum value, label or
    /// workspace size out of range, or an address that is not memory of the
    /// device (host memory, another device's); nothing was launched or written.
    MULTIBOX_INVALID_ARGUMENT = 1,
    /// No CUDA driver on this machine, or no device of that ordinal.
    MULTIBOX_NO_DEVICE = 2,
    /// This build has no kernel image the device can load.
    MULTIBOX_NO_KERNELS = 3,
    /// A CUDA driver call or a kernel launch failed.
    MULTIBOX_CUDA_ERROR = 4,
    /// A bug: the library panicked. The message gives the panic's text (the
    /// default panic hook has printed where, on stderr).
    MULTIBOX_PANIC = 5,
}

use multibox_status_code::*;

/// Element type of confidence, the locations and the gradients; passed as
/// an `int32_t` in `multibox_call.dtype`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum multibox_dtype {
    /// float.
    MULTIBOX_F32 = 0,
    /// IEEE binary16.
    MULTIBOX_F16 = 1,
    /// bfloat16.
    MULTIBOX_BF16 = 2,
}

/// Integer type of the labels; passed as an `int32_t` in
/// `multibox_call.label_type` and `multibox_host_call_f32.label_type`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum multibox_label_type {
    /// int32_t.
    MULTIBOX_I32 = 0,
    /// int64_t (PyTorch's default for class indices).
    MULTIBOX_I64 = 1,
}

/// The layout of confidence, the locations and the gradients; passed as an
/// `int32_t` in `multibox_call.layout` and `multibox_host_call_f32.layout`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum multibox_layout {
    /// `[B, P, C]` logits, `[B, P, 4]` boxes (0, the default).
    MULTIBOX_ROW_MAJOR = 0,
    /// `[B, C, P]` logits, `[B, 4, P]` boxes (NVIDIA's SSD heads).
    MULTIBOX_CHANNEL_MAJOR = 1,
}

/// What the losses and gradients are divided by; passed as an `int32_t` in
/// `multibox_call.normalizer` and `multibox_host_call_f32.normalizer`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum multibox_normalizer {
    /// N, the batch's positive count (0, the default).
    MULTIBOX_NORMALIZE_POSITIVES = 0,
    /// The caller's divisor n: `normalizer_value`, or the float at
    /// `normalizer_device` when that is not 0. n <= 0 gives zero losses and
    /// gradients; a non-finite n NaN losses.
    MULTIBOX_NORMALIZE_GIVEN = 1,
    /// Each image by its own positive count, averaged over the B images.
    MULTIBOX_NORMALIZE_PER_IMAGE = 2,
}

/// The loss's parameters; `multibox_config_default` fills in the defaults.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct multibox_config {
    /// Hard negatives mined per positive, per image; positive, finite; 3 by default.
    pub neg_pos_ratio: f32,
    /// Floor on the negatives mined per image; 0 by default.
    pub min_negatives_per_image: u32,
    /// The smooth-L1 transition point; positive, finite; 1 by default.
    pub beta: f32,
}

/// The batch shape: `B` images, `P` priors, `C` classes (background included).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct multibox_shape {
    /// B >= 1.
    pub batch: usize,
    /// P >= 1.
    pub priors: usize,
    /// C >= 2.
    pub classes: usize,
}

/// One device call: device addresses (`CUdeviceptr`, or a `void*` cast to
/// `uint64_t`) of contiguous arrays, all of one context. The shapes below
/// are row-major's; with `layout` MULTIBOX_CHANNEL_MAJOR they are `[B, C, P]`
/// and `[B, 4, P]`. Start from `multibox_call_default` (row-major,
/// normalised by N, upstream gradients 1.0). A zero-initialised call
/// (`multibox_call call = {0};`) differs in one thing: its `g_reg` and
/// `g_cls` are 0, so its gradients are 0 unless they or `upstream` are set.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct multibox_call {
    /// The batch shape.
    pub shape: multibox_shape,
    /// A `multibox_dtype`: the type T of confidence, the locations and the gradients.
    pub dtype: i32,
    /// A `multibox_label_type`: the type of labels.
    pub label_type: i32,
    /// `[B, P, C]` logits, T.
    pub confidence: u64,
    /// `[B, P, 4]` predicted box offsets, T.
    pub predicted_locations: u64,
    /// `[B, P]` labels: -1 ignore, 0 background, 1..C-1 class.
    pub labels: u64,
    /// `[B, P, 4]` encoded target offsets, T.
    pub gt_locations: u64,
    /// `[B, P, C]` gradient of the logits, T; backward and forward_backward
    /// only (0 for the forward).
    pub grad_confidence: u64,
    /// `[B, P, 4]` gradient of the predicted offsets, T; as `grad_confidence`.
    pub grad_locations: u64,
    /// One float: sum of smooth-L1 over positives / the divisor (N, or as
    /// `normalizer` says); forward and
    /// forward_backward only (0 for the backward).
    pub regression_loss: u64,
    /// One float: cross-entropy over positives and mined negatives / the
    /// divisor; as
    /// `regression_loss`.
    pub classification_loss: u64,
    /// One int32_t: N; as `regression_loss`.
    pub num_pos: u64,
    /// `[B, P]` uint8_t mask of the priors in the classification loss, or 0
    /// for none; written by the forward.
    pub mask: u64,
    /// At least `multibox_workspace_bytes` bytes, 256-byte aligned. The
    /// forward fills it; `multibox_backward` reads what the forward left.
    pub workspace: u64,
    /// Size of the workspace in bytes.
    pub workspace_bytes: usize,
    /// Device address of two floats `[g_reg, g_cls]` (e.g. a loss scaler's
    /// value, or autograd's upstream gradients), or 0 to use `g_reg` and
    /// `g_cls` below. Backward and forward_backward only.
    pub upstream: u64,
    /// d(total) / d(regression_loss) when `upstream` is 0; finite.
    pub g_reg: f32,
    /// d(total) / d(classification_loss) when `upstream` is 0; finite.
    pub g_cls: f32,
    /// A `multibox_layout`.
    pub layout: i32,
    /// A `multibox_normalizer`. The backward ignores it: it divides by what
    /// its forward divided by, which the workspace holds.
    pub normalizer: i32,
    /// MULTIBOX_NORMALIZE_GIVEN's n when `normalizer_device` is 0.
    pub normalizer_value: f32,
    /// Device address of MULTIBOX_NORMALIZE_GIVEN's n (one float, read by
    /// the kernels: e.g. an all-reduced positive count), or 0.
    pub normalizer_device: u64,
}

/// What the kernels saw that only the device can see.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct multibox_device_status {
    /// A label outside `-1..C-1` was found; both losses are NaN.
    pub invalid_label: bool,
    /// A NaN or infinity was among the logits (ignored priors' too) or a
    /// positive's box offset differences (predicted minus target, in f32).
    pub nonfinite_input: bool,
    /// A backward found that the workspace's last forward was not of its own
    /// call (shape, layout, types, configuration), or no forward there:
    /// every gradient element it wrote is NaN. Replaces the other flags.
    pub stale_workspace: bool,
}

/// One CPU reference call on host arrays: f32 inputs and gradients, i32 or
/// i64 labels, each array with its length in elements. Outputs may be NULL
/// where a function says so. Start from `multibox_host_call_default`
/// (upstream gradients 1.0); zero-initialised, `g_reg` and `g_cls` are 0.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct multibox_host_call_f32 {
    /// The batch shape.
    pub shape: multibox_shape,
    /// A `multibox_label_type`: what `labels` points to.
    pub label_type: i32,
    /// `[B, P, C]` logits.
    pub confidence: *const f32,
    /// Elements of `confidence`: B*P*C.
    pub confidence_len: usize,
    /// `[B, P, 4]` predicted box offsets.
    pub predicted_locations: *const f32,
    /// Elements of `predicted_locations`: B*P*4.
    pub predicted_locations_len: usize,
    /// `[B, P]` labels, int32_t or int64_t.
    pub labels: *const c_void,
    /// Elements of `labels`: B*P.
    pub labels_len: usize,
    /// `[B, P, 4]` encoded target offsets.
    pub gt_locations: *const f32,
    /// Elements of `gt_locations`: B*P*4.
    pub gt_locations_len: usize,
    /// d(total) / d(regression_loss); finite (gradients only).
    pub g_reg: f32,
    /// d(total) / d(classification_loss); finite (gradients only).
    pub g_cls: f32,
    /// `[B, P, C]` output: d total / d confidence (gradients only).
    pub grad_confidence: *mut f32,
    /// Elements of `grad_confidence`: B*P*C.
    pub grad_confidence_len: usize,
    /// `[B, P, 4]` output: d total / d predicted_locations (gradients only).
    pub grad_locations: *mut f32,
    /// Elements of `grad_locations`: B*P*4.
    pub grad_locations_len: usize,
    /// `[B, P]` output, or NULL: 1 where the prior is in the classification loss.
    pub mask: *mut u8,
    /// Elements of `mask`: B*P (ignored when `mask` is NULL).
    pub mask_len: usize,
    /// A `multibox_layout` (the shapes above are row-major's).
    pub layout: i32,
    /// A `multibox_normalizer`.
    pub normalizer: i32,
    /// MULTIBOX_NORMALIZE_GIVEN's n.
    pub normalizer_value: f32,
}

/// The losses from the CPU reference, in double.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct multibox_losses {
    /// Smooth-L1 over positives / the divisor (N by default; 0 when it is 0).
    pub regression_loss: f64,
    /// Cross-entropy over positives and mined negatives / the divisor.
    pub classification_loss: f64,
    /// N, the positives in the batch (whatever the normaliser).
    pub num_pos: u64,
}

/// A loss on one CUDA device (opaque): create it once with
/// `multibox_loss_create`, free it with `multibox_loss_destroy`.
pub struct multibox_loss {
    loss: MultiboxLoss,
}

/// A failure on its way to the caller: the code and the message for
/// `multibox_last_error`.
struct Failure {
    code: multibox_status_code,
    message: String,
}

impl From<Error> for Failure {
    fn from(error: Error) -> Self {
        let code = match &error {
            Error::InvalidShape { .. }
            | Error::TooLarge { .. }
            | Error::LengthMismatch { .. }
            | Error::WorkspaceTooSmall { .. }
            | Error::InvalidConfig(_)
            | Error::InvalidUpstream { .. }
            | Error::InvalidLabel { .. }
            | Error::NullPointer { .. }
            | Error::Misaligned { .. }
            | Error::Overlap { .. }
            | Error::WrongContext { .. }
            | Error::NotDeviceMemory { .. }
            | Error::InvalidTargetShape { .. }
            | Error::TargetLengthMismatch { .. }
            | Error::TargetWorkspaceTooSmall { .. }
            | Error::InvalidPriors(_) => MULTIBOX_INVALID_ARGUMENT,
            Error::NoKernels(_) => MULTIBOX_NO_KERNELS,
            Error::NoDevice(_) => MULTIBOX_NO_DEVICE,
            Error::Driver(_) | Error::Launch { .. } => MULTIBOX_CUDA_ERROR,
        };
        Failure {
            code,
            message: error.to_string(),
        }
    }
}

fn invalid(message: String) -> Failure {
    Failure {
        code: MULTIBOX_INVALID_ARGUMENT,
        message,
    }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    let message = CString::new(message.replace('\0', " ")).unwrap_or_default();
    // Nowhere to keep it while the thread's locals are being destroyed.
    let _ = LAST_ERROR.try_with(|last| *last.borrow_mut() = message);
}

/// Runs `body`, turning an error into its code (and the thread's last
/// error message) and a panic into `MULTIBOX_PANIC`.
fn guard(body: impl FnOnce() -> Result<(), Failure>) -> multibox_status_code {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => MULTIBOX_OK,
        Ok(Err(failure)) => {
            set_last_error(&failure.message);
            failure.code
        }
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic payload".into());
            set_last_error(&format!("multibox panicked (a bug, please report): {what}"));
            MULTIBOX_PANIC
        }
    }
}

/// [`guard`] for the entry points that use a CUDA context: the calling
/// thread's current context is the caller's again when they return.
fn device_guard(body: impl FnOnce() -> Result<(), Failure>) -> multibox_status_code {
    let _keep = KeepCurrentContext::new();
    guard(body)
}

/// The calling thread's current CUDA context, made current again when this
/// is dropped.
///
/// A call binds its loss's or assigner's context (the device's primary
/// context) to the thread, through cudarc, and cudarc leaves it bound. The
/// CUDA runtime takes its current device from the thread's context, so a C
/// or C++ caller working on device 0 would otherwise find its next
/// `cudaMalloc` or launch on the device of its last multibox call.
struct KeepCurrentContext {
    /// The context to restore (null: none was current, or the driver was
    /// not initialised yet); `None` where there is no driver library.
    previous: Option<cudarc::driver::sys::CUcontext>,
}

impl KeepCurrentContext {
    fn new() -> Self {
        use cudarc::driver::result::ctx;
        let previous = crate::loss::driver_library_present().then(|| {
            // An error (CUDA_ERROR_NOT_INITIALIZED before any cuInit) means
            // no context is current either.
            ctx::get_current()
                .ok()
                .flatten()
                .unwrap_or(std::ptr::null_mut())
        });
        Self { previous }
    }
}

impl Drop for KeepCurrentContext {
    fn drop(&mut self) {
        use cudarc::driver::result::ctx;
        let Some(previous) = self.previous else {
            return;
        };
        // An error: the call did not get as far as cuInit, so bound nothing.
        let Ok(now) = ctx::get_current() else {
            return;
        };
        if now.unwrap_or(std::ptr::null_mut()) != previous {
            // SAFETY: `previous` was current on this thread when the call
            // began, so it is a live context of the caller's (or null,
            // which unbinds). Failing, it leaves the loss's context bound,
            // as before this guard; there is no one to tell.
            let _ = unsafe { ctx::set_current(previous) };
        }
    }
}

/// `ptr` as a reference, or INVALID_ARGUMENT naming it.
///
/// # Safety
/// A non-null `ptr` points to a valid, initialised `T` for `'a`.
unsafe fn read_arg<'a, T>(name: &str, ptr: *const T) -> Result<&'a T, Failure> {
    // SAFETY: the caller vouches for non-null pointers; null is rejected.
    unsafe { ptr.as_ref() }.ok_or_else(|| invalid(format!("`{name}` is a null pointer")))
}

/// Writes `value` through `ptr`, or INVALID_ARGUMENT naming it.
///
/// # Safety
/// A non-null `ptr` points to writable memory for one `T`.
unsafe fn write_out<T>(name: &str, ptr: *mut T, value: T) -> Result<(), Failure> {
    if ptr.is_null() {
        return Err(invalid(format!("`{name}` is a null pointer")));
    }
    // SAFETY: non-null, and the caller vouches that it is writable.
    unsafe { ptr.write(value) };
    Ok(())
}

fn shape(s: &multibox_shape) -> Shape {
    Shape::new(s.batch, s.priors, s.classes)
}

fn config(c: &multibox_config) -> Result<MultiboxConfig, Failure> {
    let config = MultiboxConfig {
        neg_pos_ratio: c.neg_pos_ratio,
        min_negatives_per_image: c.min_negatives_per_image,
        beta: c.beta,
        ..Default::default()
    };
    config.validate()?;
    Ok(config)
}

fn dtype(value: i32) -> Result<DType, Failure> {
    match value {
        0 => Ok(DType::F32),
        1 => Ok(DType::F16),
        2 => Ok(DType::BF16),
        _ => Err(invalid(format!(
            "dtype {value} is not a multibox_dtype (0 f32, 1 f16, 2 bf16)"
        ))),
    }
}

fn layout(value: i32) -> Result<Layout, Failure> {
    match value {
        0 => Ok(Layout::RowMajor),
        1 => Ok(Layout::ChannelMajor),
        _ => Err(invalid(format!(
            "layout {value} is not a multibox_layout (0 row-major, 1 channel-major)"
        ))),
    }
}

/// The normaliser of a call: `kind` a `multibox_normalizer`, `value` or the
/// float at `device` (when not 0) its divisor.
fn normalizer(kind: i32, value: f32, device: u64) -> Result<RawNormalizer, Failure> {
    match kind {
        0 => Ok(RawNormalizer::Positives),
        1 if device != 0 => Ok(RawNormalizer::GivenOnDevice(device)),
        1 => Ok(RawNormalizer::Given(value)),
        2 => Ok(RawNormalizer::PerImage),
        _ => Err(invalid(format!(
            "normalizer {kind} is not a multibox_normalizer (0 positives, 1 given, 2 per image)"
        ))),
    }
}

/// The reference's form of a host call's normaliser.
fn host_normalizer(kind: i32, value: f32) -> Result<reference::Normalizer, Failure> {
    Ok(match normalizer(kind, value, 0)? {
        RawNormalizer::Given(n) => reference::Normalizer::Given(n),
        RawNormalizer::PerImage => reference::Normalizer::PerImage,
        RawNormalizer::Positives | RawNormalizer::GivenOnDevice(_) => {
            reference::Normalizer::Positives
        }
    })
}

fn label_type(value: i32) -> Result<LabelType, Failure> {
    match value {
        0 => Ok(LabelType::I32),
        1 => Ok(LabelType::I64),
        _ => Err(invalid(format!(
            "label_type {value} is not a multibox_label_type (0 i32, 1 i64)"
        ))),
    }
}

/// The library's version, e.g. `"0.1.0"`: a static string.
#[no_mangle]
pub extern "C" fn multibox_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// A hash of the declarations in `include/multibox.h` as this library was
/// built (FNV-1a over the header's text without comments and whitespace).
/// A C program compares it with the header's `MULTIBOX_ABI_HASH`, and a
/// caller that declares the structs itself, as ctypes does, with the value
/// of the header it was written against, so that a library built from
/// another header is refused rather than handed structs of the wrong
/// layout.
#[no_mangle]
pub extern "C" fn multibox_abi() -> u64 {
    HEADER_ABI
}

/// [`multibox_abi`]'s value, computed when the crate compiles.
const HEADER_ABI: u64 = declarations_hash(include_bytes!("../include/multibox.h"));

/// FNV-1a (64-bit) over the bytes of a C header that are neither comments
/// (`//` to the end of the line, `/* ... */`), whitespace, nor the line
/// that defines the hash itself (`#define MULTIBOX_ABI_HASH`), so that a header
/// whose only changes are in its comments or layout keeps its hash.
pub const fn declarations_hash(text: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < text.len() {
        let next = if i + 1 < text.len() { text[i + 1] } else { 0 };
        let line_comment = text[i] == b'/' && next == b'/';
        let hash_line =
            (i == 0 || text[i - 1] == b'\n') && starts_with_at(text, i, ABI_HASH_DEFINE.as_bytes());
        if line_comment || hash_line {
            while i < text.len() && text[i] != b'\n' {
                i += 1;
            }
        } else if text[i] == b'/' && next == b'*' {
            i += 2;
            while i + 1 < text.len() && !(text[i] == b'*' && text[i + 1] == b'/') {
                i += 1;
            }
            i += 2;
        } else {
            if !text[i].is_ascii_whitespace() {
                hash = (hash ^ text[i] as u64).wrapping_mul(0x0000_0100_0000_01b3);
            }
            i += 1;
        }
    }
    hash
}

// How the header's line with multibox_abi's value begins (`#define
// MULTIBOX_ABI_HASH 0x...ULL`, written by tests/c_abi.rs after cbindgen's
// output), which a C program compares with `multibox_abi()` to know that
// the library it loaded was built from its header. declarations_hash
// leaves the line out. Not `pub`: cbindgen would export it.
const ABI_HASH_DEFINE: &str = "#define MULTIBOX_ABI_HASH ";

/// Whether `text[at..]` begins with `prefix` (a `const fn`, for
/// [`declarations_hash`]).
const fn starts_with_at(text: &[u8], at: usize, prefix: &[u8]) -> bool {
    if text.len() - at < prefix.len() {
        return false;
    }
    let mut k = 0;
    while k < prefix.len() {
        if text[at + k] != prefix[k] {
            return false;
        }
        k += 1;
    }
    true
}

/// The message of the last failure on this thread (empty if none): valid
/// until the next failing call on this thread. Never NULL.
#[no_mangle]
pub extern "C" fn multibox_last_error() -> *const c_char {
    // `try_with`: called from a thread-local destructor while the thread
    // exits, `with` would panic across the boundary (an abort); the
    // message is gone by then anyway.
    LAST_ERROR
        .try_with(|last| last.borrow().as_ptr())
        .unwrap_or(c"".as_ptr())
}

/// Writes a call with no buffers to `out`: every address and length 0,
/// row-major, normalised by N (MULTIBOX_NORMALIZE_POSITIVES), and upstream
/// gradients `g_reg` = `g_cls` = 1.0, SPEC.md's default. Set the shape, the
/// types and the buffers.
///
/// # Safety
/// `out` is NULL or points to a writable `multibox_call`.
#[no_mangle]
pub unsafe extern "C" fn multibox_call_default(out: *mut multibox_call) -> multibox_status_code {
    guard(|| {
        // SAFETY: every field is an integer or a float, for which all-zero
        // bits are a valid value (0, row-major, positives).
        let zero: multibox_call = unsafe { std::mem::zeroed() };
        let value = multibox_call {
            g_reg: 1.0,
            g_cls: 1.0,
            ..zero
        };
        // SAFETY: the caller's contract above.
        unsafe { write_out("out", out, value) }
    })
}

/// Writes a host call with no arrays to `out`: every pointer NULL and
/// every length 0, row-major, normalised by N, and upstream gradients
/// `g_reg` = `g_cls` = 1.0. Set the shape, the label type and the arrays.
///
/// # Safety
/// `out` is NULL or points to a writable `multibox_host_call_f32`.
#[no_mangle]
pub unsafe extern "C" fn multibox_host_call_default(
    out: *mut multibox_host_call_f32,
) -> multibox_status_code {
    guard(|| {
        // SAFETY: every field is an integer, a float or a raw pointer, for
        // which all-zero bits are a valid value (0, NULL).
        let zero: multibox_host_call_f32 = unsafe { std::mem::zeroed() };
        let value = multibox_host_call_f32 {
            g_reg: 1.0,
            g_cls: 1.0,
            ..zero
        };
        // SAFETY: the caller's contract above.
        unsafe { write_out("out", out, value) }
    })
}

/// Writes the default configuration (ratio 3, no floor, beta 1) to `out`.
///
/// # Safety
/// `out` is NULL or points to a writable `multibox_config`.
#[no_mangle]
pub unsafe extern "C" fn multibox_config_default(
    out: *mut multibox_config,
) -> multibox_status_code {
    guard(|| {
        let d = MultiboxConfig::default();
        let value = multibox_config {
            neg_pos_ratio: d.neg_pos_ratio,
            min_negatives_per_image: d.min_negatives_per_image,
            beta: d.beta,
        };
        // SAFETY: the caller's contract above.
        unsafe { write_out("out", out, value) }
    })
}

/// The workspace a device call of this shape needs, in bytes.
///
/// # Safety
/// `out` is NULL or points to a writable `size_t`.
#[no_mangle]
pub unsafe extern "C" fn multibox_workspace_bytes(
    batch: usize,
    priors: usize,
    classes: usize,
    out: *mut usize,
) -> multibox_status_code {
    guard(|| {
        let bytes = crate::workspace_bytes(Shape::new(batch, priors, classes))?;
        // SAFETY: the caller's contract above.
        unsafe { write_out("out", out, bytes) }
    })
}

/// Creates the loss on CUDA device `device_ordinal`'s primary context (the
/// one the CUDA runtime and PyTorch use) and loads the kernels. `config`
/// may be NULL for the defaults. Returns `MULTIBOX_NO_DEVICE` where there is
/// no driver or no such device; `*out` is NULL on any failure.
///
/// # Safety
/// `config` is NULL or points to a `multibox_config`; `out` is NULL or
/// points to a writable `multibox_loss*`.
#[no_mangle]
pub unsafe extern "C" fn multibox_loss_create(
    device_ordinal: i32,
    config: *const multibox_config,
    out: *mut *mut multibox_loss,
) -> multibox_status_code {
    device_guard(|| {
        // SAFETY: the caller's contract above.
        unsafe { write_out("out", out, std::ptr::null_mut()) }?;
        let config = if config.is_null() {
            MultiboxConfig::default()
        } else {
            // SAFETY: non-null, and the caller vouches for it.
            self::config(unsafe { &*config })?
        };
        let ordinal = usize::try_from(device_ordinal)
            .map_err(|_| invalid(format!("device_ordinal {device_ordinal} is negative")))?;
        // cuda_context checks that the driver and the device exist before
        // CudaContext::new, which would panic without a driver.
        let ctx = crate::cuda_context(ordinal)?;
        let loss = MultiboxLoss::new(&ctx, config)?;
        let handle = Box::into_raw(Box::new(multibox_loss { loss }));
        // SAFETY: `out` was checked non-null and written above.
        unsafe { out.write(handle) };
        Ok(())
    })
}

/// Frees a loss from `multibox_loss_create`; NULL is a no-op. Work queued
/// through it may still be running: this waits for the device
/// (`cuCtxSynchronize`, so not while any thread captures a graph on this
/// device: the wait invalidates that capture, whatever its mode) before it
/// unloads the kernels.
///
/// # Safety
/// `loss` is NULL or came from `multibox_loss_create` and is not used again,
/// nor is any CUDA graph that captured its launches.
#[no_mangle]
pub unsafe extern "C" fn multibox_loss_destroy(loss: *mut multibox_loss) -> multibox_status_code {
    device_guard(|| {
        if !loss.is_null() {
            // SAFETY: the caller passes a pointer from Box::into_raw in
            // multibox_loss_create, once.
            drop(unsafe { Box::from_raw(loss) });
        }
        Ok(())
    })
}

/// Validates `call` and launches it on `stream`.
///
/// # Safety
/// As `MultiboxLoss::launch_raw`; `loss` and `call` NULL or valid.
unsafe fn launch(
    loss: *const multibox_loss,
    call: *const multibox_call,
    stream: *mut c_void,
    pass: Pass,
) -> Result<(), Failure> {
    // SAFETY: the caller's contract.
    let loss = unsafe { read_arg("loss", loss) }?;
    // SAFETY: the caller's contract.
    let c = unsafe { read_arg("call", call) }?;
    let upstream = if c.upstream != 0 {
        RawUpstream::Device(c.upstream)
    } else {
        RawUpstream::Host {
            g_reg: c.g_reg,
            g_cls: c.g_cls,
        }
    };
    let raw = RawCall {
        shape: shape(&c.shape),
        dtype: dtype(c.dtype)?,
        label_type: label_type(c.label_type)?,
        buffers: RawBuffers {
            confidence: c.confidence,
            predicted_locations: c.predicted_locations,
            labels: c.labels,
            gt_locations: c.gt_locations,
            grad_confidence: c.grad_confidence,
            grad_locations: c.grad_locations,
            regression_loss: c.regression_loss,
            classification_loss: c.classification_loss,
            num_pos: c.num_pos,
            mask: c.mask,
            workspace: c.workspace,
            workspace_bytes: c.workspace_bytes,
        },
        upstream,
        pass,
        layout: layout(c.layout)?,
        // The backward divides by what its forward did (the workspace
        // holds it) and, as the header says, ignores `normalizer`: a stale
        // value in a reused call is not an error there.
        normalizer: if pass.runs_forward() {
            normalizer(c.normalizer, c.normalizer_value, c.normalizer_device)?
        } else {
            RawNormalizer::Positives
        },
    };
    // SAFETY: the caller's contract is launch_raw's.
    unsafe { loss.loss.launch_raw(&raw, stream.cast()) }?;
    Ok(())
}

/// The losses only (2 launches on `stream`, a `CUstream`/`cudaStream_t` of
/// the loss's device, or NULL for the legacy default stream). Allocates
/// nothing and reads nothing back; every host-visible problem is reported
/// before the first launch.
///
/// # Safety
/// `loss` is NULL or from `multibox_loss_create`; `call` is NULL or points
/// to a `multibox_call` whose addresses are device allocations of the
/// loss's device, as large as the shape and types imply, alive until the
/// queued work completes; `stream` is a live stream of that device's
/// primary context, or NULL. No output may overlap an input, another
/// output or the workspace, nor the workspace an input (a gradient is not
/// computed in place): such a call is refused with
/// `MULTIBOX_INVALID_ARGUMENT` before anything is launched.
#[no_mangle]
pub unsafe extern "C" fn multibox_forward(
    loss: *const multibox_loss,
    call: *const multibox_call,
    stream: *mut c_void,
) -> multibox_status_code {
    // SAFETY: the caller's contract above.
    device_guard(|| unsafe { launch(loss, call, stream, Pass::Forward) })
}

/// The gradients of an earlier `multibox_forward` (1 launch on `stream`),
/// with the upstream gradients known only now: `call->upstream` (two floats
/// on the device, e.g. autograd's) or `call->g_reg`, `call->g_cls`. Needs
/// the inputs, the workspace and the two gradient buffers of `call`; the
/// loss outputs and the mask are ignored (they may be 0). The result is bit
/// for bit that of `multibox_forward_backward` with the same upstream.
///
/// The workspace carries the forward's mining decisions to this call: it
/// must hold what the last `multibox_forward` with this loss, this shape
/// and inputs of the same contents wrote, untouched since, and that forward
/// must be ordered before this call on `stream`. Otherwise the gradients
/// are wrong, though every access stays in bounds; where the workspace's
/// last forward was of another shape, layout, types or configuration, or
/// the workspace is zeroed, every gradient element is NaN and the status
/// word says `stale_workspace`.
///
/// # Safety
/// As `multibox_forward_backward`, and the workspace holds a forward's
/// results as above.
#[no_mangle]
pub unsafe extern "C" fn multibox_backward(
    loss: *const multibox_loss,
    call: *const multibox_call,
    stream: *mut c_void,
) -> multibox_status_code {
    // SAFETY: the caller's contract above.
    device_guard(|| unsafe { launch(loss, call, stream, Pass::Backward) })
}

/// The losses and both gradients (3 launches on `stream`); as
/// `multibox_forward`, plus `grad_confidence` and `grad_locations`.
///
/// # Safety
/// As `multibox_forward`, and the gradient buffers (and `upstream`, when
/// not 0) are device allocations of the loss's device too.
#[no_mangle]
pub unsafe extern "C" fn multibox_forward_backward(
    loss: *const multibox_loss,
    call: *const multibox_call,
    stream: *mut c_void,
) -> multibox_status_code {
    // SAFETY: the caller's contract above.
    device_guard(|| unsafe { launch(loss, call, stream, Pass::ForwardBackward) })
}

/// Reads the device status word the last forward or forward-backward call
/// with this `workspace` (and `shape`) left; a backward call leaves it as
/// is, unless it found no forward of its own call there
/// (`stale_workspace`). Synchronises with `stream`.
///
/// # Safety
/// `loss`, `shape` and `out` are NULL or valid; `workspace` is a device
/// allocation of the loss's device of `workspace_bytes` bytes; `stream` is a
/// live stream of that device's primary context, or NULL.
#[no_mangle]
pub unsafe extern "C" fn multibox_status(
    loss: *const multibox_loss,
    shape: *const multibox_shape,
    workspace: u64,
    workspace_bytes: usize,
    stream: *mut c_void,
    out: *mut multibox_device_status,
) -> multibox_status_code {
    device_guard(|| {
        // SAFETY: the caller's contract above.
        let loss = unsafe { read_arg("loss", loss) }?;
        // SAFETY: the caller's contract above.
        let shape = self::shape(unsafe { read_arg("shape", shape) }?);
        if out.is_null() {
            return Err(invalid("`out` is a null pointer".into()));
        }
        // SAFETY: the caller's contract above.
        let status = unsafe {
            loss.loss
                .status_raw(shape, workspace, workspace_bytes, stream.cast())
        }?;
        let value = multibox_device_status {
            invalid_label: status.invalid_label,
            nonfinite_input: status.nonfinite_input,
            stale_workspace: status.stale_workspace,
        };
        // SAFETY: the caller's contract above.
        unsafe { write_out("out", out, value) }
    })
}

/// A host array as a slice, after checking it for null, alignment and size.
///
/// # Safety
/// A non-null `ptr` points to `len` initialised elements, alive and not
/// written for `'a`.
unsafe fn host_slice<'a, T>(name: &str, ptr: *const T, len: usize) -> Result<&'a [T], Failure> {
    if ptr.is_null() {
        return Err(invalid(format!("`{name}` is a null pointer")));
    }
    if ptr.align_offset(std::mem::align_of::<T>()) != 0 {
        return Err(invalid(format!(
            "`{name}` is not aligned to {} bytes",
            std::mem::align_of::<T>()
        )));
    }
    let too_large = match len.checked_mul(std::mem::size_of::<T>()) {
        Some(bytes) => bytes > isize::MAX as usize,
        None => true,
    };
    if too_large {
        return Err(invalid(format!("`{name}` length {len} is too large")));
    }
    // SAFETY: non-null, aligned, and of at most isize::MAX bytes (checked
    // above); the caller vouches for the rest.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

/// Checks an output array for null and its length, before it is written
/// with `write_host`.
fn check_output<T>(name: &str, ptr: *mut T, len: usize, expected: usize) -> Result<(), Failure> {
    if ptr.is_null() {
        return Err(invalid(format!("`{name}` is a null pointer")));
    }
    if ptr.align_offset(std::mem::align_of::<T>()) != 0 {
        return Err(invalid(format!(
            "`{name}` is not aligned to {} bytes",
            std::mem::align_of::<T>()
        )));
    }
    if len != expected {
        return Err(invalid(format!(
            "`{name}` has {len} elements, but the shape needs {expected}"
        )));
    }
    Ok(())
}

/// Copies `values` to `ptr`.
///
/// # Safety
/// `ptr` passed `check_output` with `values.len()` elements and points to
/// writable memory of that size, not borrowed anywhere else.
unsafe fn write_host<T: Copy>(ptr: *mut T, values: &[T]) {
    // SAFETY: the caller's contract; `values` is a separate Rust allocation.
    unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), ptr, values.len()) };
}

/// The reference's pass for one label type.
#[allow(clippy::too_many_arguments)]
fn run_reference<L: crate::Label>(
    config: &MultiboxConfig,
    shape: Shape,
    confidence: &[f32],
    predicted_locations: &[f32],
    labels: &[L],
    gt_locations: &[f32],
    upstream: reference::Upstream,
    pass: Pass,
    options: &reference::Options,
) -> crate::Result<reference::Output> {
    let inputs = reference::Inputs {
        confidence,
        predicted_locations,
        labels,
        gt_locations,
    };
    // The reference keeps no state: its backward is the whole computation.
    match pass {
        Pass::Forward => reference::forward_with(config, shape, &inputs, options),
        Pass::Backward | Pass::ForwardBackward => {
            reference::forward_backward_with(config, shape, &inputs, upstream, options)
        }
    }
}

/// Runs the CPU reference on `call` and writes its outputs.
///
/// # Safety
/// As `multibox_reference_forward_backward_f32`.
unsafe fn reference_f32(
    config: *const multibox_config,
    call: *const multibox_host_call_f32,
    out: *mut multibox_losses,
    pass: Pass,
) -> Result<(), Failure> {
    let backward = pass.writes_gradients();
    let config = match config.is_null() {
        true => MultiboxConfig::default(),
        // SAFETY: non-null; the caller vouches for it.
        false => self::config(unsafe { &*config })?,
    };
    // SAFETY: the caller's contract.
    let c = unsafe { read_arg("call", call) }?;
    // The backward's losses are optional: its caller has them from the forward.
    if out.is_null() && pass != Pass::Backward {
        return Err(invalid("`out` is a null pointer".into()));
    }
    let shape = shape(&c.shape);
    shape.validate()?;
    if backward {
        check_output(
            "grad_confidence",
            c.grad_confidence,
            c.grad_confidence_len,
            shape.confidence_len(),
        )?;
        check_output(
            "grad_locations",
            c.grad_locations,
            c.grad_locations_len,
            shape.locations_len(),
        )?;
    }
    if !c.mask.is_null() {
        check_output("mask", c.mask, c.mask_len, shape.rows())?;
    }
    let labels = label_type(c.label_type)?;
    let options = reference::Options {
        layout: layout(c.layout)?,
        normalizer: host_normalizer(c.normalizer, c.normalizer_value)?,
    };
    // The inputs are borrowed only inside this block; the outputs are
    // written after it, so an output overlapping an input is no aliasing.
    let result = {
        // SAFETY (all four): the caller vouches for the arrays' contents;
        // host_slice checks null, alignment and size.
        let confidence = unsafe { host_slice("confidence", c.confidence, c.confidence_len) }?;
        // SAFETY: as above.
        let predicted_locations = unsafe {
            host_slice(
                "predicted_locations",
                c.predicted_locations,
                c.predicted_locations_len,
            )
        }?;
        // SAFETY: as above.
        let gt_locations =
            unsafe { host_slice("gt_locations", c.gt_locations, c.gt_locations_len) }?;
        let upstream = reference::Upstream {
            g_reg: c.g_reg,
            g_cls: c.g_cls,
        };
        match labels {
            LabelType::I32 => {
                // SAFETY: as above.
                let l = unsafe { host_slice("labels", c.labels.cast::<i32>(), c.labels_len) }?;
                run_reference(
                    &config,
                    shape,
                    confidence,
                    predicted_locations,
                    l,
                    gt_locations,
                    upstream,
                    pass,
                    &options,
                )?
            }
            LabelType::I64 => {
                // SAFETY: as above.
                let l = unsafe { host_slice("labels", c.labels.cast::<i64>(), c.labels_len) }?;
                run_reference(
                    &config,
                    shape,
                    confidence,
                    predicted_locations,
                    l,
                    gt_locations,
                    upstream,
                    pass,
                    &options,
                )?
            }
        }
    };
    if backward {
        // SAFETY: both checked by check_output above with these lengths;
        // the caller vouches that they are writable.
        unsafe {
            write_host(c.grad_confidence, &result.grad_confidence_as::<f32>());
            write_host(c.grad_locations, &result.grad_locations_as::<f32>());
        }
    }
    if !c.mask.is_null() {
        // SAFETY: as above.
        unsafe { write_host(c.mask, &result.mask) };
    }
    let losses = multibox_losses {
        regression_loss: result.losses.regression_loss,
        classification_loss: result.losses.classification_loss,
        num_pos: result.losses.num_pos,
    };
    if out.is_null() {
        return Ok(());
    }
    // SAFETY: `out` is non-null (checked above); the caller vouches for it.
    unsafe { write_out("out", out, losses) }
}

/// The losses (and the mask, when `call->mask` is not NULL) from the CPU
/// reference, on host arrays; needs no GPU. The gradient fields of `call`
/// are ignored. `config` may be NULL for the defaults.
///
/// # Safety
/// `config`, `call` and `out` are NULL or valid; every non-NULL array in
/// `call` holds the number of elements its length field says.
#[no_mangle]
pub unsafe extern "C" fn multibox_reference_forward_f32(
    config: *const multibox_config,
    call: *const multibox_host_call_f32,
    out: *mut multibox_losses,
) -> multibox_status_code {
    // SAFETY: the caller's contract above.
    guard(|| unsafe { reference_f32(config, call, out, Pass::Forward) })
}

/// The losses and the gradients (rounded once to float) from the CPU
/// reference, on host arrays; needs no GPU. `grad_confidence` and
/// `grad_locations` are required; the mask is optional. Every problem is
/// reported before anything is written.
///
/// # Safety
/// `config`, `call` and `out` are NULL or valid; every non-NULL array in
/// `call` holds the number of elements its length field says, and the
/// outputs are writable.
#[no_mangle]
pub unsafe extern "C" fn multibox_reference_forward_backward_f32(
    config: *const multibox_config,
    call: *const multibox_host_call_f32,
    out: *mut multibox_losses,
) -> multibox_status_code {
    // SAFETY: the caller's contract above.
    guard(|| unsafe { reference_f32(config, call, out, Pass::ForwardBackward) })
}

/// The gradients from the CPU reference, for a caller that ran
/// `multibox_reference_forward_f32` on the same arrays and learned the
/// upstream gradients (`call->g_reg`, `call->g_cls`) since. The reference
/// keeps no state between calls, so this recomputes the mining from the
/// inputs; the gradients equal those of
/// `multibox_reference_forward_backward_f32`. `grad_confidence` and
/// `grad_locations` are required; `out` and the mask may be NULL.
///
/// # Safety
/// As `multibox_reference_forward_backward_f32`.
#[no_mangle]
pub unsafe extern "C" fn multibox_reference_backward_f32(
    config: *const multibox_config,
    call: *const multibox_host_call_f32,
    out: *mut multibox_losses,
) -> multibox_status_code {
    // SAFETY: the caller's contract above.
    guard(|| unsafe { reference_f32(config, call, out, Pass::Backward) })
}

// ---------------------------------------------------------------------------
// Target assignment (SPEC.md, "Target assignment"): the labels and
// gt_locations the loss takes, from padded ground-truth boxes.

/// The settings of target assignment; `multibox_target_config_default`
/// fills in the defaults.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct multibox_target_config {
    /// In (0, 1]; 0.5 by default.
    pub iou_threshold: f32,
    /// Positive, finite; 0.1 by default.
    pub center_variance: f32,
    /// Positive, finite; 0.2 by default.
    pub size_variance: f32,
    /// C of the loss that follows, so that box labels >= C are reported;
    /// 0 when unknown (the default).
    pub num_classes: u32,
}

/// The shape of an assignment: `B` images, `P` priors, `T` box rows per image.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct multibox_target_shape {
    /// B >= 1.
    pub batch: usize,
    /// P >= 1.
    pub priors: usize,
    /// T >= 1 (padding included).
    pub max_boxes: usize,
}

/// Which standard priors `multibox_standard_priors` writes.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum multibox_priors_kind {
    /// SSDLite-300 / MobileNet SSD: 3000 priors.
    MULTIBOX_PRIORS_SSDLITE300 = 0,
    /// SSD300 (VGG16): 8732 priors.
    MULTIBOX_PRIORS_SSD300 = 1,
}

/// One device assignment: device addresses of contiguous row-major arrays
/// of the assigner's device.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct multibox_target_call {
    /// The shape.
    pub shape: multibox_target_shape,
    /// A `multibox_dtype`: the type of `gt_locations`.
    pub dtype: i32,
    /// A `multibox_label_type`: the type of `gt_labels` and `labels`.
    pub label_type: i32,
    /// `[P, 4]` float priors, center form; 0 for the assigner's own priors.
    pub priors: u64,
    /// `[B, T, 4]` float boxes, corner form; rows past `gt_counts[b]` are never read.
    pub gt_boxes: u64,
    /// `[B, T]` box labels, 1..C-1.
    pub gt_labels: u64,
    /// `[B]` int32_t boxes per image.
    pub gt_counts: u64,
    /// `[B, P]` output labels.
    pub labels: u64,
    /// `[B, P, 4]` output offsets.
    pub gt_locations: u64,
    /// At least `multibox_target_workspace_bytes` bytes, 256-byte aligned.
    pub workspace: u64,
    /// Size of the workspace in bytes.
    pub workspace_bytes: usize,
}

/// What assignment recorded about its inputs (SPEC.md): nothing stops it.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct multibox_target_status {
    /// A `gt_counts[b]` outside 0..=T, clamped.
    pub count_clamped: bool,
    /// A box label below 1 (its priors get -2, which the loss refuses) or >= C
    /// when C is known (copied as it is; the loss refuses it too). Such a box
    /// keeps its best prior even where a later valid box shares it, so that
    /// it always labels one; only a degenerate one (skipped) leaves no such
    /// label, and this flag is its only record.
    pub invalid_box_label: bool,
    /// A non-finite box, or one with x1 <= x0 or y1 <= y0: skipped.
    pub degenerate_box: bool,
}

/// One CPU reference assignment on host arrays, each with its length in
/// elements; offsets are float.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct multibox_target_host_call {
    /// The shape.
    pub shape: multibox_target_shape,
    /// A `multibox_label_type`: what `gt_labels` and `labels` point to.
    pub label_type: i32,
    /// `[P, 4]` priors, center form.
    pub priors: *const f32,
    /// Elements of `priors`: P*4.
    pub priors_len: usize,
    /// `[B, T, 4]` boxes, corner form.
    pub gt_boxes: *const f32,
    /// Elements of `gt_boxes`: B*T*4.
    pub gt_boxes_len: usize,
    /// `[B, T]` box labels, int32_t or int64_t.
    pub gt_labels: *const c_void,
    /// Elements of `gt_labels`: B*T.
    pub gt_labels_len: usize,
    /// `[B]` boxes per image.
    pub gt_counts: *const i32,
    /// Elements of `gt_counts`: B.
    pub gt_counts_len: usize,
    /// `[B, P]` output labels, of the label type.
    pub labels: *mut c_void,
    /// Elements of `labels`: B*P.
    pub labels_len: usize,
    /// `[B, P, 4]` output offsets.
    pub gt_locations: *mut f32,
    /// Elements of `gt_locations`: B*P*4.
    pub gt_locations_len: usize,
}

/// Target assignment on one CUDA device (opaque): create it with
/// `multibox_assigner_create`, free it with `multibox_assigner_destroy`.
pub struct multibox_assigner {
    assigner: crate::targets::TargetAssigner,
}

fn target_config(c: &multibox_target_config) -> Result<crate::targets::TargetConfig, Failure> {
    let config = crate::targets::TargetConfig {
        iou_threshold: c.iou_threshold,
        center_variance: c.center_variance,
        size_variance: c.size_variance,
        num_classes: (c.num_classes != 0).then_some(c.num_classes),
    };
    config.validate()?;
    Ok(config)
}

/// `config` or the defaults when NULL.
///
/// # Safety
/// `config` is NULL or points to a valid `multibox_target_config`.
unsafe fn target_config_or_default(
    config: *const multibox_target_config,
) -> Result<crate::targets::TargetConfig, Failure> {
    match config.is_null() {
        true => Ok(Default::default()),
        // SAFETY: non-null; the caller vouches for it.
        false => target_config(unsafe { &*config }),
    }
}

fn target_shape(s: &multibox_target_shape) -> crate::targets::TargetShape {
    crate::targets::TargetShape::new(s.batch, s.priors, s.max_boxes)
}

/// Writes the default assignment settings (0.5, 0.1, 0.2, C unknown) to `out`.
///
/// # Safety
/// `out` is NULL or points to a writable `multibox_target_config`.
#[no_mangle]
pub unsafe extern "C" fn multibox_target_config_default(
    out: *mut multibox_target_config,
) -> multibox_status_code {
    guard(|| {
        let d = crate::targets::TargetConfig::default();
        let value = multibox_target_config {
            iou_threshold: d.iou_threshold,
            center_variance: d.center_variance,
            size_variance: d.size_variance,
            num_classes: 0,
        };
        // SAFETY: the caller's contract above.
        unsafe { write_out("out", out, value) }
    })
}

/// The workspace an assignment of this shape needs, in bytes.
///
/// # Safety
/// `out` is NULL or points to a writable `size_t`.
#[no_mangle]
pub unsafe extern "C" fn multibox_target_workspace_bytes(
    batch: usize,
    priors: usize,
    max_boxes: usize,
    out: *mut usize,
) -> multibox_status_code {
    guard(|| {
        let shape = crate::targets::TargetShape::new(batch, priors, max_boxes);
        let bytes = crate::targets::plan::workspace_bytes(shape)?;
        // SAFETY: the caller's contract above.
        unsafe { write_out("out", out, bytes) }
    })
}

/// Writes the standard priors `kind` (a `multibox_priors_kind`), `[P, 4]`
/// float center form, to `out` (`out_len` floats, exactly P*4), and P*4 to
/// `*len_out`. With `out` NULL, only `*len_out` is written (to size `out`).
///
/// # Safety
/// `len_out` is NULL or writable; `out` is NULL or holds `out_len` writable floats.
#[no_mangle]
pub unsafe extern "C" fn multibox_standard_priors(
    kind: i32,
    out: *mut f32,
    out_len: usize,
    len_out: *mut usize,
) -> multibox_status_code {
    guard(|| {
        let priors = match kind {
            0 => crate::targets::priors::ssdlite300(),
            1 => crate::targets::priors::ssd300(),
            _ => {
                return Err(invalid(format!(
                    "kind {kind} is not a multibox_priors_kind (0 SSDLite-300, 1 SSD300)"
                )))
            }
        };
        // Checked before anything is written: on failure nothing is.
        if !out.is_null() {
            check_output("out", out, out_len, priors.len())?;
        }
        // SAFETY: the caller's contract above.
        unsafe { write_out("len_out", len_out, priors.len()) }?;
        if !out.is_null() {
            // SAFETY: checked above; the caller vouches that it is writable.
            unsafe { write_host(out, &priors) };
        }
        Ok(())
    })
}

/// Creates target assignment on CUDA device `device_ordinal`'s primary
/// context: loads the kernels and uploads `priors` (`priors_len` floats,
/// `[P, 4]` center form, from host memory) once. `config` may be NULL for
/// the defaults. `*out` is NULL on any failure.
///
/// # Safety
/// `priors` is NULL or holds `priors_len` floats; `config` is NULL or
/// valid; `out` is NULL or points to a writable `multibox_assigner*`.
#[no_mangle]
pub unsafe extern "C" fn multibox_assigner_create(
    device_ordinal: i32,
    priors: *const f32,
    priors_len: usize,
    config: *const multibox_target_config,
    out: *mut *mut multibox_assigner,
) -> multibox_status_code {
    device_guard(|| {
        // SAFETY: the caller's contract above.
        unsafe { write_out("out", out, std::ptr::null_mut()) }?;
        // SAFETY: the caller's contract above.
        let config = unsafe { target_config_or_default(config) }?;
        // SAFETY: the caller's contract above; host_slice checks null and alignment.
        let priors = unsafe { host_slice("priors", priors, priors_len) }?;
        let ordinal = usize::try_from(device_ordinal)
            .map_err(|_| invalid(format!("device_ordinal {device_ordinal} is negative")))?;
        let ctx = crate::cuda_context(ordinal)?;
        let assigner = crate::targets::TargetAssigner::new(&ctx, priors, config)?;
        let handle = Box::into_raw(Box::new(multibox_assigner { assigner }));
        // SAFETY: `out` was checked non-null and written above.
        unsafe { out.write(handle) };
        Ok(())
    })
}

/// Frees an assigner from `multibox_assigner_create`; NULL is a no-op.
///
/// # Safety
/// `assigner` is NULL or came from `multibox_assigner_create` and is not
/// used again, nor is any CUDA graph that captured its launches. Work queued
/// through it may still be running: this waits for the device
/// (`cuCtxSynchronize`, so not while any thread captures a graph on this
/// device: the wait invalidates that capture, whatever its mode) before it
/// frees the assigner's priors.
#[no_mangle]
pub unsafe extern "C" fn multibox_assigner_destroy(
    assigner: *mut multibox_assigner,
) -> multibox_status_code {
    device_guard(|| {
        if !assigner.is_null() {
            // SAFETY: a pointer from Box::into_raw in multibox_assigner_create, once.
            drop(unsafe { Box::from_raw(assigner) });
        }
        Ok(())
    })
}

/// Assigns targets (3 launches on `stream`, a `CUstream`/`cudaStream_t` of
/// the assigner's device, or NULL for the legacy default stream): allocates
/// nothing, reads nothing back; every host-visible problem is reported
/// before the first launch.
///
/// # Safety
/// `assigner` is NULL or from `multibox_assigner_create`; `call` is NULL or
/// points to a `multibox_target_call` whose addresses are device
/// allocations of the assigner's device, as large as the shape and types
/// imply, alive until the work completes; `stream` is a live stream of
/// that device's primary context, or NULL. No output may overlap an input,
/// another output or the workspace, nor the workspace an input: such a
/// call is refused with `MULTIBOX_INVALID_ARGUMENT` before anything is
/// launched.
#[no_mangle]
pub unsafe extern "C" fn multibox_assign_targets(
    assigner: *const multibox_assigner,
    call: *const multibox_target_call,
    stream: *mut c_void,
) -> multibox_status_code {
    device_guard(|| {
        // SAFETY: the caller's contract above.
        let assigner = unsafe { read_arg("assigner", assigner) }?;
        // SAFETY: the caller's contract above.
        let c = unsafe { read_arg("call", call) }?;
        let raw = crate::targets::RawTargetCall {
            shape: target_shape(&c.shape),
            dtype: dtype(c.dtype)?,
            label_type: label_type(c.label_type)?,
            buffers: crate::targets::RawTargetBuffers {
                priors: c.priors,
                gt_boxes: c.gt_boxes,
                gt_labels: c.gt_labels,
                gt_counts: c.gt_counts,
                labels: c.labels,
                gt_locations: c.gt_locations,
                workspace: c.workspace,
                workspace_bytes: c.workspace_bytes,
            },
        };
        // SAFETY: the caller's contract is launch_raw's.
        unsafe { assigner.assigner.launch_raw(&raw, stream.cast()) }?;
        Ok(())
    })
}

/// Reads the status word the last assignment with this `workspace` (and
/// `shape`) left. Synchronises with `stream`.
///
/// # Safety
/// `assigner`, `shape` and `out` are NULL or valid; `workspace` is a device
/// allocation of the assigner's device of `workspace_bytes` bytes; `stream`
/// is a live stream of that device's primary context, or NULL.
#[no_mangle]
pub unsafe extern "C" fn multibox_assigner_status(
    assigner: *const multibox_assigner,
    shape: *const multibox_target_shape,
    workspace: u64,
    workspace_bytes: usize,
    stream: *mut c_void,
    out: *mut multibox_target_status,
) -> multibox_status_code {
    device_guard(|| {
        // SAFETY: the caller's contract above.
        let assigner = unsafe { read_arg("assigner", assigner) }?;
        // SAFETY: the caller's contract above.
        let shape = target_shape(unsafe { read_arg("shape", shape) }?);
        if out.is_null() {
            return Err(invalid("`out` is a null pointer".into()));
        }
        // SAFETY: the caller's contract above.
        let s = unsafe {
            assigner
                .assigner
                .status_raw(shape, workspace, workspace_bytes, stream.cast())
        }?;
        let value = multibox_target_status {
            count_clamped: s.count_clamped,
            invalid_box_label: s.invalid_box_label,
            degenerate_box: s.degenerate_box,
        };
        // SAFETY: the caller's contract above.
        unsafe { write_out("out", out, value) }
    })
}

/// The CPU reference's assignment for one label type, written to the
/// caller's outputs.
///
/// # Safety
/// As `multibox_reference_assign_targets`; the outputs passed check_output.
unsafe fn reference_assign<L: crate::Label>(
    config: &crate::targets::TargetConfig,
    c: &multibox_target_host_call,
) -> Result<crate::targets::TargetStatus, Failure> {
    let shape = target_shape(&c.shape);
    // Computed into Rust vectors, then copied: an output overlapping an
    // input is no aliasing.
    let result = {
        // SAFETY (all four): the caller vouches for the arrays' contents;
        // host_slice checks null, alignment and size.
        let priors = unsafe { host_slice("priors", c.priors, c.priors_len) }?;
        // SAFETY: as above.
        let boxes = unsafe { host_slice("gt_boxes", c.gt_boxes, c.gt_boxes_len) }?;
        // SAFETY: as above.
        let labels = unsafe { host_slice("gt_labels", c.gt_labels.cast::<L>(), c.gt_labels_len) }?;
        // SAFETY: as above.
        let counts = unsafe { host_slice("gt_counts", c.gt_counts, c.gt_counts_len) }?;
        crate::targets::reference::assign::<L>(config, shape, priors, boxes, labels, counts)?
    };
    // SAFETY: both passed check_output with these lengths (the caller of
    // this function checked them); the caller vouches that they are writable.
    unsafe {
        write_host(c.labels.cast::<L>(), &result.labels);
        write_host(c.gt_locations, &result.gt_locations);
    }
    Ok(result.status)
}

/// Target assignment by the CPU reference on host arrays; needs no GPU.
/// `config` may be NULL for the defaults; `status` may be NULL. Every
/// problem is reported before anything is written.
///
/// # Safety
/// `config`, `call` and `status` are NULL or valid; every array in `call`
/// holds the number of elements its length field says, and the outputs are
/// writable.
#[no_mangle]
pub unsafe extern "C" fn multibox_reference_assign_targets(
    config: *const multibox_target_config,
    call: *const multibox_target_host_call,
    status: *mut multibox_target_status,
) -> multibox_status_code {
    guard(|| {
        // SAFETY: the caller's contract above.
        let config = unsafe { target_config_or_default(config) }?;
        // SAFETY: the caller's contract above.
        let c = unsafe { read_arg("call", call) }?;
        let shape = target_shape(&c.shape);
        shape.validate()?;
        let label_type = label_type(c.label_type)?;
        match label_type {
            LabelType::I32 => check_output(
                "labels",
                c.labels.cast::<i32>(),
                c.labels_len,
                shape.labels_len(),
            )?,
            LabelType::I64 => check_output(
                "labels",
                c.labels.cast::<i64>(),
                c.labels_len,
                shape.labels_len(),
            )?,
        }
        check_output(
            "gt_locations",
            c.gt_locations,
            c.gt_locations_len,
            shape.locations_len(),
        )?;
        // SAFETY: the caller's contract above; the outputs were checked.
        let s = unsafe {
            match label_type {
                LabelType::I32 => reference_assign::<i32>(&config, c),
                LabelType::I64 => reference_assign::<i64>(&config, c),
            }
        }?;
        if !status.is_null() {
            let value = multibox_target_status {
                count_clamped: s.count_clamped,
                invalid_box_label: s.invalid_box_label,
                degenerate_box: s.degenerate_box,
            };
            // SAFETY: non-null; the caller vouches that it is writable.
            unsafe { status.write(value) };
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn last_error() -> String {
        // SAFETY: multibox_last_error returns a NUL-terminated string owned
        // by this thread, valid until its next failing call.
        unsafe { std::ffi::CStr::from_ptr(multibox_last_error()) }
            .to_string_lossy()
            .into_owned()
    }

    /// What crosses the boundary: success, an error's code and message,
    /// and a panic (never an unwind into C) as MULTIBOX_PANIC with the
    /// panic's text, for both kinds of payload.
    #[test]
    fn guard_turns_errors_and_panics_into_codes() {
        assert_eq!(guard(|| Ok(())), MULTIBOX_OK);
        let code = guard(|| Err(invalid("batch must be at least 1".into())));
        assert_eq!(code, MULTIBOX_INVALID_ARGUMENT);
        assert_eq!(last_error(), "batch must be at least 1");
        let code = guard(|| Err(Error::NoDevice("no CUDA driver".into()).into()));
        assert_eq!(code, MULTIBOX_NO_DEVICE);
        assert!(last_error().contains("no CUDA driver"), "{}", last_error());

        assert_eq!(guard(|| panic!("a static message")), MULTIBOX_PANIC);
        let message = last_error();
        assert!(message.starts_with("multibox panicked (a bug, please report)"));
        assert!(message.ends_with("a static message"), "{message}");
        let index = 7;
        assert_eq!(guard(|| panic!("formatted {index}")), MULTIBOX_PANIC);
        assert!(last_error().ends_with("formatted 7"), "{}", last_error());
    }
}
