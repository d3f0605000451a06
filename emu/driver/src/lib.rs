//! A CUDA driver library that runs the kernels on the CPU: test-only.
//!
//! Built as a shared library and loaded under the driver's name
//! (`libcuda.so`, see `scripts/emulated-gpu-tests`), it lets the code that
//! only a GPU runs, the crate's driver calls and the GPU tests and their
//! harness, run on a machine without one. Every `cuLaunchKernel` runs the
//! kernel's sm_90 (or sm_75, for a PTX module) build in the emulator, with
//! its race checker on and every live allocation registered as a region, so
//! that an access outside all of them fails the launch as memcheck would.
//!
//! It is a model of one device, "multibox emulator (CPU)", compute
//! capability 9.0, and of the driver's rules that this crate's calls must
//! keep: a kernel asks for the dynamic shared memory its function attribute
//! allows; copies and frees name memory the driver handed out; a stream
//! being captured into a graph records work instead of running it, and a
//! call that would synchronise while a capture forbids it fails and
//! invalidates the capture. It is stricter than a GPU where it can be:
//! fresh allocations hold 0xff bytes (NaN in every float type), not the
//! zeros a new GPU page often has.
//!
//! What it does not model: asynchrony (work runs when it is queued, so
//! stream and event order always hold), other devices, peer access,
//! managed and pinned host memory, memory pools (the device says it has
//! none), and timing (events measure the emulator).
//!
//! Exported functions take the C types of `cuda.h` and are called by the
//! driver's users only; each body runs under `call`, which turns a panic
//! into `CUDA_ERROR_UNKNOWN` rather than unwinding into C.

#![allow(non_snake_case)]

mod device;
mod errors;
mod memory;
mod module;
mod work;

use std::panic::{catch_unwind, AssertUnwindSafe};

use cudarc::driver::sys::CUresult;

/// What a driver call returns: success, or the error code.
pub(crate) type Status = Result<(), CUresult>;

/// Runs an exported function's body, turning a panic into an error code.
pub(crate) fn call(body: impl FnOnce() -> Status) -> CUresult {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => CUresult::CUDA_SUCCESS,
        Ok(Err(code)) => code,
        Err(_) => CUresult::CUDA_ERROR_UNKNOWN,
    }
}

/// Writes `value` through the caller's out-pointer `out`.
///
/// # Safety
/// `out` is null (an error) or valid for a write of a `T`.
pub(crate) unsafe fn put<T>(out: *mut T, value: T) -> Status {
    if out.is_null() {
        return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
    }
    // SAFETY: not null, and the caller's promise for the rest.
    unsafe { out.write(value) };
    Ok(())
}

/// Frees a handle this driver made with `Box::into_raw` (a module, graph
/// or event), or refuses a null one with `null_error`.
///
/// # Safety
/// `handle` is null or came from `Box::into_raw` of a `Box<T>`, and is
/// freed once.
pub(crate) unsafe fn free_handle<T>(handle: *mut T, null_error: CUresult) -> Status {
    if handle.is_null() {
        return Err(null_error);
    }
    // SAFETY: the caller's promise.
    drop(unsafe { Box::from_raw(handle) });
    Ok(())
}

#[cfg(test)]
mod tests;
