//! Error names and descriptions, as `cuGetErrorName` and
//! `cuGetErrorString` give them.

use std::collections::BTreeMap;
use std::ffi::{c_char, CStr, CString};
use std::sync::Mutex;

use cudarc::driver::sys::CUresult;

use crate::{call, put};

/// The description of the codes this driver returns.
fn description(error: CUresult) -> &'static str {
    use CUresult::*;
    match error {
        CUDA_SUCCESS => "no error",
        CUDA_ERROR_INVALID_VALUE => "invalid argument",
        CUDA_ERROR_OUT_OF_MEMORY => "out of memory",
        CUDA_ERROR_INVALID_DEVICE => "invalid device ordinal",
        CUDA_ERROR_INVALID_PTX => "a PTX JIT compilation failed",
        CUDA_ERROR_INVALID_CONTEXT => "invalid device context",
        CUDA_ERROR_INVALID_HANDLE => "invalid resource handle",
        CUDA_ERROR_NOT_FOUND => "named symbol not found",
        CUDA_ERROR_NOT_SUPPORTED => "operation not supported",
        CUDA_ERROR_ILLEGAL_STATE => "the operation is not permitted in the current state",
        CUDA_ERROR_LAUNCH_FAILED => {
            "unspecified launch failure (the emulator's message is on stderr)"
        }
        CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED => "operation not permitted when stream is capturing",
        CUDA_ERROR_STREAM_CAPTURE_INVALIDATED => {
            "operation failed due to a previous error during capture"
        }
        CUDA_ERROR_STREAM_CAPTURE_IMPLICIT => {
            "operation would make the legacy stream depend on a capturing blocking stream"
        }
        CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD => {
            "attempt to terminate a thread-local capture sequence from another thread"
        }
        _ => "unknown error",
    }
}

/// The name or the description of `error`, as a C string that lives as
/// long as the process (made once per code and kind).
fn text(error: CUresult, name: bool) -> *const c_char {
    static TEXTS: Mutex<BTreeMap<(u32, bool), &'static CStr>> = Mutex::new(BTreeMap::new());
    let mut texts = TEXTS.lock().unwrap_or_else(|e| e.into_inner());
    texts
        .entry((error as u32, name))
        .or_insert_with(|| {
            let s = if name {
                format!("{error:?}")
            } else {
                description(error).to_owned()
            };
            Box::leak(CString::new(s).expect("no NUL").into_boxed_c_str())
        })
        .as_ptr()
}

/// The error's enum name, e.g. `CUDA_ERROR_INVALID_VALUE`.
///
/// # Safety
/// `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn cuGetErrorName(error: CUresult, out: *mut *const c_char) -> CUresult {
    // SAFETY: the caller's promise.
    call(|| unsafe { put(out, text(error, true)) })
}

/// The error's description.
///
/// # Safety
/// `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn cuGetErrorString(error: CUresult, out: *mut *const c_char) -> CUresult {
    // SAFETY: the caller's promise.
    call(|| unsafe { put(out, text(error, false)) })
}
