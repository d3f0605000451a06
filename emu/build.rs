//! Compiles every `../kernels/*.cu` (and the emulator's own test kernels) as
//! C++17 against the CUDA shim in `include/`, plus the fiber scheduler and
//! the checker.
//!
//! The kernel files are built with GCC's `-fsanitize=thread`
//! instrumentation: every load and store calls a `__tsan_*` function, which
//! the checker (`src/check.cpp`) implements to find races and out-of-bounds
//! accesses and to count memory traffic. No TSan runtime is linked. Under
//! `MULTIBOX_EMU_SANITIZE=address` they are built with AddressSanitizer
//! instead (GCC cannot combine the two), and the checker is off.
use std::env;
use std::fs;
use std::path::{Path, PathBuf};

fn cu_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "cu"))
        .collect();
    files.sort();
    files
}

/// The settings both builds share.
fn base(include: &Path, kernels: &Path) -> cc::Build {
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        // Fast tests even in debug builds: kernels run over ~1M elements.
        .opt_level(2)
        // Line tables, so that the checker's reports name file:line.
        .debug(true)
        .define("MULTIBOX_EMULATOR", None)
        .include(include)
        .include(kernels)
        // Nothing references the kernels' registration objects: keep them.
        .link_lib_modifier("+whole-archive");
    build
}

fn main() {
    let emu = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    // Canonical, so that error messages say kernels/x.cu, not emu/../kernels.
    let kernels = emu
        .join("../kernels")
        .canonicalize()
        .expect("the kernels/ directory");
    let root = kernels.parent().expect("the repository root").to_path_buf();
    let include = emu.join("include");
    let src = emu.join("src");
    let test_kernels = emu.join("tests/kernels");
    let asan_demo = emu.join("tests/asan_demo");
    for path in [&kernels, &include, &src, &test_kernels, &asan_demo] {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    println!("cargo:rerun-if-env-changed=MULTIBOX_EMU_SANITIZE");
    println!("cargo:rerun-if-env-changed=MULTIBOX_EMU_ASAN_DEMO");
    println!("cargo:rerun-if-env-changed=MULTIBOX_EMU_COVERAGE");

    let asan = match env::var("MULTIBOX_EMU_SANITIZE").as_deref() {
        Ok("address") => true,
        Ok("") | Err(_) => false,
        Ok(other) => panic!("MULTIBOX_EMU_SANITIZE={other}: only `address` is supported"),
    };

    let mut kernel_build = base(&include, &kernels);
    kernel_build
        // Sources are .cu: compile them as C++. `#pragma unroll` is NVRTC's.
        .flag("-x")
        .flag("c++")
        .flag("-Wno-unknown-pragmas")
        // No vectors of the host compiler's making: the traffic model and
        // the checker see the kernel's own access widths.
        .flag("-fno-tree-vectorize")
        .flag("-fno-tree-slp-vectorize")
        .files(cu_files(&kernels))
        .files(cu_files(&test_kernels));
    let mut runtime_build = base(&include, &kernels);
    runtime_build
        .file(src.join("runtime.cpp"))
        .file(src.join("check.cpp"))
        .define(
            "MULTIBOX_EMU_ROOT",
            Some(format!("\"{}/\"", root.display()).as_str()),
        );
    if asan {
        for build in [&mut kernel_build, &mut runtime_build] {
            build
                .flag("-fsanitize=address")
                .flag("-fno-omit-frame-pointer");
        }
        // The runtime itself comes from LD_PRELOAD (see README.md).
        println!("cargo:rustc-link-lib=dylib=asan");
        if env::var_os("MULTIBOX_EMU_ASAN_DEMO").is_some() {
            kernel_build.files(cu_files(&asan_demo));
        }
    } else {
        kernel_build
            .flag("-fsanitize=thread")
            // Only loads and stores: no calls at function entry and exit.
            .flag("--param=tsan-instrument-func-entry-exit=0");
        runtime_build.define("MULTIBOX_EMU_INSTRUMENTED", None);
    }
    // scripts/kernel-coverage: gcov's counters in the kernel objects.
    // MULTIBOX_EMU_COVERAGE=1 keeps this build's -O2; O0 builds at -O0
    // without forced inlining, so that each template instance is a function
    // of its own. Atomic counter updates are `lock add`s, which the TSan
    // instrumentation leaves alone: the checker never sees the counters.
    let coverage = env::var("MULTIBOX_EMU_COVERAGE").unwrap_or_default();
    if coverage == "1" || coverage == "O0" {
        kernel_build
            .flag("--coverage")
            .flag("-fprofile-update=atomic");
        if coverage == "O0" {
            kernel_build
                .flag("-O0")
                .define("MULTIBOX_EMU_NO_FORCEINLINE", None);
        }
        println!("cargo:rustc-link-lib=gcov");
    }
    runtime_build.compile("multibox_emu_runtime");
    kernel_build.compile("multibox_emu_kernels");
}
