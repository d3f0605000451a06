//! Launches that break CUDA's rules fail with an error naming the kernel, the
//! block and the barrier, instead of hanging or crashing (kernels in
//! emu/tests/kernels/faults.cu).
mod common;

use common::{addr, mark_line, run};
use multibox_emu::{kernel_names, Arch};

const FAULTS: &str = include_str!("kernels/faults.cu");

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct FaultParams {
    out: u64,
}

/// Runs a faulty kernel and returns its error message.
fn fault(kernel: &str, grid: [u32; 3], block: [u32; 3]) -> String {
    let mut out = vec![0i32; 1024];
    let err = run(
        kernel,
        grid,
        block,
        0,
        &FaultParams {
            out: addr(out.as_mut_ptr()),
        },
    )
    .unwrap_err();
    let message = err.to_string();
    assert!(message.contains(&format!("kernel `{kernel}`")), "{message}");
    message
}

fn assert_has(message: &str, parts: &[&str]) {
    for part in parts {
        assert!(message.contains(part), "{part:?} missing from: {message}");
    }
}

fn at(mark: &str) -> String {
    format!("faults.cu:{}", mark_line(FAULTS, mark))
}

#[test]
fn syncthreads_reached_by_part_of_the_block() {
    let m = fault("emu_fault_partial_syncthreads", [2, 1, 1], [32, 1, 1]);
    let bar = at("partial_syncthreads");
    assert_has(
        &m,
        &[
            "block (1, 0, 0)",
            "`__syncthreads`",
            &bar,
            "16 of 32",
            "16 exited",
            "thread (16, 0, 0)",
        ],
    );
}

#[test]
fn two_different_syncthreads() {
    let m = fault("emu_fault_split_syncthreads", [1, 1, 1], [64, 1, 1]);
    assert_has(
        &m,
        &[
            "block (0, 0, 0)",
            "different barriers",
            &at("split_a"),
            &at("split_b"),
        ],
    );
}

#[test]
fn shuffle_whose_lanes_never_arrive() {
    let m = fault("emu_fault_partial_shuffle", [1, 1, 1], [64, 1, 1]);
    assert_has(
        &m,
        &[
            "block (0, 0, 0)",
            "`__shfl_xor_sync`",
            &at("partial_shuffle"),
            "lane 16 exited",
        ],
    );
}

#[test]
fn shuffle_with_mismatched_masks() {
    let m = fault("emu_fault_mask_mismatch", [1, 1, 1], [32, 1, 1]);
    assert_has(
        &m,
        &[
            &at("mask_mismatch"),
            "mask 0x00000003",
            "lane 1 waits there with mask 0xffffffff",
        ],
    );
}

#[test]
fn warp_reduce_missing_a_lane_while_another_warp_waits_at_syncthreads() {
    let m = fault("emu_fault_warp_vs_block", [1, 1, 1], [64, 1, 1]);
    assert_has(&m, &["thread (0, 0, 0)", "common.cuh:", "lane 5 exited"]);
}

#[test]
fn invalid_collective_arguments_and_trap() {
    let m = fault("emu_fault_bad_width", [1, 1, 1], [32, 1, 1]);
    assert_has(&m, &[&at("bad_width"), "width 12"]);
    let m = fault("emu_fault_mask_without_self", [1, 1, 1], [32, 1, 1]);
    assert_has(
        &m,
        &[
            &at("without_self"),
            "thread (1, 0, 0)",
            "does not name the calling lane 1",
        ],
    );
    let m = fault("emu_fault_trap", [1, 2, 1], [32, 1, 1]);
    assert_has(
        &m,
        &[
            "block (0, 1, 0)",
            "thread (7, 0, 0)",
            "`__trap`",
            &at("trap"),
        ],
    );
}

#[test]
fn a_thread_runs_kernels_normally_after_a_failed_launch() {
    for _ in 0..3 {
        fault("emu_fault_partial_shuffle", [1, 1, 1], [64, 1, 1]);
        let input: Vec<i32> = (0..256).collect();
        let (mut every, mut total) = (vec![0; 256], vec![0]);
        let params = common::IoParams::new(&input, &mut every, &mut total);
        run("emu_test_block_sum", [1, 1, 1], [256, 1, 1], 0, &params).unwrap();
        assert_eq!(total[0], 255 * 256 / 2);
    }
}

#[test]
fn launch_checks() {
    let params = FaultParams { out: 0 };
    let refused = |kernel: &str, grid, block, smem, bytes: &[u8]| {
        // SAFETY: every one of these launches is refused before any thread
        // runs, so the null pointer is never used.
        unsafe { multibox_emu::launch(kernel, grid, block, smem, bytes) }
            .unwrap_err()
            .message
    };
    let bytes = bytemuck::bytes_of(&params);
    let k = "emu_fault_trap";
    assert!(refused("no_such_kernel", [1; 3], [32, 1, 1], 0, bytes)
        .contains("unknown kernel `no_such_kernel`"));
    assert!(refused("bad\0name", [1; 3], [32, 1, 1], 0, bytes).contains("NUL"));
    assert!(refused(k, [1; 3], [32, 1, 1], 0, &[0; 12])
        .contains("params are 12 bytes, its params struct is 8"));
    assert!(refused(k, [1; 3], [1025, 1, 1], 0, bytes).contains("block (1025, 1, 1)"));
    assert!(refused(k, [1; 3], [32, 32, 2], 0, bytes).contains("block (32, 32, 2)"));
    assert!(refused(k, [1; 3], [0, 1, 1], 0, bytes).contains("block (0, 1, 1)"));
    assert!(refused(k, [1; 3], [1, 1, 65], 0, bytes).contains("z <= 64"));
    assert!(refused(k, [0, 1, 1], [32, 1, 1], 0, bytes).contains("grid (0, 1, 1)"));
    assert!(refused(k, [1, 65536, 1], [32, 1, 1], 0, bytes).contains("grid (1, 65536, 1)"));
    assert!(refused(k, [1; 3], [32, 1, 1], 1 << 20, bytes).contains("dynamic shared memory"));
    // The emulator's test kernels have no sm_90 build.
    let checks = multibox_emu::Checks {
        arch: Arch::Sm90,
        ..Default::default()
    };
    // SAFETY: refused before any thread runs, as above.
    let err = unsafe { multibox_emu::launch_checked(k, [1; 3], [32, 1, 1], 0, bytes, &checks) }
        .unwrap_err()
        .message;
    assert!(
        err.contains("kernel `emu_fault_trap` has no sm_90 build"),
        "{err}"
    );
}

#[test]
fn every_kernel_is_registered_once() {
    let names = kernel_names();
    for k in [
        "multibox_logsumexp_f32",
        "multibox_logsumexp_f16",
        "multibox_logsumexp_bf16",
        "emu_test_shuffles",
    ] {
        assert!(names.iter().any(|n| n == k), "{k} missing from {names:?}");
    }
    let builds = multibox_emu::kernel_builds();
    let mut unique = builds.clone();
    unique.dedup();
    assert_eq!(
        unique, builds,
        "a kernel is registered twice for one architecture"
    );
    // kernels/*.cu for both architectures, the emulator's test kernels for sm_75.
    for (name, archs) in [
        ("multibox_select", vec![Arch::Sm75, Arch::Sm90]),
        ("multibox_logsumexp_f32", vec![Arch::Sm75]),
        ("emu_test_shuffles", vec![Arch::Sm75]),
    ] {
        let got: Vec<Arch> = builds
            .iter()
            .filter(|(n, _)| n == name)
            .map(|&(_, a)| a)
            .collect();
        assert_eq!(got, archs, "{name}");
    }
}
