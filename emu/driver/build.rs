//! Links the library so that its own references to its symbols stay inside
//! it: a test executable that also links the emulator statically must not
//! take over this copy's registry or checker.
fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-Bsymbolic");
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libcuda.so.1");
}
