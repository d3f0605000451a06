//! Compiles every `kernels/*.cu` through NVRTC to a CUBIN per architecture
//! plus a PTX fallback, embeds them, and records what ptxas reports
//! (registers, spills, shared memory) for each kernel.
//!
//! NVRTC is loaded at build time only, from (in order) `MULTIBOX_NVRTC` (a
//! path to libnvrtc), the project's `.cuda/` (filled by `scripts/setup`),
//! `CUDA_HOME` / `CUDA_PATH`, and the usual system locations.
//! `MULTIBOX_SKIP_KERNELS=1` builds the CPU parts alone.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Architectures that get a CUBIN. Another device loads the CUBIN of its
/// major version with the highest minor not above its own (sm_87 runs
/// sm_86's), else the PTX; devices older than sm_75 load nothing.
const CUBIN_ARCHS: &[u32] = &[75, 80, 86, 89, 90, 100, 120];
/// The PTX fallback targets the oldest architecture we support, so any newer
/// driver can JIT it.
const PTX_ARCH: u32 = 75;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    for var in [
        "MULTIBOX_SKIP_KERNELS",
        "MULTIBOX_NVRTC",
        "CUDA_HOME",
        "CUDA_PATH",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo::rustc-check-cfg=cfg(multibox_no_kernels)");

    let manifest = PathBuf::from(env("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env("OUT_DIR"));
    let kernel_dir = manifest.join("kernels");
    let generated = out_dir.join("kernels.rs");

    if std::env::var("MULTIBOX_SKIP_KERNELS").is_ok_and(|v| v == "1") {
        println!(
            "cargo:warning=MULTIBOX_SKIP_KERNELS=1: building without CUDA kernels; \
             only the CPU reference works in this build"
        );
        println!("cargo:rustc-cfg=multibox_no_kernels");
        write(&generated, render(&[], "none (MULTIBOX_SKIP_KERNELS=1)"));
        return;
    }

    let nvrtc = match Nvrtc::find(&manifest) {
        Ok(nvrtc) => nvrtc,
        Err(searched) => fail_without_nvrtc(&searched),
    };

    let mut sources: Vec<PathBuf> = std::fs::read_dir(&kernel_dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", kernel_dir.display()))
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();

    // One NVRTC compile per source file and target; run them on every core.
    let jobs: Vec<(PathBuf, Target)> = sources
        .iter()
        .flat_map(|s| {
            CUBIN_ARCHS
                .iter()
                .map(|&a| (s.clone(), Target::Cubin(a)))
                .chain(std::iter::once((s.clone(), Target::Ptx(PTX_ARCH))))
        })
        .collect();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some((src, target)) = jobs.get(i) else {
                    break;
                };
                let compiled = nvrtc.compile(src, &kernel_dir, *target);
                results.lock().unwrap().push((i, compiled));
            });
        }
    });
    let mut results = results.into_inner().unwrap();
    results.sort_by_key(|(i, _)| *i);

    let mut modules = Vec::new();
    let mut failures = String::new();
    for (i, result) in results {
        let (src, target) = &jobs[i];
        match result {
            Ok(compiled) => {
                let stem = src.file_stem().unwrap().to_string_lossy().into_owned();
                let file = out_dir.join(format!("{stem}.{}", target.file_suffix()));
                write(&file, &compiled.image);
                modules.push(Module {
                    stem,
                    target: *target,
                    file,
                    reports: compiled.reports,
                });
            }
            Err(log) => {
                let _ = writeln!(
                    failures,
                    "--- {} for {}:\n{log}",
                    src.display(),
                    target.name()
                );
            }
        }
    }
    if !failures.is_empty() {
        panic!("NVRTC could not compile the kernels:\n{failures}");
    }
    write(&generated, render(&modules, &nvrtc.version()));
}

#[derive(Clone, Copy)]
enum Target {
    Cubin(u32),
    Ptx(u32),
}

impl Target {
    fn name(self) -> String {
        match self {
            Target::Cubin(a) => format!("sm_{a}"),
            Target::Ptx(a) => format!("compute_{a}"),
        }
    }
    fn file_suffix(self) -> String {
        match self {
            Target::Cubin(a) => format!("sm_{a}.cubin"),
            Target::Ptx(a) => format!("compute_{a}.ptx"),
        }
    }
}

struct Module {
    stem: String,
    target: Target,
    file: PathBuf,
    reports: Vec<Report>,
}

/// What ptxas says about one kernel on one architecture.
#[derive(Default, Clone)]
struct Report {
    kernel: String,
    registers: u32,
    spill_stores: u32,
    spill_loads: u32,
    stack_frame: u32,
    shared: u32,
}

struct Compiled {
    image: Vec<u8>,
    reports: Vec<Report>,
}

/// Parses the `--ptxas-options=-v` lines of an NVRTC log.
fn parse_ptxas_log(log: &str) -> Vec<Report> {
    let mut reports: Vec<Report> = Vec::new();
    let number_before = |line: &str, unit: &str| -> Option<u32> {
        let end = line.find(unit)?;
        line[..end].split_whitespace().last()?.parse().ok()
    };
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or_default().to_string();
            reports.push(Report {
                kernel: name,
                ..Report::default()
            });
        } else if let Some(r) = reports.last_mut() {
            if line.contains("bytes stack frame") {
                r.stack_frame = number_before(line, "bytes stack frame").unwrap_or(0);
                r.spill_stores = number_before(line, "bytes spill stores").unwrap_or(0);
                r.spill_loads = number_before(line, "bytes spill loads").unwrap_or(0);
            } else if line.contains("Used") && line.contains("registers") {
                r.registers = number_before(line, "registers").unwrap_or(0);
                r.shared = number_before(line, "bytes smem").unwrap_or(0);
            }
        }
    }
    reports
}

fn render(modules: &[Module], nvrtc_version: &str) -> String {
    let mut s = String::from("// Generated by build.rs. Do not edit.\n\n");
    let _ = writeln!(s, "/// The NVRTC that compiled the embedded kernels.");
    let _ = writeln!(s, "pub const NVRTC_VERSION: &str = {nvrtc_version:?};\n");
    let _ = writeln!(s, "pub(crate) static IMAGES: &[EmbeddedImage] = &[");
    for m in modules {
        let (arch, kind) = match m.target {
            Target::Cubin(a) => (a, "ImageKind::Cubin"),
            Target::Ptx(a) => (a, "ImageKind::Ptx"),
        };
        let _ = writeln!(
            s,
            "    EmbeddedImage {{ source: {:?}, arch: {arch}, kind: {kind}, bytes: include_bytes!({:?}) }},",
            m.stem,
            m.file.display().to_string()
        );
    }
    s.push_str("];\n\n");
    s.push_str("/// Registers, spills and shared memory per kernel and architecture, as ptxas reported them.\n");
    s.push_str("pub static BUILD_REPORT: &[KernelReport] = &[\n");
    for m in modules {
        let Target::Cubin(arch) = m.target else {
            continue;
        };
        for r in &m.reports {
            let _ = writeln!(
                s,
                "    KernelReport {{ kernel: {:?}, source: {:?}, arch: {arch}, registers: {}, spill_store_bytes: {}, spill_load_bytes: {}, stack_frame_bytes: {}, static_shared_bytes: {} }},",
                r.kernel, m.stem, r.registers, r.spill_stores, r.spill_loads, r.stack_frame, r.shared
            );
        }
    }
    s.push_str("];\n");
    s
}

fn write(path: &Path, data: impl AsRef<[u8]>) {
    // Leave an unchanged file alone so that rustc does not rebuild for nothing.
    if std::fs::read(path).is_ok_and(|old| old == data.as_ref()) {
        return;
    }
    std::fs::write(path, data).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("cargo did not set {name}"))
}

fn fail_without_nvrtc(searched: &[String]) -> ! {
    panic!(
        "\n\nmultibox: NVRTC (the CUDA runtime compiler, libnvrtc.so.12) was not found, so the \
         CUDA kernels cannot be compiled.\n\
         Run this once in the repository, then build again:\n\n    scripts/setup\n\n\
         (it installs the pinned NVRTC from PyPI into .cuda/). Or point MULTIBOX_NVRTC at a \
         libnvrtc.so, or set CUDA_HOME to a CUDA toolkit.\n\
         To build only the CPU parts (documentation builds), set MULTIBOX_SKIP_KERNELS=1.\n\
         Searched:\n  {}\n",
        searched.join("\n  ")
    )
}

type NvrtcResult = c_int;
type Program = *mut c_void;

/// The handful of NVRTC entry points the build needs, loaded from a path we
/// choose (NVRTC is never linked).
struct Nvrtc {
    _lib: libloading::Library,
    version: unsafe extern "C" fn(*mut c_int, *mut c_int) -> NvrtcResult,
    create: unsafe extern "C" fn(
        *mut Program,
        *const c_char,
        *const c_char,
        c_int,
        *const *const c_char,
        *const *const c_char,
    ) -> NvrtcResult,
    compile: unsafe extern "C" fn(Program, c_int, *const *const c_char) -> NvrtcResult,
    destroy: unsafe extern "C" fn(*mut Program) -> NvrtcResult,
    log_size: unsafe extern "C" fn(Program, *mut usize) -> NvrtcResult,
    log: unsafe extern "C" fn(Program, *mut c_char) -> NvrtcResult,
    cubin_size: unsafe extern "C" fn(Program, *mut usize) -> NvrtcResult,
    cubin: unsafe extern "C" fn(Program, *mut c_char) -> NvrtcResult,
    ptx_size: unsafe extern "C" fn(Program, *mut usize) -> NvrtcResult,
    ptx: unsafe extern "C" fn(Program, *mut c_char) -> NvrtcResult,
}

impl Nvrtc {
    fn find(manifest: &Path) -> Result<Self, Vec<String>> {
        let mut candidates: Vec<PathBuf> = Vec::new();
        if let Ok(p) = std::env::var("MULTIBOX_NVRTC") {
            candidates.push(p.into());
        }
        candidates.push(manifest.join(".cuda/nvidia/cuda_nvrtc/lib/libnvrtc.so.12"));
        for var in ["CUDA_HOME", "CUDA_PATH"] {
            if let Ok(root) = std::env::var(var) {
                for lib in ["lib64", "lib", "targets/x86_64-linux/lib"] {
                    candidates.push(Path::new(&root).join(lib).join("libnvrtc.so"));
                }
            }
        }
        for dir in [
            "/usr/local/cuda/lib64",
            "/usr/lib/x86_64-linux-gnu",
            "/usr/lib64",
        ] {
            candidates.push(Path::new(dir).join("libnvrtc.so"));
            candidates.push(Path::new(dir).join("libnvrtc.so.12"));
        }
        let mut searched = Vec::new();
        for path in candidates {
            if !path.exists() {
                searched.push(path.display().to_string());
                continue;
            }
            // SAFETY: loading NVRTC runs its initialisers, which have no
            // preconditions; the library stays loaded as long as `Nvrtc`.
            match unsafe { libloading::Library::new(&path) } {
                Ok(lib) => {
                    println!("cargo:rerun-if-changed={}", path.display());
                    return Self::bind(lib).map_err(|e| vec![format!("{}: {e}", path.display())]);
                }
                Err(e) => searched.push(format!("{} ({e})", path.display())),
            }
        }
        Err(searched)
    }

    fn bind(lib: libloading::Library) -> Result<Self, libloading::Error> {
        // SAFETY: each symbol is looked up under its documented NVRTC name
        // and given its signature from nvrtc.h.
        unsafe {
            Ok(Self {
                version: *lib.get(b"nvrtcVersion\0")?,
                create: *lib.get(b"nvrtcCreateProgram\0")?,
                compile: *lib.get(b"nvrtcCompileProgram\0")?,
                destroy: *lib.get(b"nvrtcDestroyProgram\0")?,
                log_size: *lib.get(b"nvrtcGetProgramLogSize\0")?,
                log: *lib.get(b"nvrtcGetProgramLog\0")?,
                cubin_size: *lib.get(b"nvrtcGetCUBINSize\0")?,
                cubin: *lib.get(b"nvrtcGetCUBIN\0")?,
                ptx_size: *lib.get(b"nvrtcGetPTXSize\0")?,
                ptx: *lib.get(b"nvrtcGetPTX\0")?,
                _lib: lib,
            })
        }
    }

    fn version(&self) -> String {
        let (mut major, mut minor) = (0, 0);
        // SAFETY: both pointers are valid for one write.
        unsafe { (self.version)(&mut major, &mut minor) };
        format!("{major}.{minor}")
    }

    fn compile(&self, src: &Path, include_dir: &Path, target: Target) -> Result<Compiled, String> {
        let text = std::fs::read_to_string(src).map_err(|e| e.to_string())?;
        let text = CString::new(text).map_err(|e| e.to_string())?;
        let name = CString::new(src.file_name().unwrap().to_string_lossy().as_bytes()).unwrap();
        let options: Vec<CString> = [
            format!("--gpu-architecture={}", target.name()),
            "--std=c++17".into(),
            // Device code is all there is: a generic lambda (kernels/rows.cu's
            // row walks, over either kind of term) has no execution space of
            // its own, and NVRTC would take it for host code.
            "-default-device".into(),
            format!("--include-path={}", include_dir.display()),
            // Source lines in nsys / ncu; costs nothing at run time.
            "--generate-line-info".into(),
            "--ptxas-options=-v".into(),
        ]
        .into_iter()
        .map(|o| CString::new(o).unwrap())
        .collect();
        let option_ptrs: Vec<*const c_char> = options.iter().map(|o| o.as_ptr()).collect();

        let mut prog: Program = std::ptr::null_mut();
        // SAFETY: every pointer passed to NVRTC points to a live, NUL-terminated
        // string or a buffer of the size NVRTC itself reported; the program is
        // destroyed exactly once, below.
        unsafe {
            let rc = (self.create)(
                &mut prog,
                text.as_ptr(),
                name.as_ptr(),
                0,
                std::ptr::null(),
                std::ptr::null(),
            );
            if rc != 0 {
                return Err(format!("nvrtcCreateProgram failed with code {rc}"));
            }
            let rc = (self.compile)(prog, option_ptrs.len() as c_int, option_ptrs.as_ptr());
            let mut size = 0usize;
            (self.log_size)(prog, &mut size);
            let mut log = vec![0u8; size.max(1)];
            (self.log)(prog, log.as_mut_ptr().cast());
            let log = CStr::from_bytes_until_nul(&log)
                .map(|c| c.to_string_lossy().into_owned())
                .unwrap_or_default();
            let result = if rc != 0 {
                Err(log)
            } else {
                let (get_size, get): (
                    unsafe extern "C" fn(Program, *mut usize) -> NvrtcResult,
                    unsafe extern "C" fn(Program, *mut c_char) -> NvrtcResult,
                ) = match target {
                    Target::Cubin(_) => (self.cubin_size, self.cubin),
                    Target::Ptx(_) => (self.ptx_size, self.ptx),
                };
                let mut size = 0usize;
                get_size(prog, &mut size);
                let mut image = vec![0u8; size];
                get(prog, image.as_mut_ptr().cast());
                Ok(Compiled {
                    image,
                    reports: parse_ptxas_log(&log),
                })
            };
            (self.destroy)(&mut prog);
            result
        }
    }
}
