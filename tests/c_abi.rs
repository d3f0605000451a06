//! The C ABI as a C program sees it: the checked-in header is the one
//! cbindgen generates from src/capi.rs (with `MULTIBOX_ABI_HASH`, the value
//! of `multibox_abi()`, added), and tests/c/test_capi.c and the README's C
//! example, compiled against it and linked with the staticlib, pass.
//!
//! Which library: `cargo test` builds the library target with all its crate
//! types (Cargo.toml's `[lib] crate-type`), and a cdylib/staticlib target
//! gets no hash in its file name, so `libmultibox.a` lies next to this test's
//! executable in `target/<profile>/deps/`, built from the same sources before
//! this test runs. No nested `cargo build` (slow, and fragile under cargo's
//! locks). Linux and macOS with a C compiler as `cc` (or `$CC`).

use std::path::{Path, PathBuf};
use std::process::Command;

const BLESS: &str = "MULTIBOX_BLESS=1 cargo test --test c_abi";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn generated_header() -> String {
    let config =
        cbindgen::Config::from_file(root().join("cbindgen.toml")).expect("cbindgen.toml parses");
    let mut out = Vec::new();
    cbindgen::Builder::new()
        .with_config(config)
        .with_src(root().join("src/capi.rs"))
        .generate()
        .expect("cbindgen generates the header from src/capi.rs")
        .write(&mut out);
    let header = String::from_utf8(out).expect("the header is UTF-8");
    // multibox_abi()'s value, which the hash leaves out of itself (see
    // declarations_hash), before the include guard's #endif.
    let end = header
        .rfind("#endif  /* MULTIBOX_H */")
        .expect("cbindgen closes the include guard");
    let hash = multibox::capi::declarations_hash(header.as_bytes());
    format!(
        "{}// multibox_abi()'s value for this header: a program built against it\n\
         // checks at start-up that the library it loaded was built from it too\n\
         // (`if (multibox_abi() != MULTIBOX_ABI_HASH) ...`).\n\
         #define MULTIBOX_ABI_HASH {hash:#018X}ULL\n\n{}",
        &header[..end],
        &header[end..]
    )
}

#[test]
fn header_is_current() {
    let path = root().join("include/multibox.h");
    let generated = generated_header();
    if std::env::var_os("MULTIBOX_BLESS").is_some_and(|v| v == "1") {
        std::fs::write(&path, &generated).expect("writes include/multibox.h");
        return;
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    if checked_in != generated {
        let first = checked_in
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(checked_in.lines().count().min(generated.lines().count()));
        panic!(
            "include/multibox.h is not what cbindgen generates from src/capi.rs \
             (first difference at line {}). Update it with:\n\n    {BLESS}\n",
            first + 1
        );
    }
}

/// The staticlib cargo built for this test run.
fn staticlib() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's path");
    let deps = exe.parent().expect("target/<profile>/deps");
    let name = if cfg!(windows) {
        "multibox.lib"
    } else {
        "libmultibox.a"
    };
    for dir in [deps, deps.parent().unwrap_or(deps)] {
        let lib = dir.join(name);
        if lib.exists() {
            return lib;
        }
    }
    panic!(
        "no {name} next to {} (is crate-type \"staticlib\" still in Cargo.toml's [lib]?)",
        exe.display()
    );
}

/// Compiles the C file `source` against the header and the staticlib into
/// `name` in this test's folder, runs it, and returns its standard output;
/// panics if either step fails.
fn compile_and_run(source: &Path, name: &str) -> String {
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("c_abi");
    std::fs::create_dir_all(&out_dir).expect("creates the output folder");
    let exe = out_dir.join(name);
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let mut compile = Command::new(&cc);
    compile
        .args([
            "-std=c11",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-pedantic",
            "-O1",
        ])
        .arg("-I")
        .arg(root().join("include"))
        .arg(source)
        .arg(staticlib())
        .arg("-o")
        .arg(&exe);
    // The system libraries Rust's std and cudarc's run-time loading of
    // libcuda need (`rustc --print native-static-libs`).
    if cfg!(target_os = "macos") {
        compile.args(["-lSystem", "-lc", "-lm", "-framework", "CoreFoundation"]);
    } else {
        compile.args([
            "-lgcc_s",
            "-lutil",
            "-lrt",
            "-lpthread",
            "-lm",
            "-ldl",
            "-lc",
        ]);
    }
    let status = compile
        .status()
        .unwrap_or_else(|e| panic!("cannot run the C compiler `{cc}`: {e}"));
    assert!(status.success(), "compiling {} failed", source.display());

    let output = Command::new(&exe).output().expect("runs the program");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(
        output.status.success(),
        "{} failed ({})",
        source.display(),
        output.status
    );
    stdout
}

#[test]
fn c_program_passes() {
    let stdout = compile_and_run(&root().join("tests/c/test_capi.c"), "test_capi");
    assert!(stdout.contains("all C ABI checks passed"), "{stdout}");
}

/// The README's C example, as a user would copy it: it compiles with the
/// header, runs, and prints the losses its comment says.
#[test]
fn the_readme_c_example_runs() {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("the README");
    let start = readme.find("```c\n").expect("the README has a C example") + 5;
    let len = readme[start..].find("```").expect("the C example ends");
    let source = Path::new(env!("CARGO_TARGET_TMPDIR")).join("readme_example.c");
    std::fs::write(&source, &readme[start..start + len]).expect("writes the example");
    let stdout = compile_and_run(&source, "readme_example");
    assert!(stdout.contains("reg 1.625 cls 1.386 N 1"), "{stdout}");
}

#[test]
fn abi_hash_follows_the_declarations_not_the_comments() {
    use multibox::capi::{declarations_hash, multibox_abi};
    let text = std::fs::read_to_string(root().join("include/multibox.h")).expect("the header");
    // The library's value is the checked-in header's (header_is_current
    // holds that header to src/capi.rs), and the header says so itself.
    assert_eq!(multibox_abi(), declarations_hash(text.as_bytes()));
    let define = format!("\n#define MULTIBOX_ABI_HASH {:#018X}ULL\n", multibox_abi());
    assert!(
        text.contains(&define),
        "the header has no `{}`",
        define.trim()
    );
    // Comments, line breaks and indentation do not count...
    let reworded = text
        .replace("// ", "//   reworded: ")
        .replace("Generated by cbindgen", "Made by cbindgen")
        .replace('\n', "\n\n");
    assert_ne!(reworded, text);
    assert_eq!(declarations_hash(reworded.as_bytes()), multibox_abi());
    // ... a field's type or a function's arguments do.
    for (from, to) in [
        ("float normalizer_value;", "double normalizer_value;"),
        ("size_t batch;", "uint32_t batch;"),
        (
            "const char *multibox_version(void);",
            "const char *multibox_version(int);",
        ),
    ] {
        let changed = text.replacen(from, to, 1);
        assert_ne!(changed, text, "the header has no `{from}`");
        assert_ne!(
            declarations_hash(changed.as_bytes()),
            multibox_abi(),
            "{from}"
        );
    }
}

/// A failing call, and `multibox_last_error`, from a thread-local's
/// destructor after the library's own thread-local (the message) is gone:
/// no panic, which would abort the process from inside a C call.
#[test]
fn calls_during_thread_exit_do_not_panic() {
    use multibox::capi::{multibox_last_error, multibox_status_code, multibox_workspace_bytes};
    use std::sync::atomic::{AtomicBool, Ordering};
    static CALLED: AtomicBool = AtomicBool::new(false);
    struct CallsOnDrop;
    impl Drop for CallsOnDrop {
        fn drop(&mut self) {
            // SAFETY: a null `out` is refused, not written.
            let code = unsafe { multibox_workspace_bytes(0, 1, 2, std::ptr::null_mut()) };
            // SAFETY: never NULL, a NUL-terminated string.
            let message = unsafe { std::ffi::CStr::from_ptr(multibox_last_error()) };
            let _ = message.to_bytes();
            CALLED.store(
                code == multibox_status_code::MULTIBOX_INVALID_ARGUMENT,
                Ordering::SeqCst,
            );
        }
    }
    thread_local!(static ON_EXIT: CallsOnDrop = const { CallsOnDrop });
    std::thread::spawn(|| {
        // Registered first, so destroyed last (glibc runs thread-local
        // destructors in reverse order of registration): after the
        // message's, which this failing call registers.
        ON_EXIT.with(|_| {});
        // SAFETY: as above.
        unsafe { multibox_workspace_bytes(0, 1, 2, std::ptr::null_mut()) };
    })
    .join()
    .unwrap();
    assert!(
        CALLED.load(Ordering::SeqCst),
        "the destructor's call did not fail as it should"
    );
}
