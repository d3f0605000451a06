//! Every kernel is compiled for every architecture, with nothing spilled.

use multibox::kernels::{images_of, sources, ImageKind, BUILD_REPORT};
use multibox::plan::Step;
use multibox::targets::plan::TargetStep;

const ARCHS: [u32; 7] = [75, 80, 86, 89, 90, 100, 120];

#[test]
fn every_source_has_a_cubin_per_architecture_and_a_ptx_fallback() {
    let sources = sources();
    for expected in ["gradient", "rows", "select", "targets"] {
        assert!(
            sources.contains(&expected),
            "kernels/{expected}.cu is not embedded: {sources:?}"
        );
    }
    for source in sources {
        let images = images_of(source);
        for arch in ARCHS {
            assert!(
                images.contains(&(arch, ImageKind::Cubin)),
                "{source}: no CUBIN for sm_{arch}"
            );
        }
        assert!(
            images.contains(&(75, ImageKind::Ptx)),
            "{source}: no compute_75 PTX"
        );
    }
}

#[test]
fn every_launched_kernel_exists_on_every_architecture_without_spills() {
    let target_kernels = TargetStep::all_kernel_names();
    for kernel in Step::all_kernel_names().into_iter().chain(target_kernels) {
        for arch in ARCHS {
            let report = BUILD_REPORT
                .iter()
                .find(|r| r.kernel == kernel && r.arch == arch)
                .unwrap_or_else(|| panic!("{kernel} was not compiled for sm_{arch}"));
            assert_eq!(
                report.spill_store_bytes, 0,
                "{kernel} spills on sm_{arch}: {report:?}"
            );
            assert_eq!(
                report.spill_load_bytes, 0,
                "{kernel} spills on sm_{arch}: {report:?}"
            );
            assert_eq!(
                report.stack_frame_bytes, 0,
                "{kernel} uses local memory on sm_{arch}: {report:?}"
            );
            // 256- and 512-thread blocks need <= 128 / 64 registers to launch at all;
            // keep well inside that so several blocks fit per SM.
            assert!(
                report.registers > 0 && report.registers <= 64,
                "{kernel} on sm_{arch}: {report:?}"
            );
        }
    }
}

#[test]
fn report_lists_each_kernel_once_per_architecture() {
    for r in BUILD_REPORT {
        let same = BUILD_REPORT
            .iter()
            .filter(|o| o.kernel == r.kernel && o.arch == r.arch)
            .count();
        assert_eq!(same, 1, "{} sm_{} reported {same} times", r.kernel, r.arch);
    }
}

#[test]
fn each_step_finds_its_kernels_in_the_source_it_loads() {
    for step in [Step::Rows, Step::Select, Step::Gradient] {
        for kernel in step.kernel_names() {
            for r in BUILD_REPORT.iter().filter(|r| r.kernel == kernel) {
                assert_eq!(r.source, step.source(), "{kernel} on sm_{}", r.arch);
            }
        }
    }
    assert_eq!(Step::Select.kernel_names(), ["multibox_select"]);
    assert_eq!(Step::Rows.kernel_names().len(), 6);
}

#[test]
fn target_assignment_kernels_live_in_targets_cu() {
    let names = TargetStep::all_kernel_names();
    assert_eq!(names.len(), 1 + 2 + 6, "{names:?}");
    for kernel in names {
        let reports: Vec<_> = BUILD_REPORT.iter().filter(|r| r.kernel == kernel).collect();
        assert!(!reports.is_empty(), "{kernel} is not in the build report");
        for r in reports {
            assert_eq!(r.source, "targets", "{kernel} on sm_{}", r.arch);
        }
    }
}

/// The largest tile of kernel 1 (logits), of kernel 2 (an image's keys)
/// and of kernel 3 (logit gradients) plus the kernel's static shared
/// memory stays within the 48 KiB a block may take without opting in to
/// more, on every architecture: above it the launch would fail on a GPU,
/// which the emulator (up to 227 KiB) would not show.
#[test]
fn staged_tiles_fit_without_opting_in_to_more_shared_memory() {
    use multibox::plan::{GRADIENT_TILE_BYTES, ROW_TILE_BYTES, SELECT_KEYS_BYTES};
    for (step, tile) in [
        (Step::Rows, ROW_TILE_BYTES),
        (Step::Select, SELECT_KEYS_BYTES),
        (Step::Gradient, GRADIENT_TILE_BYTES),
    ] {
        for kernel in step.kernel_names() {
            for r in BUILD_REPORT.iter().filter(|r| r.kernel == kernel) {
                assert!(
                    r.static_shared_bytes as usize + tile <= 48 * 1024,
                    "{kernel} on sm_{}: {} static + {tile} dynamic bytes",
                    r.arch,
                    r.static_shared_bytes
                );
            }
        }
    }
}

/// Kernel 3's entries fit 5 blocks of 256 threads in an sm_90
/// multiprocessor's 64 Ki registers (at most 48 a thread; a warp's
/// registers are allocated 256 at a time), as tiles of up to about 40 KiB
/// do in its shared memory: gradient.cu asks ptxas for it. The row-major
/// entry fits as it is; should a change make ptxas squeeze it, the spill
/// test above says so.
#[test]
fn kernel_3_keeps_five_blocks_an_sm_on_sm_90() {
    for kernel in Step::Gradient.kernel_names() {
        let r = BUILD_REPORT
            .iter()
            .find(|r| r.kernel == kernel && r.arch == 90)
            .unwrap_or_else(|| panic!("{kernel} was not compiled for sm_90"));
        let per_warp = (r.registers * 32).next_multiple_of(256);
        let blocks = 65536 / (per_warp * 8);
        assert!(
            blocks >= 5,
            "{kernel}: {} registers on sm_90 leave room for {blocks} blocks an SM",
            r.registers
        );
    }
}
