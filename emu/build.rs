//! Compiles every `../kernels/*.cu` (and the emulator's own test kernels) as
//! C++17 against the CUDA shim in `include/`, plus the fiber scheduler.
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

fn main() {
    let emu = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    // Canonical, so that error messages say kernels/x.cu, not emu/../kernels.
    let kernels = emu
        .join("../kernels")
        .canonicalize()
        .expect("the kernels/ directory");
    let include = emu.join("include");
    let runtime = emu.join("src/runtime.cpp");
    let test_kernels = emu.join("tests/kernels");
    let asan_demo = emu.join("tests/asan_demo");
    for path in [&kernels, &include, &runtime, &test_kernels, &asan_demo] {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    println!("cargo:rerun-if-env-changed=MULTIBOX_EMU_SANITIZE");
    println!("cargo:rerun-if-env-changed=MULTIBOX_EMU_ASAN_DEMO");

    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        // Fast tests even in debug builds: kernels run over ~1M elements.
        .opt_level(2)
        .define("MULTIBOX_EMULATOR", None)
        .include(&include)
        .include(&kernels)
        // Sources are .cu: compile them as C++. `#pragma unroll` is NVRTC's.
        .flag("-x")
        .flag("c++")
        .flag("-Wno-unknown-pragmas")
        // Nothing references the kernels' registration objects: keep them.
        .link_lib_modifier("+whole-archive")
        .file(&runtime);
    build
        .files(cu_files(&kernels))
        .files(cu_files(&test_kernels));

    match env::var("MULTIBOX_EMU_SANITIZE").as_deref() {
        Ok("address") => {
            build
                .flag("-fsanitize=address")
                .flag("-fno-omit-frame-pointer");
            // The runtime itself comes from LD_PRELOAD (see README.md).
            println!("cargo:rustc-link-lib=dylib=asan");
            if env::var_os("MULTIBOX_EMU_ASAN_DEMO").is_some() {
                build.files(cu_files(&asan_demo));
            }
        }
        Ok("") | Err(_) => {}
        Ok(other) => panic!("MULTIBOX_EMU_SANITIZE={other}: only `address` is supported"),
    }
    build.compile("multibox_emu_kernels");
}
