//! Launch helpers shared by the emulator's tests.
#![allow(dead_code)]

use multibox_emu::EmuError;

/// Launches `kernel` with `params` (a `#[repr(C)]` mirror of its params
/// struct, pointers as `u64` host addresses).
pub fn run<P: bytemuck::Pod>(
    kernel: &str,
    grid: [u32; 3],
    block: [u32; 3],
    dynamic_shared_bytes: u32,
    params: &P,
) -> Result<(), EmuError> {
    // SAFETY: every test passes addresses of live buffers, sized for what
    // the kernel touches, that it does not use until the launch returns.
    unsafe {
        multibox_emu::launch(
            kernel,
            grid,
            block,
            dynamic_shared_bytes,
            bytemuck::bytes_of(params),
        )
    }
}

/// A pointer as the params structs carry it.
pub fn addr<T>(p: *const T) -> u64 {
    p as usize as u64
}

/// `IoParams` of emu/tests/kernels/features.cu.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct IoParams {
    pub input: u64,
    pub out: u64,
    pub out2: u64,
}

impl IoParams {
    pub fn new(input: &[i32], out: &mut [i32], out2: &mut [i32]) -> Self {
        Self {
            input: addr(input.as_ptr()),
            out: addr(out.as_mut_ptr()),
            out2: addr(out2.as_mut_ptr()),
        }
    }
}

/// The line (1-based) of `source` that contains `MARK:<mark>`.
pub fn mark_line(source: &str, mark: &str) -> usize {
    let tag = format!("MARK:{mark}");
    source
        .lines()
        .position(|l| l.contains(&tag))
        .unwrap_or_else(|| panic!("no {tag}"))
        + 1
}
