//! With `MULTIBOX_EMU_SANITIZE=address MULTIBOX_EMU_ASAN_DEMO=1` (see
//! emu/README.md) this launches a kernel that writes one past the end of its
//! buffer, and AddressSanitizer must abort the process with a
//! heap-buffer-overflow report. In a normal build the kernel does not exist
//! and this test says so and does nothing; with MULTIBOX_EMU_ASAN_DEMO=1 it
//! must exist.
mod common;

use common::{addr, run};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct OobParams {
    out: u64,
    n: u32,
    unused: u32,
}

#[test]
fn asan_catches_an_out_of_bounds_write() {
    if !multibox_emu::kernel_names()
        .iter()
        .any(|k| k == "emu_asan_oob_write")
    {
        assert_ne!(
            std::env::var("MULTIBOX_EMU_ASAN_DEMO").as_deref(),
            Ok("1"),
            "MULTIBOX_EMU_ASAN_DEMO=1, but this emulator build has no demo kernel (it needs MULTIBOX_EMU_SANITIZE=address too)"
        );
        eprintln!("skipped: the AddressSanitizer demo kernel is not built (emu/README.md)");
        return;
    }
    let mut out = vec![0i32; 100];
    let params = OobParams {
        out: addr(out.as_mut_ptr()),
        n: 100,
        unused: 0,
    };
    run("emu_asan_oob_write", [2, 1, 1], [64, 1, 1], 0, &params).unwrap();
    panic!("AddressSanitizer did not stop the out-of-bounds write");
}
