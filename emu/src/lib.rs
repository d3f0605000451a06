//! Test-only CPU emulator for the CUDA kernels in `kernels/*.cu`.
//!
//! Every kernel is compiled for the CPU by `build.rs` and registered under
//! its name. [`launch`] runs one the way a GPU would: each block's threads as
//! fibers with CUDA's barriers, warp shuffles, votes and atomics. Blocks run
//! one after another on the calling thread, so a launch is deterministic. A
//! barrier or warp collective that can never complete makes the launch
//! return an error naming the kernel, the block and the barrier's file:line.
//!
//! See `emu/README.md` for what it cannot catch.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::fmt;

/// Why a launch was refused or stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmuError {
    /// What went wrong, naming the kernel (and block and barrier, if any).
    pub message: String,
}

impl fmt::Display for EmuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for EmuError {}

extern "C" {
    fn multibox_emu_launch(
        name: *const c_char,
        grid: *const u32,
        block: *const u32,
        dynamic_shared_bytes: u32,
        params: *const c_void,
        params_len: usize,
        err: *mut c_char,
        err_cap: usize,
    ) -> c_int;
    fn multibox_emu_kernel_count() -> usize;
    fn multibox_emu_kernel_name(index: usize) -> *const c_char;
}

/// Runs kernel `kernel` over `grid` blocks of `block` threads and returns
/// when every block has finished. `params` are the bytes of the kernel's
/// params struct (its size is checked); pointers inside are host pointers.
/// Safe to call from several threads at once.
///
/// # Safety
///
/// Every pointer in `params` must be valid for the reads and writes the
/// kernel does through it, and nothing else may access that memory during
/// the launch (kernels are C++: an out-of-bounds index is undefined
/// behaviour, as on the GPU).
pub unsafe fn launch(
    kernel: &str,
    grid: [u32; 3],
    block: [u32; 3],
    dynamic_shared_bytes: u32,
    params: &[u8],
) -> Result<(), EmuError> {
    let name = CString::new(kernel).map_err(|_| EmuError {
        message: format!("kernel name {kernel:?} contains a NUL byte"),
    })?;
    let mut err = vec![0u8; 4096];
    // SAFETY: the name is NUL-terminated, grid/block point to 3 u32 each,
    // params/err are valid for their lengths; the caller vouches for the
    // pointers inside params. The C++ side catches its own exceptions.
    let rc = unsafe {
        multibox_emu_launch(
            name.as_ptr(),
            grid.as_ptr(),
            block.as_ptr(),
            dynamic_shared_bytes,
            params.as_ptr().cast(),
            params.len(),
            err.as_mut_ptr().cast(),
            err.len(),
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let message = CStr::from_bytes_until_nul(&err)
        .map(|m| m.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "emulator error (message lost)".to_owned());
    Err(EmuError { message })
}

/// The names of every registered kernel, sorted.
pub fn kernel_names() -> Vec<String> {
    // SAFETY: the registry is filled by static constructors before main and
    // never changes afterwards.
    let count = unsafe { multibox_emu_kernel_count() };
    let mut names: Vec<String> = (0..count)
        .map(|i| {
            // SAFETY: i < count, and every name is a NUL-terminated string
            // literal with static lifetime.
            let name = unsafe { CStr::from_ptr(multibox_emu_kernel_name(i)) };
            name.to_string_lossy().into_owned()
        })
        .collect();
    names.sort();
    names
}
